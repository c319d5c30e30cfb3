"""The live fuzzer's short pass, through bench/fuzz_server.py's own code: a real `latentpi serve`
(pi0_tiny, its own process, loopback) gets frames of every category on two connections while a
stock openpi-client is served alongside. Nothing may crash the server, hang, answer `internal
server error`, drop a connection without a close frame or answer anything else than an error text,
a response or a clean close; the stock client gets every answer right (bit for bit what it got
alone). The full run (100,000 frames) and its figures: docs/reliability.md."""

from __future__ import annotations

import argparse
import importlib.util
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "fuzz_server.py"
PER_CATEGORY = 80  # 16 categories (3 oversized frames): ~1,200 frames


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_server", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_server"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_script()


@pytest.fixture(scope="module")
def server(script: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with script.running_server("pi0_tiny", tmp_path_factory.mktemp("fuzz")) as running:
        yield running


@pytest.fixture(scope="module")
def report(script: ModuleType, server: Any, tmp_path_factory: pytest.TempPathFactory) -> dict:
    args = argparse.Namespace(
        frames=0, per_category=PER_CATEGORY, categories=None, seed=14, config="pi0_tiny", timeout_s=120.0,
        baseline=6, connections=2, save_dir=tmp_path_factory.mktemp("failing-frames"),
    )  # fmt: skip
    report = script.fuzz_server(server, args)
    script.print_report(report)  # shown with -s, and on failure
    return report


def test_no_crash_hang_internal_error_or_dropped_connection(
    script: ModuleType, report: dict
) -> None:
    assert report["server_alive"]
    failures = {outcome: report["totals"][outcome] for outcome in script.FAILURES}
    assert failures == dict.fromkeys(script.FAILURES, 0), report["failures"]
    assert report["server_internal_errors"] == 0


def test_every_category_ran_and_every_frame_got_an_answer(script: ModuleType, report: dict) -> None:
    assert set(report["categories"]) == set(script.CATEGORY_WEIGHTS)
    for category, outcomes in report["categories"].items():
        expected = 3 if category == "oversized" else PER_CATEGORY
        assert sum(outcomes.values()) == expected, category
        assert set(outcomes) <= {"error", "response", "closed"}, (category, outcomes)
    assert report["categories"]["oversized"] == {"closed": 3}
    assert report["categories"]["truncated"] == {"error": PER_CATEGORY}
    assert report["close_codes"].get("1007", 0) > 0  # invalid UTF-8 in a text frame


def test_the_stock_client_got_every_answer_right(report: dict) -> None:
    stock = report["stock_client"]
    assert stock["errors"] == [] and stock["wrong_answers"] == 0
    assert stock["baseline_requests"] == 6 and stock["fuzz_requests"] > 0


def test_a_request_of_many_values_is_refused_before_it_is_built(
    script: ModuleType, server: Any, report: dict
) -> None:
    """Was: up to 4 Mi values per request (the codec's default): a 4 MB frame of empty maps made
    the server build ~300 MB of Python objects on its event loop (seconds for every client)."""
    connection = script.FuzzConnection(server.url, timeout_s=60)
    inner = b"\xdc" + struct.pack(">H", 10_000) + b"\x80" * 10_000  # 10,000 empty maps
    bomb = b"\x9a" + inner * 10  # 100,010 values, no list over the length limit
    try:
        connection.open()
        connection.connection.send(bomb)
        reply = connection.connection.recv(timeout=60)
    finally:
        connection.close()
    assert reply == "bad frame: frame: more than 65536 values"
    assert report["categories"]["object_bomb"] == {"error": PER_CATEGORY}
