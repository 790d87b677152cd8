"""Turn a policy reference (`logging`, `static:TASK=W,...`, `run:ID`) into a policy for a log."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mtf_core.errors import LogError
from mtf_core.policies.base import FusionPolicy
from mtf_core.policies.static import LoggingPolicy, parse_static
from mtf_core.store import LogData

__all__ = ["resolve_policy", "logging_policy"]


def logging_policy(log: LogData) -> LoggingPolicy:
    """The logging policy of a log: the simulator's exact Dirichlet, or one fitted per segment."""
    if log.is_simulated:
        from mtf_core.simulate import SimConfig, logging_alpha

        config = SimConfig.from_json(log.meta["simulator_config"])
        alpha = logging_alpha(config)[np.argsort(config.segment_names)]
        return LoggingPolicy(log.task_names, log.segments, alpha)
    return LoggingPolicy.from_log(log.task_names, log.segments, log.segment, log.weights)


def resolve_policy(text: str, log: LogData, runs_dir: str | Path = "runs") -> tuple[FusionPolicy | None, str]:
    """(policy, label); the policy is None for `logging`, which evaluation treats as the logged actions."""
    text = text.strip()
    if text == "logging":
        return None, "logging"
    if text.startswith("static:"):
        policy = parse_static(text[len("static:"):], log.task_names, log.segments)
        return policy, policy.label
    if text.startswith("run:"):
        from mtf_core.runs import RunStore

        run_id = text[len("run:"):]
        policy = RunStore(runs_dir).load_policy(run_id, log)
        return policy, f"run:{run_id}"
    raise LogError(f"unknown policy {text!r}; use logging, static:TASK=W,... or run:RUN_ID")
