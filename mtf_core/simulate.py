"""The embedded default: a seeded user simulator that writes session logs and evaluates policies online.

Model (all vectorised over sessions; the only Python loop runs over the steps of a session):
- users belong to segments (new, casual, core, power) that differ in latent taste, in how strongly item
  relevance drives each task, and in what satisfies them (`satisfaction` weights per task), so the best
  fusion weights differ by segment, and by user through the latent taste that `uf_f*` features reveal;
- each request draws N candidates; the true probability of each event given an examination is
  click: sigmoid(a + g * <u, v_click>), then like/finish/share conditional on a click, and watch time
  (minutes) after a click; the MTL scores are noisy, biased predictions of those per-impression rates;
- the top L of the fused ranking are shown; examination falls with position as (1 + p) ** -decay;
- satisfaction is the user's own taste of each observed signal, minus disappointment (clicks that do not
  end in a finish) and regret (clicks on clickbait, which draws clicks and watch minutes, so today's signals
  like it); a session continues with a probability that rises with recent satisfaction and with engagement
  (satisfaction built over earlier days), and whether the user returns tomorrow depends on both, so
  blends that win today's signals can lose sessions and days (long-term != myopic);
- the MTL scores over-predict clickbait and popular items and are biased by segment, so a direct model
  built on them errs where a policy moves far from the logged weights;
- the logging policy is a legacy click- and watch-heavy blend: a Dirichlet around it (`dirichlet`), one
  production vector (`deterministic`), A/B arms (`buckets`) or production plus an exploration share
  (`mixed`); optionally a share of requests ranks each candidate with its own perturbed weights.

Common random numbers: every random draw of (session, step) comes from a generator keyed by
(seed, step) and is drawn for all sessions, active or not, so any policy run online meets the same users,
candidates, prediction noise and feedback uniforms as the log. `run_online(config, policy)` is the ground
truth; run with the logging policy it reproduces the log exactly.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable

import numpy as np
import torch

from mtf_core.fusion import fuse, rank_positions
from mtf_core.policies.base import StateBatch, context_features
from mtf_core.schema import Task

__all__ = [
    "SimConfig",
    "LOGGING_MODES",
    "SimTables",
    "OnlineOutcome",
    "SIM_TASKS",
    "simulate",
    "run_online",
    "run_weight_tables",
    "user_table",
    "session_start_seconds",
    "logging_policy_fn",
    "position_curve",
    "PolicyFn",
]

SIM_TASKS = (
    Task("click", "binary", "opened the item"),
    Task("like", "binary", "liked the item"),
    Task("finish", "binary", "watched to the end (long view)"),
    Task("share", "binary", "shared the item"),
    Task("watch_time", "continuous", "minutes watched"),
)
_K = len(SIM_TASKS)
LOGGING_MODES = ("dirichlet", "deterministic", "buckets", "mixed")

PolicyFn = Callable[[StateBatch], torch.Tensor]


def _t(rows: list[list[float]]) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(float(v) for v in r) for r in rows)


@dataclass(frozen=True)
class SimConfig:
    """Everything that defines a simulated log; stored as JSON in `meta.simulator_config` for replay."""

    n_users: int = 2000
    n_items: int = 5000
    sessions_per_user: int = 6
    n_candidates: int = 20
    n_shown: int = 6
    max_steps: int = 30
    seed: int = 0
    latent_dim: int = 8
    logging_concentration: float = 10.0
    """Total Dirichlet concentration of the logging policy: higher explores less."""
    logging_mode: str = "dirichlet"
    """How the logged weights were chosen: `dirichlet` (every request explores, known density),
    `deterministic` (one production vector per segment, as most companies run), `buckets` (an A/B test of
    `n_buckets` fixed vectors, users assigned by id), or `mixed` (production traffic plus an
    `exploration_share` of requests drawn from the Dirichlet, IntegratedRL-MTF's setting)."""
    exploration_share: float = 0.1
    """`mixed` only: the share of requests whose weights are drawn from the exploration Dirichlet."""
    n_buckets: int = 3
    """`buckets` only: the number of A/B arms (the production vector and variants of it)."""
    per_item_share: float = 0.0
    """The share of logged requests whose candidates are each ranked with their own weights, drawn from
    Dirichlet(per_item_concentration * the request's weights): the data per-item policies learn from."""
    per_item_concentration: float = 50.0
    """How closely per-item weights follow the request's: higher perturbs less."""
    later_stage_share: float = 0.0
    """The share of requests (under every policy, the logging one and those the truth runs) whose shown slate a
    later stage reorders after the fusion: a business rule moves the most popular shown item to the top.
    The logged weights' fusion then no longer reproduces what users saw (`profile.fusion_agreement`)."""
    short_scroll_share: float = 0.0
    """The share of requests (under every policy) whose user stops scrolling early: they see the top d slots of
    the slate, d uniform in 1..n_shown-1, and nothing below, whatever the ranking. Logged requests then show
    different numbers of candidates, as in production."""
    scroll_by_appeal: bool = False
    """With `short_scroll_share`: those users decide slot by slot instead, going on past each slot with
    probability `scroll_floor + (1 - scroll_floor) *` the finish rate of the item there, so how deep they see
    depends on the ranking (a policy that puts engaging items on top is seen deeper), as in a cascade model."""
    scroll_floor: float = 0.5
    position_decay: float = 0.8
    segment_names: tuple[str, ...] = ("new", "casual", "core", "power")
    segment_shares: tuple[float, ...] = (0.2, 0.35, 0.3, 0.15)
    logging_weights: tuple[tuple[float, ...], ...] = _t([[0.4, 0.15, 0.15, 0.1, 0.2]] * 4)
    """Per segment, the logging policy's mean weights (click, like, finish, share, watch_time): a legacy,
    click- and watch-time-heavy blend, as production systems often start from."""
    satisfaction: tuple[tuple[float, ...], ...] = _t(
        [[1.0, 0.3, 1.0, 0.5, 0.2], [0.8, 0.5, 0.8, 1.0, 0.3], [0.3, 1.0, 1.2, 1.5, 0.5], [0.2, 1.5, 0.8, 3.0, 0.5]]
    )
    """Per segment, how much each observed signal satisfies the user (drives continuation and return)."""
    task_gain: tuple[tuple[float, ...], ...] = _t(
        [[1.6, 0.6, 1.4, 0.4, 1.0], [1.2, 1.0, 1.0, 1.0, 1.0], [0.8, 1.4, 1.2, 1.4, 1.2], [0.6, 1.6, 1.0, 2.0, 1.2]]
    )
    """Per segment, how strongly user-item relevance moves each task's logit."""
    task_offset: tuple[tuple[float, ...], ...] = _t(
        [[-1.6, -2.2, -1.0, -4.0, 0.0], [-1.2, -1.8, -0.8, -3.4, 0.0], [-1.0, -1.4, -0.6, -3.0, 0.0], [-0.8, -1.2, -0.6, -2.6, 0.0]]
    )
    score_noise: tuple[float, ...] = (0.35, 0.6, 0.45, 0.8, 0.4)
    """Per task, the MTL prediction noise (std in logit space, or log space for watch time)."""
    score_bias: tuple[float, ...] = (0.1, -0.2, 0.0, 0.3, -0.1)
    score_bias_segment: tuple[tuple[float, ...], ...] = _t(
        [[0.4, 1.2, -0.6, 1.4, 0.5], [0.0, 0.4, 0.0, 0.5, 0.0], [-0.3, -0.5, 0.3, -0.4, -0.2], [-0.6, -1.0, 0.5, -1.0, -0.4]]
    )
    """Per segment, extra MTL bias (logit, or log for watch time): the model was trained mostly on casual
    users, so it over-predicts likes and shares of new users and under-predicts those of power users."""
    score_bias_clickbait: tuple[float, ...] = (0.5, 0.0, 0.6, 0.0, 0.3)
    """Per task, MTL bias per unit of an item's clickbait: the model cannot see disappointment, so it
    over-predicts the clicks, finishes and watch time of clickbait."""
    score_bias_popularity: tuple[float, ...] = (0.4, 1.0, 0.4, 1.0, 0.3)
    """Per task, MTL bias per standard deviation of an item's popularity: trained on exposure it favoured, the
    model over-predicts popular items and under-predicts niche ones."""
    taste_scale: float = 0.8
    """Spread of each user's latent taste: satisfaction weight = segment's x exp(taste_scale * taste)."""
    taste_rate_effect: float = 1.0
    """How much a user's taste also moves their true like/finish/share rates (in logit space) where the MTL
    model, trained on segment-level data, cannot see it: weights should follow the user's taste."""
    disappointment: tuple[float, ...] = (1.4, 1.1, 0.8, 0.5)
    """Per segment, satisfaction lost per click that does not end in a finish (clickbait that disappoints)."""
    clickbait_rates: tuple[float, ...] = (1.0, -0.3, -0.3, -0.3, 0.0)
    """Per task, how an item's clickbait moves its true rates (logit): it draws clicks and costs quality."""
    clickbait_length: float = 0.6
    """How an item's clickbait lengthens it (log minutes): bait that keeps people watching."""
    regret: tuple[float, ...] = (3.0, 2.4, 2.0, 1.6)
    """Per segment, satisfaction lost per click on an item, per unit of its (positive) clickbait: content that
    pays in today's signals and leaves the user less likely to stay and come back."""
    continue_base: tuple[float, ...] = (-2.6, -2.0, -2.0, -2.3)
    continue_slope: float = 1.2
    return_base: tuple[float, ...] = (-0.2, 0.3, 0.6, 0.9)
    return_slope: float = 1.2
    engagement_continue: float = 1.0
    """How much a user's engagement (satisfaction built over earlier days) lengthens today's sessions."""
    engagement_return: float = 2.0
    """How much engagement brings a user back the next day."""
    engagement_memory: float = 0.6
    """Share of yesterday's engagement kept each day (the rest is today's mean satisfaction)."""
    start: str = "2026-01-05T00:00:00"

    def __post_init__(self) -> None:
        s = len(self.segment_names)
        checks = {
            "n_users": self.n_users >= 1, "n_items": self.n_items >= self.n_candidates,
            "sessions_per_user": self.sessions_per_user >= 1, "n_candidates": self.n_candidates >= 2,
            "n_shown": 1 <= self.n_shown <= self.n_candidates, "max_steps": self.max_steps >= 1,
            "logging_concentration": self.logging_concentration > 0,
            "logging_mode": self.logging_mode in LOGGING_MODES,
            "exploration_share": 0.0 < self.exploration_share <= 1.0, "n_buckets": 2 <= self.n_buckets <= 10,
            "per_item_share": 0.0 <= self.per_item_share <= 1.0, "per_item_concentration": self.per_item_concentration > 0,
            "later_stage_share": 0.0 <= self.later_stage_share <= 1.0,
            "short_scroll_share": 0.0 <= self.short_scroll_share <= 1.0 and (self.short_scroll_share == 0
                                                                            or self.n_shown >= 2),
            "scroll_floor": 0.0 <= self.scroll_floor <= 1.0,
            "segment tables": all(len(t) == s for t in (self.segment_shares, self.logging_weights, self.satisfaction,
                                                          self.task_gain, self.task_offset, self.continue_base,
                                                          self.return_base, self.score_bias_segment,
                                                          self.disappointment, self.regret)),
            "task tables": all(len(r) == _K for r in (*self.logging_weights, *self.satisfaction, *self.task_gain,
                                                       *self.task_offset, *self.score_bias_segment, self.score_noise,
                                                       self.score_bias, self.score_bias_clickbait, self.score_bias_popularity,
                                                       self.clickbait_rates)),
            "engagement_memory": 0.0 <= self.engagement_memory < 1.0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid simulator config: {', '.join(bad)}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "SimConfig":
        raw = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"simulator config has unknown fields: {sorted(unknown)}")
        def freeze(v: object) -> object:
            return tuple(freeze(x) for x in v) if isinstance(v, list) else v
        return cls(**{k: freeze(v) for k, v in raw.items()})

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(t.name for t in SIM_TASKS)

    @property
    def sorted_segments(self) -> tuple[str, ...]:
        return tuple(sorted(self.segment_names))


def position_curve(config: SimConfig, n_positions: int | None = None) -> np.ndarray:
    """Examination probability per 0-based position: (1 + p) ** -decay."""
    n = config.n_shown if n_positions is None else n_positions
    return (1.0 + np.arange(n)) ** (-config.position_decay)


@dataclass(frozen=True)
class _World:
    """The static part of the simulation: users and items (the same for any horizon and any policy)."""

    user_segment: np.ndarray  # (U,) index into config.segment_names
    user_latent: np.ndarray  # (U, D)
    user_taste: np.ndarray  # (U, K) satisfaction multipliers: the user's own taste
    user_features: dict[str, np.ndarray]
    item_latent: np.ndarray  # (I, K, D) task-specific item directions
    item_bias: np.ndarray  # (I, K)
    item_clickbait: np.ndarray  # (I,)
    item_popularity: np.ndarray  # (I,) the `popularity` feature, standardised
    item_length: np.ndarray  # (I,) mean watch minutes
    item_features: dict[str, np.ndarray]


def _build_world(config: SimConfig) -> _World:
    rng = np.random.default_rng([config.seed, 0])
    n_seg, d = len(config.segment_names), config.latent_dim
    shares = np.asarray(config.segment_shares) / np.sum(config.segment_shares)
    segment = rng.choice(n_seg, size=config.n_users, p=shares)
    seg_centre = rng.normal(0.0, 0.7, size=(n_seg, d))
    latent = seg_centre[segment] + rng.normal(0.0, 1.0, size=(config.n_users, d))
    projection = rng.normal(0.0, 1.0 / np.sqrt(d), size=(d, 4))
    seg_rank = segment / max(n_seg - 1, 1)
    user_features = {
        "activity": seg_rank * 2.0 + rng.normal(0.0, 0.5, config.n_users),
        "tenure_days": np.round(np.exp(1.0 + 4.0 * seg_rank + rng.normal(0.0, 0.6, config.n_users))),
        **{f"f{j}": latent @ projection[:, j] + rng.normal(0.0, 0.3, config.n_users) for j in range(4)},
    }
    base = rng.normal(0.0, 1.0, size=(config.n_items, d))
    item_latent = base[:, None, :] * 0.5 + rng.normal(0.0, 0.85, size=(config.n_items, _K, d))
    # Clickbait: items that draw clicks and longer watching, a little less of the rest, and regret (in `_run`).
    clickbait = rng.normal(0.0, 1.0, config.n_items)
    item_bias = rng.normal(0.0, 0.5, size=(config.n_items, _K)) + np.outer(clickbait, config.clickbait_rates)
    item_length = np.exp(rng.normal(0.0, 0.5, config.n_items) + config.clickbait_length * clickbait)
    item_projection = rng.normal(0.0, 1.0 / np.sqrt(d), size=(d, 2))
    item_features = {
        "length": item_length,
        "popularity": item_bias.mean(1) + rng.normal(0.0, 0.2, config.n_items),
        "f0": base @ item_projection[:, 0],
        "f1": base @ item_projection[:, 1],
    }
    # Taste: which signals satisfy this user, beyond the segment's habits. It lives in the same latent space
    # that the features f0..f3 project (with noise), so features reveal it only partly. Drawn last, so that
    # everything above is the same as in worlds without it.
    taste_map = rng.normal(0.0, 1.0, size=(d, _K))
    taste = np.exp(config.taste_scale * (latent - seg_centre[segment]) @ taste_map / np.sqrt(d))
    popularity = item_features["popularity"]
    return _World(segment, latent, taste, user_features, item_latent, item_bias, clickbait,
                  (popularity - popularity.mean()) / popularity.std(), item_length, item_features)


def user_table(config: SimConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per simulated user: the segment name and the user features `[U,F]` (in `uf_*` column order)."""
    world = _build_world(config)
    features = np.stack([world.user_features[k] for k in world.user_features], 1)
    return np.asarray(config.segment_names)[world.user_segment], features


def session_start_seconds(config: SimConfig, session: np.ndarray) -> np.ndarray:
    """Start of a session (index day * n_users + user, day-major so indices stay put when the horizon grows)
    in seconds after `config.start`: its day plus a time of day drawn per (user, day)."""
    day, user = np.divmod(np.asarray(session), config.n_users)
    out = np.empty(day.shape, dtype=np.float64)
    for d in np.unique(day):
        hours = np.random.default_rng([config.seed, 3, int(d)]).uniform(6 * 3600, 23 * 3600, config.n_users)
        m = day == d
        out[m] = d * 86400.0 + hours[user[m]]
    return out


@dataclass
class _StepDraws:
    """Common random numbers of one step, drawn for every session."""

    cand_base: np.ndarray
    cand_stride: np.ndarray
    score_noise: np.ndarray  # (S, N, K)
    feedback_u: np.ndarray  # (S, N, 4) click, like, finish, share
    watch_z: np.ndarray  # (S, N)
    continue_u: np.ndarray  # (S,)
    logging_gamma_u: np.ndarray  # (S, K) uniforms turned into Gamma draws by inverse CDF
    explore_u: np.ndarray  # (S,) mixed logging: the request explores when below the exploration share
    per_item_u: np.ndarray  # (S,) the request is perturbed per item when below the per-item share
    per_item_gamma_u: np.ndarray  # (S, N, K), or (S, 0, 0) when no request is perturbed per item
    later_stage_u: np.ndarray  # (S,) a later stage reorders the request's slate when below its share
    scroll_u: np.ndarray  # (S,) the user stops scrolling early when below its share (and how early)
    scroll_slot_u: np.ndarray  # (S, n_shown) with scroll_by_appeal: whether the user goes on past each slot


def _draws(config: SimConfig, n_sessions: int, day: int, step: int) -> _StepDraws:
    rng = np.random.default_rng([config.seed, 1, day, step])
    n, k = config.n_candidates, _K
    strides = _coprime_strides(config.n_items)
    return _StepDraws(
        cand_base=rng.integers(0, config.n_items, n_sessions),
        cand_stride=strides[rng.integers(0, len(strides), n_sessions)],
        score_noise=rng.standard_normal((n_sessions, n, k), dtype=np.float32),
        feedback_u=rng.random((n_sessions, n, 4), dtype=np.float32),
        watch_z=rng.standard_normal((n_sessions, n), dtype=np.float32),
        continue_u=rng.random(n_sessions),
        logging_gamma_u=rng.random((n_sessions, k)),
        explore_u=rng.random(n_sessions),
        # Drawn last, and only when used: every earlier stream is the same with or without them.
        per_item_u=rng.random(n_sessions) if config.per_item_share > 0 else np.ones(n_sessions),
        per_item_gamma_u=(rng.random((n_sessions, n, k)) if config.per_item_share > 0
                          else np.zeros((n_sessions, 0, 0))),
        later_stage_u=rng.random(n_sessions) if config.later_stage_share > 0 else np.ones(n_sessions),
        scroll_u=rng.random(n_sessions) if config.short_scroll_share > 0 else np.ones(n_sessions),
        scroll_slot_u=(rng.random((n_sessions, config.n_shown)) if config.short_scroll_share > 0
                       and config.scroll_by_appeal else np.zeros((n_sessions, 0))),
    )


def _coprime_strides(n_items: int) -> np.ndarray:
    cand = np.arange(1, min(n_items, 4000))
    return cand[np.gcd(cand, n_items) == 1]


def _return_uniforms(config: SimConfig, day: int) -> np.ndarray:
    """Per user, the uniform that decides whether they come back the day after `day`."""
    return np.random.default_rng([config.seed, 2, day]).random(config.n_users)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _conditional_logits(config: SimConfig, world: _World, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """`(A, N, K)` logits of P(click | examined), then P(like | click), P(finish | click), P(share | click),
    unused, as the MTL model can know them (segment, relevance, item): without the user's own taste."""
    seg = world.user_segment[users]
    u = world.user_latent[users]  # (A, D)
    relevance = np.einsum("ad,ankd->ank", u, world.item_latent[items]) / np.sqrt(config.latent_dim)
    gain = np.asarray(config.task_gain)[seg][:, None, :]
    offset = np.asarray(config.task_offset)[seg][:, None, :]
    return offset + gain * relevance + world.item_bias[items]


def _taste_logits(config: SimConfig, world: _World, users: np.ndarray) -> np.ndarray:
    """`(A, 1, K)`: how the user's taste moves their like, finish and share rates (not clicks or watch time)."""
    effect = config.taste_rate_effect * np.log(world.user_taste[users]) * np.array([0.0, 1.0, 1.0, 1.0, 0.0])
    return effect[:, None, :]


def _true_rates(world: _World, items: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Per-impression expected signal given examination, `(A, N, K)`: click, like, finish, share, watch."""
    click = p[..., 0]
    watch = click * world.item_length[items] * (0.35 + 0.65 * p[..., 2]) * np.exp(0.045)
    return np.stack([click, click * p[..., 1], click * p[..., 2], click * p[..., 3], watch], axis=-1)


def _mtl_scores(config: SimConfig, rates: np.ndarray, noise: np.ndarray, segment: np.ndarray,
                clickbait: np.ndarray, popularity: np.ndarray) -> np.ndarray:
    """Noisy, biased predictions of `rates` `(A, N, K)`: logit-space noise for binary tasks, log-space for
    watch time; the bias depends on the user's segment and on the item's clickbait (`(A,)`, `(A, N)`)."""
    sigma = np.asarray(config.score_noise)
    bias = (np.asarray(config.score_bias) + np.asarray(config.score_bias_segment)[segment][:, None, :]
            + clickbait[..., None] * np.asarray(config.score_bias_clickbait)
            + popularity[..., None] * np.asarray(config.score_bias_popularity))  # (A, N, K)
    binary = np.clip(rates[..., :4], 1e-6, 1 - 1e-6)
    logits = np.log(binary) - np.log1p(-binary) + bias[..., :4] + sigma[:4] * noise[..., :4]
    watch = rates[..., 4] * np.exp(bias[..., 4] + sigma[4] * noise[..., 4] - 0.5 * sigma[4] ** 2)
    return np.concatenate([_sigmoid(logits), watch[..., None]], axis=-1).astype(np.float32)


def _feedback(config: SimConfig, world: _World, items: np.ndarray, p: np.ndarray, positions: np.ndarray,
              draws_u: np.ndarray, watch_z: np.ndarray) -> np.ndarray:
    """Observed feedback `(A, N, K)` of shown candidates (NaN where not shown)."""
    shown = positions < config.n_shown
    exam = np.where(shown, (1.0 + positions) ** (-config.position_decay), 0.0)
    click = draws_u[..., 0] < exam * p[..., 0]
    like = click & (draws_u[..., 1] < p[..., 1])
    finish = click & (draws_u[..., 2] < p[..., 2])
    share = click & (draws_u[..., 3] < p[..., 3])
    watch = click * world.item_length[items] * (0.35 + 0.65 * finish) * np.exp(0.3 * watch_z)
    y = np.stack([click, like, finish, share, watch], axis=-1).astype(np.float32)
    y[~shown] = np.nan
    return y


def _dirichlet_from_uniforms(alpha: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Dirichlet draws by inverse-CDF Gamma draws, so a draw depends only on its own uniforms."""
    from scipy.special import gammaincinv

    g = gammaincinv(alpha, np.clip(u, 1e-12, 1 - 1e-12))
    return g / g.sum(-1, keepdims=True)


def logging_alpha(config: SimConfig) -> np.ndarray:
    """Dirichlet concentration of the logging policy per segment (config order), `(S, K)`."""
    return np.asarray(config.logging_weights) * config.logging_concentration


def bucket_weights(config: SimConfig) -> np.ndarray:
    """`buckets` logging: the A/B arms `(B, S, K)` (config segment order): the production vector per segment,
    then variants that move a fifth of its weight onto one other task each (finish, like, share, ...)."""
    base = np.asarray(config.logging_weights)
    arms = [base]
    for j in (2, 1, 3, 4, 0)[: config.n_buckets - 1]:
        arms.append(0.8 * base + 0.2 * np.eye(_K)[j])
    return np.stack(arms)


def _per_item_weights(config: SimConfig, weights: np.ndarray, per_item_u: np.ndarray, gamma_u: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(weights per candidate `(A,N,K)`, perturbed `(A,)`): the request's weights on every candidate, except
    for the per-item share of requests, whose candidates each get a Dirichlet draw around them."""
    item_weights = np.repeat(weights[:, None, :], config.n_candidates, axis=1)
    perturbed = per_item_u < config.per_item_share
    if perturbed.any():
        alpha = np.maximum(config.per_item_concentration * weights[perturbed], 1e-3)[:, None, :]
        item_weights[perturbed] = _dirichlet_from_uniforms(np.broadcast_to(alpha, gamma_u[perturbed].shape),
                                                           gamma_u[perturbed])
    return item_weights, perturbed


def logging_policy_fn(config: SimConfig) -> Callable[[StateBatch, np.ndarray, np.ndarray, np.ndarray],
                                                      tuple[np.ndarray, np.ndarray]]:
    """The logging policy as used inside `run_online`: (weights `(A,K)`, explored `(A,)`) of the requests of
    users `(A,)` from the step's uniforms, by `config.logging_mode`."""
    order = np.argsort(config.segment_names)
    alpha_by_sorted = logging_alpha(config)[order]
    production = np.asarray(config.logging_weights)[order]
    arms = bucket_weights(config)[:, order]

    def act(state: StateBatch, uniforms: np.ndarray, explore_u: np.ndarray, users: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
        seg = state.segment.numpy()
        if config.logging_mode == "dirichlet":
            return _dirichlet_from_uniforms(alpha_by_sorted[seg], uniforms), np.ones(len(seg), dtype=bool)
        if config.logging_mode == "buckets":
            return arms[users % config.n_buckets, seg], np.zeros(len(seg), dtype=bool)
        weights = production[seg].copy()
        explored = (explore_u < config.exploration_share) if config.logging_mode == "mixed" else np.zeros(len(seg), bool)
        if explored.any():
            weights[explored] = _dirichlet_from_uniforms(alpha_by_sorted[seg[explored]], uniforms[explored])
        return weights, explored

    return act


@dataclass
class SimTables:
    """A simulated log as column arrays, ready for `store.write_log`."""

    config: SimConfig
    users: dict[str, np.ndarray]
    items: dict[str, np.ndarray]
    requests: dict[str, np.ndarray]
    impressions: dict[str, np.ndarray]
    sessions: dict[str, np.ndarray]


@dataclass
class OnlineOutcome:
    """What a policy did online: per request (session-major order) and per session."""

    session: np.ndarray  # (R,) session index
    step: np.ndarray  # (R,)
    segment: np.ndarray  # (R,) index into config.sorted_segments
    weights: np.ndarray  # (R, K) or (R, N, K)
    feedback_sum: np.ndarray  # (R, K) sum over shown items of y_k
    expected_sum: np.ndarray  # (R, K) sum over shown of curve[p] * s_k (the direct-method view)
    continued: np.ndarray  # (R,) bool
    last: np.ndarray  # (R,) bool
    returned: np.ndarray  # (R,) bool, the request's session flag
    detail: dict[str, np.ndarray] = field(default_factory=dict)


def _state(config: SimConfig, world: _World, users: np.ndarray, step: int, prev: np.ndarray,
           scores: np.ndarray, items: np.ndarray) -> StateBatch:
    sorted_index = np.argsort(np.argsort(config.segment_names))
    uf = np.stack([world.user_features[k][users] for k in world.user_features], axis=1).astype(np.float32)
    itf = np.stack([world.item_features[k][items] for k in world.item_features], axis=-1).astype(np.float32)
    ctx = context_features(np.full(users.shape[0], step), prev)
    return StateBatch(
        user_features=torch.from_numpy(uf),
        segment=torch.from_numpy(sorted_index[world.user_segment[users]].astype(np.int64)),
        context=torch.from_numpy(ctx),
        scores=torch.from_numpy(scores),
        mask=torch.ones(scores.shape[:2], dtype=torch.bool),
        item_features=torch.from_numpy(itf),
        segments=config.sorted_segments,
    )


def _run(config: SimConfig, policy: PolicyFn | None, form: str = "sum",
         keep_detail: bool = False, progress: Callable[[float], None] | None = None,
         bias: torch.Tensor | None = None, first_day: int = 0, n_days: int | None = None,
         user_weights: np.ndarray | None = None) -> tuple[_World, OnlineOutcome]:
    """Run days in order, the sessions of one day in lockstep. `policy=None` is the logging policy with its
    common-random-number draws. Days before `first_day` are lived under the logging policy and not
    recorded (the history that later days inherit); days first_day .. first_day + n_days - 1 under `policy`.

    `user_weights` `(P, U, K)`: instead of `policy`, P fixed weight tables (one vector per user), run side by
    side as P replicas of every user in one lockstep run (users never interact, and replica p of a user
    meets that user's random numbers). Session indices then count virtual users p * U + u."""
    world = _build_world(config)
    n_days = config.sessions_per_user if n_days is None else n_days
    n_real = config.n_users
    n_users = n_real if user_weights is None else user_weights.shape[0] * n_real
    table = None if user_weights is None else user_weights.reshape(n_users, -1)
    if table is not None:
        world = _replicated(world, n_users // n_real)
    sat_w = np.asarray(config.satisfaction)[world.user_segment] * world.user_taste  # (U, K)
    cont_b, ret_b = np.asarray(config.continue_base), np.asarray(config.return_base)
    disappoint = np.asarray(config.disappointment)
    regret = np.asarray(config.regret)
    bait = np.maximum(world.item_clickbait, 0.0)
    curve = position_curve(config, config.n_candidates)
    logging_act = logging_policy_fn(config)
    engagement = np.zeros(n_users)
    active = np.ones(n_users, dtype=bool)
    chunks: list[dict[str, np.ndarray]] = []
    sessions: list[dict[str, np.ndarray]] = []
    total_days = first_day + n_days
    for day in range(total_days):
        day_policy = policy if day >= first_day else None
        prev = np.zeros((n_users, _K), dtype=np.float32)
        ema, sat_total = np.zeros(n_users), np.zeros(n_users)
        n_req = np.zeros(n_users, dtype=np.int64)
        in_session = active.copy()
        for step in range(config.max_steps):
            idx = np.flatnonzero(in_session)
            if idx.size == 0:
                break
            d = _draws(config, n_real, day, step)
            if table is not None:
                d = _tiled(d, n_users // n_real)
            items = (d.cand_base[idx, None] + d.cand_stride[idx, None] * np.arange(config.n_candidates)) % config.n_items
            known = _conditional_logits(config, world, idx, items)
            probs = _sigmoid(known + _taste_logits(config, world, idx))
            seg = world.user_segment[idx]
            scores = _mtl_scores(config, _true_rates(world, items, _sigmoid(known)), d.score_noise[idx], seg,
                                 world.item_clickbait[items], world.item_popularity[items])
            state = _state(config, world, idx, step, prev[idx], scores, items)
            explored = perturbed = np.zeros(idx.size, dtype=bool)
            fused_weights = None
            if table is not None and day >= first_day:
                weights = table[idx]
            elif day_policy is None:
                weights, explored = logging_act(state, d.logging_gamma_u[idx], d.explore_u[idx], idx % n_real)
                if config.per_item_share > 0:
                    fused_weights, perturbed = _per_item_weights(config, weights, d.per_item_u[idx],
                                                                 d.per_item_gamma_u[idx])
            else:
                with torch.no_grad():
                    weights = day_policy(state).double().numpy()
            fused = fuse(torch.from_numpy(scores).double(),
                         torch.from_numpy(weights if fused_weights is None else fused_weights).double(),
                         form if day_policy is not None else "sum", bias=bias if day_policy is not None else None)
            positions = rank_positions(fused).numpy()
            if config.later_stage_share > 0:
                positions = _later_stage(positions, world.item_popularity[items], config.n_shown,
                                         d.later_stage_u[idx] < config.later_stage_share)
            if config.short_scroll_share > 0:
                appeal = probs[..., 2] if config.scroll_by_appeal else None
                positions = _short_scroll(positions, d.scroll_u[idx], config, appeal, d.scroll_slot_u[idx])
            y = _feedback(config, world, items, probs, positions, d.feedback_u[idx], d.watch_z[idx])
            shown = positions < config.n_shown
            feedback_sum = np.nan_to_num(y).sum(1)
            # Satisfaction: the user's own taste of each signal, minus the clicks that did not end in a finish.
            sat = ((feedback_sum * sat_w[idx]).sum(1) - disappoint[seg] * (feedback_sum[:, 0] - feedback_sum[:, 2])
                   - regret[seg] * (np.nan_to_num(y[..., 0]) * bait[items]).sum(1))
            ema[idx] = np.where(step == 0, sat, 0.5 * ema[idx] + 0.5 * sat)
            sat_total[idx] += sat
            n_req[idx] += 1
            p_cont = _sigmoid(cont_b[seg] + config.continue_slope * ema[idx]
                              + config.engagement_continue * engagement[idx])
            cont = (d.continue_u[idx] < p_cont) & (step + 1 < config.max_steps)
            prev[idx] = (feedback_sum / config.n_shown).astype(np.float32)
            if day >= first_day:
                expected_sum = (np.where(shown, curve[np.minimum(positions, config.n_candidates - 1)], 0.0)[..., None]
                                * scores).sum(1)
                chunk = {"session": day * n_users + idx, "step": np.full(idx.size, step),
                         "segment": state.segment.numpy(), "weights": weights, "feedback_sum": feedback_sum,
                         "explored": explored & ~perturbed, "perturbed": perturbed,
                         "expected_sum": expected_sum, "continued": cont}
                if keep_detail and config.per_item_share > 0:
                    chunk["item_weights"] = (np.repeat(weights[:, None, :], config.n_candidates, axis=1)
                                             if fused_weights is None else fused_weights)
                if keep_detail:
                    chunk.update({"items": items, "scores": scores, "labels": y, "positions": positions,
                                  "context": state.context.numpy()})
                chunks.append(chunk)
            in_session[idx] = cont
        # The day ends: who comes back tomorrow, and what today did to their engagement.
        mean_sat = sat_total / np.maximum(n_req, 1)
        p_return = _sigmoid(ret_b[world.user_segment] + config.return_slope * np.where(active, mean_sat, 0.0)
                            + config.engagement_return * engagement)
        tomorrow = np.tile(_return_uniforms(config, day), n_users // n_real) < p_return
        m = config.engagement_memory
        engagement = np.where(active, m * engagement + (1 - m) * mean_sat, m * engagement)
        if day >= first_day:
            users = np.flatnonzero(active)
            sessions.append({"session": day * n_users + users, "user": users,
                             "n_requests": n_req[users], "returned": tomorrow[users]})
        active = tomorrow
        if progress is not None:
            progress((day + 1) / total_days)
    return world, _outcome(chunks, sessions)


def _later_stage(positions: np.ndarray, popularity: np.ndarray, n_shown: int, reorder: np.ndarray) -> np.ndarray:
    """Positions `[S, N]` after a later stage, in the requests `reorder` `[S]`, moves the most popular of the
    shown items to the top (the items above it move down one place)."""
    shown = positions < n_shown
    top = np.argmax(np.where(shown, popularity, -np.inf), axis=1)
    lifted = positions[np.arange(len(positions)), top]
    out = positions.copy()
    out[reorder[:, None] & (positions < lifted[:, None])] += 1
    out[np.flatnonzero(reorder), top[reorder]] = 0
    return out


def _short_scroll(positions: np.ndarray, scroll_u: np.ndarray, config: SimConfig, appeal: np.ndarray | None = None,
                  slot_u: np.ndarray | None = None) -> np.ndarray:
    """Positions `[S, N]` where the users of the requests whose `scroll_u` falls below the share stop at a depth
    d: the slots from d on move past the slate, unshown. d = 1 + floor(scroll_u / share * (n_shown - 1)),
    whatever the ranking; or, with `appeal` `[S, N]` (each candidate's finish rate) and `slot_u` `[S, n_shown]`,
    1 + the number of slots in a row the user goes on past (`SimConfig.scroll_by_appeal`)."""
    share, n_shown = config.short_scroll_share, config.n_shown
    if appeal is None:
        early = 1 + np.floor(scroll_u / share * (n_shown - 1))
    else:
        at_slot = np.take_along_axis(appeal, np.argsort(positions, axis=1)[:, :n_shown - 1], axis=1)
        goes_on = slot_u[:, :n_shown - 1] < config.scroll_floor + (1.0 - config.scroll_floor) * at_slot
        early = 1 + np.cumprod(goes_on, axis=1).sum(1)
    depth = np.where(scroll_u < share, early, n_shown)
    return np.where(positions >= depth[:, None], positions + config.n_candidates, positions)


def _replicated(world: _World, replicas: int) -> _World:
    """The world with every user repeated `replicas` times (virtual user p * U + u is user u)."""
    rep = lambda a: np.concatenate([a] * replicas)  # noqa: E731
    return dataclasses.replace(world, user_segment=rep(world.user_segment), user_latent=rep(world.user_latent),
                               user_taste=rep(world.user_taste),
                               user_features={k: rep(v) for k, v in world.user_features.items()})


def _tiled(draws: _StepDraws, replicas: int) -> _StepDraws:
    """One step's draws, repeated for every replica of the users."""
    return _StepDraws(*(np.concatenate([getattr(draws, f.name)] * replicas)
                        for f in dataclasses.fields(_StepDraws)))


def run_weight_tables(config: SimConfig, user_weights: np.ndarray,
                      progress: Callable[[float], None] | None = None) -> OnlineOutcome:
    """Ground truth of P fixed weight tables `(P, U, K)` (a vector per user: global, per segment or by user
    features) in one run. Virtual user v = outcome.session % (P * U) is user v % U under table v // U."""
    return _run(config, None, user_weights=user_weights, progress=progress)[1]


def _outcome(chunks: list[dict[str, np.ndarray]], sessions: list[dict[str, np.ndarray]]) -> OnlineOutcome:
    """Requests in session-major, step-minor order, with their sessions' flags."""
    cat = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    order = np.lexsort((cat["step"], cat["session"]))
    cat = {k: v[order] for k, v in cat.items()}
    sess = {k: np.concatenate([x[k] for x in sessions]) for k in sessions[0]}
    # Sessions are recorded day by day, users ascending, so their indices are sorted: one searchsorted maps
    # every request to its session's flag.
    returned = sess["returned"][np.searchsorted(sess["session"], cat["session"])]
    outcome = OnlineOutcome(
        session=cat.pop("session"), step=cat.pop("step"), segment=cat.pop("segment"), weights=cat.pop("weights"),
        feedback_sum=cat.pop("feedback_sum"), expected_sum=cat.pop("expected_sum"), continued=cat["continued"],
        last=~cat.pop("continued"), returned=returned, detail=cat,
    )
    outcome.detail["sessions"] = sess  # type: ignore[assignment]
    return outcome


def run_online(config: SimConfig, policy: PolicyFn | None, form: str = "sum",
               bias: torch.Tensor | None = None,
               progress: Callable[[float], None] | None = None) -> OnlineOutcome:
    """Ground truth: run `policy` (None = the logging policy) in the simulator with the log's random numbers."""
    return _run(config, policy, form, keep_detail=False, progress=progress, bias=bias)[1]


def simulate(config: SimConfig, progress: Callable[[float], None] | None = None, policy: PolicyFn | None = None,
             policy_label: str = "exploration", first_day: int = 0, n_days: int | None = None) -> SimTables:
    """Generate a log: column arrays for every table of DESIGN §2.

    Under the logging policy by default (with its exact `logging_logp`); with `policy`, under that policy,
    whose density is unknown here, so `logging_logp` is NaN. With `first_day`, the days before it are lived
    under the logging policy (same users, items and tastes) and only days first_day .. + n_days are logged:
    the later days of the same world.
    """
    world, out = _run(config, policy, keep_detail=True, progress=progress, first_day=first_day, n_days=n_days)
    det = out.detail
    n_req, n_cand = out.session.shape[0], config.n_candidates
    request_id = np.arange(1, n_req + 1, dtype=np.int64)
    alpha = logging_alpha(config)[np.argsort(config.segment_names)][out.segment]
    explored, perturbed = det.pop("explored"), det.pop("perturbed")
    logp = np.full(n_req, np.nan)  # unknown: deterministic, bucketed and production traffic, or another policy
    label = np.full(n_req, policy_label, dtype=object)
    if policy is None:
        if explored.any():
            logp[explored] = torch.distributions.Dirichlet(torch.from_numpy(alpha[explored])).log_prob(
                torch.from_numpy(out.weights[explored])).numpy()
        label[explored] = f"dirichlet(c={config.logging_concentration:g})"
        if config.logging_mode == "buckets":
            label[:] = np.char.add("bucket-", (((out.session % config.n_users)) % config.n_buckets).astype(str))
        elif config.logging_mode in ("deterministic", "mixed"):
            label[~explored] = "production"
        # The candidates of these requests were ranked by per-item draws: no density in the request's action space.
        label[perturbed] = np.char.add(label[perturbed].astype(str), f"+per-item(c={config.per_item_concentration:g})")
    start = np.datetime64(datetime.fromisoformat(config.start))
    ts = start + (session_start_seconds(config, out.session) * 1e6).astype("timedelta64[us]") + (
        out.step * 45_000_000).astype("timedelta64[us]")
    requests = {
        "request_id": request_id, "session_id": out.session.astype(np.int64) + 1,
        "user_id": (out.session % config.n_users).astype(np.int64) + 1, "step": out.step.astype(np.int32),
        "ts": ts, **{f"w_{t}": out.weights[:, j] for j, t in enumerate(config.tasks)},
        "logging_logp": logp, "logging_policy": label,
    }
    # Write candidates in (shown position, then item id) order: the order `load_log` reads without sorting.
    shown_2d = det["positions"] < config.n_shown
    key = np.where(shown_2d, det["positions"], config.n_shown) * (config.n_items + 1) + np.where(
        shown_2d, 0, det["items"])
    order = np.argsort(key, axis=1, kind="stable")
    for name in ("items", "positions"):
        det[name] = np.take_along_axis(det[name], order, axis=1)
    for name in ("scores", "labels", "item_weights"):
        if name in det:
            det[name] = np.take_along_axis(det[name], order[..., None], axis=1)
    positions = det["positions"].reshape(-1)
    shown = positions < config.n_shown
    impressions = {
        "request_id": np.repeat(request_id, n_cand),
        "item_id": det["items"].reshape(-1).astype(np.int64) + 1,
        "position": np.where(shown, positions, -1).astype(np.int32),
        **{f"s_{t}": det["scores"][..., j].reshape(-1).astype(np.float64) for j, t in enumerate(config.tasks)},
        **{f"y_{t}": det["labels"][..., j].reshape(-1).astype(np.float64) for j, t in enumerate(config.tasks)},
    }
    if "item_weights" in det:  # NULL (NaN) where the request's own weights ranked every candidate
        per_item = np.where(perturbed[:, None, None], det["item_weights"], np.nan)
        impressions.update({f"iw_{t}": per_item[..., j].reshape(-1) for j, t in enumerate(config.tasks)})
    users = {"user_id": np.arange(1, config.n_users + 1, dtype=np.int64),
             "segment": np.asarray(config.segment_names, dtype=object)[world.user_segment],
             **{f"uf_{k}": v.astype(np.float64) for k, v in world.user_features.items()}}
    items = {"item_id": np.arange(1, config.n_items + 1, dtype=np.int64),
             **{f"if_{k}": v.astype(np.float64) for k, v in world.item_features.items()}}
    sess = det["sessions"]  # only the sessions that happened (a user who did not come back has none that day)
    sessions = {"session_id": sess["session"].astype(np.int64) + 1, "user_id": sess["user"].astype(np.int64) + 1,
                "n_requests": sess["n_requests"].astype(np.int32), "returned": sess["returned"]}
    return SimTables(config, users, items, requests, impressions, sessions)


def generate(config: SimConfig, out: str, force: bool = False,
             progress: Callable[[float], None] | None = None) -> str:
    """Simulate a log and write it atomically to `out` (a DuckDB file) with its config in `meta`."""
    from mtf_core.store import simulator_tables, write_log

    tables = simulate(config, progress)
    meta = {"source": "simulator", "simulator_config": config.to_json()}
    return str(write_log(out, simulator_tables(tables), SIM_TASKS, meta, force=force))
