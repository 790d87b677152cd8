"""Can this estimate be trusted on this log? Overlap diagnostics and a verdict per estimator.

Per estimate (overall and per segment), from the unclipped importance ratios rho `[R]`:
- `ess` = (sum rho)^2 / sum rho^2 and `ess_share` = ess / n (Kish's effective sample size);
- `mean_ratio` = sum rho / n: 1 in expectation; far from 1, the log is unbalanced for this target;
- `max_ratio`, `p99_ratio`;
- `clipped_mass_share`: the share of the ratio mass that NCIS's cap removes, (sum rho - sum min(rho, cap))
  / sum rho. A cap moves that share of the target's probability out of the estimate, so it is judged by
  mass, not by how many requests it touches;
- `support_coverage`: the share of the target's own probability mass (draws from the target, or from its
  kernel for a deterministic target) where the ratio target/logging stays below 1% of the sample size,
  i.e. where no single logged request would carry more than 1% of the estimate. A density-based coverage
  would call a target covered wherever the logging density diverges (Dirichlet faces with alpha < 1).

Verdicts, per estimator (thresholds in THRESHOLDS, shown in the app and the README):
- `not supported by this log`: ess < 30 effective requests, ess_share < 1% or support_coverage < 50%;
- IPS, SNIPS, DR `trustworthy`: ess >= 300 effective requests, support_coverage >= 90%, mean_ratio within
  10% of 1, and for a kernel-smoothed target a smoothing bias within a quarter of the standard error. The
  ratios' mean is 1 in expectation whenever the logged densities describe the logged weights and the
  target stays where the logging policy goes; far from 1, one of the two fails. SNIPS divides the
  imbalance away only where the densities are off by a constant factor, so it is not exempt: a log whose
  logging_logp did not match its weights (a constant 0 beside Dirichlet(2) weights, mean ratio 50) had
  SNIPS called trustworthy 25% away from DR. Over 20 simulator seeds with logged densities no interval
  called trustworthy had a mean ratio more than 10% from 1; with estimated propensities the rule took back
  one seed's SNIPS, DR and DM calls at the centre of the simplex (which had covered). What a bootstrap
  interval needs is an absolute effective sample size, not a share: over 20 simulator seeds, an ESS of ~950
  (8% of the log) covered the truth 95-100% of the time, which an ESS-share rule of 10% had called "use
  with care";
- NCIS `trustworthy`: as SNIPS, and the cap removes at most 1% of the ratio mass;
- DM `trustworthy` only when it is checked by data: DR is trustworthy and DM lies inside DR's interval.
  Otherwise a model-based figure is `use with care`, or `not supported` where the target leaves the log;
- DM and DR at most `use with care` where how deep users scroll measurably responds to the target
  (`depth_shift`, `evaluate.depth`: an interval that excludes zero and a shift over 1% of mean depth): both
  take each request's depth as given;
- anything else: `use with care`.
The calibration test in tests/test_calibration.py holds these verdicts to their word: over many simulator
seeds, an interval called trustworthy covers the truth at least 90% of the time.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

__all__ = ["TRUSTWORTHY", "CARE", "NOT_SUPPORTED", "THRESHOLDS", "RATIO_SUMS", "overlap_diagnostics",
           "ratio_sums", "add_ratio_sums", "diagnostics_from_sums", "estimator_verdicts",
           "draw_ratio_limit", "depth_shift_text", "overlap_summary", "verdicts_text", "thresholds_text"]

TRUSTWORTHY, CARE, NOT_SUPPORTED = "trustworthy", "use with care", "not supported by this log"
THRESHOLDS = {
    "trustworthy": {"ess_min": 300.0, "support_coverage_min": 0.90, "clipped_mass_share_max": 0.01,
                    "mean_ratio_tolerance": 0.10, "smoothing_bias_to_se_max": 0.25, "depth_shift_max": 0.01},
    "not_supported": {"ess_below": 30.0, "ess_share_below": 0.01, "support_coverage_below": 0.50},
    "coverage_ratio_share_of_n": 0.01,
}


def draw_ratio_limit(n: int) -> float:
    """The ratio above which one logged request would carry more than 1% of an estimate over n requests."""
    return max(THRESHOLDS["coverage_ratio_share_of_n"] * n, 1.0)  # type: ignore[operator]


RATIO_SUMS = ("n", "sum", "sum_sq", "sum_capped", "max")
"""The columns of `ratio_sums`: what the diagnostics rest on, added up (the max taken) over parts of a log."""


def ratio_sums(ratio: np.ndarray, cap: float) -> np.ndarray:
    """`[5]` (RATIO_SUMS) of ratios `[R]` (unclipped): a shard's part of the diagnostics."""
    if not len(ratio):
        return np.zeros(len(RATIO_SUMS))
    return np.array([len(ratio), ratio.sum(), (ratio**2).sum(), np.minimum(ratio, cap).sum(), ratio.max()],
                    dtype=np.float64)


def add_ratio_sums(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Two parts' `ratio_sums` as one (sums added, the max of the maxima)."""
    return np.r_[a[:4] + b[:4], max(a[4], b[4])]


def diagnostics_from_sums(sums: np.ndarray, p99_ratio: float | None = None,
                          support_coverage: float | None = None) -> dict[str, object]:
    """The diagnostics of the module docstring from `ratio_sums`; the quantile and the coverage need the
    ratios themselves (or draws from the target) and come from the caller where it has them."""
    n, total, total_sq, capped, largest = (float(v) for v in sums)
    if n == 0:
        return {"n": 0, "ess": 0.0, "ess_share": 0.0, "mean_ratio": None, "max_ratio": None, "p99_ratio": None,
                "clipped_mass_share": None, "support_coverage": None}
    ess = total**2 / max(total_sq, 1e-300)
    clipped = (total - capped) / total if total > 0 else 1.0
    return {"n": int(n), "ess": ess, "ess_share": ess / n, "mean_ratio": total / n, "max_ratio": largest,
            "p99_ratio": p99_ratio, "clipped_mass_share": clipped, "support_coverage": support_coverage}


def overlap_diagnostics(ratio: np.ndarray, cap: float, draw_ratio: np.ndarray | None) -> dict[str, object]:
    """Diagnostics of ratios `[R]` (unclipped); draw_ratio `[G,R]`: target/logging density ratios of draws
    from the target (None when unknown)."""
    n = len(ratio)
    if n == 0:
        return diagnostics_from_sums(ratio_sums(ratio, cap))
    coverage = None if draw_ratio is None else float((draw_ratio <= draw_ratio_limit(n)).mean())
    return diagnostics_from_sums(ratio_sums(ratio, cap), float(np.quantile(ratio, 0.99)), coverage)


def estimator_verdicts(diag: Mapping[str, object], smoothing_bias_to_se: float | None,
                       dm_inside_dr: bool | None, coverage_required: bool = False,
                       depth_moves: bool = False) -> dict[str, str]:
    """A verdict per estimator from one scope's diagnostics (see the module docstring). With
    `coverage_required`, no estimate is trustworthy without a measured support coverage (a streamed
    evaluation, which has the ratios' sums but no draws from the target to measure it with). With
    `depth_moves` (`evaluate.depth.DepthShift.moves`), DM and DR, which take each request's depth as given,
    are at most "use with care"."""
    t, low = THRESHOLDS["trustworthy"], THRESHOLDS["not_supported"]
    ess, ess_share = float(diag["ess"]), float(diag["ess_share"])  # type: ignore[arg-type]
    coverage = diag.get("support_coverage")
    if (ess < low["ess_below"] or ess_share < low["ess_share_below"]
            or (coverage is not None and coverage < low["support_coverage_below"])):  # type: ignore[operator]
        return dict.fromkeys(("ips", "snips", "dr", "ncis", "dm"), NOT_SUPPORTED)
    coverage_ok = coverage >= t["support_coverage_min"] if coverage is not None else not coverage_required  # type: ignore[operator]
    overlap_ok = (ess >= t["ess_min"] and coverage_ok
                  and (smoothing_bias_to_se is None or smoothing_bias_to_se <= t["smoothing_bias_to_se_max"]))
    mean_ratio = diag.get("mean_ratio")
    balanced = mean_ratio is not None and abs(float(mean_ratio) - 1.0) <= t["mean_ratio_tolerance"]  # type: ignore[arg-type]
    clipped = diag.get("clipped_mass_share")
    cap_ok = clipped is not None and float(clipped) <= t["clipped_mass_share_max"]  # type: ignore[arg-type]
    ratios_ok = overlap_ok and balanced
    verdicts = {"ips": TRUSTWORTHY if ratios_ok else CARE,
                "snips": TRUSTWORTHY if ratios_ok else CARE,
                "dr": TRUSTWORTHY if ratios_ok and not depth_moves else CARE,
                "ncis": TRUSTWORTHY if ratios_ok and cap_ok else CARE}
    verdicts["dm"] = TRUSTWORTHY if verdicts["dr"] == TRUSTWORTHY and dm_inside_dr else CARE
    return verdicts


def verdicts_text(verdicts: Mapping[str, object]) -> str:
    """"IPS trustworthy, SNIPS use with care, ...": the verdicts of one scope, for people."""
    return ", ".join(f"{k.upper()} {v}" for k, v in verdicts.items())


def depth_shift_text(shift: Mapping[str, float] | None) -> str:
    """"+4.1% [+1.2%, +7.0%]": how much deeper users would see under the policy (`evaluate.depth`), for people;
    "n/a" where every request is as deep or the logged weights leave nothing to measure it with."""
    if not shift:
        return "n/a"
    return f"{shift['shift']:+.1%} [{shift['low']:+.1%}, {shift['high']:+.1%}]"


def overlap_summary(diag: Mapping[str, object]) -> str:
    """One line: the verdict per estimator and the figures behind it."""
    verdicts = diag.get("verdicts") or {}
    coverage = diag.get("support_coverage")
    depth = diag.get("depth_shift")
    return (verdicts_text(verdicts)  # type: ignore[arg-type]
            + f" (ESS {float(diag['ess']):.0f} = {float(diag['ess_share']):.1%} of requests, "  # type: ignore[arg-type]
            f"mean ratio {float(diag['mean_ratio']):.3f}, max {float(diag['max_ratio']):.3g}, "  # type: ignore[arg-type]
            f"support coverage {'n/a' if coverage is None else f'{float(coverage):.1%}'}, "  # type: ignore[arg-type]
            f"NCIS cap removes {float(diag['clipped_mass_share']):.1%} of the ratio mass"  # type: ignore[arg-type]
            + (f", depth seen under the policy {depth_shift_text(depth)}" if depth else "")  # type: ignore[arg-type]
            + ")")


def thresholds_text() -> str:
    """The verdict rules in words, for captions and reports."""
    t, n = THRESHOLDS["trustworthy"], THRESHOLDS["not_supported"]
    return (f"Trustworthy (IPS, SNIPS, DR): at least {t['ess_min']:.0f} effective requests, support coverage >= "
            f"{t['support_coverage_min']:.0%}, the mean ratio within {t['mean_ratio_tolerance']:.0%} of 1 (else "
            "the logged densities do not describe the logged weights, or the policy goes where the log does not) "
            f"and, for a fixed weight vector, a kernel smoothing bias within {t['smoothing_bias_to_se_max']:.0%} "
            f"of the standard error; NCIS also a cap that removes at most {t['clipped_mass_share_max']:.0%} "
            f"of the ratio mass; DM only where DR is trustworthy and agrees with it; DM and DR neither where how "
            f"deep users scroll measurably responds to the policy (a change of mean depth over "
            f"{t['depth_shift_max']:.0%} whose 95% interval excludes zero), since both take each request's depth "
            "as given. Not supported: fewer than "
            f"{n['ess_below']:.0f} effective requests, an ESS share below {n['ess_share_below']:.0%} or support "
            f"coverage below {n['support_coverage_below']:.0%}. Support coverage is "
            "the share of the policy's own probability mass where no single logged request would carry more than 1% "
            "of the estimate.")
