"""Read-outs in the vocabulary: which tokens an FFN unit's value vector promotes.

An FFN unit u of layer l writes `hidden[u] · linear[l, u, :]` into the residual stream: the row
`linear[l, u]` is its value vector. Projected on the (tied) token embedding, E v, its largest entries
are the tokens the unit promotes (Geva et al. 2022; Häon et al. 2025 steer pi0 by scaling units
whose value vectors promote words like "slow" or "up"). Only expert 0 (PaliGemma) has a vocabulary.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

EMBEDDING = ("PaliGemma", "llm", "embedder", "input_embedding")
MLP_OUT = ("PaliGemma", "llm", "layers", "mlp", "linear")
# Units projected per device call: 512 × 257,152 float32 logits = 0.5 GB at the full vocabulary.
UNITS_PER_CALL = 512


@dataclass(frozen=True)
class UnitTokens:
    """The top-k tokens of each unit's value vector."""

    layer: int
    units: np.ndarray  # (U,)
    token_ids: np.ndarray  # (U, k)
    scores: np.ndarray  # (U, k) float32: ⟨embedding[token], value vector⟩


def value_vector_lens(
    params: Any, layer: int, units: np.ndarray | None = None, top_k: int = 10
) -> UnitTokens:
    """Top-k tokens of the value vectors of `units` (default: every unit) of expert 0's `layer`."""
    linear = _leaf(params, MLP_OUT)  # (depth, mlp_dim, width)
    embedding = _leaf(params, EMBEDDING)  # (vocab, width)
    depth, mlp_dim = linear.shape[:2]
    if not 0 <= layer < depth:
        raise ValueError(f"--layer: expected 0..{depth - 1}, received {layer}")
    if not 1 <= top_k <= embedding.shape[0]:
        raise ValueError(f"--top-k: expected 1..{embedding.shape[0]}, received {top_k}")
    chosen = np.arange(mlp_dim) if units is None else np.asarray(units, np.int64)
    bad = chosen[(chosen < 0) | (chosen >= mlp_dim)]
    if bad.size:
        raise ValueError(f"--units: expected indices in [0, {mlp_dim}), received {int(bad[0])}")
    ids, scores = [], []
    for start in range(0, len(chosen), UNITS_PER_CALL):
        batch = jnp.asarray(chosen[start : start + UNITS_PER_CALL])
        top_scores, top_ids = _top_tokens(linear[layer], embedding, batch, top_k)
        ids.append(np.asarray(top_ids))
        scores.append(np.asarray(top_scores, np.float32))
    return UnitTokens(layer, chosen, np.concatenate(ids), np.concatenate(scores))


@functools.partial(jax.jit, static_argnums=(3,))
def _top_tokens(
    linear: jnp.ndarray, embedding: jnp.ndarray, units: jnp.ndarray, top_k: int
) -> tuple[jnp.ndarray, jnp.ndarray]:
    values = linear[units].astype(jnp.float32)  # (U, width)
    logits = jnp.einsum("UD,VD->UV", values, embedding.astype(jnp.float32))
    return jax.lax.top_k(logits, top_k)


def load_lens_params(config: Any) -> Any:
    """Only the two leaves the lens reads (embedding, FFN output weights), on the device: a real
    checkpoint's other 5 GB are never read."""
    from latentpi.server import device as _device
    from latentpi.server.engine_factory import load_weights
    from latentpi.server.model.checkpoint import load_params
    from latentpi.server.model.pi0 import param_shapes

    if config.checkpoint is None:
        return load_weights(config)  # random weights: the seeded init, as `latentpi serve` has them
    shapes = param_shapes(config.model)
    expected: dict[str, Any] = {}
    for path in (EMBEDDING, MLP_OUT):
        node = expected
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = _leaf(shapes, path)
    device = _device.serving_device()
    return load_params(
        config.checkpoint,
        dtype=config.model.dtype,
        expected=expected,
        sharding=_device.device_sharding(device),
    )


def _leaf(params: Any, path: tuple[str, ...]) -> Any:
    node = params
    for key in path:
        node = node[key]
    return node
