"""Every optimizer on FSDP2-sharded parameters (run with ``torchrun --nproc_per_node 2``, gloo).

``fully_shard`` makes every parameter a DTensor sharded over the two ranks. The element-wise
optimizers update each rank's local shard; SIRFShampoo gathers the gradient and preconditions
the whole tensor (its factors are replicated), so both must end where one process does, in
parameters and in optimizer state (the sharded state gathered from the ranks' local shards; the
replicated state bitwise equal on every rank). Then a
sharded checkpoint (torch.distributed.checkpoint with ``get/set_optimizer_state_dict``, what
accelerate and the Trainer use) is saved mid-run and a fresh model + optimizer resumed from it
must end bitwise where the uninterrupted run did. Rank 0 writes a JSON report to argv[1].
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from _cases import CASES
from _state import full_state, local_shard_checksums, replicated_state_ranks_equal
from _teardown import leave
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import hf_rootfree

GLOBAL_BATCH, STEPS, RESUME_AT = 16, 6, 3


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.LayerNorm(12), nn.Linear(12, 6), nn.Linear(6, 5))


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2000 + step)
    return torch.randn(GLOBAL_BATCH, 8, generator=gen), torch.randint(0, 5, (GLOBAL_BATCH,), generator=gen)


def shard(model: nn.Sequential, mesh) -> nn.Sequential:
    for layer in model:
        if isinstance(layer, (nn.Linear, nn.LayerNorm)):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def run(model, optimizer, steps, rank, world) -> None:
    local = GLOBAL_BATCH // world
    for step in steps:
        x, y = data(step)
        optimizer.zero_grad()
        nn.functional.cross_entropy(
            model(x[rank * local : (rank + 1) * local]), y[rank * local : (rank + 1) * local]
        ).backward()
        optimizer.step()


def full(model: nn.Module) -> torch.Tensor:
    parts = [
        (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().double().reshape(-1)
        for p in model.parameters()
    ]
    return torch.cat(parts)


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.set_num_threads(1)
    report = {}
    checkpoint_root = Path(sys.argv[1]).parent / "fsdp2_checkpoints"
    for name, (cls, kwargs) in CASES.items():
        batch = {} if cls is hf_rootfree.AdaX else {"batch_size": GLOBAL_BATCH}
        single_kwargs = {
            **kwargs,
            **batch,
            **({"distributed": False} if cls is hf_rootfree.SIRFShampoo else {}),
        }
        model = shard(net(), mesh)
        optimizer = cls(model.parameters(), **kwargs, **batch)
        run(model, optimizer, range(STEPS), rank, world)
        sharded = full(model)
        sharded_state = full_state(model, optimizer)
        replicated_equal, replicated_numel = replicated_state_ranks_equal(model, optimizer)
        checksums = local_shard_checksums(model, optimizer)
        sharded_values = [
            v for s in optimizer.state.values() for v in s.values() if hasattr(v, "full_tensor")
        ]
        sharded_numel = sum(v.numel() for v in sharded_values)
        sharded_abs_sum = sum(float(v.full_tensor().double().abs().sum()) for v in sharded_values)

        # the same steps in one process on the whole batch
        single = net()
        single_optimizer = cls(single.parameters(), **single_kwargs)
        run(single, single_optimizer, range(STEPS), 0, 1)
        expected = full(single)
        expected_state = full_state(single, single_optimizer)

        # sharded checkpoint at RESUME_AT, then resume into a fresh model and optimizer
        first = shard(net(), mesh)
        first_optimizer = cls(first.parameters(), **kwargs, **batch)
        run(first, first_optimizer, range(RESUME_AT), rank, world)
        path = checkpoint_root / name
        model_state, optim_state = get_state_dict(first, first_optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path))
        second = shard(net(), mesh)
        second_optimizer = cls(second.parameters(), **kwargs, **batch)
        run(second, second_optimizer, range(1), rank, world)  # build state to load into
        model_state, optim_state = get_state_dict(second, second_optimizer)
        loaded = {"model": model_state, "optim": optim_state}
        dcp.load(loaded, checkpoint_id=str(path))
        set_state_dict(
            second, second_optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"]
        )
        run(second, second_optimizer, range(RESUME_AT, STEPS), rank, world)
        resumed = full(second)

        local_state = next(iter(optimizer.state.values()))
        report[name] = {
            "sharded_parameters": all(hasattr(p, "full_tensor") for p in model.parameters()),
            "state_types": sorted({type(v).__name__ for s in optimizer.state.values() for v in s.values()}),
            "replicated_state_ranks_equal": replicated_equal,
            "replicated_state_numel": replicated_numel,
            "sharded_state_numel": sharded_numel,
            "local_shard_checksums": checksums,
            "sharded_state_abs_sum": sharded_abs_sum,
            "max_abs_error_vs_one_process": float((sharded - expected).abs().max()),
            "state_numel": [sharded_state.numel(), expected_state.numel()],
            "state_max_abs_error_vs_one_process": float((sharded_state - expected_state).abs().max())
            if sharded_state.numel() == expected_state.numel()
            else float("inf"),
            "state_max_abs_value": float(expected_state.abs().max()),
            "moved": float((expected - full(net())).abs().max()),
            "resume_max_abs_diff": float((resumed - sharded).abs().max()),
            "first_state_keys": sorted(local_state),
        }
    if rank == 0:
        Path(sys.argv[1]).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        main()
    leave()  # not dist.destroy_process_group(): see _teardown.py
