"""On-device latent capture: what a `LatentSpec` keeps, reduced inside the compiled sampler.

A `CapturePlan` (config + resolved spec, hashable) is the `LayerTap` of the layer scan: each layer
reduces its input residual stream to the spec's segments (pooled and cast) and its attention
probabilities to segment-to-segment mass, so the scan stacks only those taps. Layers and denoising
steps are then selected inside the same jit, and only the requested arrays leave the device.

Shapes (batch first; see latentpi.protocol.latent_spec for the unbatched ones):
  expert_0_hidden_states  (B, layer, position | segment, width_0)
  text_only_hidden_states (B, layer, prompt position, width_0) | (B, layer, width_0)
  prompt_mask             (B, prompt position) bool
  expert_1_hidden_states  (B, step, layer, position | segment, width_1)
  attention_mass_expert_0 (B, layer, [head,] query segment, key segment) float32
  attention_mass_expert_1 (B, step, layer, [head,] query segment, key segment) float32
Attention layers are the spec's layers below `depth` (residual entry l is the input of layer l,
whose attention is reported as layer l). A segment with no valid position pools to zeros and has
an all-zero attention row. With `trace`, the plan also keeps `velocity` (B, step, horizon,
action_dim) at the spec's steps and `expert_0_final_normed` (B, prefix, width_0): what the parity
check compares. Unselected denoising steps are never stored (see `pi0.sample_actions`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from latentpi.protocol.latent_spec import PROMPT_SEGMENT, LatentSpec, TokenLayout
from latentpi.server.model.configs import ModelConfig, token_layout
from latentpi.server.model.intervene import EditPlan, EditValues
from latentpi.server.model.pi0 import Observation, Pi0, SampleResult, sample_actions

Spans = tuple[tuple[int, int], ...]
STATE_KEYS = ("expert_0_hidden_states", "text_only_hidden_states", "expert_1_hidden_states")


@dataclass(frozen=True)
class CapturePlan:
    """What to keep, as static index tuples; hashable so that it can sit in a flax module."""

    config: ModelConfig
    spec: LatentSpec  # resolved
    trace: bool = False

    @property
    def layout(self) -> TokenLayout:
        return token_layout(self.config)

    @property
    def wants_probs(self) -> bool:
        return self.spec.attention != "none"

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(layer for layer in self.spec.layers or () if layer < self.config.depth)

    def _spans(self, expert: int, names: tuple[str, ...] | None) -> Spans:
        return tuple(self.layout.span(expert, name) for name in names or ())

    # -- per layer, inside the scan (LayerTap) ----------------------------------------------------
    def __call__(
        self, xs: Any, probs: jnp.ndarray | None, prefix_mask: jnp.ndarray
    ) -> dict[str, jnp.ndarray]:
        taps = self.residual(xs, prefix_mask)
        if probs is not None:
            expert = 0 if xs[0] is not None else 1
            taps[f"attention_mass_expert_{expert}"] = self._attention(expert, probs, prefix_mask)
        return taps

    def residual(self, xs: Any, prefix_mask: jnp.ndarray) -> dict[str, jnp.ndarray]:
        """The kept reductions of one residual-stream entry of whichever expert ran."""
        spec, dtype = self.spec, jnp.dtype(self.spec.dtype)
        taps: dict[str, jnp.ndarray] = {}
        if xs[0] is not None:
            if spec.expert_0:
                taps["expert_0_hidden_states"] = reduce_positions(
                    xs[0], self._spans(0, spec.segments_0), prefix_mask, spec.pooling
                ).astype(dtype)
            if spec.text_only:
                prompt = (self.layout.span(0, PROMPT_SEGMENT),)
                text = reduce_positions(xs[0], prompt, prefix_mask, spec.pooling)
                taps["text_only_hidden_states"] = (
                    text if spec.pooling == "none" else text[:, 0]
                ).astype(dtype)
        elif spec.expert_1:
            valid = jnp.ones(xs[1].shape[:2], bool)
            taps["expert_1_hidden_states"] = reduce_positions(
                xs[1], self._spans(1, spec.segments_1), valid, spec.pooling
            ).astype(dtype)
        return taps

    def _attention(self, expert: int, probs: jnp.ndarray, prefix_mask: jnp.ndarray) -> jnp.ndarray:
        prefix_spans = self._spans(0, self.layout.names(0))
        if expert == 0:
            query_spans, key_spans, query_valid = prefix_spans, prefix_spans, prefix_mask
        else:
            offset = self.config.prefix_len
            query_spans = self._spans(1, self.layout.names(1))
            key_spans = prefix_spans + tuple((a + offset, b + offset) for a, b in query_spans)
            query_valid = jnp.ones(probs.shape[:1] + probs.shape[2:3], bool)
        mass = attention_mass(probs, query_spans, query_valid, key_spans)
        return mass.mean(axis=1) if self.spec.attention == "head_mean" else mass

    # -- after the scans --------------------------------------------------------------------------
    def stack_layers(
        self, taps: dict[str, jnp.ndarray], last: dict[str, jnp.ndarray]
    ) -> dict[str, jnp.ndarray]:
        """Per-layer taps (depth, B, ...) plus the last layer's output (B, ...) -> the selected
        layers, batch first: (B, layer, ...)."""
        out = {}
        for name, value in taps.items():
            if name in STATE_KEYS:
                value = jnp.concatenate([value, last[name][None]], axis=0)[
                    np.asarray(self.spec.layers)
                ]
            else:
                value = value[np.asarray(self.attention_layers, dtype=np.int32)]
            out[name] = jnp.moveaxis(value, 0, 1)
        return out

    def step_outputs(
        self, v_t: jnp.ndarray, taps: Any, last: jnp.ndarray
    ) -> dict[str, jnp.ndarray]:
        """What one kept denoising step contributes (the step loop's `reduce_step`)."""
        out = (
            self.stack_layers(taps, self.residual([None, last], jnp.zeros((1, 1), bool)))
            if taps
            else {}
        )
        if self.trace:
            out["velocity"] = v_t
        return out

    @property
    def needs_steps(self) -> bool:
        return self.spec.expert_1 or self.wants_probs or self.trace

    def collect(self, result: SampleResult, obs: Observation) -> dict[str, jnp.ndarray]:
        prefix = result.prefix
        latents = self.stack_layers(prefix.taps, self.residual([prefix.last, None], prefix.mask))
        if self.spec.text_only:
            latents["prompt_mask"] = obs.tokenized_prompt_mask.astype(bool)
        for name, value in (result.kept or {}).items():  # (step, B, ...) -> (B, step, ...)
            latents[name] = jnp.moveaxis(value, 0, 1)
        if self.trace:
            latents["expert_0_final_normed"] = prefix.final_normed
        return latents


def reduce_positions(x: jnp.ndarray, spans: Spans, valid: jnp.ndarray, pooling: str) -> jnp.ndarray:
    """x (B, L, D) -> the spans' positions (B, sum of lengths, D), or per span the mean over its
    valid positions / its last valid position (B, spans, D), in float32."""
    if pooling == "none":
        return jnp.concatenate([x[:, a:b] for a, b in spans], axis=1)
    pool = _mean_valid if pooling == "mean" else _last_valid
    return jnp.stack([pool(x[:, a:b].astype(jnp.float32), valid[:, a:b]) for a, b in spans], axis=1)


def _mean_valid(x: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
    weights = valid.astype(jnp.float32)
    total = jnp.sum(x * weights[..., None], axis=1)
    return total / jnp.maximum(jnp.sum(weights, axis=1), 1.0)[:, None]


def _last_valid(x: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
    index = valid.shape[1] - 1 - jnp.argmax(valid[:, ::-1], axis=1)
    picked = jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]
    return jnp.where(jnp.any(valid, axis=1)[:, None], picked, 0.0)


def attention_mass(
    probs: jnp.ndarray, query_spans: Spans, query_valid: jnp.ndarray, key_spans: Spans
) -> jnp.ndarray:
    """probs (B, N, T, S) -> (B, N, query segment, key segment): the probability mass each
    segment's valid queries put on each key segment, averaged over those queries."""
    to_keys = jnp.stack(
        [jnp.sum(probs[..., a:b], axis=-1) for a, b in key_spans], axis=-1
    )  # (B, N, T, k)
    rows = []
    for a, b in query_spans:
        weights = query_valid[:, a:b].astype(jnp.float32)
        weights = weights / jnp.maximum(jnp.sum(weights, axis=1, keepdims=True), 1.0)
        rows.append(jnp.sum(to_keys[:, :, a:b] * weights[:, None, :, None], axis=2))
    return jnp.stack(rows, axis=2)


# -- the compiled entry point ---------------------------------------------------------------------
def run_sampler(
    config: ModelConfig,
    plan: CapturePlan | None,
    params: Any,
    obs: Observation,
    noise: jnp.ndarray,
    edits: EditPlan | None = None,
    edit_values: EditValues | None = None,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """Actions and latents; `plan` None builds plain inference with no capture code at all, and
    `edits` None no intervention code."""
    if plan is None:
        module = Pi0(config, edits=edits)
        return sample_actions(module, params, obs, noise, edit_values=edit_values).actions, {}
    reduce_step = plan.step_outputs if plan.needs_steps else None
    module = Pi0(config, tap=plan, edits=edits)
    result = sample_actions(
        module,
        params,
        obs,
        noise,
        reduce_step,
        keep_steps=plan.spec.steps or (),
        edit_values=edit_values,
    )
    return result.actions, plan.collect(result, obs)


def run_sampler_by_row(
    config: ModelConfig,
    plan: CapturePlan | None,
    params: Any,
    obs: Observation,
    noise: jnp.ndarray,
    edits: EditPlan | None = None,
    edit_values: EditValues | None = None,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """`run_sampler` one row at a time inside the same program (`lax.map`): every row runs the same
    batch-1 computation whatever its batch, so its numbers never depend on its neighbours. A
    vectorized batch does not promise that: XLA picks matmul blockings by shape (on CPU, batch 4
    moves actions by ~1e-7 against batch 1)."""

    def one_row(row: tuple[Observation, jnp.ndarray, EditValues | None]) -> Any:
        obs_1, noise_1, values_1 = jax.tree.map(lambda x: x[None], row)
        out = run_sampler(config, plan, params, obs_1, noise_1, edits, values_1)
        return jax.tree.map(lambda x: x[0], out)

    return jax.lax.map(one_row, (obs, noise, edit_values))


CacheKey = tuple[int, str, LatentSpec | None, bool, EditPlan | None]
DEFAULT_MAX_PROGRAMS = 256  # compiled programs kept; each holds its executable in memory


@dataclass
class CompiledSampler:
    """Compiled samplers for one model, cached per (batch size, image dtype, resolved spec, trace,
    intervention structure). Intervention values are arguments: new values never recompile.

    by_row: run each batch row by row (`run_sampler_by_row`): a request's result is bit-identical
    in any batch, at the cost of batching's throughput on accelerators.

    Thread-safe: a request whose function is cached never waits for another spec's compile (compiles
    run outside the lock; concurrent requests for the same new key wait for one compile).

    max_programs bounds the cache (least recently used out first): every distinct latent spec or
    intervention structure a client sends is a program held for the process's life otherwise."""

    config: ModelConfig
    by_row: bool = False
    max_programs: int = DEFAULT_MAX_PROGRAMS
    _cache: OrderedDict[CacheKey, Future] = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def resolve(self, spec: LatentSpec | None) -> LatentSpec | None:
        if spec is None:
            return None
        return spec.resolve(token_layout(self.config), self.config.depth, self.config.num_steps)

    def sample_actions(
        self,
        params: Any,
        observation: Observation,
        noise: Any,
        spec: LatentSpec | None = None,
        *,
        trace: bool = False,
        edits: EditPlan | None = None,
        edit_values: EditValues | None = None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """-> actions (B, horizon, action_dim) and the spec's latents, as host numpy arrays."""
        observation, noise = canonical_inputs(observation, noise)
        compiled = self.compiled(
            params, observation, noise, spec, trace=trace, edits=edits, edit_values=edit_values
        )
        args = (params, observation, noise)
        if edits is not None:
            args += (_as_float32(edit_values),)
        actions, latents = compiled(*args)
        return jax.device_get((actions, latents))

    def compiled(
        self,
        params: Any,
        observation: Observation,
        noise: Any,
        spec: LatentSpec | None = None,
        *,
        trace: bool = False,
        edits: EditPlan | None = None,
        edit_values: EditValues | None = None,
    ) -> Callable[..., Any]:
        resolved = self.resolve(spec)
        image = next(iter(observation.images.values()))
        key: CacheKey = (int(noise.shape[0]), str(image.dtype), resolved, trace, edits)
        with self._lock:
            future = self._cache.get(key)
            owner = future is None
            if owner:
                future = self._cache[key] = Future()
                self._evict_beyond_bound()
            else:
                self._cache.move_to_end(key)
        if owner:
            try:
                future.set_result(
                    self._compile(resolved, trace, params, observation, noise, edits, edit_values)
                )
            except BaseException as error:
                with self._lock:
                    del self._cache[key]
                future.set_exception(error)
                raise
        return future.result()

    def _evict_beyond_bound(self) -> None:
        """Drop the least recently used finished programs (caller holds the lock); a compile in
        progress is never dropped, so its waiters still get it."""
        for key in list(self._cache):
            if len(self._cache) <= self.max_programs:
                return
            if self._cache[key].done():
                del self._cache[key]

    def precompile(
        self,
        params: Any,
        observation: Observation,
        noise: Any,
        spec: LatentSpec | None = None,
        edits: EditPlan | None = None,
        edit_values: EditValues | None = None,
    ) -> None:
        """Compile what `sample_actions` with these arguments would run, without running it."""
        observation, noise = canonical_inputs(observation, noise)
        self.compiled(params, observation, noise, spec, edits=edits, edit_values=edit_values)

    def is_compiled(
        self,
        batch: int,
        image_dtype: str,
        spec: LatentSpec | None,
        *,
        trace: bool = False,
        edits: EditPlan | None = None,
    ) -> bool:
        """Whether a call of this shape, spec and intervention structure runs without compiling."""
        key: CacheKey = (batch, image_dtype, self.resolve(spec), trace, edits)
        with self._lock:
            future = self._cache.get(key)
        return future is not None and future.done() and future.exception() is None

    def cached_keys(self) -> list[CacheKey]:
        with self._lock:
            return [
                key
                for key, future in self._cache.items()
                if future.done() and not future.exception()
            ]

    def _compile(
        self,
        spec: LatentSpec | None,
        trace: bool,
        params: Any,
        obs: Observation,
        noise: Any,
        edits: EditPlan | None,
        edit_values: EditValues | None,
    ) -> Any:
        if spec is None and trace:  # the parity trace rides on the full capture
            spec = self.resolve(LatentSpec())
        plan = None if spec is None else CapturePlan(self.config, spec, trace)
        run = run_sampler_by_row if self.by_row else run_sampler
        if edits is None:
            fn = jax.jit(lambda p, o, n: run(self.config, plan, p, o, n))
            return fn.lower(params, obs, noise).compile()
        edited = jax.jit(lambda p, o, n, v: run(self.config, plan, p, o, n, edits, v))
        return edited.lower(params, obs, noise, _as_float32(edit_values)).compile()


def canonical_inputs(obs: Observation, noise: Any) -> tuple[Observation, Any]:
    """The dtypes the compiled functions are built for (images stay uint8 or become float32), so
    that int64 tokens or float64 states from a caller do not miss the cache or fail the call."""

    def image(x: Any) -> Any:
        return x if x.dtype == np.uint8 else _as(x, np.float32)

    return Observation(
        images={slot: image(x) for slot, x in obs.images.items()},
        image_masks={slot: _as(x, np.bool_) for slot, x in obs.image_masks.items()},
        state=_as(obs.state, np.float32),
        tokenized_prompt=_as(obs.tokenized_prompt, np.int32),
        tokenized_prompt_mask=_as(obs.tokenized_prompt_mask, np.bool_),
    ), _as(noise, np.float32)


def _as_float32(values: Any) -> Any:
    return jax.tree.map(lambda x: _as(np.asarray(x), np.float32), values)


def _as(x: Any, dtype: Any) -> Any:
    """x in `dtype`, without a copy (or a host round trip) when it already is."""
    return x if x.dtype == dtype else np.asarray(x, dtype)


def observation_from_arrays(arrays: Mapping[str, Any], config: ModelConfig) -> Observation:
    """An Observation from the reference layout (`image/<slot>`, `image_mask/<slot>`, `state`,
    `tokenized_prompt`, `tokenized_prompt_mask`)."""
    return Observation(
        images={slot: jnp.asarray(arrays[f"image/{slot}"]) for slot in config.image_slots},
        image_masks={
            slot: jnp.asarray(arrays[f"image_mask/{slot}"], bool) for slot in config.image_slots
        },
        state=jnp.asarray(arrays["state"], jnp.float32),
        tokenized_prompt=jnp.asarray(arrays["tokenized_prompt"], jnp.int32),
        tokenized_prompt_mask=jnp.asarray(arrays["tokenized_prompt_mask"], bool),
    )
