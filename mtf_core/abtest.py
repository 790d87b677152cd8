"""A/B read-out of a log whose weights are a few fixed vectors (arms): each arm on its own traffic.

Importance weighting cannot reach a vector that was never logged, but each logged arm's value is measured
on-policy: the mean composite reward per request of the requests it ranked, per segment, with a 95%
interval over users, and its difference from the arm with the most users (the control: by users, not
requests, since a better arm earns more requests), resampling the same users for every arm. Arms are
assigned by user in a proper A/B test; where users met several arms the read-out says so, since the arms'
traffic then shares users.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from mtf_core.evaluate.bootstrap import N_BOOT, percentile_interval, poisson_counts
from mtf_core.evaluate.context import EvalContext

__all__ = ["ab_readout"]


def _arm_label(tasks: tuple[str, ...], weights: np.ndarray) -> str:
    return ",".join(f"{t}={w:.3g}" for t, w in zip(tasks, weights))


def ab_readout(ctx: EvalContext, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """One row per (segment, arm): requests, users, value per request with its interval, and the difference
    from the segment's control arm with its interval; `users_in_several_arms` flags a test that was not
    randomised by user."""
    log, reward = ctx.log, ctx.logged.total
    n_units = len(ctx.unit_segment)
    rows = []
    for s, segment in enumerate(log.segments):
        in_segment = log.segment == s
        arms, arm_of = np.unique(np.round(log.weights[in_segment], 9), axis=0, return_inverse=True)
        arm_of = arm_of.reshape(-1)
        units = ctx.unit[in_segment]
        users = np.array([len(np.unique(units[arm_of == a])) for a in range(len(arms))])
        order = np.argsort(-users, kind="stable")  # the control (most users) first
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        arm_of = rank[arm_of]
        num = np.zeros((n_units, len(arms)))
        den = np.zeros((n_units, len(arms)))
        np.add.at(num, (units, arm_of), reward[in_segment])
        np.add.at(den, (units, arm_of), 1.0)
        arms_per_user = (den > 0).sum(1)
        estimates = []
        for counts in poisson_counts(n_units, n_boot, seed):
            with np.errstate(invalid="ignore", divide="ignore"):
                estimates.append((counts.double() @ torch.from_numpy(num)).numpy()
                                 / (counts.double() @ torch.from_numpy(den)).numpy())
        boot = np.concatenate(estimates)
        low, high = percentile_interval(boot, level)
        diff_low, diff_high = percentile_interval(boot - boot[:, :1], level)
        value = num.sum(0) / den.sum(0)
        for j in range(len(arms)):
            rows.append({"segment": segment, "arm": _arm_label(log.task_names, arms[order[j]]),
                         "control": j == 0, "requests": int(den[:, j].sum()), "users": int((den[:, j] > 0).sum()),
                         "value": float(value[j]), "ci_low": float(low[j]), "ci_high": float(high[j]),
                         "difference": float(value[j] - value[0]), "difference_low": float(diff_low[j]),
                         "difference_high": float(diff_high[j]),
                         "users_in_several_arms": int((arms_per_user > 1).sum())})
    return pd.DataFrame(rows)
