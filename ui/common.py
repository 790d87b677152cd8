"""Session-state keys, cached loaders and error display shared by every page.

Every page calls `page_setup()` first, so a page opened by its own URL on a fresh server works too.
"""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st

from mtf_core.errors import LogError
from mtf_core.store import LogData, load_log

ROOT = Path(__file__).resolve().parent.parent
DEMO_PATH = ROOT / "data" / "demo.duckdb"
RUNS_DIR = Path(os.environ.get("MTF_RUNS_DIR", ROOT / "runs"))

# Session-state keys, defined once.
KEY_LOG = "mtf_log_path"  # str: the log every page works on
KEY_REWARD = "mtf_reward_spec"  # RewardSpec JSON text chosen on the Reward page
KEY_LAST_RUN = "mtf_last_run"  # str: id of the run trained last in this session
KEY_COMPARISON = "mtf_comparison"  # list of EvaluationResult from the Compare page


@st.cache_resource(show_spinner="Generating the demo log (first start only)...")
def ensure_demo() -> str:
    """Generate `data/demo.duckdb` if absent (atomic, so concurrent sessions never see half a file)."""
    if not DEMO_PATH.exists():
        from mtf_core.simulate import SimConfig, generate

        try:
            generate(SimConfig(), str(DEMO_PATH))
        except LogError:
            if not DEMO_PATH.exists():  # another process won the race only if the file now exists
                raise
    return str(DEMO_PATH)


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0.0


@st.cache_resource(show_spinner="Loading the log...", max_entries=4)
def _cached_log(path: str, mtime: float) -> LogData:
    return load_log(path)


def current_log_path() -> str:
    path = st.session_state.get(KEY_LOG)
    if not path:
        path = ensure_demo()
        st.session_state[KEY_LOG] = path
    return str(path)


def current_log() -> LogData:
    path = current_log_path()
    return _cached_log(path, _mtime(path))


def page_setup() -> None:
    """Resolve the current log (the demo by default) and show it in the sidebar."""
    path = current_log_path()
    st.sidebar.caption(f"Log: `{Path(path).name}`")


def show_error(exc: Exception) -> None:
    """A user-facing error: the message, what to fix, no traceback."""
    st.error(f"{exc}")
