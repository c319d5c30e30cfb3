"""The parity check: our model against numbers openpi computed (the shared reference `.npz` files).

A reference file holds a model description (`meta_json`), params, inputs, noise and openpi's
outputs. We build the model from the description, load the params (from the file, or from an orbax
checkpoint directory), sample with the same noise while capturing every hidden state, and compare:

  actions                  max |ours - expected| <= 5e-4
  expert_0_hidden_states   per (batch, layer): ||ours - expected|| / ||expected|| <= 1e-4,
                           over valid positions only (unmasked image slots, true prompt tokens)
  expert_0_final_normed    the same, on the final-normed last layer
  expert_1_hidden_states   per (batch, step, layer), every suffix position
  velocity                 per (batch, step)
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from latentpi.protocol.errors import ValidationError
from latentpi.server.model.configs import ModelConfig, token_layout

ACTIONS_TOLERANCE = 5e-4
RELATIVE_TOLERANCE = 1e-4
MAX_BATCH = 64
MAX_META_BYTES = 1 << 16
COMPARED = ("expert_0_hidden_states", "expert_0_final_normed", "expert_1_hidden_states", "velocity")


@dataclass(frozen=True)
class Reference:
    config: ModelConfig
    inputs: dict[str, np.ndarray]  # reference names without the `inputs/` prefix
    expected: dict[str, np.ndarray]  # without `expected/`


@dataclass(frozen=True)
class Row:
    array: str
    metric: str
    value: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return bool(self.value <= self.tolerance)  # NaN fails


@dataclass(frozen=True)
class ParityReport:
    path: str
    config: ModelConfig
    batch: int
    params_source: str
    rows: tuple[Row, ...]

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows)

    def table(self) -> str:
        cfg = self.config
        lines = [
            f"{os.path.basename(self.path)}: {cfg.variant}, batch {self.batch}, prefix {cfg.prefix_len}, "
            f"suffix {cfg.suffix_len}, {cfg.num_steps} steps, params from {self.params_source}",
            f"  {'array':<24} {'metric':<26} {'value':>10} {'tolerance':>10}  result",
        ]
        for row in self.rows:
            verdict = "ok" if row.ok else "FAIL"
            lines.append(
                f"  {row.array:<24} {row.metric:<26} {row.value:>10.2e} {row.tolerance:>10.1e}  {verdict}"
            )
        lines.append(f"  parity: {'PASS' if self.ok else 'FAIL'}")
        return "\n".join(lines)


def read_reference(path: str | os.PathLike[str]) -> Reference:
    """The model description, inputs and expected outputs of a reference file (no pickles)."""
    with np.load(path, allow_pickle=False) as archive:
        if "meta_json" not in archive.files:
            raise ValidationError(
                f"{path}: meta_json",
                "a reference .npz with a meta_json entry",
                sorted(archive.files)[:8],
            )
        raw = archive["meta_json"]
        if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size > MAX_META_BYTES:
            raise ValidationError("meta_json", f"uint8 bytes (at most {MAX_META_BYTES})", raw)
        meta = json.loads(raw.tobytes().decode())
        if not isinstance(meta, Mapping):
            raise ValidationError("meta_json", "a JSON object", meta)
        config = ModelConfig.from_meta(meta)
        inputs = {
            name[len("inputs/") :]: archive[name]
            for name in archive.files
            if name.startswith("inputs/")
        }
        expected = {
            name[len("expected/") :]: archive[name]
            for name in archive.files
            if name.startswith("expected/")
        }
    if "num_steps" in inputs:
        config = dataclasses.replace(config, num_steps=int(inputs.pop("num_steps")))
    _check_shapes(config, inputs, expected)
    return Reference(config=config, inputs=inputs, expected=expected)


def _check_shapes(
    config: ModelConfig, inputs: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]
) -> None:
    noise = inputs.get("noise")
    if noise is None or noise.ndim != 3 or not 1 <= noise.shape[0] <= MAX_BATCH:
        raise ValidationError(
            "inputs/noise", f"(batch <= {MAX_BATCH}, action_horizon, action_dim)", noise
        )
    batch = noise.shape[0]
    height, width = config.vision.image_size
    want = {
        "noise": (batch, config.action_horizon, config.action_dim),
        "state": (batch, config.action_dim),
        "tokenized_prompt": (batch, config.max_token_len),
        "tokenized_prompt_mask": (batch, config.max_token_len),
    }
    for slot in config.image_slots:
        want[f"image/{slot}"] = (batch, height, width, 3)
        want[f"image_mask/{slot}"] = (batch,)
    depth, steps = config.depth, config.num_steps
    want_expected = {
        "actions": want["noise"],
        "expert_0_hidden_states": (batch, depth + 1, config.prefix_len, config.expert_0.width),
        "expert_0_final_normed": (batch, config.prefix_len, config.expert_0.width),
        "expert_1_hidden_states": (
            batch,
            steps,
            depth + 1,
            config.suffix_len,
            config.expert_1.width,
        ),
        "velocity": (batch, steps, config.action_horizon, config.action_dim),
    }
    for prefix, arrays, shapes in (("inputs", inputs, want), ("expected", expected, want_expected)):
        for name, shape in shapes.items():
            value = arrays.get(name)
            if value is None or tuple(value.shape) != shape:
                raise ValidationError(f"{prefix}/{name}", f"an array of shape {shape}", value)


def valid_prefix_positions(config: ModelConfig, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """(B, prefix_len) bool: tokens of unmasked image slots and true prompt tokens."""
    layout = token_layout(config)
    batch = inputs["state"].shape[0]
    valid = np.zeros((batch, config.prefix_len), bool)
    for slot in config.image_slots:
        start, stop = layout.span(0, slot)
        valid[:, start:stop] = np.asarray(inputs[f"image_mask/{slot}"], bool)[:, None]
    start, stop = layout.span(0, "prompt")
    valid[:, start:stop] = np.asarray(inputs["tokenized_prompt_mask"], bool)
    return valid


def worst_relative_error(
    ours: np.ndarray, expected: np.ndarray, valid: np.ndarray | None, position_axis: int
) -> float:
    """max over every entry (all axes before `position_axis`) of ||ours - expected|| / ||expected||,
    over the valid positions (valid: (B, positions), broadcast over the middle axes)."""
    ours, expected = np.asarray(ours, np.float64), np.asarray(expected, np.float64)
    if valid is not None:
        shape = (
            [valid.shape[0]]
            + [1] * (position_axis - 1)
            + [valid.shape[1]]
            + [1] * (ours.ndim - position_axis - 1)
        )
        weights = valid.reshape(shape)
        ours, expected = ours * weights, expected * weights
    axes = tuple(range(position_axis, ours.ndim))
    error = np.sqrt(np.sum((ours - expected) ** 2, axis=axes))
    scale = np.sqrt(np.sum(expected**2, axis=axes))
    return float(np.max(error / np.maximum(scale, np.finfo(np.float64).tiny)))


def compare(
    reference: Reference, actions: np.ndarray, latents: Mapping[str, np.ndarray]
) -> tuple[Row, ...]:
    expected, valid = reference.expected, valid_prefix_positions(reference.config, reference.inputs)
    rows = [
        Row(
            "actions",
            "max |Δ|",
            float(np.max(np.abs(actions - expected["actions"]))),
            ACTIONS_TOLERANCE,
        )
    ]
    positions = {
        "expert_0_hidden_states": 2,
        "expert_0_final_normed": 1,
        "expert_1_hidden_states": 3,
        "velocity": 2,
    }
    for name in COMPARED:
        mask = valid if name.startswith("expert_0") else None
        error = worst_relative_error(latents[name], expected[name], mask, positions[name])
        metric = "worst rel, valid positions" if mask is not None else "worst rel"
        rows.append(Row(name, metric, error, RELATIVE_TOLERANCE))
    return tuple(rows)


def check_file(
    path: str | os.PathLike[str],
    *,
    checkpoint: str | None = None,
    params: Any = None,
    sampler: Any = None,
) -> ParityReport:
    """Runs one reference file. Params: `params` if given, else from `checkpoint`, else the file's.
    `sampler`: a `CompiledSampler` of the file's config to reuse (its compiled functions)."""
    import jax

    from latentpi.protocol.latent_spec import LatentSpec
    from latentpi.server.model import capture
    from latentpi.server.model import checkpoint as checkpoints
    from latentpi.server.model.pi0 import param_shapes

    reference = read_reference(path)
    config = reference.config
    if params is not None:
        source = "caller"
    elif checkpoint is not None:
        source = str(checkpoint)
        params = checkpoints.load_params(checkpoint, dtype="float32", expected=param_shapes(config))
    else:
        source = "the .npz"
        params = checkpoints.load_params_npz(path, dtype="float32", expected=param_shapes(config))
    if sampler is None or sampler.config != config:
        sampler = capture.CompiledSampler(config)
    obs = capture.observation_from_arrays(reference.inputs, config)
    full = LatentSpec(text_only=False)
    # float32 matmuls at full precision on every backend (GPUs would otherwise use TF32).
    with jax.default_matmul_precision("highest"):
        actions, latents = sampler.sample_actions(
            params, obs, reference.inputs["noise"], full, trace=True
        )
    return ParityReport(
        str(path), config, int(actions.shape[0]), source, compare(reference, actions, latents)
    )
