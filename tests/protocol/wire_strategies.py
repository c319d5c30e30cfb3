"""Hypothesis strategies for the property tests: any value a frame can carry, valid requests, and
mutations of valid requests; plus the settings profile they share.

CI runs a fixed, derandomized set of examples (reproducible on every run). A longer, random run:

    LATENTPI_FUZZ_EXAMPLES=20000 .venv/bin/pytest tests/protocol/test_properties_codec.py \
        tests/protocol/test_properties_messages.py -q

Imported as `from wire_strategies import ...` (the folder of the test modules is on sys.path).
"""

from __future__ import annotations

import contextlib
import os
import tracemalloc
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import ml_dtypes
import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from latentpi.protocol.interventions import ModelDims
from latentpi.protocol.latent_spec import TokenLayout

_LONG_RUN = int(os.environ.get("LATENTPI_FUZZ_EXAMPLES", "0"))


def profile(ci_examples: int) -> settings:
    """`ci_examples` derandomized examples in CI; LATENTPI_FUZZ_EXAMPLES random ones when set.

    The deadline is a hang detector, far above anything a bounded decoder needs for these few-KB
    inputs even on a loaded machine."""
    return settings(
        max_examples=_LONG_RUN or ci_examples,
        derandomize=not _LONG_RUN,
        database=None,
        deadline=timedelta(seconds=10),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# -- memory ----------------------------------------------------------------------------------------
# Python objects built per frame byte at worst: an empty map is one byte on the wire and a 64-byte
# dict plus an 8-byte list slot in memory (measured: 72 bytes per byte).
OBJECT_BYTES_PER_FRAME_BYTE = 80
FIXED_OVERHEAD_BYTES = 256 * 1024  # tracebacks of deep recursion, first-use caches


@contextlib.contextmanager
def peak_memory() -> Iterator[Callable[[], int]]:
    """Peak bytes Python and numpy allocated inside the block (tracemalloc)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    peak = [0]
    try:
        yield lambda: peak[0]
    finally:
        peak[0] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def bounded_by_frame(frame_bytes: int) -> int:
    return OBJECT_BYTES_PER_FRAME_BYTE * frame_bytes + FIXED_OVERHEAD_BYTES


# -- any value a frame can carry ------------------------------------------------------------------
WIRE_DTYPES = ("|b1", "|i1", "<i2", ">i4", "<i8", "|u1", ">u2", "<u4", "<u8", "<f2", ">f4", "<f8")
ODD_TEXT = (
    "",
    " ",
    "\x00",
    "\u202e drawer",  # right-to-left override
    "e\u0301",  # combining accent
    "🤖" * 8,
    "\uffff\U0010ffff",
    "a" * 5000,  # over MAX_PROMPT_CHARS
)
REQUEST_KEYS = (
    "observation/image",
    "observation/wrist_image",
    "observation/state",
    "prompt",
    "collect_latents",
    "latent_spec",
    "noise_seed",
    "noise",
    "interventions",
    "prompt_variants",
    "readouts",
)
NESTED_KEYS = (
    "preset", "layers", "steps", "pooling", "dtype", "attention", "expert_0", "expert_1",
    "text_only", "segments_0", "segments_1", "op", "site", "expert", "point", "segment",
    "positions", "scale", "vector", "value", "mean", "units", "factors", "query", "key",
    "logit_lens", "action_lens", "top_k", "__ndarray__", "__npgeneric__", "data", "shape",
)  # fmt: skip

integers = st.integers(-(2**63), 2**64 - 1) | st.sampled_from(
    [0, 1, -1, 2, 3, 7, 2**31, 2**63 - 1, 2**64 - 1, -(2**63)]
)
floats = st.floats() | st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e39, -0.0])
texts = st.text(max_size=24) | st.sampled_from(ODD_TEXT + REQUEST_KEYS + NESTED_KEYS)
shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)


def _bfloat16(bits: np.ndarray) -> np.ndarray:
    return bits.view(ml_dtypes.bfloat16)


arrays = st.one_of(
    st.sampled_from(WIRE_DTYPES).flatmap(lambda dtype: hnp.arrays(np.dtype(dtype), shapes)),
    hnp.arrays(np.uint16, shapes).map(_bfloat16),
    hnp.arrays(np.uint8, st.sampled_from([(4, 4, 3), (3, 4, 4), (4, 4), (4, 4, 4), (0, 4, 3)])),
    hnp.arrays(np.float32, st.sampled_from([(8,), (7,), (4, 16), (16,), (8, 4), (2, 5, 16)])),
)
scalars = (
    st.sampled_from(WIRE_DTYPES).flatmap(lambda d: hnp.arrays(np.dtype(d), ())).map(lambda a: a[()])
)
leaves = st.one_of(
    st.none(), st.booleans(), integers, floats, texts, st.binary(max_size=24), arrays, scalars
)
wire_values = st.recursive(
    leaves,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(texts, children, max_size=5),
    max_leaves=12,
)

# -- a small model to resolve specs and interventions against ------------------------------------
SMALL_LAYOUT = TokenLayout(
    expert_0=(("base_0_rgb", 0, 4), ("prompt", 4, 8)),
    expert_1=(("state", 0, 1), ("actions", 1, 5)),
)
SMALL_DIMS = ModelDims(layout=SMALL_LAYOUT, depth=3, num_steps=4, width=(16, 8), mlp_dim=(32, 16))


# -- valid requests ---------------------------------------------------------------------------------
def _float_array(shape: tuple[int, ...]) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(np.float32, shape, elements=st.floats(-4, 4, width=32, allow_subnormal=False))


@st.composite
def latent_specs(draw: st.DrawFn) -> dict[str, Any]:
    """A latent_spec map valid for SMALL_DIMS (some of its fields, over a preset or the defaults)."""
    spec: dict[str, Any] = {}
    if draw(st.booleans()):
        spec["preset"] = draw(st.sampled_from(["full", "text", "pooled", "default", "attention"]))
    optional = {
        "layers": st.lists(st.integers(-4, 3), min_size=1, max_size=4),
        "steps": st.lists(st.integers(-4, 3), min_size=1, max_size=3),
        "segments_0": st.lists(st.sampled_from(["base_0_rgb", "prompt"]), min_size=1, max_size=2),
        "segments_1": st.lists(st.sampled_from(["state", "actions"]), min_size=1, max_size=2),
        "pooling": st.sampled_from(["none", "mean", "last"]),
        "dtype": st.sampled_from(["float32", "float16", "bfloat16"]),
        "attention": st.sampled_from(["none", "head_mean", "per_head"]),
        "expert_0": st.booleans(),
        "expert_1": st.booleans(),
    }
    for name in draw(st.lists(st.sampled_from(sorted(optional)), unique=True, max_size=4)):
        spec[name] = draw(optional[name])
    spec["text_only"] = True  # at least one capture, whatever the other fields say
    return spec


@st.composite
def sites(draw: st.DrawFn, expert: int) -> dict[str, Any]:
    site: dict[str, Any] = {"expert": expert}
    if draw(st.booleans()):
        site["point"] = draw(st.sampled_from(["residual", "attn_out", "mlp_hidden"]))
    if draw(st.booleans()):
        site["layers"] = draw(st.lists(st.integers(-3, 2), min_size=1, max_size=3, unique=True))
    if draw(st.booleans()):
        site["segment"] = draw(
            st.sampled_from(["base_0_rgb", "prompt"] if expert == 0 else ["state", "actions"])
        )
    if expert == 1 and draw(st.booleans()):
        site["steps"] = draw(st.lists(st.integers(-4, 3), min_size=1, max_size=2))
    return site


@st.composite
def interventions(draw: st.DrawFn) -> dict[str, Any]:
    """One intervention valid for SMALL_DIMS: vector-shaped arrays fit every site of its expert."""
    op = draw(
        st.sampled_from(["add", "set", "patch", "ablate", "scale_units", "attention_knockout"])
    )
    if op == "attention_knockout":
        query_expert = draw(st.sampled_from([0, 1]))
        key_expert = 0 if query_expert == 0 else draw(st.sampled_from([0, 1]))
        names = {0: ["base_0_rgb", "prompt"], 1: ["state", "actions"]}
        entry: dict[str, Any] = {
            "op": op,
            "query": {
                "expert": query_expert,
                "segment": draw(st.sampled_from(names[query_expert])),
            },
            "key": {"expert": key_expert, "segment": draw(st.sampled_from(names[key_expert]))},
        }
        if draw(st.booleans()):
            entry["layers"] = draw(st.lists(st.integers(-3, 2), min_size=1, max_size=2))
        return entry
    expert = draw(st.sampled_from([0, 1]))
    site = draw(sites(expert))
    width = (SMALL_DIMS.mlp_dim if site.get("point") == "mlp_hidden" else SMALL_DIMS.width)[expert]
    entry = {"op": op, "site": site}
    if op == "add":
        entry["vector"] = draw(_float_array((width,)))
        entry["scale"] = draw(st.floats(-8, 8))
    elif op in ("set", "patch"):
        entry["value"] = draw(_float_array((width,)))
    elif op == "ablate" and draw(st.booleans()):
        entry["mean"] = draw(_float_array((width,)))
    elif op == "scale_units":
        units = draw(st.lists(st.integers(0, width - 1), min_size=1, max_size=4))
        entry["units"] = units
        entry["factors"] = draw(_float_array((len(units),)))
    return entry


@st.composite
def valid_requests(draw: st.DrawFn) -> dict[str, Any]:
    """A request's wire map valid for SMALL_DIMS, with a random choice of the optional fields."""
    side = draw(st.sampled_from([1, 4, 7]))
    image_dtype = draw(st.sampled_from([np.uint8, np.float32]))
    image = np.zeros((side, side, 3), image_dtype)
    request: dict[str, Any] = {
        "observation/image": image,
        "observation/wrist_image": image.transpose(2, 0, 1) if draw(st.booleans()) else image,
        "observation/state": draw(_float_array((8,))),
        "prompt": draw(st.text(min_size=1, max_size=40).filter(str.strip)),
    }
    if draw(st.booleans()):
        request["latent_spec"] = draw(latent_specs() | st.sampled_from(["default", "full"]))
        if draw(st.booleans()):
            request["readouts"] = draw(
                st.sampled_from(
                    [{"logit_lens": {"top_k": 3}}, {"action_lens": True}, {"action_lens": {}}]
                )
            )
    if draw(st.booleans()):
        request["noise_seed"] = draw(st.integers(0, 2**63 - 1))
    elif draw(st.booleans()):
        request["noise"] = draw(_float_array((5, 4)))
    if draw(st.booleans()):
        request["interventions"] = draw(st.lists(interventions(), min_size=1, max_size=3))
    if draw(st.booleans()):
        request["prompt_variants"] = draw(st.lists(st.text(max_size=20), max_size=3))
    return request


# -- mutations --------------------------------------------------------------------------------------
@st.composite
def mutated(draw: st.DrawFn, value: Any) -> Any:
    """`value` with one change somewhere inside: a value replaced by any other, a key or list entry
    dropped, or one added (known field names included, so unknown-key paths are reached)."""
    action = draw(st.sampled_from(["descend", "descend", "descend", "replace", "drop", "add"]))
    if isinstance(value, dict) and value and action != "replace":
        key = draw(st.sampled_from(sorted(value, key=str)))
        if action == "descend":
            return {**value, key: draw(mutated(value[key]))}
        if action == "drop":
            return {k: v for k, v in value.items() if k != key}
        return {**value, draw(texts): draw(wire_values)}
    if isinstance(value, list) and value and action != "replace":
        index = draw(st.integers(0, len(value) - 1))
        if action == "descend":
            return [*value[:index], draw(mutated(value[index])), *value[index + 1 :]]
        if action == "drop":
            return value[:index] + value[index + 1 :]
        return [*value[:index], draw(wire_values), *value[index:]]
    return draw(wire_values)
