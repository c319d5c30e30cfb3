"""API-key check at the websocket handshake (openpi-client sends `Authorization: Api-Key <key>`)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

SCHEME = "api-key"


def presented_key(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization")
    if value is None:
        return None
    scheme, _, key = value.partition(" ")
    if scheme.lower() != SCHEME or not key:
        return None
    return key.strip()


def is_authorized(headers: Mapping[str, str], api_key: str | None) -> bool:
    """True when no key is configured, or the presented one matches (compared in constant time)."""
    if api_key is None:
        return True
    key = presented_key(headers)
    if key is None:
        return False
    # Digests first: compare_digest is constant-time only for equal lengths, so comparing the raw
    # strings would tell a prober the key's length.
    return hmac.compare_digest(_digest(key), _digest(api_key))


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
