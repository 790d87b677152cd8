"""The direct model and the model-based estimators' intervals.

The direct model is `q(s, w) = a_seg + b_seg * x(s, w) - penalty(s, w)`, calibrated to the logged composite
reward by least squares per segment. x values the ranking that w produces, in one of two ways (`DirectView`):
- linear: the expected immediate reward of the ranking's MTL scores under the position curve;
- learned: the cross-fitted outcome network's value of the ranking (`outcome`), which learns what the MTL
  scores get wrong per candidate and the session terms.
Being linear in (a, b), the calibration is fitted from per-user sufficient statistics, which makes refitting
it in every bootstrap resample cheap: the DM and DR intervals carry that uncertainty instead of treating the
fitted (a, b) as known. The learned model's own uncertainty (the disagreement of its cross-fitted networks)
is added to the intervals in quadrature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from mtf_core.evaluate.bootstrap import BLB_THRESHOLD, bootstrap_ratio, percentile_interval, poisson_counts
from mtf_core.reward import penalty

if TYPE_CHECKING:
    from mtf_core.evaluate.context import EvalContext

__all__ = ["DirectModel", "DirectFitData", "DirectView", "LINEAR_LABEL", "LEARNED_LABEL", "fit_direct",
           "fit_from_user_stats", "direct_value", "model_based_intervals", "intervals_from_units", "model_numerators",
           "ModelTerms"]

LINEAR_LABEL = "linear direct model (per segment, on the MTL-score expected reward)"
LEARNED_LABEL = "learned outcome model (cross-fitted network, recalibrated per segment)"


@dataclass(frozen=True)
class DirectModel:
    """q(s, w) = intercept[seg] + slope[seg] * immediate_expected - penalty."""

    intercept: np.ndarray  # (S,)
    slope: np.ndarray  # (S,)


def _coefficients(n: np.ndarray, sx: np.ndarray, sy: np.ndarray, sxx: np.ndarray, sxy: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares (intercept, slope) from sums, elementwise; slope 1 where x does not vary (or n < 3)."""
    spread = n * sxx - sx**2
    fit = (n >= 3) & (spread > 1e-12 * np.maximum(n * sxx, 1e-300))
    slope = np.where(fit, (n * sxy - sx * sy) / np.where(fit, spread, 1.0), 1.0)
    intercept = np.where(n > 0, (sy - slope * sx) / np.maximum(n, 1e-300), 0.0)
    return intercept, slope


@dataclass(frozen=True)
class DirectFitData:
    """What the direct model was fitted on, per user: the sufficient statistics (n, sum x, sum y, sum x^2,
    sum xy) `[U,5]`, so that a bootstrap resample of users refits it on exactly those users' requests."""

    user_id: np.ndarray  # (U,)
    segment: np.ndarray  # (U,)
    stats: np.ndarray  # (U, 5)


def fit_direct(segment: np.ndarray, n_seg: int, x: np.ndarray, y: np.ndarray, user_id: np.ndarray
               ) -> tuple[DirectModel, DirectFitData]:
    """Per-segment least squares of the logged reward `y` on the expected immediate reward `x` `[R]`, and
    the per-user statistics it rests on."""
    sums = [np.bincount(segment, weights=v, minlength=n_seg) for v in (np.ones_like(x), x, y, x * x, x * y)]
    users, unit = np.unique(user_id, return_inverse=True)
    stats = np.stack([np.bincount(unit, weights=v, minlength=len(users))
                      for v in (np.ones_like(x), x, y, x * x, x * y)], 1)
    unit_segment = np.zeros(len(users), dtype=np.int64)
    unit_segment[unit] = segment
    return DirectModel(*_coefficients(*sums)), DirectFitData(users, unit_segment, stats)


def fit_from_user_stats(users: np.ndarray, segment: np.ndarray, stats: np.ndarray, n_seg: int
                        ) -> tuple[DirectModel, DirectFitData]:
    """`fit_direct` from per-user statistics `[U,5]` (users sorted, their segments), as a streamed pass
    gathers them: the same least squares per segment."""
    sums = [np.bincount(segment, weights=stats[:, j], minlength=n_seg) for j in range(5)]
    return DirectModel(*_coefficients(*sums)), DirectFitData(users, segment, stats)


def direct_value(ctx: "EvalContext", expected: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The linear model's q(s, w) per request for weights whose ranking yields `expected` signals `[R,K]`."""
    seg = ctx.log.segment
    immediate = expected @ ctx.resolved.coefficients
    return ctx.direct.intercept[seg] + ctx.direct.slope[seg] * immediate - penalty(ctx.resolved, weights, expected)


@dataclass(frozen=True)
class DirectView:
    """The direct model an evaluation rests on: how it values a ranking (x) and its per-segment calibration.

    `x_logged_folds` `[F,R]` (learned model only) is each cross-fitted network's own x of the logged ranking;
    `r2` the held-out R^2 of the request reward, overall then per segment, of every model that was fitted."""

    name: str  # "linear" | "learned"
    label: str
    model: DirectModel
    fit: DirectFitData
    x_logged: np.ndarray  # (R,)
    x_logged_folds: np.ndarray | None = None
    r2: dict[str, list[float]] | None = None

    def value(self, segment: np.ndarray, x: np.ndarray, penalty_: np.ndarray) -> np.ndarray:
        """q per request `[...,R]` from x `[...,R]` and the rule penalty `[R]`."""
        return self.model.intercept[segment] + self.model.slope[segment] * x - penalty_

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "label": self.label, "held_out_r2": self.r2}


@dataclass(frozen=True)
class ModelTerms:
    """Per-request inputs of DM and DR, split so that the model's (a, b) can be refitted per resample."""

    x_logged: np.ndarray  # (R,) expected immediate reward of the logged ranking
    x_target: np.ndarray  # (R,) expected immediate reward under the target (averaged over its draws)
    penalty_target: np.ndarray  # (R,)
    penalty_logged: np.ndarray  # (R,)
    reward: np.ndarray  # (R,) logged composite reward
    ratio: np.ndarray | None  # (R,) importance ratios; None: DM only
    x_target_folds: np.ndarray | None = None  # (F, R) each network's x under the target (learned model)
    x_logged_folds: np.ndarray | None = None  # (F, R)


def model_based_intervals(ctx: "EvalContext", view: DirectView, terms: ModelTerms, n_boot: int, seed: int,
                          level: float = 0.95) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Bootstrap intervals of DM (and DR where ratios exist), overall and per segment (`_resampled_intervals`),
    widened in quadrature by the spread of the learned model's networks where it has several."""
    intervals = _resampled_intervals(ctx, view, terms, n_boot, seed, level)
    spread = _network_spread(ctx, view, terms)
    if spread is None:
        return intervals
    z = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.5 + level / 2)))
    centre = _estimates(ctx, view.model, terms, terms.x_target, terms.x_logged)
    out = {}
    for name, (low, high) in intervals.items():
        extra = (z * spread[name]) ** 2
        out[name] = (centre[name] - np.sqrt((centre[name] - low) ** 2 + extra),
                     centre[name] + np.sqrt((high - centre[name]) ** 2 + extra))
    return out


def _by_segment_means(ctx: "EvalContext", per_request: np.ndarray) -> np.ndarray:
    """Means overall and per segment `[...,1+S]` of per-request values `[...,R]`."""
    seg, n_seg = ctx.log.segment, len(ctx.log.segments)
    one_hot = (seg[:, None] == np.arange(n_seg)[None, :]).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        by_seg = (per_request @ one_hot) / one_hot.sum(0)
    return np.concatenate([per_request.mean(-1, keepdims=True), by_seg], -1)


def _estimates(ctx: "EvalContext", model: DirectModel, terms: ModelTerms, x_target: np.ndarray,
               x_logged: np.ndarray) -> dict[str, np.ndarray]:
    seg = ctx.log.segment
    q_target = model.intercept[seg] + model.slope[seg] * x_target - terms.penalty_target
    out = {"dm": _by_segment_means(ctx, q_target)}
    if terms.ratio is not None:
        q_logged = model.intercept[seg] + model.slope[seg] * x_logged - terms.penalty_logged
        out["dr"] = _by_segment_means(ctx, q_target + terms.ratio * (terms.reward - q_logged))
    return out


def _network_spread(ctx: "EvalContext", view: DirectView, terms: ModelTerms) -> dict[str, np.ndarray] | None:
    """Standard error `[1+S]` per estimator from the disagreement of the F networks (trained on disjoint users,
    so their estimates are independent draws of the model's fit): std over networks / sqrt(F). Each network
    is recalibrated on these requests first: a level that the calibration removes is no disagreement."""
    if terms.x_target_folds is None or terms.x_logged_folds is None or len(terms.x_target_folds) < 2:
        return None
    log = ctx.log
    y = terms.reward + terms.penalty_logged
    per_net = []
    for x_target, x_logged in zip(terms.x_target_folds, terms.x_logged_folds):
        model, _ = fit_direct(log.segment, len(log.segments), x_logged, y, log.user_id)
        per_net.append(_estimates(ctx, model, terms, x_target, x_logged))
    return {name: np.nan_to_num(np.std([p[name] for p in per_net], axis=0, ddof=1) / np.sqrt(len(per_net)))
            for name in per_net[0]}


def _resampled_intervals(ctx: "EvalContext", view: DirectView, terms: ModelTerms, n_boot: int, seed: int,
                         level: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Bootstrap intervals of DM (and DR where ratios exist), overall and per segment, refitting the direct
    model's calibration in every resample on the data it was fitted on (`view.fit`: the same requests, or the
    training sessions for a held-out evaluation, whose users are resampled jointly with the evaluated ones).
    Returns {estimator: (low `[1+S]`, high `[1+S]`)}, overall first.

    Above BLB_THRESHOLD users the model's two coefficients per segment are estimated so precisely that they
    are held fixed and the bag of little bootstraps resamples the per-request terms."""
    n_eval_units, n_seg = len(ctx.unit_segment), len(ctx.log.segments)
    rho = np.zeros_like(terms.reward) if terms.ratio is None else terms.ratio
    per_request = np.stack([np.ones_like(rho), terms.x_target, terms.penalty_target, 1.0 - rho,
                            terms.x_target - rho * terms.x_logged,
                            rho * (terms.reward + terms.penalty_logged) - terms.penalty_target], 1)
    evaluated = np.stack([np.bincount(ctx.unit, weights=c, minlength=n_eval_units) for c in per_request.T], 1)
    names = ["dm"] if terms.ratio is None else ["dm", "dr"]
    return intervals_from_units(view.fit, view.model, np.unique(ctx.log.user_id), ctx.unit_segment, evaluated,
                                n_seg, names, n_boot, seed, level)


def intervals_from_units(fit: DirectFitData, model: DirectModel, eval_users: np.ndarray, eval_segment: np.ndarray,
                         evaluated: np.ndarray, n_seg: int, names: list[str], n_boot: int, seed: int,
                         level: float = 0.95) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The bootstrap of `_resampled_intervals` from per-user sums alone (what a streamed evaluation keeps):
    the fit's statistics per user, and the evaluated users' (sorted ids) six sums `[U,6]`."""
    # One row per user of either part: the fit's statistics beside the evaluated requests' terms.
    users = np.union1d(eval_users, fit.user_id)
    per_unit = np.zeros((len(users), 5 + evaluated.shape[1]))
    per_unit[np.searchsorted(users, fit.user_id), :5] = fit.stats
    per_unit[np.searchsorted(users, eval_users), 5:] = evaluated
    segment = np.zeros(len(users), dtype=np.int64)
    segment[np.searchsorted(users, fit.user_id)] = fit.segment
    segment[np.searchsorted(users, eval_users)] = eval_segment
    n_units = len(users)
    if n_units > BLB_THRESHOLD:
        return _fixed_model_intervals(eval_segment, n_seg, model, evaluated, names, n_boot, seed, level)
    one_hot = (segment[:, None] == np.arange(n_seg)[None, :]).astype(np.float64)  # (U, S)
    by_segment = torch.from_numpy((per_unit[:, None, :] * one_hot[:, :, None]).reshape(n_units, -1))
    estimates = []
    for counts in poisson_counts(n_units, n_boot, seed):
        sums = (counts.double() @ by_segment).numpy().reshape(len(counts), n_seg, -1)  # (b, S, 11)
        estimates.append(_values_from_sums(sums, names))
    low, high = percentile_interval(np.concatenate(estimates), level)
    width = 1 + n_seg
    return {name: (low[i * width:(i + 1) * width], high[i * width:(i + 1) * width]) for i, name in enumerate(names)}


def _values_from_sums(sums: np.ndarray, names: list[str]) -> np.ndarray:
    """DM and DR `[b, len(names) * (1+S)]` (overall, then per segment) from per-segment sums `[b,S,11]`:
    the fit's (n, x, y, x^2, xy), then the evaluated requests' (n, x_target, penalty_target, 1 - rho,
    x_target - rho x_logged, rho (r + penalty_logged) - penalty_target)."""
    n_fit, sx, sy, sxx, sxy = np.moveaxis(sums[..., :5], -1, 0)
    a, b = _coefficients(n_fit, sx, sy, sxx, sxy)
    numerators = model_numerators(a, b, sums[..., 5:])
    n = sums[..., 5]
    out = []
    with np.errstate(invalid="ignore", divide="ignore"):
        for name in names:
            num = numerators[name]
            out.append(num.sum(1, keepdims=True) / n.sum(1, keepdims=True))
            out.append(num / n)
    return np.concatenate(out, 1)


def model_numerators(intercept: np.ndarray, slope: np.ndarray, evaluated: np.ndarray) -> dict[str, np.ndarray]:
    """DM's and DR's numerators (their values times the requests) from the evaluated requests' six sums
    `[..., 6]` (layout of `_values_from_sums`) and the calibration's coefficients (broadcast against them)."""
    n, s_xt, s_pt, s_one_minus_rho, s_xt_rho_xl, s_rest = np.moveaxis(evaluated, -1, 0)
    return {"dm": intercept * n + slope * s_xt - s_pt,
            "dr": intercept * s_one_minus_rho + slope * s_xt_rho_xl + s_rest}


def _fixed_model_intervals(unit_segment: np.ndarray, n_seg: int, model: DirectModel, evaluated: np.ndarray,
                           names: list[str], n_boot: int, seed: int, level: float
                           ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Intervals with the model held at its fit: evaluated `[U,6]` per evaluated user (layout as above)."""
    numerators = model_numerators(model.intercept[unit_segment], model.slope[unit_segment], evaluated)
    n = evaluated[:, 0]
    out = {}
    for name in names:
        cols_num = [numerators[name]] + [np.where(unit_segment == s, numerators[name], 0.0) for s in range(n_seg)]
        cols_den = [n] + [np.where(unit_segment == s, n, 0.0) for s in range(n_seg)]
        out[name] = bootstrap_ratio(np.stack(cols_num, 1), np.stack(cols_den, 1), n_boot, seed, level)
    return out
