"""An embedded policy server: `latentpi serve` as a child process that never outlives its parent.

The client never imports JAX, so "embedded" means a subprocess on a free loopback port. It must die
with the collector however the collector dies, including SIGKILL, where no `finally` runs. Two
independent guards:

- `prctl(PR_SET_PDEATHSIG, SIGKILL)` in the child between fork and exec: the kernel kills the
  server when the thread that forked it exits. The child then checks its parent is still the one
  that forked it (the parent may have died before the prctl took effect).
- `--parent-pid`: the server's own watchdog stops it when its parent is gone (platforms without
  prctl, or a parent thread that exits while the process lives on).

The child gets its own session (`start_new_session`), so a Ctrl-C at the terminal reaches only the
collector, which then stops the server in order (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from latentpi.protocol.api_key import ENV_KEY, ENV_KEY_FILE

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# The dispatcher's entry point, run by this interpreter: the same environment as the collector.
_SERVE = ("-c", "from latentpi.cli import main; main()", "serve")


def die_with_parent(parent_pid: int, signum: int = signal.SIGKILL) -> None:
    """Ask the kernel to send `signum` to this process when its parent exits (Linux; elsewhere a
    no-op); exit at once if the parent is already gone. Safe between fork and exec."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


class EmbeddedServer:
    """Start `latentpi serve --config CONFIG` on a free local port; `url` once it is ready.

    Use as a context manager; `stop()` is idempotent. `startup_timeout_s` bounds model loading and
    compilation (~30 s for pi0_tiny on 2 cores, minutes for a full checkpoint).
    """

    def __init__(
        self,
        config: str = "pi0_tiny",
        *,
        api_key: str | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout_s: float = 900.0,
        log_file: Path | None = None,
        port: int = 0,
    ) -> None:
        self.config = config
        self.startup_timeout_s = startup_timeout_s
        self._folder = tempfile.TemporaryDirectory(prefix="latentpi-server-")
        self._ready_file = Path(self._folder.name) / "ready.json"
        self.log_file = log_file or Path(self._folder.name) / "server.log"
        parent = os.getpid()
        command = [
            sys.executable,
            *_SERVE,
            "--config",
            config,
            "--port",
            str(port),
            "--ready-file",
            str(self._ready_file),
            "--parent-pid",
            str(parent),
            "--log-level",
            "warning",
            *extra_args,
        ]
        # The key goes through the environment: a command line is readable by every local user.
        environment = {key: value for key, value in os.environ.items() if key != ENV_KEY_FILE}
        environment[ENV_KEY] = api_key or ""
        self._log = open(self.log_file, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=environment,
            start_new_session=True,
            preexec_fn=lambda: die_with_parent(parent),
        )
        self.url = ""
        self.port = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self) -> str:
        """Block until the server has written its ready file; its URL. Raises RuntimeError with
        the server's log tail if it exits first, TimeoutError after `startup_timeout_s`."""
        deadline = time.monotonic() + self.startup_timeout_s
        while not self._ready_file.exists():
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(
                    f"the embedded server exited with code {code} before it was ready:\n"
                    f"{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(
                    f"the embedded server was not ready after {self.startup_timeout_s:.0f} s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.1)
        ready = json.loads(self._ready_file.read_text())
        self.url, self.port = str(ready["url"]), int(ready["port"])
        logger.info("embedded server %s ready at %s (pid %d)", self.config, self.url, self.pid)
        return self.url

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace_s: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not self._log.closed:
            self._log.close()
        self._folder.cleanup()

    def __enter__(self) -> EmbeddedServer:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
