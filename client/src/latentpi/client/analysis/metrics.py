"""Representation metrics on plain numpy arrays: language drift, CKA / RSA, attention share,
similarity across denoising steps.

Axis names follow the stored arrays (docs/data-format.md):
  S sample (a recorded rollout step of one episode)   L layer (residual-stream entry)
  P position (token)                                   D hidden (an expert's width)
  T denoising step                                     n paired items (the rows CKA compares)

Every function computes in float64 whatever the input dtype (bfloat16 included). The definitions,
with formulas, are in docs/analysis.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.spatial.distance import pdist
from scipy.stats import spearmanr

from latentpi.protocol.errors import ValidationError
from latentpi.protocol.latent_spec import PROMPT_SEGMENT

# Below this squared norm a vector counts as zero and its cosine is undefined (NaN).
_TINY = 1e-24


def as_float64(array: object, field: str, ndim: int | tuple[int, ...]) -> np.ndarray:
    """`array` as float64 with the expected number of axes, or a ValidationError naming `field`."""
    out = np.asarray(array)
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if out.ndim not in ndims:
        axes = " or ".join(str(n) for n in ndims)
        raise ValidationError(field, f"an array with {axes} axes", out)
    if out.dtype.kind not in "fiub" and str(out.dtype) != "bfloat16":
        raise ValidationError(field, "a numeric array", out)
    out = out.astype(np.float64)
    if not np.all(np.isfinite(out)):
        raise ValidationError(
            field, "finite values", f"{np.count_nonzero(~np.isfinite(out))} non-finite values"
        )
    return out


# -- elementwise comparisons (same width only) --------------------------------------------------


def cosine_similarity(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """cos(a, b) along `axis`; NaN where either vector is zero. Requires equal widths: comparing
    experts of different widths needs `linear_cka` instead."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    _check_same_width(a, b, axis)
    dot = np.sum(a * b, axis=axis)
    norms = np.sum(a * a, axis=axis) * np.sum(b * b, axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > _TINY, dot / np.sqrt(norms), np.nan)


def relative_l2(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """‖a − b‖ / ‖b‖ along `axis` (b is the reference); NaN where b is zero."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    _check_same_width(a, b, axis)
    ref = np.sum(b * b, axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ref > _TINY, np.sqrt(np.sum((a - b) ** 2, axis=axis) / ref), np.nan)


def _check_same_width(a: np.ndarray, b: np.ndarray, axis: int) -> None:
    if a.shape[axis] != b.shape[axis]:
        raise ValidationError(
            "hidden width",
            f"equal widths for an elementwise comparison (use linear_cka across widths); first is {a.shape[axis]}",
            b.shape[axis],
        )


def layer_similarity(states: np.ndarray, layer_axis: int = 1) -> np.ndarray:
    """(L, L) mean cosine between the residual-stream entries of one expert, over every other axis
    of `states` (hidden last), e.g. (S, L, D) or (S, L, P, D): how much each layer rewrites it."""
    x = np.asarray(states, np.float64)
    if x.ndim < 2 or not -x.ndim <= layer_axis < x.ndim or layer_axis % x.ndim == x.ndim - 1:
        raise ValidationError(
            "layer_axis",
            f"an axis of the states other than the last (hidden); states are {x.shape}",
            layer_axis,
        )
    x = np.moveaxis(x, layer_axis, 0)
    x = x.reshape(x.shape[0], -1, x.shape[-1])  # (L, items, D)
    cos = cosine_similarity(x[:, None], x[None, :])  # (L, L, items)
    return np.nanmean(cos, axis=-1)


# -- language drift ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Drift:
    """How far the prompt's representation moved from a reference sample (default: the first).

    cosine_distance: 1 − cos(h_t, h_ref); relative_l2: ‖h_t − h_ref‖ / ‖h_ref‖. Shapes (S, L) for
    the prompt mean, (S, L, P) per token (NaN at positions invalid in sample t or the reference).
    """

    cosine_distance: np.ndarray
    relative_l2: np.ndarray


def prompt_mean(text_states: np.ndarray, prompt_mask: np.ndarray) -> np.ndarray:
    """(S, L, P, D) states, (S, P) or (P,) mask → (S, L, D): mean over VALID prompt positions only,
    so padding never enters (its values depend on how the model masks)."""
    x = as_float64(text_states, "text_only_hidden_states", 4)
    mask = _prompt_mask(prompt_mask, x.shape[0], x.shape[2])
    counts = mask.sum(axis=1)
    if np.any(counts == 0):
        raise ValidationError(
            "prompt_mask",
            "at least one valid prompt position per sample",
            f"samples {np.flatnonzero(counts == 0).tolist()} with none",
        )
    return np.einsum("slpd,sp->sld", x, mask.astype(np.float64)) / counts[:, None, None]


def without_bos(prompt_mask: np.ndarray) -> np.ndarray:
    """The mask with each row's first valid position (the tokenizer's BOS: `[BOS] prompt "\\n"
    [pad]`, server/policy/tokenizer.py) set false; a row whose only valid token is BOS keeps it."""
    mask = np.array(prompt_mask, bool)
    rows = np.atleast_2d(mask)
    first = np.argmax(rows, axis=1)
    drop = rows.sum(axis=1) > 1
    rows[np.flatnonzero(drop), first[drop]] = False
    return rows.reshape(mask.shape)


def _prompt_mask(prompt_mask: np.ndarray, samples: int, positions: int) -> np.ndarray:
    mask = np.asarray(prompt_mask)
    if mask.ndim == 1:
        mask = np.broadcast_to(mask, (samples, mask.shape[0]))
    if mask.shape != (samples, positions):
        raise ValidationError(
            "prompt_mask", f"shape ({samples}, {positions}) or ({positions},)", mask
        )
    if mask.dtype != np.bool_:
        if not np.isin(mask, (0, 1)).all():
            raise ValidationError("prompt_mask", "booleans (or 0/1)", mask)
        mask = mask.astype(bool)
    return mask


def language_drift(
    text_states: np.ndarray, prompt_mask: np.ndarray | None = None, reference: int = 0
) -> Drift:
    """Per layer, drift of the mean-over-valid-prompt-tokens representation from sample `reference`.

    text_states: (S, L, P, D) with `prompt_mask`, or already pooled (S, L, D) without one.
    Returns a Drift of (S, L) arrays; row `reference` is 0.
    """
    x = np.asarray(text_states)
    if x.ndim == 3:
        if prompt_mask is not None:
            raise ValidationError(
                "prompt_mask", "None for pooled (sample, layer, hidden) states", prompt_mask
            )
        pooled = as_float64(x, "text_only_hidden_states", 3)
    else:
        if prompt_mask is None:
            raise ValidationError(
                "prompt_mask",
                "a mask for per-position (sample, layer, position, hidden) states",
                None,
            )
        pooled = prompt_mean(x, prompt_mask)
    ref = pooled[_index("reference", reference, pooled.shape[0])]
    return Drift(
        cosine_distance=1.0 - cosine_similarity(pooled, ref[None]),
        relative_l2=relative_l2(pooled, ref[None]),
    )


def centred_drift(
    pooled: np.ndarray, centre: np.ndarray, spread: np.ndarray, reference: int = 0
) -> Drift:
    """Drift that compares across layers. pooled (S, L, D) per-sample vectors; centre (L, D) the
    mean over every sample of the cohort (task) at each layer; spread (L,) the between-episode
    spread at each layer (`between_episode_spread`).

    cosine_distance: 1 − cos(h_t − μ, h_ref − μ): residual streams share a large common direction
    that pushes every raw cosine towards 1, so the raw cosine drift is compressed; relative_l2
    (here: normalised): ‖h_t − h_ref‖ / spread — 1 means the episode moved as far as two different
    episodes are apart at the same point of their rollouts."""
    x = as_float64(pooled, "pooled states", 3)
    mu = as_float64(centre, "centre", 2)
    scale = np.asarray(spread, np.float64)  # NaN allowed: no spread (a single episode)
    ref = x[_index("reference", reference, x.shape[0])][None]
    distance = np.sqrt(np.sum((x - ref) ** 2, axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.where(scale > np.sqrt(_TINY), distance / scale, np.nan)  # NaN > x: False
    return Drift(
        cosine_distance=1.0 - cosine_similarity(x - mu[None], ref - mu[None]),
        relative_l2=normalised,
    )


def between_episode_spread(episodes: Sequence[np.ndarray]) -> np.ndarray:
    """(L,) root mean squared distance between two different episodes' vectors at the same sample
    index, averaged over the sample indices all episodes reach; episodes: (S_e, L, D) each. NaN with
    fewer than two episodes."""
    if len(episodes) < 2:
        return np.full(np.shape(episodes[0])[1] if episodes else 0, np.nan)
    common = min(len(e) for e in episodes)
    stack = np.stack([np.asarray(e, np.float64)[:common] for e in episodes])  # (E, S, L, D)
    # mean over pairs i ≠ j of ‖a_i − a_j‖² = 2 Σ_d var_d (unbiased over episodes)
    pair_squared = 2.0 * np.var(stack, axis=0, ddof=1).sum(axis=-1)  # (S, L)
    return np.sqrt(pair_squared.mean(axis=0))


def token_drift(text_states: np.ndarray, prompt_mask: np.ndarray, reference: int = 0) -> Drift:
    """Per layer and prompt position, drift of each token's representation from sample `reference`.
    Returns (S, L, P) arrays, NaN where the position is padding in sample t or in the reference."""
    x = as_float64(text_states, "text_only_hidden_states", 4)
    mask = _prompt_mask(prompt_mask, x.shape[0], x.shape[2])
    ref_index = _index("reference", reference, x.shape[0])
    valid = (mask & mask[ref_index][None])[:, None, :]  # (S, 1, P)
    ref = x[ref_index][None]
    return Drift(
        cosine_distance=np.where(valid, 1.0 - cosine_similarity(x, ref), np.nan),
        relative_l2=np.where(valid, relative_l2(x, ref), np.nan),
    )


def drift_rate(drift: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """Least-squares slope of drift (S, L) against the env step of each sample (S,): drift per
    env step, per layer. A single summary per episode, e.g. as a success feature."""
    y = as_float64(drift, "drift", 2)
    t = as_float64(timesteps, "timesteps", 1)
    if t.shape[0] != y.shape[0] or t.shape[0] < 2:
        raise ValidationError("timesteps", f"{y.shape[0]} (≥ 2) env steps, one per sample", t)
    tc = t - t.mean()
    spread = np.sum(tc * tc)
    if spread == 0:
        raise ValidationError("timesteps", "at least two distinct env steps", t)
    return tc @ (y - y.mean(axis=0)) / spread


def _index(field: str, index: int, size: int) -> int:
    if not -size <= index < size:
        raise ValidationError(field, f"an index in [{-size}, {size - 1}]", index)
    return index % size


# -- CKA and RSA: comparisons across widths ---------------------------------------------------


def gram(x: np.ndarray, *, debiased: bool = True) -> np.ndarray:
    """The centred linear Gram matrix of (n, ...) items (trailing axes flattened to features).

    debiased=True U-centres it (Székely & Rizzo; Song et al. 2012), so that ⟨K, L⟩ / (n(n − 3))
    is the unbiased HSIC: plain centring overstates CKA badly when features outnumber items
    (independent 1024-wide states over 50 samples give CKA ≈ 0.93 instead of ≈ 0).
    """
    x = np.asarray(x, np.float64)
    x = x.reshape(x.shape[0], -1)
    n = x.shape[0]
    if n < (4 if debiased else 2):
        raise ValidationError("samples", f"at least {4 if debiased else 2} paired items for CKA", n)
    x = x - x.mean(axis=0)
    k = x @ x.T
    if not debiased:
        return k
    np.fill_diagonal(k, 0.0)
    row = k.sum(axis=0) / (n - 2)
    row -= row.sum() / (2 * (n - 1))
    k -= row[:, None] + row[None, :]
    np.fill_diagonal(k, 0.0)
    return k


def cka_from_grams(k_x: np.ndarray, k_y: np.ndarray) -> float:
    """CKA = ⟨K, L⟩ / (‖K‖ ‖L‖) of two (centred or U-centred) Gram matrices; NaN if one is zero."""
    norm = np.sqrt(np.sum(k_x * k_x) * np.sum(k_y * k_y))
    return float(np.sum(k_x * k_y) / norm) if norm > _TINY else float("nan")


def linear_cka(x: np.ndarray, y: np.ndarray, *, debiased: bool = True) -> float:
    """Linear CKA between two representations of the same n items, (n, d_x) and (n, d_y), with
    any widths. 1 for y = s·x·Q (Q orthogonal), ≈ 0 for independent data (debiased)."""
    x, y = np.asarray(x), np.asarray(y)
    if x.shape[0] != y.shape[0]:
        raise ValidationError("y", f"the same {x.shape[0]} paired items as x", y)
    return cka_from_grams(gram(x, debiased=debiased), gram(y, debiased=debiased))


def cka_matrix(
    reps_a: Sequence[np.ndarray] | np.ndarray,
    reps_b: Sequence[np.ndarray] | np.ndarray | None = None,
    *,
    debiased: bool = True,
) -> np.ndarray:
    """(A, B) CKA between every representation of `reps_a` and of `reps_b` (default: `reps_a`,
    giving the symmetric layer × layer matrix). Each is (n, ...) over the same n items; widths may
    differ, e.g. expert 0's layers against expert 1's. A stacked (A, n, d) array works too."""
    grams_a = [gram(r, debiased=debiased) for r in reps_a]
    grams_b = grams_a if reps_b is None else [gram(r, debiased=debiased) for r in reps_b]
    sizes = {k.shape[0] for k in grams_a} | {k.shape[0] for k in grams_b}
    if len(sizes) != 1:
        raise ValidationError(
            "representations", "the same number of paired items in each", sorted(sizes)
        )
    return np.array([[cka_from_grams(k_a, k_b) for k_b in grams_b] for k_a in grams_a])


def rsa(x: np.ndarray, y: np.ndarray, metric: str = "correlation") -> float:
    """Representational similarity: Spearman correlation of the two dissimilarity matrices
    (pairwise `metric` distances between the n items) — width-free, rank-based."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    if x.shape[0] != y.shape[0] or x.shape[0] < 3:
        raise ValidationError(
            "y", f"the same number (≥ 3) of paired items as x ({x.shape[0]})", y.shape[0]
        )
    rho = spearmanr(pdist(x, metric), pdist(y, metric)).statistic
    return float(rho)


# -- denoising steps and attention ------------------------------------------------------------


@dataclass(frozen=True)
class StepSimilarity:
    """Expert-1 states across denoising steps, per layer.

    cka: (L, T, T) CKA between steps over the samples; cosine_to_last: (L, T) mean cosine between
    each step's state and the last step's (the one whose velocity produces the actions)."""

    cka: np.ndarray
    cosine_to_last: np.ndarray


def step_similarity(expert_1_states: np.ndarray, *, debiased: bool = True) -> StepSimilarity:
    """expert_1_states: (S, T, L, ...) — positions and hidden flattened as features."""
    states = as_float64(expert_1_states, "expert_1_hidden_states", (4, 5))
    features = states.reshape(*states.shape[:3], -1)  # (S, T, L, F)
    steps, layers = features.shape[1], features.shape[2]
    cka = np.stack(
        [
            cka_matrix([features[:, t, layer] for t in range(steps)], debiased=debiased)
            for layer in range(layers)
        ]
    )
    cos = cosine_similarity(states, states[:, -1:])  # (S, T, L[, P])
    cos = np.nanmean(cos.reshape(*cos.shape[:3], -1), axis=(0, 3))  # (T, L)
    return StepSimilarity(cka=cka, cosine_to_last=cos.T)


def attention_share(
    mass: np.ndarray,
    query_segments: Sequence[str],
    key_segments: Sequence[str],
    query: str,
    keys: Sequence[str] = (PROMPT_SEGMENT,),
) -> np.ndarray:
    """Share of the attention that `query` tokens pay to the `keys` segments.

    mass: (..., query_segment, key_segment) attention mass (rows sum to 1 over key segments), e.g.
    (S, T, L, Q, K) for expert 1; segment names come from the file's token layout (expert 1's
    key segments are expert 0's followed by expert 1's). Returns mass[..., q, keys].sum(-1).
    """
    m = as_float64(mass, "attention_mass", tuple(range(2, 8)))
    if m.shape[-2:] != (len(query_segments), len(key_segments)):
        raise ValidationError(
            "attention_mass",
            f"trailing axes ({len(query_segments)}, {len(key_segments)}) matching the segment names",
            m,
        )
    if query not in query_segments:
        raise ValidationError("query", f"one of {list(query_segments)}", query)
    missing = [k for k in keys if k not in key_segments]
    if missing or not keys:
        raise ValidationError("keys", f"names among {list(key_segments)}", list(keys))
    columns = [list(key_segments).index(k) for k in keys]
    return m[..., list(query_segments).index(query), columns].sum(axis=-1)
