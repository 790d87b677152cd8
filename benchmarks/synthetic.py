"""A fast writer of large synthetic logs (random scores ranked by their logged weights' fusion, labels drawn
from the scores) for the memory and streamed figures."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mtf_core.schema import Task
from mtf_core.store import write_log

TASKS = tuple(Task(f"t{j}", "binary") for j in range(5))


def write_synthetic_log(path: Path, n_requests: int, n_candidates: int = 20, n_shown: int = 6, seed: int = 0,
                        chunk: int = 500_000) -> Path:
    """Requests with N candidates each; the first L shown. Written chunk by chunk to bound memory."""
    import duckdb

    rng = np.random.default_rng(seed)
    n_users = max(1, n_requests // 20)
    tables = {"users": {"user_id": np.arange(1, n_users + 1), "segment": np.array(["all"] * n_users, dtype=object)},
              "requests": _requests(rng, 0, 0),
              "impressions": _impressions(rng, 0, 0, n_candidates, n_shown, np.zeros((0, 5))),
              "sessions": {"session_id": np.arange(1, n_users + 1), "user_id": np.arange(1, n_users + 1),
                           "n_requests": np.full(n_users, 20, dtype=np.int32), "returned": np.zeros(n_users, bool)}}
    write_log(path, tables, TASKS, {"source": "synthetic benchmark log"}, force=True)
    con = duckdb.connect(str(path))
    try:
        for start in range(0, n_requests, chunk):
            size = min(chunk, n_requests - start)
            req = _requests(rng, start, size, n_users)  # noqa: F841 - read by DuckDB below
            imp = _impressions(rng, start, size, n_candidates, n_shown, _weights(req))  # noqa: F841
            import pyarrow as pa

            req_t = pa.table(req)  # noqa: F841
            imp_t = pa.table({k: (pa.array(v, mask=v < 0) if k == "position"  # noqa: F841
                                  else pa.array(v, mask=np.isnan(v)) if v.dtype.kind == "f" else pa.array(v))
                              for k, v in imp.items()})
            con.execute("INSERT INTO requests BY NAME SELECT * FROM req_t")
            con.execute("INSERT INTO impressions BY NAME SELECT * FROM imp_t")
    finally:
        con.close()
    return path


_LOGGING_ALPHA = 2.0  # the logging policy: Dirichlet(2, ..., 2) over the five tasks' weights


def _requests(rng: np.random.Generator, start: int, size: int, n_users: int = 1) -> dict[str, np.ndarray]:
    w = rng.dirichlet(np.full(5, _LOGGING_ALPHA), size=size)
    # The weights' own log-density: importance ratios against it mean something (E[ratio] = 1).
    logp = (math.lgamma(5 * _LOGGING_ALPHA) - 5 * math.lgamma(_LOGGING_ALPHA)
            + (_LOGGING_ALPHA - 1.0) * np.log(w).sum(1))
    users = (np.arange(start, start + size) // 20) % n_users + 1
    return {"request_id": np.arange(start + 1, start + size + 1), "session_id": users, "user_id": users,
            "step": (np.arange(start, start + size) % 20).astype(np.int32),
            "ts": np.datetime64("2026-01-01") + np.arange(start, start + size).astype("timedelta64[s]"),
            **{f"w_t{j}": w[:, j] for j in range(5)}, "logging_logp": logp,
            "logging_policy": np.array(["synthetic"] * size, dtype=object)}


def _weights(requests: dict[str, np.ndarray]) -> np.ndarray:
    return np.stack([requests[f"w_t{j}"] for j in range(5)], axis=1)


def _impressions(rng: np.random.Generator, start: int, size: int, n: int, n_shown: int, weights: np.ndarray
                 ) -> dict[str, np.ndarray]:
    """Each request's candidates in the order its logged weights' fusion ranks them, the first L shown: the
    log of a ranker whose fusion is what users saw (fusion agreement 100%), written in the order loading
    reads without sorting."""
    rows = size * n
    position = np.tile(np.where(np.arange(n) < n_shown, np.arange(n), -1), size).astype(np.int32)
    shown = position >= 0
    out: dict[str, np.ndarray] = {"request_id": np.repeat(np.arange(start + 1, start + size + 1), n),
                                  "item_id": np.tile(np.arange(1, n + 1), size), "position": position}
    scores = rng.random((size, n, 5), dtype=np.float32)
    fused = np.matmul(scores, weights.astype(np.float32)[..., None])[..., 0]
    scores = np.take_along_axis(scores, np.argsort(-fused, axis=1, kind="stable")[..., None], axis=1)
    for j in range(5):
        s = scores[..., j].reshape(-1).astype(np.float64)
        out[f"s_t{j}"] = s
        out[f"y_t{j}"] = np.where(shown, (rng.random(rows) < s).astype(np.float64), np.nan)
    return out


REQUESTS_PER_SHARD = 250_000


def write_synthetic_lake(path: Path, n_requests: int, n_candidates: int = 20, n_shown: int = 6, seed: int = 0,
                         requests_per_shard: int = REQUESTS_PER_SHARD) -> Path:
    """The synthetic log as a Parquet lake (`mtf_core.lake`), written shard by shard straight from numpy:
    20 requests per user in one session, shards of contiguous users (whole users, as a lake needs), scores
    and labels as float32 (what loading reads them as). Memory follows one shard."""
    import shutil
    from datetime import datetime, timezone

    import pyarrow.parquet as pq

    from mtf_core.schema import SCHEMA_VERSION
    from mtf_core.store import arrow_table

    rng = np.random.default_rng(seed)
    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    n_users = max(1, n_requests // 20)
    n_requests = n_users * 20
    users_per_shard = max(1, requests_per_shard // 20)

    def write(table: str, shard: int | None, columns: dict[str, np.ndarray]) -> None:
        folder = path / table / (f"shard={shard}" if shard is not None else "")
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(arrow_table(columns), folder / "data_0.parquet")

    write("meta", None, {"key": np.array(["schema_version", "source", "created_at"], dtype=object),
                         "value": np.array([SCHEMA_VERSION, "synthetic benchmark lake",
                                            datetime.now(timezone.utc).isoformat()], dtype=object)})
    write("tasks", None, {"name": np.array([t.name for t in TASKS], dtype=object),
                          "kind": np.array([t.kind for t in TASKS], dtype=object),
                          "description": np.array([""] * len(TASKS), dtype=object)})
    for shard, first_user in enumerate(range(0, n_users, users_per_shard)):
        users = np.arange(first_user, min(first_user + users_per_shard, n_users)) + 1
        start, size = (users[0] - 1) * 20, len(users) * 20
        write("users", shard, {"user_id": users, "segment": np.array(["all"] * len(users), dtype=object)})
        write("sessions", shard, {"session_id": users, "user_id": users,
                                  "n_requests": np.full(len(users), 20, dtype=np.int32),
                                  "returned": np.zeros(len(users), dtype=bool)})
        requests = _requests(rng, start, size, n_users)
        write("requests", shard, requests)
        impressions = _impressions(rng, start, size, n_candidates, n_shown, _weights(requests))
        write("impressions", shard, {k: (v.astype(np.float32) if k[:2] in ("s_", "y_") else v)
                                     for k, v in impressions.items()})
    return path
