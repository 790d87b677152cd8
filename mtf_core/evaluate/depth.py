"""Whether how deep users see responds to the action: the one assumption DM and DR make about depth, tested.

DM and DR value every ranking down to as many candidates as its request showed (`rerank.slate_depth`): they
take each user's depth as given, whatever the action. Where users scroll further under a better ranking (a
cascade: they go on past engaging items), depth is itself an outcome of the action, and both miss what the
change of depth is worth. In the simulator's cascade world (`SimConfig.scroll_by_appeal` for every user, 20
seeds, `benchmarks.calibration --logging appeal`) DM's error followed the target's change of mean depth
(mid-simplex: depth +4%, DM -1.4%, DR -1.8%; near a vertex: depth -7%, DM +3.9%), while IPS and SNIPS, which
read the reward users gave, stayed unbiased.

Where the logged weights vary from request to request (explored, as every log with importance ratios is), a
least-squares regression of each request's depth on its logged weights, with a level per segment, measures
that response; the target's predicted change of mean depth, with a 95% interval clustered by user, is
`DepthShift`. The fit rests on per-user sums (`DepthSums`), so a streamed evaluation adds up shards' parts and
gets the in-memory figure. A shift whose interval excludes zero and that moves mean depth by more than
`diagnostics.THRESHOLDS`' `depth_shift_max` withholds "trustworthy" from DM and DR
(`diagnostics.estimator_verdicts`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse

from mtf_core.diagnostics import THRESHOLDS
from mtf_core.store import LogData

__all__ = ["DepthShift", "DepthSums", "depth_sums", "log_depth_sums", "depth_shifts", "target_mean_weights"]


@dataclass(frozen=True)
class DepthShift:
    """The target's predicted change of mean depth, relative to the logged mean depth, with its 95% interval."""

    shift: float
    low: float
    high: float

    @property
    def moves(self) -> bool:
        """Whether depth measurably responds to the target: the interval excludes zero and the shift is over
        the verdicts' `depth_shift_max`."""
        return ((self.low > 0.0 or self.high < 0.0)
                and abs(self.shift) > THRESHOLDS["trustworthy"]["depth_shift_max"])  # type: ignore[index]

    def to_json(self) -> dict[str, float]:
        return {"shift": self.shift, "low": self.low, "high": self.high}


@dataclass(frozen=True)
class DepthSums:
    """What the regression and the target's shift rest on, summed over users (so over shards too). With p =
    segments + tasks - 1 regressors x (a level per segment, the logged weights but the last, which the
    segment levels and the simplex determine) and per user A = sum x depth, B = sum x x':"""

    xx: np.ndarray  # (p, p) sum of B
    xy: np.ndarray  # (p,) sum of A
    aa: np.ndarray  # (p, p) sum of A A'
    ba: np.ndarray  # (p, p, p) sum of B (x) A
    bb: np.ndarray  # (p, p, p, p) sum of B (x) B
    gap: np.ndarray  # (S, p) per segment, sum over requests of x(target) - x(logged)
    depth: np.ndarray  # (S, 3) per segment, number of requests and sums of depth and of its square

    def __add__(self, other: DepthSums) -> DepthSums:
        return DepthSums(*(getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__))


def _regressors(weights: np.ndarray, segment: np.ndarray, n_segments: int) -> np.ndarray:
    return np.concatenate([np.eye(n_segments)[segment], weights[:, :-1]], axis=1)


def _indicator(group: np.ndarray, n_groups: int) -> scipy.sparse.csr_matrix:
    """Groups by rows `[n_groups, len(group)]`, 1 where a row is in the group: per-group sums as one sparse
    product, not a scatter-add per element."""
    return scipy.sparse.csr_matrix((np.ones(len(group)), (group, np.arange(len(group)))),
                                   shape=(n_groups, len(group)))


def target_mean_weights(weights: np.ndarray, samples: np.ndarray | None, mask: np.ndarray) -> np.ndarray:
    """A target's mean weights per request `[R,K]`: the mean of its draws `[G,R,K]` where it has them, else its
    action `[R,K]` (per-item weights `[R,N,K]`: their mean over the request's candidates)."""
    if samples is not None:
        return samples.mean(0)
    if weights.ndim == 3:
        m = mask[..., None].astype(np.float64)
        return (weights * m).sum(1) / np.maximum(m.sum(1), 1.0)
    return weights


def depth_sums(depth: np.ndarray, logged: np.ndarray, target: np.ndarray, segment: np.ndarray, n_segments: int,
               unit: np.ndarray, n_units: int, chunk: int = 65_536) -> DepthSums:
    """`DepthSums` of requests with their depth `[R]`, logged and target mean weights `[R,K]`, segment `[R]`
    and user index `unit` `[R]` (in 0..n_units-1), `chunk` requests at a time. Requests without logged
    weights (NaN) are left out."""
    p = n_segments + logged.shape[1] - 1
    a, b = np.zeros((n_units, p)), np.zeros((n_units, p * p))
    gap, per_segment = np.zeros((n_segments, p)), np.zeros((n_segments, 3))
    for start in range(0, len(depth), chunk):
        rows = slice(start, start + chunk)
        known = np.isfinite(logged[rows]).all(1)
        seg, u = segment[rows][known], unit[rows][known]
        y = depth[rows][known].astype(np.float64)
        x = _regressors(logged[rows][known], seg, n_segments)
        users, by_segment = _indicator(u, n_units), _indicator(seg, n_segments)
        a += users @ (x * y[:, None])
        b += users @ (x[:, :, None] * x[:, None, :]).reshape(len(x), p * p)
        gap += by_segment @ (_regressors(target[rows][known], seg, n_segments) - x)
        per_segment += by_segment @ np.stack([np.ones_like(y), y, y * y], axis=1)
    return DepthSums(b.sum(0).reshape(p, p), a.sum(0), a.T @ a, (b.T @ a).reshape(p, p, p),
                     (b.T @ b).reshape(p, p, p, p), gap, per_segment)


def log_depth_sums(log: LogData, target: np.ndarray, unit: np.ndarray, n_units: int) -> DepthSums:
    """`depth_sums` of every request of a log (its depth: the candidates it showed) for the target's mean
    weights `[R,K]`, with the log's own segment numbering."""
    return depth_sums(log.shown.sum(1), log.weights, target, log.segment, len(log.segments), unit, n_units)


def depth_shifts(sums: DepthSums) -> tuple[DepthShift | None, list[DepthShift | None]]:
    """The target's shift overall and per segment (None where every request is as deep, the logged weights
    do not vary enough to fit the regression, or a segment has no requests)."""
    n_segments = sums.depth.shape[0]
    none: tuple[DepthShift | None, list[DepthShift | None]] = (None, [None] * n_segments)
    n, total, squares = sums.depth.sum(0)
    if n == 0 or squares / n - (total / n) ** 2 <= 1e-9 * (total / n) ** 2:  # every request as deep
        return none
    if np.linalg.matrix_rank(sums.xx) < sums.xx.shape[0]:
        return none
    inverse = np.linalg.inv(sums.xx)
    beta = inverse @ sums.xy
    # The sandwich's meat, sum over users of g g' with g = A - B beta, from the sums alone.
    m1 = np.einsum("j,ijk->ik", beta, sums.ba)
    meat = sums.aa - m1 - m1.T + np.einsum("j,l,ijkl->ik", beta, beta, sums.bb)
    cov = inverse @ meat @ inverse

    def shift(gap: np.ndarray, depth: np.ndarray) -> DepthShift | None:
        n, total = float(depth[0]), float(depth[1])
        if n == 0 or total == 0:
            return None
        mean_gap, mean_depth = gap / n, total / n
        value = float(mean_gap @ beta) / mean_depth
        se = float(np.sqrt(max(mean_gap @ cov @ mean_gap, 0.0))) / mean_depth
        return DepthShift(value, value - 1.96 * se, value + 1.96 * se)

    overall = shift(sums.gap.sum(0), sums.depth.sum(0))
    return overall, [shift(sums.gap[s], sums.depth[s]) for s in range(n_segments)]
