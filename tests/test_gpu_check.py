"""`bench/gpu_check.py --cpu-smoke`: the one script a lent accelerator runs, run here on the tiny
configs so that it cannot rot before a device is lent. Every step must produce its rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check") / "smoke.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "median ms" in done.stdout  # the table was printed
    return json.loads(out.read_text())


def rows(smoke: dict, kind: str, model: str = "pi0_tiny") -> list[dict]:
    return [r for r in smoke["rows"] if r["kind"] == kind and r.get("model") == model]


def test_weights_load_through_the_checkpoint_path_and_stay_on_the_device(smoke: dict) -> None:
    (load,) = rows(smoke, "load")
    assert load["load_s"] > 0 and sum(load["param_bytes"].values()) > 0
    (residency,) = rows(smoke, "residency")
    assert residency["parameters_moved_per_call"] is False
    assert smoke["meta"]["device"]["platform"] == "cpu"


def test_every_variant_and_batch_is_timed(smoke: dict) -> None:
    timed = {(r["batch"], r["variant"]): r for r in rows(smoke, "latency")}
    assert set(timed) == {(1, "plain"), (1, "default"), (2, "plain"), (2, "default")}
    for row in timed.values():
        assert 0 < row["median_ms"] <= row["p90_ms"] and row["vs_plain"] > 0
    assert timed[(1, "plain")]["vs_plain"] == 1.0


def test_capture_and_batching_change_no_action(smoke: dict) -> None:
    checks = rows(smoke, "capture_changes_nothing")
    assert len(checks) == 3  # default at batch 1, plain and default at batch 2, against plain
    assert all(check["bit_identical"] for check in checks), checks


def test_the_real_server_is_driven_by_1_and_several_clients(smoke: dict) -> None:
    served = {r["clients"]: r for r in rows(smoke, "server")}
    assert set(served) == {1, 4}
    assert all(r["requests_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] for r in served.values())
    (ratio,) = rows(smoke, "server_ratio")
    assert ratio["throughput_vs_1_client"] > 0


def test_the_second_model_is_measured_or_skipped_for_budget(smoke: dict) -> None:
    loads = rows(smoke, "load", "pi05_tiny")
    assert len(loads) == 1
    if "skipped" in loads[0]:
        assert loads[0]["skipped"] == "budget"
    else:
        assert rows(smoke, "latency", "pi05_tiny")
