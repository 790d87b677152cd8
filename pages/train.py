"""Train: pick an algorithm and its settings, watch it learn, keep the run; manage the runs."""

import pandas as pd
import streamlit as st

from mtf_core import plots
from mtf_core.errors import LogError
from mtf_core.policies.train import ALGORITHMS, SETTING_CHOICES, TrainConfig, config_fields, train_run
from ui.common import (KEY_LAST_RUN, current_log, current_reward, page_setup, plain, run_store, setting_label,
                       show_error, show_table)

page_setup()
st.title("Train")
st.caption("Training reads the log and the reward chosen on the Reward page; the run lands in the run store.")

log = current_log()
spec = current_reward(log)
store = run_store()

algo = st.selectbox("Algorithm", list(ALGORITHMS), index=list(ALGORITHMS).index("grade"),
                    help="static: logging mean weights; cem: cross-entropy search; grade: GRPO with Dirichlet "
                         "exploration; batchrl / integrated / enhanced: the other seed methods")
with st.form("train_form"):
    params = {}
    columns = st.columns(3)
    for i, (name, default, doc) in enumerate(config_fields(algo)):
        col = columns[i % 3]
        label = setting_label(name)  # the key itself is in the help, for the CLI's --set
        help_text = f"{doc} (`--set {name}=...` on the command line)"
        if name in SETTING_CHOICES:
            params[name] = col.selectbox(label, SETTING_CHOICES[name], index=SETTING_CHOICES[name].index(default),
                                         help=help_text)
        elif isinstance(default, bool):
            params[name] = col.checkbox(label, default, help=help_text)
        elif isinstance(default, int):
            params[name] = col.number_input(label, value=default, step=1, help=help_text)
        elif isinstance(default, float):
            params[name] = col.number_input(label, value=default, format="%.4g", help=help_text)
        else:
            params[name] = col.text_input(label, value=str(default), help=help_text)
    seed = st.number_input("Seed", value=0, step=1, help="The same seed, settings and log give the same run")
    v1, v2 = st.columns(2)
    validation_share = v1.number_input("Validation share", 0.0, 0.8, 0.2, 0.05,
                                       help="Latest sessions held out: the validation DR estimate picks the best "
                                            "checkpoint and stops training early")
    patience = v2.number_input("Patience", 0, 100, 4, help="Validation estimates without improvement before "
                                                          "stopping (0 = never stop early)")
    name = st.text_input("Run name", value="", help="Optional; defaults to the algorithm and id")
    submitted = st.form_submit_button("Train", type="primary")
    progress_area = st.empty()  # right under the button, not below the whole page

if submitted:
    try:
        config = TrainConfig(algo, int(seed), params, validation_share=float(validation_share),
                             patience=int(patience))
    except LogError as exc:
        show_error(exc)
        st.stop()
    bar = progress_area.progress(0.0, text=f"Training {algo}...")
    stop_area = st.empty()
    stop_area.button("Stop training", help="Stops after the current step; the run is kept as cancelled")
    chart = st.empty()
    rows: list[dict] = []

    def on_step(info):  # noqa: ANN001 - the loop's StepInfo
        rows.extend({"step": info.step, "name": k, "value": v} for k, v in info.metrics.items())
        done = info.step + 1
        left = info.elapsed / done * (info.n_steps - done)
        bar.progress(done / info.n_steps, text=f"Step {done} of {info.n_steps} (all phases, warm start "
                                               f"included): {info.elapsed:.0f}s so far, about {left:.0f}s left")
        if info.step % max(1, info.n_steps // 15) == 0 or info.step + 1 == info.n_steps:
            chart.plotly_chart(plots.training_curves(pd.DataFrame(rows)), width="stretch",
                               key=f"live_{info.step}")

    # A Stop click reruns the page, which ends this script mid-loop: train_run records the run as cancelled.
    run_id, result = train_run(store, config, log, spec, on_step, name or None)
    stop_area.empty()  # the run has ended: no Stop button, no frozen bar
    progress_area.empty()
    st.session_state[KEY_LAST_RUN] = run_id
    best = (f"; kept the best checkpoint, step {result.best_step} (held-out "
            f"{result.validation_estimator.upper()} {result.best_value:.4f})"
            + (", stopped early" if result.stopped_early else "")) if result.best_step is not None else ""
    st.success(plain(f"Run {run_id} {result.status} in {result.seconds:.1f}s{best}"))
    for note in result.notes:
        st.warning(plain(note))

st.subheader("Runs")
runs = store.list_runs()
if not runs:
    st.info("No runs yet: train one above.")
    st.stop()
table = pd.DataFrame([{
    "id": r.run_id, "name": r.name, "algorithm": r.algo, "status": r.status,
    "started": r.created_at.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(r.seconds or 0.0, 1),
    "final reward": r.summary.get("final", {}).get("charts/reward"),
    "best step": r.summary.get("best_step"), "held-out estimate": r.summary.get("best_validation"),
    "estimator": str(r.summary.get("validation_estimator", "dr")).upper(),
    "same log": r.data_fingerprint == log.fingerprint,
} for r in reversed(runs)])
show_table(table, width="stretch", hide_index=True)
st.caption("Held-out estimate: the kept checkpoint's value per request on the latest sessions, which training did "
           "not see, by the estimator shown, in the reward's own units: compare runs by this. Final reward: the "
           "training objective at the last step (GRADE: the group mean of its counterfactual composite reward, "
           "rule terms included; CEM: its search objective; the offline methods have none), on another scale.")

by_id = {r.run_id: r for r in reversed(runs)}  # the listing above, not one catalogue read per option
ids = list(by_id)
chosen = st.selectbox("Run", ids, index=ids.index(st.session_state.get(KEY_LAST_RUN, ids[0]))
                      if st.session_state.get(KEY_LAST_RUN) in ids else 0,
                      format_func=lambda i: f"{i} - {by_id[i].name}")
history = store.history(chosen)
if not history.empty:
    is_validation = history["name"].str.startswith("validation/")
    validation = history[is_validation]
    if not validation.empty:
        st.plotly_chart(plots.validation_curve(validation, by_id[chosen].summary.get("best_step")),
                        width="stretch")
    st.plotly_chart(plots.training_curves(history[~is_validation]), width="stretch")
a, b = st.columns(2)
with a.form("rename"):
    new_name = st.text_input("New name", value=by_id[chosen].name)
    if st.form_submit_button("Rename"):
        store.rename(chosen, new_name)
        st.rerun()
with b.form("delete"):
    confirm = st.checkbox("Yes, delete this run and its policy")
    if st.form_submit_button("Delete") and confirm:
        store.delete(chosen)
        st.rerun()
