"""Paired significance for two models scored on the same items.

- :func:`paired_bootstrap`: percentile confidence interval of the difference in the (weighted)
  mean score, resampling items with replacement and keeping each item's pair together.
- :func:`mcnemar_exact`: exact two-sided McNemar test on per-item correctness: under the null
  the discordant items split Binomial(b + c, 1/2); ``p = min(1, 2 P(X <= min(b, c)))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BootstrapCI:
    """Observed difference ``b - a`` of weighted means and its confidence interval."""

    diff: float
    low: float
    high: float
    confidence: float


def _weighted_means(values: np.ndarray, weights: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return (values[idx] * weights[idx]).sum(-1) / weights[idx].sum(-1)


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    weights: Sequence[float] | None = None,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapCI:
    """Bootstrap CI of ``mean(b) - mean(a)`` over paired items (weighted when given).

    Args:
        a, b: per-item scores of the baseline and the other model, same items, same order.
        weights: per-item weights (e.g. bytes for log-likelihood per byte); 1 when None.
        n_resamples: bootstrap resamples.
        confidence: two-sided coverage of the percentile interval.
        seed: seed of the resampling, so reports are reproducible.
    """
    va, vb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if va.shape != vb.shape or va.ndim != 1 or va.size == 0:
        raise ValueError(f"a and b must be equal-length, non-empty; got {va.shape}, {vb.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")
    w = np.ones_like(va) if weights is None else np.asarray(weights, dtype=np.float64)
    full = np.arange(va.size)
    diff = float(_weighted_means(vb, w, full) - _weighted_means(va, w, full))
    rng = np.random.default_rng(seed)
    diffs = []
    chunk = max(1, 2_000_000 // va.size)
    for start in range(0, n_resamples, chunk):
        idx = rng.integers(0, va.size, size=(min(chunk, n_resamples - start), va.size))
        diffs.append(_weighted_means(vb, w, idx) - _weighted_means(va, w, idx))
    samples = np.concatenate(diffs)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return BootstrapCI(diff, float(low), float(high), confidence)


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int, float]:
    """Exact McNemar test on paired correctness.

    Returns:
        ``(b_only_a, c_only_b, p_value)``: items only ``a`` got right, items only ``b`` got
        right, and the two-sided exact p-value (1.0 when there is no discordant item).
    """
    if len(a) != len(b):
        raise ValueError(f"a and b must pair the same items; got {len(a)} and {len(b)}")
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    n = only_a + only_b
    if n == 0:
        return only_a, only_b, 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return only_a, only_b, min(1.0, 2 * tail)
