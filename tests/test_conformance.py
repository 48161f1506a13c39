"""Generic optimizer tests, after torch's ``test/test_optim.py``, for all five classes.

Each test name is a claim that holds for every ``torch.optim`` optimizer; it runs over the
``OptimizerInfo`` table ``optim_db.OPTIMIZER_INFOS`` (every configuration, every implementation
path), so a new optimizer added to that table gets all of them. A class that does not support
what a test needs says so in its ``skips`` (with the reason); none does today.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from optim_db import OPTIMIZER_INFOS, OptimizerInfo

VARIANTS = [
    pytest.param(info, kwargs, flags, id=f"{config}-{path}")
    for info in OPTIMIZER_INFOS
    for config, kwargs in info.configs.items()
    for path, flags in info.paths.items()
]
variants = pytest.mark.parametrize(("info", "kwargs", "flags"), VARIANTS)


def make(info: OptimizerInfo, kwargs, flags, params, request, **overrides) -> torch.optim.Optimizer:
    name = request.node.originalname
    if name in info.skips:
        pytest.skip(f"{info}: {info.skips[name]}")
    return info.cls(params, **{**kwargs, **flags, **overrides})


def params_and_grads(seed: int = 0, shapes=((4, 3), (3,), (2, 3, 2))):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(4)]
    return params, grads


def run(opt, params, grads) -> None:
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


def weights_only(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@variants
def test_state_dict_survives_weights_only_load_and_a_fresh_optimizer_continues_identically(
    info, kwargs, flags, request
):
    params, grads = params_and_grads()
    opt = make(info, kwargs, flags, params, request)
    run(opt, params, grads[:2])
    saved = weights_only(opt.state_dict())
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = make(info, kwargs, flags, twin_params, request, lr=0.5)  # the loaded lr wins
    twin.load_state_dict(saved)
    assert weights_only(twin.state_dict()).keys() == saved.keys()
    run(opt, params, grads[2:])
    run(twin, twin_params, grads[2:])
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)


@variants
def test_step_pre_and_post_hooks_run_once_per_step_in_order(info, kwargs, flags, request):
    params, grads = params_and_grads()
    opt = make(info, kwargs, flags, params, request)
    calls = []
    pre = opt.register_step_pre_hook(lambda o, args, kw: calls.append("pre"))
    post = opt.register_step_post_hook(lambda o, args, kw: calls.append("post"))
    run(opt, params, grads[:2])
    assert calls == ["pre", "post"] * 2
    pre.remove()
    post.remove()
    run(opt, params, grads[2:3])
    assert len(calls) == 4


@variants
def test_state_dict_hooks_see_and_may_change_the_state_dict(info, kwargs, flags, request):
    params, grads = params_and_grads()
    opt = make(info, kwargs, flags, params, request)
    run(opt, params, grads[:1])
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("pre"))

    def post_hook(o, state_dict):
        seen.append("post")
        state_dict["extra"] = 1
        return state_dict

    opt.register_state_dict_post_hook(post_hook)
    assert opt.state_dict()["extra"] == 1
    assert seen == ["pre", "post"]


@variants
def test_zero_size_parameters_step_with_the_others(info, kwargs, flags, request):
    params, grads = params_and_grads(shapes=((0,), (3, 0), (4, 3)))
    opt = make(info, kwargs, flags, params, request)
    before = params[2].detach().clone()
    run(opt, params, grads[:2])
    assert params[0].shape == (0,) and params[1].shape == (3, 0)
    assert not torch.equal(params[2], before)
    opt.load_state_dict(weights_only(opt.state_dict()))
    run(opt, params, grads[2:])


@variants
def test_param_groups_keep_their_own_lr_and_a_zero_lr_group_stays_put(info, kwargs, flags, request):
    params, grads = params_and_grads()
    opt = make(info, kwargs, flags, [{"params": params[:2]}, {"params": params[2:], "lr": 0.0}], request)
    frozen = params[2].detach().clone()
    moving = params[0].detach().clone()
    run(opt, params, grads[:2])
    assert torch.equal(params[2], frozen) and not torch.equal(params[0], moving)


@variants
def test_add_param_group_adds_a_group_that_steps(info, kwargs, flags, request):
    params, grads = params_and_grads()
    opt = make(info, kwargs, flags, params[:2], request)
    run(opt, params[:2], [g[:2] for g in grads[:1]])
    opt.add_param_group({"params": [params[2]], "lr": 1e-2})
    before = params[2].detach().clone()
    run(opt, params, grads[1:2])
    assert len(opt.param_groups) == 2 and not torch.equal(params[2], before)
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        opt.add_param_group({"params": [params[0]]})
    assert len(opt.param_groups) == 2


@variants
def test_step_calls_the_closure_once_with_grad_enabled_and_returns_its_loss(info, kwargs, flags, request):
    params, _ = params_and_grads()
    opt = make(info, kwargs, flags, params, request)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = sum((p**2).sum() for p in params)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == [True] and torch.is_tensor(loss) and loss.item() > 0


@variants
def test_an_lr_scheduler_drives_the_learning_rate(info, kwargs, flags, request):
    params, grads = params_and_grads()
    opt = make(info, kwargs, flags, params, request)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.0)
    run(opt, params, grads[:1])
    scheduler.step()
    assert all(group["lr"] == 0.0 for group in opt.param_groups)
    frozen = [p.detach().clone() for p in params]
    run(opt, params, grads[1:3])
    assert all(torch.equal(p, f) for p, f in zip(params, frozen))
    resumed = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.0)
    resumed.load_state_dict(weights_only(scheduler.state_dict()))
    assert resumed.last_epoch == scheduler.last_epoch


@variants
def test_the_loss_of_a_small_quadratic_goes_down(info, kwargs, flags, request):
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(6, 4, generator=gen)
    weight = torch.nn.Parameter(torch.zeros(6, 4))
    config = next(c for c, k in info.configs.items() if k is kwargs)
    opt = make(info, kwargs, flags, [weight], request, weight_decay=0.0, lr=info.train_lrs[config])
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = ((weight - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


@variants
def test_parameters_without_grad_are_left_alone_and_get_no_state(info, kwargs, flags, request):
    params, grads = params_and_grads()
    opt = make(info, kwargs, flags, params, request)
    before = params[1].detach().clone()
    for p, g in zip(params, grads[0]):
        p.grad = None if p is params[1] else g
    opt.step()
    assert torch.equal(params[1], before) and len(opt.state[params[1]]) == 0


@variants
def test_a_deep_copy_steps_like_the_original(info, kwargs, flags, request):
    params, grads = params_and_grads()
    opt = make(info, kwargs, flags, params, request)
    run(opt, params, grads[:1])
    twin = copy.deepcopy({"opt": opt, "params": params})
    run(opt, params, grads[1:])
    run(twin["opt"], twin["params"], grads[1:])
    assert all(torch.equal(p, q) for p, q in zip(params, twin["params"]))


@pytest.mark.parametrize("info", OPTIMIZER_INFOS, ids=str)
def test_bad_input_raises_the_error_torch_would(info):
    kwargs = next(iter(info.configs.values()))
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(TypeError, match="params argument given to the optimizer should be an iterable"):
        info.cls(p, **kwargs)
    with pytest.raises(ValueError, match="optimizer got an empty parameter list"):
        info.cls([], **kwargs)
    with pytest.raises(ValueError, match=r"lr must be in \[0, inf\), got -1"):
        info.cls([p], **{**kwargs, "lr": -1.0})
    with pytest.raises(TypeError, match="complex parameters"):
        info.cls([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))], **kwargs)
    opt = info.cls([p], **kwargs)
    p.grad = torch.randn(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
