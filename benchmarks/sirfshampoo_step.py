"""Time SIRFShampoo's ``optimizer.step()``, amortized over its preconditioner update, in one run.

Contenders, all measured in the same run on the two models of ``step_time.py`` (a small GPT-2 and
a small ConvNeXt, built from configs, no downloads):

* ``torch.optim.AdamW(fused=True)``, the baseline;
* the reference implementation ``sirfshampoo.SIRFShampoo`` (PyPI ``sirfshampoo==0.0.1``: dense
  Kronecker factors, one preconditioner per parameter);
* ``hf_rootfree.SIRFShampoo`` at the reference's settings, with its defaults, and with its defaults
  and bfloat16 factors;
* ``pytorch_optimizer``'s ``Shampoo`` and ``SOAP``, preconditioning every 10 steps (rows skipped
  with a note when the package is not installed).

Method: every contender gets its own float32 copy of the parameters (the reference, which needs
a model, its own deep copy of the model) with ``.grad`` set to the same fixed random values
N(0, 1e-3²). After ``--warmup`` untimed steps (the first builds the state), the contenders are
timed in rounds, the order rotating from round to round. A timed unit is always a whole number of
10-step cycles, so it holds exactly one preconditioner update per 10 steps and the per-step time
is honestly amortized. In the first round every contender runs one cycle; from then on, fast
contenders run as many cycles as fill about ``UNIT_S`` seconds (at most ``MAX_CYCLES``), slow ones
one cycle. A contender leaves the rotation once its timed steps add up to ``--max-seconds``
(it keeps at least one sample): on the GPT-2 the dense 8192 x 8192 factor of the vocabulary axis
makes one cycle of the reference take ~20 s and one of Shampoo or SOAP 1-2 minutes (a full
SVD / QR of that factor), so these get one or two samples. The figure is the median over the
samples of the mean per-step time; min and IQR show the spread.

State bytes: all tensors reachable from ``optimizer.state`` (for the reference also its
``preconditioner`` and ``preconditioner_momenta`` attributes, lists of singd ``StructuredMatrix``
objects), counted once per storage, after the timed steps.

Targets: ours (reference settings) <= 0.6x the reference; ours (defaults) <= 0.1x the reference
and <= 0.2x pytorch_optimizer's Shampoo.

Usage::

    python benchmarks/sirfshampoo_step.py                  # both models, ~8 minutes on 2 cores
    python benchmarks/sirfshampoo_step.py --quick --json sirfshampoo_step.json
    python benchmarks/sirfshampoo_step.py --models convnext --rounds 9 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata

import step_time  # `python benchmarks/sirfshampoo_step.py` puts this folder on sys.path
import torch

CPU = torch.device("cpu")
BATCH_SIZE = 32  # the B of SIRFShampoo; it does not change the cost of a step
UPDATE_FREQ = 10  # preconditioner update every this many steps, for every contender
UNIT_S = 0.5  # target length of one timed unit of a fast contender
MAX_CYCLES = 50  # most 10-step cycles in one timed unit
MIB = 2**20

BASELINE = "AdamW (fused)"
REFERENCE = "reference"
OURS_REF = "ours (reference settings)"
OURS_DEFAULTS = "ours (defaults)"
SHAMPOO = "pytorch_optimizer Shampoo"

# (subject, [(against, most allowed ratio), ...]), checked on every model.
TARGETS: list[tuple[str, list[tuple[str, float]]]] = [
    (OURS_REF, [(REFERENCE, 0.6)]),
    (OURS_DEFAULTS, [(REFERENCE, 0.1), (SHAMPOO, 0.2)]),
]

Factory = Callable[[torch.nn.Module, list[torch.Tensor]], torch.optim.Optimizer]


# ---------------------------------------------------------------------------------------------
# Contenders
# ---------------------------------------------------------------------------------------------


@dataclass
class Contender:
    label: str
    passed: str  # the constructor call, as printed under the table
    factory: Factory  # (model, grads) -> optimizer over its own copy of the parameters
    extra_state: tuple[str, ...] = ()  # optimizer attributes that hold state outside .state


def adamw(model: torch.nn.Module, grads: list[torch.Tensor]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(step_time.param_copy(model, grads, CPU), fused=True)


def reference(model: torch.nn.Module, grads: list[torch.Tensor]) -> torch.optim.Optimizer:
    import sirfshampoo

    model = copy.deepcopy(model)  # the reference needs a model; give it its own
    for p, g in zip((p for p in model.parameters() if p.requires_grad), grads):
        p.grad = g.clone()
    return sirfshampoo.SIRFShampoo(
        model,
        lr=1e-3,
        beta2=0.01,
        alpha1=0.9,
        alpha2=0.5,
        lam=1e-3,
        kappa=0.0,
        batch_size=BATCH_SIZE,
        T=UPDATE_FREQ,
    )


def ours(**kwargs) -> Factory:
    def factory(model: torch.nn.Module, grads: list[torch.Tensor]) -> torch.optim.Optimizer:
        import hf_rootfree

        params = step_time.param_copy(model, grads, CPU)
        return hf_rootfree.SIRFShampoo(params, batch_size=BATCH_SIZE, update_freq=UPDATE_FREQ, **kwargs)

    return factory


def pytorch_optimizer_factory(name: str, **kwargs) -> Factory:
    def factory(model: torch.nn.Module, grads: list[torch.Tensor]) -> torch.optim.Optimizer:
        import pytorch_optimizer

        return getattr(pytorch_optimizer, name)(step_time.param_copy(model, grads, CPU), **kwargs)

    return factory


OURS_REF_KWARGS = {
    "lr": 1e-3,
    "momentum": 0.9,
    "weight_decay": 0.0,
    "precond_lr": 0.01,
    "precond_momentum": 0.5,
    "damping": 1e-3,
    "structures": "dense",
    "merge_dims": False,
    "max_dense_dim": None,
}

CONTENDERS = [
    Contender(BASELINE, "torch.optim.AdamW(params, fused=True)", adamw),
    Contender(
        REFERENCE,
        "sirfshampoo.SIRFShampoo(model_copy, lr=1e-3, beta2=0.01, alpha1=0.9, alpha2=0.5, lam=1e-3, "
        "kappa=0.0, batch_size=32, T=10)",
        reference,
        extra_state=("preconditioner", "preconditioner_momenta"),
    ),
    Contender(
        OURS_REF,
        "hf_rootfree.SIRFShampoo(params, lr=1e-3, momentum=0.9, weight_decay=0.0, precond_lr=0.01, "
        "precond_momentum=0.5, damping=1e-3, batch_size=32, update_freq=10, structures='dense', "
        "merge_dims=False, max_dense_dim=None)",
        ours(**OURS_REF_KWARGS),
    ),
    Contender(OURS_DEFAULTS, "hf_rootfree.SIRFShampoo(params, batch_size=32, update_freq=10)", ours()),
    Contender(
        "ours (defaults, bf16 factors)",
        "hf_rootfree.SIRFShampoo(params, batch_size=32, update_freq=10, precond_dtype=torch.bfloat16)",
        ours(precond_dtype=torch.bfloat16),
    ),
    Contender(
        SHAMPOO,
        "pytorch_optimizer.Shampoo(params, preconditioning_compute_steps=10)",
        pytorch_optimizer_factory("Shampoo", preconditioning_compute_steps=UPDATE_FREQ),
    ),
    Contender(
        "pytorch_optimizer SOAP",
        "pytorch_optimizer.SOAP(params, precondition_frequency=10)",
        pytorch_optimizer_factory("SOAP", precondition_frequency=UPDATE_FREQ),
    ),
]


# ---------------------------------------------------------------------------------------------
# State bytes
# ---------------------------------------------------------------------------------------------


def tensors_in(obj: object) -> Iterator[torch.Tensor]:
    """Every tensor reachable through dicts, lists, tuples and singd structured matrices."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors_in(value)
    elif isinstance(obj, (list, tuple, set)):
        for value in obj:
            yield from tensors_in(value)
    elif hasattr(obj, "named_tensors"):  # singd StructuredMatrix
        for _, tensor in obj.named_tensors():
            yield tensor
    elif hasattr(obj, "to_dense"):  # a StructuredMatrix without named_tensors(): its dense size
        yield obj.to_dense()


def state_bytes(opt: torch.optim.Optimizer, extra: tuple[str, ...]) -> int:
    """Bytes held by the optimizer's state, each storage counted once (views are not double-counted)."""
    storages: dict[int, int] = {}
    for obj in (opt.state, *(getattr(opt, name) for name in extra)):
        for tensor in tensors_in(obj):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    contender: Contender
    optimizer: torch.optim.Optimizer
    warmup_s: float
    cycles: int = 1  # 10-step cycles per timed unit; set after the first round
    timed_s: float = 0.0
    samples_ms: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)


def time_unit(run: Run) -> None:
    steps = run.cycles * UPDATE_FREQ
    start = time.perf_counter()
    for _ in range(steps):
        run.optimizer.step()
    elapsed = time.perf_counter() - start
    run.timed_s += elapsed
    run.samples_ms.append(elapsed * 1e3 / steps)
    run.steps.append(steps)


def run_model(model_name: str, contenders: list[Contender], args: argparse.Namespace) -> dict:
    model = step_time.build_model(model_name)
    grads = step_time.make_grads(model, CPU)
    n_params = sum(g.numel() for g in grads)
    print(f"\n== {model_name}: {n_params / 1e6:.2f}M parameters in {len(grads)} tensors ==", flush=True)

    runs: list[Run] = []
    unavailable: dict[str, str] = {}
    for contender in contenders:
        try:
            optimizer = contender.factory(model, grads)
        except (ImportError, AttributeError) as error:
            unavailable[contender.label] = f"{error.__class__.__name__}: {error}"
            print(f"{contender.label}: unavailable: {unavailable[contender.label]}", flush=True)
            continue
        start = time.perf_counter()
        for _ in range(args.warmup):  # the first step builds the state
            optimizer.step()
        warmup_s = time.perf_counter() - start
        print(f"{contender.label}: {args.warmup} warm-up step(s) took {warmup_s:.2f} s", flush=True)
        runs.append(Run(contender, optimizer, warmup_s))
    del model

    t0 = time.perf_counter()
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(args.rounds):
            active = [run for run in runs if run.timed_s < args.max_seconds]
            if not active:
                break
            shift = r % len(active)
            for run in active[shift:] + active[:shift]:  # rotate the order every round
                time_unit(run)
                if r == 0:  # the first unit is one cycle: size later units from it
                    run.cycles = max(1, min(MAX_CYCLES, round(UNIT_S / run.timed_s)))
            print(
                f"round {r + 1}/{args.rounds}: {len(active)} contenders, "
                f"{time.perf_counter() - t0:.1f} s so far",
                flush=True,
            )
    finally:
        if gc_was_enabled:
            gc.enable()

    for run in runs:
        params = [p for group in run.optimizer.param_groups for p in group["params"]]
        if not all(torch.isfinite(p).all() for p in params):
            warnings.warn(f"{model_name}: {run.contender.label} produced non-finite parameters", stacklevel=1)

    result = report(model_name, n_params, len(grads), runs, unavailable)
    result["timed_s"] = time.perf_counter() - t0
    runs.clear()  # free this model's optimizers before the next model
    gc.collect()
    return result


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else value / base


def fmt_ratio(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width - 1}.3f}x"


def report(
    model_name: str, n_params: int, n_tensors: int, runs: list[Run], unavailable: dict[str, str]
) -> dict:
    medians = {run.contender.label: statistics.median(run.samples_ms) for run in runs}
    state = {run.contender.label: state_bytes(run.optimizer, run.contender.extra_state) for run in runs}
    base_ms, ref_ms = medians.get(BASELINE), medians.get(REFERENCE)
    base_state = state.get(BASELINE)

    header = (
        f"{'contender':<30} {'n':>2} {'steps':>5} {'median ms':>10} {'min ms':>10} {'IQR ms':>9} "
        f"{'x fused AdamW':>13} {'x reference':>11} {'state MiB':>9} {'x AdamW state':>13}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for run in runs:
        label, samples = run.contender.label, run.samples_ms
        med = medians[label]
        q1, _, q3 = statistics.quantiles(samples, n=4) if len(samples) > 1 else (med, med, med)
        row = {
            "contender": label,
            "constructor": run.contender.passed,
            "median_ms": med,
            "min_ms": min(samples),
            "max_ms": max(samples),
            "iqr_ms": q3 - q1,
            "samples_ms": samples,
            "steps_per_sample": run.steps,
            "warmup_s": run.warmup_s,
            "ratio_vs_fused_adamw": ratio(med, base_ms),
            "ratio_vs_reference": ratio(med, ref_ms),
            "state_bytes": state[label],
            "state_ratio_vs_adamw": ratio(state[label], base_state),
        }
        rows.append(row)
        iqr = f"{row['iqr_ms']:>9.3f}" if len(samples) > 1 else f"{'-':>9}"
        print(
            f"{label:<30} {len(samples):>2} {run.steps[-1]:>5} {med:>10.3f} {row['min_ms']:>10.3f} {iqr} "
            f"{fmt_ratio(row['ratio_vs_fused_adamw'], 13)} {fmt_ratio(row['ratio_vs_reference'], 11)} "
            f"{state[label] / MIB:>9.2f} {fmt_ratio(row['state_ratio_vs_adamw'], 13)}"
        )
    for label, reason in unavailable.items():
        print(f"{label:<30} unavailable: {reason}")
    print("(n: samples; steps: steps in the last sample, whole 10-step cycles; ms are per step, amortized)")

    noisy = [r for r in rows if len(r["samples_ms"]) > 1 and r["iqr_ms"] > 0.25 * r["median_ms"]]
    if noisy:
        print(
            f"note: noisy timings (IQR > 25% of the median) for {len(noisy)} of {len(rows)} rows; the "
            "machine was busy during some rounds. Consider more --rounds or a quieter machine."
        )

    targets = []
    for subject, bounds in TARGETS:
        text = f"{subject} <= " + " and <= ".join(f"{limit}x {against}" for against, limit in bounds)
        missing = [label for label in (subject, *(a for a, _ in bounds)) if label not in medians]
        if missing:
            targets.append({"target": text, "met": None, "missing": missing})
            print(f"target {text}: not evaluated on {model_name} ({', '.join(missing)} not timed)")
            continue
        got = [medians[subject] / medians[against] for against, _ in bounds]
        met = all(g <= limit for g, (_, limit) in zip(got, bounds))
        targets.append({"target": text, "met": met, "ratios": dict(zip((a for a, _ in bounds), got))})
        detail = ", ".join(f"{g:.3f}x {against}" for g, (against, _) in zip(got, bounds))
        print(f"target {text}: {'MET' if met else 'MISSED'} on {model_name} ({detail})")

    return {
        "model": model_name,
        "parameters": n_params,
        "tensors": n_tensors,
        "rows": rows,
        "unavailable": unavailable,
        "targets": targets,
    }


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in ("sirfshampoo", "singd", "pytorch_optimizer"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        default=",".join(step_time.MODELS),
        help=f"comma-separated subset of {','.join(step_time.MODELS)}",
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="most rounds per model (default 7; --quick 3)"
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="a contender leaves the rotation once its timed steps add up to this (default 40; --quick 15)",
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per contender first (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and seconds per contender")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 7
    if args.max_seconds is None:
        args.max_seconds = 15.0 if args.quick else 40.0
    if args.rounds < 1 or args.warmup < 1 or args.max_seconds <= 0:
        parser.error("--rounds, --warmup and --max-seconds must be positive")

    models = step_time.parse_list(args.models, step_time.MODELS, "model")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    info = step_time.machine_info(CPU)
    info["packages"] = package_versions()
    print(
        f"machine: {info['cpu']} | {info['usable_cpus']} usable CPUs | "
        f"torch threads {info['torch_threads']} | "
        f"torch {info['torch']} | transformers {info['transformers']} | python {info['python']}"
        + (f" | load avg {info['load_average'][0]:.2f}" if info["load_average"] else "")
    )
    print(
        "packages: "
        + ", ".join(f"{name} {version or 'not installed'}" for name, version in info["packages"].items())
    )
    print(
        f"method: {args.warmup} warm-up step(s), then up to {args.rounds} round-robin rounds of whole "
        f"{UPDATE_FREQ}-step cycles (preconditioner update every {UPDATE_FREQ} steps), a contender leaving "
        f"after {args.max_seconds:g} s timed; median of the per-round mean step time; "
        f"grads fixed N(0, {step_time.GRAD_SCALE:g}^2), float32"
    )
    print("contenders:")
    for contender in CONTENDERS:
        print(f"  {contender.label:<30} {contender.passed}")

    t0 = time.perf_counter()
    results = [run_model(m, CONTENDERS, args) for m in models]
    elapsed = time.perf_counter() - t0
    print(f"\ntotal benchmark time {elapsed:.1f} s")

    if args.json:
        payload = {
            "machine": info,
            "settings": {
                "rounds": args.rounds,
                "max_seconds": args.max_seconds,
                "warmup": args.warmup,
                "quick": args.quick,
                "update_freq": UPDATE_FREQ,
                "unit_s": UNIT_S,
                "max_cycles": MAX_CYCLES,
                "batch_size": BATCH_SIZE,
                "grad_scale": step_time.GRAD_SCALE,
                "contenders": {c.label: c.passed for c in CONTENDERS},
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
