"""A log bound to a reward: what every evaluation of every policy on it shares (DESIGN §5)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd

from mtf_core.errors import LogError
from mtf_core.profile import LogProfile, profile_log
from mtf_core import propensity
from mtf_core.propensity import Propensities
from mtf_core.evaluate.direct import DirectFitData, DirectModel, fit_direct
from mtf_core.reward import (
    ResolvedReward,
    RewardParts,
    RewardSpec,
    expected_signals,
    fit_position_curve,
    request_reward,
    resolve_reward,
)
from mtf_core.simulate import SimConfig, position_curve
from mtf_core.store import LogData

__all__ = ["CHUNK", "EvalContext", "prepare", "check_log_for_evaluation", "reward_preview", "time_split",
           "EvaluationSample", "evaluation_sample"]

CHUNK = 32_768  # requests per batch: amortises per-op overhead; a batch of scores (13 MB) stays in cache


@dataclass(frozen=True)
class EvalContext:
    """A log bound to a reward: what every evaluation of every policy on it shares."""

    log: LogData
    resolved: ResolvedReward
    logged: RewardParts  # observed composite reward of the logged actions
    logged_expected: np.ndarray  # (R, K)
    direct: DirectModel
    direct_fit: DirectFitData  # what the direct model was fitted on (these requests, or training sessions)
    unit: np.ndarray  # (R,) user index 0..U-1, the bootstrap's cluster
    unit_segment: np.ndarray  # (U,)
    sim_config: SimConfig | None
    n_top: int
    profile: LogProfile

    @cached_property
    def propensities(self) -> Propensities:
        """The logging density importance ratios divide by, and where it comes from (estimated on first use:
        training and re-ranking never need it)."""
        return propensity.propensities(self.log, self.profile)

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.log.task_names


def prepare(log: LogData, spec: RewardSpec, fitted_on: EvalContext | None = None) -> EvalContext:
    """Bind a reward to a log: position curve, normalisation, logged rewards and the direct model.

    With `fitted_on` (a context of other requests of the same log, e.g. the training sessions), its position
    curve, reward normalisation and direct model are used as they are: held-out figures then rest on
    nothing fitted to the held-out requests."""
    sim = SimConfig.from_json(log.meta["simulator_config"]) if log.is_simulated else None
    n_top = max(log.n_shown, 1)
    if fitted_on is not None:
        curve = fitted_on.resolved.position_curve
    else:
        curve = position_curve(sim, n_top) if sim else fit_position_curve(log.scores, log.labels, log.positions)
    shown = log.shown
    expected = expected_signals(log.scores, log.positions, curve)
    resolved = (fitted_on.resolved if fitted_on is not None
                else resolve_reward(spec, log.task_names, log.labels, shown, expected, curve))
    feedback = np.nan_to_num(log.labels).sum(1)
    logged = request_reward(resolved, feedback, log.continued, log.returned, log.weights, expected)
    if fitted_on is not None:
        direct, direct_fit = fitted_on.direct, fitted_on.direct_fit
    else:
        direct, direct_fit = fit_direct(log.segment, len(log.segments), expected @ resolved.coefficients,
                                        logged.immediate + logged.session, log.user_id)
    users, unit = np.unique(log.user_id, return_inverse=True)
    unit_segment = np.zeros(len(users), dtype=np.int64)
    unit_segment[unit] = log.segment
    profile = profile_log(log)
    return EvalContext(log, resolved, logged, expected, direct, direct_fit, unit, unit_segment, sim, n_top, profile)


def check_log_for_evaluation(log: LogData) -> None:
    if log.n_requests == 0:
        raise LogError(f"{log.path}: the log has no requests")
    if not log.shown.any():
        raise LogError(f"{log.path}: no candidate was shown (all positions are NULL)")


def reward_preview(ctx: EvalContext) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The logged composite reward per request by segment, and each signal's share of the immediate reward."""
    log = ctx.log
    names = np.asarray(log.segments)[log.segment]
    per_request = pd.DataFrame({"segment": names, "reward": ctx.logged.total, "immediate": ctx.logged.immediate,
                                "session": ctx.logged.session, "penalty": ctx.logged.penalty})
    contrib = np.nan_to_num(log.labels).sum(1) * ctx.resolved.coefficients  # (R, K)
    rows = []
    for s, name in enumerate(log.segments):
        totals = contrib[log.segment == s].sum(0)
        denom = np.abs(totals).sum()
        for task, value in zip(log.task_names, totals):
            rows.append({"segment": name, "task": task, "share": float(value / denom) if denom > 0 else 0.0})
    return per_request, pd.DataFrame(rows)


def time_split(log: LogData, validation_share: float) -> tuple[np.ndarray, np.ndarray]:
    """Request rows of the earlier and the later sessions (by session start): the last share validates."""
    sessions, first = np.unique(log.session_id, return_index=True)
    start = log.ts[first].astype("datetime64[us]").astype(np.int64)
    order = np.argsort(start, kind="stable")
    n_val = int(round(validation_share * len(sessions)))
    val_sessions = sessions[order[len(sessions) - n_val:]] if n_val else sessions[:0]
    is_val = np.isin(log.session_id, val_sessions)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


@dataclass(frozen=True)
class EvaluationSample:
    """The requests an evaluation runs on, and what that means for the figures."""

    ctx: EvalContext
    held_out: bool
    description: str


def evaluation_sample(log: LogData, spec: RewardSpec, held_out_share: float | None) -> EvaluationSample:
    """All requests (`held_out_share` None or 0), or the latest sessions held out from training.

    Held out, the direct model and the reward's normalisation are fitted on the earlier sessions, so a policy
    trained on those sessions is judged on requests that nothing it depends on has seen; on simulator logs
    the truth covers the same sessions. Figures on all requests are in-sample for policies trained on them."""
    if not held_out_share:
        return EvaluationSample(prepare(log, spec), False, f"all {log.n_requests:,} requests")
    train_rows, val_rows = time_split(log, held_out_share)
    if len(val_rows) == 0 or len(train_rows) == 0:
        raise LogError(f"{log.path}: too few sessions to hold out {held_out_share:.0%} of them; evaluate with "
                       "--sample all (in-sample figures)")
    fitted_on = prepare(log.subset(train_rows), spec)
    held = log.subset(val_rows)
    return EvaluationSample(prepare(held, spec, fitted_on), True,
                            f"held out: the latest {held_out_share:.0%} of sessions ({held.n_requests:,} requests), "
                            "with the direct model fitted on the earlier sessions")
