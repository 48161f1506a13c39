"""The one module that touches transformers internals: registering ``--optim`` names.

``transformers`` has a closed list of optimizer names. :func:`register` opens it, using exactly
two internals:

1. ``transformers.training_args.OptimizerNames`` (an ``ExplicitEnum``): our names are added as
   enum members, so ``TrainingArguments(optim="rootfree_adamw")`` converts the string, and
   ``HfArgumentParser(TrainingArguments)`` (which reads the enum's members into argparse
   ``choices`` when the parser is built) accepts ``--optim rootfree_adamw``.
2. ``transformers.Trainer.get_optimizer_cls_and_kwargs`` (a static method): wrapped so that our
   names are answered by :func:`hf_rootfree.optimizer_cls_and_kwargs` and every other name by the
   original method, unchanged.

Tested on transformers 4.57.6 and 5.24.0 (declared range: ``>=4.57,<6``). If either internal is
not what we expect, :func:`register` raises :class:`IntegrationError` naming it and pointing to
the fallback that patches nothing, ``Trainer(optimizer_cls_and_kwargs=
hf_rootfree.optimizer_cls_and_kwargs(name, args, model))``.
"""

from __future__ import annotations

import enum
import functools
import threading
from typing import Any

from ..registry import OPTIMIZERS, optimizer_cls_and_kwargs

__all__ = ["IntegrationError", "register"]

_FALLBACK = (
    "Use the fallback that patches nothing: Trainer(..., optimizer_cls_and_kwargs="
    "hf_rootfree.optimizer_cls_and_kwargs(name, training_args, model))"
)
_lock = threading.Lock()
_WRAPPED_MARK = "__hf_rootfree_wrapped__"


class IntegrationError(RuntimeError):
    """transformers' internals are not what hf_rootfree expects."""


def _add_enum_member(cls: type[enum.Enum], name: str, value: str) -> None:
    if value in cls._value2member_map_:
        return
    member = str.__new__(cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = cls  # type: ignore[attr-defined]
    member.__init__(value)  # type: ignore[misc]
    if hasattr(cls, "_add_member_"):  # Python >= 3.13
        cls._add_member_(name, member)  # type: ignore[attr-defined]
    else:
        cls._member_map_[name] = member
        cls._member_names_.append(name)
        type.__setattr__(cls, name, member)
    cls._value2member_map_[value] = member


def _check_internals(optimizer_names: Any, trainer_cls: Any) -> None:
    problems = []
    if not (
        isinstance(optimizer_names, type)
        and issubclass(optimizer_names, str)
        and issubclass(optimizer_names, enum.Enum)
    ):
        problems.append("transformers.training_args.OptimizerNames is no longer a str Enum")
    elif not all(hasattr(optimizer_names, attr) for attr in ("_value2member_map_", "_member_map_")):
        problems.append("OptimizerNames lacks the Enum member maps")
    method = trainer_cls.__dict__.get("get_optimizer_cls_and_kwargs")
    if not isinstance(method, staticmethod):
        problems.append("Trainer.get_optimizer_cls_and_kwargs is no longer a static method")
    if problems:
        import transformers

        raise IntegrationError(
            f"hf_rootfree cannot register its --optim names with transformers "
            f"{transformers.__version__}: {'; '.join(problems)}. Supported: transformers >=4.57,<6. "
            + _FALLBACK
        )


def register() -> None:
    """Register hf_rootfree's ``--optim`` names with transformers. Idempotent.

    Raises:
        IntegrationError: transformers' internals changed (the message names the fallback).
    """
    from transformers import Trainer
    from transformers.training_args import OptimizerNames

    with _lock:
        _check_internals(OptimizerNames, Trainer)
        for name in OPTIMIZERS:
            _add_enum_member(OptimizerNames, name.upper(), name)

        original = Trainer.__dict__["get_optimizer_cls_and_kwargs"].__func__
        if getattr(original, _WRAPPED_MARK, False):
            return

        @functools.wraps(original)
        def get_optimizer_cls_and_kwargs(args: Any, model: Any = None) -> tuple[Any, Any]:
            name = str(getattr(args.optim, "value", args.optim))
            if name in OPTIMIZERS:
                return optimizer_cls_and_kwargs(name, args, model)
            return original(args, model)

        setattr(get_optimizer_cls_and_kwargs, _WRAPPED_MARK, True)
        Trainer.get_optimizer_cls_and_kwargs = staticmethod(get_optimizer_cls_and_kwargs)
