"""pi0 / pi0.5: prefix (images + prompt) through expert 0, suffix (state + noisy actions) through
expert 1, and flow-matching sampling.

Sampling runs the prefix once, keeping its per-layer keys and values, then `num_steps` Euler steps
from t = 1 (noise) towards t = 0, each running only the suffix through expert 1 against the cached
prefix. The whole loop is one `lax.scan` inside whatever jit the caller builds.

Masks follow big_vision's prefix-LM rule: each token has an "ar" flag; a token attends to valid
tokens whose cumulative flag count is <= its own. Prefix flags are 0; the state token (pi0) and the
first action token are 1. Positions count valid tokens only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from latentpi.server.model.configs import ModelConfig
from latentpi.server.model.gemma import Gemma, LayerTap
from latentpi.server.model.intervene import EditPlan, EditValues
from latentpi.server.model.pixels import PIXEL_TO_MODEL
from latentpi.server.model.vision import SigLIP


@flax.struct.dataclass
class Observation:
    """What the model sees, batched. Images are float in [-1, 1] or uint8 (converted here)."""

    images: dict[str, jnp.ndarray]  # slot -> (B, H, W, 3)
    image_masks: dict[str, jnp.ndarray]  # slot -> (B,) bool
    state: jnp.ndarray  # (B, action_dim)
    tokenized_prompt: jnp.ndarray  # (B, max_token_len) int32
    tokenized_prompt_mask: jnp.ndarray  # (B, max_token_len) bool

    @property
    def batch_size(self) -> int:
        return int(self.state.shape[0])


@dataclass(frozen=True)
class Prefix:
    """The prefix pass's results that the denoising steps and the capture need."""

    kv_cache: tuple[jnp.ndarray, jnp.ndarray]  # (depth, B, P, K, H) each
    mask: jnp.ndarray  # (B, P) valid prefix tokens
    final_normed: jnp.ndarray  # (B, P, width_0)
    taps: Any  # per-layer taps (depth leading) or None
    last: jnp.ndarray  # (B, P, width_0) residual stream after the last layer


def make_attn_mask(input_mask: jnp.ndarray, ar_mask: np.ndarray) -> jnp.ndarray:
    """(B, N) valid tokens and (N,) ar flags -> (B, N, N) bool: query n may attend to key m."""
    cumsum = jnp.cumsum(jnp.broadcast_to(ar_mask, input_mask.shape), axis=1)
    causal = cumsum[:, None, :] <= cumsum[:, :, None]
    return causal & input_mask[:, None, :] & input_mask[:, :, None]


def posemb_sincos(
    t: jnp.ndarray, width: int, min_period: float = 4e-3, max_period: float = 4.0
) -> jnp.ndarray:
    """Sine-cosine embedding (B, width) of scalar times t (B,), geometric periods, sin half first."""
    fraction = jnp.linspace(0.0, 1.0, width // 2)
    period = min_period * (max_period / min_period) ** fraction
    angles = jnp.einsum(
        "i,j->ij", t, 1.0 / period * 2 * jnp.pi, precision=jax.lax.Precision.HIGHEST
    )
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def to_model_images(image: jnp.ndarray) -> jnp.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] through the exact table (see pixels.py); float images pass
    through."""
    if image.dtype == jnp.uint8:
        return jnp.asarray(PIXEL_TO_MODEL)[image.astype(jnp.int32)]
    return image


class PaliGemma(nn.Module):
    """The `PaliGemma` parameter group: `llm` (both experts) and `img` (SigLIP)."""

    config: ModelConfig
    tap: LayerTap | None = None
    edits: EditPlan | None = None

    def setup(self) -> None:
        cfg = self.config
        self.llm = Gemma(
            (cfg.expert_0, cfg.expert_1), cfg.vocab_size, cfg.dtype, tap=self.tap, edits=self.edits
        )
        self.img = SigLIP(cfg.vision, out_width=cfg.expert_0.width, dtype=cfg.dtype)


class Pi0(nn.Module):
    """The network. `tap`, when set, reduces every layer's residual stream inside the layer scan;
    `edits`, when set, changes it (interventions, model/intervene.py)."""

    config: ModelConfig
    tap: LayerTap | None = None
    edits: EditPlan | None = None

    def setup(self) -> None:
        width = self.config.expert_1.width
        self.PaliGemma = PaliGemma(self.config, self.tap, self.edits)
        self.action_in_proj = nn.Dense(width)
        if self.config.pi05:
            self.time_mlp_in = nn.Dense(width)
            self.time_mlp_out = nn.Dense(width)
        else:
            self.state_proj = nn.Dense(width)
            self.action_time_mlp_in = nn.Dense(width)
            self.action_time_mlp_out = nn.Dense(width)
        self.action_out_proj = nn.Dense(self.config.action_dim)

    def __call__(self, obs: Observation, noise: jnp.ndarray) -> jnp.ndarray:
        """One prefix pass and one denoising step: touches every parameter (for init)."""
        prefix = self.prefix_pass(obs)
        v_t, _, _ = self.velocity(
            obs.state, noise, jnp.ones(noise.shape[0]), prefix.kv_cache, prefix.mask
        )
        return v_t

    def embed_prefix(self, obs: Observation) -> tuple[jnp.ndarray, jnp.ndarray]:
        """-> tokens (B, P, width_0), valid mask (B, P). All prefix ar flags are 0."""
        tokens, masks = [], []
        for slot in self.config.image_slots:
            image_tokens = self.PaliGemma.img(to_model_images(obs.images[slot]))
            tokens.append(image_tokens)
            masks.append(jnp.repeat(obs.image_masks[slot][:, None], image_tokens.shape[1], axis=1))
        tokens.append(self.PaliGemma.llm.embed(obs.tokenized_prompt))
        masks.append(obs.tokenized_prompt_mask)
        return jnp.concatenate(tokens, axis=1), jnp.concatenate(masks, axis=1).astype(bool)

    def prefix_pass(self, obs: Observation, edit_values: EditValues | None = None) -> Prefix:
        tokens, mask = self.embed_prefix(obs)
        attn_mask = make_attn_mask(mask, np.zeros(mask.shape[1], bool))
        positions = jnp.cumsum(mask, axis=1) - 1
        (normed, _), (last, _), kv_cache, taps = self.PaliGemma.llm(
            [tokens, None], positions, attn_mask, tap_aux=mask, edit_ctx=_ctx(edit_values, -1)
        )
        return Prefix(kv_cache=kv_cache, mask=mask, final_normed=normed, taps=taps, last=last)

    def embed_suffix(
        self, state: jnp.ndarray, x_t: jnp.ndarray, time: jnp.ndarray
    ) -> tuple[jnp.ndarray, np.ndarray, jnp.ndarray | None]:
        """-> tokens (B, S, width_1), ar flags (S,), adaRMS conditioning (pi0.5) or None."""
        horizon = self.config.action_horizon
        action_tokens = self.action_in_proj(x_t)
        time_emb = posemb_sincos(time, self.config.expert_1.width)
        ar = np.zeros(horizon, bool)
        ar[0] = True  # the prefix (and state) never attend to the actions
        if self.config.pi05:
            return action_tokens, ar, self._time_condition(time_emb)
        time_tokens = jnp.repeat(time_emb[:, None, :], horizon, axis=1)
        mixed = self.action_time_mlp_in(jnp.concatenate([action_tokens, time_tokens], axis=-1))
        mixed = self.action_time_mlp_out(nn.swish(mixed))
        state_token = self.state_proj(state)[:, None, :]
        return jnp.concatenate([state_token, mixed], axis=1), np.concatenate([[True], ar]), None

    def _time_condition(self, time_emb: jnp.ndarray) -> jnp.ndarray:
        """pi0.5's adaRMS conditioning vector of a time embedding."""
        return nn.swish(self.time_mlp_out(nn.swish(self.time_mlp_in(time_emb))))

    # -- read-outs (docs/interventions.md): a residual-stream entry through the model's own heads --
    def logit_lens(self, x: jnp.ndarray) -> jnp.ndarray:
        """Expert-0 residual states (..., width_0) -> logits over the vocabulary (..., vocab),
        through the final norm and the tied token embedding, in float32."""
        normed, _ = self.PaliGemma.llm.final_norms[0](x.astype(jnp.float32), None)
        table = self.PaliGemma.llm.embedder.variables["params"]["input_embedding"]
        return jnp.einsum("...D,VD->...V", normed, table.astype(jnp.float32))

    def action_lens(self, x: jnp.ndarray, time: jnp.ndarray) -> jnp.ndarray:
        """Expert-1 residual states at the action positions (B, horizon, width_1) at time t (B,)
        -> the velocity that entry would predict (B, horizon, action_dim)."""
        cond = None
        if self.config.pi05:
            cond = self._time_condition(posemb_sincos(time, self.config.expert_1.width))
        normed, _ = self.PaliGemma.llm.final_norms[1](x.astype(self.config.dtype), cond)
        return self.action_out_proj(normed)

    def velocity(
        self,
        state: jnp.ndarray,
        x_t: jnp.ndarray,
        time: jnp.ndarray,
        kv_cache: tuple[jnp.ndarray, jnp.ndarray],
        prefix_mask: jnp.ndarray,
        edit_values: EditValues | None = None,
        step: jnp.ndarray | int = -1,
    ) -> tuple[jnp.ndarray, Any, jnp.ndarray]:
        """One denoising step's network call -> (v_t, per-layer taps, last-layer residual stream)."""
        tokens, ar, cond = self.embed_suffix(state, x_t, time)
        batch, length = tokens.shape[:2]
        suffix_mask = jnp.ones((batch, length), bool)
        to_prefix = jnp.repeat(prefix_mask[:, None, :], length, axis=1)
        attn_mask = jnp.concatenate([to_prefix, make_attn_mask(suffix_mask, ar)], axis=-1)
        positions = jnp.sum(prefix_mask, axis=-1)[:, None] + jnp.cumsum(suffix_mask, axis=-1) - 1
        (_, normed), (_, last), _, taps = self.PaliGemma.llm(
            [None, tokens],
            positions,
            attn_mask,
            adarms_cond=[None, cond],
            kv_cache=kv_cache,
            tap_aux=prefix_mask,
            edit_ctx=_ctx(edit_values, step),
        )
        v_t = self.action_out_proj(normed[:, -self.config.action_horizon :])
        return v_t, taps, last


@dataclass(frozen=True)
class SampleResult:
    actions: jnp.ndarray  # (B, action_horizon, action_dim)
    prefix: Prefix
    kept: Any  # the kept steps' `reduce_step` outputs, stacked in the order of `keep_steps`


def sample_actions(
    module: Pi0,
    params: Any,
    obs: Observation,
    noise: jnp.ndarray,
    reduce_step: Callable[[jnp.ndarray, Any, jnp.ndarray], Any] | None = None,
    keep_steps: tuple[int, ...] = (),
    edit_values: EditValues | None = None,
) -> SampleResult:
    """Flow-matching sampling (traceable; jit it).

    `reduce_step(v_t, taps, last)`, if given, maps a denoising step's outputs to what is kept; only
    the steps in `keep_steps` are kept, written into a buffer carried through the loop (the other
    steps write to one scratch row), so the device holds len(keep_steps) + 1 steps, not all."""
    variables = {"params": params}
    num_steps = module.config.num_steps
    dt = -1.0 / num_steps
    batch = noise.shape[0]
    prefix = module.apply(variables, obs, edit_values, method=Pi0.prefix_pass)

    def network(
        x_t: jnp.ndarray, time: jnp.ndarray, step: jnp.ndarray
    ) -> tuple[jnp.ndarray, Any, jnp.ndarray]:
        time = jnp.broadcast_to(time, (batch,))
        return module.apply(
            variables,
            obs.state,
            x_t,
            time,
            prefix.kv_cache,
            prefix.mask,
            edit_values,
            step,
            method=Pi0.velocity,
        )

    keep = reduce_step is not None and bool(keep_steps)
    buffers = None
    if keep:
        shapes = jax.eval_shape(
            lambda x: reduce_step(*network(x, jnp.float32(1.0), jnp.int32(0))), noise
        )
        buffers = jax.tree.map(
            lambda s: jnp.zeros((len(keep_steps) + 1, *s.shape), s.dtype), shapes
        )
        slot_of_step = np.full(num_steps, len(keep_steps), np.int32)
        slot_of_step[list(keep_steps)] = np.arange(len(keep_steps))

    def step(carry: tuple[jnp.ndarray, jnp.ndarray, Any], index: jnp.ndarray):
        x_t, time, buffers = carry
        v_t, taps, last = network(x_t, time, index)
        if keep:
            slot = jnp.asarray(slot_of_step)[index]

            def write(buf: jnp.ndarray, value: jnp.ndarray) -> jnp.ndarray:
                return jax.lax.dynamic_update_index_in_dim(buf, value, slot, 0)

            buffers = jax.tree.map(write, buffers, reduce_step(v_t, taps, last))
        return (x_t + dt * v_t, time + dt, buffers), None

    # t runs 1, 1 + dt, ... accumulated in float32 exactly as openpi's while loop does.
    init = (noise, jnp.float32(1.0), buffers)
    (actions, _, buffers), _ = jax.lax.scan(step, init, jnp.arange(num_steps))
    kept = jax.tree.map(lambda buf: buf[:-1], buffers) if keep else None
    return SampleResult(actions=actions, prefix=prefix, kept=kept)


def _ctx(values: EditValues | None, step: jnp.ndarray | int) -> Any:
    """What the layers need to apply edits: None (no edits: nothing changes in the program)."""
    return None if values is None else (values, jnp.asarray(step, jnp.int32))


def init_params(config: ModelConfig, rng: jax.Array, batch: int = 1) -> Any:
    """Random parameters (float32), for tests and benchmarks."""
    obs, noise = fake_inputs(config, batch)
    return Pi0(config).init(rng, obs, noise)["params"]


def param_shapes(config: ModelConfig) -> Any:
    """The parameter tree as ShapeDtypeStructs, without allocating anything."""
    obs, noise = fake_inputs(config, 1)
    return jax.eval_shape(lambda: Pi0(config).init(jax.random.key(0), obs, noise))["params"]


def fake_inputs(config: ModelConfig, batch: int) -> tuple[Observation, jnp.ndarray]:
    height, width = config.vision.image_size
    obs = Observation(
        images={s: jnp.zeros((batch, height, width, 3), jnp.float32) for s in config.image_slots},
        image_masks={s: jnp.ones((batch,), bool) for s in config.image_slots},
        state=jnp.zeros((batch, config.action_dim), jnp.float32),
        tokenized_prompt=jnp.zeros((batch, config.max_token_len), jnp.int32),
        tokenized_prompt_mask=jnp.ones((batch, config.max_token_len), bool),
    )
    return obs, jnp.zeros((batch, config.action_horizon, config.action_dim), jnp.float32)
