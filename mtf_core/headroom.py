"""Headroom of a simulator log: how much better than the logging policy could fixed weights do?

The yardsticks every trained policy is held against, found against the simulator's truth itself (not the
log): candidate weight vectors are run online with the log's random numbers, side by side
(`run_weight_tables`), and scored under the log's reward (long-term: immediate signals plus the session
terms) and under its immediate part alone. From one set of runs:
- the best global vector;
- the best vector per segment (users never interact, so each segment picks its own best candidate);
- the best vector per segment, refined by local search around each segment's best candidate;
- the best feature-conditioned policy: within each segment, a linear softmax over the user's features picks
  one of the local-search proposals, fitted to the per-user values (an oracle: it sees the truth), then run
  as a fixed vector per user;
- the same under the immediate reward, with the per-user long-term value the myopic choice gives up;
- Spearman's rank correlation between the candidates' immediate and long-term values;
- the direct models' errors (linear and learned) on the candidates farthest from the logging policy.
Every oracle is then re-run on its own for its truth with intervals (per request and per user).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy.stats import spearmanr

from mtf_core.evaluate import EvaluationResult, evaluate_policy, policy_for_truth, target_actions
from mtf_core.evaluate.bootstrap import bootstrap_ratio
from mtf_core.evaluate.context import EvalContext
from mtf_core.evaluate.rerank import expected_under, learned_under
from mtf_core.policies.static import StaticPolicy
from mtf_core.reward import penalty, request_reward
from mtf_core.simulate import SimConfig, run_online, run_weight_tables, user_table

__all__ = ["Headroom", "headroom", "candidate_vectors", "farthest_candidates", "direct_model_errors",
           "truth_of_vectors", "segment_oracle", "evaluate_oracle", "best_static_vector", "evaluate_static_oracle", "ORACLE_LABEL",
           "STATIC_ORACLE_LABEL"]

ORACLE_LABEL = "oracle: best vector per segment"
STATIC_ORACLE_LABEL = "oracle: best global vector"

BATCH = 16  # weight tables per lockstep run


@dataclass(frozen=True)
class Headroom:
    """The oracles' truths and the gaps between them (see the module docstring)."""

    rows: list[dict[str, object]]  # one per oracle: name, reward, value per request and per user with CIs
    gaps: dict[str, float]
    gap_intervals: dict[str, list[float]]  # paired 95% intervals over users
    spearman: float
    dm_error: dict[str, object]
    n_candidates: int

    def to_json(self) -> dict[str, object]:
        return {"oracles": self.rows, "gaps": self.gaps, "gap_intervals": self.gap_intervals,
                "spearman_immediate_vs_long_term": self.spearman,
                "direct_model_error": self.dm_error, "n_candidates": self.n_candidates}


def candidate_vectors(config: SimConfig, n: int = 48, seed: int = 0) -> np.ndarray:
    """Candidate weight vectors `[C,K]`: the logging means, the centre, near-vertex blends and Dirichlet draws."""
    rng = np.random.default_rng([seed, 7])
    k = len(config.tasks)
    fixed = [np.asarray(config.logging_weights).mean(0), np.full(k, 1.0 / k)]
    fixed += [np.where(np.arange(k) == j, 0.6, 0.4 / (k - 1)) for j in range(k)]
    draws = rng.dirichlet(np.ones(k), size=max(n - len(fixed), 0))
    return np.vstack([fixed, draws])


def _per_user_values(ctx: EvalContext, tables: np.ndarray, immediate_ctx_spec) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Run P tables `[P,U,K]` in batches: per table and user, (long-term reward, immediate reward, requests)."""
    config = ctx.sim_config
    assert config is not None
    n_users = config.n_users
    out = np.zeros((tables.shape[0], n_users, 3))
    for start in range(0, tables.shape[0], BATCH):
        batch = tables[start:start + BATCH]
        run = run_weight_tables(config, batch)
        virtual = run.session % (len(batch) * n_users)
        table, user = np.divmod(virtual, n_users)
        for j, resolved in enumerate((ctx.resolved, immediate_ctx_spec)):
            total = request_reward(resolved, run.feedback_sum, run.continued, run.returned.astype(np.float64),
                                   run.weights, run.expected_sum).total
            np.add.at(out[start:start + len(batch), :, j], (table, user), total)
        np.add.at(out[start:start + len(batch), :, 2], (table, user), 1.0)
    return out


def truth_of_vectors(ctx: EvalContext, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each fixed weight vector `[C,K]` run online for every user of the simulator log: per-user long-term
    reward totals and requests, `[C,U]` each."""
    config = ctx.sim_config
    assert config is not None
    tables = np.broadcast_to(vectors[:, None, :], (len(vectors), config.n_users, vectors.shape[1])).copy()
    values = _per_user_values(ctx, tables, _immediate(ctx))
    return values[..., 0], values[..., 2]


def _immediate(ctx: EvalContext):  # type: ignore[no-untyped-def]
    """The log's reward without its session terms (same signal normalisation)."""
    spec = replace(ctx.resolved.spec, continuation=0.0, session_length=0.0, returned=0.0)
    return replace(ctx.resolved, spec=spec)


def _refine_per_segment(ctx: EvalContext, best: np.ndarray, seg_sorted: np.ndarray, long_user_of: int, seed: int,
                        rounds: int = 2, concentration: float = 60.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Refine each segment's vector `[S,K]` by local search: a table tries one Dirichlet perturbation of its
    segment's current best in every segment at once (segments never interact), and each segment keeps the
    best it has seen. `long_user_of`: 0 scores by per-user long-term value, 1 by immediate reward per request."""
    config = ctx.sim_config
    assert config is not None
    rng = np.random.default_rng([seed, 11])
    best = best.copy()
    n_seg = best.shape[0]
    score = np.full(n_seg, -np.inf)
    tried, tried_values = [], []
    for _ in range(rounds):
        proposals = np.stack([best] + [np.stack([rng.dirichlet(concentration * b + 0.5) for b in best])
                                       for _ in range(BATCH - 1)])  # (P, S, K), the incumbent first
        values = _per_user_values(ctx, proposals[:, seg_sorted, :], _immediate(ctx))
        tried.append(proposals)
        tried_values.append(values)
        for s in range(n_seg):
            users = seg_sorted == s
            if not users.any():
                continue
            if long_user_of == 0:
                scores = values[:, users, 0].sum(1)
            else:
                scores = values[:, users, 1].sum(1) / np.maximum(values[:, users, 2].sum(1), 1)
            j = int(np.argmax(scores))
            if scores[j] > score[s]:
                score[s], best[s] = scores[j], proposals[j, s]
    return best, np.concatenate(tried), np.concatenate(tried_values)


def _feature_tables(features: np.ndarray, seg_sorted: np.ndarray, proposals: np.ndarray, values: np.ndarray,
                    long_user_of: int, seed: int) -> np.ndarray:
    """Per user, the local proposal `[U,K]` a linear softmax over the user's features picks within its segment
    (fitted per segment to the per-user values of the proposals: an oracle, it sees the truth)."""
    table = np.zeros((len(seg_sorted), proposals.shape[-1]))
    per_user = values[..., 0] if long_user_of == 0 else values[..., 1] / np.maximum(values[..., 2], 1)  # (P, U)
    for s in np.unique(seg_sorted):
        users = np.flatnonzero(seg_sorted == s)
        choice = _feature_policy(features[users], per_user[:, users].T, seed)
        table[users] = proposals[choice, s]
    return table


def _feature_policy(features: np.ndarray, values: np.ndarray, seed: int) -> np.ndarray:
    """Per user, the candidate a linear softmax over standardised features picks `[U]`, fitted to maximise the
    expected per-user value `values` `[U,C]` (values standardised per user so no user dominates)."""
    x = torch.from_numpy((features - features.mean(0)) / np.maximum(features.std(0), 1e-9)).float()
    v = torch.from_numpy(values).float()
    v = (v - v.mean(1, keepdim=True)) / v.std(1, keepdim=True).clamp(min=1e-6)
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(x.shape[1], v.shape[1], generator=gen) * 0.01).requires_grad_()
    bias = torch.zeros(v.shape[1], requires_grad=True)
    optimiser = torch.optim.Adam([weight, bias], lr=0.05)
    for _ in range(300):
        optimiser.zero_grad()
        choice = torch.softmax(x @ weight + bias, 1)
        loss = -(choice * v).sum(1).mean() + 1e-3 * weight.pow(2).sum()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        return torch.argmax(x @ weight + bias, 1).numpy()


def _row(name: str, reward: str, total: np.ndarray, n_req: np.ndarray, n_boot: int, seed: int
         ) -> dict[str, object]:
    """Value per request and per user (95% intervals over users) from per-user totals and request counts."""
    low, high = bootstrap_ratio(np.stack([total, total], 1), np.stack([n_req, np.ones_like(n_req)], 1), n_boot, seed)
    return {"oracle": name, "chosen_for": reward, "per_request": float(total.sum() / n_req.sum()),
            "per_request_ci": [float(low[0]), float(high[0])], "per_user": float(total.mean()),
            "per_user_ci": [float(low[1]), float(high[1])]}


def _logging_totals(ctx: EvalContext) -> tuple[np.ndarray, np.ndarray]:
    """The logging policy's long-term reward and request count per user."""
    config = ctx.sim_config
    assert config is not None
    run = run_online(config, None)
    total = request_reward(ctx.resolved, run.feedback_sum, run.continued, run.returned.astype(np.float64),
                           run.weights, run.expected_sum).total
    user = run.session % config.n_users
    return (np.bincount(user, weights=total, minlength=config.n_users),
            np.bincount(user, minlength=config.n_users).astype(np.float64))


def _gaps(per_user: dict[str, np.ndarray], n_boot: int, seed: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """The headroom gaps as ratios of per-user sums, with paired 95% intervals: every oracle met the same users
    and random numbers, so their per-user differences are resampled together."""
    base, g, s, f, imm = (per_user[k] for k in ("logging", "global", "segment", "features", "myopic"))
    ratios = {"per_segment_over_global_share_of_logging": (s - g, base),
              "features_over_per_segment_share_of_logging": (f - s, base),
              "myopic_loss_share_of_long_term": (g - imm, g),
              "best_global_over_logging_share": (g - base, base)}
    num = np.stack([n for n, _ in ratios.values()], 1)
    den = np.stack([d for _, d in ratios.values()], 1)
    low, high = bootstrap_ratio(num, den, n_boot, seed)
    values = {k: float(n.sum() / d.sum()) for k, (n, d) in ratios.items()}
    return values, {k: [float(lo), float(hi)] for k, lo, hi in zip(ratios, low, high)}


def _users_by_segment(ctx: EvalContext) -> tuple[np.ndarray, np.ndarray]:
    """Per simulated user: the index of its segment in the log's (sorted) segments, and its features."""
    assert ctx.sim_config is not None
    segment_of_user, features = user_table(ctx.sim_config)
    return np.searchsorted(np.asarray(ctx.log.segments), segment_of_user), features


def segment_oracle(ctx: EvalContext, n_candidates: int = 32, seed: int = 0) -> np.ndarray:
    """The best vector per segment `[S,K]` (the log's segment order) for per-user long-term value, found
    against the truth: the yardstick of the Compare page's share of headroom."""
    if ctx.sim_config is None:
        raise ValueError("the oracle needs a simulator log (its truth is the simulator)")
    seg_sorted, _ = _users_by_segment(ctx)
    candidates = candidate_vectors(ctx.sim_config, n_candidates, seed)
    tables = np.broadcast_to(candidates[:, None, :], (len(candidates), len(seg_sorted), candidates.shape[1])).copy()
    long_user = _per_user_values(ctx, tables, _immediate(ctx))[..., 0]
    first = _best_per_segment(long_user, seg_sorted, len(ctx.log.segments))
    return _refine_per_segment(ctx, candidates[first], seg_sorted, 0, seed)[0]


def evaluate_oracle(ctx: EvalContext, n_boot: int = 500, seed: int = 0, k: int | None = None,
                    sample: str | None = None) -> EvaluationResult:
    """The per-segment oracle evaluated like any policy on the same requests (its truth is the yardstick)."""
    policy = StaticPolicy(ctx.log.task_names, ctx.log.segments, segment_oracle(ctx, seed=seed), label=ORACLE_LABEL)
    actions = target_actions(policy, ctx.log, ORACLE_LABEL, seed=seed)
    return evaluate_policy(ctx, actions, k=k, n_boot=n_boot, seed=seed, truth_policy=policy_for_truth(policy, False),
                           sample=sample)


def best_static_vector(ctx: EvalContext, n_candidates: int = 48, seed: int = 0) -> np.ndarray:
    """The candidate vector `[K]` with the best per-user long-term truth over the simulated horizon: the best
    global static vector, found against the truth (a yardstick, not something a log could give)."""
    candidates = candidate_vectors(ctx.sim_config, n_candidates, seed)  # type: ignore[arg-type]
    totals, _ = truth_of_vectors(ctx, candidates)
    return candidates[int(np.argmax(totals.mean(1)))]


def evaluate_static_oracle(ctx: EvalContext, n_boot: int = 500, seed: int = 0, k: int | None = None,
                           sample: str | None = None) -> EvaluationResult:
    """The best global static vector evaluated like any policy on the same requests."""
    weights = np.tile(best_static_vector(ctx, seed=seed), (len(ctx.log.segments), 1))
    policy = StaticPolicy(ctx.log.task_names, ctx.log.segments, weights, label=STATIC_ORACLE_LABEL)
    actions = target_actions(policy, ctx.log, STATIC_ORACLE_LABEL, seed=seed)
    return evaluate_policy(ctx, actions, k=k, n_boot=n_boot, seed=seed, truth_policy=policy_for_truth(policy, False),
                           sample=sample)


def _best_per_segment(long_user: np.ndarray, seg_sorted: np.ndarray, n_seg: int) -> np.ndarray:
    """Per segment, the candidate `[C,U]` with the highest total long-term value over its users."""
    best_global = int(np.argmax(long_user.sum(1)))
    return np.array([int(np.argmax(long_user[:, seg_sorted == s].sum(1))) if np.any(seg_sorted == s)
                     else best_global for s in range(n_seg)])


def headroom(ctx: EvalContext, n_candidates: int = 48, n_boot: int = 500, seed: int = 0) -> Headroom:
    """The oracle yardsticks of a simulator log (module docstring)."""
    config = ctx.sim_config
    if config is None:
        raise ValueError("headroom needs a simulator log (its truth is the simulator)")
    log = ctx.log
    seg_sorted, features = _users_by_segment(ctx)
    candidates = candidate_vectors(config, n_candidates, seed)
    tables = np.broadcast_to(candidates[:, None, :], (len(candidates), config.n_users, candidates.shape[1])).copy()
    values = _per_user_values(ctx, tables, _immediate(ctx))  # (C, U, 3)
    long_user, immediate_total, n_req = values[..., 0], values[..., 1], values[..., 2]
    per_user_long = long_user.mean(1)  # (C,)
    per_request_immediate = immediate_total.sum(1) / n_req.sum(1)
    best_global = int(np.argmax(per_user_long))
    best_immediate = int(np.argmax(per_request_immediate))
    per_segment = _best_per_segment(long_user, seg_sorted, len(log.segments))
    per_segment_imm = np.array([int(np.argmax(immediate_total[:, seg_sorted == s].sum(1)
                                              / np.maximum(n_req[:, seg_sorted == s].sum(1), 1)))
                                if np.any(seg_sorted == s) else best_immediate for s in range(len(log.segments))])
    per_segment, tried, tried_values = _refine_per_segment(ctx, candidates[per_segment], seg_sorted, 0, seed)
    by_features = _feature_tables(features, seg_sorted, tried, tried_values, 0, seed)
    per_segment_imm, tried, tried_values = _refine_per_segment(ctx, candidates[per_segment_imm], seg_sorted, 1, seed)
    by_features_imm = _feature_tables(features, seg_sorted, tried, tried_values, 1, seed)
    named = [
        ("best global vector", "long-term", np.tile(candidates[best_global], (config.n_users, 1))),
        ("best vector per segment", "long-term", per_segment[seg_sorted]),
        ("best feature-conditioned", "long-term", by_features),
        ("best global vector", "immediate", np.tile(candidates[best_immediate], (config.n_users, 1))),
        ("best vector per segment", "immediate", per_segment_imm[seg_sorted]),
        ("best feature-conditioned", "immediate", by_features_imm),
    ]
    logging_total, logging_requests = _logging_totals(ctx)
    values = _per_user_values(ctx, np.stack([t for _, _, t in named]), _immediate(ctx))  # (P, U, 3)
    rows = [_row("logging policy", "-", logging_total, logging_requests, n_boot, seed),
            *(_row(name, reward, v[:, 0], v[:, 2], n_boot, seed) for (name, reward, _), v in zip(named, values))]
    gaps, gap_intervals = _gaps({"logging": logging_total, "global": values[0, :, 0], "segment": values[1, :, 0],
                                 "features": values[2, :, 0], "myopic": values[3, :, 0]}, n_boot, seed)
    rho = float(spearmanr(per_request_immediate, per_user_long).statistic)
    far = farthest_candidates(config, candidates)
    return Headroom(rows, gaps, gap_intervals, rho,
                    direct_model_errors(ctx, candidates[far], long_user[far], n_req[far]), len(candidates))


def farthest_candidates(config: SimConfig, candidates: np.ndarray, share: float = 1 / 3) -> np.ndarray:
    """Indices of the `share` of candidate vectors farthest (L1) from the logging policy's mean weights."""
    logging_mean = np.asarray(config.logging_weights).mean(0)
    return np.argsort(-np.abs(candidates - logging_mean).sum(1))[: max(int(len(candidates) * share), 1)]


def direct_model_errors(ctx: EvalContext, candidates: np.ndarray, long_user: np.ndarray, n_req: np.ndarray
                        ) -> dict[str, object]:
    """The direct models' errors per request against the truth (per-user totals `long_user` and requests
    `n_req`, `[C,U]`) over the candidate vectors `[C,K]`: per model the worst relative error and the mean
    absolute error, and the learned model's mean absolute error as a share of the linear one's."""
    views = {"linear": ctx.linear_view, "learned": ctx.learned_view}
    errors: dict[str, list[tuple[float, float, float]]] = {name: [] for name, v in views.items() if v is not None}
    seg = ctx.log.segment
    for c in range(len(candidates)):
        w = np.tile(candidates[c], (ctx.log.n_requests, 1))
        expected = expected_under(ctx, w)
        pen = penalty(ctx.resolved, w, expected)
        truth = float(long_user[c].sum() / n_req[c].sum())
        for name in errors:
            view = views[name]
            assert view is not None
            x = expected @ ctx.resolved.coefficients if name == "linear" else learned_under(ctx, w)[0]
            dm = float(view.value(seg, x, pen).mean())
            errors[name].append((abs(dm - truth) / abs(truth), dm, truth))
    out: dict[str, object] = {}
    for name, errs in errors.items():
        worst = max(errs)
        out[name] = {"relative_error": worst[0], "dm": worst[1], "truth": worst[2],
                     "mean_absolute_error": float(np.mean([abs(dm - t) for _, dm, t in errs]))}
    if "learned" in out:
        out["learned_over_linear"] = (out["learned"]["mean_absolute_error"]  # type: ignore[index]
                                      / out["linear"]["mean_absolute_error"])  # type: ignore[index]
    return out
