"""A log as a folder of Parquet files per table (a data lake's layout): exported, and read as a log by every
command with the same arrays, fingerprint and figures as the DuckDB file it came from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mtf_core.errors import LogError
from mtf_core.evaluate import evaluate_policy, prepare, target_actions
from mtf_core.lake import export_lake, is_lake, lake_files
from mtf_core.policies.static import parse_static
from mtf_core.reward import RewardSpec
from mtf_core.schema import validate
from mtf_core.store import load_log, open_log

ROOT = Path(__file__).resolve().parent.parent
ARRAYS = ("request_id", "session_id", "user_id", "step", "ts", "segment", "user_features", "context", "weights",
          "logging_logp", "scores", "labels", "positions", "mask", "item_features", "continued", "returned")


@pytest.fixture(scope="module")
def lake(tiny_log_path, tmp_path_factory):
    return export_lake(tiny_log_path, tmp_path_factory.mktemp("lake") / "tiny", shards=3)


def test_a_lake_is_sharded_by_user_and_reads_back_as_the_same_log(tiny_log_path, tiny_log, lake):
    assert is_lake(lake) and len(lake_files(lake, "impressions")) == 3 and len(lake_files(lake, "meta")) == 1
    con = open_log(lake)
    try:
        assert validate(con) == []
        # A shard holds whole users: no user's requests are split over two shards.
        split = con.execute("SELECT count(*) FROM (SELECT user_id FROM read_parquet(?, filename = true) "
                            "GROUP BY user_id HAVING count(DISTINCT filename) > 1)",
                            [[str(f) for f in lake_files(lake, "requests")]]).fetchone()[0]
    finally:
        con.close()
    assert split == 0
    again = load_log(lake)
    assert again.fingerprint == tiny_log.fingerprint and again.tasks == tiny_log.tasks
    assert again.segments == tiny_log.segments and dict(again.meta) == dict(tiny_log.meta)
    for name in ARRAYS:
        a, b = getattr(tiny_log, name), getattr(again, name)
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), name


def test_negative_user_ids_shard_into_the_same_folders_in_a_fixed_order(corrupt, tmp_path):
    """SQL's % keeps the dividend's sign: user -7 of a 3-shard lake once went to `shard=-1`, and every
    negative shard sorted as one, in an order that changed between processes (the order shards' sums are
    added in). Every user now lands in shard 0..n-1, and shard names sort by number, then by name."""
    from mtf_core.lake import _shard_key, lake_shards

    path = corrupt(*(f"UPDATE {t} SET user_id = -user_id - 1" for t in ("users", "sessions", "requests")))
    lake = export_lake(path, tmp_path / "negative", shards=3)
    assert lake_shards(lake) == ["shard=0", "shard=1", "shard=2"]
    log, again = load_log(path), load_log(lake)
    assert (log.user_id < 0).all() and again.fingerprint == log.fingerprint
    assert np.array_equal(np.sort(again.user_id), np.sort(log.user_id))
    assert sorted(["shard=x", "shard=10", "shard=-2", "shard=2", "shard=b"], key=_shard_key) == [
        "shard=-2", "shard=2", "shard=10", "shard=b", "shard=x"]


def test_every_figure_on_a_lake_equals_the_duckdb_files(tiny_log, lake):
    spec = RewardSpec.default(tiny_log.task_names)
    policy = parse_static("click=0.4,like=0.1,finish=0.2,share=0.1,watch_time=0.2", tiny_log.task_names,
                          tiny_log.segments)
    results = []
    for log in (tiny_log, load_log(lake)):
        ctx = prepare(log, spec, outcome_model="linear")
        results.append(evaluate_policy(ctx, target_actions(policy, log, "static"), n_boot=100))
    file_result, lake_result = (json.dumps(r.to_json(), sort_keys=True, default=str) for r in results)
    assert file_result.replace(str(tiny_log.path), "LOG") == lake_result.replace(str(load_log(lake).path), "LOG")


def test_export_parquet_from_the_command_line_and_its_refusals(tiny_log_path, tmp_path):
    out = tmp_path / "lake"
    done = subprocess.run([sys.executable, "-m", "mtf_core", "export-parquet", str(tiny_log_path), "--out", str(out),
                           "--shards", "2", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["files"]["requests"] == 2
    info = subprocess.run([sys.executable, "-m", "mtf_core", "validate", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert info.returncode == 0 and "valid" in info.stdout
    with pytest.raises(LogError, match="already exists"):
        export_lake(tiny_log_path, out)
    (tmp_path / "notes").mkdir()
    with pytest.raises(LogError, match="exists and is not a lake"):
        export_lake(tiny_log_path, tmp_path / "notes", force=True)
    with pytest.raises(LogError, match="is a directory, not a DuckDB log nor a Parquet lake"):
        open_log(tmp_path / "notes")
    assert not list(tmp_path.glob(".*tmp-*"))  # nothing half-written left behind


def test_a_reproducible_sample_of_whole_users_reads_the_same_from_a_file_and_a_lake(tiny_log_path, tiny_log, lake):
    sample = load_log(tiny_log_path, user_sample=0.3)
    again = load_log(lake, user_sample=0.3)
    users = np.unique(sample.user_id)
    assert 0.15 < len(users) / len(np.unique(tiny_log.user_id)) < 0.45
    for name in ARRAYS:  # the same users, requests and candidates whichever form the log is in
        a, b = getattr(sample, name), getattr(again, name)
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), name
    whole = np.isin(tiny_log.user_id, users)
    assert sample.n_requests == int(whole.sum())  # every request of a sampled user, none of the others
    assert sample.fingerprint == tiny_log.fingerprint and sample.meta["user_sample"] == "0.3"
    other = load_log(tiny_log_path, user_sample=0.3, sample_seed=1)
    assert set(np.unique(other.user_id)) != set(users)
    with pytest.raises(LogError, match="a share of the users"):
        load_log(tiny_log_path, user_sample=0.0)


def test_training_on_a_user_sample_records_it_with_the_run(lake, tmp_path):
    done = subprocess.run([sys.executable, "-m", "mtf_core", "train", str(lake), "--algo", "cem", "--steps", "2",
                           "--sample-users", "0.5", "--runs", str(tmp_path / "runs"), "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)
    assert run["config"]["user_sample"] == 0.5 and run["notes"][0].startswith("trained on a 50% sample")


def test_the_app_reads_a_lake_by_its_folder(lake, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MTF_RUNS_DIR", str(tmp_path / "runs"))
    data = AppTest.from_file(str(ROOT / "pages" / "data.py"), default_timeout=240)
    data.run()
    data.radio[0].set_value("DuckDB file on this machine").run()
    data.text_input[0].set_value(str(lake))
    data.button[0].click().run()
    assert not data.exception and not data.error
    assert any("Valid log" in s.value for s in data.success) and data.session_state["mtf_log_path"] == str(lake)
    compare = AppTest.from_file(str(ROOT / "pages" / "compare.py"), default_timeout=240)
    compare.session_state["mtf_log_path"] = str(lake)
    compare.run()
    compare.button[0].click().run()
    assert not compare.exception and not compare.error and len(compare.get("plotly_chart")) >= 2
