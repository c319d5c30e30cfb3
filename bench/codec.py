"""Codec speed: latentpi vs openpi-client vs one memcpy of the same bytes, encode and decode.

Two payloads: a 120 MB latent response (18 x 816 x 2048 float32 plus the actions) and one LIBERO
observation (two 224x224x3 uint8 images, 8 floats, a prompt). Every row is the median of repeated
calls in this run; ratios are against `np.copyto` of the payload's array bytes into a preallocated
buffer (memory already mapped). "memcpy to new buffer" (`bytes(view)`) is the same copy into freshly
allocated memory, which pays the page faults that any new frame pays too.

Run: .venv/bin/python bench/codec.py [--repeats-large N] [--repeats-small N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from openpi_client import msgpack_numpy as openpi

from latentpi.protocol.codec import FramePacker, packb, unpackb


def latent_payload() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "actions": rng.normal(size=(50, 7)).astype(np.float32),
        "expert_0_hidden_states": rng.normal(size=(18, 816, 2048)).astype(np.float32),
        "server_timing": {"infer_ms": 75.0},
    }


def observation_payload() -> dict[str, Any]:
    rng = np.random.default_rng(1)
    return {
        "observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/state": rng.normal(size=8),
        "prompt": "put both the alphabet soup and the tomato sauce in the basket",
    }


def median_seconds(function: Callable[[], object], repeats: int) -> float:
    function()  # warm-up (first-touch of buffers, caches)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def check(payload: dict[str, Any]) -> None:
    """The timed functions must agree before their speed means anything."""
    ours = packb(payload)
    assert ours == openpi.packb(payload) == bytes(FramePacker().pack(payload))
    for key, value in payload.items():
        if isinstance(value, np.ndarray):
            assert np.array_equal(unpackb(ours)[key], value) and np.array_equal(
                openpi.unpackb(ours)[key], value
            )


def rows(payload: dict[str, Any], repeats: int) -> list[tuple[str, float]]:
    check(payload)
    arrays = [value for value in payload.values() if isinstance(value, np.ndarray)]
    flat = np.concatenate([a.reshape(-1).view(np.uint8) for a in arrays])
    target = np.empty_like(flat)
    view = memoryview(flat)
    frame = packb(payload)
    packer = FramePacker()
    timed: list[tuple[str, Callable[[], object]]] = [
        ("memcpy (np.copyto, preallocated)", lambda: np.copyto(target, flat)),
        ("memcpy to new buffer (bytes(view))", lambda: bytes(view)),
        ("encode  latentpi packb -> bytes", lambda: packb(payload)),
        ("encode  latentpi FramePacker.pack", lambda: packer.pack(payload)),
        ("encode  openpi-client packb", lambda: openpi.packb(payload)),
        ("decode  latentpi unpackb (views)", lambda: unpackb(frame)),
        ("decode  openpi-client unpackb", lambda: openpi.unpackb(frame)),
    ]
    return [(name, median_seconds(function, repeats)) for name, function in timed]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats-large", type=int, default=15)
    parser.add_argument("--repeats-small", type=int, default=501)
    args = parser.parse_args()
    print(f"{'payload':<22} {'operation':<38} {'median':>11} {'x memcpy':>9}")
    for label, payload, repeats in (
        ("latents 120 MB", latent_payload(), args.repeats_large),
        ("LIBERO observation", observation_payload(), args.repeats_small),
    ):
        results = rows(payload, repeats)
        baseline = results[0][1]
        for name, seconds in results:
            shown = f"{seconds * 1e3:8.3f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:8.1f} us"
            print(f"{label:<22} {name:<38} {shown:>11} {seconds / baseline:8.2f}x")


if __name__ == "__main__":
    main()
