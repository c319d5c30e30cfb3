"""`latentpi analyze --compare`: conditions against a baseline on real task files (the real
TaskWriter) with planted effects, and the paired statistics on simulated data."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from scipy import optimize, stats

from latentpi.cli import main
from latentpi.client.analysis import paired
from latentpi.client.analysis.compare import (
    action_difference,
    displacement,
    load_collection,
    pair_collections,
)
from latentpi.client.analysis.compare_report import COMPARE_FIELDS, COMPARE_SCHEMA
from latentpi.client.rollout import EpisodeResult, Sample
from latentpi.client.storage import TaskHeader, TaskWriter, task_path
from latentpi.client.storage.condition import BASELINE, Condition
from latentpi.protocol.errors import ValidationError
from latentpi.protocol.interventions import Intervention
from latentpi.protocol.latent_spec import LatentSpec

SUITE = "libero_object"
REPLAN, HORIZON = 5, 8
ARGUMENTS = {"seed": 7, "seeding": "sha256-v1", "max_steps": 60, "stride": 5,
             "replan_steps": REPLAN, "num_steps_wait": 10, "save_images": False,
             "env_resolution": 256}  # fmt: skip
STEP = 0.003  # metres per policy step the planted condition drifts off the baseline path


@dataclass(frozen=True)
class Planted:
    """One synthetic episode. The condition leaves the baseline's path at `leave` (eef moving
    STEP further along x per step, arm action +0.1 on dim 0 from `leave`); `gripper` flips the
    gripper action from that step; counterfactual chunks: variant 0 = the executed actions,
    variant 1 = +0.2 × (1 − q/Q) on dim 1 (fading), junk beyond the executed steps."""

    task: int
    episode: int
    success: bool
    leave: int | None = None  # None: the baseline itself
    gripper: int | None = None
    counterfactual: bool = False
    env_seed: int | None = None

    @property
    def steps(self) -> int:
        return 42 if self.success else 60  # 42: the last query executes only 2 steps

    def eef(self, t: int) -> np.ndarray:
        start = np.array([0.1 * self.episode, 0.05 * self.task, 0.9])
        path = start + 0.004 * t * np.array([1.0, -0.5, 0.2])
        if self.leave is not None and t > self.leave:
            path[0] += STEP * (t - self.leave)
        return path

    def executed(self) -> np.ndarray:
        t = np.arange(self.steps)[:, None]
        actions = np.hstack([np.sin(0.1 * t + np.arange(6)), -np.ones((self.steps, 1))])
        if self.leave is not None:
            actions[self.leave :, 0] += 0.1
        if self.gripper is not None:
            actions[self.gripper :, 6] = 1.0
        return actions

    def replay(self) -> dict[str, np.ndarray]:
        executed = self.executed()
        queries = np.arange(0, self.steps, REPLAN)
        out = {"executed_actions": executed, "query_timesteps": queries.astype(np.int32)}
        if self.counterfactual:
            chunks = np.full((len(queries), 2, HORIZON, 7), 1e3)  # junk past the executed steps
            for q, t in enumerate(queries):
                part = executed[t : t + REPLAN]
                chunks[q, :, : len(part)] = part
                chunks[q, 1, : len(part), 1] += 0.2 * (1 - q / len(queries))
            out["counterfactual_actions"] = chunks
        return out


def write_task(
    root: Path,
    task: int,
    episodes: list[Planted],
    condition: Condition = BASELINE,
    arguments: dict[str, Any] | None = None,
    checkpoint: str = "/ckpt/pi0_libero",
) -> Path:
    header = TaskHeader(
        suite=SUITE, task_id=task, task_name=f"task_{task}", instruction=f"do thing {task}",
        bddl_file="/none.bddl", model_config="pi0_libero", checkpoint=checkpoint,
        latent_spec=LatentSpec(), episode_arguments=arguments or ARGUMENTS,
        warnings=(("the policy has RANDOM WEIGHTS (random weights): noise",)
                  if checkpoint.startswith("random weights") else ()), condition=condition,
    )  # fmt: skip
    path = task_path(root, SUITE, task, f"task_{task}")
    with TaskWriter(path, header) as writer:
        for e in episodes:
            env_seed = 1000 * task + e.episode if e.env_seed is None else e.env_seed
            with writer.episode(e.episode, init_state_idx=e.episode, seed=7) as out:
                for t in range(0, e.steps, REPLAN):
                    state = np.r_[e.eef(t), np.zeros(3), 0.04, -0.04]
                    out.add(Sample(t, np.zeros((HORIZON, 7)), state, {}, {}))
                queries = len(range(0, e.steps, REPLAN))
                out.finish(
                    EpisodeResult(
                        e.success, e.steps, queries, queries, 0.1, e.episode, env_seed=env_seed,
                        replay=e.replay(),
                    )
                )  # fmt: skip
        writer.consolidate()
    return path


STEER = Condition(
    name="steer_up",
    interventions=(
        Intervention.from_wire({"op": "add", "site": {"expert": 0, "layers": [2]}, "scale": 4.0,
                                "vector": np.ones(16, np.float32)}),
    ),
    counterfactual_prompts=("{task}", "do not {task}"),
)  # fmt: skip
# task 0: baseline succeeds in 8 of 10; the condition fails 4 of those and succeeds in 1 more
BASE_0 = [True] * 8 + [False] * 2
COND_0 = [False] * 4 + [True] * 4 + [True, False]
BASE_1 = [True, True, False, False]  # task 1: identical outcomes, the condition leaves at 15


def _baseline(root: Path) -> Path:
    write_task(root, 0, [Planted(0, k, s) for k, s in enumerate(BASE_0)])
    write_task(root, 1, [Planted(1, k, s) for k, s in enumerate(BASE_1)])
    return root


def _condition(root: Path) -> Path:
    write_task(
        root, 0,
        [Planted(0, k, s, leave=10 + 5 * (k % 3), gripper=30, counterfactual=True)
         for k, s in enumerate(COND_0)],
        STEER,
    )  # fmt: skip
    # task 1: only episodes 0-2 (episode 3 unmatched); a task 2 the baseline does not have
    write_task(
        root, 1, [Planted(1, k, s, leave=15, counterfactual=True) for k, s in enumerate(BASE_1[:3])],
        STEER,
    )  # fmt: skip
    write_task(root, 2, [Planted(2, 0, True, leave=0, counterfactual=True)], STEER)
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return (
        _baseline(tmp_path_factory.mktemp("baseline")),
        _condition(tmp_path_factory.mktemp("steer")),
    )


@pytest.fixture(scope="module")
def summary(folders: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("report")
    assert analyze("--compare", str(folders[0]), str(folders[1]), "--out", str(out)) == 0
    return json.loads((out / "summary.json").read_text()) | {"_out": str(out)}


def analyze(*argv: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", *argv])
    return exit_info.value.code


def records(summary: dict, metric: str, **where: object) -> list[dict]:
    return [
        r for r in summary["records"]
        if r["metric"] == metric and all(r[k] == v for k, v in where.items())
    ]  # fmt: skip


def one(summary: dict, metric: str, **where: object) -> dict:
    found = records(summary, metric, **where)
    assert len(found) == 1, (metric, where, found)
    return found[0]


# -- statistics -------------------------------------------------------------------------------


def _tango_by_likelihood(b: int, c: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """An independent inversion of the paired score test: the restricted MLE found numerically
    (maximising the multinomial likelihood), the score statistic from it, its roots by Brent."""

    def score(delta: float) -> float:
        def nll(q: float) -> float:
            cells = np.array([q + delta, q, 1 - 2 * q - delta])
            return -np.sum(np.array([b, c, n - b - c]) * np.log(np.clip(cells, 1e-300, None)))

        lo, hi = max(0.0, -delta), (1 - delta) / 2
        q = optimize.minimize_scalar(nll, bounds=(lo, hi), method="bounded",
                                     options={"xatol": 1e-13}).x  # fmt: skip
        return (b - c - n * delta) / math.sqrt(n * (2 * q + delta - delta**2))

    estimate = (b - c) / n
    low = optimize.brentq(lambda d: score(d) - z, -0.999999, estimate - 1e-12)
    high = optimize.brentq(lambda d: score(d) + z, estimate + 1e-12, 0.999999)
    return low, high


@pytest.mark.parametrize(("b", "c", "n"), [(1, 4, 10), (3, 0, 12), (7, 9, 40), (2, 2, 25)])
def test_tango_interval_equals_an_independent_inversion(b: int, c: int, n: int) -> None:
    counts = paired.PairedCounts(both=n - b - c - 1, baseline_only=c, condition_only=b, neither=1)
    np.testing.assert_allclose(
        paired.tango_interval(counts), _tango_by_likelihood(b, c, n), atol=2e-5
    )


@pytest.mark.parametrize(
    ("n", "cells"),
    [(40, (0.4, 0.2, 0.1, 0.3)), (60, (0.3, 0.05, 0.05, 0.6)), (25, (0.6, 0.0, 0.2, 0.2))],
)
def test_tango_interval_covers_the_true_difference_95_percent(
    n: int, cells: tuple[float, float, float, float]
) -> None:
    """Cells: (both, baseline only, condition only, neither) probabilities; 4000 simulated paired
    datasets each. Monte Carlo sd of the coverage: 0.0034."""
    rng = np.random.default_rng(n)
    draws = rng.multinomial(n, cells, size=4000)
    low, high = paired.tango_intervals(draws[:, 2], draws[:, 1], np.full(4000, n))
    truth = cells[2] - cells[1]
    coverage = np.mean((low <= truth) & (truth <= high))
    assert 0.93 <= coverage <= 0.975, coverage
    # paired beats unpaired: narrower than the interval that ignores the pairing (Newcombe's
    # square-and-add of two Wilson intervals) when outcomes agree within pairs
    base = draws[:, 0] + draws[:, 1]
    cond = draws[:, 0] + draws[:, 2]
    wilson = [
        (paired.wilson_interval(x, n), paired.wilson_interval(y, n))
        for x, y in zip(base, cond, strict=True)
    ]
    unpaired = np.array([
        math.hypot(y / n - yl, xh - x / n) + math.hypot(yh - y / n, x / n - xl)
        for ((xl, xh), (yl, yh)), x, y in zip(wilson, base, cond, strict=True)
    ])  # fmt: skip
    if cells[0] + cells[3] >= 0.7:  # strongly concordant pairs
        assert np.median(high - low) < np.median(unpaired)


def test_identical_outcomes_give_zero_inside_the_interval() -> None:
    for successes in (0, 3, 10):
        counts = paired.paired_counts(np.arange(10) < successes, np.arange(10) < successes)
        low, high = paired.tango_interval(counts)
        assert counts.difference == 0 and low < 0 < high, successes
        assert paired.mcnemar_exact_p(counts) == 1.0
    # no discordant pair among n: the bound is Wilson's for 0 of n, z²/(n + z²)
    z = stats.norm.ppf(0.975)
    assert paired.tango_interval(paired.PairedCounts(4, 0, 0, 6))[1] == pytest.approx(
        z**2 / (10 + z**2)
    )


def test_mcnemar_exact_against_the_binomial_by_hand() -> None:
    # 4 baseline-only vs 1 condition-only: 2 × P(X ≤ 1), X ~ Bin(5, ½) = 2 × 6/32
    assert paired.mcnemar_exact_p(paired.PairedCounts(4, 4, 1, 1)) == pytest.approx(0.375)
    assert paired.mcnemar_exact_p(paired.PairedCounts(0, 6, 0, 0)) == pytest.approx(2 / 64)
    assert paired.mcnemar_exact_p(paired.PairedCounts(0, 3, 3, 0)) == 1.0


def test_mean_interval_is_student_t() -> None:
    values = np.array([1.0, 2.0, 4.0, np.nan])
    result = paired.mean_interval(values)
    half = stats.t.ppf(0.975, 2) * np.std([1, 2, 4], ddof=1) / math.sqrt(3)
    assert (result.n, result.estimate) == (3, pytest.approx(7 / 3))
    assert (result.ci_low, result.ci_high) == (
        pytest.approx(7 / 3 - half),
        pytest.approx(7 / 3 + half),
    )
    assert math.isnan(paired.mean_interval(np.array([1.0])).ci_low)
    assert paired.mean_interval(np.zeros(4)) == paired.MeanInterval(0.0, 0.0, 0.0, 4)


# -- pairing and per-pair measures ------------------------------------------------------------


def test_pairing_matches_by_task_and_episode(folders: tuple[Path, Path]) -> None:
    baseline, condition = (load_collection(f) for f in folders)
    assert baseline.condition.record() == BASELINE.record()
    assert condition.condition.record() == STEER.record()
    pairing = pair_collections(baseline, condition)
    assert [p.key for p in pairing.pairs][:2] == [(SUITE, 0, 0), (SUITE, 0, 1)]
    assert len(pairing.pairs) == 13
    assert pairing.baseline_only == [(SUITE, 1, 3)]
    assert pairing.condition_only == [(SUITE, 2, 0)]


def test_displacement_found_at_the_planted_step(folders: tuple[Path, Path]) -> None:
    pairing = pair_collections(*(load_collection(f) for f in folders))
    for pair in pairing.of_task((SUITE, 0)):
        planted = Planted(0, pair.key[2], COND_0[pair.key[2]], leave=10 + 5 * (pair.key[2] % 3))
        shift = displacement(pair.baseline, pair.condition, tolerance=0.01)
        shorter = min(pair.baseline.total_steps, pair.condition.total_steps)
        np.testing.assert_array_equal(shift.timesteps, np.arange(0, shorter, REPLAN))
        expected = STEP * np.clip(shift.timesteps - planted.leave, 0, None)
        np.testing.assert_allclose(shift.distance, expected, atol=1e-12)
        # 3 mm per step: beyond 1 cm at the first recorded step past leave + 3.3
        assert shift.divergence_step == planted.leave + 5
        assert shift.max == pytest.approx(expected.max())
        actions = action_difference(pair.baseline, pair.condition)
        assert len(actions.arm) == shorter
        np.testing.assert_allclose(actions.arm, 0.1 * (np.arange(shorter) >= planted.leave))
        np.testing.assert_allclose(actions.gripper, 2.0 * (np.arange(shorter) >= 30))


# -- the report -------------------------------------------------------------------------------


def test_success_difference_and_mcnemar_match_hand_computation(summary: dict) -> None:
    assert (summary["schema"], summary["fields"]) == (COMPARE_SCHEMA, list(COMPARE_FIELDS))
    where = {"condition": "steer_up", "task": 0, "suite": SUITE}
    diff = one(summary, "success_difference", **where)
    assert (diff["estimate"], diff["n"]) == (pytest.approx(-0.3), 10)
    assert diff["p_value"] == pytest.approx(0.375)  # 4 vs 1 discordant
    assert (diff["ci_low"], diff["ci_high"]) == pytest.approx(
        _tango_by_likelihood(1, 4, 10), abs=2e-5
    )
    assert one(summary, "success_rate_baseline", **where)["estimate"] == pytest.approx(0.8)
    assert one(summary, "success_rate_condition", **where)["estimate"] == pytest.approx(0.5)
    task_1 = one(summary, "success_difference", condition="steer_up", task=1)
    assert (task_1["estimate"], task_1["p_value"], task_1["n"]) == (0, 1.0, 3)
    assert task_1["ci_low"] < 0 < task_1["ci_high"]
    pooled = one(summary, "success_difference", condition="steer_up", task=None)
    assert (pooled["n"], pooled["estimate"]) == (13, pytest.approx(-3 / 13))
    described = summary["conditions"][0]["condition"]
    assert described == STEER.record() and described["interventions"][0]["vector_shape"] == [16]
    assert summary["baseline"]["condition"]["name"] == "baseline"
    pairing = summary["conditions"][0]["pairing"]
    assert pairing["pairs"] == 13 and pairing["baseline_only"] == [[SUITE, 1, 3]]
    assert pairing["condition_only"] == [[SUITE, 2, 0]]
    assert pairing["tasks"][0] == {"suite": SUITE, "task": 0, "pairs": 10, "both": 4,
                                   "baseline_only": 4, "condition_only": 1, "neither": 1}  # fmt: skip


def test_displacement_and_actions_in_the_summary(summary: dict) -> None:
    where = {"condition": "steer_up", "task": 1}
    curve = records(summary, "displacement_by_step", **where)
    # task 1 leaves at 15: zero up to 15, then 3 mm per step; n = 3 pairs (episode 3 unmatched)
    assert [r["timestep"] for r in curve][:5] == [0, 5, 10, 15, 20]
    np.testing.assert_allclose(
        [r["estimate"] for r in curve], STEP * np.clip(np.array([r["timestep"] for r in curve]) - 15, 0, None), atol=1e-12
    )  # fmt: skip
    assert all(r["n"] >= 1 for r in curve) and curve[0]["n"] == 3
    first = one(summary, "divergence_step", **where)
    assert (first["estimate"], first["n"], first["ci_low"], first["ci_high"]) == (20, 3, 20, 20)
    assert one(summary, "diverged_fraction", **where)["estimate"] == 1.0
    # task 0: the leave step cycles 10, 15, 20 over episodes -> divergence at 15, 20, 25
    steps = [15, 20, 25, 15, 20, 25, 15, 20, 25, 15]
    found = one(summary, "divergence_step", condition="steer_up", task=0)
    assert found["estimate"] == pytest.approx(np.mean(steps)) and found["n"] == 10
    arm = records(summary, "action_difference_by_step", dims="arm", **where)
    np.testing.assert_allclose([r["estimate"] for r in arm], 0.1 * (np.arange(len(arm)) >= 15))
    grip = one(summary, "action_difference_mean", dims="gripper", **where)
    assert grip["estimate"] == 0 and grip["n"] == 3
    rows = summary["conditions"][0]["pairing"]["episodes"]
    assert {(r["task"], r["episode"], r["divergence_step"]) for r in rows if r["task"] == 1} == {
        (1, 0, 20),
        (1, 1, 20),
        (1, 2, 20),
    }


def test_counterfactual_prompts_only_over_the_executed_steps(summary: dict) -> None:
    where = {"condition": "steer_up", "task": 0}
    same = one(summary, "counterfactual_difference_mean", dims="arm", variant="'{task}'", **where)
    assert same["estimate"] == 0 and same["n"] == 10  # the driving prompt itself; junk ignored
    other = records(summary, "counterfactual_difference_by_step", dims="arm",
                    variant="'do not {task}'", **where)  # fmt: skip
    # +0.2 × (1 − q/Q) on one dim; Q = 9 queries (42 steps) or 12 (60 steps): n drops after 40
    assert [r["timestep"] for r in other] == list(range(0, 60, 5))
    assert [r["n"] for r in other] == [10] * 9 + [5] * 3
    assert other[0]["estimate"] == pytest.approx(0.2)
    fade = one(summary, "counterfactual_fade", dims="arm", variant="'do not {task}'", **where)
    assert fade["estimate"] < 0 and fade["ci_high"] < 0  # sensitivity to the prompt fades
    assert one(summary, "counterfactual_difference_mean", dims="gripper",
               variant="'do not {task}'", **where)["estimate"] == 0  # fmt: skip
    out = Path(summary["_out"])
    for name in ("counterfactual_steer_up_difference_by_step", "compare_steer_up_success_difference",
                 "compare_steer_up_displacement_by_env_step",
                 "compare_steer_up_action_difference_by_step"):  # fmt: skip
        assert (out / f"{name}.png").stat().st_size > 1000, name
        assert f"{name}.svg" in summary["figures"]
    page = (out / "index.html").read_text()
    assert "steer_up: success" in page and "McNemar" in page
    assert f"only in the baseline): {SUITE} task 1 episode 3." in page
    assert f"only in the condition): {SUITE} task 2 episode 0." in page
    assert (out / "summary.csv").read_text().splitlines()[0] == ",".join(COMPARE_FIELDS)


def test_identical_collections_give_zeros(folders: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "same"
    assert analyze("--compare", str(folders[0]), str(folders[0]), "--out", str(out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    diffs = records(summary, "success_difference")
    assert diffs and all(r["estimate"] == 0 and r["p_value"] == 1.0 for r in diffs)
    assert all(r["ci_low"] < 0 < r["ci_high"] for r in diffs)
    for metric in ("displacement_mean", "displacement_max", "displacement_final",
                   "action_difference_mean", "displacement_by_step"):  # fmt: skip
        found = records(summary, metric)
        assert found and all(r["estimate"] == 0 for r in found), metric
        assert all(r["ci_low"] in (0, None) and r["ci_high"] in (0, None) for r in found), metric
    assert all(r["estimate"] == 0 for r in records(summary, "diverged_fraction"))
    assert all(r["n"] == 0 for r in records(summary, "divergence_step"))
    # two collections of the same name get their folders in the label (and a folder twice, its place)
    labels = {r["condition"] for r in summary["records"]}
    assert labels == {f"baseline ({folders[0]}) #1"}
    assert summary["baseline"]["label"] == f"baseline ({folders[0]})"


def test_different_episode_arguments_are_refused(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "seed8"
    write_task(other, 0, [Planted(0, 0, True)], STEER, arguments=ARGUMENTS | {"seed": 8})
    out = tmp_path / "out"
    assert analyze("--compare", str(folders[0]), str(other), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "episode_arguments.seed" in err and "expected 7" in err and "8" in err
    assert not out.exists()  # refused before anything is written
    # what only changes the recording (stride, images) does not refuse
    recorded = tmp_path / "stride10"
    write_task(recorded, 0, [Planted(0, 0, True)], STEER, arguments=ARGUMENTS | {"stride": 10})
    assert len(pair_collections(load_collection(folders[0]), load_collection(recorded)).pairs) == 1


def test_another_start_is_refused(folders: tuple[Path, Path], tmp_path: Path) -> None:
    other = tmp_path / "seeded"
    write_task(other, 0, [Planted(0, 0, True, env_seed=99)], STEER)
    with pytest.raises(ValidationError, match="episode 0 env_seed"):
        pair_collections(load_collection(folders[0]), load_collection(other))


def test_clear_errors(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "out")
    cases = [
        (("--compare", str(folders[0]), str(tmp_path / "missing")), "an existing folder"),
        (("--compare", str(folders[0]), str(tmp_path)), "task files"),
        (("--compare", str(folders[0])), "at least one CONDITION_DIR"),
        (("x", "--compare", str(folders[0]), str(folders[1])), "no positional folder"),
        (("--compare", str(folders[0]), str(folders[1]), "--tolerance", "0"), "positive distance"),
        (
            ("--compare", str(folders[0]), str(folders[1]), "--shuffles", "9"),
            "--shuffles: expected",
        ),
        (("--compare", str(folders[0]), str(folders[1]), "--expert", "expert_1"), "--expert: exp"),
    ]
    for argv, message in cases:
        assert analyze(*argv, "--out", out) == 2, argv
        assert message in capsys.readouterr().err, argv
    # a task file without episodes
    empty = tmp_path / "empty"
    write_task(empty, 0, [])
    assert analyze("--compare", str(folders[0]), str(empty), "--out", out) == 2
    assert "at least one finished episode" in capsys.readouterr().err
    # a condition record the protocol does not accept, or whose arrays are not what it says
    broken = tmp_path / "broken"
    path = write_task(broken, 0, [Planted(0, 0, True)], STEER)
    with h5py.File(path, "a") as f:
        record = json.loads(f.attrs["condition"])
        f["condition/interventions/0/vector"][0] = 2.0
    assert analyze("--compare", str(folders[0]), str(broken), "--out", out) == 2
    assert (
        f"{path}: root attribute condition: condition/interventions: expected"
        in capsys.readouterr().err
    )
    with h5py.File(path, "a") as f:
        f.attrs["condition"] = json.dumps(record | {"interventions": [{"op": "add", "expert": 0}]})
    assert analyze("--compare", str(folders[0]), str(broken), "--out", out) == 2
    assert f"{path}: root attribute condition: interventions" in capsys.readouterr().err
    # no episode pairs (another task only)
    lonely = tmp_path / "lonely"
    write_task(lonely, 5, [Planted(5, 0, True)])
    assert analyze("--compare", str(folders[0]), str(lonely), "--out", out) == 2
    assert "no pair" in capsys.readouterr().err


def test_random_weights_are_said(folders: tuple[Path, Path], tmp_path: Path) -> None:
    noise = tmp_path / "noise"
    write_task(noise, 0, [Planted(0, 0, True)], checkpoint="random weights (pi0_tiny)")
    out = tmp_path / "out"
    assert analyze("--compare", str(folders[0]), str(noise), "--out", str(out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["conditions"][0]["random_weights"] is True
    assert any("RANDOM WEIGHTS" in w for w in summary["warnings"])
    assert "RANDOM WEIGHTS" in (out / "index.html").read_text()
    assert any(
        "model_config" in n or "checkpoint" in n
        for n in summary["conditions"][0]["pairing"]["notes"]
    )


# -- end to end: real `latentpi collect` (LIBERO, pi0_tiny server), then `analyze --compare` -------


@pytest.mark.slow
def test_collect_baseline_and_intervened_then_compare(tmp_path: Path) -> None:
    """The real collector in this process (as tests/client/test_collect_interventions.py; the
    command line's own parsing is tested there): LIBERO's import is paid once."""
    from latentpi.client.collect import CollectOptions, collect
    from latentpi.client.server_process import EmbeddedServer

    key = "compare-key"
    steer = tmp_path / "steer.json"  # a strong add on the action expert: the arm must move away
    direction = np.random.default_rng(0).standard_normal(32)  # pi0_tiny's expert-1 width
    steer.write_text(json.dumps([{"op": "add", "site": {"expert": 1, "layers": [1]},
                                  "scale": 50.0, "vector": direction.tolist()}]))  # fmt: skip
    with EmbeddedServer("pi0_tiny", api_key=key) as server:
        for out, condition in (
            (tmp_path / "baseline", {}),
            (tmp_path / "steer", {"intervene": steer, "counterfactual_prompts": ("",)}),
        ):
            options = CollectOptions(
                suite="libero_object", out=out, tasks="0", trials=2, max_steps=10, stride=5,
                server=server.url, api_key=key, num_steps_wait=3, latents="attention",
                **condition,
            )  # fmt: skip
            collect(options, progress=False)
    report = tmp_path / "report"
    compare = (
        "--compare",
        str(tmp_path / "baseline"),
        str(tmp_path / "steer"),
        "--out",
        str(report),
    )
    assert analyze(*compare) == 0
    summary = json.loads((report / "summary.json").read_text())
    (condition,) = summary["conditions"]
    assert condition["label"] == "steer" and condition["condition"]["interventions_sha256"]
    assert condition["pairing"]["pairs"] == 2
    assert condition["pairing"]["baseline_only"] == condition["pairing"]["condition_only"] == []
    assert [(r["task"], r["episode"]) for r in condition["pairing"]["episodes"]] == [(0, 0), (0, 1)]
    assert summary["baseline"]["random_weights"] and any("RANDOM" in w for w in summary["warnings"])
    curve = records(summary, "displacement_by_step", condition="steer", task=0)
    assert [r["timestep"] for r in curve] == [0, 5] and [r["n"] for r in curve] == [2, 2]
    assert curve[0]["estimate"] == 0  # the same init state and env seed
    assert curve[1]["estimate"] > 0  # five steps of steered actions moved the arm elsewhere
    assert one(summary, "displacement_max", condition="steer", task=None)["estimate"] > 0
    arm = one(summary, "action_difference_mean", condition="steer", task=None, dims="arm")
    assert arm["estimate"] > 0 and arm["n"] == 2
    null = one(summary, "counterfactual_difference_mean", condition="steer", task=0, dims="arm")
    assert null["variant"] == "''" and null["n"] == 2 and null["estimate"] > 0
