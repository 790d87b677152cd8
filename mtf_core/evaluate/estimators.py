"""Off-policy estimators in Open Bandit Pipeline's split: per-request terms, their ratio of sums as the
estimate, the bootstrap (elsewhere) as the interval."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

__all__ = ["Ratio", "OPEInputs", "Estimator", "IPS", "SNIPS", "NCIS", "DR", "DM", "ESTIMATORS"]


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
    """Inverse propensity scoring: mean(min(rho, clip) * r). Unclipped by default: a clip removes ratio mass
    (the target's probability where the log is thin), which is bias that no interval shows."""

    clip: float = math.inf
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
