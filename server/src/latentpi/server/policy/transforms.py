"""Small data transforms in openpi's style: frozen dataclasses with `__call__(data) -> data`.

`data` is one request's dict (no batch axis). Transforms return a new dict and never modify the
one they receive, so a caller's arrays are left as they were.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from latentpi.server.norm_stats import NormStats
from latentpi.server.policy import image as _image
from latentpi.server.policy.normalize import Normalization, normalize, unnormalize
from latentpi.server.policy.tokenizer import PromptTokenizer

Data = dict[str, Any]


class DataTransform(Protocol):
    def __call__(self, data: Data) -> Data: ...


def apply(transforms: Sequence[DataTransform], data: Data) -> Data:
    """Runs `transforms` in order."""
    for transform in transforms:
        data = transform(data)
    return data


@dataclasses.dataclass(frozen=True)
class InjectDefaultPrompt:
    """Sets `prompt` when the request has none and a default is configured."""

    prompt: str | None

    def __call__(self, data: Data) -> Data:
        if self.prompt is None or data.get("prompt") is not None:
            return data
        return {**data, "prompt": self.prompt}


@dataclasses.dataclass(frozen=True)
class Normalize:
    """Normalizes the named keys with their statistics."""

    norm_stats: Mapping[str, NormStats]
    mode: Normalization
    keys: tuple[str, ...]

    def __call__(self, data: Data) -> Data:
        return {
            **data,
            **{k: normalize(data[k], self.norm_stats[k], self.mode, k) for k in self.keys},
        }


@dataclasses.dataclass(frozen=True)
class Unnormalize:
    """Inverse of Normalize on the named keys."""

    norm_stats: Mapping[str, NormStats]
    mode: Normalization
    keys: tuple[str, ...]

    def __call__(self, data: Data) -> Data:
        return {
            **data,
            **{k: unnormalize(data[k], self.norm_stats[k], self.mode, k) for k in self.keys},
        }


@dataclasses.dataclass(frozen=True)
class ResizeImages:
    """Resizes every image under `image` with padding (a no-op at the target size)."""

    height: int
    width: int

    def __call__(self, data: Data) -> Data:
        images = {
            slot: _image.resize_with_pad(pixels, self.height, self.width)
            for slot, pixels in data["image"].items()
        }
        return {**data, "image": images}


@dataclasses.dataclass(frozen=True)
class TokenizePrompt:
    """Replaces `prompt` by `tokenized_prompt` (int32) and `tokenized_prompt_mask` (bool)."""

    tokenizer: PromptTokenizer

    def __call__(self, data: Data) -> Data:
        rest = {k: v for k, v in data.items() if k != "prompt"}
        tokens, mask = self.tokenizer.tokenize(data["prompt"])
        return {**rest, "tokenized_prompt": tokens, "tokenized_prompt_mask": mask}


@dataclasses.dataclass(frozen=True)
class PadState:
    """Zero-pads `state` to the model's action dimension, as float32 (what the model sees)."""

    dim: int

    def __call__(self, data: Data) -> Data:
        state = np.asarray(data["state"])
        padded = np.zeros((*state.shape[:-1], self.dim), dtype=np.float32)
        padded[..., : state.shape[-1]] = state
        return {**data, "state": padded}


@dataclasses.dataclass(frozen=True)
class AbsoluteActions:
    """Turns delta actions absolute: adds the state to the dims where `mask` is True."""

    mask: tuple[bool, ...]

    def __call__(self, data: Data) -> Data:
        actions, state = np.asarray(data["actions"]), np.asarray(data["state"])
        dims = len(self.mask)
        offset = np.where(np.asarray(self.mask), state[..., :dims], 0.0)
        absolute = actions.copy()
        absolute[..., :dims] += offset[..., None, :].astype(absolute.dtype)
        return {**data, "actions": absolute}


@dataclasses.dataclass(frozen=True)
class CutActions:
    """Keeps the first `dim` action dims (the rest is the model's padding)."""

    dim: int

    def __call__(self, data: Data) -> Data:
        return {**data, "actions": np.asarray(data["actions"])[..., : self.dim]}
