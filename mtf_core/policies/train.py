"""One training loop for every algorithm: seeded, reproducible, reporting progress, cancellable.

`train(config, log, reward, on_step=...)` is what the CLI and the app call. `on_step(info)` receives the
step, the total and the step's metrics; returning False cancels the run cleanly (the result says so).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import torch

from mtf_core.errors import LogError
from mtf_core.policies.base import FusionPolicy
from mtf_core.policies.cem import CEMConfig, CEMTrainer
from mtf_core.policies.grade import GradeConfig, GradeTrainer
from mtf_core.policies.objective import TrainingData, build_training_data
from mtf_core.policies.static import StaticConfig, StaticTrainer
from mtf_core.reward import RewardSpec
from mtf_core.store import LogData

__all__ = ["TrainConfig", "TrainResult", "StepInfo", "Trainer", "ALGORITHMS", "train", "algorithm_config",
           "config_fields"]


class Trainer(Protocol):
    policy: FusionPolicy
    n_steps: int

    def step(self, step: int) -> dict[str, float]: ...


ALGORITHMS: dict[str, tuple[type, Callable[..., Trainer]]] = {
    "static": (StaticConfig, StaticTrainer),
    "cem": (CEMConfig, CEMTrainer),
    "grade": (GradeConfig, GradeTrainer),
}


def _register_more() -> None:
    """The other seed methods register themselves when their modules exist."""
    try:
        from mtf_core.policies import batchrl, enhanced, integrated  # noqa: F401
    except ImportError:
        return
    for module in (batchrl, integrated, enhanced):
        ALGORITHMS[module.ALGO] = (module.CONFIG, module.TRAINER)


_register_more()


@dataclass(frozen=True)
class TrainConfig:
    """A run's full recipe: algorithm, seed and the algorithm's hyperparameters (defaults where absent)."""

    algo: str
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.algo not in ALGORITHMS:
            raise LogError(f"unknown algorithm {self.algo!r}; choose one of {', '.join(ALGORITHMS)}")
        algorithm_config(self.algo, self.params)

    def to_dict(self) -> dict[str, Any]:
        return {"algo": self.algo, "seed": self.seed,
                "params": dataclasses.asdict(algorithm_config(self.algo, self.params))}


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
        except (TypeError, ValueError) as exc:
            raise LogError(f"{algo}: setting {name}={value!r} is not a {type(default).__name__}") from exc
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
    data: TrainingData


def train(config: TrainConfig, log: LogData, reward: RewardSpec,
          on_step: Callable[[StepInfo], bool | None] | None = None) -> TrainResult:
    """Train `config.algo` on `log` against `reward`; the same config and log give the same policy."""
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % (2**32))
    start = time.perf_counter()
    data = build_training_data(log, reward)
    config_cls, trainer_cls = ALGORITHMS[config.algo]
    trainer = trainer_cls(algorithm_config(config.algo, config.params), data, config.seed)
    history: list[tuple[int, dict[str, float]]] = []
    status = "finished"
    for step in range(trainer.n_steps):
        metrics = trainer.step(step)
        history.append((step, metrics))
        if on_step is not None and on_step(StepInfo(step, trainer.n_steps, metrics,
                                                    time.perf_counter() - start)) is False:
            status = "cancelled"
            break
    trainer.policy.eval()
    return TrainResult(trainer.policy, history, status, time.perf_counter() - start, config, data)
