"""RewardSpec: JSON round trip, checks with clear messages, and the composite reward terms."""

from __future__ import annotations

import numpy as np
import pytest

from mtf_core.errors import LogError
from mtf_core.reward import RewardSpec, load_reward_spec, request_reward, resolve_reward

TASKS = ("click", "like", "share")


def test_json_round_trip():
    spec = RewardSpec({"click": 1.0, "share": 3.5}, normalize=False, clip=20.0, continuation=0.5, returned=2.0,
                      share_penalty=1.0, vertex_penalty=0.3)
    assert RewardSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize(("text", "message"), [
    ('{"coefficients": {"click": "high"}}', "must be a number"),
    ('{"coefficients": {"click": 0, "like": 0}}', "every coefficient is zero"),
    ('{"coefficients": {"click": 1e300}}', "finite number"),
    ('{"coefficients": {"click": 1}, "bonus": 1}', "unknown fields"),
    ("[1, 2]", "must be a JSON object"),
    ("{not json", "not valid JSON"),
])
def test_bad_specs_are_refused_with_a_message(text, message):
    with pytest.raises(LogError, match=message):
        RewardSpec.from_json(text)


def test_unknown_task_is_named(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"coefficients": {"click": 1, "dwell": 2}}')
    with pytest.raises(LogError, match=r"r\.json.*unknown tasks \['dwell'\]"):
        load_reward_spec(path, TASKS)


def test_reward_terms_match_their_definition():
    spec = RewardSpec({"click": 1.0, "like": 2.0}, normalize=False, continuation=0.5, returned=3.0,
                      vertex_penalty=1.0, vertex_threshold=0.5)
    labels = np.zeros((2, 1, 3))
    resolved = resolve_reward(spec, TASKS, labels, np.ones((2, 1), bool), np.ones((2, 3)), np.ones(1))
    feedback = np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 4.0]])
    continued = np.array([True, False])
    returned = np.array([1.0, 1.0])
    weights = np.array([[0.9, 0.05, 0.05], [0.4, 0.3, 0.3]])
    parts = request_reward(resolved, feedback, continued, returned, weights, np.ones((2, 3)))
    np.testing.assert_allclose(parts.immediate, [4.0, 0.0])
    np.testing.assert_allclose(parts.session, [0.5, 3.0])  # returned is credited to the last request only
    np.testing.assert_allclose(parts.penalty, [0.8, 0.0])  # (0.9 - 0.5) / (1 - 0.5)
    np.testing.assert_allclose(parts.total, [3.7, 3.0])
