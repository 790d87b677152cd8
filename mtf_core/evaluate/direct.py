"""The direct model and the model-based estimators' intervals.

The direct model is `q(s, w) = a_seg + b_seg * x(s, w) - penalty(s, w)`, where x is the expected immediate
reward of the ranking that w produces (MTL scores x position curve), calibrated to the logged composite
reward by least squares per segment. Being linear in (a, b), it is fitted from per-user sufficient
statistics, which makes refitting it in every bootstrap resample cheap: the DM and DR intervals then
carry the model's own uncertainty instead of treating the fitted (a, b) as known.
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

__all__ = ["DirectModel", "DirectFitData", "fit_direct", "direct_value", "model_based_intervals", "ModelTerms"]


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


def direct_value(ctx: "EvalContext", expected: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """q(s, w) per request for weights whose ranking yields `expected` signals `[R,K]`."""
    seg = ctx.log.segment
    immediate = expected @ ctx.resolved.coefficients
    return ctx.direct.intercept[seg] + ctx.direct.slope[seg] * immediate - penalty(ctx.resolved, weights, expected)


@dataclass(frozen=True)
class ModelTerms:
    """Per-request inputs of DM and DR, split so that the model's (a, b) can be refitted per resample."""

    x_logged: np.ndarray  # (R,) expected immediate reward of the logged ranking
    x_target: np.ndarray  # (R,) expected immediate reward under the target (averaged over its draws)
    penalty_target: np.ndarray  # (R,)
    penalty_logged: np.ndarray  # (R,)
    reward: np.ndarray  # (R,) logged composite reward
    ratio: np.ndarray | None  # (R,) importance ratios; None: DM only


def model_based_intervals(ctx: "EvalContext", terms: ModelTerms, n_boot: int, seed: int, level: float = 0.95
                          ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Bootstrap intervals of DM (and DR where ratios exist), overall and per segment, refitting the direct
    model in every resample on the data it was fitted on (`ctx.direct_fit`: the same requests, or the
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
    # One row per user of either part: the fit's statistics beside the evaluated requests' terms.
    eval_users = np.unique(ctx.log.user_id)
    fit = ctx.direct_fit
    users = np.union1d(eval_users, fit.user_id)
    per_unit = np.zeros((len(users), 5 + evaluated.shape[1]))
    per_unit[np.searchsorted(users, fit.user_id), :5] = fit.stats
    per_unit[np.searchsorted(users, eval_users), 5:] = evaluated
    segment = np.zeros(len(users), dtype=np.int64)
    segment[np.searchsorted(users, fit.user_id)] = fit.segment
    segment[np.searchsorted(users, eval_users)] = ctx.unit_segment
    n_units = len(users)
    if n_units > BLB_THRESHOLD:
        return _fixed_model_intervals(ctx, evaluated, names, n_boot, seed, level)
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
    n_fit, sx, sy, sxx, sxy, n, s_xt, s_pt, s_one_minus_rho, s_xt_rho_xl, s_rest = np.moveaxis(sums, -1, 0)
    a, b = _coefficients(n_fit, sx, sy, sxx, sxy)
    numerators = {"dm": a * n + b * s_xt - s_pt, "dr": a * s_one_minus_rho + b * s_xt_rho_xl + s_rest}
    out = []
    with np.errstate(invalid="ignore", divide="ignore"):
        for name in names:
            num = numerators[name]
            out.append(num.sum(1, keepdims=True) / n.sum(1, keepdims=True))
            out.append(num / n)
    return np.concatenate(out, 1)


def _fixed_model_intervals(ctx: "EvalContext", evaluated: np.ndarray, names: list[str], n_boot: int, seed: int,
                           level: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Intervals with the model held at its fit: evaluated `[U,6]` per evaluated user (layout as above)."""
    n_seg = len(ctx.log.segments)
    a, b = ctx.direct.intercept[ctx.unit_segment], ctx.direct.slope[ctx.unit_segment]
    n, s_xt, s_pt, s_one_minus_rho, s_xt_rho_xl, s_rest = evaluated.T
    numerators = {"dm": a * n + b * s_xt - s_pt, "dr": a * s_one_minus_rho + b * s_xt_rho_xl + s_rest}
    out = {}
    for name in names:
        cols_num = [numerators[name]] + [np.where(ctx.unit_segment == s, numerators[name], 0.0) for s in range(n_seg)]
        cols_den = [n] + [np.where(ctx.unit_segment == s, n, 0.0) for s in range(n_seg)]
        out[name] = bootstrap_ratio(np.stack(cols_num, 1), np.stack(cols_den, 1), n_boot, seed, level)
    return out
