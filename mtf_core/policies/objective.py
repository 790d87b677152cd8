"""What policies train against: a log as torch tensors and the counterfactual composite reward of weights.

The composite reward of weights w on a logged request (GRADE's three parts, each switchable):
- prior (dense):     the direct model q(s, w) = a_seg + b_seg * sum_{p<L} curve[p] * c . s_{item at p}
                     (MTL predictions of the top L of all candidates under w, calibrated to the log);
- posterior (sparse): the logged feedback of the shown items re-ranked by w, each item's reward moved
                     from its logged position to its new one: sum_n (c . y_n) * curve[new_n] / curve[old_n];
- format (rules):    the RewardSpec's share-drift and vertex penalties on w (a trainer may add its own,
                     `RuleTerms`).
Everything is batched over requests and groups; no Python loop over requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mtf_core.evaluate import EvalContext, prepare, slate_depth, top_signals
from mtf_core.fusion import fuse, rank_positions
from mtf_core.policies.base import StateBatch
from mtf_core.reward import RewardSpec
from mtf_core.store import LogData

__all__ = ["TrainingData", "build_training_data", "mean_logged_weights", "composite_reward", "RuleTerms",
           "FeatureEncoder", "soft_exam", "top_exam", "soft_top_signals"]


class FeatureEncoder(torch.nn.Module):
    """State -> feature vector: standardised user features, segment one-hot, session context."""

    def __init__(self, n_user_features: int, n_context: int, segments: tuple[str, ...]) -> None:
        super().__init__()
        self.segments = tuple(segments)
        self.register_buffer("uf_mean", torch.zeros(n_user_features))
        self.register_buffer("uf_std", torch.ones(n_user_features))
        self.n_out = n_user_features + len(segments) + n_context

    def fit(self, user_features: torch.Tensor) -> None:
        if user_features.shape[1] == 0 or user_features.shape[0] == 0:  # no features, or no rows: nothing to learn
            return
        self.uf_mean.copy_(user_features.mean(0))
        if user_features.shape[0] > 1:  # one row has no spread (torch warns and gives NaN)
            self.uf_std.copy_(user_features.std(0).clamp(min=1e-6))

    def forward(self, state: StateBatch) -> torch.Tensor:
        uf = (state.user_features.float() - self.uf_mean) / self.uf_std
        return torch.cat([uf, state.segment_one_hot(self.segments), state.context.float()], dim=1)


@dataclass(frozen=True)
class TrainingData:
    """A training log in tensors, plus the reward bound to it."""

    ctx: EvalContext
    state: StateBatch
    scores: torch.Tensor  # (R, N, K) float32
    mask: torch.Tensor  # (R, N) bool
    shown: torch.Tensor  # (R, N) bool
    item_reward: torch.Tensor  # (R, N) c . y of shown items, 0 elsewhere
    logged_exam: torch.Tensor  # (R, N) curve at the logged position (1 where not shown)
    segment: torch.Tensor  # (R,) long
    coefficients: torch.Tensor  # (K,)
    curve: torch.Tensor  # (L,)
    intercept: torch.Tensor  # (S,)
    slope: torch.Tensor  # (S,)
    reference_share: torch.Tensor  # (K,)
    logged_weights: torch.Tensor  # (R, K)

    @property
    def n_requests(self) -> int:
        return int(self.segment.shape[0])

    @property
    def log(self) -> LogData:
        return self.ctx.log


def build_training_data(log: LogData, spec: RewardSpec) -> TrainingData:
    ctx = prepare(log, spec)
    curve = ctx.resolved.position_curve
    pos = log.positions
    exam = np.where(pos >= 0, curve[np.clip(pos, 0, len(curve) - 1)], 1.0)
    item_reward = np.nan_to_num(log.labels) @ ctx.resolved.coefficients
    f32 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    return TrainingData(
        ctx=ctx, state=log.state(), scores=torch.from_numpy(log.scores), mask=torch.from_numpy(log.mask),
        shown=torch.from_numpy(log.shown), item_reward=f32(item_reward), logged_exam=f32(exam),
        segment=torch.from_numpy(log.segment), coefficients=f32(ctx.resolved.coefficients), curve=f32(curve),
        intercept=f32(ctx.direct.intercept), slope=f32(ctx.direct.slope),
        reference_share=f32(ctx.resolved.reference_share), logged_weights=f32(log.weights),
    )


def mean_logged_weights(log: LogData) -> np.ndarray:
    """The logged weights' mean `[K]`, a trainer's starting point; equal weights where none were logged."""
    if log.weights_known and log.n_requests:
        return log.weights.mean(0)
    return np.full(len(log.tasks), 1.0 / len(log.tasks))


def soft_exam(fused: torch.Tensor, mask: torch.Tensor, curve: torch.Tensor, temperature: float) -> torch.Tensor:
    """Examination weight `[R,N]` of each candidate at its soft rank under fused scores `[R,N]`.

    The soft rank counts the candidates above each one with sigmoids (temperature relative to the
    request's spread of fused scores), and the position curve (0 beyond the top L) is interpolated at it.
    As the temperature goes to 0 this is the exact top-L examination; above 0 it has gradients with
    respect to the fused scores, which is what lets an actor learn how weights move a ranking.
    """
    f = fused.masked_fill(~mask, 0.0)
    valid = mask.to(f.dtype)
    n_valid = valid.sum(1, keepdim=True).clamp(min=1)
    mean = (f * valid).sum(1, keepdim=True) / n_valid
    spread = (((f - mean) * valid).pow(2).sum(1, keepdim=True) / n_valid).sqrt().detach()
    scaled = f / (temperature * spread + 1e-6)  # scaling R x N scores, not the R x N x N differences
    # [r, n, m]: m above n; sigmoid in place on the fresh difference tensor (its backward needs only its output).
    above = torch.sigmoid_(scaled.unsqueeze(1) - scaled.unsqueeze(2))
    rank = torch.bmm(above, valid.unsqueeze(-1)).squeeze(-1) - 0.5  # the diagonal contributes sigmoid(0) = 0.5
    n_top = curve.shape[0]
    padded = torch.cat([curve.to(f.dtype), torch.zeros(1, dtype=f.dtype)])
    rank = rank.clamp(0, n_top)
    low = rank.detach().floor().clamp(max=n_top - 1)
    frac = rank - low
    low = low.long()
    exam = padded[low] * (1 - frac) + padded[low + 1] * frac
    return exam * valid


def top_exam(fused: torch.Tensor, mask: torch.Tensor, curve: torch.Tensor) -> torch.Tensor:
    """Examination weight `[R,N]` of each candidate at its exact rank (the curve for the top L, 0 below): what
    `soft_exam` tends to as its temperature goes to 0, where no gradient through the ranking is needed."""
    n_top = min(curve.shape[0], fused.shape[1])
    top = torch.topk(fused.masked_fill(~mask, float("-inf")), n_top, dim=1).indices
    exam = curve[:n_top].to(fused.dtype) * mask.gather(1, top)
    return torch.zeros(fused.shape, dtype=fused.dtype).scatter_(1, top, exam)


def soft_top_signals(fused: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, curve: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """`top_signals` with soft ranks: expected signals `[R,K]` of the top L, differentiable in `fused`."""
    exam = soft_exam(fused, mask, curve, temperature)
    return torch.bmm(exam.unsqueeze(1), scores.to(exam.dtype)).squeeze(1)


@dataclass(frozen=True)
class RuleTerms:
    """Format constraints a trainer adds to the reward spec's own (same forms as `reward.penalty`)."""

    share_penalty: float = 0.0
    vertex_penalty: float = 0.0
    vertex_threshold: float = 0.5


def _penalty(data: TrainingData, weights: torch.Tensor, expected: torch.Tensor, extra: RuleTerms | None = None
             ) -> torch.Tensor:
    spec = data.ctx.resolved.spec
    out = torch.zeros(expected.shape[:-1])
    share_penalty = spec.share_penalty + (extra.share_penalty if extra else 0.0)
    if share_penalty:
        contrib = expected * data.coefficients
        share = contrib / contrib.sum(-1, keepdim=True).clamp(min=1e-9)
        drift = (torch.abs(share - data.reference_share) - spec.share_tolerance).clamp(min=0).sum(-1)
        out = out + share_penalty * drift
    vertex_rules = [(spec.vertex_penalty, spec.vertex_threshold)]
    if extra is not None:
        vertex_rules.append((extra.vertex_penalty, extra.vertex_threshold))
    top = weights.max(-1).values
    if top.dim() > out.dim():
        top = top.mean(-1)
    for cost, threshold in vertex_rules:
        if cost:
            out = out + cost * (top - threshold).clamp(min=0) / (1 - threshold)
    return out


def composite_reward(data: TrainingData, rows: torch.Tensor, weights: torch.Tensor, prior: bool = True,
                     posterior: bool = True, rules: bool = True, form: str = "sum",
                     bias: torch.Tensor | None = None, extra_rules: RuleTerms | None = None) -> torch.Tensor:
    """Reward `[B,G]` of weights `[B,G,K]` (or per item `[B,G,N,K]`) on the requests `rows` `[B]`; with
    `rules`, the reward spec's penalties plus `extra_rules`."""
    b, g = weights.shape[:2]
    flat_w = weights.reshape(b * g, *weights.shape[2:])
    rep = lambda t: t[rows].repeat_interleave(g, dim=0)  # noqa: E731  (B*G, ...)
    scores, mask = rep(data.scores), rep(data.mask)
    flat_bias = None if bias is None else bias.reshape(b * g, *bias.shape[2:])
    fused = fuse(scores, flat_w, form, bias=flat_bias, mask=mask)
    reward = torch.zeros(b * g)
    if prior or rules:
        expected = top_signals(fused, scores, mask, data.curve, slate_depth(rep(data.shown)))  # (B*G, K)
        seg = data.segment[rows].repeat_interleave(g)
        if prior:
            reward = reward + data.intercept[seg] + data.slope[seg] * (expected @ data.coefficients)
        if rules:
            reward = reward - _penalty(data, flat_w, expected, extra_rules)
    if posterior:
        shown = rep(data.shown)
        new_pos = rank_positions(fused.masked_fill(~shown, float("-inf")))
        new_exam = data.curve[new_pos.clamp(max=data.curve.shape[0] - 1)] * shown
        reward = reward + (rep(data.item_reward) * new_exam / rep(data.logged_exam)).sum(1)
    return reward.reshape(b, g)
