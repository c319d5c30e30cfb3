"""The embedded server's process guards, with real processes (the full server start is covered by
tests/client/test_collect.py, which SIGKILLs a collector and watches its embedded server die)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from latentpi.client.server_process import EmbeddedServer


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_child_dies_when_its_parent_is_sigkilled(tmp_path: Path) -> None:
    """A parent starts a long sleeper the way EmbeddedServer starts the server, then is SIGKILLed:
    no `finally` runs in the parent, the kernel kills the child."""
    pid_file = tmp_path / "child.pid"
    parent_code = textwrap.dedent(
        f"""
        import os, subprocess, sys, time
        from latentpi.client.server_process import die_with_parent
        parent = os.getpid()
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)"],
            start_new_session=True, preexec_fn=lambda: die_with_parent(parent),
        )
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(600)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code])
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and parent.poll() is None
        time.sleep(0.05)
    child = int(pid_file.read_text())
    assert _alive(child)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    assert _wait_gone(child), "the child outlived its SIGKILLed parent"


def test_a_server_that_exits_early_is_reported_with_its_log() -> None:
    server = EmbeddedServer("no_such_config", startup_timeout_s=120)
    with pytest.raises(RuntimeError, match=r"exited with code 2 before it was ready") as caught:
        server.wait_ready()
    assert "invalid choice: 'no_such_config'" in str(caught.value)  # the log tail is included
    server.stop()
    server.stop()  # idempotent
    assert server.process.returncode == 2


def test_startup_timeout_stops_the_server() -> None:
    server = EmbeddedServer("pi0_tiny", startup_timeout_s=0.5, extra_args=["--log-level", "error"])
    with pytest.raises(TimeoutError, match=r"not ready after 0 s|not ready after 1 s"):
        server.wait_ready()
    assert server.process.poll() is not None  # stopped, not left loading
