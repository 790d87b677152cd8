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
from mtf_core.diagnostics import NOT_SUPPORTED
from mtf_core.evaluate import EvaluationResult

__all__ = ["CRITERIA", "select", "cvar", "regret", "common_estimator"]

CRITERIA = ("mean", "lower_bound", "cvar")


def cvar(values: np.ndarray, alpha: float = 0.1) -> float:
    """Mean of the lowest ceil(alpha * n) values."""
    if len(values) == 0:
        return float("nan")
    k = max(1, int(np.ceil(alpha * len(values))))
    return float(np.partition(values, k - 1)[:k].mean())


def common_estimator(results: Sequence[EvaluationResult], preferred: str = "dr") -> str:
    """The estimator every result has: `preferred` where all have it, else the direct method (which every
    result has). Selection never mixes estimators across policies."""
    return preferred if all(r.estimate(preferred) is not None for r in results) else "dm"


def select(results: Sequence[EvaluationResult], criterion: str, estimator: str | None = None,
           alpha: float = 0.1) -> dict[str, object]:
    """The ranking under one criterion and the chosen policy, with a sentence saying why (and on what).

    Every policy is scored by the same estimator (`estimator`, or DR where every policy has it, else DM);
    the reason says when the choice rests on an estimate whose verdict is `not supported by this log`."""
    if criterion not in CRITERIA:
        raise LogError(f"unknown selection criterion {criterion!r}; use one of {', '.join(CRITERIA)}")
    estimator = estimator or common_estimator(results)
    ranking = []
    for r in results:
        row = r.estimate(estimator)
        if criterion == "mean":
            score = row["value"] if row else None
        elif criterion == "lower_bound":
            score = row["ci_low"] if row else None
        else:
            score = cvar(r.per_request_value, alpha) if r.per_request_value is not None else None
        ranking.append({"policy": r.policy, "score": None if score is None else float(score),
                        "verdict": row.get("verdict") if row else None})
    ranking.sort(key=lambda x: -np.inf if x["score"] is None else x["score"], reverse=True)
    top = ranking[0] if ranking and ranking[0]["score"] is not None else None
    chosen = top["policy"] if top else None
    name = estimator.upper()
    what = {"mean": f"the highest {name} estimate", "lower_bound": f"the highest lower 95% bound of {name}",
            "cvar": f"the best direct-model value over its worst {alpha:.0%} of requests"}[criterion]
    reason = f"{chosen} has {what}" if chosen else "no policy has a score"
    if estimator == "dm" and criterion != "cvar":
        reason += " (DM for every policy: not every policy has importance-weighted estimates on this log)"
    if top and top["verdict"] == NOT_SUPPORTED:
        reason += (f"; caution: its {name} estimate is rated 'not supported by this log', so this choice rests on "
                   "an estimate the log cannot check")
    return {"criterion": criterion, "estimator": estimator, "chosen": chosen, "ranking": ranking,
            "chosen_verdict": top["verdict"] if top else None, "reason": reason}


def regret(results: Sequence[EvaluationResult], chosen: str | None) -> float | None:
    """Truth of the best policy minus the truth of the chosen one (None without ground truth)."""
    truth = {r.policy: r.ground_truth["value"] for r in results if r.ground_truth}
    if chosen is None or chosen not in truth:
        return None
    return float(max(truth.values()) - truth[chosen])
