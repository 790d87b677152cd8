"""Overlap diagnostics and risk-aware selection."""

from __future__ import annotations

import numpy as np
import pytest

from mtf_core.diagnostics import NOT_SUPPORTED, TRUSTWORTHY, overlap_diagnostics
from mtf_core.evaluate import EvaluationResult, evaluate_policy, prepare, target_actions
from mtf_core.policies.static import LoggingPolicy, parse_static
from mtf_core.reward import RewardSpec
from mtf_core.selection import cvar, regret, select
from mtf_core.simulate import SimConfig, logging_alpha


@pytest.fixture(scope="module")
def ctx(tiny_log):
    return prepare(tiny_log, RewardSpec.default(tiny_log.task_names))


def _diag(ctx, policy, stochastic=False):
    result = evaluate_policy(ctx, target_actions(policy, ctx.log, "p", stochastic=stochastic), n_boot=20,
                             with_truth=False)
    return result.diagnostics


def test_ess_equals_the_number_of_requests_for_the_logging_policy(ctx):
    d = _diag(ctx, None)
    assert d["ess"] == pytest.approx(ctx.log.n_requests) and d["verdict"] == TRUSTWORTHY


def test_ess_falls_as_the_target_moves_away(ctx, tiny_log):
    config = SimConfig.from_json(tiny_log.meta["simulator_config"])
    alpha = logging_alpha(config)[np.argsort(config.segment_names)]
    mean = alpha / alpha.sum(1, keepdims=True)
    shares = []
    for shift in (0.0, 0.05, 0.15):
        moved = np.clip(mean + shift * np.array([-1, 0.25, 0.25, 0.25, 0.25]), 0.01, None)
        policy = LoggingPolicy(tiny_log.task_names, tiny_log.segments,
                               moved / moved.sum(1, keepdims=True) * alpha.sum(1, keepdims=True))
        shares.append(_diag(ctx, policy, stochastic=True)["ess_share"])
    assert shares[0] > 0.95 and shares[0] > shares[1] > shares[2]


def test_verdict_is_not_supported_where_the_log_has_no_data(ctx, tiny_log):
    policy = parse_static("share=1", tiny_log.task_names, tiny_log.segments)
    d = _diag(ctx, policy)
    assert d["verdict"] == NOT_SUPPORTED and d["support_coverage"] < 0.5


def test_diagnostics_of_constructed_ratios():
    ratio = np.array([1.0] * 98 + [500.0, 0.0])
    # (G=2, R=100): ratios above 1% of n = 1 mean the log is too thin there: 10 + 1 of the 200 draws.
    draws = np.array([[1.0] * 90 + [2.0] * 10, [1.0] * 99 + [1e6]])
    d = overlap_diagnostics(ratio, cap=100.0, draw_ratio=draws)
    assert d["max_ratio"] == 500.0 and d["mean_ratio"] == pytest.approx(5.98)
    # The cap at 100 removes 400 of the 598 units of ratio mass: judged by mass, not by the 1% of requests.
    assert d["clipped_mass_share"] == pytest.approx(400 / 598)
    assert d["ess"] == pytest.approx(598.0**2 / (98 + 500.0**2))
    assert d["support_coverage"] == pytest.approx(189 / 200)


def test_verdicts_per_estimator():
    from mtf_core.diagnostics import CARE, estimator_verdicts

    good = {"ess": 5000.0, "ess_share": 0.5, "support_coverage": 0.99, "mean_ratio": 1.02, "clipped_mass_share": 0.0}
    assert set(estimator_verdicts(good, None, True).values()) == {TRUSTWORTHY}
    assert estimator_verdicts(good, None, False)["dm"] == CARE  # DM only when the data check it
    # Ratios whose mean is far from 1: the densities do not describe the weights, which SNIPS's
    # normalisation only repairs for a constant factor; no ratio estimate is trustworthy, nor DM beside it.
    unbalanced = {**good, "mean_ratio": 1.3}
    assert set(estimator_verdicts(unbalanced, None, True).values()) == {CARE}
    assert estimator_verdicts({**good, "clipped_mass_share": 0.2}, None, True)["ncis"] == CARE
    assert estimator_verdicts(good, 0.6, True)["snips"] == CARE  # kernel smoothing bias too large
    assert set(estimator_verdicts({**good, "support_coverage": 0.3}, None, True).values()) == {NOT_SUPPORTED}
    assert estimator_verdicts({**good, "ess": 200.0}, None, True)["dr"] == CARE  # too few effective requests
    assert set(estimator_verdicts({**good, "ess": 20.0}, None, True).values()) == {NOT_SUPPORTED}


def _result(policy: str, value: float, low: float, high: float, per_request, truth: float | None = None):
    return EvaluationResult("log", policy, {}, len(per_request), [], [
        {"estimator": "dr", "segment": None, "value": value, "ci_low": low, "ci_high": high, "ess": 1.0}],
        None if truth is None else {"value": truth, "ci_low": truth, "ci_high": truth},
        per_request_value=np.asarray(per_request, dtype=float))


def test_lower_bound_prefers_a_slightly_worse_but_surer_policy():
    rng = np.random.default_rng(0)
    risky = _result("risky", 10.2, 8.0, 12.4, rng.normal(10.2, 8, 1000), truth=9.0)
    sure = _result("sure", 10.0, 9.8, 10.2, rng.normal(10.0, 0.5, 1000), truth=10.0)
    assert select([risky, sure], "mean")["chosen"] == "risky"
    choice = select([risky, sure], "lower_bound")
    assert choice["chosen"] == "sure" and choice["ranking"][0] == {"policy": "sure", "score": 9.8, "verdict": None}
    assert choice["estimator"] == "dr" and "DR" in choice["reason"]
    assert select([risky, sure], "cvar")["chosen"] == "sure"
    assert regret([risky, sure], "risky") == pytest.approx(1.0) and regret([risky, sure], "sure") == 0.0


def test_cvar_is_the_mean_of_the_worst_tail():
    assert cvar(np.arange(100.0), 0.1) == pytest.approx(4.5)


def test_selection_never_mixes_estimators_and_says_which_it_used():
    rng = np.random.default_rng(1)
    with_dr = _result("a", 10.0, 9.0, 11.0, rng.normal(10, 1, 100))
    with_dr.ope.append({"estimator": "dm", "segment": None, "value": 9.5, "ci_low": 9.4, "ci_high": 9.6})
    dm_only = EvaluationResult("log", "b", {}, 100, [], [
        {"estimator": "dm", "segment": None, "value": 9.7, "ci_low": 9.6, "ci_high": 9.8,
         "verdict": NOT_SUPPORTED}], None, per_request_value=rng.normal(10, 1, 100))
    choice = select([with_dr, dm_only], "mean")
    assert choice["estimator"] == "dm" and choice["chosen"] == "b"  # DM for both, never DR for one of them
    assert "DM for every policy" in choice["reason"] and "not supported" in choice["reason"]


def test_a_log_whose_densities_do_not_describe_its_weights_gets_no_trustworthy_ratio_estimate(corrupt):
    """logging_logp = 0 beside Dirichlet weights (a density of 1 everywhere): the ratios are off by a factor
    that varies with the weights, so SNIPS and DR are as wrong as IPS, and the mean ratio shows it."""
    from mtf_core.diagnostics import CARE
    from mtf_core.evaluate import evaluate_policy, prepare, target_actions
    from mtf_core.policies.static import parse_static
    from mtf_core.reward import RewardSpec
    from mtf_core.store import load_log

    log = load_log(corrupt("UPDATE requests SET logging_logp = 0"))
    policy = parse_static("click=0.3,like=0.2,finish=0.2,share=0.1,watch_time=0.2", log.task_names, log.segments)
    result = evaluate_policy(prepare(log, RewardSpec.default(log.task_names), outcome_model="linear"),
                             target_actions(policy, log, "p"), n_boot=50)
    assert abs(result.diagnostics["mean_ratio"] - 1.0) > 0.1
    verdicts = {row["estimator"]: row["verdict"] for row in result.ope if row["segment"] is None}
    assert verdicts["snips"] != TRUSTWORTHY and verdicts["dr"] != TRUSTWORTHY and verdicts["ips"] != TRUSTWORTHY
    assert CARE in verdicts.values() or set(verdicts.values()) == {NOT_SUPPORTED}


def test_fusion_agreement_is_whole_on_the_simulator_and_lost_when_a_later_stage_reorders(tiny_log,
                                                                                          reordered_log_path):
    from mtf_core.profile import action_positions, fusion_agreeing_rows, fusion_agreement, profile_log
    from mtf_core.reward import expected_signals
    from mtf_core.store import load_log

    agree, checked = fusion_agreement(tiny_log)
    assert checked == tiny_log.n_requests and agree == checked
    assert action_positions(tiny_log, fusion_agreeing_rows(tiny_log)) is tiny_log.positions
    log = load_log(reordered_log_path)
    reordered = profile_log(log)
    assert reordered.fusion_agreement is not None and reordered.fusion_agreement < 0.05
    assert "reproduces the shown ranking in only" in reordered.explanation
    # The logged action's own ranking is the fusion's: the original log's, before the reversal.
    curve = 1.0 / (1.0 + np.arange(int(log.positions.max()) + 1))  # order matters
    assert not np.allclose(expected_signals(log.scores, log.positions, curve),
                           expected_signals(tiny_log.scores, tiny_log.positions, curve))
    np.testing.assert_allclose(expected_signals(log.scores, action_positions(log, fusion_agreeing_rows(log)), curve),
                               expected_signals(tiny_log.scores, tiny_log.positions, curve), rtol=1e-5)


def test_dm_and_dr_value_the_logged_action_by_its_fusion_where_a_later_stage_reordered(reordered_log_path):
    """On-policy, IPS is the logged mean reward whatever reordered the ranking. DM and DR value every action
    by the ranking its fusion produces, the logged one included, so they give that mean too. (Valuing the
    logged action by the ranking users saw, they had stood more than 1% away, DR equal to DM.)"""
    from mtf_core.store import load_log

    log = load_log(reordered_log_path)
    ctx = prepare(log, RewardSpec.default(log.task_names), outcome_model="linear")
    result = evaluate_policy(ctx, target_actions(None, log, "logging"), n_boot=50, with_truth=False)
    overall = {row["estimator"]: row for row in result.ope if row["segment"] is None}
    assert overall["ips"]["verdict"] == TRUSTWORTHY
    for estimator in ("dr", "dm"):
        assert overall[estimator]["value"] == pytest.approx(overall["ips"]["value"], rel=1e-9), estimator
    assert any("the logged one included" in note for note in result.notes)
