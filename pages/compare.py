"""Compare: runs and baselines side by side, with confidence intervals, per segment, against the truth."""

import pandas as pd
import streamlit as st

from mtf_core import plots
from mtf_core.compare import (estimator_label, headroom_shares, metric_frame, ope_frame, paired_lifts, per_user_truth,
                               ranking_metric_label)
from mtf_core.diagnostics import depth_shift_text, thresholds_text, verdicts_text
from mtf_core.errors import LogError
from mtf_core.headroom import ORACLE_LABEL
from mtf_core.selection import CRITERIA, regret, select
from ui.common import (cached_evaluation, cached_oracle_evaluation, cached_outcome_fit, current_comparison,
                       current_log, current_reward, log_version, page_setup, plain, policy_choices, run_store,
                       runs_dir, show_error, show_table, store_comparison)

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
    oracle = st.checkbox("Add the oracle and each policy's share of its headroom", False,
                         disabled=not log.is_simulated,
                         help="Simulated logs only: the best weight vector per segment, found against the simulator's "
                              "truth (about a minute on the demo log). Share of headroom = (truth - logging) / "
                              "(oracle - logging).")
    go = st.form_submit_button("Compare", type="primary")

if go:
    refs = [choices[p] for p in picked] + ([f"static:{static}"] if static.strip() else [])
    if oracle and log.is_simulated and "logging" not in refs:
        refs.insert(0, "logging")  # the share of headroom is measured from it
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
        if oracle and log.is_simulated:
            bar.progress(len(refs) / (len(refs) + 1), text="Finding the oracle against the simulator's truth...")
            results.append(cached_oracle_evaluation(path, mtime, spec.to_json(), n_boot, share))
    except LogError as exc:
        show_error(exc)
        st.stop()
    bar.progress(1.0, text="Done")
    store_comparison(results, log)
    st.session_state["mtf_compare_share"] = share  # which requests the direct models below are checked on

results = current_comparison(log)
if not results:
    st.info("Pick policies and press Compare.")
    st.stop()

st.info(plain(f"Evaluated on {results[0].sample}."))
ope = ope_frame(results)
metrics = metric_frame(results)
overall = ope[ope["segment"].isna()]
has_truth = bool((overall["estimator"] == "truth").any())
st.plotly_chart(plots.forest_plot(overall.assign(label=overall["estimator"].map(estimator_label)), "label",
                                  "Policy value: off-policy estimates" + (" and the simulator's truth" if has_truth
                                                                          else "")), width="stretch")
if "verdict" in overall and (overall["verdict"] == plots.UNSUPPORTED).any():
    st.caption("Hollow, faded points: estimates rated 'not supported by this log' (the log holds almost no "
               "requests with weights like the policy's); read them as extrapolations, not evidence.")
baseline = st.selectbox("Baseline for lifts", [r.policy for r in results])
lifts = paired_lifts(results, baseline)
if not lifts.empty:
    lifts["estimator"] = lifts["estimator"].map(estimator_label)
    show_table(lifts[["policy", "estimator", "difference", "ci_low", "ci_high", "lift", "separated", "verdict",
                        "rests on"]]
                 .rename(columns={"ci_low": "difference: low", "ci_high": "difference: high",
                                  "separated": "interval excludes 0"}),
                 width="stretch", hide_index=True)
    st.caption("Paired lifts over the baseline: the same users resampled for both policies (and, for the truth, "
               "the simulator's common random numbers), so the interval is that of the difference itself. A lift "
               "whose estimate is 'not supported by this log' says nothing the log can check.")

if any(r.policy == ORACLE_LABEL for r in results):
    shares = headroom_shares(results, ORACLE_LABEL)
    truth = {r.policy: per_user_truth(r) for r in results}
    show_table(pd.DataFrame({"policy": list(shares), "truth per user": [truth[p] for p in shares],
                               "share of headroom": list(shares.values())}),
                 column_config={"share of headroom": st.column_config.ProgressColumn(
                     "share of the oracle's headroom", format="percent", min_value=0.0, max_value=1.0)},
                 width="stretch", hide_index=True)
    st.caption("How much of the way from the logging policy to the oracle (the best weight vector per segment for "
               "the long term, found against the simulator's truth) each policy goes, by the truth per user over the "
               "evaluated days (its reward summed over every request it kept the user for). Above 100%: it beats the "
               "oracle (per-user or per-request weights can); below 0: it is worse than logging.")

st.subheader("Can these estimates be trusted?")
diag_rows = [{"policy": r.policy, **r.diagnostics, "segment": r.diagnostics.get("segment") or "all users",
              "verdicts": verdicts_text(r.diagnostics.get("verdicts") or {}),
              "depth_shift": depth_shift_text(r.diagnostics.get("depth_shift"))}
             for r in results if r.diagnostics]
if diag_rows:
    show_table(pd.DataFrame(diag_rows), width="stretch", hide_index=True)
    st.caption(thresholds_text())
model = results[0].direct_model or {}
with st.expander(plain(f"DM and DR rest on the {model.get('label', 'direct model')}: its fit on held-out users")):
    path, mtime = log_version()
    r2, calibration = cached_outcome_fit(path, mtime, spec.to_json(), st.session_state.get("mtf_compare_share"))
    show_table(r2.pivot(index="segment", columns="model", values="r2").reset_index(), width="stretch",
               hide_index=True)
    st.plotly_chart(plots.outcome_calibration(calibration), width="stretch")
    st.caption("R² of the logged reward per request, each model predicting users it was not fitted on (two folds "
               "of users). The learned outcome model values each candidate from its MTL scores, item and user "
               "features (what the scores get wrong, e.g. for popular items) and is used where it fits better; "
               "the linear model calibrates the MTL-score expected reward per segment.")
with_ratios = [r for r in results if r.ratios is not None and not r.policy == "logging"]
if with_ratios:
    which = st.selectbox("Importance ratios of", [r.policy for r in with_ratios])
    st.plotly_chart(plots.ratio_histogram(next(r for r in with_ratios if r.policy == which).ratios,
                                          f"Importance ratios of {which} (log10)"), width="stretch")

st.subheader("Which policy to ship")
choices_rows = []
for criterion in CRITERIA:
    choice = select(results, criterion)
    row = {"criterion": criterion, "chosen": choice["chosen"], "why": choice["reason"]}
    if has_truth:
        row["regret vs truth"] = regret(results, choice["chosen"])
    choices_rows.append(row)
show_table(pd.DataFrame(choices_rows), width="stretch", hide_index=True)
st.caption("mean: the highest estimate, and lower_bound: the highest lower 95% bound, of DR where every policy "
           "has it, else DM; cvar: the best direct-model value over the worst 10% of requests."
           + (" Regret: truth of the best policy minus truth of the choice." if has_truth else ""))

estimator = st.selectbox("Per segment: estimator", sorted(ope["estimator"].unique(), key=lambda e: e != "truth"),
                         format_func=estimator_label)
per_segment = ope[(ope["estimator"] == estimator) & ope["segment"].notna()]
st.plotly_chart(plots.forest_plot(per_segment, "segment", f"{estimator_label(estimator)} by segment"),
                width="stretch")

metric_names = sorted(metrics["metric"].unique())
chosen = st.multiselect("Ranking metrics", metric_names, format_func=ranking_metric_label,
                        default=[m for m in metric_names if m.startswith("ndcg") and m.endswith("reward")])
shown = metrics[metrics["metric"].isin(chosen) & metrics["segment"].isna()]
shown = shown.assign(metric=shown["metric"].map(ranking_metric_label))
# One chart per kind of metric: a reward of ~14 and an NDCG in [0, 1] on one axis would hide both.
for kind, part in shown.groupby(shown["metric"].str.split(",").str[0], sort=False):
    st.plotly_chart(plots.forest_plot(part, "metric", f"Counterfactual ranking metric: {kind}"), width="stretch")

shared_notes = [n for n in results[0].notes if all(n in r.notes for r in results)] if len(results) > 1 else []
for note in shared_notes:
    st.info(plain(note[:1].upper() + note[1:]))
for r in results:
    for note in r.notes:
        if note not in shared_notes:
            st.info(plain(f"{r.policy}: {note}"))
with st.expander("All figures as a table"):
    show_table(pd.concat([ope.assign(kind="value"), metrics.assign(kind="metric")], ignore_index=True),
                 width="stretch")
