"""The fused kernels as torch custom ops (`torch.ops.rrhf_fast.*`).

Registered with `torch.library.custom_op`, each kernel is one opaque op to autograd (forward and
backward are each one op), runs under `FakeTensorMode` and the meta device (no memory, no compute:
`rrhf-fast plan` simulates a training step on fake tensors with them), and stays inside one
`torch.compile` graph instead of breaking it. No op reads a tensor value on the host: the launch
sizes come from shapes and plain-number arguments (rrhf_loss's `k_max`).

The fake kernels allocate exactly what the launchers in token_logprobs.py and rrhf_loss.py
allocate, in the same order, forward and backward (outputs, the per-row LSE and its [S, M] split
partials, the padded [M, stride] dlogits buffer, g * hidden[rows], the fp32 accumulators, the
autocast weight-chunk and cuBLAS-logits buffers, the offsets): a memory plan of fake tensors then
sees the kernels' real workspace. They share the launchers' sizing rules (`_forward_grid`,
`_vocab_chunk`, `dz_row_stride`, `_backward_variant`) and their pure-torch helpers; only the Triton
launches are left out. tests/test_ops.py checks the two against each other; change them together.
"""

from __future__ import annotations

import importlib

import torch

# The package attributes `rrhf_loss` and `token_logprobs` are the functions (rrhf_fast/kernels/__init__.py):
# the launcher modules come from the import system.
_rl = importlib.import_module(f"{__package__}.rrhf_loss")
_auto = importlib.import_module(f"{__package__}.auto")
_tl = importlib.import_module(f"{__package__}.token_logprobs")

F32 = torch.float32


# ---------------------------------------------------------------------------------------------
# token_logprobs: forward -> (logp [M] fp32, lse [M] fp32); backward -> (dhidden, dweight)


@torch.library.custom_op("rrhf_fast::token_logprobs", mutates_args=())
def token_logprobs_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, lse) of the fused forward; lse is what the backward needs (not differentiable)."""
    return _tl._forward(hidden, weight, rows, targets, softcap)


@token_logprobs_op.register_fake
def token_logprobs_fake(hidden, weight, rows, targets, softcap):
    M = rows.shape[0]
    V, D = weight.shape
    logp = hidden.new_empty(M, dtype=F32)
    lse = hidden.new_empty(M, dtype=F32)
    if M == 0:
        return logp, lse
    splits, _group = _tl._forward_grid(hidden, M, V, D)  # S: 2 on the CPU, forward_grid's on CUDA
    lse_part = hidden.new_empty((splits, M), dtype=F32)
    tgt_logit = hidden.new_empty(M, dtype=F32)
    torch.logsumexp(lse_part, dim=0, out=lse)
    torch.sub(tgt_logit, lse, out=logp)
    return logp, lse


@torch.library.custom_op("rrhf_fast::token_logprobs_backward", mutates_args=())
def token_logprobs_backward_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    softcap: float | None,
    need_dh: bool,
    need_dw: bool,
    dlogits: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dhidden, dweight); an empty tensor stands for a gradient that is not needed. `dlogits` is
    how the logits are recomputed, "fused" or "cublas" (token_logprobs.DLOGITS at forward time)."""
    dh, dw = _tl._backward(hidden, weight, rows, targets, lse, grad, softcap, need_dh, need_dw, dlogits)
    return _or_empty(dh, hidden), _or_empty(dw, weight)


@token_logprobs_backward_op.register_fake
def token_logprobs_backward_fake(hidden, weight, rows, targets, lse, grad, softcap, need_dh, need_dw, how):
    M = rows.shape[0]
    V, D = weight.shape
    dh = hidden.new_zeros(hidden.shape, dtype=F32) if need_dh else None
    dw = torch.empty_like(weight) if need_dw else None  # the weight's dtype: fp32 under autocast
    if M == 0:
        return _or_empty(dh.to(hidden.dtype) if need_dh else None, hidden), _or_empty(dw, weight)
    h_rows = hidden.index_select(0, rows)
    dh_rows = hidden.new_zeros((M, D), dtype=F32) if need_dh else None
    # g * hidden[rows], the dweight GEMM's operand (fp16: g scaled by max|g|, a device scalar).
    gh, _scale = _tl._grad_rows(h_rows, grad) if need_dw else (None, None)
    chunk = _tl._vocab_chunk(M, V, hidden.element_size())
    buffer = hidden.new_empty((M, _tl.dz_row_stride(chunk)))  # dlogits, rows padded to 64 elements
    split, mixed = _tl._backward_variant(hidden, weight, need_dh, how)
    w_half = hidden.new_empty((chunk, D)) if mixed else None  # noqa: F841 (alive to the end, as there)
    z = hidden.new_empty(buffer.shape, dtype=F32) if split else None  # noqa: F841 (the cuBLAS logits)
    for v0 in range(0, V, chunk):
        vc = min(chunk, V - v0)
        # The dlogits kernels and accumulate_dh write into the buffers above (nothing new); the
        # dweight GEMM makes a [vc, D] product where no fp32-output GEMM takes half operands.
        if need_dw:
            _tl.mm_into(dw[v0 : v0 + vc], buffer[:, :vc].t(), gh)
    if need_dh:
        dh.index_add_(0, rows, dh_rows)
        dh = dh.to(hidden.dtype)
    return _or_empty(dh, hidden), _or_empty(dw, weight)


def _or_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    # A custom op returns tensors; None (gradient not needed) travels as an empty one.
    return like.new_empty(0) if t is None else t


def _tlp_setup_context(ctx, inputs, output):
    hidden, weight, rows, targets, softcap = inputs
    _logp, lse = output
    ctx.save_for_backward(hidden, weight, rows, targets, lse)
    ctx.softcap, ctx.dlogits = softcap, _tl.DLOGITS
    ctx.auto = _auto.AUTO_CALL.get()  # impl="auto": a failing backward falls back (auto.py)
    ctx.mark_non_differentiable(lse)


def _tlp_backward(ctx, grad, _grad_lse):
    hidden, weight, rows, targets, lse = ctx.saved_tensors
    need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad = grad.float().contiguous()
    try:
        dh, dw = torch.ops.rrhf_fast.token_logprobs_backward(
            hidden, weight, rows, targets, lse, grad, ctx.softcap, need_dh, need_dw, ctx.dlogits
        )
    except Exception as exc:
        if not (getattr(ctx, "auto", False) and _auto.is_triton_failure(exc)):
            raise
        _auto.record_failure("token_logprobs", hidden.device, exc, "backward launch")
        dh, dw = _auto.torch_backward(hidden, weight, rows, targets, grad, ctx.softcap, need_dh, need_dw)
    return (dh if need_dh else None), (dw if need_dw else None), None, None, None


token_logprobs_op.register_autograd(_tlp_backward, setup_context=_tlp_setup_context)


# ---------------------------------------------------------------------------------------------
# rrhf_loss: forward -> (loss, rank_loss, sft_loss, p, coef_rank, coef_sft); backward -> dlogp [M]


@torch.library.custom_op("rrhf_fast::rrhf_loss", mutates_args=())
def rrhf_loss_op(
    logp: torch.Tensor,
    token_response: torch.Tensor,
    response_query: torch.Tensor,
    scores: torch.Tensor,
    prompt_len: torch.Tensor | None,
    num_queries: int,
    k_max: int,
    length_penalty: float,
    rank_weight: float,
    sft_weight: float,
    official: bool,
    sft_sum: bool,
    norm: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, rank_loss, sft_loss, p [R], coef_rank [R], coef_sft [R]); the coefficients are
    dL/dS per response, what the backward gathers onto the tokens. `k_max` (the most responses of
    one query) sizes the kernel's block: an argument, so that nothing is read off the device."""
    options = (length_penalty, rank_weight, sft_weight, official, sft_sum, norm)
    return _rl._forward(logp, token_response, response_query, scores, prompt_len, num_queries, k_max, options)


@rrhf_loss_op.register_fake
def rrhf_loss_fake(logp, token_response, response_query, scores, prompt_len, num_queries, k_max, *options):
    _lp, rank_weight, sft_weight, _official, _sft_sum, norm = options
    R, G = response_query.shape[0], num_queries
    new = logp.new_empty
    p, coef_rank, coef_sft = (new(R, dtype=F32) for _ in range(3))
    rank_q, sft_q = new(G, dtype=F32), new(G, dtype=F32)
    # The kernel's offsets, [G + 1] and [R + 1] int32 by searchsorted, alive during its launch.
    _rl._starts(response_query, G), _rl._starts(token_response, R)
    rank_loss, sft_loss = rank_q.sum() / norm, sft_q.sum() / norm
    loss = rank_weight * rank_loss + sft_weight * sft_loss
    return loss, rank_loss, sft_loss, p, coef_rank, coef_sft


@torch.library.custom_op("rrhf_fast::rrhf_loss_backward", mutates_args=())
def rrhf_loss_backward_op(token_response: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """dlogp [M] fp32: each token gets its response's coefficient."""
    return _rl._backward(token_response, coef)


@rrhf_loss_backward_op.register_fake
def rrhf_loss_backward_fake(token_response, coef):
    return coef.new_empty(token_response.shape[0], dtype=F32)


def _rrhf_setup_context(ctx, inputs, output):
    token_response, rank_weight, sft_weight, norm = inputs[1], inputs[8], inputs[9], inputs[12]
    _loss, _rank, _sft, p, coef_rank, coef_sft = output
    ctx.save_for_backward(token_response, coef_rank, coef_sft)
    ctx.weights, ctx.norm = (rank_weight, sft_weight), norm
    ctx.auto = _auto.AUTO_CALL.get()  # impl="auto": a failing backward falls back (auto.py)
    ctx.mark_non_differentiable(p, coef_rank, coef_sft)


def _rrhf_backward(ctx, g_loss, g_rank, g_sft, *_unused):
    token_response, coef_rank, coef_sft = ctx.saved_tensors
    rank_weight, sft_weight = ctx.weights
    # d/dS_i of every differentiable output, weighted by its upstream gradient.
    coef = (g_loss * rank_weight + g_rank) * coef_rank + (g_loss * sft_weight + g_sft) * coef_sft
    coef = (coef / ctx.norm).float().contiguous()
    try:
        grad = torch.ops.rrhf_fast.rrhf_loss_backward(token_response, coef)
    except Exception as exc:
        if not (getattr(ctx, "auto", False) and _auto.is_triton_failure(exc)):
            raise
        _auto.record_failure("rrhf_loss", coef.device, exc, "backward launch")
        grad = coef[token_response.long()]  # what the kernel computes: each token its response's coef
    return (grad,) + (None,) * 12


rrhf_loss_op.register_autograd(_rrhf_backward, setup_context=_rrhf_setup_context)


# ---------------------------------------------------------------------------------------------
# Each op's body and fake body as plain functions, for a tracker that must see their buffers
# (rrhf_fast.planning.memtrack runs them with itself on top; a dispatch mode sees no further into
# a custom op than its outputs).

BODIES = {
    torch.ops.rrhf_fast.token_logprobs.default: (token_logprobs_op._init_fn, token_logprobs_fake),
    torch.ops.rrhf_fast.token_logprobs_backward.default: (
        token_logprobs_backward_op._init_fn,
        token_logprobs_backward_fake,
    ),
    torch.ops.rrhf_fast.rrhf_loss.default: (rrhf_loss_op._init_fn, rrhf_loss_fake),
    torch.ops.rrhf_fast.rrhf_loss_backward.default: (rrhf_loss_backward_op._init_fn, rrhf_loss_backward_fake),
}
