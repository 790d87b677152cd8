"""Each page under Streamlit's AppTest on the demo log: renders without exception, its main interaction works."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 240
TINY_GRADE = {"steps": 6, "warm_start_steps": 2, "batch_size": 64}


@pytest.fixture(autouse=True)
def isolated_runs(tmp_path_factory, monkeypatch):
    """All app tests share one run store of their own, never the user's runs/."""
    folder = tmp_path_factory.getbasetemp() / "app_runs"
    monkeypatch.setenv("MTF_RUNS_DIR", str(folder))
    return folder


def _run(page: str, at: AppTest | None = None) -> AppTest:
    at = at or AppTest.from_file(str(ROOT / page), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _train_tiny_run(name: str) -> None:
    at = _run("pages/train.py")
    for field, value in TINY_GRADE.items():
        [w for w in at.number_input if w.label == field][0].set_value(value)
    [w for w in at.text_input if w.label == "Run name"][0].set_value(name)
    at.button[0].click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("finished" in s.value for s in at.success)


def test_app_entry_point_renders_the_data_page():
    at = _run("app.py")
    assert not at.error
    assert any("Valid log" in s.value for s in at.success)


def test_data_page_shows_overview_charts():
    at = _run("pages/data.py")
    assert len(at.get("plotly_chart")) >= 4
    assert at.metric[0].label == "Requests"


def test_data_page_reports_a_bad_path_without_traceback(tmp_path):
    at = _run("pages/data.py")
    at.radio[0].set_value("DuckDB file on this machine").run()
    at.text_input[0].set_value(str(tmp_path / "missing.duckdb"))
    at.button[0].click().run()
    assert not at.exception
    assert any("no such file" in e.value for e in at.error)


def test_reward_slider_changes_the_preview():
    at = _run("pages/reward.py")
    before = at.metric[0].value
    [s for s in at.slider if s.label == "share"][0].set_value(5.0)
    at.run()
    assert not at.exception
    assert at.metric[0].value != before
    assert len(at.get("plotly_chart")) == 2


def test_training_a_tiny_run_lands_in_the_runs_table():
    _train_tiny_run("app-test-run")
    at = _run("pages/train.py")
    table = at.dataframe[0].value
    assert "app-test-run" in set(table["name"]) and set(table["status"]) == {"finished"}


def test_weights_page_shows_segment_plots_for_a_run():
    _train_tiny_run("weights-run")
    at = _run("pages/weights.py")
    assert len(at.get("plotly_chart")) >= 4  # mean weights, marginals, ternary, by feature


def test_compare_two_runs_and_build_the_report():
    _train_tiny_run("compare-a")
    _train_tiny_run("compare-b")
    at = _run("pages/compare.py")
    runs = [o for o in at.multiselect[0].options if "compare-" in o]
    at.multiselect[0].set_value(runs[:2])
    [s for s in at.select_slider][0].set_value(100)
    at.button[0].click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.get("plotly_chart")) >= 2
    report = AppTest.from_file(str(ROOT / "pages/report.py"), default_timeout=TIMEOUT)
    report.session_state["mtf_comparison"] = at.session_state["mtf_comparison"]
    report.session_state["mtf_log_path"] = at.session_state["mtf_log_path"]
    report.run()
    assert not report.exception
    results = at.session_state["mtf_comparison"]
    assert len(results) == 2 and all(r.ground_truth for r in results)
    html = report.session_state["mtf_report_html"]
    assert html.count('class="plotly-graph-div"') == 3
    assert "Plotly.newPlot" in html and "run:" in html
    assert html.count("<script") >= 3 and len(html) > 1_000_000  # plotly.js inlined: opens offline
