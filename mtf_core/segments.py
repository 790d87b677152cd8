"""Per-segment weight distributions of a policy: Dirichlet parameters, spread across users, marginals.

For a policy on a log, every request's weight distribution is evaluated; per segment the Dirichlet
parameters are the mean concentration over the segment's requests. A Dirichlet's marginal for task k is
Beta(alpha_k, alpha_0 - alpha_k), and any three tasks renormalised are Dirichlet(alpha_a, alpha_b, alpha_c).
A deterministic policy (a point mass per request) has no concentration: its marginals and ternary views are
the weights it actually serves across the segment's requests, not a Dirichlet fitted to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy import stats

from mtf_core.errors import LogError
from mtf_core.evaluate import CHUNK
from mtf_core.policies.base import FusionPolicy
from mtf_core.store import LogData, iter_chunks

__all__ = ["SegmentWeights", "segment_weights", "beta_marginals", "ternary_samples", "weights_by_feature"]


@dataclass(frozen=True)
class SegmentWeights:
    """Per-request means and concentrations, and their per-segment summaries."""

    policy: str
    tasks: tuple[str, ...]
    segments: tuple[str, ...]
    mean_weights: np.ndarray  # (R, K): the mean action per request (per-item actions averaged over items)
    alpha: np.ndarray  # (R, K): Dirichlet concentration per request (inf for a deterministic policy)
    summary: pd.DataFrame  # policy, segment, task, mean, std (across users), alpha, concentration
    segment: np.ndarray  # (R,) the requests' segment index
    deterministic: bool = False

    def segment_alpha(self, segment: str) -> np.ndarray:
        rows = self.summary[self.summary["segment"] == segment]
        return rows["alpha"].to_numpy()


def _request_alpha(policy: FusionPolicy | None, log: LogData) -> tuple[np.ndarray, np.ndarray]:
    means, alphas = [], []
    with torch.no_grad():
        for rows in iter_chunks(log.n_requests, CHUNK):
            state = log.state(rows)
            w = policy.act(state, deterministic=True).double()
            if w.dim() == 3:
                w = w.mean(1)
            means.append(w.numpy())
            if not policy.stochastic:  # a point mass: no concentration to show
                alphas.append(np.full(w.shape, np.inf))
                continue
            dist = policy.distribution(state)
            if isinstance(dist, torch.distributions.Dirichlet) and dist.concentration.dim() == 2:
                alphas.append(dist.concentration.double().numpy())
            else:  # fit a Dirichlet with the spread of samples around the mean (method of moments)
                draws = dist.sample((32,)).double()
                draws = draws.mean(2) if draws.dim() == 4 else draws
                var = draws.var(0).mean(-1).clamp(min=1e-9)
                m = w
                total = ((m * (1 - m)).mean(-1) / var - 1).clamp(min=0.5, max=1e5)
                alphas.append((m * total[:, None]).numpy())
    return np.concatenate(means), np.concatenate(alphas)


def segment_weights(policy: FusionPolicy | None, log: LogData, label: str) -> SegmentWeights:
    """Summaries per segment and task; `policy=None` means the logged weights (the logging policy)."""
    if policy is None:
        from mtf_core.propensity import logging_policy

        if not log.weights_known:
            raise LogError(f"{log.path}: the log records no fusion weights (NULL w_*), so there is no logged "
                           "weight distribution to show")
        policy = logging_policy(log)
    mean_w, alpha = _request_alpha(policy, log)
    users, user_index = np.unique(log.user_id, return_inverse=True)
    counts = np.bincount(user_index, minlength=len(users))[:, None]
    per_user = np.stack([np.bincount(user_index, weights=mean_w[:, k], minlength=len(users))
                         for k in range(mean_w.shape[1])], 1) / np.maximum(counts, 1)
    user_segment = np.zeros(len(users), dtype=np.int64)
    user_segment[user_index] = log.segment
    rows = []
    for s, name in enumerate(log.segments):
        m = log.segment == s
        if not m.any():
            continue
        seg_alpha = alpha[m].mean(0)
        spread = per_user[user_segment == s].std(0)
        for k, task in enumerate(log.task_names):
            rows.append({"policy": label, "segment": name, "task": task, "mean": float(mean_w[m, k].mean()),
                         "std": float(spread[k]), "alpha": float(seg_alpha[k]),
                         "concentration": float(seg_alpha.sum())})
    return SegmentWeights(label, log.task_names, log.segments, mean_w, alpha, pd.DataFrame(rows), log.segment,
                          not policy.stochastic)


def beta_marginals(weights: SegmentWeights, n_points: int = 120) -> pd.DataFrame:
    """Density of Beta(alpha_k, alpha_0 - alpha_k) on a grid, per segment and task (capped for plotting); for a
    deterministic policy, the density of the weights it serves across the segment's requests."""
    x = np.linspace(0.002, 0.998, n_points)
    if weights.deterministic:
        return _served_densities(weights, x)
    frames = []
    for segment, part in weights.summary.groupby("segment", sort=False):
        a = part["alpha"].to_numpy()
        total = a.sum()
        for task, ak in zip(part["task"], a):
            dens = stats.beta.pdf(x, ak, max(total - ak, 1e-6))
            frames.append(pd.DataFrame({"segment": segment, "task": task, "x": x,
                                        "density": np.minimum(dens, 60.0)}))
    return pd.concat(frames, ignore_index=True)


def _served_densities(weights: SegmentWeights, x: np.ndarray) -> pd.DataFrame:
    """Per segment and task, a histogram density `x` of the weights served to the segment's requests."""
    edges = np.concatenate([[0.0], (x[1:] + x[:-1]) / 2, [1.0]])
    frames = []
    for s, segment in enumerate(weights.segments):
        served = weights.mean_weights[weights.segment == s]
        if len(served) == 0:
            continue
        for k, task in enumerate(weights.tasks):
            density, _ = np.histogram(served[:, k], bins=edges, density=True)
            frames.append(pd.DataFrame({"segment": segment, "task": task, "x": x,
                                        "density": np.minimum(density, 60.0)}))
    return pd.concat(frames, ignore_index=True)


def ternary_samples(weights: SegmentWeights, segment: str, tasks: tuple[str, str, str], n: int = 3000,
                    seed: int = 0) -> np.ndarray:
    """Draws `[n,3]` of the three tasks' weights renormalised: Dirichlet(alpha_a, alpha_b, alpha_c); for a
    deterministic policy, the weights it serves to (up to n of) the segment's requests."""
    rng = np.random.default_rng(seed)
    if weights.deterministic:
        columns = [weights.tasks.index(t) for t in tasks]
        served = weights.mean_weights[weights.segment == weights.segments.index(segment)][:, columns]
        served = served[rng.permutation(len(served))[:n]]
        return served / np.maximum(served.sum(1, keepdims=True), 1e-12)
    alpha = dict(zip(weights.tasks, weights.segment_alpha(segment)))
    return rng.dirichlet([max(alpha[t], 1e-3) for t in tasks], size=n)


def weights_by_feature(weights: SegmentWeights, log: LogData, feature: str, n_bins: int = 10) -> pd.DataFrame:
    """Mean weight per task over quantile bins of a user feature."""
    if feature not in log.user_feature_names:
        raise ValueError(f"unknown user feature {feature!r}; known: {', '.join(log.user_feature_names)}")
    values = log.user_features[:, log.user_feature_names.index(feature)].astype(np.float64)
    edges = np.unique(np.quantile(values, np.linspace(0, 1, n_bins + 1)))
    if len(edges) < 2:
        edges = np.array([values.min(), values.max() + 1e-9])
    bins = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)
    mids = (edges[:-1] + edges[1:]) / 2
    counts = np.bincount(bins, minlength=len(mids))
    rows = []
    for k, task in enumerate(weights.tasks):
        sums = np.bincount(bins, weights=weights.mean_weights[:, k], minlength=len(mids))
        for b in np.flatnonzero(counts):
            rows.append({"bin_mid": float(mids[b]), "task": task, "weight": float(sums[b] / counts[b])})
    return pd.DataFrame(rows)
