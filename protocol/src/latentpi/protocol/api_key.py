"""Where an API key comes from, for both sides: an option, a file, or the environment.

A key on the command line is visible to every local user in `ps`; a file (mode 600) or the
environment is not. Precedence: the option, the option's file, `LATENTPI_API_KEY`,
`LATENTPI_API_KEY_FILE`. The key itself is never logged or echoed; errors name only the source.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path

ENV_KEY = "LATENTPI_API_KEY"
ENV_KEY_FILE = "LATENTPI_API_KEY_FILE"
MAX_KEY_BYTES = 4096  # a key is a few dozen bytes; a bigger file is the wrong file
_PRINTABLE = frozenset(range(0x21, 0x7F))  # visible ASCII: HTTP header-safe, no spaces

logger = logging.getLogger(__name__)


class ApiKeyError(ValueError):
    """A configured key that cannot be used; the message names its source, never the key."""

    def __init__(self, source: str, expected: str, received: str) -> None:
        super().__init__(f"{source}: expected {expected}, received {received}")


def resolve_api_key(
    key: str | None = None,
    key_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """The configured key, or None when none is configured anywhere. ApiKeyError (naming the
    source, never the key) for an empty, oversized or non-printable key or an unreadable file."""
    environ = os.environ if environ is None else environ
    if key is not None:
        return _checked("--api-key", key)
    if key_file is not None:
        return read_key_file(key_file, "--api-key-file")
    if environ.get(ENV_KEY):
        return _checked(ENV_KEY, environ[ENV_KEY])
    if environ.get(ENV_KEY_FILE):
        return read_key_file(environ[ENV_KEY_FILE], ENV_KEY_FILE)
    return None


def read_key_file(path: str | Path, source: str) -> str:
    """The key in `path`: its first line, surrounding whitespace stripped."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            data = handle.read(MAX_KEY_BYTES + 1)
    except OSError as error:
        raise ApiKeyError(source, "a readable key file", f"{error.strerror}: {path}") from None
    if len(data) > MAX_KEY_BYTES:
        raise ApiKeyError(source, f"a key file of at most {MAX_KEY_BYTES} bytes", "a bigger file")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("%s: %s is readable by other users (chmod 600 it)", source, path)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ApiKeyError(source, "an ASCII key", "other bytes") from None
    lines = text.strip().splitlines()
    return _checked(source, lines[0] if lines else "")


def _checked(source: str, key: str) -> str:
    key = key.strip()
    if not key:
        raise ApiKeyError(source, "a non-empty key", "an empty one")
    if len(key) > MAX_KEY_BYTES:
        raise ApiKeyError(source, f"a key of at most {MAX_KEY_BYTES} bytes", "a longer one")
    if not all(ord(char) in _PRINTABLE for char in key):
        # never echo the key: say only what is wrong with it
        raise ApiKeyError(source, "visible ASCII characters without spaces", "other ones")
    return key


class RedactCredentials(logging.Filter):
    """websockets logs every handshake header at debug level, `Authorization: Api-Key <key>`
    included (under uvicorn's logger on the server): the key must never reach a log."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "authorization:" in message.lower():
            name, _, _ = message.partition(":")
            record.msg, record.args = f"{name}: [redacted]", ()
        return True


def redact_credentials(logger_name: str) -> None:
    """Install `RedactCredentials` on a logger, once."""
    target = logging.getLogger(logger_name)
    if not any(isinstance(existing, RedactCredentials) for existing in target.filters):
        target.addFilter(RedactCredentials())
