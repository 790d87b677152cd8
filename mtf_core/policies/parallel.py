"""Data-parallel training: every worker holds the same log and takes its slice of every batch; torch's
DistributedDataParallel averages the gradients, so the workers' networks stay identical.

A trainer draws each batch's rows from one generator seeded alike on every worker and keeps its slice
(`DataParallel.slice`), so the workers' slices partition the batch that one process would have drawn: with
equal slices, the averaged gradient of the slices' mean losses is the whole batch's. Anything else a trainer
aggregates over the batch (GRADE's exploration controller reads the reward spread per segment) is summed
across workers (`all_sum`). Outside a process group every method is the identity, so one code path serves
the local run and the distributed one, and a group of one worker gives the local run exactly.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

__all__ = ["DataParallel", "LOCAL", "plain_copy", "unwrap"]

M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class DataParallel:
    """This worker's place among `world_size` workers (rank 0 of 1: the local run)."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside a world of {self.world_size}")

    @property
    def in_group(self) -> bool:
        """Whether a torch process group joins this worker to the others (Ray Train sets it up)."""
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    def slice(self, rows: torch.Tensor) -> torch.Tensor:
        """This worker's contiguous share of a batch's rows (the shares differ in size by one at most)."""
        return rows.tensor_split(self.world_size)[self.rank] if self.world_size > 1 else rows

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over the workers, in place."""
        if self.in_group:
            torch.distributed.all_reduce(values)
        return values

    def any(self, flag: bool) -> bool:
        """Whether any worker says `flag` (so that all stop together, never one waiting for the others)."""
        return bool(self.all_sum(torch.tensor([float(flag)])).item() > 0)

    def wrap(self, module: nn.Module) -> nn.Module:
        """`module` under DistributedDataParallel where there is a process group, else itself."""
        if not self.in_group:
            return module
        return nn.parallel.DistributedDataParallel(module)


LOCAL = DataParallel()


def _wrapped_children(module: nn.Module) -> dict[str, nn.parallel.DistributedDataParallel]:
    return {name: child for name, child in module.named_children()
            if isinstance(child, nn.parallel.DistributedDataParallel)}


def plain_copy(module: M) -> M:
    """A deep copy of `module` with its DDP-wrapped children as the plain modules (a process group cannot be
    copied); `module` itself is left as it was."""
    wrapped = _wrapped_children(module)
    for name, child in wrapped.items():
        setattr(module, name, child.module)
    try:
        return copy.deepcopy(module)
    finally:
        for name, child in wrapped.items():
            setattr(module, name, child)


def unwrap(module: M) -> M:
    """`module` with its DDP-wrapped children replaced by the plain modules (what is saved and evaluated)."""
    for name, child in _wrapped_children(module).items():
        setattr(module, name, child.module)
    return module
