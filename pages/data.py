"""Data: pick the log, see whether it is valid, and what it holds."""

from pathlib import Path

import streamlit as st

import json

from mtf_core import plots
from mtf_core.access import check_path_allowed, check_upload_size
from mtf_core.errors import LogError
from mtf_core.overview import log_overview, scale_warning, score_scales
from mtf_core.profile import depth_text, profile_log
from mtf_core.schema import IDENTIFIER, validate
from mtf_core.store import import_uploads, log_info, open_log
from ui.common import (KEY_LOG, ROOT, cached_ab_readout, current_log, current_log_path, current_reward, ensure_demo,
                       load_log_checked, log_folders, name_log, page_setup, plain, show_error, show_table)

log_slot = page_setup()
st.title("Data")
st.caption("Choose a session log. The app only reads it; every page works on the log chosen here.")

UPLOADS = ROOT / "data" / "uploads"


def _import_uploads(files: dict, mapping_text: str, name: str) -> str:  # type: ignore[type-arg]
    """Import the uploaded tables into data/uploads/NAME.duckdb (messages name the uploaded files)."""
    if not IDENTIFIER.match(name):
        raise LogError(f"log name {name!r}: use lowercase letters, digits and underscores")
    target = UPLOADS / f"{name}.duckdb"
    if target.exists():  # the library's message points to the CLI's --force, which the app does not have
        raise LogError(f"a log named {name!r} was imported before ({target}): choose another name, or open it "
                       f"with '{SOURCES[1]}'")
    for upload in files.values():
        check_upload_size(upload.name, upload.size)
    uploads = {table: (upload.name, upload.getvalue()) for table, upload in files.items()}
    return str(import_uploads(uploads, target, mapping_text))


SOURCES = ["Demo (simulated)", "DuckDB file on this machine", "Upload CSV/Parquet files"]
KEY_SOURCE = "mtf_log_source"  # which way the session's log was chosen; survives leaving the page


def _use_log(path: str) -> None:
    """Make `path` the session's log, only once it loads (what `validate` refuses, the app refuses too)."""
    load_log_checked(path)
    st.session_state[KEY_LOG] = path


def _source_changed() -> None:
    st.session_state[KEY_SOURCE] = st.session_state["_log_source_widget"]
    if st.session_state[KEY_SOURCE] == SOURCES[0]:
        st.session_state[KEY_LOG] = ensure_demo()


if KEY_SOURCE not in st.session_state:
    st.session_state[KEY_SOURCE] = SOURCES[0] if current_log_path() == ensure_demo() else SOURCES[1]
source = st.radio("Log", SOURCES, index=SOURCES.index(st.session_state[KEY_SOURCE]), horizontal=True,
                  key="_log_source_widget", on_change=_source_changed)
if source == SOURCES[1]:
    with st.form("path_form"):
        typed = st.text_input("Path to a log: a .duckdb file or a Parquet lake folder (export-parquet)",
                              value=current_log_path(), key="_log_path_input")
        if st.form_submit_button("Use this log"):
            try:
                _use_log(str(check_path_allowed(typed.strip(), log_folders())))
            except LogError as exc:
                show_error(exc)
                st.stop()
elif source == SOURCES[2]:
    with st.form("upload_form"):
        st.caption("One file per table; columns named as in the schema need no mapping.")
        files = {t: st.file_uploader(f"{t} ({'required' if t in ('users', 'requests', 'impressions') else 'optional'})",
                                     type=["csv", "tsv", "parquet", "gz"], key=f"up_{t}")
                 for t in ("users", "requests", "impressions", "items", "sessions", "tasks")}
        mapping_text = st.text_area("Column mapping (JSON, optional)",
                                    placeholder=json.dumps({"tables": {"impressions": {"is_click": "y_click"}},
                                                            "tasks": [{"name": "click", "kind": "binary"}]}))
        name = st.text_input("Name of the new log", value="uploaded")
        if st.form_submit_button("Import"):
            try:
                path = _import_uploads({t: f for t, f in files.items() if f is not None}, mapping_text, name)
                _use_log(path)
                st.success(plain(f"Imported into {path}"))
            except LogError as exc:
                show_error(exc)
                st.stop()

path = current_log_path()
name_log(log_slot, path)  # the forms above may have just changed it


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


@st.cache_data(show_spinner=False)
def _score_scales(path: str, mtime: float) -> dict[str, float]:
    return score_scales(path)


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
st.success(plain(f"Valid log: {info.get('meta', {}).get('source', 'unknown source')}, "
                 f"time range {' to '.join(info.get('time_range', ['?', '?']))}"))
if info.get("meta", {}).get("numbered_ids"):
    st.caption(f"The import numbered these ids, which were text: {info['meta']['numbered_ids']}. Their original "
               "keys are in the log's table `id_keys`.")

log = current_log()
profile = profile_log(log)
st.subheader("How the weights were logged")
st.info(plain(f"Logging mode: {profile.mode}. What this log supports: {', '.join(profile.supports)}."), icon="ℹ️")
st.caption(profile.explanation[:1].upper() + profile.explanation[1:] + ".")
if profile.fusion_agreement is not None:
    st.caption(f"The logged weights' fusion of the logged scores reproduces the shown ranking in "
               f"{profile.fusion_agreement:.1%} of {profile.fusion_checked:,} requests.")
shown = depth_text(profile.shown_mean, profile.shown_min, profile.shown_max)
st.caption(shown[:1].upper() + shown[1:] + ".")
if profile.mode == "A/B buckets":
    arms = cached_ab_readout(path, mtime, current_reward(log).to_json())
    st.plotly_chart(plots.forest_plot(arms.rename(columns={"arm": "policy"}), "segment",
                                      "A/B read-out: each arm on its own traffic (mean reward per request, 95% CI)"),
                    width="stretch")
    show_table(arms, width="stretch", hide_index=True)
    st.caption("Differences are from each segment's control, the arm with the most users; intervals resample users.")

warning = scale_warning(_score_scales(path, mtime))
if warning:
    st.warning(plain(warning[:1].upper() + warning[1:] + "."))
tasks = [t["name"] for t in info["tasks"]]
ov = _overview(path, mtime)
st.plotly_chart(plots.feedback_by_position(ov.feedback_by_segment_position, tasks, log.segments), width="stretch")
left, right = st.columns(2)
left.plotly_chart(plots.session_length_histogram(ov.session_lengths, log.segments), width="stretch")
right.plotly_chart(plots.correlation_heatmap(ov.label_correlation), width="stretch")
st.plotly_chart(plots.score_distributions(ov.score_sample, tasks), width="stretch")
st.plotly_chart(plots.segment_sizes(ov.segment_sizes, log.segments), width="stretch")
with st.expander("Tasks and tables"):
    show_table(info["tasks"], width="stretch")
    st.json(tables)
