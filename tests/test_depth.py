"""How deep users see as a response to the action (`evaluate.depth`): the regression, its clustered interval
from per-user sums, and the verdicts it withholds from DM and DR in a world where depth responds."""

from __future__ import annotations

import numpy as np

from mtf_core.diagnostics import CARE, TRUSTWORTHY, estimator_verdicts
from mtf_core.evaluate.depth import DepthShift, depth_shifts, depth_sums


def _requests(seed: int, n: int = 3000, n_users: int = 300, response: float = 2.0):
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(3, 2.0), size=n)
    segment = rng.integers(0, 2, n)
    unit = rng.integers(0, n_users, n)
    user_effect = rng.normal(0.0, 0.5, n_users)
    depth = np.clip(np.round(2.0 + segment + response * weights[:, 1] + user_effect[unit]
                             + rng.normal(0.0, 1.0, n)), 1, 6)
    return depth, weights, segment, unit, n_users


def test_the_shift_is_the_regressions_prediction_with_a_user_clustered_interval():
    """Against the regression done directly: least squares of depth on a level per segment and the weights
    (but the last), and the sandwich covariance summed over users' scores."""
    depth, weights, segment, unit, n_users = _requests(0)
    target = np.broadcast_to([0.2, 0.6, 0.2], weights.shape)
    overall, per_segment = depth_shifts(depth_sums(depth, weights, target, segment, 2, unit, n_users))

    x = np.c_[np.eye(2)[segment], weights[:, :-1]]
    beta, *_ = np.linalg.lstsq(x, depth, rcond=None)
    scores = np.zeros((n_users, x.shape[1]))
    np.add.at(scores, unit, x * (depth - x @ beta)[:, None])
    bread = np.linalg.inv(x.T @ x)
    cov = bread @ scores.T @ scores @ bread
    gap = (np.c_[np.eye(2)[segment], target[:, :-1]] - x).mean(0)
    shift = gap @ beta / depth.mean()
    se = np.sqrt(gap @ cov @ gap) / depth.mean()
    assert overall is not None
    np.testing.assert_allclose([overall.shift, overall.low, overall.high],
                               [shift, shift - 1.96 * se, shift + 1.96 * se], rtol=1e-9)
    assert overall.moves  # +0.2 on the weight depth responds to, 2 per unit: about +0.4 of ~3.6
    keep = segment == 1
    gap_1 = (np.c_[np.eye(2)[segment], target[:, :-1]] - x)[keep].mean(0)
    assert per_segment[1] is not None
    np.testing.assert_allclose(per_segment[1].shift, gap_1 @ beta / depth[keep].mean(), rtol=1e-9)


def test_sums_add_up_over_parts_of_the_users():
    """A streamed evaluation adds its shards' sums (each shard holds whole users): the same figures."""
    depth, weights, segment, unit, n_users = _requests(1)
    target = np.broadcast_to([0.5, 0.3, 0.2], weights.shape)
    whole = depth_shifts(depth_sums(depth, weights, target, segment, 2, unit, n_users))[0]
    first, second = unit < 100, unit >= 100
    parts = (depth_sums(depth[first], weights[first], target[first], segment[first], 2, unit[first], 100)
             + depth_sums(depth[second], weights[second], target[second], segment[second], 2, unit[second] - 100,
                          n_users - 100))
    added = depth_shifts(parts)[0]
    assert whole is not None and added is not None
    np.testing.assert_allclose([added.shift, added.low, added.high], [whole.shift, whole.low, whole.high], rtol=1e-9)


def test_depth_that_ignores_the_weights_does_not_move():
    """Depth of chance: no shift that withholds trust (requests without logged weights left out); the same
    depth everywhere, or weights that never vary, leave nothing to fit."""
    depth, weights, segment, unit, n_users = _requests(2, response=0.0)
    target = np.broadcast_to([0.1, 0.1, 0.8], weights.shape)
    logged = weights.copy()
    logged[:50] = np.nan
    overall, _ = depth_shifts(depth_sums(depth, logged, target, segment, 2, unit, n_users))
    assert overall is not None and not overall.moves
    assert depth_shifts(depth_sums(np.full(len(depth), 6.0), weights, target, segment, 2, unit, n_users)) == (
        None, [None, None])
    fixed = np.broadcast_to(weights[0], weights.shape)
    assert depth_shifts(depth_sums(depth, fixed, target, segment, 2, unit, n_users)) == (None, [None, None])


def test_a_moving_depth_withholds_trust_from_dm_and_dr_alone():
    diag = {"ess": 5000.0, "ess_share": 0.5, "support_coverage": 1.0, "mean_ratio": 1.0, "clipped_mass_share": 0.0}
    assert estimator_verdicts(diag, None, True)["dm"] == TRUSTWORTHY
    verdicts = estimator_verdicts(diag, None, True, depth_moves=True)
    assert verdicts == {"ips": TRUSTWORTHY, "snips": TRUSTWORTHY, "ncis": TRUSTWORTHY, "dr": CARE, "dm": CARE}
    assert DepthShift(0.05, 0.01, 0.09).moves and not DepthShift(0.05, -0.01, 0.11).moves
    assert not DepthShift(0.008, 0.004, 0.012).moves  # measurable, but under 1%


def test_in_a_cascade_feed_dm_and_dr_are_not_trusted_where_the_policy_moves_depth(tmp_path):
    """Every user goes on past a slot with the finish rate of the item there (`scroll_by_appeal`): a
    finish-heavier vector shows more of each slate. Its DM and DR, which take the logged depth as given, fall
    short of the truth and are not called trustworthy where IPS and SNIPS are, and the note says why, in
    memory and streamed alike; the logging policy itself does not move depth."""
    from mtf_core.evaluate import evaluate_policy, policy_for_truth, prepare, target_actions
    from mtf_core.lake import export_lake
    from mtf_core.policies.static import parse_static
    from mtf_core.reward import RewardSpec
    from mtf_core.simulate import SimConfig, generate
    from mtf_core.store import load_log
    from mtf_core.stream import streamed_evaluation

    config = SimConfig(n_users=400, seed=3, short_scroll_share=1.0, scroll_by_appeal=True, scroll_floor=0.0)
    log = load_log(generate(config, str(tmp_path / "cascade.duckdb")))
    ctx = prepare(log, RewardSpec.default(log.task_names), outcome_model="linear")
    # Near the logging mean (click 0.4, like 0.15, finish 0.15, share 0.1, watch time 0.2): well supported.
    policy = parse_static("click=0.3,like=0.15,finish=0.3,share=0.1,watch_time=0.15", log.task_names, log.segments)
    result = evaluate_policy(ctx, target_actions(policy, log, "finish-heavier"), n_boot=50,
                             truth_policy=policy_for_truth(policy, False))
    shift = result.diagnostics["depth_shift"]
    assert shift["low"] > 0.01, shift  # +5% [+2%, +8%] on this seed
    rows = {r["estimator"]: r for r in result.ope if r["segment"] is None}
    # The ratios are trusted; what takes trust from DM and DR is the depth they take as given.
    assert rows["ips"]["verdict"] == rows["snips"]["verdict"] == TRUSTWORTHY
    assert rows["dm"]["verdict"] == rows["dr"]["verdict"] == CARE
    assert rows["dm"]["value"] < result.ground_truth["value"]
    assert any("how deep users scroll responds to this policy" in note for note in result.notes)
    logging = evaluate_policy(ctx, target_actions(None, log, "logging"), n_boot=50, with_truth=False)
    assert abs(logging.diagnostics["depth_shift"]["shift"]) < 1e-9

    # Streamed over a lake of the same log: the same shift (shards add their users' sums), the same verdicts.
    export_lake(log.path, tmp_path / "lake", shards=3)
    streamed = streamed_evaluation(tmp_path / "lake", policy, "finish-heavier", RewardSpec.default(log.task_names),
                                   n_boot=50)
    on_lake = streamed.diagnostics["depth_shift"]
    np.testing.assert_allclose([on_lake[k] for k in ("shift", "low", "high")],
                               [shift[k] for k in ("shift", "low", "high")], rtol=1e-9)
    streamed_rows = {r["estimator"]: r for r in streamed.ope if r["segment"] is None}
    assert streamed_rows["dm"]["verdict"] == streamed_rows["dr"]["verdict"] == CARE
    assert any("how deep users scroll responds to this policy" in note for note in streamed.notes)

