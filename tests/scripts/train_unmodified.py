"""A stock training script that knows nothing about hf_rootfree (it never imports it).

It parses ``TrainingArguments`` with ``HfArgumentParser``, trains a tiny GPT-2 on generated data
and writes what the Trainer built to ``--report_file`` as JSON. tests/test_trainer.py runs it
under ``python -m hf_rootfree`` (the ``--optim`` names are registered) and without it (the stock
parser rejects them).
"""

import json
import sys
from dataclasses import dataclass, field

import torch
from transformers import GPT2Config, GPT2LMHeadModel, HfArgumentParser, Trainer, TrainingArguments


@dataclass
class ScriptArguments:
    report_file: str = field(metadata={"help": "where to write the JSON report"})


class ArithmeticSequences(torch.utils.data.Dataset):
    """Token sequences start, start + k, start + 2k, ... (mod the vocabulary): learnable."""

    def __init__(self, n: int = 32, length: int = 16, vocab: int = 64) -> None:
        generator = torch.Generator().manual_seed(0)
        start = torch.randint(0, vocab, (n, 1), generator=generator)
        stride = torch.randint(1, 4, (n, 1), generator=generator)
        self.tokens = (start + stride * torch.arange(length)) % vocab

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def main() -> None:
    parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    script_args, training_args = parser.parse_args_into_dataclasses()
    torch.manual_seed(training_args.seed)
    config = GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    trainer = Trainer(model=GPT2LMHeadModel(config), args=training_args, train_dataset=ArithmeticSequences())
    trainer.train()
    optimizer = trainer.optimizer
    while hasattr(optimizer, "optimizer"):  # accelerate's AcceleratedOptimizer wraps the real one
        optimizer = optimizer.optimizer
    cls = type(optimizer)
    report = {
        "optimizer": f"{cls.__module__}.{cls.__qualname__}",
        "defaults": {k: v for k, v in optimizer.defaults.items() if isinstance(v, (int, float, bool, str))},
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "argv0": sys.argv[0],
        "run_name": __name__,
    }
    with open(script_args.report_file, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
