"""Paired bootstrap confidence intervals, the study's and the faithfulness measures' (one image a pair)."""

from __future__ import annotations

import numpy as np


def paired_bootstrap_ci(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of mean(a - b) for paired per-image values (resampling images)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if len(d) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for s in range(0, n_boot, 200):  # bounded memory: 200 resamples at a time
        idx = rng.integers(0, len(d), size=(min(200, n_boot - s), len(d)))
        means[s:s + len(idx)] = d[idx].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return (float(lo), float(hi))
