"""The ASGI application: openpi's websocket protocol at `/`, `GET /healthz`, `GET /metrics`.

openpi-compatible handshake: on connect the server sends a metadata frame; then every binary
request frame gets one binary response frame. A bad request gets a text frame naming the field
(the stock openpi-client raises it as RuntimeError) and, unlike openpi, the connection stays open.
Tracebacks go to the server log, never to a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from typing import Any, Protocol, runtime_checkable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from latentpi.protocol.codec import FramePacker, packb, unpackb
from latentpi.protocol.errors import ProtocolError, ValidationError
from latentpi.protocol.limits import request_limits
from latentpi.protocol.messages import PolicyRequest
from latentpi.server.auth import is_authorized
from latentpi.server.batching import BatchCompiler, DynamicBatcher, QueueFullError
from latentpi.server.metrics import DeviceReport, ServerMetrics
from latentpi.server.settings import ServerSettings

logger = logging.getLogger(__name__)

_OFFLOAD_BYTES = 1 << 20  # encode/decode bigger frames off the event loop


class Prepared(Protocol):
    @property
    def group(self) -> Hashable: ...


class PolicyEngine(Protocol):
    """What the app needs from the model side (see latentpi.server.engine)."""

    def metadata(self) -> dict[str, Any]: ...

    def prepare(self, request: PolicyRequest) -> Prepared: ...

    def run_batch(self, items: Sequence[Prepared]) -> list[dict[str, Any]]: ...


@runtime_checkable
class ReportsDevice(Protocol):
    """Optional: parameter bytes and device memory for /metrics."""

    def device_report(self) -> DeviceReport: ...


class PolicyServer:
    """One server's state: settings, metrics, the engine (loaded in the background) and its batcher."""

    def __init__(
        self, engine_factory: Callable[[], PolicyEngine], settings: ServerSettings
    ) -> None:
        self.settings = settings
        self.metrics = ServerMetrics()
        self.limits = request_limits(settings.max_frame_bytes)
        self._engine_factory = engine_factory
        self._engine: PolicyEngine | None = None
        self._metadata_frame = b""
        self._loaded = asyncio.Event()  # set once loading ended, whether it worked or not
        self._load_error: BaseException | None = None
        self._batcher: DynamicBatcher[Prepared, dict[str, Any]] | None = None
        self._stopping = threading.Event()
        # Event-loop-only counters telling the batcher whether another request may still come.
        self._idle_connections = 0  # open connections with no request in the server
        self._preparing = 0  # requests received, not yet handed to the batcher

    # -- lifecycle ------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, _: Starlette) -> AsyncIterator[None]:
        loader = asyncio.create_task(self._load())
        try:
            yield
        finally:
            self._stopping.set()
            loader.cancel()
            await asyncio.gather(loader, return_exceptions=True)
            if self._batcher is not None:
                await self._batcher.stop()

    async def _load(self) -> None:
        try:
            engine = await _in_daemon_thread(self._engine_factory)
        except Exception as error:
            self._load_error = error
            logger.exception("loading the model failed")
            self._loaded.set()  # waiting connections are refused, not left hanging
            return
        self._engine = engine
        self._metadata_frame = packb(engine.metadata())
        if isinstance(engine, ReportsDevice):
            self.metrics.watch_device(engine.device_report)
        self._batcher = DynamicBatcher(
            engine.run_batch,
            max_batch=self.settings.max_batch,
            window_s=self.settings.batch_window_ms / 1000,
            max_queue=self.settings.max_queue,
            metrics=self.metrics,
            more_may_come=self._more_may_come,
            compiler=engine if isinstance(engine, BatchCompiler) else None,
        )
        self._batcher.start()
        self._loaded.set()
        logger.info("model ready")

    def _more_may_come(self) -> bool:
        """False when every open connection already has its request queued or running: the batch
        window would wait for nobody (a lone client never pays it)."""
        return self._idle_connections > 0 or self._preparing > 0

    @property
    def ready(self) -> bool:
        return self._loaded.is_set() and self._load_error is None

    @property
    def load_error(self) -> BaseException | None:
        return self._load_error

    # -- HTTP -----------------------------------------------------------------------------------
    async def healthz(self, _: Request) -> Response:
        if self._load_error is not None:
            # /healthz needs no API key: the kind of failure only, the details are in the log
            kind = type(self._load_error).__name__
            return PlainTextResponse(
                f"model failed to load ({kind}; see the server log)", status_code=503
            )
        if not self.ready:
            return PlainTextResponse("loading", status_code=503)
        return PlainTextResponse("OK")

    async def metrics_endpoint(self, _: Request) -> Response:
        return Response(
            self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    # -- websocket ------------------------------------------------------------------------------
    async def websocket(self, websocket: WebSocket) -> None:
        if not is_authorized(websocket.headers, self.settings.api_key):
            self.metrics.errors.labels("unauthorized").inc()
            await websocket.send_denial_response(
                PlainTextResponse("invalid or missing API key", status_code=401)
            )
            return
        if not await self._wait_loaded(websocket):
            return  # the client left, or the server is stopping, before the model was ready
        if self._load_error is not None:
            self.metrics.errors.labels("unavailable").inc()
            await websocket.send_denial_response(
                PlainTextResponse("model failed to load (see the server log)", status_code=503)
            )
            return
        await websocket.accept()
        self.metrics.clients.inc()
        try:
            await websocket.send_bytes(self._metadata_frame)
            await self._serve_connection(websocket)
        except WebSocketDisconnect:
            pass
        finally:
            self.metrics.clients.dec()

    async def _wait_loaded(self, websocket: WebSocket) -> bool:
        """Hold a connection made while loading until the model is ready (True), or until it is
        closed (False): a client giving up, or the server stopping, must not wait for the load."""
        if self._loaded.is_set():
            return True
        loaded = asyncio.ensure_future(self._loaded.wait())
        closed = asyncio.ensure_future(_closed(websocket))
        done, pending = await asyncio.wait({loaded, closed}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        return loaded in done

    async def _serve_connection(self, websocket: WebSocket) -> None:
        prev_total_ms: float | None = None
        packer = FramePacker()  # reused buffer: one copy per response array, no allocation
        idle = True
        self._idle_connections += 1
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                idle = False
                self._idle_connections -= 1
                start = time.monotonic()
                await self._reply(websocket, message.get("bytes"), prev_total_ms, packer)
                prev_total_ms = (time.monotonic() - start) * 1000
                idle = True
                self._idle_connections += 1
        finally:
            if idle:
                self._idle_connections -= 1

    async def _reply(
        self,
        websocket: WebSocket,
        frame: bytes | None,
        prev_total_ms: float | None,
        packer: FramePacker,
    ) -> None:
        start = time.monotonic()
        if frame is None:
            reply: memoryview | str = self._error(
                "bad_frame", "frame: expected a binary msgpack frame, received a text frame"
            )
        else:
            reply = await self._answer(frame, prev_total_ms, packer)
        if isinstance(reply, str):
            await websocket.send_text(reply)
        else:
            await websocket.send_bytes(reply)
            self.metrics.response_bytes.inc(len(reply))
        self.metrics.latency.observe(time.monotonic() - start)

    async def _answer(
        self, frame: bytes, prev_total_ms: float | None, packer: FramePacker
    ) -> memoryview | str:
        """The response frame, or an error text for the client."""
        assert self._engine is not None and self._batcher is not None
        start = time.monotonic()
        try:
            request, prepared = await self._prepare(frame)
            response = await self._batcher.submit(prepared)
        except ProtocolError as error:
            return self._error("bad_frame", f"bad frame: {error}")
        except ValidationError as error:
            return self._error("bad_request", f"bad request: {error}")
        except QueueFullError as error:
            return self._error("overloaded", str(error))
        except Exception:
            logger.exception("request failed")
            return self._error("internal", "internal server error (details are in the server log)")
        timing = {"infer_ms": (time.monotonic() - start) * 1000}
        if prev_total_ms is not None:
            timing["prev_total_ms"] = prev_total_ms
        response["server_timing"] = timing
        kind = "latents" if request.collect_latents else "plain"
        self.metrics.requests.labels(kind).inc()
        self.metrics.latent_bytes.inc(_latent_bytes(response))
        return await _offload(_latent_bytes(response), packer.pack, response)

    async def _prepare(self, frame: bytes) -> tuple[PolicyRequest, Prepared]:
        assert self._engine is not None
        self._preparing += 1
        try:
            wire = await _offload(len(frame), unpackb, frame, limits=self.limits)
            request = PolicyRequest.from_wire(wire)
            return request, await asyncio.to_thread(self._engine.prepare, request)
        finally:
            self._preparing -= 1

    def _error(self, kind: str, text: str) -> str:
        self.metrics.errors.labels(kind).inc()
        return text


async def _closed(websocket: WebSocket) -> None:
    """Returns when a not yet accepted connection is closed (nothing else arrives before accept)."""
    while (await websocket.receive())["type"] != "websocket.disconnect":
        pass


async def _in_daemon_thread(function: Callable[[], Any]) -> Any:
    """`function()` on a daemon thread: unlike `asyncio.to_thread`, a process told to stop while a
    model loads (minutes for a full checkpoint) exits without waiting for the load to finish."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():  # cancelled: the server is stopping
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    def target() -> None:
        result, error = None, None
        try:
            result = function()
        except BaseException as raised:
            error = raised
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=target, name="latentpi-load", daemon=True).start()
    return await future


async def _offload(size: int, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if size >= _OFFLOAD_BYTES:
        return await asyncio.to_thread(function, *args, **kwargs)
    return function(*args, **kwargs)


def _latent_bytes(response: dict[str, Any]) -> int:
    return sum(
        getattr(value, "nbytes", 0)
        for key, value in response.items()
        if key not in ("actions", "server_timing", "policy_timing")
    )


def build_app(engine_factory: Callable[[], PolicyEngine], settings: ServerSettings) -> Starlette:
    server = PolicyServer(engine_factory, settings)
    app = Starlette(
        routes=[
            WebSocketRoute("/", server.websocket),
            Route("/healthz", server.healthz),
            Route("/metrics", server.metrics_endpoint),
        ],
        lifespan=server.lifespan,
    )
    app.state.policy_server = server
    return app
