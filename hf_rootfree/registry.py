"""Optimizer names, typed ``--optim_args`` and the mapping from ``TrainingArguments``.

Nothing here touches transformers internals: it reads public ``TrainingArguments`` attributes
only, so :func:`optimizer_cls_and_kwargs` is the supported fallback that patches nothing::

    from hf_rootfree import optimizer_cls_and_kwargs
    trainer = Trainer(model, args, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs("rootfree_adamw", args))

``--optim_args`` syntax: ``key=value`` pairs separated by commas; spaces are ignored; a tuple is
written in parentheses (``betas=(0.9,0.99)``); booleans accept ``true/false/1/0/yes/no``;
``none`` is ``None``; dtypes are written ``bfloat16`` or ``torch.bfloat16``. Each value is typed
against the optimizer's signature, so ``damping=1e-4`` is a float and ``bias_correction=false`` is
``False``.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .optim import AdaX, RootFreeAdamW, RootFreeAdaX, RootFreeRMSprop, SIRFShampoo

__all__ = ["OPTIMIZERS", "check_optimizer_kwargs", "optimizer_cls_and_kwargs", "parse_optim_args"]


@dataclass(frozen=True)
class OptimizerSpec:
    """One ``--optim`` name: what the package, the launcher, the tests and the benchmarks ask
    about an optimizer. Its presets in ``recipes/configs/presets.yaml`` are keyed by ``name``;
    its float64 oracle lives in ``tests/`` under the key ``oracle``."""

    name: str
    cls: type[torch.optim.Optimizer]
    #: takes (args) and returns the kwargs this name derives from TrainingArguments
    from_training_args: Callable[[Any], dict[str, Any]]
    #: its float64 oracle in tests/, as ``module.name`` (``oracle.adax`` is ``tests/oracle.py``'s ``adax``)
    oracle: str
    #: one element-wise update per entry (the ``optim/elementwise.py`` family); False: Kronecker factors
    element_wise: bool = True
    #: without a square root in the update (False: AdaX, the baseline it builds on)
    root_free: bool = True
    #: the Trainer's model is passed as ``trainer_model`` (it decides which weight and bias share a block)
    takes_model: bool = False
    #: why ``--optim name`` cannot run under DeepSpeed (None: it can)
    deepspeed_unsupported: str | None = None


def global_batch_size(args: Any) -> int:
    """B: per-device batch × gradient accumulation steps × number of processes."""
    return int(args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size)


def _lr_and_batch(args: Any) -> dict[str, Any]:
    return {"lr": args.learning_rate, "batch_size": global_batch_size(args)}


def _adamw_kwargs(args: Any) -> dict[str, Any]:
    return {**_lr_and_batch(args), "betas": (args.adam_beta1, args.adam_beta2)}


OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        OptimizerSpec("rootfree_adamw", RootFreeAdamW, _adamw_kwargs, oracle="oracle.rootfree_adamw"),
        OptimizerSpec("rootfree_rmsprop", RootFreeRMSprop, _lr_and_batch, oracle="oracle.rootfree_rmsprop"),
        # AdaX's β2 is a different quantity (1e-4), so adam_beta2 is deliberately not mapped.
        OptimizerSpec(
            "adax", AdaX, lambda args: {"lr": args.learning_rate}, oracle="oracle.adax", root_free=False
        ),
        OptimizerSpec("rootfree_adax", RootFreeAdaX, _lr_and_batch, oracle="oracle.rootfree_adax"),
        # The model (when the Trainer has one) lets a layer's weight and bias share a factor.
        OptimizerSpec(
            "sirfshampoo",
            SIRFShampoo,
            _lr_and_batch,
            oracle="sirf_oracle.SIRFShampooOracle",
            element_wise=False,
            takes_model=True,
            deepspeed_unsupported=(
                "ZeRO flattens the parameters into one buffer per rank, so the per-layer Kronecker "
                "factors have no shape to act on. Train with DDP or FSDP2 (accelerate's fsdp_version: 2; "
                "SIRFShampoo gathers sharded gradients)"
            ),
        ),
    )
}


# ---------------------------------------------------------------------------------------------
# Typed --optim_args
# ---------------------------------------------------------------------------------------------

#: optimizer arguments that TrainingArguments owns: --optim_args may not set them
_TRAINING_ARGS_KEYS = {"lr": "--learning_rate", "weight_decay": "--weight_decay"}
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside parentheses/brackets."""
    parts, depth, current = [], 0, []
    for char in text:
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p for p in parts if p]


def _describe(annotation: Any) -> str:
    if annotation is type(None):
        return "None"
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if origin is tuple:
        return "a tuple (" + ",".join(_describe(a) for a in typing.get_args(annotation)) + ")"
    if annotation is torch.dtype:
        return "a torch dtype (float32, bfloat16, float16, float64)"
    return getattr(annotation, "__name__", str(annotation))


def _convert(text: str, annotation: Any) -> Any:
    """Convert ``text`` to ``annotation``; raise ValueError when it does not fit."""
    lowered = text.lower()
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(annotation)
        if type(None) in members and lowered in ("none", "null"):
            return None
        for member in members:
            if member is type(None):
                continue
            try:
                return _convert(text, member)
            except ValueError:
                pass
        raise ValueError(text)
    if origin is tuple:
        if not (text.startswith("(") and text.endswith(")")) and not (
            text.startswith("[") and text.endswith("]")
        ):
            raise ValueError(text)
        items = _split_top_level(text[1:-1])
        members = typing.get_args(annotation)
        if len(members) == 2 and members[1] is Ellipsis:
            members = (members[0],) * len(items)
        if len(items) != len(members):
            raise ValueError(text)
        return tuple(_convert(item, member) for item, member in zip(items, members))
    if annotation is bool:
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(text)
    if annotation is int:
        return int(text)
    if annotation is float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(text)
        return value
    if annotation is str:
        return text
    if annotation is torch.dtype:
        name = lowered.removeprefix("torch.")
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(text)
        return dtype
    raise ValueError(text)


def optim_args_schema(cls: type) -> dict[str, Any]:
    """The keyword arguments of ``cls`` that ``--optim_args`` may set, with their types."""
    hints = typing.get_type_hints(cls.__init__)
    schema = {}
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        variadic = parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
        if variadic or name in ("self", "params", "model", "trainer_model", *_TRAINING_ARGS_KEYS):
            continue
        schema[name] = hints.get(name, str)
    return schema


def parse_optim_args(name: str, optim_args: str | None) -> dict[str, Any]:
    """Parse ``--optim_args`` for optimizer ``name`` into typed keyword arguments.

    Raises:
        ValueError: an unknown key (the message lists the valid ones), a pair without ``=``, or a
            value that does not parse as the argument's type (the message names key, value, type).
    """
    cls = OPTIMIZERS[name].cls
    schema = optim_args_schema(cls)
    parsed: dict[str, Any] = {}
    if not optim_args:
        return parsed
    for item in _split_top_level(optim_args.replace(" ", "")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(
                f"--optim_args for {name}: {item!r} is not a key=value pair "
                "(write e.g. 'damping=1e-4,betas=(0.9,0.99)')"
            )
        if key in _TRAINING_ARGS_KEYS:
            raise ValueError(
                f"--optim_args for {name}: set {key} with {_TRAINING_ARGS_KEYS[key]} instead "
                "(the Trainer applies it per parameter group)"
            )
        if key not in schema:
            raise ValueError(
                f"--optim_args for {name}: unknown key {key!r}; valid keys: {', '.join(sorted(schema))}"
            )
        try:
            parsed[key] = _convert(value, schema[key])
        except (ValueError, TypeError):
            raise ValueError(
                f"--optim_args for {name}: {key}={value!r} is not {_describe(schema[key])}"
            ) from None
    return parsed


def check_optimizer_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """Build ``--optim name``'s class once, on a tiny dummy parameter, with ``kwargs``.

    So that a value which parses but which the class rejects (``betas=(1.5,0.9)``) is reported
    before training starts, not when the Trainer builds the optimizer. ``batch_size`` defaults to
    1 here when ``kwargs`` lack it (the Trainer fills it in from its arguments).

    Raises:
        ValueError: prefixed ``--optim_args for NAME:``, with the class's own message.
    """
    cls = OPTIMIZERS[name].cls
    trial = dict(kwargs)
    if "batch_size" in inspect.signature(cls.__init__).parameters:
        trial.setdefault("batch_size", 1)
    try:
        cls([torch.nn.Parameter(torch.zeros(2, 2))], **trial)
    except (ValueError, TypeError) as error:
        raise ValueError(f"--optim_args for {name}: {error}") from None


def element_wise_names() -> list[str]:
    """The ``--optim`` names of the element-wise optimizers."""
    return [name for name, spec in OPTIMIZERS.items() if spec.element_wise]


# ---------------------------------------------------------------------------------------------
# TrainingArguments -> (class, kwargs)
# ---------------------------------------------------------------------------------------------


def optimizer_cls_and_kwargs(
    name: str, args: Any, model: torch.nn.Module | None = None
) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """Return ``(optimizer class, kwargs)`` for ``--optim name`` and these ``TrainingArguments``.

    The kwargs hold what the name derives from ``args`` (``learning_rate`` → ``lr``;
    ``adam_beta1/adam_beta2`` → ``betas`` of ``rootfree_adamw``; ``batch_size`` = per-device
    batch × gradient accumulation × world size), overridden by ``args.optim_args``. Weight decay
    is not among them: the Trainer puts it into its decay/no-decay parameter groups.

    It patches nothing, so it also serves ``Trainer(optimizer_cls_and_kwargs=...)`` directly.
    """
    key = str(getattr(name, "value", name))
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown hf_rootfree optimizer {key!r}; choose one of {', '.join(OPTIMIZERS)}")
    spec = OPTIMIZERS[key]
    if spec.deepspeed_unsupported is not None and getattr(args, "deepspeed", None):
        raise ValueError(
            f"--optim {key} does not support DeepSpeed: {spec.deepspeed_unsupported}, or pick an "
            f"element-wise --optim ({', '.join(element_wise_names())})."
        )
    kwargs = spec.from_training_args(args)
    kwargs.update(parse_optim_args(key, getattr(args, "optim_args", None)))
    check_optimizer_kwargs(key, kwargs)
    if model is not None and spec.takes_model:
        # not "model": the Trainer takes a "model" kwarg to be the parameters (its LOMO convention)
        kwargs["trainer_model"] = model
    return spec.cls, kwargs
