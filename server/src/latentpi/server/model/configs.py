"""Model configurations as frozen dataclasses, with named variants.

`pi0()` / `pi05()` are openpi's `Pi0Config()` / `Pi0Config(pi05=True)` (PaliGemma-3B: SigLIP
So400m/14 + Gemma-2B, with a Gemma-300M action expert). `pi0_tiny()` / `pi05_tiny()` are the small
configurations of the shared reference files. Nothing else in the model assumes any of these sizes:
every length comes from a config, and `token_layout` turns a config into segment positions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from latentpi.protocol.errors import ValidationError
from latentpi.protocol.latent_spec import PROMPT_SEGMENT, TokenLayout

Variant = Literal["pi0", "pi05"]
DType = Literal["float32", "bfloat16"]

PALIGEMMA_VOCAB_SIZE = 257_152
IMAGE_SLOTS: tuple[str, ...] = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


@dataclass(frozen=True)
class GemmaConfig:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class VisionConfig:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: tuple[int, int] = (14, 14)
    image_size: tuple[int, int] = (224, 224)

    @property
    def num_tokens(self) -> int:
        """Tokens per image: one per patch (no class token, no pooling)."""
        return (self.image_size[0] // self.patch_size[0]) * (
            self.image_size[1] // self.patch_size[1]
        )


@dataclass(frozen=True)
class ModelConfig:
    variant: Variant
    expert_0: GemmaConfig
    expert_1: GemmaConfig
    vision: VisionConfig
    vocab_size: int = PALIGEMMA_VOCAB_SIZE
    action_dim: int = 32
    action_horizon: int = 50
    max_token_len: int = 48
    num_steps: int = 10
    image_slots: tuple[str, ...] = IMAGE_SLOTS
    dtype: DType = "float32"

    def __post_init__(self) -> None:
        if self.variant not in ("pi0", "pi05"):
            raise ValidationError("model.variant", "pi0 or pi05", self.variant)
        if self.dtype not in ("float32", "bfloat16"):
            raise ValidationError("model.dtype", "float32 or bfloat16", self.dtype)
        for name in ("depth", "num_heads", "num_kv_heads", "head_dim"):
            first, second = getattr(self.expert_0, name), getattr(self.expert_1, name)
            if first != second:  # the experts share one attention, so these must agree
                raise ValidationError(f"model.expert_1.{name}", f"{first} (as expert_0)", second)
        if self.expert_0.num_heads % self.expert_0.num_kv_heads:
            raise ValidationError(
                "model.expert_0.num_kv_heads", "a divisor of num_heads", self.expert_0.num_kv_heads
            )

    @property
    def pi05(self) -> bool:
        return self.variant == "pi05"

    @property
    def depth(self) -> int:
        return self.expert_0.depth

    @property
    def prefix_len(self) -> int:
        return len(self.image_slots) * self.vision.num_tokens + self.max_token_len

    @property
    def suffix_len(self) -> int:
        return self.action_horizon + (0 if self.pi05 else 1)

    def with_dtype(self, dtype: DType) -> ModelConfig:
        return dataclasses.replace(self, dtype=dtype)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> ModelConfig:
        """The config described by a reference file's `meta_json` (see the reference README)."""
        variant = _field(meta, "model", str)
        vision = _field(meta, "vision", Mapping)
        patch = tuple(_field(vision, "patch_size", list, "vision."))
        return cls(
            variant=variant,  # type: ignore[arg-type]
            expert_0=_gemma(_field(meta, "expert_0", Mapping), "expert_0."),
            expert_1=_gemma(_field(meta, "expert_1", Mapping), "expert_1."),
            vision=VisionConfig(
                width=_field(vision, "width", int, "vision."),
                depth=_field(vision, "depth", int, "vision."),
                mlp_dim=_field(vision, "mlp_dim", int, "vision."),
                num_heads=_field(vision, "num_heads", int, "vision."),
                patch_size=(int(patch[0]), int(patch[1])),
            ),
            vocab_size=_field(meta, "vocab_size", int),
            action_dim=_field(meta, "action_dim", int),
            action_horizon=_field(meta, "action_horizon", int),
            max_token_len=_field(meta, "max_token_len", int),
            num_steps=_field(meta, "num_steps", int),
            dtype=meta.get("dtype", "float32"),
        )


def _gemma(meta: Mapping[str, Any], prefix: str) -> GemmaConfig:
    names = [f.name for f in dataclasses.fields(GemmaConfig)]
    return GemmaConfig(**{name: _field(meta, name, int, prefix) for name in names})


def _field(meta: Mapping[str, Any], name: str, kind: type, prefix: str = "") -> Any:
    value = meta.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValidationError(f"meta_json.{prefix}{name}", f"a {kind.__name__}", value)
    return value


# -- named configurations ---------------------------------------------------------------------
GEMMA_2B = GemmaConfig(
    width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1, head_dim=256
)
GEMMA_300M = GemmaConfig(
    width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256
)
SO400M_14 = VisionConfig(width=1152, depth=27, mlp_dim=4304, num_heads=16)

TINY_EXPERT_0 = GemmaConfig(
    width=64, depth=3, mlp_dim=128, num_heads=4, num_kv_heads=1, head_dim=16
)
TINY_EXPERT_1 = GemmaConfig(width=32, depth=3, mlp_dim=64, num_heads=4, num_kv_heads=1, head_dim=16)
TINY_VISION = VisionConfig(width=48, depth=2, mlp_dim=96, num_heads=4)


def pi0(dtype: DType = "float32") -> ModelConfig:
    return ModelConfig(
        "pi0", GEMMA_2B, GEMMA_300M, SO400M_14, action_horizon=50, max_token_len=48, dtype=dtype
    )


def pi05(dtype: DType = "float32") -> ModelConfig:
    return ModelConfig(
        "pi05", GEMMA_2B, GEMMA_300M, SO400M_14, action_horizon=10, max_token_len=200, dtype=dtype
    )


def pi0_tiny(dtype: DType = "float32") -> ModelConfig:
    return ModelConfig(
        "pi0",
        TINY_EXPERT_0,
        TINY_EXPERT_1,
        TINY_VISION,
        action_horizon=50,
        max_token_len=48,
        dtype=dtype,
    )


def pi05_tiny(dtype: DType = "float32") -> ModelConfig:
    return ModelConfig(
        "pi05",
        TINY_EXPERT_0,
        TINY_EXPERT_1,
        TINY_VISION,
        action_horizon=10,
        max_token_len=200,
        dtype=dtype,
    )


NAMED = {"pi0": pi0, "pi05": pi05, "pi0_tiny": pi0_tiny, "pi05_tiny": pi05_tiny}


def token_layout(config: ModelConfig) -> TokenLayout:
    """Segment positions of each expert's sequence: image slots then the prompt (expert 0); the
    state token (pi0 only) then the action tokens (expert 1)."""
    segments_0, start = [], 0
    for slot in config.image_slots:
        segments_0.append((slot, start, start + config.vision.num_tokens))
        start += config.vision.num_tokens
    segments_0.append((PROMPT_SEGMENT, start, start + config.max_token_len))
    segments_1 = [] if config.pi05 else [("state", 0, 1)]
    offset = 0 if config.pi05 else 1
    segments_1.append(("actions", offset, offset + config.action_horizon))
    return TokenLayout(expert_0=tuple(segments_0), expert_1=tuple(segments_1))
