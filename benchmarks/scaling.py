"""How ``optimizer.step()`` time grows: with parameter count (element-wise) and with d (SIRFShampoo).

Part 1, element-wise: ``RootFreeAdamW``, ``RootFreeRMSprop``, ``AdaX``, ``RootFreeAdaX`` (default
path: the fused CPU kernel) against ``torch.optim.AdamW(fused=True)`` on stacks of 8 square
``Linear`` layers (weight d x d and bias d: 16 tensors), d chosen so the stack holds about 1M,
3M, 10M, 30M and 100M parameters. The tensor count stays fixed, so the growth is the growth with
size, not with the number of tensors.

Part 2, SIRFShampoo: one d x d matrix, d = 128 … 2048, ``SIRFShampoo(update_freq=10,
max_dense_dim=None)`` (dense factors on both axes) with float32 and bfloat16 factors, against
fused AdamW on the same matrix. The amortized step time covers whole 10-step cycles (one factor
update each); each step is also timed on its own, which splits it into the factor-update step
and the plain (preconditioning-only) steps.

Method (both parts, as ``step_time.py``): every optimizer gets its own float32 copy of the
parameters; their ``.grad`` is the same fixed random tensor N(0, 1e-3²) (shared, read-only for
these optimizers, to halve the memory at 100M parameters). After warm-up steps (the first builds
the state; in part 2 one whole cycle), the optimizers are timed round-robin, the order rotating
from round to round, and the median over rounds of the per-step time is reported. The growth
exponent is the least-squares slope of log(time) against log(size); it is printed over all sizes
and over the upper half (where fixed per-step overheads no longer matter).

Expected: element-wise steps stream parameters, gradients and state through memory once, so their
time grows linearly with the parameter count (slope 1). SIRFShampoo's factor update is O(d³) per
axis (products of d x d factors), paid every T = ``update_freq`` steps, and its other steps cost
O(d²·r) (the cached K Kᵀ applied to a d x r unfolding); for a d x d matrix both are cubic in d, so
the amortized cost is ~ c1·d³/T + c2·d²·r with r = d (slope 3 once the products are compute bound).

A PNG of both parts is written to ``--plot`` (``benchmarks/results/scaling.png``).

Usage::

    python benchmarks/scaling.py                         # ~2 minutes on 2 cores, 7 GB of memory
    python benchmarks/scaling.py --quick --json scaling.json     # < 2 minutes
    python benchmarks/scaling.py --part sirfshampoo --dims 256,512,1024 --threads 1
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import step_time
import torch
from step_time import hf_rootfree

CPU = torch.device("cpu")
BATCH_SIZE = 32  # the B of the root-free optimizers; it does not change the cost of a step
GRAD_SCALE = 1e-3
LAYERS = 8  # square Linear layers in part 1
UPDATE_FREQ = 10
SAMPLE_S = 0.25  # target length of one timed sample in part 1
BASELINE = "AdamW (fused)"
DEFAULT_PLOT = Path(__file__).resolve().parent / "results" / "scaling.png"

SIZES = (1e6, 3e6, 1e7, 3e7, 1e8)
QUICK_SIZES = (1e6, 4e6, 1.6e7)
DIMS = (128, 256, 512, 1024, 2048)
QUICK_DIMS = (128, 256, 512, 1024)


@dataclass
class Timed:
    label: str
    optimizer: torch.optim.Optimizer
    steps: int = 1  # steps per timed sample
    samples_ms: list[float] = field(default_factory=list)  # per step
    cycle_steps_ms: list[list[float]] = field(default_factory=list)  # part 2: each step of each cycle


def fixed_tensors(shapes: list[tuple[int, ...]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Seeded initial values (scale 0.02) and gradients (scale GRAD_SCALE) for these shapes."""
    generator = torch.Generator().manual_seed(1234)
    values = [torch.randn(s, generator=generator) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=generator) * GRAD_SCALE for s in shapes]
    return values, grads


def copies(values: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    params = []
    for v, g in zip(values, grads):
        p = v.clone().requires_grad_(True)
        p.grad = g  # shared: none of the timed optimizers writes into .grad
        params.append(p)
    return params


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(y) on log(x)."""
    if len(xs) < 2:
        return None
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / den if den else None


def upper_half(xs: list[float]) -> int:
    """Index from which the upper half of the sizes starts (at least 2 points)."""
    return max(0, min(len(xs) - 2, len(xs) // 2))


def fmt_slope(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def fit(xs: list[float], ys: list[float], cut: int) -> dict[str, float | None]:
    """Slopes over all points, from index ``cut`` up, and between the last two points."""
    return {"all": slope(xs, ys), "upper": slope(xs[cut:], ys[cut:]), "last": slope(xs[-2:], ys[-2:])}


def fmt_fit(value: dict[str, float | None]) -> str:
    return " / ".join(fmt_slope(value[k]) for k in ("all", "upper", "last"))


# ---------------------------------------------------------------------------------------------
# Part 1: element-wise optimizers against parameter count
# ---------------------------------------------------------------------------------------------


def elementwise_factories() -> list[tuple[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]]:
    out: list[tuple[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]] = [
        (BASELINE, lambda params: torch.optim.AdamW(params, fused=True))
    ]
    for name in step_time.OURS:
        cls = getattr(hf_rootfree, name)
        extra = {} if name == "AdaX" else {"batch_size": BATCH_SIZE}
        out.append((name, lambda params, cls=cls, extra=extra: cls(params, **extra)))
    return out


def time_steps(opt: torch.optim.Optimizer, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - start) * 1e3 / steps


def sample_steps(t: Timed) -> None:
    t.samples_ms.append(time_steps(t.optimizer, t.steps))


def rounds_robin(timed: list[Timed], rounds: int, sample: Callable[[Timed], None] = sample_steps) -> None:
    """``rounds`` rounds of ``sample`` over the contenders, the order rotating, without the GC."""
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            shift = r % len(timed)
            for t in timed[shift:] + timed[:shift]:
                sample(t)
    finally:
        if gc_was_enabled:
            gc.enable()


def part_elementwise(sizes: list[float], rounds: int) -> dict:
    print("\n== part 1: element-wise optimizers, 8 square Linear layers (16 tensors) ==", flush=True)
    factories = elementwise_factories()
    points = []
    header = f"{'params':>8} {'d':>5} " + " ".join(f"{label:>22}" for label, _ in factories)
    print("per optimizer: median ms per step, min ms, (median x fused AdamW):")
    print(header)
    print("-" * len(header))
    for target in sizes:
        d = max(8, round(math.sqrt(target / LAYERS)))
        shapes = [s for _ in range(LAYERS) for s in ((d, d), (d,))]
        values, grads = fixed_tensors(shapes)
        n_params = sum(v.numel() for v in values)
        timed = []
        for label, factory in factories:
            opt = factory(copies(values, grads))
            opt.step()  # builds the state (and loads the fused kernel)
            probe = time_steps(opt, 1)
            steps = max(2, min(200, round(SAMPLE_S / max(probe / 1e3, 1e-6))))
            timed.append(Timed(label, opt, steps))
        rounds_robin(timed, rounds)
        medians = {t.label: statistics.median(t.samples_ms) for t in timed}
        base = medians[BASELINE]
        cells = " ".join(
            f"{medians[t.label]:>7.2f} {min(t.samples_ms):>6.2f} ({medians[t.label] / base:.2f}x)"
            for t in timed
        )
        print(f"{n_params / 1e6:>7.2f}M {d:>5} {cells}", flush=True)
        points.append(
            {
                "parameters": n_params,
                "d": d,
                "rows": [
                    {
                        "optimizer": t.label,
                        "median_ms": medians[t.label],
                        "min_ms": min(t.samples_ms),
                        "samples_ms": t.samples_ms,
                        "steps_per_sample": t.steps,
                        "ratio_vs_fused_adamw": medians[t.label] / base,
                    }
                    for t in timed
                ],
            }
        )
        del timed, values, grads
        gc.collect()

    xs = [p["parameters"] for p in points]
    cut = upper_half(xs)
    slopes = {}
    print(
        f"growth exponent (slope of log time vs log params) of the median and of the minimum step time: "
        f"all sizes / from {xs[cut] / 1e6:.0f}M up / the two largest; ns per parameter at the largest size"
    )
    for label, _ in factories:
        rows = [next(r for r in p["rows"] if r["optimizer"] == label) for p in points]
        slopes[label] = {
            "median": fit(xs, [r["median_ms"] for r in rows], cut),
            "min": fit(xs, [r["min_ms"] for r in rows], cut),
        }
        per_param = rows[-1]["median_ms"] * 1e6 / xs[-1], rows[-1]["min_ms"] * 1e6 / xs[-1]
        print(
            f"  {label:<16} median {fmt_fit(slopes[label]['median'])}   "
            f"min {fmt_fit(slopes[label]['min'])}   {per_param[0]:.2f} ns/param (min {per_param[1]:.2f})"
        )
    return {"points": points, "slopes": slopes, "upper_from_parameters": xs[cut]}


# ---------------------------------------------------------------------------------------------
# Part 2: SIRFShampoo against the matrix dimension
# ---------------------------------------------------------------------------------------------

SIRF_CONTENDERS: list[tuple[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]] = [
    (BASELINE, lambda params: torch.optim.AdamW(params, fused=True)),
    *(
        (
            f"SIRFShampoo {tag}",
            lambda params, dtype=dtype: hf_rootfree.SIRFShampoo(
                params,
                batch_size=BATCH_SIZE,
                update_freq=UPDATE_FREQ,
                max_dense_dim=None,
                precond_dtype=dtype,
            ),
        )
        for tag, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    ),
]


def time_cycle(opt: torch.optim.Optimizer) -> list[float]:
    """Each step of one UPDATE_FREQ-step cycle, in ms (the first step of a cycle updates the factors)."""
    out = []
    for _ in range(UPDATE_FREQ):
        start = time.perf_counter()
        opt.step()
        out.append((time.perf_counter() - start) * 1e3)
    return out


def sample_cycles(t: Timed) -> None:
    # AdamW's cycle is microseconds long: time 20 cycles per sample for it
    cycles = [time_cycle(t.optimizer) for _ in range(20 if t.label == BASELINE else 1)]
    t.cycle_steps_ms.extend(cycles)
    t.samples_ms.append(statistics.fmean(sum(c) / UPDATE_FREQ for c in cycles))


def part_sirfshampoo(dims: list[int], rounds: int) -> dict:
    print(
        "\n== part 2: SIRFShampoo(update_freq=10, max_dense_dim=None), one d x d matrix, dense factors ==",
        flush=True,
    )
    header = (
        f"{'d':>5} {'contender':<18} {'amortized ms':>12} {'x AdamW':>9} {'update step ms':>14} "
        f"{'plain step ms':>13}"
    )
    print(header)
    print("-" * len(header))
    points = []
    for d in dims:
        values, grads = fixed_tensors([(d, d)])
        timed = []
        for label, factory in SIRF_CONTENDERS:
            opt = factory(copies(values, grads))
            time_cycle(opt)  # warm-up: one whole cycle (state, first factor update)
            timed.append(Timed(label, opt))
        rounds_robin(timed, rounds, sample_cycles)
        base = statistics.median(timed[0].samples_ms)
        rows = []
        for t in timed:
            amortized = statistics.median(t.samples_ms)
            update = statistics.median(c[0] for c in t.cycle_steps_ms)
            plain = statistics.median(statistics.median(c[1:]) for c in t.cycle_steps_ms)
            rows.append(
                {
                    "contender": t.label,
                    "amortized_ms": amortized,
                    "amortized_min_ms": min(t.samples_ms),
                    "update_step_ms": update,
                    "plain_step_ms": plain,
                    "ratio_vs_fused_adamw": amortized / base,
                    "samples_ms": t.samples_ms,
                }
            )
            print(
                f"{d:>5} {t.label:<18} {amortized:>12.3f} {amortized / base:>8.1f}x {update:>14.3f} "
                f"{plain:>13.3f}",
                flush=True,
            )
        points.append({"d": d, "rows": rows})
        del timed, values, grads
        gc.collect()

    xs = [float(p["d"]) for p in points]
    cut = upper_half(xs)
    slopes = {}
    print(
        f"growth exponent (slope of log time vs log d): all d / from d={xs[cut]:.0f} up / the two largest; "
        "amortized (median), amortized (min), factor-update extra (update - plain step), plain step"
    )
    for label, _ in SIRF_CONTENDERS:
        rows = [next(r for r in p["rows"] if r["contender"] == label) for p in points]
        series = {
            "amortized": [r["amortized_ms"] for r in rows],
            "amortized_min": [r["amortized_min_ms"] for r in rows],
            "update_extra": [max(1e-6, r["update_step_ms"] - r["plain_step_ms"]) for r in rows],
            "plain": [r["plain_step_ms"] for r in rows],
        }
        if label == BASELINE:  # AdamW has no factor update: only its step time means something
            series = {k: series[k] for k in ("amortized", "amortized_min")}
        slopes[label] = {k: fit(xs, v, cut) for k, v in series.items()}
        print(f"  {label:<18} " + "   ".join(f"{k} {fmt_fit(v)}" for k, v in slopes[label].items()))
    return {"points": points, "slopes": slopes, "upper_from_d": xs[cut]}


# ---------------------------------------------------------------------------------------------
# Plot and main
# ---------------------------------------------------------------------------------------------


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    parts = [k for k in ("elementwise", "sirfshampoo") if k in results]
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4.5), dpi=120, squeeze=False)
    for ax, part in zip(axes[0], parts):
        data = results[part]
        if part == "elementwise":
            xs = [p["parameters"] for p in data["points"]]
            for label in data["slopes"]:
                ys = [
                    next(r["median_ms"] for r in p["rows"] if r["optimizer"] == label) for p in data["points"]
                ]
                ax.plot(
                    xs,
                    ys,
                    marker="o",
                    label=f"{label} (slope {fmt_slope(data['slopes'][label]['median']['upper'])})",
                )
            _guide(ax, xs, ys, 1, "∝ N")
            ax.set_xlabel("parameters (8 square Linear layers)")
            ax.set_title("element-wise: step time vs parameters")
        else:
            xs = [p["d"] for p in data["points"]]
            for label in data["slopes"]:
                ys = [
                    next(r["amortized_ms"] for r in p["rows"] if r["contender"] == label)
                    for p in data["points"]
                ]
                s = fmt_slope(data["slopes"][label]["amortized"]["upper"])
                ax.plot(xs, ys, marker="o", label=f"{label} (slope {s})")
            _guide(ax, xs, ys, 3, "∝ d³")
            ax.set_xlabel("d (one d x d matrix, dense factors)")
            ax.set_title("SIRFShampoo (update_freq 10): amortized step vs d")
        ax.set_xscale("log")
        ax.set_yscale("log")
        if part == "sirfshampoo":  # after set_xscale, which resets the tick locators
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylabel("ms per optimizer step (median)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _guide(ax: object, xs: list, ys: list, power: int, text: str) -> None:
    """A dashed line ∝ x**power through the last point of the last series."""
    scale = ys[-1] / xs[-1] ** power
    ax.plot(xs, [scale * x**power for x in xs], "k--", linewidth=0.8, alpha=0.6, label=text)


def parse_numbers(text: str, cast: Callable[[str], float]) -> list:
    try:
        values = [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"cannot read {text!r} as a comma-separated list of numbers") from None
    if not values or any(v <= 0 for v in values):
        raise SystemExit(f"need positive sizes, got {text!r}")
    return sorted(values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("all", "elementwise", "sirfshampoo"), default="all")
    parser.add_argument(
        "--sizes", default=None, help="part 1 parameter counts, e.g. 1e6,1e7 (default 1M..100M)"
    )
    parser.add_argument(
        "--dims", default=None, help="part 2 matrix sizes d, e.g. 128,512 (default 128..2048)"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds (default 11 / 5; --quick 3 / 2)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help="PNG path (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="sizes up to 16M, d up to 1024, fewer rounds")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    args = parser.parse_args(argv)
    sizes = parse_numbers(args.sizes, float) if args.sizes else list(QUICK_SIZES if args.quick else SIZES)
    dims = parse_numbers(args.dims, int) if args.dims else list(QUICK_DIMS if args.quick else DIMS)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be >= 1")
    rounds_1 = args.rounds or (3 if args.quick else 11)
    rounds_2 = args.rounds or (2 if args.quick else 5)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    info = step_time.machine_info(CPU)
    print(
        f"machine: {info['cpu']} | {info['usable_cpus']} usable CPUs | "
        f"torch threads {info['torch_threads']} | "
        f"torch {info['torch']} | transformers {info['transformers']} | python {info['python']}"
        + (f" | load avg {info['load_average'][0]:.2f}" if info["load_average"] else "")
    )
    t0 = time.perf_counter()
    results: dict = {}
    if args.part in ("all", "elementwise"):
        results["elementwise"] = part_elementwise(sizes, rounds_1)
    if args.part in ("all", "sirfshampoo"):
        results["sirfshampoo"] = part_sirfshampoo(dims, rounds_2)
    elapsed = time.perf_counter() - t0
    plot(results, args.plot)
    print(f"\nplot: {args.plot}")
    print(f"total benchmark time {elapsed:.1f} s")

    if args.json:
        payload = {
            "machine": info,
            "settings": {
                "sizes": sizes,
                "dims": dims,
                "rounds_elementwise": rounds_1,
                "rounds_sirfshampoo": rounds_2,
                "layers": LAYERS,
                "update_freq": UPDATE_FREQ,
                "grad_scale": GRAD_SCALE,
                "quick": args.quick,
                "plot": str(args.plot),
                "argv": sys.argv[1:] if argv is None else argv,
            },
            **results,
            "elapsed_s": elapsed,
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
