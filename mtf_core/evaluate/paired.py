"""Paired differences between two policies evaluated on the same log.

Two policies' estimates on one log share their users, so the interval of their difference resamples the
same users for both (one Poisson bootstrap over the per-user terms of both). That is far tighter than
comparing two separate intervals, because the users' own variation cancels; with the simulator's common
random numbers the same holds for the truth. For DM and DR the paired difference holds the direct model at
its fit: the model's own uncertainty is inside each policy's interval (refitted per resample), not here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from mtf_core.errors import LogError
from mtf_core.evaluate.bootstrap import N_BOOT, percentile_interval, poisson_counts

if TYPE_CHECKING:
    from mtf_core.evaluate.policy_value import EvaluationResult

__all__ = ["paired_difference"]

_MAX_COUNT_CELLS = 20_000_000  # resamples x users held at once (80 MB of float32 counts)


def paired_difference(a: "EvaluationResult", b: "EvaluationResult", estimator: str, n_boot: int = N_BOOT,
                      seed: int = 0, level: float = 0.95, users: np.ndarray | None = None
                      ) -> dict[str, object] | None:
    """Difference a - b of one estimator (or `truth`) with a paired interval, and the relative lift a / b - 1
    with its interval; over the users selected by the boolean mask `users` (e.g. one segment's), else all.
    None where either result lacks that estimator or no user is selected."""
    if estimator not in a.unit_terms or estimator not in b.unit_terms:
        return None
    ta, tb = a.unit_terms[estimator], b.unit_terms[estimator]
    if ta.shape != tb.shape:
        raise LogError(f"{a.policy} and {b.policy} were evaluated on different users; a paired difference "
                       "needs both on the same log")
    if users is not None:
        ta, tb = ta[users], tb[users]
        if not len(ta) or ta[:, 1].sum() <= 0 or tb[:, 1].sum() <= 0:
            return None
    value_a, value_b = ta[:, 0].sum() / ta[:, 1].sum(), tb[:, 0].sum() / tb[:, 1].sum()
    both = torch.from_numpy(np.concatenate([ta, tb], 1))  # (U, 4): num_a, den_a, num_b, den_b
    chunk = max(1, min(100, _MAX_COUNT_CELLS // max(len(ta), 1)))
    diffs, lifts = [], []
    for counts in poisson_counts(len(ta), n_boot, seed, chunk):
        sums = (counts.double() @ both).numpy()
        with np.errstate(invalid="ignore", divide="ignore"):  # a resample without the users: NaN, skipped
            ra, rb = sums[:, 0] / sums[:, 1], sums[:, 2] / sums[:, 3]
            diffs.append(ra - rb)
            lifts.append(ra / rb - 1.0)
    (d_low, l_low), (d_high, l_high) = percentile_interval(
        np.stack([np.concatenate(diffs), np.concatenate(lifts)], 1), level)
    difference = float(value_a - value_b)
    return {"estimator": estimator, "policy": a.policy, "baseline": b.policy, "difference": difference,
            "ci_low": float(d_low), "ci_high": float(d_high),
            "lift": float(value_a / value_b - 1.0) if value_b else None,
            "lift_low": float(l_low), "lift_high": float(l_high),
            "separated": bool(d_low > 0 or d_high < 0)}
