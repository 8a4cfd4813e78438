"""Shared helpers of the kernels: implementation choice and launch checks."""

from __future__ import annotations

import os
import warnings

import torch
from torch._guards import detect_fake_mode

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


def on_host(t: torch.Tensor) -> bool:
    """Whether `t`'s values can be read without a device sync (the host checks run only then).

    Not under a fake mode (`rrhf-fast plan`: fake tensors hold no values, and a real index tensor
    becomes one there) nor under torch.compile (a value read breaks the graph): both take the CUDA
    path, NaN for bad indices instead of an error.
    """
    if torch.compiler.is_compiling() or detect_fake_mode(t) is not None:
        return False
    return t.device.type == "cpu"


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def round_up(n: int, multiple: int) -> int:
    return -(-int(n) // multiple) * multiple


# torch >= 2.8 declares `addmm(..., out_dtype=torch.float32)` and `mm(..., out_dtype=...)` for half
# inputs (cuBLAS with fp32 output, no fp32 copy of the operands). Declared is not the same as
# runnable: the CPU backend has no kernel for them, and a CUDA build may refuse them too (they have
# never run on the GPU machine's torch 2.11). So whether they run is probed once per CUDA device, by
# the first call that asks (the first backward), with a 16 x 16 call of each in bf16 and fp16 whose
# result is checked; where they are refused the backward takes its fallbacks (the Triton GEMM for
# dhidden, a half product then a copy for dweight, the fused dlogits kernel), with one warning.
# RRHF_FAST_OUT_DTYPE_MM=0 or 1 forces the answer (tests force both branches on the CPU).
_OUT_DTYPE_DECLARED = all("dtype_out" in op.overloads() for op in (torch.ops.aten.addmm, torch.ops.aten.mm))
_OUT_DTYPE_PROBED: dict[int, bool] = {}


def has_out_dtype_mm(device: torch.device) -> bool:
    """True where torch.addmm / torch.mm take `out_dtype` (fp32 output of half operands) and run."""
    forced = os.environ.get("RRHF_FAST_OUT_DTYPE_MM", "")
    if forced in ("0", "1"):
        return forced == "1"
    if not _OUT_DTYPE_DECLARED or device.type != "cuda":
        return False
    if not torch.cuda.is_available():
        # Fake CUDA tensors on a machine without a GPU (`rrhf-fast plan`): nothing to probe; plan
        # with the declared path, which is the one a GPU that accepts the calls runs.
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _OUT_DTYPE_PROBED:
        _OUT_DTYPE_PROBED[index] = probe_out_dtype_mm(torch.device("cuda", index))
    return _OUT_DTYPE_PROBED[index]


def probe_out_dtype_mm(device: torch.device) -> bool:
    """Run addmm and mm with out_dtype=fp32 on half operands on `device`; False (and one warning
    saying what was refused) when either raises or returns a wrong result."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    sync_mode = torch.cuda.get_sync_debug_mode() if device.type == "cuda" else 0
    try:
        # Real tensors even when called from a fake kernel (plan, torch.compile tracing); the one
        # value read is allowed under a sync-debug mode (the no-sync tests).
        with unset_fake_temporarily(), torch.no_grad():
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
            for dtype in (torch.bfloat16, torch.float16):
                a = torch.full((16, 16), 0.5, dtype=dtype, device=device)
                acc = torch.ones(16, 16, dtype=torch.float32, device=device)
                torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
                prod = torch.mm(a, a, out_dtype=torch.float32)
                if prod.dtype != torch.float32 or not (bool((acc == 5).all()) and bool((prod == 4).all())):
                    raise RuntimeError(f"wrong result in {dtype}")
        return True
    except Exception as exc:  # RuntimeError, NotImplementedError, TypeError: every refusal is one answer
        reason = (str(exc).splitlines() or [""])[0].split(". ")[0][:160]
        warnings.warn(
            f"torch.addmm / torch.mm with out_dtype=float32 do not run on {device} "
            f"({type(exc).__name__}: {reason}): the backward accumulates dhidden with its Triton GEMM "
            "instead (slower, same result)",
            stacklevel=2,
        )
        return False
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(sync_mode)


def forward_grid(
    M: int, V: int, D: int, elem_bytes: int, slots: int, l2_bytes: int, block_m: int = 128, block_v: int = 256
) -> tuple[int, int]:
    """(vocabulary splits S, row blocks per group G) of the fused forward's grid of B x S programs.

    B = ceil(M / block_m) row blocks each stream all T = ceil(V / block_v) vocabulary tiles, split
    into S ranges of ceil(T / S) tiles; `slots` programs run at once (SMs x programs per SM). Time
    in tile-steps is about waves x tiles per program: ceil(B S / slots) x (ceil(T / S) + 1), the +1
    for a program's pipeline fill and epilogue (an estimate, not a measurement). Programs run in
    groups of G row blocks x S splits (`_grouped_tile`): a wave's programs share G row blocks of
    hidden, re-read from L2 at every tile, so G x block_m x D bytes must fit L2 with room for the
    weight tiles (a quarter of L2 each way: the wave can straddle two groups); for a wave to stay
    within G row blocks, G x S >= slots. S is the cheapest such split, the smaller on a tie.
    Worked example (benchmarks/README.md): M = 8192, D = 4096, V = 128256, bf16 on an H100 (132
    SMs, 50 MiB L2): B = 64, T = 501, G = 12, S = 12: 6 waves x 43 = 258 tile-steps against an
    ideal 64 x 501 / 132 = 243 (6% over); the old rule (S = 5, all 64 row blocks in every wave,
    64 MiB of hidden over 50 MiB of L2) gave 3 waves x 102 = 306 (26% over) and an HBM re-read of
    hidden at every tile.
    """
    blocks, tiles = -(-M // block_m), -(-V // block_v)
    group = max(1, min(blocks, l2_bytes // 4 // (block_m * D * elem_bytes)))
    max_splits = max(1, min(64, tiles))
    fits = [s for s in range(1, max_splits + 1) if blocks <= group or s * group >= slots]
    cost = lambda s: (-(-blocks * s // slots) * (-(-tiles // s) + 1), s)  # noqa: E731
    return min(fits or [max_splits], key=cost), group


def m_bucket(M: int) -> int:
    """The autotuners' row-count key: M rounded up to a power of two in [512, 32768], so that a
    config tuned on the first batch's M is not reused at every other M, without a retune per batch
    (at most 7 tunings per (D, V) in a run)."""
    return min(max(next_power_of_2(M), 512), 32768)


def autotune_bench(kernel_call, quantiles, reps: int = 5) -> list[float]:
    """Time one autotune candidate without Triton's extra memory: `triton.testing.do_bench`
    allocates a 256 MiB L2-flush buffer per benchmark (on top of the training step's peak, at the
    first step) and runs each config for ~100 ms. Here: one warm-up call, `reps` calls timed with
    CUDA events, no flush. The fused kernels' working sets (a weight of V x D, 64 MiB per backward
    chunk of 8192 x 4096 bf16) exceed L2 at the shapes worth tuning, so a flush changes little."""
    kernel_call()
    timed = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
    events = [(timed(), timed()) for _ in range(reps)]
    for start, end in events:
        start.record()
        kernel_call()
        end.record()
    torch.cuda.synchronize()
    times = torch.tensor(sorted(start.elapsed_time(end) for start, end in events))
    return [float(times.quantile(q)) for q in quantiles]
