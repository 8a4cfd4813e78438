"""Naive PyTorch references for the fused kernels: what tests and benchmarks compare against.

They materialise everything (the [M, V] logits, an [R, R] pair matrix) and are written for
clarity, not speed. They are also the `impl="torch"` fallback off-GPU.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class RRHFOutput(NamedTuple):
    loss: torch.Tensor  # scalar: rank_weight * rank_loss + sft_weight * sft_loss
    rank_loss: torch.Tensor  # scalar, unweighted
    sft_loss: torch.Tensor  # scalar, unweighted
    response_scores: torch.Tensor  # [R] fp32 p_i, detached (for metrics)


def token_logprobs_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None = None,
) -> torch.Tensor:
    """log_softmax(hidden[rows] @ weight.T)[m, targets[m]] in fp32 (fp64 for fp64 inputs)."""
    # index_select, not hidden[rows]: the indexing backward accumulates repeated rows (a prompt's last
    # token predicts each response's first) in an order that varies run to run on a multi-threaded
    # CPU; index_select's backward (index_add) is deterministic.
    logits = hidden.index_select(0, rows) @ weight.T  # in the input dtype, as the model's lm_head would
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits.log_softmax(-1).gather(-1, targets[:, None].long()).squeeze(-1)


def response_lengths(token_response: torch.Tensor, num_responses: int) -> torch.Tensor:
    return torch.bincount(token_response.long(), minlength=num_responses)


def rrhf_loss_torch(
    logp: torch.Tensor,
    token_response: torch.Tensor,
    response_query: torch.Tensor,
    scores: torch.Tensor,
    prompt_len: torch.Tensor | None = None,
    length_penalty: float = 1.0,
    rank_weight: float = 1.0,
    sft_weight: float = 1.0,
    mode: str = "paper",
    sft_reduction: str = "mean",
    normalizer: float | torch.Tensor | None = None,
) -> RRHFOutput:
    """RRHF loss exactly as docs/DESIGN.md §4 defines it, with an [R, R] pair matrix."""
    dtype = torch.promote_types(logp.dtype, torch.float32)
    token_response = token_response.long()
    response_query = response_query.long()
    num_responses = response_query.numel()
    num_queries = prompt_len.numel() if prompt_len is not None else int(response_query.max()) + 1
    sums = torch.zeros(num_responses, dtype=dtype, device=logp.device).index_add(
        0, token_response, logp.to(dtype)
    )
    lengths = response_lengths(token_response, num_responses).to(dtype)
    if bool((lengths == 0).any()):
        raise ValueError("rrhf_loss: every response needs at least one token")
    if mode == "paper":
        denom = lengths
    elif mode == "official":
        if prompt_len is None:
            raise ValueError("rrhf_loss: mode='official' needs prompt_len")
        longest = torch.zeros(num_queries, dtype=dtype, device=logp.device)
        longest = longest.scatter_reduce(0, response_query, lengths, "amax", include_self=False)
        denom = (prompt_len.to(dtype) + longest)[response_query]
    else:
        raise ValueError(f"rrhf_loss: mode must be 'paper' or 'official', got {mode!r}")
    p = sums / denom**length_penalty

    r = scores.to(dtype)
    same_query = response_query[:, None] == response_query[None, :]
    worse = same_query & (r[:, None] < r[None, :])  # pair (i, j): r_i < r_j
    hinge = torch.relu(p[:, None] - p[None, :]) * worse
    rank_q = torch.zeros(num_queries, dtype=dtype, device=logp.device)
    rank_q = rank_q.index_add(0, response_query, hinge.sum(1))

    best = best_response(response_query, r, num_queries)
    if sft_reduction == "sum":
        sft_q = -sums[best]
    elif sft_reduction == "mean":
        sft_q = -sums[best] / denom[best]
    else:
        raise ValueError(f"rrhf_loss: sft_reduction must be 'mean' or 'sum', got {sft_reduction!r}")

    norm = num_queries if normalizer is None else normalizer
    rank_loss = rank_q.sum() / norm
    sft_loss = sft_q.sum() / norm
    loss = rank_weight * rank_loss + sft_weight * sft_loss
    return RRHFOutput(loss, rank_loss, sft_loss, p.detach())


def best_response(response_query: torch.Tensor, scores: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Global index of the best-scored response of each query (the first one on ties)."""
    idx = torch.arange(scores.numel(), device=scores.device)
    top = torch.full((num_queries,), -torch.inf, dtype=scores.dtype, device=scores.device)
    top = top.scatter_reduce(0, response_query, scores, "amax")
    is_top = scores == top[response_query]
    first = torch.full((num_queries,), scores.numel(), dtype=torch.long, device=scores.device)
    # no boolean indexing: `rrhf-fast plan` runs this on fake tensors, which have no data-dependent shapes
    return first.scatter_reduce(0, response_query, torch.where(is_top, idx, scores.numel()), "amin")
