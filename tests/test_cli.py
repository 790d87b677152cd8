"""The CLI as a user runs it: exit codes, messages without tracebacks, JSON on stdout."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import duckdb
import pytest

PY = [sys.executable, "-m", "mtf_core"]


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PY, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "g.duckdb"
    proc = run("generate", "--out", str(path), "--users", "60", "--seed", "7")
    assert proc.returncode == 0, proc.stderr
    return path


def test_generate_then_validate_exits_zero(generated):
    proc = run("validate", str(generated))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "valid" in proc.stdout


def test_generate_refuses_to_overwrite(generated):
    proc = run("generate", "--out", str(generated), "--users", "10")
    assert proc.returncode == 2 and "--force" in proc.stderr and "Traceback" not in proc.stderr


def test_corrupted_log_exits_one_naming_the_problem(generated, tmp_path):
    path = tmp_path / "bad.duckdb"
    shutil.copy(generated, path)
    con = duckdb.connect(str(path))
    con.execute("UPDATE impressions SET s_share = 3.0 WHERE request_id = 1")
    con.close()
    proc = run("validate", str(path))
    assert proc.returncode == 1
    assert "impressions.s_share" in proc.stdout and "Traceback" not in proc.stderr
    proc = run("validate", str(path), "--json")
    doc = json.loads(proc.stdout)
    assert proc.returncode == 1 and doc["problems"][0]["column"] == "s_share"


@pytest.mark.parametrize("content", [b"hello, not a database\n", b""])
def test_not_a_database_exits_two(tmp_path, content):
    path = tmp_path / "x.duckdb"
    path.write_bytes(content)
    proc = run("validate", str(path))
    assert proc.returncode == 2 and str(path) in proc.stderr and "Traceback" not in proc.stderr


def test_missing_file_exits_two(tmp_path):
    proc = run("validate", str(tmp_path / "nope.duckdb"))
    assert proc.returncode == 2 and "no such file" in proc.stderr


def test_info_json(generated):
    proc = run("info", str(generated), "--json")
    doc = json.loads(proc.stdout)
    assert proc.returncode == 0 and doc["tables"]["users"] == 60 and len(doc["tasks"]) == 5


def test_a_reader_that_stops_reading_is_not_an_error(generated):
    """`... | head`: the pipe closes under the command's output; that is the reader's choice, not a failure."""
    import os

    read, write = os.pipe()
    os.close(read)  # the reader has gone before the first line
    try:
        proc = subprocess.run([*PY, "info", str(generated)], stdout=write, stderr=subprocess.PIPE, text=True,
                              timeout=300)
    finally:
        os.close(write)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_evaluate_json_matches_the_documented_shape(generated):
    proc = run("evaluate", str(generated), "--policy", "static:click=0.3,like=0.3,finish=0.2,share=0.2",
               "--json", "--n-boot", "100")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert {"log", "policy", "reward", "n_requests", "metrics", "ope", "ground_truth"} <= set(doc)
    segments = {m["segment"] for m in doc["metrics"]}
    assert None in segments and len(segments) >= 4
    snips = [o for o in doc["ope"] if o["estimator"] == "snips" and o["segment"] is None][0]
    assert snips["ci_low"] <= snips["value"] <= snips["ci_high"] and snips["ess"] > 0
    assert doc["ground_truth"]["ci_low"] <= doc["ground_truth"]["value"] <= doc["ground_truth"]["ci_high"]
    assert doc["profile"]["mode"] == "known density" and doc["profile"]["fusion_agreement"] == 1.0


def test_help_for_every_command():
    for command in ("generate", "import", "validate", "info", "evaluate", "compare"):
        proc = run(command, "--help")
        assert proc.returncode == 0 and "usage" in proc.stdout


def test_train_then_evaluate_the_run(generated, tmp_path):
    runs = tmp_path / "runs"
    proc = run("train", str(generated), "--algo", "grade", "--steps", "20", "--set", "warm_start_steps=5",
               "--set", "batch_size=128", "--runs", str(runs), "--json")
    assert proc.returncode == 0, proc.stderr
    run_id = json.loads(proc.stdout)["run_id"]
    proc = run("evaluate", str(generated), "--policy", f"run:{run_id}", "--runs", str(runs), "--json", "--n-boot", "50")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["policy"] == f"run:{run_id}" and doc["ground_truth"]["value"] > 0
    # The run held out the latest 20% of sessions: by default it is judged on those, and says so.
    assert doc["sample"].startswith("held out: the latest 20% of sessions")
    assert doc["n_requests"] < json.loads(run("info", str(generated), "--json").stdout)["tables"]["requests"]
    proc = run("evaluate", str(generated), "--policy", f"run:{run_id}", "--runs", str(runs), "--json", "--n-boot",
               "50", "--sample", "all")
    assert json.loads(proc.stdout)["sample"].startswith("all ")


def test_train_rejects_a_bad_setting_without_traceback(generated, tmp_path):
    proc = run("train", str(generated), "--algo", "grade", "--set", "group_size=many", "--runs", str(tmp_path))
    assert proc.returncode == 2 and "group_size" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_run_is_a_clear_error(generated, tmp_path):
    proc = run("evaluate", str(generated), "--policy", "run:deadbeef", "--runs", str(tmp_path))
    assert proc.returncode == 2 and "no run 'deadbeef'" in proc.stderr


def test_compare_with_the_oracle_reports_shares_of_its_headroom(generated, tmp_path):
    proc = run("compare", str(generated), "--policy", "logging", "--policy", "static:like=0.5,finish=0.3,share=0.2",
               "--oracle", "--n-boot", "50", "--runs", str(tmp_path / "runs"), "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {row["policy"]: row for row in json.loads(proc.stdout)["policies"]}
    oracle = "oracle: best vector per segment"
    assert rows["logging"]["share_of_headroom"] == 0 and rows[oracle]["share_of_headroom"] == 1
    truth = {p: row["figures"]["truth_per_user"]["value"] for p, row in rows.items()}
    static = next(p for p in rows if p.startswith("static"))
    expected = (truth[static] - truth["logging"]) / (truth[oracle] - truth["logging"])
    assert rows[static]["share_of_headroom"] == pytest.approx(expected)
    # Each policy's paired per-user lift over the best global vector (the other yardstick found against the truth).
    best_global = "oracle: best global vector"
    lift = rows[static]["lift_over_best_static"]
    assert lift["difference"] == pytest.approx(truth[static] - truth[best_global])
    assert lift["difference_ci"][0] <= lift["difference"] <= lift["difference_ci"][1]
    assert rows[best_global]["lift_over_best_static"] is None


def test_generate_per_item_share_is_checked(tmp_path):
    proc = run("generate", "--out", str(tmp_path / "x.duckdb"), "--users", "10", "--per-item-share", "1.5")
    assert proc.returncode == 2 and "per_item_share" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, says", [
    (["--scroll-by-appeal"], "give both --scroll-by-appeal and a share above 0"),
    (["--short-scroll-share", "1", "--scroll-floor", "0.2"], "give both --scroll-by-appeal and a share above 0"),
    (["--short-scroll-share", "1", "--scroll-by-appeal", "--scroll-floor", "2"], "scroll_floor"),
])
def test_generate_scrolling_by_appeal_is_checked(tmp_path, args, says):
    proc = run("generate", "--out", str(tmp_path / "x.duckdb"), "--users", "10", *args)
    assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.duckdb").exists()


def test_a_cascade_feed_shows_fewer_candidates_where_its_users_scroll_less(tmp_path):
    """`--scroll-floor` is the chance of going on past an item nobody finishes: lower, shallower requests."""
    depths = []
    for floor in ("0", "0.9"):
        out = tmp_path / f"floor{floor}.duckdb"
        proc = run("generate", "--out", str(out), "--users", "60", "--short-scroll-share", "1", "--scroll-by-appeal",
                   "--scroll-floor", floor)
        assert proc.returncode == 0, proc.stderr
        depths.append(json.loads(run("info", str(out), "--json").stdout)["profile"]["shown_mean"])
    assert depths[0] < depths[1] < 6


def test_info_profiles_the_log_and_abtest_reads_out_only_ab_logs(generated, tmp_path):
    proc = run("info", str(generated), "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["profile"]["mode"] == "known density"
    proc = run("abtest", str(generated))
    assert proc.returncode == 1 and "not an A/B test log" in proc.stderr and "Traceback" not in proc.stderr
    ab = tmp_path / "ab.duckdb"
    assert run("generate", "--out", str(ab), "--users", "80", "--seed", "3", "--logging", "buckets").returncode == 0
    proc = run("abtest", str(ab), "--n-boot", "100", "--json")
    assert proc.returncode == 0, proc.stderr
    arms = json.loads(proc.stdout)["arms"]
    assert {a["segment"] for a in arms} == {"casual", "core", "new", "power"}
    assert all(a["ci_low"] <= a["value"] <= a["ci_high"] for a in arms)
    assert sum(a["control"] for a in arms) == 4


def test_a_log_locked_by_a_writer_is_named_as_such_not_as_unreadable(generated, tmp_path):
    locked = tmp_path / "locked.duckdb"
    shutil.copy(generated, locked)
    writer = duckdb.connect(str(locked))  # read-write: holds DuckDB's file lock until closed
    try:
        proc = run("info", str(locked), timeout=120)
    finally:
        writer.close()
    assert proc.returncode == 2 and "open for writing in another process" in proc.stderr
    assert "not a readable DuckDB database" not in proc.stderr and "Traceback" not in proc.stderr
