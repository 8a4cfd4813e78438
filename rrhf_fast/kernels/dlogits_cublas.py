"""The backward's dlogits tile math, and the cuBLAS-logits variant of the dlogits pass.

`_dz_from_logits` is shared by the fused kernel (token_logprobs._dlogits_kernel, which computes the
logits tile with tl.dot first) and by the split variant here: cuBLAS computes the chunk's logits
[M, chunk] in fp32 (`mm(..., out_dtype=fp32)`), then one elementwise Triton kernel turns them into
onehot - softmax. The split trades a write and a read of M x chunk x 4 bytes (plus the usual write
of the bf16 buffer) for cuBLAS's GEMM rate on the recompute; benchmarks/README.md has the
arithmetic and run_gpu.sh measures both ("triton" and "triton/cublas-dlogits").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import interpreting


@triton.jit
def _tanh(x):
    # From exp rather than libdevice: portable across Triton 3.6-3.9 and the CPU interpreter.
    # exp overflows to inf for x > 44, which gives exactly 1.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _dz_from_logits(z, offs_v, v_mask, tgt, lse, softcap, SOFTCAP: tl.constexpr):
    """(onehot(tgt) - exp(z' - lse)) * dz'/dz for z' = softcap * tanh(z / softcap) (or z); 0 off v_mask.

    Without the upstream gradient g: its product with small probabilities underflows in fp16
    (g ~ 1e-6 times p ~ 1e-4 is below fp16's smallest subnormal, 6e-8); the launcher folds g into
    the fp32 dhidden rows and the dweight operand instead."""
    if SOFTCAP:
        z = softcap * _tanh(z / softcap)
    dz = tl.where(offs_v[None, :] == tgt[:, None], 1.0, 0.0) - tl.exp(z - lse[:, None])
    if SOFTCAP:
        c = z / softcap
        dz = dz * (1.0 - c * c)
    # Columns past VC are the row padding: zeros there let the store mask be the padded stride (a
    # multiple of 16 columns), so the stores stay 16-byte vectors in a ragged last chunk.
    return tl.where(v_mask[None, :], dz, 0.0)


@triton.jit
def _epilogue_kernel(
    Z, TGT, LSE, DZ, M, VC, v_offset, stride_z, stride_dz, softcap,
    SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    m_mask = offs_m < M
    v_mask = offs_v < VC
    rows = offs_m[:, None].to(tl.int64)
    z = tl.load(Z + rows * stride_z + offs_v[None, :], mask=m_mask[:, None] & v_mask[None, :], other=0.0)
    lse = tl.load(LSE + offs_m, mask=m_mask, other=0.0)
    tgt = tl.load(TGT + offs_m, mask=m_mask, other=-1).to(tl.int32) - v_offset
    dz = _dz_from_logits(z, offs_v, v_mask, tgt, lse, softcap, SOFTCAP)
    tl.store(DZ + rows * stride_dz + offs_v[None, :], dz.to(DZ.dtype.element_ty),
             mask=m_mask[:, None] & (offs_v < stride_dz)[None, :])  # fmt: skip


def dlogits_cublas(h_rows, w_chunk, targets, lse, dz, v0, softcap, z) -> None:
    """dz[:, :vc] = onehot - softmax of the chunk's logits, which cuBLAS writes into z (fp32 [M, >= vc]).

    w_chunk has the dtype of h_rows (the caller rounds an fp32 weight under autocast). Half operands
    need torch's fp32-output GEMM (CUDA, torch >= 2.8): logits rounded to bf16 before the softmax
    would not be the exact computation the fused kernel does. fp32 operands: a plain mm.
    """
    M, vc = dz.shape
    if h_rows.dtype == torch.float32:
        torch.mm(h_rows, w_chunk.t(), out=z)
    else:
        torch.mm(h_rows, w_chunk.t(), out_dtype=torch.float32, out=z)
    block_m, block_v = (16, 128) if interpreting() else (32, 256)
    grid = (triton.cdiv(M, block_m), triton.cdiv(vc, block_v))
    _epilogue_kernel[grid](
        z, targets, lse, dz, M, vc, v0, z.stride(0), dz.stride(0), softcap or 0.0,
        SOFTCAP=softcap is not None, BLOCK_M=block_m, BLOCK_V=block_v, num_warps=8,
    )  # fmt: skip
