"""Faults and concurrency: SIGKILL during training or import, two trainings into one store at once."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import duckdb
import pytest

from mtf_core.runs import RunStore
from mtf_core.schema import validate

pytestmark = pytest.mark.slow
PY = [sys.executable, "-m", "mtf_core"]


def _train(log, runs, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([*PY, "train", str(log), "--runs", str(runs), "--validation-share", "0", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_during_training_loses_no_run(tiny_log_path, tmp_path, request):
    runs = tmp_path / "runs"
    first = _train(tiny_log_path, runs, "--algo", "static")
    assert first.wait(timeout=120) == 0
    rng = random.Random(0)
    killed = 0
    for attempt in range(3):
        proc = _train(tiny_log_path, runs, "--algo", "grade", "--steps", "400")
        request.addfinalizer(lambda proc=proc: proc.poll() is None and (proc.kill(), proc.wait(timeout=30)))
        # Kill while it trains, not while it still starts up (a run killed before it exists loses nothing).
        deadline = time.monotonic() + 120
        while len(RunStore(runs).list_runs()) < attempt + 2 and proc.poll() is None:
            assert time.monotonic() < deadline, "the training never registered its run"
            time.sleep(0.1)
        time.sleep(rng.uniform(0.2, 2.0))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed += 1
        proc.wait(timeout=60)
    assert killed, "every training finished before the kill: the test needs longer trainings"
    store = RunStore(runs)
    statuses = [r.status for r in store.list_runs()]
    assert len(statuses) == 4, statuses  # nothing lost: the earlier run and every attempt are listed
    assert statuses[0] == "finished"
    assert statuses.count("interrupted") == killed
    assert store.load_policy(store.list_runs()[0].run_id) is not None


def test_sigkill_during_import_leaves_no_half_written_output(tiny_log_path, tmp_path, request):
    csv = {}
    con = duckdb.connect(str(tiny_log_path), read_only=True)
    for table in ("users", "requests", "impressions"):
        csv[table] = tmp_path / f"{table}.csv"
        con.execute(f"COPY {table} TO '{csv[table]}' (HEADER)")
    con.close()
    rng = random.Random(1)
    for attempt in range(4):
        out = tmp_path / f"out{attempt}.duckdb"
        proc = subprocess.Popen([*PY, "import", *[x for t, p in csv.items() for x in (f"--{t}", str(p))],
                                 "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        request.addfinalizer(lambda proc=proc: proc.poll() is None and (proc.kill(), proc.wait(timeout=30)))
        time.sleep(rng.uniform(0.3, 2.5))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        if out.exists():  # the rename happened, so the file must be a complete log
            con = duckdb.connect(str(out), read_only=True)
            assert validate(con) == []
            con.close()


def test_two_trainings_into_one_store_both_land_while_the_app_lists(tiny_log_path, tmp_path):
    runs = tmp_path / "runs"
    errors: list[BaseException] = []
    stop = threading.Event()

    def list_runs_repeatedly() -> None:
        store = RunStore(runs)
        while not stop.is_set():
            try:
                store.list_runs()
            except BaseException as exc:  # noqa: BLE001 - any failure of a reader is the finding
                errors.append(exc)
            time.sleep(0.01)

    reader = threading.Thread(target=list_runs_repeatedly, daemon=True)
    procs: list[subprocess.Popen] = []
    try:
        reader.start()
        procs = [_train(tiny_log_path, runs, "--algo", "grade", "--steps", "30", "--seed", str(s)) for s in (1, 2)]
        codes = [p.wait(timeout=300) for p in procs]
    finally:  # a test fails, never hangs: stop the reader and the trainings whatever happened
        stop.set()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        reader.join(timeout=30)
    assert not reader.is_alive(), "the listing thread did not stop"
    assert codes == [0, 0], [p.stderr.read() for p in procs]
    assert not errors, errors[:3]
    assert sorted(r.status for r in RunStore(runs).list_runs()) == ["finished", "finished"]


def test_a_full_disk_during_import_is_not_blamed_on_the_input(tmp_path):
    """DuckDB reports a full disk while it stores the parsed table; the message must say so, not call the
    CSV unreadable."""
    from mtf_core.errors import LogError, is_disk_full
    from mtf_core.store import _read_source

    source = tmp_path / "requests.csv"
    source.write_text("request_id,session_id\n1,1\n")

    class FullDisk:
        def execute(self, *args, **kwargs):
            raise duckdb.IOException('IO Error: Could not write file "x.duckdb.tmp": No space left on device')

    with pytest.raises(LogError) as raised:
        _read_source(FullDisk(), "requests", source)
    message = str(raised.value)
    assert "disk is full" in message and "is not the problem" in message and "cannot be read" not in message
    assert is_disk_full(OSError(28, "No space left on device")) and not is_disk_full(OSError(2, "missing"))


def test_a_full_disk_anywhere_is_one_line_with_exit_2(monkeypatch, capsys, tiny_log_path):
    from mtf_core import cli

    def full(args):
        raise OSError(28, "No space left on device", "runs/abc/policy.pt")

    monkeypatch.setattr(cli, "cmd_info", full)
    code = cli.main(["info", str(tiny_log_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "the disk is full" in err
