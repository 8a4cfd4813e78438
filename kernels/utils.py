"""Shared helpers of the kernels: implementation choice and launch checks."""

from __future__ import annotations

import os

import torch

from .constants import IMPLS


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
