"""The config table of the element-wise optimizers (in the spirit of torch's ``optim_db``).

Every generic test in ``test_elementwise.py`` runs over :data:`OPTIM_DB`: each case is an optimizer
class with non-default hyperparameters (weight decay > 0, B ≠ 1, damping/eps that matter), the
float64 oracle of ``oracle.py`` that implements the same equations, and the map from the oracle's
symbols to the package's state keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import oracle
import torch

from hf_rootfree import OPTIMIZERS, AdaX, RootFreeAdamW, RootFreeAdaX, RootFreeRMSprop, SIRFShampoo
from hf_rootfree.optim.elementwise import PAPER_MODE

#: the --optim names and the classes they build: the registry's table (test_optim_args checks it
#: against the public names)
NAMES = list(OPTIMIZERS)
CLASSES = {name: spec.cls for name, spec in OPTIMIZERS.items()}
#: the element-wise classes, in the registry's order
ELEMENT_WISE_CLASSES = [spec.cls for spec in OPTIMIZERS.values() if spec.element_wise]

#: the three implementations of one update, selected by constructor flags
PATHS: dict[str, dict[str, bool]] = {
    "single_tensor": {"foreach": False, "fused": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}


def _adam_style_state(case: OptimCase, o: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {"exp_avg": o["m"], "s": o["s"]}


def _rmsprop_state(case: OptimCase, o: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {"s": o["s"], "momentum_buffer": o["b"]} if case.kwargs.get("momentum", 0.9) else {"s": o["s"]}


def _adax_state(case: OptimCase, o: dict[str, Any]) -> dict[str, torch.Tensor]:
    # The package keeps the normalized v̂ = v / c_t (see AdaX's docstring).
    return {"exp_avg": o["m"], "exp_avg_sq": o["v"] / oracle.adax_c(o["t"], case.kwargs["betas"][1])}


@dataclass(frozen=True)
class OptimCase:
    """One row of the table: an optimizer configuration and what it should compute."""

    id: str
    cls: type[torch.optim.Optimizer]
    kwargs: dict[str, Any]
    #: oracle.<fn>(mu, g, state, **kwargs) -> new mu
    oracle: Callable[..., torch.Tensor]
    #: maps the oracle's state dict (symbols) to the package's state keys, without "step"
    oracle_to_state: Callable[[OptimCase, dict[str, Any]], dict[str, torch.Tensor]]
    #: the name of the second-moment state key
    second_key: str
    #: a learning rate with which the small regression of the goes-down test trains well
    train_lr: float
    #: initial value s0 of the second moment
    second_init: float = 1.0

    def make(self, params: Any, **overrides: Any) -> torch.optim.Optimizer:
        return self.cls(params, **{**self.kwargs, **overrides})

    def __str__(self) -> str:
        return self.id


OPTIM_DB: list[OptimCase] = [
    OptimCase(
        "rootfree_adamw",
        RootFreeAdamW,
        dict(lr=2e-2, betas=(0.8, 0.95), damping=1e-3, weight_decay=0.1, batch_size=32, **PAPER_MODE),
        oracle.rootfree_adamw,
        _adam_style_state,
        "s",
        train_lr=0.3,
    ),
    OptimCase(
        "rootfree_adamw_bias_correction_paper_lr",
        RootFreeAdamW,
        dict(
            lr=1e-2,
            betas=(0.9, 0.95),
            damping=5e-2,
            weight_decay=0.05,
            batch_size=8,
            **{**PAPER_MODE, "s0": 0.0, "bias_correction": True},
        ),
        oracle.rootfree_adamw,
        _adam_style_state,
        "s",
        train_lr=1.0,
        second_init=0.0,
    ),
    OptimCase(
        "rootfree_adamw_default",
        RootFreeAdamW,
        dict(lr=1e-2, weight_decay=0.1, batch_size=32),
        oracle.rootfree_adamw,
        _adam_style_state,
        "s",
        train_lr=0.05,
        second_init=0.0,
    ),
    OptimCase(
        "rootfree_adamw_adaptive_damping_paper_lr",
        RootFreeAdamW,
        dict(lr=1e-2, betas=(0.8, 0.95), damping=1e-4, relative_damping=2.0, lr_units="paper", batch_size=8),
        oracle.rootfree_adamw,
        _adam_style_state,
        "s",
        train_lr=0.01,
        second_init=0.0,
    ),
    OptimCase(
        "rootfree_rmsprop",
        RootFreeRMSprop,
        dict(lr=1e-2, alpha=0.95, damping=1e-3, momentum=0.8, weight_decay=0.1, batch_size=32, **PAPER_MODE),
        oracle.rootfree_rmsprop,
        _rmsprop_state,
        "s",
        train_lr=0.1,
    ),
    OptimCase(
        "rootfree_rmsprop_default",
        RootFreeRMSprop,
        dict(lr=1e-2, alpha=0.95, weight_decay=0.1, batch_size=32),
        oracle.rootfree_rmsprop,
        _rmsprop_state,
        "s",
        train_lr=0.05,
        second_init=0.0,
    ),
    OptimCase(
        "rootfree_rmsprop_no_momentum",
        RootFreeRMSprop,
        dict(lr=2e-2, alpha=0.9, damping=1e-2, momentum=0.0, weight_decay=0.05, batch_size=16, **PAPER_MODE),
        oracle.rootfree_rmsprop,
        _rmsprop_state,
        "s",
        train_lr=0.1,
    ),
    OptimCase(
        "adax",
        AdaX,
        dict(lr=1e-2, betas=(0.8, 1e-3), eps=1e-3, weight_decay=0.1),
        oracle.adax,
        _adax_state,
        "exp_avg_sq",
        train_lr=0.1,
        second_init=0.0,
    ),
    OptimCase(
        "rootfree_adax",
        RootFreeAdaX,
        dict(
            lr=2e-2,
            betas=(0.8, 1e-3),
            damping=1e-3,
            weight_decay=0.1,
            prior_steps=2.0,
            batch_size=32,
            s0=1.0,
            relative_damping=0.0,
            lr_units="paper",
        ),
        oracle.rootfree_adax,
        _adam_style_state,
        "s",
        train_lr=0.3,
    ),
    OptimCase(
        "rootfree_adax_default",
        RootFreeAdaX,
        dict(lr=1e-2, betas=(0.8, 1e-3), weight_decay=0.1, batch_size=32),
        oracle.rootfree_adax,
        _adam_style_state,
        "s",
        train_lr=0.05,
        second_init=0.0,
    ),
    OptimCase(
        "rootfree_adax_no_prior",
        RootFreeAdaX,
        dict(
            lr=1e-2,
            betas=(0.9, 1e-3),
            damping=1e-2,
            weight_decay=0.01,
            prior_steps=0.0,
            batch_size=4,
            s0=1.0,
            relative_damping=0.0,
            lr_units="paper",
        ),
        oracle.rootfree_adax,
        _adam_style_state,
        "s",
        train_lr=0.1,
    ),
]

#: the cases whose optimizer is AdaX-like (the long-term-memory schedule)
ADAX_CASES = [case for case in OPTIM_DB if case.cls in (AdaX, RootFreeAdaX)]


# ---------------------------------------------------------------------------------------------
# The OptimizerInfo table of all five classes, for the generic tests of test_conformance.py.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimizerInfo:
    """One optimizer class as torch's ``OptimizerInfo`` describes it: configurations to try and
    the generic tests it does not support (each with the reason, as documented)."""

    cls: type[torch.optim.Optimizer]
    #: keyword configurations (ids -> kwargs) that every generic test runs
    configs: dict[str, dict[str, Any]]
    #: the implementation flags to try: the element-wise paths, or nothing for SIRFShampoo
    paths: dict[str, dict[str, bool]]
    #: generic test name -> why it does not apply
    skips: dict[str, str]
    #: config id -> a learning rate with which a small regression trains well
    train_lrs: dict[str, float]

    def __str__(self) -> str:
        return self.cls.__name__


def _configs_of(cls: type[torch.optim.Optimizer]) -> dict[str, dict[str, Any]]:
    return {case.id: case.kwargs for case in OPTIM_DB if case.cls is cls}


def _train_lrs_of(cls: type[torch.optim.Optimizer]) -> dict[str, float]:
    return {case.id: case.train_lr for case in OPTIM_DB if case.cls is cls}


OPTIMIZER_INFOS: list[OptimizerInfo] = [
    *(OptimizerInfo(cls, _configs_of(cls), PATHS, {}, _train_lrs_of(cls)) for cls in ELEMENT_WISE_CLASSES),
    OptimizerInfo(
        SIRFShampoo,
        {
            "sirfshampoo": dict(lr=2e-2, momentum=0.8, weight_decay=0.1, precond_lr=0.1, batch_size=8),
            "sirfshampoo_diagonal_t2": dict(
                lr=2e-2,
                momentum=0.0,
                precond_momentum=0.0,
                batch_size=8,
                update_freq=2,
                structures="diagonal",
            ),
        },
        {"default": {}},
        {},
        {"sirfshampoo": 0.05, "sirfshampoo_diagonal_t2": 0.05},
    ),
]
