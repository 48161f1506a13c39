"""SIRFShampoo's step on several processes: its work split across ranks vs. done by every rank.

Run with ``torchrun --standalone --nproc_per_node 2 benchmarks/distributed_sirfshampoo.py`` (gloo,
CPU). Every rank builds the GPT-2-style model of ``step_time.py`` with the same fixed random
gradients (what DDP's averaging leaves on every rank) and times ``optimizer.step()``, by default
with a factor update at every step (``--update-freq 1``; with ``--update-freq 10`` the timed steps
are one cycle of ten), in the same run:

* ``split``: ``distributed=None`` (the default): each rank updates the factors of its share of the
  blocks (longest first onto the least-loaded rank) and preconditions the gradients of its share
  (balanced on the products' cost), then the owners broadcast the new factors and the
  preconditioned gradients;
* ``every rank``: ``distributed=False``: each rank does all of it (what a non-distributed
  optimizer does under DDP), i.e. the single-process cost.

Both run with one intra-op thread per rank, so two ranks on two cores do not contend. The
figure is the per-rank time of a step (the maximum over ranks, median over rounds). Target: split
≤ 0.65× every-rank.

Usage::

    torchrun --standalone --nproc_per_node 2 benchmarks/distributed_sirfshampoo.py [--rounds 5]
        [--max-dense-dim 1024] [--update-freq 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from step_time import build_model

import hf_rootfree

TARGET = 0.65


def timed_steps(
    distributed: bool | None, params: list[torch.Tensor], steps: int, mdd: int | None, update_freq: int
) -> float:
    optimizer = hf_rootfree.SIRFShampoo(
        params, batch_size=32, update_freq=update_freq, max_dense_dim=mdd, distributed=distributed
    )
    optimizer.step()  # builds the state
    dist.barrier()
    began = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    dist.barrier()  # the slowest rank decides
    return (time.perf_counter() - began) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2", choices=["gpt2", "convnext"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 3; update_freq if > 1)")
    parser.add_argument("--max-dense-dim", type=int, default=1024)
    parser.add_argument("--update-freq", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    steps = args.steps or (args.update_freq if args.update_freq > 1 else 3)
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    model = build_model(args.model)
    torch.manual_seed(0)
    params = [p for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3  # the same on every rank (same seed), as after DDP
    results: dict[str, list[float]] = {"split": [], "every rank": []}
    for _ in range(args.rounds):
        for label, flag in (("split", None), ("every rank", False)):
            results[label].append(timed_steps(flag, params, steps, args.max_dense_dim, args.update_freq))
    if dist.get_rank() == 0:
        medians = {label: statistics.median(values) for label, values in results.items()}
        ratio = medians["split"] / medians["every rank"]
        print(
            f"{args.model}: {sum(p.numel() for p in params) / 1e6:.2f}M params, world size "
            f"{dist.get_world_size()}, max_dense_dim {args.max_dense_dim}, update_freq {args.update_freq}"
        )
        for label, value in medians.items():
            print(f"  {label:10s} {value * 1e3:9.1f} ms per step (mean of {steps}; median of {args.rounds})")
        verdict = "MET" if ratio <= TARGET else "MISSED"
        print(f"  split / every rank = {ratio:.2f}x  (target <= {TARGET}x: {verdict})")
        if args.json:
            Path(args.json).write_text(json.dumps({"medians_s": medians, "ratio": ratio, "samples": results}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
