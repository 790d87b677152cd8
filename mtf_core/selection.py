"""Which policy to ship when estimates disagree: rank by the mean, the lower confidence bound or CVaR.

- `mean`: the estimator's point estimate;
- `lower_bound`: the lower end of its 95% interval (prefers a slightly worse but much surer policy);
- `cvar`: the conditional value at risk of the per-request value (mean of the worst `alpha` share of
  requests, alpha = 10%), i.e. how the policy does for the requests it serves worst. The per-request
  value is the direct model's for every policy (DR's per-request terms would mostly measure
  importance-weight noise), so policies are compared on one footing.
On simulator logs, `regret` is the truth of the best policy minus the truth of each criterion's choice.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mtf_core.errors import LogError
from mtf_core.evaluate import EvaluationResult

__all__ = ["CRITERIA", "select", "cvar", "regret"]

CRITERIA = ("mean", "lower_bound", "cvar")


def cvar(values: np.ndarray, alpha: float = 0.1) -> float:
    """Mean of the lowest ceil(alpha * n) values."""
    if len(values) == 0:
        return float("nan")
    k = max(1, int(np.ceil(alpha * len(values))))
    return float(np.partition(values, k - 1)[:k].mean())


def _row(result: EvaluationResult, estimator: str) -> dict[str, object] | None:
    rows = [o for o in result.ope if o["estimator"] == estimator and o["segment"] is None]
    if not rows:
        rows = [o for o in result.ope if o["estimator"] == "dm" and o["segment"] is None]
    return rows[0] if rows else None


def select(results: Sequence[EvaluationResult], criterion: str, estimator: str = "dr",
           alpha: float = 0.1) -> dict[str, object]:
    """The ranking under one criterion and the chosen policy, with a sentence saying why."""
    if criterion not in CRITERIA:
        raise LogError(f"unknown selection criterion {criterion!r}; use one of {', '.join(CRITERIA)}")
    ranking = []
    for r in results:
        row = _row(r, estimator)
        if criterion == "mean":
            score = row["value"] if row else None
        elif criterion == "lower_bound":
            score = row["ci_low"] if row else None
        else:
            score = cvar(r.per_request_value, alpha) if r.per_request_value is not None else None
        ranking.append({"policy": r.policy, "score": None if score is None else float(score)})
    ranking.sort(key=lambda x: -np.inf if x["score"] is None else x["score"], reverse=True)
    chosen = ranking[0]["policy"] if ranking and ranking[0]["score"] is not None else None
    what = {"mean": f"the highest {estimator} estimate", "lower_bound": f"the highest lower 95% bound of {estimator}",
            "cvar": f"the best direct-model value over its worst {alpha:.0%} of requests"}[criterion]
    return {"criterion": criterion, "estimator": estimator, "chosen": chosen, "ranking": ranking,
            "reason": f"{chosen} has {what}" if chosen else "no policy has a score"}


def regret(results: Sequence[EvaluationResult], chosen: str | None) -> float | None:
    """Truth of the best policy minus the truth of the chosen one (None without ground truth)."""
    truth = {r.policy: r.ground_truth["value"] for r in results if r.ground_truth}
    if chosen is None or chosen not in truth:
        return None
    return float(max(truth.values()) - truth[chosen])
