"""Plot builders, checked on their figures without a browser."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mtf_core import plots


def test_score_distributions_bins_every_task_on_the_server():
    rng = np.random.default_rng(0)
    tasks = [f"t{j}" for j in range(7)]
    sizes = {t: 50 * (j + 1) for j, t in enumerate(tasks[:-1])}  # the last task has no sampled scores
    sample = pd.DataFrame({"task": np.repeat(list(sizes), list(sizes.values())),
                           "score": rng.random(sum(sizes.values()))})
    sample.loc[0, "score"] = np.nan  # a missing score is left out, not a crash
    fig = plots.score_distributions(sample, tasks, bins=20)
    assert [trace.name for trace in fig.data] == tasks
    counts = {trace.name: int(np.sum(trace.y)) for trace in fig.data}
    assert counts == {**sizes, "t0": sizes["t0"] - 1, "t6": 0}
    assert all(len(trace.x) == 20 for trace in fig.data)  # bars, not the sample, go to the browser
    assert fig.data[5].xaxis == "x6" and fig.layout.height == 620  # seven tasks wrap onto two rows of five


def test_training_curves_are_titled_in_words_with_their_own_scales():
    from mtf_core.plots import metric_label, training_curves

    history = pd.DataFrame({"step": [0, 1, 0, 1, 0, 1], "value": [1.0, 0.5, 30.0, 31.0, 0.9, 1.1],
                            "name": ["losses/ltr"] * 2 + ["charts/concentration"] * 2 + ["exploration/kappa_core"] * 2})
    fig = training_curves(history)
    titles = {a.text for a in fig.layout.annotations}
    assert titles == {"warm-start ranking loss (LambdaRank)", "exploration concentration (higher = narrower)",
                      "exploration factor, core"}
    assert metric_label("custom/thing") == "custom/thing"
    assert fig.layout.yaxis2.matches is None  # every panel keeps its own y scale


def test_segments_keep_one_order_and_one_colour_on_every_figure():
    rows = pd.DataFrame({"segment": ["power", "casual", "new", "casual", "power", "new"],
                         "reward": [3.0, 1.0, 2.0, 1.5, 2.5, 0.5]})
    violin = plots.reward_distribution(rows)
    colours = {trace.name: trace.marker.color for trace in violin.data}
    assert [trace.name for trace in violin.data] == ["casual", "new", "power"]  # by name, not by appearance
    assert colours == {s: plots.segment_colour(s, ["power", "new", "casual"]) for s in colours}
    lengths = pd.DataFrame({"segment": ["power", "casual"], "n_requests": [1, 1], "n_sessions": [5, 7]})
    bars = plots.session_length_histogram(lengths, ["power", "new", "casual"])  # "new" has no sessions here
    assert {trace.name: trace.marker.color for trace in bars.data} == {s: colours[s] for s in ("casual", "power")}
    sizes = plots.segment_sizes(pd.DataFrame({"segment": ["power", "casual", "new"], "n_users": [10, 50, 20],
                                              "n_requests": [400, 900, 300]}))
    # Users and requests on their own axes (20 requests per user would flatten the users' bars), same order.
    assert [t.yaxis for t in sizes.data] == ["y", "y2"] and list(sizes.data[0].x) == ["casual", "new", "power"]
    assert list(sizes.data[0].y) == [50, 20, 10] and list(sizes.data[1].marker.color) == [colours[s] for s in
                                                                                          ("casual", "new", "power")]
    forest = plots.forest_plot(pd.DataFrame({"policy": "a", "segment": ["power", "casual"], "value": [1.0, 2.0],
                                             "ci_low": [0.5, 1.5], "ci_high": [1.5, 2.5]}), "segment", "t")
    assert list(forest.layout.yaxis.categoryarray) == ["power", "casual"]  # casual on top, as in every list


def test_estimates_the_log_does_not_support_are_drawn_hollow_and_faded():
    rows = pd.DataFrame({"policy": ["a", "a"], "label": ["IPS", "DM"], "value": [1.0, 2.0], "ci_low": [0.5, 1.5],
                         "ci_high": [1.5, 2.5], "verdict": [plots.UNSUPPORTED, "trustworthy"]})
    trace = plots.forest_plot(rows, "label", "t").data[0]
    assert list(trace.marker.symbol) == ["circle-open", "circle"] and list(trace.marker.opacity) == [0.35, 1.0]
    assert list(trace.customdata) == [plots.UNSUPPORTED, "trustworthy"]  # the verdict on hover
