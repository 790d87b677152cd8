"""Shared pieces of the offline RL methods: session transitions, small networks, target updates.

A transition is one request: state (user features, segment, session context), the logged action (the
request's fusion weights), the composite reward of the RewardSpec (its session terms carry the
long-term view: continuation, returned) and the next request of the same session (or the end).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mtf_core.fusion import fuse
from mtf_core.policies.base import FusionPolicy, StateBatch
from mtf_core.evaluate import top_signals
from mtf_core.policies.objective import FeatureEncoder, TrainingData, soft_top_signals
from mtf_core.store import session_links

__all__ = ["Transitions", "build_transitions", "mlp", "soft_update", "EncodedPolicy", "interior", "RankingFeatures"]


def interior(a: torch.Tensor) -> torch.Tensor:
    """Weights moved strictly inside the simplex (and renormalised), so Dirichlet densities are finite."""
    a = a.clamp(min=1e-6)
    return a / a.sum(-1, keepdim=True)


def mlp(n_in: int, n_out: int, hidden: int = 64) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, n_out))


def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """target <- (1 - tau) target + tau source, every parameter in one fused call."""
    with torch.no_grad():
        torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


class RankingFeatures(nn.Module):
    """What weights do to a request: the standardised expected MTL signals `[B,K]` of the top L they induce.

    Weights act only through the ranking, so a critic that sees the ranking (besides the weights) can
    judge weights the log never tried; soft ranks (`soft_top_signals`) let an actor's gradient through.
    Where no gradient is needed (critic targets and regressions, acting), `exact` takes the top L itself:
    the same figure as the temperature goes to 0, at a fraction of the cost (no N x N comparisons).
    """

    def __init__(self, n_tasks: int, n_top: int, temperature: float) -> None:
        super().__init__()
        self.n_top, self.temperature = n_top, temperature
        self.register_buffer("curve", torch.ones(n_top))
        self.register_buffer("mean", torch.zeros(n_tasks))
        self.register_buffer("std", torch.ones(n_tasks))

    def fit(self, curve: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, actions: torch.Tensor) -> None:
        """Take the reward's position curve and standardise by the signals of the logged actions."""
        self.curve.copy_(curve)
        with torch.no_grad():
            signals = soft_top_signals(fuse(scores, actions), scores, mask, self.curve, self.temperature)
        self.mean.copy_(signals.mean(0))
        self.std.copy_(signals.std(0).clamp(min=1e-6))

    def forward(self, scores: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, exact: bool = False
                ) -> torch.Tensor:
        signals = (top_signals(fuse(scores, weights, mask=mask), scores, mask, self.curve) if exact
                   else soft_top_signals(fuse(scores, weights), scores, mask, self.curve, self.temperature))
        return (signals - self.mean) / self.std

    def proposals(self, scores: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Exact features `[B*P,K]` of P proposals per request (weights `[B,P,K]`, request-major like
        `repeat_interleave`), without copying each request's scores P times: one product ranks every
        proposal's candidates, another sums the top L's signals."""
        b, p, _ = weights.shape
        fused = torch.bmm(weights.to(scores.dtype), scores.transpose(1, 2))  # (B, P, N)
        fused = fused.masked_fill(~mask.unsqueeze(1), float("-inf"))
        n_top = min(self.curve.shape[0], fused.shape[2])
        top = torch.topk(fused, n_top, dim=2).indices  # (B, P, L)
        exam = self.curve[:n_top].to(scores.dtype) * mask.gather(1, top.reshape(b, -1)).reshape(b, p, n_top)
        slot_exam = torch.zeros(fused.shape, dtype=scores.dtype).scatter_(2, top, exam)
        signals = torch.bmm(slot_exam, scores).reshape(b * p, -1)
        return (signals - self.mean) / self.std


@dataclass(frozen=True)
class Transitions:
    """(s, a, r, s', done) per request; `next_row` indexes the next request (itself when done)."""

    features: torch.Tensor  # (R, D) encoded states
    actions: torch.Tensor  # (R, K) logged weights
    rewards: torch.Tensor  # (R,)
    next_row: torch.Tensor  # (R,) long
    done: torch.Tensor  # (R,) float
    reward_scale: float
    scores: torch.Tensor  # (R, N, K) the candidates' MTL predictions, for ranking-aware critics
    mask: torch.Tensor  # (R, N) bool

    @property
    def n(self) -> int:
        return int(self.rewards.shape[0])

    def append(self, other: "Transitions", rewards: torch.Tensor) -> "Transitions":
        """These transitions followed by `other`'s, whose rewards are replaced (already on this scale)."""
        return Transitions(torch.cat([self.features, other.features]), torch.cat([self.actions, other.actions]),
                           torch.cat([self.rewards, rewards]), torch.cat([self.next_row, other.next_row + self.n]),
                           torch.cat([self.done, other.done]), self.reward_scale,
                           torch.cat([self.scores, other.scores]), torch.cat([self.mask, other.mask]))


def build_transitions(data: TrainingData, encoder: FeatureEncoder, extra_reward: np.ndarray | None = None
                      ) -> Transitions:
    """Transitions of a training log; rewards (the composite reward, plus a trainer's `extra_reward` `[R]`)
    are divided by their std so that step sizes carry over."""
    log = data.log
    with torch.no_grad():
        features = encoder(data.state)
    nxt, done = session_links(log.session_id, log.step)
    reward = data.ctx.logged.total if extra_reward is None else data.ctx.logged.total + extra_reward
    scale = float(reward.std()) if reward.std() > 0 else 1.0
    return Transitions(features, torch.as_tensor(log.weights, dtype=torch.float32),
                       torch.as_tensor(reward / scale, dtype=torch.float32), torch.from_numpy(nxt),
                       torch.from_numpy(done.astype(np.float32)), scale, data.scores.float(), data.mask)


class EncodedPolicy(FusionPolicy):
    """A deterministic policy over weights: features -> network -> simplex (softmax)."""

    stochastic = False

    def __init__(self, tasks: tuple[str, ...], segments: tuple[str, ...], n_user_features: int, n_context: int,
                 hidden: int = 64) -> None:
        super().__init__(tasks, segments)
        self.n_user_features, self.n_context, self.hidden = n_user_features, n_context, hidden
        self.encoder = FeatureEncoder(n_user_features, n_context, segments)

    def spec(self) -> dict[str, object]:
        return {**super().spec(), "n_user_features": self.n_user_features, "n_context": self.n_context,
                "hidden": self.hidden}

    def distribution(self, state: StateBatch) -> torch.distributions.Distribution:
        """A near-point mass at the action (for plots; importance ratios use kernels for such policies)."""
        w = self.act(state)
        return torch.distributions.Dirichlet(w.clamp(min=1e-4) * 1e4)
