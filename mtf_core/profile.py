"""What a log can support: how its fusion weights were logged, and so which estimates exist.

Most production logs carry no density: one vector per segment, a few vectors in an A/B test, or production
traffic with an exploration share. Importance weighting needs the logging density of every action it
reweights, so the profile decides which estimators a log supports before any of them runs:
- `known density` (every request has `logging_logp`): IPS, SNIPS, DR and NCIS with logged propensities;
- `mixed` (only some requests have it: an exploration share): the same on the mixture, with requests without
  a density treated as the part of the logging policy a smooth target never takes (ratio 0) and the density
  of the rest scaled by their share;
- `stochastic, density unknown` (weights vary within segments, no `logging_logp`): the same with estimated
  propensities, labelled so;
- `no fusion weights logged` (the `w_*` of some request are NULL: random exposure, or a feed whose ranker was
  not logged): nothing to reweight; the direct model and re-ranking metrics, on random exposure free of
  exposure bias;
- `deterministic` (one vector per segment) and `A/B buckets` (a few fixed vectors): importance weighting
  cannot reach a vector that was never logged; the direct model and re-ranking metrics (model-based), and for
  buckets an on-policy read-out of the logged arms.

Whatever the mode, where weights were logged the profile also measures the fusion agreement: the share of
requests whose shown ranking the logged weights' fusion of the logged scores reproduces. The direct model
and the re-ranking metrics value the ranking a fusion would show; in a feed where a later stage (diversity,
business rules, a re-ranker) reorders what the fusion ranked, or where the logged scores are not those the
ranker used, that is not what users saw, and DM and DR lose their footing, while IPS, SNIPS and NCIS, which
treat the weights as the action of the whole system, keep theirs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from mtf_core.diagnostics import fusion_reordered
from mtf_core.store import LogData, iter_chunks

__all__ = ["LogProfile", "profile_log", "fusion_agreement", "fusion_note", "MODES", "MAX_BUCKETS"]

MODES = ("known density", "mixed", "stochastic, density unknown", "deterministic", "A/B buckets",
         "no fusion weights logged")
MAX_BUCKETS = 10
"""At most this many distinct vectors per segment, each carrying at least 1% of the segment's requests, read
as an A/B test; more varied weights without a density are read as a stochastic policy of unknown density."""


@dataclass(frozen=True)
class LogProfile:
    """How a log's weights were logged and what that allows (module docstring)."""

    mode: str
    share_with_density: float
    vectors_per_segment: dict[str, int]  # distinct logged vectors among requests without a density
    random_exposure: bool
    supports: tuple[str, ...]
    explanation: str
    fusion_agreeing: int = 0  # requests whose shown ranking the logged weights' fusion reproduces
    fusion_checked: int = 0  # requests with logged weights and a shown candidate (`fusion_agreement`)

    @property
    def fusion_agreement(self) -> float | None:
        """The share of the checked requests whose shown ranking the logged fusion reproduces (module
        docstring); None where no weights were logged."""
        return self.fusion_agreeing / self.fusion_checked if self.fusion_checked else None

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "fusion_agreement": self.fusion_agreement}


def _distinct_vectors(weights: np.ndarray, segment: np.ndarray, n_segments: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Per segment, the number of distinct weight vectors (to 1e-9) and their request counts."""
    rounded = np.round(weights, 9)
    counts, shares = np.zeros(n_segments, dtype=np.int64), []
    for s in range(n_segments):
        rows = rounded[segment == s]
        if len(rows) == 0:
            shares.append(np.zeros(0))
            continue
        _, n = np.unique(rows, axis=0, return_counts=True)
        counts[s] = len(n)
        shares.append(n / n.sum())
    return counts, shares


_FUSION_TOLERANCE = 1e-5  # relative: a ranker that fused in float32 ties where float64 would not


def fusion_agreement(log: LogData, chunk: int = 100_000) -> tuple[int, int]:
    """(requests whose shown ranking the logged weights' sum fusion of the logged scores reproduces, requests
    checked): of the requests with logged weights and a shown candidate, those whose shown candidates' fused
    scores fall in the order of their positions and reach every unshown candidate's, ties allowed."""
    agree = checked = 0
    for rows in iter_chunks(log.n_requests, chunk):
        scores = log.scores[rows]
        # float32 (the scores' own precision) is well inside the tolerance, and twice as fast as float64.
        if log.item_weights is None:
            fused = np.matmul(scores, log.weights[rows].astype(np.float32)[..., None])[..., 0]
        else:
            fused = np.einsum("rnk,rnk->rn", scores, log.item_weights[rows].astype(np.float32))
        positions, mask = log.positions[rows], log.mask[rows]
        shown = (positions >= 0) & mask
        fused = np.where(mask, fused, np.nan)
        tolerance = _FUSION_TOLERANCE * (1.0 + np.nanmax(np.abs(fused), axis=1, initial=0.0))
        # Shown candidates by position (0..m-1 after validation); NaN past a request's last position.
        by_position = np.full((len(fused), max(int(positions.max(initial=-1)) + 1, 1)), np.nan, dtype=np.float32)
        r, n = np.nonzero(shown)
        by_position[r, positions[r, n]] = fused[r, n]
        with np.errstate(invalid="ignore"):
            in_order = ~(by_position[:, :-1] + tolerance[:, None] < by_position[:, 1:]).any(1)  # NaN compares False
        lowest_shown = np.where(shown, fused, np.inf).min(1)
        highest_unshown = np.where(mask & ~shown, fused, -np.inf).max(1)
        reached = lowest_shown + tolerance >= highest_unshown
        known = np.isfinite(log.weights[rows]).all(1) & shown.any(1)  # per-item weights fall back to these
        agree += int((known & in_order & reached).sum())
        checked += int(known.sum())
    return agree, checked


def profile_log(log: LogData) -> LogProfile:
    """Classify how `log`'s weights were logged (module docstring)."""
    known = np.isfinite(log.logging_logp)
    share = float(known.mean()) if log.n_requests else 0.0
    random_exposure = str(log.meta.get("random_exposure", "")).lower() in ("true", "1", "yes")
    model_based = ("DM (model-based)", "re-ranking metrics (model-based)")
    if not log.weights_known:
        missing = float((~np.isfinite(log.weights).all(1)).mean()) if log.n_requests else 1.0
        why = (f"{missing:.0%} of requests logged no fusion weights (NULL w_*): there is no logged action to "
               "reweight, so no importance-weighted estimate exists; the direct model and the re-ranking metrics "
               "of the logged candidates remain")
        if random_exposure:
            why += ("; labels come from random exposure (meta flag random_exposure): every shown candidate's "
                    "labels are free of exposure bias, so re-ranking metrics of the shown candidates are unbiased")
        return LogProfile("no fusion weights logged", share, {}, random_exposure, model_based, why)
    unknown = ~known
    counts, shares = _distinct_vectors(log.weights[unknown], log.segment[unknown], len(log.segments))
    per_segment = {name: int(c) for name, c in zip(log.segments, counts)}
    if share == 1.0:
        mode, supports = "known density", ("IPS", "SNIPS", "DR", "NCIS", *model_based)
        why = "every request logs the density of its weights: importance-weighted estimates use it as logged"
    elif share > 0.0:
        mode, supports = "mixed", ("IPS", "SNIPS", "DR", "NCIS", *model_based)
        why = (f"{share:.1%} of requests log the density of their weights (an exploration share); the rest do not. "
               "Importance weighting treats those as the part of the logging policy that a smooth target never "
               "takes (ratio 0) and scales the density of the explored requests by their share: unbiased when "
               "which requests explore is decided at random")
    elif counts.max(initial=0) <= 1:
        mode, supports = "deterministic", model_based
        why = ("one weight vector per segment and no density: importance weighting cannot reach a vector that was "
               "never logged, so every estimate of another policy rests on the direct model")
    elif counts.max() <= MAX_BUCKETS and all(s.min(initial=1.0) >= 0.01 for s in shares):
        mode, supports = "A/B buckets", ("A/B read-out of the logged arms", *model_based)
        why = (f"at most {counts.max()} fixed vectors per segment and no density: an A/B test. Each logged arm can "
               "be read out on its own traffic; importance weighting cannot reach a vector that was never "
               "logged, so other policies rest on the direct model")
    else:
        mode = "stochastic, density unknown"
        supports = ("IPS (estimated propensities)", "SNIPS (estimated propensities)",
                    "DR (estimated propensities)", "NCIS (estimated propensities)", *model_based)
        why = ("the weights vary within segments but no density was logged: importance-weighted estimates use "
               "propensities estimated from the logged weights, and say so")
    if random_exposure:
        why += "; labels come from random exposure (meta flag random_exposure), so they are free of exposure bias"
    agreeing, checked = fusion_agreement(log)
    if checked and fusion_reordered(agreeing / checked):
        why += "; " + fusion_note(agreeing / checked)
    return LogProfile(mode, share, per_segment, random_exposure, supports, why, agreeing, checked)


def fusion_note(agreement: float) -> str:
    """What a low fusion agreement means for the estimates, in words."""
    return (f"the logged weights' fusion of the logged scores reproduces the shown ranking in only {agreement:.1%} "
            "of requests (a later stage reorders, or the logged scores are not the ranker's): DM, DR and the "
            "re-ranking metrics value the ranking the fusion would show, not what users saw, so they are not "
            "called trustworthy; IPS, SNIPS and NCIS value the weights as the action of the whole system")
