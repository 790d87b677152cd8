"""GRADE trained data-parallel on Ray Train (torch DDP): one worker is the local run to the last bit, two
workers the local run to float rounding (each averages the other's gradient of its half of every batch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mtf_core.errors import LogError
from mtf_core.policies.parallel import DataParallel
from mtf_core.policies.train import TrainConfig, train
from mtf_core.reward import RewardSpec
from mtf_core.threads import THREADS_ENV

CONFIG = TrainConfig("grade", 5, {"steps": 10, "warm_start_steps": 5, "batch_size": 200}, patience=0)


def test_outside_a_process_group_data_parallel_is_the_identity():
    rows = torch.arange(10)
    assert torch.equal(DataParallel().slice(rows), rows)
    halves = [DataParallel(r, 2).slice(rows) for r in range(2)]
    assert torch.equal(torch.cat(halves), rows) and len(halves[0]) == 5  # the shares partition the batch
    assert torch.equal(DataParallel().all_sum(torch.tensor([1.5, 2.0])), torch.tensor([1.5, 2.0]))
    assert DataParallel().any(True) and not DataParallel().any(False)
    with pytest.raises(ValueError, match="rank 2 outside a world of 2"):
        DataParallel(2, 2)


def test_only_grade_trains_data_parallel(tiny_log):  # type: ignore[no-untyped-def]
    with pytest.raises(LogError, match="cem trains in one process"):
        train(TrainConfig("cem", 0), tiny_log, RewardSpec.default(tiny_log.task_names), parallel=DataParallel(0, 2))
    from mtf_core.policies.ray_train import train_on_ray

    with pytest.raises(LogError, match="--engine ray trains grade"):
        train_on_ray(TrainConfig("batchrl", 0), "unused.duckdb", RewardSpec.default(tiny_log.task_names))


def _same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa)


def test_ray_train_workers_give_the_local_run(tiny_log_path: Path, tiny_log, monkeypatch):  # type: ignore[no-untyped-def]
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.train.torch")
    from mtf_core.policies.ray_train import train_on_ray

    monkeypatch.setenv(THREADS_ENV, "1")  # as each Ray worker runs (one CPU each)
    spec = RewardSpec.default(tiny_log.task_names)
    local = train(CONFIG, tiny_log, spec)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=128 * 1024**2)
    try:
        one = train_on_ray(CONFIG, tiny_log_path, spec, workers=1)
        two = train_on_ray(CONFIG, tiny_log_path, spec, workers=2)
    finally:
        ray.shutdown()
    assert _same_parameters(local.policy, one.policy) == 0.0  # exactly
    assert [m for _, m in one.history] == [m for _, m in local.history]
    assert one.best_value == local.best_value and one.best_step == local.best_step
    assert _same_parameters(local.policy, two.policy) < 1e-5  # the same updates, summed in another order
    assert two.best_value == pytest.approx(local.best_value, abs=1e-6)
    assert two.history[-1][1]["validation/dr"] == pytest.approx(local.history[-1][1]["validation/dr"], abs=1e-6)
    assert "2 Ray Train workers" in two.notes[0] and two.data is None
    weights = [r.policy.act(local.data.state, deterministic=True).detach().numpy() for r in (local, two)]
    assert np.abs(weights[0] - weights[1]).max() < 1e-5


def test_train_on_ray_from_the_command_line_saves_a_run(tiny_log_path: Path, tmp_path: Path):
    pytest.importorskip("ray.train.torch")
    import json
    import subprocess
    import sys

    from mtf_core.runs import RunStore

    root = Path(__file__).resolve().parent.parent
    base = [sys.executable, "-m", "mtf_core", "train", str(tiny_log_path), "--runs", str(tmp_path / "runs")]
    refused = subprocess.run([*base, "--algo", "cem", "--engine", "ray"], cwd=root, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode != 0 and "--engine ray trains grade" in refused.stderr
    done = subprocess.run([*base, "--algo", "grade", "--steps", "4", "--set", "warm_start_steps=2", "--engine", "ray",
                           "--workers", "2", "--sample-users", "0.5", "--json"], cwd=root, capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)
    assert run["status"] == "finished" and run["config"]["user_sample"] == 0.5
    assert run["notes"][0].startswith("trained data-parallel on 2 Ray Train workers")
    assert any(note.startswith("trained on a 50% sample") for note in run["notes"])
    policy = RunStore(tmp_path / "runs").load_policy(run["run_id"])  # saved, checksummed, loadable
    assert policy.tasks and not (tmp_path / "runs" / ".ray-train").exists()
