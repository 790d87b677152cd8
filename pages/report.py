"""Report: one self-contained HTML page of the chosen comparison, to download and send."""

import json

import streamlit as st

from mtf_core import plots
from mtf_core.compare import (build_report, decision_headline, estimator_label, metric_frame, ope_frame, policy_labels,
                              ranking_metric_label)
from ui.common import (KEY_REPORT_HTML, current_comparison, current_log, current_reward, page_setup, plain,
                       run_store)

page_setup()
st.title("Report")
log = current_log()
results = current_comparison(log)
if not results:
    st.info("Run a comparison on the Compare page first; the report is built from it.")
    st.stop()

runs = {f"run:{r.run_id}": r for r in run_store().list_runs()}
configs = {r.policy: {"name": run.name, "algo": run.algo, "config": run.config, "seconds": run.seconds}
           for r in results if (run := runs.get(r.policy)) is not None}  # a run deleted since is left out
labels = policy_labels(configs)
st.info(plain(decision_headline(results, labels)))
title = st.text_input("Title", value="Fusion policy comparison")
ope, metrics = ope_frame(results), metric_frame(results)
ope["policy"] = ope["policy"].map(lambda p: labels.get(p, p))
metrics["policy"] = metrics["policy"].map(lambda p: labels.get(p, p))
# By segment: the truth where the simulator gives one, else DR where every policy has it, else DM; named as such.
named = {labels.get(r.policy, r.policy) for r in results}
by_segment = next(e for e in ("truth", "dr", "dm") if set(ope.loc[ope["estimator"] == e, "policy"]) == named
                  or e == "dm")
figures = [
    ("Policy value with 95% intervals", plots.forest_plot(ope[ope["segment"].isna()].assign(
        label=lambda f: f["estimator"].map(estimator_label)), "label", "Policy value: estimates and truth")),
    (f"{'Truth' if by_segment == 'truth' else by_segment.upper()} by segment",
     plots.forest_plot(ope[(ope["estimator"] == by_segment) & ope["segment"].notna()], "segment",
                       f"Value by segment ({'simulator truth' if by_segment == 'truth' else by_segment.upper()})")),
    ("Ranking metrics", plots.forest_plot(metrics[metrics["segment"].isna() & metrics["metric"].str.startswith(
        "ndcg")].assign(metric=lambda f: f["metric"].map(ranking_metric_label)), "metric",
        "NDCG on the logged candidates")),
]
html = build_report(title, results, figures, json.loads(current_reward(log).to_json()), log.fingerprint, configs)
st.session_state[KEY_REPORT_HTML] = html
st.download_button("Download the report (HTML)", html, file_name="mtf_report.html", mime="text/html",
                   type="primary")
st.caption(f"{len(figures)} figures, {len(html) / 1e6:.1f} MB, plotly embedded: opens offline in any browser.")
for caption, fig in figures:
    st.plotly_chart(fig, width="stretch")
