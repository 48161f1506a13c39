"""Optimizer state across ranks, for the two-process scripts.

Under FSDP2 a parameter's ``full_tensor()`` is the same on every rank by construction, so an
equality of gathered parameters says nothing about whether the ranks are in sync. These helpers
look at what each rank actually holds: the state it keeps whole (SIRFShampoo's replicated
factors, a ``step`` count) must be bitwise equal on every rank, and the sharded state, gathered
from the ranks' local shards, must equal what one process holds.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def _entries(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    for p in model.parameters():
        state = optimizer.state.get(p, {})
        for key in sorted(state):
            if torch.is_tensor(state[key]):
                yield key, state[key]


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """Every state tensor (in parameter order, keys sorted) as one float64 vector; sharded
    state is gathered from the ranks' local shards."""
    parts = [
        (value.full_tensor() if isinstance(value, DTensor) else value).detach().double().reshape(-1)
        for _, value in _entries(model, optimizer)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def replicated_state_ranks_equal(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[bool, int]:
    """Whether the state every rank keeps whole (not a DTensor) is bitwise equal on all ranks,
    compared element by element after an all-gather; and how many elements that was."""
    parts = [
        value.detach().double().reshape(-1).cpu()
        for _, value in _entries(model, optimizer)
        if not isinstance(value, DTensor)
    ]
    mine = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return all(torch.equal(gathered[0], g) for g in gathered), mine.numel()


def local_shard_checksums(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[float]:
    """Each rank's sum of |x| over its local shards of the sharded state (ranks hold different
    shards, so these differ; together they must add up to the full state's)."""
    local = sum(
        float(value.to_local().double().abs().sum())
        for _, value in _entries(model, optimizer)
        if isinstance(value, DTensor)
    )
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return gathered
