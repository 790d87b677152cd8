"""The run store (DESIGN §6): a DuckDB catalogue of runs plus one folder per run with its policy.

Layout of a workspace `runs/`:
    catalogue.duckdb          runs(id, name, algo, status, config, reward, fingerprint, ...), history(run, step, name, value)
    <run_id>/policy.pt        the policy's state dict (loaded with torch.load(weights_only=True))
    <run_id>/policy.json      the policy class and constructor arguments

DuckDB lets one process write a file at a time, and a writer locks out readers of other processes, so
every operation opens the catalogue, does one short transaction and closes it, retrying while another
process holds the lock. Within one process (Streamlit runs each browser session as a thread), DuckDB
refuses a second connection to a file with a different `read_only` setting, so every connection to a
catalogue is made under one per-process lock: threads take turns instead of colliding.

A run's files are written under temporary names and renamed before the catalogue marks it finished, so a
crash never leaves a finished run without its policy; `policy_sha256` covers both files. A run still
`running` whose process is gone, or whose training thread in this process has ended, is marked
`interrupted` the next time the runs are listed. A damaged catalogue row is listed as `damaged` with the
reason, and the other runs stay usable.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import threading
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
from mtf_core.store import LogData, pid_alive

__all__ = ["RunStore", "RunRecord", "policy_classes", "policy_from_files", "write_policy_files"]

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS runs (
        run_id VARCHAR PRIMARY KEY, name VARCHAR, algo VARCHAR, status VARCHAR, created_at TIMESTAMP,
        finished_at TIMESTAMP, seconds DOUBLE, seed BIGINT, config VARCHAR, reward VARCHAR, log_path VARCHAR,
        data_fingerprint VARCHAR, pid BIGINT, host VARCHAR, policy_sha256 VARCHAR, summary VARCHAR)""",
    "CREATE TABLE IF NOT EXISTS history (run_id VARCHAR, step INTEGER, name VARCHAR, value DOUBLE)",
]
_LOCK_RETRY_SECONDS = 30.0
_PROCESS_LOCKS: dict[str, threading.RLock] = {}
_PROCESS_LOCKS_GUARD = threading.Lock()
# (catalogue, run_id) -> the thread of this process that created the run and has not recorded its end yet
_RUN_OWNERS: dict[tuple[str, str], threading.Thread] = {}
_RUN_OWNERS_GUARD = threading.Lock()


def _process_lock(catalogue: Path) -> threading.RLock:
    """The lock that serialises this process's connections to one catalogue file."""
    key = str(catalogue.resolve())
    with _PROCESS_LOCKS_GUARD:
        return _PROCESS_LOCKS.setdefault(key, threading.RLock())


def _is_transient(exc: Exception) -> bool:
    """Errors that mean "someone else has the file right now", never that it is damaged."""
    text = str(exc).lower()
    return "lock" in text or "different configuration" in text or "already open" in text


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


def _record(row: tuple[Any, ...]) -> RunRecord:
    """One catalogue row; a row whose JSON fields cannot be read becomes a `damaged` run naming the field."""
    fields = {}
    problems = []
    for name, text in (("config", row[8]), ("reward", row[9]), ("summary", row[12])):
        try:
            value = json.loads(text or "{}")
            if not isinstance(value, dict):
                raise ValueError("not a JSON object")
            fields[name] = value
        except (ValueError, RecursionError) as exc:
            fields[name] = {}
            problems.append(f"{name}: {str(exc)[:80]}")
    status = row[3] if not problems else "damaged"
    if problems:
        fields["summary"] = {"damaged": "; ".join(problems)}
    seed = row[7] if isinstance(row[7], int) else 0
    return RunRecord(row[0], row[1] or row[0], row[2] or "?", status, row[4], row[5], row[6], seed,
                     fields["config"], fields["reward"], row[10], row[11], fields["summary"], row[13])


def _sha256(*paths: Path) -> str:
    """SHA-256 of the files' contents, one after the other."""
    h = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _policy_digest(folder: Path) -> str:
    """What `policy_sha256` records: both policy files ("v2:"), so neither can change unnoticed."""
    return "v2:" + _sha256(folder / "policy.pt", folder / "policy.json")


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
        with _process_lock(self.catalogue):
            con = self._open(write)
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

    def _open(self, write: bool) -> duckdb.DuckDBPyConnection:
        """Connect, retrying while another process holds the file; only a lasting non-lock error is damage."""
        start = time.monotonic()
        while True:
            try:
                return duckdb.connect(str(self.catalogue), read_only=not write)
            except duckdb.Error as exc:
                waited = time.monotonic() - start
                first_line = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
                if _is_transient(exc):
                    if waited > _LOCK_RETRY_SECONDS:
                        raise LogError(f"{self.catalogue}: the run catalogue stayed locked by another process for "
                                       f"{_LOCK_RETRY_SECONDS:.0f}s; try again", EXIT_UNUSABLE) from exc
                elif waited > 1.0 or not isinstance(exc, duckdb.IOException):
                    # Another process may be creating the file right now: an IO error gets a second's grace.
                    raise LogError(f"{self.catalogue}: the run catalogue is corrupted or unreadable "
                                   f"({first_line}); move it aside to start a new one", EXIT_UNUSABLE) from exc
                time.sleep(0.05 + random.random() * 0.1)

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
        # Owned before it exists, so no listing in another thread can take it for an orphan.
        with _RUN_OWNERS_GUARD:
            _RUN_OWNERS[self._key(run_id)] = threading.current_thread()
        self._write(lambda con: con.execute(f"INSERT INTO runs VALUES ({', '.join('?' * len(row))})", row))
        return run_id

    def _key(self, run_id: str) -> tuple[str, str]:
        return str(self.catalogue.resolve()), run_id

    def _release(self, run_id: str) -> None:
        with _RUN_OWNERS_GUARD:
            _RUN_OWNERS.pop(self._key(run_id), None)

    def finish_run(self, run_id: str, policy: FusionPolicy, history: list[tuple[int, dict[str, float]]],
                   status: str, seconds: float, summary: dict[str, Any] | None = None) -> None:
        """Write the policy files atomically, then record history and status in one transaction."""
        folder = self.root / run_id
        write_policy_files(folder, policy)
        digest = _policy_digest(folder)
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
        self._release(run_id)

    def mark(self, run_id: str, status: str) -> None:
        self._write(lambda con: con.execute("UPDATE runs SET status = ? WHERE run_id = ?", [status, run_id]))
        if status != "running":
            self._release(run_id)

    def recover(self) -> list[str]:
        """Mark as `interrupted` the runs left `running` by a process that no longer exists, or by a thread of
        this process that ended without recording a result."""
        if not self.catalogue.exists():
            return []
        with self._connect(write=False) as con:
            rows = con.execute("SELECT run_id, pid, host FROM runs WHERE status = 'running'").fetchall()
        host, me = os.uname().nodename, os.getpid()
        dead = [r for r, pid, h in rows if h == host and pid is not None
                and (not pid_alive(int(pid)) or (int(pid) == me and not self._owned_by_live_thread(r)))]
        for run_id in dead:
            self.mark_if_running(run_id, "interrupted")
        return dead

    def _owned_by_live_thread(self, run_id: str) -> bool:
        with _RUN_OWNERS_GUARD:
            owner = _RUN_OWNERS.get(self._key(run_id))
        return owner is not None and owner.is_alive()

    @contextmanager
    def training(self, run_id: str) -> Iterator[None]:
        """The block that trains `run_id`: if it ends without `finish_run` (an exception, a Streamlit rerun
        that stops the script), the run is recorded as `cancelled`, never left `running`."""
        try:
            yield
        except BaseException:
            self.mark_if_running(run_id, "cancelled")
            raise

    def mark_if_running(self, run_id: str, status: str) -> None:
        self._write(lambda con: con.execute("UPDATE runs SET status = ? WHERE run_id = ? AND status = 'running'",
                                            [status, run_id]))
        self._release(run_id)

    # ------------------------------------------------------------------ queries
    def list_runs(self) -> list[RunRecord]:
        self.recover()
        with self._connect(write=False) as con:
            rows = con.execute("SELECT run_id, name, algo, status, created_at, finished_at, seconds, seed, config, "
                               "reward, log_path, data_fingerprint, summary, policy_sha256 FROM runs ORDER BY created_at").fetchall()
        return [_record(r) for r in rows]

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

    def held_out_share(self, policy_refs: list[str], log: LogData) -> float | None:
        """The share of latest sessions that the `run:` policies trained on this log held out from training
        (the largest, so no run is judged on sessions it saw); None where no such run held any out."""
        shares = []
        for ref in policy_refs:
            if ref.startswith("run:"):
                run = self.get(ref[len("run:"):])
                if run.data_fingerprint == log.fingerprint:
                    shares.append(float(run.config.get("validation_share", 0.0) or 0.0))
        return max(shares) if shares and max(shares) > 0 else None

    # ------------------------------------------------------------------ policies
    def load_policy(self, run_id: str, log: LogData | None = None) -> FusionPolicy:
        """Rebuild a run's policy; checks its status, its file's hash and that it fits the log's tasks."""
        run = self.get(run_id)
        if run.status == "damaged":
            raise LogError(f"run {run_id}: its catalogue row is damaged ({run.summary.get('damaged')}); "
                           "delete it or restore the catalogue from a copy")
        if run.status not in ("finished", "cancelled") or run.policy_sha256 is None:
            raise LogError(f"run {run_id} is {run.status} and has no saved policy; only finished runs and "
                           "cancelled runs that kept a checkpoint have one")
        policy = policy_from_files(self.root / run_id, expected_sha256=run.policy_sha256)
        if log is not None and tuple(policy.tasks) != log.task_names:
            raise LogError(f"run {run_id} was trained on tasks {list(policy.tasks)}, but this log has "
                           f"{list(log.task_names)}")
        return policy


_MAX_POLICY_INT = 4096  # widths, counts, feature numbers: far above any policy the lab trains


def _check_policy_args(args: dict[str, Any]) -> None:
    """Range checks on a policy description, so a damaged file cannot ask for absurd allocations."""
    for name, value in args.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int) and not 0 <= value <= _MAX_POLICY_INT:
            raise ValueError(f"{name}={value} is outside [0, {_MAX_POLICY_INT}]")
        if isinstance(value, float) and not (value == value and abs(value) < 1e6):
            raise ValueError(f"{name}={value} is not a finite number below 1e6")
        if isinstance(value, (tuple, str)) and len(value) > 10_000:
            raise ValueError(f"{name} is too long ({len(value)} entries)")


def write_policy_files(folder: Path, policy: FusionPolicy) -> None:
    """policy.pt (the state dict) and policy.json (the class and its arguments) in `folder`, each written under
    a temporary name and renamed into place; `policy_from_files` reads them back."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"class": type(policy).__name__, "args": policy.spec()}
    tmp_pt, tmp_json = folder / ".policy.pt.tmp", folder / ".policy.json.tmp"
    torch.save(policy.state_dict(), tmp_pt)
    tmp_json.write_text(json.dumps(spec))
    os.replace(tmp_pt, folder / "policy.pt")
    os.replace(tmp_json, folder / "policy.json")


def policy_from_files(folder: Path, expected_sha256: str | None = None) -> FusionPolicy:
    """Load policy.json + policy.pt; a missing, tampered or pickled file raises LogError."""
    pt, spec_path = folder / "policy.pt", folder / "policy.json"
    if not pt.exists() or not spec_path.exists():
        raise LogError(f"{folder}: the policy files are missing (policy.pt, policy.json)")
    if expected_sha256:
        # Runs saved before both files were covered carry the hash of policy.pt alone.
        actual = _policy_digest(folder) if expected_sha256.startswith("v2:") else _sha256(pt)
        if actual != expected_sha256:
            raise LogError(f"{folder}: the policy files changed since training (checksum mismatch); "
                           "refusing to load them")
    try:
        spec = json.loads(spec_path.read_text())
        cls = policy_classes()[spec["class"]]
        args = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["args"].items()}
        _check_policy_args(args)
        policy = cls(**args)
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as exc:
        raise LogError(f"{spec_path}: not a valid policy description ({str(exc)[:200]})") from exc
    try:
        state = torch.load(pt, weights_only=True, map_location="cpu")
        policy.load_state_dict(state)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... on bad files
        raise LogError(f"{pt}: not a loadable state dict ({exc.__class__.__name__}: "
                       f"{str(exc).splitlines()[0][:200]})") from exc
    return policy.eval()
