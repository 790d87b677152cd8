"""One policy on one log: every metric, off-policy estimate, diagnostic and (on simulator logs) the truth."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from mtf_core.evaluate import context
from mtf_core.evaluate.actions import TargetActions
from mtf_core.evaluate.bootstrap import N_BOOT, bootstrap_ratio, finite_or_none
from mtf_core.evaluate.context import EvalContext
from mtf_core.evaluate.depth import DepthShift, depth_shifts, log_depth_sums, target_mean_weights
from mtf_core.evaluate.direct import DirectView, ModelTerms, direct_value, model_based_intervals
from mtf_core.evaluate.estimators import DR, NCIS, SNIPS, IPS, OPEInputs
from mtf_core.evaluate.ratios import ImportanceRatios, importance_ratio
from mtf_core.evaluate.rerank import expected_under, label_thresholds, learned_under, rerank_metrics, unit_aucs
from mtf_core.evaluate.truth import truth_with_unit_terms
from mtf_core.diagnostics import estimator_verdicts, overlap_diagnostics
from mtf_core.profile import fusion_note, fusion_reordered
from mtf_core.reward import penalty, weighted_sum
from mtf_core.store import iter_chunks
from mtf_core import threads
from mtf_core.threads import uses_cores

__all__ = ["EvaluationResult", "evaluate_policy", "point_value", "ranking_metric_terms", "metric_rows"]


@dataclass
class EvaluationResult:
    """The JSON document of DESIGN §5 plus diagnostics, with per-request values kept for plots."""

    log: str
    policy: str
    reward: dict[str, object]
    n_requests: int
    metrics: list[dict[str, object]]
    ope: list[dict[str, object]]
    ground_truth: dict[str, object] | None
    notes: list[str] = field(default_factory=list)
    ratio_info: dict[str, object] | None = None  # how the importance ratios were made (kernel, concentration)
    ratios: np.ndarray | None = None
    diagnostics: dict[str, object] | None = None
    diagnostics_by_segment: list[dict[str, object]] = field(default_factory=list)
    per_request_value: np.ndarray | None = None  # direct-model value per request, for risk measures (CVaR)
    unit_terms: dict[str, np.ndarray] = field(default_factory=dict)  # per-user terms, for paired differences
    unit_segment: np.ndarray | None = None
    n_boot: int = 0
    seed: int = 0
    sample: str = ""  # which requests: all of them, or the held-out latest sessions
    direct_model: dict[str, object] | None = None  # the model DM and DR rest on, and the models' held-out fit
    profile: dict[str, object] | None = None  # how the log's weights were logged (`profile.LogProfile`)

    @property
    def bandwidth(self) -> float | None:
        return None if self.ratio_info is None else self.ratio_info.get("bandwidth")  # type: ignore[return-value]

    def estimate(self, estimator: str, segment: str | None = None) -> dict[str, object] | None:
        """The row of one estimator (overall, or of one segment); None where it was not computed."""
        return next((o for o in self.ope if o["estimator"] == estimator and o["segment"] == segment), None)

    def to_json(self) -> dict[str, object]:
        return {"log": self.log, "policy": self.policy, "reward": self.reward, "n_requests": self.n_requests,
                "metrics": self.metrics, "ope": self.ope, "ground_truth": self.ground_truth,
                "diagnostics": self.diagnostics, "diagnostics_by_segment": self.diagnostics_by_segment,
                "ratios": self.ratio_info, "bandwidth": self.bandwidth, "sample": self.sample, "notes": self.notes,
                "direct_model": self.direct_model, "profile": self.profile}


@dataclass
class _Figures:
    """Columns of per-unit numerators/denominators, one per (figure, segment)."""

    n_units: int
    rows: list[dict[str, object]] = field(default_factory=list)
    num: list[np.ndarray] = field(default_factory=list)
    den: list[np.ndarray] = field(default_factory=list)

    def add(self, row: dict[str, object], num_u: np.ndarray, den_u: np.ndarray, unit_segment: np.ndarray,
            segments: tuple[str, ...]) -> None:
        for s, name in [(None, None), *enumerate(segments)]:
            keep = np.ones(self.n_units, dtype=bool) if s is None else unit_segment == s
            self.rows.append({**row, "segment": name})
            self.num.append(np.where(keep, num_u, 0.0))
            self.den.append(np.where(keep, den_u, 0.0))

    def finish(self, n_boot: int, seed: int) -> list[dict[str, object]]:
        if not self.rows:
            return []
        num, den = np.stack(self.num, 1), np.stack(self.den, 1)
        low, high = bootstrap_ratio(num, den, n_boot, seed)
        out = []
        for j, row in enumerate(self.rows):
            d = den[:, j].sum()
            value = float(num[:, j].sum() / d) if d > 0 else None
            out.append({**row, "value": value, "ci_low": finite_or_none(low[j]) if value is not None else None,
                        "ci_high": finite_or_none(high[j]) if value is not None else None})
        return out


def _per_unit(ctx: EvalContext, values: np.ndarray, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    n_units = len(ctx.unit_segment)
    v = np.nan_to_num(values)
    m = np.isfinite(values) if valid is None else valid
    return (np.bincount(ctx.unit, weights=np.where(m, v, 0.0), minlength=n_units),
            np.bincount(ctx.unit, weights=m.astype(np.float64), minlength=n_units))




@dataclass(frozen=True)
class _Target:
    """The direct model's view of the target policy, per request `[R]` (averaged over draws if stochastic)."""

    x: np.ndarray  # the direct model's value of the target's ranking, before calibration
    penalty: np.ndarray
    value: np.ndarray  # q(s, pi)
    x_folds: np.ndarray | None = None  # (F, R) each outcome network's x (learned model)


def _target_terms(ctx: EvalContext, actions: TargetActions, expected: np.ndarray, view: DirectView) -> _Target:
    if actions.samples is None:
        draws, signals = [actions.weights], [expected]
    else:
        draws = list(actions.samples)
        signals = [expected_under(ctx, d) for d in draws]
    pen = np.mean([penalty(ctx.resolved, d, s) for d, s in zip(draws, signals)], axis=0)
    x_folds = None
    if view.name == "learned":
        valued = [learned_under(ctx, d, actions.form, actions.bias, actions.order) for d in draws]
        x = np.mean([v[0] for v in valued], axis=0)
        x_folds = np.mean([v[1] for v in valued], axis=0)
    else:
        x = np.mean([s @ ctx.resolved.coefficients for s in signals], axis=0)
    return _Target(x, pen, view.value(ctx.log.segment, x, pen), x_folds)


@uses_cores
def evaluate_policy(ctx: EvalContext, actions: TargetActions, k: int | None = None, n_boot: int = N_BOOT,
                    seed: int = 0, with_truth: bool = True, truth_policy: Callable | None = None,
                    progress: Callable[[float, str], None] | None = None, sample: str | None = None
                    ) -> EvaluationResult:
    """Metrics, off-policy estimates with verdicts, and (on simulator logs) the ground truth of one target.
    `sample` says which requests `ctx` holds (see `evaluation_sample`)."""
    log, k = ctx.log, (k or ctx.n_top)
    report = progress or (lambda f, msg: None)
    metrics, expected = _ranking_metrics(ctx, actions, k, n_boot, seed)
    report(0.5, "metrics done")
    threads.refresh()
    view = ctx.direct_view
    target = _target_terms(ctx, actions, expected, view)
    # The kernel's smoothing bias is gauged with the linear model (`ratios`), so its DM target is the linear one.
    linear = target if view.name == "linear" else _target_terms(ctx, actions, expected, ctx.linear_view)
    ratios = importance_ratio(ctx, actions, seed, dm_target=linear.value)
    ope, unit_terms = _off_policy(ctx, view, ratios, target, n_boot, seed + 1)
    _label_sources(ctx, ope, actions.is_logging, view)
    shifts = _depth_shifts(ctx, actions) if ratios is not None else None
    diagnostics, by_segment = _diagnostics(ctx, ratios, ope, shifts)
    report(0.7, "off-policy estimates done")
    threads.refresh()
    truth = None
    if with_truth and ctx.sim_config is not None and (truth_policy is not None or actions.is_logging):
        truth, unit_terms["truth"] = truth_with_unit_terms(ctx, truth_policy, actions.form if truth_policy else "sum",
                                                           actions.bias if truth_policy else None, n_boot, seed)
        per_user = unit_terms["truth"][:, 0]
        unit_terms["truth_per_user"] = np.stack([per_user, np.ones_like(per_user)], 1)
    report(1.0, "done")
    return EvaluationResult(log.path, actions.label, ctx.resolved.to_dict(), log.n_requests, metrics, ope, truth,
                            _notes(ctx, actions, ratios, None if shifts is None else shifts[0]),
                            None if ratios is None else ratios.describe(),
                            None if ratios is None else ratios.values, diagnostics, by_segment, target.value,
                            unit_terms, ctx.unit_segment, n_boot, seed + 1,
                            sample or f"all {log.n_requests:,} requests", view.describe(), ctx.profile.to_json())


def ranking_metric_terms(ctx: EvalContext, actions: TargetActions, k: int, thresholds: np.ndarray | None = None
                         ) -> tuple[list[tuple[dict[str, object], np.ndarray, np.ndarray]], np.ndarray]:
    """Per-user sums (figure, numerator `[U]`, denominator `[U]`) of NDCG@k, GAUC, MTF-GAUC and the
    direct-method reward of the top L, and the expected signals `[R,K]` of the target's rankings. Every
    figure is a ratio of sums over users, so a streamed evaluation adds these up shard by shard."""
    log = ctx.log
    chunks = [rerank_metrics(ctx, actions, rows, k) for rows in iter_chunks(log.n_requests, context.CHUNK)]
    ndcg = np.concatenate([c.ndcg for c in chunks])
    ndcg_reward = np.concatenate([c.ndcg_reward for c in chunks])
    expected = np.concatenate([c.expected for c in chunks])
    fused = np.concatenate([c.fused_shown for c in chunks])
    n_units = len(ctx.unit_segment)
    terms: list[tuple[dict[str, object], np.ndarray, np.ndarray]] = []
    for j, task in enumerate(log.task_names):
        terms.append(({"name": f"ndcg@{k}", "task": task}, *_per_unit(ctx, ndcg[:, j])))
    terms.append(({"name": f"ndcg@{k}", "task": None}, *_per_unit(ctx, ndcg_reward)))
    shown = log.shown
    unit_flat = np.broadcast_to(ctx.unit[:, None], shown.shape)[shown]
    thresholds = label_thresholds(log) if thresholds is None else thresholds
    with np.errstate(invalid="ignore"):
        positive = log.labels[shown] > thresholds  # (shown items, K); a missing label is no positive
    # One sort and one set of ranks serve every task's GAUC and MTF-GAUC (whether anything was consumed).
    auc, valid, n_all = unit_aucs(unit_flat, fused[shown], np.c_[positive, positive.any(-1)], n_units)
    for j, task in enumerate(log.task_names):
        den = np.where(valid[:, j], n_all, 0.0)
        terms.append(({"name": "gauc", "task": task}, auc[:, j] * den, den))
    reward_weight = np.maximum(np.bincount(ctx.unit, weights=ctx.logged.total, minlength=n_units), 0.0)
    den = np.where(valid[:, -1], reward_weight, 0.0)
    terms.append(({"name": "mtf_gauc", "task": None}, auc[:, -1] * den, den))
    dm_top = weighted_sum(expected, ctx.resolved.coefficients)
    terms.append(({"name": f"dm_reward@{ctx.n_top}", "task": None}, *_per_unit(ctx, dm_top)))
    return terms, expected


def metric_rows(terms: list[tuple[dict[str, object], np.ndarray, np.ndarray]], unit_segment: np.ndarray,
                segments: tuple[str, ...], n_boot: int, seed: int) -> list[dict[str, object]]:
    """The figures of `ranking_metric_terms`, overall and per segment, with bootstrap intervals over users."""
    figs = _Figures(len(unit_segment))
    for row, num_u, den_u in terms:
        figs.add(row, num_u, den_u, unit_segment, segments)
    return figs.finish(n_boot, seed)


def _ranking_metrics(ctx: EvalContext, actions: TargetActions, k: int, n_boot: int, seed: int
                     ) -> tuple[list[dict[str, object]], np.ndarray]:
    """NDCG@k, GAUC, MTF-GAUC and the direct-method reward of the top L, and the expected signals `[R,K]`."""
    terms, expected = ranking_metric_terms(ctx, actions, k)
    return metric_rows(terms, ctx.unit_segment, ctx.log.segments, n_boot, seed), expected


def _off_policy(ctx: EvalContext, view: DirectView, ratios: ImportanceRatios | None, target: _Target, n_boot: int,
                seed: int) -> tuple[list[dict[str, object]], dict[str, np.ndarray]]:
    """IPS, SNIPS, NCIS (ratios only), DR and DM (calibration refitted in every resample) with intervals."""
    log, n_units = ctx.log, len(ctx.unit_segment)
    logged = ctx.logged
    terms = ModelTerms(view.x_logged, target.x, target.penalty, logged.penalty, logged.total,
                       None if ratios is None else ratios.values, target.x_folds, view.x_logged_folds)
    unit_terms: dict[str, np.ndarray] = {}
    rows: list[dict[str, object]] = []
    if ratios is not None:
        x = OPEInputs(logged.total, ratios.values, np.zeros(log.n_requests), target.value)
        figs = _Figures(n_units)
        for est in (IPS(), SNIPS(), NCIS()):
            ratio_terms = est.terms(x)
            num_u = np.bincount(ctx.unit, weights=ratio_terms.num, minlength=n_units)
            den_u = np.bincount(ctx.unit, weights=ratio_terms.den, minlength=n_units)
            unit_terms[est.name] = np.stack([num_u, den_u], 1)
            figs.add({"estimator": est.name}, num_u, den_u, ctx.unit_segment, log.segments)
        rows = figs.finish(n_boot, seed)
    intervals = model_based_intervals(ctx, view, terms, n_boot, seed)
    q_logged = view.value(log.segment, view.x_logged, logged.penalty)
    values = {"dm": target.value}
    if ratios is not None:
        values["dr"] = DR().terms(OPEInputs(logged.total, ratios.values, q_logged, target.value)).num
    for name, per_request in values.items():
        low, high = intervals[name]
        for j, (s, seg_name) in enumerate([(None, None), *enumerate(log.segments)]):
            keep = np.ones(log.n_requests, dtype=bool) if s is None else log.segment == s
            value = float(per_request[keep].mean()) if keep.any() else None
            rows.append({"estimator": name, "segment": seg_name, "value": value,
                         "ci_low": finite_or_none(low[j]) if value is not None else None,
                         "ci_high": finite_or_none(high[j]) if value is not None else None})
        unit_terms[name] = np.stack([np.bincount(ctx.unit, weights=per_request, minlength=n_units),
                                     np.bincount(ctx.unit, minlength=n_units).astype(np.float64)], 1)
    return rows, unit_terms


def _label_sources(ctx: EvalContext, ope: list[dict[str, object]], is_logging: bool, view: DirectView) -> None:
    """Each estimate names what it rests on: the propensities (logged, mixture, estimated) and the model."""
    for row in ope:
        name = row["estimator"]
        row["propensities"] = ("on-policy" if is_logging else ctx.propensities.source) if name != "dm" else None
        row["model"] = view.label if name in ("dm", "dr") else None


def _draw_ratios(ctx: EvalContext, ratios: ImportanceRatios) -> np.ndarray | None:
    """Target/logging density ratios `[G,R]` of draws from the target (None where the target has no draws)."""
    if ratios.draws is None or ratios.target_logp_draws is None:
        return None
    import torch

    log, model = ctx.log, ctx.propensities.model
    if model is None:
        return None
    logging_logp = np.empty(ratios.target_logp_draws.shape)
    with torch.no_grad():
        for rows in iter_chunks(log.n_requests, context.CHUNK):
            dist = model.distribution(log.state(rows))
            draws = torch.from_numpy(ratios.draws[:, rows]).to(torch.float64).clamp(min=1e-12)
            logging_logp[:, rows] = dist.log_prob(draws / draws.sum(-1, keepdim=True)).numpy()
    logging_logp += ctx.propensities.log_share
    return np.exp(np.clip(ratios.target_logp_draws - logging_logp, -700, 700))


def _depth_shifts(ctx: EvalContext, actions: TargetActions) -> tuple[DepthShift | None, list[DepthShift | None]]:
    """How the target would move how deep users see, overall and per segment (`evaluate.depth`)."""
    target = target_mean_weights(actions.weights, actions.samples, ctx.log.mask)
    return depth_shifts(log_depth_sums(ctx.log, target, ctx.unit, len(ctx.unit_segment)))


def _diagnostics(ctx: EvalContext, ratios: ImportanceRatios | None, ope: list[dict[str, object]],
                 shifts: tuple[DepthShift | None, list[DepthShift | None]] | None = None
                 ) -> tuple[dict[str, object] | None, list[dict[str, object]]]:
    """Overlap diagnostics overall and per segment, with the target's depth shift (`shifts`, overall and per
    segment); writes each estimator's verdict into its ope rows."""
    log = ctx.log
    if ratios is None:
        for row in ope:
            row["verdict"] = "model-based"
        return None, []
    draw_ratio = None if ratios.kind == "logged" else _draw_ratios(ctx, ratios)
    cap = NCIS().clip
    scopes: list[tuple[str | None, np.ndarray]] = [(None, np.ones(log.n_requests, dtype=bool))]
    scopes += [(name, log.segment == s) for s, name in enumerate(log.segments)]
    depth = [None] * len(scopes) if shifts is None else [shifts[0], *shifts[1]]
    out = []
    for (name, keep), shift in zip(scopes, depth):
        diag = overlap_diagnostics(ratios.values[keep], cap, None if draw_ratio is None else draw_ratio[:, keep])
        if ratios.kind == "logged":
            diag["support_coverage"] = 1.0
        rows = {o["estimator"]: o for o in ope if o["segment"] == name}
        dm, dr = rows.get("dm"), rows.get("dr")
        inside = (dm is not None and dr is not None and None not in (dm["value"], dr["ci_low"], dr["ci_high"])
                  and dr["ci_low"] <= dm["value"] <= dr["ci_high"])  # type: ignore[operator]
        verdicts = estimator_verdicts(diag, ratios.smoothing_bias_to_se, inside,
                                      depth_moves=shift is not None and shift.moves)
        diag["depth_shift"] = None if shift is None else shift.to_json()
        for estimator, row in rows.items():
            row["verdict"] = verdicts.get(estimator)
            row["ess"] = diag["ess"]
        diag["verdicts"] = verdicts
        diag["verdict"] = verdicts["dr"]
        out.append({"segment": name, **diag})
    return out[0], out[1:]


def _model_note(view: DirectView) -> str:
    """Which model DM and DR rest on, and why (the held-out fits that chose it)."""
    if not view.r2:
        return f"DM and DR rest on the {view.label}"
    fits = ", ".join(f"{name} {r2[0]:.3f}" for name, r2 in view.r2.items())
    return (f"DM and DR rest on the {view.label}; held-out R² of the request reward (cross-fitted over users): "
            f"{fits}")


def depth_note(shift: DepthShift | None) -> str | None:
    """What a measurable depth shift means for DM and DR, for people (None where depth does not move)."""
    if shift is None or not shift.moves:
        return None
    return (f"how deep users scroll responds to this policy: the logged exploration predicts "
            f"{abs(shift.shift):.1%} {'more' if shift.shift > 0 else 'fewer'} candidates seen under it "
            f"[{shift.low:+.1%}, {shift.high:+.1%}]; DM and DR take each request's depth as given and miss what "
            "that change is worth, so neither is called trustworthy; IPS, SNIPS and NCIS read the reward users "
            "gave and do not")


def _notes(ctx: EvalContext, actions: TargetActions, ratios: ImportanceRatios | None,
           shift: DepthShift | None = None) -> list[str]:
    model = _model_note(ctx.direct_view)
    agreement = ctx.profile.fusion_agreement
    if fusion_reordered(agreement):
        model += "; " + fusion_note(agreement)
    if ratios is None:
        return [actions.ope_note or f"{ctx.profile.mode} log: {ctx.propensities.note}; only the direct method "
                "(model-based) is shown", model]
    notes = [] if ctx.propensities.source == "logged" or actions.is_logging else [ctx.propensities.note]
    notes.append(model)
    depth = depth_note(shift)
    if depth:
        notes.append(depth)
    if ratios.kind != "kernel":
        return notes
    return notes + [f"the policy is deterministic: its importance ratios smooth it with a Dirichlet kernel of "
            f"concentration {ratios.concentration:g} centred on its weights (chosen so that the estimated "
            f"smoothing bias, {ratios.smoothing_bias:+.4f}, stays within a quarter of the standard error, "
            f"{ratios.standard_error:.4f}, where the grid allows); DR corrects the smoothing with the direct model"]


def point_value(ctx: EvalContext, actions: TargetActions) -> tuple[float, str]:
    """A point estimate without intervals, for validation during training: DR where importance ratios exist
    (for a deterministic target, its kernel's concentration chosen anew by the same rule as `evaluate_policy`),
    else DM. Returns (value, estimator). It rests on the linear direct model: validation runs many times per
    training run, and DR's model term only needs to be sensible, not learned."""
    log = ctx.log
    expected = expected_under(ctx, actions.weights, actions.form, actions.bias) if actions.samples is None else None
    target = _target_terms(ctx, actions, expected if expected is not None else np.zeros((log.n_requests, 0)),
                           ctx.linear_view)
    ratios = importance_ratio(ctx, actions, dm_target=target.value)
    if ratios is None:
        return float(target.value.mean()), "dm"
    q_logged = direct_value(ctx, ctx.logged_expected, log.weights)
    return DR().terms(OPEInputs(ctx.logged.total, ratios.values, q_logged, target.value)).value, "dr"
