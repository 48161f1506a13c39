"""SIRFShampoo on odd parameters and on bad input.

Each test name is a claim: odd shapes (0-d, size-1 axes, zero-size, conv, 5-D, non-contiguous,
frozen) train under every way of shaping the preconditioner; low-precision parameters and factors
keep the documented state dtypes; bad input raises an error that names the argument and its value
and leaves no trace; a non-finite factor update never enters the state.
"""

from __future__ import annotations

import pytest
import torch
from sirf_paper import SIRFShampoo
from torch import nn

B = 4  # batch_size of every optimizer here
STEPS = 50


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

#: name -> shape of the parameters of the shape zoo (the transposed one is built separately)
ZOO = {
    "0-d": (),
    "(1,)": (1,),
    "(1,1)": (1, 1),
    "(5,)": (5,),
    "(4,3)": (4, 3),
    "(3,1,4)": (3, 1, 4),
    "(2,3,4)": (2, 3, 4),
    "conv": (6, 3, 3, 3),
    "5-d": (2, 3, 2, 2, 2),
    "(0,)": (0,),
    "(0,3)": (0, 3),
    "transposed": (4, 5),
}

#: option set -> (keyword arguments, expected preconditioned dims per zoo entry). The dims follow
#: ``preconditioned_shape``: size-1 axes dropped (0-d → (1,)); with merge_dims the axes after the
#: first are merged left to right while the product stays ≤ max_dense_dim.
DEFAULT_DIMS = {
    "0-d": (1,),
    "(1,)": (1,),
    "(1,1)": (1,),
    "(5,)": (5,),
    "(4,3)": (4, 3),
    "(3,1,4)": (3, 4),
    "(2,3,4)": (2, 12),
    "conv": (6, 27),
    "5-d": (2, 24),
    "(0,)": (0,),
    "(0,3)": (0, 3),
    "transposed": (4, 5),
}
UNMERGED_DIMS = {
    **DEFAULT_DIMS,
    "(2,3,4)": (2, 3, 4),
    "conv": (6, 3, 3, 3),
    "5-d": (2, 3, 2, 2, 2),
}
OPTION_SETS = {
    "default": ({}, DEFAULT_DIMS),
    "merge_dims=False": ({"merge_dims": False}, UNMERGED_DIMS),
    "diagonal": ({"structures": "diagonal"}, DEFAULT_DIMS),
    # 3·3 > 3: nothing merges, so every axis keeps its own factor; axes over 3 get diagonal ones
    "max_dense_dim=3": ({"max_dense_dim": 3}, UNMERGED_DIMS),
}


def loss_of(p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A tiny per-parameter loss with its minimum at p = −target/2."""
    return (p * target).sum() + (p**2).sum()


def make_zoo(dtype: torch.dtype, gen: torch.Generator) -> dict[str, nn.Parameter]:
    params = {}
    for name, shape in ZOO.items():
        if name == "transposed":
            params[name] = nn.Parameter(torch.randn(5, 4, generator=gen).t().to(dtype))
            assert not params[name].is_contiguous()
        else:
            params[name] = nn.Parameter(torch.randn(shape, generator=gen).to(dtype))
    return params


def train(opt, params, targets, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        for p, target in zip(params, targets):
            loss_of(p, target).backward()
        opt.step()


def losses(params, targets) -> list[float]:
    with torch.no_grad():
        return [float(loss_of(p.double(), t.double())) for p, t in zip(params, targets)]


def snapshot(opt, params) -> tuple[list[torch.Tensor], dict]:
    state = {
        id(p): {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
        for p in params
        if p in opt.state
    }
    return [p.detach().clone() for p in params], state


def assert_unchanged(opt, params, before) -> None:
    values, state = before
    for p, value in zip(params, values):
        assert torch.equal(p, value), "a parameter changed"
    after = {id(p): opt.state[p] for p in params if p in opt.state}
    assert after.keys() == state.keys(), "state was created for a parameter"
    for pid, saved in state.items():
        assert after[pid].keys() == saved.keys(), "state keys changed"
        for key, value in saved.items():
            assert torch.equal(after[pid][key], value), f"state {key!r} changed"


def factor_keys(state) -> list[str]:
    return sorted(k for k in state if k.startswith(("factor_", "precond_")))


# ---------------------------------------------------------------------------------------------
# the shape zoo
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option_set", list(OPTION_SETS))
def test_odd_shapes_train_finitely_and_report_their_preconditioned_dims(option_set):
    options, expected_dims = OPTION_SETS[option_set]
    gen = torch.Generator().manual_seed(0)
    zoo = make_zoo(torch.float32, gen)
    frozen = nn.Parameter(torch.randn(3, 2, generator=gen), requires_grad=False)
    params = [*zoo.values(), frozen]
    trained = list(zoo.values())
    targets = [torch.randn(p.shape, generator=gen) for p in trained]
    frozen_before = frozen.detach().clone()
    opt = SIRFShampoo(params, lr=1e-2, batch_size=B, **options)

    max_dense = options.get("max_dense_dim", 256)
    for name, block in zip([*zoo, "frozen"], opt.blocks()):
        dims = (3, 2) if name == "frozen" else expected_dims[name]
        assert block["dims"] == dims, name
        if options.get("structures") == "diagonal":
            kinds = ["Diagonal"] * len(dims)
        else:
            kinds = ["Diagonal" if d > max_dense else "Dense" for d in dims]
        assert block["structures"] == [f"{kind}(dim={d})" for kind, d in zip(kinds, dims)], name

    start = losses(trained, targets)
    train(opt, trained, targets, STEPS)
    end = losses(trained, targets)

    for name, p, before, after in zip(zoo, trained, start, end):
        assert torch.isfinite(p).all(), name
        assert p.dtype == torch.float32 and p.shape == ZOO[name], name
        state = opt.state[p]
        assert int(state["step"]) == STEPS, name
        for key, value in state.items():
            assert torch.isfinite(value).all(), f"{name}: state {key}"
        if p.numel() == 0:
            assert factor_keys(state) == [], f"{name}: an empty tensor got factors"
        else:
            assert after < before, f"{name}: loss {before} -> {after}"
            n_axes = len(expected_dims[name])
            assert sum(k.startswith("factor_") and "momentum" not in k for k in state) == n_axes
    assert torch.equal(frozen, frozen_before)
    assert frozen not in opt.state or len(opt.state[frozen]) == 0, "the frozen parameter got state"


# ---------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------

DTYPE_CASES = [
    pytest.param(torch.bfloat16, {}, torch.float32, torch.float32, id="bf16-params"),
    pytest.param(torch.float16, {}, torch.float32, torch.float32, id="fp16-params"),
    pytest.param(torch.float64, {}, torch.float64, torch.float64, id="fp64-params"),
    pytest.param(
        torch.float32, {"precond_dtype": torch.bfloat16}, torch.bfloat16, torch.float32, id="bf16-factors"
    ),
    pytest.param(
        torch.float32, {"precond_dtype": "bfloat16"}, torch.bfloat16, torch.float32, id="bf16-factors-by-name"
    ),
]


@pytest.mark.parametrize(("param_dtype", "options", "factor_dtype", "buffer_dtype"), DTYPE_CASES)
def test_factor_and_buffer_dtypes_follow_the_parameter_or_precond_dtype(
    param_dtype, options, factor_dtype, buffer_dtype
):
    gen = torch.Generator().manual_seed(1)
    shapes = [(4, 3), (5,), (6, 3, 3, 3), ()]
    params = [nn.Parameter(torch.randn(s, generator=gen).to(param_dtype)) for s in shapes]
    targets = [torch.randn(s, generator=gen).to(param_dtype) for s in shapes]
    opt = SIRFShampoo(params, lr=1e-2, batch_size=B, **options)
    dtype_name = str(factor_dtype).removeprefix("torch.")
    assert all(block["dtype"] == dtype_name for block in opt.blocks())

    start = losses(params, targets)
    train(opt, params, targets, 20)
    end = losses(params, targets)

    for p, before, after in zip(params, start, end):
        assert p.dtype == param_dtype
        assert torch.isfinite(p).all()
        assert after < before
        state = opt.state[p]
        keys = [k for k in state if k.startswith(("factor_", "precond_")) and k != "precond_scale"]
        assert any(k.startswith("factor_momentum_") for k in keys)
        for key in keys:
            assert state[key].dtype == factor_dtype, key
            assert torch.isfinite(state[key]).all(), key
        assert state["momentum_buffer"].dtype == buffer_dtype


# ---------------------------------------------------------------------------------------------
# bad gradients and bad parameters
# ---------------------------------------------------------------------------------------------


def test_a_sparse_gradient_raises_and_changes_no_parameter_or_state():
    gen = torch.Generator().manual_seed(2)
    weight = nn.Parameter(torch.randn(4, 3, generator=gen))
    target = torch.randn(4, 3, generator=gen)
    embedding = nn.Embedding(10, 4, sparse=True)
    opt = SIRFShampoo([{"params": [weight]}, {"params": embedding.parameters()}], batch_size=B)
    train(opt, [weight], [target], 2)  # the embedding has no gradient yet: state for weight only
    params = [weight, embedding.weight]
    before = snapshot(opt, params)

    opt.zero_grad()
    loss_of(weight, target).backward()
    embedding(torch.tensor([1, 2, 2])).sum().backward()
    assert embedding.weight.grad.is_sparse
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert_unchanged(opt, params, before)


def test_a_complex_parameter_is_rejected_at_construction():
    with pytest.raises(TypeError, match="complex"):
        SIRFShampoo([nn.Parameter(torch.randn(3, dtype=torch.complex64))], batch_size=B)


def test_a_gradient_of_the_wrong_shape_raises_and_changes_nothing():
    gen = torch.Generator().manual_seed(3)
    good = nn.Parameter(torch.randn(2, 5, generator=gen))
    p = nn.Parameter(torch.randn(4, 3, generator=gen))
    opt = SIRFShampoo([good, p], batch_size=B)
    train(opt, [good, p], [torch.ones(2, 5), torch.ones(4, 3)], 1)
    before = snapshot(opt, [good, p])
    good.grad = torch.ones(2, 5)
    p.grad = torch.zeros(4, 3)
    p.grad.set_(torch.zeros(3, 4))  # autograd refuses to assign it; force it in place
    with pytest.raises(RuntimeError, match=r"shape \(3, 4\) does not match its parameter"):
        opt.step()
    assert_unchanged(opt, [good, p], before)


def test_a_gradient_of_the_wrong_dtype_raises_and_changes_nothing():
    gen = torch.Generator().manual_seed(4)
    good = nn.Parameter(torch.randn(2, 5, generator=gen))
    p = nn.Parameter(torch.randn(4, 3, generator=gen))
    opt = SIRFShampoo([good, p], batch_size=B)
    train(opt, [good, p], [torch.ones(2, 5), torch.ones(4, 3)], 1)
    before = snapshot(opt, [good, p])
    good.grad = torch.ones(2, 5)
    p.grad = torch.zeros(4, 3)
    p.grad.data = torch.zeros(4, 3, dtype=torch.float64)  # autograd refuses to assign it
    with pytest.raises(RuntimeError, match=r"dtype torch\.float64 .*does not match"):
        opt.step()
    assert_unchanged(opt, [good, p], before)


# ---------------------------------------------------------------------------------------------
# bad options: the message names the argument and the value
# ---------------------------------------------------------------------------------------------

#: (keyword arguments, exception, pattern naming the argument and the bad value)
BAD_OPTIONS = [
    ({"batch_size": 0}, ValueError, r"batch_size must be a positive number, got 0"),
    ({"lr": -1.0}, ValueError, r": lr must be in \[0, inf\), got -1\.0"),
    ({"momentum": 1.0}, ValueError, r": momentum must be in \[0, 1\), got 1\.0"),
    ({"precond_momentum": -0.1}, ValueError, r"precond_momentum must be in \[0, 1\), got -0\.1"),
    ({"precond_lr": 0}, ValueError, r"precond_lr must be in \(0, inf\), got 0"),
    ({"damping": -1}, ValueError, r"damping must be in \[0, inf\), got -1"),
    ({"update_freq": 0}, ValueError, r"update_freq must be a positive integer, got 0"),
    ({"update_freq": 1.5}, ValueError, r"update_freq must be a positive integer, got 1\.5"),
    ({"structures": "nope"}, ValueError, r"structure 'nope' in structures='nope'; allowed: dense, diagonal"),
    ({"structures": ("dense", "bogus")}, ValueError, r"structure 'bogus' in structures=\('dense', 'bogus'\)"),
    ({"structures": {2: ("dense",)}}, ValueError, r"structures=\{2: \('dense',\)\}.*need 2 .*got 1"),
    ({"structures": {0: "dense"}}, ValueError, r"structures=\{0: 'dense'\}.*got key 0"),
    ({"precond_dtype": torch.int32}, TypeError, r"precond_dtype must be .*got torch\.int32"),
    ({"precond_dtype": "float8"}, TypeError, r"precond_dtype must be .*got 'float8'"),
    ({"max_dense_dim": 0}, ValueError, r"max_dense_dim must be None or a positive integer, got 0"),
    ({"block_size": 0}, ValueError, r"block_size must be a positive integer, got 0"),
    ({"hierarchical_sizes": (3,)}, ValueError, r"hierarchical_sizes must be a pair .*got \(3,\)"),
    ({"large_dim_structure": "dense"}, ValueError, r"large_dim_structure must be .*got 'dense'"),
    ({"merge_dims": "yes"}, TypeError, r"merge_dims must be True or False, got 'yes'"),
]
bad_options = pytest.mark.parametrize(
    ("options", "error", "pattern"), [pytest.param(*case, id=repr(case[0])) for case in BAD_OPTIONS]
)


def test_a_missing_batch_size_raises_type_error_naming_batch_size():
    with pytest.raises(TypeError, match="batch_size"):
        SIRFShampoo([nn.Parameter(torch.randn(3))])


def test_a_model_that_is_not_a_module_raises_type_error_naming_model_and_its_type():
    with pytest.raises(TypeError, match=r"model must be an nn\.Module or None, got str"):
        SIRFShampoo([nn.Parameter(torch.randn(3))], batch_size=B, model="not a module")


@bad_options
def test_a_bad_option_raises_at_construction_naming_argument_and_value(options, error, pattern):
    with pytest.raises(error, match=pattern):
        SIRFShampoo([nn.Parameter(torch.randn(4, 3))], **{"batch_size": B, **options})


@bad_options
def test_a_rejected_param_group_is_not_kept(options, error, pattern):
    gen = torch.Generator().manual_seed(5)
    p, q = nn.Parameter(torch.randn(4, 3, generator=gen)), nn.Parameter(torch.randn(5, generator=gen))
    opt = SIRFShampoo([p], batch_size=B)
    with pytest.raises(error, match=pattern):
        opt.add_param_group({"params": [q], **options})
    assert len(opt.param_groups) == 1
    assert all(r is not q for g in opt.param_groups for r in g["params"])
    assert [b["shapes"] for b in opt.blocks()] == [[(4, 3)]]
    opt.add_param_group({"params": [q]})  # q is free to join with good options, and training runs
    train(opt, [p, q], [torch.ones(4, 3), torch.ones(5)], 2)
    assert int(opt.state[q]["step"]) == 2


def test_a_rejected_complex_param_group_is_not_kept():
    p = nn.Parameter(torch.randn(4, 3))
    opt = SIRFShampoo([p], batch_size=B)
    with pytest.raises(TypeError, match="complex"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3, dtype=torch.complex64))]})
    assert len(opt.param_groups) == 1


# ---------------------------------------------------------------------------------------------
# non-finite factor updates
# ---------------------------------------------------------------------------------------------


def _three_blocks():
    """Two (4, 3) parameters (one batched factor update) and a (5, 2) one, after 3 good steps."""
    gen = torch.Generator().manual_seed(6)
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in [(4, 3), (4, 3), (5, 2)]]
    targets = [torch.randn(p.shape, generator=gen) for p in params]
    opt = SIRFShampoo(params, lr=1e-2, batch_size=B)
    train(opt, params, targets, 3)
    return opt, params, targets


def _factor_state(opt, p) -> dict[str, torch.Tensor]:
    state = opt.state[p]
    return {k: state[k].clone() for k in state if k.startswith("factor_")}


@pytest.mark.parametrize(
    ("spoil", "grad_is_finite"),
    [
        pytest.param(lambda g: g.__setitem__((0, 0), float("inf")), False, id="inf-gradient"),
        # finite in float32, but B·KᵀGGᵀK overflows: the update itself is not finite
        pytest.param(lambda g: g.fill_(1e30), True, id="overflowing-update"),
    ],
)
def test_a_non_finite_factor_update_is_skipped_counted_and_leaves_other_blocks_alone(spoil, grad_is_finite):
    opt, params, targets = _three_blocks()
    bad, same_shape, other = params
    before = {id(p): _factor_state(opt, p) for p in params}
    assert any(k.startswith("factor_momentum_") for k in before[id(bad)])
    assert opt.diagnostics()["skipped_factor_updates"] == 0.0

    opt.zero_grad()
    for p, target in zip(params, targets):
        loss_of(p, target).backward()
    spoil(bad.grad)
    assert bool(torch.isfinite(bad.grad).all()) == grad_is_finite
    opt.step()

    for key, value in before[id(bad)].items():
        assert torch.equal(opt.state[bad][key], value), f"{key} of the skipped block changed"
    assert int(opt.state[bad]["skipped_factor_updates"]) == 1
    assert opt.diagnostics()["skipped_factor_updates"] == 1.0
    for p in (same_shape, other):
        assert int(opt.state[p]["skipped_factor_updates"]) == 0
        for key, value in before[id(p)].items():
            assert not torch.equal(opt.state[p][key], value), f"{key} of a good block did not update"
            assert torch.isfinite(opt.state[p][key]).all()
