"""Tests of the element-wise optimizers: RootFreeAdamW, RootFreeRMSprop, AdaX, RootFreeAdaX.

Each test name is a claim. Generic tests run over the config table ``optim_db.OPTIM_DB`` and over
the three implementations of the update (``optim_db.PATHS``); the ground truth is the float64
oracle of ``oracle.py``, written from the equations without looking at the package.
"""

from __future__ import annotations

import dataclasses
import io
import math

import oracle
import pytest
import torch
from host_reads import HostReads
from optim_db import ADAX_CASES, ELEMENT_WISE_CLASSES, OPTIM_DB, PATHS, OptimCase

from hf_rootfree import OPTIMIZERS, AdaX, RootFreeAdamW, RootFreeAdaX, RootFreeRMSprop
from hf_rootfree.optim import _fused, elementwise
from hf_rootfree.optim.elementwise import adax_weight

ALL_CLASSES = ELEMENT_WISE_CLASSES
ROOT_FREE_CLASSES = [spec.cls for spec in OPTIMIZERS.values() if spec.element_wise and spec.root_free]
#: keyword arguments every class needs (B for the root-free ones)
REQUIRED = {cls: {"batch_size": 8} if cls in ROOT_FREE_CLASSES else {} for cls in ALL_CLASSES}

#: shapes the oracle test covers, including 0-d and zero-size tensors
SHAPES = [(), (0,), (0, 3), (5,), (4, 3), (2, 3, 4), (1, 5, 1)]

cases = pytest.mark.parametrize("case", OPTIM_DB, ids=str)
adax_cases = pytest.mark.parametrize("case", ADAX_CASES, ids=str)
paths = pytest.mark.parametrize("path", list(PATHS))


def test_the_fused_cpu_kernel_builds_and_loads() -> None:
    """Every test of the ``fused`` path depends on it (a C++ compiler and ninja are required)."""
    assert _fused.fused_kernel_available(), "the fused CPU kernel did not build; see the warning"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def make_params(dtype: torch.dtype, gen: torch.Generator) -> list[torch.Tensor]:
    """Leaf parameters of every shape in SHAPES plus a non-contiguous (transposed) one."""
    params = [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for shape in SHAPES]
    params.append(torch.randn(4, 6, generator=gen, dtype=torch.float64).to(dtype).t())
    assert not params[-1].is_contiguous()
    return [p.requires_grad_() for p in params]


def random_grad(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
    if p.dim() == 2 and not p.is_contiguous():
        g = g.t().contiguous().t()  # a non-contiguous gradient for the non-contiguous parameter
    return g


def clone_params(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def state_of(opt: torch.optim.Optimizer, p: torch.Tensor) -> dict[str, torch.Tensor]:
    return opt.state[p]


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    assert actual.dtype == expected.dtype, what
    assert actual.shape == expected.shape, what
    assert torch.equal(actual, expected), (
        f"{what}: max diff {(actual.double() - expected.double()).abs().max()}"
    )


def assert_within_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: float, what: str = "") -> None:
    """|actual − expected| ≤ ulps·eps(dtype)·max|expected|: a few roundings at the tensor's scale."""
    assert actual.dtype == expected.dtype, what
    if expected.numel() == 0:
        return
    scale = max(expected.double().abs().max().item(), 1e-30)
    diff = (actual.double() - expected.double()).abs().max().item()
    assert diff <= ulps * torch.finfo(expected.dtype).eps * scale, (
        f"{what}: max diff {diff:.3g} is {diff / (torch.finfo(expected.dtype).eps * scale):.2f} ulps"
    )


def assert_optimizers_equal(opt_a, params_a, opt_b, params_b, *, ulps: float | None = None) -> None:
    """Parameters and every state tensor equal (bitwise, or within `ulps`)."""
    for i, (pa, pb) in enumerate(zip(params_a, params_b)):
        pairs = [("param", pa.detach(), pb.detach())]
        sa, sb = state_of(opt_a, pa), state_of(opt_b, pb)
        assert sa.keys() == sb.keys(), f"param {i}: state keys {sorted(sa)} != {sorted(sb)}"
        pairs += [(key, sa[key], sb[key]) for key in sa]
        for key, a, b in pairs:
            if ulps is None or key == "step":
                assert_bitwise_equal(a, b, f"param {i} {key}")
            else:
                assert_within_ulps(a, b, ulps, f"param {i} {key}")


def assert_matches_oracle(case, opt, params, oracle_params, oracle_states, *, rtol: float) -> None:
    for i, (p, mu, o) in enumerate(zip(params, oracle_params, oracle_states)):
        torch.testing.assert_close(p.detach(), mu, rtol=rtol, atol=rtol, msg=lambda m, i=i: f"param {i}: {m}")
        state = state_of(opt, p)
        if not o:  # never stepped: the package must not have created state either
            assert len(state) == 0, f"param {i}"
            continue
        expected = case.oracle_to_state(case, o)
        assert set(state) == {"step", *expected}, f"param {i}: state keys {sorted(state)}"
        assert state["step"].item() == o["t"]
        for key, value in expected.items():
            torch.testing.assert_close(
                state[key], value, rtol=rtol, atol=rtol, msg=lambda m, i=i, key=key: f"param {i} {key}: {m}"
            )


def regression_problem(dtype: torch.dtype = torch.float32):
    """A tiny MLP regression with a full batch of 32 examples; returns (model, loss_fn)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=gen)
    y = torch.sin(x @ torch.randn(8, 1, generator=gen))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(dtype)
    x, y = x.to(dtype), y.to(dtype)

    def loss_fn() -> torch.Tensor:
        return torch.nn.functional.mse_loss(model(x).float(), y.float())

    return model, loss_fn


# ---------------------------------------------------------------------------------------------
# the math: every path equals the float64 oracle of the equations
# ---------------------------------------------------------------------------------------------


@cases
@paths
def test_every_path_matches_the_float64_oracle_over_120_steps(case: OptimCase, path: str) -> None:
    """Parameters and state equal the oracle (rtol 1e-10) on 0-d, zero-size, odd-shaped and
    non-contiguous float64 parameters; one parameter skips every third step (grad None), so
    tensors in one group are at different steps."""
    check_against_the_oracle_over_120_steps(case, **PATHS[path])


def check_against_the_oracle_over_120_steps(case: OptimCase, **flags: bool) -> None:
    """The body of the oracle test, for any path (``flags`` select it)."""
    gen = torch.Generator().manual_seed(1234)
    params = make_params(torch.float64, gen)
    oracle_params = [p.detach().clone() for p in params]
    oracle_states: list[dict] = [{} for _ in params]
    opt = case.make(params, **flags)
    skipper = 3  # index of the (5,) parameter
    for step in range(1, 121):
        for i, p in enumerate(params):
            if i == skipper and step % 3 == 0:
                p.grad = None
                continue
            p.grad = random_grad(p, gen)
            oracle_params[i] = case.oracle(oracle_params[i], p.grad, oracle_states[i], **case.kwargs)
        opt.step()
        if step % 10 == 0:
            assert_matches_oracle(case, opt, params, oracle_params, oracle_states, rtol=1e-10)
    assert state_of(opt, params[skipper])["step"].item() == 80
    assert state_of(opt, params[0])["step"].item() == 120


@adax_cases
@pytest.mark.parametrize("start", [10**5, 10**6])
def test_adax_schedule_equals_the_direct_formula_at_large_steps(case: OptimCase, start: int) -> None:
    """With β2 = 1e-4, at t = 10^5 and 10^6 one step of the package equals one step of the oracle
    (the original unnormalized AdaX: v = v̂·c_{t−1}) started from the same state, in float64."""
    case = dataclasses.replace(case, kwargs={**case.kwargs, "betas": (0.9, 1e-4)})
    gen = torch.Generator().manual_seed(5)
    p = torch.randn(7, generator=gen, dtype=torch.float64).requires_grad_()
    opt = case.make([p])
    p.grad = random_grad(p, gen)
    opt.step()
    state = state_of(opt, p)
    state["step"].fill_(start - 1)
    o = {"t": start - 1, "m": state["exp_avg"].clone()}
    if case.cls is AdaX:
        o["v"] = state["exp_avg_sq"] * oracle.adax_c(start - 1, 1e-4)
    else:
        o["s"] = state["s"].clone()
    p.grad = random_grad(p, gen)
    expected = case.oracle(p.detach().clone(), p.grad, o, **case.kwargs)
    opt.step()
    torch.testing.assert_close(p.detach(), expected, rtol=1e-9, atol=1e-12)
    for key, value in case.oracle_to_state(case, o).items():
        torch.testing.assert_close(state[key], value, rtol=1e-8, atol=1e-12)


@cases
@pytest.mark.parametrize("path", ["foreach", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fast_paths_equal_the_reference_path_in_low_precision(
    case: OptimCase, path: str, dtype: torch.dtype
) -> None:
    """Over 60 steps, with float32 state: the fused kernel is bitwise equal to the single-tensor
    reference path, except for AdaX: torch's vectorized float32 CPU sqrt is not correctly rounded
    (1 ulp off on many inputs) while the kernel's std::sqrt is. foreach is within a few ulps
    (it groups the same operations differently, e.g. lr·(m/d) instead of (lr·m)/d)."""
    results = {}
    for name in ("single_tensor", path):
        gen = torch.Generator().manual_seed(7)
        params = [*make_params(dtype, gen), torch.randn(300, generator=gen).to(dtype).requires_grad_()]
        opt = case.make(params, **PATHS[name])
        for _ in range(60):
            for p in params:
                p.grad = random_grad(p, gen)
            opt.step()
        results[name] = (opt, params)
    bitwise = path == "fused" and case.cls is not AdaX
    # NOTE: the heavy ball with the adaptive (per-tensor 0-d tensor) coefficients accumulates up to
    # ~70 ulps of rounding difference on foreach over 60 steps (measured 69); the rest stays within 8.
    loose = case.cls is RootFreeRMSprop and case.kwargs.get("lr_units", "adamw") == "adamw"
    assert_optimizers_equal(
        *results["single_tensor"], *results[path], ulps=None if bitwise else (128 if loose else 8)
    )


@cases
def test_default_flags_use_the_fused_kernel_on_cpu(case: OptimCase, monkeypatch) -> None:
    calls = []
    fused = elementwise._PATHS["fused"]
    monkeypatch.setitem(elementwise._PATHS, "fused", lambda *a, **k: (calls.append(1), fused(*a, **k)))
    p = torch.ones(3, requires_grad=True)
    opt = case.make([p])
    p.grad = torch.ones(3)
    opt.step()
    assert calls == [1]
    assert not torch.equal(p.detach(), torch.ones(3))


# ---------------------------------------------------------------------------------------------
# state: dtype and layout
# ---------------------------------------------------------------------------------------------


@cases
@pytest.mark.parametrize(
    ("param_dtype", "state_dtype"),
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float64, torch.float64),
    ],
    ids=str,
)
def test_state_is_float32_for_low_precision_params_and_float64_for_float64(
    case: OptimCase, param_dtype: torch.dtype, state_dtype: torch.dtype
) -> None:
    p = torch.zeros(4, 3, dtype=param_dtype).t().requires_grad_()
    opt = case.make([p], lr=0.0)
    p.grad = torch.zeros_like(p)
    opt.step()
    state = state_of(opt, p)
    assert state["step"].dtype == torch.float64 and state["step"].device.type == "cpu"
    assert state["step"].dim() == 0 and state["step"].item() == 1
    for key in set(state) - {"step"}:
        assert state[key].dtype == state_dtype, key
        assert state[key].shape == p.shape and state[key].is_contiguous(), key


@cases
@paths
def test_state_dtype_argument_is_honored(case: OptimCase, path: str) -> None:
    """``state_dtype=torch.bfloat16`` keeps every state tensor (not ``step``) in bf16, for float32
    and bfloat16 parameters, and the path agrees with the reference path on that state."""
    results = {}
    for name in ("single_tensor", path):
        gen = torch.Generator().manual_seed(3)
        params = [torch.randn(4, 3, generator=gen).requires_grad_(), torch.randn(6, generator=gen).bfloat16()]
        params[1].requires_grad_()
        opt = case.make(params, state_dtype=torch.bfloat16, **PATHS[name])
        for _ in range(10):
            for p in params:
                p.grad = random_grad(p, gen)
            opt.step()
        for p in params:
            state = state_of(opt, p)
            assert state["step"].dtype == torch.float64
            assert {state[key].dtype for key in set(state) - {"step"}} == {torch.bfloat16}
        results[name] = (opt, params)
    bitwise = path != "foreach" and case.cls is not AdaX
    # NOTE: the heavy ball with the adaptive (per-tensor 0-d tensor) coefficients accumulates up to
    # ~70 ulps of rounding difference on foreach over 60 steps (measured 69); the rest stays within 8.
    loose = case.cls is RootFreeRMSprop and case.kwargs.get("lr_units", "adamw") == "adamw"
    assert_optimizers_equal(
        *results["single_tensor"], *results[path], ulps=None if bitwise else (128 if loose else 8)
    )


# ---------------------------------------------------------------------------------------------
# checkpoints: state_dict survives torch.load(weights_only=True) and resumes bit for bit
# ---------------------------------------------------------------------------------------------


def _three_groups(case: OptimCase, params: list[torch.Tensor], path: str, **ctor) -> torch.optim.Optimizer:
    """Group 0: the case's hyperparameters; group 1: other lr, weight decay (and B);
    group 2: ``state_dtype=torch.bfloat16``."""
    other = {"lr": case.kwargs["lr"] * 3, "weight_decay": 0.0}
    if "batch_size" in case.kwargs:
        other["batch_size"] = 128
    groups = [
        {"params": params[0:2]},
        {"params": params[2:4], **other},
        {"params": params[4:5], "state_dtype": torch.bfloat16},
    ]
    return case.cls(groups, **{**case.kwargs, **ctor}, **PATHS[path])


def _resume_params() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    params = [
        torch.randn(4, 3, generator=gen),
        torch.randn(5, generator=gen).bfloat16(),
        torch.randn(6, 2, generator=gen).bfloat16().t(),
        torch.randn(3, generator=gen),
        torch.randn(2, 2, generator=gen),
    ]
    return [p.requires_grad_() for p in params]


def _save_and_load(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@cases
@paths
def test_resume_from_a_weights_only_checkpoint_is_bitwise_identical(case: OptimCase, path: str) -> None:
    """Run 5 steps, save, load into a fresh optimizer built with other hyperparameters, run 5 more:
    parameters and state equal an uninterrupted 10-step run bit for bit; after loading, bf16
    parameters keep float32 state and the ``state_dtype=bf16`` group keeps bf16 state."""
    gen = torch.Generator().manual_seed(12)
    shapes = [p.shape for p in _resume_params()]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(10)]

    def run(opt, params, steps):
        for step in steps:
            for p, g in zip(params, grads[step]):
                p.grad = g.to(p.dtype)
            opt.step()

    straight_params = _resume_params()
    straight = _three_groups(case, straight_params, path)
    run(straight, straight_params, range(10))

    params = _resume_params()
    opt = _three_groups(case, params, path)
    run(opt, params, range(5))
    checkpoint = _save_and_load({"optimizer": opt.state_dict(), "params": [p.detach() for p in params]})
    del opt, params

    params = [p.clone().requires_grad_() for p in checkpoint["params"]]
    params[2] = checkpoint["params"][2].t().contiguous().t().requires_grad_()  # non-contiguous again
    resumed = _three_groups(case, params, path, lr=0.5, weight_decay=0.25)
    resumed.load_state_dict(checkpoint["optimizer"])
    assert [g["lr"] for g in resumed.param_groups] == [g["lr"] for g in straight.param_groups]
    for p, expected in zip(params, [torch.float32] * 4 + [torch.bfloat16]):
        state = state_of(resumed, p)
        assert state["step"].dtype == torch.float64 and state["step"].device.type == "cpu"
        assert {state[key].dtype for key in set(state) - {"step"}} == {expected}
    run(resumed, params, range(5, 10))
    assert_optimizers_equal(straight, straight_params, resumed, params)


@cases
def test_state_dict_round_trips_through_a_weights_only_load(case: OptimCase) -> None:
    """``state_dict()`` of an optimizer with a ``state_dtype=torch.bfloat16`` group loads under
    ``weights_only=True`` and a fresh optimizer's ``state_dict()`` is then the same, value for value;
    param groups hold only plain values."""
    params = _resume_params()
    opt = _three_groups(case, params, "fused")
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    saved = opt.state_dict()
    plain = (int, float, bool, str, tuple, type(None), torch.dtype)
    for group in saved["param_groups"]:
        for key, value in group.items():
            assert key == "params" or isinstance(value, plain), (key, value)
    loaded = _save_and_load(saved)
    fresh = _three_groups(case, _resume_params(), "fused")
    fresh.load_state_dict(loaded)
    again = fresh.state_dict()
    assert again["param_groups"] == saved["param_groups"]
    assert again["param_groups"][2]["state_dtype"] is torch.bfloat16
    assert again["state"].keys() == saved["state"].keys()
    for pid, state in saved["state"].items():
        assert again["state"][pid].keys() == state.keys()
        for key, value in state.items():
            assert_bitwise_equal(again["state"][pid][key], value, f"{pid} {key}")


# ---------------------------------------------------------------------------------------------
# the Optimizer contract: closures, groups, schedulers, params without gradients
# ---------------------------------------------------------------------------------------------


@cases
def test_step_calls_the_closure_once_and_returns_its_loss(case: OptimCase) -> None:
    model, loss_fn = regression_problem()
    opt = case.make(model.parameters())
    losses = []

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        losses.append(loss)
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(closure)
    assert len(losses) == 1 and loss is losses[0]
    assert opt.step() is None
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def _other_hyperparameters(case: OptimCase) -> dict:
    """Every hyperparameter of the case changed to another valid value."""
    other = {"lr": case.kwargs["lr"] * 2.5, "weight_decay": 0.02}
    changes = {
        "betas": (0.5, case.kwargs.get("betas", (0, 0.5))[1] * 0.5),
        "damping": 0.2,
        "batch_size": 100,
        "alpha": 0.5,
        "momentum": 0.3,
        "eps": 0.05,
        "prior_steps": 5.0,
        "bias_correction": not case.kwargs.get("bias_correction", True),
        "relative_damping": 0.7,
        "s0": 2.0,
    }
    if case.kwargs.get("s0", 0.0) != 0:  # a prior s0 > 0 excludes bias correction: keep it off
        changes.pop("bias_correction")
    else:
        changes.pop("s0")
    other.update({key: value for key, value in changes.items() if key in case.kwargs})
    return other


@cases
def test_each_param_group_uses_its_own_hyperparameters(case: OptimCase) -> None:
    """Two groups, the second with every hyperparameter changed: each follows the oracle with its
    own group's values (float64, 30 steps)."""
    gen = torch.Generator().manual_seed(21)
    params = [torch.randn(3, 2, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(2)]
    group_kwargs = [case.kwargs, {**case.kwargs, **_other_hyperparameters(case)}]
    opt = case.make([{"params": [params[0]]}, {"params": [params[1]], **_other_hyperparameters(case)}])
    mus = [p.detach().clone() for p in params]
    states: list[dict] = [{}, {}]
    for _ in range(30):
        for i, p in enumerate(params):
            p.grad = random_grad(p, gen)
            mus[i] = case.oracle(mus[i], p.grad, states[i], **group_kwargs[i])
        opt.step()
    for p, mu in zip(params, mus):
        torch.testing.assert_close(p.detach(), mu, rtol=1e-10, atol=1e-10)


@cases
@paths
def test_a_param_group_with_zero_lr_does_not_move(case: OptimCase, path: str) -> None:
    frozen = torch.randn(4, 3).requires_grad_()
    moving = torch.randn(4, 3).requires_grad_()
    start = [frozen.detach().clone(), moving.detach().clone()]
    opt = case.make([{"params": [frozen], "lr": 0.0}, {"params": [moving]}], **PATHS[path])
    for _ in range(5):
        frozen.grad, moving.grad = torch.randn(4, 3), torch.randn(4, 3)
        opt.step()
    assert torch.equal(frozen.detach(), start[0])
    assert not torch.equal(moving.detach(), start[1])
    assert state_of(opt, frozen)["step"].item() == 5  # its state still advances


def _run_with_grads(opt, params, n, gen_seed=31, before_step=None):
    gen = torch.Generator().manual_seed(gen_seed)
    for k in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        if before_step:
            before_step(k)
        opt.step()


def _scheduled_run(case: OptimCase, mode: str) -> torch.Tensor:
    params = [torch.ones(4, 3).requires_grad_()]
    opt = case.make(params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.6**epoch)

    def before_step(k: int) -> None:
        if mode == "scheduler" and k:
            sched.step()
        elif mode == "by_hand":
            opt.param_groups[0]["lr"] = case.kwargs["lr"] * 0.6**k

    _run_with_grads(opt, params, 8, before_step=before_step)
    return params[0].detach()


@cases
def test_lr_scheduler_sets_the_lr_each_step_uses(case: OptimCase) -> None:
    """LambdaLR gives the same run, bit for bit, as writing the scheduled lr into the group by hand
    before every step, and a different one from a constant lr."""
    scheduled = _scheduled_run(case, "scheduler")
    assert torch.equal(scheduled, _scheduled_run(case, "by_hand"))
    assert not torch.equal(scheduled, _scheduled_run(case, "constant"))


@cases
def test_step_lr_to_zero_freezes_the_parameters(case: OptimCase) -> None:
    params = [torch.randn(4, 3).requires_grad_()]
    opt = case.make(params)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.0)
    snapshots = []

    def record(k):
        snapshots.append(params[0].detach().clone())
        if k:
            sched.step()

    _run_with_grads(opt, params, 6, before_step=record)
    snapshots.append(params[0].detach().clone())
    assert not torch.equal(snapshots[0], snapshots[3])  # steps 1–3 move
    for k in range(4, 7):
        assert torch.equal(snapshots[3], snapshots[k])  # lr = 0 from step 4 on: no move at all


@cases
@paths
def test_params_without_a_gradient_are_skipped(case: OptimCase, path: str) -> None:
    """A parameter whose grad is None is left unchanged and gets no state, in a mixed group and in
    a group where no parameter has a gradient."""
    with_grad, without, alone = (torch.randn(3, 2).requires_grad_() for _ in range(3))
    start = [without.detach().clone(), alone.detach().clone()]
    opt = case.make([{"params": [with_grad, without]}, {"params": [alone]}], **PATHS[path])
    for _ in range(3):
        with_grad.grad = torch.randn(3, 2)
        opt.step()
    assert torch.equal(without.detach(), start[0]) and torch.equal(alone.detach(), start[1])
    assert without not in opt.state and alone not in opt.state
    assert state_of(opt, with_grad)["step"].item() == 3


# ---------------------------------------------------------------------------------------------
# training: the loss goes down, also in bf16
# ---------------------------------------------------------------------------------------------


def _train(case: OptimCase, dtype: torch.dtype, steps: int = 80) -> tuple[list[float], torch.nn.Module]:
    model, loss_fn = regression_problem(dtype)
    overrides = {"lr": case.train_lr}
    if "batch_size" in case.kwargs:
        overrides["batch_size"] = 32  # the full batch of the problem
    opt = case.make(model.parameters(), **overrides)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=25, gamma=0.5)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    for p in model.parameters():
        assert state_of(opt, p)["s" if case.second_key == "s" else "exp_avg_sq"].dtype == torch.float32
    return losses, model


@cases
def test_loss_goes_down_with_a_lr_scheduler(case: OptimCase) -> None:
    losses, model = _train(case, torch.float32)
    assert losses[-1] < 0.2 * losses[0], losses[::10]
    assert all(torch.isfinite(p).all() for p in model.parameters())


@cases
def test_bfloat16_params_train(case: OptimCase) -> None:
    losses, model = _train(case, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < 0.2 * losses[0], losses[::10]


# ---------------------------------------------------------------------------------------------
# AdaX's long horizon: nothing overflows or turns into NaN, up to t = 10^8
# ---------------------------------------------------------------------------------------------

LONG_STEPS = [10**5, 10**6, 10**7, 10**8]
#: one case per class: the long-horizon tests use the class defaults (β2 = 1e-4, eps = 1e-12)
ONE_PER_ADAX_CLASS = [case for case in ADAX_CASES if case.id in ("adax", "rootfree_adax")]


def _long_horizon_step(case: OptimCase, path: str, dtype: torch.dtype, t: int, grad: torch.Tensor):
    """One step at t = 1, then one at step t (the state's step set to t − 1), with the defaults
    β2 = 1e-4 and (for AdaX) eps = 1e-12 of the class, lr = 0.1 and weight decay 0.1."""
    p = torch.linspace(-1, 1, grad.numel(), dtype=torch.float64).reshape(grad.shape).to(dtype)
    p.requires_grad_()
    opt = case.cls([p], lr=0.1, weight_decay=0.1, **REQUIRED[case.cls], **PATHS[path])
    p.grad = grad.to(dtype)
    opt.step()
    state = state_of(opt, p)
    state["step"].fill_(t - 1)
    before = p.detach().clone()
    p.grad = grad.to(dtype)
    opt.step()
    assert state["step"].item() == t
    return p, before, state


@pytest.mark.parametrize("case", ONE_PER_ADAX_CLASS, ids=str)
@paths
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("t", LONG_STEPS)
def test_adax_long_horizon_steps_stay_finite(case: OptimCase, path: str, dtype: torch.dtype, t: int) -> None:
    grad = torch.randn(3, 4, generator=torch.Generator().manual_seed(t % 1000))
    p, before, state = _long_horizon_step(case, path, dtype, t, grad)
    assert torch.isfinite(p).all()
    assert not torch.equal(p.detach(), before)
    for key, value in state.items():
        assert torch.isfinite(value).all(), key


@pytest.mark.parametrize(
    ("case", "dtype", "t"),
    [
        pytest.param(case, dtype, t, id=f"{case.id}-{dtype}-{t}")
        for case in ONE_PER_ADAX_CLASS
        for dtype in (torch.float32, torch.bfloat16, torch.float64)
        for t in LONG_STEPS
    ],
)
@paths
def test_adax_long_horizon_entries_with_zero_gradient_stay_finite(
    case: OptimCase, dtype: torch.dtype, t: int, path: str
) -> None:
    """Entries whose gradient is always exactly 0 (unused embedding rows, masked weights) only
    decay by weight decay, as in the original AdaX: m = v = 0 gives a zero step."""
    grad = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    grad[0] = 0.0
    p, before, state = _long_horizon_step(case, path, dtype, t, grad)
    assert torch.isfinite(p).all(), p
    for key, value in state.items():
        assert torch.isfinite(value).all(), key
    if case.cls is AdaX:
        torch.testing.assert_close(p[0].detach(), (before[0].double() * (1 - 0.1 * 0.1)).to(dtype))


@pytest.mark.parametrize("beta2", [1e-4, 1e-3, 0.5])
@pytest.mark.parametrize("prior_steps", [0.0, 1.0, 2.0])
def test_adax_weight_is_finite_for_steps_up_to_1e8(beta2: float, prior_steps: float) -> None:
    """Both returned values, 1 − β̂_t = β2/D_t and log D_t, stay finite; the weight is in [0, 1]."""
    for t in [1, 2, 10, 1e3, 1e5, 1e6, 7e6, 1e7, 5e7, 1e8 - 1, 1e8]:
        weight, log_d = adax_weight(t, beta2, prior_steps)
        assert math.isfinite(weight) and math.isfinite(log_d), (t, weight, log_d)
        assert 0.0 <= weight <= 1.0, (t, weight)


def _direct_d(t: float, beta2: float, prior_steps: float) -> float:
    try:
        return (1 + prior_steps * beta2) * (1 + beta2) ** t - 1
    except OverflowError:
        return math.inf


@pytest.mark.parametrize("beta2", [1e-4, 1e-3, 0.5])
@pytest.mark.parametrize("prior_steps", [0.0, 1.0, 2.0])
def test_adax_weight_matches_the_direct_formula_where_that_is_finite(
    beta2: float, prior_steps: float
) -> None:
    """adax_weight(t, β2, n0) = (β2/D_t, log D_t) with D_t = (1 + n0·β2)·(1 + β2)^t − 1 computed
    directly in float64, wherever D_t does not overflow (rtol 1e-8: the direct (1 + β2)^t itself
    carries a relative error of about t·1e-16)."""
    checked = 0
    for t in [1, 2, 3, 10, 100, 1e3, 1e4, 1e5, 1e6, 7e6, 1e7, 1e8]:
        d = _direct_d(t, beta2, prior_steps)
        if not math.isfinite(d):
            continue
        weight, log_d = adax_weight(t, beta2, prior_steps)
        assert weight == pytest.approx(beta2 / d, rel=1e-8, abs=0.0), t
        assert log_d == pytest.approx(math.log(d), rel=1e-8), t
        checked += 1
    assert checked >= 3


def test_adax_weight_at_the_first_step() -> None:
    """AdaX's first step keeps only g² (β̂_1 = 0); with n0 = 1 the prior and the
    first observation weigh (almost) equally: 1 − β̂_1 = 1/(2 + β2)."""
    assert adax_weight(1, 1e-4, 0.0)[0] == pytest.approx(1.0, rel=1e-12)
    assert adax_weight(1, 1e-4, 1.0)[0] == pytest.approx(1 / (2 + 1e-4), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# errors name the culprit
# ---------------------------------------------------------------------------------------------


def _param() -> torch.Tensor:
    return torch.zeros(2, requires_grad=True)


@pytest.mark.parametrize("cls", ROOT_FREE_CLASSES, ids=lambda c: c.__name__)
def test_missing_batch_size_is_a_type_error_that_explains_b(cls) -> None:
    with pytest.raises(
        TypeError,
        match=rf"{cls.__name__} needs the keyword argument batch_size \(B\)\. "
        r"B is the number of examples",
    ):
        cls([_param()])


INVALID = [
    # (class, keyword arguments, error, message regex)
    (RootFreeAdamW, {"lr": -1e-3}, ValueError, r"RootFreeAdamW: lr must be in \[0, inf\), got -0\.001"),
    (RootFreeRMSprop, {"lr": math.nan}, ValueError, r"RootFreeRMSprop: lr must be finite, got nan"),
    (AdaX, {"lr": math.inf}, ValueError, r"AdaX: lr must be finite, got inf"),
    (RootFreeAdaX, {"lr": "1e-3"}, TypeError, r"RootFreeAdaX: lr must be a real number, got '1e-3' \(str\)"),
    (RootFreeAdamW, {"betas": (0.9, 1.0)}, ValueError, r"betas\[1\] must be in \[0, 1\), got 1\.0"),
    (RootFreeAdamW, {"betas": (1.0, 0.9)}, ValueError, r"betas\[0\] must be in \[0, 1\), got 1\.0"),
    (RootFreeAdamW, {"betas": 0.9}, TypeError, r"betas must be a pair \(beta1, beta2\), got 0\.9"),
    (
        RootFreeAdaX,
        {"betas": (0.9, 1.5)},
        ValueError,
        r"RootFreeAdaX: betas\[1\] must be in \(0, 1\), got 1\.5",
    ),
    (AdaX, {"betas": (0.9, 0.0)}, ValueError, r"AdaX: betas\[1\] must be in \(0, 1\), got 0\.0"),
    (RootFreeAdaX, {"betas": (0.9, 0)}, ValueError, r"RootFreeAdaX: betas\[1\] must be in \(0, 1\), got 0"),
    (
        RootFreeAdamW,
        {"damping": -1e-4},
        ValueError,
        r"RootFreeAdamW: damping must be in \[0, inf\), got -0\.0001",
    ),
    (
        RootFreeRMSprop,
        {"damping": -1.0},
        ValueError,
        r"RootFreeRMSprop: damping must be in \[0, inf\), got -1\.0",
    ),
    (RootFreeAdaX, {"damping": -1.0}, ValueError, r"RootFreeAdaX: damping must be in \[0, inf\), got -1\.0"),
    (RootFreeRMSprop, {"momentum": 1}, ValueError, r"RootFreeRMSprop: momentum must be in \[0, 1\), got 1"),
    (RootFreeRMSprop, {"momentum": -0.1}, ValueError, r"momentum must be in \[0, 1\), got -0\.1"),
    (RootFreeRMSprop, {"alpha": 1.0}, ValueError, r"RootFreeRMSprop: alpha must be in \[0, 1\), got 1\.0"),
    (AdaX, {"eps": -1e-8}, ValueError, r"AdaX: eps must be in \[0, inf\), got -1e-08"),
    (RootFreeAdaX, {"prior_steps": -1.0}, ValueError, r"prior_steps must be in \[0, inf\), got -1\.0"),
    (AdaX, {"weight_decay": -0.1}, ValueError, r"AdaX: weight_decay must be in \[0, inf\), got -0\.1"),
    (
        RootFreeAdamW,
        {"batch_size": 0},
        ValueError,
        r"RootFreeAdamW: batch_size must be a positive number, got 0",
    ),
    (RootFreeRMSprop, {"batch_size": -1}, ValueError, r"batch_size must be a positive number, got -1"),
    (RootFreeAdaX, {"batch_size": math.inf}, ValueError, r"batch_size must be a positive number, got inf"),
    (
        RootFreeAdamW,
        {"batch_size": True},
        TypeError,
        r"RootFreeAdamW: batch_size must be a positive number, got True",
    ),
    (RootFreeAdaX, {"batch_size": "32"}, TypeError, r"batch_size must be a positive number, got '32'"),
    (RootFreeAdamW, {"bias_correction": 1}, TypeError, r"bias_correction must be True or False, got 1"),
    (
        AdaX,
        {"state_dtype": torch.int32},
        TypeError,
        r"AdaX: state_dtype must be None or a floating torch\.dtype",
    ),
    (RootFreeAdamW, {"foreach": "yes"}, TypeError, r"foreach must be None, True or False, got 'yes'"),
    (RootFreeRMSprop, {"fused": 1.0}, TypeError, r"fused must be None, True or False, got 1\.0"),
]


@pytest.mark.parametrize(
    ("cls", "kwargs", "error", "match"),
    INVALID,
    ids=[
        f"{c.__name__}-{next(iter(k))}={next(iter(k.values()))!r}"
        for c, k, _, _ in (row.values if hasattr(row, "values") else row for row in INVALID)
    ],
)
def test_invalid_hyperparameters_raise_errors_naming_the_argument_and_value(
    cls, kwargs, error, match
) -> None:
    with pytest.raises(error, match=match):
        cls([_param()], **{**REQUIRED[cls], **kwargs})


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_fused_together_with_foreach_is_rejected(cls) -> None:
    with pytest.raises(ValueError, match=r"fused=True and foreach=True cannot be set together"):
        cls([_param()], fused=True, foreach=True, **REQUIRED[cls])


@pytest.mark.parametrize(
    ("cls", "bad"),
    [
        (RootFreeAdamW, {"lr": -1.0}),
        (RootFreeAdamW, {"batch_size": 0}),
        (RootFreeRMSprop, {"momentum": 1.0}),
        (AdaX, {"betas": (0.9, 0.0)}),
        (RootFreeAdaX, {"damping": -1.0}),
        (RootFreeAdaX, {"foreach": True, "fused": True}),
    ],
    ids=lambda x: getattr(x, "__name__", None) or repr(x),
)
def test_invalid_values_in_an_added_param_group_are_rejected(cls, bad) -> None:
    """add_param_group validates the group like the constructor, and leaves no half-added group:
    the same parameter can be added afterwards with valid values."""
    opt = cls([_param()], **REQUIRED[cls])
    extra = _param()
    with pytest.raises((ValueError, TypeError), match=next(iter(bad))):
        opt.add_param_group({"params": [extra], **bad})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [extra]})
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_complex_params_are_rejected_with_a_type_error(cls) -> None:
    with pytest.raises(TypeError, match=rf"{cls.__name__} does not support complex parameters.*view_as_real"):
        cls([_param(), torch.zeros(3, dtype=torch.complex64, requires_grad=True)], **REQUIRED[cls])


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_a_complex_param_group_rejected_by_add_param_group_is_not_kept(cls) -> None:
    opt = cls([_param()], **REQUIRED[cls])
    with pytest.raises(TypeError, match="complex"):
        opt.add_param_group({"params": [torch.zeros(3, dtype=torch.complex64, requires_grad=True)]})
    assert len(opt.param_groups) == 1


def _snapshot(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    return [
        {"param": p.detach().clone(), **{k: v.clone() for k, v in opt.state[p].items()}}
        if p in opt.state
        else {"param": p.detach().clone()}
        for p in params
    ]


def _dense_grads(params: list[torch.Tensor], gen: torch.Generator) -> None:
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


@cases
@paths
@pytest.mark.parametrize("steps_before", [0, 2])
def test_sparse_gradient_raises_and_changes_nothing(case: OptimCase, path: str, steps_before: int) -> None:
    """A sparse gradient in the last group raises a RuntimeError that says so before any group is
    updated: no parameter or state changes, and the run continues as if the call never happened."""
    runs = []
    for fail in (True, False):
        torch.manual_seed(0)
        dense = [torch.randn(4, 3).requires_grad_(), torch.randn(5).requires_grad_()]
        embedding = torch.nn.Embedding(6, 3, sparse=True)
        params = [*dense, embedding.weight]
        opt = case.make([{"params": dense[:1]}, {"params": [dense[1], embedding.weight]}], **PATHS[path])
        gen = torch.Generator().manual_seed(1)
        for _ in range(steps_before):
            _dense_grads(params, gen)
            opt.step()
        if fail:
            before = _snapshot(opt, params)
            for p in dense:
                p.grad = torch.randn(p.shape)
            embedding.weight.grad = None
            embedding(torch.tensor([1, 4])).sum().backward()
            assert embedding.weight.grad.is_sparse
            with pytest.raises(RuntimeError, match=rf"{case.cls.__name__} does not support sparse gradients"):
                opt.step()
            after = _snapshot(opt, params)
            for i, (b, a) in enumerate(zip(before, after)):
                for key in b:
                    assert_bitwise_equal(a[key], b[key], f"param {i} {key}")
                if "step" in a and "step" not in b:  # lazily created state is still the initial state
                    assert a["step"].item() == 0, f"param {i}"
        _dense_grads(params, gen)
        opt.step()
        runs.append((opt, params))
    assert_optimizers_equal(*runs[0], *runs[1])


# ---------------------------------------------------------------------------------------------
# No host reads of device values inside step().
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS, ids=str)
@pytest.mark.parametrize("case", OPTIM_DB, ids=str)
def test_step_never_reads_a_tensor_value_on_the_host(case: OptimCase, path: str) -> None:
    """Only the host-resident step counters are read (to pick the coefficients)."""
    params = [torch.randn(5, 3, requires_grad=True), torch.randn(4, requires_grad=True)]
    optimizer = case.make(params, **PATHS[path])
    for step in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        if step == 0:  # the first step creates the state
            optimizer.step()
            continue
        steps = [state["step"] for state in optimizer.state.values()]
        with HostReads(host=steps) as recorder:
            optimizer.step()
        assert recorder.reads == []
    with HostReads(host=steps) as recorder:  # the recorder does see a read when there is one
        optimizer.diagnostics()
    assert recorder.reads


def test_the_host_read_recorder_sees_every_kind_of_read_and_allows_host_values() -> None:
    device_value, host_step = torch.randn(3), torch.ones((), dtype=torch.float64)
    reads = ("tolist", "cpu", "numpy", "item", "__float__", "__bool__")
    for read in reads:
        with HostReads(host=[host_step]) as recorder:
            getattr(device_value[:1], read)()
        assert recorder.reads, read
        with HostReads(host=[host_step]) as recorder:
            getattr(torch.stack([host_step + 1, host_step])[:1], read)()
        assert recorder.reads == [], read
    assert torch.Tensor.tolist is not None and "wrapper" not in repr(torch.Tensor.tolist)  # restored
