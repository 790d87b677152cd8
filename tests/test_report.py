"""The report as a decision document: the recommendation first, and how far to trust it."""

from __future__ import annotations

import copy
import json

import pytest

from mtf_core.compare import build_report, decision_headline, segment_lifts
from mtf_core.evaluate import evaluate_policy, policy_for_truth, prepare, target_actions
from mtf_core.policies.static import parse_static
from mtf_core.reward import RewardSpec


@pytest.fixture(scope="module")
def results(tiny_log):
    ctx = prepare(tiny_log, RewardSpec.default(tiny_log.task_names), outcome_model="linear")
    out = [evaluate_policy(ctx, target_actions(None, tiny_log, "logging"), n_boot=100)]
    for label, text in (("balanced", "click=0.2,like=0.2,finish=0.2,share=0.2,watch_time=0.2"),
                        ("click-heavy", "click=0.9,like=0.025,finish=0.025,share=0.025,watch_time=0.025")):
        policy = parse_static(text, tiny_log.task_names, tiny_log.segments)
        out.append(evaluate_policy(ctx, target_actions(policy, tiny_log, label), n_boot=100,
                                   truth_policy=policy_for_truth(policy, False)))
    return out


def test_headline_names_the_choice_its_interval_and_the_truth(results):
    text = decision_headline(results)
    assert "ecommendation" in text and "lower 95% bound of DR" in text and "[" in text and "same estimator" in text
    assert "simulator's truth" in text and "))" not in text  # the verdict inside the one parenthesis


def test_a_choice_resting_on_an_unsupported_estimate_says_so_first(results):
    doctored = [copy.deepcopy(r) for r in results]
    for r in doctored:
        for row in r.ope:
            row["verdict"] = "not supported by this log"
    assert decision_headline(doctored).startswith("No trustworthy recommendation.")


def test_segment_lifts_are_paired_per_segment(results, tiny_log):
    rows = segment_lifts(results, "dr")
    assert {r[0] for r in rows} == set(tiny_log.segments) and {r[1] for r in rows} == {"balanced", "click-heavy"}
    assert all(r[3] in ("yes", "no") for r in rows)


def test_each_paired_lift_carries_the_verdict_on_the_estimate_it_rests_on(results):
    from mtf_core.compare import paired_lifts

    lifts = paired_lifts(results, "logging")
    assert set(lifts["policy"]) == {"balanced", "click-heavy"}
    estimates = lifts[lifts["estimator"].isin(["ips", "snips", "ncis", "dm", "dr"])]
    assert len(estimates) == 2 * 5
    for row in estimates.to_dict("records"):
        (own,) = [o for r in results if r.policy == row["policy"] for o in r.ope
                  if o["estimator"] == row["estimator"] and o["segment"] is None]
        assert row["verdict"] == own["verdict"] != ""
        rests_on = [str(own[k]) for k in ("propensities", "model") if isinstance(own.get(k), str)]
        assert row["rests on"] == "; ".join(rests_on) != ""
    assert (lifts[lifts["estimator"].str.startswith("truth")]["verdict"] == "").all()


def test_report_lays_out_tables_not_json(results):
    configs = {"balanced": {"name": "b", "algo": "static", "config": {"seed": 3, "params": {"steps": 5}}}}
    html = build_report("T", results, [], json.loads(RewardSpec.default(("click",)).to_json()), "fp", configs)
    assert html.index("class='headline'") < html.index("<h2>")
    assert "<td>steps</td><td>5</td>" in html and "<td>seed</td><td>3</td>" in html
    assert "<td>b (static, balanced)</td>" in html  # policies by name and algorithm, not by reference
    assert "<dt>trustworthy</dt>" in html and "{" not in html.split("<h2>Run settings</h2>")[1].split("</table>")[0]


def test_estimators_and_ranking_metrics_are_named_for_people():
    from mtf_core.compare import estimator_label, ranking_metric_label

    assert estimator_label("dr") == "DR (doubly robust)" and estimator_label("truth") == "truth (simulator)"
    assert estimator_label("custom") == "custom"  # an unknown name shows as is
    assert ranking_metric_label("ndcg@6:click") == "NDCG@6, click"
    assert ranking_metric_label("mtf_gauc:reward") == "MTF-GAUC, composite reward"
    assert ranking_metric_label("dm_reward@6:reward") == "DM reward@6, composite reward"
