"""The run store (DESIGN §6): a DuckDB catalogue of runs plus one folder per run with its policy.

Layout of a workspace `runs/`:
    catalogue.duckdb          runs(id, name, algo, status, config, reward, fingerprint, ...), history(run, step, name, value)
    <run_id>/policy.pt        the policy's state dict (loaded with torch.load(weights_only=True))
    <run_id>/policy.json      the policy class and constructor arguments

DuckDB lets one process write a file at a time, and a writer locks out readers of other processes, so
every operation opens the catalogue, does one short transaction and closes it, retrying while another
process holds the lock. A run's files are written under temporary names and renamed before the
catalogue marks it finished, so a crash never leaves a finished run without its policy. A run still
`running` whose process is gone is marked `interrupted` the next time the store is opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import duckdb
import pandas as pd
import torch

from mtf_core.errors import EXIT_UNUSABLE, LogError
from mtf_core.policies.base import FusionPolicy
from mtf_core.reward import RewardSpec
from mtf_core.store import LogData

__all__ = ["RunStore", "RunRecord", "policy_classes", "policy_from_files"]

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS runs (
        run_id VARCHAR PRIMARY KEY, name VARCHAR, algo VARCHAR, status VARCHAR, created_at TIMESTAMP,
        finished_at TIMESTAMP, seconds DOUBLE, seed BIGINT, config VARCHAR, reward VARCHAR, log_path VARCHAR,
        data_fingerprint VARCHAR, pid BIGINT, host VARCHAR, policy_sha256 VARCHAR, summary VARCHAR)""",
    "CREATE TABLE IF NOT EXISTS history (run_id VARCHAR, step INTEGER, name VARCHAR, value DOUBLE)",
]
_LOCK_RETRY_SECONDS = 30.0


def _empty_catalogue() -> duckdb.DuckDBPyConnection:
    """An in-memory catalogue with the schema and no runs, read where no catalogue (or no table) exists yet."""
    con = duckdb.connect()
    for sql in _SCHEMA:
        con.execute(sql)
    return con


def policy_classes() -> dict[str, type[FusionPolicy]]:
    """The policy classes a saved run may name (imported on use: the policies import the run store's peers)."""
    from mtf_core.policies.batchrl import BCQPolicy
    from mtf_core.policies.enhanced import PerItemPolicy
    from mtf_core.policies.grade import DirichletPolicy
    from mtf_core.policies.integrated import ActorPolicy
    from mtf_core.policies.static import LoggingPolicy, StaticPolicy

    return {c.__name__: c for c in (LoggingPolicy, StaticPolicy, DirichletPolicy, BCQPolicy, ActorPolicy,
                                    PerItemPolicy)}



@dataclass(frozen=True)
class RunRecord:
    run_id: str
    name: str
    algo: str
    status: str
    created_at: datetime
    finished_at: datetime | None
    seconds: float | None
    seed: int
    config: dict[str, Any]
    reward: dict[str, Any]
    log_path: str
    data_fingerprint: str
    summary: dict[str, Any]
    policy_sha256: str | None = None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunStore:
    """A folder of runs with a DuckDB catalogue; safe to share between processes."""

    def __init__(self, root: str | os.PathLike[str] = "runs") -> None:
        self.root = Path(root)
        self.catalogue = self.root / "catalogue.duckdb"

    # ------------------------------------------------------------------ connection handling
    @contextmanager
    def _connect(self, write: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        if write:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.catalogue.exists():
            empty = _empty_catalogue()
            try:
                yield empty
            finally:
                empty.close()
            return
        start = time.monotonic()
        deadline = start + _LOCK_RETRY_SECONDS
        while True:
            try:
                con = duckdb.connect(str(self.catalogue), read_only=not write)
                break
            except duckdb.IOException as exc:
                # Another process may be creating the file right now: retry briefly before calling it corrupt.
                if "lock" not in str(exc).lower() and time.monotonic() - start > 1.0:
                    raise LogError(f"{self.catalogue}: the run catalogue is corrupted or unreadable "
                                   f"({str(exc).splitlines()[0]}); move it aside to start a new one",
                                   EXIT_UNUSABLE) from exc
                if "lock" in str(exc).lower() and time.monotonic() > deadline:
                    raise LogError(f"{self.catalogue}: the run catalogue stayed locked by another process for "
                                   f"{_LOCK_RETRY_SECONDS:.0f}s; try again", EXIT_UNUSABLE) from exc
                time.sleep(0.05 + random.random() * 0.1)
            except duckdb.Error as exc:
                raise LogError(f"{self.catalogue}: the run catalogue is corrupted or unreadable "
                               f"({str(exc).splitlines()[0]}); move it aside to start a new one",
                               EXIT_UNUSABLE) from exc
        try:
            if write:
                for sql in _SCHEMA:
                    con.execute(sql)
            elif not con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'runs'"
                                 ).fetchone()[0]:  # type: ignore[index]
                # A writer created the file but not yet its tables: read it as an empty catalogue.
                con.close()
                con = _empty_catalogue()
            yield con
        finally:
            con.close()

    def _write(self, fn: Callable[[duckdb.DuckDBPyConnection], Any]) -> Any:
        with self._connect(write=True) as con:
            con.execute("BEGIN")
            try:
                out = fn(con)
                con.execute("COMMIT")
            except Exception:
                con.execute("ROLLBACK")
                raise
            return out

    # ------------------------------------------------------------------ lifecycle
    def create_run(self, algo: str, config: dict[str, Any], reward: RewardSpec, log: LogData,
                   name: str | None = None) -> str:
        run_id = uuid.uuid4().hex[:8]
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        row = [run_id, name or f"{algo}-{run_id[:4]}", algo, "running", now, None, None, int(config.get("seed", 0)),
               json.dumps(config), reward.to_json(), log.path, log.fingerprint, os.getpid(), os.uname().nodename,
               None, "{}"]
        self._write(lambda con: con.execute(f"INSERT INTO runs VALUES ({', '.join('?' * len(row))})", row))
        return run_id

    def finish_run(self, run_id: str, policy: FusionPolicy, history: list[tuple[int, dict[str, float]]],
                   status: str, seconds: float, summary: dict[str, Any] | None = None) -> None:
        """Write the policy files atomically, then record history and status in one transaction."""
        folder = self.root / run_id
        folder.mkdir(parents=True, exist_ok=True)
        spec = {"class": type(policy).__name__, "args": policy.spec()}
        tmp_pt, tmp_json = folder / ".policy.pt.tmp", folder / ".policy.json.tmp"
        torch.save(policy.state_dict(), tmp_pt)
        tmp_json.write_text(json.dumps(spec))
        os.replace(tmp_pt, folder / "policy.pt")
        os.replace(tmp_json, folder / "policy.json")
        digest = _sha256(folder / "policy.pt")
        rows = [(run_id, step, name, float(value)) for step, metrics in history for name, value in metrics.items()]
        frame = pd.DataFrame(rows, columns=["run_id", "step", "name", "value"])
        now = datetime.now(timezone.utc).replace(tzinfo=None)

        def write(con: duckdb.DuckDBPyConnection) -> None:
            con.execute("DELETE FROM history WHERE run_id = ?", [run_id])
            if len(frame):
                con.register("frame", frame)
                con.execute("INSERT INTO history SELECT * FROM frame")
            con.execute("UPDATE runs SET status = ?, finished_at = ?, seconds = ?, policy_sha256 = ?, summary = ? "
                        "WHERE run_id = ?", [status, now, seconds, digest, json.dumps(summary or {}), run_id])

        self._write(write)

    def mark(self, run_id: str, status: str) -> None:
        self._write(lambda con: con.execute("UPDATE runs SET status = ? WHERE run_id = ?", [status, run_id]))

    def recover(self) -> list[str]:
        """Mark runs left `running` by a process that no longer exists as `interrupted`."""
        if not self.catalogue.exists():
            return []
        with self._connect(write=False) as con:
            rows = con.execute("SELECT run_id, pid, host FROM runs WHERE status = 'running'").fetchall()
        host = os.uname().nodename
        dead = [r for r, pid, h in rows if h == host and pid is not None and not _pid_alive(int(pid))]
        for run_id in dead:
            self.mark(run_id, "interrupted")
        return dead

    # ------------------------------------------------------------------ queries
    def list_runs(self) -> list[RunRecord]:
        self.recover()
        with self._connect(write=False) as con:
            rows = con.execute("SELECT run_id, name, algo, status, created_at, finished_at, seconds, seed, config, "
                               "reward, log_path, data_fingerprint, summary, policy_sha256 FROM runs ORDER BY created_at").fetchall()
        return [RunRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], int(r[7] or 0), json.loads(r[8] or "{}"),
                          json.loads(r[9] or "{}"), r[10], r[11], json.loads(r[12] or "{}"), r[13]) for r in rows]

    def get(self, run_id: str) -> RunRecord:
        for run in self.list_runs():
            if run.run_id == run_id:
                return run
        raise LogError(f"{self.root}: no run {run_id!r} (see the runs table or `compare`)")

    def history(self, run_id: str) -> pd.DataFrame:
        with self._connect(write=False) as con:
            return con.execute("SELECT step, name, value FROM history WHERE run_id = ? ORDER BY step, name",
                               [run_id]).df()

    def rename(self, run_id: str, name: str) -> None:
        self.get(run_id)
        self._write(lambda con: con.execute("UPDATE runs SET name = ? WHERE run_id = ?", [name.strip()[:80], run_id]))

    def delete(self, run_id: str) -> None:
        self.get(run_id)
        self._write(lambda con: (con.execute("DELETE FROM history WHERE run_id = ?", [run_id]),
                                 con.execute("DELETE FROM runs WHERE run_id = ?", [run_id])))
        shutil.rmtree(self.root / run_id, ignore_errors=True)

    # ------------------------------------------------------------------ policies
    def load_policy(self, run_id: str, log: LogData | None = None) -> FusionPolicy:
        """Rebuild a run's policy; checks its status, its file's hash and that it fits the log's tasks."""
        run = self.get(run_id)
        if run.status not in ("finished", "cancelled"):
            raise LogError(f"run {run_id} is {run.status}; only finished or cancelled runs have a policy")
        policy = policy_from_files(self.root / run_id, expected_sha256=run.policy_sha256)
        if log is not None and tuple(policy.tasks) != log.task_names:
            raise LogError(f"run {run_id} was trained on tasks {list(policy.tasks)}, but this log has "
                           f"{list(log.task_names)}")
        return policy


def policy_from_files(folder: Path, expected_sha256: str | None = None) -> FusionPolicy:
    """Load policy.json + policy.pt; a missing, tampered or pickled file raises LogError."""
    pt, spec_path = folder / "policy.pt", folder / "policy.json"
    if not pt.exists() or not spec_path.exists():
        raise LogError(f"{folder}: the policy files are missing (policy.pt, policy.json)")
    if expected_sha256 and _sha256(pt) != expected_sha256:
        raise LogError(f"{pt}: the file changed since training (checksum mismatch); refusing to load it")
    try:
        spec = json.loads(spec_path.read_text())
        cls = policy_classes()[spec["class"]]
        args = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["args"].items()}
        policy = cls(**args)
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise LogError(f"{spec_path}: not a valid policy description ({exc})") from exc
    try:
        state = torch.load(pt, weights_only=True, map_location="cpu")
        policy.load_state_dict(state)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... on bad files
        raise LogError(f"{pt}: not a loadable state dict ({exc.__class__.__name__}: "
                       f"{str(exc).splitlines()[0][:200]})") from exc
    return policy.eval()
