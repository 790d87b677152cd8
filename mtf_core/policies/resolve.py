"""Turn a policy reference (`logging`, `static:TASK=W,...`, `run:ID`) into a policy for a log."""

from __future__ import annotations

from pathlib import Path

from mtf_core.errors import LogError
from mtf_core.policies.base import FusionPolicy
from mtf_core.policies.static import parse_static
from mtf_core.store import LogData

__all__ = ["resolve_policy"]


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
