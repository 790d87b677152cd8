"""Evaluation against brute-force references, and the estimators' statistical properties on the simulator."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch

from mtf_core.evaluate import (
    bootstrap_ratio,
    evaluate_policy,
    expected_under,
    gauc,
    ground_truth,
    ndcg_at_k,
    policy_for_truth,
    prepare,
    target_actions,
)
from mtf_core.evaluate.rerank import label_thresholds
from mtf_core.policies.static import LoggingPolicy, parse_static
from mtf_core.reward import RewardSpec
from mtf_core.simulate import SimConfig, generate, logging_alpha
from mtf_core.store import load_log
from tests.conftest import TINY


def _ndcg_loop(fused, gains, eligible, k):
    items = [n for n in range(len(fused)) if eligible[n]]
    ranked = sorted(items, key=lambda n: -fused[n])[:k]
    dcg = sum(gains[n] / math.log2(i + 2) for i, n in enumerate(ranked))
    ideal = sorted((gains[n] for n in items), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else float("nan")


def test_ndcg_matches_a_loop():
    rng = np.random.default_rng(1)
    fused = rng.random((30, 8))
    gains = rng.integers(0, 3, (30, 8)).astype(float)
    eligible = rng.random((30, 8)) < 0.7
    got = ndcg_at_k(torch.from_numpy(fused), torch.from_numpy(gains), torch.from_numpy(eligible), 4).numpy()
    for r in range(30):
        want = _ndcg_loop(fused[r], gains[r], eligible[r], 4)
        assert (math.isnan(want) and math.isnan(got[r])) or got[r] == pytest.approx(want)


def _auc_loop(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_gauc_matches_pairwise_counting_with_ties():
    rng = np.random.default_rng(2)
    unit = rng.integers(0, 12, 400)
    score = rng.integers(0, 6, 400).astype(float)  # many ties
    label = rng.random(400) < 0.3
    num, den = gauc(unit, score, label, 12)
    total_num = total_den = 0.0
    for u in range(12):
        auc = _auc_loop(score[unit == u], label[unit == u])
        if auc is not None:
            n = (unit == u).sum()
            assert num[u] / den[u] == pytest.approx(auc)
            total_num += auc * n
            total_den += n
        else:
            assert den[u] == 0
    assert num.sum() / den.sum() == pytest.approx(total_num / total_den)


def test_a_continuous_task_without_a_threshold_counts_above_its_positive_median(tiny_log):
    """Watch time is 0 wherever nothing was clicked; the median of all values would be 0 on a log where most
    shown items go unclicked, and 'watch time above it' would be the click itself."""
    j = tiny_log.task_names.index("watch_time")
    watch = tiny_log.labels[..., j][tiny_log.shown]
    watch = watch[np.isfinite(watch)]
    assert np.median(watch) == 0  # the case the rule is for
    threshold = label_thresholds(tiny_log)[j]
    assert threshold == pytest.approx(np.median(watch[watch > 0].astype(np.float64)))
    positives = watch > threshold
    clicks = tiny_log.labels[..., tiny_log.task_names.index("click")][tiny_log.shown]
    assert 0 < positives.sum() < (clicks[np.isfinite(clicks)] > 0).sum()
    declared = dataclasses.replace(tiny_log.tasks[j], threshold=0.5)
    with_threshold = dataclasses.replace(tiny_log, tasks=tuple(declared if t.name == "watch_time" else t
                                                               for t in tiny_log.tasks))
    assert label_thresholds(with_threshold)[j] == 0.5


def test_several_rankings_at_once_give_each_rankings_signals(tiny_log):
    from mtf_core.evaluate.rerank import expected_under_each

    ctx = prepare(tiny_log, RewardSpec.default(tiny_log.task_names), outcome_model="linear")
    weights = np.random.default_rng(4).dirichlet(np.ones(len(tiny_log.tasks)), size=(3, tiny_log.n_requests))
    each = expected_under_each(ctx, weights)
    assert each.shape == (3, tiny_log.n_requests, len(tiny_log.tasks))
    for w, signals in zip(weights, each):
        assert np.array_equal(signals, expected_under(ctx, w))


def test_rerank_expected_signals_match_a_loop(tiny_log):
    ctx = prepare(tiny_log, RewardSpec.default(tiny_log.task_names))
    policy = parse_static("click=0.1,like=0.4,finish=0.2,share=0.3", tiny_log.task_names, tiny_log.segments)
    result = evaluate_policy(ctx, target_actions(policy, tiny_log, "x"), n_boot=20, with_truth=False)
    w = policy.weights[0].numpy()
    curve = ctx.resolved.position_curve
    total = 0.0
    for r in range(0, tiny_log.n_requests, 37):
        fused = tiny_log.scores[r] @ w
        top = np.argsort(-fused, kind="stable")[: len(curve)]
        total_r = sum(curve[p] * tiny_log.scores[r, n] for p, n in enumerate(top)) @ ctx.resolved.coefficients
        total += total_r
    dm = [m for m in result.metrics if m["name"].startswith("dm_reward") and m["segment"] is None][0]
    assert dm["value"] is not None
    # the full-log mean and the sampled loop agree in scale; the exact check is per request below
    rows = np.arange(0, tiny_log.n_requests, 37)
    from mtf_core.evaluate import rerank_metrics

    chunk = rerank_metrics(ctx, target_actions(policy, tiny_log, "x"), slice(None), 6)
    assert (chunk.expected[rows] @ ctx.resolved.coefficients).sum() == pytest.approx(total)


def test_snips_of_the_logging_policy_is_the_logged_mean(tiny_log):
    ctx = prepare(tiny_log, RewardSpec.default(tiny_log.task_names))
    result = evaluate_policy(ctx, target_actions(None, tiny_log, "logging"), n_boot=50)
    snips = [o for o in result.ope if o["estimator"] == "snips" and o["segment"] is None][0]
    assert snips["value"] == pytest.approx(ctx.logged.total.mean())
    assert snips["ess"] == pytest.approx(tiny_log.n_requests)
    assert result.ground_truth["value"] == pytest.approx(ctx.logged.total.mean())


def test_a_ranking_is_valued_down_to_as_many_candidates_as_its_request_showed(corrupt):
    """Users who stop scrolling early: half the requests show only their top 2-4 candidates. On-policy, DM and
    DR are then the logged mean, as IPS is. (Valuing a target's top L beside the logged top few put DM and DR
    7% above that mean here.) And a target's expected signals stop
    at each request's own depth, as a loop over requests finds."""
    labels = ", ".join(f"y_{t} = NULL" for t in TINY.tasks)
    log = load_log(corrupt(f"UPDATE impressions SET position = NULL, {labels} WHERE request_id % 2 = 0 "
                           "AND position >= 2 + request_id % 3"))
    depth = log.shown.sum(1)
    assert depth.min() == 2 and depth.max() == log.n_shown
    ctx = prepare(log, RewardSpec.default(log.task_names), outcome_model="linear")
    assert (ctx.profile.shown_min, ctx.profile.shown_max) == (2, log.n_shown)
    assert ctx.profile.shown_mean == pytest.approx(depth.mean())
    result = evaluate_policy(ctx, target_actions(None, log, "logging"), n_boot=20, with_truth=False)
    overall = {row["estimator"]: row["value"] for row in result.ope if row["segment"] is None}
    for estimator in ("dm", "dr"):
        assert overall[estimator] == pytest.approx(overall["ips"], rel=1e-9), estimator
    policy = parse_static("click=0.1,like=0.4,finish=0.2,share=0.3", log.task_names, log.segments)
    w, curve = policy.weights[0].numpy(), ctx.resolved.position_curve
    rows = np.arange(0, log.n_requests, 7)
    loop = np.stack([sum(curve[p] * log.scores[r, n]
                         for p, n in enumerate(np.argsort(-(log.scores[r] @ w), kind="stable")[:depth[r]]))
                     for r in rows])
    np.testing.assert_allclose(expected_under(ctx, np.tile(w, (log.n_requests, 1)))[rows], loop, rtol=1e-5)


def test_bootstrap_interval_of_a_mean_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, 4000)  # below the threshold: the Poisson bootstrap
    low, high = bootstrap_ratio(x[:, None], np.ones((4000, 1)), n_boot=2000, seed=1)
    se = x.std() / math.sqrt(4000)
    assert low[0] == pytest.approx(x.mean() - 1.96 * se, abs=0.25 * se)
    assert high[0] == pytest.approx(x.mean() + 1.96 * se, abs=0.25 * se)


def _shifted_logging(log, shift: np.ndarray) -> LoggingPolicy:
    config = SimConfig.from_json(log.meta["simulator_config"])
    alpha = logging_alpha(config)[np.argsort(config.segment_names)]
    mean = alpha / alpha.sum(1, keepdims=True) + shift
    return LoggingPolicy(log.task_names, log.segments, mean / mean.sum(1, keepdims=True) * alpha.sum(1, keepdims=True))


@pytest.fixture(scope="module")
def estimates_over_seeds(tmp_path_factory):
    """IPS, DR and the truth of one stochastic target on logs from several seeds."""
    folder = tmp_path_factory.mktemp("seeds")
    rows = []
    for seed in range(8):
        path = folder / f"s{seed}.duckdb"
        generate(dataclasses.replace(TINY, n_users=120, seed=100 + seed), str(path))
        log = load_log(path)
        ctx = prepare(log, RewardSpec.default(log.task_names))
        target = _shifted_logging(log, np.array([-0.1, 0.04, 0.03, 0.03, 0.0]))
        result = evaluate_policy(ctx, target_actions(target, log, "t"), n_boot=20,
                                 truth_policy=policy_for_truth(target, True), seed=seed)
        ope = {o["estimator"]: o["value"] for o in result.ope if o["segment"] is None}
        rows.append((ope["ips"], ope["dr"], result.ground_truth["value"]))
    return np.array(rows)


def test_ips_is_unbiased_over_seeds(estimates_over_seeds):
    ips, _, truth = estimates_over_seeds.T
    diff = ips - truth
    assert abs(diff.mean()) <= 3 * diff.std(ddof=1) / math.sqrt(len(diff)) + 0.02 * abs(truth.mean())


def test_dr_has_lower_variance_than_ips(estimates_over_seeds):
    ips, dr, truth = estimates_over_seeds.T
    assert np.var(dr - truth) < np.var(ips - truth)


def test_kernel_estimates_converge_as_the_log_grows(tmp_path):
    """Kernelised IPS/SNIPS of a fixed weight vector get closer to the truth on larger logs.

    Immediate reward only, in a world whose sessions and returns do not depend on satisfaction, so the
    online truth has no sequential effect that a one-step estimator cannot see (in the default world it has,
    by design: a policy changes which requests happen).
    """
    one_step = dataclasses.replace(TINY, continue_slope=0.0, engagement_continue=0.0, engagement_return=0.0,
                                   return_slope=0.0)
    errors: dict[int, dict[str, float]] = {}
    for n_users in (60, 1000):
        errs: dict[str, list[float]] = {"ips": [], "snips": []}
        for seed in range(3):
            path = tmp_path / f"k{n_users}_{seed}.duckdb"
            generate(dataclasses.replace(one_step, n_users=n_users, seed=200 + seed), str(path))
            log = load_log(path)
            ctx = prepare(log, RewardSpec({t: 1.0 for t in log.task_names}))
            policy = parse_static("click=0.4,like=0.15,finish=0.15,share=0.1,watch_time=0.2", log.task_names,
                                  log.segments)
            result = evaluate_policy(ctx, target_actions(policy, log, "k"), n_boot=20,
                                     truth_policy=policy_for_truth(policy, False))
            assert result.bandwidth is not None and result.bandwidth > 0
            for name in errs:
                value = [o["value"] for o in result.ope if o["estimator"] == name and o["segment"] is None][0]
                errs[name].append(abs(value - result.ground_truth["value"]))
        errors[n_users] = {k: float(np.mean(v)) for k, v in errs.items()}
    assert errors[1000]["ips"] < 0.7 * errors[60]["ips"]
    assert errors[1000]["snips"] < errors[60]["snips"]


def test_ground_truth_is_reproducible(tiny_log):
    ctx = prepare(tiny_log, RewardSpec.default(tiny_log.task_names))
    policy = parse_static("click=0.2,like=0.3,finish=0.3,share=0.2", tiny_log.task_names, tiny_log.segments)
    a = ground_truth(ctx, policy_for_truth(policy, False), "sum", None, 20, 0)
    b = ground_truth(ctx, policy_for_truth(policy, False), "sum", None, 20, 0)
    assert a["value"] == b["value"]


def test_rerank_core_ndcg_matches_the_single_gain_reference(tiny_log):
    from mtf_core.evaluate import rerank_core

    rows = slice(0, 500)
    scores = torch.from_numpy(tiny_log.scores[rows])
    labels = torch.from_numpy(np.nan_to_num(tiny_log.labels[rows]))
    shown, mask = torch.from_numpy(tiny_log.shown[rows]), torch.from_numpy(tiny_log.mask[rows])
    w = torch.rand(500, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    coefficients = torch.ones(5, dtype=torch.float64)
    ndcg, ndcg_reward, _, fused = rerank_core(scores, labels, shown, mask, w, 4, torch.ones(6), coefficients)
    for j in range(5):
        ref = ndcg_at_k(fused, labels[..., j].double(), shown, 4)
        torch.testing.assert_close(ndcg[:, j], ref, equal_nan=True)
    torch.testing.assert_close(ndcg_reward, ndcg_at_k(fused, labels.double().sum(-1), shown, 4), equal_nan=True)


def test_little_bootstraps_match_the_normal_interval_on_a_large_sample():
    rng = np.random.default_rng(5)
    x = rng.exponential(2.0, 400_000)  # above the threshold: the bag of little bootstraps
    low, high = bootstrap_ratio(x[:, None], np.ones((len(x), 1)), n_boot=1000, seed=2)
    se = x.std() / math.sqrt(len(x))
    assert low[0] == pytest.approx(x.mean() - 1.96 * se, abs=0.3 * se)
    assert high[0] == pytest.approx(x.mean() + 1.96 * se, abs=0.3 * se)


def test_streamed_evaluation_equals_the_in_memory_one(tiny_log_path, tiny_log):
    from mtf_core.evaluate import rerank_metrics, streamed_rerank

    ctx = prepare(tiny_log, RewardSpec.default(tiny_log.task_names))
    policy = parse_static("click=0.2,like=0.3,finish=0.2,share=0.2,watch_time=0.1", tiny_log.task_names,
                          tiny_log.segments)
    w = policy.weights[0].numpy()
    whole = rerank_metrics(ctx, target_actions(policy, tiny_log, "p"), slice(None), 6)
    for chunk in (97, 1000, 10**6):
        streamed = streamed_rerank(str(tiny_log_path), w, 6, ctx.resolved.position_curve, ctx.resolved.coefficients,
                                   chunk_requests=chunk)
        assert streamed["n_requests"] == tiny_log.n_requests
        np.testing.assert_allclose(streamed["ndcg"], np.nanmean(whole.ndcg, 0), rtol=1e-6)
        np.testing.assert_allclose(streamed["ndcg_reward"][0], np.nanmean(whole.ndcg_reward), rtol=1e-6)
        np.testing.assert_allclose(streamed["expected"], whole.expected.mean(0), rtol=1e-5)


def test_ideal_dcg_counts_only_columns_that_are_exactly_zero_one():
    from mtf_core.evaluate.rerank import _ideal_dcg

    one_below = float(np.nextafter(np.float32(1), np.float32(0)))
    gains = torch.zeros(3, 5, 4)
    gains[:, :2, 0] = 1.0  # binary: the count route
    gains[0, 0, 1], gains[1, 3, 1] = 1.0, 0.5  # one value off 0/1 sends the whole column to the sort
    gains[2, 4, 2], gains[0, 1, 2] = one_below, 1.0  # the float just below 1
    gains[1, 2, 3], gains[2, 0, 3] = 1e-30, 3.0  # a tiny positive gain and a graded one
    discount = 1.0 / torch.log2(torch.arange(3, dtype=torch.float64) + 2.0)
    reference = (torch.sort(gains.double(), dim=1, descending=True).values[:, :3] * discount[:, None]).sum(1)
    torch.testing.assert_close(_ideal_dcg(gains, discount), reference, rtol=0, atol=1e-15)


def test_direct_model_fit_matches_polyfit_per_segment(tiny_log):
    from mtf_core.evaluate.direct import fit_direct

    rng = np.random.default_rng(0)
    x = rng.normal(size=tiny_log.n_requests)
    y = 2.0 * x + rng.normal(size=tiny_log.n_requests) + tiny_log.segment
    model, fit = fit_direct(tiny_log.segment, len(tiny_log.segments), x, y, tiny_log.user_id)
    for s in range(len(tiny_log.segments)):
        m = tiny_log.segment == s
        slope, intercept = np.polyfit(x[m], y[m], 1)
        assert model.slope[s] == pytest.approx(slope) and model.intercept[s] == pytest.approx(intercept)
    assert fit.stats[:, 0].sum() == tiny_log.n_requests and len(fit.user_id) == len(np.unique(tiny_log.user_id))


@pytest.mark.parametrize("held_out", [None, 0.3])
def test_model_based_sums_reproduce_the_point_estimates(tiny_log, held_out):
    """Refitting the direct model from the resampled users' sums must give the point estimate when every user is
    drawn once: the algebra of the bootstrap and of the point estimate agree (in-sample and held out)."""
    from mtf_core.evaluate import evaluation_sample
    from mtf_core.evaluate.direct import _values_from_sums
    from mtf_core.evaluate.policy_value import _target_terms
    from mtf_core.evaluate.ratios import importance_ratio

    sample = evaluation_sample(tiny_log, RewardSpec.default(tiny_log.task_names), held_out)
    ctx = sample.ctx
    policy = parse_static("click=0.4,like=0.2,finish=0.2,share=0.1,watch_time=0.1", tiny_log.task_names,
                          tiny_log.segments)
    actions = target_actions(policy, ctx.log, "p")
    result = evaluate_policy(ctx, actions, n_boot=50, with_truth=False)
    ratios = importance_ratio(ctx, actions)
    view = ctx.direct_view  # whichever model DM and DR rest on: the algebra is the same
    target = _target_terms(ctx, actions, expected_under(ctx, actions.weights), view)
    logged = ctx.logged
    x_logged = view.x_logged
    rho = ratios.values
    seg = ctx.log.segment
    n_seg = len(ctx.log.segments)
    fit = view.fit
    fit_by_seg = np.stack([fit.stats[fit.segment == s].sum(0) for s in range(n_seg)])
    per_request = np.stack([np.ones_like(rho), target.x, target.penalty, 1 - rho, target.x - rho * x_logged,
                            rho * (logged.total + logged.penalty) - target.penalty], 1)
    eval_by_seg = np.stack([per_request[seg == s].sum(0) for s in range(n_seg)])
    values = _values_from_sums(np.concatenate([fit_by_seg, eval_by_seg], 1)[None], ["dm", "dr"])[0]
    dm, dr = result.estimate("dm"), result.estimate("dr")
    assert values[0] == pytest.approx(dm["value"], rel=1e-9)
    assert values[1 + n_seg] == pytest.approx(dr["value"], rel=1e-9)
    for row in (dm, dr):
        assert row["ci_low"] <= row["value"] <= row["ci_high"]


def test_truth_of_the_logging_policy_on_held_out_sessions_is_the_logged_reward(tiny_log):
    """Common random numbers replay the log, so over the held-out sessions the truth of the logging policy is
    exactly the logged reward of those sessions (and the direct model comes from the earlier sessions)."""
    from mtf_core.evaluate import evaluation_sample

    sample = evaluation_sample(tiny_log, RewardSpec.default(tiny_log.task_names), 0.3)
    assert sample.held_out and sample.ctx.log.n_requests < tiny_log.n_requests
    result = evaluate_policy(sample.ctx, target_actions(None, sample.ctx.log, "logging"), n_boot=20)
    assert result.ground_truth["n_requests"] == sample.ctx.log.n_requests
    assert result.ground_truth["value"] == pytest.approx(sample.ctx.logged.total.mean(), rel=1e-9)
    full = prepare(tiny_log, RewardSpec.default(tiny_log.task_names))
    assert not np.allclose(sample.ctx.direct.intercept, full.direct.intercept)  # fitted without the held-out part
