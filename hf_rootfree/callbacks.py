"""Opt-in diagnostics for the Hugging Face Trainer."""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback

__all__ = ["RootFreeDiagnosticsCallback"]


def _unwrap(optimizer: Any) -> Any:
    # accelerate wraps the optimizer (AcceleratedOptimizer.optimizer)
    while optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = getattr(optimizer, "optimizer", None)
    while hasattr(optimizer, "optimizer") and isinstance(optimizer.optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class RootFreeDiagnosticsCallback(TrainerCallback):
    """Add the optimizer's statistics to every Trainer log (so to ``report_to`` loggers too).

    Each hf_rootfree optimizer has a ``diagnostics()`` method returning floats, e.g. for the
    element-wise family ``s_mean`` (the mean curvature estimate s), ``precond_mean`` (the mean
    per-element step scale 1/d of the last step) and ``adaptive_fraction`` (the share of elements
    whose B·g² exceeds the damping and any prior: near 0 the method is SGD-like, as the paper's
    s0 = 1 prior is early in training). They are logged as ``optim/<key>``, computed
    only at logging steps. SIRFShampoo's ``diagnostics()`` also warns (once) when its factor updates
    keep being skipped as non-finite, so attaching this callback is what surfaces that in a run.

    The Trainer calls callbacks in order and its reporters come first, so attach this one in
    front of them::

        RootFreeDiagnosticsCallback.attach(trainer)
    """

    @classmethod
    def attach(cls, trainer: Any) -> RootFreeDiagnosticsCallback:
        """Create the callback and put it first in ``trainer``'s callbacks."""
        callback = cls()
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        optimizer = _unwrap(kwargs.get("optimizer"))
        if logs is None or optimizer is None or not hasattr(optimizer, "diagnostics"):
            return
        stats = {f"optim/{key}": value for key, value in optimizer.diagnostics().items()}
        logs.update(stats)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(stats)
