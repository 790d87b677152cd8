"""Compare: runs and baselines side by side, with confidence intervals, per segment, against the truth."""

import pandas as pd
import streamlit as st

from mtf_core import plots
from mtf_core.compare import metric_frame, ope_frame, paired_lifts
from mtf_core.diagnostics import thresholds_text
from mtf_core.errors import LogError
from mtf_core.selection import CRITERIA, regret, select
from ui.common import (KEY_COMPARISON, cached_evaluation, current_log, current_reward, log_version, page_setup,
                       policy_choices, run_store, runs_dir, show_error)

page_setup()
st.title("Compare")
st.caption("Every figure is the mean composite reward per request under the current reward, with a 95% "
           "bootstrap interval (users resampled). On simulated logs the truth is each policy run online.")

log = current_log()
spec = current_reward(log)
choices = policy_choices(log)
with st.form("compare_form"):
    picked = st.multiselect("Policies", list(choices), default=list(choices)[:3])
    static = st.text_input("Also a fixed weight vector (optional)", placeholder="click=0.3,like=0.3,share=0.4")
    n_boot = st.select_slider("Bootstrap resamples", [100, 200, 500, 1000], value=200)
    stochastic = st.checkbox("Evaluate stochastic policies as distributions (exact density ratios)", False,
                             help="Off: each policy is evaluated at the mean weights it would serve")
    in_sample = st.checkbox("Evaluate on all requests (in-sample for runs trained on this log)", False,
                            help="Off: runs trained on this log are judged on the latest sessions they held out from "
                                 "training, with the direct model fitted on the earlier sessions")
    go = st.form_submit_button("Compare", type="primary")

if go:
    refs = [choices[p] for p in picked] + ([f"static:{static}"] if static.strip() else [])
    if not refs:
        st.warning("Pick at least one policy.")
        st.stop()
    path, mtime = log_version()
    share = None if in_sample else run_store().held_out_share(refs, log)
    results = []
    bar = st.progress(0.0, text="Evaluating...")
    try:
        for i, ref in enumerate(refs):
            bar.progress(i / len(refs), text=f"Evaluating {ref} ({i + 1} of {len(refs)})...")
            results.append(cached_evaluation(path, mtime, ref, spec.to_json(), str(runs_dir()), n_boot, stochastic,
                                             share))
    except LogError as exc:
        show_error(exc)
        st.stop()
    bar.progress(1.0, text="Done")
    st.session_state[KEY_COMPARISON] = results

results = st.session_state.get(KEY_COMPARISON)
if not results:
    st.info("Pick policies and press Compare.")
    st.stop()

st.info(f"Evaluated on {results[0].sample}.")
ope = ope_frame(results)
metrics = metric_frame(results)
overall = ope[ope["segment"].isna()]
st.plotly_chart(plots.forest_plot(overall.rename(columns={"estimator": "label"}), "label",
                                  "Policy value: off-policy estimates and the simulator's truth"), width="stretch")
baseline = st.selectbox("Baseline for lifts", [r.policy for r in results])
lifts = paired_lifts(results, baseline)
if not lifts.empty:
    verdicts = {(o["policy"], o["estimator"]): o.get("verdict") for o in ope.to_dict("records")
                if o.get("segment") is None}
    lifts["verdict"] = [verdicts.get((p, e), "") for p, e in zip(lifts["policy"], lifts["estimator"])]
    st.dataframe(lifts[["policy", "estimator", "difference", "ci_low", "ci_high", "lift", "separated", "verdict"]]
                 .rename(columns={"ci_low": "difference: low", "ci_high": "difference: high",
                                  "separated": "interval excludes 0"}),
                 width="stretch", hide_index=True)
    st.caption("Paired lifts over the baseline: the same users resampled for both policies (and, for the truth, "
               "the simulator's common random numbers), so the interval is that of the difference itself. A lift "
               "whose estimate is 'not supported by this log' says nothing the log can check.")

st.subheader("Can these estimates be trusted?")
diag_rows = [{"policy": r.policy, **r.diagnostics} for r in results if r.diagnostics]
if diag_rows:
    st.dataframe(pd.DataFrame(diag_rows), width="stretch", hide_index=True)
    st.caption(thresholds_text())
with_ratios = [r for r in results if r.ratios is not None and not r.policy == "logging"]
if with_ratios:
    which = st.selectbox("Importance ratios of", [r.policy for r in with_ratios])
    st.plotly_chart(plots.ratio_histogram(next(r for r in with_ratios if r.policy == which).ratios,
                                          f"Importance ratios of {which} (log10)"), width="stretch")

st.subheader("Which policy to ship")
choices_rows = []
for criterion in CRITERIA:
    choice = select(results, criterion)
    choices_rows.append({"criterion": criterion, "chosen": choice["chosen"], "why": choice["reason"],
                         "regret vs truth": regret(results, choice["chosen"])})
st.dataframe(pd.DataFrame(choices_rows), width="stretch", hide_index=True)
st.caption("mean: highest DR estimate; lower_bound: highest lower 95% bound; cvar: best value over the worst 10% "
           "of requests. Regret (simulator logs): truth of the best policy minus truth of the choice.")

estimator = st.selectbox("Per segment: estimator", sorted(ope["estimator"].unique(), key=lambda e: e != "truth"))
per_segment = ope[(ope["estimator"] == estimator) & ope["segment"].notna()]
st.plotly_chart(plots.forest_plot(per_segment, "segment", f"{estimator} by segment"), width="stretch")

metric_names = sorted(metrics["metric"].unique())
chosen = st.multiselect("Ranking metrics", metric_names, default=[m for m in metric_names if m.endswith("reward")])
shown = metrics[metrics["metric"].isin(chosen) & metrics["segment"].isna()]
if not shown.empty:
    st.plotly_chart(plots.forest_plot(shown, "metric", "Counterfactual ranking metrics"), width="stretch")

for r in results:
    for note in r.notes:
        st.info(f"{r.policy}: {note}")
with st.expander("All figures as a table"):
    st.dataframe(pd.concat([ope.assign(kind="value"), metrics.assign(kind="metric")], ignore_index=True),
                 width="stretch")
