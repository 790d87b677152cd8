"""A target policy's actions on every request of a log, in the form evaluation needs them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mtf_core.evaluate import context
from mtf_core.policies.base import FusionPolicy
from mtf_core.store import LogData, iter_chunks

__all__ = ["TargetActions", "target_actions", "logged_order", "interior_weights", "N_DM_SAMPLES"]

N_DM_SAMPLES = 4


@dataclass(frozen=True)
class TargetActions:
    """A target policy's actions on a log."""

    label: str
    weights: np.ndarray  # (R,K) or (R,N,K): the deterministic action used for re-ranking
    form: str
    bias: np.ndarray | None  # fusion bias for product/logsum forms
    logp_logged: np.ndarray | None  # (R,) target density of the logged weights (stochastic, weight space)
    samples: np.ndarray | None  # (G,R,K) draws for the direct method of a stochastic target
    logp_samples: np.ndarray | None  # (G,R) the target's log-density of those draws
    is_logging: bool = False
    stochastic: bool = False
    ope_note: str = ""  # why importance-weighted estimates are absent, if they are
    order: np.ndarray | None = None
    """(R,N) a ranking score that replaces fusion: the shown order of a log that logged no weights."""


def target_actions(policy: FusionPolicy | None, log: LogData, label: str, stochastic: bool | None = None,
                   seed: int = 0, n_draws: int = N_DM_SAMPLES) -> TargetActions:
    """Act on every request of `log` in chunks. `policy=None` means the logged actions themselves. A
    stochastic target also gets `n_draws` draws per request (for the direct method)."""
    if policy is None:
        order = None if log.weights_known else logged_order(log.positions)
        return TargetActions(label, log.weights, "sum", None, log.logging_logp.copy(), None, None, True, True,
                             order=order)
    stochastic = policy.stochastic if stochastic is None else (stochastic and policy.stochastic)
    weights, logps, samples, sample_logps = [], [], [], []
    in_weight_space = policy.form == "sum" and not policy.per_item
    with torch.no_grad(), torch.random.fork_rng():  # seeded draws, the caller's RNG state untouched
        torch.manual_seed(seed)
        for rows in iter_chunks(log.n_requests, context.CHUNK):
            state = log.state(rows)
            served = policy.act(state, deterministic=True)
            weights.append(served.double().numpy())
            if stochastic and in_weight_space:
                dist = policy.distribution(state)
                # The policy's own dtype (a logistic-normal has no closed-form mean to read it from).
                w = torch.from_numpy(log.weights[rows]).to(served.dtype)
                logps.append(dist.log_prob(interior_weights(w)).double().numpy())
                draws = dist.sample((n_draws,))
                samples.append(draws.double().numpy())
                sample_logps.append(dist.log_prob(interior_weights(draws)).double().numpy())
    bias = getattr(policy, "fusion_bias", None)
    note = ""
    if not in_weight_space:
        note = ("this policy acts in its own parameterisation (per-item weights or powers and biases), not in the "
                "logged weight space, so importance ratios against logging_logp do not exist; see the direct "
                "method, the re-ranking metrics and the simulator's truth")
    return TargetActions(
        label, np.concatenate(weights), policy.form, None if bias is None else bias.detach().double().numpy(),
        np.concatenate(logps) if logps else None, np.concatenate(samples, axis=1) if samples else None,
        np.concatenate(sample_logps, axis=1) if sample_logps else None, False, stochastic and in_weight_space, note,
    )


def logged_order(positions: np.ndarray) -> np.ndarray:
    """A ranking score `[R,N]` that reproduces the shown order (shown candidates first, in their positions;
    candidates ranked but not shown after them, in slot order): the logged ranking where no weights were
    logged to re-rank with."""
    n = positions.shape[1]
    unshown = n + np.arange(n, dtype=np.float32)[None, :]
    return -np.where(positions >= 0, positions.astype(np.float32), unshown)


def interior_weights(w: torch.Tensor) -> torch.Tensor:
    """Keep logged weights strictly inside the simplex so Dirichlet densities stay finite."""
    w = torch.clamp(w, min=1e-12)
    return w / w.sum(-1, keepdim=True)
