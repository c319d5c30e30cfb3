"""Hostile websocket peers on raw sockets, for tests/server/test_hostile_peers.py and
bench/hostile_peers.py: each misbehaves the way a buggy or malicious client would, at the byte
level (no client library would let it), and cheaply enough to open thousands.

Imported as `from hostile import ...` (see loopback.py for why not a conftest).
"""

from __future__ import annotations

import base64
import contextlib
import os
import resource
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

HANDSHAKE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Reply:
    status: int  # the handshake's HTTP status
    body: bytes  # for a refusal: its text; for 101: frame bytes that came with it


def upgrade_request(host: str, port: int, path: str = "/") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def tcp(host: str, port: int, *, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connect: it sets the window the server may fill
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(HANDSHAKE_TIMEOUT_S)
    sock.connect((host, port))
    return sock


def handshake(sock: socket.socket, host: str, port: int) -> Reply:
    """Send the upgrade request and read the response head (and a refusal's body)."""
    sock.sendall(upgrade_request(host, port))
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed during the handshake after {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if status != 101:
        length = _content_length(head)
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
    return Reply(status, rest)


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def frame(payload: bytes, opcode: int = 0x2, *, fin: bool = True) -> bytes:
    """One masked client frame (RFC 6455 5.2)."""
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", first, 0x80 | size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", first, 0x80 | 126, size)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, size)
    mask = os.urandom(4)
    data = np.frombuffer(payload, np.uint8)
    key = np.resize(np.frombuffer(mask, np.uint8), data.size)
    return header + mask + (data ^ key).tobytes()


def read_until_closed(sock: socket.socket, timeout_s: float) -> tuple[int | None, bytes]:
    """Read server frames until the connection ends (or `timeout_s` passes: TimeoutError).
    Returns the close code the server sent (None if it sent none: reset or bare EOF) and the
    close reason."""
    sock.settimeout(timeout_s)
    deadline = time.monotonic() + timeout_s
    data = b""
    while True:
        code, reason, data = _close_frame_in(data)
        if code is not None:
            return code, reason
        if time.monotonic() > deadline:
            raise TimeoutError("the server kept the connection open")
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return None, b""
        except TimeoutError:
            raise TimeoutError("the server kept the connection open") from None
        if not chunk:
            return None, b""
        data += chunk


def read_frames(sock: socket.socket, count: int, timeout_s: float) -> list[tuple[int, bytes]]:
    """The next `count` server frames as (opcode, payload); fewer if the connection ends."""
    sock.settimeout(timeout_s)
    frames: list[tuple[int, bytes]] = []
    data = b""
    while len(frames) < count:
        parsed = _next_frame(data)
        if parsed is not None:
            opcode, payload, data = parsed
            frames.append((opcode, payload))
            continue
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        data += chunk
    return frames


def _next_frame(data: bytes) -> tuple[int, bytes, bytes] | None:
    """One whole unmasked server frame off the front of `data`: (opcode, payload, rest)."""
    if len(data) < 2:
        return None
    size, offset = data[1] & 0x7F, 2
    if size == 126:
        if len(data) < 4:
            return None
        size, offset = struct.unpack("!H", data[2:4])[0], 4
    elif size == 127:
        if len(data) < 10:
            return None
        size, offset = struct.unpack("!Q", data[2:10])[0], 10
    if len(data) < offset + size:
        return None
    return data[0] & 0x0F, data[offset : offset + size], data[offset + size :]


def _close_frame_in(data: bytes) -> tuple[int | None, bytes, bytes]:
    """Skip whole server frames; (code, reason, rest) once a close frame is whole."""
    while (parsed := _next_frame(data)) is not None:
        opcode, payload, data = parsed
        if opcode == 0x8:
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            return code, payload[2:], data
    return None, b"", data


def closed_by_server(sock: socket.socket, timeout_s: float) -> bool:
    """True once the server ended the connection (EOF or reset) within `timeout_s`."""
    try:
        read_until_closed(sock, timeout_s)
    except TimeoutError:
        return False
    return True


def raise_file_limit(wanted: int) -> int:
    """Raise this process's soft open-file limit towards `wanted` (within the hard limit);
    returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


@contextlib.contextmanager
def sockets() -> Iterator[list[socket.socket]]:
    """A list to put sockets in; all closed on exit."""
    opened: list[socket.socket] = []
    try:
        yield opened
    finally:
        for sock in opened:
            with contextlib.suppress(OSError):
                sock.close()


def open_idle(host: str, port: int, count: int, into: list[socket.socket]) -> list[int]:
    """Open `count` websocket connections that then say nothing; returns each handshake's
    status (101 admitted, 503 refused). Admitted sockets are appended to `into`, refused ones
    closed."""
    statuses = []
    for _ in range(count):
        sock = tcp(host, port)
        reply = handshake(sock, host, port)
        statuses.append(reply.status)
        if reply.status == 101:
            into.append(sock)
        else:
            sock.close()
    return statuses


class SteadyClient:
    """The well-behaved peer: the stock openpi-client calling `infer` in a loop on a thread, with
    a fixed noise seed so that every answer must equal the first; records latencies and errors."""

    def __init__(self, url: str, obs: dict[str, Any], *, pause_s: float = 0.0) -> None:
        from openpi_client.websocket_client_policy import WebsocketClientPolicy

        self.policy = WebsocketClientPolicy(url)
        self.obs = {**obs, "noise_seed": 7}
        self.expected = self.policy.infer(self.obs)["actions"]
        self.latencies_s: list[float] = []
        self.errors: list[str] = []
        self._pause_s = pause_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steady-client", daemon=True)

    def __enter__(self) -> SteadyClient:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)
        with contextlib.suppress(Exception):
            self.policy._ws.close()  # the stock client has no close()

    def calls_after(self, count: int, timeout_s: float = 120.0) -> None:
        """Wait until `count` more calls were answered (it keeps being served)."""
        target = len(self.latencies_s) + count
        deadline = time.monotonic() + timeout_s
        while len(self.latencies_s) < target and not self.errors:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the steady client made {len(self.latencies_s)} calls")
            time.sleep(0.05)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                actions = self.policy.infer(self.obs)["actions"]
            except Exception as error:  # recorded: the test asserts there are none
                self.errors.append(f"{type(error).__name__}: {error}")
                return
            self.latencies_s.append(time.monotonic() - start)
            if not np.array_equal(actions, self.expected):
                self.errors.append("actions differ from the first answer")
                return
            if self._pause_s:
                self._stop.wait(self._pause_s)
