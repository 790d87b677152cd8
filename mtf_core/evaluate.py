"""Counterfactual ranking metrics, off-policy estimates and the simulator's ground truth (DESIGN §5).

Every figure is a ratio of sums over requests (a mean is a ratio with denominator 1), aggregated per
user, so one clustered bootstrap serves them all: users are resampled with Poisson(1) counts (the
Poisson bootstrap of Chamandy et al., 2012), which keeps the requests of one user together.

Off-policy estimators follow Open Bandit Pipeline's split: per-request terms, their ratio of sums as the
estimate, the bootstrap as the interval. Importance ratios:
- stochastic targets: rho = exp(logp_target(w_logged) - logging_logp);
- deterministic targets (a fixed vector, a policy's mean): the kernelised ratio of Kallus & Zhou (2018),
  rho = K_h(w_logged - pi(s)) / p_logging(w_logged), with a Gaussian kernel on the (K-1)-dim simplex
  measured in the same coordinates as the Dirichlet density (first K-1 weights), bandwidth reported.
The direct method is `q(s, w) = a_seg + b_seg * immediate_expected(s, w) - penalty(s, w)`: the expected
immediate reward of the ranking w produces (MTL scores x position curve), calibrated to the logged
composite reward by least squares per segment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import pandas as pd
import torch

from mtf_core.errors import LogError
from mtf_core.fusion import fuse
from mtf_core.policies.base import FusionPolicy
from mtf_core.reward import (
    ResolvedReward,
    RewardParts,
    RewardSpec,
    expected_signals,
    fit_position_curve,
    penalty,
    request_reward,
    resolve_reward,
)
from mtf_core.simulate import SimConfig, position_curve, run_online
from mtf_core.store import LogData, iter_chunks

__all__ = [
    "EvalContext",
    "TargetActions",
    "Ratio",
    "Estimator",
    "IPS",
    "SNIPS",
    "DR",
    "DM",
    "NCIS",
    "ESTIMATORS",
    "prepare",
    "target_actions",
    "rerank_metrics",
    "rerank_core",
    "top_signals",
    "expected_under",
    "ndcg_at_k",
    "gauc",
    "bootstrap_ratio",
    "evaluate_policy",
    "ground_truth",
    "EvaluationResult",
    "CHUNK",
    "policy_for_truth",
    "importance_ratio",
    "direct_value",
    "kernel_ratio",
    "default_bandwidth",
    "OPEInputs",
    "check_log_for_evaluation",
]

CHUNK = 32_768  # requests per batch: amortises per-op overhead; a batch of scores (13 MB) stays in cache
N_BOOT = 500
N_DM_SAMPLES = 4


# ----------------------------------------------------------------------------------------- context


@dataclass(frozen=True)
class DirectModel:
    """q(s, w) = intercept[seg] + slope[seg] * immediate_expected - penalty."""

    intercept: np.ndarray  # (S,)
    slope: np.ndarray  # (S,)


@dataclass(frozen=True)
class EvalContext:
    """A log bound to a reward: what every evaluation of every policy on it shares."""

    log: LogData
    resolved: ResolvedReward
    logged: RewardParts  # observed composite reward of the logged actions
    logged_expected: np.ndarray  # (R, K)
    direct: DirectModel
    unit: np.ndarray  # (R,) user index 0..U-1, the bootstrap's cluster
    unit_segment: np.ndarray  # (U,)
    sim_config: SimConfig | None
    n_top: int

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.log.task_names


def prepare(log: LogData, spec: RewardSpec) -> EvalContext:
    """Bind a reward to a log: position curve, normalisation, logged rewards and the direct model."""
    sim = SimConfig.from_json(log.meta["simulator_config"]) if log.is_simulated else None
    n_top = max(log.n_shown, 1)
    curve = position_curve(sim, n_top) if sim else fit_position_curve(log.scores, log.labels, log.positions)
    shown = log.shown
    expected = expected_signals(log.scores, log.positions, curve)
    resolved = resolve_reward(spec, log.task_names, log.labels, shown, expected, curve)
    feedback = np.nan_to_num(log.labels).sum(1)
    logged = request_reward(resolved, feedback, log.continued, log.returned, log.weights, expected)
    direct = _fit_direct(log.segment, len(log.segments), expected @ resolved.coefficients,
                         logged.immediate + logged.session)
    users, unit = np.unique(log.user_id, return_inverse=True)
    unit_segment = np.zeros(len(users), dtype=np.int64)
    unit_segment[unit] = log.segment
    return EvalContext(log, resolved, logged, expected, direct, unit, unit_segment, sim, n_top)


def _fit_direct(segment: np.ndarray, n_seg: int, x: np.ndarray, y: np.ndarray) -> DirectModel:
    a, b = np.zeros(n_seg), np.ones(n_seg)
    for s in range(n_seg):
        m = segment == s
        if m.sum() >= 3 and np.var(x[m]) > 0:
            b[s], a[s] = np.polyfit(x[m], y[m], 1)
        elif m.any():
            a[s] = float(np.mean(y[m] - x[m]))
    return DirectModel(a, b)


# ----------------------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class TargetActions:
    """A target policy's actions on a log."""

    label: str
    weights: np.ndarray  # (R,K) or (R,N,K): the deterministic action used for re-ranking
    form: str
    bias: np.ndarray | None  # fusion bias for product/logsum forms
    logp_logged: np.ndarray | None  # (R,) target density of the logged weights (stochastic, weight space)
    samples: np.ndarray | None  # (G,R,K) draws for the direct method of a stochastic target
    is_logging: bool = False
    stochastic: bool = False
    ope_note: str = ""  # why importance-weighted estimates are absent, if they are


def target_actions(policy: FusionPolicy | None, log: LogData, label: str, stochastic: bool | None = None,
                   seed: int = 0) -> TargetActions:
    """Act on every request of `log` in chunks. `policy=None` means the logged actions themselves."""
    if policy is None:
        return TargetActions(label, log.weights, "sum", None, log.logging_logp.copy(), None, True, True)
    stochastic = policy.stochastic if stochastic is None else (stochastic and policy.stochastic)
    weights, logps, samples = [], [], []
    in_weight_space = policy.form == "sum" and not policy.per_item
    with torch.no_grad(), torch.random.fork_rng():  # seeded draws, the caller's RNG state untouched
        torch.manual_seed(seed)
        for rows in iter_chunks(log.n_requests, CHUNK):
            state = log.state(rows)
            weights.append(policy.act(state, deterministic=True).double().numpy())
            if stochastic and in_weight_space:
                dist = policy.distribution(state)
                w = torch.from_numpy(log.weights[rows]).to(dist.mean.dtype)
                logps.append(dist.log_prob(_interior(w)).double().numpy())
                samples.append(dist.sample((N_DM_SAMPLES,)).double().numpy())
    bias = getattr(policy, "fusion_bias", None)
    note = ""
    if not in_weight_space:
        note = ("this policy acts in its own parameterisation (per-item weights or powers and biases), not in the "
                "logged weight space, so importance ratios against logging_logp do not exist; see the direct "
                "method, the re-ranking metrics and the simulator's truth")
    return TargetActions(
        label, np.concatenate(weights), policy.form, None if bias is None else bias.detach().double().numpy(),
        np.concatenate(logps) if logps else None, np.concatenate(samples, axis=1) if samples else None,
        False, stochastic and in_weight_space, note,
    )


def _interior(w: torch.Tensor) -> torch.Tensor:
    """Keep logged weights strictly inside the simplex so Dirichlet densities stay finite."""
    w = torch.clamp(w, min=1e-12)
    return w / w.sum(-1, keepdim=True)


# ----------------------------------------------------------------------------------------- metrics


def ndcg_at_k(fused: torch.Tensor, gains: torch.Tensor, eligible: torch.Tensor, k: int) -> torch.Tensor:
    """NDCG@k per request `[R]` over eligible (shown) candidates; NaN where no gain is positive.

    fused, gains, eligible: `[R,N]`. DCG = sum_{rank<k} gain / log2(rank + 2), ideal DCG from sorted gains.
    """
    f = fused.masked_fill(~eligible, float("-inf"))
    g = torch.where(eligible, gains, torch.zeros_like(gains))
    k = min(k, fused.shape[1])
    discount = 1.0 / torch.log2(torch.arange(k, dtype=gains.dtype) + 2.0)
    order = torch.argsort(f, dim=1, descending=True, stable=True)[:, :k]
    dcg = (torch.gather(g, 1, order) * discount).sum(1)
    ideal = (torch.sort(g, dim=1, descending=True).values[:, :k] * discount).sum(1)
    return torch.where(ideal > 0, dcg / torch.where(ideal > 0, ideal, torch.ones_like(ideal)),
                       torch.full_like(ideal, float("nan")))


@dataclass(frozen=True)
class RerankResult:
    """Per-request results of re-ranking the logged candidates under target weights."""

    ndcg: np.ndarray  # (R, K) per task, NaN where no positive label
    ndcg_reward: np.ndarray  # (R,) composite item reward as gain
    expected: np.ndarray  # (R, K) direct-method signals of the new top L
    fused_shown: np.ndarray  # (R, N) fused score (for GAUC), -inf where not shown


def rerank_core(scores: torch.Tensor, labels: torch.Tensor, shown: torch.Tensor, mask: torch.Tensor,
                weights: torch.Tensor, k: int, curve: torch.Tensor, coefficients: torch.Tensor, form: str = "sum",
                bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The vectorised heart of counterfactual evaluation: one fusion, a few top-k selections per request.

    scores, labels `[R,N,K]` (labels never negative; NaN or 0 where not shown), shown and mask `[R,N]`, weights
    `[R,K]`/`[R,N,K]`. Returns NDCG@k per task `[R,K]` and for the composite item reward `[R]` (NaN without
    a positive gain), the direct-method signals of the top L = len(curve) of all candidates `[R,K]`, and
    the fused scores. NDCG only touches the leading S slots up to the last one ever shown; `load_log` packs
    shown candidates first, so S is the number shown (6 of 20), which is what makes it fast.
    """
    fused = fuse(scores, weights, form, bias=bias, mask=mask)
    expected = top_signals(fused, scores, mask, curve)  # while this chunk's scores are still in cache
    # No slot after the last one ever shown matters. (max(0) is torch's fastest column reduction of a bool
    # tensor on CPU: 3x sum(0), 6x any(0).)
    used = torch.nonzero(shown.max(0).values)
    n_slots = int(used[-1]) + 1 if used.numel() else 1
    f_shown = torch.where(shown[:, :n_slots], fused[:, :n_slots], float("-inf"))
    # (R, S, K): one dense copy of the shown slots' labels (NaN where not shown -> 0) serves every later pass.
    y = torch.nan_to_num(labels[:, :n_slots], nan=0.0)
    reward_gain = (y @ coefficients.to(y.dtype)).clamp_(min=0)  # (R, S)
    k = max(1, min(k, n_slots))
    discount = 1.0 / torch.log2(torch.arange(k, dtype=y.dtype) + 2.0)
    # Scatter each slot's discount to where the policy ranks it; DCG is then a weighted sum over slots.
    order = torch.topk(f_shown, k, dim=1).indices  # (R, k)
    slot_discount = torch.zeros(f_shown.shape, dtype=y.dtype).scatter_(1, order, discount.expand_as(order))
    dcg = torch.cat([torch.bmm(slot_discount.unsqueeze(1), y).squeeze(1),
                     (slot_discount * reward_gain).sum(1, keepdim=True)], 1).double()  # (R, K+1)
    ideal = torch.cat([_ideal_dcg(y, discount.double()), _ideal_dcg(reward_gain.unsqueeze(-1), discount.double())], 1)
    # Gains are never negative, so the ideal DCG is 0 only where every gain is 0, and 0/0 is the NaN we report.
    ndcg = dcg / ideal
    return ndcg[:, :-1], ndcg[:, -1], expected.double(), fused


def _ideal_dcg(gains: torch.Tensor, discount: torch.Tensor) -> torch.Tensor:
    """DCG `[R,C]` of the best order of each column's gains `[R,S,C]` under discount `[k]` (float64).

    Columns of 0/1 gains (binary tasks) need no sort: the best order puts every 1 first, so the ideal
    DCG is the discount summed over the first `count` positions. The other columns are sorted."""
    n_top = discount.shape[0]
    # In float64, so that both routes give the same figure to ~1e-16 whichever a chunk of requests takes.
    best_for_count = torch.cat([torch.zeros(1, dtype=discount.dtype), discount.cumsum(0)])
    ideal = best_for_count[gains.sum(1).long().clamp_(0, n_top)]
    # g - g*g is exactly 0 for g in {0, 1} and for no other float; the sum of its absolute values is 0 only
    # when every term is (a reduction over the leading dimension, far cheaper than an all() over rows).
    off_binary = torch.addcmul(gains, gains, gains, value=-1).abs_().view(-1, gains.shape[2]).sum(0)
    graded = torch.nonzero(off_binary).squeeze(1)
    if graded.numel():
        ranked = torch.sort(gains.index_select(2, graded), dim=1, descending=True).values[:, :n_top]
        ideal.index_copy_(1, graded, torch.einsum("rlc,l->rc", ranked.to(discount.dtype), discount))
    return ideal


def top_signals(fused: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, curve: torch.Tensor) -> torch.Tensor:
    """Direct-method signals `[R,K]` of the top L = len(curve) candidates under fused scores `[R,N]`:
    sum over the top L of curve[rank] * s_k (padding contributes nothing)."""
    n_top = min(curve.shape[0], fused.shape[1])
    top = torch.topk(fused, n_top, dim=1).indices
    exam = curve[:n_top].to(scores.dtype) * mask.gather(1, top)  # padding only ever reaches a short request's top
    slot_exam = torch.zeros(fused.shape, dtype=scores.dtype).scatter_(1, top, exam)
    return torch.bmm(slot_exam.unsqueeze(1), scores).squeeze(1)


def expected_under(ctx: EvalContext, weights: np.ndarray, form: str = "sum",
                   bias: np.ndarray | None = None) -> np.ndarray:
    """Direct-method signals `[R,K]` of every request of the log under weights `[R,K]`/`[R,N,K]`, in chunks."""
    log, curve = ctx.log, torch.from_numpy(ctx.resolved.position_curve)
    b = None if bias is None else torch.from_numpy(bias)
    out = []
    for rows in iter_chunks(log.n_requests, CHUNK):
        scores, mask = torch.from_numpy(log.scores[rows]), torch.from_numpy(log.mask[rows])
        fused = fuse(scores, torch.from_numpy(weights[rows]), form, bias=b, mask=mask)
        out.append(top_signals(fused, scores, mask, curve).double().numpy())
    return np.concatenate(out)


def rerank_metrics(ctx: EvalContext, actions: TargetActions, rows: slice, k: int) -> RerankResult:
    """Re-rank one chunk of requests: NDCG@k on shown candidates, expected signals of the top L of all."""
    log = ctx.log
    shown = torch.from_numpy(log.shown[rows])
    bias = None if actions.bias is None else torch.from_numpy(actions.bias)
    ndcg, ndcg_reward, expected, fused = rerank_core(
        torch.from_numpy(log.scores[rows]), torch.from_numpy(log.labels[rows]), shown,
        torch.from_numpy(log.mask[rows]), torch.from_numpy(actions.weights[rows]), k,
        torch.from_numpy(ctx.resolved.position_curve), torch.from_numpy(ctx.resolved.coefficients), actions.form,
        bias)
    return RerankResult(ndcg.numpy(), ndcg_reward.numpy(), expected.numpy(),
                        torch.where(shown, fused, float("-inf")).numpy())


def gauc(unit: np.ndarray, score: np.ndarray, label: np.ndarray, n_units: int,
         unit_weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-unit AUC of `score` against binary `label` (flat arrays over shown candidates).

    Returns (numerator, denominator) per unit so that GAUC = sum(num) / sum(den): num = weight * AUC_u,
    den = weight for units with both classes (weight = the unit's candidate count unless given), else 0.
    AUC by the Mann-Whitney rank sum with tied scores given their average rank.
    """
    order = np.lexsort((score, unit))
    u, s, y = unit[order], score[order], label[order].astype(np.float64)
    n = len(u)
    if n == 0:
        return np.zeros(n_units), np.zeros(n_units)
    new_unit = np.r_[True, u[1:] != u[:-1]]
    unit_start = np.maximum.accumulate(np.where(new_unit, np.arange(n), 0))
    rank = np.arange(n) - unit_start + 1.0
    run = np.cumsum(np.r_[True, (u[1:] != u[:-1]) | (s[1:] != s[:-1])]) - 1
    avg_rank = (np.bincount(run, weights=rank) / np.bincount(run))[run]
    n_all = np.bincount(u, minlength=n_units).astype(np.float64)
    n_pos = np.bincount(u, weights=y, minlength=n_units)
    rank_pos = np.bincount(u, weights=avg_rank * y, minlength=n_units)
    n_neg = n_all - n_pos
    valid = (n_pos > 0) & (n_neg > 0)
    auc = np.where(valid, (rank_pos - n_pos * (n_pos + 1) / 2) / np.where(valid, n_pos * n_neg, 1.0), 0.0)
    weight = n_all if unit_weight is None else unit_weight
    den = np.where(valid, weight, 0.0)
    return auc * den, den


# ----------------------------------------------------------------------------------------- estimators


@dataclass(frozen=True)
class Ratio:
    """Per-request numerator and denominator of a ratio-of-sums estimate."""

    num: np.ndarray
    den: np.ndarray

    @property
    def value(self) -> float:
        d = self.den.sum()
        return float(self.num.sum() / d) if d > 0 else float("nan")


@dataclass(frozen=True)
class OPEInputs:
    """Per-request inputs shared by every estimator."""

    reward: np.ndarray  # (R,) logged composite reward
    ratio: np.ndarray  # (R,) importance ratio, unclipped
    q_logged: np.ndarray  # (R,) direct model at the logged action
    q_target: np.ndarray  # (R,) direct model under the target policy


class Estimator(Protocol):
    name: str

    def terms(self, x: OPEInputs) -> Ratio: ...


@dataclass(frozen=True)
class IPS:
    """Inverse propensity scoring with clipped ratios: mean(min(rho, clip) * r)."""

    clip: float = 100.0
    name: str = "ips"

    def __post_init__(self) -> None:
        if not self.clip > 0:
            raise ValueError("clip must be positive")

    def weights(self, x: OPEInputs) -> np.ndarray:
        return np.minimum(x.ratio, self.clip)

    def terms(self, x: OPEInputs) -> Ratio:
        return Ratio(self.weights(x) * x.reward, np.ones_like(x.reward))


@dataclass(frozen=True)
class SNIPS(IPS):
    """Self-normalised IPS: sum(rho r) / sum(rho) (Swaminathan & Joachims, 2015). With a low cap it is the
    normalised capped importance sampling (NCIS) that the IntegratedRL-MTF paper uses."""

    name: str = "snips"

    def terms(self, x: OPEInputs) -> Ratio:
        w = self.weights(x)
        return Ratio(w * x.reward, w)


def NCIS(clip: float = 10.0) -> SNIPS:  # noqa: N802 - reads like the estimators it sits beside
    """Normalised capped importance sampling: SNIPS with ratios capped at `clip`."""
    return SNIPS(clip=clip, name="ncis")


@dataclass(frozen=True)
class DR(IPS):
    """Doubly robust: mean(q(s, pi) + rho (r - q(s, w_logged))) (Dudik et al., 2011)."""

    name: str = "dr"

    def terms(self, x: OPEInputs) -> Ratio:
        return Ratio(x.q_target + self.weights(x) * (x.reward - x.q_logged), np.ones_like(x.reward))


@dataclass(frozen=True)
class DM:
    """Direct method: mean(q(s, pi))."""

    name: str = "dm"

    def terms(self, x: OPEInputs) -> Ratio:
        return Ratio(x.q_target.copy(), np.ones_like(x.reward))


ESTIMATORS: tuple[Estimator, ...] = (IPS(), SNIPS(), DR(), DM(), NCIS())


def kernel_ratio(logged: np.ndarray, target: np.ndarray, logging_logp: np.ndarray, bandwidth: float) -> np.ndarray:
    """Kallus & Zhou's kernelised ratio with a Gaussian kernel on the simplex, `[R]`."""
    k = logged.shape[1]
    d = k - 1
    dist2 = ((logged - target) ** 2).sum(1)
    # Density w.r.t. the first K-1 coordinates: the simplex surface element is sqrt(K) times that measure.
    log_kernel = 0.5 * math.log(k) - 0.5 * d * math.log(2 * math.pi * bandwidth**2) - dist2 / (2 * bandwidth**2)
    return np.exp(np.clip(log_kernel - logging_logp, -700, 700))


def default_bandwidth(log: LogData) -> float:
    """Scott-style rule on the logged weights' spread around their segment means: sigma * n^(-1/(d+4))."""
    centred = log.weights.copy()
    for s in range(len(log.segments)):
        m = log.segment == s
        if m.any():
            centred[m] -= log.weights[m].mean(0)
    sigma = float(np.sqrt((centred**2).sum(1).mean() / max(log.weights.shape[1] - 1, 1)))
    d = log.weights.shape[1] - 1
    return max(2.0 * sigma * log.n_requests ** (-1.0 / (d + 4)), 1e-3)


# ----------------------------------------------------------------------------------------- bootstrap


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
    gen = torch.Generator().manual_seed(seed)
    cdf = torch.tensor([math.exp(-1) * sum(1 / math.factorial(j) for j in range(i + 1)) for i in range(12)])
    estimates = []
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        counts = torch.bucketize(torch.rand(b, num_t.shape[0], generator=gen), cdf).float()  # Poisson(1)
        estimates.append((counts @ num_t) / (counts @ den_t))
    return _percentiles(torch.cat(estimates).double().numpy(), level)


def _percentiles(estimates: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    tail = (1 - level) / 2
    with np.errstate(invalid="ignore"):
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
        low, high = _percentiles(estimates, level)
        lows.append(low - centre)
        highs.append(high - centre)
    with np.errstate(invalid="ignore", divide="ignore"):
        full = num.sum(0) / den.sum(0)
    return full + np.mean(lows, axis=0), full + np.mean(highs, axis=0)


# ----------------------------------------------------------------------------------------- evaluation


@dataclass
class EvaluationResult:
    """The JSON document of DESIGN §5 plus diagnostics, with per-request values kept for plots."""

    log: str
    policy: str
    reward: dict[str, object]
    n_requests: int
    metrics: list[dict[str, object]]
    ope: list[dict[str, object]]
    ground_truth: dict[str, object] | None
    notes: list[str] = field(default_factory=list)
    bandwidth: float | None = None
    ratios: np.ndarray | None = None
    diagnostics: dict[str, object] | None = None
    diagnostics_by_segment: list[dict[str, object]] = field(default_factory=list)
    per_request_value: np.ndarray | None = None  # direct-model value per request, for risk measures (CVaR)

    def to_json(self) -> dict[str, object]:
        return {"log": self.log, "policy": self.policy, "reward": self.reward, "n_requests": self.n_requests,
                "metrics": self.metrics, "ope": self.ope, "ground_truth": self.ground_truth,
                "diagnostics": self.diagnostics, "diagnostics_by_segment": self.diagnostics_by_segment,
                "bandwidth": self.bandwidth, "notes": self.notes}


@dataclass
class _Figures:
    """Columns of per-unit numerators/denominators, one per (figure, segment)."""

    n_units: int
    rows: list[dict[str, object]] = field(default_factory=list)
    num: list[np.ndarray] = field(default_factory=list)
    den: list[np.ndarray] = field(default_factory=list)

    def add(self, row: dict[str, object], num_u: np.ndarray, den_u: np.ndarray, unit_segment: np.ndarray,
            segments: tuple[str, ...], extra: Callable[[np.ndarray], dict[str, object]] | None = None) -> None:
        for s, name in [(None, None), *enumerate(segments)]:
            keep = np.ones(self.n_units, dtype=bool) if s is None else unit_segment == s
            self.rows.append({**row, "segment": name, **(extra(keep) if extra else {})})
            self.num.append(np.where(keep, num_u, 0.0))
            self.den.append(np.where(keep, den_u, 0.0))

    def finish(self, n_boot: int, seed: int) -> list[dict[str, object]]:
        if not self.rows:
            return []
        num, den = np.stack(self.num, 1), np.stack(self.den, 1)
        low, high = bootstrap_ratio(num, den, n_boot, seed)
        out = []
        for j, row in enumerate(self.rows):
            d = den[:, j].sum()
            value = float(num[:, j].sum() / d) if d > 0 else None
            out.append({**row, "value": value, "ci_low": _num(low[j]) if value is not None else None,
                        "ci_high": _num(high[j]) if value is not None else None})
        return out


def _num(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def _per_unit(ctx: EvalContext, values: np.ndarray, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    n_units = len(ctx.unit_segment)
    v = np.nan_to_num(values)
    m = np.isfinite(values) if valid is None else valid
    return (np.bincount(ctx.unit, weights=np.where(m, v, 0.0), minlength=n_units),
            np.bincount(ctx.unit, weights=m.astype(np.float64), minlength=n_units))


def direct_value(ctx: EvalContext, expected: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """q(s, w) per request for weights whose ranking yields `expected` signals `[R,K]`."""
    seg = ctx.log.segment
    immediate = expected @ ctx.resolved.coefficients
    return ctx.direct.intercept[seg] + ctx.direct.slope[seg] * immediate - penalty(ctx.resolved, weights, expected)


def _dm_of_samples(ctx: EvalContext, samples: np.ndarray) -> np.ndarray:
    """q(s, pi) of a stochastic target: the direct model averaged over its draws `[G,R,K]`."""
    return np.mean([direct_value(ctx, expected_under(ctx, draw), draw) for draw in samples], axis=0)


def importance_ratio(ctx: EvalContext, actions: TargetActions, bandwidth: float | None = None
                     ) -> tuple[np.ndarray | None, float | None]:
    """Importance ratios `[R]` of the target against the logging policy, and the bandwidth if kernelised."""
    log = ctx.log
    if actions.is_logging:
        return np.ones(log.n_requests), None
    if actions.ope_note or np.isnan(log.logging_logp).any():
        return None, None
    if actions.stochastic and actions.logp_logged is not None:
        return np.exp(np.clip(actions.logp_logged - log.logging_logp, -700, 700)), None
    h = default_bandwidth(log) if bandwidth is None else bandwidth
    return kernel_ratio(log.weights, actions.weights, log.logging_logp, h), h


def evaluate_policy(ctx: EvalContext, actions: TargetActions, k: int | None = None, n_boot: int = N_BOOT,
                    seed: int = 0, with_truth: bool = True, truth_policy: Callable | None = None,
                    progress: Callable[[float, str], None] | None = None) -> EvaluationResult:
    """Metrics, off-policy estimates and (on simulator logs) the ground truth of one target on one log."""
    log, k = ctx.log, (k or ctx.n_top)
    report = progress or (lambda f, msg: None)
    chunks = [rerank_metrics(ctx, actions, rows, k) for rows in iter_chunks(log.n_requests, CHUNK)]
    report(0.3, "re-ranked")
    ndcg = np.concatenate([c.ndcg for c in chunks])
    ndcg_reward = np.concatenate([c.ndcg_reward for c in chunks])
    expected = np.concatenate([c.expected for c in chunks])
    fused = np.concatenate([c.fused_shown for c in chunks])
    figs = _Figures(len(ctx.unit_segment))
    segs, useg = log.segments, ctx.unit_segment
    for j, task in enumerate(log.task_names):
        figs.add({"name": f"ndcg@{k}", "task": task}, *_per_unit(ctx, ndcg[:, j]), useg, segs)
    figs.add({"name": f"ndcg@{k}", "task": None}, *_per_unit(ctx, ndcg_reward), useg, segs)
    shown = log.shown
    unit_flat = np.broadcast_to(ctx.unit[:, None], shown.shape)[shown]
    for j, task in enumerate(log.task_names):
        figs.add({"name": "gauc", "task": task},
                 *gauc(unit_flat, fused[shown], log.labels[..., j][shown] > 0, len(useg)), useg, segs)
    consumed = (np.nan_to_num(log.labels[shown]) > 0).any(-1)
    reward_weight = np.maximum(np.bincount(ctx.unit, weights=ctx.logged.total, minlength=len(useg)), 0.0)
    figs.add({"name": "mtf_gauc", "task": None},
             *gauc(unit_flat, fused[shown], consumed, len(useg), reward_weight), useg, segs)
    dm_top = expected @ ctx.resolved.coefficients
    figs.add({"name": f"dm_reward@{ctx.n_top}", "task": None}, *_per_unit(ctx, dm_top), useg, segs)
    metrics = figs.finish(n_boot, seed)
    report(0.5, "metrics done")
    ope, bandwidth, ratio, notes, per_request = _off_policy(ctx, actions, expected, n_boot, seed)
    diagnostics, by_segment = _diagnostics(ctx, actions, ratio)
    report(0.7, "off-policy estimates done")
    truth = None
    if with_truth and ctx.sim_config is not None and truth_policy is not None:
        truth = ground_truth(ctx, truth_policy, actions.form, actions.bias, n_boot, seed)
    elif with_truth and ctx.sim_config is not None and actions.is_logging:
        truth = ground_truth(ctx, None, "sum", None, n_boot, seed)
    report(1.0, "done")
    return EvaluationResult(log.path, actions.label, ctx.resolved.to_dict(), log.n_requests, metrics, ope, truth,
                            notes, bandwidth, ratio, diagnostics, by_segment, per_request)


def _diagnostics(ctx: EvalContext, actions: TargetActions, ratio: np.ndarray | None
                 ) -> tuple[dict[str, object] | None, list[dict[str, object]]]:
    """Overlap diagnostics overall and per segment (None where no importance ratio exists)."""
    from mtf_core.diagnostics import overlap_diagnostics, support_coverage

    if ratio is None:
        return None, []
    log = ctx.log
    if actions.is_logging:
        coverage: np.ndarray | None = np.ones(log.n_requests)
    else:
        from mtf_core.policies.resolve import logging_policy

        logging = logging_policy(log)
        draws = actions.samples if actions.samples is not None else actions.weights[None]
        coverage = support_coverage(lambda rows: logging.distribution(log.state(rows)), draws, log.segment,
                                    log.logging_logp, lambda: iter_chunks(log.n_requests, CHUNK))
    clip = IPS().clip
    overall = overlap_diagnostics(ratio, clip, coverage)
    by_segment = [{"segment": name, **overlap_diagnostics(ratio[log.segment == s], clip,
                                                          None if coverage is None else coverage[log.segment == s])}
                  for s, name in enumerate(log.segments)]
    return overall, by_segment


def _off_policy(ctx: EvalContext, actions: TargetActions, expected: np.ndarray, n_boot: int, seed: int
                ) -> tuple[list[dict[str, object]], float | None, np.ndarray | None, list[str], np.ndarray]:
    log = ctx.log
    notes: list[str] = []
    ratio, bandwidth = importance_ratio(ctx, actions)
    if actions.samples is not None:
        q_target = _dm_of_samples(ctx, actions.samples)
    else:
        q_target = direct_value(ctx, expected, actions.weights)
    q_logged = direct_value(ctx, ctx.logged_expected, log.weights)
    reward = ctx.logged.total
    figs = _Figures(len(ctx.unit_segment))
    if ratio is None:
        notes.append(actions.ope_note or "logging_logp is unknown for some requests, so IPS, SNIPS, DR and NCIS "
                     "cannot be computed; only the direct method is shown")
        estimators: tuple[Estimator, ...] = (DM(),)
        ratio_for_dm = np.zeros(log.n_requests)
    else:
        estimators = ESTIMATORS
        ratio_for_dm = ratio
    x = OPEInputs(reward, ratio_for_dm, q_logged, q_target)
    # Per-request value for risk measures: the direct model for every policy. DR's per-request terms are
    # unbiased only on average; their tails mostly measure importance-weight noise, not risk.
    per_request = q_target
    for est in estimators:
        terms = est.terms(x)
        w = getattr(est, "weights", None)
        clipped = w(x) if w else None

        def extra(keep_u: np.ndarray, clipped: np.ndarray | None = clipped) -> dict[str, object]:
            if clipped is None:
                return {"ess": None}
            keep_r = keep_u[ctx.unit]
            c = clipped[keep_r]
            return {"ess": float(c.sum() ** 2 / max((c**2).sum(), 1e-300)) if c.size else None}

        num_u = np.bincount(ctx.unit, weights=terms.num, minlength=len(ctx.unit_segment))
        den_u = np.bincount(ctx.unit, weights=terms.den, minlength=len(ctx.unit_segment))
        figs.add({"estimator": est.name}, num_u, den_u, ctx.unit_segment, log.segments, extra)
    return figs.finish(n_boot, seed + 1), bandwidth, ratio, notes, per_request


def ground_truth(ctx: EvalContext, policy: Callable | None, form: str, bias: np.ndarray | None, n_boot: int,
                 seed: int, by_segment: bool = False) -> dict[str, object]:
    """Run the policy online with the log's random numbers; mean composite reward per request and its CI."""
    assert ctx.sim_config is not None
    torch.manual_seed(seed)
    out = run_online(ctx.sim_config, policy, form, bias=None if bias is None else torch.from_numpy(bias))
    parts = request_reward(ctx.resolved, out.feedback_sum, out.continued, out.returned.astype(np.float64),
                           out.weights, out.expected_sum)
    user = out.session // ctx.sim_config.sessions_per_user
    n_users = ctx.sim_config.n_users
    total = parts.total
    num = np.bincount(user, weights=total, minlength=n_users)
    den = np.bincount(user, minlength=n_users).astype(np.float64)
    seg_u = np.zeros(n_users, dtype=np.int64)
    seg_u[user] = out.segment
    cols_num, cols_den = [num], [den]
    for s in range(len(ctx.log.segments)):
        cols_num.append(np.where(seg_u == s, num, 0.0))
        cols_den.append(np.where(seg_u == s, den, 0.0))
    low, high = bootstrap_ratio(np.stack(cols_num, 1), np.stack(cols_den, 1), n_boot, seed + 2)
    values = [float(n.sum() / d.sum()) if d.sum() > 0 else None for n, d in zip(cols_num, cols_den)]
    result: dict[str, object] = {"value": values[0], "ci_low": float(low[0]), "ci_high": float(high[0]),
                                 "n_requests": int(total.shape[0])}
    result["segments"] = [{"segment": name, "value": values[i + 1], "ci_low": _num(low[i + 1]),
                           "ci_high": _num(high[i + 1])} for i, name in enumerate(ctx.log.segments)]
    return result


def policy_for_truth(policy: FusionPolicy, stochastic: bool) -> Callable:
    """The callable that `run_online` calls: the policy's mean, or a draw when evaluated as stochastic."""
    def act(state):  # type: ignore[no-untyped-def]
        return policy.act(state, deterministic=not stochastic)
    return act


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


def point_value(ctx: EvalContext, actions: TargetActions) -> float:
    """The DR estimate (DM where no importance ratio exists) without intervals: for validation during training."""
    log = ctx.log
    if actions.samples is None:
        q_target = direct_value(ctx, expected_under(ctx, actions.weights, actions.form, actions.bias),
                                actions.weights)
    else:
        q_target = _dm_of_samples(ctx, actions.samples)
    ratio, _ = importance_ratio(ctx, actions)
    if ratio is None:
        return float(q_target.mean())
    q_logged = direct_value(ctx, ctx.logged_expected, log.weights)
    return DR().terms(OPEInputs(ctx.logged.total, ratio, q_logged, q_target)).value


def time_split(log: LogData, validation_share: float) -> tuple[np.ndarray, np.ndarray]:
    """Request rows of the earlier and the later sessions (by session start): the last share validates."""
    sessions, first = np.unique(log.session_id, return_index=True)
    start = log.ts[first].astype("datetime64[us]").astype(np.int64)
    order = np.argsort(start, kind="stable")
    n_val = int(round(validation_share * len(sessions)))
    val_sessions = sessions[order[len(sessions) - n_val:]] if n_val else sessions[:0]
    is_val = np.isin(log.session_id, val_sessions)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def streamed_rerank(path: str, weights: np.ndarray, k: int, curve: np.ndarray, coefficients: np.ndarray,
                    chunk_requests: int = 100_000) -> dict[str, object]:
    """Mean NDCG@k per task and for the reward, and the mean direct-method signals, of fixed weights `[K]`
    on a log read in chunks (memory does not grow with the log). Equal to the in-memory evaluation."""
    from mtf_core.store import iter_candidate_chunks

    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    n_requests = 0
    for chunk in iter_candidate_chunks(path, chunk_requests):
        w = torch.from_numpy(np.broadcast_to(weights, (len(chunk.request_id), len(weights))).copy())
        ndcg, ndcg_reward, expected, _ = rerank_core(
            torch.from_numpy(chunk.scores), torch.from_numpy(chunk.labels), torch.from_numpy(chunk.shown),
            torch.from_numpy(chunk.mask), w, k, torch.from_numpy(curve), torch.from_numpy(coefficients))
        for name, values in (("ndcg", ndcg.numpy()), ("ndcg_reward", ndcg_reward.numpy()[:, None]),
                             ("expected", expected.numpy())):
            sums[name] = sums.get(name, 0) + np.nansum(values, 0)
            counts[name] = counts.get(name, 0) + np.isfinite(values).sum(0)
        n_requests += len(chunk.request_id)
        del chunk, w, ndcg, ndcg_reward, expected
    return {"n_requests": n_requests, **{name: sums[name] / np.maximum(counts[name], 1) for name in sums}}
