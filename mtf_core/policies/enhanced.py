"""Enhanced-State RL for MTF: an action per user-item pair (arXiv 2409.11678).

Follows the paper:
- the state of each decision holds user features, session context and the item's own features (its MTL
  predictions and `if_*` features); the actor outputs one weight vector per candidate (`[R,N,K]`), and
  fused scores use each item's own weights;
- the critic scores user-item actions and the request's reward is credited to the shown items: the TD
  update regresses the list value onto the request's reward plus the discounted list value at the next
  request.
The lab's choices:
- the list value is V(s) + sum_n exam_n * q(s, item_n, a_n): a state baseline V absorbs what no ranking
  changes (session terms, the user's base rate), and each item's value counts with the examination
  weight of the position it is shown at (the position curve of the reward: logged positions for
  logged lists; exact ranks for the target's lists; soft ranks under the per-item fused scores for the
  actor's lists, so its gradient reaches how each item's weights move it up or down the ranking);
- offline training on the log, with TD3+BC-style behaviour regularisation (the actor's per-item weights
  are pulled towards the logged ones, Fujimoto & Gu 2021) instead of the paper's online updates; the
  logged action of an item is its own weight vector where the log has per-item weights (`iw_*`, e.g. a
  per-item exploration share), else its request's, so per-item effects are learned from per-item variation
  where the log has it and are extrapolation where it does not;
- `per_item=False` is the method's own per-request restriction (the ablation): one weight vector per
  request, the mean of the per-item actor's outputs over the request's candidates;
- the next request's value uses that request's candidates ranked by the target actor.
Per-item weights do not live in the logged action space, so importance-weighted estimates do not exist
for this policy; it is compared by re-ranking, the direct method and the simulator's truth.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from mtf_core.fusion import fuse
from mtf_core.policies.base import StateBatch
from mtf_core.policies.objective import TrainingData, soft_exam, top_exam
from mtf_core.policies.offline import EncodedPolicy, build_transitions, mlp, soft_update

__all__ = ["EnhancedConfig", "PerItemPolicy", "EnhancedTrainer"]


@dataclass(frozen=True)
class EnhancedConfig:
    """Enhanced-State RL hyperparameters."""

    steps: int = 1200
    """Gradient updates."""
    batch_size: int = 256
    """Requests per update (each with all its candidates)."""
    hidden: int = 64
    """Hidden width."""
    lr: float = 1e-3
    """Adam learning rate."""
    discount: float = 0.9
    """Discount of the next request's value."""
    behaviour_weight: float = 2.5
    """alpha of TD3+BC: how strongly per-item weights stay near the logged ones."""
    tau: float = 0.005
    """Target network update rate."""
    temperature: float = 0.1
    """Soft-rank temperature of the actor's lists, relative to a request's spread of fused scores."""

    per_item: bool = True
    """One weight vector per user-item pair; off: one per request (the per-request restriction)."""

    def __post_init__(self) -> None:
        if self.steps < 1 or not 0 <= self.discount < 1:
            raise ValueError("need steps >= 1 and 0 <= discount < 1")


class PerItemPolicy(EncodedPolicy):
    """mu(user, context, item) -> simplex weights per candidate; Q(user, context, item, weights) per item."""

    per_item = True

    def __init__(self, tasks: tuple[str, ...], segments: tuple[str, ...], n_user_features: int, n_context: int,
                 hidden: int = 64, n_item_features: int = 0, per_request: bool = False) -> None:
        super().__init__(tasks, segments, n_user_features, n_context, hidden)
        k = len(tasks)
        self.n_item_features = n_item_features
        self.per_request = per_request
        self.register_buffer("item_mean", torch.zeros(k + n_item_features))
        self.register_buffer("item_std", torch.ones(k + n_item_features))
        n_in = self.encoder.n_out + k + n_item_features
        self.actor = mlp(n_in, k, hidden)
        self.critic = mlp(n_in + k, 1, hidden)
        self.baseline = mlp(self.encoder.n_out, 1, hidden)

    def spec(self) -> dict[str, object]:
        return {**super().spec(), "n_item_features": self.n_item_features, "per_request": self.per_request}

    def item_state(self, state: StateBatch) -> torch.Tensor:
        """Per-candidate state `[R,N,D]`: the user's encoded state beside the item's standardised features."""
        user = self.encoder(state)
        item = torch.cat([state.scores.float(), state.item_features.float()], -1)
        item = (item - self.item_mean) / self.item_std
        return torch.cat([user.unsqueeze(1).expand(-1, item.shape[1], -1), item], -1)

    def mu(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Weights per candidate `[R,N,K]`; per request (the mean over the real candidates) if restricted."""
        weights = torch.softmax(self.actor(z), -1)
        if not self.per_request:
            return weights
        valid = torch.ones(weights.shape[:2]) if mask is None else mask.to(weights.dtype)
        pooled = (weights * valid.unsqueeze(-1)).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)
        return pooled.unsqueeze(1).expand_as(weights)

    def q(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.critic(torch.cat([z, a], -1)).squeeze(-1)

    def list_value(self, state: StateBatch, z: torch.Tensor, a: torch.Tensor, exam: torch.Tensor) -> torch.Tensor:
        """V(s) + sum_n exam_n q(s, item_n, a_n) `[R]` for per-item weights `a` `[R,N,K]`."""
        return self.baseline(self.encoder(state)).squeeze(-1) + (exam * self.q(z, a)).sum(1)

    def act(self, state: StateBatch, deterministic: bool = True) -> torch.Tensor:
        return self.mu(self.item_state(state), state.mask)


class EnhancedTrainer:
    """One `step` = a critic update (list TD) and an actor update (list value under soft ranks + behaviour cloning)."""

    def __init__(self, config: EnhancedConfig, data: TrainingData, seed: int) -> None:
        self.config, self.data = config, data
        self.gen = torch.Generator().manual_seed(seed)
        log = data.log
        self.policy = PerItemPolicy(log.task_names, log.segments, log.user_features.shape[1], log.context.shape[1],
                                    config.hidden, log.item_features.shape[2], per_request=not config.per_item)
        self.item_weights = None if log.item_weights is None else torch.from_numpy(log.item_weights).float()
        self.policy.encoder.fit(data.state.user_features.float())
        items = torch.cat([data.scores.float(), torch.from_numpy(log.item_features).float()], -1)[data.mask]
        self.policy.item_mean.copy_(items.mean(0))
        self.policy.item_std.copy_(items.std(0).clamp(min=1e-6))
        self.t = build_transitions(data, self.policy.encoder)
        self.logged_exam = data.logged_exam * data.shown  # the curve at the logged position, 0 if not shown
        self.target = copy.deepcopy(self.policy)
        self.actor_opt = torch.optim.Adam(self.policy.actor.parameters(), lr=config.lr, foreach=True)
        self.critic_opt = torch.optim.Adam([*self.policy.critic.parameters(), *self.policy.baseline.parameters()],
                                           lr=config.lr, foreach=True)
        self.n_steps = config.steps

    def _exam(self, state: StateBatch, a: torch.Tensor) -> torch.Tensor:
        return soft_exam(fuse(state.scores.float(), a), state.mask, self.data.curve, self.config.temperature)

    def step(self, step: int) -> dict[str, float]:
        cfg, p, t, data = self.config, self.policy, self.t, self.data
        rows = torch.randint(0, t.n, (min(cfg.batch_size, t.n),), generator=self.gen)
        nxt = t.next_row[rows]
        state, next_state = data.state.index(rows), data.state.index(nxt)
        valid = state.mask.float()
        with torch.no_grad():
            z = p.item_state(state)  # (B, N, D)
            zn = self.target.item_state(next_state)
            a_next = self.target.mu(zn, next_state.mask)
            fused_next = fuse(next_state.scores.float(), a_next)
            v_next = self.target.list_value(next_state, zn, a_next, top_exam(fused_next, next_state.mask,
                                                                               self.data.curve))
            target = t.rewards[rows] + cfg.discount * (1 - t.done[rows]) * v_next
        logged = (t.actions[rows].unsqueeze(1).expand(-1, z.shape[1], -1) if self.item_weights is None
                  else self.item_weights[rows])
        v_logged = p.list_value(state, z, logged, self.logged_exam[rows])
        critic_loss = (v_logged - target).pow(2).mean()
        self.critic_opt.zero_grad()
        critic_loss.backward()
        self.critic_opt.step()
        mu = p.mu(z, state.mask)
        exam = self._exam(state, mu)
        ranked = (exam * p.q(z, mu)).sum(1)
        lam = cfg.behaviour_weight / ranked.abs().mean().detach().clamp(min=1e-6)
        bc = ((mu - logged).pow(2).sum(-1) * valid).sum(1).div(valid.sum(1)).mean()
        actor_loss = -lam * ranked.mean() + bc
        self.actor_opt.zero_grad()
        actor_loss.backward()
        self.actor_opt.step()
        soft_update(self.target, p, cfg.tau)
        return {"losses/critic": float(critic_loss.detach()), "losses/actor": float(actor_loss.detach()),
                "losses/behaviour": float(bc.detach()), "charts/q": float(v_logged.mean().detach()) * t.reward_scale}
