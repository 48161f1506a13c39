"""Optimizer-state bytes per optimizer and per dtype choice on GPT-2 small's shapes.

The model is ``GPT2LMHeadModel(GPT2Config())`` built from its config (124.4M parameters in 148
tensors, the token embedding tied to the output layer; no weights are downloaded). Every row is
*measured*: the optimizer is built on the model's float32 parameters, each parameter gets a fixed
random gradient N(0, 1e-3²), ONE ``optimizer.step()`` runs on the CPU (it builds the whole state,
including SIRFShampoo's factors, their momenta and caches), and the state is counted as all
tensors reachable from ``optimizer.state``, each storage once (``sirfshampoo_step.state_bytes``).
Rows:

* ``torch.optim.AdamW(fused=True)``, the baseline;
* ``RootFreeAdamW``, ``RootFreeRMSprop``, ``AdaX``, ``RootFreeAdaX`` with ``state_dtype=None``
  (float32) and ``state_dtype=torch.bfloat16``;
* ``SIRFShampoo`` with its defaults (``max_dense_dim=1024``, ``update_freq=1``), with
  ``update_freq=10`` (which changes which K Kᵀ are cached) and, as an extra, with
  ``structures={1: "diagonal"}`` (vectors such as LayerNorm weights and biases get a diagonal
  factor instead of a dense d x d one), each with ``precond_dtype`` float32 and bfloat16, given
  ``model=`` as the Trainer integration does;
* an *analytic estimate* (not run) of Shampoo with fp32 factors, inverse roots and Adam
  grafting, blocked like Distributed Shampoo (``max_preconditioner_dim=1024``): every tensor's
  axes are cut into blocks of at most 1024; per block one factor (b_i × b_i) per axis and its
  inverse root (same size); plus Adam grafting state (2 × parameters) and momentum
  (1 × parameters); all float32.

Ratios are against AdamW's state bytes. Target: SIRFShampoo with bf16 factors and defaults
<= 1.5x AdamW.

Usage::

    python benchmarks/state_memory.py                  # ~1-2 minutes, ~3 GB of memory
    python benchmarks/state_memory.py --quick --json state_memory.json   # 2 layers
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import sirfshampoo_step
import step_time
import torch
from step_time import hf_rootfree

CPU = torch.device("cpu")
BATCH_SIZE = 32  # B of the root-free optimizers; it does not change the state
GRAD_SCALE = 1e-3
SHAMPOO_BLOCK = 1024  # Distributed Shampoo's default max_preconditioner_dim
TARGET_LABEL = "SIRFShampoo defaults, bf16 factors"
TARGET_RATIO = 1.5
MIB = 2**20


@dataclass(frozen=True)
class Row:
    label: str
    passed: str  # the constructor call, as printed under the table
    factory: Callable[[list[torch.Tensor], torch.nn.Module], torch.optim.Optimizer]


def elementwise_rows() -> list[Row]:
    rows = []
    for name in step_time.OURS:
        cls = getattr(hf_rootfree, name)
        extra = {} if name == "AdaX" else {"batch_size": BATCH_SIZE}
        for dtype in (None, torch.bfloat16):
            label = f"{name}, state_dtype={'bfloat16' if dtype else 'None (fp32)'}"
            passed = f"{name}(params{', batch_size=32' if extra else ''}, state_dtype={dtype})"
            rows.append(
                Row(
                    label,
                    passed,
                    lambda params, model, cls=cls, extra=extra, dtype=dtype: cls(
                        params, **extra, state_dtype=dtype
                    ),
                )
            )
    return rows


def sirf_rows() -> list[Row]:
    """Defaults with fp32 / bf16 factors; with update_freq=10; and (extra) 1-D tensors diagonal."""
    variants = (
        ("", {}),
        (", update_freq=10", {"update_freq": 10}),
        (", 1-D tensors diagonal", {"structures": {1: "diagonal"}}),
    )
    rows = []
    for suffix, extra in variants:
        for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            kwargs = {"precond_dtype": dtype, **extra}
            shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
            rows.append(
                Row(
                    f"SIRFShampoo defaults, {tag} factors{suffix}",
                    f"SIRFShampoo(params, batch_size=32, model=model, {shown})",
                    lambda params, model, kwargs=kwargs: hf_rootfree.SIRFShampoo(
                        params, batch_size=BATCH_SIZE, model=model, **kwargs
                    ),
                )
            )
    return rows


BASELINE = "AdamW (fused)"
ROWS = [
    Row(
        BASELINE,
        "torch.optim.AdamW(params, fused=True)",
        lambda params, model: torch.optim.AdamW(params, fused=True),
    ),
    *elementwise_rows(),
    *sirf_rows(),
]


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


def build_gpt2_small(n_layer: int) -> torch.nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=n_layer))


def breakdown(opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes per state key, digits dropped (``factor_0``, ``factor_1`` -> ``factor_n``)."""
    out: dict[str, int] = {}
    seen: set[int] = set()
    for state in opt.state.values():
        for key, value in state.items():
            if not torch.is_tensor(value):
                continue
            storage = value.untyped_storage()
            if storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            name = re.sub(r"_\d+$", "_n", key)
            out[name] = out.get(name, 0) + storage.nbytes()
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def measure(row: Row, params: list[torch.Tensor], model: torch.nn.Module) -> dict:
    optimizer = row.factory(params, model)
    start = time.perf_counter()
    optimizer.step()
    seconds = time.perf_counter() - start
    total = sirfshampoo_step.state_bytes(optimizer, ())
    parts = breakdown(optimizer)
    finite = all(torch.isfinite(p).all() for p in params)
    del optimizer
    gc.collect()
    return {"state_bytes": total, "by_key": parts, "step_seconds": seconds, "finite": finite}


# ---------------------------------------------------------------------------------------------
# Shampoo estimate
# ---------------------------------------------------------------------------------------------


def shampoo_blocks(shape: tuple[int, ...], block: int) -> list[tuple[int, ...]]:
    """Distributed Shampoo's blocks of one tensor: merge small axes, then cut each into <= block.

    ``merge_small_dims`` merges neighbouring axes while their product stays <= block (no change
    for GPT-2, whose tensors are vectors and matrices with an axis > 1024 or two of 768+).
    """
    dims = [d for d in shape if d != 1] or [1]
    merged = [dims[0]]
    for d in dims[1:]:
        if merged[-1] * d <= block:
            merged[-1] *= d
        else:
            merged.append(d)
    pieces = [[block] * (d // block) + ([d % block] if d % block else []) for d in merged]
    out: list[tuple[int, ...]] = [()]
    for axis in pieces:
        out = [(*b, size) for b in out for size in axis]
    return out


def shampoo_estimate(model: torch.nn.Module, block: int = SHAMPOO_BLOCK) -> dict:
    """fp32 Shampoo state: per block, factor + inverse root per axis; Adam grafting; momentum."""
    factor_elems, n_blocks, n_params = 0, 0, 0
    for p in model.parameters():  # unique parameters (the tied embedding once)
        n_params += p.numel()
        for b in shampoo_blocks(tuple(p.shape), block):
            n_blocks += 1
            factor_elems += sum(d * d for d in b)
    by_key = {
        "factors (L, R)": 4 * factor_elems,
        "inverse roots": 4 * factor_elems,
        "Adam grafting (2 x params)": 2 * 4 * n_params,
        "momentum (1 x params)": 4 * n_params,
    }
    return {"state_bytes": sum(by_key.values()), "by_key": by_key, "blocks": n_blocks}


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=None, help="GPT-2 layers (default 12; --quick 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="2 layers instead of 12 (same shapes per layer)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    args = parser.parse_args(argv)
    if args.layers is None:
        args.layers = 2 if args.quick else 12
    if args.layers < 1:
        parser.error("--layers must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    info = step_time.machine_info(CPU)
    print(
        f"machine: {info['cpu']} | {info['usable_cpus']} usable CPUs | "
        f"torch threads {info['torch_threads']} | "
        f"torch {info['torch']} | transformers {info['transformers']} | python {info['python']}"
    )
    t0 = time.perf_counter()
    model = build_gpt2_small(args.layers)
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(1234)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * GRAD_SCALE
    n_params = sum(p.numel() for p in params)
    print(
        f"model: GPT2LMHeadModel(GPT2Config(n_layer={args.layers})): {n_params / 1e6:.2f}M parameters in "
        f"{len(params)} tensors, float32 ({n_params * 4 / MIB:.0f} MiB); one step per optimizer, "
        f"grads N(0, {GRAD_SCALE:g}^2)\n"
    )

    results = []
    header = f"{'optimizer':<56} {'state MiB':>10} {'bytes/param':>11} {'x AdamW':>8}  largest parts"
    print(header)
    print("-" * (len(header) + 30))
    base = None
    for row in ROWS:
        result = measure(row, params, model)
        if row.label == BASELINE:
            base = result["state_bytes"]
        results.append({"label": row.label, "constructor": row.passed, "measured": True, **result})
        _print_row(row.label, result, n_params, base)
        if not result["finite"]:
            print(f"  note: {row.label} produced non-finite parameters")
    estimate = shampoo_estimate(model)
    label = f"Shampoo estimate (fp32, blocks <= {SHAMPOO_BLOCK}, Adam grafting)"
    results.append({"label": label, "measured": False, **estimate})
    _print_row(label + " *", estimate, n_params, base)
    print(
        f"* analytic, not run: {estimate['blocks']} blocks; per block a factor and its inverse root per "
        "axis, plus 2 x params Adam grafting and 1 x params momentum, all float32"
    )
    for r in results:
        r["ratio_vs_adamw"] = r["state_bytes"] / base

    target_row = next(r for r in results if r["label"] == TARGET_LABEL)
    met = target_row["ratio_vs_adamw"] <= TARGET_RATIO
    print(
        f"\ntarget {TARGET_LABEL} <= {TARGET_RATIO}x AdamW state: {'MET' if met else 'MISSED'} "
        f"({target_row['ratio_vs_adamw']:.3f}x)"
    )
    elapsed = time.perf_counter() - t0
    print(f"total benchmark time {elapsed:.1f} s")

    if args.json:
        payload = {
            "machine": info,
            "settings": {
                "layers": args.layers,
                "parameters": n_params,
                "tensors": len(params),
                "grad_scale": GRAD_SCALE,
                "shampoo_block": SHAMPOO_BLOCK,
                "quick": args.quick,
                "argv": sys.argv[1:] if argv is None else argv,
            },
            "rows": results,
            "target": {"label": TARGET_LABEL, "ratio": TARGET_RATIO, "met": met},
            "elapsed_s": elapsed,
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _print_row(label: str, result: dict, n_params: int, base: int | None) -> None:
    total = result["state_bytes"]
    parts = ", ".join(f"{k} {v / MIB:.0f}" for k, v in list(result["by_key"].items())[:4])
    ratio = f"{total / base:.3f}x" if base else "-"
    print(f"{label:<56} {total / MIB:>10.1f} {total / n_params:>11.2f} {ratio:>8}  {parts}")


if __name__ == "__main__":
    sys.exit(main())
