"""The learned outcome model: cross-fitted without leakage, better than the linear model where the MTL scores
are mis-calibrated (held-out fit and far policies against the truth), and labelled wherever it is used."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from benchmarks.outcome_model import far_policy_errors
from mtf_core.evaluate import evaluate_policy, evaluation_sample, outcome_fit, prepare, target_actions
from mtf_core.evaluate.direct import LEARNED_LABEL, LINEAR_LABEL
from mtf_core.evaluate.outcome import fit_outcome, user_folds
from mtf_core.plots import outcome_calibration
from mtf_core.policies.static import parse_static
from mtf_core.reward import RewardSpec
from mtf_core.simulate import SimConfig, generate
from mtf_core.store import load_log


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The default (mis-calibrated) world: popular items' scores are inflated, clickbait's too."""
    path = tmp_path_factory.mktemp("outcome") / "world.duckdb"
    generate(SimConfig(n_users=400, seed=3), str(path))
    log = load_log(path)
    return path, prepare(log, RewardSpec.default(log.task_names))


def test_no_request_is_predicted_by_a_network_that_saw_its_user(world):
    _, ctx = world
    log = ctx.log
    args = (ctx.logged.session, ctx.resolved.position_curve, ctx.resolved.coefficients)
    fitted = fit_outcome(log, *args)
    folds = user_folds(log.user_id, 2, 0)
    for f in range(2):
        np.testing.assert_array_equal(fitted.item_value[folds == f], fitted.fold_item_value[f][folds == f])
    # Scramble the labels and sessions of fold 0's users: network 0, trained on the other fold, must not move.
    labels = log.labels.copy()
    labels[folds == 0] = labels[folds == 0][::-1]
    session = ctx.logged.session.copy()
    session[folds == 0] = 0.0
    from dataclasses import replace

    scrambled = fit_outcome(replace(log, labels=labels), session, *args[1:])
    np.testing.assert_allclose(scrambled.fold_item_value[0], fitted.fold_item_value[0], atol=1e-6)
    assert not np.allclose(scrambled.fold_item_value[1], fitted.fold_item_value[1], atol=1e-3)


def test_learned_model_fits_held_out_users_better_and_is_chosen(world):
    _, ctx = world
    r2, calibration = outcome_fit(ctx)
    overall = r2[r2["segment"] == "all"].set_index("model")["r2"]
    assert overall["learned"] > overall["linear"]
    assert ctx.direct_view.name == "learned" and ctx.direct_view.label == LEARNED_LABEL
    assert set(calibration["model"]) == {"linear", "learned"}
    assert set(calibration["segment"]) == set(ctx.log.segments)
    fig = outcome_calibration(calibration)
    assert len(fig.data) == 2 * len(ctx.log.segments)


@pytest.mark.slow
def test_far_policies_error_at_most_half_the_linear_models(tmp_path):
    """Against the simulator's truth, on the third of 24 candidate vectors farthest from logging, over six
    worlds of 1,000 users: pooled, the learned model's error is at most half the linear model's, and it is
    smaller in every world."""
    frame = far_policy_errors(range(1, 7), n_users=1000, folder=tmp_path)
    assert frame["learned_mae"].sum() <= 0.5 * frame["linear_mae"].sum(), frame.to_dict("records")
    assert (frame["learned_mae"] < frame["linear_mae"]).all(), frame.to_dict("records")


def test_held_out_evaluation_uses_the_training_sessions_networks(world):
    _, ctx = world
    sample = evaluation_sample(ctx.log, RewardSpec.default(ctx.log.task_names), 0.3, outcome_model="learned")
    held = sample.ctx
    assert held.direct_view.name == "learned"
    assert held.learned_outcome.nets is held.fitted_on.learned_outcome.nets
    policy = parse_static("click=0.1,like=0.6,finish=0.1,share=0.1,watch_time=0.1", held.log.task_names,
                          held.log.segments)
    result = evaluate_policy(held, target_actions(policy, held.log, "like-heavy"), n_boot=100)
    dm = result.estimate("dm")
    assert dm["model"] == LEARNED_LABEL and dm["ci_low"] < dm["value"] < dm["ci_high"]
    assert result.direct_model["name"] == "learned"


def test_linear_choice_and_small_logs_fall_back(world, tiny_log):
    _, ctx = world
    linear = prepare(ctx.log, RewardSpec.default(ctx.log.task_names), outcome_model="linear")
    assert linear.direct_view.label == LINEAR_LABEL and linear.learned_outcome is not None  # fitted only on demand
    few_users = tiny_log.subset(np.flatnonzero(np.isin(tiny_log.user_id, np.unique(tiny_log.user_id)[:30])))
    few = prepare(few_users, RewardSpec.default(few_users.task_names))
    assert few.learned_outcome is None and few.direct_view.name == "linear"
    with pytest.raises(Exception, match="too few users"):
        _ = prepare(few_users, RewardSpec.default(few_users.task_names), outcome_model="learned").direct_view
    with pytest.raises(ValueError, match="outcome model"):
        prepare(ctx.log, RewardSpec.default(ctx.log.task_names), outcome_model="forest")


def test_cli_names_the_model(world):
    path, _ = world
    out = subprocess.run([sys.executable, "-m", "mtf_core", "evaluate", str(path), "--policy",
                          "static:click=0.2,like=0.2,finish=0.2,share=0.2,watch_time=0.2", "--n-boot", "50",
                          "--outcome-model", "learned", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["direct_model"]["name"] == "learned"
    assert doc["direct_model"]["held_out_r2"]["learned"][0] > doc["direct_model"]["held_out_r2"]["linear"][0]
    assert {row["model"] for row in doc["ope"] if row["estimator"] in ("dm", "dr")} == {LEARNED_LABEL}
    bad = subprocess.run([sys.executable, "-m", "mtf_core", "evaluate", str(path), "--outcome-model", "forest"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "outcome-model" in bad.stderr
