"""BatchRL-MTF, IntegratedRL-MTF and Enhanced-State RL: short runs learn, save, reload and act validly."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from mtf_core.policies.train import TrainConfig, train
from mtf_core.reward import RewardSpec
from mtf_core.runs import RunStore

FAST = {
    "batchrl": {"steps": 150, "batch_size": 256, "fqe_steps": 20},
    "integrated": {"rounds": 2, "steps_per_round": 80, "batch_size": 256, "explore_user_share": 0.3},
    "enhanced": {"steps": 150, "batch_size": 64},
}
# What each method's optimiser minimises and should bring down in a short run: BCQ's clipped double-Q
# regression; the actor objective of the two actor-critics (their TD critic losses can grow with Q).
OBJECTIVE = {"batchrl": "losses/critic", "integrated": "losses/actor", "enhanced": "losses/actor"}


@pytest.fixture(scope="module", params=list(FAST))
def trained(request, tiny_log):
    algo = request.param
    result = train(TrainConfig(algo, 0, FAST[algo], validation_share=0.0), tiny_log,
                   RewardSpec.default(tiny_log.task_names))
    return algo, result


def test_training_improves_its_own_objective(trained):
    algo, result = trained
    losses = [m[OBJECTIVE[algo]] for _, m in result.history]
    first, last = np.mean(losses[:15]), np.mean(losses[-15:])
    assert last < first, f"{algo}: {OBJECTIVE[algo]} {first:.4f} -> {last:.4f}"


def test_actions_are_valid_weights(trained, tiny_log):
    algo, result = trained
    with torch.no_grad():
        w = result.policy.act(tiny_log.state(slice(0, 100)))
    assert (w >= 0).all() and torch.isfinite(w).all()
    torch.testing.assert_close(w.sum(-1).double(), torch.ones(w.shape[:-1], dtype=torch.float64), atol=1e-5, rtol=0)
    assert w.shape == ((100, 20, 5) if algo == "enhanced" else (100, 5))


def test_save_and_reload_give_identical_actions(trained, tiny_log, tmp_path):
    algo, result = trained
    store = RunStore(tmp_path / "runs")
    run_id = store.create_run(algo, {}, RewardSpec.default(tiny_log.task_names), tiny_log)
    store.finish_run(run_id, result.policy, result.history, result.status, result.seconds)
    loaded = store.load_policy(run_id, tiny_log)
    state = tiny_log.state(slice(0, 50))
    with torch.no_grad():
        torch.testing.assert_close(loaded.act(state), result.policy.act(state), rtol=0, atol=0)


@pytest.mark.parametrize("trained", ["enhanced"], indirect=True)
def test_per_item_policy_weighs_items_of_one_request_differently(trained, tiny_log):
    _, result = trained
    with torch.no_grad():
        w = result.policy.act(tiny_log.state(slice(0, 10)))  # (10, N, K)
    spread = (w - w.mean(1, keepdim=True)).abs().amax(dim=(1, 2))
    assert (spread > 1e-3).all()


def test_progressive_rounds_append_logs_without_touching_the_source(tiny_log_path, tiny_log):
    before = hashlib.sha256(tiny_log_path.read_bytes()).hexdigest()
    result = train(TrainConfig("integrated", 0, {"rounds": 3, "steps_per_round": 30, "batch_size": 128,
                                                 "explore_user_share": 0.3}, validation_share=0.0),
                   tiny_log, RewardSpec.default(tiny_log.task_names))
    rounds = [m for _, m in result.history if "rounds/online_value" in m]
    assert [m["rounds/round"] for m in rounds] == [1.0, 2.0]
    assert all(m["rounds/appended_requests"] > 0 for m in rounds)
    assert hashlib.sha256(tiny_log_path.read_bytes()).hexdigest() == before


def test_an_exploration_round_appends_traffic_of_the_source_users_and_items(tiny_log, monkeypatch):
    import mtf_core.store as store
    from mtf_core.policies.integrated import IntegratedConfig, IntegratedTrainer
    from mtf_core.policies.objective import build_training_data

    written = []
    real_write = store.write_log
    monkeypatch.setattr(store, "write_log", lambda path, tables, *a, **k: (written.append(tables),
                                                                           real_write(path, tables, *a, **k))[1])
    data = build_training_data(tiny_log, RewardSpec.default(tiny_log.task_names))
    trainer = IntegratedTrainer(IntegratedConfig(rounds=2, steps_per_round=5, batch_size=64), data, 0)
    n_before = trainer.transitions.n
    trainer._explore_round(1)
    assert trainer.transitions.n > n_before and len(written) == 1
    tables = written[0]
    assert np.isin(tables["requests"]["user_id"], tiny_log.user_id).all()  # the log's own users
    assert np.isin(tables["impressions"]["item_id"], np.arange(1, len(tables["items"]["item_id"]) + 1)).all()
    assert tables["requests"]["ts"].min() > tiny_log.ts.max()  # the day after the log
    source_users = dict(zip(tiny_log.user_id.tolist(), tiny_log.user_features[:, 0].tolist()))
    first_feature = [c for c in tables["users"] if c.startswith("uf_")][0]
    for uid, value in zip(tables["users"]["user_id"], tables["users"][first_feature]):
        if uid in source_users:
            assert value == pytest.approx(source_users[uid], rel=1e-5)


def test_soft_ranks_match_the_exact_top_l_when_cold_and_carry_gradients_when_warm():
    from mtf_core.evaluate import top_signals
    from mtf_core.policies.objective import soft_exam, soft_top_signals

    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(16, 12, 3, generator=gen, dtype=torch.float64)
    mask = torch.ones(16, 12, dtype=torch.bool)
    mask[0, 8:] = False  # padding never counts
    curve = torch.tensor([1.0, 0.6, 0.4, 0.3], dtype=torch.float64)
    weights = torch.rand(16, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    fused = (scores * weights[:, None]).sum(-1)
    exact = top_signals(fused.detach().masked_fill(~mask, float("-inf")), scores, mask, curve)
    torch.testing.assert_close(soft_top_signals(fused.detach(), scores, mask, curve, 1e-4), exact)
    warm = soft_exam(fused, mask, curve, 0.3)
    assert (warm[0, 8:] == 0).all()
    warm.sum().backward()
    assert weights.grad is not None and weights.grad.abs().sum() > 0


def test_per_request_restriction_serves_one_vector_per_request(tiny_log):
    result = train(TrainConfig("enhanced", 0, {**FAST["enhanced"], "per_item": False}, validation_share=0.0),
                   tiny_log, RewardSpec.default(tiny_log.task_names))
    state = tiny_log.state(slice(0, 10))
    with torch.no_grad():
        w = result.policy.act(state)
    real = state.mask
    spread = ((w - w[:, :1]).abs().amax(-1) * real).amax(1)
    assert (spread < 1e-6).all()
    torch.testing.assert_close(w.sum(-1)[real].double(), torch.ones(int(real.sum()), dtype=torch.float64),
                               atol=1e-5, rtol=0)


def test_enhanced_learns_from_per_item_logged_weights(tmp_path):
    """On a log with a per-item exploration share the behaviour term pulls each item towards its own logged
    weights: the trainer reads them, and they differ within a request."""
    from mtf_core.policies.enhanced import EnhancedTrainer, EnhancedConfig
    from mtf_core.policies.objective import build_training_data
    from mtf_core.simulate import generate
    from mtf_core.store import load_log
    from tests.conftest import TINY
    import dataclasses

    path = tmp_path / "per_item.duckdb"
    generate(dataclasses.replace(TINY, per_item_share=0.5), str(path))
    log = load_log(path)
    trainer = EnhancedTrainer(EnhancedConfig(steps=5, batch_size=32), build_training_data(log, RewardSpec.default(
        log.task_names)), 0)
    assert trainer.item_weights is not None
    within = (trainer.item_weights - trainer.item_weights[:, :1]).abs().amax(dim=(1, 2))
    assert (within > 1e-3).any()
    for step in range(5):
        trainer.step(step)


def test_strict_behaviour_constraint_trains_on_the_same_data(tiny_log):
    result = train(TrainConfig("integrated", 0, {**FAST["integrated"], "constraint": "behaviour"},
                               validation_share=0.0), tiny_log, RewardSpec.default(tiny_log.task_names))
    with torch.no_grad():
        w = result.policy.act(tiny_log.state(slice(0, 100)))
    logged = torch.from_numpy(tiny_log.weights[:100]).float()
    # Tied to each logged action: it serves weights close to the logging policy's mean, not far from it.
    assert float((w - logged.mean(0)).abs().sum(-1).mean()) < 0.5
