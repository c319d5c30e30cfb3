"""`latentpi demo` end to end, as `make demo` runs it: embedded server, real LIBERO, report."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from latentpi.client.storage import TaskFile

pytestmark = pytest.mark.slow

LATENTPI = str(Path(sys.executable).with_name("latentpi"))


def run_demo(out: Path) -> subprocess.CompletedProcess[str]:
    command = [
        LATENTPI,
        "demo",
        "--out",
        str(out),
        "--trials",
        "2",
        "--max-steps",
        "10",
        "--stride",
        "5",
    ]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=900, env=os.environ.copy()
    )


def test_demo_collects_real_episodes_and_writes_a_report(tmp_path: Path) -> None:
    done = run_demo(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    page = Path(done.stdout.strip().splitlines()[-1].split("Report: ")[-1])
    assert page == (tmp_path / "report" / "index.html").resolve() and page.is_file()

    files = sorted((tmp_path / "data" / "libero_spatial").glob("task_*.h5"))
    assert [f.name.split("_")[1] for f in files] == ["0", "1"]
    for path in files:
        with TaskFile(path) as task:
            assert len(task.episodes) == 2
            episode = task.episodes[0]
            # the demo spec records everything: both experts, the prompt, attention, bf16
            names = set(episode.names)
            assert {
                "expert_0_hidden_states",
                "expert_1_hidden_states",
                "text_only_hidden_states",
            } <= names
            assert {"attention_mass_expert_0", "attention_mass_expert_1", "prompt_mask"} <= names
            assert str(episode["text_only_hidden_states"].dtype) == "bfloat16"
            assert episode.num_samples == 2  # policy steps 0 and 5 of 10, stride 5
            assert episode.success in (True, False)

    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["schema"] == "latentpi.analysis.summary" and summary["schema_version"] == 1
    checks = [r for r in summary["records"] if r["metric"] == "entry_0_max_drift"]
    assert len(checks) == 2
    # entry 0 is the embedded prompt: it cannot drift, a built-in check on the whole chain
    assert all(r["estimate"] == 0.0 for r in checks)
    # the same records as one CSV table, one row each
    with (tmp_path / "report" / "summary.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == len(summary["records"])
    assert [float(r["estimate"]) for r in rows if r["metric"] == "entry_0_max_drift"] == [0.0, 0.0]
    assert all((tmp_path / "report" / name).is_file() for name in summary["figures"])
    assert any(name.endswith("attention_actions_to_prompt.svg") for name in summary["figures"])
    html = page.read_text()
    assert (
        html.count("data:image/png;base64,") >= 5
        and "http://" not in html
        and "https://" not in html
    )

    # a second run resumes: nothing is collected again, the report is rebuilt
    sizes = {f: f.stat().st_size for f in files}
    again = run_demo(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {f: f.stat().st_size for f in files} == sizes
