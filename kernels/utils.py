"""Shared helpers of the kernels: implementation choice and launch checks."""

from __future__ import annotations

import os

import torch

IMPLS = ("auto", "triton", "torch")


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_impl(impl: str, device: torch.device) -> str:
    """'auto' is triton on CUDA and torch elsewhere; 'triton' off CUDA needs TRITON_INTERPRET=1."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if impl == "triton" and device.type != "cuda" and not interpreting():
        raise RuntimeError(
            "impl='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before triton is imported "
            "(slow; for tests); use impl='torch' or 'auto' on CPU"
        )
    return impl


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def round_up(n: int, multiple: int) -> int:
    return -(-int(n) // multiple) * multiple


# torch >= 2.8 has `addmm(..., out_dtype=torch.float32)` and `mm(..., out_dtype=...)` for half inputs
# (cuBLAS with fp32 output, no fp32 copy of the operands); they are CUDA-only (the CPU backend has
# no kernel for the overload), hence the device check in `has_out_dtype_mm`.
_OUT_DTYPE_MM = all("dtype_out" in op.overloads() for op in (torch.ops.aten.addmm, torch.ops.aten.mm))


def has_out_dtype_mm(device: torch.device) -> bool:
    """True where torch.addmm / torch.mm take `out_dtype` (fp32 output of half operands)."""
    return _OUT_DTYPE_MM and device.type == "cuda"
