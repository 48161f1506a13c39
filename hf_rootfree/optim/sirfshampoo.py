"""SIRFShampoo: structured inverse- and root-free Shampoo (Lin et al., ICML 2024).

One preconditioner per parameter (or per weight + bias of a layer when ``model`` is given): a
Kronecker product of factors K_1 … K_N, one per axis of the (squeezed, optionally merged) gradient,
updated with matrix products only. See :class:`SIRFShampoo` for the update.

Implementation notes:

* Factor updates of blocks with the same shape, structures and hyperparameters run as one batched
  computation (``torch.bmm``-style products over a leading batch axis).
* K Kᵀ (scaled to stay in range, as the reference package does) is cached in the state after each
  factor update, so the steps in between cost one product per axis.
* Dense factors fold the scalings and sums of the factor update into ``baddbmm`` products and
  compute the symmetric ones (KᵀK, G Gᵀ, K Kᵀ) as their upper block triangle
  (:meth:`~hf_rootfree.optim.structures.Dense.momentum_step`).
* Several processes (DDP, FSDP2): gathering sharded gradients and sharing the work across ranks
  is in :mod:`hf_rootfree.optim._distributed`.
* ``step()`` never synchronizes with the device: the update schedule is kept on the host, scalars
  that depend on the factors stay tensors, and a non-finite factor update is rejected with
  ``torch.where`` and counted in a device tensor.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import _distributed
from ._checkpoint import CheckedStateDict
from ._common import (
    BATCH_SIZE_HELP,
    check_batch_size,
    check_grad,
    check_lr,
    check_lr_units,
    check_nonnegative,
    check_param,
    check_positive_int,
    check_range,
)
from .structures import LARGE_DIM_STRUCTURES, STRUCTURES, Dense, Structure, _times, make_structure

__all__ = ["SIRFShampoo"]

_OWNER = "SIRFShampoo"
#: diagnostics() warns once when a block skipped at least this many factor updates, and at least
#: half of those it attempted
_SKIP_WARN_MIN = 3

#: group options that shape or drive the preconditioner: blocks that share a preconditioner, or
#: are batched together, must agree on all of them
_PRECOND_KEYS = (
    "precond_lr",
    "precond_momentum",
    "damping",
    "batch_size",
    "update_freq",
    "structures",
    "precond_dtype",
    "max_dense_dim",
    "merge_dims",
    "block_size",
    "hierarchical_sizes",
    "large_dim_structure",
    "share_bias",
)

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def _precond_dtype(value: Any) -> torch.dtype | None:
    """Normalize ``precond_dtype`` (a dtype or its name) to a torch.dtype."""
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        name = str(value).removeprefix("torch.")
    elif isinstance(value, str):
        name = value.removeprefix("torch.")
    else:
        name = None
    if name not in _DTYPES:
        raise TypeError(
            f"{_OWNER}: precond_dtype must be None or one of torch.float32, torch.bfloat16, "
            f"torch.float16, torch.float64 (or their names), got {value!r}"
        )
    return _DTYPES[name]


def _normalize_structures(value: Any) -> str | tuple[str, ...] | dict[int, str | tuple[str, ...]]:
    """Check ``structures`` and return it as plain, picklable values."""

    def check_name(name: Any) -> str:
        if not isinstance(name, str) or name not in STRUCTURES:
            raise ValueError(
                f"{_OWNER}: unknown factor structure {name!r} in structures={value!r}; "
                f"allowed: {', '.join(STRUCTURES)}"
            )
        return name

    def check_entry(entry: Any) -> str | tuple[str, ...]:
        if isinstance(entry, str):
            return check_name(entry)
        if isinstance(entry, (tuple, list)) and entry:
            return tuple(check_name(name) for name in entry)
        raise ValueError(
            f"{_OWNER}: structures={value!r}: each entry must be a structure name or a tuple of "
            f"names (one per factor); allowed names: {', '.join(STRUCTURES)}"
        )

    if isinstance(value, dict):
        out = {}
        for key, entry in value.items():
            if isinstance(key, bool) or not isinstance(key, int) or key < 1:
                raise ValueError(
                    f"{_OWNER}: structures={value!r}: dict keys are numbers of factors (positive "
                    f"integers), got key {key!r}"
                )
            entry = check_entry(entry)
            if isinstance(entry, tuple) and len(entry) != key:
                raise ValueError(
                    f"{_OWNER}: structures={value!r}: tensors with {key} factors need {key} structure "
                    f"names, got {len(entry)}"
                )
            out[key] = entry
        return out
    return check_entry(value)


def _structures_for(spec: Any, n_factors: int) -> tuple[str, ...]:
    """Per-axis structure names for a tensor with ``n_factors`` factors (unlisted counts: dense)."""
    if isinstance(spec, dict):
        spec = spec.get(n_factors, Dense.name)
    elif isinstance(spec, tuple) and len(spec) != n_factors:
        spec = Dense.name
    if isinstance(spec, str):
        return (spec,) * n_factors
    return tuple(spec)


def preconditioned_shape(
    shape: Iterable[int], merge_dims: bool, max_dense_dim: int | None
) -> tuple[int, ...]:
    """The shape a gradient is preconditioned in.

    Size-1 axes are dropped (a 0-d or all-ones tensor becomes a vector of length 1). With
    ``merge_dims`` a tensor of more than two axes keeps its first axis and merges the following
    ones from left to right while the product stays ≤ ``max_dense_dim`` (all of them when it is
    None): a conv kernel (out, in, kh, kw) becomes (out, in·kh·kw).
    """
    dims = [int(d) for d in shape if d != 1] or [1]
    if merge_dims and len(dims) > 2:
        limit = math.inf if max_dense_dim is None else max_dense_dim
        merged, current = [dims[0]], dims[1]
        for d in dims[2:]:
            if current * d <= limit:
                current *= d
            else:
                merged.append(current)
                current = d
        merged.append(current)
        dims = merged
    return tuple(dims)


@dataclass
class _Block:
    """Parameters that share one preconditioner: one tensor, or a layer's weight and bias."""

    params: list[Tensor]
    groups: list[dict[str, Any]]  # each parameter's group (they agree on _PRECOND_KEYS)
    dims: tuple[int, ...]
    structures: tuple[Structure, ...]
    dtype: torch.dtype
    hyper: tuple[Any, ...]  # the group's _PRECOND_KEYS values
    name: str | None
    transposed: bool = False  # a weight stored (in, out), as transformers' Conv1D keeps it

    @property
    def owner(self) -> Tensor:
        return self.params[0]

    @property
    def group(self) -> dict[str, Any]:
        """The owner's group: it holds the preconditioner options of the block."""
        return self.groups[0]

    @property
    def empty(self) -> bool:
        return any(d == 0 for d in self.dims)

    def __post_init__(self) -> None:
        # a plain attribute, not a functools.cached_property: torch.compile cannot trace the
        # lock that cached_property takes, and would skip the whole step
        self._batch_key = (self.dims, tuple(repr(s) for s in self.structures), self.dtype, self.hyper)

    def batch_key(self) -> tuple[Any, ...]:
        return (self._batch_key, self.owner.device)

    def gradient(self, whole: Callable[[Tensor], Tensor]) -> Tensor:
        """G: the preconditioned view of the gradient (zeros for a member without one). ``whole``
        makes a DTensor gradient (FSDP2) whole: the preconditioner sees the whole tensor."""
        grads = [
            whole(p.grad) if p.grad is not None else torch.zeros(p.shape, dtype=p.dtype, device=p.device)
            for p in self.params
        ]
        if len(grads) == 1:
            return grads[0].reshape(self.dims)
        weight, bias = grads
        if self.transposed:
            weight = weight.mT
        return torch.cat([weight.reshape(weight.shape[0], -1), bias.reshape(-1, 1)], dim=1)

    def caches_kkt(self, axis: int, update_freq: int) -> bool:
        """Whether axis ``axis`` keeps K Kᵀ between factor updates (its structure decides)."""
        return self.structures[axis].caches_kkt(math.prod(self.dims) // self.dims[axis], update_freq)

    def factor_update_cost(self) -> float:
        """Rough flops of one factor update: each axis's own (d³ dense) plus the products with
        the gradient, which cost what preconditioning it does."""
        cubic = 0.0
        for struct in self.structures:
            cubic += struct.factor_update_cost()
        return cubic + self.precondition_cost()

    def precondition_cost(self) -> float:
        """Rough flops of preconditioning the gradient: numel·d per dense axis."""
        numel = math.prod(self.dims)
        cost = 0.0
        for struct in self.structures:
            cost += struct.apply_cost(numel)
        return cost

    def split(self, update: Tensor) -> list[Tensor]:
        if len(self.params) == 1:
            return [update.reshape(self.params[0].shape)]
        weight, bias = self.params
        w, b = update.split([update.shape[1] - 1, 1], dim=1)
        return [w.mT if self.transposed else w.reshape(weight.shape), b.reshape(bias.shape)]


class SIRFShampoo(CheckedStateDict, Optimizer):
    r"""Structured inverse- and root-free Shampoo (SIRFShampoo; Lin et al., ICML 2024).

    For a gradient G with axes d_1 … d_N (size-1 axes dropped; see ``merge_dims``), one factor K_n
    (d_n × d_n, initialised to I) per axis and a Riemannian momentum m_n (initialised to 0). At
    steps 0, T, 2T, … (T = ``update_freq``), with every right-hand side using the old factors::

        H_n    = B · K_nᵀ G_(n) (⊗_{j≠n} K_j K_jᵀ / d_j) G_(n)ᵀ K_n        (G_(n): mode-n unfolding)
        step_n = ½·[H_n + λ·(Π_{j≠n} tr(K_jᵀK_j)/d_j)·K_nᵀK_n − I]        (projected onto the structure)
        m_n   ← α2·m_n + (1 − α2)·step_n
        K_n   ← K_n − (β2 / max(1, ‖m_n‖_F))·K_n·m_n

    and at every step, with no root, inverse or decomposition anywhere::

        P = G ×_1 (K_1K_1ᵀ) ×_2 … ×_N (K_NK_Nᵀ)

    then, by default (``lr_units="adamw"``: β1 is an AdamW learning rate and κ AdamW's weight
    decay), with n the number of elements of the parameter::

        P ← (1 − α1)·P / RMS(P),   RMS(P) = ‖P‖_F / sqrt(n)
        b ← α1·b + P;   µ ← µ·(1 − β1·κ) − β1·b

    so the step of a steady direction has RMS β1 (≈ 0.23·β1 for pure noise), as AdamW's. The
    rescaling is one scalar per parameter; the direction stays the root-free Kronecker one. The
    paper's update (``lr_units="paper"``) is::

        b ← α1·b + (P + κ·µ);   µ ← µ − β1·b

    ===============  ==============================  ============================================
    symbol           argument                        meaning
    ===============  ==============================  ============================================
    β1               ``lr``                          learning rate
    α1               ``momentum``                    heavy-ball momentum on the preconditioned step
    κ                ``weight_decay``                added to the preconditioned step (not
                                                     preconditioned), as in the reference
    β2               ``precond_lr``                  learning rate of the factors
    α2               ``precond_momentum``            Riemannian momentum of the factors (0: none,
                                                     and no momentum state is kept)
    λ                ``damping``                     damping of the Kronecker fit
    B                ``batch_size``                  examples the loss averages over per step
    T                ``update_freq``                 factor update every T steps
    ===============  ==============================  ============================================

    With ``structures="dense"``, ``merge_dims=False``, ``max_dense_dim=None`` and
    ``lr_units="paper"`` this is the
    algorithm of the reference package ``sirfshampoo==0.0.1`` (``SIRFShampoo(model, lr,
    beta2=precond_lr, alpha1=momentum, alpha2=precond_momentum, lam=damping, kappa=weight_decay,
    batch_size=B, T=update_freq)``), including its rescaling of the factors inside the products.

    Args:
        params: parameters or parameter groups; every argument below except ``model`` and
            ``trainer_model`` may be set per group.
        lr, momentum, weight_decay, precond_lr, precond_momentum, damping: see the table.
        batch_size: B, required. {batch_help}
        update_freq: T, a positive integer.
        structures: structure of the factors: a name (all factors), a tuple of names (per axis,
            for tensors with that many factors), or a dict ``{number of factors: name or tuple}``,
            e.g. ``{2: ("dense", "diagonal")}``; tensors not covered get ``"dense"``. Names:
            {structure_names} (see :mod:`hf_rootfree.optim.structures`).
        precond_dtype: dtype of the factors, momenta and cached K Kᵀ (e.g. ``torch.bfloat16``).
            ``None``: float32 for float32/bfloat16/float16 parameters, float64 for float64 ones.
        max_dense_dim: an axis longer than this (a shared bias's column included) gets a
            ``large_dim_structure`` factor instead of a non-diagonal one, so vocabulary-sized
            axes cost O(d). ``None``: no limit. The default, 256, is set by cost: a dense axis
            of length d costs d multiply-adds per gradient element at every step (applying its
            K Kᵀ) and ~d³/T per factor update, against ~10 flops per element for AdamW; at 1024
            SIRFShampoo's ``optimizer.step()`` was 6–35× AdamW's on our small models (one CPU
            thread, T = 10) and under 0.8× AdamW's training throughput. It was chosen on CPU
            measurements; a GPU runs the d³ products far faster (not measured here), where a
            larger value (1024 keeps BERT-base/GPT-2 hidden axes dense) may be affordable.
        merge_dims: precondition tensors of more than two axes as (first axis, the rest merged
            while ≤ ``max_dense_dim``); conv kernels become (out, in·kh·kw).
        block_size: block size of ``block_diagonal`` factors.
        hierarchical_sizes: (k1, k2) of ``hierarchical`` factors.
        large_dim_structure: {large_dim_names}, for axes over
            ``max_dense_dim``.
        model: optional ``nn.Module`` the parameters belong to. It names layers in
            :meth:`diagnostics` and, with ``share_bias``, lets a layer's weight and bias share one
            preconditioner (the bias is appended as a last column, as in ``sirfshampoo``'s
            ``LinearWeightBias``): ``nn.Linear``, ``nn.Conv1d/2d/3d`` and transformers' ``Conv1D``
            (GPT-2), whose (in, out) weight is preconditioned as (out, in).
        share_bias: see ``model``; ignored without it. The weight's and the bias's groups must
            both allow it and agree on every preconditioner option (they may differ in ``lr``,
            ``momentum`` and ``weight_decay``, which act after preconditioning).
        distributed: with several processes (torch.distributed initialized, e.g. under DDP or
            FSDP2), split the factor updates and the preconditioning across ranks and exchange
            the results (each rank then does about 1/world_size of that work; every rank ends
            with the same full state). ``None`` (default): when torch.distributed is
            initialized; ``False``: every rank does all of it.
        trainer_model: the same as ``model``, under the name the Trainer integration passes it
            (the Trainer takes a ``model`` keyword argument for the parameters themselves).
        lr_units: ``"adamw"`` (default): each parameter's preconditioned step is rescaled to an
            RMS of (1 − α1) and weight decay is decoupled, so ``lr`` and ``weight_decay`` mean
            what they mean to AdamW; ``"paper"``: the paper's (and the reference's) update.

    State (all tensors, in ``self.state[p]`` of the block's first parameter): ``factor_n``,
    ``factor_momentum_n``, ``precond_n`` (the cached, rescaled K_nK_nᵀ, kept where that is
    cheaper than applying K twice), ``precond_scale``, ``skipped_factor_updates``, and for
    bfloat16/float16 factors ``factor_residual_n`` (the rounding error of K, carried into the next
    update: without it, late small updates round away and our bf16 runs ended 8–10% away from
    float32, with it within 0.6%); per parameter ``step`` (float64, CPU) and ``momentum_buffer``.
    A factor update whose gradient or result is not finite is skipped (old factors kept) and
    counted in ``skipped_factor_updates``; :meth:`diagnostics` warns once when a block skips
    repeatedly (e.g. ``precond_dtype=torch.float16`` with a large B·g²). The check is there, not in
    ``step()``, because reading the device counter synchronizes.

    ``torch.compile(opt.step)`` traces the whole step as one graph (no graph break): one graph
    for the first step (state creation), one for the next, then one per kind of step (factor
    update or not) once the step counter is a symbolic int, and no recompiles after that. Give
    ``lr`` as a CPU tensor when a schedule changes it (as ``torch.optim`` asks under compile): a
    float ``lr`` is a constant of the compiled graph, so each new value recompiles.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        precond_lr: float = 0.01,
        precond_momentum: float = 0.5,
        damping: float = 1e-3,
        *,
        batch_size: int | float | None = None,
        update_freq: int = 1,
        structures: tuple[str, ...] | str | dict[int, str | tuple[str, ...]] = "dense",
        precond_dtype: torch.dtype | str | None = None,
        max_dense_dim: int | None = 256,
        merge_dims: bool = True,
        block_size: int = 64,
        hierarchical_sizes: tuple[int, int] = (16, 16),
        large_dim_structure: str = "diagonal",
        model: nn.Module | None = None,
        share_bias: bool = True,
        distributed: bool | None = None,
        trainer_model: nn.Module | None = None,
        lr_units: str = "adamw",
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            precond_lr=precond_lr,
            precond_momentum=precond_momentum,
            damping=damping,
            batch_size=batch_size,
            update_freq=update_freq,
            structures=structures,
            precond_dtype=precond_dtype,
            max_dense_dim=max_dense_dim,
            merge_dims=merge_dims,
            block_size=block_size,
            hierarchical_sizes=hierarchical_sizes,
            large_dim_structure=large_dim_structure,
            share_bias=share_bias,
            distributed=distributed,
            lr_units=lr_units,
        )
        self._normalize_group(defaults)
        if model is None:
            model = trainer_model
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"{_OWNER}: model must be an nn.Module or None, got {type(model).__name__}")
        self._model = model
        self._blocks_cache: tuple[tuple[Any, ...], list[_Block]] | None = None
        self._host_steps: dict[Tensor, int] = {}
        self._whole_grads = _distributed.WholeGradients()
        super().__init__(params, defaults)
        self._blocks()  # validates shapes and structures now rather than at the first step

    # -- validation ---------------------------------------------------------------------------------
    @staticmethod
    def _normalize_group(group: dict[str, Any]) -> None:
        check_lr(group["lr"], _OWNER)
        check_range("momentum", group["momentum"], _OWNER, 0.0, 1.0)
        check_nonnegative("weight_decay", group["weight_decay"], _OWNER)
        check_range("precond_lr", group["precond_lr"], _OWNER, 0.0, math.inf, low_open=True)
        check_range("precond_momentum", group["precond_momentum"], _OWNER, 0.0, 1.0)
        check_nonnegative("damping", group["damping"], _OWNER)
        check_batch_size(group["batch_size"], _OWNER)
        check_positive_int("update_freq", group["update_freq"], _OWNER)
        check_positive_int("max_dense_dim", group["max_dense_dim"], _OWNER, allow_none=True)
        check_positive_int("block_size", group["block_size"], _OWNER)
        sizes = group["hierarchical_sizes"]
        if not (
            isinstance(sizes, (tuple, list))
            and len(sizes) == 2
            and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in sizes)
        ):
            raise ValueError(
                f"{_OWNER}: hierarchical_sizes must be a pair of positive integers, got {sizes!r}"
            )
        group["hierarchical_sizes"] = tuple(sizes)
        if group["large_dim_structure"] not in LARGE_DIM_STRUCTURES:
            raise ValueError(
                f"{_OWNER}: large_dim_structure must be {' or '.join(map(repr, LARGE_DIM_STRUCTURES))}, "
                f"got {group['large_dim_structure']!r}"
            )
        check_lr_units(group.get("lr_units", "paper"), _OWNER)
        for flag in ("merge_dims", "share_bias"):
            if not isinstance(group[flag], bool):
                raise TypeError(f"{_OWNER}: {flag} must be True or False, got {group[flag]!r}")
        if group.get("distributed") not in (None, True, False):
            raise TypeError(
                f"{_OWNER}: distributed must be None, True or False, got {group['distributed']!r}"
            )
        group["structures"] = _normalize_structures(group["structures"])
        group["precond_dtype"] = _precond_dtype(group["precond_dtype"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            for p in group["params"]:
                check_param(p, _OWNER)
            self._normalize_group(group)
            if self._blocks_cache is not None:
                self._blocks_cache = None
                self._blocks()
        except Exception:
            self.param_groups.pop()  # a rejected group is not kept
            self._blocks_cache = None
            raise

    # -- blocks ---------------------------------------------------------------------------------------
    def _group_key(self) -> tuple[Any, ...]:
        return tuple(
            (tuple(id(p) for p in g["params"]), tuple(repr(g[k]) for k in _PRECOND_KEYS))
            for g in self.param_groups
        )

    def _blocks(self) -> list[_Block]:
        """The blocks of the current groups (cached while the groups' parameters and
        preconditioner options stay the same)."""
        key = self._group_key()
        if self._blocks_cache is not None and self._blocks_cache[0] == key:
            return self._blocks_cache[1]
        blocks = self._layout(self.param_groups)
        self._blocks_cache = (key, blocks)
        return blocks

    def _layout(self, param_groups: list[dict[str, Any]]) -> list[_Block]:
        """The blocks of these (normalized) groups."""
        group_of = {p: g for g in param_groups for p in g["params"]}
        names = {}
        pairs: dict[Tensor, tuple[Tensor, bool]] = {}  # weight -> (bias, weight stored (in, out))
        if self._model is not None:
            names = {p: n for n, p in self._model.named_parameters()}
            pairs = self._weight_bias_pairs(group_of)
        paired_biases = {bias for bias, _ in pairs.values()}
        blocks = []
        for group in param_groups:
            for p in group["params"]:
                if p in paired_biases:
                    continue
                bias, transposed = pairs.get(p, (None, False))
                members = [p] if bias is None else [p, bias]
                groups = [group_of[m] for m in members]
                blocks.append(self._make_block(members, groups, names.get(p), transposed))
        return blocks

    def _weight_bias_pairs(self, group_of: dict[Tensor, dict[str, Any]]) -> dict[Tensor, tuple[Tensor, bool]]:
        """Layers whose weight and bias share a block: Linear, Conv1d/2d/3d, and transformers'
        ``Conv1D`` (GPT-2 and relatives), whose weight is stored transposed as (in, out)."""
        pairs = {}
        conv = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
        for module in self._model.modules():
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            if not isinstance(weight, nn.Parameter) or not isinstance(bias, nn.Parameter):
                continue
            transposed = type(module).__name__ == "Conv1D" and weight.dim() == 2
            if not (isinstance(module, conv) or transposed) or weight not in group_of or bias not in group_of:
                continue
            out = weight.shape[1] if transposed else weight.shape[0]
            if weight.dim() < 2 or out != bias.numel() or out == 1:
                continue
            gw, gb = group_of[weight], group_of[bias]
            if not (gw["share_bias"] and gb["share_bias"]):
                continue
            if any(gw[k] != gb[k] for k in _PRECOND_KEYS) or weight.dtype != bias.dtype:
                continue
            pairs[weight] = (bias, transposed)
        return pairs

    def _make_block(
        self, members: list[Tensor], groups: list[dict[str, Any]], name: str | None, transposed: bool = False
    ) -> _Block:
        owner, group = members[0], groups[0]
        if len(members) == 2 and transposed:  # weight (in, out), bias as a last column: (out, in + 1)
            dims = (owner.shape[1], owner.shape[0] + 1)
        elif len(members) == 2:  # weight (out, …), bias as a last column
            dims = (owner.shape[0], owner[0].numel() + 1)
        else:
            dims = preconditioned_shape(owner.shape, group["merge_dims"], group["max_dense_dim"])
        structures = [
            make_structure(
                kind,
                d,
                block_size=group["block_size"],
                hierarchical_sizes=group["hierarchical_sizes"],
                max_dense_dim=group["max_dense_dim"],
                large_dim_structure=group["large_dim_structure"],
            )
            for d, kind in zip(dims, _structures_for(group["structures"], len(dims)))
        ]
        if group["precond_dtype"] is not None:
            dtype = group["precond_dtype"]
        else:
            dtype = torch.float64 if owner.dtype == torch.float64 else torch.float32
        hyper = tuple(repr(group[k]) for k in _PRECOND_KEYS)
        return _Block(members, groups, dims, tuple(structures), dtype, hyper, name, transposed)

    # -- state ------------------------------------------------------------------------------------------
    def _init_block_state(self, block: _Block) -> None:
        state = self.state[block.owner]
        if "factor_0" in state or block.empty:
            return
        device = block.owner.device
        group = block.group
        for n, struct in enumerate(block.structures):
            state[f"factor_{n}"] = struct.eye(1, block.dtype, device)[0]
            if group["precond_momentum"] != 0:
                state[f"factor_momentum_{n}"] = struct.zeros(1, block.dtype, device)[0]
            if block.dtype in (torch.bfloat16, torch.float16):
                # what rounding K to 8 (or 11) bits dropped: small late updates would be lost
                state[f"factor_residual_{n}"] = struct.zeros(1, block.dtype, device)[0]
            if block.caches_kkt(n, group["update_freq"]):
                state[f"precond_{n}"] = struct.kkt(state[f"factor_{n}"].unsqueeze(0))[0].contiguous()
        state["precond_scale"] = torch.ones((), dtype=_scalar_dtype(block.dtype), device=device)
        state["skipped_factor_updates"] = torch.zeros((), dtype=torch.int64, device=device)

    @staticmethod
    def _buffer_dtype(param: Tensor) -> torch.dtype:
        return torch.float64 if param.dtype == torch.float64 else torch.float32

    # -- loading a checkpoint (checked first: see _checkpoint.py) ---------------------------------
    _optional_group_keys = frozenset({"distributed"})
    #: checkpoints from before lr_units resume with the paper's update
    _legacy_group_defaults = {"lr_units": "paper"}  # noqa: RUF012  (read only)

    def _check_loaded_groups(self, groups: list[dict[str, Any]]) -> None:
        for group in groups:
            self._normalize_group(group)

    def _expected_block_state(self, block: _Block, group: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        """The keys and shapes :meth:`_init_block_state` creates for ``block``."""
        meta = torch.device("meta")
        expected: dict[str, tuple[int, ...]] = {}
        for n, struct in enumerate(block.structures):
            shape = tuple(struct.storage_shape())
            expected[f"factor_{n}"] = shape
            if group["precond_momentum"] != 0:
                expected[f"factor_momentum_{n}"] = shape
            if block.dtype in (torch.bfloat16, torch.float16):
                expected[f"factor_residual_{n}"] = shape
            if block.caches_kkt(n, group["update_freq"]):
                expected[f"precond_{n}"] = tuple(struct.kkt(struct.zeros(1, torch.float32, meta))[0].shape)
        expected["precond_scale"] = ()
        expected["skipped_factor_updates"] = ()
        return expected

    def _check_loaded_state(self, groups: list[dict[str, Any]], states: list[dict[str, Any]]) -> None:
        """Per parameter ``step`` and ``momentum_buffer``; per block (on its first parameter) the
        factor state of the block layout the loaded groups give, complete and of its shapes."""
        params = [p for group in groups for p in group["params"]]
        owners = {b.owner: b for b in self._layout(groups) if not b.empty}
        for index, (param, state) in enumerate(zip(params, states)):
            block = owners.get(param)
            expected = self._expected_block_state(block, block.group) if block is not None else {}
            self._check_known_keys(index, param, state, ("step", "momentum_buffer", *expected))
            if "step" in state:
                self._check_step(index, param, state["step"])
            if "momentum_buffer" in state:
                self._check_tensor(index, param, "momentum_buffer", state["momentum_buffer"], param.shape)
            if block is None or not any(key in state for key in expected):
                continue  # no factor state yet: it is created at the next factor update
            for key, shape in expected.items():
                if key not in state:
                    problem = f"is missing (the block of this parameter has {len(block.dims)} factors)"
                    raise self._load_error(index, param, key, problem)
                floating = key != "skipped_factor_updates"
                self._check_tensor(index, param, key, state[key], shape, floating=floating)

    def _store_loaded_value(self, param: Tensor, group: dict[str, Any], key: str, value: Any) -> Any:
        """Every tensor keeps the dtype it was saved in (torch would cast float32 factors of
        bfloat16 parameters to bfloat16) and moves to the parameter's device (``step``: see the
        base class)."""
        if torch.is_tensor(value) and key != "step":
            return value.to(device=param.device, copy=True)
        return super()._store_loaded_value(param, group, key, value)

    def _after_load(self) -> None:
        self._host_steps = {}
        for group in self.param_groups:
            for p in group["params"]:
                step = self.state.get(p, {}).get("step")
                if step is not None:
                    self._host_steps[p] = int(step)
        self._blocks_cache = None

    def __getstate__(self) -> dict[str, Any]:
        # the model decides which weight and bias share a block: a copy must keep it
        return {**super().__getstate__(), "_model": self._model}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_model", None)
        self.__dict__.setdefault("_blocks_cache", None)
        self.__dict__.setdefault("_host_steps", {})
        self.__dict__.setdefault("_whole_grads", _distributed.WholeGradients())
        for group in self.param_groups:  # pickles from before lr_units: the paper's update
            group.setdefault("lr_units", "paper")

    # -- step: blocks → factor update → precondition → parameter update ---------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step, the update of the class docstring for every block:

        1. blocks (:meth:`_active_blocks`): the parameters that share one preconditioner, with a
           gradient G, and those whose factors are due (steps 0, T, 2T, …);
        2. factor update (:meth:`_update_factors`): m_n and K_n of the due blocks;
        3. precondition (:meth:`_precondition`): P = G ×_1 (K_1K_1ᵀ) … ×_N (K_NK_Nᵀ);
        4. parameter update (:meth:`_update_parameters`): b ← α1·b + P;  µ ← µ − β1·b.

        Steps 2 and 3 run in :meth:`_factor_and_precondition`, which may share them across ranks.

        Args:
            closure: an optional callable that re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        active, due = self._active_blocks()
        with self._whole_grads.gathered([p for b in active for p in b.params]):
            updates = self._factor_and_precondition(active, due)
        self._update_parameters(updates)
        return loss

    def _active_blocks(self) -> tuple[list[_Block], list[_Block]]:
        """The blocks with a gradient, and those of them whose factor update is due (their state
        is created here on their first step)."""
        # Check every gradient before touching any state: bad input must not leave a half step.
        active = []
        for block in self._blocks():
            present = [p for p in block.params if p.grad is not None]
            if not present:
                continue
            for p in present:
                check_grad(p, _OWNER)
            active.append(block)
        due: list[_Block] = []
        for block in active:
            if block.empty:
                continue
            self._init_block_state(block)
            group = block.group
            if self._host_step(block.owner) % group["update_freq"] == 0:
                due.append(block)
        return active, due

    def _factor_and_precondition(self, active: list[_Block], due: list[_Block]) -> dict[Tensor, Tensor]:
        """Update the due factors, then precondition every active gradient; returns each
        parameter's update (this rank's shard of it for a DTensor).

        Same-shape blocks are batched: factor updates always, preconditioning for small blocks.
        Under DDP every rank holds the same averaged gradient, so all of this is identical work:
        with ``distributed`` (the default when torch.distributed runs) each rank does it for its
        share of the blocks (largest first onto the least-loaded rank, on a cost estimate of
        the factor update and the products; the same assignment on every rank), then each owner
        broadcasts its blocks' new factor state and preconditioned gradients in one buffer.
        """
        work = [b for b in active if not b.empty]
        is_due = {id(b) for b in due}

        def cost(block: _Block) -> float:
            return block.precondition_cost() + (block.factor_update_cost() if id(block) in is_due else 0.0)

        share = _distributed.share(work, self.defaults["distributed"], cost)
        mine = work if share is None else [b for b, owner in zip(work, share) if owner == _distributed.rank()]
        # the factor update of the due blocks, batched by shape
        buckets: dict[tuple[Any, ...], list[_Block]] = {}
        for block in mine:
            if id(block) in is_due:
                buckets.setdefault(block.batch_key(), []).append(block)
        for bucket in buckets.values():
            self._update_factors(bucket)

        # preconditioning every block, small ones batched by shape
        full: dict[Tensor, Tensor] = {}
        batches: dict[tuple[Any, ...], list[_Block]] = {}
        for block in mine:
            if self._batchable(block):
                batches.setdefault(block.batch_key(), []).append(block)
            else:
                self._precondition([block], full)
        for bucket in batches.values():
            self._precondition(bucket, full)
        self._in_adamw_units(mine, full)

        if share is not None:  # each owner sends its results to the other ranks
            for rank in range(_distributed.world_size()):
                owned = [b for b, owner in zip(work, share) if owner == rank]
                if owned:
                    self._exchange(owned, [b for b in owned if id(b) in is_due], full, src=rank)
        updates = {p: _distributed.local_part(u, p) for p, u in full.items()}
        for block in active:
            if block.empty:
                for p in block.params:  # nothing to precondition: a zero step
                    if p.grad is not None:
                        updates[p] = torch.zeros_like(_distributed.local(p))
        return updates

    def _exchange(
        self, owned: list[_Block], updated: list[_Block], full: dict[Tensor, Tensor], src: int
    ) -> None:
        """Broadcast from ``src`` the new factor state of ``updated`` and the preconditioned
        gradients of ``owned``; the other ranks write the state in place and fill ``full``."""
        tensors = [
            state[key]
            for state in (self.state[b.owner] for b in updated)
            for key in sorted(state)
            if key.startswith(("factor_", "precond_")) or key == "skipped_factor_updates"
        ]
        params = [p for b in owned for p in b.params if p.grad is not None]
        if _distributed.rank() == src:
            for p in params:
                full[p] = full[p].contiguous()
        else:
            dtype = {p: torch.promote_types(b.dtype, _scalar_dtype(b.dtype)) for b in owned for p in b.params}
            full.update({p: torch.empty(p.shape, dtype=dtype[p], device=p.device) for p in params})
        _distributed.broadcast_in_place([*tensors, *(full[p] for p in params)], src)

    def _count_step(self, param: Tensor) -> Tensor:
        """Count a step on the host mirror; returns the ``step`` tensor (created at 0) to advance."""
        state = self.state[param]
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float64)
            host = 0
        else:
            host = self._host_step(param)
        self._host_steps[param] = host + 1
        return state["step"]

    def _host_step(self, param: Tensor) -> int:
        """The parameter's step count, mirrored on the host so that reading it never syncs."""
        if param not in self._host_steps:
            step = self.state[param].get("step")
            self._host_steps[param] = 0 if step is None else int(step)
        return self._host_steps[param]

    # -- factor update (batched over blocks of one shape) ---------------------------------------------
    def _update_factors(self, bucket: list[_Block]) -> None:
        r"""The factor update of the class docstring for same-shape blocks, batched::

            H_n    = B · K_nᵀ G_(n) (⊗_{j≠n} K_j K_jᵀ / d_j) G_(n)ᵀ K_n
            step_n = ½·[H_n + λ·(Π_{j≠n} tr(K_jᵀK_j)/d_j)·K_nᵀK_n − I]    (projected)
            m_n   ← α2·m_n + (1 − α2)·step_n
            K_n   ← K_n − (β2 / max(1, ‖m_n‖_F))·K_n·m_n

        Every tensor has a leading batch axis (one entry per block); axis ``a`` is the paper's n.
        As the reference package does, K_n enters the products rescaled to K_n/√d_n:

        ================  ===========================================================================
        name              symbol
        ================  ===========================================================================
        ``grad``          G (each block's, stacked)
        ``scaled[a]``     K_n/√d_n
        ``gk``            √B · G ×_1 (K_1/√d_1)ᵀ … ×_N (K_N/√d_N)ᵀ; its mode-n unfolding X_n has
                          X_n X_nᵀ = H_n/d_n, so ``gram_scale`` d_n/2 makes ½·H_n
        ``traces[a]``     tr(K_nᵀK_n)/d_n² (‖K‖²_F: every projection keeps the diagonal)
        ``others``        Π_{j≠n} tr(K_jᵀK_j)/d_j², so ``inner_scale`` (λ/2·Π_j d_j)·``others``
                          times K_nᵀK_n/d_n makes ½·λ·(Π_{j≠n} tr(K_jᵀK_j)/d_j)·K_nᵀK_n
        ``momentum``      the new m_n = α2·m_n + (1 − α2)·step_n
        ``norm``          max(1, ‖m_n‖_F)
        ``factor``        the new K_n = K_n − (β2/``norm``)·K_n·m_n
        ================  ===========================================================================

        A block whose gradient or new state is not finite keeps its old state (counted in
        ``skipped_factor_updates``). The cache K_nK_nᵀ (K_n rescaled by the root of its largest
        entry, the product of those scales squared kept in ``precond_scale``) is refreshed.
        """
        first = bucket[0]
        group = first.group
        dims, structures, dtype = first.dims, first.structures, first.dtype
        n_axes, size = len(dims), math.prod(dims)
        alpha2, beta2, lam = group["precond_momentum"], group["precond_lr"], group["damping"]
        states = [self.state[b.owner] for b in bucket]
        scalar = _scalar_dtype(dtype)  # scalars of bf16/fp16 factors are kept in float32

        # Stacked (a view for a single block): the state is only written at the end.
        grad = _stack([b.gradient(self._whole_grads) for b in bucket]).to(dtype)
        total = _entry_sum(grad, scalar)  # non-finite exactly where a value is (see _entry_sum)
        factors = [_stack([s[f"factor_{a}"] for s in states]) for a in range(n_axes)]
        momenta = [None] * n_axes
        if alpha2 != 0:
            momenta = [_stack([s[f"factor_momentum_{a}"] for s in states]) for a in range(n_axes)]

        # Shared terms, all from the old factors; K is rescaled by 1/sqrt(d) inside the products.
        gk = grad * math.sqrt(group["batch_size"])
        scaled, traces = [], []
        for a, struct in enumerate(structures):
            scaled.append(factors[a] * (1.0 / math.sqrt(dims[a])))
            gk = _mode(struct.apply, scaled[a], gk, a, transpose=True)
            # tr(project(KᵀK))/d² = ‖K‖²_F/d²: every projection keeps the diagonal
            traces.append(struct.frobenius_norm(scaled[a]).to(scalar).square() / dims[a])
        trace_stack = torch.stack(traces)  # (axes, n)

        new_factors, new_momenta, new_residuals = [], [], []
        residuals = []
        if "factor_residual_0" in states[0]:
            residuals = [_stack([s[f"factor_residual_{a}"] for s in states]) for a in range(n_axes)]
        for a, struct in enumerate(structures):
            others = torch.cat([trace_stack[:a], trace_stack[a + 1 :]]).prod(dim=0) if n_axes > 1 else 1.0
            unfolded = gk.movedim(a + 1, 1).reshape(len(bucket), dims[a], -1)
            momentum = struct.momentum_step(
                scaled[a], unfolded, (lam / 2 * size) * others, dims[a] / 2, momenta[a], alpha2
            ).to(dtype)
            norm = struct.frobenius_norm(momentum).to(scalar).clamp(min=1.0)
            if residuals:  # low-precision K: carry its rounding error to the next update
                increment = _times(struct.matmul(factors[a], momentum), beta2 / norm)
                exact = factors[a].to(scalar) + residuals[a].to(scalar) - increment
                factor = exact.to(dtype)
                new_residuals.append((exact - factor.to(scalar)).to(dtype))
            else:
                factor = struct.multiplicative_step(factors[a], momentum, beta2 / norm).to(dtype)
            total = total + _entry_sum(factor, scalar) + _entry_sum(momentum, scalar)
            new_factors.append(factor)
            new_momenta.append(momentum)

        # Keep a block's old state where its update is not finite (no host sync), then refresh the
        # K Kᵀ cache. A rejected block keeps its cache and scale too: they were made from its old K.
        ok = torch.isfinite(total)
        keep = ok.unbind(0)
        scales = [torch.ones(len(bucket), dtype=scalar, device=grad.device)]
        for a, struct in enumerate(structures):
            updated = [("factor", new_factors[a])]
            if alpha2 != 0:
                updated.append(("factor_momentum", new_momenta[a]))
            if residuals:
                updated.append(("factor_residual", new_residuals[a]))
            if f"precond_{a}" in states[0]:  # K Kᵀ, K rescaled by its largest entry as the reference does
                scale = struct.max_abs(new_factors[a]).to(scalar).sqrt().clamp(min=1.0)
                scales.append(scale)
                updated.append(("precond", struct.kkt(_times(new_factors[a], 1.0 / scale).to(dtype))))
            for prefix, new in updated:
                for i, state in enumerate(states):
                    _keep_where(keep[i], new[i], state[f"{prefix}_{a}"])
        total_scale = torch.stack(scales).square().prod(dim=0)
        skipped = (~ok).to(torch.int64)
        for i, state in enumerate(states):
            _keep_where(keep[i], total_scale[i], state["precond_scale"])
            state["skipped_factor_updates"].add_(skipped[i])

    # -- preconditioning and the parameter update ---------------------------------------------------------
    def _batchable(self, block: _Block) -> bool:
        """Small blocks are stacked with others of their shape at every step: stacking their
        cached K Kᵀ, or the factor of an axis without one (a vector's), must stay cheap."""
        state = self.state[block.owner]
        return math.prod(block.dims) <= _BATCH_NUMEL and all(
            f"precond_{a}" in state or state[f"factor_{a}"].numel() <= _BATCH_NUMEL
            for a in range(len(block.dims))
        )

    def _precondition(self, bucket: list[_Block], updates: dict[Tensor, Tensor]) -> None:
        """P = G ×_1 (K_1K_1ᵀ) … ×_N (K_NK_Nᵀ) for blocks of one shape; fills ``updates`` with
        whole-tensor updates (a DTensor parameter's shard is taken later).

        Each axis uses its cached K_nK_nᵀ (``precond_n``, made from K_n rescaled; the product of
        the scales, ``precond_scale``, is multiplied back at the end) or else K_n(K_nᵀ X). P is
        split back into the block's parameters (rescaled later: :meth:`_in_adamw_units`).
        """
        first = bucket[0]
        states = [self.state[b.owner] for b in bucket]
        grad = _stack([b.gradient(self._whole_grads) for b in bucket]).to(first.dtype)
        for a, struct in enumerate(first.structures):
            if f"precond_{a}" in states[0]:
                grad = _mode(struct.apply_kkt_batch, _stack([s[f"precond_{a}"] for s in states]), grad, a)
            else:  # K (Kᵀ X): cheaper than keeping K Kᵀ for a long axis of a small tensor
                factor = _stack([s[f"factor_{a}"] for s in states])
                grad = _mode(struct.apply, factor, _mode(struct.apply, factor, grad, a, transpose=True), a)
        scale = _stack([s["precond_scale"] for s in states])
        # NOTE: lr_units="adamw" divides P by its norm (_in_adamw_units), which undoes this
        # positive scale, so it is skipped there unless it also casts (bf16 factors: P float32)
        rescaled = all(g["lr_units"] == "adamw" for b in bucket for g in b.groups)
        if not rescaled or grad.dtype != scale.dtype:
            grad = grad * _bcast(scale, grad)
        for block, update in zip(bucket, grad.unbind(0)):
            for p, part in zip(block.params, block.split(update)):
                if p.grad is not None:  # the whole tensor's update, also for a DTensor parameter
                    updates[p] = part

    def _in_adamw_units(self, blocks: list[_Block], updates: dict[Tensor, Tensor]) -> None:
        """``lr_units="adamw"``: P ← (1 − α1)·P / RMS(P) for each parameter of ``blocks``, in
        place in ``updates`` (parameters of ``lr_units="paper"`` groups keep P as is).

        The heavy ball then sums to an RMS of 1 for a steady direction and ≈ 0.23 for pure
        noise (α1 = 0.9), as AdamW's m̂/sqrt(v̂) does, so AdamW's learning rate carries over. It
        runs where the preconditioned gradient is made (by its owner under ``distributed``), on
        the whole tensor, so every rank and one process get the same numbers. All parameters of
        one dtype are rescaled with a few ``_foreach`` calls (the updates are fresh tensors or
        views of one, so they may be scaled in place); the norms are float32 (float64 for
        float64 updates).
        """
        by_dtype: dict[torch.dtype, tuple[list[Tensor], list[float]]] = {}
        for block in blocks:
            for p, group in zip(block.params, block.groups):
                if p in updates and group["lr_units"] == "adamw":
                    update = updates[p]
                    tensors, gains = by_dtype.setdefault(update.dtype, ([], []))
                    tensors.append(update)
                    gains.append((1.0 - group["momentum"]) * math.sqrt(max(update.numel(), 1)))
        for dtype, (tensors, gains) in by_dtype.items():
            norms = torch._foreach_norm(tensors, 2, dtype=_scalar_dtype(dtype))
            torch._foreach_clamp_min_(norms, 1e-30)
            torch._foreach_reciprocal_(norms)
            torch._foreach_mul_(norms, gains)
            torch._foreach_mul_(tensors, norms)

    def _update_parameters(self, updates: dict[Tensor, Tensor]) -> None:
        """The parameter update from each parameter's preconditioned step P (``updates``):
        b ← α1·b + (P + κ·µ);  µ ← µ − β1·b (``lr_units="paper"``), or with decoupled decay
        µ ← µ·(1 − β1·κ), then b ← α1·b + P;  µ ← µ − β1·b (``"adamw"``, P already rescaled).

        b is ``momentum_buffer``, µ the parameter; foreach ops per group where dtypes allow.
        """
        for group in self.param_groups:
            params = [p for p in group["params"] if p in updates]
            if not params:
                continue
            steps = [self._count_step(p) for p in params]
            torch._foreach_add_(steps, 1.0)  # CPU tensors: no device sync
            lr, momentum, decay = _lr_operand(group["lr"]), group["momentum"], group["weight_decay"]
            if group["lr_units"] == "adamw" and decay != 0:  # decoupled, as AdamW: µ ← µ·(1 − η·κ)
                torch._foreach_mul_([_distributed.local(p) for p in params], 1.0 - lr * decay)
                decay = 0.0
            fast, slow = [], []
            for p in params:
                same = p.dtype == self._buffer_dtype(p) == updates[p].dtype
                (fast if same else slow).append(p)
            # FSDP2: parameters and momentum buffers are DTensors; update their local shards
            if fast:
                # the updates are fresh tensors (products above), so they may be overwritten
                grads = [updates[p] for p in fast]
                local = [_distributed.local(p) for p in fast]
                if decay != 0:
                    torch._foreach_add_(grads, local, alpha=decay)
                if momentum != 0:
                    buffers = [_distributed.local(self._momentum_buffer(p)) for p in fast]
                    torch._foreach_mul_(buffers, momentum)
                    torch._foreach_add_(buffers, grads)
                    grads = buffers
                if torch.is_tensor(lr):
                    torch._foreach_add_(local, torch._foreach_mul(grads, -lr))
                else:
                    torch._foreach_add_(local, grads, alpha=-lr)
            for p in slow:  # low-precision parameters or factors: compute in the buffer's dtype
                update = updates[p].to(self._buffer_dtype(p))
                local = _distributed.local(p)
                if decay != 0:
                    update.add_(local, alpha=decay)
                if momentum != 0:
                    update = _distributed.local(self._momentum_buffer(p)).mul_(momentum).add_(update)
                if torch.is_tensor(lr):
                    local.copy_(local.to(update.dtype).sub_(update * lr))
                else:
                    local.copy_(local.to(update.dtype).add_(update, alpha=-lr))

    def _momentum_buffer(self, p: Tensor) -> Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(
                p, dtype=self._buffer_dtype(p), memory_format=torch.contiguous_format
            )
        return state["momentum_buffer"]

    # -- inspection ---------------------------------------------------------------------------------------
    def blocks(self) -> list[dict[str, Any]]:
        """How each parameter is preconditioned: names, preconditioned shape and factor structures."""
        return [
            {
                "name": b.name,
                "shapes": [tuple(p.shape) for p in b.params],
                "dims": b.dims,
                "structures": [repr(s) for s in b.structures],
                "dtype": str(b.dtype).removeprefix("torch."),
            }
            for b in self._blocks()
        ]

    def dense_factors(self, param: Tensor) -> list[Tensor]:
        """The factors K_1 … K_N of the block ``param`` leads, as dense matrices (for tests, plots)."""
        return self._dense(param, "factor")

    def dense_factor_momenta(self, param: Tensor) -> list[Tensor]:
        """The Riemannian momenta m_1 … m_N of the block ``param`` leads, as dense matrices."""
        return self._dense(param, "factor_momentum")

    def _dense(self, param: Tensor, prefix: str) -> list[Tensor]:
        block = next(b for b in self._blocks() if b.owner is param)
        state = self.state.get(param, {})
        out = []
        for a, struct in enumerate(block.structures):
            value = state.get(f"{prefix}_{a}")
            if value is None:
                init = struct.eye if prefix == "factor" else struct.zeros
                value = init(1, block.dtype, param.device)[0]
            out.append(struct.to_dense(value.unsqueeze(0))[0])
        return out

    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        """Statistics for logging (reads the state, so it syncs: call it at logging steps).

        ``skipped_factor_updates``: factor updates rejected as non-finite, summed over blocks (a
        ``RuntimeWarning``, once, when a block skipped at least 3 and at least half of its updates:
        its preconditioner no longer adapts);
        ``precond_trace_mean``: mean over blocks of Π_n tr(K_nK_nᵀ)/d_n, the average scale of the
        preconditioner (1 at the start).
        """
        skipped, traces, stuck = 0, [], []
        for block in self._blocks():
            state = self.state.get(block.owner, {})
            if "precond_scale" not in state:
                continue
            block_skipped = int(state["skipped_factor_updates"])
            skipped += block_skipped
            steps = self._host_step(block.owner)
            attempts = (steps - 1) // block.group["update_freq"] + 1 if steps else 0
            if block_skipped >= _SKIP_WARN_MIN and 2 * block_skipped >= attempts:
                stuck.append((block, block_skipped, attempts))
            value = float(state["precond_scale"])
            for a, struct in enumerate(block.structures):
                cached = state.get(f"precond_{a}")
                if cached is None:  # tr(K Kᵀ)/d = ‖K‖²_F/d
                    factor = state[f"factor_{a}"].double().unsqueeze(0)
                    value *= float(struct.frobenius_norm(factor)[0] ** 2 / struct.dim)
                else:
                    value *= float(struct.kkt_average_trace(cached.double().unsqueeze(0))[0])
            traces.append(value)
        if stuck and not self.__dict__.get("_warned_skips"):
            self._warned_skips = True
            self._warn_skips(stuck)
        if not traces:
            return {}
        return {"skipped_factor_updates": float(skipped), "precond_trace_mean": sum(traces) / len(traces)}

    def _warn_skips(self, stuck: list[tuple[_Block, int, int]]) -> None:
        """Warn (once) that factor updates keep being skipped: the step then drifts towards SGD."""
        block, count, attempts = stuck[0]
        name = block.name or f"parameter of shape {tuple(block.owner.shape)}"
        dtype = str(block.dtype).removeprefix("torch.")
        hint = (
            f"precond_dtype={dtype} overflows: use precond_dtype=torch.bfloat16 or torch.float32"
            if block.dtype == torch.float16
            else "use a wider precond_dtype (float32)"
            if block.dtype == torch.bfloat16
            else "check the gradients for inf/NaN (loss scaling?)"
        )
        warnings.warn(
            f"{_OWNER}: factor updates are being skipped as non-finite in {len(stuck)} block(s), e.g. "
            f"{name}: {count} of {attempts} updates. A skipped update keeps the old factors, so the "
            f"preconditioner stops adapting and the step degrades towards SGD. Likely cause: B·g² "
            f"is too large for the factors' {dtype}; {hint}, or raise damping / lower precond_lr. "
            "(Warned once; diagnostics()['skipped_factor_updates'] counts them.)",
            RuntimeWarning,
            stacklevel=3,
        )


def _lr_operand(lr: float | Tensor) -> float | Tensor:
    """The learning rate as the parameter update takes it: a float (a tensor lr is a CPU tensor,
    checked, so reading it does not sync a device), except under ``torch.compile``, where a
    tensor lr stays a tensor: a graph input whose value may change. (A float lr is a constant of
    the compiled graph there: a schedule that changes it recompiles, as for ``torch.optim``.)
    """
    return lr if torch.compiler.is_compiling() else float(lr)


def _scalar_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _entry_sum(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Per batch entry, the sum of all values in ``dtype`` (float32 or float64): NaN or ±inf
    when a value is (inf − inf is NaN). One reduction per tensor, where ``isfinite(t).all()``
    is three passes; a factor update checks the sum of its gradient's, factors' and momenta's.

    NOTE: the sum of finite values overflows only when they reach ~1e38/numel (float32); such
    an update is rejected as if non-finite, which is what it is about to become (K Kᵀ and the
    scale of the cached preconditioner square those values).
    """
    return t.flatten(1).sum(1, dtype=dtype)


def _keep_where(ok: Tensor, new: Tensor, state: Tensor) -> None:
    """``state ← new`` where the 0-d ``ok`` is true, in place and in one pass."""
    torch.where(ok, new, state, out=state)


def _stack(tensors: list[Tensor]) -> Tensor:
    """The tensors along a new first axis; a view of a single one."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _mode(
    apply: Callable[..., Tensor], factor: Tensor, x: Tensor, axis: int, transpose: bool = False
) -> Tensor:
    """``apply(factor, X, transpose)`` onto axis ``axis`` of a batch of tensors (n, d_1, …, d_N)."""
    if x.dim() == 3:  # matrices: no reshapes (a transpose is a view the product reads as it is)
        return apply(factor, x, transpose) if axis == 0 else apply(factor, x.mT, transpose).mT
    moved = x.movedim(axis + 1, 1)
    out = apply(factor, moved.reshape(x.shape[0], x.shape[axis + 1], -1), transpose)
    return out.reshape(moved.shape).movedim(1, axis + 1)


def _bcast(scale: Tensor, x: Tensor) -> Tensor:
    return scale.reshape(-1, *([1] * (x.dim() - 1)))


#: blocks up to this many elements are preconditioned together with others of their shape
_BATCH_NUMEL = 1 << 16


# one list of structure names: the registry's
SIRFShampoo.__doc__ = (
    SIRFShampoo.__doc__.replace("{batch_help}", BATCH_SIZE_HELP)
    .replace("{structure_names}", ", ".join(f"``{name}``" for name in STRUCTURES))
    .replace("{large_dim_names}", " or ".join(f'``"{name}"``' for name in LARGE_DIM_STRUCTURES))
)
