"""The three messages: `PolicyRequest` (client -> server), `PolicyResponse` and `ServerMetadata`
(server -> client). Each is a frozen dataclass that validates itself; `from_wire` takes what
`unpackb` returned and raises `ValidationError(field, expected, received)` naming the wire key.

Wire keys are openpi's for LIBERO (`observation/image`, ...) plus latentpi's additions; unknown keys
in a request or response are ignored, since openpi clients send extras.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

from latentpi.protocol.errors import ValidationError
from latentpi.protocol.interventions import Intervention, interventions_from_wire
from latentpi.protocol.latent_layout import LATENT_NAMES, ArrayLayout, ModelShape
from latentpi.protocol.latent_spec import DEFAULT_PRESET, PRESETS, LatentSpec, TokenLayout, preset

PROTOCOL_VERSION = "1.0"
LIBERO_STATE_DIM = 8
MAX_IMAGE_SIDE = 2048
MAX_PROMPT_CHARS = 4096
MAX_NOISE_SEED = 2**63 - 1
MAX_PROMPT_VARIANTS = 16
# pi0 draws (50, 32) = 1,600 values; the bound only stops a request from asking for gigabytes.
MAX_NOISE_ELEMENTS = 65_536

IMAGE_KEY = "observation/image"
WRIST_IMAGE_KEY = "observation/wrist_image"
STATE_KEY = "observation/state"


# -- request ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PolicyRequest:
    """One LIBERO observation and what to capture.

    `collect_latents` and `latent_spec` are kept consistent: a spec implies collection and a bare
    `collect_latents=True` means the `DEFAULT_PRESET` spec.
    """

    image: np.ndarray  # uint8 (H, W, 3), any size up to MAX_IMAGE_SIDE (the server resizes);
    # float [0, 1] and channels-first (3, H, W) are accepted as openpi's LIBERO policy accepts them
    wrist_image: np.ndarray  # as image
    state: np.ndarray  # float (8,), finite
    prompt: str
    collect_latents: bool = False
    latent_spec: LatentSpec | None = None
    noise_seed: int | None = None
    # The flow-matching noise itself, (action_horizon, action_dim) float32 as openpi's
    # `Policy.infer(obs, noise=...)` takes it: same observation + same noise = openpi's actions.
    noise: np.ndarray | None = None
    # What to change while the model runs (protocol/interventions.py); recorded in the response.
    interventions: tuple[Intervention, ...] = ()
    # The same observation and noise under other prompts ("" allowed), as one batch.
    prompt_variants: tuple[str, ...] = ()
    # Read-outs of the captured latents through the model's heads:
    # {"logit_lens": {"top_k": k}, "action_lens": {}} (either or both; docs/interventions.md).
    readouts: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        _check_image(IMAGE_KEY, self.image)
        _check_image(WRIST_IMAGE_KEY, self.wrist_image)
        _check_state(self.state)
        _check_prompt(self.prompt)
        if not isinstance(self.collect_latents, bool):
            raise ValidationError("collect_latents", "a bool", self.collect_latents)
        if self.latent_spec is not None and not isinstance(self.latent_spec, LatentSpec):
            raise ValidationError("latent_spec", "a LatentSpec or None", self.latent_spec)
        if self.noise_seed is not None and not (
            _is_int(self.noise_seed) and 0 <= self.noise_seed <= MAX_NOISE_SEED
        ):
            raise ValidationError(
                "noise_seed", f"null or an int in [0, {MAX_NOISE_SEED}]", self.noise_seed
            )
        if self.noise is not None:
            _check_noise(self.noise, self.noise_seed)
        if not isinstance(self.interventions, tuple) or not all(
            isinstance(i, Intervention) for i in self.interventions
        ):
            raise ValidationError("interventions", "a tuple of Intervention", self.interventions)
        _check_prompt_variants(self.prompt_variants)
        if self.latent_spec is not None:
            object.__setattr__(self, "collect_latents", True)
        elif self.collect_latents:
            object.__setattr__(self, "latent_spec", preset(DEFAULT_PRESET))
        if self.readouts is not None:
            object.__setattr__(self, "readouts", check_readouts(self.readouts))
            if not self.collect_latents:
                raise ValidationError(
                    "readouts",
                    "a request that collects latents (they read the captured states)",
                    None,
                )

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            IMAGE_KEY: self.image,
            WRIST_IMAGE_KEY: self.wrist_image,
            STATE_KEY: self.state,
            "prompt": self.prompt,
        }
        if self.collect_latents:
            out["collect_latents"] = True
            out["latent_spec"] = self.latent_spec.to_wire() if self.latent_spec else DEFAULT_PRESET
        if self.noise_seed is not None:
            out["noise_seed"] = self.noise_seed
        if self.noise is not None:
            out["noise"] = self.noise
        if self.interventions:
            out["interventions"] = [i.to_wire() for i in self.interventions]
        if self.prompt_variants:
            out["prompt_variants"] = list(self.prompt_variants)
        if self.readouts:
            out["readouts"] = dict(self.readouts)
        return out

    @classmethod
    def from_wire(cls, data: Any) -> PolicyRequest:
        if not isinstance(data, Mapping):
            raise ValidationError("request", "a map of observation fields", data)
        for key in (IMAGE_KEY, WRIST_IMAGE_KEY, STATE_KEY, "prompt"):
            if key not in data:
                raise ValidationError(key, "present", "nothing (missing key)")
        collect = data.get("collect_latents", False)
        if not isinstance(collect, bool):
            raise ValidationError("collect_latents", "a bool", collect)
        raw_spec = data.get("latent_spec")
        spec = None if raw_spec is None else LatentSpec.from_wire(raw_spec)
        if spec is not None and "collect_latents" in data and not collect:
            raise ValidationError(
                "collect_latents", "true or absent when latent_spec is given", collect
            )
        return cls(
            image=data[IMAGE_KEY],
            wrist_image=data[WRIST_IMAGE_KEY],
            state=data[STATE_KEY],
            prompt=data["prompt"],
            collect_latents=collect,
            latent_spec=spec,
            noise_seed=data.get("noise_seed"),
            noise=data.get("noise"),
            interventions=(
                ()
                if data.get("interventions") is None
                else interventions_from_wire(data["interventions"])
            ),
            prompt_variants=_variants(data.get("prompt_variants")),
            readouts=data.get("readouts"),
        )


def _check_image(key: str, image: object) -> None:
    """uint8, or float pixels in [0, 1] (the server converts them as openpi does); channels last
    (H, W, 3) or first (3, H, W)."""
    expected = (
        f"a uint8 or float array of shape (H, W, 3) or (3, H, W) with 1 <= H, W <= {MAX_IMAGE_SIDE}"
    )
    if (
        not isinstance(image, np.ndarray)
        or image.dtype not in _IMAGE_DTYPES
        or image.ndim != 3
        or 3 not in (image.shape[0], image.shape[2])
    ):
        raise ValidationError(key, expected, image)
    height, width = image.shape[1:] if image.shape[0] == 3 else image.shape[:2]
    if not (1 <= height <= MAX_IMAGE_SIDE and 1 <= width <= MAX_IMAGE_SIDE):
        raise ValidationError(key, expected, image)


_IMAGE_DTYPES = tuple(np.dtype(name) for name in ("uint8", "float16", "float32", "float64"))


def _check_noise(noise: object, noise_seed: int | None) -> None:
    expected = f"a finite float32 array (action_horizon, action_dim) of at most {MAX_NOISE_ELEMENTS} values"
    if (
        not isinstance(noise, np.ndarray)
        or noise.dtype not in _NOISE_DTYPES
        or noise.ndim != 2
        or not 0 < noise.size <= MAX_NOISE_ELEMENTS
    ):
        raise ValidationError("noise", expected, noise)
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: refused
        finite = np.isfinite(noise.astype(np.float32)).all()  # the model draws in float32
    if not finite:
        raise ValidationError("noise", expected, "an array with NaN or infinity")
    if noise_seed is not None:
        raise ValidationError("noise", "absent when noise_seed is given (one or the other)", noise)


_NOISE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


MAX_TOP_K = 100


def check_readouts(value: Any) -> dict[str, Any]:
    """The request's `readouts` map, validated and with defaults filled in."""
    if (
        not isinstance(value, Mapping)
        or not value
        or not set(value) <= {"logit_lens", "action_lens"}
    ):
        raise ValidationError("readouts", "a map with logit_lens and/or action_lens", value)
    out: dict[str, Any] = {}
    if "logit_lens" in value:
        lens = value["logit_lens"]
        top_k = lens.get("top_k", 5) if isinstance(lens, Mapping) else None
        if not _is_int(top_k) or not 1 <= top_k <= MAX_TOP_K:
            raise ValidationError("readouts.logit_lens.top_k", f"an int in 1..{MAX_TOP_K}", top_k)
        out["logit_lens"] = {"top_k": top_k}
    if "action_lens" in value:
        action_lens = value["action_lens"]
        if not (action_lens is True or (isinstance(action_lens, Mapping) and not action_lens)):
            raise ValidationError("readouts.action_lens", "true or {}", value["action_lens"])
        out["action_lens"] = {}
    return out


def _variants(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise ValidationError("prompt_variants", "a list of prompts", value)
    return tuple(value)


def _check_prompt_variants(variants: object) -> None:
    expected = f"at most {MAX_PROMPT_VARIANTS} strings of at most {MAX_PROMPT_CHARS} characters"
    if not isinstance(variants, tuple) or len(variants) > MAX_PROMPT_VARIANTS:
        raise ValidationError("prompt_variants", expected, variants)
    for variant in variants:
        if not isinstance(variant, str) or len(variant) > MAX_PROMPT_CHARS:
            raise ValidationError("prompt_variants", expected, variant)


def _check_state(state: object) -> None:
    if (
        not isinstance(state, np.ndarray)
        or state.dtype.kind != "f"
        or state.shape != (LIBERO_STATE_DIM,)
    ):
        raise ValidationError(STATE_KEY, f"a float array of shape ({LIBERO_STATE_DIM},)", state)
    with np.errstate(over="ignore"):  # float64 beyond float32's range is inf to the model
        finite = np.isfinite(state.astype(np.float32)).all()
    if not finite:
        raise ValidationError(STATE_KEY, "finite values (no NaN or inf)", state.tolist())


def _check_prompt(prompt: object) -> None:
    # "" is the null prompt (BOS and the closing newline), which openpi tokenizes like any other
    if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS:
        raise ValidationError("prompt", f"a str of at most {MAX_PROMPT_CHARS} characters", prompt)


# -- response -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PolicyResponse:
    """Actions, and when latents were asked for: the arrays (by their LATENT_NAMES name, at the
    top level of the wire map), their layouts and the spec that produced them."""

    actions: np.ndarray  # float (horizon, action_dim)
    latents: Mapping[str, np.ndarray] = field(default_factory=dict)
    latent_layout: Mapping[str, ArrayLayout] = field(default_factory=dict)
    latent_spec: LatentSpec | None = None
    server_timing: Mapping[str, float] = field(default_factory=dict)
    policy_timing: Mapping[str, float] = field(default_factory=dict)
    # What the request changed, without its arrays (`Intervention.to_wire(arrays=False)`).
    interventions: tuple[Mapping[str, Any], ...] = ()
    # One map per prompt variant: {"prompt", "actions", <latent name>: array, ...}; the latents
    # follow the top-level latent_layout.
    prompt_variants: tuple[Mapping[str, Any], ...] = ()
    # {"logit_lens": {...}, "action_lens": {...}} when the request asked for read-outs.
    readouts: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (
            not isinstance(self.actions, np.ndarray)
            or self.actions.dtype.kind != "f"
            or self.actions.ndim != 2
        ):
            raise ValidationError(
                "actions", "a float array of shape (horizon, action_dim)", self.actions
            )
        for name, array in self.latents.items():
            _check_latent(name, array, self.latent_layout.get(name))
        for name in self.latent_layout:
            if name not in self.latents:
                raise ValidationError(
                    name, "an array (it is in latent_layout)", "nothing (missing key)"
                )
        if self.latents and self.latent_spec is None:
            raise ValidationError("latent_spec", "the spec that produced the latents", None)
        for key in ("server_timing", "policy_timing"):
            _check_timing(key, getattr(self, key))

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"actions": self.actions, **self.latents}
        if self.latents:
            out["latent_layout"] = {
                name: entry.to_wire() for name, entry in self.latent_layout.items()
            }
            out["latent_spec"] = self.latent_spec.to_wire() if self.latent_spec else None
        if self.server_timing:
            out["server_timing"] = dict(self.server_timing)
        if self.policy_timing:
            out["policy_timing"] = dict(self.policy_timing)
        if self.interventions:
            out["interventions"] = [dict(record) for record in self.interventions]
        if self.prompt_variants:
            out["prompt_variants"] = [dict(variant) for variant in self.prompt_variants]
        if self.readouts:
            out["readouts"] = dict(self.readouts)
        return out

    @classmethod
    def from_wire(cls, data: Any) -> PolicyResponse:
        if not isinstance(data, Mapping):
            raise ValidationError("response", "a map with actions", data)
        if "actions" not in data:
            raise ValidationError("actions", "present", "nothing (missing key)")
        raw_layout = data.get("latent_layout") or {}
        if not isinstance(raw_layout, Mapping):
            raise ValidationError("latent_layout", "a map of latent name -> layout", raw_layout)
        layout = {
            str(name): ArrayLayout.from_wire(str(name), entry) for name, entry in raw_layout.items()
        }
        raw_spec = data.get("latent_spec")
        return cls(
            actions=data["actions"],
            latents={name: data[name] for name in LATENT_NAMES if name in data},
            latent_layout=layout,
            latent_spec=None if raw_spec is None else LatentSpec.from_wire(raw_spec),
            server_timing=_timing("server_timing", data.get("server_timing")),
            policy_timing=_timing("policy_timing", data.get("policy_timing")),
            interventions=_records("interventions", data.get("interventions")),
            prompt_variants=_records("prompt_variants", data.get("prompt_variants")),
            readouts=_mapping("readouts", data.get("readouts") or {}),
        )


def _check_latent(name: str, array: object, layout: ArrayLayout | None) -> None:
    if name not in LATENT_NAMES:
        raise ValidationError(name, f"a latent name among {', '.join(LATENT_NAMES)}", name)
    if not isinstance(array, np.ndarray):
        raise ValidationError(name, "an array", array)
    if layout is None:
        raise ValidationError(
            f"latent_layout.{name}", "an entry for every latent array", "nothing (missing key)"
        )
    if array.shape != layout.shape:
        raise ValidationError(name, f"shape {layout.shape} (from latent_layout)", array)
    if _dtype_name(array.dtype) != layout.dtype:
        raise ValidationError(name, f"dtype {layout.dtype} (from latent_layout)", array)


def _dtype_name(dtype: np.dtype) -> str:
    if dtype == np.dtype(ml_dtypes.bfloat16):
        return "bfloat16"
    return dtype.name


def _records(key: str, value: Any) -> tuple[Mapping[str, Any], ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple) or not all(isinstance(v, Mapping) for v in value):
        raise ValidationError(key, "a list of maps", value)
    return tuple(value)


def _timing(key: str, value: Any) -> dict[str, float]:
    if value is None:
        return {}
    _check_timing(key, value)
    return {name: float(ms) for name, ms in value.items()}


def _check_timing(key: str, value: object) -> None:
    if not isinstance(value, Mapping) or not all(
        isinstance(name, str) and isinstance(ms, int | float) and not isinstance(ms, bool)
        for name, ms in value.items()
    ):
        raise ValidationError(key, "a map of str -> milliseconds (float)", value)


# -- server metadata ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerMetadata:
    """The first frame on every connection: what the model is and what it can return."""

    model: str  # e.g. "pi0", "pi05"
    token_layout: TokenLayout
    depth: tuple[int, int]  # layers of expert 0 and expert 1
    width: tuple[int, int]  # hidden widths
    num_heads: int
    action_horizon: int
    action_dim: int
    num_steps: int
    config: Mapping[str, Any] = field(
        default_factory=dict
    )  # free-form summary (checkpoint, dtype, ...)
    presets: Mapping[str, LatentSpec] = field(default_factory=lambda: dict(PRESETS))
    default_preset: str = DEFAULT_PRESET
    protocol_version: str = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValidationError("model", "a non-empty str", self.model)
        if not isinstance(self.token_layout, TokenLayout):
            raise ValidationError("token_layout", "a TokenLayout", self.token_layout)
        for key in ("depth", "width"):
            value = getattr(self, key)
            if not (
                isinstance(value, tuple)
                and len(value) == 2
                and all(_is_int(v) and v > 0 for v in value)
            ):
                raise ValidationError(key, "two positive ints (expert 0, expert 1)", value)
        for key in ("num_heads", "action_horizon", "action_dim", "num_steps"):
            if not (_is_int(getattr(self, key)) and getattr(self, key) > 0):
                raise ValidationError(key, "a positive int", getattr(self, key))
        if not isinstance(self.config, Mapping):
            raise ValidationError("config", "a map", self.config)
        if self.default_preset not in self.presets:
            raise ValidationError(
                "default_preset",
                f"one of the presets ({', '.join(self.presets)})",
                self.default_preset,
            )
        if (
            not isinstance(self.protocol_version, str)
            or self.protocol_version.split(".")[0] != PROTOCOL_VERSION.split(".")[0]
        ):
            raise ValidationError(
                "protocol_version",
                f"a {PROTOCOL_VERSION.split('.')[0]}.x version",
                self.protocol_version,
            )

    @property
    def shape(self) -> ModelShape:
        """What `latent_layouts` needs (the experts share depth; expert 0's is used)."""
        return ModelShape(
            self.token_layout, self.depth[0], self.width, self.num_heads, self.num_steps
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "protocol_version": self.protocol_version,
            "model": self.model,
            "config": dict(self.config),
            "token_layout": self.token_layout.to_wire(),
            "depth": {"expert_0": self.depth[0], "expert_1": self.depth[1]},
            "width": {"expert_0": self.width[0], "expert_1": self.width[1]},
            "num_heads": self.num_heads,
            "action_horizon": self.action_horizon,
            "action_dim": self.action_dim,
            "num_steps": self.num_steps,
            "latent_presets": {name: spec.to_wire() for name, spec in self.presets.items()},
            "default_preset": self.default_preset,
        }

    @classmethod
    def from_wire(cls, data: Any) -> ServerMetadata:
        if not isinstance(data, Mapping):
            raise ValidationError("metadata", "a map", data)
        missing = [key for key in _METADATA_KEYS if key not in data]
        if missing:
            raise ValidationError(missing[0], "present", "nothing (missing key)")
        presets = data["latent_presets"]
        if not isinstance(presets, Mapping):
            raise ValidationError("latent_presets", "a map of name -> latent spec", presets)
        return cls(
            model=data["model"],
            token_layout=TokenLayout.from_wire(_mapping("token_layout", data["token_layout"])),
            depth=_per_expert("depth", data["depth"]),
            width=_per_expert("width", data["width"]),
            num_heads=data["num_heads"],
            action_horizon=data["action_horizon"],
            action_dim=data["action_dim"],
            num_steps=data["num_steps"],
            config=_mapping("config", data.get("config", {})),
            presets={
                str(name): LatentSpec.from_wire(_mapping(f"latent_presets.{name}", spec))
                for name, spec in presets.items()
            },
            default_preset=data["default_preset"],
            protocol_version=data["protocol_version"],
        )


_METADATA_KEYS = (
    "protocol_version", "model", "token_layout", "depth", "width", "num_heads",
    "action_horizon", "action_dim", "num_steps", "latent_presets", "default_preset",
)  # fmt: skip


def _per_expert(key: str, value: Any) -> tuple[int, int]:
    if not isinstance(value, Mapping) or set(value) != {"expert_0", "expert_1"}:
        raise ValidationError(key, "a map with expert_0 and expert_1", value)
    return value["expert_0"], value["expert_1"]


def _mapping(key: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValidationError(key, "a map", value)
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
