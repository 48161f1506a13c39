"""What both optimizer families share: argument checks and parameter/gradient checks.

Errors name the argument (or the parameter), its value and what is allowed. The distributed
helpers live in ``_distributed.py``; checkpoint loading in ``_checkpoint.py``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

BATCH_SIZE_HELP = (
    "B is the number of examples the loss is averaged over in one optimizer step (the global batch: "
    "per-device batch × gradient accumulation steps × number of processes). The root-free "
    "preconditioner tracks B·g², the per-example curvature, which is what makes lr and damping "
    "transfer across batch sizes (Lin et al., 2024). The Hugging Face Trainer integration fills it "
    "in for you."
)


def check_real(name: str, value: Any, owner: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {name} must be a real number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be finite, got {value!r}")
    return float(value)


def check_range(
    name: str, value: Any, owner: str, low: float, high: float, *, low_open=False, high_open=True
) -> None:
    v = check_real(name, value, owner)
    too_low = v <= low if low_open else v < low
    too_high = v >= high if high_open else v > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{owner}: {name} must be in {interval}, got {value!r}")


def check_nonnegative(name: str, value: Any, owner: str) -> None:
    check_range(name, value, owner, 0.0, math.inf)


def check_lr(value: Any, owner: str) -> None:
    """lr: a real number ≥ 0, or (as in torch.optim) a 1-element tensor; ours must be on the CPU,
    where reading it at each step costs no device synchronization."""
    if torch.is_tensor(value):
        if value.numel() != 1:
            shape = tuple(value.shape)
            raise ValueError(f"{owner}: Tensor lr must be 1-element, got a tensor of shape {shape}")
        if value.device.type != "cpu":
            raise ValueError(
                f"{owner}: lr as a Tensor on {value.device} is not supported (reading it at every step "
                "would synchronize with the device); use a float or a CPU tensor"
            )
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{owner}: lr must be a real number, got a {value.dtype} tensor")
        value = float(value)
    check_nonnegative("lr", value, owner)


def with_float_lr(group: dict[str, Any]) -> dict[str, Any]:
    """The group with a tensor lr read as a float (a CPU tensor: no device sync)."""
    if torch.is_tensor(group["lr"]):
        return {**group, "lr": float(group["lr"])}
    return group


def check_betas(value: Any, owner: str) -> None:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{owner}: betas must be a pair (beta1, beta2), got {value!r}")


#: the units of lr: AdamW's (the default) or the paper's
LR_UNITS = ("adamw", "paper")


def check_lr_units(value: Any, owner: str) -> None:
    if value not in LR_UNITS:
        raise ValueError(f"{owner}: lr_units must be one of {LR_UNITS}, got {value!r}")


def check_batch_size(value: Any, owner: str) -> None:
    if value is None:
        raise TypeError(f"{owner} needs the keyword argument batch_size (B). {BATCH_SIZE_HELP}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: batch_size must be a positive number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{owner}: batch_size must be a positive number, got {value!r}")


def check_state_dtype(value: Any, owner: str) -> None:
    if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise TypeError(
            f"{owner}: state_dtype must be None or a floating torch.dtype (torch.float32, "
            f"torch.bfloat16, torch.float16, torch.float64), got {value!r}"
        )


def check_positive_int(name: str, value: Any, owner: str, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "None or a positive integer" if allow_none else "a positive integer"
        raise ValueError(f"{owner}: {name} must be {allowed}, got {value!r}")


def check_param(p: torch.Tensor, owner: str) -> None:
    """A parameter the optimizers can update: real floating point."""
    if p.is_complex():
        raise TypeError(
            f"{owner} does not support complex parameters (got one of dtype {p.dtype} and "
            f"shape {tuple(p.shape)}); optimize torch.view_as_real(p) instead"
        )
    if not p.is_floating_point():
        raise TypeError(f"{owner} optimizes floating-point parameters, got dtype {p.dtype}")


def check_grad(p: torch.Tensor, owner: str) -> None:
    """The gradient of ``p``: dense, of the parameter's dtype and shape."""
    grad = p.grad
    if grad.is_sparse:
        raise RuntimeError(
            f"{owner} does not support sparse gradients (parameter of shape {tuple(p.shape)}); use "
            "dense gradients, e.g. nn.Embedding(sparse=False)"
        )
    if grad.dtype != p.dtype or grad.shape != p.shape:
        raise RuntimeError(
            f"{owner}: a gradient of dtype {grad.dtype} and shape {tuple(grad.shape)} does not match "
            f"its parameter ({p.dtype}, {tuple(p.shape)})"
        )
