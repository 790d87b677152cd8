"""Property-based tests (hypothesis) of the core invariants."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mtf_core.evaluate import evaluate_policy, gauc, ndcg_at_k, prepare, target_actions
from mtf_core.evaluate.rerank import unit_aucs, unit_score_order
from mtf_core.fusion import fuse, rank_positions
from mtf_core.propensity import logging_policy
from mtf_core.policies.static import parse_static
from mtf_core.reward import RewardSpec

N, K = 8, 3
unit_floats = st.floats(0.0, 1.0, allow_nan=False, width=32)


@st.composite
def request(draw):
    """One request: distinct fused scores, non-negative gains, a shown mask with at least one shown item."""
    fused = np.asarray(draw(st.permutations(list(range(N)))), dtype=np.float64)
    gains = draw(arrays(np.float64, N, elements=st.sampled_from([0.0, 0.0, 1.0, 2.0, 3.5])))
    shown = draw(arrays(np.bool_, N))
    shown[draw(st.integers(0, N - 1))] = True
    return fused, gains, shown


@given(request(), st.permutations(list(range(N))), st.integers(1, N))
def test_permuting_candidates_keeps_ndcg(req, perm, k):
    fused, gains, shown = req
    p = np.asarray(perm)
    a = ndcg_at_k(*(torch.from_numpy(x[None]) for x in (fused, gains, shown)), k)
    b = ndcg_at_k(*(torch.from_numpy(x[p][None]) for x in (fused, gains, shown)), k)
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    assert torch.allclose(torch.nan_to_num(a), torch.nan_to_num(b))


@given(request(), st.integers(1, N))
def test_ndcg_lies_in_the_unit_interval(req, k):
    value = ndcg_at_k(*(torch.from_numpy(x[None]) for x in req), k)[0].item()
    assert np.isnan(value) or -1e-12 <= value <= 1 + 1e-12


@given(arrays(np.int64, 60, elements=st.integers(0, 4)), arrays(np.float64, 60, elements=unit_floats),
       arrays(np.bool_, 60))
def test_gauc_lies_in_the_unit_interval_and_ignores_permutation(unit, score, label):
    num, den = gauc(unit, score, label, 5)
    valid = den > 0
    assert np.all(num[valid] / den[valid] >= -1e-12) and np.all(num[valid] / den[valid] <= 1 + 1e-12)
    perm = np.random.default_rng(0).permutation(60)
    num2, den2 = gauc(unit[perm], score[perm], label[perm], 5)
    assert np.allclose(num, num2) and np.allclose(den, den2)


any_float32 = st.floats(width=32, allow_nan=False)  # negatives, both zeros, infinities, subnormals


@given(arrays(np.int64, 80, elements=st.integers(0, 6)), arrays(np.float32, 80, elements=any_float32),
       arrays(np.bool_, (80, 2)))
def test_the_packed_sort_orders_by_unit_then_score_and_gives_lexsorts_aucs(unit, score, labels):
    order = unit_score_order(unit, score)
    assert sorted(order.tolist()) == list(range(80))
    key = list(zip(unit[order].tolist(), score[order].tolist()))
    assert key == sorted(key)  # -0.0 == 0.0, so equal scores may come in either order
    fast = unit_aucs(unit, score, labels, 7)
    reference = unit_aucs(unit, score, labels, 7, order=np.lexsort((score, unit)))
    for a, b in zip(fast, reference):
        assert np.array_equal(a, b)  # exactly: ranks and counts are sums of (half-)integers


@given(arrays(np.float64, (4, N, K), elements=st.integers(0, 1000).map(lambda x: x / 1000)),
       arrays(np.float64, (4, K), elements=st.integers(1, 100).map(float)), st.integers(-20, 20))
def test_scaling_sum_weights_keeps_the_ranking(scores, weights, power):
    s, w = torch.from_numpy(scores), torch.from_numpy(weights)
    scaled = w * (2.0**power)  # powers of two scale exactly in floating point
    assert torch.equal(rank_positions(fuse(s, w)), rank_positions(fuse(s, scaled)))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 10_000), min_size=1, max_size=40))
def test_importance_ratios_of_the_logging_policy_are_one(tiny_log, rows):
    idx = np.asarray(rows) % tiny_log.n_requests
    dist = logging_policy(tiny_log).distribution(tiny_log.state(idx))
    logp = dist.log_prob(torch.from_numpy(tiny_log.weights[idx])).numpy()
    np.testing.assert_allclose(np.exp(logp - tiny_log.logging_logp[idx]), 1.0, rtol=1e-9)


@settings(max_examples=6, deadline=None)
@given(st.integers(7, 3000))
def test_chunked_and_unchunked_evaluation_agree(tiny_log, chunk):
    import mtf_core.evaluate as ev

    ctx = prepare(tiny_log, RewardSpec.default(tiny_log.task_names))
    policy = parse_static("click=0.3,like=0.3,finish=0.2,share=0.2", tiny_log.task_names, tiny_log.segments)
    whole = evaluate_policy(ctx, target_actions(policy, tiny_log, "p"), n_boot=10, with_truth=False)
    original = ev.CHUNK
    ev.CHUNK = chunk
    try:
        chunked = evaluate_policy(ctx, target_actions(policy, tiny_log, "p"), n_boot=10, with_truth=False)
    finally:
        ev.CHUNK = original
    for a, b in zip(whole.metrics + whole.ope, chunked.metrics + chunked.ope):
        assert (a["value"] is None and b["value"] is None) or abs(a["value"] - b["value"]) <= 1e-9 * max(
            1.0, abs(a["value"]))
