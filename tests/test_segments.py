"""Per-segment weight views: Dirichlet policies by their concentration, deterministic ones as point masses."""

from __future__ import annotations

import numpy as np

from mtf_core.plots import beta_marginals as marginals_figure
from mtf_core.policies.static import parse_static
from mtf_core.segments import beta_marginals, segment_weights, ternary_samples


def test_a_deterministic_policy_is_drawn_as_the_point_mass_it_is(tiny_log):
    policy = parse_static("click=0.5,like=0.2,finish=0.3", tiny_log.task_names, tiny_log.segments)
    weights = segment_weights(policy, tiny_log, "static")
    assert weights.deterministic and np.isinf(weights.summary["concentration"]).all()
    density = beta_marginals(weights)
    for task, w in zip(tiny_log.task_names, policy.weights[0].numpy()):
        part = density[(density["task"] == task) & (density["segment"] == tiny_log.segments[0])]
        peak = part.loc[part["density"].idxmax(), "x"]
        assert abs(peak - w) < 0.01 and (part["density"] > 0).sum() == 1, task  # one spike, at the weight
    samples = ternary_samples(weights, tiny_log.segments[0], ("click", "like", "finish"))
    np.testing.assert_allclose(samples, np.tile([0.5, 0.2, 0.3], (len(samples), 1)), atol=1e-9)
    figure = marginals_figure(density, tiny_log.task_names, "served")
    assert figure.layout.title.text == "served"


def test_a_dirichlet_policy_keeps_its_concentration_and_beta_marginals(tiny_log):
    weights = segment_weights(None, tiny_log, "logging")
    assert not weights.deterministic and np.isfinite(weights.summary["concentration"]).all()
    density = beta_marginals(weights)
    assert (density.groupby(["segment", "task"])["density"].apply(lambda d: (d > 0).sum()) > 10).all()
    samples = ternary_samples(weights, tiny_log.segments[0], ("click", "like", "finish"))
    assert samples.std(0).min() > 0.01
