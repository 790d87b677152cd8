"""The simulator: determinism, segment differences, exact logging densities, replay as ground truth."""

from __future__ import annotations

import dataclasses

import duckdb
import numpy as np
import pytest
import scipy.stats

from mtf_core.simulate import SimConfig, generate, run_online
from tests.conftest import TINY


def _table_bytes(path):
    con = duckdb.connect(str(path), read_only=True)
    try:
        return {t: con.execute(f"SELECT * EXCLUDE (ts) FROM {t} ORDER BY ALL").fetchnumpy() if t == "requests"
                else con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchnumpy()
                for t in ("users", "items", "requests", "impressions", "sessions")}
    finally:
        con.close()


def test_same_seed_gives_identical_data(tmp_path):
    config = dataclasses.replace(TINY, n_users=40)
    generate(config, str(tmp_path / "a.duckdb"))
    generate(config, str(tmp_path / "b.duckdb"))
    a, b = _table_bytes(tmp_path / "a.duckdb"), _table_bytes(tmp_path / "b.duckdb")
    for table in a:
        for column in a[table]:
            left, right = np.asarray(a[table][column]), np.asarray(b[table][column])
            if left.dtype == object:
                assert left.tolist() == right.tolist(), f"{table}.{column} differs"
            else:
                assert left.tobytes() == right.tobytes(), f"{table}.{column} differs"


def test_different_seed_gives_different_data(tmp_path):
    generate(dataclasses.replace(TINY, n_users=40), str(tmp_path / "a.duckdb"))
    generate(dataclasses.replace(TINY, n_users=40, seed=99), str(tmp_path / "b.duckdb"))
    a, b = _table_bytes(tmp_path / "a.duckdb"), _table_bytes(tmp_path / "b.duckdb")
    assert not np.array_equal(a["requests"]["w_click"][:50], b["requests"]["w_click"][:50])


def test_logging_logp_is_the_dirichlet_density(tiny_log):
    config = SimConfig.from_json(tiny_log.meta["simulator_config"])
    alpha_by_name = dict(zip(config.segment_names, np.asarray(config.logging_weights) * config.logging_concentration))
    for i in range(0, tiny_log.n_requests, max(1, tiny_log.n_requests // 200)):
        alpha = alpha_by_name[tiny_log.segments[tiny_log.segment[i]]]
        w = tiny_log.weights[i]
        expected = scipy.stats.dirichlet.logpdf(w / w.sum(), alpha)
        assert tiny_log.logging_logp[i] == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_segments_differ_in_logged_feedback(tmp_path):
    path = tmp_path / "segments.duckdb"
    generate(SimConfig(n_users=800, sessions_per_user=3, n_items=800, seed=3), str(path))
    con = duckdb.connect(str(path), read_only=True)
    rows = con.execute(
        "SELECT u.segment, avg(i.y_share) AS share, count(*) AS n FROM impressions i JOIN requests r USING (request_id) "
        "JOIN users u USING (user_id) WHERE i.position IS NOT NULL GROUP BY 1"
    ).fetchall()
    con.close()
    rates = {s: (r, n) for s, r, n in rows}
    (p_power, n_power), (p_new, n_new) = rates["power"], rates["new"]
    se = np.sqrt(p_power * (1 - p_power) / n_power + p_new * (1 - p_new) / n_new)
    assert p_power - p_new > 4 * se, "power users should share far more often than new users"


def test_online_logging_policy_replays_the_log(tiny_log):
    config = SimConfig.from_json(tiny_log.meta["simulator_config"])
    out = run_online(config, None)
    assert out.session.shape[0] == tiny_log.n_requests
    np.testing.assert_allclose(out.weights, tiny_log.weights, rtol=0, atol=0)
    np.testing.assert_allclose(out.feedback_sum, np.nan_to_num(tiny_log.labels).sum(1), rtol=1e-6)


def test_config_round_trips_through_json():
    config = dataclasses.replace(TINY, n_users=77, logging_concentration=12.5)
    assert SimConfig.from_json(config.to_json()) == config


def test_invalid_config_is_refused():
    with pytest.raises(ValueError, match="n_shown"):
        SimConfig(n_candidates=5, n_shown=9)


def test_later_days_are_the_same_world(tiny_log):
    """Progressive rounds explore the days after the log in the same world: the same users with the same features
    and segments, the same items, sessions that start after every logged one."""
    from mtf_core.simulate import simulate

    config = SimConfig.from_json(tiny_log.meta["simulator_config"])
    later = simulate(config, first_day=config.sessions_per_user, n_days=2)
    users = np.unique(later.requests["user_id"])
    assert len(users) > 0 and np.isin(users, np.arange(1, config.n_users + 1)).all()
    logged = simulate(config)
    for name in logged.users:
        np.testing.assert_array_equal(later.users[name], logged.users[name])
    for name in logged.items:
        np.testing.assert_array_equal(later.items[name], logged.items[name])
    assert later.requests["ts"].min() > logged.requests["ts"].max()
    assert not np.isin(later.sessions["session_id"], logged.sessions["session_id"]).any()


def test_a_user_who_does_not_return_has_no_session_that_day(tiny_log):
    config = SimConfig.from_json(tiny_log.meta["simulator_config"])
    out = run_online(config, None)
    sessions = out.detail["sessions"]
    day, user = np.divmod(sessions["session"], config.n_users)
    came_back = set(zip(day.tolist(), user.tolist()))
    for d, u, returned in zip(day, user, sessions["returned"]):
        if d + 1 < config.sessions_per_user:
            assert ((d + 1, u) in came_back) == bool(returned)


@pytest.mark.slow
def test_the_best_weights_differ_by_segment(tmp_path):
    """Personalisation pays in this world: the oracle's best vector per segment (found against the truth) weighs
    share several times more for power users than for new users."""
    from mtf_core import headroom as hr
    from mtf_core.evaluate import prepare
    from mtf_core.reward import RewardSpec
    from mtf_core.simulate import user_table
    from mtf_core.store import load_log

    path = tmp_path / "personal.duckdb"
    generate(SimConfig(n_users=500, sessions_per_user=3, n_items=800, seed=11), str(path))
    log = load_log(path)
    ctx = prepare(log, RewardSpec.default(log.task_names))
    names, _ = user_table(ctx.sim_config)
    seg = np.searchsorted(np.asarray(log.segments), names)
    candidates = hr.candidate_vectors(ctx.sim_config, 32, 0)
    tables = np.broadcast_to(candidates[:, None, :], (len(candidates), len(names), 5)).copy()
    values = hr._per_user_values(ctx, tables, hr._immediate(ctx))
    first = np.array([int(np.argmax(values[:, seg == s, 0].sum(1))) for s in range(len(log.segments))])
    best, _, _ = hr._refine_per_segment(ctx, candidates[first], seg, 0, 0)
    share = log.task_names.index("share")
    power, new = best[log.segments.index("power"), share], best[log.segments.index("new"), share]
    assert power > 3 * new, (power, new)


@pytest.mark.parametrize("mode", ["deterministic", "buckets", "mixed"])
def test_logging_modes(tmp_path, mode):
    """Production-style logs: one vector per segment, A/B buckets by user, or production plus an exploration share
    whose density (and only that) is logged; each validates and is replayed exactly by its own logging policy."""
    from mtf_core.schema import validate
    from mtf_core.store import load_log

    config = SimConfig(n_users=120, sessions_per_user=2, n_items=600, seed=9, logging_mode=mode,
                       exploration_share=0.2)
    path = tmp_path / f"{mode}.duckdb"
    generate(config, str(path))
    con = duckdb.connect(str(path), read_only=True)
    assert validate(con) == []
    labels = dict(con.execute("SELECT logging_policy, count(logging_logp) FROM requests GROUP BY 1").fetchall())
    con.close()
    log = load_log(path)
    distinct = {(s, tuple(np.round(w, 9))) for s, w in zip(log.segment, log.weights)}
    explored = ~np.isnan(log.logging_logp)
    if mode == "deterministic":
        assert len(distinct) == len(log.segments) and not explored.any() and set(labels) == {"production"}
    elif mode == "buckets":
        assert len(distinct) == len(log.segments) * config.n_buckets and not explored.any()
        arm = {u: w for u, w in zip(log.user_id, map(tuple, np.round(log.weights, 9)))}
        assert all(arm[u] == tuple(np.round(w, 9)) for u, w in zip(log.user_id, log.weights))  # one arm per user
    else:
        assert 0.1 < explored.mean() < 0.3 and labels["production"] == 0
        production = {(s, tuple(np.round(w, 9))) for s, w in zip(log.segment[~explored], log.weights[~explored])}
        assert len(production) == len(log.segments)
    out = run_online(config, None)
    np.testing.assert_allclose(out.feedback_sum, np.nan_to_num(log.labels).sum(1), atol=1e-4)


def test_per_item_share_logs_the_weights_that_ranked_each_candidate(tmp_path):
    """A share of requests ranks each candidate with its own weights: they are stored (iw_*), they reproduce the
    logged positions where the request's weights do not, those requests carry no density, and the rest of the
    log is the same as without the share (its random numbers are drawn last)."""
    import torch

    from mtf_core.fusion import fuse, rank_positions
    from mtf_core.schema import validate
    from mtf_core.store import load_log

    base = SimConfig(n_users=100, sessions_per_user=2, n_items=600, seed=4)
    path = tmp_path / "per_item.duckdb"
    generate(dataclasses.replace(base, per_item_share=0.3), str(path))
    con = duckdb.connect(str(path), read_only=True)
    assert validate(con) == []
    con.close()
    log = load_log(path)
    perturbed = np.abs(log.item_weights - log.weights[:, None, :]).max((1, 2)) > 1e-6
    assert 0.2 < perturbed.mean() < 0.4
    assert np.isnan(log.logging_logp[perturbed]).all() and not np.isnan(log.logging_logp[~perturbed]).any()
    scores = torch.from_numpy(log.scores).double()
    by_item = rank_positions(fuse(scores, torch.from_numpy(log.item_weights).double(), "sum")).numpy()
    by_request = rank_positions(fuse(scores, torch.from_numpy(log.weights).double(), "sum")).numpy()
    shown = log.shown
    np.testing.assert_array_equal(by_item[shown], log.positions[shown])
    assert (by_request[perturbed][shown[perturbed]] != log.positions[perturbed][shown[perturbed]]).mean() > 0.1
    out = run_online(dataclasses.replace(base, per_item_share=0.3), None)
    np.testing.assert_allclose(out.feedback_sum, np.nan_to_num(log.labels).sum(1), atol=1e-4)
    plain = load_log(generate(base, str(tmp_path / "plain.duckdb")))
    assert plain.item_weights is None
    first = lambda x: (x.step == 0) & (x.session_id <= base.n_users)  # noqa: E731 (every user's first request)
    np.testing.assert_array_equal(plain.weights[first(plain)], log.weights[first(log)])
    np.testing.assert_array_equal(np.sort(plain.scores[first(plain)], 1), np.sort(log.scores[first(log)], 1))


def test_a_later_stage_reorders_the_shown_slates_under_every_policy(tmp_path):
    """With `later_stage_share`, that share of requests has its most popular shown item moved to the top after
    the fusion: the fusion no longer reproduces those slates, the online replay of the logging policy (the
    truth) lives under the same stage, and the weights drawn are those of the log without it."""
    from mtf_core.profile import fusion_agreement
    from mtf_core.simulate import _later_stage
    from mtf_core.store import load_log

    positions = np.array([[0, 1, 2, 3], [2, 0, 1, 3]])
    popularity = np.array([[0.1, 0.5, 0.9, 2.0], [0.3, 0.1, 0.2, 5.0]])  # item 3 is never shown (n_shown 3)
    moved = _later_stage(positions, popularity, 3, np.array([True, False]))
    np.testing.assert_array_equal(moved, [[1, 2, 0, 3], [2, 0, 1, 3]])

    base = SimConfig(n_users=100, sessions_per_user=2, n_items=600, seed=4)
    config = dataclasses.replace(base, later_stage_share=0.5)
    log = load_log(generate(config, str(tmp_path / "reordered.duckdb")))
    agree, checked = fusion_agreement(log)
    assert checked == log.n_requests and 0.4 < agree / checked < 0.9
    out = run_online(config, None)
    np.testing.assert_allclose(out.feedback_sum, np.nan_to_num(log.labels).sum(1), atol=1e-4)
    plain = load_log(generate(base, str(tmp_path / "plain.duckdb")))
    assert fusion_agreement(plain) == (plain.n_requests, plain.n_requests)
    first = lambda x: (x.step == 0) & (x.session_id <= base.n_users)  # noqa: E731 (every user's first request)
    np.testing.assert_array_equal(plain.weights[first(plain)], log.weights[first(log)])


@pytest.mark.parametrize("by_appeal", [False, True], ids=["by chance", "by appeal"])
def test_users_who_stop_scrolling_early_see_fewer_slots_under_every_policy(tmp_path, by_appeal):
    """With `short_scroll_share`, that share of requests shows only its top 1..n_shown-1 slots, whatever the
    ranking: the log's requests show different numbers of candidates, the fusion still reproduces every shown
    ranking, the online replay of the logging policy (the truth) meets the same users, and the weights drawn
    are those of the log without it; by appeal too (`scroll_by_appeal`)."""
    from mtf_core.profile import fusion_agreement
    from mtf_core.simulate import _short_scroll
    from mtf_core.store import load_log

    config = SimConfig(n_users=100, sessions_per_user=2, n_items=600, seed=4, n_candidates=4, n_shown=3,
                       short_scroll_share=0.5)
    positions = np.array([[0, 1, 2, 3], [2, 0, 1, 3], [1, 0, 3, 2]])
    # 0.1 stops after one slot, 0.3 after two, 0.9 does not stop early
    np.testing.assert_array_equal(_short_scroll(positions, np.array([0.1, 0.3, 0.9]), config),
                                  [[0, 5, 6, 7], [6, 0, 1, 7], [1, 0, 7, 2]])

    base = SimConfig(n_users=100, sessions_per_user=2, n_items=600, seed=4)
    config = dataclasses.replace(base, short_scroll_share=0.5, scroll_by_appeal=by_appeal)
    log = load_log(generate(config, str(tmp_path / "scrolled.duckdb")))
    depth = log.shown.sum(1)
    assert set(np.unique(depth)) == set(range(1, base.n_shown + 1))
    # by chance, every user of the share stops early; by appeal, some of them go on to the end
    assert (0.2 if by_appeal else 0.4) < (depth < base.n_shown).mean() < 0.6
    agree, checked = fusion_agreement(log)
    assert agree == checked == log.n_requests
    out = run_online(config, None)
    np.testing.assert_allclose(out.feedback_sum, np.nan_to_num(log.labels).sum(1), atol=1e-4)
    plain = load_log(generate(base, str(tmp_path / "plain.duckdb")))
    first = lambda x: (x.step == 0) & (x.session_id <= base.n_users)  # noqa: E731 (every user's first request)
    np.testing.assert_array_equal(plain.weights[first(plain)], log.weights[first(log)])


def test_users_who_scroll_by_appeal_see_deeper_where_engaging_items_come_first():
    """With `scroll_by_appeal`, a user in the short-scroll share goes on past a slot when its uniform falls
    below floor + (1 - floor) * the finish rate of the item there: the same user and uniforms see deeper
    under a ranking that puts the engaging items first."""
    from mtf_core.simulate import _short_scroll

    config = SimConfig(n_candidates=4, n_shown=3, short_scroll_share=0.5, scroll_by_appeal=True, scroll_floor=0.5)
    appeal = np.array([[0.9, 0.9, 0.0, 0.0]] * 2)  # go on with probability 0.95 past items 0, 1; 0.5 past 2, 3
    slot_u = np.array([[0.7, 0.7, 0.0]] * 2)
    engaging_first, dull_first = np.array([[0, 1, 2, 3]]), np.array([[2, 3, 0, 1]])
    positions = np.concatenate([engaging_first, dull_first])
    cut = _short_scroll(positions, np.array([0.1, 0.1]), config, appeal, slot_u)
    np.testing.assert_array_equal(cut, [[0, 1, 2, 7], [6, 7, 0, 5]])  # depth 3 (to the end) against depth 1
    # outside the share nobody stops early, whatever the appeal
    kept = _short_scroll(positions, np.array([0.9, 0.9]), config, appeal, slot_u)
    np.testing.assert_array_equal(kept < config.n_shown, positions < config.n_shown)
