"""IntegratedRL-MTF: offline RL that knows its exploration policy, with progressive rounds (arXiv 2404.17589).

Follows the paper:
- an actor mu(s) and an ensemble of critics; the actor maximises a pessimistic ensemble value
  (mean - beta * std across critics, a penalty on their disagreement) plus a penalty that is zero inside
  the exploration policy's support and grows outside it: the constraint is relaxed to the region the
  exploration policy could have produced, not tied to each logged action;
- critic targets use the actor at the next state and decay when that action leaves the support; discount 0.9;
- progressive training: rounds of (explore in the simulator around the current policy with an efficient
  exploration policy, append the new logs, keep training); the value of each round's exploration traffic
  is recorded (`rounds/online_value`).
The lab's choices:
- each critic sees, besides the state and the weights, the ranking the weights induce (`RankingFeatures`:
  expected MTL signals of the top L), so that it can judge weights the logs never tried; the exact top L in
  the critics' regression, targets and exploration scoring, soft ranks in the actor's update so that its
  gradient reaches the ranking;
- actions are the logged weight vectors (simplex, `sum` fusion) instead of the paper's powers and biases of
  `prod_k (s_k + b_k)^p_k`, so that every round's log is in one action space; the exploration policy is a
  Dirichlet around the current policy (concentration `explore_concentration`) instead of a uniform box,
  and "inside the support" means a log-density at least the 1st percentile of that policy's own draws;
- efficient exploration: per request, `n_explore_candidates` draws are scored by the critic ensemble,
  the lower half is dropped and one of the rest is played at random;
- the strict baseline (`constraint='behaviour'`) ties the actor to each logged action instead (a squared
  distance, TD3+BC style) on the same data and rounds, for the ablation of the relaxed constraint;
- rounds need a simulator log: round r lives the day after the log's last day plus r - 1 in the same world
  (same users, items and tastes; the days in between under the logging policy), under the exploration
  policy, for a share of the users; on other logs training runs the first round only. New rounds live in
  memory; the source log is only read.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mtf_core.policies.base import StateBatch
from mtf_core.policies.objective import TrainingData, build_training_data
from mtf_core.policies.offline import EncodedPolicy, RankingFeatures, build_transitions, interior, mlp, soft_update
from mtf_core.reward import request_reward

if TYPE_CHECKING:
    from mtf_core.simulate import SimTables

__all__ = ["IntegratedConfig", "ActorPolicy", "IntegratedTrainer"]


@dataclass(frozen=True)
class IntegratedConfig:
    """IntegratedRL-MTF hyperparameters."""

    rounds: int = 3
    """Progressive rounds (explore, append, retrain); the paper uses 5."""
    steps_per_round: int = 500
    """Gradient updates per round."""
    batch_size: int = 512
    """Transitions per update."""
    hidden: int = 64
    """Hidden width."""
    lr: float = 1e-3
    """Adam learning rate."""
    discount: float = 0.9
    """Discount (paper value)."""
    n_critics: int = 4
    """Critic ensemble size."""
    disagreement: float = 2.0
    """beta: weight of the critics' standard deviation in the actor's objective."""
    support_penalty: float = 5.0
    """Weight of the penalty for actions outside the exploration policy's support."""
    target_decay: float = 0.5
    """Factor on a critic target whose next action leaves the support."""
    explore_concentration: float = 60.0
    """Dirichlet concentration of the exploration policy around the current policy."""
    n_explore_candidates: int = 8
    """Draws scored by the critics per exploration request (the lower half is dropped)."""
    explore_user_share: float = 0.25
    """Users of each exploration round, as a share of the source log's simulator users."""
    tau: float = 0.005
    """Target network update rate."""
    temperature: float = 0.1
    """Soft-rank temperature of the critics' ranking features, relative to a request's score spread."""
    constraint: str = "support"
    """'support': the paper's relaxed constraint (penalised only outside the exploration policy's support);
    'behaviour': the strict baseline, the actor pulled towards each logged action (TD3+BC style)."""
    behaviour_weight: float = 50.0
    """Weight of the squared distance to the logged action under the strict 'behaviour' constraint."""

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.steps_per_round < 1 or self.n_critics < 2:
            raise ValueError("need rounds >= 1, steps_per_round >= 1 and n_critics >= 2")
        if self.constraint not in ("support", "behaviour"):
            raise ValueError("constraint must be 'support' or 'behaviour'")


class ActorPolicy(EncodedPolicy):
    """mu(s) = softmax(MLP(s)), with the critic ensemble kept for exploration.

    Each critic sees the state, the weights and the ranking they induce (`RankingFeatures`).
    """

    def __init__(self, tasks: tuple[str, ...], segments: tuple[str, ...], n_user_features: int, n_context: int,
                 hidden: int = 64, n_critics: int = 4, n_top: int = 6, temperature: float = 0.1) -> None:
        super().__init__(tasks, segments, n_user_features, n_context, hidden)
        k, d = len(tasks), self.encoder.n_out
        self.n_critics = n_critics
        self.actor = mlp(d, k, hidden)
        self.critics = nn.ModuleList([mlp(d + 2 * k, 1, hidden) for _ in range(n_critics)])
        self.ranking = RankingFeatures(k, n_top, temperature)

    def spec(self) -> dict[str, object]:
        return {**super().spec(), "n_critics": self.n_critics, "n_top": self.ranking.n_top,
                "temperature": self.ranking.temperature}

    def mu(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.actor(x), -1)

    def q_all(self, x: torch.Tensor, a: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
              exact: bool = True) -> torch.Tensor:
        """Every critic's value `[B,E]`; soft ranks (`exact=False`) only where the actor's gradient needs them."""
        xa = torch.cat([x, a, self.ranking(scores, mask, a, exact)], -1)
        return torch.cat([q(xa) for q in self.critics], -1)

    def act(self, state: StateBatch, deterministic: bool = True) -> torch.Tensor:
        return self.mu(self.encoder(state))


class _Support:
    """Per transition: the exploration Dirichlet that logged it and the log-density threshold of its support."""

    def __init__(self, alpha: torch.Tensor, threshold: torch.Tensor) -> None:
        self.alpha, self.threshold = alpha, threshold

    def outside(self, rows: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """How far below the support threshold `a` lies, in nats (0 inside)."""
        logp = torch.distributions.Dirichlet(self.alpha[rows]).log_prob(interior(a))
        return (self.threshold[rows] - logp).clamp(min=0)


def _logging_support(data: TrainingData) -> _Support:
    from mtf_core.propensity import logging_policy

    log = data.log
    alpha = logging_policy(log).alpha[torch.from_numpy(log.segment)].float()
    logp = torch.distributions.Dirichlet(alpha).log_prob(interior(torch.as_tensor(log.weights, dtype=torch.float32)))
    threshold = torch.zeros(log.n_requests)
    for s in range(len(log.segments)):
        m = torch.from_numpy(log.segment == s)
        if m.any():
            threshold[m] = torch.quantile(logp[m], 0.01)
    return _Support(alpha, threshold)


def _user_share(tables: "SimTables", share: float, seed: int) -> "SimTables":
    """The round's traffic of a random share of the users (the exploration bucket), whole sessions kept."""
    import dataclasses

    rng = np.random.default_rng(seed)
    users = tables.requests["user_id"]
    chosen = np.unique(users)[rng.random(len(np.unique(users))) < share]
    keep_request = np.isin(users, chosen)
    keep_impression = np.isin(tables.impressions["request_id"], tables.requests["request_id"][keep_request])
    keep_session = np.isin(tables.sessions["user_id"], chosen)
    return dataclasses.replace(
        tables, requests={k: v[keep_request] for k, v in tables.requests.items()},
        impressions={k: v[keep_impression] for k, v in tables.impressions.items()},
        sessions={k: v[keep_session] for k, v in tables.sessions.items()})


class IntegratedTrainer:
    """`rounds * steps_per_round` updates; a new round explores in the simulator and appends its log."""

    def __init__(self, config: IntegratedConfig, data: TrainingData, seed: int) -> None:
        self.config, self.data, self.seed = config, data, seed
        self.gen = torch.Generator().manual_seed(seed)
        log = data.log
        self.policy = ActorPolicy(log.task_names, log.segments, log.user_features.shape[1], log.context.shape[1],
                                  config.hidden, config.n_critics, int(data.curve.shape[0]), config.temperature)
        self.policy.encoder.fit(data.state.user_features.float())
        self.transitions = t = build_transitions(data, self.policy.encoder)
        self.policy.ranking.fit(data.curve, t.scores, t.mask, t.actions)
        self.support = _logging_support(data)
        self.target = copy.deepcopy(self.policy)
        self.actor_opt = torch.optim.Adam(self.policy.actor.parameters(), lr=config.lr, foreach=True)
        self.critic_opt = torch.optim.Adam(self.policy.critics.parameters(), lr=config.lr, foreach=True)
        self.can_explore = log.is_simulated
        self.n_steps = config.steps_per_round * (config.rounds if self.can_explore else 1)
        self.appended: list[int] = []  # requests added per round
        self.source_path = log.path

    def step(self, step: int) -> dict[str, float]:
        extra: dict[str, float] = {}
        if step > 0 and step % self.config.steps_per_round == 0:
            extra = self._explore_round(step // self.config.steps_per_round)
        return {**self._update(), **extra}

    def _update(self) -> dict[str, float]:
        cfg, p, t = self.config, self.policy, self.transitions
        rows = torch.randint(0, t.n, (min(cfg.batch_size, t.n),), generator=self.gen)
        x, a, r = t.features[rows], t.actions[rows], t.rewards[rows]
        scores, mask = t.scores[rows], t.mask[rows]
        nxt = t.next_row[rows]
        strict = cfg.constraint == "behaviour"
        with torch.no_grad():
            a_next = self.target.mu(t.features[nxt])
            q_next = self.target.q_all(t.features[nxt], a_next, t.scores[nxt], t.mask[nxt]).mean(-1)
            if not strict:
                inside = (self.support.outside(nxt, a_next) == 0).float()
                q_next = q_next * (inside + (1 - inside) * cfg.target_decay)
            target = r + cfg.discount * (1 - t.done[rows]) * q_next
        critic_loss = (p.q_all(x, a, scores, mask) - target[:, None]).pow(2).mean()
        self.critic_opt.zero_grad()
        critic_loss.backward()
        self.critic_opt.step()
        mu = p.mu(x)
        q = p.q_all(x, mu, scores, mask, exact=False)
        penalty = self.support.outside(rows, mu).mean()
        constraint = (cfg.behaviour_weight * (mu - a).pow(2).sum(-1).mean() if strict
                      else cfg.support_penalty * penalty)
        actor_loss = -(q.mean(-1) - cfg.disagreement * q.std(-1)).mean() + constraint
        self.actor_opt.zero_grad()
        actor_loss.backward()
        self.actor_opt.step()
        soft_update(self.target, p, cfg.tau)
        return {"losses/critic": float(critic_loss.detach()), "losses/actor": float(actor_loss.detach()),
                "charts/support_violation": float(penalty.detach()),
                "charts/q": float(q.mean().detach()) * t.reward_scale}

    def exploration_policy(self, concentration: float):  # type: ignore[no-untyped-def]
        """Draws around mu(s), the critics drop the lower half, one of the rest is played."""
        p, n = self.policy, self.config.n_explore_candidates
        gen = torch.Generator().manual_seed(self.seed + 7)

        def act(state: StateBatch) -> torch.Tensor:
            x = p.encoder(state)
            alpha = p.mu(x).clamp(min=1e-3) * concentration
            draws = torch.distributions.Dirichlet(alpha).sample((n,)).transpose(0, 1)  # (R, n, K)
            q = p.q_all(x.repeat_interleave(n, 0), draws.reshape(-1, draws.shape[-1]),
                        state.scores.float().repeat_interleave(n, 0), state.mask.repeat_interleave(n, 0))
            q = q.mean(-1).reshape(-1, n)
            keep = q >= q.median(1, keepdim=True).values
            pick = torch.multinomial(keep.float(), 1, generator=gen).squeeze(1)
            return draws[torch.arange(draws.shape[0]), pick].double()

        return act

    def _explore_round(self, round_index: int) -> dict[str, float]:
        from mtf_core.simulate import SimConfig, simulate
        from mtf_core.store import load_log, simulator_tables, write_log

        cfg = self.config
        base = SimConfig.from_json(self.data.log.meta["simulator_config"])
        self.policy.eval()
        torch.manual_seed(self.seed + round_index)
        with torch.no_grad():
            # The next day of the same world, after the logged days (and the earlier rounds' days).
            tables = simulate(base, policy=self.exploration_policy(cfg.explore_concentration),
                              policy_label=f"integrated-round-{round_index}",
                              first_day=base.sessions_per_user + round_index - 1, n_days=1)
        tables = _user_share(tables, cfg.explore_user_share, self.seed + round_index)
        config = base
        self.policy.train()
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"round_{round_index}.duckdb"
            write_log(path, simulator_tables(tables), self.data.log.tasks,
                      {"source": f"exploration round {round_index}", "simulator_config": config.to_json()})
            new_log = load_log(path)
        new_data = build_training_data(new_log, self.data.ctx.resolved.spec)
        # Score the round with the source log's resolved reward, so every round shares one reward scale.
        reward = request_reward(self.data.ctx.resolved, new_log.label_totals(), new_log.continued,
                                new_log.returned, new_log.weights, new_data.ctx.logged_expected).total
        new_t = build_transitions(new_data, self.policy.encoder)
        t = self.transitions
        self.transitions = t.append(new_t, torch.as_tensor(reward / t.reward_scale, dtype=torch.float32))
        with torch.no_grad():
            alpha = self.policy.mu(new_t.features).clamp(min=1e-3) * cfg.explore_concentration
            logp = torch.distributions.Dirichlet(alpha).log_prob(interior(new_t.actions))
        threshold = torch.full((new_t.n,), float(torch.quantile(logp, 0.01)))
        self.support = _Support(torch.cat([self.support.alpha, alpha]),
                                torch.cat([self.support.threshold, threshold]))
        self.appended.append(new_log.n_requests)
        online_value = float(reward.mean())
        return {"rounds/round": float(round_index), "rounds/online_value": online_value,
                "rounds/appended_requests": float(new_log.n_requests)}

