"""The simulator's ground truth: a policy run online with the log's own random numbers."""

from __future__ import annotations

from datetime import datetime
from typing import Callable

import numpy as np
import torch

from mtf_core.evaluate.bootstrap import bootstrap_ratio, finite_or_none
from mtf_core.evaluate.context import EvalContext
from mtf_core.policies.base import FusionPolicy
from mtf_core.reward import request_reward
from mtf_core.simulate import run_online, session_start_seconds

__all__ = ["ground_truth", "truth_with_unit_terms", "policy_for_truth"]


def ground_truth(ctx: EvalContext, policy: Callable | None, form: str, bias: np.ndarray | None, n_boot: int,
                 seed: int) -> dict[str, object]:
    """Run the policy online with the log's random numbers; mean composite reward per request and its CI."""
    return truth_with_unit_terms(ctx, policy, form, bias, n_boot, seed)[0]


def truth_with_unit_terms(ctx: EvalContext, policy: Callable | None, form: str, bias: np.ndarray | None,
                          n_boot: int, seed: int) -> tuple[dict[str, object], np.ndarray]:
    """The truth and its per-user (reward sum, request count) `[U,2]`, for paired differences under common
    random numbers (the same users and noise for every policy)."""
    assert ctx.sim_config is not None
    torch.manual_seed(seed)
    out = run_online(ctx.sim_config, policy, form, bias=None if bias is None else torch.from_numpy(bias))
    parts = request_reward(ctx.resolved, out.feedback_sum, out.continued, out.returned.astype(np.float64),
                           out.weights, out.expected_sum)
    # Only the sessions of the log view's time span (all of them, or the held-out latest ones). The span is
    # set by time, not by the log's session ids: another policy keeps users coming back on other days.
    config = ctx.sim_config
    start = np.datetime64(datetime.fromisoformat(config.start))
    first = (ctx.log.ts[ctx.log.step == 0].min() - start) / np.timedelta64(1, "s")
    in_view = session_start_seconds(config, out.session) >= first - 1e-6
    user = out.session % config.n_users
    n_users = config.n_users
    total = np.where(in_view, parts.total, 0.0)
    num = np.bincount(user, weights=total, minlength=n_users)
    den = np.bincount(user, weights=in_view.astype(np.float64), minlength=n_users)
    seg_u = np.zeros(n_users, dtype=np.int64)
    seg_u[user] = out.segment
    cols_num, cols_den = [num], [den]
    for s in range(len(ctx.log.segments)):
        cols_num.append(np.where(seg_u == s, num, 0.0))
        cols_den.append(np.where(seg_u == s, den, 0.0))
    # Per user over the horizon (a user who stops coming back contributes fewer requests): the long-term view.
    cols_num.append(num)
    cols_den.append(np.ones(n_users))
    low, high = bootstrap_ratio(np.stack(cols_num, 1), np.stack(cols_den, 1), n_boot, seed + 2)
    values = [float(n.sum() / d.sum()) if d.sum() > 0 else None for n, d in zip(cols_num, cols_den)]
    result: dict[str, object] = {"value": values[0], "ci_low": float(low[0]), "ci_high": float(high[0]),
                                 "n_requests": int(in_view.sum())}
    result["segments"] = [{"segment": name, "value": values[i + 1], "ci_low": finite_or_none(low[i + 1]),
                           "ci_high": finite_or_none(high[i + 1])} for i, name in enumerate(ctx.log.segments)]
    result["per_user"] = {"value": values[-1], "ci_low": float(low[-1]), "ci_high": float(high[-1])}
    return result, np.stack([num, den], 1)


def policy_for_truth(policy: FusionPolicy, stochastic: bool) -> Callable:
    """The callable that `run_online` calls: the policy's mean, or a draw when evaluated as stochastic."""
    def act(state):  # type: ignore[no-untyped-def]
        return policy.act(state, deterministic=not stochastic)
    return act
