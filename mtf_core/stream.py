"""Streamed evaluation: a lake read one shard at a time, so that memory follows a shard, not the log.

Every figure of an evaluation is a ratio of sums over users (the bootstrap resamples users), and a lake's
shard holds whole users (`lake`), so a shard's per-user sums are final: two passes over the shards give
the same figures as the in-memory evaluation of the whole log.

1. Statistics of the whole log that the reward and the models rest on, as DuckDB aggregates per shard,
   added up in shard order (so that the sums come out the same whatever ran them; nothing held but the
   users): the label moments (the reward's normalisation), per-position sums of labels and scores (the
   position curve and the logging policy's reward shares), the users and their segments, and the
   thresholds of continuous tasks (an exact median, over the whole lake).
2. Per shard: the target policy acts, and its re-ranking metrics, the direct model's statistics (n, x, y,
   x^2, xy per user) and the target's direct-method terms are summed per user.

The direct model's calibration is then fitted from the per-user statistics, and the bootstrap runs on the
per-user arrays exactly as in memory. What is streamed: the re-ranking metrics (NDCG, GAUC, MTF-GAUC, the
DM reward of the top L) and DM with the linear direct model, for any policy at its deterministic action.
On a log that logged every action's density, also the importance-weighted estimates (IPS, SNIPS, NCIS, DR)
with their overlap diagnostics (ESS, mean and largest ratio and the NCIS cap's share from per-segment sums;
the support coverage from draws from the target) and verdicts:
- of a policy that draws its weights from a density (GRADE's Dirichlet, `stochastic`): the exact ratios, and
  DM and DR of the stochastic policy (its direct model's value averaged over its own draws);
- of a deterministic action (a fixed weight vector, a policy's mean weights): the ratios of a Dirichlet
  kernel around it (`evaluate.ratios`), whose concentration the in-memory evaluation chooses by a search
  that needs the whole log's standard error. Each shard computes its part at every concentration of the
  grid (the standard error's sums, the kernel's smoothing bias from one draw for each request that
  `ratios.kernel_bias_rows` keeps, the per-user sums), the per-user sums wait on disk, and the
  concentration is chosen once every shard is in.
The draws come from each shard's own generator, so the figures that rest on them (DM and DR of a stochastic
target, a kernel's smoothing bias, the coverage) are the in-memory ones to Monte-Carlo error rather than to
the digit.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import duckdb
import numpy as np
import torch

from mtf_core.diagnostics import (RATIO_SUMS, add_ratio_sums, diagnostics_from_sums, draw_ratio_limit,
                                  estimator_verdicts, ratio_sums)
from mtf_core.errors import LogError
from mtf_core.evaluate import context, ratios
from mtf_core.evaluate.actions import N_DM_SAMPLES, interior_weights, target_actions
from mtf_core.evaluate.bootstrap import N_BOOT, finite_or_none
from mtf_core.evaluate.context import EvalContext
from mtf_core.evaluate.depth import DepthShift, DepthSums, depth_shifts, log_depth_sums, target_mean_weights
from mtf_core.evaluate.direct import (DirectFitData, DirectModel, fit_from_user_stats, intervals_from_units,
                                     model_numerators)
from mtf_core.evaluate.estimators import IPS, NCIS, SNIPS, OPEInputs
from mtf_core.evaluate.policy_value import depth_note, metric_rows, ranking_metric_terms
from mtf_core.evaluate.rerank import expected_under, expected_under_each
from mtf_core.lake import is_lake, lake_shards, open_lake
from mtf_core.policies.base import FusionPolicy
from mtf_core.policies.static import LoggingPolicy, dirichlet_from_moments
from mtf_core.profile import fusion_note, fusion_reordered, logged_action
from mtf_core.reward import ResolvedReward, RewardSpec, expected_signals, penalty, request_reward, weighted_sum
from mtf_core.schema import Task, quote_ident, read_tasks
from mtf_core.simulate import SimConfig, logging_alpha, position_curve
from mtf_core.store import LogData, iter_chunks, load_from
from mtf_core.threads import one_thread, thread_budget

__all__ = ["LogStatistics", "StreamedEvaluation", "ShardTerms", "ENGINES", "load_shard", "log_statistics",
           "shard_terms", "streamed_evaluation", "policy_view"]


def _require_lake(lake: str | os.PathLike[str]) -> None:
    if not is_lake(lake):
        raise LogError(f"{lake}: streamed evaluation reads a Parquet lake (python -m mtf_core export-parquet LOG "
                       "--out DIR writes one)")


def load_shard(lake: str | os.PathLike[str], shard: str, threads: int | None = None) -> LogData:
    """One shard of a lake (a name from `lake_shards`) as a log of its own, read on `threads` DuckDB threads
    (default: DuckDB's, all cores)."""
    con = open_lake(lake, shard)
    try:
        if threads is not None:
            con.execute("SET threads = ?", [int(threads)])
        return load_from(con, f"{lake} ({shard})")
    finally:
        con.close()


def policy_view(lake: str | os.PathLike[str]) -> LogData:
    """The first shard of the lake with the whole lake's segment names: what resolving a policy reference
    needs (its tasks and segments), without reading the whole log."""
    _require_lake(lake)
    shards = lake_shards(lake)
    if not shards:
        raise LogError(f"{lake}: the lake has no shards with requests")
    con = open_lake(lake)
    try:
        names = [str(r[0]) for r in con.execute("SELECT DISTINCT segment FROM users WHERE segment IS NOT NULL "
                                                "ORDER BY 1").fetchall()]
    finally:
        con.close()
    return dataclasses.replace(load_shard(lake, shards[0]), segments=tuple(names))


@dataclass(frozen=True)
class LogStatistics:
    """What the reward and the direct model rest on, over the whole log (pass 1)."""

    path: str
    tasks: tuple[Task, ...]
    segments: tuple[str, ...]  # with requests, by name (as `load_log` numbers them)
    users: np.ndarray  # (U,) sorted ids
    user_segment: np.ndarray  # (U,) index into segments
    n_requests: int
    n_top: int
    label_mean: np.ndarray  # (K,) over shown items with a label
    label_std: np.ndarray  # (K,) population std, NaN for a task without labels
    label_by_position: np.ndarray  # (P, K) sums of shown labels
    score_by_position: np.ndarray  # (P, K) sums of shown scores
    thresholds: np.ndarray  # (K,)
    meta: dict[str, str] = field(default_factory=dict)
    densities_logged: bool = False  # every request has a finite logging_logp
    segment_requests: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (S,) requests per segment
    weight_moments: np.ndarray = field(default_factory=lambda: np.zeros((0, 1)))
    """(S, 1 + 2K) per segment: requests with logged weights, the weights' sums, their squares' sums."""

    def logging_model(self) -> LoggingPolicy:
        """`propensity.logging_policy` from the whole log's statistics: the simulator's Dirichlet per segment,
        else one per segment matched to the logged weights' moments."""
        names = tuple(t.name for t in self.tasks)
        sim = self.sim_config
        if sim is not None:
            return LoggingPolicy(names, self.segments, logging_alpha(sim)[np.argsort(sim.segment_names)])
        k = len(self.tasks)
        alpha = np.ones((len(self.segments), k))
        for s, row in enumerate(self.weight_moments):
            if row[0] > 0:
                mean = row[1:1 + k] / row[0]
                alpha[s] = dirichlet_from_moments(mean, np.maximum(row[1 + k:] / row[0] - mean**2, 0.0))
        return LoggingPolicy(names, self.segments, alpha)

    @property
    def sim_config(self) -> SimConfig | None:
        simulated = self.meta.get("source") == "simulator" and "simulator_config" in self.meta
        return SimConfig.from_json(self.meta["simulator_config"]) if simulated else None

    def position_curve(self) -> np.ndarray:
        """`fit_position_curve` (or the simulator's) from the per-position sums."""
        sim = self.sim_config
        if sim is not None:
            return position_curve(sim, self.n_top)
        scale = np.maximum(np.nan_to_num(self.label_mean), 1e-9)
        obs = (self.label_by_position / scale).sum(1)
        pred = (self.score_by_position / scale).sum(1)
        curve = obs / np.maximum(pred, 1e-12)
        return np.clip(curve / max(curve[0], 1e-12), 0.0, 1.0) if curve[0] > 0 else np.ones(len(curve))

    def resolve(self, spec: RewardSpec) -> ResolvedReward:
        """`resolve_reward` from the whole log's statistics."""
        names = tuple(t.name for t in self.tasks)
        spec.check_tasks(names)
        c = np.array([spec.coefficients.get(t, 0.0) for t in names], dtype=np.float64)
        if spec.normalize:
            std = self.label_std
            c = c / np.where(np.isfinite(std) & (std > 0), std, 1.0)
        curve = self.position_curve()
        expected_total = curve[:len(self.score_by_position)] @ self.score_by_position[:len(curve)]
        totals = c * expected_total
        share = totals / totals.sum() if totals.sum() > 0 else np.full(len(names), 1.0 / max(len(names), 1))
        return ResolvedReward(spec, names, c, share, curve)


def _thresholds(con: duckdb.DuckDBPyConnection, tasks: tuple[Task, ...]) -> np.ndarray:
    """`label_thresholds` over the whole lake: continuous tasks' declared thresholds, else the exact median of
    their positive shown labels (as float32, as `load_log` reads them)."""
    thresholds = np.zeros(len(tasks))
    for j, task in enumerate(tasks):
        if task.kind != "continuous":
            continue
        if task.threshold is not None:
            thresholds[j] = task.threshold
            continue
        col = quote_ident("y_" + task.name)
        value = con.execute(f"SELECT median({col}::FLOAT::DOUBLE) FROM impressions WHERE position IS NOT NULL "
                            f"AND isfinite({col}::FLOAT) AND {col}::FLOAT > 0").fetchone()[0]  # type: ignore[index]
        thresholds[j] = float(value) if value is not None else 0.0
    return thresholds


@dataclass(frozen=True)
class _ShardStatistics:
    """One shard's part of pass 1 (module docstring); `_combine` adds the shards up in shard order."""

    count: np.ndarray  # (K,) shown items with a finite label
    mean: np.ndarray  # (K,)
    m2: np.ndarray  # (K,) sum of squared deviations from the shard's mean
    by_position: dict[int, np.ndarray]  # position -> (2K,) sums of labels, then of scores
    users: list[tuple[int, str, int]]  # (user_id, segment, requests)
    missing_density: int
    weight_moments: dict[str, np.ndarray]  # segment -> (1 + 2K,) `LogStatistics.weight_moments`' row


def _shard_statistics(lake: str | os.PathLike[str], shard: str, tasks: tuple[Task, ...]) -> _ShardStatistics:
    con = open_lake(lake, shard)
    try:
        con.execute("SET threads = 1")  # shards run side by side (`_local_terms`), one DuckDB thread each
        label = [f"{quote_ident('y_' + t.name)}::FLOAT::DOUBLE" for t in tasks]
        score = [f"CASE WHEN isfinite({quote_ident('s_' + t.name)}::DOUBLE) THEN "
                 f"{quote_ident('s_' + t.name)}::FLOAT::DOUBLE ELSE 0 END" for t in tasks]
        finite = [f"CASE WHEN isfinite({y}) THEN {y} END" for y in label]
        # One scan of the candidates: per position, the labels' moments and the scores' sums.
        by_position = con.execute(
            "SELECT position, " + ", ".join(f"count({v}), avg({v}), var_pop({v})" for v in finite) + ", "
            + ", ".join(f"sum({v})" for v in score) + " FROM impressions WHERE position IS NOT NULL "
            "GROUP BY position ORDER BY position").fetchall()
        users = con.execute("SELECT r.user_id, any_value(coalesce(u.segment, '(missing)')), count(*) FROM requests r "
                            "JOIN users u ON u.user_id = r.user_id GROUP BY r.user_id ORDER BY r.user_id").fetchall()
        missing = con.execute("SELECT count(*) FROM requests WHERE logging_logp IS NULL OR "
                              "NOT isfinite(logging_logp)").fetchone()[0]  # type: ignore[index]
        weights = [f"r.{quote_ident('w_' + t.name)}::DOUBLE" for t in tasks]
        moments_by_segment = con.execute(
            "SELECT coalesce(u.segment, '(missing)'), count(*), " + ", ".join(f"sum({w})" for w in weights) + ", "
            + ", ".join(f"sum({w} * {w})" for w in weights) + " FROM requests r JOIN users u ON u.user_id = r.user_id "
            f"WHERE {' AND '.join(f'{w} IS NOT NULL' for w in weights)} GROUP BY 1").fetchall()
    except duckdb.Error as exc:
        raise LogError(f"{lake} ({shard}): cannot be summarised ({str(exc).splitlines()[0]})") from exc
    finally:
        con.close()
    k = len(tasks)
    moments = np.array([[v or 0.0 for v in r[1:1 + 3 * k]] for r in by_position], dtype=np.float64).reshape(-1, k, 3)
    count, mean, m2 = _pooled(moments[..., 0], moments[..., 1], moments[..., 2] * moments[..., 0])
    return _ShardStatistics(count, mean, m2,
                            {int(r[0]): np.r_[moments[i, :, 0] * moments[i, :, 1], [v or 0.0 for v in r[1 + 3 * k:]]]
                             for i, r in enumerate(by_position)},
                            [(int(u[0]), str(u[1]), int(u[2])) for u in users], int(missing),
                            {str(r[0]): np.array([v or 0.0 for v in r[1:]], dtype=np.float64)
                             for r in moments_by_segment})


def _pooled(count: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Groups' moments `[G, K]` (counts, means, sums of squared deviations from the group's mean) pooled in
    group order by Chan et al.'s pairwise update: (count, mean, m2) `[K]`."""
    k = count.shape[1]
    total_count, total_mean, total_m2 = np.zeros(k), np.zeros(k), np.zeros(k)
    for n, m, sq in zip(count, mean, m2):
        total = total_count + n
        delta = m - total_mean
        share = np.divide(n, total, out=np.zeros(k), where=total > 0)
        total_mean = total_mean + delta * share
        total_m2 = total_m2 + sq + delta**2 * total_count * share
        total_count = total
    return total_count, total_mean, total_m2


def _combine(parts: list[_ShardStatistics], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list, int]:
    """The shards' statistics added up in shard order (Chan et al.'s pairwise update for the moments):
    (mean, population std, per-position sums `[P, 2K]`, users, requests without a density)."""
    count, mean, m2 = _pooled(*(np.array([getattr(p, name) for p in parts]).reshape(-1, k)
                                for name in ("count", "mean", "m2")))
    n_pos = max((max(p.by_position, default=-1) for p in parts), default=-1) + 1
    sums = np.zeros((max(n_pos, 1), 2 * k))
    for part in parts:
        for position, values in part.by_position.items():
            sums[position] += values
    with np.errstate(invalid="ignore", divide="ignore"):
        std = np.where(count > 0, np.sqrt(m2 / count), np.nan)
    mean = np.where(count > 0, mean, np.nan)
    users = [u for part in parts for u in part.users]
    return mean, std, sums, users, sum(p.missing_density for p in parts)


def log_statistics(lake: str | os.PathLike[str], workers: int = 1) -> LogStatistics:
    """Pass 1 (module docstring): each shard's aggregates in DuckDB (on `workers` threads, one DuckDB thread
    each), added up in shard order, so the figures are the same whoever computed them; nothing held but
    per-user counts."""
    _require_lake(lake)
    shards = lake_shards(lake)
    if not shards:
        raise LogError(f"{lake}: the lake has no shards with requests (requests/shard=K/ folders; "
                       "python -m mtf_core export-parquet writes them)")
    con = open_lake(lake)
    try:
        tasks = tuple(read_tasks(con))
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
    except duckdb.Error as exc:
        raise LogError(f"{lake}: cannot be summarised ({str(exc).splitlines()[0]})") from exc
    finally:
        con.close()
    if not tasks:
        raise LogError(f"{lake}: the lake declares no tasks")
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(shards))), thread_name_prefix="mtf-stats") as pool:
        parts = list(pool.map(lambda shard: _shard_statistics(lake, shard, tasks), shards))
    mean, std, sums, users, missing_density = _combine(parts, len(tasks))
    if not users:
        raise LogError(f"{lake}: the lake has no requests")
    con = open_lake(lake)
    try:
        thresholds = _thresholds(con, tasks)
    except duckdb.Error as exc:
        raise LogError(f"{lake}: cannot be summarised ({str(exc).splitlines()[0]})") from exc
    finally:
        con.close()
    users.sort()
    ids = np.array([u[0] for u in users], dtype=np.int64)
    if len(ids) > 1 and (ids[1:] == ids[:-1]).any():
        twice = int(ids[1:][ids[1:] == ids[:-1]][0])
        raise LogError(f"{lake}: user {twice} has requests in more than one shard; a lake's shard holds whole "
                       "users (export-parquet shards by user_id)")
    names = np.array([u[1] for u in users], dtype=object)
    segments = tuple(sorted(set(names.tolist())))
    k = len(tasks)
    user_segment = np.searchsorted(segments, names).astype(np.int64)
    requests = np.bincount(user_segment, weights=[u[2] for u in users], minlength=len(segments))
    weight_moments = np.zeros((len(segments), 1 + 2 * k))
    for part in parts:  # in shard order
        for name, row in part.weight_moments.items():
            if name in segments:
                weight_moments[segments.index(name)] += row
    return LogStatistics(str(lake), tasks, segments, ids, user_segment, int(sum(u[2] for u in users)), len(sums),
                         mean, std, sums[:, :k], sums[:, k:], thresholds, {str(a): str(b) for a, b in meta.items()},
                         missing_density == 0, requests, weight_moments)


@dataclass
class StreamedEvaluation:
    """A streamed evaluation's figures (the rows of `EvaluationResult`'s metrics and its DM row)."""

    log: str
    policy: str
    n_requests: int
    n_users: int
    n_shards: int
    metrics: list[dict[str, object]]
    ope: list[dict[str, object]]
    seconds: float
    notes: list[str] = field(default_factory=list)
    engine: str = "local"
    diagnostics: dict[str, object] | None = None  # overlap diagnostics of the importance ratios (--stochastic)
    diagnostics_by_segment: list[dict[str, object]] = field(default_factory=list)
    ratios: dict[str, object] | None = None  # a deterministic target's kernel: its concentration, bias and SE
    fusion_agreement: float | None = None  # `profile.fusion_agreement` over the whole lake

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def _shard_context(log: LogData, stats: LogStatistics, resolved: ResolvedReward) -> EvalContext:
    """The shard as an evaluation context on the whole log's reward and segment numbering."""
    code = np.searchsorted(stats.segments, np.asarray(log.segments, dtype=object).astype(str))
    log = dataclasses.replace(log, segment=code[log.segment], segments=stats.segments)
    profile, positions = logged_action(log)
    expected = expected_signals(log.scores, positions, resolved.position_curve)
    feedback = log.label_totals()
    logged = request_reward(resolved, feedback, log.continued, log.returned, log.weights, expected)
    users, unit = np.unique(log.user_id, return_inverse=True)
    unit_segment = np.zeros(len(users), dtype=np.int64)
    unit_segment[unit] = log.segment
    placeholder = DirectModel(np.zeros(len(stats.segments)), np.zeros(len(stats.segments)))
    empty_fit = DirectFitData(users, unit_segment, np.zeros((len(users), 5)))
    return EvalContext(log, resolved, logged, expected, positions, placeholder, empty_fit, unit, unit_segment,
                       stats.sim_config, stats.n_top, profile, "linear")


@dataclass(frozen=True)
class ShardTerms:
    """One shard's per-user sums (users sorted): all a shard contributes to the figures."""

    users: np.ndarray  # (u,) ids
    fit_stats: np.ndarray  # (u, 5) the direct model's n, x, y, x^2, xy
    evaluated: np.ndarray  # (u, 6) the target's direct-method terms (intervals_from_units' layout)
    figures: list[tuple[dict[str, object], np.ndarray, np.ndarray]]  # (figure, numerator, denominator) per user
    weighted: list[tuple[dict[str, object], np.ndarray, np.ndarray]] = field(default_factory=list)
    """IPS, SNIPS and NCIS per user, where the target's density ratios to the logged weights exist."""
    ratio_sums: np.ndarray | None = None
    """`diagnostics.ratio_sums` of those ratios per segment `[S, 5]` (the whole log's segment numbering), and
    where the target is a Dirichlet `_coverage_counts` beside them `[S, 8]`."""
    shard: str = ""
    kernel: KernelTerms | None = None
    """A deterministic target's kernel-smoothed ratios at every concentration of the grid."""
    fusion: tuple[int, int] = (0, 0)
    """`LogProfile.fusion_agreeing` and `fusion_checked` of the shard."""
    depth: DepthSums | None = None
    """What the target's shift of how deep users see rests on (`evaluate.depth`), where it has ratios."""


@dataclass(frozen=True)
class KernelTerms:
    """One shard's part of a deterministic target's Dirichlet-kernel ratios (`evaluate.ratios`), at every
    concentration `c` of `ratios.concentration_grid` `[C]`: what choosing `c` needs (the parts of the
    clustered standard error of IPS and of the direct model's value of the smoothed policy) and the per-user
    sums of the estimates at each `c`, from which the chosen one's are kept."""

    unit_terms: np.ndarray  # (C, u, 9): IPS, SNIPS, NCIS numerator and denominator; DR's three columns
    se_sums: np.ndarray  # (C, 3): over users, sum of S, S^2 and S * n (S: a user's sum of ratio x reward)
    n_squared: float  # over users, sum of n^2 (n: a user's requests)
    smoothed: np.ndarray
    """(C, S, 3) per segment, over the requests that estimate the smoothing bias: the sums of x and of the
    penalty under the kernel's draw less under the target, and the number of those requests."""
    overlap: np.ndarray  # (C, S, 8): `diagnostics.ratio_sums` and `_coverage_counts` per segment


_DR_COLUMNS = slice(3, 6)  # `ShardTerms.evaluated`'s columns that carry the ratios


def shard_terms(lake: str | os.PathLike[str], shard: str, policy: FusionPolicy, label: str,
                stats: LogStatistics, resolved: ResolvedReward, k: int, weighted: bool = False, seed: int = 0
                ) -> ShardTerms:
    """Pass 2 on one shard: the policy acts on it and its per-user sums are made (the function every engine
    maps over the shards). With one torch thread wherever it runs: the last bits of a float sum depend on
    how it was split, so one thread makes a worker's sums the local ones exactly (and on 2 cores, next to
    DuckDB's reader, it was also 13% faster)."""
    with one_thread():
        return _shard_terms(lake, shard, policy, label, stats, resolved, k, weighted, seed)


def _target_draws(policy: FusionPolicy, log: LogData, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | None:
    """N_DM_SAMPLES draws per request from a Dirichlet target `[G,R,K]` and its log-density of them `[G,R]`,
    from this shard's own generator (numpy's: torch's global one is shared by the shards' threads), so a
    Monte-Carlo equivalent of the in-memory draws, not their digits. None for a target that is not a
    Dirichlet."""
    draws, logps = [], []
    with torch.no_grad():
        for rows in iter_chunks(log.n_requests, context.CHUNK):
            dist = policy.distribution(log.state(rows))
            if not isinstance(dist, torch.distributions.Dirichlet):
                return None
            alpha = dist.concentration.double().numpy()
            drawn = interior_weights(torch.from_numpy(rng.gamma(alpha, size=(N_DM_SAMPLES, *alpha.shape))))
            draws.append(drawn.numpy())
            logps.append(dist.log_prob(drawn.to(dist.concentration.dtype)).double().numpy())
    return np.concatenate(draws, 1), np.concatenate(logps, 1)


def _coverage_counts(log: LogData, stats: LogStatistics, draws: np.ndarray, target_logp: np.ndarray,
                     rows: np.ndarray | None = None) -> np.ndarray:
    """Per segment `[S, 3]`: of the target's draws `[G,R,K]` (of the requests `rows` `[r]` alone, `[G,r,K]`),
    how many have a ratio of target to logging density within `draw_ratio_limit` of the whole log's
    requests, how many within that of the segment's, and how many there are: the support coverage's parts
    (`diagnostics`)."""
    alpha = stats.logging_model().alpha  # (S, K): the logging Dirichlet of each segment
    normaliser = ratios.dirichlet_log_normaliser(alpha)
    n_segments = len(stats.segments)
    overall = draw_ratio_limit(stats.n_requests)
    by_segment = np.array([draw_ratio_limit(int(n)) for n in stats.segment_requests])
    segments = log.segment if rows is None else log.segment[rows]
    counts = np.zeros((n_segments, 3))
    for chunk in iter_chunks(len(segments), context.CHUNK):
        segment = segments[chunk]
        logged = ratios.dirichlet_logp(alpha[segment], torch.from_numpy(draws[:, chunk]), normaliser[segment]).numpy()
        ratio = np.exp(np.clip(target_logp[:, chunk] - logged, -700, 700))  # (G, r)
        counts[:, 0] += np.bincount(segment, weights=(ratio <= overall).sum(0), minlength=n_segments)
        counts[:, 1] += np.bincount(segment, weights=(ratio <= by_segment[segment]).sum(0), minlength=n_segments)
    counts[:, 2] = draws.shape[0] * np.bincount(segments, minlength=n_segments)
    return counts


def _shard_terms(lake: str | os.PathLike[str], shard: str, policy: FusionPolicy, label: str,
                 stats: LogStatistics, resolved: ResolvedReward, k: int, weighted: bool, seed: int) -> ShardTerms:
    # One DuckDB thread too: shards run side by side, and two readers of two threads each on 2 cores took
    # 1.6x as long to load as one thread each.
    log = load_shard(lake, shard, threads=1)
    ctx = _shard_context(log, stats, resolved)
    users = np.unique(log.user_id)
    n = len(users)
    x = weighted_sum(ctx.logged_expected, resolved.coefficients)
    y = ctx.logged.immediate + ctx.logged.session
    fit = np.stack([np.bincount(ctx.unit, weights=v, minlength=n) for v in (np.ones_like(x), x, y, x * x, x * y)], 1)
    actions = target_actions(policy, ctx.log, label, stochastic=False)
    terms, expected = ranking_metric_terms(ctx, actions, k, stats.thresholds)
    # The direct model's view of the target: its deterministic action, or the mean over its draws.
    x_target = weighted_sum(expected, resolved.coefficients)
    pen_target = penalty(resolved, actions.weights, expected)
    rho = np.zeros(ctx.log.n_requests)  # no importance-weighted part: DR's columns reduce to DM's
    ratio_terms, sums, draws = [], None, None
    if weighted:  # the target's own density of each logged action over the logged one
        logp = target_actions(policy, ctx.log, label, stochastic=True, n_draws=0).logp_logged
        assert logp is not None
        rho = np.exp(np.clip(logp - ctx.log.logging_logp, -700, 700))
        x_ope = OPEInputs(ctx.logged.total, rho, np.zeros(ctx.log.n_requests), np.zeros(ctx.log.n_requests))
        for est in (IPS(), SNIPS(), NCIS()):
            part = est.terms(x_ope)
            ratio_terms.append(({"estimator": est.name}, np.bincount(ctx.unit, weights=part.num, minlength=n),
                                np.bincount(ctx.unit, weights=part.den, minlength=n)))
        cap = NCIS().clip
        sums = np.stack([ratio_sums(rho[ctx.log.segment == s], cap) for s in range(len(stats.segments))])
        drawn = _target_draws(policy, ctx.log, np.random.default_rng([seed, zlib.crc32(shard.encode())]))
        if drawn is not None:
            draws, target_logp = drawn
            sums = np.c_[sums, _coverage_counts(ctx.log, stats, draws, target_logp)]
            signals = [expected_under(ctx, d) for d in draws]
            x_target = np.mean([weighted_sum(e, resolved.coefficients) for e in signals], axis=0)
            pen_target = np.mean([penalty(resolved, d, e) for d, e in zip(draws, signals)], axis=0)
    # `direct.intervals_from_units`' layout: (n, x_target, penalty_target, 1 - rho, x_target - rho x_logged,
    # rho (r + penalty_logged) - penalty_target).
    evaluated = np.stack([np.bincount(ctx.unit, weights=v, minlength=n) for v in (np.ones_like(x_target), x_target,
                                                                                  pen_target)], 1)
    evaluated = np.c_[evaluated, _dr_columns(ctx, rho, x, x_target, pen_target, n)]
    kernel = None
    if not weighted and stats.densities_logged and not actions.ope_note and actions.weights.ndim == 2:
        kernel = _kernel_terms(ctx, stats, actions.weights, x, x_target, pen_target,
                               np.random.default_rng([seed, zlib.crc32(shard.encode()), 1]))
    depth = None
    if sums is not None or kernel is not None:  # where the target has ratios, as in memory
        depth = log_depth_sums(ctx.log, target_mean_weights(actions.weights, draws, ctx.log.mask), ctx.unit, n)
    return ShardTerms(users, fit, evaluated, terms, ratio_terms, sums, shard, kernel,
                      (ctx.profile.fusion_agreeing, ctx.profile.fusion_checked), depth)


def _dr_columns(ctx: EvalContext, rho: np.ndarray, x: np.ndarray, x_target: np.ndarray, pen_target: np.ndarray,
                n: int) -> np.ndarray:
    """Per user `[u, 3]`: the sums of 1 - rho, x_target - rho x_logged and rho (r + penalty_logged) -
    penalty_target, the columns of `ShardTerms.evaluated` that carry the importance ratios."""
    reward, pen_logged = ctx.logged.total, ctx.logged.penalty
    return np.stack([np.bincount(ctx.unit, weights=v, minlength=n)
                     for v in (1.0 - rho, x_target - rho * x, rho * (reward + pen_logged) - pen_target)], 1)


def _kernel_terms(ctx: EvalContext, stats: LogStatistics, target: np.ndarray, x: np.ndarray, x_target: np.ndarray,
                  pen_target: np.ndarray, rng: np.random.Generator) -> KernelTerms:
    """`KernelTerms` of the deterministic action `target` `[R,K]` on one shard: `ratios._kernel_ratios` at
    every concentration of the grid at once: the ratios of every request, and one draw from each kernel
    for each request that `ratios.kernel_bias_rows` keeps for the smoothing bias and the coverage."""
    log, resolved = ctx.log, ctx.resolved
    reward = ctx.logged.total
    n, n_segments = len(ctx.unit_segment), len(stats.segments)
    count = np.bincount(ctx.unit, minlength=n).astype(np.float64)
    grid = ratios.concentration_grid(target.shape[1])
    unit_terms = np.zeros((len(grid), n, 9))
    se_sums = np.zeros((len(grid), 3))
    smoothed = np.zeros((len(grid), n_segments, 3))
    overlap = np.zeros((len(grid), n_segments, len(RATIO_SUMS) + 3))
    log_logged = ratios.log_interior(log.weights)
    in_segment = [log.segment == s for s in range(n_segments)]
    rows = np.flatnonzero(ratios.kernel_bias_rows(log.request_id, stats.n_requests))
    sampled_segment = log.segment[rows]
    smoothed[:, :, 2] = np.bincount(sampled_segment, minlength=n_segments)
    cap = NCIS().clip
    for group in np.array_split(np.arange(len(grid)), -(-len(grid) // _DRAWS_AT_ONCE)):
        alphas = np.stack([ratios.kernel_alpha(target, c) for c in grid[group]])  # (c, R, K)
        # float32 Gamma draws: half the time of float64 ones, and a draw's last bits matter to no figure
        gammas = rng.standard_gamma(alphas[:, rows].astype(np.float32), dtype=np.float32)
        draws = interior_weights(torch.from_numpy(gammas)).double().numpy()
        signals = expected_under_each(ctx, draws, rows)  # one read of the scores for the group's kernels
        for i, alpha_i, draw, expected in zip(group, alphas, draws, signals):
            gap_x = weighted_sum(expected, resolved.coefficients) - x_target[rows]
            gap_penalty = penalty(resolved, draw, expected) - pen_target[rows]
            smoothed[i, :, 0] = np.bincount(sampled_segment, weights=gap_x, minlength=n_segments)
            smoothed[i, :, 1] = np.bincount(sampled_segment, weights=gap_penalty, minlength=n_segments)
            alpha = torch.from_numpy(alpha_i)
            normaliser = ratios.dirichlet_log_normaliser(alpha)  # one for the logged weights and the draws
            logp = ratios.dirichlet_kernel_logp(log_logged, target, grid[i], normaliser.numpy())
            rho = np.exp(np.clip(logp - log.logging_logp, -700, 700))
            x_ope = OPEInputs(reward, rho, np.zeros(log.n_requests), np.zeros(log.n_requests))
            for j, est in enumerate((IPS(), SNIPS(), NCIS())):
                term = est.terms(x_ope)
                unit_terms[i, :, 2 * j] = np.bincount(ctx.unit, weights=term.num, minlength=n)
                unit_terms[i, :, 2 * j + 1] = np.bincount(ctx.unit, weights=term.den, minlength=n)
            unit_terms[i, :, 6:] = _dr_columns(ctx, rho, x, x_target, pen_target, n)
            per_user = unit_terms[i, :, 0]  # a user's sum of ratio x reward, S of `ratios._clustered_se`
            se_sums[i] = per_user.sum(), (per_user**2).sum(), (per_user * count).sum()
            overlap[i, :, :len(RATIO_SUMS)] = np.stack([ratio_sums(rho[keep], cap) for keep in in_segment])
            draw_logp = ratios.dirichlet_logp(alpha[rows], torch.from_numpy(draw), normaliser[rows]).numpy()
            overlap[i, :, len(RATIO_SUMS):] = _coverage_counts(log, stats, draw[None], draw_logp[None], rows)
    return KernelTerms(unit_terms, se_sums, float((count**2).sum()), smoothed, overlap)


_DRAWS_AT_ONCE = 4  # kernels drawn and re-ranked together: (4, R, K) blocks, 40 MB each at 250k requests


ENGINES = ("local", "ray")


def _local_terms(shards: list[str], work: Callable[[str], ShardTerms], say: Callable[[float, str], None],
                 workers: int) -> Iterator[ShardTerms]:
    """The shards on `workers` threads of this process. A shard's work is numpy, torch and DuckDB calls that
    let go of the GIL, on one thread each (`shard_terms`), so threads divide the time (1.8x with 2 on 2
    cores) and each shard's sums are what one thread makes of it."""
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="mtf-shard")
    try:
        for i, terms in enumerate(pool.map(work, shards)):
            yield terms
            say(0.1 + 0.8 * (i + 1) / max(len(shards), 1), f"shard {i + 1} of {len(shards)}")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _ray_terms(shards: list[str], work: Callable[[str], ShardTerms], address: str | None,
               say: Callable[[float, str], None]) -> Iterator[ShardTerms]:
    """The shards mapped over Ray workers by Ray Data (a local cluster of 2 CPUs unless `address` names
    one); each worker reads its shard from the lake itself (shared storage on a cluster)."""
    import pickle

    try:
        import ray
    except ImportError as exc:
        raise LogError("--engine ray needs Ray: pip install -r requirements-ray.txt") from exc
    started = not ray.is_initialized()
    if started:
        options = {"address": address} if address else {"num_cpus": 2, "object_store_memory": 256 * 1024**2}
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **options)
    try:
        def run(row: dict[str, object]) -> dict[str, object]:
            return {"terms": pickle.dumps(work(str(row["shard"])))}

        say(0.1, f"{len(shards)} shards on Ray")
        dataset = ray.data.from_items([{"shard": s} for s in shards]).map(run, num_cpus=1)
        for row in dataset.iter_rows():
            yield pickle.loads(row["terms"])  # our own workers' results, never outside input
    finally:
        if started:
            ray.shutdown()


def streamed_evaluation(lake: str | os.PathLike[str], policy: FusionPolicy, label: str, spec: RewardSpec,
                        k: int | None = None, n_boot: int = N_BOOT, seed: int = 0,
                        progress: Callable[[float, str], None] | None = None, engine: str = "local",
                        address: str | None = None, stochastic: bool = False, workers: int | None = None
                        ) -> StreamedEvaluation:
    """Re-ranking metrics and DM of `policy` (at its deterministic action) on a lake, shard by shard (in this
    process, or on Ray workers with `engine="ray"`); equal to `evaluate_policy` on the whole log with the
    linear direct model (module docstring). On a log that logged every action's density, also IPS, SNIPS,
    NCIS and DR with diagnostics and verdicts: by kernel-smoothed ratios of the deterministic action, or with
    `stochastic`, for a policy that draws its weights from a distribution on the simplex, by its exact
    density ratios (and for a Dirichlet policy DM and DR over its draws). The local engine runs `workers`
    shards at a time (default: the idle cores); the figures do not depend on it."""
    if engine not in ENGINES:
        raise LogError(f"engine {engine!r}: expected one of {', '.join(ENGINES)}")
    if stochastic and not (policy.stochastic and policy.form == "sum" and not policy.per_item):
        raise LogError(f"{label}: importance ratios need a policy that draws its fusion weights from a density "
                       "on the simplex (a stochastic, per-request, sum-fusion policy)")
    start = time.perf_counter()
    say = progress or (lambda f, msg: None)
    say(0.0, "pass 1: the whole log's statistics")
    shards = lake_shards(lake)
    workers = min(len(shards), workers or thread_budget()) if engine == "local" else 1
    stats = log_statistics(lake, max(workers, 1))
    if stochastic and not stats.densities_logged:
        raise LogError(f"{lake}: streamed importance weighting needs the logging density of every request "
                       "(logging_logp); this log lacks some (evaluate it in memory, where they can be estimated)")
    resolved = stats.resolve(spec)
    k = k or stats.n_top
    n_users, n_seg = len(stats.users), len(stats.segments)
    fit_stats = np.zeros((n_users, 5))
    evaluated = np.zeros((n_users, 6))
    figures: list[tuple[dict[str, object], np.ndarray, np.ndarray]] = []

    def work(shard: str) -> ShardTerms:
        return shard_terms(lake, shard, policy, label, stats, resolved, k, stochastic, seed)

    weighted: list[tuple[dict[str, object], np.ndarray, np.ndarray]] = []
    ratio_parts: dict[str, np.ndarray] = {}
    kernel_parts: dict[str, KernelTerms] = {}  # without their per-user arrays, which wait on disk
    kernel_files: list[tuple[np.ndarray, Path]] = []
    agreeing = checked = 0
    depth_parts: dict[str, DepthSums] = {}
    if engine == "ray":
        parts = _ray_terms(shards, work, address, say)
    else:
        parts = _local_terms(shards, work, say, workers)
    with tempfile.TemporaryDirectory(prefix="mtf-kernel-") as spool:
        for part in parts:
            at = np.searchsorted(stats.users, part.users)
            fit_stats[at], evaluated[at] = part.fit_stats, part.evaluated
            agreeing, checked = agreeing + part.fusion[0], checked + part.fusion[1]
            if part.depth is not None:
                depth_parts[part.shard] = part.depth
            if not figures:
                figures = [(row, np.zeros(n_users), np.zeros(n_users)) for row, _, _ in part.figures]
            for (_, num, den), (_, num_s, den_s) in zip(figures, part.figures):
                num[at], den[at] = num_s, den_s
            if part.weighted and not weighted:
                weighted = [(row, np.zeros(n_users), np.zeros(n_users)) for row, _, _ in part.weighted]
            for (_, num, den), (_, num_s, den_s) in zip(weighted, part.weighted):
                num[at], den[at] = num_s, den_s
            if part.ratio_sums is not None:
                ratio_parts[part.shard] = part.ratio_sums
            if part.kernel is not None:
                # Every concentration's per-user sums wait on disk (memory would grow with the grid x the users)
                # until the whole log's figures have chosen one.
                path = Path(spool) / f"{len(kernel_files)}.npy"
                try:
                    np.save(path, part.kernel.unit_terms)
                except OSError as exc:
                    raise LogError(f"{lake}: cannot keep the kernel's per-user sums in {spool} ({exc}); set TMPDIR "
                                   f"to a folder with room for about {part.kernel.unit_terms.nbytes // len(part.users)}"
                                   " bytes per user of the lake") from exc
                kernel_files.append((at, path))
                kernel_parts[part.shard] = dataclasses.replace(part.kernel, unit_terms=np.zeros((0, 0, 0)))
        model, fit = fit_from_user_stats(stats.users, stats.user_segment, fit_stats, n_seg)
        kernel, index = None, 0
        if kernel_files and len(kernel_parts) == len(shards):
            index, kernel = _choose_concentration([kernel_parts[s] for s in shards], model, stats)
            weighted = [({"estimator": est.name}, np.zeros(n_users), np.zeros(n_users))
                        for est in (IPS(), SNIPS(), NCIS())]
            for at, path in kernel_files:
                chosen = np.load(path, mmap_mode="r")[index]
                for j, (_, num, den) in enumerate(weighted):
                    num[at], den[at] = chosen[:, 2 * j], chosen[:, 2 * j + 1]
                evaluated[at, _DR_COLUMNS] = chosen[:, 6:]
            ratio_parts = {s: part.overlap[index] for s, part in kernel_parts.items()}
    # DR where the target's ratios exist, and for a stochastic target its own draws (the direct model's value
    # of it): the shards' coverage counts beside their ratio sums say the draws were taken.
    drawn = bool(ratio_parts) and all(_with_draws(part) for part in ratio_parts.values())
    model_based = ["dm", "dr"] if drawn else ["dm"]
    with one_thread():  # the bootstrap's sums split the same way whichever engine ran and whatever came before
        metrics = metric_rows(figures, stats.user_segment, stats.segments, n_boot, seed)
        intervals = intervals_from_units(fit, model, stats.users, stats.user_segment, evaluated, n_seg, model_based,
                                         n_boot, seed + 1)
        ope = metric_rows(weighted, stats.user_segment, stats.segments, n_boot, seed + 1) if weighted else []
    numerators = model_numerators(model.intercept[stats.user_segment], model.slope[stats.user_segment], evaluated)
    for estimator in model_based:
        low, high = intervals[estimator]
        for j, (s, name) in enumerate([(None, None), *enumerate(stats.segments)]):
            keep = np.ones(n_users, dtype=bool) if s is None else stats.user_segment == s
            n = evaluated[keep, 0].sum()
            value = float(numerators[estimator][keep].sum() / n) if n > 0 else None
            ope.append({"estimator": estimator, "segment": name, "value": value,
                        "ci_low": finite_or_none(low[j]) if value is not None else None,
                        "ci_high": finite_or_none(high[j]) if value is not None else None})
    bias_to_se = None if kernel is None else kernel.smoothing_bias_to_se
    agreement = agreeing / checked if checked else None
    # added in shard order, as the ratio sums, so that every engine gives the same figures
    depth = [depth_parts[s] for s in shards if s in depth_parts]
    shifts = depth_shifts(sum(depth[1:], depth[0])) if depth else None
    diagnostics, by_segment = _streamed_diagnostics([ratio_parts[s] for s in shards if s in ratio_parts],
                                                    stats.segments, ope, bias_to_se, shifts)
    say(1.0, "done")
    if kernel is not None:
        note = ("streamed: re-ranking metrics and DM (linear direct model) at the policy's deterministic action; "
                "IPS, SNIPS, NCIS and DR with importance ratios that smooth it with a Dirichlet kernel of "
                f"concentration {kernel.concentration:g} (chosen so that the estimated smoothing bias, "
                f"{kernel.smoothing_bias:+.4f}, stays within a quarter of the standard error, "
                f"{kernel.standard_error:.4f}, "
                "where the grid allows; DR corrects the smoothing with the direct model); overlap diagnostics and "
                "verdicts (no p99 ratio). The smoothing bias and "
                "the support coverage rest on one draw from the kernel per concentration for each request that "
                f"estimates the bias ({ratios.KERNEL_BIAS_REQUESTS:,} at most, picked by request id; every "
                "concentration is drawn for in one pass; in memory four, until the rule is met), each shard's "
                "own: the in-memory figures to Monte-Carlo error, and so the chosen concentration where the "
                "rule's margin is thin")
    elif "dr" in model_based:
        note = ("streamed: re-ranking metrics at the policy's deterministic action; IPS, SNIPS and NCIS with its "
                "exact density ratios; DM and DR (linear direct model) averaged over its own draws; overlap "
                "diagnostics and verdicts (no p99 ratio). The draws are each shard's own, so DM, DR and the "
                "support coverage are the in-memory figures to Monte-Carlo error, not to the digit")
    elif stochastic:
        note = ("streamed: re-ranking metrics and DM (linear direct model) at the policy's deterministic action; "
                "IPS, SNIPS and NCIS with its exact density ratios; no DR and no support coverage (the policy "
                "is not a Dirichlet, whose draws they would average), so no estimate is called trustworthy")
    else:
        if not stats.weight_moments[:, 0].any():
            why = ("the log records no fusion weights (NULL w_*), so there is no logged action to reweight, in "
                   "memory either")
        elif not stats.densities_logged:
            why = ("the log does not record the logging density of every request: evaluate in memory, where "
                   "the densities can be estimated")
        else:
            why = "the policy's action is per item or not a sum fusion, which has no density on the simplex"
        note = ("streamed: re-ranking metrics and DM (linear direct model) at the policy's deterministic action; "
                f"no importance-weighted estimate: {why}")
    notes = [note]
    if fusion_reordered(agreement):
        notes.append(fusion_note(agreement))
    moved = depth_note(None if shifts is None else shifts[0])
    if moved:
        notes.append(moved)
    return StreamedEvaluation(str(lake), label, stats.n_requests, n_users, len(shards), metrics, ope,
                              time.perf_counter() - start, notes, engine, diagnostics, by_segment,
                              None if kernel is None else kernel.describe(), agreement)


def _choose_concentration(parts: list[KernelTerms], model: DirectModel, stats: LogStatistics
                          ) -> tuple[int, ratios.ImportanceRatios]:
    """The smallest concentration of the grid whose estimated smoothing bias is at most `BIAS_TO_SE` of IPS's
    standard error (else the grid's last), from the shards' sums added in shard order. The standard error is
    `ratios._clustered_se`: sqrt(sum over users of (S - n m)^2) / N with m = sum S / N, expanded into sums a
    shard can make; the bias is the linear direct model's mean value of the kernel's draws less the target's,
    over the requests `ratios.kernel_bias_rows` keeps."""
    se_sums, n_squared, smoothed = parts[0].se_sums, parts[0].n_squared, parts[0].smoothed
    for part in parts[1:]:
        se_sums, n_squared, smoothed = se_sums + part.se_sums, n_squared + part.n_squared, smoothed + part.smoothed
    total = stats.n_requests
    mean = se_sums[:, 0] / total
    spread = se_sums[:, 1] - 2.0 * mean * se_sums[:, 2] + mean**2 * n_squared
    standard_error = np.sqrt(np.maximum(spread, 0.0)) / total
    # The intercepts cancel in the paired differences DM(draw) - DM(target).
    bias = (smoothed[..., 0] @ model.slope - smoothed[..., 1].sum(1)) / max(smoothed[0, :, 2].sum(), 1.0)
    within = np.flatnonzero(np.abs(bias) <= ratios.BIAS_TO_SE * standard_error)
    index = int(within[0]) if len(within) else len(bias) - 1
    grid = ratios.concentration_grid(len(stats.tasks))
    # The ratios themselves stay in the shards' per-user sums; what the choice rests on, as in memory.
    return index, ratios.ImportanceRatios(np.zeros(0), "kernel", float(grid[index]), float(bias[index]),
                                          float(standard_error[index]))


def _with_draws(ratio_part: np.ndarray) -> bool:
    """Whether a shard's `ShardTerms.ratio_sums` carry coverage counts (the target's draws were taken)."""
    return ratio_part.shape[1] > len(RATIO_SUMS)


def _streamed_diagnostics(parts: list[np.ndarray], segments: tuple[str, ...], ope: list[dict[str, object]],
                          bias_to_se: float | None = None,
                          shifts: tuple[DepthShift | None, list[DepthShift | None]] | None = None
                          ) -> tuple[dict[str, object] | None, list[dict[str, object]]]:
    """Overlap diagnostics overall and per segment from the shards' ratio sums and coverage counts (added in
    shard order, so that every engine gives the same figures), and each estimate's verdict written into its
    row (`_diagnostics` of the in-memory evaluation, less the p99 ratio; no estimate is trustworthy without
    a measured coverage, and DM only where DR is and agrees with it). Without ratios, the DM rows are
    model-based."""
    if not parts:
        for row in ope:
            row["verdict"] = "model-based"
        return None, []
    n_sums = len(RATIO_SUMS)
    per_segment = parts[0][:, :n_sums]
    for part in parts[1:]:
        per_segment = np.stack([add_ratio_sums(a, b) for a, b in zip(per_segment, part[:, :n_sums])])
    overall = per_segment[0]
    for sums in per_segment[1:]:
        overall = add_ratio_sums(overall, sums)
    covered = sum(part[:, n_sums:] for part in parts) if all(_with_draws(part) for part in parts) else None
    depth = [None] * (len(segments) + 1) if shifts is None else [shifts[0], *shifts[1]]
    out = []
    for s, (name, sums) in enumerate([(None, overall), *zip(segments, per_segment)]):
        coverage = None
        if covered is not None:
            within, draws = (covered[:, 0].sum(), covered[:, 2].sum()) if name is None else covered[s - 1, 1:]
            coverage = float(within / draws) if draws else None
        diag = diagnostics_from_sums(sums, support_coverage=coverage)
        rows = {str(o["estimator"]): o for o in ope if o["segment"] == name}
        dm, dr = rows.get("dm"), rows.get("dr")
        inside = (dm is not None and dr is not None and None not in (dm["value"], dr["ci_low"], dr["ci_high"])
                  and dr["ci_low"] <= dm["value"] <= dr["ci_high"])  # type: ignore[operator]
        shift = depth[s]
        verdicts = estimator_verdicts(diag, bias_to_se, inside, coverage_required=True,
                                      depth_moves=shift is not None and shift.moves)
        diag["depth_shift"] = None if shift is None else shift.to_json()
        for estimator, row in rows.items():
            row["verdict"], row["ess"] = verdicts.get(estimator), diag["ess"]
        diag["verdicts"] = {k: v for k, v in verdicts.items() if k in rows}
        out.append({"segment": name, **diag})
    return out[0], out[1:]

