"""A websocket policy client speaking latentpi's codec (bfloat16 latents restored), with reconnects.

The interface is openpi-client's `WebsocketClientPolicy` (`infer`, `get_server_metadata`, `reset`),
so rollout code takes either. What it adds:

- Frames are bounded: the websocket refuses a frame over `limits.max_frame_bytes` and the decoder
  checks every claim against `limits` before allocating.
- A server that refuses us says why, and that ends the conversation: HTTP 401 at the handshake (bad
  API key) or an error text frame (bad request, unknown preset) raise `ServerRejected` carrying the
  server's own text. Retrying would only repeat the refusal.
- A lost connection (server restart, network) is not a refusal. The next connection attempt backs
  off exponentially within `Backoff` (bounded attempts and seconds, each attempt logged) and raises
  `ServerUnavailable` when the bound is spent. A request in flight when the connection drops is not
  resent unless `resend=True`: it raises `ConnectionLost` once a new connection is up, so a caller
  that must not mix two connections' answers in one record (the collector redoes the episode)
  decides what to do.
- A server that comes back as a different model (its metadata differs; `same_model` decides what
  counts, default: any difference) is refused with `ServerChanged`: answers from two models must
  not end up in one file.
- A server that stops answering (connected, no reply within `request_timeout_s`, when given)
  raises `ServerUnavailable`; the connection is dropped (a late reply must not answer the next
  request).
- `wss://` verifies the server's certificate against the system's CAs, or against `tls_ca` (a PEM
  file; default `$LATENTPI_TLS_CA`) for a private or self-signed certificate. A failed
  verification is a refusal (`ServerRejected`), not something to retry.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import os
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI, WebSocketException
from websockets.sync.client import ClientConnection, connect

from latentpi.protocol.api_key import redact_credentials
from latentpi.protocol.codec import DEFAULT_LIMITS, Limits, packb, unpackb
from latentpi.protocol.errors import ProtocolError, ValidationError

logger = logging.getLogger(__name__)

# A PEM file of CAs to trust for wss:// (worker processes inherit it).
ENV_TLS_CA = "LATENTPI_TLS_CA"


redact_credentials("websockets.client")


class ServerRejected(RuntimeError):
    """The server refused the request or the connection; the message is the server's text."""


class ServerUnavailable(ConnectionError):
    """No connection could be made within the retry bounds."""


class ConnectionLost(ConnectionError):
    """The connection dropped with a request in flight; a new connection is up."""


class ServerChanged(RuntimeError):
    """After a reconnect the server describes a different model than before."""


@dataclass(frozen=True)
class Backoff:
    """Connection retries: delays first_s, first_s * factor, ... capped at max_delay_s; at most
    `attempts` tries, and no try begins after `max_total_s` seconds (wall clock, tries included)."""

    attempts: int = 8
    first_s: float = 0.5
    factor: float = 2.0
    max_delay_s: float = 10.0
    max_total_s: float = 120.0

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or self.attempts < 1:
            raise ValidationError("backoff.attempts", "a positive int", self.attempts)
        for name in ("first_s", "max_delay_s", "max_total_s"):
            if getattr(self, name) < 0:
                raise ValidationError(f"backoff.{name}", "seconds >= 0", getattr(self, name))
        if self.factor < 1:
            raise ValidationError("backoff.factor", "a factor >= 1", self.factor)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before try `attempt` (0 = the first try, no wait)."""
        if attempt == 0:
            return 0.0
        return min(self.first_s * self.factor ** (attempt - 1), self.max_delay_s)


class LatentpiPolicyClient:
    """`infer(obs) -> dict` against a latentpi (or openpi) websocket policy server."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        limits: Limits = DEFAULT_LIMITS,
        backoff: Backoff = Backoff(),
        open_timeout_s: float = 60.0,
        resend: bool = False,
        request_timeout_s: float | None = None,
        tls_ca: str | Path | None = None,
        same_model: Callable[[Mapping[str, Any], Mapping[str, Any]], bool] = operator.eq,
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("ws://", "wss://")):
            raise ValidationError("url", "a ws:// or wss:// URL", url)
        self.url = url
        self._ssl = tls_context(url, tls_ca)
        self._headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
        self._limits = limits
        self._backoff = backoff
        self._open_timeout_s = open_timeout_s
        self._resend = resend
        if request_timeout_s is not None and not request_timeout_s > 0:
            raise ValidationError("request_timeout_s", "seconds > 0 or None", request_timeout_s)
        self._request_timeout_s = request_timeout_s
        self._ws: ClientConnection | None = None
        self._metadata: dict[str, Any] | None = None
        self._same_model = same_model
        self.reconnects = 0
        self._connect()

    # -- openpi-client's interface ----------------------------------------------------------------
    def get_server_metadata(self) -> dict[str, Any]:
        assert self._metadata is not None
        return self._metadata

    @property
    def metadata(self) -> dict[str, Any]:
        return self.get_server_metadata()

    def infer(self, obs: Mapping[str, Any]) -> dict[str, Any]:
        frame = packb(dict(obs))
        if len(frame) > self._limits.max_frame_bytes:
            raise ValidationError(
                "request", f"a frame of at most {self._limits.max_frame_bytes} bytes", len(frame)
            )
        for _ in range(self._backoff.attempts):
            if self._ws is None:
                self._connect()
            try:
                return self._exchange(frame)
            except ServerUnavailable:  # no answer in time: not a dropped connection to retry
                raise
            except (ConnectionClosed, OSError) as error:
                logger.warning("connection to %s lost during a request: %s", self.url, error)
                self._drop()
                self._connect()
                if not self._resend:
                    raise ConnectionLost(f"connection to {self.url} lost: {error}") from error
        raise ServerUnavailable(
            f"{self.url}: the connection dropped during each of {self._backoff.attempts} tries"
        )

    def reset(self) -> None:
        """Nothing to reset: the server keeps no per-episode state (openpi's interface)."""

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> LatentpiPolicyClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------------
    def _exchange(self, frame: bytes) -> dict[str, Any]:
        assert self._ws is not None
        self._ws.send(frame)
        try:
            reply = self._ws.recv(timeout=self._request_timeout_s)
        except TimeoutError:
            self._drop()
            raise ServerUnavailable(
                f"{self.url} did not answer a request within {self._request_timeout_s} s"
            ) from None
        if isinstance(reply, str):
            raise ServerRejected(reply)
        response = unpackb(reply, limits=self._limits)
        if not isinstance(response, dict):
            raise ProtocolError(f"response: expected a map, received {type(response).__name__}")
        return response

    def _connect(self) -> None:
        """Connect (with backoff) and read the metadata frame."""
        start, tries, last_error = time.monotonic(), 0, None
        for attempt in range(self._backoff.attempts):
            delay = self._backoff.delay(attempt)
            if time.monotonic() - start + delay > self._backoff.max_total_s:
                break
            if delay:
                logger.warning(
                    "retrying %s in %.1f s (attempt %d of %d): %s",
                    self.url,
                    delay,
                    attempt + 1,
                    self._backoff.attempts,
                    last_error,
                )
                time.sleep(delay)
            tries += 1
            try:
                self._open()
            except (OSError, TimeoutError, ConnectionClosed, InvalidStatusRetry) as error:
                last_error = error
                continue
            if attempt:
                self.reconnects += 1
                logger.warning("reconnected to %s", self.url)
            return
        raise ServerUnavailable(
            f"no connection to {self.url} after {tries} attempts in "
            f"{time.monotonic() - start:.1f} s: {last_error}"
        )

    def _open(self) -> None:
        ws = self._handshake()
        try:
            metadata = self._read_metadata(ws)
        except BaseException:
            with contextlib.suppress(OSError, ConnectionClosed):
                ws.close()
            raise
        self._ws, self._metadata = ws, metadata

    def _handshake(self) -> ClientConnection:
        try:
            # entered as a context (websockets >= 17 wants it; older versions return self)
            return connect(
                self.url,
                additional_headers=self._headers,
                compression=None,
                max_size=self._limits.max_frame_bytes,
                open_timeout=self._open_timeout_s,
                ssl=self._ssl,
            ).__enter__()
        except ssl.SSLCertVerificationError as error:
            message = f"{self.url}: certificate not trusted: {error.verify_message}"
            raise ServerRejected(message) from None
        except InvalidStatus as error:
            raise _rejection(error) from None
        except InvalidURI as error:
            raise ValidationError("url", "a ws:// or wss:// URL", self.url) from error
        except WebSocketException as error:
            raise OSError(f"handshake with {self.url} failed: {error}") from error

    def _read_metadata(self, ws: ClientConnection) -> dict[str, Any]:
        first = ws.recv(timeout=self._open_timeout_s)
        if isinstance(first, str):
            raise ServerRejected(first)
        metadata = unpackb(first, limits=self._limits)
        if not isinstance(metadata, dict):
            raise ProtocolError(f"metadata: expected a map, received {type(metadata).__name__}")
        if self._metadata is not None and not self._same_model(self._metadata, metadata):
            raise ServerChanged(
                f"{self.url} came back as a different model: "
                f"{_describe(self._metadata)} before, {_describe(metadata)} now"
            )
        return metadata

    def _drop(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(OSError, ConnectionClosed):
                self._ws.close()
            self._ws = None


def tls_context(url: str, tls_ca: str | Path | None = None) -> ssl.SSLContext | None:
    """The context verifying a wss:// server: the system's CAs, or those in `tls_ca` (else
    `$LATENTPI_TLS_CA`); None for ws://."""
    if not url.startswith("wss://"):
        return None
    cafile = tls_ca if tls_ca is not None else os.environ.get(ENV_TLS_CA) or None
    if cafile is None:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=str(cafile))
    except (OSError, ssl.SSLError) as error:
        source = "tls_ca" if tls_ca is not None else ENV_TLS_CA
        raise ValidationError(
            source, "a readable PEM file of CA certificates", str(cafile)
        ) from error


class InvalidStatusRetry(OSError):
    """A handshake answered with a status worth retrying (the server starting or overloaded)."""


# 5xx while a server starts or restarts behind a proxy is transient; 4xx is the server's refusal.
_RETRY_STATUSES = frozenset({502, 503, 504})


def _rejection(error: InvalidStatus) -> Exception:
    status = error.response.status_code
    body = bytes(error.response.body or b"").decode("utf-8", "replace").strip()
    text = body or f"HTTP {status}"
    if status in _RETRY_STATUSES:
        return InvalidStatusRetry(f"HTTP {status}: {text}")
    return ServerRejected(f"HTTP {status}: {text}")


def _describe(metadata: Mapping[str, Any]) -> str:
    config = metadata.get("config", {})
    name = config.get("name") if isinstance(config, Mapping) else None
    return f"{metadata.get('model')} ({name or 'unnamed config'})"
