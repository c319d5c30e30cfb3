"""The analysis report of a collection folder: `index.html` (self-contained, figures inline), every
figure also as `<what it shows>.png` and `.svg` next to it, and every number as records of one
versioned schema in `summary.json` and `summary.csv` (`SUMMARY_FIELDS`; docs/analysis.md §6).

Sections: the tasks; per task, language drift aligned by env step (success and failure apart),
expert 0 × expert 1 CKA, the actions' attention to the prompt (per head when recorded), expert 1
across denoising steps; across tasks, task-stratified success probes, task identity where it is
not given away, and continuous probes — each with its interval and permutation p-values.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import html
import io
import json
import math
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from tqdm import tqdm

from latentpi.client.analysis import api, cohort, metrics, probes
from latentpi.protocol.errors import ValidationError

SUMMARY_SCHEMA = "latentpi.analysis.summary"
SUMMARY_VERSION = 1
# One record per metric × source × task × layer × sample (…); None where an axis does not apply.
SUMMARY_FIELDS: tuple[str, ...] = (
    "section", "metric", "source", "task", "layer", "layer_other", "sample", "timestep", "step",
    "head", "outcome", "estimate", "ci_low", "ci_high", "p_value", "p_value_family", "chance",
    "n", "note",
)  # fmt: skip


@dataclass(frozen=True)
class ReportConfig:
    expert_type: api.ExpertType = "text_only"  # whose prompt representation the drift follows
    probe: probes.ProbeConfig = field(
        default_factory=lambda: probes.ProbeConfig(n_shuffles=200, n_bootstrap=100)
    )
    task_samples: int = 3  # rollout samples (spread over the window) for task and continuous probes


@dataclass
class Section:
    title: str
    out: Path | None = None  # where figure files go (None: inline only)
    parts: list[str] = field(default_factory=list)  # HTML fragments
    records: list[dict[str, Any]] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    error: str = ""  # why the section could not be made

    def note(self, text: str) -> None:
        self.parts.append(f"<p class='note'>{html.escape(text)}</p>")

    fields: ClassVar[tuple[str, ...]] = SUMMARY_FIELDS  # a record's columns

    def record(self, metric: str, estimate: float | None, **fields: Any) -> None:
        unknown = set(fields) - set(self.fields)
        if unknown:
            kind = type(self).__name__
            raise ValueError(f"{kind} fields: {sorted(unknown)} are not among {self.fields}")
        row = dict.fromkeys(self.fields)
        row |= {"section": self.title, "metric": metric, "estimate": estimate, **fields}
        self.records.append(row)

    def figure(self, fig: Figure, caption: str, name: str) -> None:
        """Inline PNG in the page, plus `<name>.png` and `<name>.svg` next to it."""
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
        data = base64.b64encode(buffer.getvalue()).decode()
        links = ""
        if self.out is not None:
            stem = _slug(name)
            (self.out / f"{stem}.png").write_bytes(buffer.getvalue())
            fig.savefig(self.out / f"{stem}.svg", format="svg", bbox_inches="tight")
            self.figures += [f"{stem}.png", f"{stem}.svg"]
            links = f" (<a href='{stem}.png'>{stem}.png</a>, <a href='{stem}.svg'>svg</a>)"
        self.parts.append(
            f"<figure><img src='data:image/png;base64,{data}'/>"
            f"<figcaption>{html.escape(caption)}{links}</figcaption></figure>"
        )

    def table(self, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
            for row in rows
        )
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")


@dataclass(frozen=True)
class _Context:
    config: ReportConfig
    out: Path


def find_task_files(root: str | Path) -> list[Path]:
    """Task files under `root` (`<suite>/task_<id>_<name>.h5`), not the per-episode files."""
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("task_*.h5") if not p.parent.name.endswith(".h5.d"))


def build_report(
    root: str | Path,
    out: str | Path,
    config: ReportConfig | None = None,
    *,
    progress: bool | None = None,
) -> Path:
    """Analyse every task file under `root`; write `out/index.html`, the figure files,
    `out/summary.json` and `out/summary.csv`. progress: a progress bar on stderr (None: only when
    stderr is a terminal)."""
    ctx = _Context(config or ReportConfig(), Path(out))
    paths = find_task_files(root)
    if not paths:
        raise ValidationError(
            "DIR", "a folder holding task files (<suite>/task_<id>_<name>.h5)", str(root)
        )
    ctx.out.mkdir(parents=True, exist_ok=True)
    datas = [api.load_inference_task_data(path) for path in paths]
    try:
        sections = _sections(datas, ctx, progress)
        summary = _summary(datas, sections)  # reads the files: before they are closed
    finally:
        for data in datas:
            data.close()
    (ctx.out / "index.html").write_text(_page(sections))
    (ctx.out / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False))
    _write_csv(ctx.out / "summary.csv", summary["records"])
    return ctx.out / "index.html"


def _sections(datas: list[api.TaskData], ctx: _Context, progress: bool | None) -> list[Section]:
    bar = tqdm(
        total=len(datas) * len(_PER_TASK) + len(_COHORT),
        desc="analyze",
        unit="section",
        disable=None if progress is None else not progress,  # tqdm: None = only on a terminal
    )
    sections = [_overview(datas)]
    with bar:
        for data in datas:
            if not data.episodes:
                sections.append(Section(_label(data)))
                sections[-1].note("no recorded episode yet")
                bar.update(len(_PER_TASK))
                continue
            for title, fn in _PER_TASK:
                sections.append(_guarded(f"{_label(data)}: {title}", fn, data, ctx))
                bar.update()
        for title, fn in _COHORT:
            sections.append(_guarded(title, fn, datas, ctx))
            bar.update()
    return sections


def _summary(datas: Sequence[api.TaskData], sections: Sequence[Section]) -> dict[str, Any]:
    return {
        "schema": SUMMARY_SCHEMA,
        "schema_version": SUMMARY_VERSION,
        "fields": list(SUMMARY_FIELDS),
        "tasks": [
            {
                "task": d.task_id,
                "suite": d.attrs.get("suite", ""),
                "instruction": d.instruction,
                "episodes": len(d.episodes),
                "successes": sum(e.success for e in d.episodes),
            }
            for d in datas
        ],
        "figures": [name for s in sections for name in s.figures],
        "unavailable": {s.title: s.error for s in sections if s.error},
        "records": [_plain(r) for s in sections for r in s.records],
    }


def _write_csv(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """The records of summary.json, one row each, columns `SUMMARY_FIELDS`; empty for null."""
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        for row in records:
            writer.writerow({k: "" if row[k] is None else row[k] for k in SUMMARY_FIELDS})


def _guarded(title: str, fn: Callable[..., Section], subject: Any, ctx: _Context) -> Section:
    """A section, or one that says why it could not be made (missing arrays, too little data)."""
    try:
        section = fn(subject, Section(title, ctx.out), ctx)
    except (ValidationError, KeyError) as error:
        section = Section(title, error=str(error))
        section.note(f"not available: {error}")
    return section


# -- per task ---------------------------------------------------------------------------------


def _overview(datas: Sequence[api.TaskData]) -> Section:
    section = Section("Tasks")
    rows = []
    for data in datas:
        episodes = data.episodes
        successes = sum(e.success for e in episodes)
        samples = [e.num_samples for e in episodes]
        rows.append([
            data.task_id, data.instruction, len(episodes),
            f"{successes}/{len(episodes)}", f"{min(samples, default=0)}–{max(samples, default=0)}",
            data.attrs.get("model_config", ""), json.dumps(data.attrs.get("latent_spec")),
        ])  # fmt: skip
    section.table(
        ["task", "instruction", "episodes", "success", "samples / episode", "model", "latent spec"],
        rows,
    )
    return section


_DRIFTS = (
    ("cosine_drift", "cosine_distance", "1 − cos to the first sample (raw)"),
    ("centred_cosine_drift", "centred_cosine_distance", "1 − cos about the task's mean"),
    ("normalised_drift", "normalised_l2", "distance / between-episode spread"),
)


def _drift(data: api.TaskData, section: Section, ctx: _Context) -> Section:
    expert = ctx.config.expert_type
    losses = [api.get_language_loss_trajectory(data, e.index, expert) for e in data.episodes]
    layers = losses[0].layers
    steps = np.unique(np.concatenate([loss.timesteps for loss in losses]))
    outcomes = {"success": [e.success for e in data.episodes]}
    outcomes["failure"] = [not s for s in outcomes["success"]]
    present = np.zeros((len(losses), len(steps)), bool)
    for i, loss in enumerate(losses):
        present[i, np.searchsorted(steps, loss.timesteps)] = True
    grids = {}
    for metric, attribute, _ in _DRIFTS:
        grid = np.full((len(losses), len(steps), len(layers)), np.nan)  # aligned by env step
        for i, loss in enumerate(losses):
            grid[i, present[i]] = getattr(loss, attribute)
        grids[metric] = grid
        for outcome, chosen in outcomes.items():
            rows = np.array(chosen, bool)
            curve = (grid[rows], present[rows])
            _record_curves(section, metric, expert, data.task_id, layers, steps, curve, outcome)
    _drift_figure(
        section,
        data,
        expert,
        (grids["centred_cosine_drift"], grids["normalised_drift"]),
        steps,
        layers,
        outcomes,
    )
    if layers[0] == 0:
        check = float(np.nanmax(np.abs(grids["cosine_drift"][:, :, 0])))
        section.record("entry_0_max_drift", check, source=expert, task=data.task_id, layer=0)
        section.note(
            f"Check: entry 0 (embedded prompt tokens) has max drift {check:.2e} (expected ≈ 0)."
        )
    if not losses[0].bos_excluded:
        section.note("The prompt was pooled on the device: BOS is inside the prompt mean.")
    return section


def _record_curves(
    section: Section, metric: str, source: str, task: int, layers: list[int],
    steps: np.ndarray, curve: tuple[np.ndarray, np.ndarray], outcome: str,
) -> None:  # fmt: skip
    """Mean over the episodes of `outcome` at each env step and layer, with their count; curve:
    (values (E, steps, L), present (E, steps): the episode was sampled at that step)."""
    grid, present = curve
    counts = present.sum(axis=0)
    for j, step in enumerate(steps):
        if counts[j] == 0:
            continue
        with _quiet_nanmean():
            mean = np.nanmean(grid[present[:, j], j], axis=0)
        for k, layer in enumerate(layers):
            section.record(
                metric, mean[k], source=source, task=task, layer=layer, timestep=int(step),
                outcome=outcome, n=int(counts[j]),
            )  # fmt: skip


def _drift_figure(
    section: Section, data: api.TaskData, expert: str, grids: tuple[np.ndarray, np.ndarray],
    steps: np.ndarray, layers: list[int], outcomes: dict[str, list[bool]],
) -> None:  # fmt: skip
    centred, normalised = grids
    fig, axes = _figure(1, 3, figsize=(15, 3.6))
    finite = centred[np.isfinite(centred)]
    vmax = float(finite.max()) if finite.size else 1.0
    for ax, (outcome, chosen) in zip(axes[:2], outcomes.items(), strict=True):
        ax.set(
            xlabel="env step",
            ylabel="layer (residual entry)",
            title=f"{outcome}: {sum(chosen)} episode(s)",
        )
        if not any(chosen):
            ax.text(0.5, 0.5, f"no {outcome}", ha="center", va="center", transform=ax.transAxes)
            continue
        with _quiet_nanmean():
            mean = np.nanmean(centred[chosen], axis=0)
        extent = (steps[0] - 0.5, steps[-1] + 0.5, -0.5, len(layers) - 0.5)
        image = ax.imshow(
            mean.T, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=vmax, extent=extent
        )
        fig.colorbar(image, ax=ax, label="centred cosine drift")
        _layer_ticks(ax, layers)
    for i, episode in enumerate(data.episodes):
        axes[2].plot(
            steps,
            normalised[i, :, -1],
            color="tab:green" if episode.success else "tab:red",
            alpha=0.7,
        )
    axes[2].set(
        xlabel="env step",
        ylabel="drift / between-episode spread",
        title=f"layer {layers[-1]}; green = success",
    )
    section.figure(
        fig,
        f"Drift of the {expert} representation (prompt mean, BOS excluded), aligned by env step: "
        "mean centred cosine drift over the successful and the failed episodes apart (late steps "
        "hold only the episodes still running), and each episode's drift in units of the "
        "between-episode spread at the last recorded layer.",
        f"{_file_label(data)}_drift_by_env_step",
    )


def _separation(data: api.TaskData, section: Section, ctx: _Context) -> Section:
    del ctx
    first = "text_only" if api.ARRAY_NAMES["text_only"] in data.episodes[0] else "expert_0"
    v0 = [api.sample_vectors(data, e.index, first) for e in data.episodes]
    v1 = [api.sample_vectors(data, e.index, "expert_1") for e in data.episodes]
    x0, x1 = np.concatenate([v for v, _ in v0]), np.concatenate([v for v, _ in v1])
    if len(x0) < api.MIN_CKA_SAMPLES:
        raise ValidationError(
            "samples", f"at least {api.MIN_CKA_SAMPLES} recorded samples for CKA", len(x0)
        )
    matrix = metrics.cka_matrix(list(np.moveaxis(x0, 1, 0)), list(np.moveaxis(x1, 1, 0)))
    within = metrics.cka_matrix(list(np.moveaxis(x0, 1, 0)))
    layers_0, layers_1 = v0[0][1], v1[0][1]
    fig, axes = _figure(1, 2, figsize=(10, 4))
    for ax, values, title, columns, metric in (
        (axes[0], matrix, "expert 0 × expert 1", layers_1, "cka_expert_0_x_expert_1"),
        (axes[1], within, "expert 0 × expert 0", layers_0, "cka_expert_0_layers"),
    ):
        low = min(0.0, np.nanmin(values)) if np.any(np.isfinite(values)) else 0.0
        image = ax.imshow(values, origin="lower", cmap="magma", vmin=low, vmax=1)
        fig.colorbar(image, ax=ax, label="debiased linear CKA")
        ax.set(title=title, ylabel="expert 0 layer", xlabel=f"{title.split(' × ')[1]} layer")
        _layer_ticks(ax, layers_0)
        _layer_ticks(ax, columns, axis="x")
        for i, j in np.ndindex(values.shape):
            section.record(
                metric,
                values[i, j],
                source=first,
                task=data.task_id,
                layer=layers_0[i],
                layer_other=columns[j],
                n=len(x0),
            )
    section.figure(
        fig,
        f"CKA over the task's {len(x0)} samples: expert 0's prompt mean vs expert 1's action mean (last denoising step); blank = undefined (constant over the samples, e.g. entry 0 within one task). Width-free; a raw cosine between the experts is undefined (docs/analysis.md §2).",
        f"{_file_label(data)}_cka_expert_0_x_expert_1",
    )
    return section


def _attention(data: api.TaskData, section: Section, ctx: _Context) -> Section:
    del ctx
    shares = [api.get_attention_share(data, e.index) for e in data.episodes]
    layers = shares[0][1]
    steps = np.unique(np.concatenate([np.asarray(e["timesteps"][()]) for e in data.episodes]))
    grid = np.full((len(shares), len(steps), len(layers)), np.nan)
    present = np.zeros((len(shares), len(steps)), bool)
    for i, ((share, _), episode) in enumerate(zip(shares, data.episodes, strict=True)):
        present[i, np.searchsorted(steps, np.asarray(episode["timesteps"][()]))] = True
        grid[i, present[i]] = share[:, -1]
    source = "expert_1:actions"
    curve = (grid, present)
    _record_curves(
        section, "attention_share_prompt", source, data.task_id, layers, steps, curve, "all"
    )
    with _quiet_nanmean():
        mean = np.nanmean(grid, axis=0)
    heads = api.has_head_axis(data, data.episodes[0].index)
    fig, axes = _figure(1, 2 if heads else 1, figsize=(12 if heads else 6, 3.6))
    ax = axes[0] if heads else axes
    for j, layer in enumerate(layers):
        ax.plot(
            steps,
            mean[:, j],
            label=f"layer {layer}",
            color=colormaps["viridis"](j / max(1, len(layers) - 1)),
        )
    ax.set(
        xlabel="env step", ylabel="attention share on prompt", title="actions → prompt (last step)"
    )
    if len(layers) <= 8:
        ax.legend(fontsize=7)
    if heads:
        _per_head(section, data, axes[1], fig, layers)
    else:
        section.note(
            "Per-head attention: not recorded (attention='head_mean'); capture with attention='per_head'."
        )
    section.figure(
        fig,
        "Share of the action tokens' attention on the prompt segment, mean over episodes"
        + (
            "; right: per head, mean over samples and episodes (which heads read the prompt)."
            if heads
            else "."
        ),
        f"{_file_label(data)}_attention_actions_to_prompt",
    )
    return section


def _per_head(
    section: Section, data: api.TaskData, ax: Axes, fig: Figure, layers: list[int]
) -> None:
    per = [api.get_attention_share(data, e.index, per_head=True)[0][:, -1] for e in data.episodes]
    mean = np.concatenate(per).mean(axis=0)  # (L, H): last denoising step, all samples
    image = ax.imshow(mean, aspect="auto", origin="lower", cmap="viridis")
    fig.colorbar(image, ax=ax, label="share on prompt")
    ax.set(xlabel="head", ylabel="layer", title="per head (last step)")
    _layer_ticks(ax, layers)
    n = sum(len(p) for p in per)
    for (i, h), value in np.ndenumerate(mean):
        section.record(
            "attention_share_prompt_head",
            value,
            source="expert_1:actions",
            task=data.task_id,
            layer=layers[i],
            head=h,
            n=n,
        )
    top = np.dstack(np.unravel_index(np.argsort(mean, axis=None)[::-1][:3], mean.shape))[0]
    section.note(
        "Heads that read the prompt most: "
        + ", ".join(f"layer {layers[i]} head {h} ({mean[i, h]:.2f})" for i, h in top)
    )


def _steps(data: api.TaskData, section: Section, ctx: _Context) -> Section:
    del ctx
    results = [
        api.get_step_similarity(data, e.index)
        for e in data.episodes
        if e.num_samples >= api.MIN_CKA_SAMPLES
    ]
    if not results:
        raise ValidationError(
            "episodes", f"an episode with at least {api.MIN_CKA_SAMPLES} samples", 0
        )
    cosine = np.mean([r.cosine_to_last for r in results], axis=0)  # (layer, step)
    array = data.episodes[0]["expert_1_hidden_states"]
    layers = data.layers(array, "expert_1_hidden_states")
    fig, ax = _figure(figsize=(6, 3.6))
    image = ax.imshow(cosine, aspect="auto", origin="lower", cmap="viridis")
    fig.colorbar(image, ax=ax, label="cos to last step")
    ax.set(xlabel="recorded denoising step", ylabel="layer", title="action mean vs last step")
    _layer_ticks(ax, layers)
    for (i, k), value in np.ndenumerate(cosine):
        section.record(
            "cosine_to_last_step",
            value,
            source="expert_1:actions",
            task=data.task_id,
            layer=layers[i],
            step=k,
            n=len(results),
        )
    section.figure(
        fig,
        "Mean cosine between each denoising step's action representation and the last step's.",
        f"{_file_label(data)}_expert_1_cosine_to_last_step",
    )
    return section


_PER_TASK: tuple[tuple[str, Callable[[api.TaskData, Section, _Context], Section]], ...] = (
    ("language drift", _drift),
    ("expert 0 × expert 1", _separation),
    ("attention of actions to the prompt", _attention),
    ("expert 1 across denoising steps", _steps),
)


# -- across tasks -----------------------------------------------------------------------------


def _success(datas: Sequence[api.TaskData], section: Section, ctx: _Context) -> Section:
    features = cohort.episode_features(datas, ctx.config.expert_type)
    section.note(
        f"{len(features.success)} episodes; features use each episode's first {features.window} "
        "samples (the shortest episode's), so episode length cannot leak the outcome. Stratified by "
        "task: features centred within task, labels permuted within task, AUROC over within-task "
        "pairs — knowing the task is not knowing the outcome."
    )
    fig, ax = _figure(figsize=(7, 3.6))
    rows = []
    for feature, color in (("mean", "tab:blue"), ("drift", "tab:orange")):
        results = cohort.success_by_layer(features, feature, ctx.config.probe)
        source = f"{features.source}:{feature}"
        _plot_scores(ax, features.layers, results, color, feature)
        _record_probes(section, "success_auroc", source, None, features.layers, results)
        for layer, result in zip(features.layers, results, strict=True):
            for task, value in result.within.items():
                section.record(
                    "success_auroc_within_task", value, source=source, task=int(task), layer=layer
                )
            rows.append([feature, layer, result.summary()])
    notes = {r[2].split("; ")[-1] for r in rows if "skipped" in r[2] or "undefined" in r[2]}
    for reason in sorted(notes):
        section.note(f"Success probe: {reason}")
    ax.set(
        xlabel="layer", ylabel="AUROC (within task)", title="success, out of fold", ylim=(0, 1.05)
    )
    ax.legend(fontsize=7)
    section.figure(fig, _PROBE_CAPTION, "success_auroc_by_layer")
    section.table(["feature", "layer", "result"], rows)
    return section


_PROBE_CAPTION = (
    "Bars: 95% interval (episodes resampled, the whole cross-validation redone); dashed: 95th "
    "percentile of the shuffled-label scores (what p < 0.05 must beat); dotted: chance; filled "
    "marker: family-wise p < 0.05 over the layers."
)


def _task_sources(
    datas: Sequence[api.TaskData], ctx: _Context
) -> list[tuple[str, str | None, str]]:
    """(expert, segment, why) of the representations the task is probed in where it is not simply
    the prompt: the action expert and the first image segment."""
    episode = datas[0].episodes[0]
    sources: list[tuple[str, str | None, str]] = []
    if api.ARRAY_NAMES["expert_1"] in episode:
        sources.append(("expert_1", None, "action tokens"))
    if api.ARRAY_NAMES["expert_0"] in episode:
        array = episode[api.ARRAY_NAMES["expert_0"]]
        names = [
            n
            for n in api.segment_names(datas[0].labels(array, "expert_0_hidden_states"))
            if n != "prompt"
        ]
        if names:
            sources.append(("expert_0", names[0], f"image tokens ({names[0]})"))
    return sources


def _task_identity(datas: Sequence[api.TaskData], section: Section, ctx: _Context) -> Section:
    if len({d.task_id for d in datas if d.episodes}) < 2:
        raise ValidationError("task files", "episodes of at least two tasks", len(datas))
    sources = _task_sources(datas, ctx)
    if not sources:
        raise ValidationError(
            "arrays", "expert_1 or expert_0 hidden states (not given away by the prompt)", "none"
        )
    window = min(e.num_samples for d in datas for e in d.episodes)
    samples = cohort.spread_samples(window, ctx.config.task_samples)
    fig, axes = _figure(1, len(sources), figsize=(6 * len(sources), 3.6))
    axes = np.atleast_1d(axes)
    for ax, (expert, segment, label) in zip(axes, sources, strict=True):
        features = cohort.episode_features(datas, expert, samples=samples, segment=segment)
        grid = cohort.task_by_layer(features, ctx.config.probe)
        for row, sample in zip(grid, samples, strict=True):
            color = colormaps["plasma"](samples.index(sample) / max(1, len(samples) - 1))
            _plot_scores(ax, features.layers, row, color, f"sample {sample}")
            _record_probes(
                section, "task_accuracy", features.source, None, features.layers, row, sample
            )
        ax.set(xlabel="layer", ylabel="accuracy", title=f"task from {label}", ylim=(0, 1.05))
        ax.legend(fontsize=7)
    _ceiling(datas, section, ctx, samples)
    section.figure(fig, _PROBE_CAPTION, "task_identity_by_layer")
    return section


def _ceiling(
    datas: Sequence[api.TaskData], section: Section, ctx: _Context, samples: tuple[int, ...]
) -> None:
    """Entry 0 of the prompt's own states: the embedded prompt tokens ARE the task, so this is the
    trivial ceiling of any task probe, shown as such."""
    features = cohort.episode_features(datas, ctx.config.expert_type, samples=samples[:1])
    if features.layers[0] != 0:
        return
    result = probes.probe_by_layer(
        features.at_samples[:, 0, :1], features.task, "task", ctx.config.probe
    )[0]
    _record_probes(
        section, "task_accuracy_ceiling", features.source, None, [0], [result], samples[0]
    )
    section.note(
        f"Ceiling, not a finding: the task from entry 0 of the {features.source} prompt states (the "
        f"embedded instruction) has accuracy {result.score:.3f} — the prompt gives the task away."
    )


def _continuous(datas: Sequence[api.TaskData], section: Section, ctx: _Context) -> Section:
    episode = datas[0].episodes[0] if datas[0].episodes else None
    expert = (
        "expert_1"
        if episode is not None and api.ARRAY_NAMES["expert_1"] in episode
        else ctx.config.expert_type
    )
    window = min(e.num_samples for d in datas for e in d.episodes)
    features = cohort.episode_features(
        datas, expert, samples=cohort.spread_samples(window, ctx.config.task_samples)
    )
    if not features.targets:
        raise ValidationError("states", "the robot state and timesteps of every episode", "none")
    fig, ax = _figure(figsize=(7, 3.6))
    for target, color in zip(cohort.TARGETS, ("tab:blue", "tab:orange", "tab:green"), strict=True):
        results = cohort.regression_by_layer(features, target, ctx.config.probe)
        _plot_scores(ax, features.layers, results, color, target)
        _record_probes(section, f"r2_{target}", features.source, None, features.layers, results)
        notes = {r.note for r in results if r.note}
        for note in sorted(notes):
            section.note(f"{target}: {note}")
    section.note(
        f"Ridge read-outs from {features.source} at samples {list(features.samples)} of each episode, "
        "grouped by episode; " + "; ".join(f"{k}: {v}" for k, v in cohort.TARGETS.items()) + "."
    )
    ax.set(
        xlabel="layer",
        ylabel="out-of-fold R²",
        title=f"continuous probes ({features.source})",
        ylim=(-0.5, 1.05),
    )
    ax.legend(fontsize=7)
    section.figure(fig, _PROBE_CAPTION, "continuous_probes_r2_by_layer")
    return section


_COHORT: tuple[tuple[str, Callable[[Sequence[api.TaskData], Section, _Context], Section]], ...] = (
    ("Does it predict success? (task-stratified)", _success),
    ("Where is the task? (not given away by the prompt)", _task_identity),
    ("What else is readable? (continuous probes)", _continuous),
)


def _record_probes(
    section: Section, metric: str, source: str, task: int | None, layers: Sequence[int],
    results: Sequence[probes.ProbeResult], sample: int | None = None,
) -> None:  # fmt: skip
    for layer, r in zip(layers, results, strict=True):
        section.record(
            metric, r.score, source=source, task=task, layer=layer, sample=sample,
            ci_low=r.ci[0], ci_high=r.ci[1], p_value=r.p_value, p_value_family=r.p_value_family,
            chance=r.chance, n=r.n_items, note=r.note,
        )  # fmt: skip


def _plot_scores(
    ax: Axes, layers: list[int], results: Sequence[probes.ProbeResult], color: str, label: str
) -> None:
    score = probes.scores(results)
    low = np.array([r.ci[0] for r in results])
    high = np.array([r.ci[1] for r in results])
    yerr = np.clip([score - low, high - score], 0, None)
    ax.errorbar(
        layers,
        score,
        yerr=np.nan_to_num(yerr),
        color=color,
        marker="o",
        mfc="none",
        capsize=3,
        label=label,
    )
    significant = np.array([r.p_value_family < 0.05 for r in results])
    ax.plot(np.array(layers)[significant], score[significant], "o", color=color)
    ax.plot(layers, [r.shuffled_q95 for r in results], color=color, linestyle="--", alpha=0.6)
    ax.axhline(results[0].chance, color="grey", linestyle=":")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(min(layers) - 0.5, max(layers) + 0.5)
    if np.all(np.isnan(score)) and not ax.texts:  # one note per axes, however many series
        note = next((r.note for r in results if r.note), "too little data")
        ax.text(
            0.5,
            0.5,
            f"undefined: {note}",
            ha="center",
            va="center",
            wrap=True,
            transform=ax.transAxes,
        )


# -- page and helpers -------------------------------------------------------------------------


def _page(sections: Sequence[Section]) -> str:
    body = "".join(
        f"<section><h2>{html.escape(s.title)}</h2>{''.join(s.parts)}</section>" for s in sections
    )
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:0.85em}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}"
        "img{max-width:100%}.note{color:#555}figcaption{font-size:0.85em;color:#555}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>latentpi report</title><style>{style}</style></head>"
        "<body><h1>latentpi report</h1><p>Definitions: docs/analysis.md. Every number: summary.json "
        f"(schema {SUMMARY_SCHEMA} v{SUMMARY_VERSION}) and summary.csv.</p>{body}</body></html>"
    )


def _figure(rows: int = 1, cols: int = 1, *, figsize: tuple[float, float]) -> tuple[Figure, Any]:
    """A figure outside pyplot (no global figure registry, no display backend)."""
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots(rows, cols)


@contextlib.contextmanager
def _quiet_nanmean() -> Iterator[None]:
    """Silence numpy's 'Mean of empty slice' where an empty column is expected (NaN is the answer)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _label(data: api.TaskData) -> str:
    return f"task {data.task_id} ({data.attrs.get('suite', '')})"


def _file_label(data: api.TaskData) -> str:
    return f"{data.attrs.get('suite', '')}_task_{data.task_id}"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _layer_ticks(ax: Axes, layers: list[int], axis: str = "y") -> None:
    """Label an image's rows (or columns) with the residual entries they hold, at most ~10."""
    step = max(1, math.ceil(len(layers) / 10))
    ticks = range(0, len(layers), step)
    setter = ax.set_yticks if axis == "y" else ax.set_xticks
    setter(ticks, [str(layers[i]) for i in ticks])


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _plain(value: Any) -> Any:
    """JSON-safe: arrays to lists, numpy scalars to Python, NaN and inf to null."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
