"""BatchRL-MTF's update against d3rlpy's BCQ on the same transitions, batch size and network widths.

d3rlpy is not a project dependency: it lives in its own environment, and this script runs in both.

    python3 -m venv /tmp/d3env && /tmp/d3env/bin/pip install torch==2.13.0 d3rlpy==2.8.1
    .venv/bin/python -m benchmarks.d3rlpy_bcq --d3rlpy-python /tmp/d3env/bin/python [--log data/demo.duckdb]

In the project environment it builds BatchRL-MTF's transitions from the log (the encoded states, the
logged weights, the composite reward with the method's long-term terms, session ends), writes them to a
file, and alternates three timed runs of 1,000 updates of each side (ours in this process, d3rlpy's BCQ in a
subprocess of its environment), each with one torch thread, batch 512, hidden layers of 64, 10 sampled
actions, discount 0.95, lambda 0.75, tau 0.005. It then trains both for `--steps` updates, serves each on
the held-out sessions and runs them in the simulator for the truth (d3rlpy's actions, in [-1, 1], are
clipped at 0 and normalised onto the simplex). The best time of each side and both truths are printed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

_STEPS = 1000
_BATCH = 512
_HIDDEN = 64


def _d3rlpy_side(data: Path, steps: int, out: Path | None) -> None:
    """Runs in d3rlpy's environment: time `steps` BCQ updates; with `out`, save the trained policy there."""
    import d3rlpy
    import torch

    torch.set_num_threads(1)
    arrays = np.load(data)
    dataset = d3rlpy.dataset.MDPDataset(arrays["observations"], arrays["actions"], arrays["rewards"],
                                        arrays["terminals"])
    encoder = d3rlpy.models.encoders.VectorEncoderFactory(hidden_units=[_HIDDEN, _HIDDEN])
    bcq = d3rlpy.algos.BCQConfig(batch_size=_BATCH, gamma=0.95, lam=0.75, tau=0.005, n_action_samples=10,
                                 actor_encoder_factory=encoder, critic_encoder_factory=encoder,
                                 imitator_encoder_factory=encoder).create(device="cpu:0")
    bcq.build_with_dataset(dataset)
    batches = [dataset.sample_transition_batch(_BATCH) for _ in range(8)]  # sampling is not the update
    bcq.update(batches[0])
    start = time.perf_counter()
    for step in range(steps):
        bcq.update(batches[step % len(batches)] if out is None else dataset.sample_transition_batch(_BATCH))
    seconds = time.perf_counter() - start
    if out is not None:
        bcq.save_policy(str(out))
    print(json.dumps({"seconds": seconds, "steps": steps}))


def _transitions(log_path: str):  # type: ignore[no-untyped-def]
    """The log, and a BatchRL trainer on its training sessions (the latest 20% are held out for the truth, as
    `train` holds them out)."""
    from mtf_core.evaluate import time_split
    from mtf_core.policies.batchrl import BatchRLConfig, BatchRLTrainer
    from mtf_core.policies.objective import build_training_data
    from mtf_core.reward import RewardSpec
    from mtf_core.store import load_log

    log = load_log(log_path)
    train_rows, _ = time_split(log, 0.2)
    data = build_training_data(log.subset(train_rows), RewardSpec.default(log.task_names))
    return log, BatchRLTrainer(BatchRLConfig(batch_size=_BATCH, hidden=_HIDDEN), data, 0)


def _export(trainer, path: Path) -> None:  # type: ignore[no-untyped-def]
    """The trainer's transitions as d3rlpy episodes: each session's requests in order, its last one terminal."""
    t, log = trainer.t, trainer.data.log
    order = np.lexsort((log.step, log.session_id))
    np.savez(path, observations=t.features.numpy()[order].astype(np.float32),
             actions=t.actions.numpy()[order].astype(np.float32), rewards=t.rewards.numpy()[order].astype(np.float32),
             terminals=t.done.numpy()[order].astype(np.float32))


def _ours(trainer, steps: int) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    for step in range(steps):
        trainer.step(step)
    return time.perf_counter() - start


def _theirs(python: str, data: Path, steps: int, out: Path | None = None) -> float:
    cmd = [python, "-m", "benchmarks.d3rlpy_bcq", "--d3rlpy-side", str(data), "--steps", str(steps)]
    if out is not None:
        cmd += ["--save", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=True,
                          cwd=Path(__file__).resolve().parent.parent)
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["seconds"])


def _truth(log, policy, label: str) -> dict[str, float]:  # type: ignore[no-untyped-def]
    from mtf_core.evaluate import evaluate_policy, evaluation_sample, policy_for_truth, target_actions
    from mtf_core.reward import RewardSpec

    sample = evaluation_sample(log, RewardSpec.default(log.task_names), 0.2, outcome_model="linear")
    result = evaluate_policy(sample.ctx, target_actions(policy, sample.ctx.log, label), n_boot=200,
                             truth_policy=None if policy is None else policy_for_truth(policy, False))
    truth = result.ground_truth or {}
    per_user = result.unit_terms["truth_per_user"]
    return {"per_request": truth["value"], "ci": [truth["ci_low"], truth["ci_high"]],
            "per_user": float(per_user[:, 0].sum() / per_user[:, 1].sum())}


def _d3rlpy_policy(log, encoder, path: Path):  # type: ignore[no-untyped-def]
    """d3rlpy's saved TorchScript policy behind the project's policy interface (a benchmark's own file)."""
    import torch

    from mtf_core.policies.base import FusionPolicy, StateBatch

    scripted = torch.jit.load(str(path))

    class D3rlpyPolicy(FusionPolicy):
        stochastic = False

        def act(self, state: StateBatch, deterministic: bool = True) -> torch.Tensor:
            with torch.no_grad():
                a = scripted(encoder(state)).clamp(min=0) + 1e-6
            return a / a.sum(-1, keepdim=True)

    return D3rlpyPolicy(log.task_names, log.segments)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", default="data/demo.duckdb")
    parser.add_argument("--d3rlpy-python", help="the python of d3rlpy's environment")
    parser.add_argument("--steps", type=int, default=_STEPS, help="updates per timed run")
    parser.add_argument("--train-steps", type=int, default=1500, help="updates of each policy judged by the truth")
    parser.add_argument("--d3rlpy-side", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.d3rlpy_side:
        _d3rlpy_side(Path(args.d3rlpy_side), args.steps, Path(args.save) if args.save else None)
        return
    if not args.d3rlpy_python:
        parser.error("--d3rlpy-python is required (see the module docstring)")
    import torch

    torch.set_num_threads(1)
    log, trainer = _transitions(args.log)
    with tempfile.TemporaryDirectory() as tmp:
        exported = Path(tmp) / "transitions.npz"
        _export(trainer, exported)
        ours, theirs = [], []
        for _ in range(3):  # alternated, so that a busy spell of the machine hits both
            ours.append(_ours(trainer, args.steps))
            theirs.append(_theirs(args.d3rlpy_python, exported, args.steps))
        print(f"per {args.steps} updates (best of 3, 1 thread): BatchRL-MTF {min(ours):.1f}s, "
              f"d3rlpy BCQ {min(theirs):.1f}s ({min(ours) / min(theirs):.2f}x)", flush=True)
        from mtf_core.policies.train import TrainConfig, train
        from mtf_core.reward import RewardSpec

        result = train(TrainConfig("batchrl", 0, {"steps": args.train_steps}), log,
                       RewardSpec.default(log.task_names))
        saved = Path(tmp) / "d3rlpy_policy.pt"
        _theirs(args.d3rlpy_python, exported, args.train_steps, saved)
        truth = {"BatchRL-MTF": _truth(log, result.policy, "batchrl"),
                 "d3rlpy BCQ": _truth(log, _d3rlpy_policy(log, trainer.policy.encoder, saved), "d3rlpy"),
                 "logging": _truth(log, None, "logging")}
    print(json.dumps({"seconds_per_updates": {"ours": min(ours), "d3rlpy_bcq": min(theirs), "steps": args.steps},
                      "truth_held_out": truth}, indent=1))


if __name__ == "__main__":
    main()
