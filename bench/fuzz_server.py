"""Live fuzzing of a real policy server: hostile frames on one connection while a stock openpi-client
is served on another, against `latentpi serve --config pi0_tiny` on loopback (its own process).

Frames, by category (weights in CATEGORY_WEIGHTS): random bytes; truncated and bit-flipped valid
frames (plain, latents, a latent spec map, noise, interventions, knockout, prompt variants,
read-outs); any field, nested ones included, replaced by a value of another type; arrays of the
wrong shape or dtype; NaN and infinity; shapes and lengths that would allocate terabytes, declared in
array maps and msgpack headers; deep nesting; non-map frames; text frames, invalid UTF-8 ones
included; huge and odd unicode prompts; unknown latent_spec, intervention and site keys, bad values,
intervention arrays of the wrong width; bad prompt_variants and read-outs; object bombs (a million
empty maps); frames over the server's size limit.

Every frame must get an error text frame (`bad frame: ...`, `bad request: ...`), a response (a
mutation can leave a valid request) or a clean close (a close frame: 1009 for an oversized frame,
1007 for invalid UTF-8 in a text frame); the fuzzer reconnects after a close. Counted as failures:
crashes (the server process died), hangs (no answer within --timeout-s), internal errors (`internal
server error`: a bug; the frames are saved with --save-dir) and dropped connections (closed
without a close frame).

The stock openpi-client (its own process) first runs alone (baseline), then throughout the fuzzing;
its answers must equal, bit for bit, those it got alone (fixed noise seeds; the server runs batches
row by row on CPU). Server RSS is sampled every 0.5 s: start, end, peak and the slope over the run.

Run: .venv/bin/python bench/fuzz_server.py [--frames N] [--seed S] [--json OUT] [--save-dir DIR]
The default (2,000 frames) takes about a minute after the server starts; issue 14's full run is
--frames 100000 (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import random
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from latentpi.protocol.codec import packb, unpackb

# openpi-client 0.1.2 calls websockets.sync.client.connect outside a context manager.
warnings.filterwarnings("ignore", "connect\\(\\) must be used", DeprecationWarning)

SIDE = 2  # fuzz requests carry 2x2 images (the server resizes): frames stay mostly structure
MAX_FRAME_BYTES = 64 * 1024 * 1024  # the server's default limit
CATEGORY_WEIGHTS = {
    "random_bytes": 10,
    "truncated": 10,
    "bit_flipped": 10,
    "wrong_type": 12,
    "wrong_shape_dtype": 8,
    "nan_inf": 6,
    "huge_declared": 8,
    "deep_nesting": 5,
    "non_map": 4,
    "text_frame": 4,
    "prompt": 6,
    "latent_spec": 6,
    "interventions": 10,
    "variants_readouts": 5,
    "object_bomb": 1,
    "oversized": 0.05,
}
FAILURES = ("crash", "hang", "internal", "dropped", "other")


@dataclass(frozen=True)
class TextFrame:
    """A websocket text frame of raw bytes (possibly invalid UTF-8)."""

    data: bytes


Frame = bytes | str | TextFrame


# -- the server -----------------------------------------------------------------------------------
@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    port: int
    log: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def rss_bytes(self) -> int:
        try:
            text = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return 0
        line = next(line for line in text.splitlines() if line.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024

    def internal_errors(self) -> int:
        """The server's own count of internal errors (/metrics), a cross-check of ours."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        return sum(
            int(float(line.rsplit(" ", 1)[1]))
            for line in text.splitlines()
            if line.startswith("latentpi_errors_total") and 'kind="internal"' in line
        )


@contextlib.contextmanager
def running_server(config: str, folder: Path) -> Iterator[Server]:
    """`latentpi serve` as a child process (as deployed), on a free loopback port."""
    ready, log = folder / "ready.json", folder / "server.log"
    command = [
        sys.executable, "-c", "from latentpi.cli import main; main()", "serve",
        "--config", config, "--port", "0", "--ready-file", str(ready),
        "--max-batch", "2", "--warmup-batch-sizes", "1,2", "--log-level", "warning",
    ]  # fmt: skip
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        while not ready.exists():
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}:\n{tail(log)}")
            time.sleep(0.2)
        info = json.loads(ready.read_text())
        yield Server(process, str(info["url"]), int(info["port"]), log)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# -- the stock openpi-client ----------------------------------------------------------------------
STOCK_KEYS = 6  # distinct (observation, noise seed) pairs, cycled


def stock_observation(key: int) -> dict[str, Any]:
    """A LIBERO-sized observation; even keys also ask for the default latents."""
    rng = np.random.default_rng(1000 + key)
    obs: dict[str, Any] = {
        "observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/state": rng.normal(size=8),
        "prompt": ["put the bowl on the plate", "open the top drawer"][key % 2],
        "noise_seed": key,
    }
    if key % 2 == 0:
        obs["collect_latents"] = True
    return obs


def answer_bytes(response: dict[str, Any]) -> bytes:
    """Everything an answer holds but its timings, as comparable bytes."""
    return packb({k: v for k, v in response.items() if not k.endswith("_timing")})


def stock_client(url: str, baseline: int) -> None:
    """`--stock-client URL`, its own process: `baseline` requests alone, then prints
    "baseline done" and goes on until a line arrives on stdin; prints its figures as one JSON
    line. Every answer is compared with the first answer to the same request."""
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    policy = WebsocketClientPolicy(url)
    observations = [stock_observation(key) for key in range(STOCK_KEYS)]
    expected: dict[int, bytes] = {}
    phases: dict[str, list[float]] = {"baseline": [], "fuzz": []}
    wrong, errors, count = 0, [], 0
    while not stop.is_set():
        if count == baseline:
            print("baseline done", flush=True)
        key = count % STOCK_KEYS
        start = time.perf_counter()
        try:
            answer = answer_bytes(policy.infer(observations[key]))
        except Exception as error:  # a refused or lost request is a failure, counted
            errors.append(f"{type(error).__name__}: {str(error)[:200]}")
            policy = WebsocketClientPolicy(url)
        else:
            phases["baseline" if count < baseline else "fuzz"].append(time.perf_counter() - start)
            wrong += expected.setdefault(key, answer) != answer
        count += 1
    figures = {"latency_s": phases, "wrong": wrong, "errors": errors, "requests": count}
    print(json.dumps(figures), flush=True)


@contextlib.contextmanager
def stock_client_process(url: str, baseline: int) -> Iterator[Callable[[], dict[str, Any]]]:
    """The stock client in its own process (no GIL shared with the fuzzer), past its baseline;
    yields a function that stops it and returns its figures."""
    command = [sys.executable, __file__, "--stock-client", url, "--baseline", str(baseline)]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()  # type: ignore[union-attr]
        if line.strip() != "baseline done":
            raise RuntimeError(f"the stock client stopped before its baseline: {line!r}")

        def finish() -> dict[str, Any]:
            out, _ = process.communicate("stop\n", timeout=600)
            return json.loads(out.strip().splitlines()[-1])

        yield finish
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# -- frames ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Model:
    """What the frames need of the served model (from its metadata frame)."""

    depth: int
    width: tuple[int, int]
    horizon: int
    action_dim: int
    segments: tuple[tuple[str, ...], tuple[str, ...]]

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> Model:
        layout = metadata["token_layout"]
        return cls(
            depth=metadata["depth"]["expert_0"],
            width=(metadata["width"]["expert_0"], metadata["width"]["expert_1"]),
            horizon=metadata["action_horizon"],
            action_dim=metadata["action_dim"],
            segments=(tuple(layout["expert_0"]), tuple(layout["expert_1"])),
        )


def bin_key(name: bytes) -> bytes:
    return bytes([0xC4, len(name)]) + name


def array_map(data: bytes, dtype: bytes, shape: list[int], *, fast: bool) -> bytes:
    """An array map built by hand so that it can lie: openpi's layout or the general one."""
    dims = b"".join(b"\xcf" + struct.pack(">Q", dim) for dim in shape)
    if fast and len(shape) < 16 and len(data) < 256:
        data_part, shape_head = bytes([0xC4, len(data)]), bytes([0x90 | len(shape)])
    else:
        data_part = b"\xc6" + struct.pack(">I", len(data))
        shape_head = b"\xdc" + struct.pack(">H", len(shape))
    return (
        b"\x84" + bin_key(b"__ndarray__") + b"\xc3" + bin_key(b"data") + data_part + data
        + bin_key(b"dtype") + bytes([0xA0 | len(dtype)]) + dtype
        + bin_key(b"shape") + shape_head + dims
    )  # fmt: skip


PLACEHOLDER = b"\x00fuzz-placeholder\x00"
WIRE_DTYPES = ["|b1", "|i1", "<i2", ">i4", "<i8", "|u1", ">u2", "<u4", "<u8", "<f2", ">f4", "<f8"]
ODD_TEXT = [
    "",
    "   ",
    "\x00",
    "\u202epick up the bowl",
    "e\u0301" * 100,
    "🤖" * 1000,
    "\uffff\U0010ffff",
    "\u200b" * 4096,
    "ﷺ" * 2000,
    "a" * 4097,
    "put the bowl " * 2000,
    "\n" * 100,
]


@functools.cache
def oversized_frame() -> bytes:
    return b"\x00" * (MAX_FRAME_BYTES + 16)


class Frames:
    """One generator per category; each returns a frame (bytes, str or TextFrame)."""

    def __init__(self, rng: random.Random, model: Model) -> None:
        self.rng = rng
        self.model = model
        self.valid = self._valid_requests()
        self.valid_frames = [packb(request) for request in self.valid]
        # Bit flips in array data mostly leave a valid request (a model call, not a parser test):
        # the noise frame (6 KB of floats) is only truncated.
        self.flippable = [packb(r) for r in self.valid if "noise" not in r]

    # -- building blocks ------------------------------------------------------------------------
    def base(self, **extra: Any) -> dict[str, Any]:
        image = np.full((SIDE, SIDE, 3), 128, np.uint8)
        return {
            "observation/image": image,
            "observation/wrist_image": image,
            "observation/state": np.linspace(-1, 1, 8, dtype=np.float32),
            "prompt": "pick up the black bowl",
            "noise_seed": 7,
            **extra,
        }

    def _valid_requests(self) -> list[dict[str, Any]]:
        """One of every kind of valid request (compiled during the warm-up)."""
        model = self.model
        vector = np.full(model.width[0], 0.1, np.float32)
        return [
            self.base(),
            self.base(collect_latents=True),
            self.base(latent_spec={"preset": "pooled", "layers": [0, -1]}),
            {**self.base(noise=np.zeros((model.horizon, model.action_dim), np.float32))}
            | {"noise_seed": None},
            self.base(
                interventions=[
                    {
                        "op": "add",
                        "site": {"expert": 0, "layers": [0], "segment": "prompt"},
                        "vector": vector,
                        "scale": 0.5,
                    }
                ]
            ),
            self.base(
                interventions=[
                    {
                        "op": "attention_knockout",
                        "query": {"expert": 1, "segment": "actions"},
                        "key": {"expert": 0, "segment": "prompt"},
                    }
                ]
            ),
            self.base(prompt_variants=["open the drawer", ""]),
            self.base(collect_latents=True, readouts={"logit_lens": {"top_k": 3}}),
        ]

    def valid_frame(self) -> bytes:
        return self.rng.choice(self.valid_frames)

    def any_value(self, depth: int = 0) -> Any:
        """A random value of any wire type."""
        rng = self.rng
        kind = rng.randrange(12 if depth < 3 else 10)
        if kind == 0:
            return None
        if kind == 1:
            return rng.random() < 0.5
        if kind == 2:
            return rng.choice([0, 1, -1, 3, 2**31, 2**63 - 1, 2**64 - 1, -(2**63)])
        if kind == 3:
            return rng.choice([0.5, -0.0, float("nan"), float("inf"), -float("inf"), 1e308])
        if kind == 4:
            return rng.choice([*ODD_TEXT[:6], "default", "prompt", "add", "residual", "x" * 50])
        if kind == 5:
            return rng.randbytes(rng.randrange(40))
        if kind in (6, 7):
            return self.any_array()
        if kind == 8:
            return np.dtype(rng.choice(WIRE_DTYPES)).type(1)
        if kind == 9:
            return rng.choice([np.float32(np.nan), np.int64(-1), np.bool_(True)])
        if kind == 10:
            return [self.any_value(depth + 1) for _ in range(rng.randrange(5))]
        return {
            rng.choice(["a", "op", "site", "layers", "preset", "top_k", ""]): self.any_value(
                depth + 1
            )
            for _ in range(rng.randrange(4))
        }

    def any_array(self) -> np.ndarray:
        rng = self.rng
        shape = tuple(rng.choice([0, 1, 2, 3, 8, 9, 16]) for _ in range(rng.randrange(6)))
        if rng.random() < 0.15:
            return np.zeros(shape, np.uint16).view(ml_dtypes.bfloat16)
        return np.zeros(shape, np.dtype(rng.choice(WIRE_DTYPES)))

    def replace_somewhere(self, value: Any, new: Callable[[], Any]) -> Any:
        """`value` with one nested entry (dict value or list item) replaced by new()."""
        if isinstance(value, dict) and value and self.rng.random() < 0.75:
            key = self.rng.choice(list(value))
            return {**value, key: self.replace_somewhere(value[key], new)}
        if isinstance(value, list) and value and self.rng.random() < 0.75:
            index = self.rng.randrange(len(value))
            return [*value[:index], self.replace_somewhere(value[index], new), *value[index + 1 :]]
        return new()

    def with_raw(self, key: str, raw: bytes, **extra: Any) -> bytes:
        """A request frame whose `key` holds hand-built msgpack bytes."""
        frame = packb(self.base(**{key: PLACEHOLDER}, **extra))
        return frame.replace(bytes([0xC4, len(PLACEHOLDER)]) + PLACEHOLDER, raw, 1)

    # -- categories ------------------------------------------------------------------------------
    def random_bytes(self) -> bytes:
        rng = self.rng
        size = rng.choice([rng.randrange(1, 16), rng.randrange(16, 256), rng.randrange(256, 4096)])
        data = bytearray(rng.randbytes(size))
        if rng.random() < 0.5:
            data[0] = 0x80 | rng.randrange(16)  # a map header: the decoder goes deeper
        return bytes(data)

    def truncated(self) -> bytes:
        frame = self.valid_frame()
        return frame[: self.rng.randrange(len(frame))]

    def bit_flipped(self) -> bytes:
        frame = bytearray(self.rng.choice(self.flippable))
        for _ in range(self.rng.choice([1, 1, 2, 4, 8])):
            frame[self.rng.randrange(len(frame))] ^= 1 << self.rng.randrange(8)
        return bytes(frame)

    def wrong_type(self) -> bytes:
        request = self.rng.choice(self.valid)
        return packb(self.replace_somewhere(request, self.any_value))

    def wrong_shape_dtype(self) -> bytes:
        rng = self.rng
        key = rng.choice(["observation/image", "observation/wrist_image", "observation/state",
                          "noise", "interventions"])  # fmt: skip
        if key == "interventions":
            array = self.any_array()
            field = rng.choice(["vector", "value", "mean"])
            op = {"vector": "add", "value": "set", "mean": "ablate"}[field]
            return packb(self.base(interventions=[{"op": op, "site": {"expert": 0}, field: array}]))
        special = {
            "observation/image": [(4096, 1, 3), (3, 3, 3, 3), (SIDE, SIDE, 4), (0, SIDE, 3)],
            "observation/wrist_image": [(SIDE, SIDE), (1, 2049, 3), (SIDE, SIDE, 3, 1)],
            "observation/state": [(7,), (9,), (8, 1), ()],
            "noise": [(self.model.horizon, self.model.action_dim + 1), (50,), (256, 257)],
        }[key]
        array = self.any_array() if rng.random() < 0.6 else np.zeros(rng.choice(special), np.uint8)
        extra = {"noise_seed": None} if key == "noise" else {}
        return packb(self.base(**{key: array}, **extra))

    def nan_inf(self) -> bytes:
        rng = self.rng
        case = rng.randrange(5)
        bad = rng.choice([np.nan, np.inf, -np.inf, 1e39] + [-1.0, 2.0] * (case == 1))
        if case == 0:
            state = np.zeros(8)
            state[rng.randrange(8)] = bad
            return packb(self.base(**{"observation/state": state}))
        if case == 1:
            image = np.full((SIDE, SIDE, 3), bad, rng.choice([np.float16, np.float32, np.float64]))
            return packb(self.base(**{"observation/image": image}))
        if case == 2:
            noise = np.zeros((self.model.horizon, self.model.action_dim))
            noise.flat[rng.randrange(noise.size)] = bad
            return packb(self.base(noise=noise, noise_seed=None))
        vector = np.zeros(self.model.width[0], np.float32)
        vector[0] = bad if case == 3 else 0
        entry = {"op": "add", "site": {"expert": 0}, "vector": vector}
        return packb(self.base(interventions=[{**entry, "scale": bad if case == 4 else 1.0}]))

    def huge_declared(self) -> bytes:
        rng = self.rng
        case = rng.randrange(6)
        if case == 0:  # shapes of terabytes to exabytes
            shape = [rng.choice([2**20, 2**30, 2**40, 2**62, 2**64 - 1]) for _ in range(3)]
            dtype = rng.choice(WIRE_DTYPES).encode()
            return self.with_raw("observation/image", array_map(b"\x00" * 48, dtype, shape,
                                                                fast=rng.random() < 0.5))  # fmt: skip
        if case == 1:  # a zero-size shape with a dimension numpy cannot hold
            shape = [0, rng.choice([2**63, 2**64 - 1, 2**40])]
            return self.with_raw("noise", array_map(b"", b"<f4", shape, fast=True), noise_seed=None)
        if case == 2:  # 33 to 40 dimensions
            shape = [1] * rng.randrange(33, 41)
            return self.with_raw("observation/state", array_map(b"\x00" * 8, b"<f8", shape,
                                                                fast=False))  # fmt: skip
        header = rng.choice([b"\xc6", b"\xdb", b"\xdd", b"\xdf"])  # bin32 str32 array32 map32
        length = rng.choice([2**32 - 1, 2**31, 2**24, MAX_FRAME_BYTES])
        raw = header + struct.pack(">I", length) + rng.randbytes(rng.randrange(16))
        if case == 3:
            return raw
        return self.with_raw(rng.choice(["prompt", "latent_spec", "interventions"]), raw)

    def deep_nesting(self) -> bytes:
        rng = self.rng
        depth = rng.choice([65, 100, 1000, 10_000, 1_000_000])
        opener = rng.choice([b"\x91", b"\x81\xa1k"])
        nested = opener * depth + b"\xc0"
        if rng.random() < 0.5:
            return nested
        return self.with_raw(rng.choice(["prompt", "latent_spec", "interventions"]), nested)

    def non_map(self) -> bytes:
        rng = self.rng
        return packb(rng.choice([
            [self.base()], 42, "pick up the bowl", None, True, 1.5, b"\x00" * 10,
            np.zeros((SIDE, SIDE, 3), np.uint8), [[[]]], np.float32(1),
        ]))  # fmt: skip

    def text_frame(self) -> Frame:
        rng = self.rng
        case = rng.randrange(4)
        if case == 0:
            return rng.choice(ODD_TEXT)
        if case == 1:
            return json.dumps({"prompt": "pick", "observation/state": [0] * 8})
        if case == 2:
            return TextFrame(rng.randbytes(rng.randrange(1, 64)))  # mostly invalid UTF-8
        return "x" * rng.choice([1024, 1 << 20])

    def prompt(self) -> bytes:
        rng = self.rng
        case = rng.choices(range(5), weights=[1, 3, 3, 1, 2])[0]  # few valid: each is a model call
        if case == 0:
            return packb(self.base(prompt=rng.choice(ODD_TEXT)))
        if case == 1:
            return packb(self.base(prompt="word " * rng.choice([1000, 10_000, 300_000])))
        if case == 2:  # invalid UTF-8 in a str
            raw = bytearray(rng.randbytes(rng.randrange(30)))
            raw.insert(rng.randrange(len(raw) + 1), rng.choice([0xFF, 0xC0, 0xED, 0x80]))
            return self.with_raw("prompt", bytes([0xD9, len(raw)]) + raw)
        variants = [rng.choice(ODD_TEXT) for _ in range(3)]
        if case == 4:
            variants[rng.randrange(3)] = rng.choice(["x" * 5000, 7, None, b"bytes"])
        return packb(self.base(prompt_variants=variants))

    def latent_spec(self) -> bytes:
        rng = self.rng
        model = self.model
        specs = [
            {"layerz": [0]},
            {"preset": "everything"},
            "everything",
            {"layers": [model.depth + 1]},
            {"layers": [-(model.depth + 2)]},
            {"layers": []},
            {"layers": list(range(10_000))},
            {"steps": [99]},
            {"segments_0": ["nose"]},
            {"segments_1": ["prompt"]},
            {"pooling": "max"},
            {"dtype": "float64"},
            {"attention": "all"},
            {"expert_0": False, "expert_1": False, "text_only": False},
            {"layers": [0.5]},
            {"layers": [True]},
            {rng.choice(["", "a" * 1000, "\x00", "preset2"]): 1},
        ]
        spec = rng.choice(specs)
        extra = {"collect_latents": False} if rng.random() < 0.1 else {}
        return packb(self.base(latent_spec=spec, **extra))

    def interventions(self) -> bytes:
        rng = self.rng
        model = self.model
        width0, width1 = model.width
        wrong = rng.choice([1, width0 - 1, width0 + 1, width1, 2 * width0])
        entries: list[Any] = [
            {"op": "add", "site": {"expert": 0}, "vector": np.ones(wrong, np.float32)},
            {"op": "set", "site": {"expert": 1, "segment": "actions"},
             "value": np.ones((3, wrong), np.float32)},
            {"op": "ablate", "site": {"expert": 0}, "mean": np.ones(width1, np.float32)},
            {"op": "add", "site": {"expert": 0, "layerz": [0]}, "vector": np.ones(width0)},
            {"op": "add", "site": {"expert": 0}, "vector": np.ones(width0), "bogus": 1},
            {"op": "explode", "site": {"expert": 0}},
            {"op": "add", "site": {"expert": 2}, "vector": np.ones(width0)},
            {"op": "add", "site": {"expert": 0, "layers": [model.depth]}, "vector": np.ones(width0)},
            {"op": "add", "site": {"expert": 0, "segment": "nose"}, "vector": np.ones(width0)},
            {"op": "add", "site": {"expert": 0, "positions": [5, 2]}, "vector": np.ones(width0)},
            {"op": "add", "site": {"expert": 0, "positions": [0, 10**6]},
             "vector": np.ones(width0)},
            {"op": "add", "site": {"expert": 0, "steps": [0]}, "vector": np.ones(width0)},
            {"op": "add", "site": {"expert": 0}, "vector": np.ones((2, 2, 2, width0))},
            {"op": "add", "site": {"expert": 0}, "vector": np.ones(width0, np.int32)},
            {"op": "scale_units", "site": {"expert": 0}, "units": [width0 + 5],
             "factors": np.ones(1, np.float32)},
            {"op": "scale_units", "site": {"expert": 0}, "units": [0, 1],
             "factors": np.ones(3, np.float32)},
            {"op": "attention_knockout", "query": {"expert": 0, "segment": "prompt"},
             "key": {"expert": 1, "segment": "actions"}},
            {"op": "attention_knockout", "query": {"expert": 1, "segment": "nose"},
             "key": {"expert": 0, "segment": "prompt"}},
            {"op": "attention_knockout", "query": {"expert": 0, "segment": "prompt"},
             "key": {"expert": 0, "segment": "prompt"}, "steps": [0]},
            {"op": "add"},
            {"site": {"expert": 0}},
        ]  # fmt: skip
        if rng.random() < 0.1:
            return packb(self.base(interventions=[rng.choice(entries[:3])] * 17))
        return packb(self.base(interventions=[rng.choice(entries)]))

    def variants_readouts(self) -> bytes:
        rng = self.rng
        cases: list[dict[str, Any]] = [
            {"prompt_variants": ["open the drawer"] * 17},
            {"prompt_variants": [1, 2]},
            {"prompt_variants": ["a" * 5000]},
            {"prompt_variants": {"a": "b"}},
            {"prompt_variants": "open the drawer"},
            {"readouts": {"logit_lens": {"top_k": rng.choice([0, 101, "5", 1.5, -1])}},
             "collect_latents": True},
            {"readouts": {"action_lens": 2}, "collect_latents": True},
            {"readouts": {"unknown": {}}, "collect_latents": True},
            {"readouts": ["logit_lens"], "collect_latents": True},
            {"readouts": {"logit_lens": {}}},  # without latents
            {"readouts": {}, "collect_latents": True},
        ]  # fmt: skip
        return packb(self.base(**rng.choice(cases)))

    def object_bomb(self) -> bytes:
        """Many one-byte values (a 64-byte dict each once built): one long list, or lists of lists
        that each stay under the length limit."""
        rng = self.rng
        count = rng.choice([10_000, 70_000, 100_000, 1_000_000])
        item = rng.choice([b"\x80", b"\x90", b"\x00", b"\xa0"])
        if rng.random() < 0.3:
            raw = b"\xdd" + struct.pack(">I", count) + item * count
        else:
            inner = b"\xdc" + struct.pack(">H", 10_000) + item * 10_000
            raw = b"\xdc" + struct.pack(">H", count // 10_000) + inner * (count // 10_000)
        return raw if rng.random() < 0.3 else self.with_raw("prompt", raw)

    def oversized(self) -> bytes:
        return oversized_frame()


# -- the fuzzing connection ------------------------------------------------------------------------
class FuzzConnection:
    """One websocket for the fuzz frames; reopened after every close."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.connection: Any = None

    def open(self) -> None:
        from websockets.sync.client import connect

        self.connection = connect(  # legacy: opened here, closed in close() (no `with`)
            self.url, compression=None, max_size=None, open_timeout=self.timeout_s, legacy=True
        )
        unpackb(self.connection.recv(timeout=self.timeout_s))  # the metadata frame

    def close(self) -> None:
        if self.connection is not None:
            with contextlib.suppress(Exception):
                self.connection.close()
            self.connection = None

    def exchange(self, frame: Frame) -> tuple[str, str]:
        """(outcome, detail) for one frame."""
        from websockets.exceptions import ConnectionClosed

        if self.connection is None:
            self.open()
        try:
            if isinstance(frame, TextFrame):
                self.connection.send(frame.data, text=True)
            else:
                self.connection.send(frame)
            reply = self.connection.recv(timeout=self.timeout_s)
        except TimeoutError:
            self.close()
            return "hang", ""
        except ConnectionClosed as closed:
            self.connection = None
            if closed.rcvd is None:
                return "dropped", "no close frame"
            return "closed", str(closed.rcvd.code)
        return classify(reply)


def classify(reply: bytes | str) -> tuple[str, str]:
    if isinstance(reply, bytes):
        response = unpackb(reply)
        return ("response", "") if "actions" in response else ("other", "binary")
    if reply.startswith(("bad frame: ", "bad request: ", "frame: expected a binary")):
        return "error", reply.split(":", 1)[0]
    if reply.startswith("internal server error"):
        return "internal", reply
    if "overloaded" in reply or "queue" in reply:
        return "overloaded", ""
    return "other", reply[:200]


# -- the run ----------------------------------------------------------------------------------------
@dataclass
class Tally:
    outcomes: dict[str, Counter[str]] = field(default_factory=dict)
    round_trips: dict[str, list[float]] = field(default_factory=dict)
    slowest: list[tuple[float, str, str, str]] = field(default_factory=list)  # (s, category, ...)
    close_codes: Counter[str] = field(default_factory=Counter)
    samples: list[dict[str, str]] = field(default_factory=list)

    def add(self, category: str, outcome: str, detail: str, seconds: float) -> None:
        self.outcomes.setdefault(category, Counter())[outcome] += 1
        self.round_trips.setdefault(category, []).append(seconds)
        if seconds > 1.0 and len(self.slowest) < 1000:
            self.slowest.append((round(seconds, 2), category, outcome, detail[:100]))
        if outcome == "closed":
            self.close_codes[detail] += 1

    def total(self, outcome: str) -> int:
        return sum(counts[outcome] for counts in self.outcomes.values())


def schedule(
    frames: int, rng: random.Random, per_category: int = 0, only: tuple[str, ...] = ()
) -> list[str]:
    """Categories for `frames` frames, in proportion to their weights, at least one each; or
    `per_category` of each (3 oversized frames at most: each is 64 MiB)."""
    weights = {c: w for c, w in CATEGORY_WEIGHTS.items() if not only or c in only}
    total = sum(weights.values())

    def count(category: str, weight: float) -> int:
        if not per_category:
            return max(1, round(frames * weight / total))
        return min(per_category, 3) if category == "oversized" else per_category

    plan = [
        category for category, weight in weights.items() for _ in range(count(category, weight))
    ]
    rng.shuffle(plan)
    return plan


class RssSampler(threading.Thread):
    def __init__(self, server: Server, period_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.period_s = period_s
        self.samples: list[tuple[float, int, int]] = []  # (time, frames sent, rss)
        self.frames_sent = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.period_s):
            rss = self.server.rss_bytes()
            if rss:
                self.samples.append((time.monotonic(), self.frames_sent, rss))


def fuzz(
    server: Server, plan: list[str], model: Model, args: argparse.Namespace
) -> tuple[Tally, RssSampler, float]:
    """The plan's frames over `args.connections` connections at once (one thread each); frame i
    comes from its own seed, so it is the same whichever connection sends it."""
    tally, lock, next_index, crashed = Tally(), threading.Lock(), iter(range(len(plan))), [False]
    sampler = RssSampler(server)
    sampler.samples.append((time.monotonic(), 0, server.rss_bytes()))
    sampler.start()

    def send_frames() -> None:
        frames = Frames(random.Random(), model)
        connection = FuzzConnection(server.url, args.timeout_s)
        while not crashed[0]:
            with lock:
                index = next(next_index, None)
            if index is None:
                break
            category = plan[index]
            frames.rng = random.Random(args.seed * 1_000_003 + index)
            with np.errstate(all="ignore"):  # the frames overflow on purpose
                frame = getattr(frames, category)()
            sent = time.monotonic()
            outcome, detail = send_one(server, connection, category, frame)
            with lock:
                tally.add(category, outcome, detail, time.monotonic() - sent)
                if outcome in FAILURES:
                    keep(tally, index, category, outcome, detail, frame, args.save_dir)
                sampler.frames_sent += 1
                crashed[0] = crashed[0] or outcome == "crash"
                if sampler.frames_sent % max(len(plan) // 10, 1) == 0:
                    progress(sampler.frames_sent, len(plan), tally, start)
        connection.close()

    start = time.monotonic()
    workers = [threading.Thread(target=send_frames) for _ in range(args.connections)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.monotonic() - start
    sampler.done.set()
    sampler.join()
    sampler.samples.append((time.monotonic(), sampler.frames_sent, server.rss_bytes()))
    return tally, sampler, elapsed


def progress(sent: int, planned: int, tally: Tally, start: float) -> None:
    failed = sum(tally.total(outcome) for outcome in FAILURES)
    rate = sent / max(time.monotonic() - start, 1e-9)
    print(f"{sent}/{planned} frames, {rate:.0f}/s, {failed} failures", file=sys.stderr, flush=True)


def send_one(
    server: Server, connection: FuzzConnection, category: str, frame: Frame
) -> tuple[str, str]:
    from websockets.exceptions import InvalidHandshake

    try:
        outcome, detail = connection.exchange(frame)
    except (OSError, InvalidHandshake) as error:  # refused: the server may be gone
        outcome, detail = "dropped", f"{type(error).__name__}: {error}"
        connection.close()
    if not server.alive():
        return "crash", f"exit code {server.process.returncode}"
    if category == "oversized" and outcome == "dropped":
        # The server closes at the frame's header while we are still sending megabytes: the
        # kernel resets the connection and the close frame (1009) in flight is lost.
        return "closed", "reset"
    return outcome, detail


def keep(
    tally: Tally,
    index: int,
    category: str,
    outcome: str,
    detail: str,
    frame: Frame,
    save_dir: Path | None,
) -> None:
    """The first failures, with the frame saved for reproduction."""
    if len(tally.samples) >= 50:
        return
    sample = {"index": str(index), "category": category, "outcome": outcome, "detail": detail}
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        path = save_dir / f"{index:06d}-{category}-{outcome}.bin"
        data = frame.data if isinstance(frame, TextFrame) else frame
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        sample["frame"] = str(path)
    tally.samples.append(sample)


def warm_up(server: Server, frames: Frames, timeout_s: float) -> None:
    """Every valid request once (compiling what it needs) before anything is measured."""
    connection = FuzzConnection(server.url, timeout_s)
    for frame in frames.valid_frames:
        outcome, detail = connection.exchange(frame)
        if outcome != "response":
            raise RuntimeError(f"a valid warm-up request was refused: {outcome} {detail}")
    connection.close()


def read_metadata(url: str) -> dict[str, Any]:
    from websockets.sync.client import connect

    with connect(url, compression=None, max_size=None) as connection:
        return unpackb(connection.recv(timeout=60))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rss_figures(samples: list[tuple[float, int, int]]) -> dict[str, float]:
    """Start, end and peak RSS (MiB) and the least-squares slope over the second half of the run
    (MiB per 10,000 frames and per minute), after the allocator's first growth."""
    mib = 1 << 20
    rss = [s[2] for s in samples]
    later = samples[len(samples) // 2 :]
    out = {"start_mib": rss[0] / mib, "end_mib": rss[-1] / mib, "peak_mib": max(rss) / mib}
    for quarter in (1, 2, 3):  # steps (one large frame raising the heap) show apart from a slope
        out[f"at_{quarter * 25}pct_mib"] = rss[len(rss) * quarter // 4] / mib
    if len(later) >= 3 and later[-1][1] > later[0][1]:
        frames = np.array([s[1] for s in later], float)
        times = np.array([s[0] for s in later], float)
        values = np.array([s[2] for s in later], float) / mib
        out["slope_mib_per_10k_frames"] = float(np.polyfit(frames, values, 1)[0] * 10_000)
        out["slope_mib_per_min"] = float(np.polyfit(times, values, 1)[0] * 60)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="latentpi-fuzz-") as folder:
        started = time.monotonic()
        with running_server(args.config, Path(folder)) as server:
            report = fuzz_server(server, args)
    report["meta"]["startup_s"] = time.monotonic() - started - report["meta"]["total_s"]
    return report


def fuzz_server(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up, the stock client's baseline, then the fuzzing with the stock client alongside."""
    started = time.monotonic()
    rng = random.Random(args.seed)
    frames = Frames(rng, Model.from_metadata(read_metadata(server.url)))
    warm_up(server, frames, args.timeout_s)
    warm_up_s = time.monotonic() - started
    plan = schedule(args.frames, rng, args.per_category, tuple(args.categories or ()))
    with stock_client_process(server.url, args.baseline) as finish_stock_client:
        tally, sampler, elapsed = fuzz(server, plan, frames.model, args)
        stock = finish_stock_client()
    alive = server.alive()
    return {
        "meta": {
            "frames": len(plan), "seed": args.seed, "config": args.config,
            "connections": args.connections,
            "load_average": os.getloadavg(), "cpus": os.cpu_count(), "warm_up_s": warm_up_s,
            "fuzz_s": elapsed, "total_s": time.monotonic() - started,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
        "categories": {name: dict(counts) for name, counts in tally.outcomes.items()},
        "round_trip_ms": {
            name: {"p50": percentile(times, 0.5) * 1000, "max": max(times) * 1000}
            for name, times in tally.round_trips.items()
        },
        "totals": {
            outcome: tally.total(outcome)
            for outcome in ("error", "response", "closed", "overloaded", *FAILURES)
        },
        "close_codes": dict(tally.close_codes),
        "failures": tally.samples,
        "slowest": sorted(tally.slowest, reverse=True)[:10],
        "server_alive": alive,
        "server_internal_errors": server.internal_errors() if alive else -1,
        "server_log_tail": tail(server.log) if tally.total("internal") or not alive else "",
        "stock_client": stock_figures(stock),
        "rss": rss_figures(sampler.samples),
        "rss_samples": [  # (seconds, frames sent, MiB), at most 200
            (round(t - started, 1), sent, round(rss / (1 << 20), 1))
            for t, sent, rss in sampler.samples[:: max(1, len(sampler.samples) // 200)]
        ],
    }  # fmt: skip


def stock_figures(stock: dict[str, Any]) -> dict[str, Any]:
    base, during = stock["latency_s"]["baseline"], stock["latency_s"]["fuzz"]
    figures = {
        "requests": stock["requests"],
        "wrong_answers": stock["wrong"],
        "errors": stock["errors"],
        "baseline_requests": len(base),
        "fuzz_requests": len(during),
    }
    for name, values in (("baseline", base), ("fuzz", during)):
        figures[f"{name}_p50_ms"] = percentile(values, 0.5) * 1000
        figures[f"{name}_p99_ms"] = percentile(values, 0.99) * 1000
        figures[f"{name}_mean_ms"] = statistics.fmean(values) * 1000 if values else float("nan")
    return figures


def print_report(report: dict[str, Any]) -> None:
    meta = report["meta"]
    print(
        f"\nlive fuzzing: {meta['frames']} frames on {meta['connections']} connections against {meta['config']} in {meta['fuzz_s']:.0f} s "
        f"({meta['frames'] / meta['fuzz_s']:.0f} frames/s), seed {meta['seed']}, "
        f"{meta['cpus']} CPUs, load {meta['load_average'][0]:.1f}, {meta['date']}; warm-up "
        f"(every valid request kind compiled) {meta['warm_up_s']:.0f} s\n"
    )
    columns = ("error", "response", "closed", *FAILURES)
    header = "".join(f"{c:>10}" for c in columns)
    print(f"{'category':<18}{'frames':>7}{header}{'p50 ms':>9}{'max ms':>9}")
    for category, counts in sorted(report["categories"].items()):
        row = "".join(f"{counts.get(c, 0):>10}" for c in columns)
        times = report["round_trip_ms"][category]
        print(
            f"{category:<18}{sum(counts.values()):>7}{row}{times['p50']:>9.1f}{times['max']:>9.0f}"
        )
    totals = report["totals"]
    print(f"{'total':<18}{meta['frames']:>7}" + "".join(f"{totals[c]:>10}" for c in columns))
    print(f"\nclose codes: {report['close_codes']}; server alive: {report['server_alive']}; "
          f"internal errors counted by the server: {report['server_internal_errors']}")  # fmt: skip
    stock = report["stock_client"]
    ratio = stock["fuzz_p99_ms"] / stock["baseline_p99_ms"]
    print(
        f"\nopenpi-client ({stock['requests']} requests, {stock['wrong_answers']} wrong, "
        f"{len(stock['errors'])} errors):\n"
        f"  {'':<22}{'p50 ms':>10}{'p99 ms':>10}{'requests':>10}\n"
        f"  {'alone (baseline)':<22}{stock['baseline_p50_ms']:>10.1f}"
        f"{stock['baseline_p99_ms']:>10.1f}{stock['baseline_requests']:>10}\n"
        f"  {'during fuzzing':<22}{stock['fuzz_p50_ms']:>10.1f}{stock['fuzz_p99_ms']:>10.1f}"
        f"{stock['fuzz_requests']:>10}\n"
        f"  p99 ratio fuzzing / alone: {ratio:.2f}"
    )
    rss = report["rss"]
    slope = rss.get("slope_mib_per_10k_frames", float("nan"))
    print(
        f"\nserver RSS: start {rss['start_mib']:.0f} MiB, at 25/50/75 % of the run "
        f"{rss['at_25pct_mib']:.0f}/{rss['at_50pct_mib']:.0f}/{rss['at_75pct_mib']:.0f} MiB, end "
        f"{rss['end_mib']:.0f} MiB, peak {rss['peak_mib']:.0f} MiB; least-squares slope over the "
        f"second half {slope:+.2f} MiB per 10k frames"
    )
    for seconds, category, outcome, detail in report["slowest"]:
        print(f"slow: {seconds:.2f} s  {category} -> {outcome} {detail}")
    for sample in report["failures"][:10]:
        print("failure:", sample)
    if report["server_log_tail"]:
        print("server log tail:\n" + report["server_log_tail"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2000, help="fuzz frames (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default="pi0_tiny")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="an answer's deadline")
    parser.add_argument("--per-category", type=int, default=0, help="N of each category instead")
    parser.add_argument(
        "--categories", type=lambda text: text.split(","), help="only these (comma-separated)"
    )
    parser.add_argument("--connections", type=int, default=2, help="fuzz connections at once")
    parser.add_argument("--baseline", type=int, default=40, help="stock-client requests alone")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--save-dir", type=Path, help="save failing frames here")
    parser.add_argument("--stock-client", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stock_client:
        return stock_client(args.stock_client, args.baseline)
    np.seterr(all="ignore")  # the frames overflow and divide on purpose
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    logging.getLogger("websockets").setLevel(logging.CRITICAL)  # connections cut on purpose
    report = run(args)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    totals = report["totals"]
    failed = sum(totals[f] for f in FAILURES) or report["stock_client"]["wrong_answers"]
    sys.exit(1 if failed or report["stock_client"]["errors"] else 0)


if __name__ == "__main__":
    main()
