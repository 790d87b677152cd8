"""Open, create and import DuckDB session logs; load them into dense numpy batches (no per-row Python).

Logs are opened read-only everywhere except in `write_log`/`import_log`, which build a new file under a
temporary name and rename it into place, so a reader never sees a half-written log and a killed writer
leaves nothing in place of the requested file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Mapping

import duckdb
import numpy as np
import pyarrow as pa
import torch

from mtf_core.errors import EXIT_PROBLEMS, EXIT_UNUSABLE, LogError, is_disk_full
from mtf_core.lake import is_lake, open_lake
from mtf_core.policies.base import StateBatch, context_features
from mtf_core.schema import (
    ID_KEYS,
    IDENTIFIER,
    SCHEMA_VERSION,
    TABLES,
    Task,
    create_table_sql,
    quote_ident,
    read_tasks,
    structure_problems,
    table_columns,
    validate,
)

__all__ = [
    "LogData",
    "open_log",
    "load_log",
    "load_from",
    "sample_users",
    "write_log",
    "log_info",
    "fingerprint",
    "import_log",
    "import_uploads",
    "arrow_table",
    "read_mapping",
    "temporary_path",
]


def temporary_path(path: Path) -> Path:
    """A sibling name for building `path` before an atomic rename."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def open_log(path: str | os.PathLike[str]) -> duckdb.DuckDBPyConnection:
    """Open a log read-only (a `.duckdb` file, or a folder of Parquet files per table: `lake`); a missing file or
    one that is neither raises LogError(exit 2)."""
    p = Path(path)
    if not p.exists():
        raise LogError(f"{p}: no such file", EXIT_UNUSABLE)
    if p.is_dir():
        if is_lake(p):
            return open_lake(p)
        raise LogError(f"{p}: is a directory, not a DuckDB log nor a Parquet lake (a folder per table, with "
                       "meta/)", EXIT_UNUSABLE)
    try:
        con = duckdb.connect(str(p), read_only=True)
        con.execute("SET enable_progress_bar = false")
        return con
    except duckdb.Error as exc:
        first = str(exc).splitlines()[0]
        if "lock" in first.lower():
            raise LogError(f"{p}: is open for writing in another process (a DuckDB shell, a running generate or "
                           f"import); close it and try again ({first})", EXIT_UNUSABLE) from exc
        raise LogError(f"{p}: not a readable DuckDB database ({first})", EXIT_UNUSABLE) from exc


@dataclass(frozen=True)
class LogData:
    """A log as dense arrays. R requests (ordered by request_id), N candidate slots, K tasks.

    Candidates of a request fill slots in shown order first, then the unshown ones; `mask` marks real
    candidates, `positions` holds the shown rank or -1.
    """

    path: str
    tasks: tuple[Task, ...]
    segments: tuple[str, ...]  # sorted names
    user_feature_names: tuple[str, ...]
    item_feature_names: tuple[str, ...]
    request_id: np.ndarray  # (R,) int64
    session_id: np.ndarray  # (R,) int64
    user_id: np.ndarray  # (R,) int64
    step: np.ndarray  # (R,) int64
    ts: np.ndarray  # (R,) datetime64[us]
    segment: np.ndarray  # (R,) int64 index into segments
    user_features: np.ndarray  # (R, F) float32
    context: np.ndarray  # (R, 1+K) float32
    weights: np.ndarray  # (R, K) float64, the logged action
    logging_logp: np.ndarray  # (R,) float64, NaN where unknown
    scores: np.ndarray  # (R, N, K) float32
    labels: np.ndarray  # (R, N, K) float32, NaN where not shown
    positions: np.ndarray  # (R, N) int32, -1 where not shown or padding
    mask: np.ndarray  # (R, N) bool
    item_features: np.ndarray  # (R, N, Fi) float32
    continued: np.ndarray  # (R,) bool: the session has a later request
    returned: np.ndarray  # (R,) float64: the session's flag, NaN where unknown
    meta: Mapping[str, str]
    fingerprint: str
    item_weights: np.ndarray | None = None
    """(R, N, K) float32: the weights that ranked each candidate, where the log has per-item weights (`iw_*`);
    a request that was not perturbed per item has its own weights on every candidate."""

    @property
    def n_requests(self) -> int:
        return int(self.request_id.shape[0])

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    @property
    def shown(self) -> np.ndarray:
        return self.positions >= 0

    @property
    def last(self) -> np.ndarray:
        return ~self.continued

    def label_totals(self) -> np.ndarray:
        """Each task's labels summed over each request's shown items `[R,K]` (a missing label counts 0)."""
        return torch.from_numpy(self.labels).nansum(1).numpy()  # numpy's nansum, or nan_to_num and sum: 3-10x slower

    @property
    def n_shown(self) -> int:
        return int(self.positions.max()) + 1 if self.positions.size else 0

    @property
    def weights_known(self) -> bool:
        """Whether every request logged its fusion weights (a random-exposure log or a feed whose ranker was
        not logged has none: no importance weighting, no behaviour to clone or constrain to)."""
        return bool(np.isfinite(self.weights).all())

    @property
    def is_simulated(self) -> bool:
        return self.meta.get("source") == "simulator" and "simulator_config" in self.meta

    def state(self, rows: np.ndarray | slice | None = None) -> StateBatch:
        """The requests' states as torch tensors (zero-copy views where dtypes allow)."""
        r = slice(None) if rows is None else rows
        return StateBatch(
            user_features=torch.from_numpy(np.ascontiguousarray(self.user_features[r])),
            segment=torch.from_numpy(np.ascontiguousarray(self.segment[r])),
            context=torch.from_numpy(np.ascontiguousarray(self.context[r])),
            scores=torch.from_numpy(np.ascontiguousarray(self.scores[r])),
            mask=torch.from_numpy(np.ascontiguousarray(self.mask[r])),
            item_features=torch.from_numpy(np.ascontiguousarray(self.item_features[r])),
            segments=self.segments,
        )

    def subset(self, rows: np.ndarray) -> "LogData":
        """The log restricted to some requests (e.g. a validation split); per-request arrays are indexed."""
        per_request = {
            name: getattr(self, name)[rows]
            for name in ("request_id", "session_id", "user_id", "step", "ts", "segment", "user_features", "context",
                         "weights", "logging_logp", "scores", "labels", "positions", "mask", "item_features",
                         "continued", "returned")
        }
        if self.item_weights is not None:
            per_request["item_weights"] = self.item_weights[rows]
        return LogData(path=self.path, tasks=self.tasks, segments=self.segments,
                       user_feature_names=self.user_feature_names, item_feature_names=self.item_feature_names,
                       meta=self.meta, fingerprint=self.fingerprint, **per_request)


def _columns_with_prefix(columns: dict[str, str], prefix: str) -> list[str]:
    return [c for c in columns if c.startswith(prefix) and IDENTIFIER.match(c)]


def fingerprint(con: duckdb.DuckDBPyConnection) -> str:
    """A short content hash of a log: meta, row counts and order-free hashes of keys and actions."""
    h = hashlib.sha256()
    for k, v in con.execute("SELECT key, value FROM meta ORDER BY key").fetchall():
        if k != "created_at":
            h.update(f"{k}={v};".encode())
    for table in ("requests", "impressions", "users"):
        h.update(str(con.execute(f"SELECT count(*) FROM {quote_ident(table)}").fetchone()).encode())
    h.update(str(con.execute("SELECT sum(hash(request_id, session_id, user_id)) FROM requests").fetchone()).encode())
    h.update(str(con.execute("SELECT sum(hash(request_id, item_id, position)) FROM impressions").fetchone()).encode())
    return h.hexdigest()[:12]


def _fetch(con: duckdb.DuckDBPyConnection, sql: str) -> dict[str, np.ndarray]:
    """Columns of a query as numpy arrays, through Arrow (NULL floats become NaN, no masked arrays)."""
    table = con.sql(sql).to_arrow_table()
    return {name: table.column(name).to_numpy() for name in table.column_names}


def _fixed_rows(column: pa.ChunkedArray, width: int) -> np.ndarray:
    """An Arrow column of fixed-size float32 lists -> a `[rows, width]` array, one contiguous copy: the
    lists' values already lie row-major, so no per-column strided writes."""
    out = np.empty((len(column), width), dtype=np.float32)
    start = 0
    for chunk in column.chunks:
        values = chunk.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
        out[start:start + len(values)] = values
        start += len(values)
    return out


def _float(a: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    """A numeric column (NULLs already NaN, through Arrow) as floats of `dtype`."""
    return np.asarray(a, dtype=dtype)


def session_links(session_id: np.ndarray, step: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per request, the index of the next request of its session and whether there is none (`done`)."""
    order = np.lexsort((step, session_id))
    nxt = np.arange(len(session_id))
    same = session_id[order[1:]] == session_id[order[:-1]]
    nxt[order[:-1][same]] = order[1:][same]
    done = np.ones(len(session_id), dtype=bool)
    done[order[:-1][same]] = False
    return nxt, done


def _load_requests(con: duckdb.DuckDBPyConnection, tasks: tuple[Task, ...], uf: list[str]) -> dict[str, np.ndarray]:
    """Request columns in request-id order; `segment_code` indexes `segment_names` (sorted, every user's)."""
    w_cols = ", ".join(f"r.{quote_ident('w_' + t.name)}" for t in tasks)
    uf_cols = "".join(f", coalesce(u.{quote_ident(c)}, 0)::DOUBLE AS {quote_ident(c)}" for c in uf)
    # Segments are numbered over the users table (small) instead of ranking every request.
    segments = "(SELECT DISTINCT coalesce(segment, '(missing)') AS name FROM users)"
    numbered = f"(SELECT name, (row_number() OVER (ORDER BY name) - 1)::BIGINT AS code FROM {segments})"
    sql = f"""
        SELECT r.request_id, r.session_id, r.user_id, coalesce(r.step, 0)::BIGINT AS step, r.ts, {w_cols},
               coalesce(r.logging_logp, 'NaN'::DOUBLE) AS logging_logp, seg.code AS segment_code {uf_cols},
               coalesce(s.returned::DOUBLE, 'NaN'::DOUBLE) AS returned
        FROM requests r JOIN users u ON r.user_id = u.user_id
        JOIN {numbered} seg ON seg.name = coalesce(u.segment, '(missing)')
        LEFT JOIN sessions s ON s.session_id = r.session_id
        ORDER BY r.request_id
    """
    out = _fetch(con, sql)
    out["segment_names"] = np.asarray(_fetch(con, f"SELECT name FROM {numbered} ORDER BY code")["name"], dtype=object)
    return out


def _candidate_columns(tasks: tuple[Task, ...], item_weights: bool = False) -> str:
    """The candidate columns as loading wants them, converted by DuckDB (in parallel, before the transfer):
    `position` (-1 where not shown), and `scores` and `labels` as one float32 array per row, task by task:
    scores 0 where NULL or not finite, labels NaN where NULL or the item was not shown; with `item_weights`,
    the per-item weights too (NaN where NULL: the request's own weights)."""
    scores = (f"CASE WHEN isfinite({quote_ident('s_' + t.name)}::DOUBLE) THEN {quote_ident('s_' + t.name)}::FLOAT "
              "ELSE 0 END" for t in tasks)
    labels = (f"coalesce(CASE WHEN position IS NOT NULL THEN {quote_ident('y_' + t.name)}::FLOAT END, 'NaN'::FLOAT)"
              for t in tasks)
    k = len(tasks)
    columns = (f"coalesce(position, -1)::INTEGER AS position, [{', '.join(scores)}]::FLOAT[{k}] AS scores, "
               f"[{', '.join(labels)}]::FLOAT[{k}] AS labels")
    if item_weights:
        weights = (f"coalesce({quote_ident('iw_' + t.name)}::FLOAT, 'NaN'::FLOAT)" for t in tasks)
        columns += f", [{', '.join(weights)}]::FLOAT[{k}] AS item_weights"
    return columns


def _load_candidates(con: duckdb.DuckDBPyConnection, tasks: tuple[Task, ...], itf: list[str],
                     request_id: np.ndarray, item_weights: bool = False) -> dict[str, object]:
    """Candidate rows in (request, shown position, item) order, as numpy: keys, layout, and scores and
    labels `[rows, K]`. DuckDB keeps insertion order and the writers insert in that order, so the sort
    below only runs for logs written otherwise."""
    table = con.sql(f"SELECT request_id, item_id, {_candidate_columns(tasks, item_weights)} FROM impressions"
                    ).to_arrow_table()
    rid = table.column("request_id").to_numpy().astype(np.int64, copy=False)
    item = table.column("item_id").to_numpy().astype(np.int64, copy=False)
    position = np.array(table.column("position"), dtype=np.int32)  # owned: Arrow's zero-copy view is read-only
    scores, labels = (_fixed_rows(table.column(c), len(tasks)) for c in ("scores", "labels"))
    weights = _fixed_rows(table.column("item_weights"), len(tasks)) if item_weights else None
    del table
    if not _in_candidate_order(rid, position, item):
        order = np.lexsort((item, np.where(position >= 0, position, np.iinfo(np.int32).max), rid))
        rid, item, position, scores, labels = rid[order], item[order], position[order], scores[order], labels[order]
        weights = None if weights is None else weights[order]
    row, slot, known, counts, group_row = _slots(rid, request_id)
    # Every request present once, in order, with the same number of candidates: columns reshape as they are.
    uniform = (len(group_row) == len(request_id) and len(rid) > 0 and bool(known.all())
               and bool(np.all(counts == counts[0])) and bool(np.all(group_row == np.arange(len(group_row)))))
    return {"scores": scores, "labels": labels, "item_weights": weights, "position": position,
            "item_features": _item_features(con, itf, item),
            "row": row, "slot": slot, "known": known, "uniform": uniform}


def _item_features(con: duckdb.DuckDBPyConnection, itf: list[str], item: np.ndarray) -> np.ndarray:
    """Item features `[rows, F]` of each candidate row (0 for items missing from `items`): one gather."""
    if not itf:
        return np.zeros((len(item), 0), dtype=np.float32)
    items = _fetch(con, "SELECT item_id, " + ", ".join(f"coalesce({quote_ident(c)}, 0)::FLOAT AS "
                                                      f"{quote_ident(c)}" for c in itf) + " FROM items ORDER BY item_id")
    ids = np.asarray(items["item_id"], dtype=np.int64)
    # One extra all-zero row for candidates whose item is not in the table.
    matrix = np.zeros((len(ids) + 1, len(itf)), dtype=np.float32)
    for j, c in enumerate(itf):
        matrix[:len(ids), j] = items[c]
    if not len(ids):
        return np.take(matrix, np.zeros(len(item), dtype=np.int64), axis=0)
    dense = ids[-1] - ids[0] == len(ids) - 1  # ids a..a+M-1: index directly
    at = np.clip(item - ids[0] if dense else np.searchsorted(ids, item), 0, len(ids) - 1)
    at[np.take(ids, at) != item] = len(ids)
    return np.take(matrix, at, axis=0)  # 10x faster than matrix[at] for row gathers


def _in_candidate_order(rid: np.ndarray, position: np.ndarray, item: np.ndarray) -> bool:
    """Whether rows are sorted by (request, shown position with unshown last, item)."""
    if len(rid) < 2:
        return True
    step = rid[1:] - rid[:-1]
    if (step < 0).any():
        return False
    a, b = position[:-1], position[1:]
    # Within a request: shown before unshown, shown by position, unshown (-1) by item id.
    ok = np.where(a >= 0, (b > a) | (b < 0), (b < 0) & (item[1:] >= item[:-1]))
    return bool((ok | (step > 0)).all())


def _slots(rid: np.ndarray, request_id: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For candidate rows grouped by request id `rid`: (request row, slot within the request, whether the
    request exists in `request_id` (sorted), candidates per group, request row per group)."""
    starts = np.flatnonzero(np.r_[True, rid[1:] != rid[:-1]]) if len(rid) else np.zeros(0, dtype=np.int64)
    counts = np.diff(np.r_[starts, len(rid)])
    group_row = np.minimum(np.searchsorted(request_id, rid[starts]), max(len(request_id) - 1, 0))
    row = np.repeat(group_row, counts)
    known = np.repeat(request_id[group_row] == rid[starts], counts) if len(request_id) else np.zeros(len(rid), bool)
    slot = np.arange(len(rid)) - np.repeat(starts, counts)
    return row, slot, known, counts, group_row


def load_log(path: str | os.PathLike[str], progress: Callable[[float], None] | None = None,
             check: bool = True, user_sample: float = 1.0, sample_seed: int = 0) -> LogData:
    """Read a whole log into dense arrays. Raises LogError for anything `validate` refuses (`check=False`
    reads what can be read: ragged requests as padding, unknown items and segments as zeros). With
    `user_sample` < 1, only that share of the users is read (`sample_users`): a log larger than memory
    trains on a reproducible sample of whole users; the fingerprint stays the whole log's."""
    if not 0.0 < user_sample <= 1.0:
        raise LogError(f"user sample {user_sample!r}: a share of the users in (0, 1]")
    con = open_log(path)
    try:
        if user_sample < 1.0:
            fp = fingerprint(con)
            sample_users(con, user_sample, sample_seed)
            log = load_from(con, str(path), progress, check)
            return dataclasses.replace(log, fingerprint=fp, meta={**log.meta, "user_sample": f"{user_sample:g}",
                                                                    "user_sample_seed": str(sample_seed)})
        return load_from(con, str(path), progress, check)
    finally:
        con.close()


SAMPLE_BUCKETS = 1_000_000


def sample_users(con: duckdb.DuckDBPyConnection, share: float, seed: int = 0) -> None:
    """Shadow the log's user-level tables on `con` with temporary views of a reproducible share of its users
    (those whose hash(user_id, seed) falls in the first `share` of its range), every request, candidate and
    session of them, nothing of the others: what DuckDB reads afterwards is that sample alone."""
    database = con.execute("SELECT current_database()").fetchone()[0]  # type: ignore[index]
    home = f"{quote_ident(str(database))}.main"
    cut, seed = int(round(share * SAMPLE_BUCKETS)), int(seed)  # numbers in the SQL text (views take no parameters)
    chosen = f"hash(user_id, {seed}) % {SAMPLE_BUCKETS} < {cut}"
    con.execute(f"CREATE OR REPLACE TEMP VIEW users AS SELECT * FROM {home}.users WHERE {chosen}")
    con.execute(f"CREATE OR REPLACE TEMP VIEW requests AS SELECT * FROM {home}.requests WHERE {chosen}")
    con.execute(f"CREATE OR REPLACE TEMP VIEW sessions AS SELECT * FROM {home}.sessions WHERE {chosen}")
    con.execute(f"CREATE OR REPLACE TEMP VIEW impressions AS SELECT * FROM {home}.impressions WHERE request_id IN "
                "(SELECT request_id FROM requests)")


def load_from(con: duckdb.DuckDBPyConnection, path: str, progress: Callable[[float], None] | None = None,
              check: bool = True) -> LogData:
    """`load_log` on an open connection (e.g. one shard of a lake); `path` names the log in messages."""
    try:
        columns = table_columns(con)
        missing = [t for t in ("tasks", "users", "requests", "impressions") if t not in columns]
        if missing:
            raise LogError(f"{path}: not an MTF log, missing tables {missing} (run `validate` for details)")
        tasks = tuple(read_tasks(con))
        if not tasks:
            raise LogError(f"{path}: cannot load: the log declares no tasks (table `tasks` is empty)", EXIT_PROBLEMS)
        # One gate for every consumer (train, evaluate, compare, the app): what `validate` refuses, they refuse.
        problems = validate(con) if check else [
            p for p in structure_problems(con, columns, list(tasks)) if p.kind in ("missing_column", "wrong_type")]
        if problems:
            more = f" (and {len(problems) - 3} more; run `validate`)" if len(problems) > 3 else ""
            raise LogError(f"{path}: cannot load, {len(problems)} validation problem(s): "
                           + "; ".join(str(p) for p in problems[:3]) + more, EXIT_PROBLEMS)
        uf = _columns_with_prefix(columns["users"], "uf_")
        itf = _columns_with_prefix(columns.get("items", {}), "if_")
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall()) if "meta" in columns else {}
        req = _load_requests(con, tasks, uf)
        if progress:
            progress(0.4)
        request_id = np.asarray(req["request_id"], dtype=np.int64)
        has_item_weights = any(c.startswith("iw_") for c in columns["impressions"])
        cand = _load_candidates(con, tasks, itf, request_id, has_item_weights)
        if progress:
            progress(0.8)
        fp = fingerprint(con) if "meta" in columns else "unknown"
    except duckdb.Error as exc:
        raise LogError(f"{path}: cannot load ({str(exc).splitlines()[0]})", EXIT_PROBLEMS) from exc
    return _assemble(str(path), tasks, uf, itf, meta, fp, req, cand)


def _assemble(path: str, tasks: tuple[Task, ...], uf: list[str], itf: list[str], meta: dict[str, str], fp: str,
              req: dict[str, np.ndarray], cand: dict[str, np.ndarray]) -> LogData:
    r, k = len(req["request_id"]), len(tasks)
    slot_of = cand["slot"]
    n = int(slot_of.max()) + 1 if len(slot_of) else 1
    uniform = bool(cand["uniform"])
    keep = cand["known"]
    row, slot = (None, None) if uniform else (cand["row"][keep], slot_of[keep])

    def dense(values: np.ndarray, fill: float) -> np.ndarray:
        """Candidate rows `[rows, C]` -> `[R,N,C]`: a reshape when every request has its N rows in order."""
        if uniform:
            return values.reshape(r, n, values.shape[1])
        out = np.full((r, n, values.shape[1]), fill, dtype=values.dtype)
        out[row, slot] = values[keep]
        return out

    scores = dense(cand["scores"], 0.0)
    labels = dense(cand["labels"], np.nan)
    positions = dense(cand["position"][:, None], -1)[..., 0]
    mask = np.ones((r, n), dtype=bool) if uniform else dense(np.ones((len(keep), 1), dtype=bool), False)[..., 0]
    item_features = dense(cand["item_features"], 0.0)
    # Keep the segments that have requests, numbered in name order.
    code = np.asarray(req["segment_code"], dtype=np.int64)
    present = np.bincount(code, minlength=len(req["segment_names"])) > 0
    segments, segment = req["segment_names"][present], (np.cumsum(present) - 1)[code]
    step = np.asarray(req["step"], dtype=np.int64)
    session_id = np.asarray(req["session_id"], dtype=np.int64)
    nxt, done = session_links(session_id, step)
    # Context: the previous request's mean feedback over its shown items (0 at a session's first request).
    n_shown = np.maximum((positions >= 0).sum(1), 1)[:, None]
    mean_feedback = torch.from_numpy(labels).nansum(1).numpy() / n_shown  # as LogData.label_totals
    prev = np.zeros((r, k), dtype=np.float32)
    has_next = ~done
    prev[nxt[has_next]] = mean_feedback[has_next]
    ts = req["ts"]
    weights = np.stack([_float(req["w_" + t.name]) for t in tasks], axis=1)
    item_weights = None
    if cand["item_weights"] is not None:
        per_item = dense(cand["item_weights"], np.nan)
        item_weights = np.where(np.isnan(per_item), weights[:, None, :].astype(np.float32), per_item)
    return LogData(
        path=path, tasks=tasks, segments=tuple(str(s) for s in segments),
        user_feature_names=tuple(c[3:] for c in uf), item_feature_names=tuple(c[3:] for c in itf),
        request_id=np.asarray(req["request_id"], dtype=np.int64), session_id=session_id,
        user_id=np.asarray(req["user_id"], dtype=np.int64), step=step, ts=np.asarray(ts).astype("datetime64[us]"),
        segment=segment,
        user_features=(np.stack([_float(req[c], np.float32) for c in uf], axis=1) if uf
                       else np.zeros((r, 0), dtype=np.float32)),
        context=context_features(step, np.nan_to_num(prev)),
        weights=weights,
        logging_logp=_float(req["logging_logp"]), scores=scores, labels=labels, positions=positions, mask=mask,
        item_features=item_features, continued=has_next,
        returned=_float(req["returned"]), meta=meta, fingerprint=fp, item_weights=item_weights,
    )


# --------------------------------------------------------------------------------------------- writing


def arrow_table(columns: dict[str, np.ndarray]) -> pa.Table:
    """Columns as Arrow, as the log stores them: NaN as NULL, negative positions as NULL (not shown)."""
    arrays = {}
    for name, values in columns.items():
        if name == "position":
            arrays[name] = pa.array(values, type=pa.int32(), mask=values < 0)
        elif values.dtype.kind == "f":
            arrays[name] = pa.array(values, mask=np.isnan(values))
        elif values.dtype.kind == "O":
            arrays[name] = pa.array(values.astype(str))
        else:
            arrays[name] = pa.array(values)
    return pa.table(arrays)


def write_log(
    path: str | os.PathLike[str],
    tables: Mapping[str, dict[str, np.ndarray]],
    tasks: tuple[Task, ...],
    meta: Mapping[str, str],
    force: bool = False,
) -> Path:
    """Write a log atomically: build `.name.tmp-PID`, then rename over `path` (only with `force`)."""
    out = Path(path)
    if out.exists() and not force:
        raise LogError(f"{out}: already exists; pass --force to replace it", EXIT_UNUSABLE)
    return build_atomically(out, lambda con: _write_tables(con, tables, tasks, meta))


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_leftovers(out: Path) -> None:
    """Delete the temporary files (and their WALs) of earlier builds of `out` whose process was killed."""
    for leftover in out.parent.glob(f".{out.name}.tmp-*"):
        pid = leftover.name.rsplit("tmp-", 1)[-1].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            leftover.unlink(missing_ok=True)


def _refuse_if_open_elsewhere(out: Path) -> None:
    """A file another process holds open (a writer, a DuckDB shell) must not be replaced under it."""
    if not out.exists():
        return
    try:
        duckdb.connect(str(out), read_only=True).close()
    except duckdb.IOException as exc:
        if "lock" in str(exc).lower():
            raise LogError(f"{out}: is open in another process (a DuckDB shell, the app, a training); close it "
                           "before replacing it", EXIT_UNUSABLE) from exc
    except duckdb.Error:
        pass  # not a readable database (or a stale WAL from a crash): replacing it is what --force asked for


def build_atomically(out: Path, build: Callable[[duckdb.DuckDBPyConnection], None]) -> Path:
    """Build a DuckDB file under a temporary sibling name, then rename it over `out`; on any failure (or a
    kill) nothing is left in place of `out`. A stale `out.wal` (left by a crashed writer) belongs to the old
    file: it is moved aside before the rename and deleted after, so DuckDB never replays it on the new one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_leftovers(out)
    _refuse_if_open_elsewhere(out)
    tmp = temporary_path(out)
    tmp.unlink(missing_ok=True)
    stale_wal, moved_wal = Path(str(out) + ".wal"), Path(str(tmp) + ".old-wal")
    try:
        con = duckdb.connect(str(tmp))
        try:
            build(con)
        finally:
            con.close()
        if stale_wal.exists():
            os.replace(stale_wal, moved_wal)
        os.replace(tmp, out)
        moved_wal.unlink(missing_ok=True)
    finally:
        tmp.unlink(missing_ok=True)
        Path(str(tmp) + ".wal").unlink(missing_ok=True)
    return out


def _write_tables(con: duckdb.DuckDBPyConnection, tables: Mapping[str, dict[str, np.ndarray]],
                  tasks: tuple[Task, ...], meta: Mapping[str, str]) -> None:
    uf = [c[3:] for c in tables["users"] if c.startswith("uf_")]
    itf = [c[3:] for c in tables.get("items", {}) if c.startswith("if_")]
    full_meta = {"schema_version": SCHEMA_VERSION, "created_at": datetime.now(timezone.utc).isoformat(), **meta}
    con.execute("BEGIN")
    for table in TABLES:
        if table == "items" and "items" not in tables:
            continue
        item_weights = table == "impressions" and any(c.startswith("iw_") for c in tables["impressions"])
        con.execute(create_table_sql(table, list(tasks), uf, itf, item_weights))
    con.executemany("INSERT INTO meta VALUES (?, ?)", list(full_meta.items()))
    con.executemany("INSERT INTO tasks VALUES (?, ?, ?, ?)", [(t.name, t.kind, t.description, t.threshold)
                                                              for t in tasks])
    for table, cols in tables.items():
        arrow = arrow_table(cols)  # noqa: F841 (read by DuckDB's replacement scan below)
        names = ", ".join(quote_ident(c) for c in cols)
        con.execute(f"INSERT INTO {quote_ident(table)} ({names}) SELECT {names} FROM arrow")
    con.execute("COMMIT")


def log_info(path: str | os.PathLike[str]) -> dict[str, object]:
    """Tables with row counts, tasks, segments with user/request counts, time range, source."""
    con = open_log(path)
    try:
        columns = table_columns(con)
        counts = {t: con.execute(f"SELECT count(*) FROM {quote_ident(t)}").fetchone()[0] for t in columns}  # type: ignore[index]
        info: dict[str, object] = {"path": str(path), "tables": counts}
        if "meta" in columns:
            meta = dict(con.execute("SELECT key, value FROM meta WHERE key <> 'simulator_config'").fetchall())
            info["meta"] = meta
        if "tasks" in columns:
            info["tasks"] = [{"name": t.name, "kind": t.kind, "description": t.description} for t in read_tasks(con)]
        if "users" in columns and "segment" in columns["users"]:
            seg_sql = "SELECT segment, count(*) FROM users GROUP BY segment ORDER BY segment"
            info["segments"] = {str(s): int(n) for s, n in con.execute(seg_sql).fetchall()}
        if "requests" in columns and "ts" in columns["requests"]:
            lo, hi = con.execute("SELECT strftime(min(ts), '%Y-%m-%d %H:%M:%S'), "  # to the second
                                 "strftime(max(ts), '%Y-%m-%d %H:%M:%S') FROM requests").fetchone()  # type: ignore[misc]
            info["time_range"] = [str(lo), str(hi)]
        return info
    except duckdb.Error as exc:
        raise LogError(f"{path}: cannot read ({str(exc).splitlines()[0]})", EXIT_PROBLEMS) from exc
    finally:
        con.close()


# --------------------------------------------------------------------------------------------- import

_SOURCE_READERS = {".csv": "read_csv", ".tsv": "read_csv", ".txt": "read_csv", ".parquet": "read_parquet",
                   ".pq": "read_parquet", **{f"{kind}.gz": "read_csv" for kind in (".csv", ".tsv", ".txt")}}


def source_suffix(name: str | os.PathLike[str]) -> str:
    """A source file's type as its name gives it, lowercase: `.csv`, `.parquet`, `.csv.gz` (a gzipped text
    file, as feeds often export them) and so on."""
    suffixes = [s.lower() for s in Path(name).suffixes]
    return "".join(suffixes[-2:]) if len(suffixes) > 1 and suffixes[-1] == ".gz" else "".join(suffixes[-1:])


_REQUIRED_SOURCE = {
    "users": ("user_id",),
    "requests": ("request_id", "session_id", "user_id"),
    "impressions": ("request_id", "item_id", "position"),
    "items": ("item_id",),
    "sessions": ("session_id",),
}


_ID_COLUMNS = {"user_id": ("users", "requests", "sessions"), "session_id": ("requests", "sessions"),
               "request_id": ("requests", "impressions"), "item_id": ("impressions", "items")}


def _number_text_ids(con: duckdb.DuckDBPyConnection, targets: dict[str, dict[str, str]]) -> list[str]:
    """Ids written as text (a hash, a UUID, 'u_17') where the schema has integers: every id column with any
    value that is not an integer is numbered 0, 1, ... in the sorted order of its keys, with the same number
    in every file that carries it, and `id_keys` keeps each number's key. Returns the numbered columns."""
    numbered = []
    for id_column, tables in _ID_COLUMNS.items():
        present = [(t, targets[t][id_column]) for t in tables if id_column in targets.get(t, {})]
        keys = " UNION ALL ".join(f"SELECT nullif(trim({quote_ident(src)}::VARCHAR), '') AS key "
                                  f"FROM {quote_ident('raw_' + t)}" for t, src in present)
        if not present or not con.execute(f"SELECT count(*) FROM ({keys}) WHERE key IS NOT NULL AND "
                                          "TRY_CAST(key AS BIGINT) IS NULL").fetchone()[0]:  # type: ignore[index]
            continue
        if not numbered:
            con.execute(f"CREATE TABLE {ID_KEYS} (id_column VARCHAR, id BIGINT, key VARCHAR)")
        con.execute(f"INSERT INTO {ID_KEYS} SELECT ?, (row_number() OVER (ORDER BY key) - 1)::BIGINT, key "
                    f"FROM (SELECT DISTINCT key FROM ({keys}) WHERE key IS NOT NULL)", [id_column])
        for table, src in present:
            raw, col = quote_ident("raw_" + table), quote_ident(src)
            con.execute(f"ALTER TABLE {raw} ALTER {col} TYPE VARCHAR")
            con.execute(f"UPDATE {raw} SET {col} = k.id::VARCHAR FROM {ID_KEYS} k "
                        f"WHERE k.id_column = ? AND nullif(trim({raw}.{col}), '') = k.key", [id_column])
        numbered.append(id_column)
    return numbered


def read_mapping(path: str | os.PathLike[str] | None) -> dict[str, object]:
    """Load and shape-check a JSON column mapping (DESIGN §2)."""
    if path is None:
        return {}
    p = Path(path)
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise LogError(f"{p}: mapping file not found") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LogError(f"{p}: mapping is not valid JSON ({exc})") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("tables", {}), dict):
        raise LogError(f"{p}: mapping must be an object with a 'tables' object")
    for table, renames in raw.get("tables", {}).items():
        if table not in TABLES or not isinstance(renames, dict):
            raise LogError(f"{p}: mapping names unknown table {table!r} or is not an object of renames")
        for src, dst in renames.items():
            if not isinstance(src, str) or not isinstance(dst, str) or not IDENTIFIER.match(dst):
                raise LogError(f"{p}: mapping for {table}: target column {dst!r} is not a lowercase identifier")
    tasks = raw.get("tasks", [])
    if not isinstance(tasks, list) or not all(isinstance(t, dict) and "name" in t for t in tasks):
        raise LogError(f"{p}: 'tasks' must be a list of objects with 'name' and 'kind'")
    names = [str(t["name"]) for t in tasks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise LogError(f"{p}: 'tasks' declares {', '.join(repr(n) for n in twice)} more than once")
    return raw


def _read_source(con: duckdb.DuckDBPyConnection, table: str, path: Path) -> list[str]:
    """Load one source file into `raw_<table>` (all VARCHAR for CSV, so casts can be checked per row)."""
    if not path.exists():
        raise LogError(f"{path}: no such file (given for table {table})")
    reader = _SOURCE_READERS.get(source_suffix(path))
    if reader is None:
        raise LogError(f"{path}: unknown file type {source_suffix(path)!r}; use .csv, .tsv, .parquet or a gzipped "
                       ".csv.gz or .tsv.gz")
    if path.stat().st_size == 0:
        raise LogError(f"{path}: the file is empty (table {table})")
    args = "header = true, all_varchar = true" if reader == "read_csv" else ""
    sep = ", " if args else ""
    try:
        con.execute(
            f"CREATE TABLE {quote_ident('raw_' + table)} AS SELECT row_number() OVER () AS __row, * "
            f"FROM {reader}(?{sep}{args})", [str(path)]
        )
    except duckdb.Error as exc:
        if is_disk_full(exc):
            raise LogError(f"the disk is full: no space left to store table {table} of the new log (reading "
                           f"{path} is not the problem); free some space and import again") from exc
        raise LogError(f"{path}: cannot be read as {reader[5:]} ({str(exc).splitlines()[0]})") from exc
    cols = [r[0] for r in con.execute(f"DESCRIBE {quote_ident('raw_' + table)}").fetchall()][1:]
    n = con.execute(f"SELECT count(*) FROM {quote_ident('raw_' + table)}").fetchone()[0]  # type: ignore[index]
    if n == 0:
        raise LogError(f"{path}: has a header but no rows (table {table})")
    return cols


def _csv_header(path: Path) -> list[str]:
    """The header row as written (DuckDB renames duplicates, which would hide them)."""
    import csv
    import gzip

    opener = gzip.open if source_suffix(path).endswith(".gz") else open
    try:
        with opener(path, "rt", newline="", encoding="utf-8", errors="replace") as f:
            sample = f.read(65536)
    except (OSError, EOFError) as exc:  # a .gz that is not gzip, or cut short
        raise LogError(f"{path}: cannot be read ({exc})") from exc
    try:
        dialect = csv.Sniffer().sniff(sample.splitlines()[0] if sample else ",", delimiters=",;\t|")
    except csv.Error:
        dialect = csv.excel
    rows = list(csv.reader(sample.splitlines()[:1], dialect))
    return rows[0] if rows else []


def _source_columns(table: str, path: Path, raw_cols: list[str], renames: dict[str, str]) -> dict[str, str]:
    """Target column -> source column for one table, checking the mapping against the file's header."""
    header = _csv_header(path) if _SOURCE_READERS.get(source_suffix(path)) == "read_csv" else raw_cols
    lowered = [c.strip().lower() for c in header]
    dupes = sorted({c for c in lowered if lowered.count(c) > 1})
    if dupes:
        raise LogError(f"{path}: duplicate column names {dupes}")
    for src in renames:
        if src not in raw_cols:
            raise LogError(f"{path}: the mapping names column {src!r}, which the file does not have "
                           f"(columns: {', '.join(raw_cols[:20])})")
    target = {renames.get(c, c): c for c in raw_cols}
    return {t: s for t, s in target.items() if IDENTIFIER.match(t)}


def _timestamp_expression(con: duckdb.DuckDBPyConnection, path: Path, raw: str, src: str, base: str) -> str:
    """A TIMESTAMP expression (UTC) for a column of dates, or of Unix times (every value a number) in
    seconds, milliseconds, microseconds or nanoseconds as their magnitude says; refused by row where a value
    is neither, or where dates and numbers mix."""
    # Through TIMESTAMPTZ: a time with an offset (10:00+02:00) is the UTC time it names (08:00), where a
    # cast to TIMESTAMP would drop the offset; `_import_into` reads times without one as UTC.
    date, number = f"(TRY_CAST({base} AS TIMESTAMPTZ) AT TIME ZONE 'UTC')", f"TRY_CAST({base} AS DOUBLE)"
    neither = con.execute(f"SELECT __row, {quote_ident(src)} FROM {raw} WHERE {base} IS NOT NULL AND {date} IS NULL "
                          f"AND {number} IS NULL LIMIT 5").fetchall()
    if neither:
        rows = ", ".join(f"row {r} ({v!r})" for r, v in neither)
        raise LogError(f"{path}: column {src!r} must be TIMESTAMP or a Unix time: {rows}")
    n_dates, n_numbers, largest = con.execute(
        f"SELECT count({date}), count(*) FILTER (WHERE {date} IS NULL AND {number} IS NOT NULL), "
        f"max(abs({number})) FROM {raw} WHERE {base} IS NOT NULL").fetchone()  # type: ignore[misc]
    if not n_numbers:
        return date
    if n_dates:
        first = con.execute(f"SELECT __row, {quote_ident(src)} FROM {raw} WHERE {date} IS NULL AND {number} IS NOT "
                            "NULL LIMIT 1").fetchone()
        raise LogError(f"{path}: column {src!r} mixes dates ({n_dates} rows) and Unix times ({n_numbers} rows, e.g. "
                       f"row {first[0]} ({first[1]!r})); write every time the same way")  # type: ignore[index]
    if not math.isfinite(largest):
        raise LogError(f"{path}: column {src!r} holds an infinite or NaN time")
    # 1e11 s is the year 5138, 1e11 ms 1973: each unit's range starts where the one before ends.
    scale = next(s for limit, s in ((1e11, 1.0), (1e14, 1e3), (1e17, 1e6), (math.inf, 1e9)) if largest < limit)
    return f"make_timestamp(({number} * {1e6 / scale!r})::BIGINT)"


def _cast_column(con: duckdb.DuckDBPyConnection, table: str, path: Path, src: str, dtype: str) -> str:
    """SQL expression casting a raw column, after checking that every non-empty value casts. A TIMESTAMP
    column may also hold Unix times (`_timestamp_expression`)."""
    raw, col = quote_ident("raw_" + table), quote_ident(src)
    base = f"nullif(trim({col}::VARCHAR), '')"
    if dtype == "TIMESTAMP":
        return _timestamp_expression(con, path, raw, src, base)
    cast = f"TRY_CAST({base} AS {dtype})"
    if dtype == "DOUBLE":
        # Labels exported as booleans (a BOOLEAN Parquet column, true/false in a CSV) are the 1/0 they mean.
        cast = f"(CASE lower({base}) WHEN 'true' THEN 1.0 WHEN 'false' THEN 0.0 ELSE {cast} END)"
    wrong = f"{cast} IS NULL"
    if dtype in ("BIGINT", "INTEGER"):
        # DuckDB rounds '1.5' to 2 where it casts text to an integer: an id or a position with a fraction
        # would silently become another one. '17.0' (an integer exported through floats) is 17.
        wrong += f" OR (regexp_matches({base}, '[.eE]') AND TRY_CAST({base} AS DOUBLE) <> {cast})"
    bad_sql = f"SELECT __row, {col} FROM {raw} WHERE {base} IS NOT NULL AND ({wrong})"
    bad = con.execute(bad_sql + " LIMIT 5").fetchall()
    if bad:
        rows = ", ".join(f"row {r} ({v!r})" for r, v in bad)
        whole = " (a whole number)" if dtype in ("BIGINT", "INTEGER") else ""
        raise LogError(f"{path}: column {src!r} must be {dtype}{whole}: {rows}")
    if dtype == "DOUBLE":
        inf_sql = f"SELECT __row FROM {raw} WHERE isinf({cast}) OR isnan({cast})"
        bad_inf = [r[0] for r in con.execute(inf_sql + " LIMIT 5").fetchall()]
        if bad_inf:
            raise LogError(f"{path}: column {src!r} holds NaN or infinite values at rows {bad_inf}")
    return cast


def _threshold(value: object, path: Path) -> float | None:
    if value is None:
        return None
    try:
        threshold = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        threshold = math.nan
    if not math.isfinite(threshold):
        raise LogError(f"{path}: a task's threshold must be a finite number, found {value!r}")
    return threshold


def _infer_tasks(imp_cols: dict[str, str], declared: list[dict[str, object]], path: Path) -> list[Task]:
    if declared:
        tasks = [Task(str(t["name"]), str(t.get("kind", "binary")), str(t.get("description", "")),
                      _threshold(t.get("threshold"), path)) for t in declared]
    else:
        tasks = [Task(c[2:], "binary") for c in imp_cols if c.startswith("s_")]
    for t in tasks:
        check_task = IDENTIFIER.match(t.name) and t.kind in ("binary", "continuous")
        if not check_task:
            raise LogError(f"task {t.name!r} ({t.kind!r}): names must be lowercase identifiers and kinds "
                           "'binary' or 'continuous'")
    if not tasks:
        raise LogError(f"{path}: no tasks: declare them in the mapping or name score columns s_<task>")
    return tasks


def _kinds_from_values(con: duckdb.DuckDBPyConnection, tasks: list[Task]) -> list[Task]:
    """Undeclared tasks: `continuous` where an imported score or label exceeds 1 (watch time, dwell), else
    `binary`; so that a log imported without a mapping passes its own validation."""
    largest = con.execute("SELECT " + ", ".join(
        f"greatest(max({quote_ident('s_' + t.name)}), max({quote_ident('y_' + t.name)}))" for t in tasks)
        + " FROM impressions").fetchone() or ()
    return [Task(t.name, "continuous" if v is not None and v > 1 else "binary", t.description)
            for t, v in zip(tasks, largest)]


def _tasks_from_file(path: Path | None) -> list[dict[str, object]]:
    if path is None:
        return []
    con = duckdb.connect()
    try:
        _read_source(con, "tasks", path)
        return [{"name": n, "kind": k or "binary", "description": d or ""} for n, k, d in con.execute(
            "SELECT name, kind, description FROM (SELECT * FROM raw_tasks) "
        ).fetchall()]
    except duckdb.Error as exc:
        raise LogError(f"{path}: tasks file needs columns name, kind, description ({exc})") from exc
    finally:
        con.close()


def import_log(
    sources: Mapping[str, str | os.PathLike[str]],
    out: str | os.PathLike[str],
    mapping: Mapping[str, object] | None = None,
    tasks_file: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> Path:
    """Build a new log from CSV/Parquet files (one per table) through DuckDB's readers; sources are only read."""
    mapping = dict(mapping or {})
    for table in ("users", "requests", "impressions"):
        if table not in sources:
            raise LogError(f"import needs a file for table {table!r}")
    out_path = Path(out)
    if out_path.exists() and not force:
        raise LogError(f"{out_path}: already exists; pass --force to replace it")
    return build_atomically(out_path, lambda con: _import_into(
        con, {t: Path(p) for t, p in sources.items()}, mapping, Path(tasks_file) if tasks_file else None))


def import_uploads(uploads: Mapping[str, tuple[str, bytes]], out: str | os.PathLike[str], mapping_text: str = "",
                   force: bool = False) -> Path:
    """Import files a user uploaded (table or "tasks" -> (the file's own name, its bytes)) into a new log.
    They pass through a scratch folder, but every message names the uploaded file, never the scratch copy."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mtf-upload-") as folder:
        names: dict[str, str] = {}
        paths: dict[str, Path] = {}
        for table, (name, content) in uploads.items():
            target = Path(folder) / f"{table}{source_suffix(name)}"
            target.write_bytes(content)
            paths[table], names[str(target)] = target, f"uploaded file {Path(name).name!r} ({table})"
        mapping: dict[str, object] = {}
        try:
            if mapping_text.strip():
                mapping_path = Path(folder) / "mapping.json"
                mapping_path.write_text(mapping_text, encoding="utf-8")
                names[str(mapping_path)] = "the column mapping"
                mapping = read_mapping(mapping_path)
            tasks_file = paths.pop("tasks", None)
            return import_log(paths, out, mapping, tasks_file, force=force)
        except LogError as exc:
            message = str(exc)
            for scratch, shown in sorted(names.items(), key=lambda kv: -len(kv[0])):
                message = message.replace(scratch, shown)
            raise LogError(message.replace(folder, "the upload"), exc.exit_code) from exc


def _import_into(con: duckdb.DuckDBPyConnection, sources: dict[str, Path], mapping: dict[str, object],
                 tasks_file: Path | None) -> None:
    con.execute("SET TimeZone = 'UTC'")  # times without an offset are UTC, whatever this machine's zone
    renames_all: dict[str, dict[str, str]] = mapping.get("tables", {})  # type: ignore[assignment]
    targets: dict[str, dict[str, str]] = {}
    for table, path in sources.items():
        if table not in TABLES or table in ("meta", "tasks"):
            raise LogError(f"{path}: cannot import table {table!r}")
        raw_cols = _read_source(con, table, path)
        targets[table] = _source_columns(table, path, raw_cols, renames_all.get(table, {}))
        for required in _REQUIRED_SOURCE[table]:
            if required not in targets[table]:
                raise LogError(f"{path}: missing required column {required!r} for table {table}")
    declared = list(mapping.get("tasks", [])) or _tasks_from_file(tasks_file)  # type: ignore[arg-type]
    tasks = _infer_tasks(targets["impressions"], declared, sources["impressions"])
    needed = {"impressions": [f"{p}{t.name}" for t in tasks for p in ("s_", "y_")],
              "requests": [f"w_{t.name}" for t in tasks]}
    for table, cols in needed.items():
        missing = [c for c in cols if c not in targets[table]]
        # A feed whose fusion weights were not logged has no w_ column at all: its requests log no weights
        # (NULL), as the schema allows. Some of them missing is a broken file.
        if missing and not (table == "requests" and len(missing) == len(cols)):
            origin = ("declared" if declared else
                      "named by the s_<task> score columns (declare the tasks in a mapping to choose them)")
            raise LogError(f"{sources[table]}: missing columns {missing} for the tasks {origin}"
                           + (" (a request logs all its fusion weights or none)" if table == "requests" else ""))
    uf = [c[3:] for c in targets["users"] if c.startswith("uf_")]
    itf = [c[3:] for c in targets.get("items", {}) if c.startswith("if_")]
    numbered = _number_text_ids(con, targets)
    con.execute("BEGIN")
    for table in TABLES:
        if table == "items" and "items" not in sources:
            continue
        item_weights = table == "impressions" and any(c.startswith("iw_") for c in targets["impressions"])
        con.execute(create_table_sql(table, tasks, uf, itf, item_weights))
    for table, cols in targets.items():
        _insert_table(con, table, sources[table], cols)
    if "sessions" not in sources:
        con.execute(
            "INSERT INTO sessions SELECT session_id, any_value(user_id), count(*)::INTEGER, NULL::BOOLEAN "
            "FROM requests WHERE session_id IS NOT NULL GROUP BY session_id"
        )
    if "step" not in targets["requests"]:
        con.execute(
            "UPDATE requests SET step = s.k FROM (SELECT request_id, (row_number() OVER (PARTITION BY session_id "
            "ORDER BY ts, request_id) - 1)::INTEGER AS k FROM requests) s WHERE requests.request_id = s.request_id"
        )
    if not declared:
        tasks = _kinds_from_values(con, tasks)
    meta = {"schema_version": SCHEMA_VERSION, "created_at": datetime.now(timezone.utc).isoformat(),
            "source": "import: " + ", ".join(f"{t}={p.name}" for t, p in sources.items()),
            "mapping": json.dumps(mapping)}
    if numbered:
        meta["numbered_ids"] = ",".join(numbered)
    con.executemany("INSERT INTO meta VALUES (?, ?)", list(meta.items()))
    con.executemany("INSERT INTO tasks VALUES (?, ?, ?, ?)", [(t.name, t.kind, t.description, t.threshold)
                                                              for t in tasks])
    con.execute("COMMIT")
    for table in targets:
        con.execute(f"DROP TABLE {quote_ident('raw_' + table)}")


def _insert_table(con: duckdb.DuckDBPyConnection, table: str, path: Path, cols: dict[str, str]) -> None:
    schema_cols = table_columns(con)[table]
    exprs, names = [], []
    for target, dtype in schema_cols.items():
        if target in cols:
            kind = "VARCHAR" if dtype == "VARCHAR" else ("TIMESTAMP" if dtype.startswith("TIMESTAMP") else dtype)
            exprs.append(_cast_column(con, table, path, cols[target], kind) if kind != "VARCHAR"
                         else f"{quote_ident(cols[target])}::VARCHAR")
            names.append(quote_ident(target))
    if table == "users" and "segment" not in cols:
        exprs.append("'all'")
        names.append(quote_ident("segment"))
    if table == "requests" and "logging_policy" not in cols:
        exprs.append("'unknown'")
        names.append(quote_ident("logging_policy"))
    try:
        con.execute(f"INSERT INTO {quote_ident(table)} ({', '.join(names)}) "
                    f"SELECT {', '.join(exprs)} FROM {quote_ident('raw_' + table)}")
    except duckdb.ConstraintException as exc:
        raise LogError(f"{path}: {str(exc).splitlines()[0]} (duplicate or NULL key in table {table})") from exc


def iter_chunks(n: int, chunk: int) -> Iterator[slice]:
    """Consecutive slices of size `chunk` over `range(n)`."""
    for start in range(0, n, chunk):
        yield slice(start, min(n, start + chunk))


def simulator_tables(sim: object) -> dict[str, dict[str, np.ndarray]]:
    """The column dicts of a `simulate.SimTables`, keyed by table name."""
    return {t: getattr(sim, t) for t in ("users", "items", "requests", "impressions", "sessions")}


@dataclass(frozen=True)
class CandidateChunk:
    """Dense candidates of a range of requests, read straight from the log."""

    request_id: np.ndarray  # (r,)
    scores: np.ndarray  # (r, N, K) float32
    labels: np.ndarray  # (r, N, K) float32, 0 where not shown
    shown: np.ndarray  # (r, N) bool
    mask: np.ndarray  # (r, N) bool


def iter_candidate_chunks(path: str | os.PathLike[str], chunk_requests: int = 100_000) -> Iterator[CandidateChunk]:
    """Stream a log's candidates in request-id ranges, so memory stays flat however large the log is."""
    con = open_log(path)
    # DuckDB's buffer pool would otherwise keep what it read (up to 80% of RAM) and grow with the log.
    con.execute("SET memory_limit = '512MB'")
    con.execute("SET threads = 1")
    try:
        tasks = tuple(read_tasks(con))
        ids = np.asarray(_fetch(con, "SELECT request_id FROM requests ORDER BY request_id")["request_id"])
        slots = _fetch(con, "SELECT max(c) AS n FROM (SELECT count(*) AS c FROM impressions GROUP BY request_id)")
        n_slots = int(np.nan_to_num(slots["n"][0])) if len(slots["n"]) else 0
        # The columns as load_log reads them; shown candidates first, by position, then the rest by item.
        sql = (f"SELECT request_id, {_candidate_columns(tasks)} FROM impressions "
               "WHERE request_id BETWEEN ? AND ? ORDER BY request_id, position < 0, position, item_id")
        for start in range(0, len(ids), chunk_requests):
            chunk_ids = ids[start:start + chunk_requests]
            # Measured: a relation per chunk does not hold on to its rows (peak RSS flat from 1M to 4M requests).
            table = con.sql(sql, params=[int(chunk_ids[0]), int(chunk_ids[-1])]).to_arrow_table()
            chunk = _dense_chunk(table, len(tasks), chunk_ids, n_slots)
            del table
            yield chunk
            del chunk  # release this chunk before the next one is read
    finally:
        con.close()


def _dense_chunk(table: pa.Table, n_tasks: int, ids: np.ndarray, n_slots: int) -> CandidateChunk:
    row, slot, known, _, _ = _slots(table.column("request_id").to_numpy().astype(np.int64, copy=False), ids)
    row, slot = row[known], slot[known]  # impressions without a request (orphans) are left out, as in load_log
    r = len(ids)
    scores = np.zeros((r, n_slots, n_tasks), dtype=np.float32)
    labels = np.zeros((r, n_slots, n_tasks), dtype=np.float32)
    scores[row, slot] = _fixed_rows(table.column("scores"), n_tasks)[known]
    labels[row, slot] = np.nan_to_num(_fixed_rows(table.column("labels"), n_tasks)[known])  # NaN where not shown
    shown = np.zeros((r, n_slots), dtype=bool)
    shown[row, slot] = (table.column("position").to_numpy() >= 0)[known]
    mask = np.zeros((r, n_slots), dtype=bool)
    mask[row, slot] = True
    return CandidateChunk(ids, scores, labels, shown, mask)
