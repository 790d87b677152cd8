"""The logging policy of a log: the density its logged weights were drawn from, logged or estimated.

On simulator logs the logging policy is the simulator's own Dirichlet per segment, so its density equals
`logging_logp` exactly. Where a log has no density but its weights vary (`profile.profile_log`), it is
estimated: a Dirichlet per segment by maximum likelihood, and a feature-conditioned Dirichlet regression
(log-concentrations linear in the user features and the session context, per segment), each cross-fitted
over two folds of users so that no request's propensity comes from a model that saw it; the better
held-out log-likelihood wins. `propensities` is what evaluation reads: the density of every logged action,
where it comes from, and the model that gives the density of any other weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from mtf_core.policies.base import FusionPolicy, StateBatch
from mtf_core.policies.static import LoggingPolicy, fit_dirichlet_moments
from mtf_core.profile import LogProfile, profile_log
from mtf_core.store import LogData

__all__ = ["logging_policy", "Propensities", "propensities", "estimate_propensities", "DirichletRegression",
           "fit_segment_dirichlet"]

_FLOOR = 1e-6  # logged weights at a face of the simplex (a zero weight) are moved this far inside
_STEPS = 300


def logging_policy(log: LogData) -> LoggingPolicy:
    """The logging policy of a log: the simulator's exact Dirichlet, or one fitted per segment by moments."""
    if log.is_simulated:
        from mtf_core.simulate import SimConfig, logging_alpha

        config = SimConfig.from_json(log.meta["simulator_config"])
        alpha = logging_alpha(config)[np.argsort(config.segment_names)]
        return LoggingPolicy(log.task_names, log.segments, alpha)
    return LoggingPolicy.from_log(log.task_names, log.segments, log.segment, log.weights)


@dataclass(frozen=True)
class Propensities:
    """The logging density of every logged action, as importance ratios need it.

    `logp` is the effective log-density: on mixed logs the explored requests' density times their share,
    and +inf for requests without one (a smooth target's ratio there is 0). `model` gives the density of
    any weights (for diagnostics on the target's own draws), shifted by `log_share`. `source` is None where
    no importance-weighted estimate exists."""

    source: str | None  # "logged", "logged (explored share)", "estimated (...)", or None
    logp: np.ndarray
    model: FusionPolicy | None
    log_share: float = 0.0
    note: str = ""
    fit: dict[str, float] = field(default_factory=dict)

    @property
    def estimated(self) -> bool:
        return bool(self.source and self.source.startswith("estimated"))


def propensities(log: LogData, profile: LogProfile | None = None, seed: int = 0) -> Propensities:
    """The propensities a log supports (see `profile.profile_log`)."""
    profile = profile or profile_log(log)
    if profile.mode == "known density":
        return Propensities("logged", log.logging_logp, logging_policy(log))
    if profile.mode == "mixed":
        known = np.isfinite(log.logging_logp)
        log_share = math.log(profile.share_with_density)
        logp = np.where(known, log.logging_logp + log_share, np.inf)
        # The exploration part's density, for the target's own draws: the simulator's, or fitted to it alone.
        model = logging_policy(log) if log.is_simulated else LoggingPolicy.from_log(
            log.task_names, log.segments, log.segment[known], log.weights[known])
        return Propensities("logged (explored share)", logp, model, log_share, profile.explanation)
    if profile.mode == "stochastic, density unknown":
        return estimate_propensities(log, seed)
    return Propensities(None, np.full(log.n_requests, np.nan), None, note=profile.explanation)


class DirichletRegression(FusionPolicy):
    """A Dirichlet whose log-concentrations are a per-segment row plus a linear map of the user features and
    the session context (standardised with the training fold's statistics)."""

    stochastic = True

    def __init__(self, tasks: tuple[str, ...], segments: tuple[str, ...], n_inputs: int) -> None:
        super().__init__(tasks, segments)
        self.base = torch.nn.Parameter(torch.zeros(len(segments), len(tasks), dtype=torch.float64))
        self.slope = torch.nn.Parameter(torch.zeros(n_inputs, len(tasks), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(n_inputs, dtype=torch.float64))
        self.register_buffer("scale", torch.ones(n_inputs, dtype=torch.float64))

    def inputs(self, state: StateBatch) -> torch.Tensor:
        x = torch.cat([state.user_features, state.context], 1).double()
        return (x - self.mean) / self.scale

    def distribution(self, state: StateBatch) -> torch.distributions.Distribution:
        one_hot = state.segment_one_hot(self.segments).double()
        log_alpha = (one_hot @ self.base + self.inputs(state) @ self.slope).clamp(-7.0, 14.0)
        return torch.distributions.Dirichlet(torch.exp(log_alpha))


def _interior(weights: np.ndarray) -> torch.Tensor:
    w = np.maximum(weights, _FLOOR)
    return torch.from_numpy(w / w.sum(1, keepdims=True))


def fit_segment_dirichlet(log: LogData, rows: np.ndarray) -> LoggingPolicy:
    """A Dirichlet per segment fitted to the weights of `rows` by maximum likelihood (L-BFGS on the
    log-concentrations, started at the method of moments)."""
    n_seg, k = len(log.segments), len(log.tasks)
    start = np.stack([fit_dirichlet_moments(log.weights[rows][log.segment[rows] == s])
                      if np.any(log.segment[rows] == s) else np.ones(k) for s in range(n_seg)])
    log_alpha = torch.tensor(np.log(start), dtype=torch.float64, requires_grad=True)
    w, seg = _interior(log.weights[rows]), torch.from_numpy(log.segment[rows])
    optimiser = torch.optim.LBFGS([log_alpha], max_iter=_STEPS, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimiser.zero_grad()
        alpha = torch.exp(log_alpha.clamp(-7.0, 14.0))[seg]  # a bounded search: finite at every step
        value = -torch.distributions.Dirichlet(alpha, validate_args=False).log_prob(w).mean()
        value.backward()
        return value

    optimiser.step(loss)
    alpha = torch.exp(log_alpha).detach().numpy()
    if not np.isfinite(alpha).all():  # the likelihood has no maximum (e.g. weights nearly constant): moments
        alpha = start
    return LoggingPolicy(log.task_names, log.segments, np.clip(alpha, 1e-3, 1e6))


def fit_dirichlet_regression(log: LogData, rows: np.ndarray, start: LoggingPolicy, l2: float = 1e-3
                             ) -> DirichletRegression:
    """The feature-conditioned Dirichlet fitted to `rows` by maximum likelihood, started at `start`."""
    state = log.state(rows)
    model = DirichletRegression(log.task_names, log.segments, state.user_features.shape[1] + state.context.shape[1])
    x = torch.cat([state.user_features, state.context], 1).double()
    model.mean.copy_(x.mean(0))
    model.scale.copy_(x.std(0).clamp(min=1e-6))
    with torch.no_grad():
        model.base.copy_(torch.log(start.alpha))
    w = _interior(log.weights[rows])
    optimiser = torch.optim.LBFGS(list(model.parameters()), max_iter=_STEPS, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimiser.zero_grad()
        value = -model.distribution(state).log_prob(w).mean() + l2 * model.slope.pow(2).sum()
        value.backward()
        return value

    optimiser.step(loss)
    return model


def _log_prob(model: FusionPolicy, log: LogData, rows: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.distribution(log.state(rows)).log_prob(_interior(log.weights[rows])).double().numpy()


def estimate_propensities(log: LogData, seed: int = 0, n_folds: int = 2) -> Propensities:
    """Cross-fitted propensities: users split into folds; each fold's log-densities come from the models
    fitted on the other folds; the model with the higher held-out log-likelihood per request is used."""
    users = np.unique(log.user_id)
    fold_of_user = np.random.default_rng([seed, 17]).permutation(len(users)) % n_folds
    fold = fold_of_user[np.searchsorted(users, log.user_id)]
    logp = {name: np.empty(log.n_requests) for name in ("per-segment Dirichlet", "feature-conditioned Dirichlet")}
    for f in range(n_folds):
        train, held = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        if len(train) == 0 or len(held) == 0:
            train = held = np.arange(log.n_requests)  # one user: nothing to hold out
        per_segment = fit_segment_dirichlet(log, train)
        logp["per-segment Dirichlet"][held] = _log_prob(per_segment, log, held)
        regression = fit_dirichlet_regression(log, train, per_segment)
        logp["feature-conditioned Dirichlet"][held] = _log_prob(regression, log, held)
    held_out = {name: float(v.mean()) if np.isfinite(v).all() else -np.inf for name, v in logp.items()}
    best = max(held_out, key=held_out.get)  # type: ignore[arg-type]
    everything = np.arange(log.n_requests)
    segment_model = fit_segment_dirichlet(log, everything)
    model = segment_model if best == "per-segment Dirichlet" else fit_dirichlet_regression(log, everything,
                                                                                         segment_model)
    fit = {f"held-out log-likelihood per request: {name}": value for name, value in held_out.items()}
    note = (f"no logging density in this log: propensities estimated by a {best} (cross-fitted over {n_folds} "
            f"folds of users; held-out log-likelihood per request " + ", ".join(
                f"{name} {value:.3f}" for name, value in held_out.items()) + ")")
    return Propensities(f"estimated ({best})", logp[best], model, note=note, fit=fit)
