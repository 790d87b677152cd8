"""Data: pick the log, see whether it is valid, and what it holds."""

from pathlib import Path

import streamlit as st

import json
import tempfile

from mtf_core import plots
from mtf_core.access import allowed_dirs, check_path_allowed, check_upload_size
from mtf_core.errors import LogError
from mtf_core.overview import log_overview
from mtf_core.schema import IDENTIFIER, validate
from mtf_core.store import import_log, log_info, open_log, read_mapping
from ui.common import KEY_LOG, ROOT, current_log_path, ensure_demo, page_setup, show_error

page_setup()
st.title("Data")
st.caption("Choose a session log. The app only reads it; every page works on the log chosen here.")

UPLOADS = ROOT / "data" / "uploads"


def _import_uploads(files: dict, mapping_text: str, name: str) -> str:  # type: ignore[type-arg]
    """Write the uploaded tables to a scratch folder and import them into data/uploads/NAME.duckdb."""
    if not IDENTIFIER.match(name):
        raise LogError(f"log name {name!r}: use lowercase letters, digits and underscores")
    with tempfile.TemporaryDirectory() as folder:
        sources = {}
        for table, upload in files.items():
            check_upload_size(upload.name, upload.size)
            suffix = Path(upload.name).suffix.lower()
            target = Path(folder) / f"{table}{suffix}"
            target.write_bytes(upload.getvalue())
            sources[table] = str(target)
        mapping = {}
        if mapping_text.strip():
            mapping_path = Path(folder) / "mapping.json"
            mapping_path.write_text(mapping_text)
            mapping = read_mapping(mapping_path)
        out = import_log(sources, UPLOADS / f"{name}.duckdb", mapping)
    return str(out)


source = st.radio("Log", ["Demo (simulated)", "DuckDB file on this machine", "Upload CSV/Parquet files"],
                  horizontal=True)
if source.startswith("Demo"):
    st.session_state[KEY_LOG] = ensure_demo()
elif source.startswith("DuckDB"):
    with st.form("path_form"):
        typed = st.text_input("Path to a .duckdb log", value=current_log_path())
        if st.form_submit_button("Use this log"):
            try:
                folders = [*allowed_dirs(), ROOT / "data"] if allowed_dirs() else []
                st.session_state[KEY_LOG] = str(check_path_allowed(typed.strip(), folders))
            except LogError as exc:
                show_error(exc)
                st.stop()
else:
    with st.form("upload_form"):
        st.caption("One file per table; columns named as in the schema need no mapping.")
        files = {t: st.file_uploader(f"{t} ({'required' if t in ('users', 'requests', 'impressions') else 'optional'})",
                                     type=["csv", "tsv", "parquet"], key=f"up_{t}")
                 for t in ("users", "requests", "impressions", "items", "sessions")}
        mapping_text = st.text_area("Column mapping (JSON, optional)",
                                    placeholder=json.dumps({"tables": {"impressions": {"is_click": "y_click"}},
                                                            "tasks": [{"name": "click", "kind": "binary"}]}))
        name = st.text_input("Name of the new log", value="uploaded")
        if st.form_submit_button("Import"):
            try:
                path = _import_uploads({t: f for t, f in files.items() if f is not None}, mapping_text, name)
                st.session_state[KEY_LOG] = path
                st.success(f"Imported into {path}")
            except LogError as exc:
                show_error(exc)
                st.stop()

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
