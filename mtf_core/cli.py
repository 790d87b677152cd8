"""`python -m mtf_core ...`: generate, import, import-kuairand, score, export-parquet, validate, info, train,
evaluate, compare, bench (DESIGN §6).

Bad input raises LogError, which becomes one line on stderr and its exit code, never a traceback.
With --json, stdout holds one JSON document and nothing else; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from mtf_core.errors import EXIT_OK, EXIT_PROBLEMS, EXIT_UNUSABLE, LogError, is_disk_full

MAX_USERS = 100_000  # generate holds the whole log in memory: about 20 requests of 20 candidates per user

__all__ = ["main", "build_parser"]


def _progress_bar(desc: str, enabled: bool = True) -> tuple[Callable[[float], None], Callable[[], None]]:
    """A tqdm bar on stderr driven by fractions in [0, 1]."""
    from tqdm import tqdm

    bar = tqdm(total=100, desc=desc, file=sys.stderr, disable=not enabled or not sys.stderr.isatty(),
               bar_format="{l_bar}{bar}| {elapsed}")

    def update(fraction: float) -> None:
        bar.n = int(round(100 * min(max(fraction, 0.0), 1.0)))
        bar.refresh()

    return update, bar.close


def _strict(obj: object) -> object:
    """The object with every non-finite float as null: `--json` output is strict JSON (no bare NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy scalars
        return _strict(obj.item())
    return obj


def _emit(obj: object) -> None:
    sys.stdout.write(json.dumps(_strict(obj), indent=2, default=str, allow_nan=False) + "\n")


def cmd_generate(args: argparse.Namespace) -> int:
    from mtf_core.simulate import SimConfig, generate

    if not 1 <= args.users <= MAX_USERS or not 2 <= args.candidates <= 1000 or not 1 <= args.shown <= args.candidates:
        raise LogError(f"generate: need 1 <= --users <= {MAX_USERS:,} (about 20 requests each, held in memory), "
                       "2 <= --candidates <= 1000 and 1 <= --shown <= --candidates")
    if not 0 <= args.seed < 2**63:
        raise LogError("generate: --seed must lie in [0, 2**63)")
    if (args.scroll_by_appeal or args.scroll_floor is not None) and not (args.scroll_by_appeal
                                                                         and args.short_scroll_share > 0):
        raise LogError("generate: --scroll-by-appeal (and its --scroll-floor) says how the users of "
                       "--short-scroll-share scroll; give both --scroll-by-appeal and a share above 0")
    try:
        config = SimConfig(n_users=args.users, seed=args.seed, n_candidates=args.candidates, n_shown=args.shown,
                           logging_concentration=args.concentration, logging_mode=args.logging,
                           exploration_share=args.exploration_share, per_item_share=args.per_item_share,
                           later_stage_share=args.later_stage_share, short_scroll_share=args.short_scroll_share,
                           scroll_by_appeal=args.scroll_by_appeal,
                           **({} if args.scroll_floor is None else {"scroll_floor": args.scroll_floor}))
    except ValueError as exc:
        raise LogError(f"generate: {exc} (--exploration-share must lie in (0, 1], --per-item-share, "
                       "--later-stage-share, --short-scroll-share and --scroll-floor in [0, 1], --short-scroll-share "
                       "needs --shown >= 2, --concentration > 0)") from exc
    update, close = _progress_bar("simulating")
    start = time.perf_counter()
    try:
        out = generate(config, args.out, force=args.force, progress=update)
    finally:
        close()
    from mtf_core.store import log_info

    info = log_info(out)
    tables = info["tables"]
    print(f"wrote {out}: {tables['requests']} requests, {tables['impressions']} impressions, "  # type: ignore[index]
          f"{tables['users']} users in {time.perf_counter() - start:.1f}s")  # type: ignore[index]
    return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    from mtf_core.store import import_log, read_mapping

    sources = {t: getattr(args, t) for t in ("users", "requests", "impressions", "items", "sessions")
               if getattr(args, t)}
    out = import_log(sources, args.out, read_mapping(args.mapping), args.tasks, force=args.force)
    problems = _validation_problems(out)
    print(f"wrote {out}")
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    return EXIT_PROBLEMS if problems else EXIT_OK


def _validation_problems(path: str | os.PathLike[str]) -> list:  # type: ignore[type-arg]
    from mtf_core.schema import validate
    from mtf_core.store import open_log

    con = open_log(path)
    try:
        return validate(con)
    finally:
        con.close()


def cmd_import_kuairand(args: argparse.Namespace) -> int:
    from mtf_core.kuairand import KuaiRandConfig, import_kuairand
    from mtf_core.scoring import ScoringConfig, quality_lines

    config = KuaiRandConfig(args.segment_by, args.session_gap_minutes, args.slate_size, args.min_positives,
                            args.task_scale, scoring=ScoringConfig(seed=args.seed))
    say = (lambda msg: print(msg, file=sys.stderr)) if not args.json else None
    report = import_kuairand(args.log, args.users, args.videos, args.out, args.train_log or (), config,
                             force=args.force, progress=say)
    problems = _validation_problems(report.out)
    if args.json:
        _emit({**report.to_json(), "problems": [str(p) for p in problems]})
        return EXIT_PROBLEMS if problems else EXIT_OK
    print(f"wrote {report.out}: {report.n_impressions:,} impressions in {report.n_requests:,} requests, "
          f"{report.n_sessions:,} sessions, {report.n_users:,} users, {report.n_items:,} videos "
          f"({'random exposure' if report.random_exposure else 'not random exposure'}; no fusion weights logged)")
    print("segments: " + ", ".join(f"{s} ({n} users)" for s, n in report.segments.items()))
    for task in report.tasks:
        threshold = f"; GAUC threshold {task['threshold']:.3g}" if task["threshold"] is not None else ""
        print(f"task {task['name']} ({task['kind']}): {task['description']}{threshold}")
    for line in report.dropped:
        print(f"dropped task {line}")
    print(f"scores: {report.scoring['setup']}")
    for line in quality_lines(report.scoring["tasks"]):  # type: ignore[arg-type]
        print(f"  {line}")
    for note in report.notes:
        print(f"note: {note}")
    print(f"licence: CC BY-SA 4.0 (KuaiRand); the attribution is in the log's meta and in {report.out}.NOTICE.md")
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    return EXIT_PROBLEMS if problems else EXIT_OK


def cmd_score(args: argparse.Namespace) -> int:
    from mtf_core.scoring import ScoringConfig, quality_lines, score_log

    config = ScoringConfig(folds=args.folds, fold_by=args.fold_by, seed=args.seed)
    result = score_log(args.log, args.out, config, force=args.force, train_log=args.train_log)
    problems = _validation_problems(args.out)
    if args.json:
        _emit({"out": args.out, **result.to_json(), "problems": [str(p) for p in problems]})
        return EXIT_PROBLEMS if problems else EXIT_OK
    print(f"wrote {args.out}: scores {result.setup}")
    for line in quality_lines(result.to_json()["tasks"]):  # type: ignore[arg-type]
        print(f"  {line}")
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    return EXIT_PROBLEMS if problems else EXIT_OK


def cmd_export_parquet(args: argparse.Namespace) -> int:
    from mtf_core.lake import export_lake, lake_files

    out = export_lake(args.log, args.out, args.shards, force=args.force)
    files = {t: len(lake_files(out, t)) for t in sorted(p.name for p in out.iterdir())}
    if args.json:
        _emit({"out": str(out), "shards": args.shards, "files": files})
        return EXIT_OK
    print(f"wrote {out}: " + ", ".join(f"{t} {n} file{'s' if n != 1 else ''}" for t, n in files.items())
          + f"; every command reads it as a log (python -m mtf_core info {out})")
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    import duckdb

    from mtf_core.schema import validate
    from mtf_core.store import open_log

    con = open_log(args.log)
    try:
        problems = validate(con)
    except duckdb.Error as exc:
        raise LogError(f"{args.log}: cannot be validated ({str(exc).splitlines()[0]})") from exc
    finally:
        con.close()
    if args.json:
        _emit({"log": args.log, "ok": not problems, "problems": [
            {"table": p.table, "column": p.column, "kind": p.kind, "message": p.message, "examples": list(p.examples)}
            for p in problems]})
    elif problems:
        print(f"{args.log}: {len(problems)} problem(s)")
        for p in problems:
            print(f"  {p}")
    else:
        print(f"{args.log}: valid")
    return EXIT_PROBLEMS if problems else EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    from mtf_core.profile import depth_text
    from mtf_core.store import log_info

    info = log_info(args.log)
    info["profile"] = _profile(args.log)
    if args.json:
        _emit(info)
        return EXIT_OK
    print(f"log: {args.log}")
    for table, n in info["tables"].items():  # type: ignore[attr-defined]
        print(f"  {table:<12} {n:>10} rows")
    for key in ("tasks", "segments", "time_range"):
        if key in info:
            print(f"{key}: {info[key]}")
    meta = info.get("meta", {})
    if meta:
        print(f"source: {meta.get('source')}  created: {meta.get('created_at')}")  # type: ignore[union-attr]
        if meta.get("numbered_ids"):  # type: ignore[union-attr]
            print(f"ids numbered at import (they were text): {meta['numbered_ids']}; "  # type: ignore[index]
                  "their original keys are in table id_keys")
    profile = info["profile"]
    if "mode" in profile:  # type: ignore[operator]
        print(f"weights logged: {profile['mode']}; supports: {', '.join(profile['supports'])}")  # type: ignore[index]
        print(f"  {profile['explanation']}")  # type: ignore[index]
        if profile.get("fusion_agreement") is not None:  # type: ignore[union-attr]
            print(f"  the logged weights' fusion reproduces the shown ranking in {profile['fusion_agreement']:.1%} "  # type: ignore[index]
                  f"of {profile['fusion_checked']:,} requests")  # type: ignore[index]
        print("  " + depth_text(profile["shown_mean"], profile["shown_min"], profile["shown_max"]))  # type: ignore[index,arg-type]
    else:
        print(f"weights logged: unknown ({profile['error']})")  # type: ignore[index]
    return EXIT_OK


def _profile(path: str) -> dict[str, object]:
    """The log's profile (how its weights were logged), or why it cannot be read."""
    from mtf_core.profile import profile_log
    from mtf_core.store import load_log

    try:
        return profile_log(load_log(path)).to_json()
    except LogError as exc:
        return {"error": str(exc)}


def cmd_abtest(args: argparse.Namespace) -> int:
    from mtf_core.abtest import ab_readout
    from mtf_core.evaluate import prepare

    log, spec = _evaluation_inputs(args)
    ctx = prepare(log, spec)
    if ctx.profile.mode != "A/B buckets":
        raise LogError(f"{args.log}: not an A/B test log (its weights are logged as: {ctx.profile.mode}); an A/B "
                       f"read-out needs a few fixed vectors per segment", EXIT_PROBLEMS)
    table = ab_readout(ctx, n_boot=args.n_boot, seed=args.seed)
    if args.json:
        _emit({"log": args.log, "profile": ctx.profile.to_json(), "arms": table.to_dict("records")})
        return EXIT_OK
    print(f"A/B read-out of {args.log}: mean composite reward per request on each arm's own traffic, 95% intervals "
          "over users; difference from the control (the arm with the most users)")
    for row in table.to_dict("records"):
        diff = ("control" if row["control"] else
                f"{row['difference']:+.4f} [{row['difference_low']:+.4f}, {row['difference_high']:+.4f}]")
        print(f"  {row['segment']:<10} {row['arm']:<60} {row['requests']:>7} req {row['users']:>6} users  "
              f"{row['value']:.4f} [{row['ci_low']:.4f}, {row['ci_high']:.4f}]  {diff}")
    shared = table.groupby("segment")["users_in_several_arms"].first()
    if shared.sum():
        print(f"warning: {int(shared.sum())} users met several arms: the test was not randomised by user, so the "
              "arms' traffic shares users", file=sys.stderr)
    return EXIT_OK


def _evaluation_inputs(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from mtf_core.evaluate import check_log_for_evaluation
    from mtf_core.reward import load_reward_spec
    from mtf_core.store import load_log

    if getattr(args, "k", None) is not None and args.k < 1:
        raise LogError(f"--k {args.k}: the NDCG cut-off must be at least 1")
    if not 10 <= getattr(args, "n_boot", 10) <= 100_000:
        raise LogError(f"--n-boot {args.n_boot}: use between 10 and 100,000 bootstrap resamples (200 or more for "
                       "intervals you report)")
    log = load_log(args.log)
    check_log_for_evaluation(log)
    return log, load_reward_spec(args.reward, log.task_names)


def _evaluation_sample(args: argparse.Namespace, log, spec, policies: list[str]):  # type: ignore[no-untyped-def]
    """`--sample`: auto holds out what the evaluated runs held out from training, else all requests."""
    from mtf_core.evaluate import evaluation_sample
    from mtf_core.runs import RunStore

    share = None
    if args.sample == "held-out":
        share = RunStore(args.runs).held_out_share(policies, log) or 0.2
    elif args.sample == "auto":
        share = RunStore(args.runs).held_out_share(policies, log)
    return evaluation_sample(log, spec, share, args.outcome_model)


def _evaluate_one(sample, text: str, args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from mtf_core.evaluate import evaluate_policy, policy_for_truth, target_actions
    from mtf_core.policies.resolve import resolve_policy

    ctx = sample.ctx
    policy, label = resolve_policy(text, ctx.log, args.runs)
    stochastic = bool(getattr(args, "stochastic", False))
    actions = target_actions(policy, ctx.log, label, stochastic=stochastic, seed=args.seed)
    truth_fn = None if policy is None else policy_for_truth(policy, actions.stochastic)
    return evaluate_policy(ctx, actions, k=args.k, n_boot=args.n_boot, seed=args.seed, truth_policy=truth_fn,
                           sample=sample.description)


def _evaluate_oracle(sample, args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The two yardsticks found against the truth: the best vector per segment and the best global vector."""
    from mtf_core.headroom import evaluate_oracle, evaluate_static_oracle

    if sample.ctx.sim_config is None:
        raise LogError(f"{args.log}: --oracle needs a simulator log (the oracle is found against its truth)")
    print("finding the oracles against the truth (best vector per segment, best global vector)...", file=sys.stderr)
    options = dict(n_boot=args.n_boot, seed=args.seed, k=args.k, sample=sample.description)
    return [evaluate_oracle(sample.ctx, **options), evaluate_static_oracle(sample.ctx, **options)]


def _ci(row: dict[str, object]) -> str:
    v, lo, hi = row.get("value"), row.get("ci_low"), row.get("ci_high")
    if v is None:
        return "n/a"
    return f"{v:.4f} [{lo:.4f}, {hi:.4f}]" if lo is not None and hi is not None else f"{v:.4f}"


def _evaluate_streamed(args: argparse.Namespace) -> int:
    from mtf_core.diagnostics import overlap_summary
    from mtf_core.policies.resolve import resolve_policy
    from mtf_core.reward import load_reward_spec
    from mtf_core.stream import policy_view, streamed_evaluation

    if args.policy.strip() == "logging":
        raise LogError("--stream evaluates a policy's own rankings; the logging policy's figures are the log's "
                       "(evaluate without --stream)")
    view = policy_view(args.log)
    policy, label = resolve_policy(args.policy, view, args.runs)
    assert policy is not None
    update, close = _progress_bar("streaming", not args.json)
    try:
        result = streamed_evaluation(args.log, policy, label, load_reward_spec(args.reward, view.task_names),
                                     args.k, args.n_boot, args.seed, lambda f, msg: update(f), args.engine,
                                     args.address, args.stochastic)
    finally:
        close()
    if args.json:
        _emit(result.to_json())
        return EXIT_OK
    print(f"policy {result.policy} on {result.log}: {result.n_requests:,} requests of {result.n_users:,} users, "
          f"streamed over {result.n_shards} shards ({result.engine}) in {result.seconds:.1f}s")
    for row in result.ope:
        if row["segment"] is None:
            print(f"  {row['estimator']:<20} {_ci(row):<34} {row.get('verdict') or ''}")
    for row in result.metrics:
        if row["segment"] is None:
            print(f"  {row['name'] + ' ' + (row['task'] or 'reward'):<20} {_ci(row)}")
    if result.diagnostics:
        print(f"  overlap: {overlap_summary(result.diagnostics)}")
    for note in result.notes:
        print(f"  note: {note}")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mtf_core.diagnostics import overlap_summary

    if args.stream:
        return _evaluate_streamed(args)
    if args.engine != "local" or args.address:
        raise LogError("--engine and --address apply to --stream (a Parquet lake read shard by shard)")
    log, spec = _evaluation_inputs(args)
    result = _evaluate_one(_evaluation_sample(args, log, spec, [args.policy]), args.policy, args)
    if args.json:
        _emit(result.to_json())
        return EXIT_OK
    print(f"policy {result.policy} on {result.log}: {result.sample}")
    if result.ground_truth:
        print(f"  simulator truth      {_ci(result.ground_truth)}")
    for row in result.ope:
        if row["segment"] is None:
            rests_on = "; ".join(f"{k}: {row[k]}" for k in ("propensities", "model") if row.get(k))
            print(f"  {row['estimator']:<20} {_ci(row):<34} {row.get('verdict') or '':<26} {rests_on}")
    for row in result.metrics:
        if row["segment"] is None:
            name = f"{row['name']} {row['task'] or 'reward'}"
            print(f"  {name:<20} {_ci(row)}")
    if result.diagnostics:
        print(f"  overlap: {overlap_summary(result.diagnostics)}")
    for note in result.notes:
        print(f"  note: {note}")
    return EXIT_OK


def _short_verdict(figure: dict[str, object]) -> str:
    verdict = figure.get("verdict")
    return {"trustworthy": "ok", "use with care": "care", "not supported by this log": "UNSUPPORTED"}.get(
        str(verdict), "") if verdict else ""


def _headline(result) -> dict[str, dict[str, object]]:  # type: ignore[no-untyped-def]
    rows = {"truth": result.ground_truth, "truth_per_user": result.ground_truth["per_user"]} \
        if result.ground_truth else {}
    rows.update({r["estimator"]: r for r in result.ope if r["segment"] is None})
    rows.update({f"{r['name']}:{r['task'] or 'reward'}": r for r in result.metrics
                 if r["segment"] is None and r["name"].startswith("ndcg")})
    return rows


def _train_all(args: argparse.Namespace, log, spec) -> dict[str, tuple[str, float]]:  # type: ignore[no-untyped-def]
    """Train each algorithm of `--algo` with its defaults into the run store: policy ref -> (algo, seconds)."""
    from mtf_core.policies.train import ALGORITHMS, NEEDS_LOGGED_WEIGHTS, TrainConfig
    from mtf_core.runs import RunStore

    algos = list(ALGORITHMS) if args.algo == "all" else [a.strip() for a in args.algo.split(",") if a.strip()]
    if args.algo == "all" and not log.weights_known:
        skipped = [a for a in algos if a in NEEDS_LOGGED_WEIGHTS]
        algos = [a for a in algos if a not in NEEDS_LOGGED_WEIGHTS]
        print(f"skipping {', '.join(skipped)}: they learn from the logged fusion weights, which this log does not "
              "record", file=sys.stderr)
    store, trained = RunStore(args.runs), {}
    for algo in algos:
        params = {"per_segment": True} if algo == "cem" else {}
        run_id, result = _train_into_store(store, TrainConfig(algo, args.seed, params), log, spec, f"compare-{algo}")
        trained[f"run:{run_id}"] = (algo, result.seconds)
        print(f"trained {algo}: run {run_id} in {result.seconds:.1f}s", file=sys.stderr)
    return trained


def _algo_table(table, trained: dict[str, tuple[str, float]]) -> list[dict[str, object]]:  # type: ignore[no-untyped-def]
    rows = []
    for r in table:
        figs = r["figures"]
        ndcg = next((v for k, v in figs.items() if k.startswith("ndcg@") and k.endswith(":reward")), None)
        algo, seconds = trained.get(r["policy"], (r["policy"], None))
        rows.append({"policy": algo, "train_seconds": seconds, "ndcg:reward": ndcg,
                     **{k: figs.get(k) for k in ("truth", "truth_per_user", "snips", "dr", "dm")},
                     **({k: r[k] for k in ("share_of_headroom", "lift_over_best_static") if k in r})})
    return rows


def cmd_compare(args: argparse.Namespace) -> int:
    from mtf_core.diagnostics import overlap_summary
    from mtf_core.runs import RunStore

    log, spec = _evaluation_inputs(args)
    trained = _train_all(args, log, spec) if args.algo else {}
    explicit = bool(args.policy) or bool(trained)
    policies = list(args.policy or []) + (["logging", *trained] if trained else [])
    if not explicit:
        policies = ["logging"] + [f"run:{r.run_id}" for r in RunStore(args.runs).list_runs()
                                  if r.status == "finished" and r.data_fingerprint == log.fingerprint]
    sample = _evaluation_sample(args, log, spec, policies)
    print(f"evaluating on {sample.description}", file=sys.stderr)
    results = []
    for p in policies:
        try:
            results.append(_evaluate_one(sample, p, args))
        except LogError as exc:
            if explicit:
                raise
            print(f"warning: skipping {p}: {exc}", file=sys.stderr)
    if args.oracle:
        results += _evaluate_oracle(sample, args)
    from mtf_core.compare import add_lifts, headroom_shares, lifts_over
    from mtf_core.headroom import ORACLE_LABEL, STATIC_ORACLE_LABEL
    from mtf_core.selection import CRITERIA, regret, select

    table = [{"policy": r.policy, "figures": _headline(r)} for r in results]
    add_lifts(table, results)
    if args.oracle:
        shares = headroom_shares(results, ORACLE_LABEL)
        over_static = lifts_over(results, STATIC_ORACLE_LABEL, "truth_per_user")
        for row in table:
            row["share_of_headroom"] = shares.get(row["policy"])  # type: ignore[arg-type]
            row["lift_over_best_static"] = over_static.get(row["policy"])  # type: ignore[arg-type]

    selection = select(results, args.select)
    regrets = {c: regret(results, select(results, c)["chosen"]) for c in CRITERIA}
    if trained:
        return _print_algo_table(args, _algo_table(table, trained), selection, regrets, results[0].sample)
    if args.json:
        _emit({"log": args.log, "sample": results[0].sample, "baseline": table[0]["policy"], "policies": table,
               "selection": {k: selection[k] for k in ("criterion", "chosen", "ranking", "reason")},
               "regret": regrets, "results": [r.to_json() for r in results]})
        return EXIT_OK
    names = list(table[0]["figures"])
    print(f"{'figure':<22}" + "".join(f"{row['policy'][:34]:>36}" for row in table))
    for name in names:
        cells = []
        for row in table:
            fig = row["figures"].get(name, {})
            if fig.get("value") is None:
                cells.append(f"{'n/a':>36}")
                continue
            lift = f" {fig.get('lift', 0):+.1%}{'*' if fig.get('separated') else ''}" if row is not table[0] else ""
            cells.append(f"{fig['value']:>10.4f} [{fig['ci_low']:.3f},{fig['ci_high']:.3f}]{lift:>9}")
        print(f"{name:<22}" + "".join(f"{c:>36}" for c in cells))
    print("lift over the first policy: for estimates and the truth a paired difference (the same users resampled "
          "for both; * = its 95% interval excludes 0); for re-ranking metrics * = the separate 95% intervals do "
          "not overlap")
    for r in results:
        if r.diagnostics:
            print(f"overlap {r.policy}: {overlap_summary(r.diagnostics)}")
    print(f"choice by {args.select}: {selection['reason']}")
    if any(v is not None for v in regrets.values()):
        print("regret against the simulator's truth: " + ", ".join(
            f"{c}={v:.4f}" for c, v in regrets.items() if v is not None))
    if args.oracle:
        shares = ", ".join(f"{row['policy']}={_share(row.get('share_of_headroom'))}" for row in table)
        print(f"share of the oracle's headroom captured, (per-user truth - logging) / (oracle - logging): {shares}")
        over = ", ".join(f"{row['policy']}={_paired(row.get('lift_over_best_static'))}" for row in table)
        print(f"per-user truth over the best global vector (paired): {over}")
    return EXIT_OK


def _share(value: object) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _print_algo_table(args: argparse.Namespace, rows: list[dict[str, object]], selection: dict[str, object],
                      regrets: dict[str, float | None], sample: str) -> int:
    if args.json:
        _emit({"log": args.log, "sample": sample, "algorithms": rows, "selection": selection, "regret": regrets})
        return EXIT_OK
    columns = ("truth", "snips", "dr", "dm")
    print(f"on {sample}; lift: paired difference over the logging policy [95% CI]")
    print(f"{'policy':<12}{'train s':>9}  " + "".join(f"{k.upper() + ' [95% CI] verdict':<44}" for k in columns)
          + f"{'truth lift [95% CI]':<30}{'per-user truth lift':<30}{'DR lift':<30}{'NDCG reward':<13}"
          + (f"{'share of headroom':<19}per-user lift over the best global vector" if args.oracle else ""))
    for row in rows:
        cells = [f"{_ci(row[k])} {_short_verdict(row[k])}" if row.get(k) else "n/a" for k in columns]
        lifts = [_paired(row.get(k)) for k in ("truth", "truth_per_user", "dr")]
        secs = f"{row['train_seconds']:.1f}" if row.get("train_seconds") is not None else "-"
        ndcg = f"{row['ndcg:reward']['value']:.3f}" if row.get("ndcg:reward") else "n/a"
        print(f"{row['policy']:<12}{secs:>9}  " + "".join(f"{c:<44}" for c in cells)
              + "".join(f"{c:<30}" for c in lifts) + f"{ndcg:<13}"
              + (f"{_share(row.get('share_of_headroom')):<19}{_paired(row.get('lift_over_best_static'))}"
                 if args.oracle else ""))
    print(f"choice by {args.select}: {selection['reason']}")
    return EXIT_OK


def _paired(figure: dict[str, object] | None) -> str:
    if not figure or not figure.get("paired"):
        return "-"
    low, high = figure["difference_ci"]  # type: ignore[misc]
    return f"{figure['difference']:+.3f} [{low:+.3f}, {high:+.3f}]"


def cmd_headroom(args: argparse.Namespace) -> int:
    from mtf_core.evaluate import prepare
    from mtf_core.headroom import headroom

    log, spec = _evaluation_inputs(args)
    if not log.is_simulated:
        raise LogError(f"{args.log}: headroom needs a simulator log (the oracles are found against its truth)")
    print(f"searching {args.candidates} candidate vectors and their refinements against the truth...",
          file=sys.stderr)
    result = headroom(prepare(log, spec), n_candidates=args.candidates, n_boot=args.n_boot, seed=args.seed)
    if args.json:
        _emit({"log": args.log, **result.to_json()})
        return EXIT_OK
    print(f"{'oracle':<28}{'chosen for':<12}{'per request [95% CI]':<30}per user over the horizon [95% CI]")
    for row in result.rows:
        low, high = row["per_request_ci"]
        ulow, uhigh = row["per_user_ci"]
        print(f"{row['oracle']:<28}{row['chosen_for']:<12}{row['per_request']:.3f} [{low:.3f}, {high:.3f}]"
              f"{'':<6}{row['per_user']:.1f} [{ulow:.1f}, {uhigh:.1f}]")
    sign = lambda k: "" if k.startswith("myopic") else "+"  # noqa: E731 (a loss reads without a sign)
    gap = {k: f"{v:{sign(k)}.1%} [{result.gap_intervals[k][0]:{sign(k)}.1%}, {result.gap_intervals[k][1]:{sign(k)}.1%}]"
           for k, v in result.gaps.items()}
    print("gaps, per-user value over the horizon (paired 95% intervals over users):")
    print(f"  best global over logging: {gap['best_global_over_logging_share']} of logging")
    print(f"  per segment over global: {gap['per_segment_over_global_share_of_logging']} of logging")
    print(f"  feature-conditioned over per segment: {gap['features_over_per_segment_share_of_logging']} of logging")
    print(f"  myopic choice (best for immediate reward) loses {gap['myopic_loss_share_of_long_term']} of the best "
          "long-term vector's value")
    print(f"Spearman(immediate, long-term) over {result.n_candidates} vectors: {result.spearman:.3f}")
    for name, dm in result.dm_error.items():
        if isinstance(dm, dict):
            print(f"{name} direct model on the farthest third of the candidates: mean absolute error "
                  f"{dm['mean_absolute_error']:.3f}; worst {dm['dm']:.3f} vs truth {dm['truth']:.3f} "
                  f"({dm['relative_error']:.1%} error)")
    if "learned_over_linear" in result.dm_error:
        print(f"learned model's error as a share of the linear model's: {result.dm_error['learned_over_linear']:.0%}")
    return EXIT_OK


def _log_command(sub: "argparse._SubParsersAction[argparse.ArgumentParser]", name: str, help_text: str,
                 func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    """A subcommand on one log with a reward, bootstrap intervals, a seed and JSON output."""
    p = sub.add_parser(name, help=help_text)
    p.add_argument("log")
    p.add_argument("--reward", help="RewardSpec JSON (default: equal normalised signals + stickiness)")
    p.add_argument("--n-boot", type=int, default=500, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mtf_core", description="MTF Lab: multi-task fusion policies")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="simulate a session log (the embedded default data)")
    p.add_argument("--out", required=True, help="DuckDB file to write")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--candidates", type=int, default=20, help="candidates per request (N)")
    p.add_argument("--shown", type=int, default=6, help="items shown per request (L)")
    p.add_argument("--concentration", type=float, default=10.0, help="logging Dirichlet concentration")
    p.add_argument("--logging", choices=["dirichlet", "deterministic", "buckets", "mixed"], default="dirichlet",
                   help="how the logged weights were chosen: every request explores (known density), one production "
                        "vector per segment, an A/B test of fixed vectors, or production plus an exploration share")
    p.add_argument("--exploration-share", type=float, default=0.1,
                   help="with --logging mixed: the share of requests drawn from the exploration Dirichlet")
    p.add_argument("--per-item-share", type=float, default=0.0,
                   help="share of requests whose candidates each get their own weights (logged as iw_* columns)")
    p.add_argument("--later-stage-share", type=float, default=0.0,
                   help="share of requests whose shown slate a later stage reorders after the fusion (the most "
                        "popular shown item moved to the top), under every policy")
    p.add_argument("--short-scroll-share", type=float, default=0.0,
                   help="share of requests whose user stops scrolling early (sees the top 1..shown-1 slots), "
                        "under every policy")
    p.add_argument("--scroll-by-appeal", action="store_true",
                   help="with --short-scroll-share: those users go on past each slot with a probability that "
                        "grows with the finish rate of the item there, so how deep they see depends on the ranking")
    p.add_argument("--scroll-floor", type=float, default=None,
                   help="with --scroll-by-appeal: the chance of going on past an item nobody finishes (past an item "
                        "with finish rate f: floor + (1 - floor) * f; default 0.5)")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("import", help="build a log from CSV/Parquet files, one per table")
    for table in ("users", "requests", "impressions"):
        p.add_argument(f"--{table}", required=True, help=f"CSV or Parquet file for the {table} table")
    for table in ("items", "sessions", "tasks"):
        p.add_argument(f"--{table}", help=f"optional CSV or Parquet file for the {table} table")
    p.add_argument("--mapping", help="JSON column mapping {'tables': {...}, 'tasks': [...]}")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("import-kuairand", help="build a log from KuaiRand CSV files (impressions -> requests and "
                       "sessions, user and video features, MTL scores from the scoring step)")
    p.add_argument("--log", action="append", required=True, help="a KuaiRand log CSV (repeat for several)")
    p.add_argument("--users", required=True, help="user_features CSV")
    p.add_argument("--videos", required=True, help="video_features_basic CSV")
    p.add_argument("--train-log", action="append", help="other traffic (a standard log CSV) to train the scoring "
                   "network on and apply to --log (xMTF's setup); default: cross-fitted over users of --log")
    p.add_argument("--out", required=True)
    p.add_argument("--segment-by", default="user_active_degree", help="the user attribute that gives segments")
    p.add_argument("--session-gap-minutes", type=float, default=30.0, help="a longer gap starts a new session")
    p.add_argument("--slate-size", type=int, default=6, help="consecutive impressions per request")
    p.add_argument("--min-positives", type=int, default=20, help="signals with fewer positives are dropped")
    p.add_argument("--task-scale", choices=["standardised", "raw"], default="standardised",
                   help="continuous tasks in standard deviations (comparable with probabilities) or raw units")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_import_kuairand)

    p = sub.add_parser("score", help="fill a log's MTL scores (s_*) with a multi-task network no label leaks into")
    p.add_argument("log")
    p.add_argument("--out", required=True, help="the scored copy to write")
    p.add_argument("--train-log", help="another log (same tasks and features) to train on instead of cross-fitting")
    p.add_argument("--folds", type=int, default=5, help="folds for cross-fitting")
    p.add_argument("--fold-by", choices=["impression", "user"], default="impression",
                   help="cross-fit over impressions (the network knows users from their other impressions) or users")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("export-parquet", help="write a log as a folder of Parquet files per table, sharded by "
                       "user (a data lake's layout; every command reads the folder as a log)")
    p.add_argument("log")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--shards", type=int, default=8, help="user shards of the tables that grow with traffic")
    p.add_argument("--force", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export_parquet)

    p = sub.add_parser("validate", help="check a log; exit 0 clean, 1 problems, 2 unusable")
    p.add_argument("log")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("info", help="tables, row counts, tasks, segments, time range")
    p.add_argument("log")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    for name, func, helptext in (("evaluate", cmd_evaluate, "metrics, off-policy estimates and truth"),
                                 ("compare", cmd_compare, "policies side by side")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("log")
        if name == "evaluate":
            p.add_argument("--policy", required=True, help="logging | static:TASK=W,... | run:RUN_ID")
            p.add_argument("--stream", action="store_true",
                           help="a Parquet lake (export-parquet) read shard by shard, memory following a shard: "
                                "re-ranking metrics, DM, and where the lake logged every density IPS, SNIPS, "
                                "NCIS and DR with verdicts, as the in-memory evaluation gives them")
            p.add_argument("--engine", choices=["local", "ray"], default="local",
                           help="with --stream: shards in this process, or mapped over Ray workers (Ray Data)")
            p.add_argument("--address", help="with --engine ray: a running Ray cluster (default: start a local one "
                                             "with 2 CPUs)")
        else:
            p.add_argument("--policy", action="append", help="repeat; default: logging and every finished run")
            p.add_argument("--algo", help="train these algorithms with their defaults first (comma list, or "
                                          "'all') and compare them with the logging policy")
            p.add_argument("--select", choices=["mean", "lower_bound", "cvar"], default="lower_bound",
                           help="how to choose a policy: the mean or the lower 95%% bound of one estimator for "
                                "every policy (DR where all have it, else DM), or CVaR of the worst 10%%")
            p.add_argument("--oracle", action="store_true",
                           help="simulator logs: add the best vector per segment, found against the truth, and "
                                "report each policy's share of its headroom over the logging policy")
        p.add_argument("--reward", help="RewardSpec JSON (default: equal normalised signals + stickiness)")
        p.add_argument("--runs", default="runs", help="run store folder")
        p.add_argument("--k", type=int, default=None, help="NDCG cut-off (default: items shown)")
        p.add_argument("--n-boot", type=int, default=500, help="bootstrap resamples")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--stochastic", action="store_true",
                       help="evaluate a stochastic policy's full distribution (exact density ratios) instead of "
                            "the mean weights it would serve (kernelised ratios)")
        p.add_argument("--sample", choices=["auto", "held-out", "all"], default="auto",
                       help="which requests: auto = the latest sessions that the evaluated runs held out from "
                            "training (all requests when no run held any out), held-out, or all (in-sample for "
                            "runs trained on this log)")
        p.add_argument("--outcome-model", choices=["auto", "linear", "learned"], default="auto",
                       help="the model DM and DR rest on: auto = the learned outcome model where its held-out fit "
                            "beats the linear one's")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)

    _log_command(sub, "abtest", "A/B read-out of a log whose weights are a few fixed vectors per segment", cmd_abtest)
    p = _log_command(sub, "headroom", "oracle yardsticks of a simulator log, found against its truth", cmd_headroom)
    p.add_argument("--candidates", type=int, default=32, help="random candidate vectors before refinement")

    p = sub.add_parser("train", help="train a fusion policy into the run store")
    p.add_argument("log")
    p.add_argument("--algo", required=True, help="static | cem | grade | batchrl | integrated | enhanced")
    p.add_argument("--reward", help="RewardSpec JSON (default: equal normalised signals + stickiness)")
    p.add_argument("--steps", type=int, help="training steps (the algorithm's main loop length; CEM: iterations; "
                                              "IntegratedRL: steps per round; GRADE: GRPO steps, after its "
                                              "warm start of warm_start_steps, and the step count includes both)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an algorithm setting, e.g. --set group_size=16 (repeat)")
    p.add_argument("--name", help="a name for the run")
    p.add_argument("--validation-share", type=float, default=0.2,
                   help="share of the latest sessions held out for validation and early stopping (0 = none)")
    p.add_argument("--patience", type=int, default=4,
                   help="validation estimates without improvement before stopping (0 = never)")
    p.add_argument("--sample-users", type=float, default=1.0, metavar="SHARE",
                   help="train on a reproducible share of the users (by a hash of user_id and --seed): a log larger "
                        "than memory, or a quick run; recorded with the run")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="ray: GRADE's updates data-parallel on Ray Train workers (torch DDP; needs "
                        "requirements-ray.txt), each reading the log from its path")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (with --engine ray)")
    p.add_argument("--address", default=None,
                   help="a running Ray cluster (with --engine ray; default: a local one of --workers CPUs)")
    p.add_argument("--runs", default="runs", help="run store folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench", help="speed and memory figures against same-run references")
    p.add_argument("--quick", action="store_true", help="a tenth of every workload (checks the code paths)")
    p.add_argument("--busy-core", action="store_true",
                   help="also measure every figure with one core held by a spinning process (started and stopped "
                        "by the bench)")
    p.add_argument("--streamed", action="store_true",
                   help="also streamed evaluation of a trained GRADE policy on Parquet lakes of 1M, 4M and 16M "
                        "requests (several minutes, 8 GB of disk at 16M)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)
    return parser


def cmd_bench(args: argparse.Namespace) -> int:
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks.bench import run_bench

    result = run_bench(args.quick, progress=lambda msg: print(f"bench: {msg}...", file=sys.stderr),
                       busy=args.busy_core, streamed=args.streamed)
    if args.json:
        _emit(result)
        return EXIT_OK
    print(f"{'figure':<10}{'value':>16} {'unit':<22}{'reference':>14}{'ratio':>9}  {'target':<44}met")
    for f in result["figures"]:  # type: ignore[union-attr]
        print(f"{f['name']:<10}{f['value']:>16.4g} {f['unit']:<22}{f['reference']:>14.4g}{f['ratio']:>9.3g}  "
              f"{f['target']:<44}{'yes' if f['met'] else 'NO'}")
        print(f"{'':<10}{f['detail']}")
        if f.get("busy"):
            b = f["busy"]
            print(f"{'  busy':<10}{b['value']:>16.4g} {'':<22}{b['reference']:>14.4g}{b['ratio']:>9.3g}  "
                  f"{b['target']:<44}{'yes' if b['met'] else 'NO'}")
    print(f"machine: {result['machine']}")
    return EXIT_OK


_STEP_FIELD = {"cem": "iterations", "integrated": "steps_per_round"}


def _train_params(args: argparse.Namespace) -> dict[str, object]:
    params: dict[str, object] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LogError(f"--set {item!r}: expected KEY=VALUE")
        params[key.strip()] = value.strip()
    if args.steps is not None:
        if args.algo == "static":
            raise LogError("--steps does not apply to --algo static (it has one step)")
        params[_STEP_FIELD.get(args.algo, "steps")] = args.steps
    return params


def _train_into_store(store, config, log, spec, name: str | None, **engine):  # type: ignore[no-untyped-def]
    """Train into the run store with a progress bar (`engine`: train_run's engine, workers and address)."""
    from mtf_core.policies.train import train_run

    if engine.get("engine") == "ray":
        print(f"training {config.algo} on {engine['workers']} Ray Train workers", file=sys.stderr)
        return train_run(store, config, log, spec, name=name, **engine)
    update, close = _progress_bar(f"train {config.algo}")
    try:
        return train_run(store, config, log, spec, lambda info: update((info.step + 1) / info.n_steps), name)
    finally:
        close()


def cmd_train(args: argparse.Namespace) -> int:
    from mtf_core.policies.train import DATA_PARALLEL, TrainConfig, run_summary
    from mtf_core.reward import load_reward_spec
    from mtf_core.runs import RunStore
    from mtf_core.store import load_log

    config = TrainConfig(args.algo, args.seed, _train_params(args), validation_share=args.validation_share,
                         patience=args.patience, user_sample=args.sample_users)
    if args.engine == "ray" and args.algo not in DATA_PARALLEL:
        raise LogError(f"--engine ray trains {', '.join(DATA_PARALLEL)} data-parallel; {args.algo} trains locally")
    if args.workers < 1:
        raise LogError(f"--workers {args.workers}: at least one worker")
    log = load_log(args.log, user_sample=config.user_sample, sample_seed=config.seed)
    spec = load_reward_spec(args.reward, log.task_names)
    engine = {"engine": "ray", "workers": args.workers, "address": args.address} if args.engine == "ray" else {}
    run_id, result = _train_into_store(RunStore(args.runs), config, log, spec, args.name, **engine)
    summary = run_summary(result)
    if args.json:
        _emit({"run_id": run_id, "algo": args.algo, "status": result.status, "seconds": result.seconds,
               "config": config.to_dict(), "final_metrics": summary["final"], "best_step": result.best_step,
               "best_validation": result.best_value, "validation_estimator": result.validation_estimator,
               "stopped_early": result.stopped_early, "notes": result.notes})
    else:
        of = f" of {result.history[-1][0] + 1}" if result.history else ""
        best = (f", best held-out {result.validation_estimator.upper()} {result.best_value:.4f} at step "
                f"{result.best_step}{of}"
                + (" (stopped early)" if result.stopped_early else "")) if result.best_step is not None else ""
        print(f"run {run_id} {result.status}: {args.algo} in {result.seconds:.1f}s{best} "
              f"(evaluate with --policy run:{run_id})")
        for note in result.notes:
            print(f"note: {note}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except LogError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader stopped reading (`... | head`): nothing went wrong with the command. Point stdout at
        # /dev/null so that the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - a full disk is named as such, whichever layer noticed it
        if not is_disk_full(exc):
            return _unexpected(exc)
        print(f"error: the disk is full (no space left on device) while writing; free some space and run the "
              f"command again ({str(exc).splitlines()[0][:200]})", file=sys.stderr)
        return EXIT_UNUSABLE


def _unexpected(exc: BaseException) -> int:
    """One line for anything else: OSError and ValueError as they are, the rest named as unexpected."""
    if isinstance(exc, (OSError, ValueError)):
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    if isinstance(exc, MemoryError):
        print("error: out of memory; use a smaller log or smaller settings", file=sys.stderr)
        return EXIT_UNUSABLE
    if os.environ.get("MTF_DEBUG"):
        raise exc
    first = str(exc).splitlines()[0] if str(exc) else ""
    print(f"error: {type(exc).__name__}: {first[:300]} (an unexpected failure; MTF_DEBUG=1 shows the "
          "traceback)", file=sys.stderr)
    return EXIT_UNUSABLE
