"""Shared fixtures: a tiny simulator log built once per test session, and helpers to corrupt copies."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import duckdb
import pytest

from mtf_core.simulate import SimConfig, generate
from mtf_core.store import LogData, load_log

TINY = SimConfig(n_users=150, sessions_per_user=3, n_items=800, seed=3)


@pytest.fixture(scope="session")
def tiny_log_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("logs") / "tiny.duckdb"
    generate(TINY, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_log(tiny_log_path: Path) -> LogData:
    return load_log(tiny_log_path)


@pytest.fixture(scope="session")
def reordered_log_path(tiny_log_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny log whose shown candidates appear in the reverse of their positions: what users saw
    no longer follows from the logged weights' fusion (as where a later stage reorders the fused ranking)."""
    path = tmp_path_factory.mktemp("logs") / "reordered.duckdb"
    shutil.copy(tiny_log_path, path)
    con = duckdb.connect(str(path))
    try:
        con.execute("UPDATE impressions AS i SET position = m.last - i.position FROM "
                    "(SELECT request_id, max(position) AS last FROM impressions GROUP BY request_id) m "
                    "WHERE m.request_id = i.request_id AND i.position IS NOT NULL")
    finally:
        con.close()
    return path


@pytest.fixture
def corrupt(tiny_log_path: Path, tmp_path: Path) -> Callable[..., Path]:
    """Copy the tiny log and run SQL statements on the copy."""

    def make(*statements: str) -> Path:
        path = tmp_path / "corrupt.duckdb"
        shutil.copy(tiny_log_path, path)
        con = duckdb.connect(str(path))
        try:
            for sql in statements:
                con.execute(sql)
        finally:
            con.close()
        return path

    return make


def drop_primary_key(table: str) -> list[str]:
    """Statements that rebuild a table without its primary key, so duplicates can be inserted."""
    return [f"CREATE TABLE _copy AS SELECT * FROM {table}", f"DROP TABLE {table}",
            f"ALTER TABLE _copy RENAME TO {table}"]
