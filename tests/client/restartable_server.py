"""A pi0_tiny `latentpi serve` on one loopback port for a test module, which tests kill and bring
back on the same port (the collector then sees a lost server, not another one). Imported as
`from restartable_server import RestartableServer`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from latentpi.client.policy_client import LatentpiPolicyClient
from latentpi.client.server_process import EmbeddedServer


class RestartableServer:
    def __init__(self, api_key: str, extra_args: Sequence[str] = ()) -> None:
        self.api_key, self.extra_args = api_key, list(extra_args)
        self.server = EmbeddedServer("pi0_tiny", api_key=api_key, extra_args=self.extra_args)
        self.server.__enter__()
        self.port = self.server.port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def kill(self) -> None:
        """SIGKILL, as a crash: no shutdown of any kind."""
        self.server.process.kill()
        self.server.process.wait()
        self.server.stop()

    def restart(self, config: str = "pi0_tiny", *extra: str) -> None:
        self.server.stop()
        self.server = EmbeddedServer(
            config, api_key=self.api_key, extra_args=[*self.extra_args, *extra], port=self.port
        )
        self.server.__enter__()

    def metadata(self) -> dict[str, Any]:
        with LatentpiPolicyClient(self.url, self.api_key) as client:
            return client.metadata

    def stop(self) -> None:
        self.server.stop()
