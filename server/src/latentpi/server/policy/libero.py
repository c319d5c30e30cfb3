"""The LIBERO policy around pi0 / pi0.5: one request in, model inputs out; model actions back.

Inputs, in openpi's order (`LiberoPolicyTransform.input_transforms`):
    default prompt → LIBERO mapping (+ validation) → normalize state → resize images to 224
    → tokenize prompt → pad state to action_dim
Outputs (`output_transforms`):
    unnormalize state and actions → absolute actions (pi0 only: + state on the 6 arm dims)
    → keep the 7 LIBERO action dims

The model inputs are openpi's `Observation` dict for one example:
    image: {base_0_rgb, left_wrist_0_rgb, right_wrist_0_rgb}: uint8 (224, 224, 3)
    image_mask: {…}: np.bool_ (True, True, False)
    state: float32 (action_dim,) normalized, zero-padded
    tokenized_prompt: int32 (max_token_len,); tokenized_prompt_mask: bool (max_token_len,)
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

import numpy as np

from latentpi.protocol.errors import ValidationError
from latentpi.server.norm_stats import NormStats
from latentpi.server.policy import transforms as _t
from latentpi.server.policy.image import MODEL_IMAGE_SIZE
from latentpi.server.policy.normalize import Normalization, check_stats
from latentpi.server.policy.tokenizer import PromptTokenizer

IMAGE_SLOTS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
LIBERO_STATE_DIM = 8  # eef position (3), eef axis-angle (3), gripper qpos (2)
LIBERO_ACTION_DIM = 7  # eef delta position (3), delta rotation (3), gripper
MODEL_ACTION_DIM = 32
# Arm dims are predicted relative to the state by pi0_libero; the gripper stays absolute.
DELTA_ACTION_MASK = (True,) * 6 + (False,)
MAX_IMAGE_SIDE = 1024


class PolicyVariant(enum.StrEnum):
    PI0 = "pi0"
    PI05 = "pi05"


@dataclasses.dataclass(frozen=True)
class VariantDefaults:
    action_horizon: int
    max_token_len: int
    normalization: Normalization
    delta_actions: bool


VARIANT_DEFAULTS = {
    PolicyVariant.PI0: VariantDefaults(50, 48, Normalization.ZSCORE, delta_actions=True),
    PolicyVariant.PI05: VariantDefaults(10, 200, Normalization.QUANTILE, delta_actions=False),
}


@dataclasses.dataclass(frozen=True)
class LiberoInputs:
    """Checks one LIBERO request and maps it onto the model's three camera slots."""

    max_image_side: int = MAX_IMAGE_SIDE

    def __call__(self, data: _t.Data) -> _t.Data:
        image = self._image(data["observation/image"], "observation/image")
        wrist = self._image(data["observation/wrist_image"], "observation/wrist_image")
        prompt = data.get("prompt")
        if prompt is None:
            raise ValidationError("prompt", "a string (no default prompt is configured)", None)
        return {
            "state": _state(data["observation/state"]),
            "image": dict(zip(IMAGE_SLOTS, (image, wrist, np.zeros_like(image)), strict=True)),
            # The absent right wrist camera is masked out for pi0 and pi0.5 alike.
            "image_mask": dict(zip(IMAGE_SLOTS, map(np.bool_, (1, 1, 0)), strict=True)),
            "prompt": _prompt(prompt),
        }

    def _image(self, value: Any, field: str) -> np.ndarray:
        expected = (
            f"uint8 (height, width, 3) or float in [0, 1], channels last or first, sides "
            f"1..{self.max_image_side}, aspect ratio at most {MODEL_IMAGE_SIZE}:1"
        )
        image = _parse_image(value, field, expected)
        height, width, channels = image.shape
        sides_ok = min(height, width) >= 1 and max(height, width) <= self.max_image_side
        # A thinner image would shrink to zero pixels across when resized to 224.
        if (
            channels != 3
            or not sides_ok
            or max(height, width) > MODEL_IMAGE_SIZE * min(height, width)
        ):
            raise ValidationError(field, expected, value)
        return image


def _parse_image(value: Any, field: str, expected: str) -> np.ndarray:
    """openpi's LIBERO leniency: float pixels in [0, 1] become uint8 as (255 · x) truncated, and
    a leading axis of 3 means channels first. Floats outside [0, 1] are refused (openpi's cast
    would wrap them into arbitrary pixels)."""
    if not isinstance(value, np.ndarray) or value.ndim != 3:
        raise ValidationError(field, expected, value)
    if value.dtype.kind == "f" and value.dtype.itemsize in (2, 4, 8):
        if not (
            np.isfinite(value).all() and value.min(initial=0) >= 0 and value.max(initial=0) <= 1
        ):
            raise ValidationError(field, expected, "a float image with values outside [0, 1]")
        value = (255 * value).astype(np.uint8)
    elif value.dtype != np.uint8:
        raise ValidationError(field, expected, value)
    return np.moveaxis(value, 0, -1) if value.shape[0] == 3 else value


def _state(value: Any) -> np.ndarray:
    expected = f"finite real array of shape ({LIBERO_STATE_DIM},)"
    try:
        state = np.asarray(value) if isinstance(value, np.ndarray | list | tuple) else None
    except ValueError:  # ragged nested lists
        state = None
    if state is None or state.shape != (LIBERO_STATE_DIM,) or state.dtype.kind not in "fiu":
        raise ValidationError("observation/state", expected, value)
    if not np.all(np.isfinite(state)):
        raise ValidationError("observation/state", expected, "an array with NaN or infinity")
    return state


def _prompt(value: Any) -> str:
    # openpi-client may send a numpy string scalar; anything else is refused.
    if isinstance(value, np.ndarray) and value.shape == () and value.dtype.kind == "U":
        value = value.item()
    if not isinstance(value, str):
        raise ValidationError("prompt", "a string", value)
    return value


@dataclasses.dataclass(frozen=True)
class LiberoPolicyTransform:
    """openpi's pi0_libero / pi05_libero pre- and post-processing for one request."""

    variant: PolicyVariant
    norm_stats: Mapping[str, NormStats]
    tokenizer: PromptTokenizer
    action_horizon: int
    max_token_len: int
    action_dim: int = MODEL_ACTION_DIM
    default_prompt: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "variant", PolicyVariant(self.variant))
        for key in ("state", "actions"):
            if key not in self.norm_stats:
                raise ValueError(
                    f"norm_stats: expected keys 'state' and 'actions', received {sorted(self.norm_stats)}"
                )
            check_stats(self.norm_stats[key], self.normalization, key)
        if self.tokenizer.max_len != self.max_token_len:
            raise ValueError(
                f"tokenizer.max_len: expected max_token_len {self.max_token_len}, "
                f"received {self.tokenizer.max_len}"
            )
        if self.action_dim < LIBERO_STATE_DIM:
            raise ValueError(
                f"action_dim: expected at least {LIBERO_STATE_DIM}, received {self.action_dim}"
            )

    @classmethod
    def create(
        cls,
        variant: PolicyVariant | str,
        norm_stats: Mapping[str, NormStats],
        tokenizer: PromptTokenizer,
        default_prompt: str | None = None,
    ) -> LiberoPolicyTransform:
        """openpi's pi0_libero / pi05_libero settings (horizon 50 / 10, max_token_len 48 / 200)."""
        defaults = VARIANT_DEFAULTS[PolicyVariant(variant)]
        return cls(
            variant=PolicyVariant(variant),
            norm_stats=norm_stats,
            tokenizer=tokenizer,
            action_horizon=defaults.action_horizon,
            max_token_len=defaults.max_token_len,
            default_prompt=default_prompt,
        )

    @property
    def normalization(self) -> Normalization:
        return VARIANT_DEFAULTS[self.variant].normalization

    def input_transforms(self) -> tuple[_t.DataTransform, ...]:
        return (
            _t.InjectDefaultPrompt(self.default_prompt),
            LiberoInputs(),
            _t.Normalize(self.norm_stats, self.normalization, keys=("state",)),
            _t.ResizeImages(MODEL_IMAGE_SIZE, MODEL_IMAGE_SIZE),
            _t.TokenizePrompt(self.tokenizer),
            _t.PadState(self.action_dim),
        )

    def output_transforms(self) -> tuple[_t.DataTransform, ...]:
        delta = VARIANT_DEFAULTS[self.variant].delta_actions
        return (
            _t.Unnormalize(self.norm_stats, self.normalization, keys=("state", "actions")),
            *((_t.AbsoluteActions(DELTA_ACTION_MASK),) if delta else ()),
            _t.CutActions(LIBERO_ACTION_DIM),
        )

    def inputs(
        self,
        image: np.ndarray,
        wrist_image: np.ndarray,
        state: np.ndarray,
        prompt: str | None,
    ) -> dict[str, Any]:
        """Model inputs for one request (see the module doc); bad fields raise ValidationError."""
        request = {
            "observation/image": image,
            "observation/wrist_image": wrist_image,
            "observation/state": state,
            "prompt": prompt,
        }
        return _t.apply(self.input_transforms(), request)

    def outputs(self, actions: np.ndarray, model_state: np.ndarray) -> np.ndarray:
        """LIBERO actions float64 (action_horizon, 7) from the model's (action_horizon, action_dim).

        `model_state` is the `state` of this request's model inputs (normalized and padded), as in
        openpi, where the state is un-normalized alongside the actions. float64, as openpi sends
        them: its float64 statistics make every un-normalized value float64.
        """
        actions, model_state = np.asarray(actions), np.asarray(model_state)
        if actions.shape != (self.action_horizon, self.action_dim):
            raise ValidationError(
                "actions", f"shape ({self.action_horizon}, {self.action_dim})", actions
            )
        if model_state.shape != (self.action_dim,):
            raise ValidationError("model_state", f"shape ({self.action_dim},)", model_state)
        data = _t.apply(self.output_transforms(), {"actions": actions, "state": model_state})
        return np.asarray(data["actions"], np.float64)
