"""What the three recipes share: metrics that work offline, the run record, and the model card.

Each recipe (``image_classification.py``, ``text_classification.py``, ``causal_lm.py``) is a
readable ``Trainer`` script with a ``run(argv) -> dict`` function that ``compare.py`` calls in
process, and a ``main()`` for the command line. ``run`` returns (and writes to
``<output_dir>/run_result.json``) the record built by :func:`run_record`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RECIPES_DIR = Path(__file__).resolve().parent
REPO_ROOT = RECIPES_DIR.parent
LOCAL_METRICS = RECIPES_DIR / "metrics"
CARD_TEMPLATE = REPO_ROOT / "model_cards" / "template.md"

if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing: find hf_rootfree
    sys.path.insert(0, str(REPO_ROOT))

import hf_rootfree  # noqa: E402  (registers the --optim names before any TrainingArguments)

__all__ = [
    "CardTrainer",
    "check_launch",
    "command_line",
    "hf_rootfree",
    "load_metric",
    "model_card",
    "offline",
    "redact",
    "run_record",
    "search_learning_rate",
    "write_run_record",
]


def offline() -> bool:
    """True when the Hugging Face Hub must not be contacted (``HF_HUB_OFFLINE`` and friends)."""
    from huggingface_hub import constants

    flags = (os.environ.get(v, "") for v in ("HF_EVALUATE_OFFLINE", "HF_DATASETS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any(flag.upper() in ("1", "ON", "YES", "TRUE") for flag in flags)


def load_metric(name: str) -> Any:
    """``evaluate.load(name)``, or the bundled module ``recipes/metrics/<name>`` when offline.

    ``evaluate`` fetches metric scripts from the Hub; the bundled modules compute the same
    numbers for the metrics the recipes use (accuracy, f1), so the recipes run with no network.
    """
    import evaluate

    local = LOCAL_METRICS / name
    if local.is_dir() and offline():
        return evaluate.load(str(local))
    try:
        return evaluate.load(name)
    except Exception:  # the Hub is unreachable or the script failed to download
        if local.is_dir():
            return evaluate.load(str(local))
        raise


#: flags whose values never enter a record, a log or a card
SECRET_FLAGS = ("--hub_token",)


def redact(argv: Sequence[str]) -> list[str]:
    """``argv`` with the values of secret flags (``--hub_token x`` or ``--hub_token=x``) hidden."""
    out, hide = [], False
    for arg in argv:
        if hide:
            out.append("<redacted>")
            hide = False
        elif arg in SECRET_FLAGS:
            out.append(arg)
            hide = True
        elif arg.split("=", 1)[0] in SECRET_FLAGS:
            out.append(arg.split("=", 1)[0] + "=<redacted>")
        else:
            out.append(arg)
    return out


def check_launch(training_args: Any) -> None:
    """Refuse a multi-process launch in which the processes would not train together.

    ``accelerate launch`` with a multi-GPU config on a machine without GPUs starts the processes,
    but without ``--use_cpu`` the Trainer sets up no process group: each process would train alone
    on all the data and write the same output directory.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and training_args.world_size == 1:
        raise ValueError(
            f"this recipe was launched as {launched} processes, but the Trainer is not distributed "
            "(no GPU was found, so it set up no process group). To train on CPU processes pass "
            "--use_cpu true --ddp_backend gloo; to train on one process, launch one."
        )


def command_line(argv: Sequence[str], script: str) -> str:
    """The shell command that reruns this recipe with these arguments (secrets redacted).

    Under ``accelerate launch`` (or ``torchrun``) with several processes it is the ``accelerate
    launch`` command with the process count, mixed precision and FSDP version the launcher set.
    """
    launcher = ["python"]
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1:
        launcher = ["accelerate", "launch", "--num_processes", str(processes)]
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            launcher += ["--use_fsdp", "--fsdp_version", os.environ.get("FSDP_VERSION", "1")]
        else:
            launcher.append("--multi_gpu")
        precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if precision != "no":
            launcher += ["--mixed_precision", precision]
    return " ".join([*launcher, f"recipes/{script}", *(shlex.quote(a) for a in redact(argv))])


def run_record(
    trainer: Any,
    *,
    task: str,
    model_name: str,
    dataset_name: str,
    metric_name: str,
    eval_metrics: dict[str, float],
    command: str,
    pretrained: str | None = None,
) -> dict[str, Any]:
    """What a run did and reached: the input of ``compare.py``'s tables, plots and model cards."""
    from hf_rootfree.registry import OPTIMIZERS

    args = trainer.args
    optim = str(getattr(args.optim, "value", args.optim))
    optimizer = trainer.optimizer
    while hasattr(optimizer, "optimizer"):  # accelerate's AcceleratedOptimizer wraps the real one
        optimizer = optimizer.optimizer
    hyper = {}
    if optimizer is not None:  # the first group: the Trainer's decay group, with the real weight decay
        hyper = {
            k: _plain(v) for k, v in optimizer.param_groups[0].items() if k not in ("params", "initial_lr")
        }
    return {
        "task": task,
        "model": model_name,
        "pretrained": pretrained,
        "dataset": dataset_name,
        "metric": metric_name,
        "optim": optim,
        "optimizer_class": type(optimizer).__name__ if optimizer is not None else None,
        "hf_rootfree": optim in OPTIMIZERS,
        "optim_args": args.optim_args,
        "hyperparameters": hyper,
        "learning_rate": args.learning_rate,
        "weight_decay": args.weight_decay,
        "seed": args.seed,
        "max_steps": trainer.state.max_steps,
        "global_batch_size": hf_rootfree.registry.global_batch_size(args),
        "eval_metrics": {k: float(v) for k, v in eval_metrics.items()},
        "log_history": trainer.state.log_history,
        "train_runtime": next(
            (e["train_runtime"] for e in reversed(trainer.state.log_history) if "train_runtime" in e), None
        ),
        "output_dir": str(args.output_dir),
        "command": command,
    }


def _plain(value: Any) -> Any:
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def write_run_record(record: dict[str, Any], trainer: Any) -> Path:
    """Write ``run_result.json`` into the output directory, from the main process only."""
    path = Path(record["output_dir"]) / "run_result.json"
    if trainer.is_world_process_zero():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Model cards
# ---------------------------------------------------------------------------------------------

_TASK_TYPES = {
    "image-classification": "image-classification",
    "text-classification": "text-classification",
    "causal-lm": "text-generation",
}
#: where the recipes' offline default data come from, and under which licence (the card says it)
DATA_LICENCES = {
    "sklearn-digits": "scikit-learn's copy of the UCI Optical Recognition of Handwritten Digits test "
    "set (E. Alpaydin and C. Kaynak), CC BY 4.0",
    "generated-sentiment": "generated by the hf_rootfree recipes (recipes/text_data.py), Apache-2.0",
    "generated-grammar": "generated by the hf_rootfree recipes (recipes/text_data.py), Apache-2.0",
}


def model_card(
    record: dict[str, Any],
    *,
    comparison: list[dict[str, Any]] | None = None,
    plots: Sequence[str] = (),
    reproduce: str | None = None,
) -> Any:
    """Render ``model_cards/template.md`` for one run with ``huggingface_hub.ModelCard``.

    ``comparison`` holds rows ``{"optim", "metric_mean", "metric_std", "loss_mean", "seeds"}`` of
    the same task (from ``compare.py``); ``plots`` are file names next to the card; ``reproduce``
    is the command to rerun (defaults to the run's own command). Hub tokens never enter a card.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    metric = record["metric"]
    value = record["eval_metrics"].get(f"eval_{metric}")
    eval_results = []
    if value is not None and math.isfinite(value):
        eval_results.append(
            EvalResult(
                task_type=_TASK_TYPES.get(record["task"], record["task"]),
                dataset_type=record["dataset"],
                dataset_name=record["dataset"],
                dataset_split="validation",
                metric_type=metric,
                metric_name=metric,
                metric_value=round(float(value), 6),
            )
        )
    name = Path(record["output_dir"]).name
    data = ModelCardData(
        model_name=name,
        base_model=record.get("pretrained") or None,
        datasets=None,
        eval_results=eval_results or None,
        library_name="transformers",
        pipeline_tag=_TASK_TYPES.get(record["task"]),
        tags=["hf_rootfree", f"optimizer:{record['optim']}", record["task"]],
        metrics=[metric],
        license="apache-2.0",
    )
    hyper_rows = sorted((k, json.dumps(v)) for k, v in record["hyperparameters"].items())
    return ModelCard.from_template(
        data,
        template_path=str(CARD_TEMPLATE),
        name=name,
        record=record,
        hyperparameters=hyper_rows,
        comparison=comparison or [],
        plots=list(plots),
        reproduce=reproduce or record["command"],
        hf_rootfree_version=hf_rootfree.__version__,
        data_licence=DATA_LICENCES.get(record["dataset"]),
    )


# ---------------------------------------------------------------------------------------------
# A Trainer whose model card is ours
# ---------------------------------------------------------------------------------------------

from transformers import Trainer  # noqa: E402

#: set by :func:`search_learning_rate` while a recipe runs in learning-rate-search mode
_LR_SEARCH: dict[str, Any] | None = None


class _SearchFinished(Exception):
    def __init__(self, learning_rate: float) -> None:
        super().__init__(learning_rate)
        self.learning_rate = learning_rate


def search_learning_rate(
    run: Any, argv: Sequence[str], *, n_trials: int, metric: str, maximize: bool
) -> float:
    """Search the learning rate of a recipe with ``Trainer.hyperparameter_search`` (optuna).

    Runs ``run(argv)`` with :class:`CardTrainer` in search mode: instead of training once, its
    ``train()`` runs ``n_trials`` trials with learning rates log-uniform in [lr/10, 10·lr] around
    the ``--learning_rate`` in ``argv`` (the model is re-created from its initial weights for each
    trial), objective: ``eval_<metric>`` (the eval loss where the run does not report it).
    Returns the best rate.
    """
    global _LR_SEARCH
    _LR_SEARCH = {"n_trials": n_trials, "direction": "maximize" if maximize else "minimize", "metric": metric}
    try:
        run(list(argv))
    except _SearchFinished as done:
        return done.learning_rate
    finally:
        _LR_SEARCH = None
    raise RuntimeError("the recipe finished without training, so no learning-rate search ran")


class CardTrainer(Trainer):
    """The stock ``Trainer``, except that its model card is ``model_cards/template.md``.

    Set ``trainer.card_record`` (from :func:`run_record`) after evaluation; ``create_model_card``
    (called by ``push_to_hub``, so ``--push_to_hub`` uploads our card) then writes
    ``<output_dir>/README.md`` from it. Without a record it falls back to the stock card.
    Under :func:`search_learning_rate`, ``train()`` runs the search instead.
    """

    card_record: dict[str, Any] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if _LR_SEARCH is not None and self.model_init is None:
            initial = copy.deepcopy(self.model).cpu()
            self.model_init = lambda trial=None: copy.deepcopy(initial)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        if _LR_SEARCH is None or kwargs.get("trial") is not None:
            return super().train(*args, **kwargs)
        center, key = self.args.learning_rate, _LR_SEARCH["metric"]
        best = self.hyperparameter_search(
            hp_space=lambda trial: {
                "learning_rate": trial.suggest_float("learning_rate", center / 10, center * 10, log=True)
            },
            n_trials=_LR_SEARCH["n_trials"],
            direction=_LR_SEARCH["direction"],
            compute_objective=lambda metrics: metrics.get(f"eval_{key}", metrics["eval_loss"]),
            backend="optuna",
        )
        raise _SearchFinished(float(best.hyperparameters["learning_rate"]))

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        if self.card_record is None:
            return super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            path = Path(self.args.output_dir) / "README.md"
            path.parent.mkdir(parents=True, exist_ok=True)
            model_card(self.card_record).save(str(path))
        return None
