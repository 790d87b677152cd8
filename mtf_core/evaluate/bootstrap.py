"""Clustered bootstrap intervals for ratios of sums over resampling units (users).

Every figure is a ratio of sums over requests (a mean is a ratio with denominator 1), aggregated per
user, so one clustered bootstrap serves them all: users are resampled with Poisson(1) counts (the
Poisson bootstrap of Chamandy et al., 2012), which keeps the requests of one user together.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from typing import Iterator

__all__ = ["N_BOOT", "BLB_THRESHOLD", "bootstrap_ratio", "poisson_counts", "percentile_interval", "finite_or_none"]

N_BOOT = 500
BLB_THRESHOLD = 20_000


def bootstrap_ratio(num: np.ndarray, den: np.ndarray, n_boot: int = N_BOOT, seed: int = 0,
                    level: float = 0.95, chunk: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Percentile intervals of sum(num)/sum(den) per column, resampling rows (units).

    num, den: `[U, F]` (U resampling units, F figures). Returns (low `[F]`, high `[F]`).
    Up to BLB_THRESHOLD units: the Poisson bootstrap (each unit drawn Poisson(1) times). Above: the bag of
    little bootstraps (Kleiner et al., 2014), whose resamples cost O(U^0.6) instead of O(U).
    """
    if num.shape[0] > BLB_THRESHOLD:
        return _little_bootstraps(num, den, n_boot, seed, level)
    num_t = torch.from_numpy(np.ascontiguousarray(num, dtype=np.float64)).float()
    den_t = torch.from_numpy(np.ascontiguousarray(den, dtype=np.float64)).float()
    estimates = [(counts @ num_t) / (counts @ den_t) for counts in poisson_counts(num.shape[0], n_boot, seed, chunk)]
    return percentile_interval(torch.cat(estimates).double().numpy(), level)


def poisson_counts(n_units: int, n_boot: int, seed: int, chunk: int = 100) -> Iterator[torch.Tensor]:
    """Poisson(1) resampling counts `[b, U]` in chunks of at most `chunk` resamples, n_boot in all.

    The same (n_units, n_boot, seed) give the same resamples, so figures bootstrapped separately on one log
    share their resamples: their difference is a paired bootstrap."""
    gen = torch.Generator().manual_seed(seed)
    cdf = torch.tensor([math.exp(-1) * sum(1 / math.factorial(j) for j in range(i + 1)) for i in range(12)])
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        yield torch.bucketize(torch.rand(b, n_units, generator=gen), cdf).float()


def percentile_interval(estimates: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bounds per column of resampled estimates `[B, F]`; NaN for a column with no finite value
    (a figure with no data in a scope), which callers report as None."""
    tail = (1 - level) / 2
    with warnings.catch_warnings(), np.errstate(invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # "All-NaN slice": the empty figures described above
        return np.nanquantile(estimates, tail, axis=0), np.nanquantile(estimates, 1 - tail, axis=0)


def _little_bootstraps(num: np.ndarray, den: np.ndarray, n_boot: int, seed: int, level: float
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Bag of little bootstraps: s subsets of b = U^0.6 units, each resampled r times with
    Multinomial(U, 1/b) counts (s * r = n_boot). Each subset gives the quantiles of its resampled estimates
    around its own estimate; their average, added to the full-sample estimate, is the interval."""
    rng = np.random.default_rng(seed)
    n = num.shape[0]
    b = int(n**0.6)
    n_subsets = max(1, min(20, n_boot // 50))
    per_subset = max(1, n_boot // n_subsets)
    lows, highs = [], []
    for _ in range(n_subsets):
        idx = rng.choice(n, size=b, replace=False)
        counts = rng.multinomial(n, np.full(b, 1.0 / b), size=per_subset).astype(np.float64)  # (r, b)
        estimates = (counts @ num[idx]) / (counts @ den[idx])
        centre = num[idx].sum(0) / den[idx].sum(0)
        low, high = percentile_interval(estimates, level)
        lows.append(low - centre)
        highs.append(high - centre)
    with np.errstate(invalid="ignore", divide="ignore"):
        full = num.sum(0) / den.sum(0)
    return full + np.mean(lows, axis=0), full + np.mean(highs, axis=0)


def finite_or_none(x: float) -> float | None:
    """A JSON-safe bound: None where the bootstrap gave no finite value."""
    return float(x) if np.isfinite(x) else None
