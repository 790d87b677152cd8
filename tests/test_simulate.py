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


def test_segments_differ_in_logged_feedback(tiny_log_path):
    con = duckdb.connect(str(tiny_log_path), read_only=True)
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
