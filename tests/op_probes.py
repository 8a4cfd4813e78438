"""Dispatch-mode probes that also see inside the fused kernels' custom ops.

A TorchDispatchMode sees a custom op as one call: its body runs below the mode, so the allocations
and host reads of the launchers would go unseen. These probes run the ops' bodies
(`rrhf_fast.kernels.ops.BODIES`) with themselves still on top, as planning/memtrack.py does.
"""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rrhf_fast.kernels import ops


class OpProbe(TorchDispatchMode):
    """Calls `observe(func, out)` for every aten op, those inside the fused kernels' ops included."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bodies = ops.BODIES.get(func)
        if bodies is None:
            out = func(*args, **kwargs)
        else:
            with self:
                out = bodies[0](*args, **kwargs)
        self.observe(func, out)
        return out

    def observe(self, func, out) -> None:
        raise NotImplementedError


def tensors(out) -> list[torch.Tensor]:
    return [t for t in (out if isinstance(out, tuple | list) else (out,)) if isinstance(t, torch.Tensor)]


# A host read reaches a mode as _local_scalar_dense, or as item inside a custom op's body (which
# runs below autograd, where item is not decomposed yet).
READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default)


class ScalarReads(OpProbe):
    """Counts the reads of a tensor value by the host (.item(), int(), bool(), float()): each is a
    device sync on CUDA."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def observe(self, func, out) -> None:
        self.count += func in READS


class Allocations(OpProbe):
    """(shape, dtype) of every tensor an aten op produces."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def observe(self, func, out) -> None:
        self.seen += [(tuple(t.shape), t.dtype) for t in tensors(out)]


class LargestAllocation(OpProbe):
    """The largest tensor, in bytes, that any aten op produces (the CPU stand-in for a peak-memory
    check; the Triton interpreter's byte copies of the kernel arguments count too)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def observe(self, func, out) -> None:
        for t in tensors(out):
            self.largest = max(self.largest, t.numel() * t.element_size())
