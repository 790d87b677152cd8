"""Each page under Streamlit's AppTest on the demo log: renders without exception, its main interaction works."""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 180


def _run(page: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / page), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


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
