"""The MTL scoring step: a small multi-task network gives every candidate a score per task.

Fusion needs the MTL model's predictions (`s_<task>`), which a public log such as KuaiRand does not ship.
A shared-bottom network (one trunk over user, item and context features, one tower per task) predicts every
task's label: binary tasks by their probability, continuous ones by their expected value in the label's
units. No score may have seen its own label, or fusion would rank by the outcome itself: the network is
either cross-fitted (each fold of impressions, or of users, scored by the network trained on the others) or, as in
xMTF's setup on KuaiRand, trained on other traffic (the production logs) and applied to the log (the
random-exposure one). Each task's held-out quality is reported against a constant predictor.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import duckdb
import numpy as np
import pyarrow as pa
import torch

from mtf_core.errors import LogError
from mtf_core.evaluate.outcome import user_folds
from mtf_core.evaluate.rerank import gauc
from mtf_core.schema import IDENTIFIER, Task, quote_ident, read_tasks, table_columns
from mtf_core.threads import one_thread

__all__ = ["ScoringConfig", "TaskQuality", "ScoringResult", "fit_scores", "signed_log1p", "log_features", "score_log",
           "quality_lines"]


FOLD_UNITS = ("impression", "user")


@dataclass(frozen=True)
class ScoringConfig:
    """The scoring network and its training budget (steps follow the data's size, within `max_steps`)."""

    hidden: int = 64
    tower: int = 16
    folds: int = 5
    fold_by: str = "impression"
    """Cross-fitting folds of impressions (the network knows a user from their other impressions, as a
    production MTL model knows them from their history) or of users (it must generalise to unseen users)."""
    batch_size: int = 1024
    max_steps: int = 3000
    max_epochs: int = 300
    patience: int = 15
    lr: float = 3e-3
    weight_decay: float = 1e-4
    validation_share: float = 0.15
    seed: int = 0

    def __post_init__(self) -> None:
        if self.fold_by not in FOLD_UNITS:
            raise LogError(f"scoring folds by {self.fold_by!r}: expected one of {', '.join(FOLD_UNITS)}")
        if self.folds < 2:
            raise LogError(f"cross-fitting needs at least 2 folds, got {self.folds}")


@dataclass(frozen=True)
class TaskQuality:
    """Held-out quality of one task's scores: AUC (binary) or Pearson correlation (continuous), and the
    held-out loss (log-loss or squared error in label units) beside a constant predictor's."""

    task: str
    kind: str
    metric: str
    value: float
    loss: float
    constant_loss: float
    n_rows: int

    @property
    def beats_constant(self) -> bool:
        return self.loss < self.constant_loss

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "beats_constant": self.beats_constant}


@dataclass(frozen=True)
class ScoringResult:
    scores: np.ndarray  # (n, K) float64, predictions in label units
    quality: tuple[TaskQuality, ...]
    setup: str  # how no score saw its own label

    def to_json(self) -> dict[str, object]:
        return {"setup": self.setup, "tasks": [q.to_json() for q in self.quality]}


def signed_log1p(x: np.ndarray) -> np.ndarray:
    """sign(x) * log(1 + |x|): counts and durations with heavy tails on a scale a network can use."""
    return np.sign(x) * np.log1p(np.abs(x))


class _SharedBottom(torch.nn.Module):
    def __init__(self, n_inputs: int, n_tasks: int, config: ScoringConfig) -> None:
        super().__init__()
        half = max(config.hidden // 2, 1)
        self.bottom = torch.nn.Sequential(torch.nn.Linear(n_inputs, config.hidden), torch.nn.ReLU(),
                                          torch.nn.Linear(config.hidden, half), torch.nn.ReLU())
        self.towers = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(half, config.tower), torch.nn.ReLU(), torch.nn.Linear(config.tower, 1))
            for _ in range(n_tasks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bottom(x)
        return torch.cat([tower(h) for tower in self.towers], dim=1)


@dataclass(frozen=True)
class _Fitted:
    network: _SharedBottom
    mean: np.ndarray
    scale: np.ndarray
    label_scale: np.ndarray  # continuous tasks are fitted in units of their training std
    binary: np.ndarray

    def predict(self, features: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(((features - self.mean) / self.scale).astype(np.float32))
        with torch.no_grad():
            out = self.network(x).double().numpy()
        return np.where(self.binary, 1.0 / (1.0 + np.exp(-out)), np.logaddexp(0.0, out) * self.label_scale)


def _loss(out: torch.Tensor, y: torch.Tensor, known: torch.Tensor, binary: torch.Tensor) -> torch.Tensor:
    """Mean over known labels of log-loss (binary) or squared error in label-std units (continuous)."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits(out, torch.where(known, y, 0.0), reduction="none")
    mse = (torch.nn.functional.softplus(out) - y) ** 2
    per = torch.where(binary, bce, mse) * known
    return (per.sum(0) / known.sum(0).clamp(min=1)).sum()


def _fit(features: np.ndarray, labels: np.ndarray, binary: np.ndarray, groups: np.ndarray,
         config: ScoringConfig, seed: int) -> _Fitted:
    """Train one network on these rows, early-stopped on a share of their groups (users)."""
    mean, std = features.mean(0), features.std(0)
    scale = np.where(std > 1e-9, std, 1.0)
    known = np.isfinite(labels)
    label_std = np.array([np.nanstd(labels[:, k]) if known[:, k].any() else 1.0 for k in range(labels.shape[1])])
    label_scale = np.where(binary | (label_std <= 1e-9), 1.0, label_std)
    x = torch.from_numpy(((features - mean) / scale).astype(np.float32))
    y = torch.from_numpy(np.nan_to_num(labels / label_scale).astype(np.float32))
    k_mask, b_mask = torch.from_numpy(known), torch.from_numpy(binary)
    n_groups = len(np.unique(groups))
    val_fold = user_folds(groups, max(2, round(1 / config.validation_share)), seed) == 0 if n_groups >= 4 \
        else np.zeros(len(groups), dtype=bool)
    fit_rows = torch.from_numpy(np.flatnonzero(~val_fold))
    val_rows = torch.from_numpy(np.flatnonzero(val_fold))
    torch.manual_seed(seed)
    network = _SharedBottom(features.shape[1], labels.shape[1], config)
    optimiser = torch.optim.Adam(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    batch = min(config.batch_size, len(fit_rows))
    steps_per_epoch = max(1, math.ceil(len(fit_rows) / batch))
    epochs = max(1, min(config.max_epochs, config.max_steps // steps_per_epoch))
    generator = torch.Generator().manual_seed(seed)
    best, best_state, bad = math.inf, copy.deepcopy(network.state_dict()), 0
    for _ in range(epochs):
        network.train()
        order = fit_rows[torch.randperm(len(fit_rows), generator=generator)]
        for start in range(0, len(order), batch):
            rows = order[start:start + batch]
            loss = _loss(network(x[rows]), y[rows], k_mask[rows], b_mask)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        if len(val_rows) == 0:
            best_state = copy.deepcopy(network.state_dict())
            continue
        network.eval()
        with torch.no_grad():
            val = float(_loss(network(x[val_rows]), y[val_rows], k_mask[val_rows], b_mask))
        if val < best - 1e-6:
            best, best_state, bad = val, copy.deepcopy(network.state_dict()), 0
        else:
            bad += 1
            if bad >= config.patience:
                break
    network.load_state_dict(best_state)
    network.eval()
    return _Fitted(network, mean, scale, label_scale, binary)


def _quality(task: str, binary: bool, scores: np.ndarray, labels: np.ndarray, constant: np.ndarray
             ) -> TaskQuality:
    known = np.isfinite(labels)
    s, y, c = scores[known], labels[known], constant[known]
    if binary:
        eps = 1e-7
        def log_loss(p: np.ndarray) -> float:
            p = np.clip(p, eps, 1 - eps)
            return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()) if len(y) else math.nan
        num, den = gauc(np.zeros(len(y), dtype=np.int64), s, y > 0.5, 1)
        value = float(num.sum() / den.sum()) if den.sum() > 0 else math.nan
        return TaskQuality(task, "binary", "AUC", value, log_loss(s), log_loss(c), int(len(y)))
    value = float(np.corrcoef(s, y)[0, 1]) if len(y) > 2 and s.std() > 0 and y.std() > 0 else math.nan
    return TaskQuality(task, "continuous", "correlation", value, float(((s - y) ** 2).mean()),
                       float(((c - y) ** 2).mean()), int(len(y)))


def fit_scores(features: np.ndarray, labels: np.ndarray, task_names: tuple[str, ...], kinds: tuple[str, ...],
               groups: np.ndarray, config: ScoringConfig = ScoringConfig(),
               train_features: np.ndarray | None = None, train_labels: np.ndarray | None = None,
               train_groups: np.ndarray | None = None) -> ScoringResult:
    """Scores `[n, K]` for rows `features [n, F]` with labels `[n, K]` (NaN: not observed), grouped by user.

    Without training traffic, cross-fitted: each fold of users is scored by the network trained on the
    others. With `train_features`/`train_labels` (other traffic of the same features), one network trained
    there scores every row. Quality is measured on these rows against the constant predictor of the rows the
    network was trained on (the base rate or the mean)."""
    with one_thread():
        return _fit_scores(features, labels, task_names, kinds, groups, config, train_features, train_labels,
                           train_groups)


def _fit_scores(features: np.ndarray, labels: np.ndarray, task_names: tuple[str, ...], kinds: tuple[str, ...],
                groups: np.ndarray, config: ScoringConfig, train_features: np.ndarray | None,
                train_labels: np.ndarray | None, train_groups: np.ndarray | None) -> ScoringResult:
    binary = np.array([k == "binary" for k in kinds])
    features = np.nan_to_num(np.asarray(features, dtype=np.float64))
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.zeros(labels.shape)
    constant = np.zeros(labels.shape)
    if train_features is not None:
        if train_labels is None or train_groups is None:
            raise ValueError("training traffic needs its labels and its groups (users)")
        train_labels = np.asarray(train_labels, dtype=np.float64)
        fitted = _fit(np.nan_to_num(np.asarray(train_features, dtype=np.float64)), train_labels, binary,
                      train_groups, config, config.seed)
        scores[:] = fitted.predict(features)
        constant[:] = np.nanmean(train_labels, 0)
        setup = f"trained on {len(train_labels):,} rows of other traffic, applied to these {len(labels):,} rows"
    else:
        if config.fold_by == "impression":
            groups = np.arange(len(labels))
        n_groups = len(np.unique(groups))
        if n_groups < config.folds:
            raise ValueError(f"cross-fitting over {config.folds} folds of {config.fold_by}s needs at least "
                             f"{config.folds} of them; these rows have {n_groups}")
        fold = user_folds(groups, config.folds, config.seed)
        for f in range(config.folds):
            rows, rest = fold == f, fold != f
            fitted = _fit(features[rest], labels[rest], binary, groups[rest], config, config.seed + f)
            scores[rows] = fitted.predict(features[rows])
            constant[rows] = np.nan_to_num(np.nanmean(labels[rest], 0))
        setup = f"cross-fitted over {config.folds} folds of {config.fold_by}s (no score saw its own label)"
    quality = tuple(_quality(name, bool(b), scores[:, k], labels[:, k], constant[:, k])
                    for k, (name, b) in enumerate(zip(task_names, binary)))
    return ScoringResult(scores, quality, setup)


def _log_rows(con: duckdb.DuckDBPyConnection) -> tuple[dict[str, np.ndarray], list[Task], list[str], list[str]]:
    """Every impression of a log (in table order) with its user, item and context features and labels."""
    columns = table_columns(con)
    missing = [t for t in ("tasks", "users", "requests", "impressions") if t not in columns]
    if missing:
        raise LogError(f"not an MTF log: missing tables {missing}")
    tasks = read_tasks(con)
    if not tasks:
        raise LogError("the log declares no tasks")
    absent = [f"y_{t.name}" for t in tasks if f"y_{t.name}" not in columns["impressions"]]
    if absent:
        raise LogError(f"impressions has no label column(s) {absent}: nothing to score from")
    uf = [c for c in columns["users"] if c.startswith("uf_") and IDENTIFIER.match(c)]
    itf = [c for c in columns.get("items", {}) if c.startswith("if_") and IDENTIFIER.match(c)]
    select = ["i.rowid AS __rid", "r.user_id", "r.step", "u.segment",
              *(f"u.{quote_ident(c)}::DOUBLE AS {quote_ident(c)}" for c in uf),
              *(f"it.{quote_ident(c)}::DOUBLE AS {quote_ident(c)}" for c in itf),
              *(f"i.{quote_ident('y_' + t.name)}::DOUBLE AS {quote_ident('y_' + t.name)}" for t in tasks)]
    items = " LEFT JOIN items it ON it.item_id = i.item_id" if itf else ""
    sql = (f"SELECT {', '.join(select)} FROM impressions i JOIN requests r ON r.request_id = i.request_id "
           f"JOIN users u ON u.user_id = r.user_id{items} ORDER BY i.rowid")
    return con.execute(sql).fetchnumpy(), tasks, uf, itf


def log_features(rows: dict[str, np.ndarray], uf: list[str], itf: list[str], segments: Sequence[str]) -> np.ndarray:
    """The scoring network's inputs `[n, F]`: user and item features signed-log1p'ed (counts and durations
    have heavy tails; the map is monotone, so 0/1 flags lose nothing), the segment one-hot (over `segments`)
    and log1p(step)."""
    numeric = [np.nan_to_num(np.asarray(rows[c], dtype=np.float64)) for c in (*uf, *itf)]
    x = signed_log1p(np.stack(numeric, 1)) if numeric else np.zeros((len(rows["user_id"]), 0))
    segment = np.asarray(rows["segment"]).astype(str)
    step = np.nan_to_num(np.asarray(rows["step"], dtype=np.float64))
    one_hot = (segment[:, None] == np.asarray(list(segments), dtype=str)[None]).astype(np.float64)
    return np.concatenate([x, one_hot, np.log1p(step)[:, None]], 1)


def _read_rows(path: Path) -> tuple[dict[str, np.ndarray], list[Task], list[str], list[str], list[str]]:
    from mtf_core.store import open_log

    con = open_log(path)
    try:
        rows, tasks, uf, itf = _log_rows(con)
        return rows, tasks, uf, itf, list(table_columns(con))
    except duckdb.Error as exc:
        raise LogError(f"{path}: cannot be read for scoring ({str(exc).splitlines()[0]})") from exc
    except LogError as exc:
        raise LogError(f"{path}: {exc}") from exc
    finally:
        con.close()


def score_log(path: str | Path, out: str | Path, config: ScoringConfig = ScoringConfig(), force: bool = False,
              train_log: str | Path | None = None) -> ScoringResult:
    """Write a copy of the log at `path` to `out` with every `s_<task>` replaced by the scoring network's
    prediction: cross-fitted over its users, or trained on `train_log` (another log with the same tasks and
    features, e.g. production traffic) and applied to this one. Rows without a label are scored too; they are
    never trained on."""
    from mtf_core.store import build_atomically

    source, target = Path(path), Path(out)
    if target.exists() and not force:
        raise LogError(f"{target}: already exists; pass --force to replace it")
    if target.resolve() == source.resolve():
        raise LogError(f"{target}: the output must be a new file, not the log being scored")
    rows, tasks, uf, itf, tables = _read_rows(source)
    names, kinds = tuple(t.name for t in tasks), tuple(t.kind for t in tasks)

    def labels_of(r: dict[str, np.ndarray]) -> np.ndarray:
        return np.stack([np.asarray(r[f"y_{t.name}"], dtype=np.float64) for t in tasks], 1)

    train = None
    segments = sorted(set(np.asarray(rows["segment"]).astype(str).tolist()))
    if train_log is not None:
        t_rows, t_tasks, t_uf, t_itf, _ = _read_rows(Path(train_log))
        if [t.name for t in t_tasks] != list(names) or t_uf != uf or t_itf != itf:
            raise LogError(f"{train_log}: its tasks and features must be those of {source} to train the scoring "
                           f"network for it (tasks {[t.name for t in t_tasks]} vs {list(names)})")
        segments = sorted(set(segments) | set(np.asarray(t_rows["segment"]).astype(str).tolist()))
        train = (log_features(t_rows, uf, itf, segments), labels_of(t_rows),
                 np.asarray(t_rows["user_id"], dtype=np.int64))
    try:
        result = fit_scores(log_features(rows, uf, itf, segments), labels_of(rows), names, kinds,
                            np.asarray(rows["user_id"], dtype=np.int64), config, *(train or (None, None, None)))
    except ValueError as exc:
        raise LogError(f"{source}: {exc}") from exc
    scores = np.where(np.array(kinds) == "binary", np.clip(result.scores, 0.0, 1.0), np.maximum(result.scores, 0.0))
    scored = pa.table({"__rid": np.asarray(rows["__rid"], dtype=np.int64),
                       **{f"s_{t.name}": scores[:, j] for j, t in enumerate(tasks)}})

    def build(con: duckdb.DuckDBPyConnection) -> None:
        con.execute(f"ATTACH '{_sql_string(source)}' AS src (READ_ONLY)")
        con.register("scored", scored)
        replaced = ", ".join(f"sc.{quote_ident('s_' + t.name)} AS {quote_ident('s_' + t.name)}" for t in tasks)
        for table in tables:
            if table == "impressions":
                con.execute(f"CREATE TABLE impressions AS SELECT * EXCLUDE (__rid) REPLACE ({replaced}) FROM "
                            "(SELECT rowid AS __rid, * FROM src.impressions) i JOIN scored sc USING (__rid) "
                            "ORDER BY __rid")
            else:
                con.execute(f"CREATE TABLE {quote_ident(table)} AS SELECT * FROM src.{quote_ident(table)}")
        if "meta" in tables:
            con.execute("DELETE FROM meta WHERE key IN ('scores', 'scored_from')")
            con.executemany("INSERT INTO meta VALUES (?, ?)", [("scores", json.dumps(result.to_json())),
                                                               ("scored_from", source.name)])
        con.execute("DETACH src")

    build_atomically(target, build)
    return result


def _sql_string(path: Path) -> str:
    """A file path as an SQL string literal's body (ATTACH takes no parameters)."""
    return str(path).replace("'", "''")


def quality_lines(quality: list[dict[str, object]]) -> list[str]:
    """One line per task (from `ScoringResult.to_json()["tasks"]`): held-out quality against a constant."""
    return [f"{q['task']}: held-out {q['metric']} {float(q['value']):.3f} over {q['n_rows']:,} rows; "  # type: ignore[arg-type]
            f"loss {float(q['loss']):.4g} vs constant {float(q['constant_loss']):.4g} "  # type: ignore[arg-type]
            f"({'beats' if q['beats_constant'] else 'does not beat'} the constant predictor)" for q in quality]
