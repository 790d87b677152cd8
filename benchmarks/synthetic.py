"""A fast writer of large synthetic logs (random scores and labels) for the memory figure."""

from __future__ import annotations

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
              "requests": _requests(rng, 0, 0), "impressions": _impressions(rng, 0, 0, n_candidates, n_shown),
              "sessions": {"session_id": np.arange(1, n_users + 1), "user_id": np.arange(1, n_users + 1),
                           "n_requests": np.full(n_users, 20, dtype=np.int32), "returned": np.zeros(n_users, bool)}}
    write_log(path, tables, TASKS, {"source": "synthetic benchmark log"}, force=True)
    con = duckdb.connect(str(path))
    try:
        for start in range(0, n_requests, chunk):
            size = min(chunk, n_requests - start)
            req = _requests(rng, start, size, n_users)  # noqa: F841 - read by DuckDB below
            imp = _impressions(rng, start, size, n_candidates, n_shown)  # noqa: F841
            import pyarrow as pa

            req_t = pa.table(req)  # noqa: F841
            imp_t = pa.table({k: (pa.array(v, mask=v < 0) if k == "position" else pa.array(v)) for k, v in imp.items()})  # noqa: F841
            con.execute("INSERT INTO requests BY NAME SELECT * FROM req_t")
            con.execute("INSERT INTO impressions BY NAME SELECT * FROM imp_t")
    finally:
        con.close()
    return path


def _requests(rng: np.random.Generator, start: int, size: int, n_users: int = 1) -> dict[str, np.ndarray]:
    w = rng.dirichlet(np.full(5, 2.0), size=size)
    users = (np.arange(start, start + size) // 20) % n_users + 1
    return {"request_id": np.arange(start + 1, start + size + 1), "session_id": users, "user_id": users,
            "step": (np.arange(start, start + size) % 20).astype(np.int32),
            "ts": np.datetime64("2026-01-01") + np.arange(start, start + size).astype("timedelta64[s]"),
            **{f"w_t{j}": w[:, j] for j in range(5)}, "logging_logp": np.zeros(size),
            "logging_policy": np.array(["synthetic"] * size, dtype=object)}


def _impressions(rng: np.random.Generator, start: int, size: int, n: int, n_shown: int) -> dict[str, np.ndarray]:
    rows = size * n
    position = np.tile(np.where(np.arange(n) < n_shown, np.arange(n), -1), size).astype(np.int32)
    shown = position >= 0
    out: dict[str, np.ndarray] = {"request_id": np.repeat(np.arange(start + 1, start + size + 1), n),
                                  "item_id": np.tile(np.arange(1, n + 1), size), "position": position}
    for j in range(5):
        s = rng.random(rows, dtype=np.float32).astype(np.float64)
        out[f"s_t{j}"] = s
        out[f"y_t{j}"] = np.where(shown, (rng.random(rows) < s).astype(np.float64), np.nan)
    return out
