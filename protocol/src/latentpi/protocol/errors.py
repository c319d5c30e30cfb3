"""The protocol's two exception types.

`ProtocolError`: a frame that is not valid msgpack-numpy (truncated, garbage, bad dtype, sizes over
the limits). `ValidationError`: a well-formed frame whose content is wrong for its message type; its
message names the field, what was expected and what was received.
"""

from __future__ import annotations

_MAX_SHOWN = 80


class ProtocolError(ValueError):
    """A malformed frame."""


class ValidationError(ValueError):
    """A message field with a wrong value: names the field, the expected and the received value."""

    def __init__(self, field: str, expected: str, received: object) -> None:
        self.field = field
        self.expected = expected
        self.received = describe(received)
        super().__init__(f"{field}: expected {expected}, received {self.received}")

    def renamed(self, field: str) -> ValidationError:
        """The same error under another field name (e.g. with the index of a list entry)."""
        error = ValidationError(field, self.expected, None)
        error.received = self.received
        error.args = (f"{field}: expected {self.expected}, received {self.received}",)
        return error


def describe(value: object) -> str:
    """A short, safe description of a received value (arrays by dtype and shape, never their data)."""
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is not None and dtype is not None:
        return f"array of dtype {dtype} and shape {tuple(shape)}"
    text = repr(value)
    if len(text) > _MAX_SHOWN:
        text = text[: _MAX_SHOWN - 3] + "..."
    return f"{text} ({type(value).__name__})"
