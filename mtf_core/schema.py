"""The session-log schema of DESIGN §2 and `validate`, which reports every problem without crashing.

Tasks are data: the per-task columns (`w_<task>`, `s_<task>`, `y_<task>`) follow whatever the `tasks`
table declares. `impressions` may also carry `iw_<task>` for every task: the weights that ranked that one
candidate, for requests whose weights were perturbed per item (NULL: the request's `w_<task>`). Every identifier that reaches SQL is checked against `IDENTIFIER` or against the log's
own columns first, and every value travels as a parameter.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import duckdb

__all__ = [
    "SCHEMA_VERSION",
    "IDENTIFIER",
    "TABLES",
    "ID_KEYS",
    "REQUIRED_TABLES",
    "Problem",
    "Task",
    "quote_ident",
    "check_identifier",
    "table_columns",
    "read_tasks",
    "validate",
    "structure_problems",
    "create_table_sql",
]

SCHEMA_VERSION = "1"
IDENTIFIER = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
TASK_KINDS = ("binary", "continuous")

# Fixed columns per table: name -> DuckDB type family. Per-task and feature columns are added on top.
TABLES: dict[str, dict[str, str]] = {
    "meta": {"key": "VARCHAR", "value": "VARCHAR"},
    "tasks": {"name": "VARCHAR", "kind": "VARCHAR", "description": "VARCHAR"},
    "users": {"user_id": "BIGINT", "segment": "VARCHAR"},
    "items": {"item_id": "BIGINT"},
    "requests": {
        "request_id": "BIGINT",
        "session_id": "BIGINT",
        "user_id": "BIGINT",
        "step": "INTEGER",
        "ts": "TIMESTAMP",
        "logging_logp": "DOUBLE",
        "logging_policy": "VARCHAR",
    },
    "impressions": {"request_id": "BIGINT", "item_id": "BIGINT", "position": "INTEGER"},
    "sessions": {"session_id": "BIGINT", "user_id": "BIGINT", "n_requests": "INTEGER", "returned": "BOOLEAN"},
}
REQUIRED_TABLES = ("meta", "tasks", "users", "requests", "impressions", "sessions")
PRIMARY_KEYS = {
    "meta": "key",
    "tasks": "name",
    "users": "user_id",
    "items": "item_id",
    "requests": "request_id",
    "sessions": "session_id",
}
_INTEGER_TYPES = {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT"}
_NUMERIC_TYPES = _INTEGER_TYPES | {"FLOAT", "DOUBLE", "REAL"}
N_EXAMPLES = 5


@dataclass(frozen=True)
class Task:
    """One feedback signal: `binary` scores and labels lie in [0, 1], `continuous` ones in [0, inf).

    `threshold` (continuous tasks only): a label above it counts as a positive where a binary view is needed
    (GAUC); None means the median of its positive values over shown items (`rerank.label_thresholds`)."""

    name: str
    kind: str
    description: str = ""
    threshold: float | None = None


@dataclass(frozen=True)
class Problem:
    """One validation finding; `examples` holds a few offending keys so that a user can find the rows."""

    table: str
    column: str | None
    kind: str
    message: str
    examples: tuple[str, ...] = field(default_factory=tuple)

    def __str__(self) -> str:
        where = self.table if self.column is None else f"{self.table}.{self.column}"
        tail = f" (e.g. {'; '.join(self.examples)})" if self.examples else ""
        return f"[{self.kind}] {where}: {self.message}{tail}"


def quote_ident(name: str) -> str:
    """Quote an SQL identifier; only ever called on names already checked against the schema."""
    return '"' + name.replace('"', '""') + '"'


def check_identifier(name: str, what: str) -> str:
    """Return `name` if it is a lowercase identifier, else raise ValueError naming it."""
    if not IDENTIFIER.match(name):
        raise ValueError(f"{what} {name!r} is not a lowercase identifier (letters, digits, underscore)")
    return name


ID_KEYS = "id_keys"
"""The table in which an import keeps the original key of every id it numbered (`store._number_text_ids`)."""


def table_columns(con: duckdb.DuckDBPyConnection) -> dict[str, dict[str, str]]:
    """Tables of the main schema -> {column: DuckDB type}."""
    rows = con.execute(
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'main' ORDER BY table_name, ordinal_position"
    ).fetchall()
    out: dict[str, dict[str, str]] = {}
    for table, column, dtype in rows:
        out.setdefault(table, {})[column] = dtype
    return out


def read_tasks(con: duckdb.DuckDBPyConnection) -> list[Task]:
    """The declared tasks, in declaration order (rowid) so that K has a stable order."""
    has_threshold = "threshold" in {r[0] for r in con.execute("DESCRIBE tasks").fetchall()}
    threshold = "TRY_CAST(threshold AS DOUBLE)" if has_threshold else "NULL"
    rows = con.execute(f"SELECT name, kind, coalesce(description, ''), {threshold} FROM tasks ORDER BY rowid"
                       ).fetchall()
    return [Task(str(n), str(k), str(d), None if t is None or not math.isfinite(t) else float(t))
            for n, k, d, t in rows]


def create_table_sql(
    table: str, tasks: list[Task], user_features: list[str] = (), item_features: list[str] = (),  # type: ignore[assignment]
    item_weights: bool = False,
) -> str:
    """CREATE TABLE statement of one log table for the given tasks and feature names (all checked)."""
    cols = dict(TABLES[table])
    for t in tasks:
        check_identifier(t.name, "task name")
    if table == "users":
        cols.update({f"uf_{check_identifier(f, 'user feature')}": "DOUBLE" for f in user_features})
    elif table == "items":
        cols.update({f"if_{check_identifier(f, 'item feature')}": "DOUBLE" for f in item_features})
    elif table == "tasks":
        cols["threshold"] = "DOUBLE"
    elif table == "requests":
        cols.update({f"w_{t.name}": "DOUBLE" for t in tasks})
    elif table == "impressions":
        cols.update({f"s_{t.name}": "DOUBLE" for t in tasks})
        cols.update({f"y_{t.name}": "DOUBLE" for t in tasks})
        if item_weights:
            cols.update({f"iw_{t.name}": "DOUBLE" for t in tasks})
    parts = [f"{quote_ident(c)} {ty}" for c, ty in cols.items()]
    if table in PRIMARY_KEYS:
        parts.append(f"PRIMARY KEY ({quote_ident(PRIMARY_KEYS[table])})")
    return f"CREATE TABLE {quote_ident(table)} ({', '.join(parts)})"


def _type_ok(expected: str, actual: str) -> bool:
    if expected == actual:
        return True
    if expected in ("BIGINT", "INTEGER"):
        return actual in _INTEGER_TYPES
    if expected == "DOUBLE":
        return actual in _NUMERIC_TYPES or actual.startswith("DECIMAL")
    if expected == "TIMESTAMP":
        return actual.startswith("TIMESTAMP") or actual == "DATE"
    return False


def _examples(con: duckdb.DuckDBPyConnection, sql: str, params: list[object] | None = None) -> tuple[str, ...]:
    """A few offending rows, each as `column=value` pairs (`request_id=7 item_id=109`), so that a user can find
    them and tell which number is which."""
    cursor = con.execute(sql + f" LIMIT {N_EXAMPLES}", params or [])
    names = [d[0] for d in cursor.description or []]
    return tuple(" ".join(f"{name}={'NULL' if value is None else value}" for name, value in zip(names, row))
                 for row in cursor.fetchall())


def _expected_columns(table: str, tasks: list[Task]) -> dict[str, str]:
    cols = dict(TABLES[table])
    if table == "requests":
        cols.update({f"w_{t.name}": "DOUBLE" for t in tasks})
    if table == "impressions":
        cols.update({f"s_{t.name}": "DOUBLE" for t in tasks})
        cols.update({f"y_{t.name}": "DOUBLE" for t in tasks})
    return cols


def structure_problems(
    con: duckdb.DuckDBPyConnection, columns: dict[str, dict[str, str]], tasks: list[Task]
) -> list[Problem]:
    """Missing tables and columns and wrong types (the checks a loader needs before reading)."""
    problems = []
    for table in TABLES:
        if table not in columns:
            if table in REQUIRED_TABLES:
                problems.append(Problem(table, None, "missing_table", "required table is missing"))
            continue
        actual = columns[table]
        for col, expected in _expected_columns(table, tasks).items():
            if col not in actual:
                problems.append(Problem(table, col, "missing_column", f"required column is missing ({expected})"))
            elif not _type_ok(expected, actual[col]):
                problems.append(Problem(table, col, "wrong_type", f"expected {expected}, found {actual[col]}"))
        if table == "impressions" and any(c.startswith("iw_") for c in actual):
            for t in tasks:  # per-item weights are optional, but all or none
                col = f"iw_{t.name}"
                if col not in actual:
                    problems.append(Problem(table, col, "missing_column", "per-item weights (iw_*) need a column for "
                                            "every task"))
                elif not _type_ok("DOUBLE", actual[col]):
                    problems.append(Problem(table, col, "wrong_type", f"expected DOUBLE, found {actual[col]}"))
        prefix = {"users": "uf_", "items": "if_"}.get(table)
        for col, dtype in actual.items():
            if prefix and col.startswith(prefix) and dtype not in _NUMERIC_TYPES and not dtype.startswith("DECIMAL"):
                problems.append(Problem(table, col, "wrong_type", f"feature columns must be numeric, found {dtype}"))
    return problems


def _check_tasks(con: duckdb.DuckDBPyConnection, tasks: list[Task]) -> list[Problem]:
    problems = []
    if not tasks:
        problems.append(Problem("tasks", None, "no_tasks", "the log declares no tasks"))
    for t in tasks:
        if not IDENTIFIER.match(t.name):
            problems.append(Problem("tasks", "name", "bad_name", "task names must be lowercase identifiers", (t.name,)))
        if t.kind not in TASK_KINDS:
            problems.append(Problem("tasks", "kind", "bad_kind", f"kind must be one of {TASK_KINDS}", (f"{t.name}={t.kind}",)))
    return problems


def _check_keys(con: duckdb.DuckDBPyConnection, columns: dict[str, dict[str, str]]) -> list[Problem]:
    problems = []
    for table, key in PRIMARY_KEYS.items():
        if table not in columns or key not in columns[table]:
            continue
        t, k = quote_ident(table), quote_ident(key)
        n_null = con.execute(f"SELECT count(*) FROM {t} WHERE {k} IS NULL").fetchone()[0]  # type: ignore[index]
        if n_null:
            problems.append(Problem(table, key, "null_key", f"{n_null} rows have a NULL key"))
        dup_sql = f"SELECT {k}, count(*) AS n_rows FROM {t} WHERE {k} IS NOT NULL GROUP BY {k} HAVING count(*) > 1"
        n_dup = con.execute(f"SELECT count(*) FROM ({dup_sql})").fetchone()[0]  # type: ignore[index]
        if n_dup:
            problems.append(
                Problem(table, key, "duplicate_key", f"{n_dup} keys appear more than once", _examples(con, dup_sql))
            )
    for table, col in (("requests", "session_id"), ("requests", "user_id"), ("impressions", "request_id"),
                       ("impressions", "item_id"), ("users", "segment")):
        if table in columns and col in columns[table]:
            n = con.execute(f"SELECT count(*) FROM {quote_ident(table)} WHERE {quote_ident(col)} IS NULL").fetchone()[0]  # type: ignore[index]
            if n:
                problems.append(Problem(table, col, "null_key", f"{n} rows have a NULL {col}"))
    return problems


def _orphans(
    con: duckdb.DuckDBPyConnection, columns: dict[str, dict[str, str]], child: str, col: str, parent: str, pcol: str
) -> list[Problem]:
    if child not in columns or parent not in columns or col not in columns[child] or pcol not in columns[parent]:
        return []
    sql = (
        f"SELECT DISTINCT c.{quote_ident(col)} FROM {quote_ident(child)} c ANTI JOIN {quote_ident(parent)} p "
        f"ON c.{quote_ident(col)} = p.{quote_ident(pcol)} WHERE c.{quote_ident(col)} IS NOT NULL"
    )
    n = con.execute(f"SELECT count(*) FROM ({sql})").fetchone()[0]  # type: ignore[index]
    if not n:
        return []
    examples, params = sql, None
    if ID_KEYS in columns and con.execute(f"SELECT count(*) FROM {ID_KEYS} WHERE id_column = ?",  # type: ignore[index]
                                          [col]).fetchone()[0]:
        # Ids an import numbered: the key a user wrote is what they can find in their files.
        examples = (f"SELECT o.{quote_ident(col)}, k.key FROM ({sql}) o LEFT JOIN {ID_KEYS} k "
                    f"ON k.id_column = ? AND k.id = o.{quote_ident(col)}")
        params = [col]
    return [Problem(child, col, "orphan", f"{n} {col} values have no row in {parent}",
                    _examples(con, examples, params))]


def _check_values(
    con: duckdb.DuckDBPyConnection, columns: dict[str, dict[str, str]], tasks: list[Task]
) -> list[Problem]:
    problems = []
    req, imp = columns.get("requests", {}), columns.get("impressions", {})
    weight_cols = [f"w_{t.name}" for t in tasks if f"w_{t.name}" in req and _type_ok("DOUBLE", req[f"w_{t.name}"])]
    complete = len(weight_cols) == len(tasks) and bool(tasks)
    # A request whose weights are all NULL logged no fusion weights (random exposure, a feed whose ranker
    # was not logged): allowed, and read as such. Some NULL among known weights is a broken row.
    any_known = " OR ".join(f"{quote_ident(c)} IS NOT NULL" for c in weight_cols) or "FALSE"
    for t in tasks:
        w = f"w_{t.name}"
        if w in req and _type_ok("DOUBLE", req[w]):
            sql = (f"SELECT request_id, {quote_ident(w)} FROM requests WHERE {quote_ident(w)} < 0 "
                   f"OR isnan({quote_ident(w)}::DOUBLE) "
                   f"OR isinf({quote_ident(w)}::DOUBLE) OR ({quote_ident(w)} IS NULL AND ({any_known}))")
            n = con.execute(f"SELECT count(*) FROM ({sql})").fetchone()[0]  # type: ignore[index]
            if n:
                problems.append(Problem("requests", w, "bad_weight", f"{n} weights are negative, NaN, infinite or "
                                        "NULL beside known weights of the same request (a request logs all its "
                                        "weights or none)", _examples(con, sql)))
        iw = f"iw_{t.name}"
        if iw in imp and _type_ok("DOUBLE", imp[iw]):
            sql = (f"SELECT request_id, item_id, {quote_ident(iw)} FROM impressions WHERE {quote_ident(iw)} < 0 "
                   f"OR isnan({quote_ident(iw)}::DOUBLE) OR isinf({quote_ident(iw)}::DOUBLE)")
            n = con.execute(f"SELECT count(*) FROM ({sql})").fetchone()[0]  # type: ignore[index]
            if n:
                problems.append(Problem("impressions", iw, "bad_weight", f"{n} per-item weights are negative, NaN "
                                        "or infinite", _examples(con, sql)))
        upper = "1" if t.kind == "binary" else "'Infinity'::DOUBLE"
        for prefix, what in (("s_", "score"), ("y_", "label")):
            c = prefix + t.name
            if c not in imp or not _type_ok("DOUBLE", imp[c]):
                continue
            qc = quote_ident(c)
            sql = (
                f"SELECT request_id, item_id, {qc} FROM impressions WHERE {qc} IS NOT NULL AND "
                f"(isnan({qc}::DOUBLE) OR {qc} < 0 OR {qc} > {upper} OR isinf({qc}::DOUBLE))"
            )
            n = con.execute(f"SELECT count(*) FROM ({sql})").fetchone()[0]  # type: ignore[index]
            if n:
                rng = "[0, 1]" if t.kind == "binary" else "[0, inf)"
                problems.append(Problem("impressions", c, "out_of_range", f"{n} {what}s outside {rng} or NaN", _examples(con, sql)))
        sc = f"s_{t.name}"
        if sc in imp:
            n = con.execute(f"SELECT count(*) FROM impressions WHERE {quote_ident(sc)} IS NULL").fetchone()[0]  # type: ignore[index]
            if n:
                problems.append(Problem("impressions", sc, "null_score", f"{n} candidates have no score"))
    if "position" in imp and "request_id" in imp:
        sql = (
            "SELECT request_id, position FROM impressions WHERE position IS NOT NULL "
            "GROUP BY request_id, position HAVING count(*) > 1"
        )
        n = con.execute(f"SELECT count(*) FROM ({sql})").fetchone()[0]  # type: ignore[index]
        if n:
            problems.append(Problem("impressions", "position", "duplicate_position", f"{n} positions are shown twice within a request", _examples(con, sql)))
        sql = "SELECT request_id, item_id, position FROM impressions WHERE position < 0"
        n = con.execute(f"SELECT count(*) FROM ({sql})").fetchone()[0]  # type: ignore[index]
        if n:
            problems.append(Problem("impressions", "position", "out_of_range", f"{n} negative positions", _examples(con, sql)))
        n_shown = con.execute("SELECT count(*) FROM impressions WHERE position IS NOT NULL").fetchone()[0]  # type: ignore[index]
        n_rows = con.execute("SELECT count(*) FROM impressions").fetchone()[0]  # type: ignore[index]
        if n_rows and not n_shown:
            problems.append(Problem("impressions", "position", "nothing_shown", "no candidate was shown (every "
                                    "position is NULL): there is no feedback to learn or evaluate from"))
        # Positions are 0-based ranks: the shown items of a request sit at 0, 1, ..., m-1. 1-based positions
        # or gaps would silently shift the position curve and every figure built on it.
        sql = ("SELECT request_id, min(position) AS first, max(position) AS last, count(position) AS shown "
               "FROM impressions WHERE position IS NOT NULL GROUP BY request_id "
               "HAVING min(position) <> 0 OR max(position) <> count(position) - 1")
        n = con.execute(f"SELECT count(*) FROM ({sql})").fetchone()[0]  # type: ignore[index]
        if n:
            problems.append(Problem("impressions", "position", "position_gap",
                                    f"{n} requests do not show their items at positions 0, 1, ..., m-1 (positions "
                                    "are 0-based ranks without gaps)",
                                    _examples(con, sql)))
    if complete:
        # The logged weights are a point of the simplex: importance ratios are densities on it, so weights
        # scaled by 10 (the same rankings) would make every ratio vanish.
        total = " + ".join(f"coalesce({quote_ident(c)}::DOUBLE, 0)" for c in weight_cols)
        sql = f"SELECT request_id FROM requests WHERE ({any_known}) AND abs(({total}) - 1) > 1e-6"
        n = con.execute(f"SELECT count(*) FROM ({sql})").fetchone()[0]  # type: ignore[index]
        if n:
            problems.append(Problem("requests", ",".join(weight_cols), "not_on_simplex",
                                    f"{n} requests have weights that do not sum to 1 (within 1e-6); logged "
                                    "fusion weights must lie on the simplex", _examples(con, sql)))
    if "logging_logp" in req:
        sql = "SELECT request_id, logging_logp FROM requests WHERE isnan(logging_logp) OR isinf(logging_logp)"
        n = con.execute(f"SELECT count(*) FROM ({sql})").fetchone()[0]  # type: ignore[index]
        if n:
            problems.append(Problem("requests", "logging_logp", "out_of_range", f"{n} log-densities are NaN or infinite", _examples(con, sql)))
    return problems


def validate(con: duckdb.DuckDBPyConnection) -> list[Problem]:
    """Every problem of a log: structure first; value checks only where the structure allows them."""
    columns = table_columns(con)
    problems: list[Problem] = []
    tasks: list[Task] = []
    if "tasks" in columns and {"name", "kind"} <= set(columns["tasks"]):
        tasks = read_tasks(con)
        problems += _check_tasks(con, tasks)
    tasks = [t for t in tasks if IDENTIFIER.match(t.name)]
    problems += structure_problems(con, columns, tasks)
    problems += _check_keys(con, columns)
    problems += _orphans(con, columns, "impressions", "request_id", "requests", "request_id")
    problems += _orphans(con, columns, "requests", "user_id", "users", "user_id")
    problems += _orphans(con, columns, "requests", "session_id", "sessions", "session_id")
    if "items" in columns:
        problems += _orphans(con, columns, "impressions", "item_id", "items", "item_id")
    problems += _check_values(con, columns, tasks)
    if "meta" in columns and {"key", "value"} <= set(columns["meta"]):
        keys = {r[0] for r in con.execute("SELECT key FROM meta").fetchall()}
        for k in ("schema_version", "source", "created_at"):
            if k not in keys:
                problems.append(Problem("meta", "key", "missing_meta", f"meta has no {k!r} entry"))
    return problems
