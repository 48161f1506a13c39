"""A naive float64 oracle for SIRFShampoo, written from the equations of its class docstring.

Everything is a plain dense float64 matrix: a structured factor is the dense matrix it stands for,
and "projected onto the structure" is an explicit dense projection (:func:`project`). The
Kronecker product ⊗_{j≠n} K_jK_jᵀ/d_j is formed with ``torch.kron``, the traces and the norm are
computed on dense matrices, and there is no rescaling of any kind. It deliberately does *not*
import ``hf_rootfree`` (nor ``sirfshampoo``): the shape rules are re-implemented here from the
docstrings of ``preconditioned_shape`` and ``SIRFShampoo``.

One :class:`SIRFShampooOracle` is one preconditioner: a single tensor, or a layer's weight and
bias (the bias appended as a last column of the weight reshaped to (out, −1)).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def preconditioned_shape(shape, merge_dims: bool, max_dense_dim: int | None) -> tuple[int, ...]:
    """The shape a gradient is preconditioned in (the rule of the ``preconditioned_shape`` docstring).

    Size-1 axes are dropped (a 0-d or all-ones tensor becomes a vector of length 1). With
    ``merge_dims`` a tensor of more than two axes keeps its first axis and merges the following
    ones from left to right while the product stays ≤ ``max_dense_dim`` (all of them when None).
    """
    dims = [d for d in shape if d != 1]
    if not dims:
        return (1,)
    if not merge_dims or len(dims) <= 2:
        return tuple(dims)
    out = [dims[0], dims[1]]
    for d in dims[2:]:
        if max_dense_dim is None or out[-1] * d <= max_dense_dim:
            out[-1] *= d
        else:
            out.append(d)
    return tuple(out)


def structure_names(spec, dims, max_dense_dim, large_dim_structure) -> tuple[str, ...]:
    """Per-axis structure names: a name, a tuple (for that many axes) or {number of axes: either};
    tensors not covered are dense. An axis longer than ``max_dense_dim`` gets ``large_dim_structure``
    unless it is already diagonal."""
    n = len(dims)
    if isinstance(spec, dict):
        spec = spec.get(n, "dense")
    if isinstance(spec, str):
        names = [spec] * n
    else:
        names = list(spec) if len(spec) == n else ["dense"] * n
    for a, d in enumerate(dims):
        if max_dense_dim is not None and d > max_dense_dim and names[a] != "diagonal":
            names[a] = large_dim_structure
    return tuple(names)


def project(name: str, S: Tensor, block_size: int, hierarchical_sizes) -> Tensor:
    """The dense matrix of the projection of a symmetric S onto the structure ``name``."""
    d = S.shape[0]
    out = torch.zeros_like(S)
    if name == "dense":
        out = S.clone()
    elif name == "diagonal":
        out = torch.diag(S.diagonal())
    elif name == "block_diagonal":  # b × b blocks; the last one may be smaller
        for start in range(0, d, block_size):
            block = slice(start, start + block_size)
            out[block, block] = S[block, block]
    elif name == "hierarchical":  # [[A, B], [0, C, 0], [0, D, E]], SINGD's convention
        k1 = min(hierarchical_sizes[0], d)
        k2 = min(hierarchical_sizes[1], d - k1)
        mid, tail = slice(k1, d - k2), slice(d - k2, d)
        out[:k1, :k1] = S[:k1, :k1]  # A
        out[:k1, k1:] = 2 * S[:k1, k1:]  # B takes both sides of the diagonal
        for i in range(k1, d - k2):
            out[i, i] = S[i, i]  # C
        out[tail, mid] = 2 * S[tail, mid]  # D, both sides
        out[tail, tail] = S[tail, tail]  # E
    elif name in ("tril_toeplitz", "triu_toeplitz"):
        for k in range(d):
            if k == 0:
                value = S.diagonal().mean()
            else:
                value = (S.diagonal(-k).sum() + S.diagonal(k).sum()) / (d - k)
            for i in range(k, d):
                out[i, i - k] = value  # lower triangle
        if name == "triu_toeplitz":
            out = out.T.clone()
    else:
        raise ValueError(name)
    return out


def unfold(G: Tensor, n: int) -> Tensor:
    """Mode-n unfolding G_(n): axis n as rows, the other axes (in order, last fastest) as columns."""
    return G.movedim(n, 0).reshape(G.shape[n], -1)


def mode_product(G: Tensor, M: Tensor, n: int) -> Tensor:
    """G ×_n M: multiply M onto axis n of G."""
    moved = G.movedim(n, 0)
    return (M @ moved.reshape(G.shape[n], -1)).reshape(moved.shape).movedim(0, n)


class SIRFShampooOracle:
    """One SIRFShampoo preconditioner and its parameters, in float64, straight from the equations."""

    def __init__(
        self,
        params,
        *,
        lr,
        momentum,
        weight_decay,
        precond_lr,
        precond_momentum,
        damping,
        batch_size,
        update_freq=1,
        structures="dense",
        max_dense_dim=256,
        merge_dims=True,
        block_size=64,
        hierarchical_sizes=(16, 16),
        large_dim_structure="diagonal",
    ):
        self.beta1, self.alpha1, self.kappa = lr, momentum, weight_decay
        self.beta2, self.alpha2, self.lam = precond_lr, precond_momentum, damping
        self.B, self.T = batch_size, update_freq
        self.block_size, self.hierarchical_sizes = block_size, hierarchical_sizes
        self.mu = [p.detach().to(torch.float64).clone() for p in params]
        if len(self.mu) == 2:  # weight and bias: (out, rest + 1)
            weight = self.mu[0]
            self.dims = (weight.shape[0], weight[0].numel() + 1)
        else:
            self.dims = preconditioned_shape(self.mu[0].shape, merge_dims, max_dense_dim)
        self.names = structure_names(structures, self.dims, max_dense_dim, large_dim_structure)
        self.K = [torch.eye(d, dtype=torch.float64) for d in self.dims]
        self.m = [torch.zeros(d, d, dtype=torch.float64) for d in self.dims]
        self.b = [torch.zeros_like(mu) for mu in self.mu]
        self.t = 0

    def _combine(self, grads) -> Tensor:
        grads = [g.detach().to(torch.float64) for g in grads]
        if len(grads) == 2:
            weight, bias = grads
            return torch.cat([weight.reshape(weight.shape[0], -1), bias.reshape(-1, 1)], dim=1)
        return grads[0].reshape(self.dims)

    def _split(self, P: Tensor) -> list[Tensor]:
        if len(self.mu) == 2:
            weight, bias = self.mu
            return [P[:, :-1].reshape(weight.shape), P[:, -1].reshape(bias.shape)]
        return [P.reshape(self.mu[0].shape)]

    def _update_factors(self, G: Tensor) -> None:
        N, K = len(self.dims), self.K  # every right-hand side below uses the old factors
        new_K, new_m = [], []
        for n in range(N):
            d = self.dims[n]
            others = [j for j in range(N) if j != n]
            kron = torch.ones(1, 1, dtype=torch.float64)
            for j in others:
                kron = torch.kron(kron, K[j] @ K[j].T / self.dims[j])
            Gn = unfold(G, n)
            H = self.B * K[n].T @ Gn @ kron @ Gn.T @ K[n]
            c = math.prod(float(torch.trace(K[j].T @ K[j])) / self.dims[j] for j in others)
            S = H + self.lam * c * K[n].T @ K[n]
            # ½·[project(S) − I]: I lies in every structure, so subtracting ½I before or after the
            # projection is the same; the implementation (``add_identity_`` on the projected step)
            # and the reference (``diag_add_`` after ``from_dense``) both do it after.
            step = 0.5 * (
                project(self.names[n], S, self.block_size, self.hierarchical_sizes)
                - torch.eye(d, dtype=torch.float64)
            )
            m = self.alpha2 * self.m[n] + (1 - self.alpha2) * step
            norm = float(torch.linalg.matrix_norm(m))  # Frobenius
            new_K.append(K[n] - self.beta2 / max(1.0, norm) * K[n] @ m)
            new_m.append(m)
        self.K, self.m = new_K, new_m

    def step(self, grads) -> list[Tensor]:
        """One step with the mean gradients ``grads`` (one per parameter); returns the new parameters."""
        G = self._combine(grads)
        if self.t % self.T == 0:
            self._update_factors(G)
        P = G
        for n, K in enumerate(self.K):
            P = mode_product(P, K @ K.T, n)
        for i, update in enumerate(self._split(P)):
            self.b[i] = self.alpha1 * self.b[i] + (update + self.kappa * self.mu[i])
            self.mu[i] = self.mu[i] - self.beta1 * self.b[i]
        self.t += 1
        return self.mu
