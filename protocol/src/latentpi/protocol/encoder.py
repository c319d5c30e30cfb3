"""msgpack-numpy encoding, byte-for-byte what `openpi_client.msgpack_numpy.packb` writes.

The encoder walks the object into a list of parts: small msgpack headers and the arrays
themselves. `packb` joins them once into a new bytes object (a C-contiguous array's bytes are
copied exactly once); `FramePacker` copies them into one reused buffer (every array copied once,
non-contiguous ones straight from their strides, and no allocation once the buffer is big enough).
The type checks follow msgpack's Packer in order, so e.g. np.float64 (a float subclass) travels as a
plain float, as it does through openpi-client.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from latentpi.protocol.dtypes import (
    BFLOAT16,
    BFLOAT16_CARRIER,
    BFLOAT16_NAME,
    EXT_DTYPE_KEY,
    check_encodable,
)
from latentpi.protocol.errors import ProtocolError
from latentpi.protocol.limits import DEFAULT_LIMITS, Limits

_MAX_LEN = 0xFFFFFFFF  # msgpack's 32-bit length fields


def packb(obj: Any, *, limits: Limits | None = None) -> bytes:
    """Encode `obj` (None, bool, int, float, str, bytes, list/tuple, dict with str/bytes keys,
    numpy arrays and scalars, bfloat16 included) as one msgpack-numpy frame.

    Raises ProtocolError naming the offending path for anything the decoder would refuse.
    """
    return b"".join([_as_buffer(part) for part in _parts(obj, limits)])


class FramePacker:
    """Encodes frames into one buffer that it reuses: after the first large frame, encoding costs
    one copy of each array into memory that is already mapped (no page faults, no allocation).

    The memoryview `pack` returns is valid until the next `pack` call; send it (websockets accepts
    memoryviews) before packing again. Not thread-safe: one packer per connection or thread.
    """

    def __init__(self, *, limits: Limits | None = None) -> None:
        self._limits = limits
        self._buffer = bytearray()

    def pack(self, obj: Any) -> memoryview:
        chunks = _coalesce(_parts(obj, self._limits))
        total = sum(_nbytes(chunk) for chunk in chunks)
        if total > len(self._buffer):
            self._buffer = bytearray(total)  # a view of the old buffer keeps it alive
        view = memoryview(self._buffer)
        pos = 0
        for chunk in chunks:
            size = _nbytes(chunk)
            if isinstance(chunk, np.ndarray):
                target = np.frombuffer(view[pos : pos + size], dtype=chunk.dtype)
                np.copyto(target.reshape(chunk.shape), chunk, casting="no")
            else:
                view[pos : pos + size] = chunk
            pos += size
        return view[:total]


def _coalesce(parts: list[Any]) -> list[Any]:
    """Runs of small parts (headers, short strings) joined, so the copy loop sees few chunks."""
    chunks: list[Any] = []
    run: list[Any] = []
    for part in parts:
        if isinstance(part, np.ndarray) or len(part) >= _SMALL:
            if run:
                chunks.append(b"".join(run))
                run = []
            chunks.append(part)
        else:
            run.append(part)
    if run:
        chunks.append(b"".join(run))
    return chunks


_SMALL = 1 << 12


def _parts(obj: Any, limits: Limits | None) -> list[Any]:
    parts: list[Any] = []
    _Encoder(parts, (limits or DEFAULT_LIMITS).max_depth).pack(obj, 0, "$")
    return parts


def _nbytes(part: Any) -> int:
    return part.nbytes if isinstance(part, np.ndarray | memoryview) else len(part)


def _as_buffer(part: Any) -> Any:
    """A part as something bytes.join takes: arrays as flat byte views, made C-contiguous."""
    if not isinstance(part, np.ndarray):
        return part
    return memoryview(np.ascontiguousarray(part).reshape(-1).view(np.uint8))


class _Encoder:
    __slots__ = ("max_depth", "parts")

    def __init__(self, parts: list[Any], max_depth: int) -> None:
        self.parts = parts
        self.max_depth = max_depth

    def pack(self, obj: Any, depth: int, path: str) -> None:
        out = self.parts.append
        if obj is None:
            out(b"\xc0")
        elif obj is True:
            out(b"\xc3")
        elif obj is False:
            out(b"\xc2")
        elif isinstance(obj, int):
            out(_int(obj, path))
        elif isinstance(obj, bytes | bytearray | memoryview):
            self.bin(obj, path)
        elif isinstance(obj, str):
            data = obj.encode("utf-8")
            out(_str_header(len(data), path))
            out(data)
        elif isinstance(obj, float):
            out(_F64.pack(0xCB, obj))
        elif isinstance(obj, list | tuple):
            self.enter(depth, path)
            out(_array_header(len(obj), path))
            for i, item in enumerate(obj):
                self.pack(item, depth + 1, f"{path}[{i}]")
        elif isinstance(obj, dict):
            self.enter(depth, path)
            out(_map_header(len(obj), path))
            for key, value in obj.items():
                if not isinstance(key, str | bytes):
                    raise ProtocolError(
                        f"{path}: map keys must be str or bytes, received {type(key).__name__} {key!r:.40}"
                    )
                self.pack(key, depth + 1, path)
                self.pack(value, depth + 1, f"{path}[{key!r:.40}]")
        elif isinstance(obj, np.ndarray):
            self.enter(depth + 1, path)  # two levels on the wire: the array map and its shape list
            self.ndarray(obj, path)
        elif isinstance(obj, np.generic):
            self.enter(depth, path)
            self.npgeneric(obj, path)
        else:
            raise ProtocolError(f"{path}: cannot encode an object of type {type(obj).__name__}")

    def enter(self, depth: int, path: str) -> None:
        if depth >= self.max_depth:
            raise ProtocolError(f"{path}: nesting deeper than the limit of {self.max_depth}")

    def bin(self, data: bytes | bytearray | memoryview, path: str) -> None:
        if isinstance(data, memoryview) and not data.c_contiguous:
            raise ProtocolError(f"{path}: a memoryview must be C-contiguous to be sent")
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        self.parts.append(_bin_header(size, path))
        if isinstance(data, memoryview) and size and (data.format != "B" or data.ndim != 1):
            data = data.cast("B")  # flat bytes, so FramePacker can slice-assign it
        if size:
            self.parts.append(data)

    def ndarray(self, array: np.ndarray, path: str) -> None:
        ext = array.dtype == BFLOAT16
        if ext:
            array = array.view(np.uint16).astype(BFLOAT16_CARRIER, copy=False)
        else:
            _check_dtype(array.dtype, path)
        out = self.parts.append
        out(_ND_HEAD_EXT if ext else _ND_HEAD)
        out(_bin_header(array.nbytes, path))
        out(array)  # copied in C order by packb / FramePacker
        out(_DTYPE_KEY)
        self.pack(array.dtype.str, 0, path)
        out(_SHAPE_KEY)
        out(_array_header(array.ndim, path))
        for dim in array.shape:
            out(_int(dim, path))
        if ext:
            out(_EXT_ENTRY)

    def npgeneric(self, scalar: np.generic, path: str) -> None:
        out = self.parts.append
        if scalar.dtype == BFLOAT16:
            out(_NPGENERIC_HEAD_EXT)
            self.pack(int(scalar.view(np.uint16)), 0, path)
            out(_DTYPE_KEY)
            self.pack(BFLOAT16_CARRIER.str, 0, path)
            out(_EXT_ENTRY)
            return
        _check_dtype(scalar.dtype, path)
        out(_NPGENERIC_HEAD)
        self.pack(scalar.item(), 0, path)
        out(_DTYPE_KEY)
        self.pack(scalar.dtype.str, 0, path)


def _check_dtype(dtype: np.dtype, path: str) -> None:
    try:
        check_encodable(dtype)
    except ProtocolError as error:
        raise ProtocolError(f"{path}: {error}") from None


_U8 = struct.Struct(">BB")
_U16 = struct.Struct(">BH")
_U32 = struct.Struct(">BI")
_U64 = struct.Struct(">BQ")
_I8 = struct.Struct(">Bb")
_I16 = struct.Struct(">Bh")
_I32 = struct.Struct(">Bi")
_I64 = struct.Struct(">Bq")
_F64 = struct.Struct(">Bd")
_FIXINTS = [bytes([i]) for i in range(128)]


def _int(value: int, path: str) -> bytes:
    """msgpack's shortest form, as msgpack-python chooses it (unsigned forms for non-negatives)."""
    if 0 <= value < 0x80:
        return _FIXINTS[value]
    if -0x20 <= value < 0:
        return struct.pack("b", value)
    if value > 0:
        if value <= 0xFF:
            return _U8.pack(0xCC, value)
        if value <= 0xFFFF:
            return _U16.pack(0xCD, value)
        if value <= 0xFFFFFFFF:
            return _U32.pack(0xCE, value)
        if value <= 0xFFFFFFFFFFFFFFFF:
            return _U64.pack(0xCF, value)
    else:
        if value >= -0x80:
            return _I8.pack(0xD0, value)
        if value >= -0x8000:
            return _I16.pack(0xD1, value)
        if value >= -0x80000000:
            return _I32.pack(0xD2, value)
        if value >= -0x8000000000000000:
            return _I64.pack(0xD3, value)
    raise ProtocolError(f"{path}: integer {value} does not fit msgpack's 64 bits")


def _sized_header(
    size: int, path: str, what: str, fix: tuple[int, int] | None, codes: tuple[int, int, int]
) -> bytes:
    if size > _MAX_LEN:
        raise ProtocolError(f"{path}: {what} of {size} exceeds msgpack's 2**32 - 1")
    if fix is not None and size < fix[1]:
        return bytes([fix[0] | size])
    if codes[0] and size <= 0xFF:
        return _U8.pack(codes[0], size)
    if size <= 0xFFFF:
        return _U16.pack(codes[1], size)
    return _U32.pack(codes[2], size)


def _str_header(size: int, path: str) -> bytes:
    return _sized_header(size, path, "a str", (0xA0, 32), (0xD9, 0xDA, 0xDB))


def _bin_header(size: int, path: str) -> bytes:
    return _sized_header(size, path, "bytes", None, (0xC4, 0xC5, 0xC6))


def _array_header(size: int, path: str) -> bytes:
    return _sized_header(size, path, "a list", (0x90, 16), (0, 0xDC, 0xDD))


def _map_header(size: int, path: str) -> bytes:
    return _sized_header(size, path, "a map", (0x80, 16), (0, 0xDE, 0xDF))


def _key(name: bytes) -> bytes:
    return _bin_header(len(name), "") + name


# The fixed framing around an array's data and a scalar's value, in openpi-client's key order.
_DTYPE_KEY = _key(b"dtype")
_SHAPE_KEY = _key(b"shape")
_ND_HEAD = b"\x84" + _key(b"__ndarray__") + b"\xc3" + _key(b"data")
_ND_HEAD_EXT = b"\x85" + _ND_HEAD[1:]
_NPGENERIC_HEAD = b"\x83" + _key(b"__npgeneric__") + b"\xc3" + _key(b"data")
_NPGENERIC_HEAD_EXT = b"\x84" + _NPGENERIC_HEAD[1:]
_EXT_ENTRY = _key(EXT_DTYPE_KEY) + _str_header(len(BFLOAT16_NAME), "") + BFLOAT16_NAME.encode()
