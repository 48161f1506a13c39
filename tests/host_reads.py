"""A recorder of every way a tensor's value can reach the host (the claim "step() never reads a
device value").

It watches the dispatcher for ``aten._local_scalar_dense`` / ``aten.item`` (``.item()``,
``float(t)``, ``bool(t)``, ``if t:`` …) and for copies from a non-CPU device to the CPU
(``.cpu()``, ``.to("cpu")`` of a device tensor), and it wraps the tensor methods that read memory
without going through the dispatcher (``.tolist()``, ``.numpy()``) and ``.cpu()`` (on a CPU-only
machine a no-op the dispatcher never sees). Use it as a context manager around ``step()``.

Tensors that live on the host by design (the ``step`` counters, float64 CPU tensors) may be read:
pass them as ``host``; whatever the dispatcher computes from host tensors alone counts as host
too (``torch.stack(steps).tolist()`` is no device read), everything else is a device value.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SCALAR_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default)
_COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)
_METHODS = ("tolist", "numpy", "cpu")


def _devices(values) -> set[str]:
    return {v.device.type for v in values if isinstance(v, torch.Tensor)}


class HostReads(TorchDispatchMode):
    """Records host reads of tensor values in ``self.reads`` (op or method names)."""

    def __init__(self, host=()) -> None:
        super().__init__()
        self.reads: list[str] = []
        self._saved: dict[str, object] = {}
        self._host: dict[int, weakref.ref] = {}
        for t in host:
            self._add_host(t)

    def _add_host(self, t: torch.Tensor) -> None:
        self._host[id(t)] = weakref.ref(t)

    def _known_host(self, t: torch.Tensor) -> bool:
        ref = self._host.get(id(t))
        return ref is not None and ref() is t

    def _is_host(self, values) -> bool:
        tensors = [v for v in torch.utils._pytree.tree_leaves(values) if isinstance(v, torch.Tensor)]
        return bool(tensors) and all(self._known_host(t) for t in tensors)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._is_host((args, kwargs)):
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self._add_host(t)
            return out
        if func in _SCALAR_READS:
            self.reads.append(str(func))
        elif func in _COPIES and isinstance(out, torch.Tensor) and out.device.type == "cpu":
            if _devices(args) - {"cpu"}:
                self.reads.append(f"{func} to the host")
        return out

    def __enter__(self):
        for name in _METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def wrapper(tensor, *args, _name=name, _original=original, **kwargs):
                if not self._known_host(tensor):
                    self.reads.append(f"Tensor.{_name}")
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, wrapper)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()
        return super().__exit__(*exc)
