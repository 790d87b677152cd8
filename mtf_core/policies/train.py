"""One training loop for every algorithm: seeded, reproducible, reporting progress, cancellable.

`train(config, log, reward, on_step=...)` is what the CLI and the app call. `on_step(info)` receives the
step, the total and the step's metrics; returning False cancels the run cleanly (the result says so).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np
import torch

from mtf_core.errors import LogError
from mtf_core.evaluate import EvalContext, point_value, prepare, target_actions, time_split
from mtf_core.policies.base import FusionPolicy
from mtf_core.policies.batchrl import BatchRLConfig, BatchRLTrainer
from mtf_core.policies.cem import CEMConfig, CEMTrainer
from mtf_core.policies.enhanced import EnhancedConfig, EnhancedTrainer
from mtf_core.policies.grade import GradeConfig, GradeTrainer
from mtf_core.policies.integrated import IntegratedConfig, IntegratedTrainer
from mtf_core.policies.objective import TrainingData, build_training_data
from mtf_core.policies.parallel import LOCAL, DataParallel, unwrap
from mtf_core.policies.static import StaticConfig, StaticTrainer
from mtf_core.reward import RewardSpec
from mtf_core.store import LogData
from mtf_core import threads
from mtf_core.threads import uses_cores

if TYPE_CHECKING:
    from mtf_core.runs import RunStore

__all__ = ["TrainConfig", "TrainResult", "StepInfo", "Trainer", "ALGORITHMS", "DATA_PARALLEL", "NEEDS_LOGGED_WEIGHTS",
           "check_trainable", "scaled_budget", "train", "train_run", "run_summary",
           "algorithm_config", "config_fields"]


class Trainer(Protocol):
    policy: FusionPolicy
    n_steps: int

    def step(self, step: int) -> dict[str, float]: ...


ALGORITHMS: dict[str, tuple[type, Callable[..., Trainer]]] = {
    "static": (StaticConfig, StaticTrainer),
    "cem": (CEMConfig, CEMTrainer),
    "grade": (GradeConfig, GradeTrainer),
    "batchrl": (BatchRLConfig, BatchRLTrainer),
    "integrated": (IntegratedConfig, IntegratedTrainer),
    "enhanced": (EnhancedConfig, EnhancedTrainer),
}

NEEDS_LOGGED_WEIGHTS: dict[str, str] = {
    "static": "it copies the logged weights' mean per segment",
    "batchrl": "its critic learns the value of the logged actions and its actor stays near them (BCQ)",
    "integrated": "its constraints are built on the exploration policy that chose the logged actions",
    "enhanced": "its actor is regularised towards the logged (per-item) actions",
}
"""Algorithms that learn from the logged fusion weights, and why: a log without them cannot train these."""


BUDGET_EPOCHS = 50
"""A small log trains for at most this many passes over its requests (never fewer than BUDGET_FLOOR steps)."""
BUDGET_FLOOR = 50
_STEP_SETTINGS = ("steps", "warm_start_steps", "steps_per_round", "fqe_steps")


def scaled_budget(algo: str, params: dict[str, Any], n_requests: int) -> tuple[dict[str, Any], str | None]:
    """The settings a log of `n_requests` training requests trains with: a batch no larger than the log and
    at most BUDGET_EPOCHS passes over it, for the budget settings left at their defaults (a setting the user
    gave is kept). Large logs keep the defaults. Returns (params, a note saying what was scaled, or None)."""
    default = algorithm_config(algo, {})
    effective, changed = dict(params), []
    batch = int(params.get("batch_size", getattr(default, "batch_size", 0)) or 0)
    if "batch_size" not in params and hasattr(default, "batch_size") and n_requests < default.batch_size:
        batch = max(min(32, default.batch_size), n_requests)
        effective["batch_size"] = batch
        changed.append(f"batch size {default.batch_size} -> {batch}")
    if batch:
        cap = max(BUDGET_FLOOR, math.ceil(BUDGET_EPOCHS * n_requests / batch))
        for name in _STEP_SETTINGS:
            value = getattr(default, name, None)
            if name not in params and isinstance(value, int) and value > cap:
                effective[name] = cap
                changed.append(f"{name.replace('_', ' ')} {value} -> {cap}")
    if not changed:
        return effective, None
    return effective, (f"budget scaled to the log's {n_requests:,} training requests (at most {BUDGET_EPOCHS} "
                       f"passes over them): {', '.join(changed)}")


def check_trainable(algo: str, log: LogData) -> None:
    """Refuse, naming the log and the reason, an algorithm that needs logged weights on a log without them."""
    if algo in NEEDS_LOGGED_WEIGHTS and not log.weights_known:
        raise LogError(f"{log.path}: {algo} cannot train on this log: {NEEDS_LOGGED_WEIGHTS[algo]}, and the log "
                       "records no fusion weights (NULL w_*: random exposure or an unlogged ranker); train cem or "
                       "grade, which learn from the scores and labels alone")


@dataclass(frozen=True)
class TrainConfig:
    """A run's full recipe: algorithm, seed and the algorithm's hyperparameters (defaults where absent)."""

    algo: str
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    validation_share: float = 0.2
    """The latest sessions held out to validate on (0 = train on everything, no early stopping)."""
    n_evaluations: int = 10
    """Validation estimates during training."""
    patience: int = 4
    """Stop after this many validation estimates without improvement (0 = never stop early)."""
    user_sample: float = 1.0
    """The share of the log's users trained on (`load_log(..., user_sample, seed)`: a log larger than memory
    trains on a reproducible sample of whole users); recorded with the run."""

    def __post_init__(self) -> None:
        if self.algo not in ALGORITHMS:
            raise LogError(f"unknown algorithm {self.algo!r}; choose one of {', '.join(ALGORITHMS)}")
        if not 0.0 <= self.validation_share < 0.9 or self.n_evaluations < 1 or self.patience < 0:
            raise LogError("need 0 <= validation_share < 0.9, n_evaluations >= 1 and patience >= 0")
        if not 0 <= self.seed < 2**63:
            raise LogError(f"seed {self.seed} must lie in [0, 2**63)")
        if not 0.0 < self.user_sample <= 1.0:
            raise LogError(f"user sample {self.user_sample!r}: a share of the users in (0, 1]")
        algorithm_config(self.algo, self.params)

    def to_dict(self) -> dict[str, Any]:
        return {"algo": self.algo, "seed": self.seed, "validation_share": self.validation_share,
                "n_evaluations": self.n_evaluations, "patience": self.patience, "user_sample": self.user_sample,
                "params": dataclasses.asdict(algorithm_config(self.algo, self.params))}


# Allowed values of every algorithm setting, by name (the names mean the same in every config):
# (low, high, low inclusive, high inclusive). Sizes are capped where a larger value would only exhaust memory.
SETTING_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "steps": (1, 1_000_000, True, True), "warm_start_steps": (0, 1_000_000, True, True),
    "batch_size": (1, 1_000_000, True, True), "group_size": (2, 256, True, True), "hidden": (1, 4096, True, True),
    "epochs_per_batch": (1, 100, True, True), "iterations": (1, 10_000, True, True),
    "population": (2, 100_000, True, True), "n_elite": (1, 100_000, True, True),
    "n_eval_requests": (1, 10_000_000, True, True), "n_proposals": (1, 1000, True, True),
    "rounds": (1, 100, True, True), "steps_per_round": (1, 1_000_000, True, True), "n_critics": (1, 64, True, True),
    "n_explore_candidates": (1, 1000, True, True),
    "lr": (0.0, 1.0, False, True), "discount": (0.0, 1.0, True, False), "max_perturbation": (0.0, 1.0, True, True),
    "lmbda": (0.0, 1.0, True, True), "tau": (0.0, 1.0, False, True), "temperature": (0.0, 1e3, False, True),
    "concentration": (0.0, 1e6, False, True), "explore_concentration": (0.0, 1e6, False, True),
    "min_initial_concentration": (0.0, 1e6, False, True), "behaviour_weight": (0.0, 1e6, True, True),
    "disagreement": (0.0, 1e6, True, True), "support_penalty": (0.0, 1e6, True, True),
    "kl_coef": (0.0, 1e6, True, True), "clip_eps": (0.0, 1.0, False, False), "adapt_rate": (0.0, 1.0, True, True),
    "target_decay": (0.0, 1.0, True, True), "explore_user_share": (0.0, 1.0, False, True),
    "share_penalty": (0.0, 1e6, True, True), "vertex_penalty": (0.0, 1e6, True, True),
    "vertex_threshold": (0.0, 1.0, False, False), "target_spread": (0.0, 100.0, False, True),
    "concentration_bounds": (0.0, 20.0, False, True), "activeness": (0.0, 1e6, True, True),
    "stickiness": (0.0, 1e6, True, True), "fqe_steps": (0, 1_000_000, True, True),
}
SETTING_CHOICES: dict[str, tuple[str, ...]] = {"exploration": ("dirichlet", "gaussian"),
                                               "constraint": ("support", "behaviour")}


def _range_text(low: float, high: float, low_in: bool, high_in: bool) -> str:
    return f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def _check_setting(algo: str, name: str, value: Any) -> None:
    """Refuse a setting outside its allowed range (or choices), naming the range."""
    if name in SETTING_CHOICES and value not in SETTING_CHOICES[name]:
        raise LogError(f"{algo}: setting {name}={value!r} must be one of {', '.join(SETTING_CHOICES[name])}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not math.isfinite(value):
        raise LogError(f"{algo}: setting {name}={value!r} must be a finite number")
    if name in SETTING_RANGES:
        low, high, low_in, high_in = SETTING_RANGES[name]
        inside = (value >= low if low_in else value > low) and (value <= high if high_in else value < high)
        if not inside:
            raise LogError(f"{algo}: setting {name}={value!r} is outside its allowed range "
                           f"{_range_text(low, high, low_in, high_in)}")


def algorithm_config(algo: str, params: dict[str, Any]) -> Any:
    """The algorithm's frozen config dataclass; unknown or ill-typed settings raise LogError."""
    config_cls = ALGORITHMS[algo][0]
    known = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise LogError(f"{algo}: unknown settings {unknown}; known: {', '.join(known)}")
    typed = {}
    for name, value in params.items():
        default = getattr(config_cls(), name)
        try:
            typed[name] = _coerce(value, type(default))
        except (TypeError, ValueError, OverflowError) as exc:
            raise LogError(f"{algo}: setting {name}={value!r} is not a {type(default).__name__}") from exc
        _check_setting(algo, name, typed[name])
    try:
        return config_cls(**typed)
    except ValueError as exc:
        raise LogError(f"{algo}: {exc}") from exc


def _coerce(value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        return bool(value)
    return kind(value)


def config_fields(algo: str) -> list[tuple[str, Any, str]]:
    """(name, default, help) per hyperparameter, for forms and --help: help is the field's docstring."""
    import ast
    import inspect

    config_cls = ALGORITHMS[algo][0]
    tree = ast.parse(inspect.getsource(config_cls))
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = str(after.value.value)  # type: ignore[union-attr]
    default = config_cls()
    return [(f.name, getattr(default, f.name), docs.get(f.name, "")) for f in dataclasses.fields(config_cls)]


@dataclass(frozen=True)
class StepInfo:
    step: int
    n_steps: int
    metrics: dict[str, float]
    elapsed: float


@dataclass
class TrainResult:
    policy: FusionPolicy
    history: list[tuple[int, dict[str, float]]]
    status: str  # finished | cancelled
    seconds: float
    config: TrainConfig
    data: TrainingData | None  # None for a run trained elsewhere (on Ray workers)
    best_step: int | None = None
    best_value: float | None = None
    stopped_early: bool = False
    validation_estimator: str = "dr"
    notes: list[str] = field(default_factory=list)  # what the trainer says about the run (e.g. a saturated control)


class _Validator:
    """Validation estimates on held-out later sessions; keeps the best checkpoint."""

    def __init__(self, log: LogData | None, reward: RewardSpec, n_steps: int, n_evaluations: int,
                 fitted_on: EvalContext) -> None:
        # The direct model and the reward's normalisation come from the training sessions: a model fitted on
        # the validation sessions themselves made the checkpoint choice optimistic.
        self.ctx = prepare(log, reward, fitted_on) if log is not None and log.n_requests else None
        self.estimator = "dr"
        self.every = max(1, n_steps // n_evaluations)
        self.n_steps = n_steps
        self.best_value, self.best_step, self.best_state = -np.inf, None, None
        self.bad = 0

    def due(self, step: int, start: int = 0) -> bool:
        """Whether to validate after `step`; never before `start` (a trainer's warm-up is not its policy)."""
        return self.ctx is not None and step >= start and ((step + 1) % self.every == 0 or step + 1 == self.n_steps)

    def evaluate(self, step: int, policy: FusionPolicy) -> float:
        assert self.ctx is not None
        with torch.no_grad():
            value, self.estimator = point_value(self.ctx, target_actions(policy, self.ctx.log, "validation",
                                                                         stochastic=False))
        if value > self.best_value:
            self.best_value, self.best_step, self.bad = value, step, 0
            self.best_state = copy.deepcopy(policy.state_dict())
        else:
            self.bad += 1
        return value


DATA_PARALLEL = ("grade",)
"""Algorithms whose updates run data-parallel (`train(..., parallel=...)`, `train_on_ray`)."""


@uses_cores
def train(config: TrainConfig, log: LogData, reward: RewardSpec,
          on_step: Callable[[StepInfo], bool | None] | None = None, parallel: DataParallel = LOCAL) -> TrainResult:
    """Train `config.algo` on `log` against `reward`; the same config and log give the same policy.

    With `validation_share > 0`, the latest sessions are held out; the validation estimate of the policy's
    mean weights (DR where the log has propensities, else DM, with the direct model fitted on the training
    sessions) is recorded as `validation/dr` or `validation/dm` every n_steps / n_evaluations steps, training
    stops after `patience` estimates without improvement, and the best checkpoint is restored. A trainer with
    a warm-up (`validate_from`, e.g. GRADE's stage 1) is validated only after it: the method's policy is what
    its main stage makes of the warm start, not the warm start itself.

    `parallel` makes this one worker of a data-parallel run (DATA_PARALLEL algorithms; `train_on_ray`): every
    worker runs this function on the same log and validates the same (identical) network.
    """
    check_trainable(config.algo, log)
    if parallel.world_size > 1 and config.algo not in DATA_PARALLEL:
        raise LogError(f"{config.algo} trains in one process; data-parallel training is for "
                       f"{', '.join(DATA_PARALLEL)}")
    torch.manual_seed(config.seed)  # alike on every worker: each draws the whole batch's noise (GradeTrainer)
    np.random.seed(config.seed % (2**32))
    start = time.perf_counter()
    train_rows, val_rows = time_split(log, config.validation_share)
    train_log = log.subset(train_rows) if len(val_rows) else log
    data = build_training_data(train_log, reward)
    config_cls, trainer_cls = ALGORITHMS[config.algo]
    params, budget_note = scaled_budget(config.algo, config.params, train_log.n_requests)
    extra = {"parallel": parallel} if config.algo in DATA_PARALLEL else {}
    trainer = trainer_cls(algorithm_config(config.algo, params), data, config.seed, **extra)
    validator = _Validator(log.subset(val_rows) if len(val_rows) else None, reward, trainer.n_steps,
                           config.n_evaluations, data.ctx)
    history: list[tuple[int, dict[str, float]]] = []
    status, stopped_early = "finished", False
    validate_from = int(getattr(trainer, "validate_from", 0))
    for step in range(trainer.n_steps):
        threads.refresh()  # give up or take back a share of the cores as other jobs of the process come and go
        metrics = trainer.step(step)
        if validator.due(step, validate_from):
            trainer.policy.eval()
            value = validator.evaluate(step, trainer.policy)
            metrics = {**metrics, f"validation/{validator.estimator}": value}
            trainer.policy.train()
        history.append((step, metrics))
        if on_step is not None and on_step(StepInfo(step, trainer.n_steps, metrics,
                                                    time.perf_counter() - start)) is False:
            status = "cancelled"
            break
        if parallel.any(bool(config.patience) and validator.bad >= config.patience):
            stopped_early = True
            break
    if validator.best_state is not None:
        trainer.policy.load_state_dict(validator.best_state)
    unwrap(trainer.policy).eval()
    best = validator.best_value if validator.best_step is not None else None
    notes = ([budget_note] if budget_note else []) + (trainer.notes() if hasattr(trainer, "notes") else [])
    if "user_sample" in log.meta:
        notes.insert(0, f"trained on a {float(log.meta['user_sample']):.0%} sample of the log's users "
                        f"({len(np.unique(log.user_id)):,} users, {log.n_requests:,} requests; hash of user_id "
                        f"with seed {log.meta.get('user_sample_seed', '0')})")
    return TrainResult(trainer.policy, history, status, time.perf_counter() - start, config, data,
                       validator.best_step, best, stopped_early, validator.estimator, notes)


def run_summary(result: TrainResult) -> dict[str, Any]:
    """What the run store keeps about a finished training besides its history."""
    return {"final": result.history[-1][1] if result.history else {}, "best_step": result.best_step,
            "best_validation": result.best_value, "validation_estimator": result.validation_estimator,
            "stopped_early": result.stopped_early, "notes": result.notes}


def train_run(store: "RunStore", config: TrainConfig, log: LogData, reward: RewardSpec,
              on_step: Callable[[StepInfo], bool | None] | None = None, name: str | None = None,
              on_created: Callable[[str], None] | None = None, engine: str = "local", workers: int = 2,
              address: str | None = None) -> tuple[str, TrainResult]:
    """Create a run in `store`, train it and record the result (the CLI's and the app's one path); with
    `engine="ray"`, on `workers` Ray Train workers (`train_on_ray`; no per-step progress).

    While it trains, the run is registered as live in this process; a failure or an interruption (a
    KeyboardInterrupt, a Streamlit rerun ending the script) records it as `failed` or `cancelled`, never
    leaving it `running`."""
    if engine not in ("local", "ray"):
        raise LogError(f"engine {engine!r}: expected local or ray")
    run_id = store.create_run(config.algo, config.to_dict(), reward, log, name)
    if on_created is not None:
        on_created(run_id)
    with store.training(run_id):
        try:
            if engine == "ray":
                from mtf_core.policies.ray_train import train_on_ray

                # Ray Train's checkpoint goes beside the run: on a cluster the run store is on shared storage.
                result = train_on_ray(config, log.path, reward, workers, address, store.root / ".ray-train")
            else:
                result = train(config, log, reward, on_step)
        except Exception:
            store.mark_if_running(run_id, "failed")
            raise
        store.finish_run(run_id, result.policy, result.history, result.status, result.seconds,
                         run_summary(result))
    return run_id, result
