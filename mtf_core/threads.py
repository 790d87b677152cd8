"""How many threads heavy work may use: the cores that are idle now, shared by the jobs of this process.

Torch's intra-op pool splits each operation across its threads and waits for the slowest. When another
process holds a core, the thread that shares it runs at half speed or less and every operation waits for
it: on 2 cores with one taken, evaluation fell from 24-35M to 2.2M candidate rows/s with 2 threads. One
thread on the free core loses only its share. So each heavy job (an evaluation, a training run) asks for
its threads when it starts: the idle cores measured over a short window, divided among the heavy jobs this
process is running (the app trains and evaluates in one process). Torch's thread count belongs to the
calling thread (OpenMP), so a job that runs long calls `refresh` as it goes, to give up its share when
another job starts and take it back when that one ends.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import torch

__all__ = ["idle_cores", "thread_budget", "heavy_work", "uses_cores", "refresh", "one_thread", "THREADS_ENV"]

F = TypeVar("F", bound=Callable[..., Any])

THREADS_ENV = "MTF_THREADS"  # a fixed thread count, for those who know their machine's load better
_SAMPLE_SECONDS = 0.05
_lock = threading.Lock()
_active = 0
_cores = 1  # the whole budget: idle cores measured when the latest heavy job started


def _cpu_times() -> tuple[float, float] | None:
    """(idle, total) jiffies of all CPUs from /proc/stat, or None where it cannot be read (not Linux)."""
    try:
        with open("/proc/stat") as stat:
            fields = [float(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return idle, sum(fields[:8])


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def idle_cores(window: float = _SAMPLE_SECONDS) -> float:
    """Cores idle over the next `window` seconds (all usable cores where /proc/stat is unavailable).

    The calling thread sleeps through the window, so it does not count itself as load."""
    cores = _usable_cores()
    first = _cpu_times()
    if first is None:
        return float(cores)
    time.sleep(window)
    second = _cpu_times()
    if second is None or second[1] <= first[1]:
        return float(cores)
    share_idle = (second[0] - first[0]) / (second[1] - first[1])
    return max(0.0, min(float(cores), share_idle * (os.cpu_count() or cores)))


def thread_budget(active_jobs: int = 1) -> int:
    """Threads for one of `active_jobs` heavy jobs: the idle cores (rounded, at least one) shared among them;
    `MTF_THREADS` fixes the count."""
    fixed = os.environ.get(THREADS_ENV)
    if fixed:
        try:
            return max(1, int(fixed))
        except ValueError:
            pass
    return max(1, int(idle_cores() + 0.25) // max(active_jobs, 1))


def _share() -> int:
    return max(1, _cores // max(_active, 1))


@contextmanager
def heavy_work() -> Iterator[int]:
    """Run one heavy job in this thread with its share of the idle cores as torch's thread count; yields it."""
    global _active, _cores
    previous = torch.get_num_threads()
    with _lock:
        _active += 1
        _cores = thread_budget(1)
        share = _share()
    torch.set_num_threads(share)
    try:
        yield share
    finally:
        with _lock:
            _active -= 1
        torch.set_num_threads(previous)


def refresh() -> int:
    """Set the calling job's thread count to its current share (jobs start and end around it); returns it."""
    share = _share()
    if torch.get_num_threads() != share:
        torch.set_num_threads(share)
    return share


def uses_cores(fn: F) -> F:
    """Run `fn` as one heavy job (`heavy_work`)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with heavy_work():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@contextmanager
def one_thread() -> Iterator[None]:
    """One torch thread for small networks (layers of tens of units, batches of a thousand rows), whatever the
    load: splitting such operations costs more than it saves, and a busy core made them 35x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
