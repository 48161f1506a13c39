"""``--optim_args``: typed against the optimizer's signature, with errors that say what to fix.

Unit tests of :func:`hf_rootfree.parse_optim_args` and :func:`hf_rootfree.optimizer_cls_and_kwargs`,
then the same strings through ``HfArgumentParser`` and the stock ``Trainer``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
import sys
from pathlib import Path

import pytest
import torch
from optim_db import NAMES, OPTIM_DB
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
)

import hf_rootfree
from hf_rootfree import RootFreeAdamW, parse_optim_args

#: every keyword --optim_args may set, per name (lr and weight_decay belong to TrainingArguments)
VALID_KEYS = {
    "rootfree_adamw": [
        "batch_size",
        "betas",
        "bias_correction",
        "damping",
        "foreach",
        "fused",
        "lr_units",
        "relative_damping",
        "s0",
        "state_dtype",
    ],
    "rootfree_rmsprop": [
        "alpha",
        "batch_size",
        "bias_correction",
        "damping",
        "foreach",
        "fused",
        "lr_units",
        "momentum",
        "relative_damping",
        "s0",
        "state_dtype",
    ],
    "adax": ["betas", "eps", "foreach", "fused", "state_dtype"],
    "rootfree_adax": [
        "batch_size",
        "betas",
        "damping",
        "foreach",
        "fused",
        "lr_units",
        "prior_steps",
        "relative_damping",
        "s0",
        "state_dtype",
    ],
    "sirfshampoo": [
        "batch_size",
        "block_size",
        "damping",
        "hierarchical_sizes",
        "large_dim_structure",
        "lr_units",
        "max_dense_dim",
        "merge_dims",
        "momentum",
        "precond_dtype",
        "precond_lr",
        "precond_momentum",
        "share_bias",
        "structures",
        "update_freq",
    ],
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def make_args(output_dir: Path, **overrides) -> TrainingArguments:
    settings = dict(output_dir=str(output_dir), report_to="none", use_cpu=True, disable_tqdm=True)
    settings.update(overrides)
    return TrainingArguments(**settings)


def build_optimizer(args: TrainingArguments) -> torch.optim.Optimizer:
    """What the stock Trainer builds for these arguments."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    return Trainer(model=BertForSequenceClassification(config), args=args).create_optimizer()


def same_typed(actual: dict, expected: dict) -> bool:
    """Equal values of exactly the same types (so 0.0 != 0 != False), recursing into tuples."""

    def key(value):
        if isinstance(value, tuple):
            return (tuple, tuple(key(v) for v in value))
        return (type(value), value)

    return actual.keys() == expected.keys() and all(key(actual[k]) == key(expected[k]) for k in expected)


# ---------------------------------------------------------------------------------------------
# Values are typed against the signature.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        # floats, also when written as integers
        ("rootfree_adamw", "damping=1e-4", {"damping": 1e-4}),
        ("rootfree_rmsprop", "momentum=0,alpha=0.999", {"momentum": 0.0, "alpha": 0.999}),
        ("rootfree_adax", "prior_steps=3", {"prior_steps": 3.0}),
        ("adax", "eps=1e-8", {"eps": 1e-8}),
        # batch_size: float | None
        ("rootfree_adamw", "batch_size=512", {"batch_size": 512.0}),
        # bools
        ("rootfree_adamw", "bias_correction=true", {"bias_correction": True}),
        ("rootfree_adamw", "bias_correction=1", {"bias_correction": True}),
        ("rootfree_adamw", "bias_correction=Yes", {"bias_correction": True}),
        ("rootfree_adamw", "bias_correction=false", {"bias_correction": False}),
        ("rootfree_adamw", "bias_correction=0", {"bias_correction": False}),
        ("rootfree_adamw", "bias_correction=off", {"bias_correction": False}),
        # bool | None
        ("adax", "foreach=false,fused=none", {"foreach": False, "fused": None}),
        ("rootfree_rmsprop", "fused=0,foreach=True", {"fused": False, "foreach": True}),
        # tuples, in parentheses or brackets, spaces ignored
        ("rootfree_adamw", "betas=(0.9,0.99)", {"betas": (0.9, 0.99)}),
        ("adax", "betas=[0.8, 1e-3]", {"betas": (0.8, 1e-3)}),
        (
            "rootfree_adax",
            " betas = ( 0.95 , 2e-4 ) , damping = 1e-3 ",
            {"betas": (0.95, 2e-4), "damping": 1e-3},
        ),
        # dtypes and None
        ("rootfree_adamw", "state_dtype=bfloat16", {"state_dtype": torch.bfloat16}),
        ("rootfree_rmsprop", "state_dtype=torch.float64", {"state_dtype": torch.float64}),
        ("adax", "state_dtype=Float16", {"state_dtype": torch.float16}),
        ("rootfree_adax", "state_dtype=none", {"state_dtype": None}),
        ("rootfree_adamw", "state_dtype=None,batch_size=null", {"state_dtype": None, "batch_size": None}),
        # empty
        ("rootfree_adamw", "", {}),
        ("rootfree_adamw", None, {}),
    ],
)
def test_optim_args_values_are_typed_against_the_optimizer_signature(name, text, expected):
    parsed = parse_optim_args(name, text)
    assert same_typed(parsed, expected), parsed


@pytest.mark.parametrize("text", ["false", "False", "0", "no", "off"])
def test_optim_args_false_and_zero_are_false_not_truthy_strings(text):
    parsed = parse_optim_args("rootfree_adamw", f"bias_correction={text}")
    assert parsed["bias_correction"] is False
    cls, kwargs = hf_rootfree.optimizer_cls_and_kwargs(
        "rootfree_adamw", _Args(optim_args=f"bias_correction={text}")
    )
    optimizer = cls([torch.nn.Parameter(torch.zeros(2))], **kwargs)
    assert optimizer.defaults["bias_correction"] is False


@pytest.mark.parametrize("name", NAMES)
def test_every_optim_args_key_builds_the_optimizer(name):
    text = {
        "rootfree_adamw": "betas=(0.8,0.9),damping=1e-3,batch_size=16,bias_correction=false,s0=1,"
        "relative_damping=0,lr_units=paper,state_dtype=float64,foreach=false,fused=false",
        "rootfree_rmsprop": "alpha=0.9,damping=1e-3,momentum=0,batch_size=16,bias_correction=true,s0=0,"
        "relative_damping=0.5,lr_units=adamw,state_dtype=float64,foreach=true,fused=none",
        "adax": "betas=(0.8,1e-3),eps=1e-8,state_dtype=float64,foreach=none,fused=false",
        "rootfree_adax": "betas=(0.8,1e-3),damping=1e-3,prior_steps=2,batch_size=16,s0=1.0,"
        "relative_damping=0.1,lr_units=paper,state_dtype=float64,foreach=false,fused=none",
        "sirfshampoo": "momentum=0.5,precond_lr=0.05,precond_momentum=0,damping=1e-4,batch_size=16,"
        "update_freq=3,structures=(dense,block_diagonal),precond_dtype=bfloat16,max_dense_dim=none,"
        "merge_dims=false,block_size=8,hierarchical_sizes=(2,2),large_dim_structure=block_diagonal,"
        "share_bias=false,lr_units=paper",
    }[name]
    parsed = parse_optim_args(name, text)
    assert sorted(parsed) == VALID_KEYS[name]
    cls, kwargs = hf_rootfree.optimizer_cls_and_kwargs(name, _Args(optim_args=text))
    optimizer = cls([torch.nn.Parameter(torch.zeros(3))], **kwargs)
    for key, value in parsed.items():
        assert optimizer.defaults[key] == value, key


# ---------------------------------------------------------------------------------------------
# Errors name what is wrong and what is allowed.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("rootfree_adamw", "eps"),
        ("adax", "damping"),
        ("rootfree_rmsprop", "betas"),
        ("rootfree_adax", "bogus"),
    ],
)
def test_unknown_optim_args_key_raises_naming_the_key_and_listing_valid_keys(name, key):
    with pytest.raises(ValueError, match=rf"unknown key '{key}'") as error:
        parse_optim_args(name, f"{key}=1")
    message = str(error.value)
    assert name in message
    listed = message.split("valid keys:")[1]
    assert [k.strip() for k in listed.split(",")] == VALID_KEYS[name]


@pytest.mark.parametrize(
    ("name", "key", "value", "type_words"),
    [
        ("rootfree_adamw", "damping", "abc", "float"),
        ("rootfree_adamw", "damping", "nan", "float"),
        ("rootfree_adamw", "damping", "inf", "float"),
        ("rootfree_adamw", "bias_correction", "maybe", "bool"),
        ("rootfree_adamw", "bias_correction", "none", "bool"),
        ("rootfree_adamw", "betas", "0.9", "a tuple (float,float)"),
        ("rootfree_adamw", "betas", "(0.9,0.99,0.999)", "a tuple (float,float)"),
        ("adax", "betas", "(0.9,x)", "a tuple (float,float)"),
        ("rootfree_adamw", "batch_size", "many", "float or None"),
        ("rootfree_rmsprop", "state_dtype", "float17", "a torch dtype"),
        ("rootfree_adax", "foreach", "2", "bool or None"),
    ],
)
def test_malformed_optim_args_value_raises_naming_key_value_and_type(name, key, value, type_words):
    with pytest.raises(ValueError) as error:
        parse_optim_args(name, f"{key}={value}")
    message = str(error.value)
    assert f"{key}={value!r}" in message, message
    assert f"is not {type_words}" in message, message
    assert name in message


@pytest.mark.parametrize("text", ["damping", "damping=1e-4,,=3", "=1e-4"])
def test_optim_args_item_without_key_value_pair_raises(text):
    with pytest.raises(ValueError, match="is not a key=value pair"):
        parse_optim_args("rootfree_adamw", text)


@pytest.mark.parametrize(("key", "flag"), [("lr", "--learning_rate"), ("weight_decay", "--weight_decay")])
@pytest.mark.parametrize("name", NAMES)
def test_lr_and_weight_decay_in_optim_args_point_to_training_arguments(name, key, flag):
    with pytest.raises(ValueError, match=rf"set {key} with {flag} instead") as error:
        parse_optim_args(name, f"{key}=0.1")
    assert name in str(error.value)
    assert key not in VALID_KEYS[name]


# ---------------------------------------------------------------------------------------------
# optim_args override what the name derives from TrainingArguments.
# ---------------------------------------------------------------------------------------------


class _Args:
    """The public TrainingArguments attributes optimizer_cls_and_kwargs reads."""

    def __init__(self, **overrides) -> None:
        self.learning_rate = 1e-3
        self.per_device_train_batch_size = 8
        self.gradient_accumulation_steps = 2
        self.world_size = 1
        self.adam_beta1 = 0.85
        self.adam_beta2 = 0.95
        self.optim_args = None
        self.__dict__.update(overrides)


def test_optim_args_override_derived_values():
    cls, kwargs = hf_rootfree.optimizer_cls_and_kwargs("rootfree_adamw", _Args())
    assert cls is RootFreeAdamW
    assert kwargs == {"lr": 1e-3, "batch_size": 16, "betas": (0.85, 0.95)}

    overridden = _Args(optim_args="batch_size=512,betas=(0.9,0.99),damping=1e-3")
    cls, kwargs = hf_rootfree.optimizer_cls_and_kwargs("rootfree_adamw", overridden)
    assert kwargs == {"lr": 1e-3, "batch_size": 512.0, "betas": (0.9, 0.99), "damping": 1e-3}
    for name in ("rootfree_rmsprop", "rootfree_adax"):
        assert hf_rootfree.optimizer_cls_and_kwargs(name, _Args(optim_args="batch_size=512"))[1] == {
            "lr": 1e-3,
            "batch_size": 512.0,
        }


def test_optim_args_from_the_command_line_reach_the_optimizer_the_trainer_builds(tmp_path):
    parser = HfArgumentParser(TrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--use_cpu",
            "--report_to",
            "none",
            "--optim",
            "rootfree_adamw",
            "--learning_rate",
            "2e-3",
            "--weight_decay",
            "0.1",
            "--per_device_train_batch_size",
            "4",
            "--adam_beta2",
            "0.9",
            "--optim_args",
            "batch_size=512, betas=(0.8,0.99), damping=5e-4, bias_correction=false, state_dtype=bfloat16",
        ]
    )
    optimizer = build_optimizer(args)
    assert type(optimizer) is RootFreeAdamW
    decay, no_decay = optimizer.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    for group in optimizer.param_groups:
        assert group["lr"] == 2e-3
        assert group["batch_size"] == 512.0  # not 4 × 1 × 1
        assert group["betas"] == (0.8, 0.99)  # not (adam_beta1, adam_beta2)
        assert group["damping"] == 5e-4
        assert group["bias_correction"] is False
        assert group["state_dtype"] is torch.bfloat16


@pytest.mark.parametrize(
    ("optim_args", "pattern"),
    [
        ("eps=1e-8", r"unknown key 'eps'; valid keys: batch_size, betas"),
        ("damping=lots", r"damping='lots' is not float"),
        ("lr=1e-2", r"set lr with --learning_rate instead"),
        ("weight_decay=0.1", r"set weight_decay with --weight_decay instead"),
        ("betas=(1.5,0.9)", r"RootFreeAdamW: betas\[0\] must be in \[0, 1\), got 1.5"),
        ("damping=-1.0", r"RootFreeAdamW: damping must be in \[0, inf\), got -1.0"),
    ],
)
def test_bad_optim_args_fail_when_the_trainer_builds_the_optimizer(tmp_path, optim_args, pattern):
    args = make_args(tmp_path, optim="rootfree_adamw", optim_args=optim_args)
    with pytest.raises(ValueError, match=re.escape("--optim_args for rootfree_adamw: ")):
        build_optimizer(args)
    with pytest.raises(ValueError, match=pattern):
        build_optimizer(args)


def test_sirfshampoo_refuses_deepspeed_before_training_with_the_alternatives():
    args = _Args(deepspeed={"zero_optimization": {"stage": 2}})
    with pytest.raises(ValueError, match=r"does not support DeepSpeed.*DDP or FSDP2.*rootfree_adamw"):
        hf_rootfree.optimizer_cls_and_kwargs("sirfshampoo", args)
    cls, _ = hf_rootfree.optimizer_cls_and_kwargs("rootfree_adamw", args)  # element-wise: allowed
    assert cls is RootFreeAdamW


# ---------------------------------------------------------------------------------------------
# The launcher checks --optim_args before the script runs.
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def marker_script(tmp_path):
    """A script that only leaves a marker file: whether the launcher ran it."""
    script = tmp_path / "train.py"
    script.write_text("import pathlib, sys\npathlib.Path(sys.argv[0]).with_suffix('.ran').touch()\n")
    return script


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        (
            "rootfree_adamw",
            ["--optim", "rootfree_adamw", "--optim_args", "dampin=1e-3"],
            r"unknown key 'dampin'",
        ),
        ("adax", ["--optim=adax", "--optim_args=eps=lots"], r"eps='lots' is not float"),
        ("rootfree_adamw", ["--optim", "rootfree_adamw", "--optim_args", "betas=(1.5,0.9)"], r"betas\[0\]"),
        ("sirfshampoo", ["--optim", "sirfshampoo", "--optim-args", "update_freq=0"], r"update_freq must be"),
        (
            "rootfree_rmsprop",
            ["--optim", "rootfree_rmsprop", "--optim_args", "batch_size=0"],
            r"batch_size must",
        ),
    ],
)
def test_launcher_refuses_bad_optim_args_before_the_script_runs_with_exit_code_2(
    capsys, marker_script, name, args, message
):
    from hf_rootfree.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(marker_script), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hf_rootfree: error: --optim_args for {name}: ")
    assert re.search(message, err), err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert not marker_script.with_suffix(".ran").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["--optim", "rootfree_adamw", "--optim_args", "damping=1e-3,betas=(0.9,0.99)"],
        ["--optim", "adamw_torch", "--optim_args", "anything=goes"],  # not ours: transformers' business
        ["--learning_rate", "1e-3"],
    ],
)
def test_launcher_runs_the_script_when_optim_args_are_fine_or_not_ours(marker_script, args):
    from hf_rootfree.__main__ import main

    saved = list(sys.argv)
    try:
        main([str(marker_script), *args])
    finally:
        sys.argv = saved
    assert marker_script.with_suffix(".ran").exists()


def test_launcher_help_and_package_docstring_name_every_registered_optimizer(capsys):
    from hf_rootfree.__main__ import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in hf_rootfree.OPTIMIZERS:
        assert name in out
        assert f"``{name}``" in hf_rootfree.__doc__
    assert set(hf_rootfree.OPTIMIZERS) == set(NAMES)


def test_the_registry_holds_the_public_names_with_their_classes_and_oracles():
    """The one list of optimizers everything reads, checked against the names users type."""
    expected = {
        "rootfree_adamw": hf_rootfree.RootFreeAdamW,
        "rootfree_rmsprop": hf_rootfree.RootFreeRMSprop,
        "adax": hf_rootfree.AdaX,
        "rootfree_adax": hf_rootfree.RootFreeAdaX,
        "sirfshampoo": hf_rootfree.SIRFShampoo,
    }
    assert {name: spec.cls for name, spec in hf_rootfree.OPTIMIZERS.items()} == expected
    for name, spec in hf_rootfree.OPTIMIZERS.items():
        module, attr = spec.oracle.split(".")
        oracle = getattr(importlib.import_module(module), attr)  # the oracle the spec names exists
        takes_model = "trainer_model" in inspect.signature(spec.cls.__init__).parameters
        assert spec.takes_model == takes_model, name
        if spec.element_wise:  # the generic tests cover it, against that oracle
            cases = [case for case in OPTIM_DB if case.cls is spec.cls]
            assert cases, f"{name} has no row in optim_db.OPTIM_DB"
            assert all(case.oracle is oracle for case in cases), name


def test_the_fused_kernel_build_is_announced_at_warning_level_with_its_duration(monkeypatch, caplog):
    from hf_rootfree.optim import _fused

    monkeypatch.setattr(_fused, "_is_cached", lambda: False)
    with caplog.at_level(logging.INFO, logger="hf_rootfree"):
        _fused._announce_build()
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert re.search(r"building the fused CPU kernel.*usually 15-80 s.*cached", record.getMessage())
    caplog.clear()
    monkeypatch.setattr(_fused, "_is_cached", lambda: True)
    with caplog.at_level(logging.INFO, logger="hf_rootfree"):
        _fused._announce_build()
    assert [r.levelno for r in caplog.records] == [logging.INFO]
