"""The FusionPolicy interface (DESIGN §4) and the state batch every policy reads.

A state is one request: who the user is (features, segment), where the session stands (step, the
feedback of the previous request) and, for per-item policies, the candidates' MTL scores and features.
The simulator and the log store build states with the same `context_features`, so a policy sees the
same inputs online and offline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["StateBatch", "FusionPolicy", "context_features", "simplex_normalise"]


def context_features(step: np.ndarray, prev_feedback: np.ndarray) -> np.ndarray:
    """Session context `[R, 1+K]`: log1p(step) and the previous request's mean feedback per task."""
    return np.concatenate([np.log1p(step.astype(np.float32))[:, None], prev_feedback.astype(np.float32)], axis=1)


@dataclass(frozen=True)
class StateBatch:
    """R decision states. Segments are indices into `segments` (the log's sorted segment names)."""

    user_features: torch.Tensor  # (R, F)
    segment: torch.Tensor  # (R,) long
    context: torch.Tensor  # (R, C)
    scores: torch.Tensor  # (R, N, K) MTL predictions of the candidates
    mask: torch.Tensor  # (R, N) bool, False for padding
    item_features: torch.Tensor  # (R, N, Fi), possibly Fi = 0
    segments: tuple[str, ...]

    @property
    def n_requests(self) -> int:
        return int(self.segment.shape[0])

    def index(self, rows: torch.Tensor | slice) -> "StateBatch":
        """The sub-batch of the given rows."""
        return StateBatch(
            self.user_features[rows], self.segment[rows], self.context[rows], self.scores[rows],
            self.mask[rows], self.item_features[rows], self.segments,
        )

    def segment_one_hot(self, segments: tuple[str, ...]) -> torch.Tensor:
        """One-hot `[R, S]` against a policy's own segment list; unknown segments get all zeros."""
        lookup = torch.tensor([segments.index(s) if s in segments else -1 for s in self.segments], dtype=torch.long)
        idx = lookup[self.segment]
        one_hot = torch.zeros(idx.shape[0], len(segments))
        known = idx >= 0
        one_hot[known, idx[known]] = 1.0
        return one_hot


def simplex_normalise(weights: torch.Tensor) -> torch.Tensor:
    """Non-negative weights scaled to sum to one along the last axis."""
    weights = torch.clamp(weights, min=0.0)
    return weights / torch.clamp(weights.sum(-1, keepdim=True), min=1e-12)


class FusionPolicy(torch.nn.Module):
    """A fusion policy: a distribution over weight vectors given a state, and an action.

    Subclasses set `form` (the fusion form their action feeds), `per_item` (action `[R,N,K]` instead of
    `[R,K]`), `stochastic` (whether `distribution` is a real density usable in importance ratios) and
    `tasks` (the task order of the action's last axis).
    """

    form: str = "sum"
    per_item: bool = False
    stochastic: bool = True

    def __init__(self, tasks: tuple[str, ...], segments: tuple[str, ...]) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.segments = tuple(segments)

    def distribution(self, state: StateBatch) -> torch.distributions.Distribution:
        raise NotImplementedError

    def act(self, state: StateBatch, deterministic: bool = True) -> torch.Tensor:
        dist = self.distribution(state)
        return dist.mean if deterministic else dist.sample()

    def spec(self) -> dict[str, object]:
        """Constructor arguments (JSON) that rebuild this policy before `load_state_dict`."""
        return {"tasks": list(self.tasks), "segments": list(self.segments)}
