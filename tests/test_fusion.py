"""fuse, rank_positions and top_l against plain loops."""

from __future__ import annotations

import math

import pytest
import torch

from mtf_core.fusion import fuse, rank_positions, top_l


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(4, 7, 3, generator=g, dtype=torch.float64)
    weights = torch.rand(4, 3, generator=g, dtype=torch.float64)
    return scores, weights


def test_sum_matches_a_loop(batch):
    scores, weights = batch
    fused = fuse(scores, weights, "sum")
    for r in range(4):
        for n in range(7):
            assert fused[r, n].item() == pytest.approx(sum(weights[r, k] * scores[r, n, k] for k in range(3)).item())


def test_product_and_logsum_match_a_loop_and_rank_alike(batch):
    scores, weights = batch
    bias = torch.tensor([0.1, 0.0, 0.5], dtype=torch.float64)
    product = fuse(scores, weights, "product", bias=bias)
    logsum = fuse(scores, weights, "logsum", bias=bias)
    r, n = 2, 5
    expected = math.prod((scores[r, n, k].item() + bias[k].item()) ** weights[r, k].item() for k in range(3))
    assert product[r, n].item() == pytest.approx(expected)
    assert torch.equal(rank_positions(product), rank_positions(logsum))


def test_per_item_weights_use_each_items_own_weights(batch):
    scores, _ = batch
    per_item = torch.rand(4, 7, 3, dtype=torch.float64)
    fused = fuse(scores, per_item, "sum")
    assert fused[1, 3].item() == pytest.approx((scores[1, 3] * per_item[1, 3]).sum().item())


def test_mask_sends_padding_last(batch):
    scores, weights = batch
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[:, 5:] = False
    positions = rank_positions(fuse(scores, weights, mask=mask))
    assert (positions[:, 5:] >= 5).all()
    assert set(top_l(fuse(scores, weights, mask=mask), 5)[0].tolist()) == set(range(5))


def test_rank_positions_match_sorted_order(batch):
    scores, weights = batch
    fused = fuse(scores, weights)
    positions = rank_positions(fused)
    for r in range(4):
        order = sorted(range(7), key=lambda n: -fused[r, n].item())
        assert [positions[r, n].item() for n in order] == list(range(7))


def test_unknown_form_is_refused(batch):
    with pytest.raises(ValueError, match="unknown fusion form"):
        fuse(*batch, form="max")
