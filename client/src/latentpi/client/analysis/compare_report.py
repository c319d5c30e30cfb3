"""`latentpi analyze --compare BASELINE CONDITION [CONDITION ...] --out OUT`: each condition against
the baseline, episode by episode — `index.html` (figures inline), every figure as `.png` and `.svg`,
every number in `summary.json` / `summary.csv` (schema `COMPARE_SCHEMA`, fields `COMPARE_FIELDS`;
docs/analysis.md, "Comparing conditions").

Sections per condition: the pairing, success (paired difference with Tango's interval and the exact
McNemar p), end-effector displacement against the paired baseline episode, executed-action
differences per step; per collection that recorded them, counterfactual prompts' actions against
the driving prompt's at the same observation and noise.
"""

from __future__ import annotations

import csv
import html
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from matplotlib import colormaps

from latentpi.client.analysis import paired
from latentpi.client.analysis.compare import (
    Collection,
    Episode,
    Pairing,
    TaskKey,
    action_difference,
    counterfactual_difference,
    displacement,
    label_collections,
    load_collection,
    pair_collections,
)
from latentpi.client.analysis.report import Section, _figure, _plain
from latentpi.protocol.errors import ValidationError

COMPARE_SCHEMA = "latentpi.analysis.compare"
COMPARE_VERSION = 1
# One record per metric × condition × task × step × variant × dims; None where an axis does not apply.
COMPARE_FIELDS: tuple[str, ...] = (
    "section", "metric", "condition", "suite", "task", "timestep", "variant", "dims",
    "estimate", "ci_low", "ci_high", "p_value", "n", "note",
)  # fmt: skip
DIMS = ("arm", "gripper")  # L2 over action dims 0:6; |difference| of dim 6
DEFAULT_TOLERANCE = 0.01  # metres: the end-effector paths "diverge" beyond 1 cm


@dataclass(frozen=True)
class CompareConfig:
    tolerance: float = DEFAULT_TOLERANCE  # metres, for the first divergence step


class CompareSection(Section):
    """A report section whose records follow COMPARE_FIELDS."""

    fields: ClassVar[tuple[str, ...]] = COMPARE_FIELDS

    def interval(self, metric: str, result: paired.MeanInterval, **fields: Any) -> None:
        self.record(
            metric, result.estimate, ci_low=result.ci_low, ci_high=result.ci_high, n=result.n,
            **fields,
        )  # fmt: skip


def build_comparison(
    baseline_root: str | Path,
    condition_roots: Sequence[str | Path],
    out: str | Path,
    config: CompareConfig | None = None,
) -> Path:
    """Compare each condition's collection with the baseline's; write `out/index.html`, the figure
    files, `out/summary.json` and `out/summary.csv`. Every refusal (missing folder, no episodes,
    different episode arguments, no pair) comes before anything is written."""
    config = config or CompareConfig()
    if not condition_roots:
        raise ValidationError("--compare", "BASELINE_DIR and at least one CONDITION_DIR", "none")
    if not (isinstance(config.tolerance, int | float) and config.tolerance > 0):
        raise ValidationError("--tolerance", "a positive distance in metres", config.tolerance)
    baseline = load_collection(baseline_root)
    conditions = [load_collection(root) for root in condition_roots]
    collections = [baseline, *conditions]
    label_collections(collections)
    pairings = [pair_collections(baseline, condition) for condition in conditions]
    # a counterfactual array of the wrong shape is refused before anything is written, too
    for collection in collections:
        _counterfactual_curves(collection)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sections = [_overview(collections, out)]
    for condition, pairing in zip(conditions, pairings, strict=True):
        for make in _PER_CONDITION:
            sections.append(make(baseline, condition, pairing, config, out))
    for collection in collections:
        if any(
            e.counterfactual is not None
            for t in collection.tasks.values()
            for e in t.episodes.values()
        ):
            sections.append(_counterfactual(collection, out))
    summary = _summary(baseline, conditions, pairings, sections, config)
    (out / "index.html").write_text(_page(sections, summary["warnings"]))
    (out / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False))
    _write_csv(out / "summary.csv", summary["records"])
    return out / "index.html"


# -- overview and summary ---------------------------------------------------------------------


def _overview(collections: Sequence[Collection], out: Path) -> CompareSection:
    section = CompareSection("Conditions", out)
    rows = []
    for i, c in enumerate(collections):
        records = c.condition.record()["interventions"]
        ops = ", ".join(str(r.get("op", "?")) for r in records) or "none"
        sha = c.condition.interventions_sha256
        rows.append([
            "baseline" if i == 0 else "condition", c.label, str(c.root), c.condition.prompt,
            ops + (f" (sha256 {sha[:12]}…)" if sha else ""),
            "; ".join(repr(p) for p in c.condition.counterfactual_prompts) or "none",
            len(c.tasks), c.episodes, "YES" if c.random_weights else "no",
        ])  # fmt: skip
    section.table(
        ["role", "condition", "folder", "driving prompt", "interventions", "counterfactual prompts",
         "tasks", "episodes", "random weights"],
        rows,
    )  # fmt: skip
    section.note(
        "Episodes pair by (suite, task, episode index): the same init state, env seed and noise "
        "seeds under every condition. Every number below says how many pairs (n) it rests on."
    )
    return section


def _summary(
    baseline: Collection,
    conditions: Sequence[Collection],
    pairings: Sequence[Pairing],
    sections: Sequence[CompareSection],
    config: CompareConfig,
) -> dict[str, Any]:
    return {
        "schema": COMPARE_SCHEMA,
        "schema_version": COMPARE_VERSION,
        "fields": list(COMPARE_FIELDS),
        "tolerance_m": config.tolerance,
        "warnings": _warnings([baseline, *conditions]),
        "baseline": _describe(baseline),
        "conditions": [
            {**_describe(c), "pairing": _pairing_summary(p, config)}
            for c, p in zip(conditions, pairings, strict=True)
        ],
        "figures": [name for s in sections for name in s.figures],
        "records": [_plain(r) for s in sections for r in s.records],
    }


def _describe(collection: Collection) -> dict[str, Any]:
    return {
        "label": collection.label,
        "root": str(collection.root),
        "condition": collection.condition.record(),
        "tasks": [list(key) for key in sorted(collection.tasks)],
        "episodes": collection.episodes,
        "random_weights": collection.random_weights,
    }


def _pairing_summary(pairing: Pairing, config: CompareConfig) -> dict[str, Any]:
    """The pairs (counts per task, one row per pair) and what did not pair."""
    tasks = []
    for task in pairing.tasks():
        counts = _counts(pairing, task)
        tasks.append({"suite": task[0], "task": task[1], **counts.to_dict()})
    rows = []
    for pair in pairing.pairs:
        shift = displacement(pair.baseline, pair.condition, config.tolerance)
        actions = action_difference(pair.baseline, pair.condition)
        rows.append({
            "suite": pair.key[0], "task": pair.key[1], "episode": pair.key[2],
            "baseline_success": pair.baseline.success, "condition_success": pair.condition.success,
            "baseline_steps": pair.baseline.total_steps, "condition_steps": pair.condition.total_steps,
            "displacement_mean": shift.mean, "displacement_max": shift.max,
            "displacement_final": shift.final, "divergence_step": shift.divergence_step,
            "action_difference_arm": _mean(actions.arm),
            "action_difference_gripper": _mean(actions.gripper),
        })  # fmt: skip
    return {
        "pairs": len(pairing.pairs),
        "tasks": tasks,
        "baseline_only": [list(k) for k in pairing.baseline_only],
        "condition_only": [list(k) for k in pairing.condition_only],
        "notes": list(pairing.notes),
        "episodes": [_plain(r) for r in rows],
    }


def _warnings(collections: Sequence[Collection]) -> list[str]:
    out = []
    for c in collections:
        if c.random_weights:
            out.append(
                f"{c.label} ({c.root}) was collected with a policy with RANDOM WEIGHTS: its actions "
                "are noise, so every difference below tests the pipeline, not the model"
            )
        out += [f"{c.label}: {w}" for w in c.warnings if "RANDOM WEIGHTS" not in w]
    return out


# -- success ----------------------------------------------------------------------------------


def _counts(pairing: Pairing, task: TaskKey | None) -> paired.PairedCounts:
    pairs = pairing.of_task(task)
    return paired.paired_counts(
        np.array([p.baseline.success for p in pairs], bool),
        np.array([p.condition.success for p in pairs], bool),
    )


def _success(
    baseline: Collection, condition: Collection, pairing: Pairing, config: CompareConfig, out: Path
) -> CompareSection:
    del baseline, config
    section = CompareSection(f"{condition.label}: success", out)
    rows, forest = [], []
    for task in [*pairing.tasks(), None]:
        counts = _counts(pairing, task)
        where = _where(condition, task)
        low, high = paired.tango_interval(counts)
        p = paired.mcnemar_exact_p(counts)
        table = (
            f"both {counts.both}, baseline only {counts.baseline_only}, "
            f"condition only {counts.condition_only}, neither {counts.neither}"
        )
        for metric, successes in (
            ("success_rate_baseline", counts.baseline_successes),
            ("success_rate_condition", counts.condition_successes),
        ):
            lo, hi = paired.wilson_interval(successes, counts.n)
            section.record(
                metric, successes / counts.n, ci_low=lo, ci_high=hi, n=counts.n, **where,
                note="Wilson interval",
            )  # fmt: skip
        section.record(
            "success_difference", counts.difference, ci_low=low, ci_high=high, p_value=p,
            n=counts.n, note=f"Tango score interval, exact McNemar p; {table}", **where,
        )  # fmt: skip
        name = "all tasks" if task is None else f"{task[0]} task {task[1]}"
        rows.append([
            name, counts.n, f"{counts.baseline_successes}/{counts.n}",
            f"{counts.condition_successes}/{counts.n}",
            f"{counts.difference:+.3f} [{low:+.3f}, {high:+.3f}]", f"{p:.3g}",
            f"{counts.baseline_only} / {counts.condition_only}",
        ])  # fmt: skip
        forest.append((name, counts.difference, low, high, counts.n))
    section.table(
        ["task", "pairs", "baseline", "condition", "difference [95% CI]", "McNemar p",
         "discordant (baseline only / condition only)"],
        rows,
    )  # fmt: skip
    _forest(section, condition, forest)
    for side, keys in (("baseline", pairing.baseline_only), ("condition", pairing.condition_only)):
        if keys:
            listed = ", ".join(f"{s} task {t} episode {e}" for s, t, e in keys[:20])
            more = f" and {len(keys) - 20} more" if len(keys) > 20 else ""
            section.note(f"Not compared (only in the {side}): {listed}{more}.")
    for note in pairing.notes:
        section.note(note)
    return section


def _forest(
    section: CompareSection,
    condition: Collection,
    rows: list[tuple[str, float, float, float, int]],
) -> None:
    fig, ax = _figure(figsize=(7, 0.5 * len(rows) + 1.5))
    for y, (name, estimate, low, high, n) in enumerate(reversed(rows)):
        pooled = name == "all tasks"
        ax.errorbar(
            [estimate], [y], xerr=[[estimate - low], [high - estimate]], fmt="D" if pooled else "o",
            color="black" if pooled else "tab:blue", capsize=3,
        )  # fmt: skip
        ax.annotate(f"n={n}", (1.02, y), va="center", fontsize=7, annotation_clip=False)
    ax.axvline(0, color="grey", linestyle=":")
    ax.set_yticks(range(len(rows)), [r[0] for r in reversed(rows)])
    ax.set(xlim=(-1, 1), xlabel="success rate: condition − baseline", title=condition.label)
    section.figure(
        fig,
        "Paired difference of success rates (condition − baseline) per task and over all pairs, "
        "with Tango's 95% score interval; n = pairs (same init state, env seed and noise seeds).",
        f"compare_{condition.label}_success_difference",
    )


# -- trajectories -----------------------------------------------------------------------------


def _by_step(
    curves: Sequence[tuple[np.ndarray, np.ndarray]],
) -> list[tuple[int, paired.MeanInterval]]:
    """Per step: the mean over the curves that reach it, with its t interval and count."""
    steps = sorted({int(s) for t, _ in curves for s in t})
    values: dict[int, list[float]] = {s: [] for s in steps}
    for timesteps, curve in curves:
        for step, value in zip(timesteps, curve, strict=True):
            values[int(step)].append(float(value))
    return [(s, paired.mean_interval(np.array(values[s]))) for s in steps]


def _displacement(
    baseline: Collection, condition: Collection, pairing: Pairing, config: CompareConfig, out: Path
) -> CompareSection:
    del baseline
    section = CompareSection(f"{condition.label}: end-effector displacement", out)
    tol = config.tolerance
    fig, ax = _figure(figsize=(8, 3.8))
    rows = []
    for color, task in zip(
        _colors(len(pairing.tasks()) + 1), [*pairing.tasks(), None], strict=True
    ):
        where = _where(condition, task)
        shifts = [displacement(p.baseline, p.condition, tol) for p in pairing.of_task(task)]
        curve = _by_step([(s.timesteps, s.distance) for s in shifts])
        if task is not None:
            for step, result in curve:
                section.interval("displacement_by_step", result, timestep=step, **where)
            ax.plot([s for s, _ in curve], [r.estimate for _, r in curve], color=color,
                    label=f"{task[0]} task {task[1]} (n={len(shifts)})")  # fmt: skip
            for s in shifts:
                ax.plot(s.timesteps, s.distance, color=color, alpha=0.25, linewidth=0.7)
        summaries = {
            name: paired.mean_interval(np.array([getattr(s, name) for s in shifts]))
            for name in ("mean", "max", "final")
        }
        for name, result in summaries.items():
            section.interval(f"displacement_{name}", result, **where)
        diverged = [s.divergence_step for s in shifts if s.divergence_step is not None]
        lo, hi = paired.wilson_interval(len(diverged), len(shifts))
        note = f"tolerance {tol} m, at the recorded (sampled) steps"
        section.record(
            "diverged_fraction", len(diverged) / len(shifts), ci_low=lo, ci_high=hi,
            n=len(shifts), note=note, **where,
        )  # fmt: skip
        first = paired.mean_interval(np.array(diverged, np.float64))
        section.interval("divergence_step", first, note=f"over the diverged pairs; {note}", **where)
        rows.append([
            "all tasks" if task is None else f"{task[0]} task {task[1]}", len(shifts),
            *(_text(summaries[k]) for k in ("mean", "max", "final")),
            f"{len(diverged)}/{len(shifts)}", _text(first),
        ])  # fmt: skip
    section.table(
        ["task", "pairs", "mean distance (m)", "max distance (m)", "final distance (m)",
         f"diverged (> {tol} m)", "first divergence step"],
        rows,
    )  # fmt: skip
    ax.axhline(tol, color="grey", linestyle=":", label=f"tolerance {tol} m")
    ax.set(xlabel="env step (policy step t)", ylabel="end-effector distance (m)",
           title=f"{condition.label} vs baseline")  # fmt: skip
    ax.legend(fontsize=7)
    section.figure(
        fig,
        "Distance between the end-effector positions of each condition episode and its paired "
        "baseline episode, at the policy steps where both recorded a state (the sampled queries) "
        "up to the shorter episode; thin: each pair, thick: mean over the task's pairs.",
        f"compare_{condition.label}_displacement_by_env_step",
    )
    section.note(
        "Mean / max: over a pair's common recorded steps; final: between the two episodes' last "
        "recorded positions (their lengths may differ); intervals: Student t over pairs."
    )
    return section


def _actions(
    baseline: Collection, condition: Collection, pairing: Pairing, config: CompareConfig, out: Path
) -> CompareSection:
    del baseline, config
    section = CompareSection(f"{condition.label}: executed actions", out)
    fig, axes = _figure(1, 2, figsize=(12, 3.6))
    rows = []
    tasks = [*pairing.tasks(), None]
    for color, task in zip(_colors(len(tasks)), tasks, strict=True):
        where = _where(condition, task)
        differences = [action_difference(p.baseline, p.condition) for p in pairing.of_task(task)]
        row = ["all tasks" if task is None else f"{task[0]} task {task[1]}", len(differences)]
        for ax, dims in zip(axes, DIMS, strict=True):
            per_pair = [getattr(d, dims) for d in differences]
            overall = paired.mean_interval(np.array([_mean(v) for v in per_pair]))
            section.interval("action_difference_mean", overall, dims=dims, **where)
            row.append(_text(overall))
            if task is None:
                continue
            curve = _by_step([(np.arange(len(v)), v) for v in per_pair])
            for step, result in curve:
                section.interval(
                    "action_difference_by_step", result, timestep=step, dims=dims, **where
                )
            ax.plot([s for s, _ in curve], [r.estimate for _, r in curve], color=color,
                    label=f"{task[0]} task {task[1]} (n={len(differences)})")  # fmt: skip
        rows.append(row)
    section.table(["task", "pairs", "arm: mean L2 per step", "gripper: mean |Δ| per step"], rows)
    _label_dims(axes, "policy step", "condition − baseline")
    section.figure(
        fig,
        "Executed actions of each condition episode against its paired baseline episode, aligned by "
        "policy step up to the shorter episode; mean over the pairs reaching that step. Once the "
        "states diverge this mixes the policy's change with the change of what it sees — the "
        "counterfactual section (same observation) separates the two.",
        f"compare_{condition.label}_action_difference_by_step",
    )
    return section


def _label_dims(axes: Any, xlabel: str, ylabel: str) -> None:
    """One panel per entry of DIMS: the arm (L2 over dims 0-5), the gripper (|Δ| of dim 6)."""
    for ax, dims in zip(axes, DIMS, strict=True):
        title = "arm (dims 0–5, L2)" if dims == "arm" else "gripper (dim 6, |Δ|)"
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.legend(fontsize=7)


_PER_CONDITION: tuple[
    Callable[[Collection, Collection, Pairing, CompareConfig, Path], CompareSection], ...
] = (_success, _displacement, _actions)


# -- counterfactual prompts -------------------------------------------------------------------


@dataclass(frozen=True)
class _Counterfactual:
    task: TaskKey
    episode: int
    timesteps: np.ndarray  # (queries,)
    values: dict[str, np.ndarray]  # dims -> (queries, V)


def _counterfactual_curves(collection: Collection) -> list[_Counterfactual]:
    curves = []
    for key, task in sorted(collection.tasks.items()):
        for episode in task.episodes.values():
            try:
                found = counterfactual_difference(episode)
            except ValidationError as error:
                raise error.renamed(f"{task.path}: {error.field}") from None
            if found is not None:
                values = {"arm": found.arm, "gripper": found.gripper}
                curves.append(_Counterfactual(key, episode.index, found.timesteps, values))
    return curves


def _variants(collection: Collection, episodes: Sequence[Episode], count: int) -> list[str]:
    """A label per counterfactual prompt: the condition's templates, else the rendered prompts."""
    templates = collection.condition.counterfactual_prompts
    if len(templates) == count:
        return [repr(t) for t in templates]
    rendered = next((e.counterfactual_prompts for e in episodes if e.counterfactual_prompts), ())
    return (
        [repr(p) for p in rendered]
        if len(rendered) == count
        else [f"variant {v}" for v in range(count)]
    )


def _counterfactual(collection: Collection, out: Path) -> CompareSection:
    section = CompareSection(f"{collection.label}: counterfactual prompts", out)
    curves = _counterfactual_curves(collection)
    counts = {c.values["arm"].shape[1] for c in curves}
    if len(counts) != 1:
        section.error = (
            f"episodes hold different numbers of counterfactual prompts: {sorted(counts)}"
        )
        section.note(f"not available: {section.error}")
        return section
    count = counts.pop()
    episodes = [e for t in collection.tasks.values() for e in t.episodes.values()]
    variants = _variants(collection, episodes, count)
    fig, axes = _figure(1, 2, figsize=(12, 3.6))
    rows = []
    for task in [*sorted({c.task for c in curves}), None]:
        where = _where(collection, task)
        chosen = [c for c in curves if task is None or c.task == task]
        for v, variant in enumerate(variants):
            row = [
                "all tasks" if task is None else f"{task[0]} task {task[1]}",
                variant,
                len(chosen),
            ]
            for ax, dims in zip(axes, DIMS, strict=True):
                row += _variant_records(section, chosen, v, dims, dict(where, variant=variant))
                if task is None:
                    curve = _by_step([(c.timesteps, c.values[dims][:, v]) for c in chosen])
                    ax.plot([s for s, _ in curve], [r.estimate for _, r in curve], label=variant)
            rows.append(row)
    section.table(
        ["task", "prompt", "episodes", "arm: mean L2", "arm: late − early", "gripper: mean |Δ|",
         "gripper: late − early"],
        rows,
    )  # fmt: skip
    _label_dims(axes, "env step of the query", "counterfactual − executed")
    section.figure(
        fig,
        "At every query, each counterfactual prompt's actions against the driving prompt's (same "
        "observation, same noise) over the steps executed from that chunk; mean over the episodes "
        "of all tasks reaching that step. The cleanest language-sensitivity measure: the states "
        "never diverge. A curve falling over the episode: language matters less as the task goes on.",
        f"counterfactual_{collection.label}_difference_by_step",
    )
    section.note(
        "late − early: per episode, the mean over the second half of its queries minus the first "
        "half's (negative: sensitivity to the prompt fades); Student t interval over episodes."
    )
    return section


def _variant_records(
    section: CompareSection,
    curves: Sequence[_Counterfactual],
    v: int,
    dims: str,
    where: dict[str, Any],
) -> list[str]:
    """Per-step, whole-episode and fade records of one variant; the table's two cells."""
    if where.get("task") is not None:
        for step, result in _by_step([(c.timesteps, c.values[dims][:, v]) for c in curves]):
            section.interval(
                "counterfactual_difference_by_step", result, timestep=step, dims=dims, **where
            )
    overall = paired.mean_interval(np.array([_mean(c.values[dims][:, v]) for c in curves]))
    section.interval("counterfactual_difference_mean", overall, dims=dims, **where)
    fade = paired.mean_interval(np.array([_fade(c.values[dims][:, v]) for c in curves]))
    section.interval(
        "counterfactual_fade", fade, dims=dims, note="second half of the queries − first half",
        **where,
    )  # fmt: skip
    return [_text(overall), _text(fade)]


def _fade(values: np.ndarray) -> float:
    """Mean over the second half of an episode's queries minus the first half's (NaN below 2)."""
    finite = values[np.isfinite(values)]
    if finite.size < 2:
        return math.nan
    half = finite.size // 2
    return float(finite[finite.size - half :].mean() - finite[:half].mean())


# -- page and helpers -------------------------------------------------------------------------


def _where(collection: Collection, task: TaskKey | None) -> dict[str, Any]:
    return {
        "condition": collection.label,
        "suite": None if task is None else task[0],
        "task": None if task is None else task[1],
    }


def _mean(values: np.ndarray) -> float:
    finite = np.asarray(values, np.float64)
    finite = finite[np.isfinite(finite)]
    return float(finite.mean()) if finite.size else math.nan


def _text(result: paired.MeanInterval) -> str:
    if result.n == 0:
        return "n=0"
    if math.isnan(result.ci_low):
        return f"{result.estimate:.4g} (n={result.n})"
    return f"{result.estimate:.4g} [{result.ci_low:.4g}, {result.ci_high:.4g}] (n={result.n})"


def _colors(count: int) -> list[Any]:
    return [colormaps["tab10"](i % 10) for i in range(count)]


def _page(sections: Sequence[CompareSection], warnings: Sequence[str]) -> str:
    alerts = "".join(f"<p class='warning'>!!! {html.escape(w)}</p>" for w in warnings)
    body = "".join(
        f"<section><h2>{html.escape(s.title)}</h2>{''.join(s.parts)}</section>" for s in sections
    )
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:0.85em}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}"
        "img{max-width:100%}.note{color:#555}figcaption{font-size:0.85em;color:#555}"
        ".warning{color:#a00;font-weight:bold}"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>latentpi: conditions compared"
        f"</title><style>{style}</style></head><body><h1>latentpi: conditions compared</h1>"
        "<p>Definitions: docs/analysis.md, “Comparing conditions”. Every number: summary.json "
        f"(schema {COMPARE_SCHEMA} v{COMPARE_VERSION}) and summary.csv.</p>{alerts}{body}"
        "</body></html>"
    )


def _write_csv(path: Path, records: Sequence[dict[str, Any]]) -> None:
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=COMPARE_FIELDS)
        writer.writeheader()
        for row in records:
            writer.writerow({k: "" if row[k] is None else row[k] for k in COMPARE_FIELDS})
