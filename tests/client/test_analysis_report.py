"""`latentpi analyze`: a report from real task files, every section present, numbers in JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_analysis_api import Planted, write_task

from latentpi.cli import main
from latentpi.client.analysis.report import find_task_files
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


def test_analyze_writes_a_report_with_every_section(collection: Path, tmp_path: Path) -> None:
    assert [p.name for p in find_task_files(collection)] == ["task_0_task_0.h5", "task_1_task_1.h5"]
    out = tmp_path / "report"
    assert analyze(str(collection), "--out", str(out), "--shuffles", "5") == 0
    page = (out / "index.html").read_text()
    for title in ("language drift", "expert 0 × expert 1", "attention of actions to the prompt",
                  "expert 1 across denoising steps", "Does it predict success?"):  # fmt: skip
        assert page.count(title) >= 1, title
    assert page.count("data:image/png;base64,") >= 9
    assert "not available" not in page
    summary = json.loads((out / "summary.json").read_text())
    drift = summary["task 0 (libero_object): language drift"]
    assert drift["entry_0_max_drift"] < 1e-6
    mean = np.array(drift["mean_cosine_drift"], dtype=float)
    assert np.all(np.diff(mean[:, 3]) > 0)  # planted: monotone drift at the last entry
    share = np.array(
        summary["task 1 (libero_object): attention of actions to the prompt"]["mean_share"]
    )
    np.testing.assert_allclose(share[:, 0], 0.8 - 0.1 * np.arange(5), atol=1e-5)
    cka = np.array(
        summary["task 0 (libero_object): expert 0 × expert 1"]["cka_expert_0_x_expert_1"]
    )
    assert cka.shape == (4, 4) and cka[2, 2] > 0.9
    probes = summary["Does it predict success? Where is the task?"]
    assert probes["success_auroc_mean"][2]["score"] > 0.8
    assert [r["score"] for r in probes["task_accuracy"]] == [1.0] * 4


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
    assert (
        summary["Does it predict success? Where is the task?"]["success_auroc_mean"][0]["score"]
        is None
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
