"""The element-wise family: one update, four configurations.

RootFreeAdamW, RootFreeRMSprop, AdaX and RootFreeAdaX (each class docstring has its equations) are all one
element-wise update with a few switches. Per tensor and per step it needs nine scalars,
the :class:`Coefficients` ``(a, c, k, e, m_decay, m_gain, lr, p_mul, wd_add)``::

    s <- a·s + c·g²                               second moment (root-free: s tracks B·g²)
    d <- (sqrt(s) if root else s)·k + e           denominator (damping/eps outside any root)
    adam-style momentum (momentum before preconditioning):
        m <- m_decay·m + m_gain·g
        p <- p·p_mul − lr·m / d                   p_mul = 1 − η·γ: decoupled weight decay
    heavy-ball momentum (momentum after preconditioning, RootFreeRMSprop):
        u <- g / d + wd_add·p                     weight decay joins the step, not preconditioned
        b <- m_decay·b + u                        (no buffer when momentum = 0: b = u)
        p <- p·p_mul − lr·b                       p_mul = 1 − η·γ in AdamW units, else 1

Each optimizer class only says how its hyperparameters and the step t map to the coefficients
(:meth:`_ElementwiseOptimizer._coefficients`); the math lives here, three times over:

* :func:`_single_tensor_step`, the readable reference path (a loop over tensors);
* :func:`_multi_tensor_step`, ``torch._foreach_*`` ops (the default on non-CPU devices without Triton);
* :func:`_fused_step`, a compiled C++ kernel that makes one pass over memory (the default on CPU;
  ``csrc/elementwise.cpp``), built on first use, with a clean fallback to the reference path;
* :func:`_table_step`, ``torch._foreach_*`` ops over a tensor of coefficients, which
  ``torch.compile`` traces: compiled by inductor it is the default on CUDA (:func:`_compiled_step`),
  and it is what a compiled ``optimizer.step()`` runs.

Tests check all four against each other and against a float64 oracle written from the equations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch.optim.optimizer import Optimizer

from . import _distributed, _fused
from ._checkpoint import CheckedStateDict
from ._common import (
    check_batch_size,
    check_betas,
    check_grad,
    check_lr,
    check_lr_units,
    check_nonnegative,
    check_param,
    check_range,
    check_state_dtype,
    with_float_lr,
)

__all__ = ["AdaX", "RootFreeAdaX", "RootFreeAdamW", "RootFreeRMSprop"]

_FLOAT32_TINY = torch.finfo(torch.float32).tiny


class Coefficients(NamedTuple):
    """The nine per-tensor scalars of one step (the module docstring's update). The C++ kernel
    reads them as the columns of a float64 table in this order (``csrc/elementwise.cpp``)."""

    a: float  #: decay of the second moment s
    c: float  #: weight of g² in s (B·(1 − β2) for the root-free s, which tracks B·g²)
    k: float  #: scale of s (or sqrt(s)) in the denominator: the bias correction 1/(1 − β2^t)
    e: float  #: added to the denominator: the damping λ (root-free) or ε (AdaX)
    m_decay: float  #: decay of the momentum buffer (β1, or the heavy ball's ϱ)
    m_gain: float  #: weight of g in the momentum (1 − β1; unused by the heavy ball)
    lr: float  #: the step size (with m's bias correction folded in)
    p_mul: float  #: 1 − η·γ, decoupled weight decay (1 when there is none)
    wd_add: float  #: γ added to the heavy ball's step (the paper's RootFreeRMSprop), else 0


#: per-tensor, data-dependent (k, e) of the adaptive damping: two float64 vectors, one entry per tensor
Scales = tuple[torch.Tensor, torch.Tensor]


def _check_impl_flags(group: dict[str, Any], owner: str) -> None:
    for flag in ("foreach", "fused"):
        if not (group[flag] is None or isinstance(group[flag], bool)):
            raise TypeError(f"{owner}: {flag} must be None, True or False, got {group[flag]!r}")
    if group["foreach"] and group["fused"]:
        raise ValueError(f"{owner}: fused=True and foreach=True cannot be set together")


# ---------------------------------------------------------------------------------------------
# AdaX's long-term-memory schedule, kept finite for any step.
# ---------------------------------------------------------------------------------------------


def _log_expm1(y: float) -> float:
    """log(exp(y) − 1) for y > 0, finite where exp(y) itself overflows."""
    if y > 30.0:
        return y + math.log1p(-math.exp(-y))
    return math.log(math.expm1(y))


def adax_weight(step: float, beta2: float, prior_steps: float = 0.0) -> tuple[float, float]:
    """Return ``(1 − β̂_t, log D_t)`` of AdaX's normalized second-moment average.

    ``D_t = (1 + n0·β2)·(1 + β2)^t − 1`` (AdaX's bias correction c_t when ``n0 = 0``) and
    ``β̂_t = 1 − β2/D_t``. Written as ``D_t = expm1(t·log1p(β2) + log1p(n0·β2))`` and carried as
    its logarithm, both stay finite for any t (D_t itself overflows float64 near t ≈ 7·10^6 with
    β2 = 1e-4; the weight β2/D_t then underflows gracefully to 0).
    """
    log_d = _log_expm1(step * math.log1p(beta2) + math.log1p(prior_steps * beta2))
    return beta2 * math.exp(-log_d), log_d


# ---------------------------------------------------------------------------------------------
# The three paths.
# ---------------------------------------------------------------------------------------------


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _single_tensor_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    bufs: list[torch.Tensor],
    seconds: list[torch.Tensor],
    coeffs: Sequence[Coefficients],
    *,
    root: bool,
    heavy_ball: bool,
    scales: Scales | None = None,
) -> None:
    """Reference path: the update of the module docstring, one tensor at a time."""
    for i, param in enumerate(params):
        a, c, k, e, m_decay, m_gain, lr, p_mul, wd_add = coeffs[i if len(coeffs) > 1 else 0]
        dtype = _compute_dtype(param, seconds[i])
        if scales is not None:  # data-dependent k and e of this tensor (0-d tensors)
            k, e = scales[0][i].to(dtype), scales[1][i].to(dtype)
        g = grads[i].to(dtype)
        s = seconds[i].to(dtype) * a + c * g * g
        seconds[i].copy_(s)
        d = (s.sqrt() if root else s) * k + e
        x = param.to(dtype)
        if heavy_ball:
            u = g / d + wd_add * x
            if bufs:
                u = bufs[i].to(dtype) * m_decay + u
                bufs[i].copy_(u)
            x = x * p_mul - lr * u
        else:
            m = bufs[i].to(dtype) * m_decay + m_gain * g
            bufs[i].copy_(m)
            x = x * p_mul - lr * m / d
        param.copy_(x)


def _upcast(tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    if tensors and tensors[0].dtype != dtype:
        return [t.to(dtype) for t in tensors]
    return tensors


def _buckets(
    params: list[torch.Tensor], seconds: list[torch.Tensor]
) -> dict[tuple[torch.device, torch.dtype, torch.dtype], list[int]]:
    """The indices of the tensors that share (device, parameter dtype, state dtype): one set of
    ``torch._foreach_*`` calls each."""
    buckets: dict[tuple[torch.device, torch.dtype, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        buckets.setdefault((p.device, p.dtype, seconds[i].dtype), []).append(i)
    return buckets


def _any_not(values: list[float], value: float) -> bool:
    return any(v != value for v in values)


def _foreach_axpy_(y: list[torch.Tensor], x: list[torch.Tensor], alphas: list[float]) -> None:
    """y ← y + alpha·x per tensor, in one fused op when alpha is the same for every tensor."""
    if all(a == alphas[0] for a in alphas):
        torch._foreach_add_(y, x, alpha=alphas[0])
    else:
        torch._foreach_add_(y, torch._foreach_mul(x, alphas))


def _multi_tensor_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    bufs: list[torch.Tensor],
    seconds: list[torch.Tensor],
    coeffs: Sequence[Coefficients],
    *,
    root: bool,
    heavy_ball: bool,
    scales: Scales | None = None,
) -> None:
    """Fast path with ``torch._foreach_*`` ops, grouped by (device, dtype)."""
    if len(coeffs) == 1:
        coeffs = list(coeffs) * len(params)
    for indices in _buckets(params, seconds).values():
        p_list, g_list = [params[i] for i in indices], [grads[i] for i in indices]
        s_list = [seconds[i] for i in indices]
        b_list = [bufs[i] for i in indices] if bufs else []
        columns = zip(*(coeffs[i] for i in indices))
        a, c, k, e, m_decay, m_gain, lr, p_mul, wd_add = (list(col) for col in columns)
        dtype = _compute_dtype(p_list[0], s_list[0])
        x, g = _upcast(p_list, dtype), _upcast(g_list, dtype)
        s, b = _upcast(s_list, dtype), _upcast(b_list, dtype)

        torch._foreach_mul_(s, a)
        torch._foreach_addcmul_(s, g, g, c)
        if scales is not None:  # per-tensor k and e as 0-d tensors: no host sync
            k_all, e_all = scales[0].to(dtype).unbind(), scales[1].to(dtype).unbind()
            k_t, e_t = [k_all[i] for i in indices], [e_all[i] for i in indices]
            d = torch._foreach_sqrt(s) if root else s
            d = torch._foreach_mul(d, k_t)
            torch._foreach_add_(d, e_t)
        elif root:
            d = torch._foreach_sqrt(s)
            if _any_not(k, 1.0):
                torch._foreach_mul_(d, k)
            torch._foreach_add_(d, e)
        elif _any_not(k, 1.0):
            d = torch._foreach_mul(s, k)
            torch._foreach_add_(d, e)
        else:
            d = torch._foreach_add(s, e)
        neg_lr = [-v for v in lr]
        if heavy_ball:
            u = torch._foreach_div(g, d)
            if _any_not(wd_add, 0.0):
                _foreach_axpy_(u, x, wd_add)
            if b:
                torch._foreach_mul_(b, m_decay)
                torch._foreach_add_(b, u)
                u = b
            if _any_not(p_mul, 1.0):
                torch._foreach_mul_(x, p_mul)
            _foreach_axpy_(x, u, neg_lr)
        else:
            torch._foreach_mul_(b, m_decay)
            # NOTE: m_gain·g is rounded before the add, as in the reference path (an alpha= add
            # may fuse it and drift by a few ulps over many steps).
            torch._foreach_add_(b, torch._foreach_mul(g, m_gain))
            if _any_not(p_mul, 1.0):
                torch._foreach_mul_(x, p_mul)
            torch._foreach_addcdiv_(x, b, d, neg_lr)
        for src, dst in ((x, p_list), (s, s_list), (b, b_list)):
            if src is not dst:
                torch._foreach_copy_(dst, src)


def _fused_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    bufs: list[torch.Tensor],
    seconds: list[torch.Tensor],
    coeffs: Sequence[Coefficients],
    *,
    root: bool,
    heavy_ball: bool,
    scales: Scales | None = None,
) -> None:
    """Fast CPU path: one compiled pass over memory per tensor (``csrc/elementwise.cpp``)."""
    table = _coefficient_table(coeffs, len(params), torch.device("cpu"), scales)
    torch.ops.hf_rootfree.fused_elementwise_step_(params, grads, bufs, seconds, table, root, heavy_ball)


def _coefficient_table(
    coeffs: Sequence[Coefficients], n: int, device: torch.device, scales: Scales | None = None
) -> torch.Tensor:
    """The coefficients as a float64 table with one row per tensor, on ``device`` (the data-
    dependent k and e columns of ``scales`` are copied in there: no value crosses to the host).
    Always ``n`` rows, so that its shape does not depend on whether the tensors are at the same
    step (a traced step would otherwise recompile)."""
    table = torch.tensor(coeffs, dtype=torch.float64, device=device)
    if len(coeffs) != n:
        table = table.expand(n, -1).clone()
    if scales is not None:
        table[:, 2], table[:, 3] = scales
    return table


def _table_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    bufs: list[torch.Tensor],
    seconds: list[torch.Tensor],
    table: torch.Tensor,
    *,
    root: bool,
    heavy_ball: bool,
    adaptive: Adaptive | None = None,
) -> None:
    """The update with its coefficients read from a tensor (:func:`_coefficient_table`): what
    ``torch.compile`` traces, for the compiled path and for a compiled ``optimizer.step``.

    With ``adaptive``, the data-dependent k and e (:func:`_adaptive_scales`) are computed here,
    inside the graph, and written into ``table`` (so :meth:`diagnostics` sees them). The
    coefficients change at every step (bias correction, the per-tensor damping); as values of a
    tensor they do not change the graph, so it compiles once. ``torch._foreach_*`` ops with
    per-tensor 0-d coefficients, which inductor fuses into a few kernels per group of tensors.
    """
    if adaptive is not None:
        k, e = _adaptive_scales(grads, bufs, seconds, table, adaptive)
        table[:, 2], table[:, 3] = k, e
    for (device, _, _), indices in _buckets(params, seconds).items():
        p_list, g_list = [params[i] for i in indices], [grads[i] for i in indices]
        s_list = [seconds[i] for i in indices]
        b_list = [bufs[i] for i in indices] if bufs else []
        dtype = _compute_dtype(p_list[0], s_list[0])
        rows = table.to(device=device, dtype=dtype)[indices]
        a, c, k, e, m_decay, m_gain, lr, p_mul, wd_add = (list(col.unbind()) for col in rows.unbind(1))
        x, g = _upcast(p_list, dtype), _upcast(g_list, dtype)
        s, b = _upcast(s_list, dtype), _upcast(b_list, dtype)

        torch._foreach_mul_(s, a)
        torch._foreach_addcmul_(s, torch._foreach_mul(g, c), g)
        d = torch._foreach_mul(torch._foreach_sqrt(s) if root else s, k)
        torch._foreach_add_(d, e)
        if heavy_ball:
            u = torch._foreach_div(g, d)
            torch._foreach_add_(u, torch._foreach_mul(x, wd_add))
            if b:
                torch._foreach_mul_(b, m_decay)
                torch._foreach_add_(b, u)
                u = b
            torch._foreach_mul_(x, p_mul)
            torch._foreach_sub_(x, torch._foreach_mul(u, lr))
        else:
            torch._foreach_mul_(b, m_decay)
            torch._foreach_add_(b, torch._foreach_mul(g, m_gain))
            torch._foreach_mul_(x, p_mul)
            torch._foreach_sub_(x, torch._foreach_div(torch._foreach_mul(b, lr), d))
        for src, dst in ((x, p_list), (s, s_list), (b, b_list)):
            if src is not dst:
                torch._foreach_copy_(dst, src)


def _compiled_step(plan: _Plan, *, root: bool, heavy_ball: bool) -> None:
    """Fast GPU path: :func:`_table_step` compiled by inductor (Triton kernels on CUDA), compiled
    once per group layout on first use. If compiling fails, one warning and the foreach path."""
    step = _fused.compiled_table_step(_table_step)
    if step is not None:
        try:
            step(*plan.tensors, plan.table, root=root, heavy_ball=heavy_ball, adaptive=plan.adaptive)
            return
        except Exception as error:  # a compile error happens before any tensor is written
            _fused.compiled_step_failed(error)
    scales = plan.scales
    if plan.adaptive is not None:  # written into the table, as the compiled step does
        scales = _adaptive_scales(*plan.tensors[1:], plan.table, plan.adaptive)
        plan.table[:, 2], plan.table[:, 3] = scales
    _multi_tensor_step(*plan.tensors, plan.coeffs, root=root, heavy_ball=heavy_ball, scales=scales)


_PATHS: dict[str, Callable[..., None]] = {
    "single_tensor": _single_tensor_step,
    "foreach": _multi_tensor_step,
    "fused": _fused_step,
}


# ---------------------------------------------------------------------------------------------
# The optimizer base class: validation, lazy state, dispatch. Subclasses are configurations.
# ---------------------------------------------------------------------------------------------


#: AdamW's ε (``torch.optim.AdamW``'s default), in the step size that the root-free step is grafted
#: onto: AdamW's step from the same moments is m̂/(sqrt(ŝ/B) + ε)
ADAMW_EPS = 1e-8


class Adaptive(NamedTuple):
    """The settings of the data-dependent denominator (:func:`_adaptive_scales`)."""

    rho: float  #: ρ, the relative damping
    gain: float  #: the grafted step's scale (1 − momentum for the heavy ball); 0: no grafting
    batch_size: float  #: B
    heavy_ball: bool  #: the step's numerator is g (heavy ball), not m


def _uses_helpers(tensors: list[torch.Tensor]) -> bool:
    """Whether the compiled CPU helpers sum these tensors (not while torch.compile traces)."""
    return (
        not torch.compiler.is_compiling()
        and all(t.device.type == "cpu" for t in tensors)
        and _fused.fused_kernel_available()
    )


def _float64_sums(tensors: list[torch.Tensor], *, squares: bool) -> torch.Tensor:
    """Per tensor Σ x² (``squares``) or Σ |x|, accumulated in float64, as one vector."""
    if torch.compiler.is_compiling():
        # NOTE: inductor does not lower torch._foreach_norm with a float64 result (it copies every
        # tensor to float64 first: the compiled step was 9× slower on CPU); per-tensor sums fuse
        # into one reduction each.
        return torch.stack([(t.double().square() if squares else t.double().abs()).sum() for t in tensors])
    norms = torch.stack(torch._foreach_norm(tensors, 2 if squares else 1, dtype=torch.float64))
    return norms.square() if squares else norms


def _graft_sums(
    grads: list[torch.Tensor],
    bufs: list[torch.Tensor],
    seconds: list[torch.Tensor],
    table: torch.Tensor,
    lam: torch.Tensor,
    batch_size: float,
    heavy_ball: bool,
) -> torch.Tensor:
    """Per tensor, ``[Σ (n/(k·s' + λ_l))², Σ (n/(sqrt(k·s'/B) + ε))²]`` over the local elements.

    s' = a·s + c·g² is the second moment after this step and n the numerator of the step (the new
    m, or g for the heavy ball), computed from the state before the step (nothing is written). On
    CPU the compiled helper does it in one float64 read; elsewhere ``torch._foreach_*`` ops with
    the coefficients of ``table`` (:func:`_coefficient_table`) as 0-d tensors.
    """
    if _uses_helpers(grads):
        return torch.ops.hf_rootfree.graft_sums(
            grads, bufs, seconds, table, lam, 1.0 / batch_size, ADAMW_EPS, heavy_ball
        )
    dtype = _compute_dtype(grads[0], seconds[0]) if grads else torch.float32
    columns = table.to(dtype).unbind(1)
    a, c, k, _, m_decay, m_gain, *_ = (list(col.unbind()) for col in columns)
    k_b = list((columns[2] / batch_size).unbind())
    g, s = _upcast(grads, dtype), _upcast(seconds, dtype)
    lam_list = list(lam.to(dtype).unbind())
    s_new = torch._foreach_mul(s, a)
    torch._foreach_addcmul_(s_new, torch._foreach_mul(g, c), g)
    if heavy_ball:
        num = g
    else:
        num = torch._foreach_mul(_upcast(bufs, dtype), m_decay)
        torch._foreach_add_(num, torch._foreach_mul(g, m_gain))
    d = torch._foreach_mul(s_new, k)
    torch._foreach_add_(d, lam_list)
    root_free = _float64_sums(torch._foreach_div(num, d), squares=True)
    adam = torch._foreach_sqrt(torch._foreach_mul(s_new, k_b))
    torch._foreach_add_(adam, ADAMW_EPS)
    adamw = _float64_sums(torch._foreach_div(num, adam), squares=True)
    return torch.stack([root_free, adamw], dim=1)


def _adaptive_scales(
    grads: list[torch.Tensor],
    bufs: list[torch.Tensor],
    seconds: list[torch.Tensor],
    table: torch.Tensor,
    settings: Adaptive,
) -> Scales:
    """Per-tensor (k, e) of the adaptive denominator ``d = k·s + e``, as float64 vectors.

    With ḡ = mean(|g|) the mean absolute gradient of the tensor at this step, and k, e the
    coefficients of ``table`` (:func:`_coefficient_table`)::

        λ_l = λ + ρ·B·ḡ²                          relative damping (ρ = ``relative_damping``)
        d   = k·s + λ_l                           when gain = 0 (the paper's lr), or
        d   = (k·s + λ_l) / r                     lr in AdamW units (gain > 0), with
        r   = gain·‖n/(sqrt(k·s/B) + ε)‖ / ‖n/(k·s + λ_l)‖

    where n is the step's numerator (m, or g for the heavy ball) and s the new second moment:
    each tensor's step has the norm of AdamW's step from the same moments (grafting) and the
    root-free direction.

    B·ḡ² is the tensor's typical per-example curvature: unlike mean(B·g²) it is not dominated by
    the few largest entries (on a tiny BERT, damping at mean(B·g²) left the model at chance, at
    B·ḡ² it trained like AdamW). The sums read the gradients (and, for r, the state) before the
    kernel runs, so every path (reference, foreach, fused) gets the same numbers. For DTensors
    (FSDP2) the sums are all-reduced over the shards, so λ_l and r are those of the whole tensor,
    as in one process. Everything stays on the device (no host sync), and it traces: the compiled
    path computes it inside its graph.
    """
    rho, gain, batch_size, heavy_ball = settings
    local_g = _distributed.local_tensors(grads)
    # DTensor.numel() is the global size
    numels = torch.tensor([max(t.numel(), 1) for t in grads], dtype=torch.float64, device=table.device)
    # NOTE: summed in float64, so that a sum over FSDP2 shards equals the one-process sum to
    # ~1e-16 rather than float32's ~1e-7 (which the step then carries). On CPU the compiled
    # helper does it in one read (torch's float64 norm costs ~2× the whole fused step); every
    # path uses the same sums, so the paths still agree bitwise.
    if _uses_helpers(local_g):
        abs_sums = torch.ops.hf_rootfree.abs_sums(local_g)
    else:
        abs_sums = _float64_sums(local_g, squares=False)
    g_mean = list((abs_sums.to(table.device) / numels).unbind())
    g_bar = torch.stack(_distributed.all_reduce_sharded(g_mean, grads)).to(torch.float64)
    k, e = table[:, 2], table[:, 3]
    lam = (e + rho * batch_size * g_bar * g_bar).clamp_min(_FLOAT32_TINY)
    if gain == 0:
        return k.clone(), lam
    local_b, local_s = _distributed.local_tensors(bufs), _distributed.local_tensors(seconds)
    sums = _graft_sums(local_g, local_b, local_s, table, lam, batch_size, heavy_ball).to(table.device)
    sums = torch.stack(_distributed.all_reduce_sharded(list(sums.unbind()), grads))
    # both sums are 0 only for a zero numerator, where any finite r gives the same (zero) step
    tiny = torch.finfo(torch.float64).tiny
    r = gain * ((sums[:, 1] + tiny) / (sums[:, 0] + tiny)).sqrt()
    return k / r, lam / r


class _ElementwiseOptimizer(CheckedStateDict, Optimizer):
    """Shared machinery of the element-wise family (not public).

    A subclass sets the switches below and maps its hyperparameters to the nine coefficients.
    """

    #: state key of the second moment ("s" for the root-free s of the paper, "exp_avg_sq" for AdaX)
    _second_key: str = "s"
    #: sqrt(s) in the denominator (AdaX) or s itself (root-free)
    _root: bool = False
    #: momentum after preconditioning (RootFreeRMSprop) instead of Adam-style before it
    _heavy_ball: bool = False

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        self._validate(defaults)
        #: per group index: (params, coefficients, per-tensor scales) of the last step
        self._denominators: dict[int, tuple[list[torch.Tensor], Any, Scales | None]] = {}
        super().__init__(params, defaults)

    # -- hooks for the configurations --------------------------------------------------------
    def _validate_hyperparameters(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _coefficients(self, group: dict[str, Any], step: float) -> Coefficients:
        raise NotImplementedError

    def _uses_buffer(self, group: dict[str, Any]) -> bool:
        return True

    def _adaptive(self, group: dict[str, Any]) -> tuple[float, float] | None:
        """``(ρ, gain)`` of the data-dependent denominator (:func:`_adaptive_scales`), or None.

        None keeps the fixed ``d = k·s + e`` of the coefficients (the paper's update).
        """
        return None

    # -- validation ---------------------------------------------------------------------------
    def _validate(self, group: dict[str, Any]) -> None:
        owner = type(self).__name__
        check_lr(group["lr"], owner)
        check_nonnegative("weight_decay", group["weight_decay"], owner)
        check_state_dtype(group["state_dtype"], owner)
        _check_impl_flags(group, owner)
        self._validate_hyperparameters(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._validate_group(self.param_groups[-1])
        except Exception:
            self.param_groups.pop()  # a rejected group is not kept
            raise

    def _validate_group(self, group: dict[str, Any]) -> None:
        owner = type(self).__name__
        for p in group["params"]:
            check_param(p, owner)
        self._validate(group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_denominators", {})
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("state_dtype", None)

    # -- state ----------------------------------------------------------------------------------
    @staticmethod
    def _state_dtype(param: torch.Tensor, group: dict[str, Any]) -> torch.dtype:
        if group["state_dtype"] is not None:
            return group["state_dtype"]
        return torch.float64 if param.dtype == torch.float64 else torch.float32

    # -- loading a checkpoint (checked first: see _checkpoint.py) ---------------------------------
    _optional_group_keys = frozenset({"foreach", "fused", "state_dtype"})

    def _check_loaded_groups(self, groups: list[dict[str, Any]]) -> None:
        for group in groups:
            self._validate(group)

    def _check_loaded_state(self, groups: list[dict[str, Any]], states: list[dict[str, Any]]) -> None:
        """Each non-empty state needs ``step`` and the second moment, of its parameter's shape."""
        params = [p for group in groups for p in group["params"]]
        buf_key = "momentum_buffer" if self._heavy_ball else "exp_avg"
        for index, (param, state) in enumerate(zip(params, states)):
            if not state:
                continue  # never stepped: its state is created at the first step
            self._check_known_keys(index, param, state, ("step", self._second_key, buf_key))
            for key in ("step", self._second_key):
                if key not in state:
                    raise self._load_error(index, param, key, "is missing")
            self._check_step(index, param, state["step"])
            for key in (self._second_key, buf_key):
                if key in state:
                    self._check_tensor(index, param, key, state[key], param.shape)

    def _store_loaded_value(self, param: torch.Tensor, group: dict[str, Any], key: str, value: Any) -> Any:
        """Tensors other than ``step`` keep the state dtype (fp32 for bf16 parameters unless
        ``state_dtype`` says otherwise: torch would cast them to the parameter's dtype) on the
        parameter's device."""
        if torch.is_tensor(value) and key != "step":
            return value.to(device=param.device, dtype=self._state_dtype(param, group), copy=True)
        return super()._store_loaded_value(param, group, key, value)

    def _init_group(self, group: dict[str, Any]) -> tuple[list[torch.Tensor], ...]:
        owner = type(self).__name__
        params, grads, bufs, seconds, steps = [], [], [], [], []
        with_buffer = self._uses_buffer(group)
        buf_key = "momentum_buffer" if self._heavy_ball else "exp_avg"
        for p in group["params"]:
            if p.grad is None:
                continue
            check_grad(p, owner)
            state = self.state[p]
            dtype = self._state_dtype(p, group)
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=torch.float64)
                state[self._second_key] = torch.full_like(
                    p, group.get("s0", 0.0), dtype=dtype, memory_format=torch.contiguous_format
                )
            if with_buffer and buf_key not in state:
                state[buf_key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
            params.append(p)
            grads.append(p.grad)
            seconds.append(state[self._second_key])
            steps.append(state["step"])
            if with_buffer:
                bufs.append(state[buf_key])
        return params, grads, bufs, seconds, steps

    def _path(self, group: dict[str, Any], params: list[torch.Tensor]) -> str:
        all_cpu = all(p.device.type == "cpu" for p in params)
        devices = {p.device for p in params}
        compiled = len(devices) == 1 and _fused.compiled_step_available(next(iter(devices)))
        if group["fused"]:
            if all_cpu:
                if not _fused.fused_kernel_available():
                    raise RuntimeError(
                        f"{type(self).__name__}: fused=True, but the fused CPU kernel could not be "
                        "built (see the earlier warning); use fused=None to fall back"
                    )
                return "fused"
            if not compiled:
                raise RuntimeError(
                    f"{type(self).__name__}: fused=True needs CPU tensors (the C++ kernel) or CUDA "
                    f"tensors with Triton (the compiled kernel), got {sorted(map(str, devices))}; "
                    "use fused=None (the default picks the foreach path)"
                )
            return "compiled"
        if group["foreach"]:
            return "foreach"
        if group["fused"] is None and group["foreach"] is None:
            if all_cpu:
                return "fused" if _fused.fused_kernel_available() else "single_tensor"
            return "compiled" if compiled else "foreach"
        return "single_tensor"

    # -- diagnostics --------------------------------------------------------------------------------
    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        """Statistics for logging, over all elements with state.

        * ``s_mean``: the mean second-moment state (root-free: the curvature estimate s, a running
          average of B·g²);
        * ``precond_mean``: the mean per-element step scale 1/d of the last step, with d the
          denominator actually used (``k·s + e``: bias correction, damping, and in AdamW units the
          per-tensor scale; AdaX: ``k·sqrt(v̂) + e``);
        * ``adaptive_fraction``: the fraction of elements whose curvature term (the B·g² part of
          ŝ) exceeds the rest of the denominator (damping, and a prior s0 still in s): how adaptive
          the method currently is. Near 0 the method is SGD-like (e.g. the paper's s0 = 1 prior
          early in training); with the defaults it is typically 0.2–0.4 (λ_l = 3·B·ḡ² follows
          the tensor's typical curvature: the elements with |g| above ~1.7·ḡ).

        Reads the state, so it synchronizes with the device: call it at logging steps only.
        """
        total, adaptive, s_sum, precond_sum = 0, 0, 0.0, 0.0
        for index, group in enumerate(self.param_groups):
            last = self._denominators.get(index)
            rows = {} if last is None else {id(p): i for i, p in enumerate(last[0])}
            for p in group["params"]:
                state = self.state.get(p, {})
                s = state.get(self._second_key)
                if s is None or s.numel() == 0 or id(p) not in rows:
                    continue
                _, coeffs, scales = last
                i = rows[id(p)]
                k, e = coeffs[i if len(coeffs) > 1 else 0][2:4]
                if scales is not None:
                    k, e = float(scales[0][i]), float(scales[1][i])
                s = _distributed.local_tensors([s])[0].double()
                s0 = float(group.get("s0", 0.0))
                prior = s0 * self._prior_weight(group, float(state["step"])) if s0 else 0.0
                curvature = (s - prior).clamp_min(0.0)
                curvature = (curvature.sqrt() if self._root else curvature) * k
                denom = (s.sqrt() if self._root else s) * k + e
                total += s.numel()
                adaptive += int((curvature > denom - curvature).sum())
                s_sum += float(s.sum())
                precond_sum += float(denom.reciprocal().sum())
        if total == 0:
            return {}
        return {
            "s_mean": s_sum / total,
            "precond_mean": precond_sum / total,
            "adaptive_fraction": adaptive / total,
        }

    def _prior_weight(self, group: dict[str, Any], step: float) -> float:
        """The weight of s0 in s after ``step`` steps (a^t for a constant decay a)."""
        return self._coefficients(group, step).a ** step

    # -- step -------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step.

        Args:
            closure: an optional callable that re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # NOTE: under torch.compile, the host-side planning below runs eagerly (one graph break)
        # and the update is traced from its coefficient table, so the graph does not change from
        # step to step (no recompiles).
        compiling = torch.compiler.is_compiling()
        switches = dict(root=self._root, heavy_ball=self._heavy_ball)
        for plan in self._plan(compiling):
            if compiling:
                _table_step(*plan.tensors, plan.table, adaptive=plan.adaptive, **switches)
            elif plan.path == "compiled":
                _compiled_step(plan, **switches)
            else:
                _PATHS[plan.path](*plan.tensors, plan.coeffs, scales=plan.scales, **switches)
        return loss

    @torch.compiler.disable
    def _plan(self, traced: bool) -> list[_Plan]:
        """What each group does at this step, decided on the host: checks, lazy state, the step
        counters, the coefficients, the path, and the data-dependent scales (computed here for the
        eager paths and sharded tensors, else inside the traced update)."""
        # Check every group before touching any: bad input must not leave a half-applied step.
        work = [(group, self._init_group(group)) for group in self.param_groups]
        plans = []
        for index, (group, (params, grads, bufs, seconds, steps)) in enumerate(work):
            if not params:
                continue
            torch._foreach_add_(steps, 1.0)  # steps live on the CPU: no device sync
            values = torch.stack(steps).tolist()
            distinct = set(values)
            hyper = with_float_lr(group)
            if len(distinct) == 1:
                coeffs = [self._coefficients(hyper, values[0])]
            else:
                cache = {t: self._coefficients(hyper, t) for t in distinct}
                coeffs = [cache[t] for t in values]
            # FSDP2 shards parameters as DTensors: the update is element-wise, so it runs on each
            # rank's local shard (the state is created like the parameter, so it is sharded alike)
            local = tuple(_distributed.local_tensors(ts) for ts in (params, grads, bufs, seconds))
            path = self._path(group, local[0])
            from_table = traced or path == "compiled"  # the update reads the coefficient table
            adaptive, scales, table = self._adaptive(group), None, None
            if from_table or adaptive is not None:
                table = _coefficient_table(coeffs, len(params), local[0][0].device)
            if adaptive is not None:
                settings = Adaptive(*adaptive, group["batch_size"], self._heavy_ball)
                if from_table and not any(map(_distributed.shard_groups, grads)):
                    scales = (table[:, 2], table[:, 3])  # the traced update computes and writes them
                else:
                    scales = _adaptive_scales(grads, bufs, seconds, table, settings)
                    table[:, 2], table[:, 3] = scales
                    settings = None
                adaptive = settings
            self._denominators[index] = (params, coeffs, scales)  # for diagnostics(): no sync here
            plans.append(_Plan(local, coeffs, scales, path, table, adaptive))
        return plans


class _Plan(NamedTuple):
    """One group's update at one step (:meth:`_ElementwiseOptimizer._plan`)."""

    tensors: tuple[list[torch.Tensor], ...]  #: (params, grads, bufs, seconds), local shards
    coeffs: list[Coefficients]  #: one row for all tensors, or one per tensor
    scales: Scales | None  #: the data-dependent (k, e) of each tensor (views of ``table``)
    path: str  #: the key of the path in ``_PATHS``, or "compiled"
    table: torch.Tensor | None  #: the coefficients as a tensor (:func:`_coefficient_table`), if used
    adaptive: Adaptive | None  #: compute the scales inside the traced update


# ---------------------------------------------------------------------------------------------
# The four configurations.
# ---------------------------------------------------------------------------------------------

_IMPL_ARGS_DOC = """
        state_dtype: dtype of the optimizer state. ``None`` (default) keeps it in float32 for
            float32/bfloat16/float16 parameters and in float64 for float64 parameters. The update
            itself is always computed in at least float32.
        foreach: use the ``torch._foreach_*`` path. ``None`` (default) decides per step: the fused
            kernel on CPU, the compiled kernel on CUDA (with Triton), foreach elsewhere.
        fused: use a fused kernel: on CPU the C++ kernel (built on first use, cached), on CUDA the
            update compiled by ``torch.compile`` (Triton; compiled at the first step). ``None``
            (default) uses them where they are available and falls back to the reference path
            (CPU) or the foreach path (CUDA) otherwise."""

_ROOTFREE_ARGS_DOC = """
        s0: initial value of s, ≥ 0 (default 0: s is an average of B·g² from the first step).
            The paper's prior is 1.
        relative_damping: ρ ≥ 0, the per-tensor damping in units of the tensor's typical curvature:
            λ_l = λ + ρ·B·ḡ², ḡ = mean(|g|) over the tensor at this step (default 3). 0 gives
            the paper's fixed λ.
        lr_units: ``"adamw"`` (default): η is an AdamW learning rate; the root-free step of
            every tensor is rescaled to the norm of AdamW's step from the same moments,
            ‖m̂/(sqrt(ŝ/B) + ε)‖ with ε = 1e-8 (grafting). ``"paper"``: η multiplies
            m/(ŝ + λ_l) as in the paper."""

#: the arguments that give the paper's exact update (s0 = 1 prior, fixed λ, the paper's lr)
PAPER_MODE = {"s0": 1.0, "bias_correction": False, "relative_damping": 0.0, "lr_units": "paper"}


class _RootFreeOptimizer(_ElementwiseOptimizer):
    """The root-free members of the family: the start s0, adaptive damping and the lr units.

    Their denominator is ``ŝ + λ_l`` with ŝ the (bias-corrected) running average of B·g². Two
    choices make an AdamW learning rate and weight decay carry over unchanged (``lr_units=
    "adamw"``, ``relative_damping`` ρ > 0, the default):

    * λ_l = λ + ρ·B·ḡ² per tensor (ḡ = mean |g| over its elements at this step): the damping
      follows the tensor's own typical curvature, which on transformers spans 1e-10 … 1e-4 across
      layers, where one fixed λ fits none of them;
    * grafting (Agarwal et al., 2020, as Shampoo implementations graft onto Adam): each tensor's
      step keeps the root-free direction m̂/(ŝ + λ_l) and takes the norm of AdamW's step from the
      same moments, ‖m̂/(sqrt(ŝ/B) + ε)‖ (ŝ/B is AdamW's v̂: s tracks B·g²). So η means per
      tensor exactly what it means to AdamW, and no extra state is needed.

    The per-element preconditioner stays root-free, 1/(ŝ + λ_l): inside a tensor, the step of an
    element falls as 1/g above the damping, where Adam's is constant. The square roots are in the
    one scalar per tensor that sets the step's size. An earlier rule (scaling by 2·sqrt(B·λ_l), so
    that the per-element peak is η) gave steps well below AdamW's: on held-out text the models
    lagged AdamW by 0.06 accuracy and 1.8× perplexity.
    """

    def _validate_rootfree(self, group: dict[str, Any]) -> None:
        owner = type(self).__name__
        check_nonnegative("s0", group["s0"], owner)
        check_nonnegative("relative_damping", group["relative_damping"], owner)
        check_lr_units(group["lr_units"], owner)
        bias_correction = group.get("bias_correction", False)
        if not isinstance(bias_correction, bool):
            raise TypeError(f"{owner}: bias_correction must be True or False, got {bias_correction!r}")
        if bias_correction and group["s0"] != 0:
            raise ValueError(
                f"{owner}: bias_correction=True needs s0=0 (got s0={group['s0']!r}): dividing s by "
                "(1 − β2^t) multiplies a prior s0 by up to 1/(1 − β2) in the first steps. Use "
                "s0=0 with bias correction, or s0 > 0 with bias_correction=False"
            )
        if group["relative_damping"] == 0 and group["damping"] == 0:
            if group["lr_units"] == "adamw":
                raise ValueError(
                    f"{owner}: lr_units='adamw' needs relative_damping > 0 or damping > 0 (both are 0): "
                    "the root-free direction m/(s + λ) is undefined wherever s is 0"
                )
            if group["s0"] == 0:
                raise ValueError(
                    f"{owner}: with s0=0, damping=0 and relative_damping=0 the denominator s + λ is 0 "
                    "wherever the gradient has been 0; set damping > 0 or relative_damping > 0"
                )

    def _adaptive(self, group: dict[str, Any]) -> tuple[float, float] | None:
        adamw_units = group["lr_units"] == "adamw"
        if group["relative_damping"] == 0 and not adamw_units:
            return None
        return group["relative_damping"], self._step_gain(group) if adamw_units else 0.0

    #: checkpoints from before s0, relative damping and lr units resume with the paper's update
    _legacy_group_defaults = PAPER_MODE

    def _step_gain(self, group: dict[str, Any]) -> float:
        """What the momentum does to the steady-state step (1 for an average of g)."""
        return 1.0

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # pickles from before these options: the paper's update
            for key, value in PAPER_MODE.items():
                if key != "bias_correction" or "bias_correction" in self.defaults:
                    group.setdefault(key, value)


class RootFreeAdamW(_RootFreeOptimizer):
    __doc__ = rf"""Root-free AdamW (Lin et al., ICML 2024; the authors' ``rfadamw.py``).

    AdamW with the square root removed: the preconditioner is ``1/(ŝ + λ_l)`` where ŝ tracks the
    per-example curvature ``B·g²``. With µ the parameters, g the mean gradient over B examples,
    η the learning rate, γ the weight decay, λ the damping, ρ the relative damping and t the
    step, the default update (``lr_units="adamw"``) is::

        µ ← µ·(1 − η·γ)                          decoupled weight decay, as AdamW
        m ← β1·m + (1 − β1)·g                    m0 = 0  (state "exp_avg")
        s ← β2·s + (1 − β2)·B·g²                 s0 = 0  (state "s")
        m̂ = m/(1 − β1^t),  ŝ = s/(1 − β2^t)       bias correction (``bias_correction``)
        λ_l = λ + ρ·B·ḡ²,  ḡ = mean(|g|)           per tensor, over its elements
        u = m̂ / (ŝ + λ_l)                         the root-free direction
        r = ‖m̂ / (sqrt(ŝ/B) + ε)‖ / ‖u‖            per tensor; ε = 1e-8 (``ADAMW_EPS``)
        µ ← µ − η·r·u

    Each tensor's step has the root-free direction and the norm of AdamW's step from the same
    moments (ŝ/B is AdamW's v̂), so an AdamW learning rate and weight decay carry over
    unchanged. The paper's update is
    ``s0=1.0, bias_correction=False, relative_damping=0.0, lr_units="paper"``
    (``hf_rootfree.optim.elementwise.PAPER_MODE``) with the paper's λ (e.g. ``damping=1e-4``)::

        m ← β1·m + (1 − β1)·g;   s ← β2·s + (1 − β2)·B·g²  (s0 = 1);   µ ← µ·(1 − η·γ) − η·m / (s + λ)

    ===============  ============================
    symbol           argument
    ===============  ============================
    η                ``lr``
    β1, β2           ``betas`` (β2 = 1 − the paper's second-moment step size)
    λ                ``damping``
    ρ                ``relative_damping``
    γ                ``weight_decay``
    B                ``batch_size``
    s0               ``s0``
    ===============  ============================

    Args:
        params: parameters or parameter groups, as for any ``torch.optim`` optimizer.
        lr: learning rate η (default 1e-3), in AdamW's units unless ``lr_units="paper"``.
        betas: (β1, β2), each in [0, 1) (default (0.9, 0.999)).
        damping: λ ≥ 0, added to ŝ with no root (default 0; the paper's runs use 5e-7 … 8e-4).
        weight_decay: decoupled weight decay γ ≥ 0 (default 0).
        batch_size: B, keyword-only and required: the number of examples the loss is averaged over.
        bias_correction: divide m by (1 − β1^t) and s by (1 − β2^t), as AdamW (default True;
            needs s0 = 0).{_ROOTFREE_ARGS_DOC}{_IMPL_ARGS_DOC}

    Paper: W. Lin, F. Dangel, R. Eschenhagen, J. Bae, R. E. Turner, A. Makhzani, "Can We Remove the
    Square-Root in Adaptive Gradient Methods? A Second-Order Perspective", ICML 2024,
    https://arxiv.org/abs/2402.03496 ; reference code
    https://github.com/yorkerlin/remove-the-square-root (``myoptim/rfadamw.py``, commit c8d43f2).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        damping: float = 0.0,
        weight_decay: float = 0.0,
        *,
        batch_size: float | None = None,
        s0: float = 0.0,
        bias_correction: bool = True,
        relative_damping: float = 3.0,
        lr_units: str = "adamw",
        state_dtype: torch.dtype | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            damping=damping,
            weight_decay=weight_decay,
            batch_size=batch_size,
            s0=s0,
            bias_correction=bias_correction,
            relative_damping=relative_damping,
            lr_units=lr_units,
            state_dtype=state_dtype,
            foreach=foreach,
            fused=fused,
        )
        super().__init__(params, defaults)

    def _validate_hyperparameters(self, group: dict[str, Any]) -> None:
        owner = type(self).__name__
        check_betas(group["betas"], owner)
        check_range("betas[0]", group["betas"][0], owner, 0.0, 1.0)
        check_range("betas[1]", group["betas"][1], owner, 0.0, 1.0)
        check_nonnegative("damping", group["damping"], owner)
        check_batch_size(group["batch_size"], owner)
        self._validate_rootfree(group)

    def _coefficients(self, group: dict[str, Any], step: float) -> Coefficients:
        beta1, beta2 = group["betas"]
        lr, inv_bc2 = group["lr"], 1.0
        if group["bias_correction"]:
            lr, inv_bc2 = lr / (1.0 - beta1**step), 1.0 / (1.0 - beta2**step)
        return Coefficients(
            a=beta2,
            c=(1.0 - beta2) * group["batch_size"],
            k=inv_bc2,
            e=group["damping"],
            m_decay=beta1,
            m_gain=1.0 - beta1,
            lr=lr,
            p_mul=1.0 - group["lr"] * group["weight_decay"],
            wd_add=0.0,
        )


class RootFreeRMSprop(_RootFreeOptimizer):
    __doc__ = rf"""Root-free RMSprop, the paper's diagonal method (Lin et al., ICML 2024, Fig. 4/7).

    RMSprop with the square root removed, the B·g² curvature estimate s, damping outside any root,
    and heavy-ball momentum *after* preconditioning (the authors' ``rfrmsprop.py``). The default
    update (``lr_units="adamw"``), with ŝ = s/(1 − α^t) and λ_l = λ + ρ·B·ḡ² per tensor
    (ḡ = mean(|g|) over the tensor at this step)::

        s ← α·s + (1 − α)·B·g²                   s0 = 0  (state "s")
        u ← g / (ŝ + λ_l)                        the root-free direction
        r = (1 − ϱ)·‖g / (sqrt(ŝ/B) + ε)‖ / ‖u‖   per tensor; ε = 1e-8
        b ← ϱ·b + r·u                            b0 = 0 (state "momentum_buffer"); b = r·u if ϱ = 0
        µ ← µ·(1 − η·γ) − η·b                    decoupled weight decay, as AdamW

    Each tensor's preconditioned gradient has the norm of RMSprop's, g/(sqrt(ŝ/B) + ε), times
    (1 − ϱ), so that the heavy ball (which sums its inputs /(1 − ϱ)) moves as far as AdamW does
    at the same η. The paper's update is ``s0=1.0, bias_correction=False,
    relative_damping=0.0, lr_units="paper"`` with the paper's λ (e.g. ``damping=1e-4``)::

        s ← α·s + (1 − α)·B·g²  (s0 = 1);   u ← g / (s + λ) + γ·µ;   b ← ϱ·b + u;   µ ← µ − η·b

    ===============  ============================
    symbol           argument
    ===============  ============================
    η                ``lr``   (the paper's β1)
    α                ``alpha`` (1 − the paper's β2, the preconditioner step size)
    λ                ``damping``
    ρ                ``relative_damping``
    ϱ                ``momentum`` (the paper's α1)
    γ                ``weight_decay``
    B                ``batch_size``
    s0               ``s0``
    ===============  ============================

    Args:
        params: parameters or parameter groups.
        lr: learning rate η (default 1e-3), in AdamW's units unless ``lr_units="paper"``.
        alpha: second-moment decay α in [0, 1) (default 0.999).
        damping: λ ≥ 0 (default 0; the paper's runs use 5e-7 … 8e-4).
        momentum: heavy-ball momentum ϱ in [0, 1) (default 0.9).
        weight_decay: γ ≥ 0 (default 0): decoupled (AdamW's) in ``lr_units="adamw"``, added to
            the step (the paper's) in ``lr_units="paper"``.
        batch_size: B, keyword-only and required: the number of examples the loss is averaged
            over.
        bias_correction: divide s by (1 − α^t) (default True; needs s0 = 0).
            {_ROOTFREE_ARGS_DOC.strip()}{_IMPL_ARGS_DOC}

    Paper: https://arxiv.org/abs/2402.03496 ; reference code
    https://github.com/yorkerlin/remove-the-square-root (``myoptim/rfrmsprop.py``, commit e26d7c9).
    """

    _heavy_ball = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        alpha: float = 0.999,
        damping: float = 0.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        batch_size: float | None = None,
        s0: float = 0.0,
        bias_correction: bool = True,
        relative_damping: float = 3.0,
        lr_units: str = "adamw",
        state_dtype: torch.dtype | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            alpha=alpha,
            damping=damping,
            momentum=momentum,
            weight_decay=weight_decay,
            batch_size=batch_size,
            s0=s0,
            bias_correction=bias_correction,
            relative_damping=relative_damping,
            lr_units=lr_units,
            state_dtype=state_dtype,
            foreach=foreach,
            fused=fused,
        )
        super().__init__(params, defaults)

    def _validate_hyperparameters(self, group: dict[str, Any]) -> None:
        owner = type(self).__name__
        check_range("alpha", group["alpha"], owner, 0.0, 1.0)
        check_nonnegative("damping", group["damping"], owner)
        check_range("momentum", group["momentum"], owner, 0.0, 1.0)
        check_batch_size(group["batch_size"], owner)
        self._validate_rootfree(group)

    def _uses_buffer(self, group: dict[str, Any]) -> bool:
        return group["momentum"] != 0

    def _step_gain(self, group: dict[str, Any]) -> float:
        return 1.0 - group["momentum"]  # the heavy ball sums u/(1 − ϱ)

    def _coefficients(self, group: dict[str, Any], step: float) -> Coefficients:
        alpha = group["alpha"]
        decoupled = group["lr_units"] == "adamw"
        return Coefficients(
            a=alpha,
            c=(1.0 - alpha) * group["batch_size"],
            k=1.0 / (1.0 - alpha**step) if group["bias_correction"] else 1.0,
            e=group["damping"],
            m_decay=group["momentum"],
            m_gain=1.0,
            lr=group["lr"],
            p_mul=1.0 - group["lr"] * group["weight_decay"] if decoupled else 1.0,
            wd_add=0.0 if decoupled else group["weight_decay"],
        )


class AdaX(_ElementwiseOptimizer):
    __doc__ = rf"""AdaX with decoupled weight decay (AdaX-W of Li, Zhang, Wang, Luo, 2020).

    Adam's exponential moving average of g² replaced by a long-term memory that never forgets::

        µ ← µ·(1 − η·γ)
        m ← β1·m + (1 − β1)·g              no bias correction of m  (state "exp_avg")
        v ← (1 + β2)·v + β2·g²             v0 = 0, grows without bound
        c_t = (1 + β2)^t − 1
        µ ← µ − η·sqrt(c_t)·m / (sqrt(v) + ε)

    # NOTE: v overflows float32 near t ≈ 9·10^5 (β2 = 1e-4), so the state is the normalized
    # v̂ = v/c_t (state "exp_avg_sq"), which obeys v̂ ← β̂_t·v̂ + (1 − β̂_t)·g² with
    # β̂_t = 1 − β2/c_t, and the step is η·m/(sqrt(v̂) + ε/sqrt(c_t)) -- the same update. c_t is
    # carried as log c_t = log expm1(t·log1p(β2)), so every scalar stays finite for any t.
    # β̂_t ≈ 1 − 1/t early on: AdaFactor's increasing-β2 schedule (Su Jianlin's reading).

    ===============  ============================
    symbol           argument
    ===============  ============================
    η                ``lr``
    β1, β2           ``betas`` (β2 is small: 1e-4)
    ε                ``eps``
    γ                ``weight_decay``
    ===============  ============================

    Args:
        params: parameters or parameter groups.
        lr: learning rate η (default 5e-3).
        betas: (β1 in [0, 1), β2 in (0, 1)) (default (0.9, 1e-4)).
        eps: ε ≥ 0, added outside the root (default 1e-12).
        weight_decay: decoupled weight decay γ ≥ 0 (default 0).{_IMPL_ARGS_DOC}

    Paper: W. Li, Z. Zhang, X. Wang, P. Luo, "AdaX: Adaptive Gradient Descent with Exponential
    Long Term Memory", https://arxiv.org/abs/2004.09740 ; code
    https://github.com/switchablenorms/AdaX (``AdaXW``, commit e18f35f).
    """

    _second_key = "exp_avg_sq"
    _root = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 5e-3,
        betas: tuple[float, float] = (0.9, 1e-4),
        eps: float = 1e-12,
        weight_decay: float = 0.0,
        *,
        state_dtype: torch.dtype | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps,
            weight_decay=weight_decay,
            state_dtype=state_dtype,
            foreach=foreach,
            fused=fused,
        )
        super().__init__(params, defaults)

    def _validate_hyperparameters(self, group: dict[str, Any]) -> None:
        owner = type(self).__name__
        check_betas(group["betas"], owner)
        check_range("betas[0]", group["betas"][0], owner, 0.0, 1.0)
        check_range("betas[1]", group["betas"][1], owner, 0.0, 1.0, low_open=True)
        check_nonnegative("eps", group["eps"], owner)

    def _coefficients(self, group: dict[str, Any], step: float) -> Coefficients:
        beta1, beta2 = group["betas"]
        weight, log_c = adax_weight(step, beta2)
        eps = group["eps"] * math.exp(-0.5 * log_c)
        if group["eps"] > 0:
            # NOTE: ε/sqrt(c_t) underflows to 0 in float32 near t ≈ 1.5·10^6 (β2 = 1e-4), which
            # would turn the zero step of an entry whose gradient was always 0 into 0/0. Keeping
            # it at least float32's smallest normal number changes no other step measurably.
            eps = max(eps, _FLOAT32_TINY)
        return Coefficients(
            a=1.0 - weight,
            c=weight,
            k=1.0,
            e=eps,
            m_decay=beta1,
            m_gain=1.0 - beta1,
            lr=group["lr"],
            p_mul=1.0 - group["lr"] * group["weight_decay"],
            wd_add=0.0,
        )


class RootFreeAdaX(_RootFreeOptimizer):
    __doc__ = rf"""Root-free AdaX: the paper's root-free update with AdaX's long-term memory.

    AdaX's never-forgetting average of the per-example curvature B·g², with the root-free update.
    A prior s0 counts as n0 (``prior_steps``) pseudo-observations at time 0; the default update
    (``lr_units="adamw"``, s0 = 0, n0 = 0) is::

        D_t = (1 + n0·β2)·(1 + β2)^t − 1           D_0 = n0·β2
        β̂_t = 1 − β2 / D_t                          (β̂_1 = 0 when n0 = 0: no bias to correct)
        m ← β1·m + (1 − β1)·g                      (state "exp_avg")
        s ← β̂_t·s + (1 − β̂_t)·B·g²                 (state "s")
        λ_l = λ + ρ·B·ḡ²,  ḡ = mean(|g|)             per tensor
        u = m / (s + λ_l),  r = ‖m / (sqrt(s/B) + ε)‖ / ‖u‖     per tensor; ε = 1e-8
        µ ← µ·(1 − η·γ) − η·r·u                    the norm of AdaX's step, the root-free direction

    ``lr_units="paper", relative_damping=0.0`` gives the plain root-free update
    ``µ ← µ·(1 − η·γ) − η·m / (s + λ)``; ``s0=1.0, prior_steps=1.0`` its earlier prior (the prior
    and the first observation weigh equally at t = 1). D_t is carried as its logarithm
    (``D_t = expm1(t·log1p(β2) + log1p(n0·β2))``), so it stays finite for any t.

    ===============  ============================
    symbol           argument
    ===============  ============================
    η                ``lr``
    β1, β2           ``betas`` (β2 small, as in AdaX)
    λ                ``damping``
    ρ                ``relative_damping``
    n0               ``prior_steps``
    γ                ``weight_decay``
    B                ``batch_size``
    s0               ``s0``
    ===============  ============================

    Args:
        params: parameters or parameter groups.
        lr: learning rate η (default 1e-3), in AdamW's units unless ``lr_units="paper"``.
        betas: (β1 in [0, 1), β2 in (0, 1)) (default (0.9, 1e-4)).
        damping: λ ≥ 0 (default 0).
        weight_decay: decoupled weight decay γ ≥ 0 (default 0).
        prior_steps: n0 ≥ 0, the weight of the prior s0 in steps (default 0).
        batch_size: B, keyword-only and required: the number of examples the loss is averaged
            over.{_ROOTFREE_ARGS_DOC}{_IMPL_ARGS_DOC}

    This combination is new in hf_rootfree; it follows the root-free recipe of
    https://arxiv.org/abs/2402.03496 and AdaX's schedule from https://arxiv.org/abs/2004.09740 .
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 1e-4),
        damping: float = 0.0,
        weight_decay: float = 0.0,
        prior_steps: float = 0.0,
        *,
        batch_size: float | None = None,
        s0: float = 0.0,
        relative_damping: float = 3.0,
        lr_units: str = "adamw",
        state_dtype: torch.dtype | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            damping=damping,
            weight_decay=weight_decay,
            prior_steps=prior_steps,
            batch_size=batch_size,
            s0=s0,
            relative_damping=relative_damping,
            lr_units=lr_units,
            state_dtype=state_dtype,
            foreach=foreach,
            fused=fused,
        )
        super().__init__(params, defaults)

    def _validate_hyperparameters(self, group: dict[str, Any]) -> None:
        owner = type(self).__name__
        check_betas(group["betas"], owner)
        check_range("betas[0]", group["betas"][0], owner, 0.0, 1.0)
        check_range("betas[1]", group["betas"][1], owner, 0.0, 1.0, low_open=True)
        check_nonnegative("damping", group["damping"], owner)
        check_nonnegative("prior_steps", group["prior_steps"], owner)
        check_batch_size(group["batch_size"], owner)
        self._validate_rootfree(group)

    def _prior_weight(self, group: dict[str, Any], step: float) -> float:
        """Π β̂_τ = (1 + β2)^t·n0·β2 / D_t: the weight of s0 after t steps."""
        beta2, n0 = group["betas"][1], group["prior_steps"]
        if n0 == 0:
            return 0.0
        _, log_d = adax_weight(step, beta2, n0)
        return math.exp(step * math.log1p(beta2) + math.log(n0 * beta2) - log_d)

    def _coefficients(self, group: dict[str, Any], step: float) -> Coefficients:
        beta1, beta2 = group["betas"]
        weight, _ = adax_weight(step, beta2, group["prior_steps"])
        return Coefficients(
            a=1.0 - weight,
            c=weight * group["batch_size"],
            k=1.0,
            e=group["damping"],
            m_decay=beta1,
            m_gain=1.0 - beta1,
            lr=group["lr"],
            p_mul=1.0 - group["lr"] * group["weight_decay"],
            wd_add=0.0,
        )
