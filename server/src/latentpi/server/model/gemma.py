"""The multi-expert Gemma: one transformer whose experts (own weights, own widths) share attention.

Axes in the einsums: B batch, T query length, S key/value length, N query heads, K key/value heads,
G query heads per key/value head, H head dim, D width, F MLP width.

Each layer, every expert normalises its own tokens and projects them to queries, keys and values;
those of all experts are concatenated along the sequence, attend together under one mask, and the
result is split back per expert for its output projection and MLP. Expert 0 has no parameter-name
suffix (so PaliGemma's weights load as they are), expert i > 0 has `_i`. Layer parameters are
stacked on a leading depth axis by `nn.scan`, as in openpi's checkpoints.

A layer may carry a `LayerTap`: a hashable object that reduces the layer's input residual stream
(and its attention probabilities) inside the scan, so only the reduced taps ever exist per layer.
It may also carry an `EditPlan` (model/intervene.py): interventions on the residual stream, the
attention output, the FFN hidden units or the attention mask, whose values arrive as arguments.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from latentpi.server.model.configs import GemmaConfig
from latentpi.server.model.intervene import EditPlan, EditValues, apply_edits, knock_out

# As in Gemma: the largest negative bfloat16-safe logit for masked positions.
BIG_NEG = -2.3819763e38

Xs = Sequence[jnp.ndarray | None]  # one entry per expert; None = that expert is not run


class LayerTap(Protocol):
    """Reduces one layer's input `xs` (and attention `probs`, float32 (B, N, T, S)) to what is kept."""

    wants_probs: bool

    def __call__(self, xs: Xs, probs: jnp.ndarray | None, aux: Any) -> Any: ...


def _name(name: str, expert: int) -> str:
    return name if expert == 0 else f"{name}_{expert}"


class RMSNorm(nn.Module):
    """RMSNorm computed in float32; adaptive (scale, shift, gate from `cond`) when `cond` is given."""

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, cond: jnp.ndarray | None
    ) -> tuple[jnp.ndarray, jnp.ndarray | None]:
        dtype = x.dtype
        var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
        normed = x * jnp.reciprocal(jnp.sqrt(var + 1e-6))  # promotes to float32
        if cond is None:
            scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
            return (normed * (1 + scale)).astype(dtype), None
        modulation = nn.Dense(x.shape[-1] * 3, kernel_init=nn.initializers.zeros, dtype=dtype)(cond)
        scale, shift, gate = jnp.split(modulation[:, None, :], 3, axis=-1)
        return (normed * (1 + scale) + shift).astype(dtype), gate


class Einsum(nn.Module):
    """A weight `w` of a given shape, applied by an einsum in the input's dtype."""

    shape: tuple[int, ...]

    @nn.compact
    def __call__(self, eqn: str, x: jnp.ndarray) -> jnp.ndarray:
        w = self.param("w", nn.initializers.lecun_normal(), self.shape)
        return jnp.einsum(eqn, x, w.astype(x.dtype))


class Embedder(nn.Module):
    vocab_size: int
    width: int

    @nn.compact
    def __call__(self, tokens: jnp.ndarray) -> jnp.ndarray:
        table = self.param(
            "input_embedding", nn.initializers.normal(), (self.vocab_size, self.width)
        )
        x = table[(tokens,)]
        return x * jnp.sqrt(self.width).astype(x.dtype)


def apply_rope(
    x: jnp.ndarray, positions: jnp.ndarray, max_wavelength: float = 10_000.0
) -> jnp.ndarray:
    """Rotary embedding of x (B, L, heads, H) at integer positions (B, L), on the two halves of H."""
    half = x.shape[-1] // 2
    timescale = max_wavelength ** ((2.0 / x.shape[-1]) * jnp.arange(half, dtype=jnp.float32))
    radians = (positions[..., None] / timescale)[..., None, :]  # (B, L, 1, H/2), float32
    sin, cos = jnp.sin(radians), jnp.cos(radians)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nn.Module):
    configs: tuple[GemmaConfig, ...]
    with_probs: bool = False

    @nn.compact
    def __call__(
        self,
        xs: Xs,
        positions: jnp.ndarray,
        mask: jnp.ndarray,
        kv_cache: tuple[jnp.ndarray, jnp.ndarray] | None,
    ) -> tuple[list[jnp.ndarray | None], tuple[jnp.ndarray, jnp.ndarray], jnp.ndarray | None]:
        cfg = self.configs[0]
        dtype = next(x.dtype for x in xs if x is not None)
        qs, ks, vs = [], [], []
        for i, (x, config) in enumerate(zip(xs, self.configs, strict=True)):
            if x is None:
                continue
            if config.num_kv_heads == config.num_heads:
                shape = (3, config.num_heads, config.width, config.head_dim)
                q, k, v = Einsum(shape, name=_name("qkv_einsum", i))("BSD,3KDH->3BSKH", x)
            else:
                q = Einsum(
                    (config.num_heads, config.width, config.head_dim), name=_name("q_einsum", i)
                )("BTD,NDH->BTNH", x)
                shape = (2, config.num_kv_heads, config.width, config.head_dim)
                k, v = Einsum(shape, name=_name("kv_einsum", i))("BSD,2KDH->2BSKH", x)
            qs.append(q)
            ks.append(k)
            vs.append(v)
        q, k, v = (jnp.concatenate(y, axis=1) for y in (qs, ks, vs))

        q = apply_rope(q, positions) * jnp.asarray(cfg.head_dim**-0.5, dtype)
        k = apply_rope(k, positions)
        new_cache = (k, v)
        if kv_cache is not None:  # the suffix attends to the cached prefix keys and values too
            k = jnp.concatenate([kv_cache[0], k], axis=1)
            v = jnp.concatenate([kv_cache[1], v], axis=1)

        batch, length = q.shape[:2]
        q = q.reshape(
            batch, length, cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
        )
        logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
        logits = jnp.where(mask[:, None, None, :, :], logits, BIG_NEG)
        probs = jax.nn.softmax(logits, axis=-1)  # float32
        encoded = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(dtype), v)
        encoded = encoded.reshape(batch, length, cfg.num_heads, cfg.head_dim)

        out: list[jnp.ndarray | None] = []
        start = 0
        for i, (x, config) in enumerate(zip(xs, self.configs, strict=True)):
            if x is None:
                out.append(None)
                continue
            end = start + x.shape[1]
            w_out = Einsum(
                (config.num_heads, config.head_dim, config.width), name=_name("attn_vec_einsum", i)
            )
            out.append(w_out("BTNH,NHD->BTD", encoded[:, start:end]))
            start = end
        head_probs = probs.reshape(batch, cfg.num_heads, length, -1) if self.with_probs else None
        return out, new_cache, head_probs


class FeedForward(nn.Module):
    """Gated GELU MLP: gelu(x W0) * (x W1), then back to the width; `edit_hidden` may change the
    hidden units (after the gate) first."""

    width: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x: jnp.ndarray, edit_hidden: Any = None) -> jnp.ndarray:
        gating = self.param(
            "gating_einsum", nn.initializers.lecun_normal(), (2, self.width, self.mlp_dim)
        ).astype(x.dtype)
        linear = self.param(
            "linear", nn.initializers.lecun_normal(), (self.mlp_dim, self.width)
        ).astype(x.dtype)
        hidden = nn.gelu(jnp.dot(x, gating[0])) * jnp.dot(x, gating[1])
        if edit_hidden is not None:
            hidden = edit_hidden(hidden)
        return jnp.dot(hidden, linear)


def _residual(
    x: jnp.ndarray | None, y: jnp.ndarray | None, gate: jnp.ndarray | None
) -> jnp.ndarray | None:
    if x is None:
        return None
    return x + y if gate is None else x + y * gate


class Block(nn.Module):
    """One layer of all experts; shaped for `nn.scan`: (xs, kv_cache) -> (xs, (kv_cache, tap))."""

    configs: tuple[GemmaConfig, ...]
    tap: LayerTap | None = None
    edits: EditPlan | None = None

    @nn.compact
    def __call__(
        self,
        xs: Xs,
        kv_cache: Any,
        positions: jnp.ndarray,
        mask: jnp.ndarray,
        adarms_cond: Xs,
        tap_aux: Any,
        layer: jnp.ndarray,
        edit_ctx: tuple[EditValues, jnp.ndarray] | None,
    ):
        values, step = edit_ctx if edit_ctx is not None else (None, jnp.int32(-1))

        def edit(point: str, ys: Xs) -> list[jnp.ndarray | None]:
            return [
                None if y is None else apply_edits(self.edits, values, i, point, y, layer, step)
                for i, y in enumerate(ys)
            ]

        xs = edit("residual", xs)
        running = next(i for i, x in enumerate(xs) if x is not None)
        mask = knock_out(self.edits, running, mask, layer, step)
        tap_in = xs
        pre, gates = [], []
        for i, x in enumerate(xs):
            y, gate = (
                RMSNorm(name=_name("pre_attention_norm", i))(x, adarms_cond[i])
                if x is not None
                else (None, None)
            )
            pre.append(y)
            gates.append(gate)
        with_probs = self.tap is not None and self.tap.wants_probs
        attended, kv_cache, probs = Attention(self.configs, with_probs=with_probs, name="attn")(
            pre, positions, mask, kv_cache
        )
        attended = edit("attn_out", attended)
        xs = [_residual(x, y, g) for x, y, g in zip(xs, attended, gates, strict=True)]

        out = []
        for i, (x, config) in enumerate(zip(xs, self.configs, strict=True)):
            if x is None:
                out.append(None)
                continue
            y, gate = RMSNorm(name=_name("pre_ffw_norm", i))(x, adarms_cond[i])
            edit_hidden = None
            if self.edits is not None and self.edits.at(i, "mlp_hidden"):
                edit_hidden = functools.partial(
                    apply_edits, self.edits, values, i, "mlp_hidden", layer=layer, step=step
                )
            y = FeedForward(config.width, config.mlp_dim, name=_name("mlp", i))(y, edit_hidden)
            out.append(_residual(x, y, gate))
        tapped = self.tap(tap_in, probs, tap_aux) if self.tap is not None else None
        return out, (kv_cache, tapped)


class Gemma(nn.Module):
    """Token embedding (expert 0 only), the scanned layers and a final norm per expert."""

    configs: tuple[GemmaConfig, ...]
    vocab_size: int
    dtype: str
    tap: LayerTap | None = None
    edits: EditPlan | None = None

    def setup(self) -> None:
        self.embedder = Embedder(self.vocab_size, self.configs[0].width)
        self.layers = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
            length=self.configs[0].depth,
        )(configs=self.configs, tap=self.tap, edits=self.edits)
        self.final_norms = [RMSNorm(name=_name("final_norm", i)) for i in range(len(self.configs))]

    def embed(self, tokens: jnp.ndarray) -> jnp.ndarray:
        return self.embedder(tokens).astype(self.dtype)

    def __call__(
        self,
        xs: Xs,
        positions: jnp.ndarray,
        mask: jnp.ndarray,
        adarms_cond: Xs | None = None,
        kv_cache: tuple[jnp.ndarray, jnp.ndarray] | None = None,
        tap_aux: Any = None,
        edit_ctx: tuple[EditValues, jnp.ndarray] | None = None,
    ) -> tuple[
        list[jnp.ndarray | None], list[jnp.ndarray | None], tuple[jnp.ndarray, jnp.ndarray], Any
    ]:
        """-> (final-normed outputs, raw last-layer outputs, per-layer KV cache, per-layer taps).

        mask: (B, T, S) bool, query t may attend to key s (S counts cached keys first)."""
        xs = [None if x is None else x.astype(self.dtype) for x in xs]
        conds = list(adarms_cond) if adarms_cond is not None else [None] * len(self.configs)
        layer_ids = jnp.arange(self.configs[0].depth)
        raw, (kv_cache, taps) = self.layers(
            xs, kv_cache, positions, mask, conds, tap_aux, layer_ids, edit_ctx
        )
        normed = [
            None if x is None else norm(x, c)[0]
            for norm, x, c in zip(self.final_norms, raw, conds, strict=True)
        ]
        return normed, raw, kv_cache, taps
