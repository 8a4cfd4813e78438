"""token_logprobs: log_softmax(hidden[rows] @ weight.T)[m, targets[m]] without the [M, V] logits.

Forward: one fused kernel streams vocabulary blocks through an online log-sum-exp in fp32 and keeps
only the per-row LSE and the target logit; programs split the vocabulary so that the grid is close
to a whole number of waves, run in L2-sized groups of row blocks (`utils.forward_grid` has the
arithmetic), and their partial LSEs are merged afterwards.

Backward, for any per-token upstream gradient g: dlogits = g * (onehot(target) - softmax), times the
soft-cap derivative. The vocabulary is processed in chunks of at most VOCAB_CHUNK columns; for each
chunk one kernel recomputes the logits tile by tile and writes onehot - softmax [M, chunk] (input
dtype, like autograd's bf16 backward; without g, whose product with p underflows in fp16), then
dweight[chunk] = dlogits^T @ (g * hidden[rows]) (one GEMM, fp32 accumulation) and
dhidden[rows] += dlogits @ weight[chunk] accumulates in fp32 (`accumulate_dh`: cuBLAS with an fp32
output where torch has it, a Triton GEMM elsewhere), scaled by g once at the end.
Peak extra memory is M x VOCAB_CHUNK (rows padded to 64 elements) + M x D, never M x V. Exact: no
gradient filtering.
"""

from __future__ import annotations

import functools
import os
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from . import autotune
from .dlogits_cublas import _dz_from_logits, _tanh, dlogits_cublas
from .reference import token_logprobs_torch
from .utils import (
    autotune_bench,
    forward_grid,
    has_out_dtype_mm,
    interpreting,
    m_bucket,
    on_host,
    resolve_impl,
    round_up,
)

# Columns of dlogits materialised at once in backward. 8192 keeps the buffer (M x 8192) comparable to
# the hidden states (M x D) while each dweight GEMM stays large enough to run near peak.
VOCAB_CHUNK = 8192
VOCAB_CHUNK_BYTES = 1 << 30
# How the backward recomputes the logits: "fused" (tl.dot and the softmax in one Triton kernel) or
# "cublas" (cuBLAS fp32 logits + a Triton epilogue; CUDA with torch >= 2.8 for half inputs, plus an
# [M, chunk] fp32 buffer). Which is faster is for the GPU to say (benchmarks/README.md).
DLOGITS = os.environ.get("RRHF_FAST_DLOGITS", "fused")


# ---------------------------------------------------------------------------------------------
# Triton device functions and kernels


@triton.jit
def _logits_tile(
    H, W, h_rows, offs_v, m_mask, v_mask, stride_h, stride_w,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """fp32 [BLOCK_M, BLOCK_V] tile of hidden[h_rows] @ weight[offs_v].T."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    h_ptrs = H + h_rows[:, None] * stride_h
    w_ptrs = W + offs_v[:, None].to(tl.int64) * stride_w
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        h = tl.load(h_ptrs + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_ptrs + offs_d[None, :], mask=v_mask[:, None] & d_mask[None, :], other=0.0)
        # An fp32 weight under autocast is rounded here, tile by tile (a no-op for equal dtypes).
        acc = tl.dot(h, tl.trans(w.to(h.dtype)), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _fwd_kernel(
    H, W, ROWS, TGT, LSE_PART, TGT_LOGIT, M, V, NUM_SPLITS, group_m, M_BUCKET, stride_h, stride_w, softcap,
    D: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per (row block, vocabulary split), in groups of group_m row blocks (utils.forward_grid)."""
    pid_m, pid_s = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), NUM_SPLITS, group_m)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    h_rows = tl.load(ROWS + offs_m, mask=m_mask, other=0).to(tl.int64)
    tgt = tl.load(TGT + offs_m, mask=m_mask, other=-1).to(tl.int32)

    v_per_split = tl.cdiv(tl.cdiv(V, NUM_SPLITS), BLOCK_V) * BLOCK_V
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    t_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_mask = offs_v < v_hi
        z = _logits_tile(
            H, W, h_rows, offs_v, m_mask, v_mask, stride_h, stride_w, D, BLOCK_M, BLOCK_V, BLOCK_D, PRECISION
        )
        if SOFTCAP:
            z = softcap * _tanh(z / softcap)
        t_i += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)
        z = tl.where(v_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
    # An empty split (v_lo >= V) leaves -inf, which the merge ignores.
    tl.store(LSE_PART + pid_s * M + offs_m, m_i + tl.log(s_i), mask=m_mask)
    tl.store(TGT_LOGIT + offs_m, t_i, mask=m_mask & (tgt >= v_lo) & (tgt < v_hi))


@triton.jit
def _dlogits_kernel(
    H, W, TGT, LSE, DZ, M, VC, v_offset, M_BUCKET, stride_h, stride_w, stride_dz, softcap,
    D: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """DZ[:, :VC] = (onehot(target) - softmax) * dsoftcap for vocabulary columns v_offset .. + VC.

    W points at the chunk's first row already: v_offset * stride_w can pass 2**31 (V = 256k,
    D = 8192), and scalar kernel arguments are 32-bit, so the launcher offsets the pointer.
    """
    pid_m, pid_v = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(VC, BLOCK_V), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    m_mask = offs_m < M
    v_mask = offs_v < VC
    z = _logits_tile(
        H, W, offs_m.to(tl.int64), offs_v, m_mask, v_mask, stride_h, stride_w,
        D, BLOCK_M, BLOCK_V, BLOCK_D, PRECISION,
    )  # fmt: skip
    lse = tl.load(LSE + offs_m, mask=m_mask, other=0.0)
    tgt = tl.load(TGT + offs_m, mask=m_mask, other=-1).to(tl.int32) - v_offset
    dz = _dz_from_logits(z, offs_v, v_mask, tgt, lse, softcap, SOFTCAP)
    dz_ptrs = DZ + offs_m[:, None].to(tl.int64) * stride_dz + offs_v[None, :]
    tl.store(dz_ptrs, dz.to(DZ.dtype.element_ty), mask=m_mask[:, None] & (offs_v < stride_dz)[None, :])


@triton.jit
def _mm_acc_kernel(
    A, B, C, M, N, K, stride_am, stride_bk, stride_cm,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """C[M, N] (fp32) += A[M, K] @ B[K, N]; all row-major with unit last stride."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_ptrs = A + offs_m[:, None].to(tl.int64) * stride_am
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(a_ptrs + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b_ptrs = B + offs_k[:, None].to(tl.int64) * stride_bk + offs_n[None, :]
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    c_ptrs = C + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    c_mask = m_mask[:, None] & n_mask[None, :]
    tl.store(c_ptrs, tl.load(c_ptrs, mask=c_mask, other=0.0) + acc, mask=c_mask)


@triton.jit
def _grouped_tile(pid, num_m, num_n, GROUP_M):
    """Tile order that walks GROUP_M row blocks per column block, so weight tiles are reused in L2."""
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_size, (pid % per_group) // group_size


# ---------------------------------------------------------------------------------------------
# Launch configurations. Under the interpreter, small tiles keep the CPU tests fast; on CUDA the
# autotuner picks among Hopper/Ampere-friendly tiles once per (D, V).

_SMALL = dict(BLOCK_M=32, BLOCK_V=256, BLOCK_D=64)
_SMALL_MM = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=256, GROUP_M=4)


def _cfg(num_warps: int, num_stages: int, **meta: int) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


# Registers and spills of each config, compiled for sm_90 at the headline shape (D = 4096, bf16 and
# the autocast variant, no soft-cap) with Triton 3.9 and 3.6, the GPU machine's (benchmarks/README.md,
# "Compile evidence"; the slow test in tests/test_kernel_compile.py fails on a spill). An SM has
# 65536 registers: 256 threads (8 warps) at <= 128 registers a thread let two blocks share an SM,
# at 129 only one. The dlogits 128 x 128 tiles at 8 warps took 129 registers under 3.6 (128 under
# 3.9); `maxnreg=128` on them made 3.6 spill 8 bytes, so they run at 16 warps instead: at most 112
# registers on both Tritons, soft-cap included, no spill. The forward's 128 x 256 tile at 16 warps
# spilled with a 64-deep K step (3.9: 16 bytes in bf16; autocast 104 / 88 bytes on 3.9 / 3.6); with
# a 32-deep step and 4 stages it fits 128 registers without a spill on both. A 128 x 256 tile at 8
# warps needs 255 registers (config 1: no spill in bf16; autocast does not fit shared memory and is
# skipped by the autotuner). The fallback GEMM's 128 x 256 tile spilled 192 bytes on both Tritons:
# its second config is 128 x 128 with 4 stages. Every dlogits tile larger than 128 x 128 spilled
# (256 x 128: 576 bytes).
FWD_CONFIGS = [
    _cfg(8, 3, BLOCK_M=128, BLOCK_V=128, BLOCK_D=64),
    _cfg(8, 4, BLOCK_M=128, BLOCK_V=256, BLOCK_D=64),
    _cfg(4, 4, BLOCK_M=64, BLOCK_V=128, BLOCK_D=64),
    _cfg(8, 3, BLOCK_M=64, BLOCK_V=256, BLOCK_D=64),
    _cfg(16, 4, BLOCK_M=128, BLOCK_V=256, BLOCK_D=32),
]
DLOGITS_CONFIGS = [
    _cfg(16, 3, BLOCK_M=128, BLOCK_V=128, BLOCK_D=64, GROUP_M=8),
    _cfg(16, 4, BLOCK_M=128, BLOCK_V=128, BLOCK_D=64, GROUP_M=8),
    _cfg(4, 4, BLOCK_M=64, BLOCK_V=128, BLOCK_D=64, GROUP_M=8),
]
MM_CONFIGS = [
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
]

# Keyed on the row-count bucket too (M_BUCKET, unused by the kernels): the first batch's M no longer
# picks the config of every later batch. autotune_bench tunes without Triton's 256 MiB flush buffer,
# so the first step's peak memory is the steady state's.
# RRHF_FAST_AUTOTUNE trims the lists (autotune.py: a first GPU run compiles fewer configs).
_tune = functools.partial(triton.autotune, do_bench=autotune_bench)
_fwd_tuned = _tune(autotune.select("fwd", FWD_CONFIGS), key=["D", "V", "M_BUCKET"])(_fwd_kernel)
_dlogits_tuned = _tune(autotune.select("dlogits", DLOGITS_CONFIGS), key=["D", "M_BUCKET"])(_dlogits_kernel)
# Only the fallback of accumulate_dh (out_dtype GEMMs refused or absent): restore_value clones C
# (M x D fp32) per config.
_mm_acc_tuned = _tune(autotune.select("mm", MM_CONFIGS), key=["N"], restore_value=["C"])(_mm_acc_kernel)


def fwd_grid(M: int, splits: int):
    """The forward's launch grid for a config's meta-parameters: row blocks x vocabulary splits."""
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * splits,)


def dlogits_grid(M: int, VC: int):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(VC, meta["BLOCK_V"]),)


def mm_grid(M: int, N: int):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)


def _launch(kernel: str, plain, tuned, small: dict, grid, *args, **common) -> None:
    """A pinned config (autotune.pinned_configs), the interpreter's small tiles, or the autotuner."""
    config = autotune.pinned(kernel)
    if config is not None:
        plain[grid(config.kwargs)](*args, **common, **config.all_kwargs())
    elif interpreting():
        plain[grid(small)](*args, **common, **small)
    else:
        tuned[grid](*args, **common)


@functools.cache
def _device_shape(device_index: int) -> tuple[int, int]:
    """(multiprocessors, L2 bytes): one forward program per SM at a time (the 128-row configs use
    most of the shared memory), so the SM count is the number of programs in a wave."""
    props = torch.cuda.get_device_properties(device_index)
    return props.multi_processor_count, props.L2_cache_size


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs are the exactness reference (tests, CPU): no TF32 rounding.
    return "ieee" if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------------------------------------
# Launchers


def _forward(hidden, weight, rows, targets, softcap):
    M = rows.numel()
    V, D = weight.shape
    logp = torch.empty(M, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(M, dtype=torch.float32, device=hidden.device)
    if M == 0:
        return logp, lse
    splits, group = _forward_grid(hidden, M, V, D)
    lse_part = torch.empty(splits, M, dtype=torch.float32, device=hidden.device)
    tgt_logit = torch.empty(M, dtype=torch.float32, device=hidden.device)
    args = (
        hidden,
        weight,
        rows,
        targets,
        lse_part,
        tgt_logit,
        M,
        V,
        splits,
        group,
        m_bucket(M),
        hidden.stride(0),
        weight.stride(0),
    )
    common = dict(
        softcap=softcap or 0.0, D=D, SOFTCAP=softcap is not None, PRECISION=_precision(hidden.dtype)
    )
    _launch("fwd", _fwd_kernel, _fwd_tuned, _SMALL, fwd_grid(M, splits), *args, **common)
    torch.logsumexp(lse_part, dim=0, out=lse)
    torch.sub(tgt_logit, lse, out=logp)
    return logp, lse


def _forward_grid(hidden: torch.Tensor, M: int, V: int, D: int) -> tuple[int, int]:
    """(vocabulary splits, row blocks per group) of the forward; the splits size `lse_part`."""
    if hidden.is_cuda:
        sms, l2 = _device_shape(hidden.device.index or 0)
        return forward_grid(M, V, D, hidden.element_size(), sms, l2)
    return 2, 2  # exercises the split merge and the grouped order in the CPU tests


def dz_row_stride(chunk: int) -> int:
    """Row stride of the dlogits buffer: the chunk rounded up to 64 elements (128 bytes in bf16).

    A ragged vocabulary (32001, 50257, 250680) left the last chunk's rows at an odd stride, which
    makes the buffer's rows 2-byte aligned: Triton drops cp.async / vector stores on that operand
    and cuBLAS gets a leading dimension that is not a multiple of 8 (its fast kernels need 16-byte
    aligned rows). Every chunk now views the same [M, stride] buffer, so the stride never changes.
    """
    return round_up(chunk, 64)


def _vocab_chunk(M: int, V: int, elem_bytes: int) -> int:
    by_bytes = max(256, VOCAB_CHUNK_BYTES // max(1, M * elem_bytes) // 256 * 256)
    return min(V, VOCAB_CHUNK, by_bytes)


def _dlogits(h_rows, weight, targets, lse, dz, v0, softcap):
    M, D = h_rows.shape
    VC = dz.shape[1]
    args = (
        h_rows,
        weight,
        targets,
        lse,
        dz,
        M,
        VC,
        v0,
        m_bucket(M),
        h_rows.stride(0),
        weight.stride(0),
        dz.stride(0),
    )
    common = dict(
        softcap=softcap or 0.0, D=D, SOFTCAP=softcap is not None, PRECISION=_precision(h_rows.dtype)
    )
    small = dict(_SMALL, GROUP_M=4)
    _launch("dlogits", _dlogits_kernel, _dlogits_tuned, small, dlogits_grid(M, VC), *args, **common)


def mm_accumulate(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """c (fp32, [M, N]) += a [M, K] @ b [K, N], accumulated in fp32 without an fp32 copy of a or b."""
    M, K = a.shape
    N = b.shape[1]
    args = (a, b, c, M, N, K, a.stride(0), b.stride(0), c.stride(0))
    grid = mm_grid(M, N)
    _launch("mm", _mm_acc_kernel, _mm_acc_tuned, _SMALL_MM, grid, *args, PRECISION=_precision(a.dtype))


def accumulate_dh(dh_rows: torch.Tensor, dz: torch.Tensor, w_chunk: torch.Tensor) -> None:
    """dh_rows (fp32) += dz @ w_chunk: cuBLAS with fp32 output where torch has it, else Triton.

    fp32 operands: a plain addmm (IEEE fp32, like the "ieee" kernels). Half operands on CUDA with
    torch >= 2.8: addmm with out_dtype=fp32 writes the fp32 accumulator in cuBLAS's epilogue (no
    fp32 copy of dz or the weight). Elsewhere (older torch; the CPU interpreter): the Triton
    split-K `mm_accumulate`, which reads and writes dh_rows once per vocabulary chunk.
    """
    if dz.dtype == torch.float32:
        dh_rows.addmm_(dz, w_chunk)
    elif has_out_dtype_mm(dz.device):
        torch.addmm(dh_rows, dz, w_chunk, out_dtype=torch.float32, out=dh_rows)
    else:
        mm_accumulate(dh_rows, dz, w_chunk)


def mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a @ b; out may be fp32 with half a and b (dweight of an fp32 weight under autocast)."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    elif has_out_dtype_mm(a.device):
        torch.mm(a, b, out_dtype=out.dtype, out=out)
    else:
        out.copy_(torch.mm(a, b))


def _backward(hidden, weight, rows, targets, lse, grad, softcap, need_dh, need_dw, dlogits="fused"):
    M = rows.numel()
    V, D = weight.shape
    dh = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_dh else None
    dw = torch.empty_like(weight) if need_dw else None
    if M == 0:
        return (dh.to(hidden.dtype) if need_dh else None), (dw.zero_() if need_dw else None)
    h_rows = hidden.index_select(0, rows)
    dh_rows = torch.zeros(M, D, dtype=torch.float32, device=hidden.device) if need_dh else None
    gh, dw_scale = _grad_rows(h_rows, grad) if need_dw else (None, None)
    chunk = _vocab_chunk(M, V, hidden.element_size())
    buffer = torch.empty(M, dz_row_stride(chunk), dtype=hidden.dtype, device=hidden.device)
    split, mixed = _backward_variant(hidden, weight, need_dh, dlogits)
    w_half = torch.empty(chunk, D, dtype=hidden.dtype, device=hidden.device) if mixed else None
    z = torch.empty(buffer.shape, dtype=torch.float32, device=hidden.device) if split else None
    for v0 in range(0, V, chunk):
        vc = min(chunk, V - v0)
        dz = buffer[:, :vc]
        w_chunk = w_half[:vc].copy_(weight[v0 : v0 + vc]) if mixed else weight[v0 : v0 + vc]
        if split:
            dlogits_cublas(h_rows, w_chunk, targets, lse, dz, v0, softcap, z[:, :vc])
        else:
            _dlogits(h_rows, weight[v0 : v0 + vc], targets, lse, dz, v0, softcap)
        if need_dw:
            mm_into(dw[v0 : v0 + vc], dz.t(), gh)
        if need_dh:
            accumulate_dh(dh_rows, dz, w_chunk)
    if dw_scale is not None:
        dw.mul_(dw_scale)
    if need_dh:
        dh.index_add_(0, rows, dh_rows.mul_(grad[:, None]))
        dh = dh.to(hidden.dtype)
    return dh, dw


def _backward_variant(hidden, weight, need_dh: bool, dlogits: str) -> tuple[bool, bool]:
    """(split, mixed). split: the cuBLAS-logits variant runs (fp32, or half where torch has the
    fp32-output GEMM), with its [M, stride] fp32 logits buffer. mixed: an fp32 weight under autocast
    feeds a cuBLAS GEMM, which needs one dtype, so each chunk is rounded into a [chunk, D] buffer
    (never a [V, D] copy)."""
    split = dlogits == "cublas" and (hidden.dtype == torch.float32 or has_out_dtype_mm(hidden.device))
    return split, weight.dtype != hidden.dtype and (need_dh or split)


def _grad_rows(h_rows: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """g[m] * hidden[rows[m]], the dweight GEMM's operand, and the factor dweight still needs.

    fp16: g ~ 1e-6 (RRHF's 1 / (tokens x queries)) makes g * h subnormal (fp16's smallest normal is
    6.1e-5, so only a few bits survive); g is divided by max|g| (a device scalar: no host sync)
    and dweight multiplied by it afterwards. bf16 and fp32 have fp32's exponent range: no scale.
    """
    if h_rows.dtype != torch.float16:
        return h_rows * grad.to(h_rows.dtype)[:, None], None
    scale = grad.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
    return h_rows * (grad / scale).to(torch.float16)[:, None], scale


# ---------------------------------------------------------------------------------------------
# Public function


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    *,
    softcap: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """log_softmax(hidden[rows] @ weight.T)[m, targets[m]] as fp32 [M].

    hidden [N, D] and weight [V, D] (the lm_head or tied embedding) in fp32, fp16 or bf16; rows [M]
    indexes hidden (repeats allowed: their gradients add up); targets [M] in [0, V) (checked on the
    host for CPU tensors; on CUDA an index out of range gives a NaN log-prob, never a sync). `softcap`
    applies softcap * tanh(logits / softcap) first (Gemma 2). impl: "triton" (fused, never holds
    the [M, V] logits), "torch" (naive reference) or "auto" (the fused kernel on CUDA unless a
    measurement in auto_table.json says the torch path is faster where its logits fit; the torch
    path elsewhere, and after a Triton failure, with one warning: rrhf_fast/kernels/auto.py).
    Under torch.autocast, hidden is cast to the autocast dtype and the logits are computed as a
    Linear would (weight rounded to that dtype); an fp32 weight is rounded tile by tile inside the
    kernels rather than copied, and its gradient is fp32.
    """
    _check_inputs(hidden, weight, rows, targets)
    if softcap is not None and not softcap > 0:
        raise ValueError(f"token_logprobs: softcap must be positive or None, got {softcap}")
    device_type = hidden.device.type
    autocasting = torch.is_autocast_enabled(device_type)
    auto = impl == "auto"
    if auto:  # auto.py: the fused kernel unless measured slower where the logits fit, or it failed
        dtype = torch.get_autocast_dtype(device_type) if autocasting else hidden.dtype
        impl = _auto.choose(hidden.device, weight.shape[1], weight.shape[0], rows.numel(), dtype)
    impl = resolve_impl(impl, hidden.device)
    if autocasting:
        dtype = torch.get_autocast_dtype(device_type)
        hidden = hidden.to(dtype)
        # weight.to(dtype) would be a fresh [V, D] copy at every call, held from forward to backward
        # (autocast caches its casts only inside its own ops): 1 GiB at V = 128256, D = 4096. The
        # fused kernels read the fp32 weight and round each tile as they load it instead.
        if impl == "torch" or weight.dtype != torch.float32:
            weight = weight.to(dtype)
    elif hidden.dtype != weight.dtype:
        raise ValueError(f"token_logprobs: hidden is {hidden.dtype} but weight is {weight.dtype}")
    if impl != "torch" and hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"token_logprobs: triton supports fp32, fp16 and bf16, not {hidden.dtype}")
    (N, _), (V, _) = hidden.shape, weight.shape
    valid = None
    if on_host(rows) and on_host(targets):
        check_indices(rows, targets, N, V)
    else:
        # No device assert (it kills the CUDA context) and no host sync: out-of-range indices are
        # clamped for the loads (the kernels' and the reference's gather) and their log-probs are NaN.
        valid = (rows >= 0) & (rows < N) & (targets >= 0) & (targets < V)
        rows, targets = rows.clamp(0, max(N - 1, 0)), targets.clamp(0, V - 1)
    if impl != "torch":
        try:
            with torch.autocast(device_type, enabled=False), _auto.auto_call() if auto else nullcontext():
                logp, _lse = _ops.token_logprobs_op(
                    hidden if hidden.stride(-1) == 1 else hidden.contiguous(),
                    weight.contiguous(),
                    rows.contiguous(),
                    targets.contiguous(),
                    None if softcap is None else float(softcap),
                )
            return logp if valid is None else logp.where(valid, float("nan"))
        except Exception as exc:
            if not (auto and _auto.is_triton_failure(exc)):
                raise
            _auto.record_failure("token_logprobs", hidden.device, exc, "launch")
            weight = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
    # The reference keeps fp64 for fp64 inputs (tests); the public contract is fp32.
    logp = token_logprobs_torch(hidden, weight, rows, targets, softcap=softcap).float()
    return logp if valid is None else logp.where(valid, float("nan"))


def check_indices(rows: torch.Tensor, targets: torch.Tensor, N: int, V: int) -> None:
    """Host check of rows in [0, N) and targets in [0, V), one sentence per error."""
    for name, t, n, hint in (
        ("targets", targets, V, "; leave masked positions (-100) out of rows and targets instead"),
        ("rows", rows, N, ""),
    ):
        bad = ((t < 0) | (t >= n)).nonzero()
        if bad.numel():
            i = int(bad[0])
            raise ValueError(
                f"token_logprobs: {name} must lie in [0, {n}), but position {i} holds {int(t[i])}{hint}"
            )


def _check_inputs(hidden, weight, rows, targets) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"token_logprobs: need hidden [N, D] and weight [V, D], got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if rows.shape != targets.shape or rows.dim() != 1:
        raise ValueError(
            f"token_logprobs: rows and targets must be [M], got {tuple(rows.shape)}, {tuple(targets.shape)}"
        )
    for name, t in (("rows", rows), ("targets", targets)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"token_logprobs: {name} must be int32 or int64, got {t.dtype}")
    if len({hidden.device, weight.device, rows.device, targets.device}) != 1:
        raise ValueError("token_logprobs: hidden, weight, rows and targets must be on one device")


# The custom ops (ops.py) wrap the launchers above; imported last, as they import this module.
from . import auto as _auto  # noqa: E402
from . import ops as _ops  # noqa: E402
