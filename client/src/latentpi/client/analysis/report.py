"""The analysis report of a collection folder: one self-contained HTML page (figures inline) and a
`summary.json` with every number shown, and the same numbers as one long table in `summary.csv`
(section, key, index, value: one row per number, for pandas or a spreadsheet).

Sections: the tasks; per task, language drift by layer over the rollout, expert 0 × expert 1 CKA
across the task's samples, the actions' attention to the prompt, expert 1 across denoising steps;
across tasks, the success and task-identity probes per layer with their uncertainty.
Definitions: docs/analysis.md.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from tqdm import tqdm

from latentpi.client.analysis import api, cohort, metrics, probes
from latentpi.protocol.errors import ValidationError


@dataclass(frozen=True)
class ReportConfig:
    expert_type: api.ExpertType = "text_only"  # whose prompt representation the drift follows
    probe: probes.ProbeConfig = field(
        default_factory=lambda: probes.ProbeConfig(n_shuffles=20, n_bootstrap=500)
    )


@dataclass
class Section:
    title: str
    parts: list[str] = field(default_factory=list)  # HTML fragments
    numbers: dict[str, Any] = field(default_factory=dict)

    def note(self, text: str) -> None:
        self.parts.append(f"<p class='note'>{html.escape(text)}</p>")

    def figure(self, fig: Figure, caption: str) -> None:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
        data = base64.b64encode(buffer.getvalue()).decode()
        self.parts.append(
            f"<figure><img src='data:image/png;base64,{data}'/><figcaption>{html.escape(caption)}</figcaption></figure>"
        )

    def table(self, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
            for row in rows
        )
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")


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
    """Analyse every task file under `root`; write `out/index.html` and `out/summary.json`.

    progress: a progress bar on stderr (None: only when stderr is a terminal)."""
    config = config or ReportConfig()
    paths = find_task_files(root)
    if not paths:
        raise ValidationError(
            "DIR", "a folder holding task files (<suite>/task_<id>_<name>.h5)", str(root)
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    datas = [api.load_inference_task_data(path) for path in paths]
    bar = tqdm(
        total=len(datas) * len(_PER_TASK) + 1,
        desc="analyze",
        unit="section",
        disable=_quiet(progress),
    )
    try:
        sections = [_overview(datas)]
        for data in datas:
            if not data.episodes:
                sections.append(Section(_label(data)))
                sections[-1].note("no recorded episode yet")
                bar.update(len(_PER_TASK))
                continue
            for title, fn in _PER_TASK:
                sections.append(_guarded(f"{_label(data)}: {title}", fn, data, config))
                bar.update()
        sections.append(
            _guarded("Does it predict success? Where is the task?", _probes, datas, config)
        )
        bar.update()
    finally:
        bar.close()
        for data in datas:
            data.close()
    (out / "index.html").write_text(_page(sections))
    summary = {s.title: s.numbers for s in sections}
    plain = _plain(summary)
    (out / "summary.json").write_text(json.dumps(plain, indent=1, allow_nan=False))
    _write_csv(out / "summary.csv", plain)
    return out / "index.html"


def _write_csv(path: Path, summary: dict[str, Any]) -> None:
    """One row per number: the section, the key inside it, the position in nested lists."""
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["section", "key", "index", "value"])
        for section, numbers in summary.items():
            for key, value in numbers.items():
                for index, leaf in _leaves(value):
                    writer.writerow([section, key, index, "" if leaf is None else leaf])


def _leaves(value: Any, index: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, f"{index}.{key}" if index else str(key))
    elif isinstance(value, list):
        for position, item in enumerate(value):
            yield from _leaves(item, f"{index}[{position}]" if index else f"[{position}]")
    else:
        yield index, value


def _quiet(progress: bool | None) -> bool | None:
    return None if progress is None else not progress  # tqdm: None = off unless a terminal


def _guarded(title: str, fn: Callable[..., Section], subject: Any, config: ReportConfig) -> Section:
    """A section, or one that says why it could not be made (missing arrays, too little data)."""
    try:
        section = fn(subject, config)
        section.title = title
        return section
    except (ValidationError, KeyError) as error:
        section = Section(title)
        section.note(f"not available: {error}")
        section.numbers["error"] = str(error)
        return section


# -- sections ---------------------------------------------------------------------------------


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
        section.numbers[_label(data)] = {"episodes": len(episodes), "successes": successes}
    section.table(
        ["task", "instruction", "episodes", "success", "samples / episode", "model", "latent spec"],
        rows,
    )
    return section


def _drift(data: api.TaskData, config: ReportConfig) -> Section:
    section = Section("language drift")
    losses = [
        api.get_language_loss_trajectory(data, e.index, config.expert_type) for e in data.episodes
    ]
    layers = losses[0].layers
    length = max(len(loss.timesteps) for loss in losses)
    grid = np.full((len(losses), length, len(layers)), np.nan)
    for i, loss in enumerate(losses):
        grid[i, : len(loss.timesteps)] = loss.cosine_distance
    mean = np.nanmean(grid, axis=0)  # (sample, layer)
    fig, (left, right) = _figure(1, 2, figsize=(11, 3.6))
    image = left.imshow(mean.T, aspect="auto", origin="lower", cmap="viridis")
    fig.colorbar(image, ax=left, label="1 − cos to first sample")
    left.set(xlabel="rollout sample", ylabel="layer (residual entry)", title="mean over episodes")
    _layer_ticks(left, layers)
    for loss, episode in zip(losses, data.episodes, strict=True):
        right.plot(
            loss.timesteps,
            loss.cosine_distance[:, -1],
            color="tab:green" if episode.success else "tab:red",
            alpha=0.7,
        )
    right.set(
        xlabel="env step",
        ylabel="cosine drift",
        title=f"last recorded layer ({layers[-1]}); green = success",
    )
    section.figure(
        fig,
        f"Drift of the {config.expert_type} prompt representation (mean over valid prompt tokens).",
    )
    embedding = np.nanmax(np.abs(grid[:, :, 0])) if layers[0] == 0 else float("nan")
    if layers[0] == 0:
        section.note(
            f"Check: entry 0 (embedded prompt tokens) has max drift {embedding:.2e} (expected ≈ 0)."
        )
    section.numbers = {"layers": layers, "mean_cosine_drift": mean, "entry_0_max_drift": embedding}
    return section


def _separation(data: api.TaskData, config: ReportConfig) -> Section:
    del config
    section = Section("expert 0 × expert 1")
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
    fig, axes = _figure(1, 2, figsize=(10, 4))
    layers_0, layers_1 = v0[0][1], v1[0][1]
    for ax, values, title, columns in (
        (axes[0], matrix, "expert 0 × expert 1", layers_1),
        (axes[1], within, "expert 0 × expert 0", layers_0),
    ):
        low = min(0.0, np.nanmin(values)) if np.any(np.isfinite(values)) else 0.0
        image = ax.imshow(values, origin="lower", cmap="magma", vmin=low, vmax=1)
        fig.colorbar(image, ax=ax, label="debiased linear CKA")
        other = "expert 1" if columns is layers_1 else "expert 0"
        ax.set(title=title, ylabel="expert 0 layer", xlabel=f"{other} layer")
        _layer_ticks(ax, layers_0)
        _layer_ticks(ax, columns, axis="x")
    section.figure(
        fig,
        f"CKA over the task's {len(x0)} samples: expert 0's prompt mean vs expert 1's action mean (last denoising step); blank = undefined (constant over the samples, e.g. entry 0 within one task). Width-free; a raw cosine between the experts is undefined (docs/analysis.md §2).",
    )
    section.numbers = {
        "n_samples": len(x0),
        "layers_0": layers_0,
        "layers_1": layers_1,
        "cka_expert_0_x_expert_1": matrix,
        "cka_expert_0_layers": within,
    }
    return section


def _attention(data: api.TaskData, config: ReportConfig) -> Section:
    del config
    section = Section("attention of actions to the prompt")
    shares = [api.get_attention_share(data, e.index) for e in data.episodes]
    layers = shares[0][1]
    length = max(len(share) for share, _ in shares)
    grid = np.full((len(shares), length, len(layers)), np.nan)
    for i, (share, _) in enumerate(shares):
        grid[i, : len(share)] = share[:, -1]  # last recorded denoising step
    mean = np.nanmean(grid, axis=0)
    fig, ax = _figure(figsize=(6, 3.6))
    for j, layer in enumerate(layers):
        ax.plot(
            mean[:, j],
            label=f"layer {layer}",
            color=colormaps["viridis"](j / max(1, len(layers) - 1)),
        )
    ax.set(
        xlabel="rollout sample",
        ylabel="attention share on prompt",
        title="actions → prompt (last step)",
    )
    if len(layers) <= 8:
        ax.legend(fontsize=7)
    section.figure(
        fig, "Share of the action tokens' attention on the prompt segment, mean over episodes."
    )
    section.numbers = {"layers": layers, "mean_share": mean}
    return section


def _steps(data: api.TaskData, config: ReportConfig) -> Section:
    del config
    section = Section("expert 1 across denoising steps")
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
    fig, ax = _figure(figsize=(6, 3.6))
    image = ax.imshow(cosine, aspect="auto", origin="lower", cmap="viridis")
    fig.colorbar(image, ax=ax, label="cos to last step")
    ax.set(xlabel="recorded denoising step", ylabel="layer index", title="action mean vs last step")
    section.figure(
        fig, "Mean cosine between each denoising step's action representation and the last step's."
    )
    section.numbers = {"cosine_to_last": cosine}
    return section


def _probes(datas: Sequence[api.TaskData], config: ReportConfig) -> Section:
    section = Section("probes")
    features = cohort.episode_features(datas, config.expert_type)
    section.note(
        f"{len(features.success)} episodes; features use each episode's first {features.window} samples "
        "(the shortest episode's), so episode length cannot leak the outcome."
    )
    fig, axes = _figure(1, 2, figsize=(11, 3.6))
    for feature, color in (("mean", "tab:blue"), ("drift", "tab:orange")):
        results = cohort.success_by_layer(features, feature, config.probe)
        _plot_scores(axes[0], features.layers, results, color, f"{feature}")
        section.numbers[f"success_auroc_{feature}"] = [_result(r) for r in results]
    axes[0].set(
        xlabel="layer", ylabel="AUROC", title="success, out of fold (bars: 95% CI)", ylim=(0, 1.05)
    )
    axes[0].legend(fontsize=7)
    reasons = {r["note"] for r in section.numbers["success_auroc_mean"] if r["note"]}
    for reason in sorted(reasons):
        section.note(f"Success probe: {reason}.")
    if len(set(features.task.tolist())) > 1:
        grid = cohort.task_by_layer(features, config.probe)
        _plot_scores(
            axes[1], features.layers, grid[0], "tab:purple", f"sample {features.samples[0]}"
        )
        axes[1].set(xlabel="layer", ylabel="accuracy", title="task identity", ylim=(0, 1.05))
        axes[1].legend(fontsize=7)
        section.numbers["task_accuracy"] = [_result(r) for r in grid[0]]
    else:
        axes[1].set_axis_off()
        section.note("Task-identity probe: needs task files of at least two tasks.")
    section.figure(fig, "Dashed: shuffled-label baseline; dotted: chance.")
    rows = [
        [layer, r["summary"]]
        for layer, r in zip(features.layers, section.numbers["success_auroc_mean"], strict=True)
    ]
    section.table(["layer", "success from the mean state"], rows)
    return section


def _plot_scores(
    ax: Axes, layers: list[int], results: Sequence[probes.ProbeResult], color: str, label: str
) -> None:
    score = probes.scores(results)
    low = np.array([r.ci[0] for r in results])
    high = np.array([r.ci[1] for r in results])
    ax.errorbar(
        layers,
        score,
        yerr=[score - low, high - score],
        color=color,
        marker="o",
        capsize=3,
        label=label,
    )
    ax.plot(layers, [r.shuffled_mean for r in results], color=color, linestyle="--", alpha=0.6)
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


_PER_TASK: tuple[tuple[str, Callable[[api.TaskData, ReportConfig], Section]], ...] = (
    ("language drift", _drift),
    ("expert 0 × expert 1", _separation),
    ("attention of actions to the prompt", _attention),
    ("expert 1 across denoising steps", _steps),
)


# -- page -------------------------------------------------------------------------------------


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
        f"<body><h1>latentpi report</h1><p>Definitions: docs/analysis.md.</p>{body}</body></html>"
    )


def _figure(rows: int = 1, cols: int = 1, *, figsize: tuple[float, float]) -> tuple[Figure, Any]:
    """A figure outside pyplot (no global figure registry, no display backend)."""
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots(rows, cols)


def _label(data: api.TaskData) -> str:
    return f"task {data.task_id} ({data.attrs.get('suite', '')})"


def _layer_ticks(ax: Axes, layers: list[int], axis: str = "y") -> None:
    """Label an image's rows (or columns) with the residual entries they hold, at most ~10."""
    step = max(1, math.ceil(len(layers) / 10))
    ticks = range(0, len(layers), step)
    setter = ax.set_yticks if axis == "y" else ax.set_xticks
    setter(ticks, [str(layers[i]) for i in ticks])


def _result(result: probes.ProbeResult) -> dict[str, Any]:
    return {
        "score": result.score, "ci": list(result.ci), "fold_mean": result.fold_mean,
        "fold_std": result.fold_std, "shuffled_mean": result.shuffled_mean,
        "p_value": result.p_value, "chance": result.chance, "class_counts": result.class_counts,
        "note": result.note, "summary": result.summary(),
    }  # fmt: skip


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _plain(value: Any) -> Any:
    """JSON-safe: arrays to lists, NaN and inf to null."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
