"""Behaviours each optimizer promises besides its math: SIRFShampoo's per-group hyperparameters,
skipped gradients, closures, LR schedulers and bf16 resume; the fused kernel's fallback; the
failure path of ``register()``.

Hyperparameters are always passed explicitly: no test here depends on a default's value.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from sirf_oracle import SIRFShampooOracle
from sirf_paper import SIRFShampoo
from test_sirfshampoo_math import rel_err

from hf_rootfree import RootFreeAdamW, RootFreeRMSprop
from hf_rootfree.integrations import transformers as integration
from hf_rootfree.optim import _fused, elementwise

HYPER = dict(lr=0.02, momentum=0.5, weight_decay=0.01, precond_lr=0.2, precond_momentum=0.5, damping=0.05)
SIRF = dict(HYPER, batch_size=16, update_freq=2, structures="dense", merge_dims=False)


def _params(shapes, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in shapes]


def _grads(params, gen) -> None:
    for p in params:
        p.grad = 0.3 * torch.randn(p.shape, generator=gen, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# SIRFShampoo
# ---------------------------------------------------------------------------------------------


def test_sirfshampoo_param_groups_each_follow_the_oracle_with_their_own_hyperparameters() -> None:
    """Two groups of the same shapes (so they would batch together if their options were ignored)
    with every hyperparameter different; each parameter must follow its own group's oracle."""
    first, second = _params([(5, 4), (3,)]), _params([(5, 4), (3,)], seed=1)
    other = dict(lr=0.05, momentum=0.0, weight_decay=0.0, precond_lr=0.1, precond_momentum=0.0, damping=0.01)
    other.update(batch_size=4, update_freq=3)
    optimizer = SIRFShampoo([{"params": first}, {"params": second, **other}], **SIRF)
    oracles = [SIRFShampooOracle([p], **SIRF) for p in first]
    oracles += [SIRFShampooOracle([p], **{**SIRF, **other}) for p in second]
    gen = torch.Generator().manual_seed(2)
    for _ in range(12):
        _grads(first + second, gen)
        optimizer.step()
        for p, oracle in zip(first + second, oracles):
            oracle.step([p.grad])
    for p, oracle in zip(first + second, oracles):
        assert rel_err(p, oracle.mu[0]) <= 1e-9
        for ours, expected in zip(optimizer.dense_factors(p), oracle.K):
            assert rel_err(ours, expected) <= 1e-9


def test_sirfshampoo_a_param_without_grad_is_skipped_and_the_others_step_as_without_it() -> None:
    a, b = _params([(5, 4), (6, 3)])
    alone_a, alone_b = (p.detach().clone().requires_grad_() for p in (a, b))
    optimizer = SIRFShampoo([a, b], **SIRF)
    only_a, only_b = SIRFShampoo([alone_a], **SIRF), SIRFShampoo([alone_b], **SIRF)
    gen = torch.Generator().manual_seed(3)
    for step in range(8):
        _grads([a, b], gen)
        alone_a.grad = a.grad.clone()
        optimizer_steps = [only_a]
        if step % 2:  # b has no gradient on odd steps: it must not move and its step must not count
            b.grad = None
        else:
            alone_b.grad = b.grad.clone()
            optimizer_steps.append(only_b)
        before = b.detach().clone()
        optimizer.step()
        for single in optimizer_steps:
            single.step()
        if b.grad is None:
            assert torch.equal(b, before)
    assert torch.equal(a, alone_a) and torch.equal(b, alone_b)
    assert float(optimizer.state[b]["step"]) == 4.0 and float(optimizer.state[a]["step"]) == 8.0


def test_sirfshampoo_step_calls_the_closure_once_with_grad_enabled_and_returns_its_loss() -> None:
    (w,) = _params([(4, 3)])
    optimizer = SIRFShampoo([w], **SIRF)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        optimizer.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    before = w.detach().clone()
    loss = optimizer.step(closure)
    assert calls == [True]
    assert float(loss) == pytest.approx(float((before**2).sum()))
    assert not torch.equal(w, before)


def test_sirfshampoo_lr_scheduler_sets_the_lr_each_step_uses() -> None:
    """A LambdaLR run equals a run whose group lr is set by hand to the same values."""
    scheduled, manual = _params([(5, 4)]), _params([(5, 4)])
    opt_s, opt_m = SIRFShampoo(scheduled, **SIRF), SIRFShampoo(manual, **SIRF)
    factors = [1.0, 0.5, 0.25, 0.0, 2.0]
    schedule = torch.optim.lr_scheduler.LambdaLR(opt_s, lambda step: factors[min(step, len(factors) - 1)])
    gen = torch.Generator().manual_seed(4)
    for factor in factors:
        _grads(scheduled, gen)
        manual[0].grad = scheduled[0].grad.clone()
        opt_m.param_groups[0]["lr"] = SIRF["lr"] * factor
        assert opt_s.param_groups[0]["lr"] == pytest.approx(SIRF["lr"] * factor)
        before = scheduled[0].detach().clone()
        opt_s.step()
        opt_m.step()
        schedule.step()
        assert torch.equal(scheduled[0], manual[0])
        if factor == 0.0:  # lr 0: the parameter does not move (the factors still learn)
            assert torch.equal(scheduled[0], before)


@pytest.mark.parametrize("interrupt_at", [2, 3])  # right after and between factor updates
def test_sirfshampoo_resume_with_bfloat16_factors_is_bitwise(interrupt_at: int) -> None:
    params = [p.detach().float().requires_grad_() for p in _params([(6, 5), (6, 5), (4,)])]
    options = dict(SIRF, precond_dtype=torch.bfloat16)
    reference = SIRFShampoo(params, **options)
    copies = [p.detach().clone().requires_grad_() for p in params]
    first = SIRFShampoo(copies, **options)
    gen = torch.Generator().manual_seed(5)
    grads = [[0.3 * torch.randn(p.shape, generator=gen) for p in params] for _ in range(7)]
    for step, step_grads in enumerate(grads):
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        reference.step()
        if step < interrupt_at:
            for p, g in zip(copies, step_grads):
                p.grad = g.clone()
            first.step()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed_params = [p.detach().clone().requires_grad_() for p in copies]
    resumed = SIRFShampoo(resumed_params, **options)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.state[resumed_params[0]]["factor_0"].dtype == torch.bfloat16
    assert "factor_residual_0" in resumed.state[resumed_params[0]]
    for step_grads in grads[interrupt_at:]:
        for p, g in zip(resumed_params, step_grads):
            p.grad = g.clone()
        resumed.step()
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)
        for key, value in reference.state[p].items():
            assert torch.equal(resumed.state[q][key], value), key


# ---------------------------------------------------------------------------------------------
# The fused kernel's fallback
# ---------------------------------------------------------------------------------------------

ADAMW = dict(lr=0.01, betas=(0.9, 0.99), damping=1e-3, weight_decay=0.0, batch_size=8)


def _paths_taken(monkeypatch) -> list[str]:
    taken = []
    for name, path in list(elementwise._PATHS.items()):
        monkeypatch.setitem(
            elementwise._PATHS, name, lambda *a, _n=name, _p=path, **k: (taken.append(_n), _p(*a, **k))
        )
    return taken


def _step(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> None:
    p.grad = torch.ones_like(p)
    optimizer.step()


def test_hf_rootfree_fused_0_turns_the_kernel_off_and_the_default_falls_back(monkeypatch) -> None:
    monkeypatch.setattr(_fused, "_state", {})
    monkeypatch.setenv("HF_ROOTFREE_FUSED", "0")
    assert not _fused.fused_kernel_available()
    taken = _paths_taken(monkeypatch)
    p = torch.ones(3, requires_grad=True)
    _step(RootFreeAdamW([p], **ADAMW), p)
    assert taken == ["single_tensor"]
    with pytest.raises(RuntimeError, match=r"fused=True, but the fused CPU kernel could not be built"):
        _step(RootFreeAdamW([p], fused=True, **ADAMW), p)


def test_a_failed_build_warns_once_and_the_default_path_falls_back(monkeypatch) -> None:
    monkeypatch.setattr(_fused, "_state", {})
    monkeypatch.delenv("HF_ROOTFREE_FUSED", raising=False)
    monkeypatch.setattr(torch.ops, "hf_rootfree", type("NoKernel", (), {})())

    def failing_build():
        raise OSError("no compiler here")

    monkeypatch.setattr(_fused, "_build", failing_build)
    taken = _paths_taken(monkeypatch)
    p = torch.ones(3, requires_grad=True)
    with pytest.warns(RuntimeWarning, match=r"could not build the fused CPU kernel.*no compiler here"):
        _step(RootFreeAdamW([p], **ADAMW), p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second optimizer does not warn again
        _step(RootFreeAdamW([p], **ADAMW), p)
    assert taken == ["single_tensor", "single_tensor"]
    with pytest.raises(RuntimeError, match=r"fused=True, but the fused CPU kernel could not be built"):
        _step(RootFreeAdamW([p], fused=True, **ADAMW), p)


# ---------------------------------------------------------------------------------------------
# register(): the failure path
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("names", "method", "problem"),
    [
        (type("OptimizerNames", (), {}), staticmethod(lambda args, model=None: None), "no longer a str Enum"),
        (None, classmethod(lambda cls, args, model=None: None), "no longer a static method"),
    ],
    ids=["names-not-an-enum", "method-not-static"],
)
def test_register_fails_with_integration_error_naming_the_internal_and_the_fallback(
    monkeypatch, names, method, problem
) -> None:
    transformers = pytest.importorskip("transformers")
    from transformers import training_args

    trainer = type("Trainer", (), {"get_optimizer_cls_and_kwargs": method})
    if names is not None:
        monkeypatch.setattr(training_args, "OptimizerNames", names)
    monkeypatch.setattr(transformers, "Trainer", trainer)
    with pytest.raises(integration.IntegrationError, match=problem) as error:
        integration.register()
    assert "optimizer_cls_and_kwargs" in str(error.value) and transformers.__version__ in str(error.value)


@pytest.mark.parametrize("cls", [RootFreeAdamW, RootFreeRMSprop])
def test_without_the_compiled_helper_the_grafting_norms_come_from_torch_and_agree(monkeypatch, cls) -> None:
    """The norms that graft the root-free step onto AdamW's are summed by the compiled helper on
    CPU and by ``torch._foreach_norm`` elsewhere (or without a compiler): the two agree to float32
    rounding over 20 steps of the reference path."""

    def run() -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen).requires_grad_() for s in ((6, 5), (7,), (2, 3, 4))]
        opt = cls(params, lr=1e-2, weight_decay=0.1, batch_size=8, foreach=False, fused=False)
        for _ in range(20):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) * torch.rand(p.shape, generator=gen)
            opt.step()
        return [p.detach().clone() for p in params]

    with_helper = run()
    monkeypatch.setattr(_fused, "_state", {})
    monkeypatch.setenv("HF_ROOTFREE_FUSED", "0")
    assert not _fused.fused_kernel_available()
    without = run()
    for a, b in zip(with_helper, without):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.equal(a, torch.zeros_like(a))
