"""Cross-entropy method over static fusion weights, globally or per segment (the industry baseline).

Each iteration samples a population from Dirichlet(c * mean), scores every candidate by the mean
counterfactual composite reward (the same objective GRADE optimises) on a fixed sample of requests,
refits the mean to the elite and raises c by 25% (lab's choices: population 64, elite 8, 15 iterations).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mtf_core.policies.objective import TrainingData, composite_reward, mean_logged_weights
from mtf_core.policies.static import StaticPolicy

__all__ = ["CEMConfig", "CEMTrainer"]


@dataclass(frozen=True)
class CEMConfig:
    """CEM hyperparameters."""

    per_segment: bool = False
    """Search one weight vector per segment (else one global vector)."""
    iterations: int = 15
    """CEM iterations."""
    population: int = 64
    """Candidates per iteration."""
    n_elite: int = 8
    """Candidates kept to refit the sampling distribution."""
    concentration: float = 20.0
    """Initial Dirichlet concentration of the sampling distribution."""
    n_eval_requests: int = 4096
    """Requests (per segment) the objective averages over."""

    def __post_init__(self) -> None:
        if not 1 <= self.n_elite <= self.population or self.iterations < 1:
            raise ValueError("need 1 <= n_elite <= population and iterations >= 1")


class CEMTrainer:
    """One `step` is one CEM iteration for every group (all requests, or each segment)."""

    def __init__(self, config: CEMConfig, data: TrainingData, seed: int) -> None:
        self.config, self.data = config, data
        self.rng = np.random.default_rng(seed)
        log = data.log
        self.n_steps = config.iterations
        groups = range(len(log.segments)) if config.per_segment else [None]
        self.rows: list[torch.Tensor] = []
        for s in groups:
            idx = np.flatnonzero(log.segment == s) if s is not None else np.arange(log.n_requests)
            take = self.rng.choice(idx, size=min(len(idx), config.n_eval_requests), replace=False)
            self.rows.append(torch.from_numpy(np.sort(take)))
        start = mean_logged_weights(log)
        self.mean = [start.copy() for _ in self.rows]
        self.best = [(start.copy(), self._objective(r, start[None])[0]) for r in self.rows]
        self.concentration = config.concentration
        label = "cem-segment" if config.per_segment else "cem-global"
        self.policy = StaticPolicy(log.task_names, log.segments, label=label)
        self._publish()

    def _objective(self, rows: torch.Tensor, candidates: np.ndarray) -> np.ndarray:
        if rows.numel() == 0:
            return np.zeros(len(candidates))
        cand = torch.as_tensor(candidates, dtype=torch.float32)
        values = composite_reward(self.data, rows, cand.expand(rows.shape[0], *cand.shape))
        return values.mean(0).numpy()

    def _publish(self) -> None:
        table = np.stack([w for w, _ in self.best])
        if not self.config.per_segment:
            table = np.repeat(table, len(self.data.log.segments), axis=0)
        with torch.no_grad():
            self.policy.weights.copy_(torch.as_tensor(table / table.sum(1, keepdims=True)))

    def step(self, step: int) -> dict[str, float]:
        cfg = self.config
        for g, rows in enumerate(self.rows):
            alpha = np.maximum(self.mean[g] * self.concentration, 1e-2)
            candidates = np.vstack([self.rng.dirichlet(alpha, size=cfg.population - 1), self.mean[g][None]])
            values = self._objective(rows, candidates)
            self.mean[g] = candidates[np.argsort(values)[-cfg.n_elite:]].mean(0)
            if values.max() > self.best[g][1]:
                self.best[g] = (candidates[int(np.argmax(values))], float(values.max()))
        self.concentration *= 1.25
        self._publish()
        sizes = np.array([len(r) for r in self.rows], dtype=float)
        best = float(np.dot([v for _, v in self.best], sizes) / sizes.sum())
        return {"charts/reward": best, "charts/concentration": self.concentration}
