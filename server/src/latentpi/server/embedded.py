"""Run the policy server inside this process (tests, benchmarks) on a free local port, and stop it
cleanly. The collector's embedded mode runs `latentpi serve` as a child process instead (see
latentpi.client.server_process), so a crashing simulation never shares memory with the model."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

import uvicorn

from latentpi.protocol.api_key import redact_credentials
from latentpi.server.app import PolicyEngine, PolicyServer, build_app
from latentpi.server.connections import ConnectionGuard, raise_open_file_limit
from latentpi.server.settings import ServerSettings


class _RefusalNoiseFilter(logging.Filter):
    """uvicorn logs 'ASGI callable returned without completing handshake' after every deliberate
    refusal (401 bad API key, 503 failed load) sent as a denial response; the refusal is ours."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Invalid UTF-8 sequence"):
            # the peer's fault, answered with close 1007: a line, not an ERROR with a traceback
            # that any client could write into the log once per connection
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info, record.exc_text = None, None
        return "returned without completing handshake" not in message


def _quiet_refusals() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _RefusalNoiseFilter) for f in logger.filters):
        logger.addFilter(_RefusalNoiseFilter())
    redact_credentials("uvicorn.error")


def uvicorn_config(
    app: object, settings: ServerSettings, *, log_level: str = "warning"
) -> uvicorn.Config:
    http_protocol, ws_protocol = _connection_guard(app, settings).protocols()
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=settings.host,
        port=settings.port,
        http=http_protocol,
        ws=ws_protocol,
        ws_max_size=settings.max_frame_bytes,
        ws_per_message_deflate=False,  # openpi-client sends without compression
        lifespan="on",
        log_level=log_level,
        access_log=False,
        ssl_certfile=settings.tls_certfile,
        ssl_keyfile=settings.tls_keyfile,
    )


def _connection_guard(app: object, settings: ServerSettings) -> ConnectionGuard:
    """The limits uvicorn does not apply to websockets (see latentpi.server.connections)."""
    state = getattr(app, "state", None)
    policy_server = getattr(state, "policy_server", None)
    on_drop = (
        (lambda reason: policy_server.metrics.connections_dropped.labels(reason).inc())
        if isinstance(policy_server, PolicyServer)
        else (lambda reason: None)
    )
    return ConnectionGuard(
        max_connections=settings.max_connections,
        handshake_timeout_s=settings.handshake_timeout_s,
        idle_timeout_s=settings.idle_timeout_s,
        frame_timeout_s=settings.frame_timeout_s,
        send_timeout_s=settings.send_timeout_s,
        on_drop=on_drop,
    )


@dataclass
class RunningServer:
    host: str
    port: int
    server: uvicorn.Server = field(repr=False)
    thread: threading.Thread = field(repr=False)
    policy_server: PolicyServer = field(repr=False)
    tls: bool = False

    @property
    def url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://{self.host}:{self.port}"

    @property
    def http_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Block until /healthz answers 200 (model loaded and compiled); RuntimeError at once if
        the model failed to load or the server stopped."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.thread.is_alive():
                raise RuntimeError("the embedded server stopped while starting")
            if self.policy_server.load_error is not None:
                raise RuntimeError(f"model failed to load: {self.policy_server.load_error!r}")
            try:
                with urllib.request.urlopen(
                    f"{self.http_url}/healthz", timeout=2, context=_own_server_context()
                ) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"server at {self.http_url} not ready after {timeout_s:.0f} s")

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def _own_server_context() -> ssl.SSLContext:
    """For polling this process's own server: its certificate may name a public host, not the
    loopback address polled here, and nothing travels but `GET /healthz`."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def start_server(
    engine_factory: Callable[[], PolicyEngine],
    settings: ServerSettings | None = None,
    *,
    wait: bool = True,
    timeout_s: float = 300.0,
) -> RunningServer:
    """Start the server on a thread; port 0 (the default here) picks a free local port."""
    settings = settings or ServerSettings(port=0)
    _quiet_refusals()
    raise_open_file_limit(settings.max_connections)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    host, port = sock.getsockname()[:2]
    app = build_app(engine_factory, settings)
    server = uvicorn.Server(uvicorn_config(app, settings))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"latentpi-server-{port}", daemon=True
    )
    thread.start()
    running = RunningServer(host, port, server, thread, app.state.policy_server, settings.tls)
    if wait:
        running.wait_ready(timeout_s)
    return running
