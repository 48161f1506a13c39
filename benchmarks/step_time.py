"""Time ``optimizer.step()`` of hf_rootfree's element-wise optimizers against torch's AdamW.

Measures every element-wise optimizer of ``hf_rootfree.OPTIMIZERS`` (RootFreeAdamW, RootFreeRMSprop,
AdaX and RootFreeAdaX at the time of writing; default path: the compiled fused
kernel on CPU, foreach elsewhere) against ``torch.optim.AdamW(fused=True)`` and
``torch.optim.AdamW(foreach=True)`` in the same run, on two models built from configs (no
downloads): a small GPT-2 (5.3M parameters in 52 tensors) and a small ConvNeXt (1.6M parameters
in 92 tensors, most of them small, so per-tensor overhead shows).

Method: every optimizer gets its own copy of the model's parameters, with ``.grad`` set to the
same fixed random values (scale 1e-3). Each optimizer is warmed up (the first step builds its
state and, for the fused kernel, loads or compiles it). Then the optimizers are timed in rounds:
in each round every optimizer runs ``--steps`` consecutive steps timed with
``time.perf_counter`` (with a device synchronize on CUDA), the order rotating from round to round,
so slow phases of a noisy shared machine hit every optimizer alike. The reported figure is the
median over ``--repeats`` rounds of the mean per-step time.

Target (CPU): each of the four default optimizers within 1.1x of fused AdamW.

Usage::

    python benchmarks/step_time.py                       # both models, defaults
    python benchmarks/step_time.py --all-paths --json step_time.json
    python benchmarks/step_time.py --models gpt2 --optimizers RootFreeAdamW,AdaX --threads 1
    python benchmarks/step_time.py --compile --threads 1   # + torch.compile(opt.step) rows

``--compile`` adds ``torch.compile(optimizer.step)`` of torch's foreach AdamW and of each of ours
(path ``compile``): the warm-up steps include the compilation.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import hf_rootfree

TARGET_RATIO = 1.1
BATCH_SIZE = 32  # the B of the root-free optimizers; it does not change the cost of a step
GRAD_SCALE = 1e-3

#: class name -> registry spec of the element-wise optimizers timed here
SPECS = {spec.cls.__name__: spec for spec in hf_rootfree.OPTIMIZERS.values() if spec.element_wise}
OURS = tuple(SPECS)
MODELS = ("gpt2", "convnext")

# Path name -> constructor keyword arguments of our optimizers.
PATH_KWARGS: dict[str, dict[str, bool | None]] = {
    "default": {},
    "foreach": {"foreach": True},
    "reference": {"foreach": False, "fused": False},
    "compile": {},  # the default constructor; its step() is wrapped in torch.compile
}


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def build_model(name: str) -> torch.nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if name == "gpt2":
        config = transformers.GPT2Config(
            n_layer=4, n_embd=256, n_head=4, vocab_size=8192, n_positions=256, bos_token_id=0, eos_token_id=0
        )
        return transformers.GPT2LMHeadModel(config)
    if name == "convnext":
        config = transformers.ConvNextConfig(
            depths=[2, 2, 2, 2], hidden_sizes=[32, 64, 128, 256], num_labels=10
        )
        return transformers.ConvNextForImageClassification(config)
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def make_grads(model: torch.nn.Module, device: torch.device) -> list[torch.Tensor]:
    """Fixed random gradients (seeded), one per distinct trainable parameter."""
    generator = torch.Generator().manual_seed(1234)
    return [
        (torch.randn(p.shape, generator=generator, dtype=p.dtype) * GRAD_SCALE).to(device)
        for p in model.parameters()
        if p.requires_grad
    ]


def param_copy(model: torch.nn.Module, grads: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """A private copy of the parameters with ``.grad`` filled: optimizers never share memory."""
    params = []
    for p, g in zip((p for p in model.parameters() if p.requires_grad), grads):
        q = p.detach().to(device, copy=True).requires_grad_(True)
        q.grad = g.clone()
        params.append(q)
    return params


# ---------------------------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------------------------


@dataclass
class Entry:
    name: str  # optimizer class name
    path: str  # requested path: fused / foreach / compile for AdamW; default / foreach / reference / compile
    factory: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    baseline: bool = False
    resolved: str = ""  # path our optimizer actually took (see _path), filled after warm-up
    optimizer: torch.optim.Optimizer | None = None
    step: Callable[[], object] | None = None  # optimizer.step, or torch.compile of it (path compile)
    params: list[torch.Tensor] = field(default_factory=list)
    samples_ms: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.name}[{self.path}]"


#: --mode paper: the paper's parametrization (fixed damping, no per-tensor statistics)
PAPER = {"RootFreeAdaX": {"relative_damping": 0.0, "lr_units": "paper", "damping": 1e-4}}
PAPER_ELEMENTWISE = {"s0": 1.0, "bias_correction": False, "relative_damping": 0.0, "lr_units": "paper"}
MODE = {"mode": "default"}


def our_factory(
    name: str, kwargs: dict[str, bool | None]
) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
    cls = getattr(hf_rootfree, name)
    root_free = SPECS[name].root_free  # the root-free ones take B and a paper parametrization
    extra = {"batch_size": BATCH_SIZE} if root_free else {}
    if MODE["mode"] == "paper" and root_free:
        extra.update(PAPER.get(name, {**PAPER_ELEMENTWISE, "damping": 1e-4}))
    return lambda params: cls(params, **extra, **kwargs)


def make_entries(names: list[str], paths: list[str]) -> list[Entry]:
    entries = [
        Entry("AdamW", "fused", lambda params: torch.optim.AdamW(params, fused=True), baseline=True),
        Entry("AdamW", "foreach", lambda params: torch.optim.AdamW(params, foreach=True), baseline=True),
    ]
    if "compile" in paths:
        entries.append(Entry("AdamW", "compile", lambda params: torch.optim.AdamW(params, foreach=True)))
    for path in paths:
        for name in names:
            entries.append(Entry(name, path, our_factory(name, PATH_KWARGS[path])))
    return entries


def resolved_path(opt: torch.optim.Optimizer) -> str:
    """The path our optimizer's dispatcher picked for its first group (detects a fallback)."""
    group = opt.param_groups[0]
    try:
        return opt._path(group, list(group["params"]))  # type: ignore[attr-defined]
    except Exception as error:  # a private API: never let it break the benchmark
        return f"? ({error.__class__.__name__})"


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], object], steps: int, device: torch.device) -> float:
    """Mean wall time of one step over ``steps`` consecutive steps, in ms."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) * 1e3 / steps


def run_model(model_name: str, entries: list[Entry], args: argparse.Namespace, device: torch.device) -> dict:
    model = build_model(model_name)
    grads = make_grads(model, device)
    n_params = sum(g.numel() for g in grads)
    print(f"\n== {model_name}: {n_params / 1e6:.2f}M parameters in {len(grads)} tensors ==", flush=True)

    for entry in entries:
        entry.params = param_copy(model, grads, device)
        entry.optimizer = entry.factory(entry.params)
        entry.step = torch.compile(entry.optimizer.step) if entry.path == "compile" else entry.optimizer.step
        for _ in range(args.warmup):  # the first step builds state (and loads or compiles kernels)
            entry.step()
        sync(device)
        compiled = entry.path == "compile"
        entry.resolved = entry.path if entry.baseline or compiled else resolved_path(entry.optimizer)
        entry.samples_ms = []
    del model

    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(args.repeats):
            shift = r % len(entries)
            for entry in entries[shift:] + entries[:shift]:  # rotate the order every round
                entry.samples_ms.append(time_steps(entry.step, args.steps, device))
    finally:
        if gc_was_enabled:
            gc.enable()

    for entry in entries:
        if not all(torch.isfinite(p).all() for p in entry.params):
            warnings.warn(f"{model_name}: {entry.label} produced non-finite parameters", stacklevel=1)

    result = report(model_name, n_params, len(grads), entries, device)
    for entry in entries:  # free this model's copies before the next model
        entry.optimizer, entry.step, entry.params = None, None, []
    return result


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def report(
    model_name: str, n_params: int, n_tensors: int, entries: list[Entry], device: torch.device
) -> dict:
    medians = {e.label: statistics.median(e.samples_ms) for e in entries}
    fused_ms, foreach_ms = medians["AdamW[fused]"], medians["AdamW[foreach]"]

    header = (
        f"{'optimizer':<16} {'path':<10} {'took':<14} {'median ms':>10} {'min ms':>8} {'IQR ms':>8} "
        f"{'vs fused':>9} {'vs foreach':>10}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for e in entries:
        med = medians[e.label]
        q1, _, q3 = statistics.quantiles(e.samples_ms, n=4) if len(e.samples_ms) > 1 else (med, med, med)
        row = {
            "optimizer": e.name,
            "path": e.path,
            "resolved_path": e.resolved,
            "median_ms": med,
            "min_ms": min(e.samples_ms),
            "max_ms": max(e.samples_ms),
            "iqr_ms": q3 - q1,
            "samples_ms": e.samples_ms,
            "ratio_vs_fused_adamw": med / fused_ms,
            "ratio_vs_foreach_adamw": med / foreach_ms,
        }
        rows.append(row)
        print(
            f"{e.name:<16} {e.path:<10} {e.resolved:<14} {med:>10.3f} {row['min_ms']:>8.3f} "
            f"{row['iqr_ms']:>8.3f} {row['ratio_vs_fused_adamw']:>8.2f}x "
            f"{row['ratio_vs_foreach_adamw']:>9.2f}x"
        )

    noisy = [r for r in rows if r["iqr_ms"] > 0.25 * r["median_ms"]]
    if noisy:
        print(
            f"note: noisy timings (IQR > 25% of the median) for {len(noisy)} of {len(rows)} rows; "
            "the machine was busy during some rounds. Ratios stay comparable since every optimizer "
            "runs in every round, but consider more --repeats or a quieter machine."
        )

    checked = [r for r in rows if r["path"] == "default" and r["optimizer"] in OURS]
    target: dict = {"ratio": TARGET_RATIO, "checked": [r["optimizer"] for r in checked]}
    if device.type != "cpu":
        target["met"] = None
        print(
            f"target (each default optimizer <= {TARGET_RATIO}x fused AdamW) is for CPU: "
            f"not evaluated on {device}"
        )
    elif not checked:
        target["met"] = None
        print("target: no default-path optimizer of ours was timed")
    else:
        missed = [r for r in checked if r["ratio_vs_fused_adamw"] > TARGET_RATIO]
        target["met"] = not missed
        target["missed"] = [r["optimizer"] for r in missed]
        worst = max(checked, key=lambda r: r["ratio_vs_fused_adamw"])
        incomplete = "" if len(checked) == len(OURS) else f" (only {len(checked)} of {len(OURS)} timed)"
        if missed:
            print(
                f"target MISSED on {model_name}: "
                + ", ".join(f"{r['optimizer']} {r['ratio_vs_fused_adamw']:.2f}x" for r in missed)
                + f" > {TARGET_RATIO}x fused AdamW{incomplete}"
            )
        else:
            print(
                f"target MET on {model_name}: every default optimizer <= {TARGET_RATIO}x fused AdamW "
                f"(worst: {worst['optimizer']} {worst['ratio_vs_fused_adamw']:.2f}x){incomplete}"
            )
    return {"model": model_name, "parameters": n_params, "tensors": n_tensors, "rows": rows, "target": target}


def machine_info(device: torch.device) -> dict:
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:  # the first processor's block is enough
                    break
    except OSError:
        pass
    cpu = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:  # VMs often show a bare "AMD EPYC"
        cpu += f" (family {fields['cpu family']}, model {fields['model']})"
    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    info = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": tf_version,
        "hf_rootfree": hf_rootfree.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_list(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    lookup = {a.lower(): a for a in allowed}
    out = []
    for item in (v.strip() for v in value.split(",")):
        if not item:
            continue
        if item.lower() not in lookup:
            raise SystemExit(f"unknown {what} {item!r}; choose from {', '.join(allowed)}")
        if lookup[item.lower()] not in out:
            out.append(lookup[item.lower()])
    if not out:
        raise SystemExit(f"no {what} given")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--optimizers",
        default=",".join(OURS),
        help=f"comma-separated subset of {','.join(OURS)} (fused and foreach AdamW are always timed)",
    )
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}"
    )
    parser.add_argument(
        "--steps", type=int, default=50, help="consecutive steps per timed sample (default 50)"
    )
    parser.add_argument(
        "--repeats", type=int, default=15, help="rounds, i.e. samples per optimizer (default 15)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per optimizer first (default 3)")
    parser.add_argument(
        "--mode",
        default="default",
        choices=("default", "paper"),
        help="our optimizers' defaults (AdamW units: one extra read of the gradients per step for "
        "the per-tensor damping) or the paper's parametrization (default: %(default)s)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--all-paths", action="store_true", help="also time our foreach and reference paths")
    parser.add_argument(
        "--compile", action="store_true", help="also time torch.compile(opt.step) of AdamW (foreach) and ours"
    )
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    args = parser.parse_args(argv)
    MODE["mode"] = args.mode
    if args.steps < 1 or args.repeats < 1 or args.warmup < 1:
        parser.error("--steps, --repeats and --warmup must be >= 1")

    names = parse_list(args.optimizers, OURS, "optimizer")
    models = parse_list(args.models, MODELS, "model")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available")
    device = torch.device(args.device)

    info = machine_info(device)
    print(
        f"machine: {info['cpu']} | {info['usable_cpus']} usable CPUs | "
        f"torch threads {info['torch_threads']} | "
        f"torch {info['torch']} | transformers {info['transformers']} | python {info['python']}"
        + (f" | load avg {info['load_average'][0]:.2f}" if info["load_average"] else "")
        + (f" | GPU {info['gpu']}" if "gpu" in info else "")
    )
    print(
        f"method: {args.warmup} warm-up steps, then {args.repeats} round-robin rounds x {args.steps} steps; "
        f"median of the per-round mean step time; grads fixed N(0, {GRAD_SCALE:g}^2), float32"
    )

    paths = ["default"] + (["foreach", "reference"] if args.all_paths else [])
    paths += ["compile"] if args.compile else []
    entries = make_entries(names, paths)
    t0 = time.perf_counter()
    results = [run_model(m, entries, args, device) for m in models]
    elapsed = time.perf_counter() - t0
    print(f"\ntotal benchmark time {elapsed:.1f} s")

    if args.json:
        payload = {
            "machine": info,
            "settings": {
                "steps": args.steps,
                "repeats": args.repeats,
                "warmup": args.warmup,
                "all_paths": args.all_paths,
                "compile": args.compile,
                "batch_size": BATCH_SIZE,
                "grad_scale": GRAD_SCALE,
                "argv": sys.argv[1:] if argv is None else argv,
            },
            "models": results,
            "elapsed_s": elapsed,
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
