"""Property tests of the codec: any bytes decode to a value or raise `ProtocolError`, never another
exception; valid values round-trip; mutated valid frames, huge declared lengths and shapes and deep
nesting are refused without allocating what they claim (tracemalloc peak bounded by the frame's own
size), and every limit holds for whatever decodes.

Settings: wire_strategies.profile (derandomized in CI; LATENTPI_FUZZ_EXAMPLES for a long run).
"""

from __future__ import annotations

import contextlib
import re
import struct
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from wire_strategies import (
    FIXED_OVERHEAD_BYTES,
    WIRE_DTYPES,
    bounded_by_frame,
    peak_memory,
    profile,
    shapes,
    texts,
    wire_values,
)

from latentpi.protocol.codec import FramePacker, Limits, ProtocolError, packb, unpackb
from latentpi.protocol.dtypes import parse_wire_dtype


def decode_bounded(frame: bytes, limits: Limits | None = None) -> Any:
    """unpackb(frame): the value, or None after a ProtocolError; any other exception fails the
    test, and so does a peak allocation beyond what the frame's own bytes can justify."""
    result = None
    with peak_memory() as peak, contextlib.suppress(ProtocolError):
        result = unpackb(frame, limits=limits)
    assert peak() <= bounded_by_frame(len(frame)), f"{peak()} bytes for {len(frame)}"
    return result


def assert_same(decoded: Any, sent: Any) -> None:
    """Deep equality of a decoded value and what was sent (tuples arrive as lists; arrays and
    numpy scalars keep dtype, shape and bytes)."""
    if type(sent) is np.float64:  # a float subclass: travels as a plain float, as in openpi
        sent = float(sent)
    if isinstance(sent, np.ndarray | np.generic):
        assert type(decoded) is type(sent) and decoded.dtype == sent.dtype
        assert np.shape(decoded) == np.shape(sent)
        assert np.asarray(decoded).tobytes() == np.asarray(sent).tobytes()
    elif isinstance(sent, list | tuple):
        assert isinstance(decoded, list) and len(decoded) == len(sent)
        for d, s in zip(decoded, sent, strict=True):
            assert_same(d, s)
    elif isinstance(sent, dict):
        assert isinstance(decoded, dict) and list(decoded) == list(sent)
        for key in sent:
            assert_same(decoded[key], sent[key])
    elif isinstance(sent, float) and sent != sent:
        assert decoded != decoded  # NaN
    else:
        assert decoded == sent and type(decoded) is type(sent)


# -- round trips ------------------------------------------------------------------------------------
strided = (
    st.sampled_from(WIRE_DTYPES)
    .flatmap(
        lambda d: hnp.arrays(np.dtype(d), hnp.array_shapes(min_dims=2, max_dims=3, max_side=5))
    )
    .map(lambda a: a.T)
)  # non-contiguous: sent in C order
bf16 = hnp.arrays(np.uint16, shapes).map(lambda a: a.view(ml_dtypes.bfloat16))
sendable = st.recursive(
    wire_values | strided | bf16,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=16,
)


@profile(200)
@given(sendable)
def test_valid_values_round_trip_and_both_packers_agree(value: Any) -> None:
    frame = packb(value)
    assert bytes(FramePacker().pack(value)) == frame
    assert_same(decode_bounded(frame), value)


# -- any bytes ------------------------------------------------------------------------------------
@profile(300)
@given(st.binary(max_size=512))
def test_random_bytes_decode_or_raise_protocol_error(frame: bytes) -> None:
    decode_bounded(frame)


TYPE_BYTES = [*range(0xC0, 0xE0), 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0x00, 0x7F, 0xE0, 0xFF]
LENGTHS = st.sampled_from([0, 1, 2, 4, 255, 256, 65535, 2**16, 2**31 - 1, 2**32 - 1]) | st.integers(
    0, 2**32 - 1
)


@st.composite
def msgpack_tokens(draw: st.DrawFn) -> bytes:
    """A msgpack type byte with length / value fields of every width: random bytes rarely get past
    the first byte, these reach every branch of the decoder with lengths up to 2**32 - 1."""
    code = draw(st.sampled_from(TYPE_BYTES))
    widths = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4, 0xDC: 2, 0xDD: 4, 0xDE: 2}
    widths |= {0xDF: 4, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
    widths |= {0xCA: 4, 0xCB: 8, 0xC7: 1, 0xC8: 2, 0xC9: 4}
    width = widths.get(code, 0)
    field = draw(LENGTHS) % (1 << (8 * width)) if width else 0
    payload = draw(st.binary(max_size=8) | st.sampled_from([b"", b"\xc3", b"\x90", b"\x80"]))
    return bytes([code]) + (field.to_bytes(width, "big") if width else b"") + payload


@profile(400)
@given(st.lists(msgpack_tokens(), min_size=1, max_size=24).map(b"".join))
def test_token_soup_decodes_or_raises_protocol_error_without_allocating_claims(
    frame: bytes,
) -> None:
    decode_bounded(frame)


# -- mutated valid frames -------------------------------------------------------------------------
@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    """A valid frame, then truncated, bit-flipped, overwritten, cut out, spliced or repeated."""
    frame = bytearray(packb(draw(sendable)))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["truncate", "flip", "byte", "delete", "insert", "repeat"]))
        index = draw(st.integers(0, max(len(frame) - 1, 0)))
        if kind == "truncate":
            del frame[index:]
        elif kind == "flip" and frame:
            frame[index] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte" and frame:
            frame[index] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xC1, 0xCF, 0xDD, 0xDF, 0xFF]))
        elif kind == "delete":
            del frame[index : index + draw(st.integers(1, 8))]
        elif kind == "insert":
            frame[index:index] = draw(st.binary(min_size=1, max_size=8))
        else:
            frame[index:index] = frame[index : index + draw(st.integers(1, 16))]
    return bytes(frame) or b"\xc1"


@profile(300)
@given(mutated_frames())
def test_mutated_valid_frames_decode_or_raise_protocol_error(frame: bytes) -> None:
    decoded = decode_bounded(frame)
    if decoded is not None:
        assert_same(unpackb(packb(decoded)), decoded)  # whatever decodes can be sent on


# -- dtypes ----------------------------------------------------------------------------------------
ITEMSIZES = {"b": {1}, "i": {1, 2, 4, 8}, "u": {1, 2, 4, 8}, "f": {2, 4, 8}}


@profile(300)
@given(st.from_regex(r"[<>|=]?[a-zA-Z][0-9]{0,2}", fullmatch=True) | st.text(max_size=8))
def test_any_dtype_text_is_a_supported_dtype_or_a_protocol_error(text: str) -> None:
    try:
        dtype = parse_wire_dtype(text)
    except ProtocolError:
        return
    assert dtype.itemsize in ITEMSIZES.get(dtype.kind, set()), dtype


@pytest.mark.parametrize("text", ["<b4", "|b2", ">b8", "<f1", "|f1"])
def test_dtype_texts_numpy_does_not_know_are_protocol_errors(text: str) -> None:
    """Was: the pattern [<>|][biuf][1248] admitted them and numpy raised TypeError ("data type
    '<b4' not understood"): an internal error on the server (found by bench/fuzz_server.py)."""
    with pytest.raises(ProtocolError, match="array dtype: expected bool"):
        parse_wire_dtype(text)
    frame = packb(np.zeros(2, np.uint8)).replace(b"\xa3|u1", b"\xa3" + text.encode())
    with pytest.raises(ProtocolError, match="array dtype: expected bool"):
        unpackb(frame)


# -- declared sizes that would allocate terabytes -------------------------------------------------
def bkey(name: bytes) -> bytes:
    return bytes([0xC4, len(name)]) + name


def array_map(data: bytes, dtype: str, shape: list[int], fast_layout: bool) -> bytes:
    """An array map that may lie: openpi's exact layout (the decoder's fast path) or bin32 and
    array16/uint64 fields (the general path)."""
    if fast_layout:
        dims = b"".join(b"\xcf" + struct.pack(">Q", d) for d in shape)
        head = (
            bytes([0x90 | len(shape)])
            if len(shape) < 16
            else b"\xdc" + struct.pack(">H", len(shape))
        )
        return (
            b"\x84" + bkey(b"__ndarray__") + b"\xc3" + bkey(b"data")
            + bytes([0xC4, len(data)]) + data + bkey(b"dtype")
            + bytes([0xA0 | len(dtype)]) + dtype.encode() + bkey(b"shape") + head + dims
        )  # fmt: skip
    dims = b"".join(b"\xcf" + struct.pack(">Q", d) for d in shape)
    return (
        b"\x84" + bkey(b"__ndarray__") + b"\xc3" + bkey(b"data")
        + b"\xc6" + struct.pack(">I", len(data)) + data + bkey(b"dtype")
        + bytes([0xA0 | len(dtype)]) + dtype.encode()
        + bkey(b"shape") + b"\xdc" + struct.pack(">H", len(shape)) + dims
    )  # fmt: skip


huge_dims = st.lists(
    st.integers(0, 2**64 - 1) | st.sampled_from([2**20, 2**32, 2**40, 2**63, 2**64 - 1]),
    min_size=1,
    max_size=40,
)


@profile(300)
@given(
    st.binary(max_size=64),
    st.sampled_from([*WIRE_DTYPES, "<c16", "|O", "<U8", "|V2", "<M8"]),
    huge_dims,
    st.booleans(),
    st.booleans(),
)
def test_declared_shapes_are_checked_before_anything_is_allocated(
    data: bytes, dtype: str, shape: list[int], fast_layout: bool, nested: bool
) -> None:
    """Shapes of up to 2**64 - 1 per axis and 40 axes, in either layout, alone or inside a request:
    refused (or decoded when shape, dtype and bytes agree), peak memory a few KB whatever the
    shape claims."""
    frame = array_map(data, dtype, shape, fast_layout)
    if nested:
        frame = b"\x82" + bytes([0xA5]) + b"image" + frame + b"\xa6prompt\xa4pick"
    with peak_memory() as peak, contextlib.suppress(ProtocolError):
        unpackb(frame)
    assert peak() <= FIXED_OVERHEAD_BYTES


@profile(200)
@given(
    st.sampled_from([0xC6, 0xDB, 0xDD, 0xDF]), st.integers(2**16, 2**32 - 1), st.binary(max_size=32)
)
def test_declared_lengths_are_checked_against_the_bytes_present(
    code: int, length: int, tail: bytes
) -> None:
    """bin32 / str32 / array32 / map32 claiming up to 4 GiB with a few bytes behind them."""
    frame = bytes([code]) + struct.pack(">I", length) + tail
    with peak_memory() as peak, pytest.raises(ProtocolError):
        unpackb(frame)
    assert peak() <= FIXED_OVERHEAD_BYTES


# -- nesting and limits -----------------------------------------------------------------------------
def nest(containers: int, kinds: list[str], innermost: Any) -> Any:
    value = innermost
    for level in range(containers):
        value = [value] if kinds[level % len(kinds)] == "list" else {"k": value}
    return value


INNERMOST_LEVELS = ((0, 0), ("s", 0), (np.zeros(2, np.float32), 2), (np.float32(1), 1))


@profile(200)
@given(
    st.integers(1, 100),
    st.integers(-2, 2),
    st.lists(st.sampled_from(["list", "map"]), min_size=1, max_size=3),
    st.sampled_from(INNERMOST_LEVELS),
)
def test_nesting_encodes_and_decodes_exactly_up_to_the_depth_limit(
    limit: int, around: int, kinds: list[str], innermost: tuple[Any, int]
) -> None:
    """Wire nesting: each list or map is one level, an array two (its map and its shape list), a
    numpy scalar one (its map). Encoder and decoder agree on it, at the limit and around it."""
    containers = max(0, limit + around - innermost[1])
    value = nest(containers, kinds, innermost[0])
    levels = containers + innermost[1]
    frame = packb(value, limits=Limits(max_depth=1000))
    decoded = decode_bounded(frame, Limits(max_depth=limit))
    assert (decoded is not None) == (levels <= limit)
    packed = contextlib.suppress(ProtocolError)
    with packed:
        packb(value, limits=Limits(max_depth=limit))
        assert levels <= limit, "packb sent what unpackb refuses"
    if levels <= limit:
        assert packb(value, limits=Limits(max_depth=limit)) == frame


def measure(value: Any, depth: int = 0) -> dict[str, int]:
    """What a decoded value holds, in the terms of Limits."""
    out = {"depth": depth, "container": 0, "str": 0, "bin": 0, "elements": 0, "total": 0, "ndim": 0}

    def merge(other: dict[str, int]) -> None:
        for key, amount in other.items():
            out[key] = out[key] + amount if key == "total" else max(out[key], amount)

    if isinstance(value, np.ndarray):
        out.update(depth=depth + 2, elements=value.size, total=value.size, ndim=value.ndim)
        out["bin"] = value.nbytes  # an array's data travels as one bin
    elif isinstance(value, list | dict):
        out.update(depth=depth + 1, container=len(value))
        items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        for item in items:
            merge(measure(item, depth + 1))
    elif isinstance(value, str):
        out["str"] = len(value.encode())
    elif isinstance(value, bytes):
        out["bin"] = len(value)
    return out


@profile(300)
@given(
    sendable,
    st.builds(
        Limits,
        max_array_elements=st.integers(1, 40),
        max_total_elements=st.integers(1, 80),
        max_ndim=st.integers(1, 4),
        max_depth=st.integers(1, 5),
        max_str_bytes=st.integers(1, 30),
        max_bin_bytes=st.integers(1, 300),
        max_container_len=st.integers(1, 5),
    ),
)
def test_whatever_decodes_is_within_every_limit(value: Any, limits: Limits) -> None:
    decoded = decode_bounded(packb(value), limits)
    if decoded is None:
        return
    held = measure(decoded)
    assert held["depth"] <= limits.max_depth
    assert held["container"] <= limits.max_container_len
    assert held["str"] <= limits.max_str_bytes
    assert held["bin"] <= limits.max_bin_bytes
    assert held["elements"] <= limits.max_array_elements
    assert held["total"] <= limits.max_total_elements
    assert held["ndim"] <= limits.max_ndim


# -- regressions ------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["map key", "array shape", "scalar data", "ext dtype"])
def test_an_error_about_a_value_of_many_arrays_costs_less_memory_than_the_frame(
    where: str,
) -> None:
    """Was: `{value!r:.40}` formats the whole value (numpy's repr of every array: a string several
    times the frame's size and seconds of CPU) to show 40 characters of it."""
    arrays = [np.linspace(0, 1, 1000) for _ in range(200)]
    bad = packb(arrays)
    frame = {
        "map key": b"\x81" + bad + b"\x00",
        "array shape": b"\x84" + bkey(b"__ndarray__") + b"\xc3" + bkey(b"data") + b"\xc4\x00"
        + bkey(b"dtype") + b"\xa3<f8" + bkey(b"shape") + bad,
        "scalar data": b"\x83" + bkey(b"__npgeneric__") + b"\xc3" + bkey(b"data") + bad
        + bkey(b"dtype") + b"\xa3<f8",
        "ext dtype": b"\x85" + packb(np.zeros(1, np.uint16))[1:] + bkey(b"__ext_dtype__") + bad,
    }[where]  # fmt: skip
    with peak_memory() as peak, pytest.raises(ProtocolError) as error:
        unpackb(frame)
    assert len(str(error.value)) < 300
    assert peak() < len(frame) // 10, f"{peak()} bytes for a {len(frame)}-byte frame"


@pytest.mark.parametrize(
    ("frame", "limits", "message"),
    [
        (b"\xa5hello", Limits(max_str_bytes=4), "a str of length 5 at offset 1 exceeds the limit of 4"),
        (array_map(b"", "|u1", [0, 2**63], fast_layout=True), Limits(),
         "dimension 9223372036854775808 in shape [0, 9223372036854775808] exceeds the limit"),
        (array_map(b"", "<f4", [2**40, 0], fast_layout=False), Limits(),
         "dimension 1099511627776 in shape [1099511627776, 0] exceeds the limit"),
    ],
    ids=["fixstr over max_str_bytes", "zero-size shape with a dim over int64", "dim over the limit"],
)  # fmt: skip
def test_limits_hold_for_short_forms_and_zero_size_shapes(
    frame: bytes, limits: Limits, message: str
) -> None:
    """Was: a fixstr (up to 31 bytes) skipped max_str_bytes; a shape whose product is 0 passed
    every count check and numpy raised ValueError ("Maximum allowed dimension exceeded")."""
    with pytest.raises(ProtocolError, match=re.escape(message)):
        unpackb(frame, limits=limits)


def test_packb_refuses_an_array_nested_past_what_unpackb_accepts() -> None:
    """Was: packb counted an array as one level, unpackb as two (its map and its shape list)."""
    frame = packb([np.zeros(1)], limits=Limits(max_depth=3))
    assert unpackb(frame, limits=Limits(max_depth=3))[0].shape == (1,)
    with pytest.raises(ProtocolError, match="nesting deeper than the limit of 2"):
        packb([np.zeros(1)], limits=Limits(max_depth=2))
    with pytest.raises(ProtocolError, match="nesting deeper than the limit of 2"):
        unpackb(frame, limits=Limits(max_depth=2))
