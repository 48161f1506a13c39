"""The fused kernels of the element-wise family: a C++ kernel on CPU, an inductor-compiled one on
CUDA.

CPU. The kernel (``csrc/elementwise.cpp``) is compiled on first use with
:func:`torch.utils.cpp_extension.load` (needs a C++ compiler and ``ninja``) and cached by torch
under ``$TORCH_EXTENSIONS_DIR``. The cache name carries a hash of the source (its text and
location), the torch version and the CPU's instruction-set flags, because the kernel is built with
``-march=native``: a cache shared between machines with different CPUs (an NFS home directory on a
cluster) never hands one machine a binary built for another.

If the build fails, or ``HF_ROOTFREE_FUSED=0`` is set, :func:`fused_kernel_available` returns
``False`` after one warning and the optimizers use their pure-PyTorch paths instead.

CUDA. The update written with ``torch._foreach_*`` ops over a coefficient tensor is compiled by
``torch.compile`` (inductor generates Triton kernels: a few launches per group of tensors instead of
one per op and tensor), on first use, once per group layout (:func:`compiled_table_step`). It
needs Triton (:func:`compiled_step_available`); if compiling fails, one warning and the foreach
path for the rest of the process. ``HF_ROOTFREE_FUSED=0`` turns it off too.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "elementwise.cpp"
_lock = threading.Lock()
_state: dict[str, Any] = {}


def _turned_off() -> bool:
    return os.environ.get("HF_ROOTFREE_FUSED", "1").lower() in ("0", "false", "no", "off")


def _cpu_fingerprint() -> str:
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags += line
                    break
    except OSError:
        pass
    return flags


def _extension_name() -> str:
    digest = hashlib.sha256()
    digest.update(_SOURCE.read_bytes())
    # the source's location too: torch rebuilds an extension whose recorded source path changed,
    # so two checkouts (or venvs) sharing one cache entry would rebuild each other's copy
    digest.update(str(_SOURCE.resolve()).encode())
    digest.update(torch.__version__.encode())
    digest.update(_cpu_fingerprint().encode())
    return f"hf_rootfree_elementwise_{digest.hexdigest()[:12]}"


def _is_cached() -> bool:
    """Whether a built kernel for this source, torch and CPU is already in the extensions cache."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        name = _extension_name()
        return (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").is_file()
    except Exception:  # a private torch helper: if it moved, announce the build anyway
        return False


def _announce_build() -> None:
    """Say what the first step waits for: a silent minute at step 0 looks like a hang. A warning,
    because stock training scripts show warnings but hide info logs."""
    if _is_cached():
        logger.info("hf_rootfree: loading the fused CPU kernel from the torch extensions cache")
    else:
        logger.warning(
            "hf_rootfree: building the fused CPU kernel of the element-wise optimizers (a C++ "
            "compile, once per machine and torch version, usually 15-80 s; cached under "
            "TORCH_EXTENSIONS_DIR). Training starts when it is done."
        )


def _build() -> None:
    from torch.utils.cpp_extension import load

    common = ["-O3", "-fno-math-errno", "-ffp-contract=off"]
    attempts = [[*common, "-march=native", "-fopenmp"], [*common, "-fopenmp"], common]
    last_error: Exception | None = None
    for cflags in attempts:
        try:
            load(
                name=_extension_name(),
                sources=[str(_SOURCE)],
                extra_cflags=cflags,
                extra_ldflags=["-fopenmp"] if "-fopenmp" in cflags else [],
                is_python_module=False,
                verbose=False,
            )
            return
        except Exception as error:  # a missing compiler, flag or ninja: try the next flags
            last_error = error
    assert last_error is not None
    raise last_error


def fused_kernel_available() -> bool:
    """Return whether the fused CPU kernel is loaded, building it on the first call."""
    if "ok" in _state:
        return _state["ok"]
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        if _turned_off():
            _state["ok"] = False
            return False
        if hasattr(torch.ops.hf_rootfree, "fused_elementwise_step_"):
            _state["ok"] = True
            return True
        _announce_build()
        try:
            _build()
            _state["ok"] = True
        except Exception as error:
            warnings.warn(
                "hf_rootfree: could not build the fused CPU kernel, so the element-wise optimizers "
                f"fall back to their PyTorch paths (slower on CPU). Cause: {error!r}. A C++ compiler "
                "and `pip install ninja` enable it; HF_ROOTFREE_FUSED=0 silences this warning.",
                RuntimeWarning,
                stacklevel=3,
            )
            _state["ok"] = False
    return _state["ok"]


#: graphs of the compiled step per process (see compiled_table_step)
_RECOMPILE_LIMIT = 64


def compiled_step_available(device: torch.device) -> bool:
    """Whether the compiled (Triton) path can run on ``device``: CUDA with Triton, not turned off
    and not failed earlier in this process."""
    if device.type != "cuda" or _turned_off() or _state.get("compiled") is False:
        return False
    from torch.utils._triton import has_triton

    return has_triton()


def compiled_table_step(step: Callable[..., None]) -> Callable[..., None] | None:
    """``torch.compile(step)``, made once per process (None after a failure). Recompiles happen
    per group layout (the tensors' number, shapes and dtypes), as for ``torch.compile(opt.step)``."""
    if _state.get("compiled") is False:
        return None
    if "compiled_step" not in _state:
        logger.warning(
            "hf_rootfree: compiling the fused GPU step of the element-wise optimizers with "
            "torch.compile at the first step (once per parameter group and process; on a CPU this "
            "took 40 s for a 4-layer and 150 s for a 12-layer GPT-2). HF_ROOTFREE_FUSED=0 or "
            "foreach=True skips it."
        )
        compiled = torch.compile(step, fullgraph=True, dynamic=False)

        def run(*args: Any, **kwargs: Any) -> None:
            # One graph per group layout (tensor count, shapes, dtypes) and optimizer kind: a
            # process with several optimizers (a sweep, a benchmark) passes dynamo's default of 8
            # graphs per function, after which it would quietly run the step uncompiled.
            limit = max(_RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)
            with torch._dynamo.config.patch(recompile_limit=limit):
                compiled(*args, **kwargs)

        _state["compiled_step"] = run
    return _state["compiled_step"]


def compiled_step_failed(error: Exception) -> None:
    """Record that compiling failed: warn once, and use the foreach path from now on."""
    _state["compiled"] = False
    warnings.warn(
        "hf_rootfree: could not compile the fused GPU step, so the element-wise optimizers use their "
        f"foreach path (slower). Cause: {error!r}. HF_ROOTFREE_FUSED=0 silences this warning.",
        RuntimeWarning,
        stacklevel=3,
    )
