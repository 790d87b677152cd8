"""Summary tables of a log for the Data page: feedback per segment and position, sessions, scores."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mtf_core.schema import quote_ident, read_tasks
from mtf_core.store import open_log

__all__ = ["LogOverview", "log_overview", "score_scales", "scale_warning", "SCALE_RATIO"]

_SCORE_SAMPLE = 20_000
SCALE_RATIO = 10.0
"""Task score scales (mean absolute score) further apart than this make a sum fusion rank by the largest."""


@dataclass(frozen=True)
class LogOverview:
    """Long-format frames ready for the plot builders."""

    feedback_by_segment_position: pd.DataFrame  # segment, position, task, rate
    session_lengths: pd.DataFrame  # segment, n_requests, n_sessions
    score_sample: pd.DataFrame  # task, score (a uniform sample of candidates)
    label_correlation: pd.DataFrame  # task x task Pearson correlation of labels on shown items
    segment_sizes: pd.DataFrame  # segment, n_users, n_requests


def log_overview(path: str | os.PathLike[str], seed: int = 0) -> LogOverview:
    """Aggregate a log with DuckDB (one pass per figure; nothing loops over rows in Python)."""
    con = open_log(path)
    try:
        tasks = [t.name for t in read_tasks(con)]
        y = [quote_ident("y_" + t) for t in tasks]
        rates = ", ".join(f"avg({c}) AS {quote_ident(t)}" for c, t in zip(y, tasks))
        fb = con.execute(
            f"SELECT u.segment, i.position, {rates} FROM impressions i JOIN requests r ON i.request_id = r.request_id "
            f"JOIN users u ON u.user_id = r.user_id WHERE i.position IS NOT NULL GROUP BY ALL ORDER BY ALL"
        ).df()
        feedback = fb.melt(id_vars=["segment", "position"], var_name="task", value_name="rate")
        lengths = con.execute(
            "SELECT u.segment, s.n_requests, count(*) AS n_sessions FROM sessions s JOIN users u "
            "ON u.user_id = s.user_id GROUP BY ALL ORDER BY ALL"
        ).df()
        s_cols = ", ".join(f"{quote_ident('s_' + t)} AS {quote_ident(t)}" for t in tasks)
        scores = con.execute(
            f"SELECT {s_cols} FROM impressions USING SAMPLE reservoir({_SCORE_SAMPLE} ROWS) REPEATABLE ({int(seed)})"
        ).df().melt(var_name="task", value_name="score")
        # Exact Pearson correlations over every shown item, as DuckDB aggregates (one pass, no sample).
        pairs = con.execute(
            "SELECT " + ", ".join(f"corr({a}::DOUBLE, {b}::DOUBLE)" for a in y for b in y)
            + " FROM impressions WHERE position IS NOT NULL"
        ).fetchone()
        k = len(tasks)
        correlation = pd.DataFrame(np.array([np.nan if v is None else v for v in pairs], dtype=float).reshape(k, k),
                                   index=tasks, columns=tasks)
        sizes = con.execute(
            "SELECT u.segment, count(DISTINCT u.user_id) AS n_users, count(r.request_id) AS n_requests "
            "FROM users u LEFT JOIN requests r ON r.user_id = u.user_id GROUP BY ALL ORDER BY ALL"
        ).df()
    finally:
        con.close()
    return LogOverview(feedback, lengths, scores, correlation, sizes)


def score_scales(path: str | os.PathLike[str]) -> dict[str, float]:
    """Mean absolute MTL score per task over every candidate (one DuckDB pass)."""
    con = open_log(path)
    try:
        tasks = [t.name for t in read_tasks(con)]
        row = con.execute("SELECT " + ", ".join(f"avg(abs({quote_ident('s_' + t)}::DOUBLE))" for t in tasks)
                          + " FROM impressions").fetchone() or ()
    finally:
        con.close()
    return {t: float(v) for t, v in zip(tasks, row) if v is not None}


def scale_warning(scales: dict[str, float]) -> str | None:
    """A warning when the tasks' score scales differ by more than SCALE_RATIO: a weighted sum of the scores
    then ranks by the largest task whatever its weight (play time in seconds beside click probabilities)."""
    positive = {t: v for t, v in scales.items() if v > 0}
    if len(positive) < 2:
        return None
    big, small = max(positive, key=positive.get), min(positive, key=positive.get)  # type: ignore[arg-type]
    ratio = positive[big] / positive[small]
    if ratio <= SCALE_RATIO:
        return None
    return (f"task scores differ in scale by {ratio:,.0f}x ({big}: mean {positive[big]:.3g}; {small}: mean "
            f"{positive[small]:.3g}): a sum fusion with equal weights ranks by {big} alone. Weights must offset "
            "the scales, or put the tasks on one scale (import-kuairand --task-scale standardised) or use the "
            "product fusion, which no scale changes")
