"""Each seed method with and without its key idea, on the same simulator logs and the same budget.

For every seed a simulator log is generated (seed 0 is the demo world); the best global static vector is
found against the truth (the best of a grid of candidate vectors by per-user long-term value); each variant
is trained with `train` (the latest 20% of sessions held out for validation) and evaluated on those held-out
sessions with the truth: per request, per user, and the paired per-user lift over the best static vector
(the same users, common random numbers) with its 95% interval.

    python -m benchmarks.ablations [--method grade] [--seeds 0,1,2,3,4,5] [--users 2000] [--variants A,B] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mtf_core.evaluate import evaluate_policy, evaluation_sample, policy_for_truth, prepare, target_actions
from mtf_core.evaluate.paired import paired_difference
from mtf_core.headroom import best_static_vector
from mtf_core.policies.static import StaticPolicy
from mtf_core.policies.train import TrainConfig, train
from mtf_core.reward import RewardSpec
from mtf_core.simulate import SimConfig, generate
from mtf_core.store import load_log

__all__ = ["VARIANTS", "ablation_study"]

VARIANTS: dict[str, dict[str, dict[str, object]]] = {
    "grade": {
        "GRADE (full)": {},
        "no rule terms": {"rule_reward": False},
        "no prior term": {"prior_reward": False},
        "no posterior term": {"posterior_reward": False},
        "Gaussian exploration": {"exploration": "gaussian"},
        "no adaptive exploration": {"adaptive_exploration": False},
    },
    "batchrl": {
        "BatchRL-MTF (full)": {},
        "no activeness or stickiness terms": {"activeness": 0.0, "stickiness": 0.0},
        "myopic (discount 0)": {"discount": 0.0},
    },
    "integrated": {
        "IntegratedRL-MTF (full)": {},
        "strict behaviour constraint": {"constraint": "behaviour"},
        "one round (no progressive training)": {"rounds": 1},
    },
    "enhanced": {
        "Enhanced-State RL (per item)": {},
        "per-request restriction": {"per_item": False},
    },
}
LOG_OPTIONS = {"enhanced": {"per_item_share": 0.3}}  # Enhanced-State RL needs per-item variation in its logs
HELD_OUT = 0.2


def _evaluate(sample, policy, label: str, n_boot: int):  # type: ignore[no-untyped-def]
    actions = target_actions(policy, sample.ctx.log, label)
    return evaluate_policy(sample.ctx, actions, n_boot=n_boot, truth_policy=policy_for_truth(policy, False),
                           sample=sample.description)


def ablation_study(method: str, seeds: list[int], n_users: int = 2000, n_boot: int = 200,
                   folder: Path | None = None, variants: list[str] | None = None) -> pd.DataFrame:
    """One row per (seed, variant): held-out truth per request and per user, the paired lifts per request and
    per user over the best static vector with their intervals, and training seconds. `variants` (names of
    VARIANTS[method]) runs a subset; the full method always runs first."""
    chosen = {name: params for i, (name, params) in enumerate(VARIANTS[method].items())
              if i == 0 or variants is None or name in variants}
    folder = Path(folder or tempfile.mkdtemp(prefix="mtf-ablation-"))
    rows = []
    for seed in seeds:
        options = LOG_OPTIONS.get(method, {})
        path = folder / f"seed{seed}_{n_users}{'_per_item' if options else ''}.duckdb"
        if not path.exists():
            generate(SimConfig(n_users=n_users, seed=seed, **options), str(path))
        log = load_log(path)
        spec = RewardSpec.default(log.task_names)
        sample = evaluation_sample(log, spec, HELD_OUT)
        best = best_static_vector(prepare(log, spec, outcome_model="linear"))
        static = StaticPolicy(log.task_names, log.segments, np.tile(best, (len(log.segments), 1)), "best static")
        base = _evaluate(sample, static, "best static", n_boot)
        rows.append(_row(seed, "best static vector", base, base, 0.0))
        full = None
        for variant, params in chosen.items():
            start = time.perf_counter()
            result = train(TrainConfig(method, seed=seed, params=params, validation_share=HELD_OUT), log, spec)
            seconds = time.perf_counter() - start
            evaluated = _evaluate(sample, result.policy, variant, n_boot)
            rows.append(_row(seed, variant, evaluated, base, seconds))
            full = full or evaluated  # the first variant is the method itself
            if evaluated is not full:  # what the key idea is worth: the full method over this variant, paired
                for name in ("truth", "truth_per_user"):
                    gain = paired_difference(full, evaluated, name, n_boot=max(n_boot, 200), seed=seed)
                    key = "per_request" if name == "truth" else "per_user"
                    rows[-1].update({f"full_minus_variant_{key}": gain["difference"] if gain else None,
                                     f"full_minus_variant_{key}_ci": [gain["ci_low"], gain["ci_high"]] if gain
                                     else None})
            print(f"seed {seed}: {variant}: lift per user {rows[-1]['lift_per_user']:+.2f} "
                  f"[{rows[-1]['lift_low']:+.2f}, {rows[-1]['lift_high']:+.2f}] in {seconds:.0f}s", file=sys.stderr,
                  flush=True)
    return pd.DataFrame(rows)


def _row(seed: int, variant: str, result, base, seconds: float) -> dict[str, object]:  # type: ignore[no-untyped-def]
    per_user = result.unit_terms["truth_per_user"]
    n_boot = max(result.n_boot, 200)
    lift = paired_difference(result, base, "truth_per_user", n_boot=n_boot, seed=result.seed)
    lift_request = paired_difference(result, base, "truth", n_boot=n_boot, seed=result.seed)
    own = result is base
    return {"seed": seed, "variant": variant, "truth_per_request": result.ground_truth["value"],
            "truth_per_user": float(per_user[:, 0].sum() / per_user[:, 1].sum()),
            "lift_per_request": lift_request["difference"] if lift_request and not own else 0.0,
            "lift_per_request_low": lift_request["ci_low"] if lift_request and not own else None,
            "lift_per_request_high": lift_request["ci_high"] if lift_request and not own else None,
            "lift_per_user": lift["difference"] if lift and not own else 0.0,
            "lift_low": lift["ci_low"] if lift and not own else None,
            "lift_high": lift["ci_high"] if lift and not own else None,
            "train_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted(VARIANTS), default="grade")
    parser.add_argument("--seeds", default="0,1,2,3,4,5", help="comma-separated simulator seeds (0: the demo world)")
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--n-boot", type=int, default=200)
    parser.add_argument("--variants", help="comma-separated variant names to run besides the full method "
                        "(default: all)")
    parser.add_argument("--out", help="also write the rows to this CSV")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",")] if args.variants is not None else None
    frame = ablation_study(args.method, [int(s) for s in args.seeds.split(",")], args.users, args.n_boot,
                           variants=variants)
    if args.out:
        frame.to_csv(args.out, index=False)
    if args.json:
        print(json.dumps(frame.to_dict(orient="records"), indent=1, default=float))
        return
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        print(frame.round(3).to_string(index=False))
        summary = frame.groupby("variant", sort=False).agg(
            truth_per_user=("truth_per_user", "mean"), lift_per_user=("lift_per_user", "mean"),
            seeds_above_zero=("lift_low", lambda s: int((s > 0).sum())), train_seconds=("train_seconds", "mean"))
        print(summary.round(3).to_string())


if __name__ == "__main__":
    main()
