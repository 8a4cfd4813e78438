"""What `rrhf-fast plan` cannot run on fake CPU tensors, given the memory it takes on a CUDA GPU.

- flash-attn's varlen attention (the `--attn auto|varlen` path on CUDA): an autograd function that
  allocates what flash-attn 2's `mha_varlen_fwd` / `mha_varlen_bwd` allocate (out, the fp32 softmax
  LSE [H, total_q]; in backward dq/dk/dv, the fp32 dq accumulator and softmax_d, padded by 128 rows
  per sequence, and with grouped-query attention dk/dv expanded to every query head before the sum).
- bitsandbytes' 8-bit AdamW: its states, from `Optimizer2State.init_state` (bitsandbytes 0.50): a
  parameter of at least 4096 elements keeps two uint8 states and two fp32 absmax vectors (one value
  per block of 256); a smaller one keeps two fp32 states. The CUDA update is one fused kernel, in
  place. tests/test_plan.py compares the layout with the real optimizer's states on CPU.
- bitsandbytes' 4-bit (NF4, double quantisation) and 8-bit (LLM.int8) weights: stored bytes from
  the documented layout, and the forward/backward dequantise each weight to the compute dtype for
  one matmul (a transient of the weight's full size), as `bnb.matmul_4bit` does.
"""

from __future__ import annotations

import math
from typing import Any

import torch

# ---------------------------------------------------------------------------------------------
# flash-attn varlen


class FlashVarlenMemory(torch.autograd.Function):
    """Same shapes in and out as flash_attn_varlen_func; only the allocations are meaningful (it
    runs on fake tensors, which hold no values)."""

    @staticmethod
    def forward(ctx, q, k, v, num_seqs: int):
        total_q, heads, _ = q.shape
        out = torch.empty_like(q)
        lse = q.new_empty((heads, total_q), dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.num_seqs = num_seqs
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, _out, _lse = ctx.saved_tensors
        total_q, heads, dim = q.shape
        padded = total_q + 128 * ctx.num_seqs
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        softmax_d = q.new_empty((heads, padded), dtype=torch.float32)  # noqa: F841
        dq_accum = q.new_empty((padded, heads, _round_up(dim, 32)), dtype=torch.float32)  # noqa: F841
        if k.shape[1] != heads:  # GQA: gradients per query head, then summed over each group
            dk_expanded = k.new_empty((k.shape[0], heads, dim))
            dv_expanded = v.new_empty((v.shape[0], heads, dim))
            group = heads // k.shape[1]
            dk = dk_expanded.view(k.shape[0], k.shape[1], group, dim).sum(2)
            dv = dv_expanded.view(v.shape[0], v.shape[1], group, dim).sum(2)
        return dq, dk, dv, None


def flash_varlen(q, k, v, cu_q, cu_k, max_q=None, max_k=None, *, scale, window=None, softcap=None):
    """Stands in for attention.varlen_reference while planning (same signature)."""
    return FlashVarlenMemory.apply(q, k, v, cu_q.shape[0] - 1)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


# ---------------------------------------------------------------------------------------------
# bitsandbytes 8-bit optimizer states

MIN_8BIT_SIZE = 4096  # bitsandbytes' default min_8bit_size
STATE_BLOCK = 256  # values per absmax in its blockwise 8-bit states


def adamw8bit_state_shapes(numel: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of each per-parameter state tensor bitsandbytes' AdamW8bit creates."""
    if numel < MIN_8BIT_SIZE:
        return [((numel,), torch.float32)] * 2
    blocks = math.ceil(numel / STATE_BLOCK)
    return [((numel,), torch.uint8)] * 2 + [((blocks,), torch.float32)] * 2


class PlannedAdamW8bit(torch.optim.Optimizer):
    """bitsandbytes' AdamW8bit as it sits in GPU memory: its states, created at the first step, and
    an in-place update without temporaries (the fused CUDA kernel). Plus the two shared 256-entry
    quantisation maps."""

    def __init__(self, params: Any, lr: float = 1e-3, **_ignored: Any):
        super().__init__(params, dict(lr=lr))
        self._qmaps: list[torch.Tensor] = []

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    if not self._qmaps and p.numel() >= MIN_8BIT_SIZE:
                        self._qmaps = [p.new_empty(256, dtype=torch.float32) for _ in range(2)]
                    for i, (shape, dtype) in enumerate(adamw8bit_state_shapes(p.numel())):
                        state[f"s{i}"] = p.new_zeros(shape, dtype=dtype)
                p.add_(p.grad, alpha=-group["lr"])


# ---------------------------------------------------------------------------------------------
# bitsandbytes quantised weights

NF4_BLOCK = 64  # values per absmax of a 4-bit weight
NESTED_BLOCK = 256  # absmax values per second-level absmax with double quantisation


def nf4_bytes(numel: int, double_quant: bool = True) -> int:
    """Bytes bitsandbytes keeps for a 4-bit NF4 weight of `numel` values (Params4bit + QuantState)."""
    packed = math.ceil(numel / 2)
    blocks = math.ceil(numel / NF4_BLOCK)
    if not double_quant:
        return packed + 4 * blocks
    nested = math.ceil(blocks / NESTED_BLOCK)
    return packed + blocks + 4 * nested + 4 * 256 + 4  # uint8 absmax, fp32 absmax2, code, offset


def int8_bytes(out_features: int, in_features: int) -> int:
    """LLM.int8 weight: int8 values and one fp32 scale per output row (Int8Params CB, SCB)."""
    return out_features * in_features + 4 * out_features


class DequantizedLinear(torch.autograd.Function):
    """A frozen quantised linear: dequantise (a transient copy of the weight in the compute dtype),
    matmul; the backward dequantises again for the input's gradient (bnb's MatMul4Bit)."""

    @staticmethod
    def forward(ctx, x, weight):
        w = weight.new_empty(weight.shape, dtype=x.dtype)
        ctx.save_for_backward(x, weight)
        return x @ w.t()

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        w = weight.new_empty(weight.shape, dtype=grad.dtype)
        return grad @ w, None


def quantized_linear_forward(module: torch.nn.Linear):
    def forward(x: torch.Tensor) -> torch.Tensor:
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        out = DequantizedLinear.apply(x.to(dtype), module.weight)
        return out if module.bias is None else out + module.bias.to(out.dtype)

    return forward
