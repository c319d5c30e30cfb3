"""msgpack-numpy decoding that returns arrays as read-only views into the frame.

A small msgpack walker instead of msgpack.unpackb: msgpack copies every bin into a new bytes object,
while here an array map's `data` stays a slice of the frame and becomes a numpy view without a copy.
Everything else decodes as msgpack-python would (raw=False, strict_map_key=True, lists for arrays),
and every map with a `__ndarray__` / `__npgeneric__` key becomes an array / numpy scalar, as in
`openpi_client.msgpack_numpy.unpackb`. Each length a frame claims is checked against the limits and
the bytes left before anything is built, so a malformed frame costs at most its own size.
"""

from __future__ import annotations

import struct
import sys
from typing import Any

import numpy as np

from latentpi.protocol.dtypes import (
    BFLOAT16,
    BFLOAT16_CARRIER,
    BFLOAT16_NAME,
    EXT_DTYPE_KEY,
    parse_wire_dtype,
)
from latentpi.protocol.errors import ProtocolError, short_repr
from latentpi.protocol.limits import DEFAULT_LIMITS, Limits

_ND_KEY = b"__ndarray__"
_NPGENERIC_KEY = b"__npgeneric__"
_DATA_KEY = b"data"
_LITTLE_ENDIAN_HOST = sys.byteorder == "little"


def unpackb(data: bytes | bytearray | memoryview, *, limits: Limits | None = None) -> Any:
    """Decode one frame. Arrays are read-only views into `data` (keep `data` unchanged while they
    live); anything malformed raises ProtocolError."""
    limits = limits or DEFAULT_LIMITS
    try:
        view = memoryview(data)
    except TypeError:
        raise ProtocolError(
            f"frame: expected bytes, bytearray or memoryview, received {type(data).__name__}"
        ) from None
    if not view.c_contiguous:
        raise ProtocolError("frame: expected a contiguous buffer")
    if view.nbytes == 0:
        raise ProtocolError("frame: empty")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    if view.nbytes > limits.max_frame_bytes:
        raise ProtocolError(
            f"frame: {view.nbytes} bytes exceeds the limit of {limits.max_frame_bytes}"
        )
    decoder = _Decoder(view, limits)
    obj = decoder.value(0)
    if decoder.pos != view.nbytes:
        raise ProtocolError(
            f"frame: {view.nbytes - decoder.pos} trailing bytes after the message at offset {decoder.pos}"
        )
    return obj


class _Decoder:
    __slots__ = ("buf", "end", "limits", "max_objects", "objects", "pos", "total_elements")

    def __init__(self, buf: memoryview, limits: Limits) -> None:
        self.buf = buf
        self.end = buf.nbytes
        self.pos = 0
        self.limits = limits
        self.max_objects = limits.max_objects
        self.objects = 0
        self.total_elements = 0

    # -- primitives -----------------------------------------------------------------------------
    def take(self, size: int, what: str) -> int:
        """Advance over `size` bytes and return where they start."""
        start = self.pos
        if size > self.end - start:
            raise ProtocolError(
                f"truncated frame: {what} needs {size} bytes at offset {start}, {self.end - start} left"
            )
        self.pos = start + size
        return start

    def unpack(self, fmt: struct.Struct, what: str) -> Any:
        return fmt.unpack_from(self.buf, self.take(fmt.size, what))[0]

    def length(self, code: int, what: str, limit: int, min_item_bytes: int) -> int:
        """A str/bin/array/map length from a 1, 2 or 4-byte field, bounded by `limit` and by what
        the rest of the frame could hold."""
        size = self.unpack(_LENGTHS[code], what)
        if size > limit:
            raise ProtocolError(
                f"{what} of length {size} at offset {self.pos} exceeds the limit of {limit}"
            )
        if size * min_item_bytes > self.end - self.pos:
            raise ProtocolError(
                f"truncated frame: {what} of length {size} at offset {self.pos} cannot fit in the {self.end - self.pos} bytes left"
            )
        return size

    # -- values ---------------------------------------------------------------------------------
    def value(self, depth: int, raw_bin: bool = False) -> Any:
        """One msgpack value; bin stays a memoryview slice when `raw_bin` (an array's data).

        The common one-byte-header cases are inlined: this is the decoder's hot loop."""
        self.objects += 1
        if self.objects > self.max_objects:
            raise ProtocolError(f"frame: more than {self.max_objects} values")
        pos = self.pos
        if pos >= self.end:
            raise ProtocolError(f"truncated frame: a value expected at offset {pos}, 0 bytes left")
        code = self.buf[pos]
        self.pos = pos + 1
        if code <= 0x7F:
            return code
        if code >= 0xE0:
            return code - 0x100
        kind = code & 0xF0
        if kind == 0xA0 or kind == 0xB0:
            return self.text(code & 0x1F)
        if kind == 0x80:
            return self.map(code & 0x0F, depth)
        if kind == 0x90:
            return self.array(code & 0x0F, depth)
        if code == 0xC4:  # bin8: every key of an array map
            size = self.length(code, "a bin", self.limits.max_bin_bytes, 1)
            start = self.pos
            self.pos = start + size
            chunk = self.buf[start : start + size]
            return chunk if raw_bin else bytes(chunk)
        if code in _SCALARS:
            return self.unpack(_SCALARS[code], "a number")
        if code == 0xC0:
            return None
        if code == 0xC2:
            return False
        if code == 0xC3:
            return True
        if code in (0xD9, 0xDA, 0xDB):
            return self.text(self.length(code, "a str", self.limits.max_str_bytes, 1))
        if code in (0xC5, 0xC6):
            size = self.length(code, "a bin", self.limits.max_bin_bytes, 1)
            start = self.pos
            self.pos = start + size
            chunk = self.buf[start : start + size]
            return chunk if raw_bin else bytes(chunk)
        if code in (0xDC, 0xDD):
            return self.array(self.length(code, "a list", self.limits.max_container_len, 1), depth)
        if code in (0xDE, 0xDF):
            return self.map(self.length(code, "a map", self.limits.max_container_len, 2), depth)
        if code in _EXT_CODES:
            raise ProtocolError(
                f"msgpack ext type (byte 0x{code:02x}) at offset {pos} is not supported"
            )
        raise ProtocolError(f"invalid msgpack type byte 0x{code:02x} at offset {pos}")

    def text(self, size: int) -> str:
        if size > self.limits.max_str_bytes:  # str8+ lengths are checked already; fixstr is not
            raise ProtocolError(
                f"a str of length {size} at offset {self.pos} exceeds the limit of {self.limits.max_str_bytes}"
            )
        start = self.take(size, "a str")
        try:
            return str(self.buf[start : start + size], "utf-8")
        except UnicodeDecodeError as error:
            raise ProtocolError(
                f"str at offset {start} is not valid UTF-8 ({error.reason})"
            ) from None

    def enter(self, depth: int) -> int:
        if depth >= self.limits.max_depth:
            raise ProtocolError(
                f"nesting deeper than the limit of {self.limits.max_depth} at offset {self.pos}"
            )
        return depth + 1

    def array(self, size: int, depth: int) -> list[Any]:
        if size > self.limits.max_container_len:
            raise ProtocolError(
                f"a list of length {size} exceeds the limit of {self.limits.max_container_len}"
            )
        depth = self.enter(depth)
        return [self.value(depth) for _ in range(size)]

    def map(self, size: int, depth: int) -> Any:
        if size > self.limits.max_container_len:
            raise ProtocolError(
                f"a map of length {size} exceeds the limit of {self.limits.max_container_len}"
            )
        start = self.pos
        if size == 4 and self.buf[start - 1 : start - 1 + len(_ND_PREFIX)] == _ND_PREFIX:
            array = self.openpi_ndarray(start - 1, depth)
            if array is not None:
                return array
        depth = self.enter(depth)
        out: dict[Any, Any] = {}
        for _ in range(size):
            key = self.value(depth)
            if not isinstance(key, str | bytes):
                raise ProtocolError(
                    f"map at offset {start}: keys must be str or bytes, received {type(key).__name__} {short_repr(key, 40)}"
                )
            out[key] = self.value(depth, raw_bin=key == _DATA_KEY)
        if _ND_KEY in out:
            return self.ndarray(out, start)
        if _NPGENERIC_KEY in out:
            return self.npgeneric(out, start)
        data = out.get(_DATA_KEY)
        if isinstance(data, memoryview):
            out[_DATA_KEY] = bytes(data)
        return out

    # -- numpy ----------------------------------------------------------------------------------
    def openpi_ndarray(self, header: int, depth: int) -> np.ndarray | None:
        """Fast path for the exact layout openpi-client and `packb` write (fixmap of __ndarray__,
        data, dtype as fixstr, shape as a fixarray of uints): a handful of struct reads instead of
        a dozen generic values. None when the bytes differ in any way; the general path then
        decodes (and reports) them."""
        buf, end = self.buf, self.end
        pos = header + len(_ND_PREFIX)
        if depth + 1 >= self.limits.max_depth or pos >= end or buf[pos] not in _BIN_LENGTHS:
            return None
        fmt = _BIN_LENGTHS[buf[pos]]
        if pos + 1 + fmt.size > end:
            return None
        size = fmt.unpack_from(buf, pos + 1)[0]
        pos += 1 + fmt.size
        if size > self.limits.max_bin_bytes or size > end - pos:
            return None
        data = buf[pos : pos + size]
        pos += size
        if buf[pos : pos + len(_DTYPE_KEY)] != _DTYPE_KEY:
            return None
        pos += len(_DTYPE_KEY)
        if pos >= end or buf[pos] & 0xE0 != 0xA0:
            return None
        text_end = pos + 1 + (buf[pos] & 0x1F)
        if text_end > end:
            return None
        dtype_text = bytes(buf[pos + 1 : text_end]).decode("latin-1")
        pos = text_end
        if buf[pos : pos + len(_SHAPE_KEY)] != _SHAPE_KEY:
            return None
        pos += len(_SHAPE_KEY)
        if pos >= end or buf[pos] & 0xF0 != 0x90:
            return None
        shape = []
        for _ in range(buf[pos] & 0x0F):
            pos += 1
            if pos >= end:
                return None
            code = buf[pos]
            if code <= 0x7F:
                shape.append(code)
            elif code in _UINTS and pos + _UINTS[code].size < end:
                shape.append(_UINTS[code].unpack_from(buf, pos + 1)[0])
                pos += _UINTS[code].size
            else:
                return None
        self.pos = pos + 1
        self.objects += 9 + len(shape)
        if self.objects > self.max_objects:
            raise ProtocolError(f"frame: more than {self.max_objects} values")
        where = f"array at offset {header}"
        return self.make_array(data, _dtype(dtype_text, where), shape, None, where)

    def ndarray(self, fields: dict[Any, Any], offset: int) -> np.ndarray:
        where = f"array at offset {offset}"
        data = fields.get(_DATA_KEY)
        if not isinstance(data, memoryview):
            raise ProtocolError(f"{where}: 'data' must be bin, received {type(data).__name__}")
        dtype = _dtype(fields.get(b"dtype"), where)
        shape = fields.get(b"shape")
        if not isinstance(shape, list) or not all(type(d) is int for d in shape):
            raise ProtocolError(
                f"{where}: 'shape' must be a list of ints, received {short_repr(shape, 80)}"
            )
        return self.make_array(data, dtype, shape, fields.get(EXT_DTYPE_KEY), where)

    def make_array(
        self, data: memoryview, dtype: np.dtype, shape: list[int], ext: object, where: str
    ) -> np.ndarray:
        """A read-only view of `data`, once shape, limits and length agree."""
        if len(shape) > self.limits.max_ndim:
            raise ProtocolError(
                f"{where}: {len(shape)} dimensions exceeds the limit of {self.limits.max_ndim}"
            )
        count = 1
        for dim in shape:
            if dim < 0:
                raise ProtocolError(f"{where}: negative dimension in shape {shape}")
            count *= dim
        if count > self.limits.max_array_elements:
            raise ProtocolError(
                f"{where}: shape {shape} has {count} elements, over the limit of {self.limits.max_array_elements}"
            )
        if count == 0 and max(shape, default=0) > self.limits.max_array_elements:
            # numpy refuses a dimension over 2**63 - 1 even when another is 0 (ValueError)
            raise ProtocolError(
                f"{where}: dimension {max(shape)} in shape {shape} exceeds the limit of {self.limits.max_array_elements}"
            )
        self.total_elements += count
        if self.total_elements > self.limits.max_total_elements:
            raise ProtocolError(
                f"{where}: arrays hold more than {self.limits.max_total_elements} elements in total"
            )
        if count * dtype.itemsize != data.nbytes:
            raise ProtocolError(
                f"{where}: data has {data.nbytes} bytes but shape {shape} of dtype {dtype.str} needs {count * dtype.itemsize}"
            )
        array = np.ndarray(shape, dtype=dtype, buffer=data)
        array.flags.writeable = False
        if ext is not None:
            array = _as_bfloat16(array, ext, where)
        return array

    def npgeneric(self, fields: dict[Any, Any], offset: int) -> np.generic:
        where = f"numpy scalar at offset {offset}"
        dtype = _dtype(fields.get(b"dtype"), where)
        value = fields.get(_DATA_KEY)
        if isinstance(value, memoryview):
            value = bytes(value)
        if dtype.kind == "b":
            ok = isinstance(value, bool)
        elif dtype.kind in "iu":
            ok = type(value) is int and _int_range(dtype)[0] <= value <= _int_range(dtype)[1]
        else:
            ok = type(value) in (int, float)
        if not ok:
            raise ProtocolError(
                f"{where}: 'data' {short_repr(value, 40)} is not a valid {dtype} value"
            )
        scalar = dtype.type(value)
        if fields.get(EXT_DTYPE_KEY) is not None:
            scalar = _as_bfloat16(np.asarray(scalar), fields[EXT_DTYPE_KEY], where)[()]
        return scalar


def _dtype(text: object, where: str) -> np.dtype:
    try:
        return parse_wire_dtype(text)
    except ProtocolError as error:
        raise ProtocolError(f"{where}: {error}") from None


def _int_range(dtype: np.dtype) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def _as_bfloat16(bits: np.ndarray, name: object, where: str) -> np.ndarray:
    if name != BFLOAT16_NAME:
        raise ProtocolError(
            f"{where}: unsupported {EXT_DTYPE_KEY.decode()} {short_repr(name, 40)}; only {BFLOAT16_NAME!r} is defined"
        )
    if bits.dtype != BFLOAT16_CARRIER:
        raise ProtocolError(
            f"{where}: {BFLOAT16_NAME} must travel as dtype '<u2', received {bits.dtype.str}"
        )
    if not _LITTLE_ENDIAN_HOST:
        bits = bits.astype(np.uint16)  # byte-swapped copy on a big-endian host
    return bits.view(BFLOAT16)


_LENGTHS = {
    **dict.fromkeys((0xC4, 0xD9), struct.Struct(">B")),
    **dict.fromkeys((0xC5, 0xDA, 0xDC, 0xDE), struct.Struct(">H")),
    **dict.fromkeys((0xC6, 0xDB, 0xDD, 0xDF), struct.Struct(">I")),
}
_SCALARS = {
    0xCA: struct.Struct(">f"),
    0xCB: struct.Struct(">d"),
    0xCC: struct.Struct(">B"),
    0xCD: struct.Struct(">H"),
    0xCE: struct.Struct(">I"),
    0xCF: struct.Struct(">Q"),
    0xD0: struct.Struct(">b"),
    0xD1: struct.Struct(">h"),
    0xD2: struct.Struct(">i"),
    0xD3: struct.Struct(">q"),
}
_BIN_LENGTHS = {code: _LENGTHS[code] for code in (0xC4, 0xC5, 0xC6)}
_UINTS = {code: _SCALARS[code] for code in (0xCC, 0xCD, 0xCE, 0xCF)}
_ND_PREFIX = b"\x84\xc4\x0b__ndarray__\xc3\xc4\x04data"
_DTYPE_KEY = b"\xc4\x05dtype"
_SHAPE_KEY = b"\xc4\x05shape"
_EXT_CODES = frozenset((0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8))
