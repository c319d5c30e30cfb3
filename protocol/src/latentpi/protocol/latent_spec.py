"""What a request asks to capture: `LatentSpec`, its presets, and the token layout it refers to.

One `LatentSpec` travels from the request to the compiled function to the HDF5 attributes, so a
file always says what was captured and how it was reduced. A spec is hashable (tuples only): the
server caches one compiled function per (batch size, resolved spec).

Arrays a spec produces, per request (the server strips its batch axis):

  expert_0_hidden_states   (layer, position, hidden)            pooling "none"
                           (layer, segment, hidden)             pooling "mean" / "last"
  expert_1_hidden_states   (step, layer, position, hidden)      pooling "none"
                           (step, layer, segment, hidden)       pooling "mean" / "last"
  text_only_hidden_states  (layer, position, hidden)            the prompt positions of expert 0
                           (layer, hidden)                      pooled
  prompt_mask              (position,) bool                     valid prompt tokens (with text_only)
  attention_mass_expert_0  (layer, query_segment, key_segment) [+ head axis after layer]
  attention_mass_expert_1  (step, layer, query_segment, key_segment) [+ head axis after layer]

"layer" indexes the residual stream: entry l is the input of layer l, entry `depth` the last
layer's output before the final norm (depth + 1 entries). "step" is the denoising step (0 = t=1,
pure noise). Attention mass is the softmax probability that the queries of a segment put on the keys
of each segment, averaged over the segment's valid queries; a row sums to 1 over key segments.
Expert 0's queries (the prefix pass, once per call) see prefix keys only; expert 1's queries see
prefix and suffix keys, so its key segments are expert 0's followed by expert 1's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from latentpi.protocol.errors import ValidationError

Pooling = Literal["none", "mean", "last"]
LatentDType = Literal["float32", "float16", "bfloat16"]
AttentionReadout = Literal["none", "head_mean", "per_head"]

POOLINGS: tuple[str, ...] = ("none", "mean", "last")
DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
ATTENTION_READOUTS: tuple[str, ...] = ("none", "head_mean", "per_head")
PROMPT_SEGMENT = "prompt"


@dataclass(frozen=True)
class TokenLayout:
    """Segment name -> [start, stop) positions, per expert, in each expert's own sequence.

    Computed once per model config (e.g. pi0: expert 0 has three 256-token image slots then a
    48-token prompt; expert 1 has one state token then 50 action tokens) and sent in the server
    metadata, so nobody hard-codes 768 or 816.
    """

    expert_0: tuple[tuple[str, int, int], ...]
    expert_1: tuple[tuple[str, int, int], ...]

    def segments(self, expert: int) -> tuple[tuple[str, int, int], ...]:
        return self.expert_0 if expert == 0 else self.expert_1

    def names(self, expert: int) -> tuple[str, ...]:
        return tuple(name for name, _, _ in self.segments(expert))

    def length(self, expert: int) -> int:
        return max((stop for _, _, stop in self.segments(expert)), default=0)

    def span(self, expert: int, name: str) -> tuple[int, int]:
        for segment, start, stop in self.segments(expert):
            if segment == name:
                return start, stop
        raise KeyError(name)

    def to_wire(self) -> dict[str, dict[str, list[int]]]:
        return {
            f"expert_{expert}": {name: [start, stop] for name, start, stop in self.segments(expert)}
            for expert in (0, 1)
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> TokenLayout:
        def parse(expert: str) -> tuple[tuple[str, int, int], ...]:
            segments = data.get(expert)
            if not isinstance(segments, Mapping):
                raise ValidationError(
                    f"token_layout.{expert}", "a map of segment -> [start, stop]", segments
                )
            out = []
            for name, span in segments.items():
                if not (
                    isinstance(span, list | tuple)
                    and len(span) == 2
                    and all(isinstance(v, int) for v in span)
                ):
                    raise ValidationError(
                        f"token_layout.{expert}.{name}", "[start, stop] integers", span
                    )
                out.append((str(name), int(span[0]), int(span[1])))
            return tuple(sorted(out, key=lambda s: s[1]))

        return cls(expert_0=parse("expert_0"), expert_1=parse("expert_1"))


@dataclass(frozen=True)
class LatentSpec:
    """Which latents to capture and how to reduce them (all on the device).

    layers:     residual-stream entries (0..depth, negative counts from the end); None = all.
    segments_0: expert-0 segments kept in expert_0_hidden_states; None = every position.
    segments_1: expert-1 segments kept in expert_1_hidden_states; None = every position.
    steps:      denoising steps for expert 1 and its attention (negative from the end); None = all.
    pooling:    "none", "mean" over a segment's valid positions, or its "last" valid position.
    dtype:      dtype of every returned hidden-state array.
    attention:  attention-mass read-out: "none", "head_mean" or "per_head".
    """

    expert_0: bool = True
    expert_1: bool = True
    text_only: bool = True
    layers: tuple[int, ...] | None = None
    segments_0: tuple[str, ...] | None = None
    segments_1: tuple[str, ...] | None = None
    steps: tuple[int, ...] | None = None
    pooling: Pooling = "none"
    dtype: LatentDType = "float32"
    attention: AttentionReadout = "none"

    def __post_init__(self) -> None:
        _check_choice("latent_spec.pooling", self.pooling, POOLINGS)
        _check_choice("latent_spec.dtype", self.dtype, DTYPES)
        _check_choice("latent_spec.attention", self.attention, ATTENTION_READOUTS)
        for name in ("expert_0", "expert_1", "text_only"):
            if not isinstance(getattr(self, name), bool):
                raise ValidationError(f"latent_spec.{name}", "a bool", getattr(self, name))
        for name in ("layers", "steps"):
            _check_int_tuple(f"latent_spec.{name}", getattr(self, name))
        for name in ("segments_0", "segments_1"):
            _check_str_tuple(f"latent_spec.{name}", getattr(self, name))
        if not (self.expert_0 or self.expert_1 or self.text_only or self.attention != "none"):
            raise ValidationError(
                "latent_spec", "at least one of expert_0, expert_1, text_only, attention", "nothing"
            )

    # -- wire -----------------------------------------------------------------------------------
    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_wire(cls, data: Any) -> LatentSpec:
        """A preset name or a map of fields (unknown keys are errors, missing keys take defaults)."""
        if isinstance(data, str):
            return preset(data)
        if not isinstance(data, Mapping):
            raise ValidationError(
                "latent_spec", f"a preset name ({', '.join(PRESETS)}) or a map of fields", data
            )
        known = {field.name for field in dataclasses.fields(cls)}
        base_name = data.get("preset")
        base = preset(base_name) if base_name is not None else cls()
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key == "preset":
                continue
            if key not in known:
                raise ValidationError(
                    f"latent_spec.{key}", f"one of {sorted(known | {'preset'})}", key
                )
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        return dataclasses.replace(base, **kwargs)

    # -- resolution against a model -------------------------------------------------------------
    def resolve(self, layout: TokenLayout, depth: int, num_steps: int) -> LatentSpec:
        """Check every index and name against the model and return the canonical spec: indices
        non-negative, None expanded, so equal captures hash equal."""
        layers = resolve_indices("latent_spec.layers", self.layers, depth + 1)
        steps = resolve_indices("latent_spec.steps", self.steps, num_steps)
        segments_0 = _resolve_segments("latent_spec.segments_0", self.segments_0, layout.names(0))
        segments_1 = _resolve_segments("latent_spec.segments_1", self.segments_1, layout.names(1))
        if self.text_only and PROMPT_SEGMENT not in layout.names(0):
            raise ValidationError(
                "latent_spec.text_only",
                f"a model with a '{PROMPT_SEGMENT}' segment",
                layout.names(0),
            )
        return dataclasses.replace(
            self, layers=layers, steps=steps, segments_0=segments_0, segments_1=segments_1
        )


def _check_choice(field: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:  # `in` would compare arrays elementwise
        raise ValidationError(field, f"one of {', '.join(choices)}", value)


def _check_int_tuple(field: str, value: object) -> None:
    if value is None:
        return
    if (
        not isinstance(value, tuple)
        or not value
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise ValidationError(field, "null or a non-empty list of integers", value)


def _check_str_tuple(field: str, value: object) -> None:
    if value is None:
        return
    if not isinstance(value, tuple) or not value or not all(isinstance(v, str) for v in value):
        raise ValidationError(field, "null or a non-empty list of segment names", value)


def resolve_indices(field: str, values: tuple[int, ...] | None, count: int) -> tuple[int, ...]:
    """Indices in [0, count) in the listed order (negatives from the end, repeats dropped); None
    means all; out of range is a ValidationError naming `field`."""
    if values is None:
        return tuple(range(count))
    out: list[int] = []
    for value in values:
        if not -count <= value < count:
            raise ValidationError(field, f"indices in [{-count}, {count - 1}]", value)
        index = value % count
        if index not in out:
            out.append(index)
    return tuple(out)


def _resolve_segments(
    field: str, values: tuple[str, ...] | None, names: tuple[str, ...]
) -> tuple[str, ...]:
    if values is None:
        return names
    for value in values:
        if value not in names:
            raise ValidationError(field, f"segment names among {', '.join(names)}", value)
    return tuple(dict.fromkeys(values))


# Presets by name. A bare `collect_latents: true` uses DEFAULT_PRESET.
PRESETS: dict[str, LatentSpec] = {
    # The seed's shapes: every layer, every position, both experts, every step, float32.
    "full": LatentSpec(),
    # The seed's text-only focus: the prompt positions of expert 0, every layer.
    "text": LatentSpec(expert_0=False, expert_1=False, text_only=True, dtype="float32"),
    # Segment means of both experts at every layer and step: small enough to record every step.
    "pooled": LatentSpec(text_only=False, pooling="mean"),
    # What a bare `collect_latents: true` returns: the prompt's states at every layer and the
    # action expert at the last denoising step, in bfloat16 (see docs/protocol.md for bytes).
    "default": LatentSpec(
        expert_0=False, expert_1=True, text_only=True, steps=(-1,), dtype="bfloat16"
    ),
    # Attention mass between segments, head-averaged, at every layer and step; no hidden states.
    "attention": LatentSpec(expert_0=False, expert_1=False, text_only=False, attention="head_mean"),
}
DEFAULT_PRESET = "default"


def preset(name: object) -> LatentSpec:
    if not isinstance(name, str) or name not in PRESETS:
        raise ValidationError("latent_spec", f"a preset name among {', '.join(PRESETS)}", name)
    return PRESETS[name]
