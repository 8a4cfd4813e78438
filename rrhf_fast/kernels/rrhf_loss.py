"""rrhf_loss: RRHF rank + SFT loss over all queries of a packed batch (docs/DESIGN.md §4, §6).

One program per query computes the per-response sums S_i and lengths n_i, the scores
p_i = S_i / denom_i ** length_penalty, the pairwise hinge over ordered pairs with r_i < r_j, the SFT
term of the best-scored response, and dL/dS_i for the rank and SFT parts. The backward is one
gather: dlogp[m] = dL/dS[token_response[m]].

The Triton path relies on the packed order that `rrhf_fast.data.packing.pack` produces: the tokens
of a response are contiguous, responses are numbered in token order, and the responses of a query
are contiguous (`token_response` and `response_query` non-decreasing). It is checked on the host
where the indices are (one sentence per error); on CUDA the kernel checks each query's layout
itself and answers NaN, with no host sync and no device assert (which would kill the CUDA
context). The torch reference accepts any order.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from . import auto as _auto
from .constants import MODES, SFT_REDUCTIONS
from .reference import RRHFOutput, rrhf_loss_torch
from .utils import next_power_of_2, on_host, resolve_impl


@triton.jit
def _rrhf_fwd_kernel(
    LOGP, TOKEN_RESPONSE, RESPONSE_QUERY, RESP_START, TOK_START, SCORES, PROMPT_LEN,
    P_OUT, COEF_RANK, COEF_SFT, RANK_Q, SFT_Q, M, R, length_penalty,
    OFFICIAL: tl.constexpr, SFT_SUM: tl.constexpr, LP_ONE: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    q = tl.program_id(0)
    not_last = q < tl.num_programs(0) - 1
    r0 = tl.load(RESP_START + q)
    k = tl.load(RESP_START + q + 1) - r0
    offs_k = tl.arange(0, BLOCK_K)
    valid = offs_k < k
    q_lo = tl.load(TOK_START + r0)
    q_hi = tl.load(TOK_START + r0 + k)
    # The layout checks, on the device without a host sync or an assert: a query whose responses or
    # tokens are not where the packed order puts them gets NaN losses. Together, the first/last
    # program's bounds and "every response / token in my range is mine" make the ranges a partition.
    resp_q = tl.load(RESPONSE_QUERY + r0 + offs_k, mask=valid, other=0)
    ok = (k >= 1) & (k <= BLOCK_K) & (tl.sum((valid & (resp_q != q)).to(tl.int32), axis=0) == 0)
    ok = ok & ((q > 0) | ((r0 == 0) & (q_lo == 0))) & (not_last | ((r0 + k == R) & (q_hi == M)))

    # Per-response sums and lengths: stream the query's tokens, one-hot them onto the k responses.
    sums = tl.zeros((BLOCK_K,), dtype=tl.float32)
    n = tl.zeros((BLOCK_K,), dtype=tl.float32)
    stray = tl.zeros((BLOCK_T,), dtype=tl.int32)
    for t0 in range(q_lo, q_hi, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < q_hi
        lp = tl.load(LOGP + offs_t, mask=t_mask, other=0.0)
        resp = tl.load(TOKEN_RESPONSE + offs_t, mask=t_mask, other=r0).to(tl.int32) - r0
        stray += (t_mask & ((resp < 0) | (resp >= k))).to(tl.int32)
        onehot = (resp[:, None] == offs_k[None, :]) & t_mask[:, None]
        sums += tl.sum(tl.where(onehot, lp[:, None], 0.0), axis=0)
        n += tl.sum(onehot.to(tl.float32), axis=0)
    ok = ok & (tl.sum(stray, axis=0) == 0) & (tl.sum((valid & (n == 0)).to(tl.int32), axis=0) == 0)

    if OFFICIAL:
        # The authors' train.py divides by the padded label length P + max_i n_i.
        longest = tl.max(tl.where(valid, n, 0.0), axis=0)
        denom = tl.load(PROMPT_LEN + q).to(tl.float32) + longest + tl.zeros((BLOCK_K,), dtype=tl.float32)
    else:
        denom = tl.where(valid, tl.maximum(n, 1.0), 1.0)
    if LP_ONE:
        scale = 1.0 / denom
    else:
        scale = tl.exp2(-length_penalty * tl.log2(denom))  # denom ** -length_penalty, denom >= 1
    p = sums * scale

    # Hinge over ordered pairs (i, j) with r_i < r_j; ties and padding lanes add nothing.
    r = tl.load(SCORES + r0 + offs_k, mask=valid, other=0.0)
    non_finite = (r != r) | (tl.abs(r) == float("inf"))
    ok = ok & (tl.sum((valid & non_finite).to(tl.int32), axis=0) == 0)
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

    bad = tl.where(ok, 0.0, float("nan"))
    tl.store(P_OUT + r0 + offs_k, p + bad, mask=valid)
    tl.store(COEF_RANK + r0 + offs_k, dp * scale + bad, mask=valid)
    tl.store(COEF_SFT + r0 + offs_k, tl.where(is_best, -sft_scale, 0.0) + bad, mask=valid)
    tl.store(RANK_Q + q, rank + bad)
    tl.store(SFT_Q + q, sft + bad)


@triton.jit
def _rrhf_bwd_kernel(TOKEN_RESPONSE, COEF, GRAD_LOGP, M, R, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    resp = tl.load(TOKEN_RESPONSE + offs, mask=mask, other=0)
    inside = (resp >= 0) & (resp < R)  # outside: the forward's loss is NaN already; never read there
    coef = tl.load(COEF + resp, mask=mask & inside, other=float("nan"))
    tl.store(GRAD_LOGP + offs, coef, mask=mask)


def _starts(index: torch.Tensor, count: int) -> torch.Tensor:
    """[count + 1] int32: where each id 0..count starts in a sorted `index`, without a host sync
    (bincount sizes its output from the data, so it syncs on CUDA)."""
    ids = torch.arange(count + 1, dtype=index.dtype, device=index.device)
    return torch.searchsorted(index, ids, out_int32=True)


def _forward(logp, token_response, response_query, scores, prompt_len, num_queries, k_max, options):
    length_penalty, rank_weight, sft_weight, official, sft_sum, norm = options
    R, G, M = response_query.numel(), num_queries, logp.numel()
    f32 = dict(dtype=torch.float32, device=logp.device)
    p, coef_rank, coef_sft = (torch.empty(R, **f32) for _ in range(3))
    rank_q, sft_q = torch.empty(G, **f32), torch.empty(G, **f32)
    _rrhf_fwd_kernel[(G,)](
        logp, token_response, response_query, _starts(response_query, G), _starts(token_response, R),
        scores, prompt_len if official else scores, p, coef_rank, coef_sft, rank_q, sft_q, M, R,
        float(length_penalty), OFFICIAL=official, SFT_SUM=sft_sum, LP_ONE=length_penalty == 1,
        BLOCK_K=max(2, next_power_of_2(k_max)), BLOCK_T=64,
    )  # fmt: skip
    rank_loss, sft_loss = rank_q.sum() / norm, sft_q.sum() / norm
    loss = rank_weight * rank_loss + sft_weight * sft_loss
    return loss, rank_loss, sft_loss, p, coef_rank, coef_sft


def _backward(token_response, coef):
    """dlogp[m] = coef[token_response[m]] (fp32); NaN for a response id outside [0, R)."""
    M = token_response.numel()
    grad = torch.empty(M, dtype=torch.float32, device=coef.device)
    if M:
        _rrhf_bwd_kernel[(triton.cdiv(M, 1024),)](token_response, coef, grad, M, coef.numel(), BLOCK=1024)
    return grad


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
    k_max: int | None = None,
    impl: str = "auto",
) -> RRHFOutput:
    """RRHF loss of a packed batch: `rank_weight * rank + sft_weight * sft`, averaged over queries.

    logp [M]: token log-probs; token_response [M]: response index of each token; response_query [R]:
    query index of each response; scores [R]: rewards; prompt_len [G]: prompt lengths (needed for
    mode="official", which also fixes the number of queries G). With `normalizer` (e.g. the global
    number of queries under gradient accumulation or data parallel) the losses are sums divided by
    it instead of means. `k_max`, the most responses of one query (`PackedBatch.max_responses`),
    spares the Triton path its one host sync (reading it off device tensors). Returns
    RRHFOutput(loss, rank_loss, sft_loss, response_scores [R] detached).

    Index tensors and scores on the host are checked there, each error one sentence. On CUDA the
    Triton path checks on the device instead, without a sync: a query whose layout is not the
    packed order, or whose scores are not finite, makes the losses NaN.
    """
    _check_options(logp, token_response, response_query, scores, prompt_len, mode, sft_reduction)
    auto = impl == "auto"
    if auto:  # the Triton path on CUDA unless it failed there (auto.py)
        usable = logp.device.type in _auto.DEVICES and not _auto.failed("rrhf_loss", logp.device)
        impl = "triton" if usable else "torch"
    impl = resolve_impl(impl, logp.device)
    if on_host(scores):
        check_scores(scores)
    reference = lambda: rrhf_loss_torch(  # noqa: E731
        logp, token_response, response_query, scores, prompt_len, length_penalty,
        rank_weight, sft_weight, mode, sft_reduction, normalizer,
    )  # fmt: skip
    if impl == "torch":
        return reference()
    num_queries = prompt_len.numel() if prompt_len is not None else int(response_query.max()) + 1
    if on_host(token_response) and on_host(response_query):
        check_packed_order(token_response, response_query, num_queries)
    if k_max is None:
        k_max = int((_starts(response_query, num_queries).diff()).max()) if num_queries else 1
    norm = num_queries if normalizer is None else normalizer
    # A tensor normalizer (a count summed over ranks) divides outside the op, whose arguments are
    # plain numbers: the losses are linear in 1 / normalizer.
    divide = isinstance(norm, torch.Tensor)
    options = (length_penalty, rank_weight, sft_weight, mode, sft_reduction, 1.0 if divide else norm)
    try:
        with _auto.auto_call() if auto else nullcontext():
            out = _fused(
                logp, token_response, response_query, scores, prompt_len, num_queries, k_max, *options
            )
    except Exception as exc:
        if not (auto and _auto.is_triton_failure(exc)):
            raise
        _auto.record_failure("rrhf_loss", logp.device, exc, "launch")
        return reference()
    loss, rank_loss, sft_loss, p = out
    if divide:
        loss, rank_loss, sft_loss = loss / norm, rank_loss / norm, sft_loss / norm
    return RRHFOutput(loss, rank_loss, sft_loss, p)


def _fused(logp, token_response, response_query, scores, prompt_len, num_queries, k_max, length_penalty,
           rank_weight, sft_weight, mode, sft_reduction, norm):  # fmt: skip
    loss, rank_loss, sft_loss, p, _, _ = _ops.rrhf_loss_op(
        logp.float().contiguous(),
        token_response.contiguous(),
        response_query.contiguous(),
        scores.float().contiguous(),
        None if prompt_len is None else prompt_len.contiguous(),
        int(num_queries),
        int(k_max),
        float(length_penalty),
        float(rank_weight),
        float(sft_weight),
        mode == "official",
        sft_reduction == "sum",
        float(norm),
    )
    return loss, rank_loss, sft_loss, p


def _check_options(logp, token_response, response_query, scores, prompt_len, mode, sft_reduction) -> None:
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


def check_scores(scores: torch.Tensor) -> None:
    """Host check: every score finite (a NaN or inf reward would rank nothing, or everything)."""
    bad = (~torch.isfinite(scores)).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(
            f"rrhf_loss: scores must be finite, but response {i} has score {float(scores[i])}; "
            "drop or rescore that response"
        )


def check_packed_order(token_response: torch.Tensor, response_query: torch.Tensor, num_queries: int) -> None:
    """Host check of the order the fused kernel takes (rrhf_fast.data.packing.pack's): responses
    numbered in token order with contiguous tokens, queries' responses contiguous, none empty."""
    for name, t, count, what in (
        ("token_response", token_response, response_query.numel(), "token"),
        ("response_query", response_query, num_queries, "response"),
    ):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= count):
            lo, hi = int(t.min()), int(t.max())
            raise ValueError(f"rrhf_loss: {name} must lie in [0, {count}), but its values span {lo}..{hi}")
        down = (t[1:] < t[:-1]).nonzero()
        if down.numel():
            i = int(down[0]) + 1
            raise ValueError(
                f"rrhf_loss(triton): {name} must be non-decreasing (the packed order of "
                f"rrhf_fast.data.packing.pack), but {what} {i} has {int(t[i])} after {int(t[i - 1])}; "
                "pack the batch in that order or use impl='torch'"
            )
        empty = (torch.bincount(t.long(), minlength=count) == 0).nonzero()
        if empty.numel():
            owner = "response" if name == "token_response" else "query"
            raise ValueError(
                f"rrhf_loss: every {owner} needs at least one {what}, but {owner} {int(empty[0])} has none"
            )


# The custom ops (ops.py) wrap the launchers above; imported last, as they import this module.
from . import ops as _ops  # noqa: E402
