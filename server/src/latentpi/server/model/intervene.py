"""Interventions inside the compiled sampler: a hashable `EditPlan` (the structure, static) and
per-row values (the arrays and scales, arguments of the compiled function).

Each layer of the scan knows its index (a scanned iota) and the denoising step (-1 in the prefix
pass); an edit computes its change at every layer and keeps it only where the plan's static tables
say it is active (`jnp.where`), so an inactive layer's values are the original bits. Arrays are
applied in float32 and cast back to the model dtype: an `add` with scale 0, or a `set` with the
site's own activations, leaves every bit as it was.

Values of one batch: a tuple with one dict per edit, each array with a leading batch axis:
  vector / value  (B, W) | (B, P, W) | (B, L, P, W)   L = the edit's layers, P = its positions
  mean            (B, W)
  factors         (B, units)
  scale           (B,)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np

from latentpi.protocol.interventions import Intervention, ModelDims
from latentpi.server.model.configs import ModelConfig, token_layout

EditValues = tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class Edit:
    """One resolved intervention's structure."""

    op: str  # add, set, ablate, scale_units, attention_knockout
    expert: int  # the expert whose pass it acts in (the queries' expert for a knockout)
    point: str  # residual, attn_out, mlp_hidden, attention (knockout)
    layers: tuple[int, ...]  # in the request's order: per-layer arrays follow it
    steps: tuple[int, ...] | None  # None: the prefix pass
    span: tuple[int, int]  # positions in the expert's own sequence (the queries for a knockout)
    key_span: tuple[int, int] | None = None  # knockout: key positions in the pass's key sequence
    units: tuple[int, ...] | None = None
    has_mean: bool = False
    # (name, shape) of every array argument: a new shape is a new program (and another batch).
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def slot_table(self, depth: int) -> np.ndarray:
        """Layer -> index into a per-layer value array (0 where the edit is inactive)."""
        table = np.zeros(depth, np.int32)
        table[list(self.layers)] = np.arange(len(self.layers))
        return table


@dataclass(frozen=True)
class EditPlan:
    """All edits of a request, hashable: part of the compiled function's cache key."""

    edits: tuple[Edit, ...]
    depth: int
    num_steps: int

    def active(self, edit: Edit, layer: jnp.ndarray, step: jnp.ndarray) -> jnp.ndarray:
        layers = np.zeros(self.depth, bool)
        layers[list(edit.layers)] = True
        on = jnp.asarray(layers)[layer]
        if edit.steps is not None:
            steps = np.zeros(self.num_steps + 1, bool)  # the last entry: step -1 (prefix pass)
            steps[list(edit.steps)] = True
            on = on & jnp.asarray(steps)[step]
        return on

    def at(self, expert: int, point: str) -> list[tuple[int, Edit]]:
        return [(i, e) for i, e in enumerate(self.edits) if e.expert == expert and e.point == point]


def model_dims(config: ModelConfig) -> ModelDims:
    return ModelDims(
        layout=token_layout(config),
        depth=config.depth,
        num_steps=config.num_steps,
        width=(config.expert_0.width, config.expert_1.width),
        mlp_dim=(config.expert_0.mlp_dim, config.expert_1.mlp_dim),
    )


def plan_of(config: ModelConfig, interventions: Sequence[Intervention]) -> EditPlan:
    """The structure of resolved interventions (see `Intervention.resolve`)."""
    return EditPlan(tuple(_edit(config, i) for i in interventions), config.depth, config.num_steps)


def _edit(config: ModelConfig, intervention: Intervention) -> Edit:
    if intervention.op == "attention_knockout":
        (q_expert, q_name), (k_expert, k_name) = intervention.query, intervention.key  # type: ignore[misc]
        layout = token_layout(config)
        start, stop = layout.span(k_expert, k_name)
        offset = config.prefix_len if k_expert == 1 else 0  # keys: prefix first, then the suffix
        return Edit(
            op="attention_knockout",
            expert=q_expert,
            point="attention",
            layers=intervention.layers or (),
            steps=intervention.steps,
            span=layout.span(q_expert, q_name),
            key_span=(start + offset, stop + offset),
        )
    site = intervention.site
    assert site is not None and site.layers is not None and site.positions is not None
    return Edit(
        op=intervention.op,
        expert=site.expert,
        point=site.point,
        layers=site.layers,
        steps=site.steps,
        span=site.positions,
        units=intervention.units,
        has_mean=intervention.mean is not None,
        shapes=tuple(
            (name, array.shape) for name, array in intervention.values().items() if name != "scale"
        ),
    )


def apply_edits(
    plan: EditPlan | None,
    values: EditValues | None,
    expert: int,
    point: str,
    y: jnp.ndarray,
    layer: jnp.ndarray,
    step: jnp.ndarray,
) -> jnp.ndarray:
    """y (B, T, W) after every active edit of `expert` at `point`."""
    if plan is None or values is None:
        return y
    for index, edit in plan.at(expert, point):
        slot = jnp.asarray(edit.slot_table(plan.depth))[layer]
        edited = _apply(edit, values[index], y, slot)
        y = jnp.where(plan.active(edit, layer, step), edited, y)
    return y


def knock_out(
    plan: EditPlan | None, expert: int, mask: jnp.ndarray, layer: jnp.ndarray, step: jnp.ndarray
) -> jnp.ndarray:
    """The attention mask (B, T, S) with the active knockouts of `expert`'s queries removed."""
    if plan is None:
        return mask
    for _, edit in plan.at(expert, "attention"):
        blocked = np.zeros(mask.shape[1:], bool)
        (q0, q1), (k0, k1) = edit.span, edit.key_span  # type: ignore[misc]
        blocked[q0:q1, k0:k1] = True
        knocked = mask & ~jnp.asarray(blocked)[None]
        mask = jnp.where(plan.active(edit, layer, step), knocked, mask)
    return mask


def _apply(edit: Edit, values: dict[str, Any], y: jnp.ndarray, slot: jnp.ndarray) -> jnp.ndarray:
    start, stop = edit.span
    site = y[:, start:stop].astype(jnp.float32)
    if edit.op == "add":
        new = site + values["scale"][:, None, None] * _per_position(values["vector"], slot)
    elif edit.op == "set":
        new = jnp.broadcast_to(_per_position(values["value"], slot), site.shape)
    elif edit.op == "ablate":
        mean = values["mean"][:, None, :] if edit.has_mean else jnp.zeros_like(site)
        new = jnp.broadcast_to(mean, site.shape)
    else:  # scale_units
        units = np.asarray(edit.units)
        new = site.at[..., units].multiply(values["factors"][:, None, :])
    return y.at[:, start:stop].set(new.astype(y.dtype))


def _per_position(array: jnp.ndarray, slot: jnp.ndarray) -> jnp.ndarray:
    """(B, W) | (B, P, W) | (B, L, P, W) -> broadcastable against the site (B, P, W)."""
    if array.ndim == 2:
        return array[:, None, :]
    if array.ndim == 4:
        return jnp.take(array, slot, axis=1)
    return array


def stack_values(rows: Sequence[EditValues]) -> EditValues:
    """Per-request values (no batch axis) -> one batch's values."""
    return tuple(
        {name: np.stack([row[i][name] for row in rows]) for name in rows[0][i]}
        for i in range(len(rows[0]))
    )
