"""GRADE: Group-relative Reinforcement learning with Adaptive Dirichlet Exploration (arXiv 2510.07919).

Follows the paper:
- the policy is a Dirichlet over the weight simplex, alpha(s) = softplus(MLP(s)) + eps, so the mean is
  the personalised weight vector and the total concentration the exploration level;
- stage 1 warm-starts the mean with a learning-to-rank loss on logged feedback; stage 2 runs GRPO:
  per state, a group of G weight vectors is sampled, each scored by the composite reward (sparse
  posterior feedback + dense prior from MTL predictions + rule-based format constraints), advantages are
  normalised within the group, and the clipped importance-ratio objective is optimised with a KL penalty
  to the frozen stage-1 policy; no critic (a one-step, contextual-bandit decision per request).
The lab's choices where the paper is silent:
- the stage-1 loss is LambdaRank's |delta NDCG|-weighted pairwise logistic loss on the shown items with the
  composite item reward as gain (a member of the LambdaLoss family); the concentration starts at the
  logging policy's, at least `min_initial_concentration`;
- the policy network sets the mean weights only; the total concentration (the exploration level) is the
  stage-1 level times a per-segment factor kappa that a controller sets, so the policy gradient cannot
  sharpen exploration away behind the controller's back (it did: with a learned concentration, kappa sat
  at its lower clamp in every segment while the concentration rose from 30 to 266);
- the controller aims each segment's within-group reward spread at `target_spread` times its level at the
  start of GRPO: too little spread (groups that cannot tell weights apart) widens the Dirichlet, too much
  narrows it. kappa is bounded (e^±concentration_bounds); the share of steps each segment spent at a bound
  is recorded, and a run where a segment sat there for more than a tenth of GRPO says so in its notes;
- the rule terms are on by default: GRADE's own format constraints (a vertex penalty above
  `vertex_threshold` and a share-drift penalty) are added to the reward spec's, at a scale comparable to the
  within-group reward spread, so that a weight vector that wins by leaning on one signal pays for it;
- the Gaussian ablation is a logistic-normal (a Normal on R^{K-1} pushed through stick-breaking).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mtf_core.policies.base import FusionPolicy, StateBatch
from mtf_core.policies.objective import FeatureEncoder, RuleTerms, TrainingData, composite_reward, mean_logged_weights
from mtf_core.policies.parallel import LOCAL, DataParallel, plain_copy

__all__ = ["GradeConfig", "DirichletPolicy", "GradeTrainer", "group_advantage", "lambda_rank_loss"]

_EPS = 1e-3


@dataclass(frozen=True)
class GradeConfig:
    """GRADE hyperparameters; each default is what `train --algo grade` uses."""

    steps: int = 300
    """GRPO updates (stage 2)."""
    warm_start_steps: int = 150
    """Stage-1 learning-to-rank updates."""
    batch_size: int = 1024
    """States per GRPO update."""
    group_size: int = 8
    """Weight vectors sampled per state (G)."""
    hidden: int = 64
    """Width of the two hidden layers."""
    lr: float = 1e-2
    """Adam learning rate."""
    clip_eps: float = 0.2
    """PPO clipping of the importance ratio."""
    kl_coef: float = 0.2
    """Weight of KL(policy || stage-1 policy)."""
    epochs_per_batch: int = 2
    """Gradient steps on each sampled batch."""
    min_initial_concentration: float = 30.0
    """Start at the logging policy's concentration, but at least this (a wide log would make groups noisy)."""
    adaptive_exploration: bool = True
    """Adapt the Dirichlet concentration per segment from the group reward spread."""
    adapt_rate: float = 0.05
    """Step size of the log-concentration adaptation."""
    exploration: str = "dirichlet"
    """'dirichlet' or 'gaussian' (logistic-normal) exploration."""
    prior_reward: bool = True
    """Dense prior term: direct model on MTL predictions."""
    posterior_reward: bool = True
    """Sparse posterior term: logged feedback re-ranked."""
    rule_reward: bool = True
    """Format constraints: the reward spec's penalties plus GRADE's own vertex and share-drift penalties."""
    vertex_penalty: float = 2.0
    """Rule term: cost of the largest weight above vertex_threshold, per unit of the way to the vertex."""
    vertex_threshold: float = 0.45
    """Rule term: the largest weight that costs nothing."""
    share_penalty: float = 1.0
    """Rule term: cost per unit of the signals' reward shares drifting beyond the reward spec's tolerance."""
    target_spread: float = 1.0
    """Adaptive exploration aims each segment's within-group reward spread at this multiple of its start."""
    concentration_bounds: float = 3.0
    """The controller keeps the concentration within e^-b..e^b of its stage-1 level."""

    def __post_init__(self) -> None:
        if self.exploration not in ("dirichlet", "gaussian"):
            raise ValueError("exploration must be 'dirichlet' or 'gaussian'")
        if self.group_size < 2 or self.batch_size < 1 or self.steps < 0 or self.warm_start_steps < 0:
            raise ValueError("need group_size >= 2, batch_size >= 1 and non-negative step counts")
        if not (self.prior_reward or self.posterior_reward):
            raise ValueError("at least one of prior_reward and posterior_reward must be on")
        if not 0.0 < self.vertex_threshold < 1.0:
            raise ValueError("vertex_threshold must lie in (0, 1)")


class DirichletPolicy(FusionPolicy):
    """alpha(s) = kappa[segment] * scale * m(s), m(s) = softplus(MLP(s)) + eps normalised to the simplex (a
    `controlled` policy; runs saved before it leave m unnormalised, so the network set the concentration
    too); logistic-normal when exploration='gaussian'."""

    def __init__(self, tasks: tuple[str, ...], segments: tuple[str, ...], n_user_features: int, n_context: int,
                 hidden: int = 64, exploration: str = "dirichlet", controlled: bool = False) -> None:
        super().__init__(tasks, segments)
        self.exploration = exploration
        # controlled: the network sets the mean only and the concentration is scale * kappa (runs saved before
        # the controller learned the concentration too, and load as they were trained).
        self.controlled = controlled
        self.n_user_features, self.n_context, self.hidden = n_user_features, n_context, hidden
        self.encoder = FeatureEncoder(n_user_features, n_context, segments)
        k = len(tasks)
        n_out = k if exploration == "dirichlet" else 2 * (k - 1)
        self.net = nn.Sequential(nn.Linear(self.encoder.n_out, hidden), nn.Tanh(), nn.Linear(hidden, hidden),
                                 nn.Tanh(), nn.Linear(hidden, n_out))
        self.register_buffer("log_kappa", torch.zeros(len(segments)))
        # alpha = scale * (softplus(out) + eps): a fixed scale keeps the network's outputs O(1), so a
        # segment's mean weights move with ordinary step sizes; init_from sets it to the logging concentration.
        self.register_buffer("scale", torch.ones(()))

    def spec(self) -> dict[str, object]:
        return {**super().spec(), "n_user_features": self.n_user_features, "n_context": self.n_context,
                "hidden": self.hidden, "exploration": self.exploration, "controlled": self.controlled}

    def init_from(self, mean: np.ndarray, concentration: float) -> None:
        """Start at Dirichlet(concentration * mean) for every state (softplus inverse of alpha)."""
        last = self.net[-1]
        nn.init.normal_(last.weight, std=1e-3)
        with torch.no_grad():
            if self.exploration == "dirichlet":
                self.scale.fill_(float(concentration))
                unit = torch.as_tensor(np.maximum(mean - _EPS, 1e-3), dtype=torch.float32)
                last.bias.copy_(torch.log(torch.expm1(unit)))
            else:
                k = len(self.tasks)
                stick = torch.distributions.transforms.StickBreakingTransform()
                loc = stick.inv(torch.as_tensor(mean, dtype=torch.float32).clamp(min=1e-4))
                last.bias[: k - 1].copy_(loc)
                last.bias[k - 1:].fill_(float(np.log(1.0 / np.sqrt(concentration))))

    def _kappa(self, state: StateBatch) -> torch.Tensor:
        one_hot = state.segment_one_hot(self.segments)
        return torch.exp(one_hot @ self.log_kappa)[:, None]

    def distribution(self, state: StateBatch) -> torch.distributions.Distribution:
        out = self.net(self.encoder(state))
        if self.exploration == "dirichlet":
            unit = nn.functional.softplus(out) + _EPS
            if self.controlled:
                unit = unit / unit.sum(-1, keepdim=True)
            return torch.distributions.Dirichlet(unit * self.scale * self._kappa(state))
        k1 = len(self.tasks) - 1
        scale = torch.exp(out[:, k1:]).clamp(1e-3, 10.0) / torch.sqrt(self._kappa(state))
        base = torch.distributions.Independent(torch.distributions.Normal(out[:, :k1], scale), 1)
        return torch.distributions.TransformedDistribution(
            base, [torch.distributions.transforms.StickBreakingTransform()])

    def act(self, state: StateBatch, deterministic: bool = True) -> torch.Tensor:
        dist = self.distribution(state)
        return _mean_weights(dist) if deterministic else dist.sample()

    def concentration(self, state: StateBatch) -> torch.Tensor:
        """Total concentration per state `[R]` (the exploration level; Dirichlet only)."""
        dist = self.distribution(state)
        if isinstance(dist, torch.distributions.Dirichlet):
            return dist.concentration.sum(-1)
        return 1.0 / dist.base_dist.stddev.pow(2).mean(-1)


def _mean_weights(dist: torch.distributions.Distribution) -> torch.Tensor:
    """The deterministic action of a policy's distribution: the Dirichlet's mean, the logistic-normal's image
    of its Normal's mean."""
    if isinstance(dist, torch.distributions.Dirichlet):
        return dist.mean
    return torch.distributions.transforms.StickBreakingTransform()(dist.base_dist.mean)


def group_advantage(rewards: torch.Tensor) -> torch.Tensor:
    """GRPO advantages `[B,G]`: (r - mean over the group) / (std over the group + 1e-6)."""
    mean = rewards.mean(1, keepdim=True)
    std = rewards.std(1, keepdim=True)
    return (rewards - mean) / (std + 1e-6)


def lambda_rank_loss(fused: torch.Tensor, gains: torch.Tensor, shown: torch.Tensor, sigma: float = 10.0,
                     parallel: DataParallel = LOCAL) -> torch.Tensor:
    """LambdaRank loss over shown items: sum over pairs g_i > g_j of |dNDCG_ij| * log(1 + exp(-sigma (f_i - f_j))),
    per pair of the whole batch (on every worker of `parallel`, scaled so that DDP's mean of the workers'
    gradients is the whole batch's)."""
    f = fused.masked_fill(~shown, -1e4)
    ranks = torch.argsort(torch.argsort(f.detach(), dim=1, descending=True), dim=1).float()
    discount = 1.0 / torch.log2(ranks + 2.0)
    ideal = (torch.sort(gains * shown, dim=1, descending=True).values / torch.log2(
        torch.arange(gains.shape[1], dtype=torch.float32) + 2.0)).sum(1, keepdim=True).clamp(min=1e-9)
    gain_diff = gains[:, :, None] - gains[:, None, :]
    delta = (torch.abs(gain_diff * (discount[:, :, None] - discount[:, None, :])) / ideal[:, :, None]).detach()
    pair = (gain_diff > 0) & shown[:, :, None] & shown[:, None, :]
    logistic = nn.functional.softplus(-sigma * (f[:, :, None] - f[:, None, :]))
    n_pairs = parallel.all_sum(pair.sum().double().reshape(1))
    return (delta * logistic * pair).sum() * parallel.world_size / n_pairs.clamp(min=1).float()[0]


class GradeTrainer:
    """Stage 1 (warm start) for `warm_start_steps`, then GRPO; one call of `step` is one update.

    Data-parallel with `parallel` (`policies.parallel`): each worker computes the rewards and gradients of
    its slice of every batch, DDP averages the gradients, and the exploration controller reads the reward
    spread summed over all workers' slices."""

    def __init__(self, config: GradeConfig, data: TrainingData, seed: int, parallel: DataParallel = LOCAL) -> None:
        self.config, self.data, self.parallel = config, data, parallel
        self.gen = torch.Generator().manual_seed(seed)
        log = data.log
        self.policy = DirichletPolicy(log.task_names, log.segments, log.user_features.shape[1],
                                      log.context.shape[1], config.hidden, config.exploration, controlled=True)
        self.policy.encoder.fit(data.state.user_features.float())
        start = mean_logged_weights(log)
        if log.weights_known:
            concentration = float(np.median(1.0 / np.maximum(log.weights.var(0) / np.maximum(
                start * (1 - start), 1e-9), 1e-9) - 1.0))
        else:  # no logged exploration to match: start from the floor
            concentration = config.min_initial_concentration
        self.logging_concentration = float(np.clip(concentration, 2.0, 500.0))
        self.initial_concentration = max(self.logging_concentration, config.min_initial_concentration)
        self.policy.init_from(start, self.initial_concentration)
        self.optimizer = torch.optim.Adam(self.policy.net.parameters(), lr=config.lr)
        self.policy.net = parallel.wrap(self.policy.net)
        self.reference: DirichletPolicy | None = None
        self.spread_target = torch.zeros(len(log.segments))
        self.steps_at_bound = np.zeros(len(log.segments), dtype=np.int64)
        self.grpo_steps = 0
        self.rules = (RuleTerms(config.share_penalty, config.vertex_penalty, config.vertex_threshold)
                      if config.rule_reward else None)
        self.n_steps = config.warm_start_steps + config.steps
        self.validate_from = config.warm_start_steps if config.steps else 0

    def _batch(self, n: int) -> torch.Tensor:
        """A batch of `n` rows (the same on every worker: one generator, seeded alike)."""
        return torch.randint(0, self.data.n_requests, (min(n, self.data.n_requests),), generator=self.gen)

    def step(self, step: int) -> dict[str, float]:
        if step < self.config.warm_start_steps:
            return self._warm_start_step()
        if self.reference is None:
            self.reference = plain_copy(self.policy).eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)
        return self._grpo_step()

    def _warm_start_step(self) -> dict[str, float]:
        rows = self.parallel.slice(self._batch(self.config.batch_size))
        state = self.data.state.index(rows)
        dist = self.policy.distribution(state)
        fused = (self.data.scores[rows] * _mean_weights(dist)[:, None, :]).sum(-1)
        loss = lambda_rank_loss(fused, self.data.item_reward[rows].clamp(min=0), self.data.shown[rows],
                                parallel=self.parallel)
        if isinstance(dist, torch.distributions.Dirichlet) and not self.policy.controlled:
            total = dist.concentration.sum(-1)
            loss = loss + 0.1 * (torch.log(total) - float(np.log(self.initial_concentration))).pow(2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"losses/ltr": float(loss.detach()), "charts/concentration": self._mean_concentration(state)}

    def _mean_concentration(self, state: StateBatch) -> float:
        with torch.no_grad():
            return float(self.policy.concentration(state).mean())

    def _grpo_step(self) -> dict[str, float]:
        cfg = self.config
        batch = self._batch(cfg.batch_size)
        with torch.no_grad():
            # The whole batch's groups are drawn on every worker (a network's forward pass and B*G*K draws)
            # and each keeps its slice: the draws are then the local run's, whatever the number of workers,
            # and the slices' rewards, the costly part, are computed once each.
            old = self.policy.distribution(self.data.state.index(batch))
            drawn = old.sample((cfg.group_size,)).clamp(min=1e-6)  # (G, B, K)
            drawn = drawn / drawn.sum(-1, keepdim=True)
            old_logp = old.log_prob(drawn).T  # (B, G)
            mine = self.parallel.slice(torch.arange(len(batch)))
            rows, actions, old_logp = batch[mine], drawn.transpose(0, 1)[mine], old_logp[mine]
            state = self.data.state.index(rows)
            rewards = composite_reward(self.data, rows, actions, cfg.prior_reward, cfg.posterior_reward,
                                       cfg.rule_reward, extra_rules=self.rules)
            adv = group_advantage(rewards)
        for _ in range(cfg.epochs_per_batch):
            dist = self.policy.distribution(state)
            logp = dist.log_prob(actions.transpose(0, 1)).transpose(0, 1)
            ratio = torch.exp(logp - old_logp)
            clipped = torch.clamp(ratio, 1 - cfg.clip_eps, 1 + cfg.clip_eps)
            pg_loss = -torch.min(ratio * adv, clipped * adv).mean()
            kl = self._kl(state, dist)
            loss = pg_loss + cfg.kl_coef * kl
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        clip_fraction = float(((ratio - 1).abs() > cfg.clip_eps).float().mean())
        self.grpo_steps += 1
        if cfg.adaptive_exploration:
            self._adapt(state, rewards)
        return {"losses/policy": float(pg_loss.detach()), "losses/kl": float(kl.detach()), "charts/reward": float(rewards.mean()),
                "charts/reward_best_of_group": float(rewards.max(1).values.mean()),
                "charts/clip_fraction": clip_fraction, "charts/concentration": self._mean_concentration(state),
                "exploration/segments_at_bound": float(self._at_bound().mean()),
                **{f"exploration/kappa_{s}": float(torch.exp(k)) for s, k in
                   zip(self.policy.segments, self.policy.log_kappa)}}

    def _at_bound(self) -> np.ndarray:
        bound = self.config.concentration_bounds
        return (self.policy.log_kappa.abs() >= bound - 1e-6).numpy()

    def notes(self) -> list[str]:
        """What the run should say about itself: segments whose exploration sat at the controller's bound."""
        if not self.grpo_steps:
            return []
        share = self.steps_at_bound / self.grpo_steps
        stuck = [f"{s} ({v:.0%} of GRPO steps)" for s, v in zip(self.policy.segments, share) if v > 0.1]
        if not stuck:
            return []
        return [f"exploration sat at the controller's bound (concentration e^±{self.config.concentration_bounds:g} "
                f"of its start) in: {', '.join(stuck)}; the target spread was out of reach there"]

    def _kl(self, state: StateBatch, dist: torch.distributions.Distribution) -> torch.Tensor:
        assert self.reference is not None
        with torch.no_grad():
            ref = self.reference.distribution(state)
        if isinstance(dist, torch.distributions.Dirichlet):
            return torch.distributions.kl_divergence(dist, ref).mean()
        sample = dist.rsample((4,))
        return (dist.log_prob(sample) - ref.log_prob(sample)).mean()

    def _adapt(self, state: StateBatch, rewards: torch.Tensor) -> None:
        """Per segment: widen when the group reward spread falls below its target (`target_spread` times its
        level at the start of GRPO), narrow when it rises above it; count the steps spent at a bound. The
        spread is the mean over every worker's states of the segment."""
        n_segments = len(self.policy.segments)
        sums = torch.zeros(2, n_segments, dtype=torch.float64)
        sums[0].index_add_(0, state.segment, rewards.std(1).double())
        sums[1].index_add_(0, state.segment, torch.ones(len(state.segment), dtype=torch.float64))
        spread_sum, count = self.parallel.all_sum(sums)
        with torch.no_grad():
            for s in range(n_segments):
                if count[s] == 0:
                    continue
                value = float(spread_sum[s] / count[s])
                target = float(self.spread_target[s])
                if target == 0.0:
                    self.spread_target[s] = value
                    continue
                aim = target * self.config.target_spread
                # Wider exploration (kappa down) when the spread is short of the aim.
                step = self.config.adapt_rate * float(np.clip(value / max(aim, 1e-9) - 1.0, -1.0, 1.0))
                bound = self.config.concentration_bounds
                self.policy.log_kappa[s] = torch.clamp(self.policy.log_kappa[s] + step, -bound, bound)
            self.steps_at_bound += self._at_bound()
