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

__all__ = ["ope_frame", "metric_frame", "truth_frame", "lift_over", "lifts_over", "add_lifts", "paired_lifts",
           "headroom_shares", "per_user_truth", "build_report", "decision_headline", "segment_lifts", "policy_labels",
           "GLOSSARY", "ESTIMATOR_LABELS", "estimator_label", "ranking_metric_label"]


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
    both): policy, estimator, difference with its interval, relative lift with its interval, separated, and
    beside it the verdict on the policy's estimate and what that estimate rests on (a lift is no surer than
    the estimate it is a difference of)."""
    base = next((r for r in results if r.policy == baseline), None)
    if base is None:
        return pd.DataFrame()
    rows = []
    for r in results:
        if r is base:
            continue
        overall = {str(o["estimator"]): o for o in r.ope if o["segment"] is None}
        for estimator in r.unit_terms:
            paired = paired_difference(r, base, estimator, n_boot=max(r.n_boot, 200), seed=r.seed)
            if paired is not None:
                row = overall.get(estimator, {})
                rests_on = [str(row[key]) for key in ("propensities", "model") if isinstance(row.get(key), str)]
                rows.append({**paired, "verdict": row.get("verdict") or "", "rests on": "; ".join(rests_on)})
    return pd.DataFrame(rows)


def lifts_over(results: Sequence[EvaluationResult], baseline: str, estimator: str) -> dict[str, dict[str, object]]:
    """Each policy's paired difference of one estimator over `baseline` (by policy; absent where either lacks it),
    in the form `_paired` prints: difference, difference_ci, separated."""
    base = next((r for r in results if r.policy == baseline), None)
    out: dict[str, dict[str, object]] = {}
    for r in results:
        if base is None or r is base:
            continue
        paired = paired_difference(r, base, estimator, n_boot=max(r.n_boot, 200), seed=r.seed)
        if paired is not None:
            out[r.policy] = {"difference": paired["difference"], "difference_ci": [paired["ci_low"], paired["ci_high"]],
                             "separated": paired["separated"], "paired": True}
    return out


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


ESTIMATOR_LABELS = {"truth": "truth (simulator)", "ips": "IPS (importance-weighted)",
                    "snips": "SNIPS (self-normalised IPS)", "ncis": "NCIS (capped IPS)", "dr": "DR (doubly robust)",
                    "dm": "DM (direct model)", "truth_per_user": "truth per user (simulator, evaluated days)"}
_METRIC_NAMES = {"ndcg": "NDCG", "gauc": "GAUC", "mtf_gauc": "MTF-GAUC", "dm_reward": "DM reward"}


def estimator_label(name: str) -> str:
    """An estimator's name for people (the glossary explains each)."""
    return ESTIMATOR_LABELS.get(name, name)


def ranking_metric_label(metric: str) -> str:
    """`ndcg@6:click` -> "NDCG@6, click"; `dm_reward@6:reward` -> "DM reward@6, composite reward"."""
    name, _, task = metric.partition(":")
    base, at, k = name.partition("@")
    shown = _METRIC_NAMES.get(base, base) + (f"@{k}" if at else "")
    return f"{shown}, {'composite reward' if task in ('', 'reward') else task}"


GLOSSARY = {
    "value": "the mean composite reward per request under the current reward, the policy's weights deciding the "
             "ranking of each logged request",
    "truth": "on simulator logs, the policy run in the simulated world on the same users and days: per request, "
             "and per user summed over every request the policy kept the user for (the long-term view)",
    "IPS / SNIPS / NCIS": "importance-weighted estimates: the logged rewards reweighted by how much more (or less) "
                          "likely the policy is to choose the logged weights; SNIPS normalises the weights, NCIS "
                          "also caps them at 10",
    "DR": "doubly robust: the direct model's value corrected by the importance-weighted residuals of the logged "
          "rewards; right if either the model or the propensities are",
    "DM": "direct method: a model of the reward of any ranking, fitted on the logged requests (see the model it "
          "rests on)",
    "95% interval": "users resampled (bootstrap); a paired lift resamples the same users for both policies",
    "trustworthy": "the estimate's checks pass: enough effective requests, the policy's weights covered by the "
                   "log, and (DM) agreement with DR; intervals called trustworthy covered the truth in at least "
                   "90% of 20 simulated worlds",
    "use with care": "some check fails: read the estimate as a rough guide",
    "not supported by this log": "the log holds almost no requests with weights like this policy's: no "
                                 "importance-weighted figure can be trusted, and a model-based one is an "
                                 "extrapolation",
}


def _cell(row: Mapping[str, object] | None, with_verdict: bool = True) -> str:
    if not row or row.get("value") is None:
        return "n/a"
    low, high = row.get("ci_low"), row.get("ci_high")
    text = f"{row['value']:.4f}" + (f" [{low:.4f}, {high:.4f}]" if low is not None and high is not None else "")
    return text + (f" ({row['verdict']})" if with_verdict and row.get("verdict") else "")


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def decision_headline(results: Sequence[EvaluationResult], labels: Mapping[str, str] | None = None) -> str:
    """One paragraph a stakeholder reads first: which policy the evaluation supports shipping, on what, and how
    far to trust it (a choice resting on an unsupported estimate says so, before anything else). `labels`
    gives policies human names (a run's name and algorithm)."""
    from mtf_core.selection import common_estimator, select

    name = (lambda policy: (labels or {}).get(policy, policy))  # noqa: E731
    choice = select(results, "lower_bound")
    chosen = next((r for r in results if r.policy == choice["chosen"]), None)
    if chosen is None:
        return "No policy has an estimate on this log: there is nothing to recommend."
    estimator = common_estimator(results)
    row = chosen.estimate(estimator) or {}
    verdict = row.get("verdict")
    lead = ("No trustworthy recommendation." if verdict == "not supported by this log"
            else "Recommendation:" if verdict == "trustworthy" else "Tentative recommendation:")
    rated = f", {verdict}" if verdict else ""
    text = (f"{lead} {name(chosen.policy)} ({estimator.upper()} {_cell(row, with_verdict=False)}{rated}). "
            f"{choice['reason']}, judging every policy by the same estimator.")
    truth = (chosen.ground_truth or {}).get("value")
    if truth is not None:
        best = max(results, key=lambda r: (r.ground_truth or {}).get("value", float("-inf")))
        text += (f" In the simulator's truth it earns {truth:.4f} per request"
                 + ("" if best is chosen else f"; {name(best.policy)} would earn {best.ground_truth['value']:.4f}")
                 + ".")
    return text


def segment_lifts(results: Sequence[EvaluationResult], estimator: str, labels: Mapping[str, str] | None = None
                  ) -> list[list[object]]:
    """Per segment and policy: the paired difference of an estimator over the first result (the baseline), on
    that segment's users, with its 95% interval (estimators whose per-user terms are the evaluated users')."""
    base = results[0]
    rows: list[list[object]] = []
    segments = sorted({o["segment"] for o in base.ope if o["segment"] is not None})
    for s, name in enumerate(segments):
        for r in results[1:]:
            terms = r.unit_terms.get(estimator)
            if r.unit_segment is None or terms is None or len(terms) != len(r.unit_segment):
                continue  # rows that are not the evaluated users (the truth runs every simulated user)
            users = r.unit_segment == s
            paired = paired_difference(r, base, estimator, n_boot=max(r.n_boot, 200), seed=r.seed, users=users)
            if paired is not None:
                interval = f"{paired['difference']:+.4f} [{paired['ci_low']:+.4f}, {paired['ci_high']:+.4f}]"
                rows.append([name, (labels or {}).get(r.policy, r.policy), interval,
                             "yes" if paired["separated"] else "no"])
    return rows


def policy_labels(run_configs: Mapping[str, object]) -> dict[str, str]:
    """Human names of trained policies: the run's name and algorithm, its reference in brackets."""
    out = {}
    for policy, run in run_configs.items():
        if isinstance(run, Mapping) and run.get("algo"):
            out[policy] = f"{run.get('name') or run['algo']} ({run['algo']}, {policy})"
    return out


def _config_table(run_configs: Mapping[str, object]) -> str:
    """Run settings side by side: one row per setting, one column per policy."""
    flat: dict[str, dict[str, object]] = {}
    for policy, run in run_configs.items():
        entry = dict(run) if isinstance(run, Mapping) else {}
        config = entry.pop("config", {}) or {}
        params = config.get("params", {}) if isinstance(config, Mapping) else {}
        settings = {**entry, **{k: v for k, v in config.items() if k != "params"}, **params}  # type: ignore[union-attr]
        flat[policy] = settings
    names = sorted({k for v in flat.values() for k in v})
    labels = policy_labels(run_configs)
    return _table(["setting", *(labels.get(p, p) for p in flat)], [[n, *(flat[p].get(n, "") for p in flat)]
                                                                    for n in names])


def build_report(title: str, results: Sequence[EvaluationResult], figures: Sequence[tuple[str, go.Figure]],
                 reward_spec: dict[str, object], fingerprint: str, run_configs: dict[str, object]) -> str:
    """A self-contained decision document: the recommendation first, then every policy's estimates with their
    intervals and verdicts, per-segment lifts, the figures (plotly.js inlined once), a glossary, and the
    reward and run settings as tables."""
    from mtf_core.selection import common_estimator

    labels = policy_labels(run_configs)
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p class='headline'>{html.escape(decision_headline(results, labels))}</p>",
             f"<p>Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} on {html.escape(results[0].sample)}. "
             f"Log fingerprint <code>{html.escape(fingerprint)}</code>.</p>"]
    estimators = [e for e in ("truth", "dr", "dm", "snips", "ips", "ncis")
                  if any(r.estimate(e) is not None or (e == "truth" and r.ground_truth) for r in results)]
    rows = []
    for r in results:
        cells = [_cell(r.ground_truth) if e == "truth" else _cell(r.estimate(e)) for e in estimators]
        dr = r.estimate("dr") or r.estimate("dm") or {}
        rests = "; ".join(str(dr[k]) for k in ("propensities", "model") if dr.get(k))
        rows.append([labels.get(r.policy, r.policy), *cells, rests])
    parts.append("<h2>Every policy's value, with 95% intervals and verdicts</h2>"
                 + _table(["policy", *[e.upper() if e != "truth" else "truth" for e in estimators], "rests on"],
                          rows))
    if len(results) > 1:
        estimator = common_estimator(results)
        lifts = segment_lifts(results, estimator, labels)
        if lifts:
            base = labels.get(results[0].policy, results[0].policy)
            parts.append(f"<h2>Lift over {html.escape(base)} by segment ({estimator.upper()}, paired)</h2>"
                         + _table(["segment", "policy", "difference [95% CI]", "interval excludes 0"], lifts))
    for i, (caption, fig) in enumerate(figures):
        parts.append(f"<h2>{html.escape(caption)}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False,
                                 default_height=fig.layout.height or 420))
    notes = sorted({n for r in results for n in r.notes})
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append("<h2>Glossary</h2><dl>" + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>"
                                                   for k, v in GLOSSARY.items()) + "</dl>")
    parts.append("<h2>Reward</h2>" + _table(["field", "value"], [[k, json.dumps(v) if isinstance(v, (dict, list))
                                                                  else v] for k, v in reward_spec.items()]))
    if run_configs:
        parts.append("<h2>Run settings</h2>" + _config_table(run_configs))
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             ".headline{font-size:1.2em;padding:0.8em;border-left:4px solid #1f77b4;background:#f3f7fb}"
             "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:4px 8px}"
             "dt{font-weight:600;margin-top:0.4em}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
