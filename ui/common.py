"""Session-state keys, cached loaders and error display shared by every page.

Every page calls `page_setup()` first, so a page opened by its own URL on a fresh server works too.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import duckdb
import pandas as pd
import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from mtf_core.errors import LogError
from mtf_core.evaluate import EvalContext, EvaluationResult, EvaluationSample
from mtf_core.reward import RewardSpec
from mtf_core.runs import RunStore
from mtf_core.store import LogData, load_log

ROOT = Path(__file__).resolve().parent.parent
DEMO_PATH = ROOT / "data" / "demo.duckdb"

# Session-state keys, defined once.
KEY_LOG = "mtf_log_path"  # str: the log every page works on
LINK_PARAM = "log"  # the URL's query parameter naming that log, so that a reload or a shared link keeps it
KEY_REWARD = "mtf_reward_spec"  # RewardSpec JSON text chosen on the Reward page
KEY_LAST_RUN = "mtf_last_run"  # str: id of the run trained last in this session
KEY_COMPARISON = "mtf_comparison"  # list of EvaluationResult from the Compare page
KEY_COMPARISON_FOR = "mtf_comparison_for"  # (log fingerprint, reward JSON) the comparison was computed for
KEY_REPORT_HTML = "mtf_report_html"  # str: the last HTML report built on the Report page


@st.cache_resource(show_spinner="Generating the demo log (first start only)...")
def ensure_demo() -> str:
    """Generate `data/demo.duckdb` if absent or made by an older simulator (atomic, so concurrent sessions
    never see half a file)."""
    from mtf_core.simulate import SimConfig, generate

    current = SimConfig()
    if not DEMO_PATH.exists() or _stored_config(DEMO_PATH) != current:
        try:
            generate(current, str(DEMO_PATH), force=True)
        except LogError:
            if not DEMO_PATH.exists():  # another process won the race only if the file now exists
                raise
    return str(DEMO_PATH)


def _stored_config(path: Path) -> object:
    """The simulator config a log was generated with, or None where it cannot be read."""
    from mtf_core.simulate import SimConfig
    from mtf_core.store import open_log

    try:
        con = open_log(path)
        try:
            row = con.execute("SELECT value FROM meta WHERE key = 'simulator_config'").fetchone()
        finally:
            con.close()
        return SimConfig.from_json(row[0]) if row else None
    except (LogError, ValueError, duckdb.Error):
        return None


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0.0


@st.cache_resource(show_spinner="Loading the log...", max_entries=4)
def _cached_log(path: str, mtime: float) -> LogData:
    return load_log(path)


def load_log_checked(path: str) -> LogData:
    """Load (cached per file version) a log a user picked; raises LogError for anything `validate` refuses."""
    return _cached_log(path, _mtime(path))


def current_log_path() -> str:
    """The log every page works on: the one chosen on the Data page; in a new session (a reload, a shared
    link) the one the URL names, else the demo. The URL names it too, so that a reload keeps it."""
    path = st.session_state.get(KEY_LOG)
    if not path:
        path = _log_from_link() or ensure_demo()
        st.session_state[KEY_LOG] = path
    _name_in_link(str(path))
    return str(path)


def log_folders() -> list[Path]:
    """Where a user may open logs from: MTF_DATA_DIRS and the app's data folder, or anywhere if unset."""
    from mtf_core.access import allowed_dirs

    return [*allowed_dirs(), ROOT / "data"] if allowed_dirs() else []


def _log_from_link() -> str | None:
    """The log the URL's `log` parameter names, where it is allowed and loads (else None, with a warning)."""
    from mtf_core.access import check_path_allowed

    named = st.query_params.get(LINK_PARAM)
    if not named:
        return None
    try:
        path = str(check_path_allowed(named, log_folders()))
        load_log_checked(path)
        return path
    except LogError as exc:
        st.sidebar.warning(plain(f"The link's log cannot be opened ({exc}); showing the demo log."))
        return None


def _name_in_link(path: str) -> None:
    if path == str(DEMO_PATH):
        st.query_params.pop(LINK_PARAM, None)
    elif st.query_params.get(LINK_PARAM) != path:
        st.query_params[LINK_PARAM] = path


def current_log() -> LogData:
    path = current_log_path()
    return _cached_log(path, _mtime(path))


def _through_app() -> None:
    """Make a direct link to a page run through `app.py`. On a freshly started server Streamlit still reads a
    `pages/` folder by its older automatic mechanism until the first run of `app.py` calls `st.navigation`:
    the first visitor of `/compare` got the page without `app.py` (file names as the menu, no page
    config). Switching that mechanism off and rerunning sends the run through `app.py`, which serves the
    page asked for."""
    try:  # Streamlit's own flag (pinned in requirements.txt); a release without it needs no help here
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:
        return
    if getattr(PagesManager, "uses_pages_directory", False):
        PagesManager.uses_pages_directory = False
        st.rerun()


def page_setup() -> DeltaGenerator:
    """Resolve the current log (the demo by default) and name it in the sidebar; returns that slot, which a
    page that changes the log refills (`name_log`), so that the sidebar never names the one before."""
    _through_app()
    slot = st.sidebar.empty()
    name_log(slot, current_log_path())
    return slot


def name_log(slot: DeltaGenerator, path: str) -> None:
    slot.caption(f"Log: `{Path(path).name}`")


_SETTING_WORDS = {"lr": "learning rate", "kl": "KL", "coef": "coefficient", "eps": "epsilon", "fqe": "FQE",
                  "n": "", "eval": "evaluation", "lmbda": "lambda", "tau": "tau (target update rate)"}


def setting_label(name: str) -> str:
    """A training setting's key as words for a form (`kl_coef` -> "KL coefficient", `lr` -> "Learning rate",
    `n_critics` -> "Critics")."""
    text = " ".join(filter(None, (_SETTING_WORDS.get(word, word) for word in name.split("_"))))
    return text[:1].upper() + text[1:]


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$])")
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def plain(text: object) -> str:
    """User content (file names, log metadata, messages that quote them) as literal text in Streamlit's
    markdown: an image link in a log's `source` must not make the browser fetch anything."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", str(text))


def spreadsheet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """The table with text cells that a spreadsheet would run as formulas (`=cmd|...`) quoted, since every
    table's CSV download carries them (OWASP's CSV-injection advice)."""
    out = frame.copy()
    for column in out.columns:
        if pd.api.types.is_object_dtype(out[column]) or pd.api.types.is_string_dtype(out[column]):
            out[column] = [f"'{v}" if isinstance(v, str) and v.startswith(_FORMULA_PREFIXES) else v
                           for v in out[column]]
    return out


def show_table(data: object, **kwargs: object) -> None:
    """`st.dataframe` of a table whose downloads are safe to open in a spreadsheet."""
    frame = data if isinstance(data, pd.DataFrame) else pd.DataFrame(data)
    st.dataframe(spreadsheet_safe(frame), **kwargs)  # type: ignore[arg-type]


def show_error(exc: Exception) -> None:
    """A user-facing error: the message, what to fix, no traceback (and no markdown from user content)."""
    st.error(plain(exc))


def runs_dir() -> Path:
    """The run store folder: $MTF_RUNS_DIR, else runs/ beside app.py."""
    return Path(os.environ.get("MTF_RUNS_DIR", ROOT / "runs"))


def run_store() -> RunStore:
    return RunStore(runs_dir())


def current_reward(log: LogData) -> RewardSpec:
    """The RewardSpec chosen on the Reward page, or the default; a spec that does not fit the log is reset."""
    text = st.session_state.get(KEY_REWARD)
    if text:
        try:
            spec = RewardSpec.from_json(text)
            spec.check_tasks(log.task_names)
            return spec
        except LogError as exc:
            st.warning(f"The saved reward does not fit this log ({exc}); using the default.")
    return RewardSpec.default(log.task_names)


@st.cache_data(show_spinner=False, max_entries=64)
def cached_evaluation(path: str, mtime: float, policy_ref: str, reward_json: str, runs: str, n_boot: int,
                      stochastic: bool, held_out_share: float | None = None) -> EvaluationResult:
    """Evaluate one policy (cached per log version, policy, reward, sample and settings)."""
    from mtf_core.evaluate import evaluate_policy, policy_for_truth, target_actions
    from mtf_core.policies.resolve import resolve_policy

    sample = cached_sample(path, mtime, reward_json, held_out_share)
    policy, label = resolve_policy(policy_ref, sample.ctx.log, runs)
    actions = target_actions(policy, sample.ctx.log, label, stochastic=stochastic)
    truth = None if policy is None else policy_for_truth(policy, actions.stochastic)
    return evaluate_policy(sample.ctx, actions, n_boot=n_boot, truth_policy=truth, sample=sample.description)


@st.cache_data(show_spinner="Reading out the A/B test...", max_entries=8)
def cached_ab_readout(path: str, mtime: float, reward_json: str) -> pd.DataFrame:
    """The A/B read-out of a bucketed log (see `abtest.ab_readout`)."""
    from mtf_core.abtest import ab_readout

    return ab_readout(cached_context(path, mtime, reward_json))


@st.cache_resource(show_spinner=False, max_entries=4)
def cached_oracle_evaluation(path: str, mtime: float, reward_json: str, n_boot: int,
                             held_out_share: float | None = None) -> EvaluationResult:
    """The per-segment oracle (found against the simulator's truth) evaluated on the same requests."""
    from mtf_core.headroom import evaluate_oracle

    sample = cached_sample(path, mtime, reward_json, held_out_share)
    return evaluate_oracle(sample.ctx, n_boot=n_boot, sample=sample.description)


@st.cache_data(show_spinner="Checking the direct models on held-out users...", max_entries=8)
def cached_outcome_fit(path: str, mtime: float, reward_json: str, held_out_share: float | None
                       ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """R^2 per segment and the calibration table of the direct models (see `evaluate.outcome_fit`)."""
    from mtf_core.evaluate import outcome_fit

    return outcome_fit(cached_sample(path, mtime, reward_json, held_out_share).ctx)


@st.cache_resource(show_spinner=False, max_entries=8)
def cached_sample(path: str, mtime: float, reward_json: str, held_out_share: float | None) -> EvaluationSample:
    """The requests an evaluation runs on: all, or the latest sessions held out from training."""
    from mtf_core.evaluate import evaluation_sample

    if not held_out_share:
        ctx = cached_context(path, mtime, reward_json)
        return EvaluationSample(ctx, False, f"all {ctx.log.n_requests:,} requests")
    return evaluation_sample(_cached_log(path, mtime), RewardSpec.from_json(reward_json), held_out_share)


@st.cache_resource(show_spinner=False, max_entries=8)
def cached_context(path: str, mtime: float, reward_json: str) -> EvalContext:
    """The log bound to a reward (normalisation, direct model), shared by every page and session."""
    from mtf_core.evaluate import prepare

    return prepare(_cached_log(path, mtime), RewardSpec.from_json(reward_json))


def store_comparison(results: list[EvaluationResult], log: LogData) -> None:
    """Keep a comparison with what it was computed for, so that no page shows it for another log or reward."""
    st.session_state[KEY_COMPARISON] = results
    st.session_state[KEY_COMPARISON_FOR] = (log.fingerprint, current_reward(log).to_json())


def current_comparison(log: LogData) -> list[EvaluationResult] | None:
    """The session's comparison if it was computed for this log and reward; a stale one is cleared, saying so."""
    results = st.session_state.get(KEY_COMPARISON)
    if results and st.session_state.get(KEY_COMPARISON_FOR) != (log.fingerprint, current_reward(log).to_json()):
        for key in (KEY_COMPARISON, KEY_COMPARISON_FOR, KEY_REPORT_HTML):
            st.session_state.pop(key, None)
        st.warning("The last comparison was computed for another log or reward, so it was cleared; run it again.")
        return None
    return results


def log_version() -> tuple[str, float]:
    path = current_log_path()
    return path, _mtime(path)


def policy_choices(log: LogData) -> dict[str, str]:
    """Label -> policy reference for every run on this log that has a policy to load (finished, or cancelled
    after its first checkpoint), after the logging policy."""
    choices = {"logging policy": "logging"}
    for run in run_store().list_runs():
        if (run.status in ("finished", "cancelled") and run.policy_sha256 is not None
                and run.data_fingerprint == log.fingerprint):
            choices[f"{run.name} ({run.algo}, {run.run_id})"] = f"run:{run.run_id}"
    return choices
