"""Production logs: the log profile, estimated and mixture propensities, and the A/B read-out."""

from __future__ import annotations

import shutil

import duckdb
import numpy as np
import pytest

from mtf_core.evaluate import evaluate_policy, policy_for_truth, prepare, target_actions
from mtf_core.policies.static import parse_static
from mtf_core.reward import RewardSpec, request_reward
from mtf_core.simulate import SimConfig, bucket_weights, generate, run_weight_tables, user_table
from mtf_core.store import load_log

NEAR = "click=0.3,like=0.25,finish=0.2,share=0.1,watch_time=0.15"


def _log(tmp_path_factory, mode: str, **kw):
    path = tmp_path_factory.mktemp(mode) / f"{mode}.duckdb"
    config = SimConfig(n_users=300, sessions_per_user=3, n_items=800, seed=6, logging_mode=mode, **kw)
    generate(config, str(path))
    return path, config


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    made = {mode: _log(tmp_path_factory, mode, exploration_share=0.3)
            for mode in ("dirichlet", "deterministic", "buckets", "mixed")}
    path, config = made["dirichlet"]
    no_density = path.with_name("no_density.duckdb")
    shutil.copy(path, no_density)
    con = duckdb.connect(str(no_density))
    con.execute("UPDATE requests SET logging_logp = NULL")
    con.close()
    made["no_density"] = (no_density, config)
    return made


def _evaluate(path, text=NEAR):
    log = load_log(path)
    ctx = prepare(log, RewardSpec.default(log.task_names))
    policy = parse_static(text, log.task_names, log.segments)
    result = evaluate_policy(ctx, target_actions(policy, log, policy.label), n_boot=200,
                             truth_policy=policy_for_truth(policy, False))
    return ctx, result


@pytest.mark.parametrize("mode, expected, estimators", [
    ("dirichlet", "known density", {"ips", "snips", "ncis", "dr", "dm"}),
    ("mixed", "mixed", {"ips", "snips", "ncis", "dr", "dm"}),
    ("no_density", "stochastic, density unknown", {"ips", "snips", "ncis", "dr", "dm"}),
    ("deterministic", "deterministic", {"dm"}),
    ("buckets", "A/B buckets", {"dm"}),
])
def test_each_logging_mode_gets_the_estimators_it_supports(logs, mode, expected, estimators):
    ctx, result = _evaluate(logs[mode][0])
    assert ctx.profile.mode == expected
    assert {o["estimator"] for o in result.ope} == estimators
    rows = [o for o in result.ope if o["segment"] is None]
    if estimators == {"dm"}:
        assert rows[0]["verdict"] == "model-based" and "never logged" in result.notes[0]
    else:
        source = {"dirichlet": "logged", "mixed": "logged (explored share)"}.get(mode, "estimated")
        assert all(o["propensities"].startswith(source) for o in rows if o["estimator"] != "dm")
        assert all(o["model"] for o in rows if o["estimator"] in ("dm", "dr"))


def test_dr_with_estimated_propensities_lands_within_the_interval_of_dr_with_the_true_ones(logs):
    _, true = _evaluate(logs["dirichlet"][0])
    ctx, estimated = _evaluate(logs["no_density"][0])
    fit = ctx.propensities.fit
    assert set(fit) == {f"held-out log-likelihood per request: {m}"
                        for m in ("per-segment Dirichlet", "feature-conditioned Dirichlet")}
    dr_true, dr_estimated = true.estimate("dr"), estimated.estimate("dr")
    assert dr_true["ci_low"] <= dr_estimated["value"] <= dr_true["ci_high"]
    assert any("estimated" in n for n in estimated.notes)
    # The per-segment fit recovers the simulator's own Dirichlet: its density is close to the logged one.
    logged = load_log(logs["dirichlet"][0]).logging_logp
    assert np.corrcoef(ctx.propensities.logp, logged)[0, 1] > 0.95


def test_mixture_ratios_average_one_and_cover_the_truth(logs):
    ctx, result = _evaluate(logs["mixed"][0])
    explored = np.isfinite(load_log(logs["mixed"][0]).logging_logp)
    assert np.all(result.ratios[~explored] < 1e-200)  # production requests: a smooth target never takes them
    assert abs(result.ratios.mean() - 1) < 0.3
    dr, truth = result.estimate("dr"), result.ground_truth["value"]
    assert dr["ci_low"] <= truth <= dr["ci_high"]


def test_ab_readout_reads_each_arm_on_its_own_traffic(logs):
    from mtf_core.abtest import ab_readout

    path, config = logs["buckets"]
    log = load_log(path)
    ctx = prepare(log, RewardSpec.default(log.task_names))
    table = ab_readout(ctx, n_boot=300)
    assert len(table) == len(log.segments) * config.n_buckets
    assert (table["users_in_several_arms"] == 0).all()  # assigned by user
    np.testing.assert_array_equal(table.groupby("segment")["requests"].sum().sort_index().to_numpy(),
                                  np.bincount(log.segment, minlength=len(log.segments)))
    # Every arm's interval is centred near the truth of running that arm for everyone (most cells cover it).
    arms = bucket_weights(config)  # (B, S, K) in config segment order
    names, _ = user_table(config)
    segment_of_user = np.array([config.segment_names.index(n) for n in names])
    run = run_weight_tables(config, arms[:, segment_of_user, :])
    total = request_reward(ctx.resolved, run.feedback_sum, run.continued, run.returned.astype(np.float64),
                           run.weights, run.expected_sum).total
    virtual = run.session % (len(arms) * config.n_users)
    arm, user = np.divmod(virtual, config.n_users)
    covered = 0
    for row in table.to_dict("records"):
        weights = np.array([float(part.split("=")[1]) for part in row["arm"].split(",")])
        s = config.segment_names.index(row["segment"])
        j = int(np.argmin(np.abs(arms[:, s, :] - weights).sum(1)))
        in_cell = (arm == j) & (np.asarray(names)[user] == row["segment"])
        truth = total[in_cell].mean()
        covered += row["ci_low"] <= truth <= row["ci_high"]
    assert covered >= 0.75 * len(table), covered
