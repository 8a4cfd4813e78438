"""rrhf_loss: RRHF rank + SFT loss over all queries of a packed batch (docs/DESIGN.md §4, §6).

One program per query computes the per-response sums S_i and lengths n_i, the scores
p_i = S_i / denom_i ** length_penalty, the pairwise hinge over ordered pairs with r_i < r_j, the SFT
term of the best-scored response, and dL/dS_i for the rank and SFT parts. The backward is one
gather: dlogp[m] = dL/dS[token_response[m]].

The Triton path relies on the packed order that `rrhf_fast.packing.pack` produces: the tokens of a
response are contiguous, responses are numbered in token order, and the responses of a query are
contiguous (`token_response` and `response_query` non-decreasing). The launcher checks this on the
device without a host sync; the torch reference accepts any order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .constants import MODES, SFT_REDUCTIONS
from .reference import RRHFOutput, rrhf_loss_torch
from .utils import next_power_of_2, resolve_impl


@triton.jit
def _rrhf_fwd_kernel(
    LOGP, TOKEN_RESPONSE, RESP_START, TOK_START, SCORES, PROMPT_LEN,
    P_OUT, COEF_RANK, COEF_SFT, RANK_Q, SFT_Q, length_penalty,
    OFFICIAL: tl.constexpr, SFT_SUM: tl.constexpr, LP_ONE: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    q = tl.program_id(0)
    r0 = tl.load(RESP_START + q)
    k = tl.load(RESP_START + q + 1) - r0
    offs_k = tl.arange(0, BLOCK_K)
    valid = offs_k < k
    t_lo = tl.load(TOK_START + r0 + offs_k, mask=valid, other=0)
    t_hi = tl.load(TOK_START + r0 + offs_k + 1, mask=valid, other=0)
    n = (t_hi - t_lo).to(tl.float32)

    # Per-response sums: stream the query's tokens, one-hot them onto the k responses.
    sums = tl.zeros((BLOCK_K,), dtype=tl.float32)
    q_lo = tl.load(TOK_START + r0)
    q_hi = tl.load(TOK_START + r0 + k)
    for t0 in range(q_lo, q_hi, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < q_hi
        lp = tl.load(LOGP + offs_t, mask=t_mask, other=0.0)
        resp = tl.load(TOKEN_RESPONSE + offs_t, mask=t_mask, other=-1) - r0
        sums += tl.sum(tl.where(resp[:, None] == offs_k[None, :], lp[:, None], 0.0), axis=0)

    if OFFICIAL:
        # The authors' train.py divides by the padded label length P + max_i n_i.
        longest = tl.max(tl.where(valid, n, 0.0), axis=0)
        denom = tl.load(PROMPT_LEN + q).to(tl.float32) + longest + tl.zeros((BLOCK_K,), dtype=tl.float32)
    else:
        denom = tl.where(valid, n, 1.0)
    if LP_ONE:
        scale = 1.0 / denom
    else:
        scale = tl.exp2(-length_penalty * tl.log2(denom))  # denom ** -length_penalty, denom >= 1
    p = sums * scale

    # Hinge over ordered pairs (i, j) with r_i < r_j; ties and padding lanes add nothing.
    r = tl.load(SCORES + r0 + offs_k, mask=valid, other=0.0)
    pair = (r[:, None] < r[None, :]) & valid[:, None] & valid[None, :]
    diff = p[:, None] - p[None, :]
    active = pair & (diff > 0)
    rank = tl.sum(tl.sum(tl.where(active, diff, 0.0), axis=1), axis=0)
    act = active.to(tl.float32)
    dp = tl.sum(act, axis=1) - tl.sum(act, axis=0)

    # Best-scored response, the first one on ties.
    r_top = tl.max(tl.where(valid, r, float("-inf")), axis=0)
    best = tl.min(tl.where(valid & (r == r_top), offs_k, BLOCK_K), axis=0)
    is_best = offs_k == best
    if SFT_SUM:
        sft_scale = tl.full((BLOCK_K,), 1.0, dtype=tl.float32)
    else:
        sft_scale = 1.0 / denom
    sft = -tl.sum(tl.where(is_best, sums * sft_scale, 0.0), axis=0)

    tl.store(P_OUT + r0 + offs_k, p, mask=valid)
    tl.store(COEF_RANK + r0 + offs_k, dp * scale, mask=valid)
    tl.store(COEF_SFT + r0 + offs_k, tl.where(is_best, -sft_scale, 0.0), mask=valid)
    tl.store(RANK_Q + q, rank)
    tl.store(SFT_Q + q, sft)


@triton.jit
def _rrhf_bwd_kernel(TOKEN_RESPONSE, COEF, GRAD_LOGP, M, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    resp = tl.load(TOKEN_RESPONSE + offs, mask=mask, other=0)
    tl.store(GRAD_LOGP + offs, tl.load(COEF + resp, mask=mask, other=0.0), mask=mask)


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=counts.device)
    out[1:] = counts.cumsum(0)
    return out


def _forward(logp, token_response, response_query, scores, prompt_len, num_queries, options):
    length_penalty, rank_weight, sft_weight, official, sft_sum, norm = options
    R, G = response_query.numel(), num_queries
    tok_counts = torch.bincount(token_response, minlength=R)
    resp_counts = torch.bincount(response_query, minlength=G)
    _check_layout(token_response, response_query, tok_counts, resp_counts, R, G)
    f32 = dict(dtype=torch.float32, device=logp.device)
    p, coef_rank, coef_sft = (torch.empty(R, **f32) for _ in range(3))
    rank_q, sft_q = torch.empty(G, **f32), torch.empty(G, **f32)
    block_k = max(2, next_power_of_2(int(resp_counts.max())))
    _rrhf_fwd_kernel[(G,)](
        logp, token_response, _offsets(resp_counts), _offsets(tok_counts), scores,
        prompt_len if official else scores, p, coef_rank, coef_sft, rank_q, sft_q, float(length_penalty),
        OFFICIAL=official, SFT_SUM=sft_sum, LP_ONE=length_penalty == 1, BLOCK_K=block_k, BLOCK_T=64,
    )  # fmt: skip
    rank_loss, sft_loss = rank_q.sum() / norm, sft_q.sum() / norm
    loss = rank_weight * rank_loss + sft_weight * sft_loss
    return loss, rank_loss, sft_loss, p, coef_rank, coef_sft


def _backward(token_response, coef):
    """dlogp[m] = coef[token_response[m]] (fp32)."""
    M = token_response.numel()
    grad = torch.empty(M, dtype=torch.float32, device=coef.device)
    if M:
        _rrhf_bwd_kernel[(triton.cdiv(M, 1024),)](token_response, coef, grad, M, BLOCK=1024)
    return grad


def _check_layout(token_response, response_query, tok_counts, resp_counts, R, G) -> None:
    """Device-side checks of the packed order (no host sync)."""
    for name, t in (("token_response", token_response), ("response_query", response_query)):
        if t.numel() > 1:
            torch._assert_async((t[1:] >= t[:-1]).all(), f"rrhf_loss(triton): {name} must be non-decreasing")
    torch._assert_async((tok_counts[:R] > 0).all(), "rrhf_loss: every response needs at least one token")
    torch._assert_async((resp_counts[:G] > 0).all(), "rrhf_loss: every query needs at least one response")
    if response_query.numel():
        torch._assert_async(response_query.max() < G, "rrhf_loss: response_query >= number of queries")
    if token_response.numel():
        torch._assert_async(token_response.max() < R, "rrhf_loss: token_response >= number of responses")


def rrhf_loss(
    logp: torch.Tensor,
    token_response: torch.Tensor,
    response_query: torch.Tensor,
    scores: torch.Tensor,
    *,
    prompt_len: torch.Tensor | None = None,
    length_penalty: float = 1.0,
    rank_weight: float = 1.0,
    sft_weight: float = 1.0,
    mode: str = "paper",
    sft_reduction: str = "mean",
    normalizer: float | torch.Tensor | None = None,
    impl: str = "auto",
) -> RRHFOutput:
    """RRHF loss of a packed batch: `rank_weight * rank + sft_weight * sft`, averaged over queries.

    logp [M]: token log-probs; token_response [M]: response index of each token; response_query [R]:
    query index of each response; scores [R]: rewards; prompt_len [G]: prompt lengths (needed for
    mode="official", which also fixes the number of queries G). With `normalizer` (e.g. the global
    number of queries under gradient accumulation or data parallel) the losses are sums divided by
    it instead of means. Returns RRHFOutput(loss, rank_loss, sft_loss, response_scores [R] detached).
    """
    if mode not in MODES:
        raise ValueError(f"rrhf_loss: mode must be one of {MODES}, got {mode!r}")
    if sft_reduction not in SFT_REDUCTIONS:
        raise ValueError(f"rrhf_loss: sft_reduction must be one of {SFT_REDUCTIONS}, got {sft_reduction!r}")
    if mode == "official" and prompt_len is None:
        raise ValueError("rrhf_loss: mode='official' needs prompt_len (the per-query prompt lengths)")
    if logp.shape != token_response.shape or response_query.shape != scores.shape:
        raise ValueError(
            f"rrhf_loss: logp {tuple(logp.shape)} must match token_response {tuple(token_response.shape)} "
            f"and response_query {tuple(response_query.shape)} must match scores {tuple(scores.shape)}"
        )
    if resolve_impl(impl, logp.device) == "torch":
        return rrhf_loss_torch(
            logp, token_response, response_query, scores, prompt_len, length_penalty,
            rank_weight, sft_weight, mode, sft_reduction, normalizer,
        )  # fmt: skip
    num_queries = prompt_len.numel() if prompt_len is not None else int(response_query.max()) + 1
    norm = num_queries if normalizer is None else normalizer
    # A tensor normalizer (a count summed over ranks) divides outside the op, whose arguments are
    # plain numbers: the losses are linear in 1 / normalizer.
    divide = isinstance(norm, torch.Tensor)
    loss, rank_loss, sft_loss, p, _, _ = _ops.rrhf_loss_op(
        logp.float().contiguous(),
        token_response.contiguous(),
        response_query.contiguous(),
        scores.float().contiguous(),
        None if prompt_len is None else prompt_len.contiguous(),
        int(num_queries),
        float(length_penalty),
        float(rank_weight),
        float(sft_weight),
        mode == "official",
        sft_reduction == "sum",
        1.0 if divide else float(norm),
    )
    if divide:
        loss, rank_loss, sft_loss = loss / norm, rank_loss / norm, sft_loss / norm
    return RRHFOutput(loss, rank_loss, sft_loss, p)


# The custom ops (ops.py) wrap the launchers above; imported last, as they import this module.
from . import ops as _ops  # noqa: E402
