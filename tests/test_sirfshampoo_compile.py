"""SIRFShampoo under ``torch.compile(opt.step)``: the same numbers as eager, one graph per step.

Each test name is a claim. The model is tiny (a Linear whose weight and bias share a block, a
LayerNorm's two vectors, a free 3-D parameter) so that inductor compiles on the CPU in seconds;
``update_freq=2`` puts a factor update at every other step, and a tensor ``lr`` changes at every
step, as a schedule would.
"""

from __future__ import annotations

import pytest
import torch
from sirf_paper import SIRFShampoo
from torch import nn
from torch._dynamo.utils import counters

import hf_rootfree

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # inductor's own deprecations


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    model.register_parameter("cube", nn.Parameter(torch.randn(2, 3, 2)))
    return model


def gradients(model: nn.Module, steps: int) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [[torch.randn(p.shape, generator=gen) for p in model.parameters()] for _ in range(steps)]


def make(cls: type, model: nn.Module, **kwargs) -> torch.optim.Optimizer:
    hyper = dict(momentum=0.9, weight_decay=0.01, precond_lr=0.1, damping=1e-3, batch_size=4, update_freq=2)
    return cls(model.parameters(), lr=torch.tensor(0.02), model=model, **hyper, **kwargs)


def run(
    model: nn.Module, opt: torch.optim.Optimizer, step, grads: list[list[torch.Tensor]], start: int
) -> None:
    """Steps ``start`` … of ``grads``, the lr decaying at each (a CPU tensor, filled in place)."""
    for k in range(start, len(grads)):
        for p, g in zip(model.parameters(), grads[k]):
            p.grad = g.clone()
        opt.param_groups[0]["lr"].fill_(0.02 * (1 - k / 20))
        step()


def test_the_inductor_compiled_step_equals_eager_over_two_factor_updates() -> None:
    """Step 0 (state creation) eager, then steps 1–4 compiled with inductor: factor updates at 2
    and 4. Parameters, factors and momenta agree with an eager twin within 1e-5 relative."""
    torch._dynamo.reset()
    eager_model, compiled_model = tiny_model(), tiny_model()
    eager, compiled = (
        make(hf_rootfree.SIRFShampoo, eager_model),
        make(hf_rootfree.SIRFShampoo, compiled_model),
    )
    grads = gradients(eager_model, 5)
    run(eager_model, eager, eager.step, grads, 0)
    run(compiled_model, compiled, compiled.step, grads[:1], 0)
    run(compiled_model, compiled, torch.compile(compiled.step, backend="inductor"), grads, 1)
    for p, q in zip(compiled_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    for p, q in zip(compiled_model.parameters(), eager_model.parameters()):
        for key, value in eager.state[q].items():
            torch.testing.assert_close(compiled.state[p][key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert int(compiled.state[next(compiled_model.parameters())]["step"]) == 5


@pytest.mark.parametrize("cls", [hf_rootfree.SIRFShampoo, SIRFShampoo], ids=["adamw-units", "paper"])
def test_the_compiled_step_has_no_graph_break_and_stops_recompiling_after_warm_up(cls: type) -> None:
    """aot_eager (the backend that specializes a changing float, which inductor also does): no
    graph break at any step; after 4 steps (state creation, step 1, then one graph per kind of
    step once the step counter is symbolic) the next 6 steps, 3 of them factor updates, compile
    nothing new."""
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model()
    opt = make(cls, model)
    step = torch.compile(opt.step, backend="aot_eager")
    grads = gradients(model, 10)
    run(model, opt, step, grads[:4], 0)
    warm = counters["stats"]["unique_graphs"]
    assert warm <= 4
    run(model, opt, step, grads, 4)
    assert counters["stats"]["unique_graphs"] == warm
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
