"""Resuming from a state dict: what comes from the checkpoint and what follows the run.

B (``batch_size``) is a property of the run (per-device batch × accumulation × world size), not of
the optimizer's history: a run resumed with another world size or gradient accumulation must use
its own B, while the state (moments, factors, step) comes from the checkpoint.
"""

from __future__ import annotations

import pytest
import torch

from hf_rootfree import RootFreeAdamW, RootFreeAdaX, RootFreeRMSprop, SIRFShampoo

#: every class that takes B, with explicit hyperparameters (no test here relies on defaults)
WITH_B = {
    "rootfree_adamw": (RootFreeAdamW, dict(lr=1e-2, betas=(0.9, 0.99), damping=1e-3)),
    "rootfree_rmsprop": (RootFreeRMSprop, dict(lr=1e-2, alpha=0.99, damping=1e-3, momentum=0.5)),
    "rootfree_adax": (RootFreeAdaX, dict(lr=1e-2, betas=(0.9, 1e-3), damping=1e-3, prior_steps=1.0)),
    "sirfshampoo": (SIRFShampoo, dict(lr=1e-2, precond_lr=0.1, damping=1e-3, update_freq=1)),
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


def _groups(model: torch.nn.Module) -> list[dict]:
    weights = [p for p in model.parameters() if p.ndim == 2]
    biases = [p for p in model.parameters() if p.ndim == 1]
    return [{"params": weights}, {"params": biases, "weight_decay": 0.0}]


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 4, generator=generator)
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize("name", WITH_B)
def test_load_state_dict_keeps_the_runs_batch_size_and_the_checkpoints_state(name):
    cls, kwargs = WITH_B[name]
    model = _model()
    saved_optimizer = cls(_groups(model), batch_size=16, weight_decay=0.01, **kwargs)
    _train(model, saved_optimizer, 3)
    checkpoint = saved_optimizer.state_dict()
    assert [g["batch_size"] for g in checkpoint["param_groups"]] == [16, 16]

    resumed = cls(_groups(model), batch_size=64, weight_decay=0.01, **kwargs)
    resumed.load_state_dict(checkpoint)
    assert [g["batch_size"] for g in resumed.param_groups] == [64, 64]
    assert [g["batch_size"] for g in resumed.state_dict()["param_groups"]] == [64, 64]
    # everything else of the groups and all of the state come from the checkpoint
    for mine, saved in zip(resumed.state_dict()["param_groups"], checkpoint["param_groups"]):
        assert {k: v for k, v in mine.items() if k != "batch_size"} == {
            k: v for k, v in saved.items() if k != "batch_size"
        }
    for index, state in checkpoint["state"].items():
        for key, value in state.items():
            assert torch.equal(resumed.state_dict()["state"][index][key], value), (index, key)
    # the checkpoint itself is not modified
    assert [g["batch_size"] for g in checkpoint["param_groups"]] == [16, 16]


@pytest.mark.parametrize("name", WITH_B)
def test_resumed_steps_use_the_runs_batch_size(name):
    """After loading a B = 16 checkpoint into a B = 64 optimizer, the next steps equal those of an
    uninterrupted optimizer whose B was changed to 64 at the same point."""
    cls, kwargs = WITH_B[name]
    model = _model()
    optimizer = cls(_groups(model), batch_size=16, weight_decay=0.01, **kwargs)
    _train(model, optimizer, 3)
    checkpoint = optimizer.state_dict()
    resumed_model = _model()
    resumed_model.load_state_dict(model.state_dict())
    resumed = cls(_groups(resumed_model), batch_size=64, weight_decay=0.01, **kwargs)
    resumed.load_state_dict(checkpoint)

    for group in optimizer.param_groups:
        group["batch_size"] = 64
    _train(model, optimizer, 3, seed=2)
    _train(resumed_model, resumed, 3, seed=2)
    for expected, actual in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(actual, expected)
