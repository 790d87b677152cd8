"""The logging policy of a log: the density its logged weights were drawn from.

On simulator logs it is the simulator's own Dirichlet per segment, so its density equals `logging_logp`
exactly; on imported logs it is a Dirichlet per segment fitted to the logged weights by moments. It belongs
with the log (evaluation, diagnostics and the offline methods read it), not with the run store.
"""

from __future__ import annotations

import numpy as np

from mtf_core.policies.static import LoggingPolicy
from mtf_core.store import LogData

__all__ = ["logging_policy"]


def logging_policy(log: LogData) -> LoggingPolicy:
    """The logging policy of a log: the simulator's exact Dirichlet, or one fitted per segment."""
    if log.is_simulated:
        from mtf_core.simulate import SimConfig, logging_alpha

        config = SimConfig.from_json(log.meta["simulator_config"])
        alpha = logging_alpha(config)[np.argsort(config.segment_names)]
        return LoggingPolicy(log.task_names, log.segments, alpha)
    return LoggingPolicy.from_log(log.task_names, log.segments, log.segment, log.weights)
