"""`latentpi serve` as a real subprocess: --port 0 and --ready-file, a request from the stock client,
exit on SIGTERM (serving or still loading), exit when the --parent-pid process dies; and the
argument checks in-process."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from loopback import STOCK_CLIENT_WARNING, observation
from openpi_client.websocket_client_policy import WebsocketClientPolicy

from latentpi.server.cli import serve

pytestmark = pytest.mark.filterwarnings(STOCK_CLIENT_WARNING)

SERVE = [sys.executable, "-c", "from latentpi.cli import main; main()", "serve"]
STARTUP_S = 300.0


def serve_command(ready_file: Path, *extra: str) -> list[str]:
    return [
        *SERVE,
        "--config",
        "pi0_tiny",
        "--port",
        "0",
        "--ready-file",
        str(ready_file),
        "--log-level",
        "warning",
        *extra,
    ]


def wait_for_file(path: Path, process: subprocess.Popen[bytes] | None = None) -> dict:
    deadline = time.monotonic() + STARTUP_S
    while not path.exists():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode} before it was ready")
        assert time.monotonic() < deadline, "server not ready in time"
        time.sleep(0.1)
    return json.loads(path.read_text())


def alive(pid: int) -> bool:
    """Running, not a zombie (an orphan's zombie lingers where nothing reaps it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def nobody_listens(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.fixture
def reaped() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; killed if the test left them running."""
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.mark.slow
def test_serves_on_a_free_port_and_exits_on_sigterm(
    tmp_path: Path, reaped: list[subprocess.Popen[bytes]]
) -> None:
    ready_file = tmp_path / "ready.json"
    process = subprocess.Popen(serve_command(ready_file))
    reaped.append(process)
    ready = wait_for_file(ready_file, process)
    assert ready["pid"] == process.pid and ready["port"] > 0
    assert ready["url"] == f"ws://127.0.0.1:{ready['port']}"

    policy = WebsocketClientPolicy(ready["url"])
    assert policy.infer(observation(0))["actions"].shape == (50, 7)
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    policy._ws.close()
    assert nobody_listens(ready["port"])


@pytest.mark.slow
def test_exits_when_the_parent_dies(tmp_path: Path, reaped: list[subprocess.Popen[bytes]]) -> None:
    """A parent that starts the server with --parent-pid and is then SIGKILLed (no cleanup runs)."""
    ready_file = tmp_path / "ready.json"
    child_file = tmp_path / "child.pid"
    command = serve_command(ready_file)
    parent_code = (
        "import os, subprocess, sys, time\n"
        f"command = {command!r} + ['--parent-pid', str(os.getpid())]\n"
        "child = subprocess.Popen(command)\n"
        f"open({str(child_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code])
    reaped.append(parent)
    ready = wait_for_file(ready_file, parent)
    child = int(child_file.read_text())
    assert ready["pid"] == child
    parent.kill()
    parent.wait(10)
    try:
        assert wait_gone(child, 30), "the server outlived its parent"
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)
    assert nobody_listens(ready["port"])


@pytest.mark.slow
def test_sigterm_while_loading_exits_promptly(
    tmp_path: Path, reaped: list[subprocess.Popen[bytes]]
) -> None:
    """Stopping must not wait for the model to finish loading (minutes for a real checkpoint)."""
    ready_file = tmp_path / "ready.json"
    process = subprocess.Popen(
        serve_command(ready_file, "--log-level", "info"), stderr=subprocess.PIPE
    )
    reaped.append(process)
    assert process.stderr is not None
    for line in process.stderr:  # logged once the signal handlers are in place
        if b"loading pi0_tiny" in line:
            break
    process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert process.wait(30) == 0
    assert time.monotonic() - started < 15
    assert not ready_file.exists()


def test_a_model_that_fails_to_load_exits_1(tmp_path: Path) -> None:
    ready_file = tmp_path / "ready.json"
    missing = tmp_path / "no-checkpoint"
    result = subprocess.run(
        serve_command(ready_file, "--checkpoint", str(missing)),
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert b"model failed to load" in result.stderr and str(missing).encode() in result.stderr
    assert not ready_file.exists()


# -- arguments (in-process) ---------------------------------------------------------------------
def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_bind_loopback() -> None:
    args = parse(["--config", "pi0_tiny"])
    assert (args.host, args.port, args.api_key, args.max_batch) == ("127.0.0.1", 8000, None, 8)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-batch", "0"], "--max-batch: expected 1..256, received 0"),
        (["--batch-window-ms", "-1"], "--batch-window-ms: expected 0..10000, received -1.0"),
        (["--max-frame-bytes", "10"], "--max-frame-bytes: expected 1 KiB..2 GiB, received 10"),
        (["--port", "70000"], "--port: expected 0..65535, received 70000"),
    ],
)
def test_bad_settings_exit_2_naming_the_option(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert serve.run(parse(["--config", "pi0_tiny", *argv])) == 2
    assert message in capsys.readouterr().err


def test_unknown_config_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse(["--config", "pi1"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'pi1'" in capsys.readouterr().err
