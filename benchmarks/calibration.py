"""Are the estimators and their verdicts right? A study over many simulator seeds against the truth.

For each seed a small simulator log is generated; each target policy (near, mid and far from the logging
policy, fixed vectors and stochastic policies) is evaluated, and every estimator's interval is compared
with the simulator's truth for that log (the policy run online with the log's random numbers). The summary
gives, per target and estimator: bias, RMSE, interval coverage, how often the verdict said
`trustworthy`, and the coverage of the intervals that were called trustworthy; plus E[rho] under the
logging policy for the kernel of each fixed target (Monte Carlo over fresh logging draws).

    python -m benchmarks.calibration [--seeds 20] [--users 400] [--logging dirichlet|mixed|estimated]
                                     [--outcome-model auto|linear|learned] [--streamed] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import torch

from mtf_core.diagnostics import TRUSTWORTHY
from mtf_core.evaluate import OUTCOME_MODELS, evaluate_policy, policy_for_truth, prepare, target_actions
from mtf_core.evaluate.ratios import dirichlet_kernel_logp, log_interior
from mtf_core.policies.static import LoggingPolicy, parse_static
from mtf_core.reward import RewardSpec
from mtf_core.simulate import SimConfig, generate, logging_alpha
from mtf_core.store import LogData, load_log

__all__ = ["FIXED_TARGETS", "run_study", "summarise", "kernel_mass"]

FIXED_TARGETS = {
    "fixed: logging mean": "click=0.4,like=0.15,finish=0.15,share=0.1,watch_time=0.2",
    "fixed: mid-simplex": "click=0.2,like=0.2,finish=0.2,share=0.2,watch_time=0.2",
    "fixed: near a vertex": "click=0.92,like=0.02,finish=0.02,share=0.02,watch_time=0.02",
    "fixed: far": "click=0.1,like=0.3,finish=0.3,share=0.2,watch_time=0.1",
    "fixed: share-heavy": "click=0.05,like=0.15,finish=0.1,share=0.6,watch_time=0.1",
}
# Stochastic targets: Dirichlets around a mean, with a total concentration (the logging policy's is 10).
STOCHASTIC_TARGETS = {
    "stochastic: sharper logging": ((0.4, 0.15, 0.15, 0.1, 0.2), 20.0),
    "stochastic: shifted": ((0.25, 0.2, 0.25, 0.15, 0.15), 20.0),
}


def _stochastic(log: LogData, mean: tuple[float, ...], total: float) -> LoggingPolicy:
    alpha = np.tile(np.asarray(mean) * total, (len(log.segments), 1))
    return LoggingPolicy(log.task_names, log.segments, alpha)


LOGGING = ("dirichlet", "mixed", "estimated", "reordered", "scrolled", "appeal")
"""How the study's logs were logged: every request with its density; production traffic plus a 20%
exploration share with its density (the mixture correction); Dirichlet logging with `logging_logp` dropped
(propensities estimated from the logged weights); Dirichlet logging in a feed where a later stage reorders
half the slates after the fusion (`SimConfig.later_stage_share`, the truth under the same stage); or Dirichlet
logging where half the users stop scrolling early, so requests show 1 to 6 candidates
(`SimConfig.short_scroll_share`, the truth under the same users); or Dirichlet logging in a cascade feed,
where every user goes on past a slot with the finish rate of the item there, so that how deep they see
depends on the ranking (`SimConfig.scroll_by_appeal`; 2 slots seen on average, as in KuaiRand's sample)."""
REORDERED_SHARE = 0.5
SCROLLED_SHARE = 0.5
APPEAL_SHARE, APPEAL_FLOOR = 1.0, 0.0


def _log(seed: int, n_users: int, folder: Path, logging: str = "dirichlet") -> LogData:
    path = folder / f"seed{seed}_{n_users}_{logging}.duckdb"
    if not path.exists():
        mode = "mixed" if logging == "mixed" else "dirichlet"
        later = REORDERED_SHARE if logging == "reordered" else 0.0
        scrolled = {"scrolled": SCROLLED_SHARE, "appeal": APPEAL_SHARE}.get(logging, 0.0)
        generate(SimConfig(n_users=n_users, seed=seed, logging_mode=mode, exploration_share=0.2,
                           later_stage_share=later, short_scroll_share=scrolled,
                           scroll_by_appeal=logging == "appeal", scroll_floor=APPEAL_FLOOR), str(path))
        if logging == "estimated":
            con = duckdb.connect(str(path))
            try:
                con.execute("UPDATE requests SET logging_logp = NULL")
            finally:
                con.close()
    return load_log(path)


def run_study(seeds: range | list[int], n_users: int = 400, n_boot: int = 200, folder: Path | None = None,
              logging: str = "dirichlet", targets: list[str] | None = None, outcome_model: str = "auto",
              streamed: bool = False) -> pd.DataFrame:
    """One row per (seed, target, estimator): the estimate, its interval, verdict, diagnostics and truth.
    `targets`: a subset of the target names (default: all); `outcome_model`: DM's and DR's model. With
    `streamed`, every target is also evaluated streamed on the log as a 4-shard lake (`evaluate --stream`,
    with `--stochastic` for the stochastic ones: IPS, SNIPS, NCIS, and DM and DR on the linear model, with
    the streamed verdicts; the fixed targets with their kernel chosen over the whole lake), as targets
    named "... (streamed)", against the same truth."""
    chosen = None if targets is None else set(targets)
    folder = Path(folder or tempfile.mkdtemp(prefix="mtf-calibration-"))
    rows = []
    for seed in seeds:
        log = _log(seed, n_users, folder, logging)
        ctx = prepare(log, RewardSpec.default(log.task_names), outcome_model=outcome_model)
        candidates: dict[str, tuple[object, bool]] = {
            name: (parse_static(text, log.task_names, log.segments), False) for name, text in FIXED_TARGETS.items()}
        candidates.update({name: (_stochastic(log, mean, total), True)
                           for name, (mean, total) in STOCHASTIC_TARGETS.items()})
        for name, (policy, stochastic) in candidates.items():
            if chosen is not None and name not in chosen:
                continue
            actions = target_actions(policy, log, name, stochastic=stochastic, seed=seed)  # type: ignore[arg-type]
            result = evaluate_policy(ctx, actions, n_boot=n_boot, seed=seed,
                                     truth_policy=policy_for_truth(policy, stochastic))  # type: ignore[arg-type]
            truth = result.ground_truth["value"]  # type: ignore[index]
            d, info = result.diagnostics or {}, result.ratio_info or {}
            for row in result.ope:
                if row["segment"] is None:
                    rows.append({"seed": seed, "logging": logging, "model": ctx.direct_view.name, "target": name,
                                 "estimator": row["estimator"], "value": row["value"],
                                 "ci_low": row["ci_low"], "ci_high": row["ci_high"], "verdict": row.get("verdict"),
                                 "truth": truth, "ess": d.get("ess"), "ess_share": d.get("ess_share"),
                                 "mean_ratio": d.get("mean_ratio"), "support_coverage": d.get("support_coverage"),
                                 "depth_shift": (d.get("depth_shift") or {}).get("shift"),
                                 "concentration": info.get("concentration"),
                                 "smoothing_bias": info.get("smoothing_bias"),
                                 "standard_error": info.get("standard_error")})
            if streamed:
                rows += _streamed_rows(log, folder / f"lake_seed{seed}", policy, name, n_boot, seed, truth, logging,
                                       stochastic)
    frame = pd.DataFrame(rows)
    frame["error"] = frame["value"] - frame["truth"]
    frame["covered"] = (frame["ci_low"] <= frame["truth"]) & (frame["truth"] <= frame["ci_high"])
    return frame


def _streamed_rows(log: LogData, lake: Path, policy: object, name: str, n_boot: int, seed: int, truth: float,
                   logging: str, stochastic: bool) -> list[dict[str, object]]:
    """The study's rows of a target evaluated streamed on the log exported as a lake."""
    from mtf_core.lake import export_lake
    from mtf_core.stream import streamed_evaluation

    if not lake.exists():
        export_lake(log.path, lake, shards=4)
    result = streamed_evaluation(lake, policy, name, RewardSpec.default(log.task_names), n_boot=n_boot,  # type: ignore[arg-type]
                                 seed=seed, stochastic=stochastic)
    d, info = result.diagnostics or {}, result.ratios or {}
    return [{"seed": seed, "logging": logging, "model": "linear", "target": f"{name} (streamed)",
             "estimator": row["estimator"], "value": row["value"], "ci_low": row["ci_low"], "ci_high": row["ci_high"],
             "verdict": row.get("verdict"), "truth": truth, "ess": d.get("ess"), "ess_share": d.get("ess_share"),
             "mean_ratio": d.get("mean_ratio"), "support_coverage": d.get("support_coverage"),
             "depth_shift": (d.get("depth_shift") or {}).get("shift"), "concentration": info.get("concentration"),
             "smoothing_bias": info.get("smoothing_bias"),
             "standard_error": info.get("standard_error")}
            for row in result.ope if row["segment"] is None]


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    """Per target and estimator: bias, RMSE, coverage, share called trustworthy and their coverage."""
    def one(g: pd.DataFrame) -> pd.Series:
        trusted = g[g["verdict"] == TRUSTWORTHY]
        return pd.Series({"truth": g["truth"].mean(), "bias": g["error"].mean(),
                          "rmse": float(np.sqrt((g["error"] ** 2).mean())), "coverage": g["covered"].mean(),
                          "trustworthy": len(trusted) / len(g),
                          "coverage_when_trustworthy": trusted["covered"].mean() if len(trusted) else np.nan,
                          "verdict": g["verdict"].mode().iloc[0], "n": len(g)})
    return frame.groupby(["target", "estimator"], sort=False).apply(one, include_groups=False).reset_index()


def kernel_mass(log: LogData, concentration: float, target_text: str, n_draws: int = 200_000, seed: int = 0
                ) -> float:
    """E[rho] of a fixed target's kernel under the (first segment's) logging policy: 1 for a kernel that
    integrates to one on the simplex, 0.57 at the logging mean for the old plane-normalised Gaussian.

    E_logging[K / p_logging] = integral of K over the logging policy's support. Plain Monte Carlo over
    logging draws underestimates it where the ratio is heavy-tailed (the kernel sits where the logging
    density is thin), so it is estimated by defensive importance sampling (Hesterberg, 1995): half the
    draws from the logging policy, half from the kernel, weights K / (p_logging / 2 + K / 2) <= 2."""
    config = SimConfig.from_json(log.meta["simulator_config"])
    logging = torch.distributions.Dirichlet(torch.from_numpy(logging_alpha(config)[0]))
    target = parse_static(target_text, log.task_names, log.segments).weights[0].numpy()
    kernel = torch.distributions.Dirichlet(torch.from_numpy(1.0 + concentration * target))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        w = torch.cat([logging.sample((n_draws // 2,)), kernel.sample((n_draws - n_draws // 2,))])
    w = w.clamp(min=1e-300)
    w = (w / w.sum(-1, keepdim=True)).numpy()
    log_k = dirichlet_kernel_logp(log_interior(w), np.broadcast_to(target, w.shape), concentration)
    log_p = logging.log_prob(torch.from_numpy(w)).numpy()
    log_q = np.logaddexp(log_p, log_k) - np.log(2.0)
    return float(np.mean(np.exp(log_k - log_q)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--users", type=int, default=400)
    parser.add_argument("--n-boot", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", help="also write the per-seed rows to this CSV")
    parser.add_argument("--logging", choices=LOGGING, default="dirichlet",
                        help="logs with every density, an exploration share, no density (estimated), every "
                             "density in a feed whose later stage reorders half the slates, or every density "
                             "where half the users stop scrolling early, or every density in a cascade feed whose "
                             "users scroll on past engaging items (appeal)")
    parser.add_argument("--outcome-model", choices=OUTCOME_MODELS, default="auto", help="DM's and DR's model")
    parser.add_argument("--streamed", action="store_true",
                        help="also evaluate every target streamed, on each log as a Parquet lake")
    args = parser.parse_args()
    frame = run_study(range(args.seeds), args.users, args.n_boot, logging=args.logging,
                      outcome_model=args.outcome_model, streamed=args.streamed)
    if args.out:
        frame.to_csv(args.out, index=False)
    summary = summarise(frame)
    if args.json:
        print(json.dumps(summary.to_dict(orient="records"), indent=1, default=float))
    else:
        with pd.option_context("display.width", 200, "display.max_rows", 200):
            print(summary.round(3).to_string(index=False))


if __name__ == "__main__":
    main()
