"""Data: pick the log, see whether it is valid, and what it holds."""

from pathlib import Path

import streamlit as st

from mtf_core import plots
from mtf_core.errors import LogError
from mtf_core.overview import log_overview
from mtf_core.schema import validate
from mtf_core.store import log_info, open_log
from ui.common import KEY_LOG, current_log_path, ensure_demo, page_setup, show_error

page_setup()
st.title("Data")
st.caption("Choose a session log. The app only reads it; every page works on the log chosen here.")

source = st.radio("Log", ["Demo (simulated)", "DuckDB file on this machine"], horizontal=True)
if source.startswith("Demo"):
    st.session_state[KEY_LOG] = ensure_demo()
else:
    with st.form("path_form"):
        typed = st.text_input("Path to a .duckdb log", value=current_log_path())
        if st.form_submit_button("Use this log"):
            st.session_state[KEY_LOG] = typed.strip()

path = current_log_path()


@st.cache_data(show_spinner="Checking the log...")
def _check(path: str, mtime: float) -> tuple[dict, list[str]]:
    info = log_info(path)
    con = open_log(path)
    try:
        problems = [str(p) for p in validate(con)]
    finally:
        con.close()
    return info, problems


@st.cache_data(show_spinner="Summarising the log...")
def _overview(path: str, mtime: float):  # type: ignore[no-untyped-def]
    return log_overview(path)


try:
    mtime = Path(path).stat().st_mtime if Path(path).exists() else 0.0
    info, problems = _check(path, mtime)
except LogError as exc:
    show_error(exc)
    st.stop()

tables = info["tables"]
cols = st.columns(4)
cols[0].metric("Requests", f"{tables.get('requests', 0):,}")
cols[1].metric("Candidates", f"{tables.get('impressions', 0):,}")
cols[2].metric("Users", f"{tables.get('users', 0):,}")
cols[3].metric("Tasks", len(info.get("tasks", [])))
if problems:
    st.error(f"{len(problems)} validation problem(s); fix them before training:\n\n" +
             "\n".join(f"- {p}" for p in problems[:30]))
    st.stop()
st.success(f"Valid log: {info.get('meta', {}).get('source', 'unknown source')}, "
           f"time range {' to '.join(info.get('time_range', ['?', '?']))}")

tasks = [t["name"] for t in info["tasks"]]
ov = _overview(path, mtime)
st.plotly_chart(plots.feedback_by_position(ov.feedback_by_segment_position, tasks), width="stretch")
left, right = st.columns(2)
left.plotly_chart(plots.session_length_histogram(ov.session_lengths), width="stretch")
right.plotly_chart(plots.correlation_heatmap(ov.label_correlation), width="stretch")
st.plotly_chart(plots.score_distributions(ov.score_sample, tasks), width="stretch")
st.plotly_chart(plots.segment_sizes(ov.segment_sizes), width="stretch")
with st.expander("Tasks and tables"):
    st.dataframe(info["tasks"], width="stretch")
    st.json(tables)
