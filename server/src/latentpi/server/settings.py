"""How one server process is configured: a frozen dataclass the CLI, tests and the embedded mode build."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from latentpi.protocol.latent_spec import LatentSpec

DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024  # a request is two images and a prompt: far below this
DEFAULT_MAX_RESPONSE_BYTES = 1 << 30  # pi0's full preset in float32 is ~0.2 GiB
DEFAULT_MAX_CONNECTIONS = 256  # collectors hold one connection per worker: far below this


@dataclass(frozen=True)
class ServerSettings:
    """Network, security and batching knobs of the policy server.

    batch_sizes: the fixed batch sizes a batch is padded to, so nothing recompiles in steady state;
    derived from max_batch (powers of two up to it) when not given.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = field(default=None, repr=False)  # never in a repr, a log or a traceback
    # TLS (wss:// and https://): a PEM certificate chain and its private key, both or neither.
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    max_batch: int = 8
    batch_window_ms: float = 5.0
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    # Latent bytes one response may carry (prompt variants included): a 100 KB request must not
    # make the server build gigabytes. 1 GiB is also what latentpi's client accepts in a frame.
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    max_queue: int = 256
    # Compiled programs kept (one per batch size, latent spec and intervention structure seen);
    # the least recently used go first, so a client sending endless new specs cannot grow memory.
    max_programs: int = 256
    batch_sizes: tuple[int, ...] = ()
    warmup_batch_sizes: tuple[int, ...] = (1,)  # compiled at start-up, with every warm-up spec
    warmup_specs: tuple[LatentSpec, ...] = ()  # beyond plain inference and the default preset
    # Refuse prompts longer than max_token_len instead of truncating them (openpi truncates).
    strict_prompts: bool = False
    # Run batches row by row so a request's numbers never depend on its batch (bit-exact A/B);
    # None: on for CPU backends, where batching buys little, off on accelerators.
    batch_invariant: bool | None = None
    # Connection limits and timeouts (server/connections.py): what a peer may hold, how long.
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # open websocket connections; more get 503
    handshake_timeout_s: float = 10.0  # a new connection's time to send its request head
    idle_timeout_s: float | None = 600.0  # a websocket with no request is closed; None: never
    frame_timeout_s: float = 30.0  # a started frame must be finished within this
    send_timeout_s: float = 30.0  # a peer taking none of our bytes this long is cut off

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch <= 256:
            raise ValueError(f"max_batch: expected 1..256, received {self.max_batch}")
        if not 0 <= self.batch_window_ms <= 10_000:
            raise ValueError(f"batch_window_ms: expected 0..10000, received {self.batch_window_ms}")
        if not 1024 <= self.max_frame_bytes <= 2**31:
            raise ValueError(
                f"max_frame_bytes: expected 1 KiB..2 GiB, received {self.max_frame_bytes}"
            )
        if not 1024 <= self.max_response_bytes <= 2**34:
            raise ValueError(
                f"max_response_bytes: expected 1 KiB..16 GiB, received {self.max_response_bytes}"
            )
        if not 1 <= self.max_programs <= 65_536:
            raise ValueError(f"max_programs: expected 1..65536, received {self.max_programs}")
        if not 1 <= self.max_queue <= 65_536:
            raise ValueError(f"max_queue: expected 1..65536, received {self.max_queue}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: expected 0..65535, received {self.port}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key: expected a non-empty string or none")
        self._check_tls()
        self._check_connection_limits()
        if not self.warmup_batch_sizes or min(self.warmup_batch_sizes) < 1:
            raise ValueError(
                f"warmup_batch_sizes: expected sizes >= 1, received {self.warmup_batch_sizes}"
            )
        if not self.batch_sizes:
            object.__setattr__(self, "batch_sizes", _powers_of_two_up_to(self.max_batch))
        elif max(self.batch_sizes) < self.max_batch or min(self.batch_sizes) < 1:
            raise ValueError(
                f"batch_sizes: expected sizes >= 1 covering max_batch, received {self.batch_sizes}"
            )

    @property
    def tls(self) -> bool:
        return self.tls_certfile is not None

    def _check_tls(self) -> None:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("tls_cert: expected --tls-cert and --tls-key together, received one")
        for name in ("tls_certfile", "tls_keyfile"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                option = name.removesuffix("file")
                raise ValueError(
                    f"{option}: expected a PEM file, received {str(path)!r} (no such file)"
                )

    def _check_connection_limits(self) -> None:
        if not 1 <= self.max_connections <= 65_536:
            raise ValueError(f"max_connections: expected 1..65536, received {self.max_connections}")
        timeouts = {
            "handshake_timeout_s": self.handshake_timeout_s,
            "idle_timeout_s": self.idle_timeout_s,
            "frame_timeout_s": self.frame_timeout_s,
            "send_timeout_s": self.send_timeout_s,
        }
        for name, seconds in timeouts.items():
            if seconds is None and name == "idle_timeout_s":
                continue
            if not (isinstance(seconds, int | float) and 0 < seconds <= 86_400):
                raise ValueError(f"{name}: expected seconds in (0, 86400], received {seconds!r}")

    def padded_batch_size(self, count: int) -> int:
        return min(size for size in sorted(self.batch_sizes) if size >= count)

    def replace(self, **changes: object) -> ServerSettings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _powers_of_two_up_to(limit: int) -> tuple[int, ...]:
    sizes = []
    size = 1
    while size < limit:
        sizes.append(size)
        size *= 2
    sizes.append(limit)
    return tuple(sizes)
