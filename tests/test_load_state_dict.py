"""Loading a checkpoint: checked before anything changes, on every path of all five optimizers.

Each test name is a claim. A state saved for parameters of other shapes, or by another optimizer
class, is refused with a ``ValueError`` that names what is wrong, and the optimizer stays exactly
as it was; the fused CPU kernel also checks sizes itself. ``load_state_dict`` otherwise behaves
like torch.optim's: plain-number ``step`` values, pre/post hooks, a 1-element tensor ``lr``.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from optim_db import OPTIM_DB, PATHS
from sirf_paper import SIRFShampoo

from hf_rootfree import RootFreeAdamW
from hf_rootfree.optim import _fused
from hf_rootfree.registry import OPTIMIZERS


def _element_wise(case, flags):
    return lambda params, **kw: case.make(params, **flags, **kw)


def _sirfshampoo(**options):
    return lambda params, **kw: SIRFShampoo(params, **{"batch_size": 4, **options, **kw})


#: one builder (params -> optimizer) per class and path
BUILDERS = {
    **{
        f"{case.id}-{path}": _element_wise(case, flags)
        for case in OPTIM_DB
        if case.id in ("rootfree_adamw", "rootfree_rmsprop", "adax", "rootfree_adax")
        for path, flags in PATHS.items()
    },
    "sirfshampoo": _sirfshampoo(precond_momentum=0.5),
    "sirfshampoo-bf16": _sirfshampoo(precond_dtype=torch.bfloat16, update_freq=2),
}
builders = pytest.mark.parametrize("build", BUILDERS.values(), ids=list(BUILDERS))

#: every optimizer of the registry; the root-free ones take B
OUR_CLASSES = {spec.cls: ({"batch_size": 4} if spec.root_free else {}) for spec in OPTIMIZERS.values()}


def stepped(build, shapes, steps: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = build(params)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return opt, params


def snapshot(opt: torch.optim.Optimizer) -> tuple:
    """Everything a load could change: the state objects and values, and the groups."""
    state = {
        id(p): {k: (v, v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
        for g in opt.param_groups
        for p in g["params"]
    }
    groups = [{k: v for k, v in g.items()} for g in opt.param_groups]
    return state, groups, [list(g["params"]) for g in opt.param_groups], list(opt.param_groups)


def assert_unchanged(opt: torch.optim.Optimizer, before: tuple) -> None:
    state, groups, params, group_objects = before
    assert all(a is b for a, b in zip(opt.param_groups, group_objects, strict=True))
    assert [{k: v for k, v in g.items()} for g in opt.param_groups] == groups
    assert [list(g["params"]) for g in opt.param_groups] == params
    for g in opt.param_groups:
        for p in g["params"]:
            now = opt.state[p]
            assert set(now) == set(state[id(p)])
            for key, (obj, value) in state[id(p)].items():
                assert now[key] is obj
                if torch.is_tensor(value):
                    assert torch.equal(now[key], value)


def weights_only_round_trip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ---------------------------------------------------------------------------------------------
# A state for parameters of other shapes.
# ---------------------------------------------------------------------------------------------


@builders
@pytest.mark.parametrize(
    ("saved_shapes", "message"),
    [
        ([(3, 4), (2, 3)], r"parameter 0 \(shape \(6, 8\).*'\w+' has shape \(3, 4\), expected \(6, 8\)"),
        ([(6, 8), (5,)], r"parameter 1 \(shape \(2, 3\).*'\w+' has shape \(5,\), expected \(2, 3\)"),
    ],
    ids=["smaller", "larger"],
)
def test_a_state_saved_for_other_shapes_is_refused_naming_index_key_and_shapes(
    build, saved_shapes, message
) -> None:
    saved, _ = stepped(build, saved_shapes)
    opt, params = stepped(build, [(6, 8), (2, 3)], seed=1)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(weights_only_round_trip(saved.state_dict()))
    assert_unchanged(opt, before)
    opt.step()  # and it still steps
    assert all(torch.isfinite(p).all() for p in params)


@builders
def test_a_state_of_another_dtype_family_or_missing_a_key_is_refused(build) -> None:
    saved, _ = stepped(build, [(4, 3)])
    opt, _ = stepped(build, [(4, 3)], seed=1)
    sd = saved.state_dict()
    key = next(k for k, v in sd["state"][0].items() if torch.is_tensor(v) and v.dim() > 0)
    before = snapshot(opt)
    sd["state"][0][key] = sd["state"][0][key].to(torch.int32)
    message = rf"parameter 0 .*state '{key}' has dtype torch.int32, expected a floating"
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(sd)
    del sd["state"][0][key]
    if key != "momentum_buffer":  # (SIRFShampoo creates a missing momentum buffer at the next step)
        with pytest.raises(ValueError, match=rf"state '{key}' is missing"):
            opt.load_state_dict(sd)
    assert_unchanged(opt, before)


@builders
def test_resume_after_a_refused_load_continues_exactly_as_without_it(build) -> None:
    """A refused load changes nothing: the optimizer then steps like one that was never asked."""
    other, _ = stepped(build, [(2, 2), (3,)], seed=3)
    a, pa = stepped(build, [(4, 3), (3,)], steps=1)
    b, pb = stepped(build, [(4, 3), (3,)], steps=1)
    with pytest.raises(ValueError):
        b.load_state_dict(other.state_dict())
    for p, q in zip(pa, pb):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    a.step()
    b.step()
    assert all(torch.equal(p, q) for p, q in zip(pa, pb))


@pytest.mark.skipif(not _fused.fused_kernel_available(), reason="the fused CPU kernel did not build")
@pytest.mark.parametrize("bad", ["grad", "second", "buf"])
def test_the_fused_kernel_itself_refuses_a_tensor_of_another_shape(bad: str) -> None:
    """Defence in depth: even a state put into ``opt.state`` by hand cannot make the kernel
    read or write out of bounds."""
    p, g = torch.zeros(64), torch.ones(64)
    tensors = {"grad": g, "second": torch.ones(64), "buf": torch.zeros(64)}
    tensors[bad] = tensors[bad][:8].clone()
    coeffs = torch.tensor([[0.9, 0.1, 1.0, 1e-3, 0.9, 0.1, 1e-2, 1.0, 0.0]], dtype=torch.float64)
    op = torch.ops.hf_rootfree.fused_elementwise_step_
    with pytest.raises(RuntimeError, match=r"shape .* differs from param shape"):
        op([p], [tensors["grad"]], [tensors["buf"]], [tensors["second"]], coeffs, False, False)
    assert torch.equal(p, torch.zeros(64))


@pytest.mark.skipif(not _fused.fused_kernel_available(), reason="the fused CPU kernel did not build")
def test_a_hand_made_state_of_another_shape_makes_the_fused_step_raise_under_malloc_check() -> None:
    """In a fresh process with glibc's heap checks on (MALLOC_CHECK_=3 aborts on any corruption
    it sees), a wrong-sized state reaches the kernel and is refused with a clean error."""
    code = (
        "import torch\n"
        "from hf_rootfree import RootFreeAdamW\n"
        "p = torch.nn.Parameter(torch.zeros(100_000))\n"
        "opt = RootFreeAdamW([p], batch_size=4, fused=True)\n"
        "p.grad = torch.ones_like(p)\n"
        "opt.step()\n"
        "for key in ('s', 'exp_avg'):\n"
        "    opt.state[p][key] = torch.ones(10)\n"
        "try:\n"
        "    opt.step()\n"
        "except RuntimeError as error:\n"
        "    print('refused:', 'differs from param shape' in str(error))\n"
    )
    env = {**os.environ, "MALLOC_CHECK_": "3", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-c", code]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused: True" in result.stdout


# ---------------------------------------------------------------------------------------------
# A state dict of another optimizer class.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("untagged", [False, True], ids=["tagged", "untagged"])
@pytest.mark.parametrize(
    ("loader", "saver"),
    [(a, b) for a in OUR_CLASSES for b in OUR_CLASSES if a is not b],
    ids=lambda c: c.__name__,
)
def test_a_state_dict_of_another_of_our_classes_is_refused_naming_both(loader, saver, untagged) -> None:
    params = [torch.nn.Parameter(torch.randn(4, 3))]
    source = saver(params, **OUR_CLASSES[saver])
    params[0].grad = torch.randn(4, 3)
    source.step()
    sd = source.state_dict()
    if untagged:  # a checkpoint from before the class tag
        for group in sd["param_groups"]:
            del group["hf_rootfree_class"]
    target = loader(params, **OUR_CLASSES[loader])
    before = snapshot(target)
    with pytest.raises(ValueError, match=rf"{loader.__name__}\.load_state_dict: .*{saver.__name__}"):
        target.load_state_dict(sd)
    assert_unchanged(target, before)


TORCH_CLASSES = [torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD, torch.optim.RMSprop]


@pytest.mark.parametrize("torch_cls", TORCH_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("loader", list(OUR_CLASSES), ids=lambda c: c.__name__)
def test_a_torch_optimizer_state_dict_is_refused_naming_both_classes(loader, torch_cls) -> None:
    p = torch.nn.Parameter(torch.randn(4, 3))
    source = torch_cls([p], lr=1e-3)
    p.grad = torch.randn(4, 3)
    source.step()
    target = loader([p], **OUR_CLASSES[loader])
    before = snapshot(target)
    names = rf"{loader.__name__}\.load_state_dict: .*torch\.optim\.{torch_cls.__name__}\b"
    with pytest.raises(ValueError, match=names):
        target.load_state_dict(source.state_dict())
    assert_unchanged(target, before)


@pytest.mark.parametrize("cls", list(OUR_CLASSES), ids=lambda c: c.__name__)
def test_an_untagged_checkpoint_of_the_same_class_still_loads(cls) -> None:
    """Checkpoints saved before the class tag existed (no tag, and no foreach/fused/state_dtype
    keys for the element-wise classes) load and continue like tagged ones."""
    params = [torch.nn.Parameter(torch.randn(4, 3))]
    source = cls(params, **OUR_CLASSES[cls])
    params[0].grad = torch.randn(4, 3)
    source.step()
    sd = source.state_dict()
    for group in sd["param_groups"]:
        for key in ("hf_rootfree_class", "foreach", "fused", "state_dtype", "distributed"):
            group.pop(key, None)
    target = cls(params, **OUR_CLASSES[cls])
    target.load_state_dict(sd)
    for key, value in source.state[params[0]].items():
        assert torch.equal(target.state[params[0]][key], value), key


# ---------------------------------------------------------------------------------------------
# Otherwise like torch.optim.
# ---------------------------------------------------------------------------------------------


@builders
@pytest.mark.parametrize("number", [3, 3.0], ids=["int", "float"])
def test_a_plain_number_step_is_loaded_as_a_float64_cpu_tensor_and_steps_on(build, number) -> None:
    saved, _ = stepped(build, [(4, 3)], steps=3)
    reference, ref_params = stepped(build, [(4, 3)], steps=3)
    sd = saved.state_dict()
    for state in sd["state"].values():
        state["step"] = number
    opt, params = stepped(build, [(4, 3)], steps=0)
    with torch.no_grad():
        params[0].copy_(ref_params[0])
    opt.load_state_dict(sd)
    step = opt.state[params[0]]["step"]
    assert torch.is_tensor(step) and step.dtype == torch.float64 and step.device.type == "cpu" and step == 3
    for p, q in zip(params, ref_params):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    opt.step()
    reference.step()
    assert torch.equal(params[0], ref_params[0])


@builders
def test_load_state_dict_pre_hook_changes_are_honoured_and_post_hook_sees_the_loaded_state(build) -> None:
    saved, _ = stepped(build, [(4, 3)], steps=2)
    opt, params = stepped(build, [(4, 3)], steps=0)
    seen = []

    def pre_hook(optimizer, state_dict):
        state_dict = dict(state_dict, param_groups=[dict(g, lr=0.125) for g in state_dict["param_groups"]])
        state_dict["state"] = {k: dict(v, step=torch.tensor(7.0)) for k, v in state_dict["state"].items()}
        return state_dict

    opt.register_load_state_dict_pre_hook(pre_hook)
    opt.register_load_state_dict_post_hook(lambda o: seen.append(float(o.state[params[0]]["step"])))
    opt.load_state_dict(saved.state_dict())
    assert opt.param_groups[0]["lr"] == 0.125
    assert opt.state[params[0]]["step"].dtype == torch.float64
    assert seen == [7.0]
    assert "hf_rootfree_class" not in opt.param_groups[0]


def test_bfloat16_parameters_keep_float32_state_after_a_load() -> None:
    params = [torch.nn.Parameter(torch.randn(4, 3).bfloat16())]
    opt = RootFreeAdamW(params, batch_size=4)
    params[0].grad = torch.randn(4, 3).bfloat16()
    opt.step()
    sd = opt.state_dict()
    fresh = RootFreeAdamW(params, batch_size=4)
    fresh.load_state_dict(sd)
    assert {fresh.state[params[0]][k].dtype for k in ("s", "exp_avg")} == {torch.float32}
    assert torch.equal(fresh.state[params[0]]["s"], opt.state[params[0]]["s"])


@builders
def test_a_one_element_tensor_lr_steps_like_the_same_float_lr(build) -> None:
    a, pa = stepped(lambda params: build(params, lr=torch.tensor(0.01)), [(4, 3)], steps=3)
    b, pb = stepped(lambda params: build(params, lr=0.01), [(4, 3)], steps=3)
    assert torch.equal(pa[0], pb[0])
    a.param_groups[0]["lr"].fill_(0.02)  # what LR schedulers do with a tensor lr
    b.param_groups[0]["lr"] = 0.02
    for p, q in zip(pa, pb):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    a.step()
    b.step()
    assert torch.equal(pa[0], pb[0])


@pytest.mark.parametrize("cls", list(OUR_CLASSES), ids=lambda c: c.__name__)
def test_a_multi_element_tensor_lr_is_a_value_error_as_in_torch(cls) -> None:
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=r"Tensor lr must be 1-element"):
        cls([p], lr=torch.tensor([0.1, 0.2]), **OUR_CLASSES[cls])
    with pytest.raises(ValueError, match=r"lr must be in \[0"):
        cls([p], lr=torch.tensor(-1.0), **OUR_CLASSES[cls])
