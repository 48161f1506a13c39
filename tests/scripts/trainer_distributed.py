"""Every --optim name through the stock Trainer on two processes (DDP, gloo, CPU).

Run with ``torchrun --nproc_per_node 2 trainer_distributed.py OUT``. For each name it trains a
tiny GPT-2 for 4 steps with a checkpoint at step 2, resumes a fresh Trainer from that checkpoint,
and rank 0 writes OUT/report.json: whether all ranks hold the same parameters and optimizer
state, whether the resumed run ended where the uninterrupted one did, the losses, the B the
optimizer got, the final parameters and the final optimizer state.

A second argument picks FSDP2 instead of DDP: ``fsdp2`` asks for it through TrainingArguments
(``fsdp``/``fsdp_config``), ``accelerate`` takes it from ``accelerate launch --config_file
recipes/configs/fsdp2.yaml`` (the launcher's environment); see :func:`allow_fsdp_on_cpu`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from _state import full_state, replicated_state_ranks_equal
from _teardown import leave
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import hf_rootfree  # registers the --optim names

NAMES = list(hf_rootfree.OPTIMIZERS)
#: ``ddp`` (default); ``fsdp2``: FSDP2 asked for through TrainingArguments; ``accelerate``: as set
#: up by ``accelerate launch --config_file`` (its environment variables), nothing in the script
MODE = sys.argv[2] if len(sys.argv) > 2 else "ddp"
LR = {
    "rootfree_adamw": 0.3,
    "rootfree_rmsprop": 0.03,
    "adax": 0.01,
    "rootfree_adax": 0.1,
    "sirfshampoo": 0.03,
}


class Tokens(Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(index)
        ids = torch.randint(0, 32, (16,), generator=gen)
        return {"input_ids": ids, "labels": ids.clone()}


def model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    return GPT2LMHeadModel(config)


def full_parameters(trainer: Trainer) -> torch.Tensor:
    """All parameters as one vector (DTensors gathered), the same on every rank if in sync."""
    parts = []
    for p in trainer.model.parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        parts.append(full.detach().double().reshape(-1))
    return torch.cat(parts)


#: FSDP2 through TrainingArguments (the second argument ``fsdp2``): one GPT-2 block per shard
#: unit, sharded checkpoints
FSDP2 = {
    "fsdp": "full_shard auto_wrap",
    "fsdp_config": {
        "version": 2,
        "transformer_layer_cls_to_wrap": ["GPT2Block"],
        "reshard_after_forward": True,
        "state_dict_type": "SHARDED_STATE_DICT",
    },
}


def args(out: Path, name: str, **extra) -> TrainingArguments:
    if MODE == "fsdp2":
        extra.update(FSDP2)
    return TrainingArguments(
        output_dir=str(out),
        optim=name,
        learning_rate=LR[name],
        optim_args="update_freq=2" if name == "sirfshampoo" else None,
        per_device_train_batch_size=4,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        ddp_backend="gloo",
        dataloader_num_workers=0,
        **extra,
    )


def allow_fsdp_on_cpu() -> None:
    """Let accelerate's FSDP2 path run on CPU processes (gloo).

    accelerate 1.x turns a ``fsdp_plugin`` into ``DistributedType.FSDP`` only for accelerator
    devices; on CPU it stays ``MULTI_CPU`` and the Trainer falls back to DDP, unsharded. FSDP2
    itself (``fully_shard``, DTensor, DCP) works on CPU with gloo, so the test promotes the state
    after accelerate has built it; everything after that (``fsdp2_prepare_model``, the sharded
    optimizer save and load) is accelerate's and the Trainer's own code.
    """
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    build = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs) -> None:
        build(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    if MODE != "ddp":
        allow_fsdp_on_cpu()
    report = {}
    for name in NAMES:
        first = Trainer(model=model(), args=args(out / name, name), train_dataset=Tokens())
        first.train()
        uninterrupted = full_parameters(first)
        gathered = [torch.empty_like(uninterrupted) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, uninterrupted)
        losses = [e["loss"] for e in first.state.log_history if "loss" in e]
        optimizer = first.optimizer
        while hasattr(optimizer, "optimizer"):
            optimizer = optimizer.optimizer
        state_ranks_equal, replicated_numel = replicated_state_ranks_equal(first.model, optimizer)
        state = full_state(first.model, optimizer)

        resumed = Trainer(model=model(), args=args(out / name, name), train_dataset=Tokens())
        resumed.train(resume_from_checkpoint=str(out / name / "checkpoint-2"))
        after_resume = full_parameters(resumed)
        report[name] = {
            "optimizer": type(optimizer).__name__,
            "world_size": dist.get_world_size(),
            "ranks_equal": all(torch.equal(gathered[0], g) for g in gathered),
            # under DDP every state tensor; under FSDP2 those each rank keeps whole
            "state_ranks_equal": state_ranks_equal,
            "replicated_state_numel": replicated_numel,
            "state_types": sorted({type(v).__name__ for s in optimizer.state.values() for v in s.values()}),
            "resume_max_abs_diff": float((after_resume - uninterrupted).abs().max()),
            "moved": float((uninterrupted - full_parameters_of(model())).abs().max()),
            "losses": losses,
            "batch_size": optimizer.defaults.get("batch_size"),
            "sharded_parameters": any(hasattr(p, "full_tensor") for p in first.model.parameters()),
            "checkpoint": sorted(f.name for f in (out / name / "checkpoint-2").iterdir()),
            "final": uninterrupted.tolist(),
            "final_state": state.tolist(),  # sharded state gathered from the local shards
        }
    if dist.get_rank() == 0:
        (out / "report.json").write_text(json.dumps(report, indent=2))


def full_parameters_of(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().reshape(-1) for p in module.parameters()])


if __name__ == "__main__":
    main()
    leave()  # not dist.destroy_process_group(): see _teardown.py
