"""A learned outcome model for the direct method and DR, beside the linear calibration it must beat.

The composite reward of a request decomposes over the ranking like the feedback does: each shown candidate
adds its signals, examined with the position curve, and the session terms follow from what was seen. The
model keeps that shape and learns what the MTL scores get wrong about each candidate:

    q(s, w) = baseline(s) + sum_{l < L} curve[l] * v(s, item ranked l under w),
    v(s, i) = sum_k c_k u_k(s, i) + session(s, i),

where `u_k` is the candidate's rate of signal k per examination, learned from the shown candidates' labels
(so a popular item whose click score is inflated gets its real click rate), `session` is its share of the
session terms and `baseline` the state's, both learned from the requests' session rewards. One small torch
network over (MTL scores, item features, user features, segment, context) gives `u` and `session` per
candidate. Because `v` is per candidate, any weights' ranking can be valued: the candidates a far policy
promotes were shown to someone under the logging policy, with their labels.

Cross-fitted over two folds of users: a request's prediction never comes from a network that saw its user.
The two networks' disagreement (they were trained on disjoint users) is the model's own uncertainty that
enters the DM and DR intervals; the per-segment linear recalibration on top is refitted in every bootstrap
resample as for the linear model (`direct.model_based_intervals`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from mtf_core.store import LogData, iter_chunks

__all__ = ["N_FOLDS", "MIN_USERS", "OutcomeNet", "LearnedOutcome", "fit_outcome", "apply_outcome", "user_folds",
           "r_squared", "calibration_table"]

N_FOLDS = 2
MIN_USERS = 40  # below this per fold a network learns nothing a per-segment line does not
_HIDDEN = 64
_MIN_STEPS = 600  # small logs get more passes over their requests
_MAX_EPOCHS = 60
_PATIENCE = 4  # epochs without a better validation loss before stopping
_VALIDATION = 0.15  # share of the training users that early stopping watches
_BATCH = 512  # requests per step
_LR = 2e-3


class OutcomeNet(nn.Module):
    """Per candidate: each signal's rate per examination and its session value; per request: a baseline.

    The rates are the MTL scores plus a learned correction that starts at zero: with little data the model
    stays with the scores (the linear model's view), and it departs from them only as far as the labels of the
    shown candidates carry it."""

    def __init__(self, n_item_inputs: int, n_state_inputs: int, n_tasks: int) -> None:
        super().__init__()
        self.item = nn.Sequential(nn.Linear(n_item_inputs, _HIDDEN), nn.SiLU(), nn.Linear(_HIDDEN, _HIDDEN),
                                  nn.SiLU(), nn.Linear(_HIDDEN, n_tasks + 1))
        self.state = nn.Sequential(nn.Linear(n_state_inputs, _HIDDEN // 2), nn.SiLU(), nn.Linear(_HIDDEN // 2, 1))
        for head in (self.item[-1], self.state[-1]):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, item_inputs: torch.Tensor, state_inputs: torch.Tensor, prior_rates: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """item_inputs `[B,N,Di]`, state_inputs `[B,Ds]`, prior_rates `[B,N,K]` (the MTL scores, in the
        labels' scale) -> per candidate (rates `[B,N,K]`, session `[B,N]`), baseline `[B]`."""
        out = self.item(item_inputs)
        return prior_rates + out[..., :-1], out[..., -1], self.state(state_inputs).squeeze(-1)


@dataclass(frozen=True)
class _Scaling:
    """Standardisation of the network's inputs, from the training requests."""

    item_mean: np.ndarray
    item_std: np.ndarray
    state_mean: np.ndarray
    state_std: np.ndarray
    label_scale: np.ndarray  # (K,) per task, so that no signal's units dominate the loss
    session_scale: float


def _state_inputs(log: LogData, rows: np.ndarray | slice) -> np.ndarray:
    one_hot = np.eye(len(log.segments), dtype=np.float32)[log.segment[rows]]
    return np.concatenate([log.user_features[rows], log.context[rows], one_hot], 1)


def _item_inputs(log: LogData, rows: np.ndarray | slice, n_slots: int | None = None) -> np.ndarray:
    scores, items = log.scores[rows][:, :n_slots], log.item_features[rows][:, :n_slots]
    state = _state_inputs(log, rows)
    return np.concatenate([scores, items, np.broadcast_to(state[:, None, :], (*scores.shape[:2], state.shape[1]))],
                          -1)


@dataclass(frozen=True)
class LearnedOutcome:
    """The learned model's item values and baselines on one log's requests, cross-fitted.

    `item_value[r, n]` is v(s_r, candidate n) in reward units (after the reward's coefficients), `baseline[r]`
    the state's; `fold_*` hold each network's own predictions for every request (for the model's spread)."""

    item_value: np.ndarray  # (R, N) float32, out of fold
    baseline: np.ndarray  # (R,) float64, out of fold
    fold_item_value: np.ndarray  # (F, R, N) float32
    fold_baseline: np.ndarray  # (F, R)
    nets: tuple[OutcomeNet, ...]
    scalings: tuple[_Scaling, ...]


def user_folds(user_id: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold `[R]` of every request, by a seeded shuffle of its users."""
    users, unit = np.unique(user_id, return_inverse=True)
    order = np.random.default_rng([seed, 41]).permutation(len(users))
    return (order % n_folds)[unit]


def _scaling(log: LogData, rows: np.ndarray, session: np.ndarray) -> _Scaling:
    n_slots = max(log.n_shown, 1)  # shown candidates fill the leading slots: the rest are never read here
    shown = log.shown[rows][:, :n_slots]
    items = _item_inputs(log, rows, n_slots)[shown].astype(np.float64)
    state = _state_inputs(log, rows).astype(np.float64)
    labels = np.nan_to_num(log.labels[rows][:, :n_slots][shown]).astype(np.float64)
    label_scale = labels.std(0)
    return _Scaling(items.mean(0), np.where(items.std(0) > 1e-9, items.std(0), 1.0), state.mean(0),
                    np.where(state.std(0) > 1e-9, state.std(0), 1.0), np.where(label_scale > 1e-9, label_scale, 1.0),
                    float(session[rows].std()) or 1.0)


def _tensors(log: LogData, rows: np.ndarray | slice, scaling: _Scaling, n_slots: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The network's inputs: candidates `[R,N,Di]`, states `[R,Ds]` (standardised) and prior rates `[R,N,K]`."""
    items = (_item_inputs(log, rows, n_slots) - scaling.item_mean) / scaling.item_std
    state = (_state_inputs(log, rows) - scaling.state_mean) / scaling.state_std
    prior = log.scores[rows][:, :n_slots] / scaling.label_scale
    return (torch.from_numpy(items.astype(np.float32)), torch.from_numpy(state.astype(np.float32)),
            torch.from_numpy(prior.astype(np.float32)))


def _train_net(log: LogData, rows: np.ndarray, session: np.ndarray, curve: np.ndarray, seed: int
               ) -> tuple[OutcomeNet, _Scaling]:
    """Fit one network on the requests `rows`: signals per shown candidate (examined at its position), the
    session reward per request; early-stopped on a share of the training users. Only the slots up to the
    last shown one are needed (shown slots come first)."""
    scaling = _scaling(log, rows, session)
    n_slots = max(log.n_shown, 1)
    items, state, prior = _tensors(log, rows, scaling, n_slots)
    positions = log.positions[rows][:, :n_slots]
    exam = torch.from_numpy(np.where(positions >= 0, curve[np.clip(positions, 0, len(curve) - 1)], 0.0)
                            .astype(np.float32))  # (R, S)
    labels = torch.from_numpy((np.nan_to_num(log.labels[rows][:, :n_slots]) / scaling.label_scale).astype(np.float32))
    target_session = torch.from_numpy((session[rows] / scaling.session_scale).astype(np.float32))
    shown = torch.from_numpy(positions >= 0)

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        rates, item_session, baseline = net(items[batch], state[batch], prior[batch])
        e = exam[batch]
        signal_error = ((labels[batch] - e.unsqueeze(-1) * rates) ** 2).sum(-1) * shown[batch]
        session_error = (target_session[batch] - baseline - (e * item_session).sum(1)) ** 2
        return signal_error.sum() / shown[batch].sum().clamp(min=1) + session_error.mean()

    watch = torch.from_numpy(user_folds(log.user_id[rows], int(round(1 / _VALIDATION)), seed) == 0)
    fit_rows, watch_rows = torch.nonzero(~watch).squeeze(1), torch.nonzero(watch).squeeze(1)
    torch.manual_seed(seed)
    net = OutcomeNet(items.shape[-1], state.shape[-1], log.labels.shape[-1])
    optimiser = torch.optim.Adam(net.parameters(), lr=_LR, weight_decay=1e-5)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = max(1, -(-len(fit_rows) // _BATCH))
    epochs = min(_MAX_EPOCHS, max(-(-_MIN_STEPS // steps_per_epoch), 8))
    best, best_state, waited = float("inf"), copy.deepcopy(net.state_dict()), 0
    for _ in range(epochs):
        net.train()
        for batch in fit_rows[torch.randperm(len(fit_rows), generator=generator)].split(_BATCH):
            loss = loss_of(batch)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        net.eval()
        with torch.no_grad():
            watched = float(loss_of(watch_rows)) if len(watch_rows) else -float(len(best_state))
        if watched < best - 1e-6:
            best, best_state, waited = watched, copy.deepcopy(net.state_dict()), 0
        else:
            waited += 1
            if waited >= _PATIENCE:
                break
    net.load_state_dict(best_state)
    net.eval()
    return net, scaling


def _predict(net: OutcomeNet, scaling: _Scaling, log: LogData, coefficients: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
    """Item values `[R,N]` and baselines `[R]` of one network on every request."""
    values, baselines = [], []
    c = torch.from_numpy((coefficients * scaling.label_scale).astype(np.float32))
    with torch.no_grad():
        for rows in iter_chunks(log.n_requests, 8192):
            rates, item_session, baseline = net(*_tensors(log, rows, scaling))
            values.append((rates @ c + item_session * scaling.session_scale).numpy())
            baselines.append(baseline.double().numpy() * scaling.session_scale)
    return np.concatenate(values), np.concatenate(baselines)


def fit_outcome(log: LogData, session: np.ndarray, curve: np.ndarray, coefficients: np.ndarray, seed: int = 0
                ) -> LearnedOutcome:
    """Cross-fit the outcome networks over user folds and predict every request out of fold.

    `session` `[R]` is each request's logged session reward (the part of the composite reward the shown
    signals do not give), `coefficients` `[K]` the reward's signal coefficients."""
    folds = user_folds(log.user_id, N_FOLDS, seed)
    nets, scalings, fold_values, fold_baselines = [], [], [], []
    for f in range(N_FOLDS):
        net, scaling = _train_net(log, np.flatnonzero(folds != f), session, curve, seed + f)
        value, baseline = _predict(net, scaling, log, coefficients)
        nets.append(net)
        scalings.append(scaling)
        fold_values.append(value)
        fold_baselines.append(baseline)
    pick = folds[None, :] == np.arange(N_FOLDS)[:, None]  # (F, R): the network that did not see the request
    item_value = np.einsum("fr,frn->rn", pick.astype(np.float32), np.stack(fold_values))
    baseline = np.einsum("fr,fr->r", pick, np.stack(fold_baselines))
    return LearnedOutcome(item_value, baseline, np.stack(fold_values), np.stack(fold_baselines), tuple(nets),
                          tuple(scalings))


def apply_outcome(fitted: LearnedOutcome, log: LogData, coefficients: np.ndarray) -> LearnedOutcome:
    """The networks fitted on other requests (e.g. the training sessions) applied to `log`: every network saw
    none of these requests, so each request gets their average."""
    predictions = [_predict(net, scaling, log, coefficients) for net, scaling in zip(fitted.nets, fitted.scalings)]
    fold_values = np.stack([p[0] for p in predictions])
    fold_baselines = np.stack([p[1] for p in predictions])
    return LearnedOutcome(fold_values.mean(0), fold_baselines.mean(0), fold_values, fold_baselines, fitted.nets,
                          fitted.scalings)


def r_squared(y: np.ndarray, predicted: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """1 - SSE/SST overall and per group `[1+G]` (NaN for a group without spread)."""
    out = []
    for keep in [np.ones(len(y), dtype=bool), *(group == g for g in range(n_groups))]:
        yy, pp = y[keep], predicted[keep]
        sst = ((yy - yy.mean()) ** 2).sum() if len(yy) else 0.0
        out.append(1.0 - ((yy - pp) ** 2).sum() / sst if sst > 0 else float("nan"))
    return np.asarray(out)


def calibration_table(y: np.ndarray, predicted: dict[str, np.ndarray], segment: np.ndarray,
                      segments: tuple[str, ...], n_bins: int = 10) -> pd.DataFrame:
    """Observed against predicted reward in quantile bins of the prediction, per model and segment."""
    rows = []
    for model, pred in predicted.items():
        for s, name in enumerate(segments):
            keep = segment == s
            if keep.sum() < n_bins:
                continue
            yy, pp = y[keep], pred[keep]
            edges = np.quantile(pp, np.linspace(0, 1, n_bins + 1))
            bins = np.clip(np.searchsorted(edges, pp, side="right") - 1, 0, n_bins - 1)
            count = np.bincount(bins, minlength=n_bins)
            mean_pred = np.bincount(bins, weights=pp, minlength=n_bins) / np.maximum(count, 1)
            mean_obs = np.bincount(bins, weights=yy, minlength=n_bins) / np.maximum(count, 1)
            for b in np.flatnonzero(count):
                rows.append({"model": model, "segment": name, "bin": int(b), "predicted": float(mean_pred[b]),
                             "observed": float(mean_obs[b]), "n": int(count[b])})
    return pd.DataFrame(rows, columns=["model", "segment", "bin", "predicted", "observed", "n"])
