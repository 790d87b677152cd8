"""GRADE's training data-parallel on Ray Train: N workers (torch DDP over gloo underneath), each holding the
log and computing its slice of every batch (`policies.parallel`).

Every worker reads the log itself from its path (shared storage on a cluster, as for a streamed
evaluation) and runs `train` with its rank; rank 0 writes the policy and the run's record into a Ray Train
checkpoint, which the driver reads back. Every worker draws the whole batch's rows and exploration noise and
keeps its slice, so with one worker the run is the local one to the last bit (at the same torch thread
count: each worker runs one), and with more each update averages the workers' gradients of their slices of
the local run's batch: the local run up to the order of float additions (tests check both over 15 updates:
0 and under 1e-5 in the parameters). Over hundreds of updates a last-bit difference can tip a gamma draw's
rejection step, after which the runs are alike in distribution, not in digits. That holds for GRADE's
Dirichlet exploration; the logistic-normal ablation also draws a Monte-Carlo sample for its KL term, per
slice, so its workers' random streams part from the local run's after the first update.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from mtf_core.errors import LogError
from mtf_core.policies.parallel import DataParallel
from mtf_core.policies.train import DATA_PARALLEL, TrainConfig, TrainResult, train
from mtf_core.reward import RewardSpec
from mtf_core.runs import policy_from_files, write_policy_files
from mtf_core.threads import THREADS_ENV

__all__ = ["train_on_ray"]

_RECORD = "result.json"


def _worker_loop(settings: dict[str, Any]) -> None:
    """What each Ray Train worker runs: load the log, train this rank's share, rank 0 reports the result."""
    import ray.train

    from mtf_core.store import load_log

    # One thread per worker: each holds one CPU, and a thread count of its own would change a matmul's last
    # bits against the local run's.
    os.environ[THREADS_ENV] = "1"
    context = ray.train.get_context()
    parallel = DataParallel(context.get_world_rank(), context.get_world_size())
    config: TrainConfig = settings["config"]
    log = load_log(settings["log"], user_sample=config.user_sample, sample_seed=config.seed)
    result = train(config, log, settings["reward"], parallel=parallel)
    if parallel.rank != 0:
        ray.train.report({"status": result.status})  # every worker reports as often as the others
        return
    with tempfile.TemporaryDirectory() as folder:
        write_policy_files(Path(folder), result.policy)
        record = {"history": result.history, "status": result.status, "seconds": result.seconds,
                  "best_step": result.best_step, "best_value": result.best_value,
                  "stopped_early": result.stopped_early, "validation_estimator": result.validation_estimator,
                  "notes": result.notes}
        (Path(folder) / _RECORD).write_text(json.dumps(record))
        ray.train.report({"status": result.status}, checkpoint=ray.train.Checkpoint.from_directory(folder))


def train_on_ray(config: TrainConfig, log_path: str | os.PathLike[str], reward: RewardSpec, workers: int = 2,
                 address: str | None = None, storage: str | os.PathLike[str] | None = None,
                 say: Callable[[str], None] = lambda msg: None) -> TrainResult:
    """Train `config` (a DATA_PARALLEL algorithm) on `workers` Ray Train workers: a local cluster of that many
    CPUs, or the running one at `address`. `storage` is where Ray Train keeps the checkpoint (shared storage
    on a cluster; a temporary folder by default); it is removed afterwards. The log is read by every worker
    from `log_path`, with the config's user sample."""
    if config.algo not in DATA_PARALLEL:
        raise LogError(f"{config.algo} trains in one process; --engine ray trains {', '.join(DATA_PARALLEL)}")
    if workers < 1:
        raise LogError(f"--workers {workers}: at least one worker")
    try:
        import ray
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
    except ImportError as exc:
        raise LogError("--engine ray needs Ray Train: pip install -r requirements-ray.txt") from exc
    started = not ray.is_initialized()
    root = Path(storage) if storage is not None else Path(tempfile.mkdtemp(prefix="mtf-ray-train-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        if started:
            options = {"address": address} if address else {"num_cpus": workers, "object_store_memory": 256 * 1024**2}
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **options)
        say(f"training {config.algo} on {workers} Ray Train worker{'s' * (workers > 1)}")
        trainer = TorchTrainer(
            _worker_loop, train_loop_config={"config": config, "log": str(Path(log_path).resolve()), "reward": reward},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1}),
            torch_config=TorchConfig(backend="gloo"),
            run_config=RunConfig(storage_path=str(root.resolve()), name="train"))
        try:
            outcome = trainer.fit()
        except Exception as exc:  # a worker's error comes back as Ray's, with the traceback: its last line says it
            lines = [line for line in str(exc).splitlines() if line.strip()]
            raise LogError(f"training on Ray failed: {lines[-1] if lines else type(exc).__name__}") from exc
        if outcome.checkpoint is None:
            raise LogError("training on Ray failed: no checkpoint came back from rank 0")
        with outcome.checkpoint.as_directory() as folder:
            policy = policy_from_files(Path(folder))
            record = json.loads((Path(folder) / _RECORD).read_text())
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
        if storage is None:
            shutil.rmtree(root, ignore_errors=True)
        else:
            shutil.rmtree(root / "train", ignore_errors=True)
            with contextlib.suppress(OSError):
                root.rmdir()  # only if nothing else is kept there
    history = [(int(step), {str(k): float(v) for k, v in metrics.items()}) for step, metrics in record["history"]]
    notes = [f"trained data-parallel on {workers} Ray Train worker{'s' * (workers > 1)} (torch DDP): each "
             "update averages the workers' gradients of their slices of one batch", *record["notes"]]
    return TrainResult(policy, history, record["status"], float(record["seconds"]), config, None,
                       record["best_step"], record["best_value"], bool(record["stopped_early"]),
                       record["validation_estimator"], notes)
