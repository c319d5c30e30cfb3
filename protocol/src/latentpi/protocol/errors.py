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
    return f"{short_repr(value, _MAX_SHOWN)} ({type(value).__name__})"


def short_repr(value: object, limit: int) -> str:
    """repr(value) cut to `limit` characters ("..." at the end when cut), built only as far as
    the cut: a received value may be a list of thousands of arrays, whose full repr would take
    seconds and far more memory than the frame. Arrays inside containers show dtype and shape."""
    parts: list[str] = []
    _write_repr(value, parts, [limit + 1])
    text = "".join(parts)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _write_repr(value: object, parts: list[str], budget: list[int]) -> None:
    """Appends repr pieces of `value` to `parts` until `budget[0]` characters are written."""

    def emit(text: str) -> None:
        parts.append(text)
        budget[0] -= len(text)

    kind = type(value)
    if kind is list or kind is tuple:
        items: list[object] | tuple[object, ...] = value  # type: ignore[assignment]
        emit("[" if kind is list else "(")
        for index, item in enumerate(items):
            if budget[0] <= 0:
                return
            if index:
                emit(", ")
            _write_repr(item, parts, budget)
        emit("," if kind is tuple and len(items) == 1 else "")
        emit("]" if kind is list else ")")
    elif kind is dict:
        emit("{")
        for index, (key, item) in enumerate(value.items()):  # type: ignore[attr-defined]
            if budget[0] <= 0:
                return
            if index:
                emit(", ")
            _write_repr(key, parts, budget)
            emit(": ")
            _write_repr(item, parts, budget)
        emit("}")
    elif kind is str or kind is bytes:
        emit(repr(value[: max(budget[0], 0) + 1]))  # type: ignore[index]
    elif getattr(value, "shape", None) is not None and getattr(value, "dtype", None) is not None:
        emit(f"array(dtype={value.dtype}, shape={tuple(value.shape)})")  # type: ignore[attr-defined]
    else:
        emit(repr(value))
