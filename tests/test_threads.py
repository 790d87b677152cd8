"""Thread budgets: heavy jobs take the idle cores, shared among the jobs of one process."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import torch

from mtf_core import threads
from mtf_core.threads import heavy_work, idle_cores, thread_budget


def test_a_fixed_count_wins_and_bad_values_fall_back(monkeypatch):
    monkeypatch.setenv(threads.THREADS_ENV, "3")
    assert thread_budget() == 3 and thread_budget(active_jobs=4) == 3
    monkeypatch.setenv(threads.THREADS_ENV, "many")
    assert thread_budget() >= 1


def test_a_busy_core_is_seen_and_left_alone(monkeypatch):
    monkeypatch.delenv(threads.THREADS_ENV, raising=False)
    quiet = idle_cores(0.2)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = idle_cores(0.2)
    finally:
        spinner.kill()
        spinner.wait(timeout=30)
    assert busy <= quiet - 0.5 or quiet < 0.5  # (on a machine already saturated there is nothing to see)
    assert thread_budget() >= 1


def test_jobs_of_one_process_share_the_budget(monkeypatch):
    monkeypatch.setattr(threads, "idle_cores", lambda window=0.05: 4.0)
    monkeypatch.delenv(threads.THREADS_ENV, raising=False)
    before = torch.get_num_threads()
    inside: list[int] = []
    release = threading.Event()
    entered = threading.Event()

    def second_job() -> None:
        with heavy_work() as budget:
            inside.append(budget)
            entered.set()
            release.wait(timeout=30)

    try:
        with heavy_work() as first:
            assert first == 4
            worker = threading.Thread(target=second_job, daemon=True)
            worker.start()
            assert entered.wait(timeout=30)
            # Two jobs: half the idle cores each; the first gives up its share at its next refresh.
            assert inside == [2] and threads.refresh() == 2 and torch.get_num_threads() == 2
            release.set()
            worker.join(timeout=30)
            assert threads.refresh() == 4 and torch.get_num_threads() == 4  # the whole budget again
    finally:
        release.set()
        torch.set_num_threads(before)
