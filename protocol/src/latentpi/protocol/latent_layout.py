"""What each latent array of a response holds: its axes, shape, dtype and the index values of its
labelled axes, computed from a resolved `LatentSpec` and the model's shape.

The server attaches these to every latent response (`latent_layout`), the client checks arrays
against them and stores them with the data, so nobody re-derives 816 or which layers were kept.

Wire form of one entry (a map), e.g. for pooling "none":
  {"axes": ["layer", "position", "hidden"], "shape": [19, 48, 2048], "dtype": "bfloat16",
   "layers": [0, ..., 18], "segments": [["prompt", 0, 48]]}
Labels: "layers" (residual-stream entries, or attention layers), "steps" (denoising steps),
"segments" (for a position axis: [name, start, stop) in the array's own positions; for a segment
axis: the names), "query_segments" / "key_segments" (attention), "heads".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from latentpi.protocol.errors import ValidationError
from latentpi.protocol.latent_spec import PROMPT_SEGMENT, LatentSpec, TokenLayout

LATENT_NAMES: tuple[str, ...] = (
    "expert_0_hidden_states",
    "expert_1_hidden_states",
    "text_only_hidden_states",
    "prompt_mask",
    "attention_mass_expert_0",
    "attention_mass_expert_1",
)
_DTYPES = ("float32", "float16", "bfloat16", "bool")


@dataclass(frozen=True)
class ModelShape:
    """The numbers a latent's shape depends on (all in ServerMetadata)."""

    token_layout: TokenLayout
    depth: int  # layers per expert (the experts share depth)
    width: tuple[int, int]  # hidden width of expert 0 and expert 1
    num_heads: int
    num_steps: int


@dataclass(frozen=True)
class ArrayLayout:
    axes: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    labels: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.axes) != len(self.shape):
            raise ValidationError(
                "latent_layout.axes",
                f"{len(self.shape)} axis names (one per dimension)",
                list(self.axes),
            )

    def to_wire(self) -> dict[str, Any]:
        return {
            "axes": list(self.axes),
            "shape": list(self.shape),
            "dtype": self.dtype,
            **self.labels,
        }

    @classmethod
    def from_wire(cls, name: str, data: Any) -> ArrayLayout:
        where = f"latent_layout.{name}"
        if not isinstance(data, Mapping):
            raise ValidationError(where, "a map with axes, shape and dtype", data)
        axes, shape, dtype = data.get("axes"), data.get("shape"), data.get("dtype")
        if not isinstance(axes, list) or not all(isinstance(a, str) for a in axes):
            raise ValidationError(f"{where}.axes", "a list of axis names", axes)
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ValidationError(f"{where}.shape", "a list of non-negative ints", shape)
        if dtype not in _DTYPES:
            raise ValidationError(f"{where}.dtype", f"one of {', '.join(_DTYPES)}", dtype)
        if len(axes) != len(shape):
            raise ValidationError(
                f"{where}.axes", f"{len(shape)} axis names (one per dimension)", axes
            )
        labels = {
            key: value for key, value in data.items() if key not in ("axes", "shape", "dtype")
        }
        return cls(tuple(axes), tuple(shape), dtype, labels)


def latent_layouts(spec: LatentSpec, model: ModelShape) -> dict[str, ArrayLayout]:
    """The arrays `spec` produces for one request (batch axis stripped), by name.

    `spec` is resolved here against the model (a resolved spec passes through unchanged)."""
    layout, depth = model.token_layout, model.depth
    spec = spec.resolve(layout, depth, model.num_steps)
    layers, steps = list(spec.layers or ()), list(spec.steps or ())
    pooled = spec.pooling != "none"
    out: dict[str, ArrayLayout] = {}

    def states(
        expert: int, names: tuple[str, ...], width: int
    ) -> tuple[tuple[str, ...], tuple[int, ...], dict[str, Any]]:
        if pooled:
            return ("segment", "hidden"), (len(names), width), {"segments": list(names)}
        spans, start = [], 0
        for name in names:
            a, b = layout.span(expert, name)
            spans.append([name, start, start + b - a])
            start += b - a
        return ("position", "hidden"), (start, width), {"segments": spans}

    if spec.expert_0:
        axes, shape, labels = states(0, spec.segments_0 or (), model.width[0])
        out["expert_0_hidden_states"] = ArrayLayout(
            ("layer", *axes), (len(layers), *shape), spec.dtype, {"layers": layers, **labels}
        )
    if spec.expert_1:
        axes, shape, labels = states(1, spec.segments_1 or (), model.width[1])
        out["expert_1_hidden_states"] = ArrayLayout(
            ("step", "layer", *axes),
            (len(steps), len(layers), *shape),
            spec.dtype,
            {"steps": steps, "layers": layers, **labels},
        )
    if spec.text_only:
        start, stop = layout.span(0, PROMPT_SEGMENT)
        if pooled:
            out["text_only_hidden_states"] = ArrayLayout(
                ("layer", "hidden"), (len(layers), model.width[0]), spec.dtype, {"layers": layers}
            )
        else:
            out["text_only_hidden_states"] = ArrayLayout(
                ("layer", "position", "hidden"),
                (len(layers), stop - start, model.width[0]),
                spec.dtype,
                {"layers": layers, "segments": [[PROMPT_SEGMENT, 0, stop - start]]},
            )
        out["prompt_mask"] = ArrayLayout(
            ("position",),
            (stop - start,),
            "bool",
            {"segments": [[PROMPT_SEGMENT, 0, stop - start]]},
        )
    if spec.attention != "none":
        out.update(
            _attention_layouts(spec, model, [layer for layer in layers if layer < depth], steps)
        )
    return out


def _attention_layouts(
    spec: LatentSpec, model: ModelShape, layers: list[int], steps: list[int]
) -> dict[str, ArrayLayout]:
    """Attention mass between all segments; attention layer l is the layer whose input is residual
    entry l, so entry `depth` (the last output) has none."""
    names_0, names_1 = list(model.token_layout.names(0)), list(model.token_layout.names(1))
    heads = spec.attention == "per_head"
    head_axis, head_shape = (("head",), (model.num_heads,)) if heads else ((), ())
    head_labels = {"heads": list(range(model.num_heads))} if heads else {}
    return {
        "attention_mass_expert_0": ArrayLayout(
            ("layer", *head_axis, "query_segment", "key_segment"),
            (len(layers), *head_shape, len(names_0), len(names_0)),
            "float32",
            {"layers": layers, **head_labels, "query_segments": names_0, "key_segments": names_0},
        ),
        "attention_mass_expert_1": ArrayLayout(
            ("step", "layer", *head_axis, "query_segment", "key_segment"),
            (len(steps), len(layers), *head_shape, len(names_1), len(names_0) + len(names_1)),
            "float32",
            {
                "steps": steps,
                "layers": layers,
                **head_labels,
                "query_segments": names_1,
                "key_segments": names_0 + names_1,
            },
        ),
    }


def latent_bytes(layouts: Mapping[str, ArrayLayout]) -> int:
    """Bytes of latent array data per request."""
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2, "bool": 1}
    total = 0
    for entry in layouts.values():
        count = 1
        for dim in entry.shape:
            count *= dim
        total += count * itemsize[entry.dtype]
    return total
