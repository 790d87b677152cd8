"""The straightforward pandas implementation of the evaluate workload, kept as the benchmark's reference.

NDCG@k per task on the shown candidates re-ranked by the fused score, and the direct-method signals of the
top L of all candidates: long frames, sort_values, groupby-cumcount ranks, groupby sums.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def pandas_rerank(scores: np.ndarray, labels: np.ndarray, shown: np.ndarray, weights: np.ndarray, k: int,
                  curve: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean NDCG@k per task, mean expected signals per task) for arrays `[R,N,K]`, `[R,N]`, weights `[R,K]`."""
    r, n, n_tasks = scores.shape
    frame = pd.DataFrame({"request": np.repeat(np.arange(r), n), "fused": (scores * weights[:, None, :]).sum(-1).ravel(),
                          "shown": shown.ravel()})
    for j in range(n_tasks):
        frame[f"s{j}"] = scores[..., j].ravel()
        frame[f"y{j}"] = labels[..., j].ravel()
    ranked = frame.sort_values(["request", "fused"], ascending=[True, False])
    ranked["rank_all"] = ranked.groupby("request").cumcount()
    top = ranked[ranked["rank_all"] < len(curve)]
    exam = curve[top["rank_all"].to_numpy()]
    expected = np.stack([(top[f"s{j}"] * exam).groupby(top["request"]).sum().mean() for j in range(n_tasks)])
    shown_rows = ranked[ranked["shown"]].copy()
    shown_rows["rank"] = shown_rows.groupby("request").cumcount()
    discount = 1.0 / np.log2(shown_rows["rank"].to_numpy() + 2.0)
    ndcg = []
    for j in range(n_tasks):
        gain = shown_rows[f"y{j}"].to_numpy()
        dcg = pd.Series(np.where(shown_rows["rank"] < k, gain * discount, 0.0)).groupby(
            shown_rows["request"].to_numpy()).sum()
        ideal_rows = shown_rows.sort_values(["request", f"y{j}"], ascending=[True, False])
        ideal_rank = ideal_rows.groupby("request").cumcount().to_numpy()
        ideal = pd.Series(np.where(ideal_rank < k, ideal_rows[f"y{j}"].to_numpy() / np.log2(ideal_rank + 2.0), 0.0)
                          ).groupby(ideal_rows["request"].to_numpy()).sum()
        valid = ideal > 0
        ndcg.append(float((dcg[valid] / ideal[valid]).mean()))
    return np.asarray(ndcg), expected
