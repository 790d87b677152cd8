"""BatchRL-MTF: batch (offline) RL for long-term satisfaction with BCQ (arXiv 2208.04560).

Follows the paper:
- transitions (state, logged fusion weights, reward, next state) from consecutive requests of a session;
  the reward is the RewardSpec's composite, whose session terms express stickiness (continuation,
  `returned`) and activeness (per request served);
- Batch-Constrained Q-learning (Fujimoto et al., 2019): a conditional VAE models the logged actions, a
  perturbation network moves a generated action by at most 0.15 per weight (tanh-bounded), twin critics
  with target networks and clipped double-Q (lambda = 0.75), discount 0.95; the chosen action is the best
  of n perturbed VAE proposals under the first critic, so the policy stays near the logged support.
The lab's choices:
- the critics see, besides the state and the weights, the ranking the weights induce (`RankingFeatures`:
  expected MTL signals of the top L), so that they tell proposals apart by what the user would see rather
  than by weight coordinates alone; the exact top L in the critics' regression, targets and acting, soft
  ranks only in the perturbation network's update, whose gradient has to pass through the ranking;
- the action is the logged weight vector on the simplex (`sum` fusion), not the paper's
  `sum_k a_k log(s_k + b_k)`, because offline learning needs the log's own action space; perturbed
  actions are projected back to the simplex;
- serving is deterministic: the proposals come from a fixed set of latent points (a buffer), so `act`
  is a function of the state; the offline evaluation uses kernelised estimators for it;
- the paper's long-term reward is on by default for it, on top of the analyst's reward: activeness
  (`activeness` per request the user stays for) and stickiness (`stickiness` where the user comes back
  after the session); the run is evaluated under the analyst's reward as every other;
- the paper's conservative offline evaluation of the learned policy is fitted Q evaluation (FQE) with two
  critics whose smaller value is reported, beside the same FQE of the logging policy (SARSA targets on the
  logged next actions), in the run's notes: a policy whose pessimistic value does not beat logging's says so.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import numpy as np
import torch

from mtf_core.policies.base import StateBatch, simplex_normalise
from mtf_core.policies.objective import TrainingData
from mtf_core.policies.offline import EncodedPolicy, RankingFeatures, Transitions, build_transitions, mlp, soft_update

__all__ = ["BatchRLConfig", "BCQPolicy", "BatchRLTrainer"]


@dataclass(frozen=True)
class BatchRLConfig:
    """BCQ hyperparameters (paper values where it gives them)."""

    steps: int = 1500
    """Gradient updates."""
    batch_size: int = 512
    """Transitions per update."""
    hidden: int = 64
    """Hidden width of every network."""
    lr: float = 1e-3
    """Adam learning rate."""
    discount: float = 0.95
    """Discount of future requests in the session."""
    max_perturbation: float = 0.15
    """Largest change of a weight by the perturbation network (tanh-bounded)."""
    n_proposals: int = 10
    """VAE proposals scored by the critic when acting."""
    lmbda: float = 0.75
    """Weight of the smaller critic in the clipped double-Q target."""
    tau: float = 0.005
    """Target network update rate."""
    temperature: float = 0.1
    """Soft-rank temperature of the critics' ranking features, relative to a request's score spread."""
    activeness: float = 0.5
    """Long-term reward (the paper's activeness): added per request the user stays for."""
    stickiness: float = 1.0
    """Long-term reward (the paper's stickiness): added where the user returns after the session."""
    fqe_steps: int = 300
    """Updates of the conservative evaluation (FQE) after training; 0 skips it."""

    def __post_init__(self) -> None:
        if not 0 <= self.discount < 1 or self.steps < 1 or self.n_proposals < 1 or self.fqe_steps < 0:
            raise ValueError("need 0 <= discount < 1, steps >= 1, n_proposals >= 1 and fqe_steps >= 0")


class BCQPolicy(EncodedPolicy):
    """Generator (VAE decoder) + perturbation + critic; acts by the best of fixed latent proposals."""

    def __init__(self, tasks: tuple[str, ...], segments: tuple[str, ...], n_user_features: int, n_context: int,
                 hidden: int = 64, n_proposals: int = 10, max_perturbation: float = 0.15, n_top: int = 6,
                 temperature: float = 0.1) -> None:
        super().__init__(tasks, segments, n_user_features, n_context, hidden)
        k, d = len(tasks), self.encoder.n_out
        self.latent = 2 * k
        self.n_proposals, self.max_perturbation = n_proposals, max_perturbation
        self.vae_encoder = mlp(d + k, 2 * self.latent, hidden)
        self.vae_decoder = mlp(d + self.latent, k, hidden)
        self.perturb = mlp(d + k, k, hidden)
        self.q1, self.q2 = mlp(d + 2 * k, 1, hidden), mlp(d + 2 * k, 1, hidden)
        self.ranking = RankingFeatures(k, n_top, temperature)
        self.register_buffer("proposal_z", torch.randn(n_proposals, self.latent,
                                                       generator=torch.Generator().manual_seed(0)).clamp(-0.5, 0.5))

    def spec(self) -> dict[str, object]:
        return {**super().spec(), "n_proposals": self.n_proposals, "max_perturbation": self.max_perturbation,
                "n_top": self.ranking.n_top, "temperature": self.ranking.temperature}

    def decode(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.vae_decoder(torch.cat([x, z], -1)), -1)

    def perturbed(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        shift = self.max_perturbation * torch.tanh(self.perturb(torch.cat([x, a], -1)))
        return simplex_normalise(a + shift)

    def critic_input(self, x: torch.Tensor, a: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
                     exact: bool = True) -> torch.Tensor:
        """State, weights and the ranking they induce; soft ranks (`exact=False`) only where the actor needs
        the gradient through the ranking."""
        return torch.cat([x, a, self.ranking(scores, mask, a, exact)], -1)

    def select(self, x: torch.Tensor, z: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Best of `z.shape[0]` proposals per state under the first critic, `[R,K]`."""
        r, p = x.shape[0], z.shape[0]
        xs = x.repeat_interleave(p, 0)
        a = self.perturbed(xs, self.decode(xs, z.repeat(r, 1)))
        xa = torch.cat([xs, a, self.ranking.proposals(scores, mask, a.reshape(r, p, -1))], -1)
        best = self.q1(xa).reshape(r, p).argmax(1)
        return a.reshape(r, p, -1)[torch.arange(r), best]

    def act(self, state: StateBatch, deterministic: bool = True) -> torch.Tensor:
        return self.select(self.encoder(state), self.proposal_z, state.scores.float(), state.mask)


class BatchRLTrainer:
    """One `step` = one BCQ update of the VAE, the critics and the perturbation network."""

    def __init__(self, config: BatchRLConfig, data: TrainingData, seed: int) -> None:
        self.config, self.data = config, data
        self.gen = torch.Generator().manual_seed(seed)
        log = data.log
        self.policy = BCQPolicy(log.task_names, log.segments, log.user_features.shape[1], log.context.shape[1],
                                config.hidden, config.n_proposals, config.max_perturbation, int(data.curve.shape[0]),
                                config.temperature)
        self.policy.encoder.fit(data.state.user_features.float())
        long_term = (config.activeness * np.ones(log.n_requests)
                     + config.stickiness * np.nan_to_num(log.returned) * log.last)
        self.t = t = build_transitions(data, self.policy.encoder, long_term)
        self.policy.ranking.fit(data.curve, t.scores, t.mask, t.actions)
        self.target = copy.deepcopy(self.policy)
        p = self.policy
        # foreach: one kernel per step for all of a network's tensors (per-tensor Python loops cost more here)
        adam = functools.partial(torch.optim.Adam, lr=config.lr, foreach=True)
        self.vae_opt = adam([*p.vae_encoder.parameters(), *p.vae_decoder.parameters()])
        self.critic_opt = adam([*p.q1.parameters(), *p.q2.parameters()])
        self.actor_opt = adam(p.perturb.parameters())
        self.n_steps = config.steps

    def step(self, step: int) -> dict[str, float]:
        cfg, p, t = self.config, self.policy, self.t
        idx = torch.randint(0, t.n, (min(cfg.batch_size, t.n),), generator=self.gen)
        x, a, r = t.features[idx], t.actions[idx], t.rewards[idx]
        scores, mask = t.scores[idx], t.mask[idx]
        nxt = t.next_row[idx]
        x_next, done = t.features[nxt], t.done[idx]
        # Generative model of the logged actions.
        mean, log_std = p.vae_encoder(torch.cat([x, a], -1)).chunk(2, -1)
        log_std = log_std.clamp(-4, 2)
        z = mean + log_std.exp() * torch.randn(mean.shape, generator=self.gen)
        recon = p.decode(x, z)
        kl = -0.5 * (1 + 2 * log_std - mean.pow(2) - (2 * log_std).exp()).sum(-1).mean()
        vae_loss = (recon - a).pow(2).sum(-1).mean() + 0.5 * kl / a.shape[1]
        self.vae_opt.zero_grad()
        vae_loss.backward()
        self.vae_opt.step()
        # Clipped double-Q target over n proposals at the next state.
        with torch.no_grad():
            n = cfg.n_proposals
            xn = x_next.repeat_interleave(n, 0)
            zn = torch.randn(xn.shape[0], p.latent, generator=self.gen).clamp(-0.5, 0.5)
            an = self.target.perturbed(xn, p.decode(xn, zn))
            ranking = self.target.ranking.proposals(t.scores[nxt], t.mask[nxt], an.reshape(len(idx), n, -1))
            xan = torch.cat([xn, an, ranking], -1)
            q1n, q2n = self.target.q1(xan), self.target.q2(xan)
            qn = cfg.lmbda * torch.min(q1n, q2n) + (1 - cfg.lmbda) * torch.max(q1n, q2n)
            qn = qn.reshape(-1, n).max(1).values
            target = r + cfg.discount * (1 - done) * qn
        xa = p.critic_input(x, a, scores, mask)
        critic_loss = (p.q1(xa).squeeze(-1) - target).pow(2).mean() + (p.q2(xa).squeeze(-1) - target).pow(2).mean()
        self.critic_opt.zero_grad()
        critic_loss.backward()
        self.critic_opt.step()
        # Perturbation: move generated actions towards higher Q, within the bound.
        with torch.no_grad():
            generated = p.decode(x, torch.randn(x.shape[0], p.latent, generator=self.gen).clamp(-0.5, 0.5))
        actor_q = p.q1(p.critic_input(x, p.perturbed(x, generated), scores, mask, exact=False)).mean()
        self.actor_opt.zero_grad()
        (-actor_q).backward()
        self.actor_opt.step()
        soft_update(self.target, p, cfg.tau)
        return {"losses/vae": float(vae_loss.detach()), "losses/critic": float(critic_loss.detach()),
                "charts/q": float(actor_q.detach()) * t.reward_scale}


    def notes(self) -> list[str]:
        """The conservative evaluation of the trained policy against the logging policy (FQE, module doc)."""
        if not self.config.fqe_steps:
            return []
        value = conservative_values(self.policy, self.t, self.config, self.gen)
        verdict = "above" if value["policy"] > value["logging"] else "not above"
        return [f"conservative evaluation (FQE, the smaller of two critics, {self.config.fqe_steps} updates, "
                f"training reward incl. activeness and stickiness, discounted per request): policy "
                f"{value['policy']:.3f} vs logging {value['logging']:.3f}: {verdict} the logging policy"]


def conservative_values(policy: BCQPolicy, t: Transitions, config: BatchRLConfig, gen: torch.Generator
                        ) -> dict[str, float]:
    """FQE of the policy's and of the logged actions, each with twin critics, reporting the smaller critic's
    mean value over the logged states (in reward units, discounted)."""
    with torch.no_grad():
        served = torch.cat([policy.select(t.features[rows], policy.proposal_z, t.scores[rows], t.mask[rows])
                            for rows in torch.arange(t.n).split(4096)])
    out = {}
    for name, actions in (("policy", served), ("logging", t.actions)):
        critics = [mlp(policy.encoder.n_out + 2 * len(policy.tasks), 1, config.hidden) for _ in range(2)]
        targets = copy.deepcopy(critics)
        optimiser = torch.optim.Adam([p for c in critics for p in c.parameters()], lr=config.lr, foreach=True)

        def q(nets: list[torch.nn.Module], rows: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
            xa = policy.critic_input(t.features[rows], a, t.scores[rows], t.mask[rows])
            return torch.stack([net(xa).squeeze(-1) for net in nets])  # (2, B)

        for _ in range(config.fqe_steps):
            idx = torch.randint(0, t.n, (min(config.batch_size, t.n),), generator=gen)
            nxt = t.next_row[idx]
            with torch.no_grad():
                follow = q(targets, nxt, actions[nxt]).min(0).values
                target = t.rewards[idx] + config.discount * (1 - t.done[idx]) * follow
            loss = (q(critics, idx, actions[idx]) - target).pow(2).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            for net, tgt in zip(critics, targets):
                soft_update(tgt, net, config.tau * 4)
        with torch.no_grad():
            values = torch.cat([q(critics, rows, actions[rows]).min(0).values
                                for rows in torch.arange(t.n).split(4096)])
        out[name] = float(values.mean()) * t.reward_scale
    return out
