"""A log as a folder of Parquet files per table: the layout of a data lake, readable past one machine.

    LAKE/meta/data.parquet, LAKE/tasks/data.parquet, LAKE/items/data.parquet, LAKE/id_keys/data.parquet
    LAKE/{users,sessions,requests,impressions}/shard=K/data_0.parquet    (K = user_id mod the shard count, >= 0)

Every table that grows with traffic is sharded by user, so a shard holds whole users (their sessions and
every request and candidate of them): a worker that reads one shard has everything a per-user figure
needs. `open_lake` serves the folder to DuckDB as the log's tables (views over the Parquet files; the small
`meta` and `tasks` tables materialised), so every command that reads a `.duckdb` log reads a lake too.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import duckdb

from mtf_core.errors import EXIT_UNUSABLE, LogError
from mtf_core.schema import ID_KEYS, TABLES, quote_ident

__all__ = ["SHARDED", "is_lake", "open_lake", "export_lake", "lake_files", "lake_shards"]

SHARDED = ("users", "sessions", "requests", "impressions")
_MATERIALISED = ("meta", "tasks")  # small, and read in file order (tasks by declaration)
_LAKE_TABLES = (*TABLES, ID_KEYS)  # the log's tables, and the keys of ids an import numbered (where it did)
# The unsharded tables' row order; tasks keep their declaration order.
_ORDER = {"meta": "rowid", "tasks": "rowid", "items": "item_id", ID_KEYS: "id_column, id"}


def is_lake(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a folder laid out as a lake (it has at least a `meta` folder of Parquet files)."""
    p = Path(path)
    return p.is_dir() and (p / "meta").is_dir()


def lake_files(path: str | os.PathLike[str], table: str) -> list[Path]:
    """The Parquet files of one table of a lake, in a stable order (empty where the table is absent)."""
    return sorted((Path(path) / table).glob("**/*.parquet"))


def _literal(text: str) -> str:
    """An SQL string literal; only for paths in DDL (views and COPY take no parameters)."""
    return "'" + text.replace("'", "''") + "'"


def lake_shards(path: str | os.PathLike[str]) -> list[str]:
    """The shard folder names of a lake (`shard=K`), in shard order: by number, then by name (a lake written
    elsewhere may name its shards otherwise). The order is part of the figures: shards' sums are added in it."""
    folders = {p.name for p in (Path(path) / "requests").glob("shard=*") if p.is_dir()}
    return sorted(folders, key=_shard_key)


def _shard_key(name: str) -> tuple[int, int, str]:
    value = name.split("=", 1)[1]
    try:
        return 0, int(value), value
    except ValueError:
        return 1, 0, value


def open_lake(path: str | os.PathLike[str], shard: str | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection whose tables are the lake's (views over its Parquet files); with
    `shard` (a name from `lake_shards`), the sharded tables hold that shard's users alone: a log of its own."""
    root = Path(path)
    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    try:
        for table in _LAKE_TABLES:
            files = lake_files(root, table)
            if shard is not None and table in SHARDED:
                files = [f for f in files if f.parent.name == shard]
            if not files:
                continue
            listing = "[" + ", ".join(_literal(str(f)) for f in files) + "]"
            kind = "TABLE" if table in _MATERIALISED else "VIEW"
            con.execute(f"CREATE {kind} {quote_ident(table)} AS SELECT * FROM read_parquet({listing})")
    except duckdb.Error as exc:
        con.close()
        raise LogError(f"{root}: not a readable Parquet lake ({str(exc).splitlines()[0]})", EXIT_UNUSABLE) from exc
    return con


def _shard_of(user_id: str, shards: int) -> str:
    """The shard of a user id column, in 0..shards-1 for negative ids too (SQL's % keeps the dividend's sign)."""
    return f"(({user_id} % {shards}) + {shards}) % {shards}"


def export_lake(log: str | os.PathLike[str], out: str | os.PathLike[str], shards: int = 8,
                force: bool = False) -> Path:
    """Write the log at `log` (a `.duckdb` file or a lake) as a lake at `out`, sharded by user into `shards`
    parts. Built in a temporary sibling folder and renamed into place: a failure leaves nothing at `out`."""
    from mtf_core.store import open_log

    shards = int(shards)
    if shards < 1:
        raise LogError(f"shards must be at least 1, got {shards}")
    target = Path(out)
    if target.exists() and not force:
        raise LogError(f"{target}: already exists; pass --force to replace it")
    if target.exists() and not is_lake(target):
        raise LogError(f"{target}: exists and is not a lake; refusing to replace it")
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    con = open_log(log)
    try:
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables "
                                            "WHERE table_schema = 'main'").fetchall()}
        shard_of = {"users": "user_id", "sessions": "user_id", "requests": "user_id"}
        for table in _LAKE_TABLES:
            if table not in tables:
                continue
            folder = tmp / table
            folder.mkdir(parents=True)
            if table not in SHARDED:
                con.execute(f"COPY (SELECT * FROM {quote_ident(table)} ORDER BY {_ORDER[table]}) TO "
                            f"{_literal(str(folder / 'data.parquet'))} (FORMAT PARQUET)")
                continue
            if table == "impressions":
                source = (f"(SELECT i.*, {_shard_of('r.user_id', shards)} AS shard FROM impressions i JOIN requests r "
                          "ON r.request_id = i.request_id)")
            else:
                source = f"(SELECT *, {_shard_of(shard_of[table], shards)} AS shard FROM {quote_ident(table)})"
            key = {"impressions": "request_id, position NULLS LAST, item_id", "requests": "request_id",
                   "sessions": "session_id", "users": "user_id"}[table]
            con.execute(f"COPY (SELECT * FROM {source} ORDER BY {key}) TO {_literal(str(folder))} "
                        "(FORMAT PARQUET, PARTITION_BY (shard), OVERWRITE_OR_IGNORE)")
    except duckdb.Error as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LogError(f"{log}: cannot be exported to {target} ({str(exc).splitlines()[0]})") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        con.close()
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target
