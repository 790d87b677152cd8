"""Plotly figure builders: data in, `go.Figure` out. One colour per task, per policy and per segment across
the app, and segments in one order (by name, as every log lists them) on every page."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

__all__ = [
    "task_colour",
    "policy_colour",
    "segment_colour",
    "feedback_by_position",
    "session_length_histogram",
    "score_distributions",
    "correlation_heatmap",
    "segment_sizes",
    "forest_plot",
    "reward_distribution",
    "reward_shares",
    "training_curves",
    "segment_mean_weights",
    "beta_marginals",
    "ternary_density",
    "weights_vs_feature",
    "ratio_histogram",
    "validation_curve",
]

_TASK_PALETTE = px.colors.qualitative.Set2
_POLICY_PALETTE = px.colors.qualitative.D3
_SEGMENT_PALETTE = px.colors.qualitative.Safe
_TEMPLATE = "plotly_white"


def task_colour(task: str, tasks: Sequence[str]) -> str:
    """The same colour for a task on every page (its index in the log's task order)."""
    return _TASK_PALETTE[list(tasks).index(task) % len(_TASK_PALETTE)] if task in tasks else "#888888"


def policy_colour(index: int) -> str:
    return _POLICY_PALETTE[index % len(_POLICY_PALETTE)]


def segment_colour(segment: str, segments: Sequence[str]) -> str:
    """The same colour for a segment on every page (its index among the segment names in order)."""
    order = sorted(segments)
    return _SEGMENT_PALETTE[order.index(segment) % len(_SEGMENT_PALETTE)] if segment in order else "#888888"


def _segments(df: pd.DataFrame, segments: Sequence[str] | None = None) -> dict[str, object]:
    """Plotly Express arguments that put segments in name order with their colours: of the log's `segments`
    where given (a figure missing a segment keeps the others' colours), else of the frame's."""
    present = [str(s) for s in df["segment"].unique()] if "segment" in df and len(df) else []
    order = sorted(set(segments or ()) | set(present))
    return {"category_orders": {"segment": order},
            "color_discrete_map": {s: segment_colour(s, order) for s in order}}


_AXIS_TITLE_PX = 55  # tick labels and the x axis's title, below the plot area


def _layout(fig: go.Figure, title: str, height: int = 380) -> go.Figure:
    # The legend goes below the x axis's title; plotly places it in fractions of the plot area, so the offset
    # is converted from pixels (a fixed fraction put it over the axis title on short figures).
    top, bottom = 60, 100
    below_axis = -_AXIS_TITLE_PX / max(height - top - bottom, 1)
    fig.update_layout(title=title, template=_TEMPLATE, height=height, margin=dict(l=40, r=20, t=top, b=bottom),
                      legend=dict(orientation="h", yanchor="top", y=below_axis, x=0))
    return fig


def feedback_by_position(df: pd.DataFrame, tasks: Sequence[str], segments: Sequence[str] | None = None) -> go.Figure:
    """Feedback rate per shown position, one panel per segment, one line per task."""
    fig = px.line(df, x="position", y="rate", color="task", facet_col="segment", markers=True,
                  color_discrete_map={t: task_colour(t, tasks) for t in tasks},
                  category_orders=_segments(df, segments)["category_orders"])
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=")[-1]))
    fig.update_xaxes(title="position shown (0 = top)")
    fig.update_yaxes(title="mean label", col=1)
    return _layout(fig, "How often users respond, by position shown and segment", 360)


def session_length_histogram(df: pd.DataFrame, segments: Sequence[str] | None = None) -> go.Figure:
    fig = px.bar(df, x="n_requests", y="n_sessions", color="segment", barmode="group", **_segments(df, segments))
    fig.update_xaxes(title="requests per session")
    fig.update_yaxes(title="sessions")
    return _layout(fig, "Session lengths by segment")


def score_distributions(df: pd.DataFrame, tasks: Sequence[str], bins: int = 40, per_row: int = 5) -> go.Figure:
    """Histogram of the predicted scores per task (`df`: task, score). Binned here, so the browser gets
    `bins` bars per task instead of the whole sample."""
    n_rows = max(1, -(-len(tasks) // per_row))
    fig = make_subplots(rows=n_rows, cols=max(1, min(len(tasks), per_row)), subplot_titles=list(tasks))
    by_task = {t: part["score"].to_numpy(dtype=float) for t, part in df.groupby("task", sort=False)}
    for j, task in enumerate(tasks):
        values = by_task.get(task, np.zeros(0))
        counts, edges = np.histogram(values[np.isfinite(values)], bins=bins)
        fig.add_trace(go.Bar(x=(edges[:-1] + edges[1:]) / 2, y=counts, width=np.diff(edges), name=task,
                             marker_color=task_colour(task, tasks), marker_line_width=0),
                      row=j // per_row + 1, col=j % per_row + 1)
    fig.update_layout(showlegend=False, bargap=0)
    fig.update_xaxes(title="predicted score")
    fig.update_yaxes(title="candidates", col=1)
    return _layout(fig, "What the MTL model predicts, per task (sample of candidates)", 300 * n_rows + 20)


def correlation_heatmap(corr: pd.DataFrame) -> go.Figure:
    fig = go.Figure(go.Heatmap(z=corr.values, x=list(corr.columns), y=list(corr.index), zmin=-1, zmax=1,
                               colorscale="RdBu", text=np.round(corr.values, 2), texttemplate="%{text}"))
    return _layout(fig, "How the feedback signals move together (shown items)", 360)


def segment_sizes(df: pd.DataFrame, segments: Sequence[str] | None = None) -> go.Figure:
    """Users and requests per segment, each on its own axis (requests outnumber users 20 to 1)."""
    order = _segments(df, segments)["category_orders"]["segment"]  # type: ignore[index]
    df = df.set_index(df["segment"].astype(str)).reindex(order)
    fig = make_subplots(rows=1, cols=2, subplot_titles=["users", "requests"])
    colours = [segment_colour(s, order) for s in order]
    for col, column in ((1, "n_users"), (2, "n_requests")):
        fig.add_trace(go.Bar(x=order, y=df[column], marker_color=colours, name=column.split("_")[1],
                             showlegend=False), row=1, col=col)
    fig.update_yaxes(title="users", row=1, col=1)
    fig.update_yaxes(title="requests", row=1, col=2)
    return _layout(fig, "Users and requests per segment", 300)


UNSUPPORTED = "not supported by this log"


def forest_plot(rows: pd.DataFrame, label: str, title: str) -> go.Figure:
    """Point estimates with 95% intervals; rows need `label`, value, ci_low, ci_high and `policy`. Where rows
    have a `verdict`, an estimate the log does not support is drawn hollow and faded (trust first)."""
    fig = go.Figure()
    for i, (policy, part) in enumerate(rows.groupby("policy", sort=False)):
        verdict = part["verdict"].fillna("").astype(str) if "verdict" in part else pd.Series("", index=part.index)
        unsupported = (verdict == UNSUPPORTED).to_numpy()
        fig.add_trace(go.Scatter(
            x=part["value"], y=part[label], mode="markers", name=str(policy),
            marker=dict(color=policy_colour(i), size=9, symbol=np.where(unsupported, "circle-open", "circle"),
                        opacity=np.where(unsupported, 0.35, 1.0)),
            customdata=verdict.to_numpy(), hovertemplate="%{y}: %{x:.4g}<br>%{customdata}<extra>" + str(policy)
            + "</extra>",
            error_x=dict(type="data", symmetric=False, array=(part["ci_high"] - part["value"]).fillna(0),
                         arrayminus=(part["value"] - part["ci_low"]).fillna(0)),
        ))
    fig.update_layout(scattermode="group")
    if label == "segment":  # one segment order everywhere (top to bottom by name)
        order = sorted(str(s) for s in rows[label].dropna().unique())
        fig.update_yaxes(categoryorder="array", categoryarray=order[::-1])
    fig.update_xaxes(title="estimate (95% interval)")
    return _layout(fig, title, max(300, 40 * rows[label].nunique() + 120))


def reward_distribution(df: pd.DataFrame, segments: Sequence[str] | None = None) -> go.Figure:
    """Per-request composite reward per segment (columns segment, reward)."""
    fig = px.violin(df, x="segment", y="reward", color="segment", box=True, points=False, **_segments(df, segments))
    fig.update_layout(showlegend=False)
    fig.update_yaxes(title="composite reward per request")
    return _layout(fig, "Composite reward per request, by segment (logged actions)")


def reward_shares(df: pd.DataFrame, tasks: Sequence[str]) -> go.Figure:
    """Each signal's share of the immediate reward per segment (columns segment, task, share)."""
    fig = px.bar(df, x="segment", y="share", color="task", barmode="stack",
                 color_discrete_map={t: task_colour(t, tasks) for t in tasks},
                 category_orders=_segments(df)["category_orders"])
    fig.update_yaxes(tickformat=".0%", title="share of the immediate reward")
    return _layout(fig, "Which signals the reward is made of, by segment")


METRIC_LABELS = {
    "losses/ltr": "warm-start ranking loss (LambdaRank)", "losses/policy": "policy loss (GRPO, clipped)",
    "losses/kl": "KL to the warm-start policy", "losses/vae": "behaviour model loss (VAE)",
    "losses/critic": "critic loss (TD error)", "losses/actor": "actor loss", "losses/behaviour":
    "distance to the logged weights", "charts/reward": "training reward (counterfactual, per request)",
    "charts/reward_best_of_group": "best of each group's rewards", "charts/clip_fraction": "share of clipped ratios",
    "charts/concentration": "exploration concentration (higher = narrower)", "charts/q": "critic value",
    "charts/max_weight": "largest weight", "charts/support_violation": "distance outside the logged support",
    "exploration/segments_at_bound": "segments at the exploration bound", "rounds/online_value":
    "exploration round's value in the simulator", "rounds/appended_requests": "requests appended by the round",
    "rounds/round": "round", "validation/dr": "held-out DR estimate", "validation/dm": "held-out DM estimate",
}
"""Human names of the training metrics (the run store keeps the keys; a key without a label shows as is)."""


def metric_label(name: str) -> str:
    if name.startswith("exploration/kappa_"):
        return f"exploration factor, {name.split('_', 1)[1]}"
    return METRIC_LABELS.get(name, name)


def training_curves(history: pd.DataFrame, names: Sequence[str] | None = None) -> go.Figure:
    """One small panel per metric (columns step, name, value), titled with the metric's human name."""
    df = history if names is None else history[history["name"].isin(list(names))]
    if df.empty:
        return _layout(go.Figure(), "Training curves (no data yet)", 260)
    df = df.assign(name=df["name"].map(metric_label))
    n_rows = (df["name"].nunique() + 3) // 4
    fig = px.line(df, x="step", y="value", facet_col="name", facet_col_wrap=4, facet_col_spacing=0.07,
                  facet_row_spacing=min(0.12, 0.5 / max(n_rows - 1, 1)))
    # Every panel has its own scale (a loss and a reward on one axis would flatten both), so each its own ticks.
    fig.update_yaxes(matches=None, showticklabels=True, title=None)
    fig.update_xaxes(showticklabels=True)
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))  # "name=<label>"
    return _layout(fig, "Training curves", 260 * n_rows)


def segment_mean_weights(df: pd.DataFrame, tasks: Sequence[str]) -> go.Figure:
    """Mean weight per task and segment with spread across users (columns policy, segment, task, mean, std)."""
    fig = px.bar(df, x="segment", y="mean", color="task", error_y="std", barmode="group", facet_row="policy",
                 color_discrete_map={t: task_colour(t, tasks) for t in tasks},
                 category_orders=_segments(df)["category_orders"])
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=")[-1]))
    fig.update_yaxes(title="mean weight")
    return _layout(fig, "Mean fusion weight per segment (bars: ±1 sd across users)", 300 * df["policy"].nunique())


def beta_marginals(df: pd.DataFrame, tasks: Sequence[str],
                   title: str = "Distribution of each task's weight (Dirichlet marginals)") -> go.Figure:
    """Marginal densities of each task's weight (columns segment, task, x, density)."""
    fig = px.line(df, x="x", y="density", color="task", facet_col="segment",
                  color_discrete_map={t: task_colour(t, tasks) for t in tasks},
                  category_orders=_segments(df)["category_orders"])
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=")[-1]))
    fig.update_xaxes(title="weight")
    return _layout(fig, title, 340)


def ternary_density(samples: np.ndarray, names: Sequence[str], title: str) -> go.Figure:
    """Samples `[M,3]` of three renormalised weights as a ternary scatter."""
    fig = go.Figure(go.Scatterternary(a=samples[:, 0], b=samples[:, 1], c=samples[:, 2], mode="markers",
                                      marker=dict(size=3, opacity=0.35, color="#1f77b4")))
    fig.update_layout(ternary=dict(aaxis_title=names[0], baxis_title=names[1], caxis_title=names[2]))
    return _layout(fig, title, 420)


def weights_vs_feature(df: pd.DataFrame, feature: str, tasks: Sequence[str]) -> go.Figure:
    """Mean weight per task over bins of a user feature (columns bin_mid, task, weight)."""
    fig = px.line(df, x="bin_mid", y="weight", color="task", markers=True,
                  color_discrete_map={t: task_colour(t, tasks) for t in tasks})
    fig.update_xaxes(title=feature)
    return _layout(fig, f"How the weights move with {feature}")


def outcome_calibration(table: pd.DataFrame) -> go.Figure:
    """Observed against predicted request reward in deciles of the prediction, one panel per segment, one
    line per direct model; the diagonal is perfect calibration. Rows: model, segment, predicted, observed."""
    fig = px.line(table, x="predicted", y="observed", color="model", facet_col="segment", markers=True,
                  hover_data=["n"], category_orders=_segments(table)["category_orders"])
    low = float(min(table["predicted"].min(), table["observed"].min())) if len(table) else 0.0
    high = float(max(table["predicted"].max(), table["observed"].max())) if len(table) else 1.0
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=")[-1]))
    n_panels = max(table["segment"].nunique(), 1) if len(table) else 1
    for col in range(1, n_panels + 1):
        fig.add_shape(type="line", x0=low, y0=low, x1=high, y1=high, line=dict(color="#999999", dash="dot"),
                      row=1, col=col)
    return _layout(fig, "Direct models on held-out users: observed against predicted reward per request", 380)


def ratio_histogram(ratios: np.ndarray, title: str = "Importance ratios (log10)") -> go.Figure:
    r = np.log10(np.clip(ratios[np.isfinite(ratios)], 1e-12, None))
    fig = go.Figure(go.Histogram(x=r, nbinsx=60))
    fig.update_xaxes(title="log10 ratio")
    return _layout(fig, title, 300)


def validation_curve(df: pd.DataFrame, best_step: int | None) -> go.Figure:
    """Held-out validation estimate over training steps (named by its estimator), kept checkpoint marked."""
    estimator = str(df["name"].iloc[0]).split("/")[-1].upper() if "name" in df and len(df) else "estimate"
    fig = go.Figure(go.Scatter(x=df["step"], y=df["value"], mode="lines+markers", name=f"held-out {estimator}"))
    if best_step is not None:
        fig.add_vline(x=best_step, line_dash="dash", line_color="#2ca02c",
                      annotation_text=f"kept: step {best_step}")
    fig.update_xaxes(title="step")
    fig.update_yaxes(title="value per request")
    return _layout(fig, "Held-out validation estimate (best checkpoint kept)", 320)
