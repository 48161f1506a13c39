"""recipes/compare.py, the main job: end to end on a tiny budget, offline.

Each test name is a claim. One comparison run (two tasks, two optimizers, two seeds, a few steps)
is shared by the module; the recipes themselves are tested in ``test_recipe_*.py`` (the MiniLM
fine-tuning of the text-classification default there: it is too slow for four runs here).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

import compare  # noqa: E402

TINY = [
    "--",
    "--eval_steps",
    "2",
    "--logging_steps",
    "1",
    "--disable_tqdm",
    "true",
    "--max_eval_samples",
    "96",
]
OPTIMIZERS = ["adamw_torch_fused", "sirfshampoo"]
TASKS = ("image-classification", "causal-lm")
METRIC = {"image-classification": "accuracy", "causal-lm": "perplexity"}


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    argv = [
        "--tasks",
        ",".join(TASKS),
        "--optimizers",
        ",".join(OPTIMIZERS),
        "--seeds",
        "2",
        "--max_steps",
        "4",
        "--output_dir",
        str(out),
        *TINY,
    ]
    results = compare.main(argv)
    return out, results


def test_writes_results_json_markdown_plots_and_a_card_per_run(comparison):
    out, _ = comparison
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["runs"]) == 2 * len(OPTIMIZERS) * 2  # tasks × optimizers × seeds
    assert {(r["task"], r["optim"]) for r in saved["summary"]} == {
        (task, optim) for task in TASKS for optim in OPTIMIZERS
    }
    assert saved["seeds"] == [42, 43]
    for row in saved["summary"]:
        assert row["seeds"] == 2 and math.isfinite(row["metric_mean"]) and math.isfinite(row["loss_mean"])
    table = (out / "results.md").read_text()
    for optim in OPTIMIZERS:
        assert f"| {optim} |" in table
    assert "± " in table and "python recipes/compare.py" in table
    assert "| vs adamw_torch_fused |" in table and "×" in table  # perplexity as a ratio to AdamW's
    for task in TASKS:
        for name in (f"{task}_loss.png", f"{task}_{METRIC[task]}.png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        for optim in OPTIMIZERS:
            for seed in (42, 43):
                run_dir = out / task / optim / f"seed{seed}"
                assert (run_dir / "README.md").is_file() and (run_dir / "run_result.json").is_file()
                assert (run_dir / f"{task}_loss.png").is_file()  # the card's images travel with it


def test_same_seed_gives_same_data_and_initial_model_for_every_optimizer(comparison):
    _, results = comparison
    runs = results["runs"]
    for task in TASKS:
        for seed in (42, 43):
            first_losses = {
                r["optim"]: next(e["loss"] for e in r["log_history"] if "loss" in e)
                for r in runs
                if r["task"] == task and r["seed"] == seed
            }
            # step 1's loss is computed before any update: same model, same batch
            assert len(set(first_losses.values())) == 1, first_losses


def test_model_card_is_valid_hub_metadata_with_results_and_comparison(comparison):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

    _, results = comparison
    run = next(r for r in results["runs"] if r["optim"] == "sirfshampoo")
    card = ModelCard.load(Path(run["output_dir"]) / "README.md")
    data = card.data
    assert "hf_rootfree" in data.tags and "optimizer:sirfshampoo" in data.tags
    (result,) = data.eval_results
    assert result.metric_type == "accuracy"
    assert result.metric_value == pytest.approx(run["eval_metrics"]["eval_accuracy"], abs=1e-6)
    # the metadata survives the Hub's own model-index conversion both ways
    index = eval_results_to_model_index(data.model_name, data.eval_results)
    name, parsed = model_index_to_eval_results(index)
    assert name == data.model_name and parsed[0].metric_value == result.metric_value
    yaml.safe_load(card.content.split("---")[1])  # the front matter is plain YAML
    text = card.text
    assert "## Comparison" in text and "(this model)" in text
    for optim in OPTIMIZERS:
        assert f"| {optim}" in text
    assert "precond_lr" in text  # every optimizer hyperparameter is listed
    assert "accelerate launch --config_file" in text and "python recipes/image_classification.py" in text


def test_presets_cover_the_default_optimizers_with_provenance():
    presets = compare.load_presets(compare.PRESETS)
    for task in compare.TASKS:
        for optim in compare.DEFAULT_OPTIMIZERS:
            if optim in compare.CNN_ONLY and task != "image-classification":
                continue
            preset = presets[task][optim]
            assert preset["learning_rate"] > 0 and preset["weight_decay"] >= 0
            assert preset["source"], (task, optim)


def test_every_adaptive_preset_is_the_recipes_own_adamw_configuration():
    import common

    presets = compare.load_presets(compare.PRESETS)
    for task, spec in compare.TASKS.items():
        config = common.recipe_defaults(spec.module)  # what the recipe runs with no flags
        assert config["optim"] == compare.BASELINE
        for optim, preset in presets[task].items():
            if optim == "sgd":
                continue
            same = (preset["learning_rate"], preset["weight_decay"], preset.get("optim_args"))
            assert same == (config["learning_rate"], config["weight_decay"], None), (task, optim)


def test_sgd_is_a_baseline_for_the_cnn_task_only_and_extra_names_are_added():
    args, _ = compare.parse_args(["--extra_optimizers", "adax,rootfree_adax"])
    assert compare.optimizers_for("image-classification", args) == [
        "adamw_torch_fused",
        "muon",
        "sgd",
        "rootfree_adamw",
        "sirfshampoo",
        "adax",
        "rootfree_adax",
    ]
    assert "sgd" not in compare.optimizers_for("text-classification", args)


def test_arguments_after_the_separator_reach_every_recipe_run_and_win():
    args, passthrough = compare.parse_args(["--max_steps", "7", "--", "--max_steps", "9", "--bf16"])
    argv = compare.run_argv("causal-lm", "adax", 42, args, compare.load_presets(compare.PRESETS), passthrough)
    assert argv[-3:] == ["--max_steps", "9", "--bf16"]
    assert argv[argv.index("--optim") + 1] == "adax" and argv[argv.index("--seed") + 1] == "42"


def test_unknown_task_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        compare.parse_args(["--tasks", "image-classification,translation"])
    assert "unknown task(s) translation" in capsys.readouterr().err


def test_tune_runs_trainer_hyperparameter_search_and_uses_the_best_learning_rate(tmp_path, monkeypatch):
    optuna = pytest.importorskip("optuna")
    # the eval loss as objective: a continuous value, so exactly one trial is best
    spec = compare.TASKS["image-classification"]
    monkeypatch.setitem(
        compare.TASKS, "image-classification", spec._replace(metric="loss", higher_is_better=False)
    )
    studies = []
    create_study = optuna.create_study

    def recording_create_study(*args, **kwargs):
        studies.append(create_study(*args, **kwargs))
        return studies[-1]

    monkeypatch.setattr(optuna, "create_study", recording_create_study)
    results = compare.main(
        [
            "--tasks",
            "image-classification",
            "--optimizers",
            "rootfree_adamw",
            "--seeds",
            "1",
            "--max_steps",
            "2",
            "--tune",
            "3",
            "--output_dir",
            str(tmp_path),
            *TINY,
        ]
    )
    (best,) = results["tuned_learning_rates"].values()
    (study,) = studies
    trials = {t.params["learning_rate"]: t.value for t in study.trials}
    preset = compare.load_presets(compare.PRESETS)["image-classification"]["rootfree_adamw"]["learning_rate"]
    assert len(trials) == 3 and all(preset / 10 <= lr <= preset * 10 for lr in trials)
    assert len(set(trials.values())) == 3, trials  # the trials differ: picking the best means something
    assert best == min(trials, key=trials.get)
    assert results["runs"][0]["learning_rate"] == pytest.approx(best)
