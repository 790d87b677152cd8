"""Each page under Streamlit's AppTest on the demo log: renders without exception, its main interaction works."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from ui.common import setting_label

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
    at = at if at is not None else AppTest.from_file(str(ROOT / page), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _choose_log(at: AppTest, path: Path) -> AppTest:
    """On the Data page: pick "DuckDB file on this machine", type the path and submit it."""
    at.radio[0].set_value("DuckDB file on this machine")
    at.run()
    at.text_input[0].set_value(str(path))
    at.button[0].click()
    at.run()
    if not at.error:  # the sidebar names the log the page now shows, in the run that chose it
        assert [c.value for c in at.sidebar.caption] == [f"Log: `{path.name}`"], at.sidebar.caption
    return at


def _train_tiny_run(name: str) -> None:
    at = _run("pages/train.py")
    for field, value in TINY_GRADE.items():
        [w for w in at.number_input if w.label == setting_label(field)][0].set_value(value)
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
    assert at.metric[0].value == before  # a slider alone recomputes nothing: the form waits for Apply
    [s for s in at.slider if s.label == "share"][0].set_value(5.0)
    next(b for b in at.button if b.label.startswith("Apply")).click()
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
    fit = next(e for e in at.expander if "its fit on held-out users" in e.label.replace("\\", ""))
    assert "DM and DR rest on the" in fit.label
    assert {"linear", "learned"} <= set(fit.dataframe[0].value.columns)  # R² of both models, per segment
    trust = next(df.value for df in at.dataframe if "verdicts" in df.value.columns)
    assert set(trust["depth_shift"]) == {"n/a"}  # every demo request shows 6: nothing for a policy to move
    report = AppTest.from_file(str(ROOT / "pages/report.py"), default_timeout=TIMEOUT)
    report.session_state["mtf_comparison"] = at.session_state["mtf_comparison"]
    report.session_state["mtf_comparison_for"] = at.session_state["mtf_comparison_for"]
    report.session_state["mtf_log_path"] = at.session_state["mtf_log_path"]
    report.run()
    assert not report.exception
    results = at.session_state["mtf_comparison"]
    assert len(results) == 2 and all(r.ground_truth for r in results)
    html = report.session_state["mtf_report_html"]
    assert html.count('class="plotly-graph-div"') == 3
    assert "Plotly.newPlot" in html and "run:" in html
    # A decision document: the recommendation first, verdicts and intervals, segment lifts, glossary, settings.
    assert "class='headline'" in html and "ecommendation" in html.split("</p>")[0]
    assert "Every policy's value, with 95% intervals and verdicts" in html and "by segment (" in html
    assert "<dt>DR</dt>" in html and "<th>setting</th>" in html and "trustworthy" in html
    assert "Truth by segment" in html and "compare-a (grade, run:" in html  # runs by name; truth where known
    assert html.count("<script") >= 3 and len(html) > 1_000_000  # plotly.js inlined: opens offline


def test_compare_shows_each_policys_share_of_the_oracles_headroom(tmp_path):
    from mtf_core.headroom import ORACLE_LABEL
    from mtf_core.simulate import SimConfig, generate

    path = tmp_path / "small.duckdb"
    generate(SimConfig(n_users=150, sessions_per_user=2, n_items=500, seed=5), str(path))
    at = AppTest.from_file(str(ROOT / "pages/compare.py"), default_timeout=TIMEOUT)
    at.session_state["mtf_log_path"] = str(path)
    at = _run("pages/compare.py", at)
    at.multiselect[0].set_value([])
    [w for w in at.text_input if "fixed weight" in w.label][0].set_value("like=0.5,finish=0.3,share=0.2")
    [w for w in at.checkbox if "headroom" in w.label][0].check()
    [s for s in at.select_slider][0].set_value(100)
    at.button[0].click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    results = at.session_state["mtf_comparison"]
    assert [r.policy for r in results][0] == "logging" and results[-1].policy == ORACLE_LABEL
    table = next(d.value for d in at.dataframe if "share of headroom" in d.value.columns)
    share = dict(zip(table["policy"], table["share of headroom"]))
    assert share["logging"] == 0 and share[ORACLE_LABEL] == 1
    assert results[-1].ground_truth["per_user"]["value"] > results[0].ground_truth["per_user"]["value"]


def test_data_page_profiles_an_ab_log_and_reads_out_its_arms(tmp_path, monkeypatch):
    from mtf_core.simulate import SimConfig, generate

    path = tmp_path / "ab.duckdb"
    generate(SimConfig(n_users=120, sessions_per_user=2, n_items=500, seed=5, logging_mode="buckets"), str(path))
    monkeypatch.setenv("MTF_DATA_DIRS", str(tmp_path))
    at = _choose_log(_run("pages/data.py"), path)
    assert not at.exception, [e.value for e in at.exception]
    assert any(i.value.startswith("Logging mode: A/B buckets") for i in at.info)
    arms = next(d.value for d in at.dataframe if "arm" in d.value.columns)
    assert len(arms) == 4 * 3 and arms["control"].sum() == 4


def test_data_page_says_which_ids_an_import_numbered(tmp_path, monkeypatch):
    from mtf_core.store import import_log

    (tmp_path / "users.csv").write_text("user_id,segment\nu_a,x\nu_b,y\n")
    (tmp_path / "requests.csv").write_text("request_id,session_id,user_id,step,ts,w_click,w_like\n"
                                           "r1,1,u_a,0,1767600000,0.4,0.6\nr2,2,u_b,0,1767600060,0.7,0.3\n")
    (tmp_path / "impressions.csv").write_text("request_id,item_id,position,s_click,s_like,y_click,y_like\n"
                                              "r1,7,0,0.5,0.2,1,0\nr1,8,1,0.3,0.1,0,0\nr2,7,0,0.6,0.4,0,1\n")
    path = import_log({t: str(tmp_path / f"{t}.csv") for t in ("users", "requests", "impressions")},
                      tmp_path / "text_ids.duckdb")
    monkeypatch.setenv("MTF_DATA_DIRS", str(tmp_path))
    at = _choose_log(_run("pages/data.py"), path)
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("numbered these ids, which were text: user_id,request_id" in c.value for c in at.caption)


def test_data_page_keeps_the_chosen_log_and_refuses_a_broken_one(tmp_path, monkeypatch):
    """Issue 19: a path that does not load never becomes the session's log, and revisiting the Data page keeps
    the log chosen there instead of switching back to the demo."""
    import shutil

    import duckdb

    from mtf_core.simulate import SimConfig, generate

    good, broken = tmp_path / "good.duckdb", tmp_path / "broken.duckdb"
    generate(SimConfig(n_users=60, sessions_per_user=2, n_items=300, seed=1), str(good))
    shutil.copy(good, broken)
    con = duckdb.connect(str(broken))
    con.execute("UPDATE impressions SET position = position + 1 WHERE position IS NOT NULL")
    con.close()
    monkeypatch.setenv("MTF_DATA_DIRS", str(tmp_path))
    at = _choose_log(_run("pages/data.py"), good)
    assert at.session_state["mtf_log_path"] == str(good)
    _choose_log(at, broken)
    assert any("position_gap" in e.value.replace("\\", "") for e in at.error)  # shown as literal text
    assert at.session_state["mtf_log_path"] == str(good)  # the broken path was refused, not stored
    revisit = AppTest.from_file(str(ROOT / "pages/data.py"), default_timeout=TIMEOUT)
    for key in ("mtf_log_path", "mtf_log_source"):
        revisit.session_state[key] = at.session_state[key]
    _run("pages/data.py", revisit)
    assert revisit.session_state["mtf_log_path"] == str(good)
    assert revisit.radio[0].value == "DuckDB file on this machine"


def test_the_url_keeps_the_chosen_log_across_a_reload_and_refuses_one_it_may_not_open(tmp_path, monkeypatch):
    """A reload or a shared link is a new session: the log chosen on the Data page is named in the URL
    (`?log=...`), and a new session opens it; a link to a log outside the allowed folders, or one that does not
    load, is refused with a warning and the demo is shown."""
    from mtf_core.simulate import SimConfig, generate

    good = tmp_path / "good.duckdb"
    generate(SimConfig(n_users=60, sessions_per_user=2, n_items=300, seed=1), str(good))
    monkeypatch.setenv("MTF_DATA_DIRS", str(tmp_path))
    at = _choose_log(_run("pages/data.py"), good)
    assert at.query_params["log"] == str(good)
    reload = AppTest.from_file(str(ROOT / "pages/compare.py"), default_timeout=TIMEOUT)
    reload.query_params["log"] = str(good)
    _run("pages/compare.py", reload)
    assert reload.session_state["mtf_log_path"] == str(good)
    assert [c.value for c in reload.sidebar.caption] == ["Log: `good.duckdb`"]
    elsewhere = tmp_path.parent / "elsewhere.duckdb"
    for link in (str(elsewhere), str(tmp_path / "missing.duckdb")):
        refused = AppTest.from_file(str(ROOT / "pages/compare.py"), default_timeout=TIMEOUT)
        refused.query_params["log"] = link
        _run("pages/compare.py", refused)
        assert refused.session_state["mtf_log_path"].endswith("demo.duckdb")
        assert any("cannot be opened" in w.value for w in refused.sidebar.warning), link
        assert "log" not in refused.query_params


def test_reward_widgets_show_the_sessions_spec():
    """One owner: the session's reward spec sets every control (a loaded spec no longer leaves the sliders at their
    old values), and the preview follows the controls."""
    from mtf_core.reward import RewardSpec

    coefficients = {"click": 0.0, "like": 2.5, "finish": 0.0, "share": 4.0, "watch_time": 0.0}
    spec = RewardSpec(coefficients=coefficients, normalize=False, returned=3.0, vertex_penalty=6.0)
    at = AppTest.from_file(str(ROOT / "pages/reward.py"), default_timeout=TIMEOUT)
    at.session_state["mtf_reward_spec"] = spec.to_json()
    _run("pages/reward.py", at)
    sliders = {s.label: s.value for s in at.slider}
    assert sliders["like"] == 2.5 and sliders["share"] == 4.0 and sliders["click"] == 0.0
    assert sliders["When the user comes back the next day"] == 3.0
    assert not [c for c in at.checkbox if c.label.startswith("Divide")][0].value
    assert RewardSpec.from_json(at.session_state["mtf_reward_spec"]) == spec


def test_user_content_is_shown_as_text_and_downloads_are_spreadsheet_safe():
    import pandas as pd

    from ui.common import plain, spreadsheet_safe

    source = "import: ![x](http://evil.example/p.png) **bold** [link](javascript:alert(1))"
    escaped = plain(source)
    assert "![" not in escaped and "](" not in escaped and "**" not in escaped
    assert escaped.replace("\\", "") == source  # only escapes were added
    frame = pd.DataFrame({"segment": ["=cmd|' /C calc'!A0", "+1", "-2", "@SUM(A1)", "casual"], "n": [1, 2, 3, 4, 5]})
    safe = spreadsheet_safe(frame)
    assert list(safe["segment"]) == ["'=cmd|' /C calc'!A0", "'+1", "'-2", "'@SUM(A1)", "casual"]
    assert list(safe["n"]) == [1, 2, 3, 4, 5] and list(frame["segment"])[0].startswith("=")
