"""Statistics for paired episodes (same init state, env seed and noise seeds under two conditions).

    counts = paired_counts(baseline_success, condition_success)
    counts.difference                      # condition's success rate − baseline's
    tango_interval(counts)                 # 95% score interval of that difference (paired)
    mcnemar_exact_p(counts)                # two-sided exact p on the discordant pairs
    mean_interval(values)                  # mean over episodes with its Student t interval

Why these (docs/analysis.md, "Comparing conditions"): the two success indicators of one pair are
correlated (same scene, same noise), so an unpaired interval (two Wilson intervals, or a two-sample
test) is too wide when they agree and can be wrong when they do not. Only the discordant pairs
carry information on the difference: McNemar's exact test conditions on their number, and
Tango's score interval (Tango 1998, Stat Med 17:891) inverts the paired score statistic with the
restricted maximum-likelihood variance — near-nominal coverage down to a few dozen pairs and
defined when no pair is discordant (where the Wald interval collapses to a point); among the
intervals recommended by Fagerland, Lydersen & Laake (2014, Stat Med 33:2850). Coverage is checked
by simulation in tests/client/test_analysis_compare.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
_BISECTIONS = 80  # halves [-1, 1] down to ~1e-24: far below any reported digit


@dataclass(frozen=True)
class PairedCounts:
    """The 2×2 table of paired outcomes: both succeeded, only the baseline, only the condition,
    neither."""

    both: int
    baseline_only: int
    condition_only: int
    neither: int

    @property
    def n(self) -> int:
        return self.both + self.baseline_only + self.condition_only + self.neither

    @property
    def baseline_successes(self) -> int:
        return self.both + self.baseline_only

    @property
    def condition_successes(self) -> int:
        return self.both + self.condition_only

    @property
    def discordant(self) -> int:
        return self.baseline_only + self.condition_only

    @property
    def difference(self) -> float:
        """Condition's success rate minus the baseline's (NaN without pairs)."""
        if self.n == 0:
            return math.nan
        return (self.condition_only - self.baseline_only) / self.n

    def __add__(self, other: PairedCounts) -> PairedCounts:
        return PairedCounts(
            self.both + other.both,
            self.baseline_only + other.baseline_only,
            self.condition_only + other.condition_only,
            self.neither + other.neither,
        )

    def to_dict(self) -> dict[str, int]:
        return {
            "pairs": self.n,
            "both": self.both,
            "baseline_only": self.baseline_only,
            "condition_only": self.condition_only,
            "neither": self.neither,
        }


def paired_counts(baseline: np.ndarray, condition: np.ndarray) -> PairedCounts:
    """The table of two aligned boolean outcome vectors (pair i = baseline[i], condition[i])."""
    base, cond = np.asarray(baseline, bool), np.asarray(condition, bool)
    if base.shape != cond.shape or base.ndim != 1:
        raise ValueError(
            f"paired outcomes: two vectors of one length, got {base.shape}, {cond.shape}"
        )
    return PairedCounts(
        both=int(np.sum(base & cond)),
        baseline_only=int(np.sum(base & ~cond)),
        condition_only=int(np.sum(~base & cond)),
        neither=int(np.sum(~base & ~cond)),
    )


def tango_score(
    condition_only: np.ndarray, baseline_only: np.ndarray, n: np.ndarray, delta: np.ndarray
) -> np.ndarray:
    """Tango's score statistic at a hypothesised difference `delta` (decreasing in delta);
    elementwise over arrays of tables.

    With b = condition-only and c = baseline-only pairs, q is the restricted MLE of P(baseline-only)
    under P(condition-only) = q + delta:  2n q² + (−b − c + (2n − b + c) delta) q − c delta (1 − delta)
    = 0, and T = (b − c − n delta) / sqrt(n (2q + delta − delta²))."""
    b, c, n, delta = (np.asarray(x, np.float64) for x in (condition_only, baseline_only, n, delta))
    numerator = b - c - n * delta
    slope = -b - c + (2 * n - b + c) * delta
    constant = -c * delta * (1 - delta)
    q = (-slope + np.sqrt(np.maximum(slope * slope - 8 * n * constant, 0.0))) / (4 * n)
    variance = n * (2 * q + delta - delta * delta)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = numerator / np.sqrt(np.maximum(variance, 0.0))
    # zero variance: the bound of the parameter space (±inf), or the estimate itself (0)
    return np.where(
        numerator == 0, 0.0, np.where(variance > 0, score, np.copysign(np.inf, numerator))
    )


def tango_intervals(
    condition_only: np.ndarray,
    baseline_only: np.ndarray,
    n: np.ndarray,
    confidence: float = CONFIDENCE,
) -> tuple[np.ndarray, np.ndarray]:
    """Tango's score interval for many paired tables at once (arrays of counts, n > 0): the deltas
    where the score crosses ±z, by bisection (the score is ±inf at ±1, where Brent's method fails)."""
    b, c, n = (np.asarray(x, np.float64) for x in (condition_only, baseline_only, n))
    z = _z(confidence)
    estimate = (b - c) / n
    bounds = []
    for target, low, high in ((z, -np.ones_like(n), estimate), (-z, estimate, np.ones_like(n))):
        for _ in range(_BISECTIONS):
            middle = 0.5 * (low + high)
            above = tango_score(b, c, n, middle) > target
            low, high = np.where(above, middle, low), np.where(above, high, middle)
        bounds.append(0.5 * (low + high))
    # an estimate at ±1 is its own bound on that side
    lower = np.where(estimate <= -1, -1.0, bounds[0])
    upper = np.where(estimate >= 1, 1.0, bounds[1])
    return lower, upper


def tango_interval(counts: PairedCounts, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Tango's score interval for the paired difference of success rates (condition − baseline);
    (NaN, NaN) without pairs."""
    if counts.n == 0:
        return math.nan, math.nan
    low, high = tango_intervals(
        np.array([counts.condition_only]),
        np.array([counts.baseline_only]),
        np.array([counts.n]),
        confidence,
    )
    return float(low[0]), float(high[0])


def mcnemar_exact_p(counts: PairedCounts) -> float:
    """Two-sided exact McNemar p: the discordant pairs split as Binomial(discordant, ½) under "no
    difference"; 1.0 when no pair is discordant."""
    k = counts.discordant
    if k == 0:
        return 1.0
    tail = float(stats.binom.cdf(min(counts.baseline_only, counts.condition_only), k, 0.5))
    return min(1.0, 2.0 * tail)


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson's score interval of one success rate; (NaN, NaN) for n = 0."""
    if n == 0:
        return math.nan, math.nan
    z = _z(confidence)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class MeanInterval:
    estimate: float
    ci_low: float
    ci_high: float
    n: int


def _z(confidence: float) -> float:
    """The standard normal quantile of a two-sided interval (NormalDist: no scipy call per use)."""
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def mean_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> MeanInterval:
    """Mean over episodes with the Student t interval (NaNs dropped); no interval below 2 values.

    Per-episode summaries (mean displacement, mean action difference) are averages over many steps,
    so their mean over episodes is close to normal well before the raw per-step values are."""
    finite = np.asarray(values, np.float64)
    finite = finite[np.isfinite(finite)]
    n = int(finite.size)
    if n == 0:
        return MeanInterval(math.nan, math.nan, math.nan, 0)
    mean = float(finite.mean())
    if n < 2:
        return MeanInterval(mean, math.nan, math.nan, n)
    half = (
        float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * float(finite.std(ddof=1)) / math.sqrt(n)
    )
    return MeanInterval(mean, mean - half, mean + half, n)
