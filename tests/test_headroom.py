"""The headroom yardsticks: oracles found against the simulator's truth, and the gaps between them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import duckdb
import numpy as np
import pytest

from mtf_core.evaluate import evaluate_policy, prepare, target_actions
from mtf_core.headroom import evaluate_oracle, headroom, segment_oracle
from mtf_core.reward import RewardSpec
from mtf_core.simulate import SimConfig, generate
from mtf_core.store import load_log


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("headroom") / "small.duckdb"
    generate(SimConfig(n_users=150, sessions_per_user=3, n_items=600, seed=2), str(path))
    log = load_log(path)
    return path, prepare(log, RewardSpec.default(log.task_names))


def test_oracles_nest_and_gaps_carry_paired_intervals(small):
    _, ctx = small
    result = headroom(ctx, n_candidates=16, n_boot=200)
    value = {(r["oracle"], r["chosen_for"]): r for r in result.rows}
    assert len(value) == 7
    # Segments never interact and the per-segment search starts from every candidate, the global best among
    # them: per segment can only be at least as good, under the same random numbers.
    assert (value[("best vector per segment", "long-term")]["per_user"]
            >= value[("best global vector", "long-term")]["per_user"] - 1e-9)
    for name, v in result.gaps.items():
        low, high = result.gap_intervals[name]
        assert low <= v <= high, name
    for row in result.rows:
        assert row["per_user_ci"][0] <= row["per_user"] <= row["per_user_ci"][1]
    assert -1.0 <= result.spearman <= 1.0 and result.dm_error["linear"]["relative_error"] >= 0


def test_segment_oracle_beats_the_logging_blend_in_its_own_truth(small):
    _, ctx = small
    oracle = segment_oracle(ctx, n_candidates=16)
    assert oracle.shape == (len(ctx.log.segments), len(ctx.log.tasks))
    np.testing.assert_allclose(oracle.sum(1), 1.0)
    result = evaluate_oracle(ctx, n_boot=100)
    logging = evaluate_policy(ctx, target_actions(None, ctx.log, "logging"), n_boot=100)
    assert result.ground_truth["value"] > logging.ground_truth["value"]


def test_headroom_cli_json_and_refusal_of_non_simulator_logs(small, tmp_path):
    path, _ = small
    proc = subprocess.run([sys.executable, "-m", "mtf_core", "headroom", str(path), "--candidates", "8",
                           "--n-boot", "50", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert set(doc["gaps"]) == set(doc["gap_intervals"]) and len(doc["oracles"]) == 7
    imported = tmp_path / "imported.duckdb"
    shutil.copy(path, imported)
    con = duckdb.connect(str(imported))
    con.execute("UPDATE meta SET value = 'import: x' WHERE key = 'source'")
    con.close()
    proc = subprocess.run([sys.executable, "-m", "mtf_core", "headroom", str(imported)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "simulator log" in proc.stderr and "Traceback" not in proc.stderr
