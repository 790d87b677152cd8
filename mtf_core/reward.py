"""RewardSpec (JSON round trip) -> per-request and per-session composite rewards, vectorised.

The reward of a request (DESIGN §3):
    immediate = sum_k c_k * sum_{shown items} y_k          (c_k divided by std(y_k) when `normalize`)
    session   = continuation * [session goes on] + session_length * 1 + returned * [returned] * [last request]
    penalty   = share_penalty  * sum_k max(0, |share_k(w) - share_k(logging)| - share_tolerance)
              + vertex_penalty * max(0, max_k w_k - vertex_threshold) / (1 - vertex_threshold)
where share_k(w) is signal k's share of the expected immediate reward of the ranking the weights produce
(MTL scores times the position curve). The penalties are GRADE's rule-based terms against reward hacking:
they only depend on the scores and the weights, so every estimator and the ground truth charge them alike.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from mtf_core.errors import LogError

__all__ = ["RewardSpec", "ResolvedReward", "RewardParts", "resolve_reward", "request_reward", "session_rewards",
           "expected_signals", "fit_position_curve", "load_reward_spec", "weighted_sum", "penalty"]

_MAX_COEFFICIENT = 1e6


@dataclass(frozen=True)
class RewardSpec:
    """What the analyst optimises. Coefficients are per task name; absent tasks count 0."""

    coefficients: dict[str, float] = field(default_factory=dict)
    normalize: bool = True
    """Divide each signal by its standard deviation over shown items in the log."""
    clip: float | None = None
    """Clip the immediate reward to [-clip, clip] (None: no clipping)."""
    continuation: float = 0.0
    """Per request after which the session goes on (stickiness)."""
    session_length: float = 0.0
    """Per request served (activeness: a session earns length x this)."""
    returned: float = 0.0
    """Once per session whose user came back within a day, credited to its last request."""
    share_penalty: float = 0.0
    share_tolerance: float = 0.15
    vertex_penalty: float = 0.0
    vertex_threshold: float = 0.8

    def __post_init__(self) -> None:
        if not isinstance(self.coefficients, dict):
            raise LogError("reward: 'coefficients' must be an object of task -> number")
        for name, value in self.coefficients.items():
            _check_number(f"coefficient of {name!r}", value)
        for f in fields(self):
            if f.name not in ("coefficients", "normalize", "clip"):
                _check_number(f.name, getattr(self, f.name))
        if not isinstance(self.normalize, bool):
            raise LogError(f"reward: 'normalize' must be true or false, got {self.normalize!r}")
        for name in ("share_penalty", "vertex_penalty"):
            if getattr(self, name) < 0:
                raise LogError(f"reward: '{name}' must be >= 0 (a penalty), got {getattr(self, name)!r}")
        if self.clip is not None and (_check_number("clip", self.clip) <= 0):
            raise LogError("reward: 'clip' must be positive or null")
        if not 0 < self.vertex_threshold < 1:
            raise LogError("reward: 'vertex_threshold' must lie in (0, 1)")
        if self.share_tolerance < 0:
            raise LogError("reward: 'share_tolerance' must be >= 0")
        terms = [*self.coefficients.values(), self.continuation, self.session_length, self.returned]
        if all(v == 0 for v in terms):
            raise LogError("reward: every coefficient is zero, so every policy would score the same")

    @classmethod
    def default(cls, tasks: tuple[str, ...]) -> "RewardSpec":
        """Equal weight on every normalised signal plus a stickiness term."""
        return cls(coefficients={t: 1.0 for t in tasks}, normalize=True, continuation=1.0, returned=1.0)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "reward spec") -> "RewardSpec":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LogError(f"{source}: not valid JSON ({exc})") from exc
        except RecursionError as exc:
            raise LogError(f"{source}: JSON nested too deeply to be a reward spec") from exc
        if not isinstance(raw, dict):
            raise LogError(f"{source}: must be a JSON object")
        unknown = set(raw) - {f.name for f in fields(cls)}
        if unknown:
            raise LogError(f"{source}: unknown fields {sorted(unknown)}")
        try:
            return cls(**raw)
        except LogError as exc:
            raise LogError(f"{source}: {exc}") from exc
        except TypeError as exc:
            raise LogError(f"{source}: {exc}") from exc

    def check_tasks(self, tasks: tuple[str, ...], source: str = "reward spec") -> None:
        unknown = sorted(set(self.coefficients) - set(tasks))
        if unknown:
            raise LogError(f"{source}: unknown tasks {unknown}; this log's tasks are {list(tasks)}")


def _check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LogError(f"reward: {name} must be a number, got {value!r}")
    if not math.isfinite(value) or abs(value) > _MAX_COEFFICIENT:
        raise LogError(f"reward: {name} = {value!r} is not a finite number of at most {_MAX_COEFFICIENT:g}")
    return float(value)


def load_reward_spec(path: str | Path | None, tasks: tuple[str, ...]) -> RewardSpec:
    """The spec in a JSON file, checked against the log's tasks; the default spec when `path` is None."""
    if path is None:
        return RewardSpec.default(tasks)
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError) as exc:
        raise LogError(f"{p}: cannot read reward spec ({exc.__class__.__name__})") from exc
    spec = RewardSpec.from_json(text, source=str(p))
    spec.check_tasks(tasks, source=str(p))
    return spec


@dataclass(frozen=True)
class ResolvedReward:
    """A spec bound to one log: concrete per-task coefficients and the logging policy's reward shares."""

    spec: RewardSpec
    tasks: tuple[str, ...]
    coefficients: np.ndarray  # (K,) c_k, normalisation applied
    reference_share: np.ndarray  # (K,) logging policy's share of expected immediate reward
    position_curve: np.ndarray  # (L,) examination per position used for expected signals

    def to_dict(self) -> dict[str, object]:
        return {"spec": json.loads(self.spec.to_json()), "coefficients": dict(zip(self.tasks, self.coefficients.tolist())),
                "reference_share": dict(zip(self.tasks, self.reference_share.tolist()))}


def fit_position_curve(scores: np.ndarray, labels: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Examination per position: observed over predicted signal, pooled over tasks, relative to position 0."""
    n_pos = int(positions.max()) + 1
    shown = positions >= 0
    y = np.nan_to_num(labels)
    with warnings.catch_warnings():  # a task without any label: its scale falls back to the floor
        warnings.simplefilter("ignore", RuntimeWarning)
        scale = np.maximum(np.nan_to_num(np.nanmean(labels[shown].astype(np.float64), axis=0)), 1e-9)
    obs = np.bincount(positions[shown], weights=(y[shown] / scale).sum(-1), minlength=n_pos)
    pred = np.bincount(positions[shown], weights=(scores[shown] / scale).sum(-1), minlength=n_pos)
    curve = obs / np.maximum(pred, 1e-12)
    return np.clip(curve / max(curve[0], 1e-12), 0.0, 1.0) if curve[0] > 0 else np.ones(n_pos)


def expected_signals(scores: np.ndarray, positions: np.ndarray, curve: np.ndarray) -> np.ndarray:
    """Direct-method signal per request `[R,K]`: sum over shown positions p < L of curve[p] * s_k."""
    n_pos = curve.shape[0]
    exam = np.where((positions >= 0) & (positions < n_pos), curve[np.clip(positions, 0, n_pos - 1)], 0.0)
    return np.einsum("rn,rnk->rk", exam, scores)


def resolve_reward(spec: RewardSpec, tasks: tuple[str, ...], labels: np.ndarray, shown: np.ndarray,
                   expected_logged: np.ndarray, curve: np.ndarray) -> ResolvedReward:
    """Bind a spec to a log: std normalisation and the logging policy's reward shares."""
    spec.check_tasks(tasks)
    c = np.array([spec.coefficients.get(t, 0.0) for t in tasks], dtype=np.float64)
    if spec.normalize:  # in float64 over the shown items (float32 sums lose four digits on a large log)
        with warnings.catch_warnings():  # a task without any label: no normalisation (below)
            warnings.simplefilter("ignore", RuntimeWarning)
            std = np.nanstd(labels[shown].astype(np.float64), axis=0)
        c = c / np.where(np.isfinite(std) & (std > 0), std, 1.0)
    totals = c * expected_logged.sum(0)
    share = totals / totals.sum() if totals.sum() > 0 else np.full(len(tasks), 1.0 / max(len(tasks), 1))
    return ResolvedReward(spec, tasks, c, share, curve)


@dataclass(frozen=True)
class RewardParts:
    """Per-request reward terms `[R]`; `total` is what every estimator and the ground truth average."""

    immediate: np.ndarray
    session: np.ndarray
    penalty: np.ndarray

    @property
    def total(self) -> np.ndarray:
        return self.immediate + self.session - self.penalty


def weighted_sum(values: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
    """`values @ coefficients` over the last axis as an elementwise product and sum: a BLAS matrix-vector
    product splits its sums by the thread count, so the last bits would differ between a worker with one
    thread and the local process."""
    return (values * coefficients).sum(-1)


def penalty(resolved: ResolvedReward, weights: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """GRADE's anti-hacking terms per request `[R]` for weights `[R,K]`/`[R,N,K]` and expected signals `[R,K]`."""
    spec = resolved.spec
    out = np.zeros(expected.shape[0])
    if spec.share_penalty:
        contrib = expected * resolved.coefficients
        total = contrib.sum(1, keepdims=True)
        share = np.where(total > 0, contrib / np.where(total > 0, total, 1.0), resolved.reference_share)
        drift = np.maximum(np.abs(share - resolved.reference_share) - spec.share_tolerance, 0.0).sum(1)
        out += spec.share_penalty * drift
    if spec.vertex_penalty:
        top = weights.max(-1)
        # Weights a log did not record (NaN) cannot be charged: the term is about a policy's own weights.
        top = np.nan_to_num(top.mean(-1) if top.ndim == 2 else top, nan=0.0)
        out += spec.vertex_penalty * np.maximum(top - spec.vertex_threshold, 0.0) / (1.0 - spec.vertex_threshold)
    return out


def request_reward(resolved: ResolvedReward, feedback_sum: np.ndarray, continued: np.ndarray,
                   returned: np.ndarray, weights: np.ndarray, expected: np.ndarray) -> RewardParts:
    """Composite reward per request from summed feedback `[R,K]`, session flags `[R]`, action and expected signals."""
    spec = resolved.spec
    immediate = weighted_sum(feedback_sum, resolved.coefficients)
    if spec.clip is not None:
        immediate = np.clip(immediate, -spec.clip, spec.clip)
    last = ~continued.astype(bool)
    session = (spec.continuation * continued.astype(np.float64) + spec.session_length
               + spec.returned * np.nan_to_num(returned.astype(np.float64)) * last)
    return RewardParts(immediate, session, penalty(resolved, weights, expected))


def session_rewards(session_index: np.ndarray, per_request: np.ndarray) -> np.ndarray:
    """Sum of per-request rewards per session (index 0..S-1)."""
    return np.bincount(session_index, weights=per_request)
