"""Counterfactual ranking metrics, off-policy estimates and the simulator's ground truth (DESIGN §5).

One home per concept:
- `context`: a log bound to a reward (position curve, logged rewards, the direct model), the time split;
- `actions`: a target policy's actions on the log;
- `rerank`: NDCG@k, GAUC and the direct-method signals of the logged candidates re-ranked;
- `direct`: the direct model and the intervals of the model-based estimators (DM, DR);
- `outcome`: the learned outcome model (cross-fitted networks over candidates and states);
- `ratios`: importance ratios on the weight simplex (exact, or a Dirichlet kernel for fixed weights);
- `estimators`: IPS, SNIPS, NCIS, DR, DM as per-request terms;
- `bootstrap`: user-clustered intervals; `paired`: paired differences between two policies;
- `truth`: the policy run online in the simulator; `policy_value`: everything for one policy.
"""

from mtf_core.evaluate.actions import TargetActions, target_actions
from mtf_core.evaluate.bootstrap import N_BOOT, bootstrap_ratio
from mtf_core.evaluate.context import (
    CHUNK,
    OUTCOME_MODELS,
    EvalContext,
    EvaluationSample,
    check_log_for_evaluation,
    evaluation_sample,
    outcome_fit,
    prepare,
    reward_preview,
    time_split,
)
from mtf_core.evaluate.direct import DirectModel, direct_value
from mtf_core.evaluate.estimators import DM, DR, ESTIMATORS, IPS, NCIS, SNIPS, Estimator, OPEInputs, Ratio
from mtf_core.evaluate.paired import paired_difference
from mtf_core.evaluate.policy_value import EvaluationResult, evaluate_policy, point_value
from mtf_core.evaluate.ratios import ImportanceRatios, importance_ratio
from mtf_core.evaluate.rerank import expected_under, gauc, learned_under, ndcg_at_k, rerank_core, rerank_metrics, slate_depth, streamed_rerank, top_signals
from mtf_core.evaluate.truth import ground_truth, policy_for_truth

__all__ = [
    "CHUNK", "OUTCOME_MODELS", "N_BOOT", "EvalContext", "EvaluationSample", "evaluation_sample", "outcome_fit", "prepare", "check_log_for_evaluation", "reward_preview", "time_split",
    "TargetActions", "target_actions", "DirectModel", "direct_value", "Estimator", "OPEInputs", "Ratio", "IPS",
    "SNIPS", "NCIS", "DR", "DM", "ESTIMATORS", "ImportanceRatios", "importance_ratio", "ndcg_at_k", "gauc",
    "rerank_core", "rerank_metrics", "slate_depth", "top_signals", "expected_under", "learned_under", "streamed_rerank", "bootstrap_ratio",
    "paired_difference", "EvaluationResult", "evaluate_policy", "point_value", "ground_truth", "policy_for_truth",
]
