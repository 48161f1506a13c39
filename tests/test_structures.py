"""Tests of the structured Kronecker factors of SIRFShampoo (``hf_rootfree.optim.structures``).

Each operation of each structure is checked against its dense definition, in float64, on a batch
of n = 3 factors. The dense projection onto a structure (``dense_projection``) and the structure
membership test (``in_structure``) are written here from the SINGD convention quoted in
the paper's equations and the module docstring, not from the package's code.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from hf_rootfree.optim.structures import LARGE_DIM_STRUCTURES, STRUCTURES, BlockDiagonal, make_structure

N = 3  # batch of factors
DIMS = (1, 2, 5, 7, 16)
ATOL = 1e-12
DTYPE = torch.float64
CPU = torch.device("cpu")

#: (id, structure name, make_structure keyword arguments)
CASES = [
    ("dense", "dense", {}),
    ("diagonal", "diagonal", {}),
    ("block2", "block_diagonal", {"block_size": 2}),  # divides 2 and 16, not 5 and 7
    ("block3", "block_diagonal", {"block_size": 3}),  # divides none of DIMS; > 1 and 2
    ("block4", "block_diagonal", {"block_size": 4}),  # divides 16, a padded last block for 5, 7
    ("block32", "block_diagonal", {"block_size": 32}),  # larger than every d
    ("hier2-2", "hierarchical", {"hierarchical_sizes": (2, 2)}),  # A..E all present for d ≥ 5
    ("hier3-1", "hierarchical", {"hierarchical_sizes": (3, 1)}),
    ("hier4-8", "hierarchical", {"hierarchical_sizes": (4, 8)}),  # k1 < d ≤ k1 + k2 for d = 5, 7
    ("tril_toeplitz", "tril_toeplitz", {}),
    ("triu_toeplitz", "triu_toeplitz", {}),
]

all_cases = pytest.mark.parametrize(
    ("name", "kwargs"), [pytest.param(name, kw, id=case_id) for case_id, name, kw in CASES]
)
all_dims = pytest.mark.parametrize("d", DIMS)


# ---------------------------------------------------------------------------------------------
# the dense definitions
# ---------------------------------------------------------------------------------------------


def hierarchical_parts(d: int, sizes: tuple[int, int]) -> tuple[int, int, int]:
    """(k1, middle, k2) of the hierarchical layout [[A, B], [0, C, 0], [0, D, E]] for a d × d factor."""
    k1 = min(sizes[0], d)
    k2 = min(sizes[1], d - k1)
    return k1, d - k1 - k2, k2


def dense_projection(name: str, kwargs: dict, sym: torch.Tensor) -> torch.Tensor:
    """The SINGD projection of symmetric (n, d, d) matrices onto a structure, as dense matrices."""
    d = sym.shape[-1]
    out = torch.zeros_like(sym)
    if name == "dense":
        return sym.clone()
    if name == "diagonal":
        return torch.diag_embed(sym.diagonal(dim1=-2, dim2=-1))
    if name == "block_diagonal":
        b = kwargs["block_size"]
        for start in range(0, d, b):
            blk = slice(start, min(start + b, d))
            out[:, blk, blk] = sym[:, blk, blk]
        return out
    if name == "hierarchical":
        k1, m, _ = hierarchical_parts(d, kwargs["hierarchical_sizes"])
        mid, tail = slice(k1, k1 + m), slice(k1 + m, d)
        out[:, :k1, :k1] = sym[:, :k1, :k1]  # A
        out[:, :k1, k1:] = 2 * sym[:, :k1, k1:]  # B
        for i in range(k1, k1 + m):
            out[:, i, i] = sym[:, i, i]  # C
        out[:, tail, mid] = 2 * sym[:, tail, mid]  # D
        out[:, tail, tail] = sym[:, tail, tail]  # E
        return out
    if name in ("tril_toeplitz", "triu_toeplitz"):
        sign = -1 if name == "tril_toeplitz" else 1
        for k in range(d):
            if k == 0:
                c = sym.diagonal(dim1=-2, dim2=-1).mean(-1)
            else:
                lower = sym.diagonal(offset=-k, dim1=-2, dim2=-1).sum(-1)
                upper = sym.diagonal(offset=k, dim1=-2, dim2=-1).sum(-1)
                c = (lower + upper) / (d - k)
            out = out + torch.diag_embed(c[:, None].expand(-1, d - k), offset=sign * k)
        return out
    raise AssertionError(name)


def in_structure(name: str, kwargs: dict, dense: torch.Tensor) -> bool:
    """Does every matrix of the batch have the structure's pattern (and Toeplitz form)?"""
    d = dense.shape[-1]
    i = torch.arange(d)[:, None]
    j = torch.arange(d)[None, :]
    if name == "dense":
        allowed = torch.ones(d, d, dtype=torch.bool)
    elif name == "diagonal":
        allowed = i == j
    elif name == "block_diagonal":
        b = kwargs["block_size"]
        allowed = (i // b) == (j // b)
    elif name == "hierarchical":
        k1, m, _ = hierarchical_parts(d, kwargs["hierarchical_sizes"])
        top, middle, tail = i < k1, (i >= k1) & (i < k1 + m), i >= k1 + m
        allowed = top | (middle & (i == j)) | (tail & (j >= k1))
    elif name in ("tril_toeplitz", "triu_toeplitz"):
        allowed = i >= j if name == "tril_toeplitz" else i <= j
        for k in range(d):  # constant along every diagonal
            diag = dense.diagonal(offset=k, dim1=-2, dim2=-1)
            low = dense.diagonal(offset=-k, dim1=-2, dim2=-1)
            if not (
                torch.equal(diag, diag[:, :1].expand_as(diag)) and torch.equal(low, low[:, :1].expand_as(low))
            ):
                return False
    else:
        raise AssertionError(name)
    return bool((dense[:, ~allowed] == 0).all())


def random_symmetric(d: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(N, d, d, generator=gen, dtype=DTYPE)
    return a + a.mT


def random_element(struct, d: int, gen: torch.Generator) -> torch.Tensor:
    """Storage of a random, generally non-symmetric matrix of the structure (a projection)."""
    return struct.project(torch.randn(N, d, d, generator=gen, dtype=DTYPE))


def assert_valid_storage(struct, t: torch.Tensor) -> None:
    """The storage has the documented shape; a block-diagonal factor's padding is exactly zero."""
    assert t.shape == (N, *struct.storage_shape())
    if isinstance(struct, BlockDiagonal) and struct.pad:
        keep = struct.block - struct.pad
        assert (t[:, -1, keep:, :] == 0).all(), "padding rows of the last block are not zero"
        assert (t[:, -1, :, keep:] == 0).all(), "padding columns of the last block are not zero"


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test's name: reproducible, and different for every case."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.name.encode()))


def build(name: str, kwargs: dict, d: int):
    return make_structure(name, d, **kwargs)


def apply_kkt(struct, q: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """One ``q`` (an entry of ``struct.kkt``) onto axis ``axis`` of ``x``, through
    ``apply_kkt_batch`` on a batch of one, as the optimizer applies it to a mode-n unfolding."""
    moved = x.movedim(axis, 0)
    out = struct.apply_kkt_batch(q.unsqueeze(0), moved.reshape(1, struct.dim, -1))
    return out.reshape(moved.shape).movedim(0, axis)


# ---------------------------------------------------------------------------------------------
# the table covers the cases it claims to
# ---------------------------------------------------------------------------------------------


def test_the_case_table_covers_every_structure_and_every_hierarchical_layout():
    assert {name for _, name, _ in CASES} == set(STRUCTURES)
    layouts = set()
    for _, name, kwargs in CASES:
        if name != "hierarchical":
            continue
        for d in DIMS:
            k1, m, k2 = hierarchical_parts(d, kwargs["hierarchical_sizes"])
            if d <= k1:
                layouts.add("only A")
            elif m == 0:
                layouts.add("A, B, E")
            elif k2 > 0:
                layouts.add("A, B, C, D, E")
    assert layouts == {"only A", "A, B, E", "A, B, C, D, E"}
    block_cases = [kw["block_size"] for _, name, kw in CASES if name == "block_diagonal"]
    assert any(d % b == 0 and b < d for b in block_cases for d in DIMS)
    assert any(d % b != 0 and b < d for b in block_cases for d in DIMS)
    assert any(b > d for b in block_cases for d in DIMS)


# ---------------------------------------------------------------------------------------------
# storage: eye, zeros, add_identity_
# ---------------------------------------------------------------------------------------------


@all_cases
@all_dims
def test_eye_is_the_identity_and_zeros_is_zero(name, kwargs, d):
    struct = build(name, kwargs, d)
    eye = struct.eye(N, DTYPE, CPU)
    zeros = struct.zeros(N, DTYPE, CPU)
    assert_valid_storage(struct, eye)
    assert_valid_storage(struct, zeros)
    assert eye.dtype == zeros.dtype == DTYPE
    assert torch.equal(struct.to_dense(eye), torch.eye(d, dtype=DTYPE).expand(N, d, d))
    assert torch.equal(struct.to_dense(zeros), torch.zeros(N, d, d, dtype=DTYPE))
    assert (zeros == 0).all()


@all_cases
@all_dims
def test_add_identity_adds_alpha_times_identity_in_place_and_keeps_padding_zero(name, kwargs, d, gen):
    struct = build(name, kwargs, d)
    t = random_element(struct, d, gen)
    before = struct.to_dense(t).clone()
    out = struct.add_identity_(t, -0.75)
    assert out is t or out.data_ptr() == t.data_ptr()
    assert_valid_storage(struct, t)
    close(struct.to_dense(t), before - 0.75 * torch.eye(d, dtype=DTYPE))


# ---------------------------------------------------------------------------------------------
# projections: project, gram, inner
# ---------------------------------------------------------------------------------------------


@all_cases
@all_dims
def test_project_of_a_symmetric_matrix_is_the_singd_projection(name, kwargs, d, gen):
    struct = build(name, kwargs, d)
    sym = random_symmetric(d, gen)
    t = struct.project(sym)
    assert_valid_storage(struct, t)
    dense = struct.to_dense(t)
    close(dense, dense_projection(name, kwargs, sym))
    assert in_structure(name, kwargs, dense)


@all_cases
@all_dims
@pytest.mark.parametrize("r", [1, 9])
def test_gram_is_the_projection_of_x_times_x_transposed(name, kwargs, d, r, gen):
    struct = build(name, kwargs, d)
    x = torch.randn(N, d, r, generator=gen, dtype=DTYPE)
    t = struct.gram(x)
    assert_valid_storage(struct, t)
    close(struct.to_dense(t), dense_projection(name, kwargs, x @ x.mT))


@all_cases
@all_dims
def test_inner_is_the_projection_of_k_transposed_k(name, kwargs, d, gen):
    struct = build(name, kwargs, d)
    k_storage = random_element(struct, d, gen)
    k = struct.to_dense(k_storage)
    t = struct.inner(k_storage)
    assert_valid_storage(struct, t)
    close(struct.to_dense(t), dense_projection(name, kwargs, k.mT @ k))


# ---------------------------------------------------------------------------------------------
# products: closure, matmul, apply, kkt / apply_kkt
# ---------------------------------------------------------------------------------------------


@all_cases
@all_dims
def test_matmul_is_the_dense_product_and_stays_in_the_structure(name, kwargs, d, gen):
    struct = build(name, kwargs, d)
    a = random_element(struct, d, gen)
    b = struct.add_identity_(random_element(struct, d, gen), 1.0)
    assert in_structure(name, kwargs, struct.to_dense(a))
    assert in_structure(name, kwargs, struct.to_dense(b))
    for left, right in ((a, b), (b, a), (a, a)):
        product = struct.matmul(left, right)
        assert_valid_storage(struct, product)
        dense = struct.to_dense(product)
        close(dense, struct.to_dense(left) @ struct.to_dense(right))
        assert in_structure(name, kwargs, dense), "the product left the structure"


@all_cases
@all_dims
def test_apply_multiplies_k_or_its_transpose_onto_x(name, kwargs, d, gen):
    struct = build(name, kwargs, d)
    t = random_element(struct, d, gen)
    k = struct.to_dense(t)
    x = torch.randn(N, d, 6, generator=gen, dtype=DTYPE)
    close(struct.apply(t, x), k @ x)
    close(struct.apply(t, x, transpose=False), k @ x)
    close(struct.apply(t, x, transpose=True), k.mT @ x)


@all_cases
@all_dims
def test_kkt_applied_on_each_axis_of_a_3d_tensor_multiplies_k_k_transposed_onto_it(name, kwargs, d, gen):
    struct = build(name, kwargs, d)
    t = random_element(struct, d, gen)
    k = struct.to_dense(t)
    kkt_dense = k @ k.mT
    q = struct.kkt(t)
    for axis in range(3):
        shape = [2, 3, 4]
        shape[axis] = d
        x = torch.randn(shape, generator=gen, dtype=DTYPE)
        for i in range(N):
            expected = torch.tensordot(kkt_dense[i], x, dims=([1], [axis])).movedim(0, axis)
            close(apply_kkt(struct, q[i], x, axis), expected)


@all_cases
@all_dims
def test_kkt_on_a_vector_multiplies_k_k_transposed(name, kwargs, d, gen):
    struct = build(name, kwargs, d)
    t = random_element(struct, d, gen)
    k = struct.to_dense(t)
    q = struct.kkt(t)
    x = torch.randn(d, generator=gen, dtype=DTYPE)
    for i in range(N):
        close(apply_kkt(struct, q[i], x, 0), k[i] @ k[i].mT @ x)


@all_cases
@all_dims
@pytest.mark.parametrize("r", [1, 6])
def test_apply_kkt_batch_multiplies_each_k_k_transposed_onto_its_own_x(name, kwargs, d, r, gen):
    struct = build(name, kwargs, d)
    t = random_element(struct, d, gen)
    k = struct.to_dense(t)
    x = torch.randn(N, d, r, generator=gen, dtype=DTYPE)
    out = struct.apply_kkt_batch(struct.kkt(t), x)
    assert out.shape == (N, d, r)
    close(out, k @ k.mT @ x)


# ---------------------------------------------------------------------------------------------
# scalars: kkt_average_trace, frobenius_norm, max_abs
# ---------------------------------------------------------------------------------------------


@all_cases
@all_dims
def test_kkt_average_trace_frobenius_norm_and_max_abs_match_the_dense_matrix(name, kwargs, d, gen):
    struct = build(name, kwargs, d)
    for t in (random_element(struct, d, gen), struct.eye(N, DTYPE, CPU), -struct.eye(N, DTYPE, CPU)):
        k = struct.to_dense(t)
        close(struct.kkt_average_trace(struct.kkt(t)), (k @ k.mT).diagonal(dim1=-2, dim2=-1).sum(-1) / d)
        close(struct.frobenius_norm(t), torch.linalg.matrix_norm(k, ord="fro"))
        close(struct.max_abs(t), k.abs().amax(dim=(-2, -1)))
        assert struct.kkt_average_trace(struct.kkt(t)).shape == (N,)
        assert struct.frobenius_norm(t).shape == (N,)
        assert struct.max_abs(t).shape == (N,)


# ---------------------------------------------------------------------------------------------
# make_structure and the registry
# ---------------------------------------------------------------------------------------------


def test_the_registry_maps_each_name_to_a_class_of_that_name():
    assert list(STRUCTURES) == [
        "dense",
        "diagonal",
        "block_diagonal",
        "hierarchical",
        "tril_toeplitz",
        "triu_toeplitz",
    ]
    for name, cls in STRUCTURES.items():
        assert cls.name == name
        assert type(make_structure(name, 5)) is cls
    assert LARGE_DIM_STRUCTURES == ("diagonal", "block_diagonal")


@pytest.mark.parametrize("large", LARGE_DIM_STRUCTURES)
def test_an_axis_over_max_dense_dim_gets_the_large_dim_structure_unless_it_is_diagonal(large):
    kwargs = {"max_dense_dim": 8, "large_dim_structure": large}
    for name in STRUCTURES:
        assert make_structure(name, 8, **kwargs).name == name  # not over the limit
        expected = name if name in ("diagonal", large) else large
        assert make_structure(name, 9, **kwargs).name == expected


def test_make_structure_rejects_an_unknown_name_and_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="'nope'") as info:
        make_structure("nope", 4)
    for allowed in STRUCTURES:
        assert allowed in str(info.value)


@pytest.mark.parametrize(("d", "block_size"), [(7, 3), (16, 4), (2, 32)])
def test_block_diagonal_storage_is_ceil_d_over_b_blocks_of_min_b_d(d, block_size):
    struct = make_structure("block_diagonal", d, block_size=block_size)
    b = min(block_size, d)
    assert struct.storage_shape() == (-(-d // b), b, b)
