"""Mixed precision: GradScaler-skipped steps leave the state untouched; bf16 autocast trains.

Each test name is a claim; every --optim name of the package is covered.
"""

from __future__ import annotations

import math

import pytest
import torch
from optim_db import CLASSES, NAMES
from torch import nn

KWARGS = {
    "rootfree_adamw": {"lr": 1e-2, "batch_size": 8},
    "rootfree_rmsprop": {"lr": 1e-3, "batch_size": 8},
    "adax": {"lr": 1e-2},
    "rootfree_adax": {"lr": 1e-2, "batch_size": 8},
    "sirfshampoo": {"lr": 1e-2, "batch_size": 8, "update_freq": 1},
}


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 3))


def snapshot(optimizer: torch.optim.Optimizer) -> dict:
    return {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)


@pytest.mark.parametrize("name", NAMES)
def test_a_step_the_grad_scaler_skips_for_inf_leaves_every_state_tensor_untouched(name):
    model = net()
    optimizer = CLASSES[name](model.parameters(), **KWARGS[name])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(4):
        x, y = batch(step)
        optimizer.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        if step == 2:  # force an overflow in one gradient
            model[0].weight.grad[0, 0] = math.inf
            before_state = snapshot(optimizer)
            before_params = [p.detach().clone() for p in model.parameters()]
            scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        if step == 2:
            assert scaler.get_scale() < scale  # the scaler saw the inf and backed off
            after = snapshot(optimizer)
            assert after.keys() == before_state.keys()
            for key, state in before_state.items():
                for k, v in state.items():
                    assert torch.equal(after[key][k], v), (name, k)
            for p, q in zip(model.parameters(), before_params):
                assert torch.equal(p, q)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_trains_finite_and_the_loss_falls(name):
    model = net()
    kwargs = dict(KWARGS[name])
    if name == "sirfshampoo":
        kwargs["precond_dtype"] = torch.bfloat16
    optimizer = CLASSES[name](model.parameters(), **kwargs)
    x, y = batch(0)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    for state in optimizer.state.values():
        for value in state.values():
            assert torch.isfinite(value.float()).all()
