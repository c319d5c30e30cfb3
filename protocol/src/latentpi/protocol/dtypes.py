"""Which dtypes travel on the wire, and the bfloat16 extension.

openpi-client's codec sends `dtype.str` (e.g. '<f4', '|u1', '>i8') and rejects kinds V, O and c on
encode. latentpi accepts bool, signed and unsigned integers of 1-8 bytes and float16/32/64, in either
byte order. Complex is rejected too (openpi-client cannot encode it, so it cannot round-trip), as are
strings, datetimes, objects and long doubles (platform-dependent width).

bfloat16 (ml_dtypes, kind 'V') travels as its raw 16-bit patterns: the array map carries dtype
'<u2' (native uint16 on a little-endian host) plus one extra entry `__ext_dtype__: "bfloat16"`.
openpi-client ignores the extra entry and decodes a uint16 array of the bit patterns; latentpi
restores a bfloat16 view. See docs/protocol.md.
"""

from __future__ import annotations

import functools
import re

import ml_dtypes
import numpy as np

from latentpi.protocol.errors import ProtocolError

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
BFLOAT16_NAME = "bfloat16"
BFLOAT16_CARRIER = np.dtype("<u2")  # the bit patterns, little-endian
EXT_DTYPE_KEY = b"__ext_dtype__"

_ITEMSIZES = {"b": (1,), "i": (1, 2, 4, 8), "u": (1, 2, 4, 8), "f": (2, 4, 8)}
_WIRE_DTYPE = re.compile(r"[<>|][biuf][1248]")
_WHY_NOT = {
    "c": "complex dtypes are not supported (openpi-client rejects kind 'c', so they cannot round-trip)",
    "O": "object arrays are never sent (they would need pickle)",
    "V": "void/structured dtypes are not supported (bfloat16 is, via the __ext_dtype__ extension)",
    "U": "string arrays are not supported; send a str or a list of str",
    "S": "bytes arrays are not supported; send bytes",
    "M": "datetime64 is not supported",
    "m": "timedelta64 is not supported",
}


def check_encodable(dtype: np.dtype) -> None:
    """Raise ProtocolError unless arrays of `dtype` may be sent (bfloat16 handled by the caller)."""
    if dtype.kind not in _ITEMSIZES or dtype.itemsize not in _ITEMSIZES[dtype.kind]:
        raise ProtocolError(f"dtype {dtype} ({dtype.str}): {_why_not(dtype)}")


def parse_wire_dtype(text: object) -> np.dtype:
    """The numpy dtype named by a frame's `dtype` entry, or ProtocolError."""
    if not isinstance(text, str):
        raise ProtocolError(
            f"array dtype: expected a str such as '<f4', received {type(text).__name__}"
        )
    return _parse(text)


@functools.lru_cache(maxsize=64)  # only valid names are cached (errors are not), so it stays small
def _parse(text: str) -> np.dtype:
    if _WIRE_DTYPE.fullmatch(text) is None:
        kind = text.lstrip("<>|=")[:1]
        if kind in _WHY_NOT:
            raise ProtocolError(f"array dtype {text[:40]!r}: {_WHY_NOT[kind]}")
        raise ProtocolError(
            f"array dtype: expected bool, int/uint of 1-8 bytes or float16/32/64 ('<f4', '|u1', ...), "
            f"received {text[:40]!r}"
        )
    try:
        dtype = np.dtype(text)
    except TypeError:  # the pattern admits e.g. '<b4' and '<f1', which numpy does not know
        raise ProtocolError(
            f"array dtype: expected bool ('|b1'), int/uint of 1-8 bytes or float16/32/64, "
            f"received {text!r}"
        ) from None
    check_encodable(dtype)
    return dtype


def _why_not(dtype: np.dtype) -> str:
    if dtype.kind in _WHY_NOT:
        return _WHY_NOT[dtype.kind]
    return f"itemsize {dtype.itemsize} is not supported for kind '{dtype.kind}'"
