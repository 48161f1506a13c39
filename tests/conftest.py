"""Shared test setup: offline, CPU only, importable from a plain checkout."""

from __future__ import annotations

import os

import pytest
import torch

# Tests never touch the network.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")


@pytest.fixture(scope="session", autouse=True)
def _build_fused_kernel_once() -> None:
    """Build (or load from the torch extensions cache) the fused CPU kernel before the first test,
    so no single test carries the ~15 s first build. Whether it built is checked by
    ``test_the_fused_cpu_kernel_builds_and_loads``."""
    from hf_rootfree.optim import _fused

    _fused.fused_kernel_available()


@pytest.fixture(scope="module", autouse=True)
def _one_intra_op_thread():
    """Run tests on one intra-op thread: their tensors are tiny, and on a busy 2-core machine
    OpenMP's thread hand-off made small matmuls up to 1000× slower than doing them inline."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
