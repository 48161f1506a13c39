"""Every optimizer under DDP in a plain accelerate loop (``torchrun --nproc_per_node 2``, gloo, CPU).

After a few steps each rank must hold bitwise-identical parameters and optimizer state, equal to
fp32 tolerance to one process stepping on the same global batch. Rank 0 writes a JSON report to
the path given as the first argument; ``tests/test_distributed.py`` checks it.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from _cases import CASES as BASE_CASES
from _teardown import leave
from accelerate import Accelerator
from torch import Tensor, nn

import hf_rootfree

GLOBAL_BATCH = 16
STEPS = 7
CASES = {
    **BASE_CASES,
    "sirfshampoo-not-split": (
        hf_rootfree.SIRFShampoo,
        {"lr": 0.01, "update_freq": 2, "precond_lr": 0.1, "distributed": False},
    ),
    "sirfshampoo-bf16": (
        hf_rootfree.SIRFShampoo,
        {"lr": 0.01, "update_freq": 2, "precond_lr": 0.1, "precond_dtype": torch.bfloat16},
    ),
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.body = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 24))
        self.head = nn.Linear(24, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(tokens).mean(1)))


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, 20, (GLOBAL_BATCH, 6), generator=gen)
    return tokens, torch.randint(0, 5, (GLOBAL_BATCH,), generator=gen)


def flat(model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    parts = []
    for p in model.parameters():
        parts.append(p.detach().double().reshape(-1))
        state = optimizer.state.get(p, {})
        for key in sorted(state):
            if key != "step":
                parts.append(state[key].double().reshape(-1))
    return torch.cat(parts)


def train(
    model: nn.Module, optimizer: torch.optim.Optimizer, rank: int, world: int, backward=Tensor.backward
) -> None:
    local = GLOBAL_BATCH // world
    for step in range(STEPS):
        tokens, labels = data(step)
        tokens, labels = tokens[rank * local : (rank + 1) * local], labels[rank * local : (rank + 1) * local]
        optimizer.zero_grad()
        backward(nn.functional.cross_entropy(model(tokens), labels))
        optimizer.step()


PRECONDITIONED = [0]  # blocks this rank preconditioned (SIRFShampoo), counted by the wrapper below


def count_preconditioned(precondition):
    def wrapper(self, bucket, updates):
        PRECONDITIONED[0] += len(bucket)
        return precondition(self, bucket, updates)

    return wrapper


hf_rootfree.SIRFShampoo._precondition = count_preconditioned(hf_rootfree.SIRFShampoo._precondition)


def main() -> None:
    accelerator = Accelerator(cpu=True)  # sets up the gloo process group from torchrun's environment
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.set_num_threads(1)
    report = {}
    for name, (cls, kwargs) in CASES.items():
        torch.manual_seed(0)
        model = Net()
        single = copy.deepcopy(model)
        initial = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])
        batch = {} if cls is hf_rootfree.AdaX else {"batch_size": GLOBAL_BATCH}
        ddp, prepared = accelerator.prepare(model, cls(model.parameters(), **kwargs, **batch))
        PRECONDITIONED[0] = 0
        began = time.perf_counter()
        train(ddp, prepared, rank, world, accelerator.backward)
        seconds = time.perf_counter() - began
        counts = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(counts, torch.tensor([PRECONDITIONED[0]]))
        vector = flat(model, prepared.optimizer)
        gathered = [torch.empty_like(vector) for _ in range(world)]
        dist.all_gather(gathered, vector)
        entry = {
            "ranks_bitwise_equal": all(torch.equal(gathered[0], g) for g in gathered),
            "numel": vector.numel(),
            "seconds": seconds,
            "preconditioned_per_rank": [int(c) for c in counts],
        }
        if rank == 0:
            kwargs_single = dict(kwargs)
            if cls is hf_rootfree.SIRFShampoo:  # one process: no collectives with the other rank
                kwargs_single["distributed"] = False
            reference = cls(single.parameters(), **kwargs_single, **batch)
            PRECONDITIONED[0] = 0
            train(single, reference, 0, 1)
            entry["preconditioned_one_process"] = PRECONDITIONED[0]
            expected = flat(single, reference)
            entry["same_layout"] = expected.numel() == vector.numel()
            if entry["same_layout"]:
                entry["max_abs_error"] = float((vector - expected).abs().max())
                entry["max_abs_value"] = float(expected.abs().max())
                final = torch.cat([p.detach().double().reshape(-1) for p in single.parameters()])
                entry["moved"] = float((final - initial).abs().max())
        report[name] = entry
    if rank == 0:
        Path(sys.argv[1]).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
    leave()  # not dist.destroy_process_group(): see _teardown.py
