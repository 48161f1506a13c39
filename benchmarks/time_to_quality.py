"""Steps and seconds each optimizer needs to reach AdamW's final eval metric on the recipe tasks.

Tasks (offline, built from configs, the recipes' default step budgets): ``image-classification``
(``recipes/image_classification.py``: tiny ConvNeXt on MNIST-5k, accuracy, higher is better) and
``causal-lm`` (``recipes/causal_lm.py``: tiny GPT-2 on the Grimm tales, perplexity, lower is
better). NOTE: the numbers recorded in ``benchmarks/README.md`` were measured when these recipes
trained on scikit-learn's digits and generated sentences. Optimizers: ``adamw_torch_fused`` (the
baseline), ``sgd`` (image
task only, the paper's CNN baseline), ``rootfree_adamw`` and ``sirfshampoo``, each with its preset
from ``recipes/configs/presets.yaml`` (learning rate, weight decay, ``--optim_args``; loaded with
``compare.load_presets`` / ``compare.preset_argv``, as ``recipes/compare.py`` does).

Method: each run is the recipe's ``run(argv)`` with ``--eval_strategy steps --eval_steps 20``,
the same seed for every optimizer (one seed by default; ``--seeds N`` runs seeds 42, 43, …),
interleaved over the optimizers. The target of a seed is AdamW's final eval metric in that seed
(the recipe's ``trainer.evaluate()`` after training); ``--tolerance t`` relaxes it to
(1 - t) x AdamW's accuracy or (1 + t) x AdamW's perplexity. The table also shows each optimizer's
best evaluation and its step. For every optimizer the first evaluation
that reaches it (accuracy >= target, perplexity <= target) gives the steps, and the training
wall-clock seconds up to that step with the evaluations taken out: a ``TrainerCallback``
(``trainer_throughput.StepClock``) notes the end of every step and of every evaluation, and each
evaluation's duration (its end minus the end of its step) is subtracted. Optimizers that never
get there are reported as "not reached". Evaluation is every 20 steps, so steps are resolved to
20 and seconds to 20 steps' worth. The recipes run their tiny models on one thread.

Usage::

    python benchmarks/time_to_quality.py                    # ~1 minute per seed on 2 cores
    python benchmarks/time_to_quality.py --seeds 3 --json ttq.json
    python benchmarks/time_to_quality.py --seeds 3 --tolerance 0.01    # within 1% of AdamW
    python benchmarks/time_to_quality.py --quick            # 60 steps per run: a smoke test
    python benchmarks/time_to_quality.py --tasks causal-lm --optimizers adamw_torch_fused,adax
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
for _path in (BENCH_DIR, BENCH_DIR.parent / "recipes"):  # trainer_throughput; compare and the recipes
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import compare  # noqa: E402  (recipes/compare.py: TASKS, presets; registers the --optim names)
import trainer_throughput  # noqa: E402
from trainer_throughput import StepClock, clocked  # noqa: E402

BASELINE = compare.BASELINE
TASKS = ("image-classification", "causal-lm")
OPTIMIZERS = ("adamw_torch_fused", "sgd", "rootfree_adamw", "sirfshampoo")
EVAL_STEPS = 20
QUICK_STEPS = 60


def optimizers_for(task: str, names: list[str]) -> list[str]:
    out = [n for n in names if n not in compare.CNN_ONLY or task == "image-classification"]
    return [BASELINE, *(n for n in out if n != BASELINE)]


def one_run(task: str, optim: str, seed: int, presets: dict, max_steps: int | None) -> dict[str, Any]:
    module, metric = compare.TASKS[task].module, compare.TASKS[task].metric
    recipe = compare.recipe(task)
    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="ttq_") as output_dir:
        argv = ["--output_dir", output_dir, "--optim", optim, "--seed", str(seed)]
        argv += compare.preset_argv(presets, task, optim)
        argv += ["--eval_strategy", "steps", "--eval_steps", str(EVAL_STEPS), "--save_strategy", "no"]
        argv += ["--disable_tqdm", "true", "--report_to", "none"]
        if max_steps is not None:
            argv += ["--max_steps", str(max_steps)]
        start = time.perf_counter()
        with clocked(clock):
            record = recipe.run(argv)
        wall = time.perf_counter() - start

    key = f"eval_{metric}"
    # evaluations during training: the first log entry with the metric at each step
    curve: dict[int, float] = {}
    for entry in record["log_history"]:
        if key in entry and entry["step"] not in curve:
            curve[entry["step"]] = float(entry[key])
    eval_end: dict[int, float] = {}
    for step, t in clock.evaluations:
        eval_end.setdefault(step, t)
    eval_seconds = {s: eval_end[s] - clock.step_end[s] for s in eval_end if s in clock.step_end}
    train_seconds = {}
    for step in curve:
        if step in clock.step_end:
            taken_out = sum(v for s, v in eval_seconds.items() if s < step)
            train_seconds[step] = clock.step_end[step] - clock.start - taken_out
    final = float(record["eval_metrics"][key])
    last = max(clock.step_end)
    return {
        "task": task,
        "optim": optim,
        "seed": seed,
        "command": shlex.join([f"recipes/{module}.py", *argv[2:]]),  # output_dir left out
        "learning_rate": record["learning_rate"],
        "weight_decay": record["weight_decay"],
        "optim_args": record["optim_args"],
        "final_metric": final,
        "curve": [
            {"step": s, "metric": curve[s], "train_seconds": train_seconds.get(s)} for s in sorted(curve)
        ],
        "train_seconds_total": clock.step_end[last]
        - clock.start
        - sum(eval_seconds.get(s, 0.0) for s in curve if s < last),
        "steps": last,
        "run_wall_seconds": wall,
    }


def reach(run: dict[str, Any], target: float, higher: bool) -> dict[str, Any] | None:
    for point in run["curve"]:
        value = point["metric"]
        if math.isfinite(value) and (value >= target if higher else value <= target):
            return point
    return None


def best_point(run: dict[str, Any], higher: bool) -> dict[str, Any]:
    """The best evaluation of a run (the first one, if tied)."""
    finite = [p for p in run["curve"] if math.isfinite(p["metric"])] or run["curve"]
    return (max if higher else min)(finite, key=lambda p: p["metric"])


def summarize(task: str, runs: list[dict[str, Any]], names: list[str], tolerance: float) -> dict[str, Any]:
    metric, higher = compare.TASKS[task].metric, compare.TASKS[task].higher_is_better
    seeds = sorted({r["seed"] for r in runs})
    slack = (1 - tolerance) if higher else (1 + tolerance)
    targets = {
        s: slack * next(r for r in runs if r["seed"] == s and r["optim"] == BASELINE)["final_metric"]
        for s in seeds
    }
    rows = []
    for optim in names:
        mine = [r for r in runs if r["optim"] == optim]
        hits = []
        for r in mine:
            point = reach(r, targets[r["seed"]], higher)
            r["reached"] = point
            hits.append(point)
        reached = [h for h in hits if h is not None]
        rows.append(
            {
                "optim": optim,
                "final_metric_median": statistics.median(r["final_metric"] for r in mine),
                "best_metric_median": statistics.median(best_point(r, higher)["metric"] for r in mine),
                "best_step_median": statistics.median(best_point(r, higher)["step"] for r in mine),
                "reached": len(reached),
                "seeds": len(mine),
                "median_steps": statistics.median(h["step"] for h in reached) if reached else None,
                "median_train_seconds": statistics.median(h["train_seconds"] for h in reached)
                if reached
                else None,
                "seconds_per_step": statistics.median(r["train_seconds_total"] / r["steps"] for r in mine),
                "per_seed": [
                    {
                        "seed": r["seed"],
                        "target": targets[r["seed"]],
                        "final": r["final_metric"],
                        "reached": h,
                    }
                    for r, h in zip(mine, hits)
                ],
            }
        )
    base = next(r for r in rows if r["optim"] == BASELINE)
    for row in rows:
        for field, out in (("median_steps", "steps_vs_adamw"), ("median_train_seconds", "seconds_vs_adamw")):
            row[out] = row[field] / base[field] if row[field] is not None and base[field] else None

    better = ">=" if higher else "<="
    target_text = ", ".join(f"seed {s}: {t:.4f}" for s, t in targets.items())
    within = f" x {slack:g}" if tolerance else ""
    print(f"\n== {task}: target = AdamW's final eval {metric}{within} ({better}; {target_text}) ==")
    header = (
        f"{'optimizer':<18} {'final ' + metric:>16} {'best (step)':>16} {'reached':>8} {'steps':>11} "
        f"{'train s':>8} {'x AdamW steps':>13} {'x AdamW s':>9} {'ms/step':>8}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        steps = "not reached" if row["median_steps"] is None else str(round(row["median_steps"]))
        seconds = _fmt(row["median_train_seconds"], "{:.1f}")
        print(
            f"{row['optim']:<18} {row['final_metric_median']:>16.4f} "
            f"{row['best_metric_median']:>9.4f} ({row['best_step_median']:>4.0f}) "
            f"{row['reached']:>4}/{row['seeds']:<3} "
            f"{steps:>11} {seconds:>8} {_fmt(row['steps_vs_adamw'], '{:.2f}x'):>13} "
            f"{_fmt(row['seconds_vs_adamw'], '{:.2f}x'):>9} {row['seconds_per_step'] * 1e3:>8.1f}"
        )
    print(
        "(medians over seeds; steps, train s: over the seeds that reached the target; train s excludes "
        "evaluation; best: the best evaluation of the run)"
    )
    return {
        "task": task,
        "metric": metric,
        "higher_is_better": higher,
        "tolerance": tolerance,
        "targets": targets,
        "rows": rows,
    }


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}"
    )
    parser.add_argument(
        "--optimizers",
        default=",".join(OPTIMIZERS),
        help="comma-separated --optim names (adamw_torch_fused is always run; sgd on the image task only)",
    )
    parser.add_argument("--seeds", type=int, default=1, help="seeds 42, 43, … (default 1)")
    parser.add_argument("--max_steps", type=int, default=None, help="step budget (default: the recipe's)")
    parser.add_argument(
        "--presets", type=Path, default=compare.PRESETS, help="presets file (default: %(default)s)"
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help="relative slack on the target: accuracy >= (1 - t) x AdamW's, perplexity <= (1 + t) x "
        "AdamW's (default 0: AdamW's final exactly)",
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps per run, one seed")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    args = parser.parse_args(argv)
    tasks = trainer_throughput.step_time.parse_list(args.tasks, TASKS, "task")
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    if not 0 <= args.tolerance < 1:
        parser.error("--tolerance must be in [0, 1)")
    if args.quick:
        args.seeds = 1
        args.max_steps = args.max_steps or QUICK_STEPS
    presets = compare.load_presets(args.presets)

    import torch

    trainer_throughput.quiet_libraries()
    info = trainer_throughput.step_time.machine_info(torch.device("cpu"))
    trainer_throughput.print_machine(info)
    print(
        f"method: recipe presets ({args.presets.name}), eval every {EVAL_STEPS} steps, "
        f"{'the recipe budget' if args.max_steps is None else f'{args.max_steps} steps'}, seeds "
        f"{', '.join(str(42 + i) for i in range(args.seeds))}; optimizers interleaved per seed"
    )

    t0 = time.perf_counter()
    results = []
    all_runs = []
    for task in tasks:
        order = optimizers_for(task, names)
        runs = []
        for i in range(args.seeds):
            seed = 42 + i
            shift = i % len(order)
            for optim in order[shift:] + order[:shift]:  # rotate the order from seed to seed
                run = one_run(task, optim, seed, presets, args.max_steps)
                runs.append(run)
                print(
                    f"  {task} seed {seed} {optim:<18} final {run['final_metric']:.4f} "
                    f"after {run['steps']} steps, "
                    f"{run['train_seconds_total']:.1f} s training ({run['run_wall_seconds']:.1f} s run)",
                    flush=True,
                )
        results.append(summarize(task, runs, order, args.tolerance))
        all_runs += runs
    elapsed = time.perf_counter() - t0
    print(f"\ntotal benchmark time {elapsed:.1f} s")

    if args.json:
        payload = {
            "machine": info,
            "settings": {
                "seeds": args.seeds,
                "max_steps": args.max_steps,
                "eval_steps": EVAL_STEPS,
                "tolerance": args.tolerance,
                "presets": str(args.presets),
                "quick": args.quick,
                "argv": sys.argv[1:] if argv is None else argv,
            },
            "tasks": results,
            "runs": all_runs,
            "elapsed_s": elapsed,
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2, default=str)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
