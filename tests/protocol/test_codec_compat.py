"""The codec against the real openpi-client package, both directions, and its own round trips."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from openpi_client import msgpack_numpy as openpi

from latentpi.protocol.codec import FramePacker, packb, unpackb

NUMERIC_DTYPES = [
    "|b1",
    "|i1",
    "<i2",
    "<i4",
    "<i8",
    "|u1",
    "<u2",
    "<u4",
    "<u8",
    "<f2",
    "<f4",
    "<f8",
]
BIG_ENDIAN_DTYPES = [">i2", ">i4", ">i8", ">u2", ">u4", ">u8", ">f2", ">f4", ">f8"]


def sample_array(dtype: str, shape: tuple[int, ...] = (3, 4, 5)) -> np.ndarray:
    rng = np.random.default_rng(0)
    values = rng.normal(size=shape) * 100
    return values.astype(np.dtype(dtype)) if dtype != "|b1" else values > 0


def observation() -> dict:
    rng = np.random.default_rng(1)
    return {
        "observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/state": rng.normal(size=8),
        "prompt": "put the bowl on the plate",
        "nested": {
            "list": [
                1,
                -1,
                -33,
                200,
                -200,
                70000,
                -70000,
                2**33,
                -(2**33),
                2**64 - 1,
                1.5,
                None,
                True,
                False,
            ],
            "bytes": b"\x00\xff",
            "empty": {},
            "tuple": (1, "two"),
            "unicode": "√∂ 日本",
        },
        "scalars": [
            np.int8(-3),
            np.uint64(2**64 - 1),
            np.float32(0.25),
            np.float16(1.5),
            np.bool_(True),
            np.float64(2.5),
            np.int64(-(2**63)),
        ],
    }


def assert_same(ours: object, theirs: object) -> None:
    """Equal values and, for numpy values, equal dtypes and shapes."""
    assert type(ours) is type(theirs), (type(ours), type(theirs))
    if isinstance(ours, np.ndarray):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        np.testing.assert_array_equal(ours, theirs)
    elif isinstance(ours, dict):
        assert list(ours) == list(theirs)
        for key in ours:
            assert_same(ours[key], theirs[key])
    elif isinstance(ours, list):
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs, strict=True):
            assert_same(a, b)
    elif isinstance(ours, np.generic):
        assert ours.dtype == theirs.dtype and ours == theirs
    else:
        assert ours == theirs


@pytest.mark.parametrize("dtype", NUMERIC_DTYPES + BIG_ENDIAN_DTYPES)
def test_array_bytes_equal_openpi(dtype: str) -> None:
    array = sample_array(dtype)
    frame = packb({"x": array})
    assert frame == openpi.packb({"x": array})
    assert_same(openpi.unpackb(frame), unpackb(frame))
    assert unpackb(frame)["x"].dtype.str == np.dtype(dtype).str


@pytest.mark.parametrize("shape", [(), (0,), (0, 3), (7,), (2, 1, 3), (1,) * 10])
def test_shapes_bytes_equal_openpi(shape: tuple[int, ...]) -> None:
    array = sample_array("<f4", shape)
    frame = packb(array)
    assert frame == openpi.packb(array)
    assert_same(unpackb(frame), openpi.unpackb(frame))


def test_non_contiguous_arrays_travel_in_c_order() -> None:
    base = sample_array("<i4", (6, 8, 4))
    for view in (
        base[:, ::2],
        base.T,
        base[::-1, :, 1],
        np.asfortranarray(base),
        base.astype(">f8")[1::3],
    ):
        frame = packb(view)
        assert frame == openpi.packb(view)
        np.testing.assert_array_equal(unpackb(frame), view)


def test_nested_observation_bytes_equal_openpi_both_ways() -> None:
    obs = observation()
    ours = packb(obs)
    assert ours == openpi.packb(obs)
    assert_same(unpackb(ours), openpi.unpackb(ours))
    assert_same(unpackb(openpi.packb(obs)), openpi.unpackb(openpi.packb(obs)))


def test_openpi_streaming_packer_frames_decode() -> None:
    # openpi's websocket client uses a msgpack Packer (not packb) for requests.
    packer = openpi.Packer()
    obs = observation()
    decoded = unpackb(packer.pack(obs))
    np.testing.assert_array_equal(decoded["observation/image"], obs["observation/image"])
    assert decoded["prompt"] == obs["prompt"]


def test_decoded_arrays_are_read_only_views_into_the_frame() -> None:
    array = sample_array("<f4", (64, 64))
    for frame in (
        packb({"a": array}),
        bytearray(packb({"a": array})),
        memoryview(packb({"a": array})),
    ):
        decoded = unpackb(frame)["a"]
        assert not decoded.flags.writeable
        assert np.shares_memory(decoded, np.frombuffer(frame, np.uint8))
        with pytest.raises(ValueError):
            decoded[0, 0] = 1.0


def test_bin_outside_arrays_decodes_to_bytes_like_openpi() -> None:
    obj = {b"data": b"abc", "data": b"xyz", "list": [b"q"], "x": {b"data": np.arange(3)}}
    decoded = unpackb(packb(obj))
    assert_same(decoded, openpi.unpackb(packb(obj)))
    assert type(decoded[b"data"]) is bytes


def test_float_subclasses_and_str_subclasses_follow_msgpack() -> None:
    obj = [np.float64(1.25), np.str_("s"), np.bytes_(b"b")]
    assert packb(obj) == openpi.packb(obj)
    assert unpackb(packb(obj)) == [1.25, "s", b"b"]


def test_memoryview_and_bytearray_encode_as_bin() -> None:
    obj = [bytearray(b"ab"), memoryview(b"cd")]
    assert packb(obj) == openpi.packb(obj)
    assert unpackb(packb(obj)) == [b"ab", b"cd"]


@pytest.mark.parametrize("size", [0, 31, 32, 255, 256, 65535, 65536])
def test_length_boundaries_bytes_equal_openpi(size: int) -> None:
    obj = {
        "s": "x" * size,
        "b": b"y" * size,
        "l": list(range(size % 300)),
        "m": {str(i): i for i in range(size % 40)},
    }
    assert packb(obj) == openpi.packb(obj)
    assert unpackb(packb(obj)) == openpi.unpackb(packb(obj))


def test_long_list_and_map_headers() -> None:
    obj = {"l": [0] * 70000, "m": {str(i): i for i in range(70000)}}
    assert packb(obj) == openpi.packb(obj)
    assert unpackb(packb(obj)) == obj


# -- bfloat16 -----------------------------------------------------------------------------------


def bf16_array() -> np.ndarray:
    special = np.array([0.0, -0.0, 1.0, -2.5, np.inf, -np.inf, np.nan, 1e-40, 3.0e38], np.float32)
    return (
        np.concatenate([special, np.linspace(-3, 3, 31, dtype=np.float32)])
        .astype(ml_dtypes.bfloat16)
        .reshape(8, 5)
    )


def test_bfloat16_round_trips_bit_exactly() -> None:
    array = bf16_array()
    for value in (array, array[:, ::2], array.T):
        decoded = unpackb(packb({"h": value}))["h"]
        assert decoded.dtype == ml_dtypes.bfloat16 and decoded.shape == value.shape
        np.testing.assert_array_equal(
            decoded.view(np.uint16), np.ascontiguousarray(value).view(np.uint16)
        )
        assert not decoded.flags.writeable


def test_bfloat16_decodes_in_stock_openpi_client_as_bit_patterns() -> None:
    array = bf16_array()
    stock = openpi.unpackb(packb({"h": array}))["h"]
    assert stock.dtype == np.dtype("<u2")
    np.testing.assert_array_equal(stock, array.view(np.uint16))
    np.testing.assert_array_equal(
        stock.view(ml_dtypes.bfloat16).astype(np.float32), array.astype(np.float32)
    )


def test_bfloat16_frame_layout_is_the_documented_one() -> None:
    array = np.array([1.0, -2.0], ml_dtypes.bfloat16)
    expected = (
        b"\x85"
        + b"\xc4\x0b__ndarray__"
        + b"\xc3"
        + b"\xc4\x04data"
        + b"\xc4\x04"
        + b"\x80\x3f\x00\xc0"
        + b"\xc4\x05dtype"
        + b"\xa3<u2"
        + b"\xc4\x05shape"
        + b"\x91\x02"
        + b"\xc4\x0d__ext_dtype__"
        + b"\xa8bfloat16"
    )
    assert packb(array) == expected


def test_bfloat16_scalar_round_trips() -> None:
    scalar = ml_dtypes.bfloat16(-1.5)
    decoded = unpackb(packb(scalar))
    assert decoded.dtype == ml_dtypes.bfloat16 and float(decoded) == -1.5
    assert openpi.unpackb(packb(scalar)) == np.uint16(scalar.view(np.uint16))


# -- FramePacker ---------------------------------------------------------------------------------


def packer_cases() -> list[object]:
    base = sample_array("<f4", (6, 8, 4))
    return [
        observation(),
        {
            "t": base.T,
            "s": base[:, ::3],
            "be": base.astype(">f8")[::2],
            "empty": np.zeros((0, 4)),
            "zero_d": np.array(3),
        },
        {"bf": bf16_array()[:, ::2], "scalar": ml_dtypes.bfloat16(2.0)},
        [memoryview(np.arange(6, dtype=np.float32)), b"", bytearray(b"x"), memoryview(b"")],
    ]


@pytest.mark.parametrize("case", range(4))
def test_frame_packer_writes_exactly_what_packb_writes(case: int) -> None:
    obj = packer_cases()[case]
    packer = FramePacker()
    frame = packer.pack(obj)
    assert bytes(frame) == packb(obj)
    assert_same(unpackb(frame), unpackb(packb(obj)))


def test_frame_packer_reuses_its_buffer_and_keeps_old_views_valid() -> None:
    packer = FramePacker()
    big = packer.pack({"a": np.ones(1000, np.float32)})
    small = packer.pack({"a": np.zeros(10, np.float32)})
    assert np.shares_memory(np.frombuffer(big, np.uint8), np.frombuffer(small, np.uint8))
    first = packer.pack({"a": np.ones(10, np.float32)})
    snapshot = bytes(first)
    grown = packer.pack({"a": np.full(5000, 2, np.float32)})  # needs a bigger buffer
    assert bytes(first) == snapshot
    np.testing.assert_array_equal(unpackb(grown)["a"], 2)
