"""Does the learned outcome model value far policies better than the linear one? A study over simulator seeds.

For each seed a simulator log of the default (mis-calibrated) world is generated; the candidate vectors
farthest from the logging policy are run online for the truth, and each direct model's DM (on the logged
requests) is compared with it. Reported per seed: both models' mean absolute error, their ratio, and the
held-out R^2 of the request reward that `auto` chooses by.

    python -m benchmarks.outcome_model [--seeds 8] [--users 1000] [--logging-mode dirichlet|deterministic|
                                       buckets|mixed] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pandas as pd

from mtf_core.evaluate import prepare
from mtf_core.headroom import candidate_vectors, direct_model_errors, farthest_candidates, truth_of_vectors
from mtf_core.reward import RewardSpec
from mtf_core.simulate import SimConfig, generate
from mtf_core.store import load_log

__all__ = ["far_policy_errors"]


def far_policy_errors(seeds: range | list[int], n_users: int = 1000, n_candidates: int = 24,
                      folder: Path | None = None, logging_mode: str = "dirichlet") -> pd.DataFrame:
    """One row per seed: each model's mean absolute error on the farthest third of the candidates, and R^2,
    on logs of one logging mode of the simulator."""
    folder = Path(folder or tempfile.mkdtemp(prefix="mtf-outcome-"))
    rows = []
    for seed in seeds:
        path = folder / f"seed{seed}_{n_users}_{logging_mode}.duckdb"
        if not path.exists():
            generate(SimConfig(n_users=n_users, seed=seed, logging_mode=logging_mode), str(path))
        log = load_log(path)
        ctx = prepare(log, RewardSpec.default(log.task_names))
        config = ctx.sim_config
        assert config is not None
        candidates = candidate_vectors(config, n_candidates, seed=0)
        far = candidates[farthest_candidates(config, candidates)]
        errors = direct_model_errors(ctx, far, *truth_of_vectors(ctx, far))
        learned = ctx.learned_view
        assert learned is not None and learned.r2 is not None
        rows.append({"seed": seed, "logging": logging_mode, "requests": log.n_requests,
                     "linear_mae": errors["linear"]["mean_absolute_error"],  # type: ignore[index]
                     "learned_mae": errors["learned"]["mean_absolute_error"],  # type: ignore[index]
                     "ratio": errors["learned_over_linear"], "r2_linear": learned.r2["linear"][0],
                     "r2_learned": learned.r2["learned"][0]})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--logging-mode", default="dirichlet",
                        choices=["dirichlet", "deterministic", "buckets", "mixed"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    frame = far_policy_errors(range(1, args.seeds + 1), args.users, logging_mode=args.logging_mode)
    pooled = frame["learned_mae"].sum() / frame["linear_mae"].sum()
    if args.json:
        print(json.dumps({"per_seed": frame.to_dict(orient="records"), "pooled_ratio": pooled}, indent=1))
    else:
        print(frame.round(3).to_string(index=False))
        print(f"pooled: the learned model's error is {pooled:.0%} of the linear model's")


if __name__ == "__main__":
    main()
