"""Each kind of validation problem is found and named (table, column, kind, examples)."""

from __future__ import annotations

import duckdb
import pytest

from mtf_core.schema import validate
from tests.conftest import drop_primary_key


def _problems(path):
    con = duckdb.connect(str(path), read_only=True)
    try:
        return validate(con)
    finally:
        con.close()


def test_clean_log_has_no_problems(tiny_log_path):
    assert _problems(tiny_log_path) == []


CASES = [
    ("missing_table", ["DROP TABLE sessions"], "sessions", None),
    ("missing_column", ["ALTER TABLE impressions DROP COLUMN s_like"], "impressions", "s_like"),
    ("wrong_type", ["ALTER TABLE requests ALTER COLUMN w_click TYPE VARCHAR"], "requests", "w_click"),
    ("null_key", [*drop_primary_key("users"), "UPDATE users SET user_id = NULL WHERE user_id = 1"], "users", "user_id"),
    ("duplicate_key", [*drop_primary_key("requests"),
                       "INSERT INTO requests SELECT * FROM requests WHERE request_id <= 3"], "requests", "request_id"),
    ("orphan", ["INSERT INTO impressions (request_id, item_id, position) VALUES (999999999, 1, NULL)"],
     "impressions", "request_id"),
    ("orphan", ["DELETE FROM users WHERE user_id IN (SELECT user_id FROM requests LIMIT 1)"], "requests", "user_id"),
    ("bad_weight", ["UPDATE requests SET w_like = -0.5 WHERE request_id = 2"], "requests", "w_like"),
    ("bad_weight", ["UPDATE requests SET w_share = 'NaN'::DOUBLE WHERE request_id = 5"], "requests", "w_share"),
    ("duplicate_position", ["UPDATE impressions SET position = 0 WHERE request_id = 1 AND position = 1"],
     "impressions", "position"),
    ("out_of_range", ["UPDATE impressions SET s_click = 1.7 WHERE request_id = 3"], "impressions", "s_click"),
    ("missing_column", ["ALTER TABLE impressions ADD COLUMN iw_click DOUBLE"], "impressions", "iw_like"),
    ("bad_weight", [*(f"ALTER TABLE impressions ADD COLUMN iw_{t} DOUBLE"
                      for t in ("click", "like", "finish", "share", "watch_time")),
                    "UPDATE impressions SET iw_share = -1 WHERE request_id = 2"], "impressions", "iw_share"),
    ("out_of_range", ["UPDATE impressions SET y_watch_time = -2 WHERE request_id = 4 AND position = 0"],
     "impressions", "y_watch_time"),
    ("bad_kind", ["UPDATE tasks SET kind = 'ordinal' WHERE name = 'like'"], "tasks", "kind"),
    ("not_on_simplex", ["UPDATE requests SET w_click = 10 * w_click, w_like = 10 * w_like, w_finish = 10 * w_finish, "
                        "w_share = 10 * w_share, w_watch_time = 10 * w_watch_time"],
     "requests", "w_click,w_like,w_finish,w_share,w_watch_time"),
    ("out_of_range", ["UPDATE requests SET logging_logp = 'Infinity'::DOUBLE WHERE request_id = 6"],
     "requests", "logging_logp"),
]


@pytest.mark.parametrize(("kind", "statements", "table", "column"), CASES, ids=[f"{c[0]}-{c[2]}.{c[3]}" for c in CASES])
def test_validation_problem_is_reported(corrupt, kind, statements, table, column):
    problems = _problems(corrupt(*statements))
    matching = [p for p in problems if p.kind == kind and p.table == table and p.column == column]
    assert matching, f"expected {kind} on {table}.{column}, got {[str(p) for p in problems]}"
    assert table in str(matching[0])


def test_problem_examples_name_offending_keys(corrupt):
    path = corrupt("UPDATE requests SET w_like = -0.5 WHERE request_id IN (2, 7)")
    (problem,) = [p for p in _problems(path) if p.kind == "bad_weight"]
    assert set(problem.examples) == {"request_id=2 w_like=-0.5", "request_id=7 w_like=-0.5"}
