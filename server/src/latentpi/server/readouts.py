"""Read-outs of captured states through the model's own heads, computed on the device.

  logit lens   expert-0 residual entries (text_only or expert_0 hidden states, every captured
               layer and position) through the final norm and the tied token embedding: the top-k
               token ids and logits, decoded with the server's tokenizer.
  action lens  expert-1 residual entries at the action positions (every captured step and layer)
               through the final norm (adaptive for pi0.5, at that step's time) and
               `action_out_proj`: the velocity that layer would predict. At the last entry it is
               the model's own velocity.

They read the request's captured latents, so the latent spec says which layers, steps and positions
(pooling "none"); a spec that does not capture what a read-out needs is a named error.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from latentpi.protocol.errors import ValidationError
from latentpi.protocol.latent_layout import ArrayLayout
from latentpi.server.model.configs import ModelConfig
from latentpi.server.model.pi0 import Pi0

LOGIT_SOURCES = ("text_only_hidden_states", "expert_0_hidden_states")
ACTION_SOURCE = "expert_1_hidden_states"


class Readouts:
    """The compiled lens functions of one model (compiled once per input shape)."""

    def __init__(self, config: ModelConfig, tokenizer: Any = None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        module = Pi0(config)

        def top_tokens(params: Any, states: Any, top_k: int) -> Any:
            logits = module.apply({"params": params}, states, method=Pi0.logit_lens)
            return jax.lax.top_k(logits, top_k)

        def velocities(params: Any, states: Any, time: Any) -> Any:
            return module.apply({"params": params}, states, time, method=Pi0.action_lens)

        self._top_tokens = jax.jit(top_tokens, static_argnums=(2,))
        self._velocities = jax.jit(velocities)

    def check(self, wanted: Mapping[str, Any], layouts: Mapping[str, ArrayLayout]) -> None:
        """ValidationError (at prepare, so the client gets a bad request) when the latents the
        request captures cannot feed its read-outs."""
        if "logit_lens" in wanted and not any(_positions(layouts.get(n)) for n in LOGIT_SOURCES):
            raise ValidationError(
                "readouts.logit_lens",
                "a latent_spec capturing text_only or expert_0 states with pooling 'none'",
                sorted(layouts),
            )
        if "action_lens" in wanted and not (
            _positions(layouts.get(ACTION_SOURCE))
            and _segment(layouts.get(ACTION_SOURCE), "actions")
        ):
            raise ValidationError(
                "readouts.action_lens",
                "a latent_spec capturing expert_1 states of the 'actions' segment with pooling 'none'",
                sorted(layouts),
            )

    def compute(
        self,
        params: Any,
        wanted: Mapping[str, Any],
        latents: Mapping[str, np.ndarray],
        layouts: Mapping[str, ArrayLayout],
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "logit_lens" in wanted:
            out["logit_lens"] = self.logit_lens(
                params, wanted["logit_lens"]["top_k"], latents, layouts
            )
        if "action_lens" in wanted:
            out["action_lens"] = self.action_lens(params, latents, layouts)
        return out

    def logit_lens(
        self,
        params: Any,
        top_k: int,
        latents: Mapping[str, np.ndarray],
        layouts: Mapping[str, ArrayLayout],
    ) -> dict[str, Any]:
        source = next((name for name in LOGIT_SOURCES if _positions(layouts.get(name))), None)
        if source is None:
            raise ValidationError(
                "readouts.logit_lens",
                "a latent_spec capturing text_only or expert_0 states with pooling 'none'",
                "no such latents",
            )
        states = np.asarray(latents[source], np.float32)  # (layer, position, width)
        logits, ids = self._top_tokens(params, states, top_k)
        ids = np.asarray(ids, np.int32)
        result = {
            "source": source,
            "layers": list(layouts[source].labels["layers"]),
            "token_ids": ids,
            "logits": np.asarray(logits, np.float32),
        }
        if self.tokenizer is not None:
            result["tokens"] = [
                [[self.tokenizer.decode([t]) for t in row] for row in layer]
                for layer in ids.tolist()
            ]
        return result

    def action_lens(
        self, params: Any, latents: Mapping[str, np.ndarray], layouts: Mapping[str, ArrayLayout]
    ) -> dict[str, Any]:
        layout = layouts.get(ACTION_SOURCE)
        span = _segment(layout, "actions") if _positions(layout) else None
        if span is None:
            raise ValidationError(
                "readouts.action_lens",
                "a latent_spec capturing expert_1 states of the 'actions' segment with pooling 'none'",
                "no such latents",
            )
        steps = list(layout.labels["steps"])  # type: ignore[union-attr]
        states = np.asarray(latents[ACTION_SOURCE], np.float32)[:, :, span[0] : span[1]]
        count, layers = states.shape[:2]
        times = np.repeat(step_times(self.config.num_steps)[steps], layers)
        flat = states.reshape(count * layers, *states.shape[2:])
        velocity = np.asarray(self._velocities(params, flat, times), np.float32)
        return {
            "steps": steps,
            "layers": list(layout.labels["layers"]),  # type: ignore[union-attr]
            "velocity": velocity.reshape(count, layers, *velocity.shape[1:]),
        }


@functools.cache
def step_times(num_steps: int) -> np.ndarray:
    """t at each denoising step, accumulated in float32 as the sampler does (1, 1 + dt, ...)."""
    dt = np.float32(-1.0 / num_steps)
    times = [np.float32(1.0)]
    for _ in range(num_steps - 1):
        times.append(np.float32(times[-1] + dt))
    return np.array(times, np.float32)


def _positions(layout: ArrayLayout | None) -> bool:
    return layout is not None and "position" in layout.axes


def _segment(layout: ArrayLayout | None, name: str) -> tuple[int, int] | None:
    for segment, start, stop in (layout.labels.get("segments") or []) if layout else []:
        if segment == name:
            return int(start), int(stop)
    return None
