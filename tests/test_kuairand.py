"""Real data: the KuaiRand sample in ../shared/data/kuairand (CC BY-SA 4.0, see its NOTICE.md) through the
importer, the MTL scoring step, evaluation, training and the CLI; logs without logged fusion weights."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import duckdb
import numpy as np
import pytest

from mtf_core.errors import LogError
from mtf_core.evaluate import evaluate_policy, prepare, target_actions
from mtf_core.kuairand import KuaiRandConfig, import_kuairand
from mtf_core.policies.train import TrainConfig, scaled_budget, train
from mtf_core.profile import profile_log
from mtf_core.reward import RewardSpec
from mtf_core.schema import validate
from mtf_core.scoring import ScoringConfig, fit_scores, score_log
from mtf_core.store import load_log, open_log

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT.parent / "shared" / "data" / "kuairand"
LOG_CSV = SAMPLE / "log_random_4_22_to_5_08_1k.head.csv"
USERS_CSV = SAMPLE / "user_features_pure.csv"
VIDEOS_CSV = SAMPLE / "video_features_basic_pure.csv"

pytestmark = pytest.mark.skipif(not LOG_CSV.exists(), reason="the shared KuaiRand sample is not beside the checkout")


@pytest.fixture(scope="module")
def kuairand_log(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("kuairand") / "kuairand.duckdb"
    report = import_kuairand([LOG_CSV], USERS_CSV, VIDEOS_CSV, out)
    return out, report


def test_the_imported_sample_validates_and_says_where_it_came_from(kuairand_log):
    path, report = kuairand_log
    con = open_log(path)
    try:
        assert validate(con) == []
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        n_impressions = con.execute("SELECT count(*) FROM impressions").fetchone()[0]
        weights = con.execute("SELECT count(*) FROM requests WHERE w_click IS NOT NULL").fetchone()[0]
        thresholds = dict(con.execute("SELECT name, threshold FROM tasks").fetchall())
    finally:
        con.close()
    assert n_impressions == 909 == report.n_impressions
    assert meta["licence"] == "CC BY-SA 4.0" and "KuaiRand" in meta["source"] and "CIKM 2022" in meta["attribution"]
    assert meta["random_exposure"] == "true" and meta["logged_weights"] == "unknown" and weights == 0
    assert "Attribution-ShareAlike" in Path(str(path) + ".NOTICE.md").read_text()
    # Tasks with enough positives kept, the rest dropped and said so; a continuous task has its GAUC threshold.
    assert [t["name"] for t in report.tasks] == ["click", "long_view", "play_time"]
    assert any(d.startswith("like (is_like): 1 of 909") for d in report.dropped)
    assert thresholds["click"] is None and thresholds["play_time"] > 0
    assert set(report.segments) == {"full_active", "high_active", "middle_active", "2_14_day_new"}


def test_requests_hold_consecutive_impressions_of_one_user_in_time_order(kuairand_log):
    path, report = kuairand_log
    con = open_log(path)
    try:
        bad_positions = con.execute(
            "SELECT count(*) FROM (SELECT request_id, min(position) AS lo, max(position) AS hi, count(*) AS n "
            "FROM impressions GROUP BY request_id) WHERE lo <> 0 OR hi <> n - 1 OR n > 6").fetchone()[0]
        users_per_session = con.execute(
            "SELECT max(k) FROM (SELECT session_id, count(DISTINCT user_id) AS k FROM requests GROUP BY 1)"
        ).fetchone()[0]
        returned = con.execute("SELECT count(*) FILTER (WHERE returned), count(*) FILTER (WHERE NOT returned), "
                               "count(*) FILTER (WHERE returned IS NULL) FROM sessions").fetchone()
    finally:
        con.close()
    assert bad_positions == 0 and users_per_session == 1
    assert returned[0] > 0 and returned[1] > 0  # both outcomes occur in 17 days of a user's sessions


def test_the_scoring_step_beats_a_constant_predictor_on_held_out_rows(kuairand_log):
    _, report = kuairand_log
    quality = {q["task"]: q for q in report.scoring["tasks"]}
    assert "no score saw its own label" in report.scoring["setup"]
    for task in ("click", "long_view", "play_time"):
        assert quality[task]["loss"] < quality[task]["constant_loss"], quality[task]
    assert quality["click"]["value"] > 0.6 and quality["long_view"]["value"] > 0.6  # held-out AUC
    assert quality["play_time"]["value"] > 0.1  # held-out correlation


def test_cross_fitting_never_scores_a_row_with_a_network_that_saw_its_label():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 3))
    y = (rng.random((600, 1)) < 0.3).astype(float)  # labels independent of the features
    result = fit_scores(x, y, ("click",), ("binary",), np.arange(600) // 6, ScoringConfig(max_epochs=200))
    # A network that had seen the labels could memorise them; out of fold, noise scores at chance.
    assert abs(result.quality[0].value - 0.5) < 0.08


def test_a_log_without_fusion_weights_supports_the_direct_model_and_re_ranking_only(kuairand_log):
    path, _ = kuairand_log
    log = load_log(path)
    assert not log.weights_known
    profile = profile_log(log)
    assert profile.mode == "no fusion weights logged" and profile.random_exposure
    assert not any("IPS" in s for s in profile.supports)
    ctx = prepare(log, RewardSpec.default(log.task_names))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "All-NaN slice" or division warnings
        logged = evaluate_policy(ctx, target_actions(None, log, "logging"), n_boot=100)
    # The logged policy's re-ranking is the shown order itself: its NDCG reproduces the shown ranking's.
    gauc = {r["task"]: r for r in logged.metrics if r["name"] == "gauc" and r["segment"] is None}
    low, high = gauc["play_time"]["ci_low"], gauc["play_time"]["ci_high"]
    assert low is not None and high is not None and high - low > 0.01  # continuous GAUC no longer degenerate
    cem = train(TrainConfig("cem", 0, {"iterations": 3}), log, RewardSpec.default(log.task_names))
    result = evaluate_policy(ctx, target_actions(cem.policy, log, "cem"), n_boot=100)
    estimators = {r["estimator"] for r in result.ope}
    assert estimators == {"dm"}, estimators  # no importance weighting without logged weights
    assert any("no fusion weights" in n for n in result.notes)


def test_algorithms_that_learn_from_logged_weights_refuse_such_a_log_by_name(kuairand_log):
    path, _ = kuairand_log
    log = load_log(path)
    with pytest.raises(LogError, match="batchrl cannot train on this log.*records no fusion weights"):
        train(TrainConfig("batchrl"), log, RewardSpec.default(log.task_names))


def test_training_budgets_follow_the_logs_size():
    small, note = scaled_budget("batchrl", {}, 300)
    assert small["batch_size"] == 300 and small["steps"] == 50 and "300 training requests" in note
    assert scaled_budget("batchrl", {}, 100_000) == ({}, None)  # large logs keep the defaults
    kept, _ = scaled_budget("grade", {"steps": 7}, 300)
    assert kept["steps"] == 7  # what the user set is kept


def test_compare_all_on_the_sample_finishes_and_skips_what_it_cannot_train(kuairand_log, tmp_path):
    path, _ = kuairand_log
    done = subprocess.run([sys.executable, "-m", "mtf_core", "compare", str(path), "--algo", "all", "--runs",
                           str(tmp_path / "runs"), "--n-boot", "100", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "skipping static, batchrl, integrated, enhanced" in done.stderr
    rows = json.loads(done.stdout)["algorithms"]
    assert {r["policy"] for r in rows} == {"logging", "cem", "grade"}
    assert all(r["dm"]["value"] is not None for r in rows)


def test_the_score_command_rescores_any_log_and_reports_quality(tiny_log_path, tmp_path):
    out = tmp_path / "scored.duckdb"
    done = subprocess.run([sys.executable, "-m", "mtf_core", "score", str(tiny_log_path), "--out", str(out),
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["problems"] == [] and len(report["tasks"]) == 5
    before, after = load_log(tiny_log_path), load_log(out)
    assert np.array_equal(np.nan_to_num(before.labels), np.nan_to_num(after.labels))
    assert not np.allclose(before.scores[before.mask], after.scores[after.mask])
    # Trained on other traffic (here: the same world's log) and applied, as xMTF did on KuaiRand.
    trained = score_log(tiny_log_path, tmp_path / "transfer.duckdb", train_log=tiny_log_path)
    assert "other traffic" in trained.setup


def test_importer_errors_name_the_file_and_the_problem(tmp_path):
    broken = tmp_path / "log.csv"
    broken.write_text("user_id,video_id\n1,2\n")
    with pytest.raises(LogError, match=r"log\.csv: missing column\(s\) time_ms"):
        import_kuairand([broken], USERS_CSV, VIDEOS_CSV, tmp_path / "out.duckdb")
    with pytest.raises(LogError, match="no column 'nope' to take segments from"):
        import_kuairand([LOG_CSV], USERS_CSV, VIDEOS_CSV, tmp_path / "out.duckdb", config=KuaiRandConfig("nope"))
    with pytest.raises(LogError, match="missing.csv: no such file"):
        import_kuairand([tmp_path / "missing.csv"], USERS_CSV, VIDEOS_CSV, tmp_path / "out.duckdb")
    lines = LOG_CSV.read_text().splitlines()
    bad_value = lines[30].split(",")
    bad_value[12] = "oops"  # play_time_ms
    broken.write_text("\n".join([*lines[:30], ",".join(bad_value)]) + "\n")
    with pytest.raises(LogError, match=r"log\.csv: column 'play_time_ms' must be a number: row 30 \('oops'\)"):
        import_kuairand([broken], USERS_CSV, VIDEOS_CSV, tmp_path / "out.duckdb")
    broken.write_text(lines[0] + "\n")
    with pytest.raises(LogError, match="has a header but no rows"):
        import_kuairand([broken], USERS_CSV, VIDEOS_CSV, tmp_path / "out.duckdb")
    assert not (tmp_path / "out.duckdb").exists()


def test_a_request_logs_all_its_weights_or_none(kuairand_log, tmp_path):
    path, _ = kuairand_log
    copy = tmp_path / "partial.duckdb"
    copy.write_bytes(path.read_bytes())
    con = duckdb.connect(str(copy))
    try:
        con.execute("UPDATE requests SET w_click = 0.5 WHERE request_id = 3")
        problems = validate(con)
    finally:
        con.close()
    bad = [p for p in problems if p.kind == "bad_weight"]
    assert [p.column for p in bad] == ["w_long_view", "w_play_time"]  # NULL beside a known weight
    assert "all its weights or none" in bad[0].message and "request_id=3 w_long_view=NULL" in bad[0].examples


def test_every_page_of_the_app_opens_on_the_imported_sample(kuairand_log, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    path, _ = kuairand_log
    monkeypatch.setenv("MTF_RUNS_DIR", str(tmp_path / "runs"))
    data = AppTest.from_file(str(ROOT / "pages/data.py"), default_timeout=240)
    data.run()
    data.radio[0].set_value("DuckDB file on this machine").run()
    data.text_input[0].set_value(str(path))
    data.button[0].click().run()
    assert not data.exception and not data.error and not data.warning
    assert any("no fusion weights logged" in i.value for i in data.info)
    assert "2022-04-22 08:21:06 to 2022-05-08 14:56:08" in data.success[0].value.replace("\\", "")  # no microseconds
    state: dict[str, object] = {"mtf_log_path": str(path)}
    for page in ("reward", "train", "weights", "compare", "report"):
        at = AppTest.from_file(str(ROOT / f"pages/{page}.py"), default_timeout=240)
        for key, value in state.items():
            at.session_state[key] = value
        at.run()
        assert not at.exception, (page, [e.value for e in at.exception])
        assert not at.error and not at.warning, (page, [e.value for e in [*at.error, *at.warning]])
        if page == "train":
            [w for w in at.selectbox if w.label == "Algorithm"][0].set_value("cem")
            at.run()
            at.button[0].click().run()
            assert not at.exception and any("finished" in s.value for s in at.success)
        if page == "compare":
            at.button[0].click().run()
            assert not at.exception and not at.error
            state.update({k: at.session_state[k] for k in ("mtf_comparison", "mtf_comparison_for")})


def test_scores_trained_on_other_traffic_as_in_xmtf(tmp_path):
    lines = LOG_CSV.read_text().splitlines()
    train_csv, log_csv = tmp_path / "standard.csv", tmp_path / "random.csv"
    train_csv.write_text("\n".join([lines[0], *lines[1:500]]) + "\n")  # the earlier impressions as "traffic"
    log_csv.write_text("\n".join([lines[0], *lines[500:]]) + "\n")
    report = import_kuairand([log_csv], USERS_CSV, VIDEOS_CSV, tmp_path / "out.duckdb", train_logs=[train_csv],
                             config=KuaiRandConfig(min_positives=5))
    assert report.scoring["setup"].startswith("trained on 499 rows of other traffic")
    con = open_log(tmp_path / "out.duckdb")
    try:
        assert validate(con) == [] and "standard.csv" in dict(con.execute("SELECT * FROM meta").fetchall())["source"]
    finally:
        con.close()
    with pytest.raises(LogError, match="given as --log and as --train-log"):
        import_kuairand([log_csv], USERS_CSV, VIDEOS_CSV, tmp_path / "again.duckdb", train_logs=[log_csv])
