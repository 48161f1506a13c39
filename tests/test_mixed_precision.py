"""Mixed precision: GradScaler steps equal unscaled ones, a skipped step leaves no trace; bf16 trains.

Each test name is a claim; every --optim name of the package is covered.
"""

from __future__ import annotations

import math

import pytest
import torch
from optim_db import CLASSES, NAMES
from torch import nn

from hf_rootfree.registry import OPTIMIZERS

#: per registry name: lr 1e-2 (B for the root-free ones), with these exceptions
_EXCEPTIONS = {"rootfree_rmsprop": {"lr": 1e-3}, "sirfshampoo": {"update_freq": 1}}
KWARGS = {
    name: {"lr": 1e-2, **({"batch_size": 8} if spec.root_free else {}), **_EXCEPTIONS.get(name, {})}
    for name, spec in OPTIMIZERS.items()
}


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 3))


def snapshot(optimizer: torch.optim.Optimizer) -> dict:
    return {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)


def train(name: str, steps: int, scaler: torch.amp.GradScaler | None = None, inf_at: int | None = None):
    """``steps`` steps of one model; with a scaler, the loss is scaled and the gradient of step
    ``inf_at`` gets an inf; without one, step ``inf_at`` is left out. Returns the model, the
    optimizer and how often ``optimizer.step`` ran."""
    model = net()
    optimizer = CLASSES[name](model.parameters(), **KWARGS[name])
    calls = []
    step = optimizer.step
    optimizer.step = lambda *args, **kwargs: calls.append(1) or step(*args, **kwargs)
    for i in range(steps):
        x, y = batch(i)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if scaler is None:
            if i != inf_at:
                loss.backward()
                optimizer.step()
            continue
        scaler.scale(loss).backward()
        if i == inf_at:
            model[0].weight.grad[0, 0] = math.inf
        scaler.step(optimizer)
        scaler.update()
    return model, optimizer, len(calls)


def assert_same(
    a: tuple[nn.Module, torch.optim.Optimizer], b: tuple[nn.Module, torch.optim.Optimizer]
) -> None:
    for p, q in zip(a[0].parameters(), b[0].parameters()):
        assert torch.equal(p, q)
    state_a, state_b = a[1].state_dict()["state"], b[1].state_dict()["state"]
    assert state_a.keys() == state_b.keys() and state_a
    for index, state in state_a.items():
        assert state.keys() == state_b[index].keys()
        for key, value in state.items():
            assert torch.equal(value, state_b[index][key]), (index, key)


@pytest.mark.parametrize("name", NAMES)
def test_grad_scaler_finite_steps_equal_unscaled_steps_and_a_skipped_inf_step_leaves_no_trace(name):
    """With a power-of-two scale the unscaled gradients are exact, so the optimizer's own step,
    called by the scaler, must give bitwise the result of an unscaled run; an inf step must not
    call it at all, and the run must go on exactly as one that never had that step."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    finite = train(name, 2, scaler)
    assert finite[2] == 2
    assert_same(finite[:2], train(name, 2)[:2])

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    skipped = train(name, 4, scaler, inf_at=2)
    assert skipped[2] == 3  # the scaler saw the inf and did not call the optimizer
    assert scaler.get_scale() == 2.0**9  # ... and backed off
    assert all(float(state["step"]) == 3 for state in skipped[1].state.values() if "step" in state)
    assert_same(skipped[:2], train(name, 4, inf_at=2)[:2])


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
