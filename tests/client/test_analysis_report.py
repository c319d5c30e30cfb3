"""`latentpi analyze`: a report from real task files, every section present, numbers in JSON."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from test_analysis_api import Planted, write_task

from latentpi.cli import main
from latentpi.client.analysis.report import (
    SUMMARY_FIELDS,
    SUMMARY_SCHEMA,
    SUMMARY_VERSION,
    find_task_files,
)
from latentpi.protocol.latent_spec import LatentSpec


def analyze(*argv: str) -> int:
    """`latentpi analyze ...` through the real dispatcher; its exit status."""
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", *argv])
    return exit_info.value.code


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("collection")
    for task in range(2):
        write_task(root, task, [Planted(task, e, 4 + e % 2, e % 2 == 0) for e in range(6)])
    return root


def _records(summary: dict, metric: str, **where: object) -> list[dict]:
    return [
        r for r in summary["records"]
        if r["metric"] == metric and all(r[k] == v for k, v in where.items())
    ]  # fmt: skip


def test_analyze_writes_a_report_with_every_section(collection: Path, tmp_path: Path) -> None:
    assert [p.name for p in find_task_files(collection)] == ["task_0_task_0.h5", "task_1_task_1.h5"]
    out = tmp_path / "report"
    assert (
        analyze(str(collection), "--out", str(out), "--shuffles", "200", "--bootstrap", "20") == 0
    )
    page = (out / "index.html").read_text()
    for title in ("language drift", "expert 0 × expert 1", "attention of actions to the prompt",
                  "expert 1 across denoising steps", "Does it predict success?",
                  "Where is the task?", "What else is readable?"):  # fmt: skip
        assert page.count(title) >= 1, title
    assert "not available" not in page
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["schema"], summary["schema_version"]) == (SUMMARY_SCHEMA, SUMMARY_VERSION)
    assert summary["fields"] == list(SUMMARY_FIELDS) and summary["unavailable"] == {}
    assert all(list(r) == list(SUMMARY_FIELDS) for r in summary["records"])
    # every figure as PNG and SVG next to the page, named after what it shows
    for name in ("libero_object_task_0_drift_by_env_step", "success_auroc_by_layer",
                 "task_identity_by_layer", "continuous_probes_r2_by_layer",
                 "libero_object_task_1_attention_actions_to_prompt"):  # fmt: skip
        assert (out / f"{name}.png").stat().st_size > 1000, name
        assert (out / f"{name}.svg").read_text().lstrip().startswith("<?xml"), name
    assert len(summary["figures"]) == 2 * page.count("data:image/png;base64,") >= 2 * 11
    # drift: entry 0 never moves; the planted drift grows at the last entry (by env step)
    assert _records(summary, "entry_0_max_drift", task=0)[0]["estimate"] < 1e-6
    curve = _records(summary, "cosine_drift", task=0, layer=3, outcome="success")
    assert [r["timestep"] for r in curve] == [0, 5, 10, 15, 20, 25][: len(curve)]
    assert np.all(np.diff([r["estimate"] for r in curve]) > 0)
    assert {r["n"] for r in _records(summary, "normalised_drift", task=0, outcome="failure")} == {3}
    share = _records(summary, "attention_share_prompt", task=1, layer=0)
    np.testing.assert_allclose([r["estimate"] for r in share], 0.8 - 0.1 * np.arange(5), atol=1e-5)
    heads = _records(summary, "attention_share_prompt_head", task=1, layer=0)
    assert [r["head"] for r in heads] == [0, 1]
    cka = _records(summary, "cka_expert_0_x_expert_1", task=0, layer=2, layer_other=2)
    assert cka[0]["estimate"] > 0.9
    # success is planted at entry 2 within both tasks: found there, family-wise
    success = _records(summary, "success_auroc", source="text_only:mean", layer=2)[0]
    assert success["estimate"] > 0.8 and success["p_value_family"] < 0.05
    assert success["ci_low"] <= success["ci_high"] and success["n"] == 12
    # the task: read from the action expert, not from image tokens (random here)
    actions = _records(summary, "task_accuracy", source="expert_1", layer=3)
    assert len(actions) == 3 and all(r["estimate"] > 0.9 for r in actions)
    images = _records(summary, "task_accuracy", source="expert_0:base_0_rgb")
    assert all(r["p_value"] > 0.01 for r in images)
    assert _records(summary, "task_accuracy_ceiling", layer=0)[0]["estimate"] == 1.0
    assert "Ceiling, not a finding" in page
    eef = _records(summary, "r2_eef_position", layer=3)[0]
    assert eef["estimate"] > 0.5 and eef["p_value"] < 0.05
    # summary.csv holds the same records, one row each
    with (out / "summary.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == len(summary["records"]) and list(rows[0]) == list(SUMMARY_FIELDS)
    first = summary["records"][0]
    assert {k: (v if v != "" else None) for k, v in rows[0].items()}["metric"] == first["metric"]
    assert float(rows[0]["estimate"]) == pytest.approx(first["estimate"])


def test_missing_arrays_give_a_note_not_a_crash(tmp_path: Path) -> None:
    text_only = LatentSpec(expert_0=False, expert_1=False, text_only=True)
    write_task(tmp_path / "runs", 3, [Planted(3, e, 4, True) for e in range(3)], text_only)
    out = tmp_path / "report"
    assert analyze(str(tmp_path / "runs"), "--out", str(out), "--shuffles", "2") == 0
    page = (out / "index.html").read_text()
    assert "language drift" in page
    assert "not available: expert_1_hidden_states" in page
    assert "one class only: all 3 items are True" in page
    summary = json.loads((out / "summary.json").read_text())
    assert _records(summary, "success_auroc", layer=0)[0]["estimate"] is None
    assert (
        "expert_1_hidden_states"
        in summary["unavailable"]["task 3 (libero_object): expert 0 × expert 1"]
    )


def test_task_file_without_episodes_is_reported_as_such(tmp_path: Path) -> None:
    write_task(tmp_path / "runs", 4, [])
    write_task(tmp_path / "runs", 5, [Planted(5, 0, 4, True)])
    out = tmp_path / "report"
    assert analyze(str(tmp_path / "runs"), "--out", str(out), "--shuffles", "2") == 0
    page = (out / "index.html").read_text()
    assert "no recorded episode yet" in page and "task 5 (libero_object): language drift" in page


def test_analyze_without_task_files_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert analyze(str(tmp_path), "--out", str(tmp_path / "r")) == 2
    assert "task files" in capsys.readouterr().err
