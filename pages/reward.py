"""Reward: compose the reward from feedback signals and see its distribution before training."""

import streamlit as st

from mtf_core import plots
from mtf_core.errors import LogError
from mtf_core.evaluate import reward_preview
from mtf_core.reward import RewardSpec
from ui.common import (KEY_REWARD, cached_context, current_log, current_reward, log_version, page_setup, plain,
                       show_error)

page_setup()
st.title("Reward")
st.caption("What the policies optimise: a coefficient per signal, session terms for the long term, and "
           "GRADE's penalties against reward hacking. Press Apply: the preview, training and comparison then "
           "use it.")

log = current_log()
spec = current_reward(log)

def _widget_values(spec: RewardSpec) -> dict[str, object]:
    """Every widget's session-state key -> its value for `spec` (one owner: the spec sets the widgets)."""
    return {**{f"coef_{t}": float(spec.coefficients.get(t, 0.0)) for t in log.task_names},
            "rw_normalize": spec.normalize, "rw_clip_on": spec.clip is not None, "rw_clip": float(spec.clip or 50.0),
            "rw_continuation": float(spec.continuation), "rw_session_length": float(spec.session_length),
            "rw_returned": float(spec.returned), "rw_share_penalty": float(spec.share_penalty),
            "rw_share_tolerance": float(spec.share_tolerance), "rw_vertex_penalty": float(spec.vertex_penalty),
            "rw_vertex_threshold": float(spec.vertex_threshold)}


with st.sidebar.expander("Load or save a reward spec"):
    uploaded = st.file_uploader("Load a RewardSpec JSON", type=["json"])
    if uploaded is not None and st.session_state.get("_reward_file") != uploaded.file_id:
        st.session_state["_reward_file"] = uploaded.file_id  # load a file once, not on every rerun
        try:
            loaded = RewardSpec.from_json(uploaded.getvalue().decode("utf-8", errors="replace"), uploaded.name)
            loaded.check_tasks(log.task_names, uploaded.name)
            st.session_state[KEY_REWARD] = loaded.to_json()
            st.session_state.update(_widget_values(loaded))
            spec = loaded
            st.success(plain(f"Loaded {uploaded.name}: every control below now shows it"))
        except LogError as exc:
            show_error(exc)

for key, value in _widget_values(spec).items():
    st.session_state.setdefault(key, value)

# One form: moving a slider recomputes nothing until Apply (a preview takes seconds on a busy machine).
with st.form("reward_form", border=False):
    left, right = st.columns(2)
    with left:
        st.subheader("Signals")
        coefficients = {t: st.slider(t, 0.0, 5.0, step=0.1, key=f"coef_{t}",
                                     help=f"Reward per unit of {t} summed over the items shown")
                        for t in log.task_names}
        normalize = st.checkbox("Divide each signal by its standard deviation in the log", key="rw_normalize",
                                help="Puts rare signals (shares) and frequent ones (clicks) on one scale")
        clip_on = st.checkbox("Clip the immediate reward", key="rw_clip_on")
        clip_at = st.number_input("Clip at (used when clipping is on)", 0.1, 1e4, key="rw_clip")
        clip = clip_at if clip_on else None
    with right:
        st.subheader("Long term (stickiness, activeness)")
        continuation = st.slider("Per request after which the session goes on", 0.0, 5.0, step=0.1,
                                 key="rw_continuation")
        session_length = st.slider("Per request served", 0.0, 5.0, step=0.1, key="rw_session_length")
        returned = st.slider("When the user comes back the next day", 0.0, 10.0, step=0.1, key="rw_returned")
        st.subheader("Against reward hacking")
        share_penalty = st.slider("Penalty when a signal's share drifts from the logging policy's", 0.0, 20.0, step=0.5,
                                  key="rw_share_penalty")
        share_tolerance = st.slider("Drift tolerated", 0.0, 0.5, step=0.01, key="rw_share_tolerance")
        vertex_penalty = st.slider("Penalty when the weights collapse onto one task", 0.0, 20.0, step=0.5,
                                   key="rw_vertex_penalty")
        vertex_threshold = st.slider("Largest weight tolerated", 0.3, 0.99, step=0.01, key="rw_vertex_threshold")
    st.form_submit_button("Apply to training and comparison", type="primary")

try:
    new_spec = RewardSpec(coefficients, normalize, clip, continuation, session_length, returned, share_penalty,
                          share_tolerance, vertex_penalty, vertex_threshold)
except LogError as exc:
    show_error(exc)
    st.stop()
st.session_state[KEY_REWARD] = new_spec.to_json()
st.sidebar.download_button("Download this spec", new_spec.to_json(), file_name="reward.json",
                           mime="application/json")

path, mtime = log_version()
ctx = cached_context(path, mtime, new_spec.to_json())
per_request, shares = reward_preview(ctx)
st.metric("Mean composite reward per request (logged actions)", f"{per_request['reward'].mean():.3f}")
a, b = st.columns(2)
a.plotly_chart(plots.reward_distribution(per_request, log.segments), width="stretch")
b.plotly_chart(plots.reward_shares(shares, log.task_names), width="stretch")
with st.expander("Resolved coefficients (after normalisation)"):
    st.json(ctx.resolved.to_dict())
