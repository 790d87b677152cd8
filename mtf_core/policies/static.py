"""Policies that need no gradient training: the logging policy, fixed weights, and CEM-searched weights.

- `LoggingPolicy`: a Dirichlet per segment. On simulator logs its concentrations are the simulator's own,
  so its density equals `logging_logp` exactly; on imported logs they are fitted per segment by the
  method of moments on the logged weights.
- `StaticPolicy`: one weight vector per segment (the same row for a global vector); deterministic.
The cross-entropy search over static weights lives in `policies.cem`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from mtf_core.errors import LogError
from mtf_core.policies.base import FusionPolicy, StateBatch, simplex_normalise

if TYPE_CHECKING:
    from mtf_core.policies.objective import TrainingData

__all__ = ["LoggingPolicy", "StaticPolicy", "parse_static", "fit_dirichlet_moments", "dirichlet_from_moments",
           "StaticConfig", "StaticTrainer"]


def fit_dirichlet_moments(weights: np.ndarray) -> np.ndarray:
    """Dirichlet concentrations `[K]` matching the mean and mean variance of weights `[R,K]`."""
    return dirichlet_from_moments(weights.mean(0), weights.var(0))


def dirichlet_from_moments(mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Dirichlet concentrations `[K]` from the weights' mean `[K]` and population variance `[K]` (the median
    over the tasks of the concentration each task's variance implies)."""
    ratio = mean * (1 - mean) / np.maximum(var, 1e-9) - 1.0
    total = float(np.clip(np.median(ratio[mean > 0.01]) if np.any(mean > 0.01) else 1.0, 0.5, 1e5))
    return np.maximum(mean * total, 1e-3)


class _SegmentTable(FusionPolicy):
    """A policy whose parameters are one row per segment; unknown segments use the mean row."""

    def _rows(self, state: StateBatch, table: torch.Tensor) -> torch.Tensor:
        one_hot = state.segment_one_hot(self.segments).to(table.dtype)
        known = one_hot.sum(1, keepdim=True)
        return one_hot @ table + (1 - known) * table.mean(0, keepdim=True)


class LoggingPolicy(_SegmentTable):
    """The logging policy: Dirichlet(alpha[segment])."""

    def __init__(self, tasks: tuple[str, ...], segments: tuple[str, ...], alpha: np.ndarray | None = None) -> None:
        super().__init__(tasks, segments)
        init = torch.ones(len(segments), len(tasks)) if alpha is None else torch.as_tensor(alpha, dtype=torch.float64)
        self.register_buffer("alpha", init.double())

    def distribution(self, state: StateBatch) -> torch.distributions.Distribution:
        return torch.distributions.Dirichlet(self._rows(state, self.alpha))

    @classmethod
    def from_log(cls, tasks: tuple[str, ...], segments: tuple[str, ...], segment: np.ndarray,
                 weights: np.ndarray) -> "LoggingPolicy":
        alpha = np.stack([fit_dirichlet_moments(weights[segment == s]) if np.any(segment == s)
                          else np.ones(len(tasks)) for s in range(len(segments))])
        return cls(tasks, segments, alpha)


class StaticPolicy(_SegmentTable):
    """Fixed weights per segment `[S,K]`; `distribution` is a near-point-mass Dirichlet for plotting only."""

    stochastic = False

    def __init__(self, tasks: tuple[str, ...], segments: tuple[str, ...], weights: np.ndarray | None = None,
                 label: str = "static") -> None:
        super().__init__(tasks, segments)
        w = torch.full((len(segments), len(tasks)), 1.0 / len(tasks)) if weights is None else torch.as_tensor(weights)
        self.register_buffer("weights", simplex_normalise(w.double()))
        self.label = label

    def act(self, state: StateBatch, deterministic: bool = True) -> torch.Tensor:
        return self._rows(state, self.weights)

    def distribution(self, state: StateBatch) -> torch.distributions.Distribution:
        return torch.distributions.Dirichlet(self.act(state) * 1e4 + 1e-3)

    def spec(self) -> dict[str, object]:
        return {**super().spec(), "label": self.label}


def parse_static(text: str, tasks: tuple[str, ...], segments: tuple[str, ...]) -> StaticPolicy:
    """`click=0.4,like=0.3,...` -> a global StaticPolicy (normalised; unnamed tasks get 0)."""
    values = dict.fromkeys(tasks, 0.0)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, raw = part.partition("=")
        if not sep or name.strip() not in values:
            raise LogError(f"static policy: {part!r} is not TASK=WEIGHT with a task of this log ({', '.join(tasks)})")
        try:
            value = float(raw)
        except ValueError as exc:
            raise LogError(f"static policy: weight of {name.strip()!r} is not a number: {raw!r}") from exc
        if not np.isfinite(value) or value < 0:
            raise LogError(f"static policy: weight of {name.strip()!r} must be finite and >= 0, got {raw!r}")
        values[name.strip()] = value
    w = np.array(list(values.values()))
    if w.sum() <= 0:
        raise LogError("static policy: at least one weight must be positive")
    w = w / w.sum()
    label = "static:" + ",".join(f"{t}={v:.3g}" for t, v in zip(tasks, w))
    return StaticPolicy(tasks, segments, np.tile(w, (len(segments), 1)), label=label)


@dataclass(frozen=True)
class StaticConfig:
    """`--algo static`: the logging policy's mean weights per segment, as one fixed vector each."""

    per_segment: bool = True
    """One vector per segment (else one global vector)."""


class StaticTrainer:
    """One step: average the logged weights (per segment or overall)."""

    n_steps = 1

    def __init__(self, config: StaticConfig, data: "TrainingData", seed: int) -> None:
        self.config, self.log = config, data.log
        self.policy = StaticPolicy(self.log.task_names, self.log.segments, label="static-mean")

    def step(self, step: int) -> dict[str, float]:
        log = self.log
        overall = log.weights.mean(0)
        rows = [log.weights[log.segment == s].mean(0) if self.config.per_segment and np.any(log.segment == s)
                else overall for s in range(len(log.segments))]
        with torch.no_grad():
            self.policy.weights.copy_(torch.as_tensor(np.stack(rows)))
        return {"charts/max_weight": float(np.max(rows))}
