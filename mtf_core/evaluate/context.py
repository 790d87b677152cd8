"""A log bound to a reward: what every evaluation of every policy on it shares (DESIGN §5)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import pandas as pd

from mtf_core.errors import LogError
from mtf_core.profile import LogProfile, logged_action
from mtf_core import propensity
from mtf_core.propensity import Propensities
from mtf_core.evaluate.direct import LEARNED_LABEL, LINEAR_LABEL, DirectFitData, DirectModel, DirectView, fit_direct
from mtf_core.evaluate.outcome import (
    MIN_USERS,
    N_FOLDS,
    LearnedOutcome,
    apply_outcome,
    calibration_table,
    fit_outcome,
    r_squared,
    user_folds,
)
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

__all__ = ["CHUNK", "OUTCOME_MODELS", "EvalContext", "prepare", "outcome_fit", "check_log_for_evaluation",
           "reward_preview", "time_split", "EvaluationSample", "evaluation_sample"]

CHUNK = 32_768  # requests per batch: amortises per-op overhead; a batch of scores (13 MB) stays in cache
OUTCOME_MODELS = ("auto", "linear", "learned")  # auto: the learned model where its held-out fit is better


@dataclass(frozen=True)
class EvalContext:
    """A log bound to a reward: what every evaluation of every policy on it shares."""

    log: LogData
    resolved: ResolvedReward
    logged: RewardParts  # observed composite reward of the logged actions
    logged_expected: np.ndarray  # (R, K) direct-method signals of the ranking the logged action produces
    logged_positions: np.ndarray  # (R, N) that ranking (`profile.action_positions`): the shown one, as a rule
    direct: DirectModel
    direct_fit: DirectFitData  # what the direct model was fitted on (these requests, or training sessions)
    unit: np.ndarray  # (R,) user index 0..U-1, the bootstrap's cluster
    unit_segment: np.ndarray  # (U,)
    sim_config: SimConfig | None
    n_top: int
    profile: LogProfile
    outcome_model: str = "auto"
    fitted_on: "EvalContext | None" = None  # the training sessions' context of a held-out evaluation

    @cached_property
    def learned_outcome(self) -> LearnedOutcome | None:
        """The cross-fitted outcome networks' predictions on these requests (fitted on first use: training
        never needs them); None where too few users to fit them. Held out, the training sessions' networks."""
        if self.fitted_on is not None:
            source = self.fitted_on.learned_outcome
            return None if source is None else apply_outcome(source, self.log, self.resolved.coefficients)
        if len(self.unit_segment) < N_FOLDS * MIN_USERS or not self.log.shown.any():
            return None
        return fit_outcome(self.log, self.logged.session, self.resolved.position_curve, self.resolved.coefficients)

    @cached_property
    def linear_view(self) -> DirectView:
        """The linear direct model as a view (the baseline the learned model must beat)."""
        return DirectView("linear", LINEAR_LABEL, self.direct, self.direct_fit,
                          self.logged_expected @ self.resolved.coefficients)

    @cached_property
    def direct_view(self) -> DirectView:
        """The direct model DM and DR rest on: `outcome_model`, where "auto" takes the learned model when its
        cross-fitted R^2 of the request reward beats the linear model's."""
        if self.fitted_on is not None:
            trained = self.fitted_on.direct_view
            if trained.name == "linear":
                return replace(self.linear_view, r2=trained.r2)
            learned = self.learned_outcome
            assert learned is not None
            x, x_folds = _logged_x(self, learned)
            return DirectView("learned", trained.label, trained.model, trained.fit, x, x_folds, trained.r2)
        if self.outcome_model == "linear":
            return self.linear_view
        learned = self.learned_view
        if learned is None:
            if self.outcome_model == "learned":
                raise LogError(f"{self.log.path}: too few users ({len(self.unit_segment)}) to fit the learned "
                               f"outcome model (it needs {N_FOLDS * MIN_USERS}); use the linear one")
            return self.linear_view
        assert learned.r2 is not None
        if self.outcome_model == "learned" or learned.r2["learned"][0] > learned.r2["linear"][0]:
            return learned
        return replace(self.linear_view, r2=learned.r2)

    @cached_property
    def learned_view(self) -> DirectView | None:
        """The learned outcome model as a view, recalibrated per segment on its cross-fitted predictions, with
        both models' held-out R^2 (None where it cannot be fitted). On the requests it was fitted on."""
        learned = self.learned_outcome if self.fitted_on is None else None
        if learned is None:
            return None
        y = self.logged.immediate + self.logged.session
        n_seg = len(self.log.segments)
        x, x_folds = _logged_x(self, learned)
        r2 = {"linear": r_squared(y, _cross_fitted_linear(self, self.linear_view.x_logged, y), self.log.segment,
                                  n_seg).tolist(),
              "learned": r_squared(y, _cross_fitted_linear(self, x, y), self.log.segment, n_seg).tolist()}
        model, fit = fit_direct(self.log.segment, n_seg, x, y, self.log.user_id)
        return DirectView("learned", LEARNED_LABEL, model, fit, x, x_folds, r2)

    @cached_property
    def propensities(self) -> Propensities:
        """The logging density importance ratios divide by, and where it comes from (estimated on first use:
        training and re-ranking never need it)."""
        return propensity.propensities(self.log, self.profile)

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.log.task_names


def prepare(log: LogData, spec: RewardSpec, fitted_on: EvalContext | None = None, outcome_model: str = "auto"
            ) -> EvalContext:
    """Bind a reward to a log: position curve, normalisation, logged rewards and the direct model.

    With `fitted_on` (a context of other requests of the same log, e.g. the training sessions), its position
    curve, reward normalisation and direct models are used as they are: held-out figures then rest on
    nothing fitted to the held-out requests. `outcome_model` (OUTCOME_MODELS) picks DM's and DR's model."""
    if outcome_model not in OUTCOME_MODELS:
        raise ValueError(f"outcome model {outcome_model!r}: expected one of {', '.join(OUTCOME_MODELS)}")
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
    profile, positions = logged_action(log)
    if positions is not log.positions:  # a later stage reordered some rankings: value the logged action's own ranking
        expected = expected_signals(log.scores, positions, curve)
    feedback = log.label_totals()
    logged = request_reward(resolved, feedback, log.continued, log.returned, log.weights, expected)
    if fitted_on is not None:
        direct, direct_fit = fitted_on.direct, fitted_on.direct_fit
    else:
        direct, direct_fit = fit_direct(log.segment, len(log.segments), expected @ resolved.coefficients,
                                        logged.immediate + logged.session, log.user_id)
    users, unit = np.unique(log.user_id, return_inverse=True)
    unit_segment = np.zeros(len(users), dtype=np.int64)
    unit_segment[unit] = log.segment
    return EvalContext(log, resolved, logged, expected, positions, direct, direct_fit, unit, unit_segment, sim, n_top,
                       profile, fitted_on.outcome_model if fitted_on is not None else outcome_model, fitted_on)


def _logged_x(ctx: EvalContext, learned: LearnedOutcome) -> tuple[np.ndarray, np.ndarray]:
    """The learned model's value of the logged rankings `[R]`, and each network's `[F,R]`."""
    curve, positions = ctx.resolved.position_curve, ctx.logged_positions
    exam = np.where((positions >= 0) & (positions < len(curve)), curve[np.clip(positions, 0, len(curve) - 1)], 0.0)
    return (learned.baseline + (exam * learned.item_value).sum(1),
            learned.fold_baseline + (exam[None] * learned.fold_item_value).sum(2))


def _cross_fitted_linear(ctx: EvalContext, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The per-segment calibration `a + b x` of every request `[R]` fitted on the other user folds (the learned
    model's folds): the linear model's held-out prediction for the MTL-score x, the learned model's for its
    cross-fitted x, so that both are judged as DM uses them and on the same held-out footing."""
    log = ctx.log
    folds = user_folds(log.user_id, N_FOLDS, 0)
    predicted = np.empty(log.n_requests)
    for f in range(N_FOLDS):
        train, test = folds != f, folds == f
        model, _ = fit_direct(log.segment[train], len(log.segments), x[train], y[train], log.user_id[train])
        predicted[test] = model.intercept[log.segment[test]] + model.slope[log.segment[test]] * x[test]
    return predicted


def outcome_fit(ctx: EvalContext) -> tuple[pd.DataFrame, pd.DataFrame]:
    """How well each direct model predicts the logged request reward on users it was not fitted on: R^2 per
    segment (overall first), and the calibration table (observed against predicted, in deciles of the
    prediction, per segment). The learned model's rows are absent where it could not be fitted."""
    log = ctx.log
    y = ctx.logged.immediate + ctx.logged.session
    linear = ctx.linear_view
    predicted = {"linear": (_cross_fitted_linear(ctx, linear.x_logged, y) if ctx.fitted_on is None
                            else linear.value(log.segment, linear.x_logged, np.zeros(log.n_requests)))}
    learned = ctx.learned_outcome if ctx.outcome_model != "linear" else None
    if learned is not None:
        x = _logged_x(ctx, learned)[0]
        trained = ctx.learned_view if ctx.fitted_on is None else ctx.fitted_on.learned_view
        assert trained is not None
        predicted["learned"] = (_cross_fitted_linear(ctx, x, y) if ctx.fitted_on is None
                                else trained.value(log.segment, x, np.zeros(log.n_requests)))
    names = ("all", *log.segments)
    rows = [{"model": model, "segment": name, "r2": float(r2), "n_requests": int(n)}
            for model, pred in predicted.items()
            for name, r2, n in zip(names, r_squared(y, pred, log.segment, len(log.segments)),
                                   [log.n_requests, *np.bincount(log.segment, minlength=len(log.segments))])]
    return pd.DataFrame(rows), calibration_table(y, predicted, log.segment, log.segments)


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
    contrib = log.label_totals() * ctx.resolved.coefficients  # (R, K)
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


def evaluation_sample(log: LogData, spec: RewardSpec, held_out_share: float | None, outcome_model: str = "auto"
                      ) -> EvaluationSample:
    """All requests (`held_out_share` None or 0), or the latest sessions held out from training.

    Held out, the direct model and the reward's normalisation are fitted on the earlier sessions, so a policy
    trained on those sessions is judged on requests that nothing it depends on has seen; on simulator logs
    the truth covers the same sessions. Figures on all requests are in-sample for policies trained on them."""
    if not held_out_share:
        return EvaluationSample(prepare(log, spec, outcome_model=outcome_model), False,
                                f"all {log.n_requests:,} requests")
    train_rows, val_rows = time_split(log, held_out_share)
    if len(val_rows) == 0 or len(train_rows) == 0:
        raise LogError(f"{log.path}: too few sessions to hold out {held_out_share:.0%} of them; evaluate with "
                       "--sample all (in-sample figures)")
    fitted_on = prepare(log.subset(train_rows), spec, outcome_model=outcome_model)
    held = log.subset(val_rows)
    return EvaluationSample(prepare(held, spec, fitted_on), True,
                            f"held out: the latest {held_out_share:.0%} of sessions ({held.n_requests:,} requests), "
                            "with the direct model fitted on the earlier sessions")
