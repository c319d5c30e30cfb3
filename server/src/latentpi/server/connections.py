"""Connection limits and timeouts below the app, where a connection's transport can be aborted.

uvicorn (h11 + websockets' sans-I/O protocol) leaves each of these open, and each lets one peer
hold a connection slot, a file descriptor and memory for as long as it likes:

- a TCP connection that never sends its request head: h11 arms no timer before the first request;
- websocket upgrades skip `limit_concurrency` (checked for plain HTTP requests only);
- a websocket that never sends a request: the keep-alive pings keep it open;
- a frame dribbled byte by byte: buffered, with no deadline;
- a peer that never reads: a send waits for the buffer to drain, and `transport.close()` waits
  for the buffered bytes to be taken, both forever (the server's shutdown then waits too);
- pings from a peer that never reads: every pong is buffered, without bound.

`ConnectionGuard` holds one server's limits and counters; `protocols()` gives the two uvicorn
protocol classes that apply them (passed as `http=` and `ws=` to `uvicorn.Config`). Everything
runs on the server's event loop: plain counters, no locks.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, ClassVar

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

logger = logging.getLogger(__name__)

PONG_ROOM = 64 * 1024  # asyncio's high-water mark: above it the peer is not keeping up
_PONG_HEADER = b"\x8a"  # FIN + opcode 0xA: a server frame (unmasked) that is a pong
_LOG_EVERY_S = 10.0  # one warning per reason and period: a flood must not flood the log
# Why a connection was dropped: the `reason` label of latentpi_connections_dropped_total.
DROP_REASONS = (
    "limit",  # websocket handshake refused with 503: max_connections open
    "pending_limit",  # TCP connection reset: max_connections others not yet upgraded
    "handshake_timeout",  # no request head (or HTTP exchange) within handshake_timeout_s
    "idle_timeout",  # no request within idle_timeout_s
    "frame_timeout",  # a started message not finished within frame_timeout_s
    "send_timeout",  # the peer took none of our bytes for send_timeout_s
    "close_timeout",  # closed, but the peer would not take the last bytes: aborted
)


@dataclass
class ConnectionGuard:
    """One server's connection limits (see ServerSettings) and its live counters."""

    max_connections: int
    handshake_timeout_s: float
    idle_timeout_s: float | None  # None: idle connections stay
    frame_timeout_s: float
    send_timeout_s: float
    on_drop: Callable[[str], None] = field(default=lambda reason: None, repr=False)
    pending: int = 0  # TCP connections not (yet) upgraded to websocket
    sessions: int = 0  # websocket connections admitted (waiting for the model or served)
    _logged_at: dict[str, float] = field(default_factory=dict, repr=False)
    _unlogged: dict[str, int] = field(default_factory=dict, repr=False)

    def protocols(self) -> tuple[type[H11Protocol], type[WebSocketsSansIOProtocol]]:
        """uvicorn protocol classes bound to this guard (uvicorn instantiates them itself)."""
        http = type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": self})
        ws = type("GuardedWebSocketProtocol", (GuardedWebSocketProtocol,), {"guard": self})
        return http, ws

    def dropped(self, reason: str, peer: Any) -> None:
        self.on_drop(reason)
        now = time.monotonic()
        if now - self._logged_at.get(reason, -_LOG_EVERY_S) < _LOG_EVERY_S:
            self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
            return
        also = self._unlogged.pop(reason, 0)
        self._logged_at[reason] = now
        logger.warning(
            "dropped a connection from %s: %s%s",
            _peer_text(peer),
            _REASON_TEXT[reason].format(guard=self),
            f" (and {also} more since the last such message)" if also else "",
        )


_REASON_TEXT = {
    "limit": "{guard.max_connections} websocket connections open (--max-connections)",
    "pending_limit": "{guard.max_connections} connections already waiting for their handshake",
    "handshake_timeout": "no request within {guard.handshake_timeout_s:g} s",
    "idle_timeout": "no request for {guard.idle_timeout_s:g} s",
    "frame_timeout": "a frame not finished within {guard.frame_timeout_s:g} s",
    "send_timeout": "it took none of its responses for {guard.send_timeout_s:g} s",
    "close_timeout": "closed, but it never took the last bytes",
}


def _peer_text(peer: Any) -> str:
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "a peer"


class BoundedCloseTransport:
    """A transport whose close() cannot hang: asyncio's close() waits until the buffered bytes
    are taken, forever if the peer never reads; this one aborts after the send timeout. Everything
    else is the wrapped transport's."""

    def __init__(self, transport: asyncio.Transport, guard: ConnectionGuard, peer: Any) -> None:
        self._transport = transport
        self._guard = guard
        self._peer = peer
        self._abort_timer: asyncio.TimerHandle | None = None
        self._gone = False  # aborted, or the connection was lost

    def close(self) -> None:
        self._transport.close()
        if self._gone or self._abort_timer is not None:
            return
        if self._transport.get_write_buffer_size() > 0:
            loop = asyncio.get_running_loop()
            self._abort_timer = loop.call_later(self._guard.send_timeout_s, self._abort_stuck)

    def abort(self) -> None:
        self.forget()
        self._transport.abort()

    def forget(self) -> None:
        """The connection is gone: no abort to come."""
        self._gone = True
        if self._abort_timer is not None:
            self._abort_timer.cancel()
            self._abort_timer = None

    def _abort_stuck(self) -> None:
        self._abort_timer = None
        self._guard.dropped("close_timeout", self._peer)
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedH11Protocol(H11Protocol):
    """HTTP until the websocket upgrade. At most `max_connections` such connections at once (more
    are reset: nothing can be answered before a request), each given `handshake_timeout_s` to send
    its request head, and again after each HTTP response (a slow-loris gets no keep-alive)."""

    guard: ClassVar[ConnectionGuard]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        wrapped = BoundedCloseTransport(transport, self.guard, transport.get_extra_info("peername"))
        super().connection_made(wrapped)  # type: ignore[arg-type]
        self._deadline: asyncio.TimerHandle | None = None
        self._counted = True
        self.guard.pending += 1
        if self.guard.pending > self.guard.max_connections:
            self._drop("pending_limit")
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._counted:
            self._counted = False
            self.guard.pending -= 1
        self.transport.forget()  # type: ignore[attr-defined]
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def handle_websocket_upgrade(self, event: Any) -> None:
        self._disarm()
        if self._counted:
            self._counted = False
            self.guard.pending -= 1
        super().handle_websocket_upgrade(event)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(
            self.guard.handshake_timeout_s, self._drop, "handshake_timeout"
        )

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _drop(self, reason: str) -> None:
        self._deadline = None
        self.guard.dropped(reason, self.client)
        self.transport.abort()


class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
    """A websocket connection under the guard's limits: refused with 503 beyond `max_connections`;
    closed after `idle_timeout_s` without a request, or when a started message is not finished
    within `frame_timeout_s`; aborted when the peer takes none of our bytes for `send_timeout_s`;
    at most one pong buffered while the peer is not reading."""

    guard: ClassVar[ConnectionGuard]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._admitted = False
        self._frames_done = 0  # complete frames seen (control frames, final data frames)
        self._frame_deadline: asyncio.TimerHandle | None = None
        self._idle_deadline: asyncio.TimerHandle | None = None
        self._pong_buffered = False  # a pong written while the buffer was over PONG_ROOM

    # -- admission --------------------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        if not isinstance(transport, BoundedCloseTransport):
            transport = BoundedCloseTransport(
                transport, self.guard, transport.get_extra_info("peername")
            )
        super().connection_made(transport)

    def handle_connect(self, event: Any) -> None:
        if self.guard.sessions >= self.guard.max_connections:
            self._refuse(event)
            return
        self._admitted = True
        self.guard.sessions += 1
        super().handle_connect(event)

    def _refuse(self, event: Any) -> None:
        self.request = event
        self.handshake_initiated = self.handshake_complete = self.close_sent = True
        text = (
            f"server busy: {self.guard.max_connections} websocket connections open "
            "(--max-connections); retry later"
        )
        response = self.conn.reject(HTTPStatus.SERVICE_UNAVAILABLE, text)
        response.headers["Retry-After"] = "1"
        self.conn.send_response(response)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.transport.close()
        self.guard.dropped("limit", self.client)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_frame_deadline()
        self._cancel_idle_deadline()
        if self._admitted:
            self._admitted = False
            self.guard.sessions -= 1
        self.transport.forget()  # type: ignore[attr-defined]
        super().connection_lost(exc)

    # -- reading: frame deadline ------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        done_before = self._frames_done
        super().data_received(data)
        if not self.handshake_complete or self.close_sent or self.transport.is_closing():
            self._cancel_frame_deadline()
            return
        if self._frames_done != done_before and not self.frames:
            self._cancel_frame_deadline()  # the last message finished
            if not self._bytes_buffered():
                return
        if self._frame_deadline is None:  # bytes of an unfinished frame arrived
            self._frame_deadline = self.loop.call_later(
                self.guard.frame_timeout_s, self._frame_timeout
            )

    def _bytes_buffered(self) -> bool:
        reader = getattr(self.conn, "reader", None)
        return bool(getattr(reader, "buffer", b""))

    def send_receive_event_to_app(self) -> None:
        self._frames_done += 1
        super().send_receive_event_to_app()

    def handle_ping(self) -> None:
        """Write the pongs websockets queued (one per ping of the bytes just read), but beyond
        one while the buffer is over PONG_ROOM drop them: a peer pinging without reading would
        otherwise make us buffer without bound."""
        self._frames_done += 1
        for data in self.conn.data_to_send():
            if data[:1] == _PONG_HEADER and not self._room_for_pong():
                continue
            self.transport.write(data)

    def _room_for_pong(self) -> bool:
        if self.transport.get_write_buffer_size() <= PONG_ROOM:
            self._pong_buffered = False
            return True
        if self._pong_buffered:
            return False
        self._pong_buffered = True  # a slow reader pinging behind a big response gets its pong
        return True

    def handle_pong(self, event: Any) -> None:
        self._frames_done += 1
        super().handle_pong(event)

    def handle_close(self, event: Any) -> None:
        self._frames_done += 1
        super().handle_close(event)

    def _frame_timeout(self) -> None:
        self._frame_deadline = None
        if self.read_paused:  # the app has not asked for the next message yet: not the peer's fault
            self._frame_deadline = self.loop.call_later(
                self.guard.frame_timeout_s, self._frame_timeout
            )
            return
        self._close(1008, f"frame not finished within {self.guard.frame_timeout_s:g} s")
        self.guard.dropped("frame_timeout", self.client)

    def _cancel_frame_deadline(self) -> None:
        if self._frame_deadline is not None:
            self._frame_deadline.cancel()
            self._frame_deadline = None

    # -- the app waiting for a request: idle deadline ---------------------------------------------
    async def receive(self) -> Any:
        timeout = self.guard.idle_timeout_s
        if timeout is not None and self.handshake_complete and self.queue.empty():
            self._cancel_idle_deadline()
            self._idle_deadline = self.loop.call_later(timeout, self._idle_timeout)
        try:
            return await super().receive()
        finally:
            self._cancel_idle_deadline()

    def _idle_timeout(self) -> None:
        self._idle_deadline = None
        if self.close_sent or self.disconnected or not self.queue.empty():
            return
        if self._frame_deadline is not None:  # a request is arriving: the frame timeout governs
            timeout = self.guard.idle_timeout_s or 0.0
            self._idle_deadline = self.loop.call_later(timeout, self._idle_timeout)
            return
        self._close(1000, f"idle: no request for {self.guard.idle_timeout_s:g} s")
        self.guard.dropped("idle_timeout", self.client)

    def _cancel_idle_deadline(self) -> None:
        if self._idle_deadline is not None:
            self._idle_deadline.cancel()
            self._idle_deadline = None

    # -- writing: send deadline -------------------------------------------------------------------
    async def send(self, message: Any) -> None:
        if not self.writable.is_set() and not self.disconnected:
            try:
                await asyncio.wait_for(self.writable.wait(), self.guard.send_timeout_s)
            except TimeoutError:
                self.guard.dropped("send_timeout", self.client)
                self.transport.abort()
                raise ClientDisconnected from None
        await super().send(message)

    def _close(self, code: int, reason: str) -> None:
        """Start the closing handshake and tell the app (its receive() returns a disconnect);
        the transport closes when the peer answers, or `close_timeout` later."""
        self._cancel_frame_deadline()
        self._cancel_idle_deadline()
        if self.close_sent or self.transport.is_closing():
            return
        self.conn.send_close(code, reason)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        self.close_timer = self.loop.call_later(self.close_timeout, self.transport.close)


def raise_open_file_limit(max_connections: int) -> None:
    """Each connection is a file descriptor, and a websocket one was an HTTP one first: make room
    for twice `max_connections` plus the process's own files, within the hard limit."""
    needed = 2 * max_connections + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        logger.warning(
            "--max-connections %d needs about %d file descriptors; the hard limit is %d "
            "(raise it with ulimit -Hn, or lower --max-connections)",
            max_connections,
            needed,
            hard,
        )
