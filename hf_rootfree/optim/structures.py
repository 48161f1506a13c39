"""Structured Kronecker factors for :class:`~hf_rootfree.SIRFShampoo`.

A factor K (d × d) of SIRFShampoo is restricted to a *structure*: a set of matrices closed under
multiplication, so that the multiplicative update ``K ← K − c·K·m`` never leaves it. The update
needs only a few operations on a structured matrix, and each structure implements them on its own
compact storage:

=================  ==========================  ============================================
structure          storage (per factor)        what it keeps
=================  ==========================  ============================================
``dense``          (d, d)                      everything
``diagonal``       (d,)                        the diagonal; O(d), for vocab-sized axes
``block_diagonal`` (⌈d/b⌉, b, b)               b × b blocks on the diagonal (the last block
                                               is zero-padded; the padding stays zero)
``hierarchical``   (d, d), structural zeros    [[A, B], [0, C, 0], [0, D, E]]: dense k1 × k1
                                               top-left A and k2 × k2 bottom-right E, diagonal
                                               middle C, dense rows B and D (SINGD's layout)
``tril_toeplitz``  (d,)                        lower-triangular Toeplitz (its first column)
``triu_toeplitz``  (d,)                        upper-triangular Toeplitz (its first row)
=================  ==========================  ============================================

Every operation works on a batch: storage tensors carry a leading batch axis ``n`` so that factors
of the same shape are updated together as batched matrix products.

``project(S)`` maps a symmetric matrix S onto the structure the way SINGD (Lin et al., 2023) and
the reference ``sirfshampoo`` package do: entries outside the structure are dropped, except that an
off-diagonal block kept only on one side of the diagonal takes the contribution of both sides
(hierarchical B and D are ``2·S``; a triangular Toeplitz entry is the mean over both the lower and
the upper diagonal at that offset, summed). For ``dense`` it is the identity. The momentum m of a
structured factor lives in the same storage as the factor.

Each structure also owns what the optimizer needs to plan its work: the cost of a factor update
and of applying a factor (:meth:`Structure.factor_update_cost`, :meth:`Structure.apply_cost`),
whether to keep K Kᵀ between factor updates (:meth:`Structure.caches_kkt`) and the average trace
of that cache (:meth:`Structure.kkt_average_trace`). :data:`STRUCTURES` maps each name to its
class; :func:`make_structure` builds one from a name.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import torch
from torch import Tensor

__all__ = ["LARGE_DIM_STRUCTURES", "STRUCTURES", "Structure", "make_structure"]


class Structure:
    """Operations on a batch of structured d × d matrices (storage with a leading batch axis)."""

    #: the name accepted in ``structures=`` (the key of :data:`STRUCTURES`)
    name: ClassVar[str] = ""
    #: storage and products cost O(d) per row: allowed as ``large_dim_structure``
    for_large_dims: ClassVar[bool] = False

    def __init__(self, dim: int) -> None:
        self.dim = dim

    @classmethod
    def create(cls, dim: int, *, block_size: int, hierarchical_sizes: tuple[int, int]) -> Structure:
        """The structure for a d × d factor, taking the options it uses."""
        return cls(dim)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim})"

    # -- planning: costs and the K Kᵀ cache --------------------------------------------------------
    def factor_update_cost(self) -> float:
        """Rough flops of a factor update beyond the products with the gradient: d³."""
        return self.dim**3

    def apply_cost(self, numel: int) -> float:
        """Rough flops of applying K (or K Kᵀ) along this axis of a tensor of ``numel`` elements."""
        return numel * self.dim

    def caches_kkt(self, rest: int, update_freq: int) -> bool:
        """Keep K Kᵀ between factor updates when that is cheaper than applying K twice per step.

        ``rest``: the size of the tensor over d; ``update_freq``: T. A dense d × d cache costs one
        d³ product per factor update and saves d²·r per step, so it pays when d³/T < d²·r, i.e.
        d < T·r: not for the vocabulary axis of an embedding updated often.
        """
        return self.dim < update_freq * rest

    def kkt_average_trace(self, q: Tensor) -> Tensor:
        """tr(K Kᵀ)/d from a batch of :meth:`kkt` results, shape (n,)."""
        return q.diagonal(dim1=-2, dim2=-1).sum(-1) / self.dim

    # -- storage ----------------------------------------------------------------------------------
    def storage_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def zeros(self, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.zeros((n, *self.storage_shape()), dtype=dtype, device=device)

    def eye(self, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        return self.add_identity_(self.zeros(n, dtype, device), 1.0)

    def to_dense(self, t: Tensor) -> Tensor:
        """(n, d, d) dense matrices."""
        raise NotImplementedError

    # -- the operations of the update ------------------------------------------------------------
    def project(self, sym: Tensor) -> Tensor:
        """Storage of the projection of symmetric (n, d, d) matrices onto the structure."""
        raise NotImplementedError

    def gram(self, x: Tensor) -> Tensor:
        """``project(X Xᵀ)`` for X of shape (n, d, r), without forming d × d where avoidable."""
        return self.project(x @ x.mT)

    def inner(self, t: Tensor) -> Tensor:
        """``project(Kᵀ K)``."""
        dense = self.to_dense(t)
        return self.project(dense.mT @ dense)

    def matmul(self, a: Tensor, b: Tensor) -> Tensor:
        """Storage of the product a·b (exact: every structure is closed under products)."""
        raise NotImplementedError

    def apply(self, t: Tensor, x: Tensor, transpose: bool = False) -> Tensor:
        """K·X (or Kᵀ·X) for X of shape (n, d, r)."""
        dense = self.to_dense(t)
        return (dense.mT if transpose else dense) @ x

    def frobenius_norm(self, t: Tensor) -> Tensor:
        """‖K‖_F, shape (n,)."""
        return torch.linalg.vector_norm(t.flatten(1), dim=1)

    def max_abs(self, t: Tensor) -> Tensor:
        """max |K_ij|, shape (n,) (NaN when K holds one)."""
        flat = t.flatten(1)
        return torch.maximum(flat.amax(dim=1), flat.amin(dim=1).neg())  # no |K| temporary

    def add_identity_(self, t: Tensor, alpha: float) -> Tensor:
        """t ← t + alpha·I in place."""
        t.diagonal(dim1=-2, dim2=-1).add_(alpha)
        return t

    # -- the two steps of a factor update ---------------------------------------------------------
    def momentum_step(
        self,
        t: Tensor,
        x: Tensor,
        inner_scale: Tensor | float,
        gram_scale: float,
        m: Tensor | None,
        alpha2: float,
    ) -> Tensor:
        """α2·m + (1 − α2)·[inner_scale·project(KᵀK) + gram_scale·project(X Xᵀ) − ½·I].

        ``inner_scale`` is a float or one value per batch entry (n,); ``m`` None means α2 = 0.
        """
        step = _times(self.inner(t), inner_scale) + self.gram(x) * gram_scale
        self.add_identity_(step, -0.5)
        if m is None:
            return step
        return m * alpha2 + step * (1 - alpha2)

    def multiplicative_step(self, t: Tensor, m: Tensor, scale: Tensor) -> Tensor:
        """K − scale·K·m, ``scale`` one value per batch entry (n,)."""
        return t - _times(self.matmul(t, m), scale)

    # -- the cached preconditioner K Kᵀ ----------------------------------------------------------
    def kkt(self, t: Tensor) -> Tensor:
        """K Kᵀ in the form :meth:`apply_kkt_batch` uses (dense (n, d, d) unless said otherwise)."""
        dense = self.to_dense(t)
        return dense @ dense.mT

    def apply_kkt_batch(self, q: Tensor, x: Tensor, transpose: bool = False) -> Tensor:
        """A batch of :meth:`kkt` results (n, …) times X (n, d, r); K Kᵀ is symmetric."""
        return q @ x


class Dense(Structure):
    name = "dense"

    def storage_shape(self) -> tuple[int, ...]:
        return (self.dim, self.dim)

    def to_dense(self, t: Tensor) -> Tensor:
        return t

    def project(self, sym: Tensor) -> Tensor:
        return sym

    def inner(self, t: Tensor) -> Tensor:
        return t.mT @ t

    def matmul(self, a: Tensor, b: Tensor) -> Tensor:
        return a @ b

    def apply(self, t: Tensor, x: Tensor, transpose: bool = False) -> Tensor:
        return (t.mT if transpose else t) @ x

    # NOTE: the two steps and K Kᵀ below fold the scalings and sums of the update into the
    # products (``baddbmm``) and compute symmetric results as one block triangle: the same terms,
    # summed in another order, with far fewer d × d temporaries. Low-precision factors take the
    # generic steps, whose combination runs in float32.
    def momentum_step(
        self,
        t: Tensor,
        x: Tensor,
        inner_scale: Tensor | float,
        gram_scale: float,
        m: Tensor | None,
        alpha2: float,
    ) -> Tensor:
        if t.dtype in _LOW_PRECISION:
            return super().momentum_step(t, x, inner_scale, gram_scale, m, alpha2)
        weighted = _times(t, inner_scale * (1 - alpha2))
        out = _symmetric_sum(m, alpha2, [(weighted.mT, t, 1.0), (x, x.mT, gram_scale * (1 - alpha2))])
        return self.add_identity_(out, -(1 - alpha2) / 2)

    def multiplicative_step(self, t: Tensor, m: Tensor, scale: Tensor) -> Tensor:
        if t.dtype in _LOW_PRECISION:
            return super().multiplicative_step(t, m, scale)
        return torch.baddbmm(t, t, _times(m, -scale))

    def kkt(self, t: Tensor) -> Tensor:
        return _symmetric_sum(None, 0.0, [(t, t.mT, 1.0)])


class Diagonal(Structure):
    name = "diagonal"
    for_large_dims = True

    def storage_shape(self) -> tuple[int, ...]:
        return (self.dim,)

    def to_dense(self, t: Tensor) -> Tensor:
        return torch.diag_embed(t)

    def project(self, sym: Tensor) -> Tensor:
        return sym.diagonal(dim1=-2, dim2=-1).clone()

    def gram(self, x: Tensor) -> Tensor:
        return (x * x).sum(-1)

    def inner(self, t: Tensor) -> Tensor:
        return t * t

    def matmul(self, a: Tensor, b: Tensor) -> Tensor:
        return a * b

    def apply(self, t: Tensor, x: Tensor, transpose: bool = False) -> Tensor:
        return t.unsqueeze(-1) * x

    def add_identity_(self, t: Tensor, alpha: float) -> Tensor:
        return t.add_(alpha)

    def kkt(self, t: Tensor) -> Tensor:
        return t * t

    def apply_kkt_batch(self, q: Tensor, x: Tensor, transpose: bool = False) -> Tensor:
        return q.unsqueeze(-1) * x

    def factor_update_cost(self) -> float:
        return 0

    def apply_cost(self, numel: int) -> float:
        return numel

    def caches_kkt(self, rest: int, update_freq: int) -> bool:
        return True  # K Kᵀ costs as much as K

    def kkt_average_trace(self, q: Tensor) -> Tensor:
        return q.mean(-1)


class BlockDiagonal(Structure):
    """b × b blocks on the diagonal; a last, partial block is zero-padded to b × b."""

    name = "block_diagonal"
    for_large_dims = True

    def __init__(self, dim: int, block_size: int) -> None:
        super().__init__(dim)
        self.block = min(block_size, dim)
        self.blocks = -(-dim // self.block)
        self.pad = self.blocks * self.block - dim

    @classmethod
    def create(cls, dim: int, *, block_size: int, hierarchical_sizes: tuple[int, int]) -> Structure:
        return cls(dim, block_size)

    def __repr__(self) -> str:
        return f"BlockDiagonal(dim={self.dim}, block_size={self.block})"

    def storage_shape(self) -> tuple[int, ...]:
        return (self.blocks, self.block, self.block)

    def _split_rows(self, x: Tensor) -> Tensor:
        """(n, d, r) → (n, blocks, b, r), zero-padding the rows."""
        if self.pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, self.pad))
        return x.reshape(x.shape[0], self.blocks, self.block, x.shape[-1])

    def _join_rows(self, x: Tensor) -> Tensor:
        out = x.reshape(x.shape[0], self.blocks * self.block, x.shape[-1])
        return out[:, : self.dim] if self.pad else out

    def to_dense(self, t: Tensor) -> Tensor:
        dense = torch.stack([torch.block_diag(*blocks) for blocks in t.unbind(0)])
        return dense[:, : self.dim, : self.dim]

    def project(self, sym: Tensor) -> Tensor:
        if self.pad:
            sym = torch.nn.functional.pad(sym, (0, self.pad, 0, self.pad))
        n = sym.shape[0]
        tiles = sym.reshape(n, self.blocks, self.block, self.blocks, self.block)
        return tiles.diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).contiguous()

    def gram(self, x: Tensor) -> Tensor:
        rows = self._split_rows(x)
        return rows @ rows.mT

    def inner(self, t: Tensor) -> Tensor:
        return t.mT @ t

    def matmul(self, a: Tensor, b: Tensor) -> Tensor:
        return a @ b

    def apply(self, t: Tensor, x: Tensor, transpose: bool = False) -> Tensor:
        return self._join_rows((t.mT if transpose else t) @ self._split_rows(x))

    def add_identity_(self, t: Tensor, alpha: float) -> Tensor:
        diagonal = t.diagonal(dim1=-2, dim2=-1)  # (n, blocks, b); the padding must stay zero
        if self.pad:
            diagonal[:, :-1].add_(alpha)
            diagonal[:, -1, : self.block - self.pad].add_(alpha)
        else:
            diagonal.add_(alpha)
        return t

    def kkt(self, t: Tensor) -> Tensor:
        return t @ t.mT

    def apply_kkt_batch(self, q: Tensor, x: Tensor, transpose: bool = False) -> Tensor:
        return self.apply(q, x)

    def factor_update_cost(self) -> float:
        return self.dim * self.block**2

    def apply_cost(self, numel: int) -> float:
        return numel * self.block

    def caches_kkt(self, rest: int, update_freq: int) -> bool:
        return True  # K Kᵀ costs as much as K

    def kkt_average_trace(self, q: Tensor) -> Tensor:
        return q.diagonal(dim1=-2, dim2=-1).sum((-2, -1)) / self.dim


@functools.lru_cache(maxsize=64)
def _toeplitz_index(dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Index of each (i, j) into [c_0 … c_{d−1}, 0] for a lower Toeplitz matrix, and |i − j|."""
    i = torch.arange(dim, device=device)
    offset = i[:, None] - i[None, :]
    lower = torch.where(offset >= 0, offset, torch.full_like(offset, dim))
    return lower, offset.abs()


class TrilToeplitz(Structure):
    """Lower-triangular Toeplitz: entry (i, j) = c_{i−j} for i ≥ j; storage c (its first column)."""

    name = "tril_toeplitz"

    def storage_shape(self) -> tuple[int, ...]:
        return (self.dim,)

    def _lower_dense(self, t: Tensor) -> Tensor:
        index, _ = _toeplitz_index(self.dim, t.device)
        padded = torch.nn.functional.pad(t, (0, 1))
        return padded[:, index]

    def to_dense(self, t: Tensor) -> Tensor:
        return self._lower_dense(t)

    def project(self, sym: Tensor) -> Tensor:
        # offset k: (sum of the k-th lower + k-th upper diagonal) / (d − k); k = 0: the mean diagonal
        _, distance = _toeplitz_index(self.dim, sym.device)
        n = sym.shape[0]
        sums = torch.zeros(n, self.dim, dtype=sym.dtype, device=sym.device)
        sums.scatter_add_(1, distance.reshape(1, -1).expand(n, -1), sym.reshape(n, -1))
        length = torch.arange(self.dim, 0, -1, dtype=sym.dtype, device=sym.device)
        return sums / length

    def matmul(self, a: Tensor, b: Tensor) -> Tensor:
        # triangular Toeplitz matrices commute and are closed under products: the first column
        # of a·b is a·(first column of b)
        return (self._lower_dense(a) @ b.unsqueeze(-1)).squeeze(-1)

    def frobenius_norm(self, t: Tensor) -> Tensor:
        length = torch.arange(self.dim, 0, -1, dtype=t.dtype, device=t.device)
        return (t * t * length).sum(-1).sqrt()

    def add_identity_(self, t: Tensor, alpha: float) -> Tensor:
        t[:, 0].add_(alpha)
        return t


class TriuToeplitz(TrilToeplitz):
    """Upper-triangular Toeplitz: entry (i, j) = r_{j−i} for j ≥ i; storage r (its first row)."""

    name = "triu_toeplitz"

    def to_dense(self, t: Tensor) -> Tensor:
        return self._lower_dense(t).mT

    # project, matmul (products of transposes commute) and norms are those of the transposed
    # lower-triangular matrix.


class Hierarchical(Structure):
    """SINGD's hierarchical structure, stored densely with structural zeros::

        [[A, B1, B2],      A: k1 × k1 dense, E: k2 × k2 dense, C: diagonal,
         [0, C,  0 ],      B = [B1 B2]: k1 rows, dense,
         [0, D,  E ]]      D: k2 × (d − k1 − k2), dense.

    k1 = min(sizes[0], d) and k2 = min(sizes[1], d − k1). The products of two such matrices keep
    the pattern, so the multiplicative factor update stays in it.
    """

    name = "hierarchical"

    def __init__(self, dim: int, sizes: tuple[int, int]) -> None:
        super().__init__(dim)
        self.k1 = min(sizes[0], dim)
        self.k2 = min(sizes[1], dim - self.k1)
        self.middle = dim - self.k1 - self.k2

    @classmethod
    def create(cls, dim: int, *, block_size: int, hierarchical_sizes: tuple[int, int]) -> Structure:
        return cls(dim, tuple(hierarchical_sizes))

    def __repr__(self) -> str:
        return f"Hierarchical(dim={self.dim}, k1={self.k1}, k2={self.k2})"

    def storage_shape(self) -> tuple[int, ...]:
        return (self.dim, self.dim)

    @functools.cached_property
    def _weights(self) -> Tensor:
        """Projection weights: 1 on A, diag(C), E; 2 on B and D (both sides of the diagonal)."""
        k1, mid = self.k1, slice(self.k1, self.k1 + self.middle)
        tail = slice(self.k1 + self.middle, self.dim)
        w = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        w[:k1, :k1] = 1.0
        w[:k1, k1:] = 2.0
        middle = torch.arange(self.k1, self.k1 + self.middle)
        w[middle, middle] = 1.0
        w[tail, mid] = 2.0
        w[tail, tail] = 1.0
        return w

    def _weights_like(self, t: Tensor) -> Tensor:
        return _cast_cached(self._weights, t.dtype, t.device)

    def to_dense(self, t: Tensor) -> Tensor:
        return t

    def project(self, sym: Tensor) -> Tensor:
        return sym * self._weights_like(sym)

    def matmul(self, a: Tensor, b: Tensor) -> Tensor:
        return a @ b  # closed under products: the structural zeros stay exactly zero

    def apply(self, t: Tensor, x: Tensor, transpose: bool = False) -> Tensor:
        return (t.mT if transpose else t) @ x


_LOW_PRECISION = (torch.bfloat16, torch.float16)

#: a symmetric product of matrices this wide or wider is computed as its upper block triangle
_SYMMETRIC_MIN_DIM = 256
_SYMMETRIC_STRIPS = 4


def _symmetric_sum(base: Tensor | None, beta: float, terms: list[tuple[Tensor, Tensor, float]]) -> Tensor:
    """beta·base + Σ alpha·(left @ right) over ``terms`` (no base: 0), for a sum known to be
    symmetric (n, d, d).

    For d ≥ 256 only the row strips right of the diagonal are multiplied out (4 strips: 5/8 of the
    work of the full products; each entry is the same dot product) and the rest is mirrored.
    """
    n, d = terms[0][0].shape[:2]
    out = torch.empty(n, d, d, dtype=terms[0][0].dtype, device=terms[0][0].device)
    width = d if d < _SYMMETRIC_MIN_DIM else -(-d // _SYMMETRIC_STRIPS)
    for i in range(0, d, width):
        rows, strip = slice(i, i + width), out[:, i : i + width, i:]
        for k, (left, right, alpha) in enumerate(terms):
            if k == 0:  # beta = 0 ignores the input (the uninitialized strip) entirely
                start = strip if base is None else base[:, rows, i:]
                torch.baddbmm(start, left[:, rows], right[:, :, i:], beta=beta, alpha=alpha, out=strip)
            else:
                strip.baddbmm_(left[:, rows], right[:, :, i:], alpha=alpha)
        if i + width < d:
            out[:, i + width :, rows] = strip[:, :, width:].mT
    return out


def _times(t: Tensor, per_batch: Tensor | float) -> Tensor:
    """Multiply each batch entry of ``t`` by its scalar (or all by one float)."""
    if not torch.is_tensor(per_batch):
        return t * per_batch
    return t * per_batch.reshape(-1, *([1] * (t.dim() - 1)))


@functools.lru_cache(maxsize=64)
def _cast_cached(t: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    return t.to(dtype=dtype, device=device)


#: the structures by name, in the order error messages list them
STRUCTURES: dict[str, type[Structure]] = {
    cls.name: cls for cls in (Dense, Diagonal, BlockDiagonal, Hierarchical, TrilToeplitz, TriuToeplitz)
}
#: names accepted in ``large_dim_structure=``
LARGE_DIM_STRUCTURES = tuple(name for name, cls in STRUCTURES.items() if cls.for_large_dims)


def make_structure(
    name: str,
    dim: int,
    *,
    block_size: int = 64,
    hierarchical_sizes: tuple[int, int] = (16, 16),
    max_dense_dim: int | None = None,
    large_dim_structure: str = Diagonal.name,
) -> Structure:
    """Build the structure ``name`` (a key of :data:`STRUCTURES`) for a d × d factor.

    An axis longer than ``max_dense_dim`` gets ``large_dim_structure`` instead, unless ``name`` is
    already that or diagonal (the cheapest).
    """
    if name not in STRUCTURES:
        raise ValueError(f"unknown factor structure {name!r}; choose from {', '.join(STRUCTURES)}")
    if max_dense_dim is not None and dim > max_dense_dim and name not in (Diagonal.name, large_dim_structure):
        name = large_dim_structure
    return STRUCTURES[name].create(dim, block_size=block_size, hierarchical_sizes=hierarchical_sizes)
