"""Weights by segment: how a policy's fusion weights are distributed for each kind of user."""

import numpy as np
import pandas as pd
import streamlit as st

from mtf_core import plots
from mtf_core.errors import LogError
from mtf_core.policies.resolve import resolve_policy
from mtf_core.segments import beta_marginals, segment_weights, ternary_samples, weights_by_feature
from ui.common import current_log, log_version, page_setup, policy_choices, runs_dir, show_error, show_table

page_setup()
st.title("Weights by segment")
st.caption("For a trained run, beside the logging policy: the mean weight each segment gets, its spread across "
           "users, the Dirichlet concentration (how much the policy still explores) and its marginals.")

log = current_log()
choices = policy_choices(log)
runs = [label for label, ref in choices.items() if ref != "logging"]
if not log.weights_known:
    st.info("This log records no fusion weights (random exposure or an unlogged ranker), so there is no logging "
            "policy to show beside a run.")
    if not runs:
        st.info("No run on this log yet: train one on the Train page.")
        st.stop()
elif not runs:
    st.info("No run on this log yet: train one on the Train page. Showing the logging policy alone.")
label = st.selectbox("Run", runs) if runs else None


@st.cache_data(show_spinner="Computing weight distributions...")
def _weights(path: str, mtime: float, ref: str, runs: str):  # type: ignore[no-untyped-def]
    policy, name = resolve_policy(ref, current_log(), runs)
    return segment_weights(policy, current_log(), name)


path, mtime = log_version()
try:
    parts = [_weights(path, mtime, "logging", str(runs_dir()))] if log.weights_known else []
    if label:
        parts.append(_weights(path, mtime, choices[label], str(runs_dir())))
except LogError as exc:
    show_error(exc)
    st.stop()
summary = pd.concat([p.summary for p in parts], ignore_index=True)
st.plotly_chart(plots.segment_mean_weights(summary, log.task_names), width="stretch")
concentration = summary.groupby(["policy", "segment"], sort=False)["concentration"].first().unstack("segment")
st.write("Total concentration (higher = less exploration; a deterministic policy is a point mass per request):")
show_table(concentration.round(1).astype(object).where(np.isfinite(concentration.to_numpy(dtype=float)),
                                                       "point mass"), width="stretch")

target = parts[-1]
marginals_title = ("Weights served across each segment's requests (deterministic: no exploration)"
                   if target.deterministic else "Distribution of each task's weight (Dirichlet marginals)")
st.plotly_chart(plots.beta_marginals(beta_marginals(target), log.task_names, marginals_title), width="stretch")

st.subheader("Three tasks at once")
c1, c2 = st.columns(2)
picked = c1.multiselect("Tasks (three)", list(log.task_names), default=list(log.task_names[:3]), max_selections=3)
segment = c2.selectbox("Segment", list(log.segments))
if len(picked) == 3:
    samples = ternary_samples(target, segment, tuple(picked))
    st.plotly_chart(plots.ternary_density(samples, picked, f"{target.policy}: weights of {', '.join(picked)} "
                                          f"for {segment} users (renormalised)"), width="stretch")
else:
    st.info("Pick exactly three tasks for the ternary plot.")

if log.user_feature_names:
    feature = st.selectbox("User feature", list(log.user_feature_names))
    st.plotly_chart(plots.weights_vs_feature(weights_by_feature(target, log, feature), feature, log.task_names),
                    width="stretch")
st.caption(f"{len(np.unique(log.user_id)):,} users, {log.n_requests:,} requests.")
