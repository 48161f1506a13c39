"""Several processes for :class:`~hf_rootfree.SIRFShampoo`: DTensor (FSDP2) tensors, and the
factor work split across ranks.

* Gather: FSDP2 leaves each rank a shard of the averaged gradient. SIRFShampoo preconditions the
  whole tensor (the "gather" strategy: the same math as one process, with replicated factors), so
  :class:`WholeGradients` all-gathers the DTensor gradients once per step, in the same order on
  every rank; :func:`local_part` takes a rank's shard of a whole-tensor update again.
* Share: under DDP every rank holds the same averaged gradient, so the factor updates and the
  preconditioning are identical work. :func:`share` assigns each block to one rank (largest cost
  first onto the least-loaded rank; the same assignment on every rank), and
  :func:`broadcast_in_place` sends an owner's results to the others in one buffer.

Nothing here keeps state between calls except what a :class:`WholeGradients` holds for one step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate

__all__ = ["WholeGradients", "broadcast_in_place", "local", "local_part", "rank", "share", "world_size"]

T = TypeVar("T")


class WholeGradients:
    """The whole gradient of each parameter; a DTensor gradient is all-gathered at most once per
    step (inside :meth:`gathered`), in the order of the parameters it is given."""

    def __init__(self) -> None:
        self._gathered: dict[int, Tensor] = {}

    @contextlib.contextmanager
    def gathered(self, params: Sequence[Tensor]) -> Iterator[None]:
        """All-gather the DTensor gradients of ``params`` now, before any rank-dependent work could
        reorder the collectives; they are forgotten when the block ends."""
        for p in params:
            if isinstance(p.grad, DTensor):
                self._gathered[id(p.grad)] = p.grad.full_tensor()
        try:
            yield
        finally:
            self._gathered.clear()

    def __call__(self, t: Tensor) -> Tensor:
        """``t`` (a gradient) as a whole tensor."""
        if isinstance(t, DTensor):
            gathered = self._gathered.get(id(t))
            return gathered if gathered is not None else t.full_tensor()
        return t


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view), or ``t`` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def local_part(update: Tensor, param: Tensor) -> Tensor:
    """This rank's shard of a whole-tensor update of a DTensor parameter (no communication)."""
    if not isinstance(param, DTensor):
        return update
    mesh = param.device_mesh
    whole = DTensor.from_local(update, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return whole.redistribute(mesh, param.placements).to_local()


def rank() -> int:
    return dist.get_rank()


def world_size() -> int:
    return dist.get_world_size()


def share(items: Sequence[T], flag: bool | None, cost: Callable[[T], float]) -> list[int] | None:
    """The rank that does each item's work (largest ``cost`` first onto the least loaded rank), or
    None when the work is not split: ``flag`` False, nothing to do, or fewer than two processes."""
    if flag is False or not items or not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    if world < 2:
        return None
    costs = [cost(item) for item in items]
    load, owner = [0.0] * world, [0] * len(items)
    for i in sorted(range(len(items)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


def broadcast_in_place(tensors: list[Tensor], src: int) -> None:
    """Broadcast contiguous ``tensors`` from ``src`` into the same-shaped ones of every other
    rank, as one byte buffer (any dtypes mixed; works with gloo)."""
    flat = [t.reshape(-1).view(torch.uint8) for t in tensors]  # views of contiguous tensors
    sizes = [f.numel() for f in flat]
    if dist.get_rank() == src:
        buffer = torch.cat(flat)
    else:
        buffer = torch.empty(sum(sizes), dtype=torch.uint8, device=tensors[0].device)
    dist.broadcast(buffer, src=src)
    if dist.get_rank() != src:
        for view, chunk in zip(flat, buffer.split(sizes)):
            view.copy_(chunk)


def local_tensors(tensors: list[Tensor]) -> list[Tensor]:
    """The local shards of DTensors (views: in-place updates reach the DTensor); others as is."""
    return [local(t) for t in tensors]


def shard_groups(tensor: Tensor) -> list[dist.ProcessGroup]:
    """The process groups over which a DTensor is sharded (none for a plain tensor)."""
    if not isinstance(tensor, DTensor):
        return []
    mesh = tensor.device_mesh
    return [mesh.get_group(dim) for dim, place in enumerate(tensor.placements) if place.is_shard()]


def all_reduce_sharded(values: list[Tensor], tensors: list[Tensor]) -> list[Tensor]:
    """Per-tensor sums over the local shards of DTensors (FSDP2), all-reduced to whole-tensor sums;
    the values of plain tensors are returned as they are."""
    groups = [shard_groups(t) for t in tensors]
    sharded = [i for i, gs in enumerate(groups) if gs]
    if not sharded:
        return values
    values = list(values)
    packed = torch.stack([values[i] for i in sharded])
    for group in groups[sharded[0]]:
        dist.all_reduce(packed, group=group)
    for i, value in zip(sharded, packed.unbind()):
        values[i] = value
    return values
