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
requests whose shown ranking the logged weights' fusion of the logged scores reproduces. In a feed where a
later stage (diversity, business rules, a re-ranker) reorders what the fusion ranked, or where the logged
scores are not those the ranker used, it falls. The direct model values every action, the logged one
included (`action_positions`), by the ranking its fusion produces: like IPS, SNIPS and NCIS, DM and DR then
treat the weights as the action of the whole system, later stages included. (They once valued the logged
action by the ranking users saw instead, and under a later stage that reordered half the slates DM and DR
drifted +0.34 to +0.55 above the truth over 20 simulator seeds; valued by its fusion, DM lies within 0.13 of
it and DR within 0.03 on the targets the log supports.) The re-ranking metrics still describe the fused
ranking, which is not what users saw.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from mtf_core.store import LogData, iter_chunks

__all__ = ["LogProfile", "profile_log", "logged_action", "fusion_agreement", "fusion_agreeing_rows", "action_positions",
           "fusion_note", "fusion_reordered", "depth_text", "REORDERED_BELOW", "MODES", "MAX_BUCKETS"]

MODES = ("known density", "mixed", "stochastic, density unknown", "deterministic", "A/B buckets",
         "no fusion weights logged")
MAX_BUCKETS = 10
"""At most this many distinct vectors per segment, each carrying at least 1% of the segment's requests, read
as an A/B test; more varied weights without a density are read as a stochastic policy of unknown density."""
REORDERED_BELOW = 0.99
"""A fusion agreement below this share is reported (`fusion_note`): the re-ranking metrics then describe a
ranking that a later stage changed before users saw it."""


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
    shown_mean: float = 0.0  # candidates shown per request: how deep rankings are valued (`rerank.slate_depth`)
    shown_min: int = 0
    shown_max: int = 0

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


def _logged_fusion(log: LogData, rows: slice | np.ndarray) -> np.ndarray:
    """The logged weights' sum fusion of the logged scores `[r,N]` (per-item weights where logged), NaN on
    padding; float32, the scores' own precision, well inside the agreement's tolerance."""
    scores = log.scores[rows]
    if log.item_weights is None:
        fused = np.matmul(scores, log.weights[rows].astype(np.float32)[..., None])[..., 0]
    else:
        fused = np.einsum("rnk,rnk->rn", scores, log.item_weights[rows].astype(np.float32))
    return np.where(log.mask[rows], fused, np.nan)


def fusion_agreeing_rows(log: LogData, chunk: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """Per request `[R]`: whether the logged weights' sum fusion of the logged scores reproduces its shown
    ranking (its shown candidates' fused scores fall in the order of their positions and reach every unshown
    candidate's, ties allowed), and whether it was checked (it logged weights and showed a candidate)."""
    agree, known = np.zeros(log.n_requests, dtype=bool), np.zeros(log.n_requests, dtype=bool)
    for rows in iter_chunks(log.n_requests, chunk):
        fused = _logged_fusion(log, rows)
        positions, mask = log.positions[rows], log.mask[rows]
        shown = (positions >= 0) & mask
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
        known[rows] = np.isfinite(log.weights[rows]).all(1) & shown.any(1)  # per-item weights fall back to these
        agree[rows] = known[rows] & in_order & reached
    return agree, known


def fusion_agreement(log: LogData, rows: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[int, int]:
    """(requests whose shown ranking the logged weights' fusion reproduces, requests checked):
    `fusion_agreeing_rows` (or `rows`, what it returned) counted."""
    agree, known = rows if rows is not None else fusion_agreeing_rows(log)
    return int(agree.sum()), int(known.sum())


def action_positions(log: LogData, rows: tuple[np.ndarray, np.ndarray], chunk: int = 100_000) -> np.ndarray:
    """The positions `[R,N]` of the ranking each request's logged action produces, down to as many candidates
    as it showed: what the direct model values as the logged action, with the function it values any
    target's by (`rerank.top_signals` at `rerank.slate_depth`). Where the logged weights' fusion reproduces
    the shown ranking, or no weights were logged, that is the shown ranking (`log.positions`, as it is).
    Where a later stage reordered what the fusion ranked, it is the fusion's: valuing there the ranking users
    saw made DR's correction compare two different functions of the action, which left DR equal to DM.
    `rows`: what `fusion_agreeing_rows` returned."""
    agree, known = rows
    reordered = np.flatnonzero(known & ~agree)
    if not len(reordered):
        return log.positions
    positions = log.positions.copy()
    for part in iter_chunks(len(reordered), chunk):
        rows = reordered[part]
        fused = np.nan_to_num(_logged_fusion(log, rows), nan=-np.inf)
        rank = np.empty(fused.shape, dtype=positions.dtype)
        np.put_along_axis(rank, np.argsort(-fused, axis=1, kind="stable"),
                          np.arange(fused.shape[1], dtype=positions.dtype)[None], axis=1)
        depth = (log.positions[rows] >= 0).sum(1, keepdims=True)
        positions[rows] = np.where(log.mask[rows] & (rank < depth), rank, -1)
    return positions


def logged_action(log: LogData) -> tuple["LogProfile", np.ndarray]:
    """The log's profile and the positions of the ranking each request's logged action produces
    (`action_positions`), from one pass of the fusion agreement: what every evaluation context starts from."""
    fusion_rows = fusion_agreeing_rows(log)
    return profile_log(log, fusion_rows), action_positions(log, fusion_rows)


def profile_log(log: LogData, fusion_rows: tuple[np.ndarray, np.ndarray] | None = None) -> LogProfile:
    """Classify how `log`'s weights were logged (module docstring), and how many candidates its requests
    showed. `fusion_rows`: `fusion_agreeing_rows(log)` where the caller has it already."""
    depth = log.shown.sum(1)
    shown = (float(depth.mean()), int(depth.min()), int(depth.max())) if log.n_requests else (0.0, 0, 0)
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
        return LogProfile("no fusion weights logged", share, {}, random_exposure, model_based, why, 0, 0, *shown)
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
    agreeing, checked = fusion_agreement(log, fusion_rows)
    if checked and fusion_reordered(agreeing / checked):
        why += "; " + fusion_note(agreeing / checked)
    return LogProfile(mode, share, per_segment, random_exposure, supports, why, agreeing, checked, *shown)


def fusion_reordered(agreement: float | None) -> bool:
    """Whether so few of a log's shown rankings follow from its logged fusion that `fusion_note` applies."""
    return agreement is not None and agreement < REORDERED_BELOW


def depth_text(shown_mean: float, shown_min: int, shown_max: int) -> str:
    """How many candidates requests show and what the figures make of it, in words."""
    text = f"candidates shown per request: {shown_mean:.2f} on average ({shown_min} to {shown_max})"
    if shown_min == shown_max:
        return text
    return (text + "; every ranking is valued down to its own request's depth, taken as given whatever the ranking "
            "(evaluate checks, where the weights were explored, whether a policy would move it)")


def fusion_note(agreement: float) -> str:
    """What a low fusion agreement means for the figures, in words."""
    return (f"the logged weights' fusion of the logged scores reproduces the shown ranking in only {agreement:.1%} "
            "of requests (a later stage reorders, or the logged scores are not the ranker's): DM and DR value "
            "every action, the logged one included, by the ranking its fusion produces, so like IPS, SNIPS and "
            "NCIS they treat the weights as the action of the whole system, later stages included; the "
            "re-ranking metrics describe the fused ranking, not what users saw")
