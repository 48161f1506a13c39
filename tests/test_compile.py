"""``torch.compile`` and the compiled (GPU) path of the element-wise optimizers, checked on CPU.

* The compiled path, the default on CUDA, is :func:`elementwise._table_step` compiled by inductor:
  Triton kernels on a GPU, C++ here. The graph is the same, so forcing the path on CPU runs the
  GPU path's math, which must equal the float64 oracle like every other path.
* ``torch.compile(optimizer.step)``, as users compile torch's optimizers, equals the eager step and
  compiles once: the coefficients that change at every step are tensor values, not constants.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from optim_db import ELEMENT_WISE_CLASSES, OPTIM_DB, OptimCase
from test_elementwise import check_against_the_oracle_over_120_steps

from hf_rootfree.optim import _fused, elementwise

cases = pytest.mark.parametrize("case", OPTIM_DB, ids=str)


@pytest.fixture(autouse=True)
def _fresh_compiler(monkeypatch):
    """Each test compiles from scratch, fails on a compile error instead of quietly running eager,
    and forgets the compiled step afterwards."""
    monkeypatch.setattr(_fused, "_state", {k: v for k, v in _fused._state.items() if k == "ok"})
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed compile warns: fail instead
        yield
    torch._dynamo.reset()


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@cases
def test_the_compiled_gpu_path_matches_the_float64_oracle_over_120_steps(case: OptimCase, monkeypatch):
    """The CUDA default path, run on CPU: parameters and state equal the oracle (rtol 1e-10) over
    120 steps on 0-d, zero-size, odd-shaped and non-contiguous float64 parameters, one of which
    skips every third step (two group layouts: two graphs, each compiled once)."""
    monkeypatch.setattr(elementwise._ElementwiseOptimizer, "_path", lambda self, group, params: "compiled")
    check_against_the_oracle_over_120_steps(case)
    assert _graphs() == 2


def _train(cls: type[torch.optim.Optimizer], compiled: bool, dtype: torch.dtype) -> tuple[list, list[int]]:
    """8 steps of ``cls`` (defaults, two groups, a scheduler that changes the lr at every step)."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in ((16, 8), (8,), (3, 4, 5))]
    kwargs = {"batch_size": 8} if "batch_size" in cls.__init__.__code__.co_varnames else {}
    opt = cls([{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:]}], lr=1e-2, **kwargs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    step = torch.compile(opt.step) if compiled else opt.step
    graphs = []
    for _ in range(8):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        step()
        scheduler.step()
        graphs.append(_graphs())
    state = [t.float() for s in opt.state.values() for t in s.values()]
    diagnostics = [torch.tensor(v) for v in opt.diagnostics().values()]
    return [p.detach().float() for p in params] + state + diagnostics, graphs


@pytest.mark.parametrize("cls", ELEMENT_WISE_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_optimizer_step_equals_eager_and_compiles_once(cls, dtype: torch.dtype) -> None:
    """``torch.compile(opt.step)`` with the defaults (the per-tensor damping and grafting, computed
    inside the graph) equals the eager step within 1e-5 over 8 steps: parameters, state and
    ``diagnostics()``, with an lr that changes at every step; its graph is built at the first step
    and reused (no recompiles)."""
    eager, _ = _train(cls, compiled=False, dtype=dtype)
    compiled, graphs = _train(cls, compiled=True, dtype=dtype)
    assert graphs[0] >= 1 and graphs[-1] == graphs[0], graphs
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-5)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, **tolerance)


# ---------------------------------------------------------------------------------------------
# choosing the path, and falling back
# ---------------------------------------------------------------------------------------------


def _optimizer(**flags) -> elementwise.RootFreeAdamW:
    return elementwise.RootFreeAdamW([torch.ones(3, requires_grad=True)], batch_size=8, **flags)


@pytest.mark.parametrize(("triton", "expected"), [(True, "compiled"), (False, "foreach")])
def test_the_default_on_cuda_is_the_compiled_path_when_triton_is_there(monkeypatch, triton, expected) -> None:
    monkeypatch.setattr(_fused, "compiled_step_available", lambda device: triton)
    optimizer = _optimizer()
    meta = [torch.empty(3, device="meta")]  # stands in for a CUDA tensor
    assert optimizer._path(optimizer.param_groups[0], meta) == expected
    optimizer = _optimizer(foreach=True)
    assert optimizer._path(optimizer.param_groups[0], meta) == "foreach"


def test_fused_true_off_cpu_without_a_compiled_kernel_is_an_error_naming_the_fix(monkeypatch) -> None:
    monkeypatch.setattr(_fused, "compiled_step_available", lambda device: False)
    optimizer = _optimizer(fused=True)
    expected = r"fused=True needs CPU tensors .* or CUDA tensors with Triton.*fused=None"
    with pytest.raises(RuntimeError, match=expected):
        optimizer._path(optimizer.param_groups[0], [torch.empty(3, device="meta")])


def test_the_compiled_path_needs_cuda_and_respects_hf_rootfree_fused_0(monkeypatch) -> None:
    assert not _fused.compiled_step_available(torch.device("cpu"))
    monkeypatch.setenv("HF_ROOTFREE_FUSED", "0")
    assert not _fused.compiled_step_available(torch.device("cuda"))


def test_a_failed_compile_warns_once_and_falls_back_to_foreach_with_the_same_result(monkeypatch) -> None:
    """A compile error happens before any tensor is written: the step is done by the foreach path,
    and later steps do not try again."""
    monkeypatch.setattr(elementwise._ElementwiseOptimizer, "_path", lambda self, group, params: "compiled")

    def failing(params, *args, **kwargs):
        raise RuntimeError("no Triton here")

    monkeypatch.setitem(_fused._state, "compiled_step", failing)
    results, diagnostics = [], []
    for flags in ({}, {"foreach": True}):
        p = torch.linspace(-1, 1, 5).requires_grad_()
        opt = elementwise.RootFreeAdamW([p], batch_size=8, **flags)
        for _ in range(3):
            p.grad = torch.cos(p.detach())
            if not flags and "compiled" not in _fused._state:
                expected = r"could not compile the fused GPU step.*no Triton here"
                with pytest.warns(RuntimeWarning, match=expected):
                    opt.step()
            else:
                opt.step()
        results.append(p.detach())
        diagnostics.append(opt.diagnostics())
    assert _fused._state["compiled"] is False
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    assert diagnostics[0] == diagnostics[1]


def test_the_compiled_path_compiles_past_dynamos_default_limit_of_8_graphs(monkeypatch) -> None:
    """Each group layout is its own graph: a process with several optimizers (a sweep) needs more
    than dynamo's default of 8, after which the step would quietly run uncompiled."""
    monkeypatch.setattr(elementwise._ElementwiseOptimizer, "_path", lambda self, group, params: "compiled")
    assert torch._dynamo.config.recompile_limit <= 8
    for n in range(1, 10):
        p = torch.ones(n, requires_grad=True)
        p.grad = torch.ones(n)
        elementwise.AdaX([p]).step()
        assert not torch.equal(p.detach(), torch.ones(n))
    assert _graphs() == 9
