"""The math of SIRFShampoo: against the reference package and against a float64 oracle.

* With ``structures="dense"``, ``merge_dims=False`` and no dense-size limit, ``SIRFShampoo``
  reproduces ``sirfshampoo==0.0.1`` (parameters, factors and factor momenta) on a small model
  trained with real losses.
* For every structure, per-axis and per-rank structure specs, merged axes, axes over
  ``max_dense_dim``, size-1 axes and weight + bias sharing, ``SIRFShampoo`` on float64 parameters
  matches the naive float64 oracle of ``sirf_oracle.py`` (written from the equations) to 1e-9
  (float64 round-off: ~1e-15 measured).
* The oracle comparison is sensitive: a wrong hyperparameter in the oracle does not match.
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from sirf_oracle import SIRFShampooOracle, preconditioned_shape
from sirf_paper import SIRFShampoo
from torch import nn

#: errors are relative max errors, max |a − b| / max |b|
#: against the reference package (both in float32): at most 4.4e-6 measured over the four cases
F32_RTOL = 2e-5
#: against the float64 oracle: every scalar of the update is kept in the factors' dtype (float64)
ORACLE_RTOL = 1e-9


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-300))


def distance_from_identity(factor: torch.Tensor) -> float:
    return float((factor - torch.eye(factor.shape[0], dtype=factor.dtype)).abs().max())


# ---------------------------------------------------------------------------------------------
# a. the reference package
# ---------------------------------------------------------------------------------------------


class SmallNet(nn.Module):
    """Embedding, Linear (+bias), LayerNorm, Conv2d and a free 3-D parameter, one real loss."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.lin = nn.Linear(6, 5)
        self.ln = nn.LayerNorm(5)
        self.conv = nn.Conv2d(2, 3, 3)
        self.free = nn.Parameter(torch.randn(3, 4, 2) * 0.3)
        self.head = nn.Linear(5 + 27 + 24, 4)

    def forward(self, idx: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        h = self.ln(self.lin(self.emb(idx))).mean(1)
        c = self.conv(img).flatten(1)
        w = (self.free.unsqueeze(0) * img.mean((2, 3))[:, :1, None, None]).flatten(1)
        return self.head(torch.cat([h, c, w], 1))


REF_CASES = [  # (momentum, precond_momentum, weight_decay, update_freq): every value of each, mixed
    (0.9, 0.5, 0.0, 1),
    (0.0, 0.0, 1e-2, 1),
    (0.9, 0.0, 1e-2, 3),
    (0.0, 0.5, 0.0, 3),
]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    "momentum, precond_momentum, weight_decay, update_freq",
    REF_CASES,
    ids=[f"a1={a}-a2={b}-wd={c}-T={t}" for a, b, c, t in REF_CASES],
)
def test_dense_sirfshampoo_reproduces_the_reference_package_params_factors_and_momenta(
    momentum: float, precond_momentum: float, weight_decay: float, update_freq: int
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sirfshampoo = pytest.importorskip("sirfshampoo")
    torch.manual_seed(0)
    ref_model = SmallNet()
    our_model = copy.deepcopy(ref_model)
    lr, precond_lr, damping, batch = 0.05, 0.1, 1e-3, 8
    ref = sirfshampoo.SIRFShampoo(
        ref_model,
        lr=lr,
        beta2=precond_lr,
        alpha1=momentum,
        alpha2=precond_momentum,
        lam=damping,
        kappa=weight_decay,
        batch_size=batch,
        T=update_freq,
    )
    ours = SIRFShampoo(
        our_model.parameters(),
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        precond_lr=precond_lr,
        precond_momentum=precond_momentum,
        damping=damping,
        batch_size=batch,
        update_freq=update_freq,
        structures="dense",
        merge_dims=False,
        max_dense_dim=None,
    )
    gen = torch.Generator().manual_seed(1)
    for _ in range(25):
        idx = torch.randint(0, 12, (batch, 7), generator=gen)
        img = torch.randn(batch, 2, 5, 5, generator=gen)
        target = torch.randint(0, 4, (batch,), generator=gen)
        for model, opt in ((ref_model, ref), (our_model, ours)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(idx, img), target).backward()
            opt.step()

    ref_params, our_params = list(ref_model.parameters()), list(our_model.parameters())
    # the reference keeps one group (and one list of factors) per parameter, in model order
    assert [g["params"] for g in ref.param_groups] == [[p] for p in ref_params]
    moved = 0.0
    for i, (name, _) in enumerate(ref_model.named_parameters()):
        assert rel_err(our_params[i], ref_params[i]) <= F32_RTOL, name
        ref_factors = [K.to_dense() for K in ref.preconditioner[i]]
        our_factors = ours.dense_factors(our_params[i])
        assert len(our_factors) == len(ref_factors), name
        for n, (ko, kr) in enumerate(zip(our_factors, ref_factors)):
            assert rel_err(ko, kr) <= F32_RTOL, f"{name} factor {n}"
            moved = max(moved, distance_from_identity(kr))
        if precond_momentum != 0:
            ref_momenta = [m.to_dense() for m in ref.preconditioner_momenta[i]]
            for n, (mo, mr) in enumerate(zip(ours.dense_factor_momenta(our_params[i]), ref_momenta)):
                assert rel_err(mo, mr) <= F32_RTOL, f"{name} momentum {n}"
    assert moved > 0.05, "the factors never left I: the comparison would be vacuous"


# ---------------------------------------------------------------------------------------------
# b. the float64 oracle
# ---------------------------------------------------------------------------------------------

#: hyperparameters that move the factors far from I within 30 steps
COMMON = dict(
    lr=0.01,
    momentum=0.5,
    weight_decay=0.01,
    precond_lr=0.2,
    precond_momentum=0.5,
    damping=0.05,
    batch_size=16,
)
GRAD_SCALE = 0.3
STEPS = 30
#: shapes of the structure cases: 2-D, 1-D and 3-D tensors whose sizes exercise partial blocks,
#: empty and non-empty hierarchical middles, and Toeplitz matrices of several sizes
MIXED = [(7, 6), (5,), (3, 4, 5)]
MIXED_DIMS = [(7, 6), (5,), (3, 4, 5)]


@dataclass
class OracleCase:
    id: str
    shapes: list[tuple[int, ...]]
    options: dict[str, Any]
    #: the preconditioned shape and the per-axis structures we expect (checks the oracle's rules
    #: and the implementation's against a hand-written answer)
    dims: list[tuple[int, ...]]
    structures: list[tuple[str, ...]]
    share_bias_model: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)  # of COMMON


def _same(name: str) -> list[tuple[str, ...]]:
    return [(name,) * len(d) for d in MIXED_DIMS]


ORACLE_CASES = [
    *[
        OracleCase(name, MIXED, dict(structures=name, merge_dims=False), MIXED_DIMS, _same(name))
        for name in ("dense", "diagonal", "tril_toeplitz", "triu_toeplitz")
    ],
    OracleCase(
        "block_diagonal-4",  # 4 divides none of 7, 6, 5, 3
        MIXED,
        dict(structures="block_diagonal", block_size=4, merge_dims=False),
        MIXED_DIMS,
        _same("block_diagonal"),
    ),
    OracleCase(
        "hierarchical-2-3",  # middles: 7 → 2, 6 → 1, 5 → 0; 3 → k2 = 1; 4 → k2 = 2
        MIXED,
        dict(structures="hierarchical", hierarchical_sizes=(2, 3), merge_dims=False),
        MIXED_DIMS,
        _same("hierarchical"),
    ),
    OracleCase(
        "tuple-dense-diagonal",  # a tuple covers tensors with that many factors; others are dense
        MIXED,
        dict(structures=("dense", "diagonal"), merge_dims=False),
        MIXED_DIMS,
        [("dense", "diagonal"), ("dense",), ("dense",) * 3],
    ),
    OracleCase(
        "dict-spec-no-precond-momentum",
        MIXED,
        dict(structures={2: ("diagonal", "dense"), 1: "diagonal"}, merge_dims=False),
        MIXED_DIMS,
        [("diagonal", "dense"), ("diagonal",), ("dense",) * 3],
        overrides=dict(precond_momentum=0.0),
    ),
    OracleCase(
        "merge_dims-conv-and-5d",
        [(4, 3, 2, 2), (3, 2, 3, 2, 2)],
        dict(structures="dense", merge_dims=True, max_dense_dim=12),
        [(4, 12), (3, 12, 2)],
        [("dense",) * 2, ("dense",) * 3],
    ),
    OracleCase(
        "large-axis-diagonal",
        [(12, 5), (10,), (3, 9)],
        dict(structures="hierarchical", hierarchical_sizes=(2, 1), max_dense_dim=8, merge_dims=False),
        [(12, 5), (10,), (3, 9)],
        [("diagonal", "hierarchical"), ("diagonal",), ("hierarchical", "diagonal")],
    ),
    OracleCase(
        "large-axis-block_diagonal",
        [(12, 5), (10,), (3, 9)],
        dict(
            structures="dense",
            max_dense_dim=8,
            large_dim_structure="block_diagonal",
            block_size=5,
            merge_dims=False,
        ),
        [(12, 5), (10,), (3, 9)],
        [("block_diagonal", "dense"), ("block_diagonal",), ("dense", "block_diagonal")],
    ),
    OracleCase(
        "size-1-axes-no-momentum",
        [(), (1,), (1, 5, 1), (4, 1, 3)],
        dict(structures="dense"),
        [(1,), (1,), (5,), (4, 3)],
        [("dense",), ("dense",), ("dense",), ("dense", "dense")],
        overrides=dict(momentum=0.0),
    ),
    OracleCase(
        "dense-wide-axes",  # d ≥ 256: the symmetric products run in row strips (257: uneven ones)
        [(300, 257), (259,)],
        dict(structures="dense", merge_dims=False, max_dense_dim=1024),
        [(300, 257), (259,)],
        [("dense", "dense"), ("dense",)],
    ),
    # Same-shape blocks share one batched factor update (and, being small, one batched
    # preconditioning): each block must still get exactly its own update.
    OracleCase(
        "same-shape-2d-and-4d-batched",
        [(6, 5), (6, 5), (6, 5), (3, 2, 4, 2), (3, 2, 4, 2)],
        dict(structures="dense", merge_dims=False),
        [(6, 5)] * 3 + [(3, 2, 4, 2)] * 2,
        [("dense",) * 2] * 3 + [("dense",) * 4] * 2,
    ),
    OracleCase(
        "same-shape-merged-conv-batched",
        [(4, 3, 2, 2), (4, 3, 2, 2), (4, 3, 2, 2)],
        dict(structures=("dense", "diagonal"), merge_dims=True),
        [(4, 12)] * 3,
        [("dense", "diagonal")] * 3,
    ),
    OracleCase(
        "model-share_bias",
        [],  # the parameters of ShareBiasNet
        dict(structures="dense"),
        [(4, 6), (3, 9)],
        [("dense", "dense")] * 2,
        share_bias_model=True,
    ),
]


class ShareBiasNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 4)
        self.conv = nn.Conv2d(2, 3, 2)


def _snake(structure_repr: str) -> str:
    """``BlockDiagonal(dim=12, block_size=5)`` → ``block_diagonal``."""
    cls = structure_repr.split("(")[0]
    return re.sub(r"(?<!^)([A-Z])", r"_\1", cls).lower()


def run_against_oracle(case: OracleCase, update_freq: int, **oracle_overrides: Any):
    """Run SIRFShampoo and one oracle per preconditioner on the same random gradients."""
    gen = torch.Generator().manual_seed(0)
    hyper = {**COMMON, **case.overrides, "update_freq": update_freq, **case.options}
    if case.share_bias_model:
        model = ShareBiasNet().double()
        blocks = [[model.lin.weight, model.lin.bias], [model.conv.weight, model.conv.bias]]
        params = [p for block in blocks for p in block]
        opt = SIRFShampoo(model.parameters(), model=model, **hyper)
    else:
        params = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in case.shapes]
        blocks = [[p] for p in params]
        opt = SIRFShampoo(params, **hyper)
    oracles = [SIRFShampooOracle(block, **{**hyper, **oracle_overrides}) for block in blocks]
    for _ in range(STEPS):
        for p in params:
            p.grad = GRAD_SCALE * torch.randn(p.shape, generator=gen, dtype=torch.float64)
        opt.step()
        for block, oracle in zip(blocks, oracles):
            oracle.step([p.grad for p in block])
    return opt, blocks, oracles


def worst_errors(opt: SIRFShampoo, blocks, oracles) -> dict[str, float]:
    """Largest relative errors of parameters, dense factors and dense momenta against the oracle."""
    worst = {"parameter": 0.0, "factor": 0.0, "momentum": 0.0}
    for block, oracle in zip(blocks, oracles):
        for p, mu in zip(block, oracle.mu):
            worst["parameter"] = max(worst["parameter"], rel_err(p, mu))
        factors = opt.dense_factors(block[0])
        assert len(factors) == len(oracle.K)
        for ours, expected in zip(factors, oracle.K):
            worst["factor"] = max(worst["factor"], rel_err(ours, expected))
        if opt.param_groups[0]["precond_momentum"] != 0:  # with 0 no momentum state is kept
            for ours, expected in zip(opt.dense_factor_momenta(block[0]), oracle.m):
                worst["momentum"] = max(worst["momentum"], rel_err(ours, expected))
    return worst


@pytest.mark.parametrize("update_freq", [1, 2], ids=lambda t: f"T={t}")
@pytest.mark.parametrize("case", ORACLE_CASES, ids=lambda c: c.id)
def test_sirfshampoo_matches_the_float64_oracle_on_params_factors_and_momenta(
    case: OracleCase, update_freq: int
) -> None:
    opt, blocks, oracles = run_against_oracle(case, update_freq)

    # how each tensor is preconditioned: as written in the case, by the oracle and by the optimizer
    assert [o.dims for o in oracles] == case.dims
    assert [o.names for o in oracles] == case.structures
    described = opt.blocks()
    assert [tuple(b["dims"]) for b in described] == case.dims
    assert [tuple(_snake(s) for s in b["structures"]) for b in described] == case.structures
    assert [b["shapes"] for b in described] == [[tuple(p.shape) for p in block] for block in blocks]

    worst = worst_errors(opt, blocks, oracles)
    assert max(worst.values()) <= ORACLE_RTOL, worst
    for oracle in oracles:  # every preconditioner moved: the comparison is not vacuous
        moved = max(distance_from_identity(K) for K in oracle.K)
        assert moved > 0.02, f"the factors of {oracle.dims} stayed at I"


def test_weight_and_bias_share_one_block_when_the_model_is_given() -> None:
    model = ShareBiasNet().double()
    opt = SIRFShampoo(model.parameters(), model=model, batch_size=4)
    assert [(b["name"], b["shapes"]) for b in opt.blocks()] == [
        ("lin.weight", [(4, 5), (4,)]),
        ("conv.weight", [(3, 2, 2, 2), (3,)]),
    ]


def test_gpt2_conv1d_weights_share_their_block_with_the_bias_as_out_by_in_plus_one() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2))
    blocks = {b["name"]: b for b in SIRFShampoo(model.parameters(), model=model, batch_size=4).blocks()}
    # Conv1D keeps its weight as (in, out): c_attn is (16, 48) and its bias (48,)
    assert blocks["transformer.h.0.attn.c_attn.weight"]["shapes"] == [(16, 48), (48,)]
    assert blocks["transformer.h.0.attn.c_attn.weight"]["dims"] == (48, 17)
    assert blocks["transformer.h.0.mlp.c_fc.weight"]["dims"] == (64, 17)
    assert "transformer.h.0.attn.c_attn.bias" not in blocks


def test_a_conv1d_layer_trains_exactly_like_the_linear_layer_holding_its_transposed_weight() -> None:
    """The (in, out) storage of transformers' Conv1D changes nothing: its block is the Linear's."""
    from transformers.pytorch_utils import Conv1D

    gen = torch.Generator().manual_seed(0)
    conv = nn.Sequential(Conv1D(6, 5)).double()
    linear = nn.Sequential(nn.Linear(5, 6)).double()
    with torch.no_grad():
        conv[0].weight.copy_(torch.randn(5, 6, generator=gen, dtype=torch.float64))
        conv[0].bias.copy_(torch.randn(6, generator=gen, dtype=torch.float64))
        linear[0].weight.copy_(conv[0].weight.T)
        linear[0].bias.copy_(conv[0].bias)
    hyper = {**COMMON, "update_freq": 2, "structures": "dense"}
    opt_conv = SIRFShampoo(conv.parameters(), model=conv, **hyper)
    opt_linear = SIRFShampoo(linear.parameters(), model=linear, **hyper)
    assert opt_conv.blocks()[0]["dims"] == opt_linear.blocks()[0]["dims"] == (6, 6)
    for _ in range(STEPS):
        g_weight = GRAD_SCALE * torch.randn(6, 5, generator=gen, dtype=torch.float64)
        g_bias = GRAD_SCALE * torch.randn(6, generator=gen, dtype=torch.float64)
        conv[0].weight.grad, conv[0].bias.grad = g_weight.T.clone(), g_bias.clone()
        linear[0].weight.grad, linear[0].bias.grad = g_weight, g_bias.clone()
        opt_conv.step()
        opt_linear.step()
    assert distance_from_identity(opt_linear.dense_factors(linear[0].weight)[0]) > 0.02  # not vacuous
    torch.testing.assert_close(conv[0].weight.T, linear[0].weight, rtol=1e-12, atol=0)
    torch.testing.assert_close(conv[0].bias, linear[0].bias, rtol=1e-12, atol=0)
    theirs = opt_linear.dense_factors(linear[0].weight)
    for ours, expected in zip(opt_conv.dense_factors(conv[0].weight), theirs, strict=True):
        torch.testing.assert_close(ours, expected, rtol=1e-12, atol=0)


def test_the_oracle_shape_rule_merges_left_to_right_under_the_limit() -> None:
    """The oracle's own rule, on the docstring's examples (the oracle must be right too)."""
    assert preconditioned_shape((64, 32, 3, 3), True, 1024) == (64, 288)
    assert preconditioned_shape((64, 32, 3, 3), False, 1024) == (64, 32, 3, 3)
    assert preconditioned_shape((2, 8, 4, 4, 2), True, 32) == (2, 32, 8)
    assert preconditioned_shape((2, 8, 4, 4, 2), True, None) == (2, 256)
    assert preconditioned_shape((1, 1), True, 4) == (1,)


# ---------------------------------------------------------------------------------------------
# c. the comparison can fail
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "wrong",
    [dict(damping=2 * COMMON["damping"]), dict(batch_size=COMMON["batch_size"] + 1)],
    ids=lambda w: f"wrong-{next(iter(w))}",
)
def test_the_oracle_comparison_detects_a_wrong_hyperparameter(wrong: dict[str, Any]) -> None:
    case = next(c for c in ORACLE_CASES if c.id == "hierarchical-2-3")
    opt, blocks, oracles = run_against_oracle(case, 1, **wrong)
    worst = max(
        rel_err(ours, expected)
        for block, oracle in zip(blocks, oracles)
        for ours, expected in zip(opt.dense_factors(block[0]), oracle.K)
    )
    assert worst > 1e3 * ORACLE_RTOL, f"a wrong {wrong} still matches to {worst:.1e}"


#: same-shape 2-D, 4-D and 1-D tensors: three buckets of batched factor updates
BATCHED_SHAPES = [(6, 5), (6, 5), (6, 5), (3, 2, 4, 2), (3, 2, 4, 2), (5,), (5,)]


@pytest.mark.parametrize("update_freq", [1, 3], ids=lambda t: f"T={t}")
@pytest.mark.parametrize("structures", ["dense", "diagonal", "tril_toeplitz"])
def test_batched_same_shape_blocks_equal_one_optimizer_per_block(structures: str, update_freq: int) -> None:
    """One optimizer over same-shape tensors (batched factor updates and preconditioning) ends
    where one optimizer per tensor (no batching) ends: no block sees another's numbers."""
    gen = torch.Generator().manual_seed(0)
    hyper = {**COMMON, "update_freq": update_freq, "structures": structures, "merge_dims": False}
    batched = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in BATCHED_SHAPES]
    alone = [p.detach().clone().requires_grad_() for p in batched]
    opt = SIRFShampoo(batched, **hyper)
    singles = [SIRFShampoo([p], **hyper) for p in alone]
    bucket_sizes = []
    update_factors = opt._update_factors
    opt._update_factors = lambda bucket: bucket_sizes.append(len(bucket)) or update_factors(bucket)
    for _ in range(12):
        for i, (p, q) in enumerate(zip(batched, alone)):
            # the tensors' gradients differ in scale, so mixing two blocks' numbers shows
            q.grad = GRAD_SCALE * (1 + i % 3) * torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.grad = q.grad.clone()
        opt.step()
        for single in singles:
            single.step()
    assert sorted(set(bucket_sizes)) == [2, 3], "the same-shape blocks were not batched"
    for p, q, single in zip(batched, alone, singles):
        assert rel_err(p, q) <= 1e-12
        for ours, theirs in zip(opt.dense_factors(p), single.dense_factors(q)):
            assert rel_err(ours, theirs) <= 1e-12
            assert distance_from_identity(ours) > 0.01
