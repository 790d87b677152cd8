"""Can this estimate be trusted on this log? Overlap diagnostics of importance-weighted estimates.

Per estimate (overall and per segment):
- ess = (sum rho)^2 / sum rho^2 and ess_share = ess / n (Kish's effective sample size);
- max_ratio and p99_ratio of the importance ratios; clipped_share = share of ratios above the clip;
- support_coverage = share of the target policy's actions that land where the logging policy acts often,
  i.e. where its log-density is at least its own 1st percentile within the segment (for a stochastic
  target, averaged over draws).
Verdict (thresholds documented in README and shown in the app):
- `trustworthy`: ess_share >= 0.10, support_coverage >= 0.90 and clipped_share <= 0.01;
- `not supported by this log`: ess_share < 0.01 or support_coverage < 0.50;
- `use with care`: anything in between.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["TRUSTWORTHY", "NOT_SUPPORTED", "verdict", "overlap_diagnostics", "support_coverage",
           "THRESHOLDS"]

THRESHOLDS = {"trustworthy": {"ess_share_min": 0.10, "support_coverage_min": 0.90, "clipped_share_max": 0.01},
              "not_supported": {"ess_share_below": 0.01, "support_coverage_below": 0.50}}
TRUSTWORTHY, CARE, NOT_SUPPORTED = "trustworthy", "use with care", "not supported by this log"


def verdict(ess_share: float, support: float | None, clipped_share: float) -> str:
    t, n = THRESHOLDS["trustworthy"], THRESHOLDS["not_supported"]
    if ess_share < n["ess_share_below"] or (support is not None and support < n["support_coverage_below"]):
        return NOT_SUPPORTED
    if (ess_share >= t["ess_share_min"] and (support is None or support >= t["support_coverage_min"])
            and clipped_share <= t["clipped_share_max"]):
        return TRUSTWORTHY
    return CARE


def overlap_diagnostics(ratio: np.ndarray, clip: float, coverage: np.ndarray | None) -> dict[str, object]:
    """Diagnostics of ratios `[R]` (unclipped) and per-request coverage `[R]` (None when unknown)."""
    n = len(ratio)
    if n == 0:
        return {"ess": 0.0, "ess_share": 0.0, "max_ratio": None, "p99_ratio": None, "clipped_share": None,
                "support_coverage": None, "verdict": NOT_SUPPORTED}
    w = np.minimum(ratio, clip)
    ess = float(w.sum() ** 2 / max((w**2).sum(), 1e-300))
    support = float(coverage.mean()) if coverage is not None else None
    clipped_share = float((ratio > clip).mean())
    return {"ess": ess, "ess_share": ess / n, "max_ratio": float(ratio.max()),
            "p99_ratio": float(np.quantile(ratio, 0.99)), "clipped_share": clipped_share,
            "support_coverage": support, "verdict": verdict(ess / n, support, clipped_share)}


def support_coverage(logging_dist_fn, actions: np.ndarray, segment: np.ndarray, logging_logp: np.ndarray,
                     rows_fn) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Per request, the share of target actions `[G,R,K]` where the logging log-density reaches its segment's
    1st percentile. `logging_dist_fn(rows)` gives the logging distribution of those requests."""
    threshold = np.full(len(segment), -np.inf)
    for s in np.unique(segment):
        m = segment == s
        threshold[m] = np.quantile(logging_logp[m], 0.01)
    covered = np.zeros(len(segment))
    for rows in rows_fn():
        dist = logging_dist_fn(rows)
        a = torch.from_numpy(actions[:, rows]).to(torch.float64).clamp(min=1e-9)
        a = a / a.sum(-1, keepdim=True)
        logp = dist.log_prob(a).numpy()  # (G, rows)
        covered[rows] = (logp >= threshold[rows]).mean(0)
    return covered
