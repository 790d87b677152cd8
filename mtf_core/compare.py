"""Side-by-side views of several evaluations: long tables for forest plots, lifts, and the HTML report."""

from __future__ import annotations

import html
import json
from datetime import datetime, timezone
from typing import Mapping, Sequence

import pandas as pd
import plotly.graph_objects as go

from mtf_core.evaluate import EvaluationResult
from mtf_core.evaluate.paired import paired_difference

__all__ = ["ope_frame", "metric_frame", "truth_frame", "lift_over", "add_lifts", "paired_lifts",
           "headroom_shares", "per_user_truth", "build_report"]


def ope_frame(results: Sequence[EvaluationResult]) -> pd.DataFrame:
    """policy, estimator, segment, value, ci_low, ci_high, ess; the truth as estimator 'truth'."""
    rows = [{"policy": r.policy, **o} for r in results for o in r.ope]
    for r in results:
        if r.ground_truth:
            rows.append({"policy": r.policy, "estimator": "truth", "segment": None,
                         **{k: r.ground_truth[k] for k in ("value", "ci_low", "ci_high")}})
            for s in r.ground_truth.get("segments", []):  # type: ignore[union-attr]
                rows.append({"policy": r.policy, "estimator": "truth", **s})
    return pd.DataFrame(rows)


def metric_frame(results: Sequence[EvaluationResult]) -> pd.DataFrame:
    """policy, metric (name:task), segment, value, ci_low, ci_high."""
    rows = [{"policy": r.policy, "metric": f"{m['name']}:{m['task'] or 'reward'}", **m} for r in results
            for m in r.metrics]
    return pd.DataFrame(rows)


def truth_frame(results: Sequence[EvaluationResult]) -> pd.DataFrame:
    frame = ope_frame(results)
    return frame[frame["estimator"] == "truth"] if len(frame) else frame


def lift_over(figure: Mapping[str, object], reference: Mapping[str, object]) -> dict[str, object] | None:
    """Relative lift of a figure (value, ci_low, ci_high) over a reference one, and whether the 95%
    intervals separate; None where either value is missing or the reference is zero."""
    value, ref = figure.get("value"), reference.get("value")
    if value is None or not ref:
        return None
    low, high, ref_low, ref_high = (figure.get("ci_low"), figure.get("ci_high"), reference.get("ci_low"),
                                    reference.get("ci_high"))
    separated = None not in (low, high, ref_low, ref_high) and (low > ref_high or high < ref_low)  # type: ignore[operator]
    return {"lift": value / ref - 1.0, "separated": bool(separated)}  # type: ignore[operator]


def paired_lifts(results: Sequence[EvaluationResult], baseline: str) -> pd.DataFrame:
    """Paired lift of every policy over `baseline` for each estimate and the truth (same users resampled for
    both): policy, estimator, difference with its interval, relative lift with its interval, separated."""
    base = next((r for r in results if r.policy == baseline), None)
    if base is None:
        return pd.DataFrame()
    rows = []
    for r in results:
        if r is base:
            continue
        for estimator in r.unit_terms:
            paired = paired_difference(r, base, estimator, n_boot=max(r.n_boot, 200), seed=r.seed)
            if paired is not None:
                rows.append(paired)
    return pd.DataFrame(rows)


def add_lifts(table: list[dict[str, object]], results: Sequence[EvaluationResult]) -> None:
    """Add each figure's lift over the first policy: paired for estimates and the truth, else whether the
    separate intervals separate (re-ranking metrics)."""
    base, base_figures = results[0], table[0]["figures"]
    for row, result in zip(table, results):
        for name, fig in row["figures"].items():  # type: ignore[union-attr]
            paired = paired_difference(result, base, name, n_boot=max(result.n_boot, 200), seed=result.seed) \
                if result is not base else None
            if paired is not None:
                fig.update({"lift": paired["lift"], "lift_ci": [paired["lift_low"], paired["lift_high"]],
                            "difference": paired["difference"], "difference_ci": [paired["ci_low"], paired["ci_high"]],
                            "separated": paired["separated"], "paired": True})
            elif name in base_figures:  # type: ignore[operator]
                fig.update(lift_over(fig, base_figures[name]) or {})  # type: ignore[index]


def headroom_shares(results: Sequence[EvaluationResult], oracle: str, logging: str = "logging"
                    ) -> dict[str, float | None]:
    """Per policy, the share of the oracle's headroom it captures, by the long-term truth (per user over the
    evaluated days, the oracle's own objective) on the same users: (truth - logging) / (oracle - logging).
    None without truths, or when the oracle does not beat logging (then there is no headroom to share)."""
    truth = {r.policy: per_user_truth(r) for r in results}
    base, best = truth.get(logging), truth.get(oracle)
    if base is None or best is None or best <= base:  # type: ignore[operator]
        return {r.policy: None for r in results}
    return {p: None if v is None else (v - base) / (best - base) for p, v in truth.items()}  # type: ignore[operator]


def per_user_truth(result: EvaluationResult) -> float | None:
    """The simulator's truth per user over the evaluated days (the long-term view), where there is one."""
    return ((result.ground_truth or {}).get("per_user") or {}).get("value")  # type: ignore[union-attr]


def build_report(title: str, results: Sequence[EvaluationResult], figures: Sequence[tuple[str, go.Figure]],
                 reward_spec: dict[str, object], fingerprint: str, run_configs: dict[str, object]) -> str:
    """A self-contained HTML page: plotly.js inlined once, every figure embedded, tables and configs."""
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p>Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}. Log fingerprint "
             f"<code>{html.escape(fingerprint)}</code>; policies: "
             f"{', '.join(html.escape(r.policy) for r in results)}.</p>"]
    summary = ope_frame(results)
    if not summary.empty:
        overall = summary[summary["segment"].isna()].pivot_table(index="estimator", columns="policy", values="value")
        parts.append("<h2>Policy value (mean composite reward per request)</h2>" + overall.round(4).to_html())
    for i, (caption, fig) in enumerate(figures):
        parts.append(f"<h2>{html.escape(caption)}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False,
                                 default_height=fig.layout.height or 420))
    parts.append("<h2>Reward specification</h2><pre>" + html.escape(json.dumps(reward_spec, indent=2)) + "</pre>")
    parts.append("<h2>Run configurations</h2><pre>" + html.escape(json.dumps(run_configs, indent=2, default=str))
                 + "</pre>")
    notes = sorted({n for r in results for n in r.notes})
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
