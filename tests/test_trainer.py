"""The Hugging Face Trainer integration, end to end with the stock Trainer (CPU, offline).

Every test builds tiny BERT/GPT-2 models from configs and trains them on generated data, so the
file needs no network and no GPU. Each test states one claim of the integration in its name.
"""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from optim_db import CLASSES, NAMES
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.training_args import OptimizerNames

import hf_rootfree
from hf_rootfree import RootFreeAdamW
from hf_rootfree.callbacks import RootFreeDiagnosticsCallback

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve().parent / "scripts" / "train_unmodified.py"

#: names whose optimizer takes batch_size (B); AdaX does not
WITH_BATCH_SIZE = {"rootfree_adamw", "rootfree_rmsprop", "rootfree_adax", "sirfshampoo"}
#: learning rates under which the tiny models learn within a few dozen steps. The root-free
#: methods start SGD-like (s0 = 1, step ≈ η·g) with the small gradients of BERT/GPT-2's 0.02-std
#: initialization, so they need larger η than AdaX; RootFreeRMSprop's heavy ball sums (≈ 10×).
#: the learning rate per name, in AdamW's units (the root-free defaults): 1e-2 trains these tiny
#: models in 60 steps; SIRFShampoo's BERT diverges late at a constant 1e-2, so it gets 3e-3
LR = {
    "rootfree_adamw": 1e-2,
    "rootfree_rmsprop": 1e-2,
    "adax": 1e-2,
    "rootfree_adax": 1e-2,
    "sirfshampoo": 3e-3,
}
#: a valid --optim_args string per name
OPTIM_ARGS = {
    "rootfree_adamw": "damping=1e-3,betas=(0.8,0.99),bias_correction=false",
    "rootfree_rmsprop": "alpha=0.95,momentum=0.5,damping=1e-3",
    "adax": "eps=1e-10,betas=(0.8,1e-3)",
    "rootfree_adax": "prior_steps=2,damping=1e-3,state_dtype=float32",
    "sirfshampoo": "damping=1e-4,precond_lr=0.05,update_freq=2,structures=(dense,diagonal)",
}
VOCAB = 64


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Nothing here may reach the Hub: tiny models are built from configs."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------------------------------------
# Tiny models, generated data, arguments
# ---------------------------------------------------------------------------------------------


class SeparableTokens(torch.utils.data.Dataset):
    """Sequence classification: class 0 uses tokens 1..31, class 1 tokens 32..62."""

    def __init__(self, n: int = 64, length: int = 16, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 2
        self.tokens = torch.randint(1, 32, (n, length), generator=generator) + 31 * self.labels[:, None]

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        tokens = self.tokens[i]
        return {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": self.labels[i]}


class ArithmeticSequences(torch.utils.data.Dataset):
    """Causal LM: start, start + k, start + 2k, ... (mod the vocabulary)."""

    def __init__(self, n: int = 64, length: int = 16, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=generator)
        stride = torch.randint(1, 4, (n, 1), generator=generator)
        self.tokens = (start + stride * torch.arange(length)) % VOCAB

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    return BertForSequenceClassification(config)


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


MODELS = {"bert": (tiny_bert, SeparableTokens), "gpt2": (tiny_gpt2, ArithmeticSequences)}


def make_args(output_dir: Path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(output_dir),
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        save_strategy="no",
        per_device_train_batch_size=8,
        logging_steps=5,
        seed=0,
        data_seed=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def make_trainer(kind: str, output_dir: Path, model=None, **overrides) -> Trainer:
    build_model, dataset = MODELS[kind]
    args = make_args(output_dir, **overrides)
    return Trainer(model=model if model is not None else build_model(), args=args, train_dataset=dataset())


def base_optimizer(optimizer) -> torch.optim.Optimizer:
    """The optimizer the Trainer built, without accelerate's AcceleratedOptimizer wrapper."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def logged_losses(trainer: Trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


# ---------------------------------------------------------------------------------------------
# 1. The names are accepted everywhere TrainingArguments are made; built-in names still work.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_training_arguments_accept_every_hf_rootfree_name(tmp_path, name):
    args = make_args(tmp_path, optim=name)
    assert args.optim is OptimizerNames(name)
    assert args.optim.value == name
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert cls is CLASSES[name]
    assert kwargs["lr"] == args.learning_rate


@pytest.mark.parametrize("name", NAMES)
def test_hf_argument_parser_accepts_every_name_with_optim_args(tmp_path, name):
    parser = HfArgumentParser(TrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "--optim", name, "--optim_args", OPTIM_ARGS[name]]
    )
    assert args.optim is OptimizerNames(name)
    assert args.optim_args == OPTIM_ARGS[name]
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert cls is CLASSES[name]
    assert kwargs == hf_rootfree.optimizer_cls_and_kwargs(name, args)[1]
    assert kwargs.items() >= hf_rootfree.parse_optim_args(name, OPTIM_ARGS[name]).items()


@pytest.mark.parametrize(
    ("name", "torch_cls", "expected_kwargs"),
    [
        ("adamw_torch", torch.optim.AdamW, {"fused": None, "foreach": None}),
        ("adamw_torch_fused", torch.optim.AdamW, {"fused": True}),
        ("sgd", torch.optim.SGD, {}),
    ],
)
def test_builtin_optim_names_still_build_torch_optimizers(tmp_path, name, torch_cls, expected_kwargs):
    args = make_args(tmp_path, optim=name, learning_rate=1e-3)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert cls is torch_cls
    assert kwargs["lr"] == 1e-3
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=SeparableTokens())
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is torch_cls
    for key, value in expected_kwargs.items():
        assert optimizer.defaults[key] == value, key


def test_register_is_idempotent_one_enum_member_per_name_and_no_double_wrap():
    from hf_rootfree.integrations import transformers as integration

    hf_rootfree.register()
    before = Trainer.__dict__["get_optimizer_cls_and_kwargs"]
    hf_rootfree.register()
    integration.register()
    after = Trainer.__dict__["get_optimizer_cls_and_kwargs"]

    assert after is before, "a second register() replaced the wrapped method"
    assert isinstance(after, staticmethod)
    wrapper = after.__func__
    assert getattr(wrapper, "__hf_rootfree_wrapped__", False)
    original = wrapper.__wrapped__
    assert not getattr(original, "__hf_rootfree_wrapped__", False), "the wrapper wraps a wrapper"
    assert not hasattr(original, "__wrapped__")

    choices = HfArgumentParser(TrainingArguments)._option_string_actions["--optim"].choices
    for name in NAMES:
        assert OptimizerNames._member_names_.count(name.upper()) == 1
        assert [m for m in OptimizerNames if m.value == name] == [OptimizerNames[name.upper()]]
        assert OptimizerNames(name) is OptimizerNames[name.upper()]
        assert list(choices).count(name) == 1
    # built-in members are untouched and still unique
    assert len(set(OptimizerNames._member_names_)) == len(OptimizerNames._member_names_)
    assert OptimizerNames("adamw_torch") is OptimizerNames.ADAMW_TORCH


# ---------------------------------------------------------------------------------------------
# 2. Each name trains through the stock Trainer; the optimizer is built from TrainingArguments.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
@pytest.mark.parametrize("name", NAMES)
def test_each_name_trains_tiny_model_through_stock_trainer_and_loss_falls(tmp_path, name, kind):
    trainer = make_trainer(
        kind,
        tmp_path,
        optim=name,
        learning_rate=LR[name],
        max_steps=60,
        weight_decay=0.01,
        lr_scheduler_type="constant",
    )
    trainer.train()

    assert type(base_optimizer(trainer.optimizer)) is CLASSES[name]
    losses = logged_losses(trainer)
    assert len(losses) == 12
    assert all(math.isfinite(loss) for loss in losses), losses
    # BERT's separable task is learned almost perfectly; GPT-2's sequences need longer
    factor = 0.5 if kind == "bert" else 0.75
    assert losses[-1] < factor * losses[0], losses


@pytest.mark.parametrize("name", NAMES)
def test_optimizer_gets_lr_batch_size_and_betas_from_training_arguments(tmp_path, name):
    args = make_args(
        tmp_path,
        optim=name,
        learning_rate=3e-3,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=3,
        adam_beta1=0.8,
        adam_beta2=0.95,
    )
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=ArithmeticSequences())
    optimizer = trainer.create_optimizer()

    assert type(optimizer) is CLASSES[name]
    assert [group["lr"] for group in optimizer.param_groups] == [3e-3, 3e-3]
    if name in WITH_BATCH_SIZE:
        expected_b = 4 * 3 * args.world_size
        assert args.world_size == 1
        assert all(group["batch_size"] == expected_b for group in optimizer.param_groups)
    else:
        assert "batch_size" not in optimizer.defaults
    if name == "rootfree_adamw":
        assert all(group["betas"] == (0.8, 0.95) for group in optimizer.param_groups)
    elif name in ("adax", "rootfree_adax"):
        # AdaX's β2 is a different quantity: adam_beta1/adam_beta2 are not mapped
        assert all(group["betas"] == (0.9, 1e-4) for group in optimizer.param_groups)
    else:
        assert "betas" not in optimizer.defaults


@pytest.mark.parametrize("name", NAMES)
def test_weight_decay_only_in_trainer_decay_group_biases_and_layernorm_get_zero(tmp_path, name):
    model = tiny_bert()
    trainer = make_trainer("bert", tmp_path, model=model, optim=name, weight_decay=0.05)
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}

    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05
    assert no_decay["weight_decay"] == 0.0
    assert optimizer.defaults["weight_decay"] == 0.0, "weight decay must not leak into the defaults"
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decayed and exempt
    assert decayed | exempt == set(names.values())
    assert set(trainer.get_decay_parameter_names(model)) == decayed
    for n in names.values():
        if n.endswith(".bias") or "LayerNorm" in n:
            assert n in exempt, n
    assert "bert.encoder.layer.0.attention.self.query.weight" in decayed


# ---------------------------------------------------------------------------------------------
# 4. Exact resume from a checkpoint.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_resume_from_checkpoint_reproduces_uninterrupted_run_exactly(tmp_path, name):
    settings = dict(
        optim=name,
        learning_rate=LR[name],
        weight_decay=0.01,
        per_device_train_batch_size=4,
        max_steps=8,
        save_strategy="steps",
        save_steps=4,
        logging_steps=1,
    )
    full = make_trainer("bert", tmp_path / "full", **settings)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-4"
    assert checkpoint.is_dir()
    # the Trainer reads optimizer.pt with weights_only=True: the state must survive that
    saved = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)
    assert saved["state"] and all(float(state["step"]) == 4.0 for state in saved["state"].values())

    resumed = make_trainer("bert", tmp_path / "resumed", **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    assert resumed.state.global_step == full.state.global_step == 8
    # the resumed run's history starts with the checkpoint's (steps 1-4), then logs steps 5-8 itself
    losses = {entry["step"]: entry["loss"] for entry in full.state.log_history if "loss" in entry}
    resumed_losses = {entry["step"]: entry["loss"] for entry in resumed.state.log_history if "loss" in entry}
    assert resumed_losses == losses and sorted(losses) == list(range(1, 9))
    full_weights, resumed_weights = full.model.state_dict(), resumed.model.state_dict()
    assert full_weights.keys() == resumed_weights.keys()
    for key in full_weights:
        assert torch.equal(resumed_weights[key], full_weights[key]), key

    full_state = base_optimizer(full.optimizer).state_dict()
    resumed_state = base_optimizer(resumed.optimizer).state_dict()
    assert type(base_optimizer(resumed.optimizer)) is CLASSES[name]
    assert resumed_state["param_groups"] == full_state["param_groups"]
    assert resumed_state["state"].keys() == full_state["state"].keys()
    for index, state in full_state["state"].items():
        assert resumed_state["state"][index].keys() == state.keys()
        for key, value in state.items():
            other = resumed_state["state"][index][key]
            assert other.dtype == value.dtype, (index, key)
            assert torch.equal(other, value), (index, key)


@pytest.mark.parametrize("name", sorted(WITH_BATCH_SIZE))
def test_resume_with_other_gradient_accumulation_uses_the_new_batch_size(tmp_path, name):
    """B follows the run: a checkpoint saved at B = 4 and resumed with gradient accumulation 2
    trains on with B = 8 (per-device 4 × accumulation 2), keeping the checkpoint's state."""
    settings = dict(
        optim=name, learning_rate=LR[name], per_device_train_batch_size=4, max_steps=4, logging_steps=1
    )
    first = make_trainer("bert", tmp_path / "first", save_strategy="steps", save_steps=2, **settings)
    first.train()
    saved = torch.load(tmp_path / "first" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert {group["batch_size"] for group in saved["param_groups"]} == {4}

    resumed = make_trainer("bert", tmp_path / "resumed", gradient_accumulation_steps=2, **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "first" / "checkpoint-2"))
    optimizer = base_optimizer(resumed.optimizer)
    assert resumed.state.global_step == 4
    assert {group["batch_size"] for group in optimizer.param_groups} == {8}
    assert {float(state["step"]) for state in optimizer.state_dict()["state"].values()} == {4.0}


# ---------------------------------------------------------------------------------------------
# 5. Trainer defaults: clipping, warmup + linear schedule, gradient accumulation, bf16.
# ---------------------------------------------------------------------------------------------


class StepRecorder(TrainerCallback):
    """Records the lr of each step and the gradient norm the optimizer sees (after clipping)."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.clipped_norms: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.lrs.append(optimizer.param_groups[0]["lr"])
        grads = [p.grad.float() for p in model.parameters() if p.grad is not None]
        self.clipped_norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=["fp32-params", "bf16-params"])
@pytest.mark.parametrize("name", NAMES)
def test_trains_with_clipping_warmup_linear_schedule_accumulation_and_bf16(tmp_path, name, param_dtype):
    steps, warmup, max_norm = 40, 4, 0.5
    recorder = StepRecorder()
    trainer = make_trainer(
        "gpt2",
        tmp_path,
        model=tiny_gpt2().to(param_dtype),
        optim=name,
        learning_rate=LR[name],
        weight_decay=0.01,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=steps,
        warmup_steps=warmup,
        lr_scheduler_type="linear",
        max_grad_norm=max_norm,
        bf16=True,
    )
    trainer.add_callback(recorder)
    trainer.train()

    optimizer = base_optimizer(trainer.optimizer)
    assert type(optimizer) is CLASSES[name]
    if name in WITH_BATCH_SIZE:
        assert optimizer.defaults["batch_size"] == 8  # per-device 4 × accumulation 2
    losses = logged_losses(trainer)
    assert all(math.isfinite(loss) for loss in losses), losses
    assert losses[-1] < 0.95 * losses[0], losses
    # linear warmup from 0 to lr over 4 steps, then linear decay to 0 at step 40
    peak = LR[name]
    expected = [
        peak * k / warmup if k < warmup else peak * (steps - k) / (steps - warmup) for k in range(steps)
    ]
    assert recorder.lrs == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # clipping was active (the pre-clip norms the Trainer logs exceed it) and our optimizer saw the
    # clipped gradients
    assert max(e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e) > max_norm
    tolerance = 1e-3 if param_dtype == torch.float32 else 2e-2  # bf16 gradients are scaled in bf16
    assert max(recorder.clipped_norms) <= max_norm * (1 + tolerance)
    # the state stays float32 (step: float64) whatever the parameters' dtype
    assert all(p.dtype == param_dtype for p in trainer.model.parameters())
    for state in optimizer.state.values():
        for key, value in state.items():
            expected = {"step": torch.float64, "skipped_factor_updates": torch.int64}.get(key, torch.float32)
            assert value.dtype == expected, (key, value.dtype)


# ---------------------------------------------------------------------------------------------
# 6. The fallback that patches nothing.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_fallback_optimizer_cls_and_kwargs_trains_with_builtin_optim_and_patches_nothing(tmp_path, name):
    method = Trainer.__dict__["get_optimizer_cls_and_kwargs"]
    members = list(OptimizerNames._member_names_)
    args = make_args(
        tmp_path,
        optim="adamw_torch",
        learning_rate=LR[name],
        lr_scheduler_type="constant",
        max_steps=30,
        per_device_train_batch_size=4,
    )
    cls_and_kwargs = hf_rootfree.optimizer_cls_and_kwargs(name, args)

    assert cls_and_kwargs[0] is CLASSES[name]
    assert Trainer.__dict__["get_optimizer_cls_and_kwargs"] is method
    assert list(OptimizerNames._member_names_) == members
    assert args.optim is OptimizerNames.ADAMW_TORCH

    trainer = Trainer(
        model=tiny_gpt2(),
        args=args,
        train_dataset=ArithmeticSequences(),
        optimizer_cls_and_kwargs=cls_and_kwargs,
    )
    trainer.train()
    optimizer = base_optimizer(trainer.optimizer)
    assert type(optimizer) is CLASSES[name]
    if name in WITH_BATCH_SIZE:
        assert optimizer.defaults["batch_size"] == 4
    losses = logged_losses(trainer)
    assert losses[-1] < 0.95 * losses[0], losses
    assert args.optim is OptimizerNames.ADAMW_TORCH
    assert Trainer.__dict__["get_optimizer_cls_and_kwargs"] is method


# ---------------------------------------------------------------------------------------------
# 7. The launcher: python -m hf_rootfree runs unmodified scripts.
# ---------------------------------------------------------------------------------------------


def script_args(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return [
        "--report_file",
        str(tmp_path / "report.json"),
        "--output_dir",
        str(tmp_path / "out"),
        "--optim",
        name,
        *extra,
        "--max_steps",
        "3",
        "--per_device_train_batch_size",
        "4",
        "--logging_steps",
        "1",
        "--report_to",
        "none",
        "--use_cpu",
        "--disable_tqdm",
        "true",
        "--save_strategy",
        "no",
    ]


def run(command: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


def test_unmodified_script_never_imports_hf_rootfree():
    imported = set()
    for node in ast.walk(ast.parse(SCRIPT.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert "transformers" in imported
    assert "hf_rootfree" not in imported
    assert "importlib" not in imported and "__import__" not in SCRIPT.read_text()


def test_launcher_runs_unmodified_script_with_hf_rootfree_optimizer(tmp_path):
    result = run(
        [
            sys.executable,
            "-m",
            "hf_rootfree",
            str(SCRIPT),
            *script_args(tmp_path, "rootfree_adamw", "--optim_args", "damping=1e-3,batch_size=512"),
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["optimizer"] == "hf_rootfree.optim.elementwise.RootFreeAdamW"
    assert report["defaults"]["damping"] == 1e-3
    assert report["defaults"]["batch_size"] == 512
    assert report["argv0"] == str(SCRIPT)
    assert report["run_name"] == "__main__"
    assert len(report["losses"]) == 3


def test_launcher_runs_module_given_with_dash_m(tmp_path):
    env_path = os.pathsep.join([str(SCRIPT.parent), str(ROOT)])
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hf_rootfree",
            "-m",
            "train_unmodified",
            *script_args(tmp_path, "rootfree_rmsprop"),
        ],
        cwd=tmp_path,
        env={**subprocess_env(), "PYTHONPATH": env_path},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["optimizer"] == "hf_rootfree.optim.elementwise.RootFreeRMSprop"
    assert report["defaults"]["batch_size"] == 4


def test_unmodified_script_without_launcher_fails_with_stock_optim_error(tmp_path):
    result = run([sys.executable, str(SCRIPT), *script_args(tmp_path, "rootfree_adamw")], cwd=tmp_path)
    assert result.returncode != 0
    # HfArgumentParser turns the OptimizerNames enum into argparse choices (exit code 2); building
    # TrainingArguments directly would say "... is not a valid OptimizerNames".
    stock_errors = ("invalid choice: 'rootfree_adamw'", "rootfree_adamw is not a valid OptimizerNames")
    assert any(error in result.stderr for error in stock_errors), result.stderr[-3000:]
    assert not (tmp_path / "report.json").exists()


def test_launcher_without_arguments_exits_2_with_usage(tmp_path):
    result = run([sys.executable, "-m", "hf_rootfree"], cwd=tmp_path)
    assert result.returncode == 2
    assert "usage: python -m hf_rootfree SCRIPT.py" in result.stderr


def test_launcher_with_missing_script_exits_2_with_message(tmp_path):
    missing = tmp_path / "no_such_script.py"
    result = run([sys.executable, "-m", "hf_rootfree", str(missing), "--optim", "adax"], cwd=tmp_path)
    assert result.returncode == 2
    assert f"no such script: {missing}" in result.stderr
    assert "usage:" in result.stderr


@pytest.mark.parametrize(
    ("argv", "code", "stream", "text"),
    [
        ([], 2, "err", "usage: python -m hf_rootfree SCRIPT.py"),
        (["-h"], 0, "out", "usage: python -m hf_rootfree SCRIPT.py"),
        (["--help"], 0, "out", "python -m hf_rootfree -m MODULE"),
        (["-m"], 2, "err", "usage: python -m hf_rootfree SCRIPT.py"),
        (
            ["does/not/exist.py", "--optim", "adax"],
            2,
            "err",
            "hf_rootfree: no such script: does/not/exist.py",
        ),
    ],
)
def test_launcher_main_answers_bad_invocations_with_usage_and_exit_code(capsys, argv, code, stream, text):
    from hf_rootfree.__main__ import main

    saved_argv = list(sys.argv)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == code
    captured = capsys.readouterr()
    assert text in (captured.err if stream == "err" else captured.out)
    assert sys.argv == saved_argv


def test_accelerate_launch_runs_unmodified_script_through_launcher(tmp_path):
    pytest.importorskip("accelerate.commands.launch")
    config = tmp_path / "accelerate.yaml"
    config.write_text(
        'compute_environment: LOCAL_MACHINE\ndistributed_type: "NO"\nuse_cpu: true\n'
        'num_machines: 1\nnum_processes: 1\nmixed_precision: "no"\n'
    )
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "--num_processes",
        "1",
        "--cpu",
        "-m",
        "hf_rootfree",
        str(SCRIPT),
        *script_args(tmp_path, "rootfree_adax"),
    ]
    result = run(command, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["optimizer"] == "hf_rootfree.optim.elementwise.RootFreeAdaX"
    assert report["defaults"]["batch_size"] == 4


# ---------------------------------------------------------------------------------------------
# 8. Diagnostics callback.
# ---------------------------------------------------------------------------------------------


#: the statistics each optimizer's diagnostics() reports (all positive and finite in this run)
DIAGNOSTICS = {name: ("s_mean", "precond_mean") for name in NAMES}
DIAGNOSTICS["sirfshampoo"] = ("precond_trace_mean",)


def state_statistic(trainer: Trainer) -> float:
    """The first statistic of DIAGNOSTICS, computed from the state without ``diagnostics()``:
    the mean of the second moment over all elements, or for SIRFShampoo the mean over blocks of
    Π_n ‖K_n‖²_F / d_n from the dense factors."""
    optimizer = base_optimizer(trainer.optimizer)
    if not hasattr(optimizer, "dense_factors"):
        key = "exp_avg_sq" if "exp_avg_sq" in next(iter(optimizer.state.values())) else "s"
        return float(torch.cat([state[key].double().flatten() for state in optimizer.state.values()]).mean())
    params = dict(trainer.model.named_parameters())
    traces = [
        math.prod(
            float(k.double().square().sum()) / k.shape[0] for k in optimizer.dense_factors(params[b["name"]])
        )
        for b in optimizer.blocks()
    ]
    return sum(traces) / len(traces)


@pytest.mark.parametrize("name", NAMES)
def test_diagnostics_callback_adds_optimizer_statistics_to_logged_losses(tmp_path, name):
    trainer = make_trainer("gpt2", tmp_path, optim=name, learning_rate=LR[name], max_steps=6, logging_steps=2)
    callback = RootFreeDiagnosticsCallback.attach(trainer)
    assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()

    entries = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in entries] == [2, 4, 6]
    for entry in entries:
        for key in DIAGNOSTICS[name]:
            assert math.isfinite(entry[f"optim/{key}"]) and entry[f"optim/{key}"] > 0, entry
    # the last logged value, recomputed here from the optimizer's state after the last step
    assert entries[-1][f"optim/{DIAGNOSTICS[name][0]}"] == pytest.approx(state_statistic(trainer), rel=1e-6)
    if name == "sirfshampoo":
        assert entries[-1]["optim/skipped_factor_updates"] == 0


# ---------------------------------------------------------------------------------------------
# 9. Hyperparameter search.
# ---------------------------------------------------------------------------------------------


def test_optuna_hyperparameter_search_rebuilds_hf_rootfree_optimizer_per_trial(tmp_path):
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    class OptimizerRecorder(TrainerCallback):
        def __init__(self) -> None:
            self.seen: list[tuple[torch.optim.Optimizer, float, int]] = []

        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            self.seen.append(
                (base_optimizer(optimizer), args.learning_rate, args.per_device_train_batch_size)
            )

    def hp_space(trial):
        lr = trial.suggest_float("learning_rate", 0.01, 0.03)
        return {"learning_rate": lr, "per_device_train_batch_size": 2 if lr < 0.02 else 4}

    recorder = OptimizerRecorder()
    args = make_args(tmp_path, optim="rootfree_adamw", max_steps=3, eval_strategy="no", logging_steps=1)
    trainer = Trainer(
        model_init=lambda trial=None: tiny_gpt2(),
        args=args,
        train_dataset=ArithmeticSequences(n=32),
        eval_dataset=ArithmeticSequences(n=8, seed=1),
        callbacks=[recorder],
    )
    best = trainer.hyperparameter_search(
        backend="optuna",
        n_trials=2,
        direction="minimize",
        hp_space=hp_space,
        compute_objective=lambda metrics: metrics["eval_loss"],
        sampler=optuna.samplers.GridSampler({"learning_rate": [0.01, 0.03]}),
    )

    assert math.isfinite(best.objective)
    assert len(recorder.seen) == 2
    (first, lr1, b1), (second, lr2, b2) = recorder.seen
    assert first is not second, "the optimizer was not rebuilt for the second trial"
    assert {lr1, lr2} == {0.01, 0.03}
    assert {b1, b2} == {2, 4}
    for optimizer, lr, batch in recorder.seen:
        assert type(optimizer) is RootFreeAdamW
        assert optimizer.defaults["lr"] == lr
        assert optimizer.defaults["batch_size"] == batch


# ---------------------------------------------------------------------------------------------
# 10. The SIRFShampoo the Trainer builds: its exact block layout.
# ---------------------------------------------------------------------------------------------

#: (parameter names of one block, preconditioned shape) for every block, in order. A weight and
#: its bias share a block (the bias is a last column: out × (in + 1); GPT-2's Conv1D weights are
#: stored (in, out)); embeddings and LayerNorm parameters are blocks of their own; GPT-2's lm_head
#: is tied to wte and appears once.
LAYOUTS = {
    "gpt2": [
        (["transformer.wte.weight"], (64, 16)),
        (["transformer.wpe.weight"], (32, 16)),
        (["transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias"], (48, 17)),
        (["transformer.h.0.attn.c_proj.weight", "transformer.h.0.attn.c_proj.bias"], (16, 17)),
        (["transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_fc.bias"], (64, 17)),
        (["transformer.h.0.mlp.c_proj.weight", "transformer.h.0.mlp.c_proj.bias"], (16, 65)),
        *[
            ([f"transformer.{ln}.{p}"], (16,))
            for ln in ("h.0.ln_1", "h.0.ln_2", "ln_f")
            for p in ("weight", "bias")
        ],
    ],
    "bert": [
        (["bert.embeddings.word_embeddings.weight"], (64, 16)),
        (["bert.embeddings.position_embeddings.weight"], (32, 16)),
        (["bert.embeddings.token_type_embeddings.weight"], (2, 16)),
        *[
            ([f"bert.encoder.layer.0.{m}.weight", f"bert.encoder.layer.0.{m}.bias"], (16, 17))
            for m in ("attention.self.query", "attention.self.key", "attention.self.value")
        ],
        (
            [
                "bert.encoder.layer.0.attention.output.dense.weight",
                "bert.encoder.layer.0.attention.output.dense.bias",
            ],
            (16, 17),
        ),
        (
            [
                "bert.encoder.layer.0.intermediate.dense.weight",
                "bert.encoder.layer.0.intermediate.dense.bias",
            ],
            (32, 17),
        ),
        (["bert.encoder.layer.0.output.dense.weight", "bert.encoder.layer.0.output.dense.bias"], (16, 33)),
        (["bert.pooler.dense.weight", "bert.pooler.dense.bias"], (16, 17)),
        (["classifier.weight", "classifier.bias"], (2, 17)),
        *[
            ([f"bert.{ln}.{p}"], (16,))
            for ln in (
                "embeddings.LayerNorm",
                "encoder.layer.0.attention.output.LayerNorm",
                "encoder.layer.0.output.LayerNorm",
            )
            for p in ("weight", "bias")
        ],
    ],
}


@pytest.mark.parametrize("max_dense_dim", [None, 20], ids=["all-dense", "max_dense_dim=20"])
@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_trainer_built_sirfshampoo_shares_weight_and_bias_blocks_with_the_expected_structures(
    tmp_path, kind, max_dense_dim
):
    """--optim sirfshampoo through the stock Trainer (weight decay on, so weights and biases sit in
    different param groups) builds exactly the layout above; axes longer than max_dense_dim are
    diagonal, all others dense."""
    optim_args = None if max_dense_dim is None else f"max_dense_dim={max_dense_dim}"
    trainer = make_trainer(
        kind, tmp_path, optim="sirfshampoo", learning_rate=0.01, weight_decay=0.01, optim_args=optim_args
    )
    trainer.create_optimizer()
    optimizer = base_optimizer(trainer.optimizer)
    assert len(optimizer.param_groups) == 2  # the Trainer's decay and no-decay groups
    names = {p: n for n, p in trainer.model.named_parameters()}
    limit = max_dense_dim or math.inf
    expected = [
        (members, dims, ["Diagonal" if d > limit else "Dense" for d in dims])
        for members, dims in LAYOUTS[kind]
    ]
    layout = [
        ([names[p] for p in block.params], block.dims, [type(s).__name__ for s in block.structures])
        for block in optimizer._blocks()
    ]
    assert layout == expected
    assert sorted(n for block, _, _ in layout for n in block) == sorted(names.values())
