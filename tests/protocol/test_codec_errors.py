"""Malformed frames and unsendable objects: always ProtocolError, with a message naming the problem,
and never an allocation of what a frame merely claims."""

from __future__ import annotations

import contextlib
import datetime
import re
import struct
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from latentpi.protocol.codec import Limits, ProtocolError, packb, unpackb


def bkey(name: bytes) -> bytes:
    return bytes([0xC4, len(name)]) + name


def array_frame(
    data: bytes, dtype: str, shape: list[int], *, extra: bytes = b"", entries: int = 4
) -> bytes:
    """An openpi-style array map built by hand, so it can lie."""
    shape_part = (
        b"\xdc"
        + struct.pack(">H", len(shape))
        + b"".join(
            b"\xcf" + struct.pack(">Q", d) if d >= 0 else b"\xd3" + struct.pack(">q", d)
            for d in shape
        )
    )
    return (
        bytes([0x80 | entries])
        + bkey(b"__ndarray__")
        + b"\xc3"
        + bkey(b"data")
        + b"\xc6"
        + struct.pack(">I", len(data))
        + data
        + bkey(b"dtype")
        + bytes([0xA0 | len(dtype)])
        + dtype.encode()
        + bkey(b"shape")
        + shape_part
        + extra
    )


def test_hand_built_array_frame_is_valid() -> None:
    np.testing.assert_array_equal(unpackb(array_frame(b"\x01\x02", "|u1", [2])), [1, 2])


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b"", "empty"),
        (b"\xc1", "invalid msgpack type byte 0xc1"),
        (b"\x92\x01", "truncated"),
        (b"\xa5abc", "truncated"),
        (b"\xdd\xff\xff\xff\xff", "list of length 4294967295"),
        (b"\xdf\x00\x0f\xff\xff", "map of length 1048575"),
        (b"\xdb\x7f\xff\xff\xff", "str of length"),
        (b"\xc6\x7f\xff\xff\xff", "bin of length 2147483647 at offset 5 exceeds the limit"),
        (b"\xc6\x00\x00\x00\x10abc", "truncated"),
        (b"\x01\x02", "1 trailing bytes"),
        (b"\xa2\xff\xfe", "not valid UTF-8"),
        (b"\x81\x01\x02", "keys must be str or bytes, received int"),
        (b"\x81\x90\x02", "keys must be str or bytes, received list"),
        (b"\xd4\x01\x00", "ext type"),
        (b"\xc7\x01\x05\x00", "ext type"),
        (b"\x91" * 65 + b"\x00", "nesting deeper than the limit of 64"),
        (b"\x81\xa1a" * 70 + b"\x00", "nesting deeper"),
        (array_frame(b"\x00" * 8, "<f4", [3]), "data has 8 bytes but shape [3]"),
        (array_frame(b"\x00" * 4, "<f4", [10**6, 10**6]), "1000000000000 elements, over the limit"),
        (array_frame(b"", "<f4", [-1, 0]), "negative dimension"),
        (array_frame(b"", "<f4", [0] * 33), "33 dimensions"),
        (array_frame(b"\x00" * 8, "<c8", [1]), "complex dtypes are not supported"),
        (array_frame(b"\x00" * 8, "|O8", [1]), "object arrays are never sent"),
        (array_frame(b"\x00" * 2, "|V2", [1]), "void/structured dtypes are not supported"),
        (array_frame(b"\x00" * 16, "<f16", [1]), "array dtype"),
        (array_frame(b"\x00" * 4, "float32", [1]), "array dtype"),
        (array_frame(b"\x00" * 4, "<M8", [1]), "datetime64 is not supported"),
        (
            array_frame(
                b"\x00" * 4, "<f4", [1], extra=bkey(b"__ext_dtype__") + b"\xa8bfloat16", entries=5
            ),
            "must travel as dtype '<u2'",
        ),
        (
            array_frame(
                b"\x00" * 2, "<u2", [1], extra=bkey(b"__ext_dtype__") + b"\xa5fp8xx", entries=5
            ),
            "unsupported __ext_dtype__",
        ),
        (b"\x82" + bkey(b"__ndarray__") + b"\xc3" + bkey(b"data") + b"\xa1x", "'data' must be bin"),
        (
            b"\x83"
            + bkey(b"__npgeneric__")
            + b"\xc3"
            + bkey(b"data")
            + b"\xcd\x01\x00"
            + bkey(b"dtype")
            + b"\xa3|u1",
            "not a valid uint8",
        ),
        (
            b"\x83"
            + bkey(b"__npgeneric__")
            + b"\xc3"
            + bkey(b"data")
            + b"\xa1x"
            + bkey(b"dtype")
            + b"\xa3<f4",
            "not a valid float32",
        ),
    ],
)
def test_malformed_frames_raise_protocol_error(frame: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(message)):
        unpackb(frame)


def test_absurd_claims_are_rejected_fast_without_allocating() -> None:
    frames = [
        array_frame(b"\x00" * 4, "<f8", [10**12]),
        b"\xdd\xff\xff\xff\xff" + b"\x00" * 100,
        b"\xdf\xff\xff\xff\xff" + b"\x00" * 100,
        b"\xc6\xff\xff\xff\xff" + b"\x00" * 100,
        b"\xdb\xff\xff\xff\xff" + b"\x00" * 100,
    ]
    for frame in frames:
        tracemalloc.start()
        start = time.perf_counter()
        with pytest.raises(ProtocolError):
            unpackb(frame)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 1 << 20, (frame[:8], peak)
        assert elapsed < 0.1, (frame[:8], elapsed)


def test_every_truncation_of_a_valid_frame_raises_protocol_error() -> None:
    frame = packb(
        {
            "image": np.arange(24, dtype=np.uint8).reshape(2, 4, 3),
            "s": np.float32(1),
            "p": "prompt",
            "l": [1, 2.5, None],
        }
    )
    for cut in range(len(frame)):
        with pytest.raises(ProtocolError):
            unpackb(frame[:cut])


def test_limits_are_configurable() -> None:
    frame = packb(
        {
            "a": np.zeros(100, np.float32),
            "b": np.zeros(100, np.float32),
            "c": np.zeros((2, 2)),
            "s": "x" * 50,
            "l": [[[1]]],
        }
    )
    unpackb(frame)
    cases = [
        (Limits(max_frame_bytes=100), "exceeds the limit of 100"),
        (Limits(max_array_elements=99), "over the limit of 99"),
        (Limits(max_total_elements=150), "more than 150 elements in total"),
        (Limits(max_str_bytes=49), "exceeds the limit of 49"),
        (Limits(max_bin_bytes=399), "exceeds the limit of 399"),
        (Limits(max_container_len=3), "exceeds the limit of 3"),
        (Limits(max_depth=3), "nesting deeper than the limit of 3"),
        (Limits(max_objects=10), "more than 10 values"),
        (Limits(max_ndim=1), "2 dimensions exceeds the limit of 1"),
    ]
    for limits, message in cases:
        with pytest.raises(ProtocolError, match=message):
            unpackb(frame, limits=limits)


def test_limits_reject_nonsense() -> None:
    with pytest.raises(ValueError, match="max_depth"):
        Limits(max_depth=0)


def test_non_buffer_input_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="expected bytes"):
        unpackb("text")  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="contiguous"):
        unpackb(memoryview(b"\x00\x00\x00\x00")[::2])
    with pytest.raises(ProtocolError, match="empty"):
        unpackb(memoryview(np.zeros((0, 3), np.float32)))
    # any contiguous buffer works, e.g. a numpy array holding a frame
    assert unpackb(np.frombuffer(packb([1, 2]), np.uint8)) == [1, 2]


# -- encoding what cannot travel -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (np.zeros(2, np.complex64), "complex dtypes are not supported"),
        (np.complex128(1j), "complex dtypes are not supported"),
        (np.array([object()]), "object arrays"),
        (np.zeros(2, "V4"), "void"),
        (np.array(["a"]), "string arrays"),
        (np.zeros(2, "datetime64[s]"), "datetime64"),
        (np.zeros(2, np.longdouble), "itemsize"),
        ({1: "x"}, "map keys must be str or bytes"),
        (
            {"a": [datetime.date(2024, 1, 1)]},
            r"\$\['a'\]\[0\]: cannot encode an object of type date",
        ),
        ({"a": {1, 2}}, "cannot encode an object of type set"),
        (2**64, "does not fit"),
        (-(2**63) - 1, "does not fit"),
        (memoryview(b"abcd")[::2], "C-contiguous"),
    ],
)
def test_unsendable_objects_raise_protocol_error_naming_the_path(obj: object, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        packb(obj)


def test_encoding_a_cycle_or_deep_nesting_is_bounded() -> None:
    cycle: list = []
    cycle.append(cycle)
    with pytest.raises(ProtocolError, match="nesting deeper than the limit of 64"):
        packb(cycle)
    nested: object = 0
    for _ in range(64):
        nested = [nested]
    assert unpackb(packb(nested)) == nested
    with pytest.raises(ProtocolError, match="limit of 5"):
        packb(nested, limits=Limits(max_depth=5))


# -- fuzzing -------------------------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VALID_FRAME = packb(
    {
        "observation/image": np.arange(60, dtype=np.uint8).reshape(4, 5, 3),
        "observation/state": np.linspace(0, 1, 8),
        "prompt": "pick",
        "n": [np.int16(-4), 1.5, None, {"k": b"v"}],
        "bf": np.zeros(3, np.float32),
    }
)


@FUZZ
@given(st.binary(max_size=256))
def test_random_bytes_raise_only_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decoded = unpackb(data)
        unpackb(packb(decoded))  # whatever decodes can be sent back


@FUZZ
@given(st.integers(0, len(VALID_FRAME) - 1), st.integers(0, 255), st.integers(0, len(VALID_FRAME)))
def test_mutated_and_truncated_frames_raise_only_protocol_error(
    index: int, byte: int, cut: int
) -> None:
    frame = bytearray(VALID_FRAME)
    frame[index] = byte
    with contextlib.suppress(ProtocolError):
        decoded = unpackb(bytes(frame[:cut]))
        unpackb(packb(decoded))


JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)


@FUZZ
@given(JSONISH)
def test_random_objects_round_trip_byte_equal_to_openpi(obj: object) -> None:
    from openpi_client import msgpack_numpy as openpi

    frame = packb(obj)
    assert frame == openpi.packb(obj)
    assert unpackb(frame) == openpi.unpackb(frame)


def test_openpi_layout_fast_path_agrees_with_the_general_path() -> None:
    array = np.arange(6, dtype="<i2").reshape(2, 3)
    fast = packb(array)  # openpi's exact layout: decoded by the fast path
    general = array_frame(array.tobytes(), "<i2", [2, 3])  # bin32 + array16 shape: general path
    np.testing.assert_array_equal(unpackb(fast), unpackb(general))
    assert unpackb(fast).dtype == unpackb(general).dtype
    lying = fast.replace(b"\x92\x02\x03", b"\x92\x02\x04")
    with pytest.raises(
        ProtocolError, match=re.escape("data has 12 bytes but shape [2, 4] of dtype <i2 needs 16")
    ):
        unpackb(lying)
    negative = fast.replace(b"\x92\x02\x03", b"\x92\x02\xff")  # -1 as a negative fixint
    with pytest.raises(ProtocolError, match="negative dimension"):
        unpackb(negative)
    complex_dtype = fast.replace(b"\xa3<i2", b"\xa3<c8")
    with pytest.raises(ProtocolError, match="complex dtypes are not supported"):
        unpackb(complex_dtype)
    with pytest.raises(ProtocolError, match="nesting deeper than the limit of 1"):
        unpackb(fast, limits=Limits(max_depth=1))


WIRE_DTYPES = st.sampled_from(
    ["|b1", "|i1", "<i2", ">i4", "<i8", "|u1", ">u2", "<u4", "<u8", "<f2", ">f4", "<f8"]
)


@FUZZ
@given(
    hnp.arrays(WIRE_DTYPES, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)),
    st.booleans(),
)
def test_random_arrays_round_trip_byte_equal_to_openpi(array: np.ndarray, transpose: bool) -> None:
    from openpi_client import msgpack_numpy as openpi

    array = array.T if transpose else array
    frame = packb({"a": array})
    assert frame == openpi.packb({"a": array})
    decoded = unpackb(frame)["a"]
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    assert decoded.tobytes() == array.tobytes()
