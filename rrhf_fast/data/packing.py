"""Shared-prompt packing: each query's prompt once, its k responses after it, one unpadded row.

docs/DESIGN.md §3 is the contract for `PackedBatch`. Tokenisation (§2; tokenize.py, re-exported
here) is split from packing so that a trainer can tokenise a dataset once and pack micro-batches
from the token ids: `tokenize_example` -> `TokenizedExample`, `pack_tokenized` -> `PackedBatch`;
`pack` composes both.

Scores stay float64 (`PackedBatch.scores`, for metrics); the losses read `PackedBatch.ranks`, each
response's rank within its query computed exactly from the float64 scores: a float32 cast would
tie 1.0 and 1.0 + 1e-12, and every score beyond 3.4e38 (inf).
`plan_microbatches` groups queries into micro-batches under a token budget.

A record may carry `ref_logps` (one number per response: a reference model's sum of the response's
token log-probs, what `--loss dpo` needs; see dpo.py); it travels to `PackedBatch.ref_logps`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rrhf_fast.data.records import Example
from rrhf_fast.data.tokenize import TokenizedExample, tokenize_example, tokenize_prompt
from rrhf_fast.errors import UserError

__all__ = ["PackedBatch", "TokenizedExample", "pack", "pack_tokenized", "plan_microbatches", "score_ranks",
           "tokenize_example", "tokenize_prompt"]  # fmt: skip


@dataclass
class PackedBatch:
    """G queries with R responses in one row of T tokens (docs/DESIGN.md §3).

    `targets` / `token_response` are in packed order (response 0's tokens, then response 1's, ...)
    and `response_query` is non-decreasing: the fused rrhf_loss relies on that order.

    Attention metadata for the varlen backend (built here, on the CPU, once per batch): the row is a
    sequence of G + R contiguous segments (each prompt, each response). Segment s has queries
    `cu_seqlens_q[s]:cu_seqlens_q[s+1]` and keys/values `kv_index[cu_seqlens_k[s]:cu_seqlens_k[s+1]]`
    (rows of T): a prompt sees itself, a response sees [its prompt; itself], causally aligned at the
    bottom right. Logical positions are contiguous along each gathered key sequence.
    """

    input_ids: torch.Tensor  # [1, T] long
    position_ids: torch.Tensor  # [1, T] long
    seq_group: torch.Tensor  # [T] long, query index 0..G-1
    seq_segment: torch.Tensor  # [T] long, 0 = prompt, 1..k = response
    rows: torch.Tensor  # [M] long, hidden row predicting each target
    targets: torch.Tensor  # [M] long
    token_response: torch.Tensor  # [M] long, global response index
    response_query: torch.Tensor  # [R] long, non-decreasing
    scores: torch.Tensor  # [R] float64, the rewards as given (NaN when unscored)
    response_len: torch.Tensor  # [R] long
    prompt_len: torch.Tensor  # [G] long
    cu_seqlens_q: torch.Tensor  # [G + R + 1] int32
    cu_seqlens_k: torch.Tensor  # [G + R + 1] int32
    kv_index: torch.Tensor  # [sum of key lengths] long, rows of T
    max_seqlen_q: int
    max_seqlen_k: int
    max_responses: int  # the most responses of one query (rrhf_loss's k_max: no device read for it)
    ref_logps: torch.Tensor  # [R] float32, reference log-prob sum per response (NaN when absent)
    ranks: torch.Tensor  # [R] float32, dense rank of the score in its query (0 = lowest; NaN if unscored)

    @property
    def num_queries(self) -> int:
        return self.prompt_len.numel()

    @property
    def num_responses(self) -> int:
        return self.response_query.numel()

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        """A copy with every tensor on `device` (the Python ints stay as they are)."""
        moved: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device, non_blocking=non_blocking)
            moved[f.name] = value
        return PackedBatch(**moved)


# ----------------------------------------------------------------------------------------------
# Packing


def pack(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    max_prompt_len: int | None = None,
    max_response_len: int | None = None,
    chat_template: bool = False,
) -> PackedBatch:
    """Tokenise and pack examples into one PackedBatch (docs/DESIGN.md §3)."""
    return pack_tokenized(
        [
            tokenize_example(
                ex,
                tokenizer,
                max_prompt_len=max_prompt_len,
                max_response_len=max_response_len,
                chat_template=chat_template,
            )
            for ex in examples
        ]
    )


def pack_tokenized(items: Sequence[TokenizedExample]) -> PackedBatch:
    """Lay out G tokenised queries in one row and build every index the model path needs."""
    if not items:
        raise ValueError("pack_tokenized: no examples to pack")
    for g, item in enumerate(items):
        _check_item(item, g)
    q_lens, kv_lens, kv_index = _varlen_segments(items)
    return PackedBatch(
        **_token_layout(items),
        prompt_len=torch.tensor([len(it.prompt_ids) for it in items], dtype=torch.long),
        cu_seqlens_q=_cumsum0(q_lens),
        cu_seqlens_k=_cumsum0(kv_lens),
        kv_index=kv_index,
        max_seqlen_q=int(q_lens.max()),
        max_seqlen_k=int(kv_lens.max()),
        max_responses=max(len(it.response_ids) for it in items),
    )


def _token_layout(items: Sequence[TokenizedExample]) -> dict[str, torch.Tensor]:
    ids, pos, group, segment = [], [], [], []
    rows, targets, token_response, response_query, scores, response_len = [], [], [], [], [], []
    ref_logps, ranks = [], []
    for g, item in enumerate(items):
        ranks += score_ranks(item.scores) if item.scores else [float("nan")] * len(item.response_ids)
        plen = len(item.prompt_ids)
        last_prompt_row = len(ids) + plen - 1
        ids += item.prompt_ids
        pos += range(plen)
        group += [g] * plen
        segment += [0] * plen
        for j, resp in enumerate(item.response_ids):
            start, n = len(ids), len(resp)
            ids += resp
            pos += range(plen, plen + n)
            group += [g] * n
            segment += [j + 1] * n
            rows += [last_prompt_row, *range(start, start + n - 1)]
            targets += resp
            token_response += [len(response_query)] * n
            response_query.append(g)
            scores.append(item.scores[j] if item.scores else float("nan"))
            ref_logps.append(item.ref_logps[j] if item.ref_logps else float("nan"))
            response_len.append(n)
    as_long = dict(dtype=torch.long)
    return dict(
        input_ids=torch.tensor([ids], **as_long),
        position_ids=torch.tensor([pos], **as_long),
        seq_group=torch.tensor(group, **as_long),
        seq_segment=torch.tensor(segment, **as_long),
        rows=torch.tensor(rows, **as_long),
        targets=torch.tensor(targets, **as_long),
        token_response=torch.tensor(token_response, **as_long),
        response_query=torch.tensor(response_query, **as_long),
        scores=torch.tensor(scores, dtype=torch.float64),
        response_len=torch.tensor(response_len, **as_long),
        ref_logps=torch.tensor(ref_logps, dtype=torch.float32),
        ranks=torch.tensor(ranks, dtype=torch.float32),
    )


def score_ranks(scores: Sequence[float]) -> list[float]:
    """Each score's dense rank among its query's (0 = lowest, equal scores equal rank), compared as
    Python floats (float64). What the losses need is only this order (RRHF's pairs r_i < r_j, the SFT
    and DPO picks of the best and worst), and small integers are exact in float32."""
    order = {s: float(i) for i, s in enumerate(sorted(set(scores)))}
    return [order[s] for s in scores]


def _varlen_segments(items: Sequence[TokenizedExample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per segment (each prompt, each response): query length, key length; and the key rows."""
    q_lens, kv_lens, parts = [], [], []
    start = 0
    for item in items:
        plen = len(item.prompt_ids)
        prompt_rows = torch.arange(start, start + plen)
        q_lens.append(plen)
        kv_lens.append(plen)
        parts.append(prompt_rows)
        start += plen
        for resp in item.response_ids:
            n = len(resp)
            q_lens.append(n)
            kv_lens.append(plen + n)
            parts += [prompt_rows, torch.arange(start, start + n)]
            start += n
    return torch.tensor(q_lens), torch.tensor(kv_lens), torch.cat(parts)


def _check_item(item: TokenizedExample, g: int) -> None:
    if not item.prompt_ids:
        raise ValueError(f"pack_tokenized: query {g} has an empty prompt")
    if not item.response_ids or any(len(r) == 0 for r in item.response_ids):
        raise ValueError(f"pack_tokenized: query {g} needs at least one response, each non-empty")
    for name in ("scores", "ref_logps"):
        values = getattr(item, name)
        if values and len(values) != len(item.response_ids):
            raise ValueError(
                f"pack_tokenized: query {g} has {len(values)} {name} for {len(item.response_ids)} responses"
            )


def _cumsum0(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)


# ----------------------------------------------------------------------------------------------
# Token-budget batching


def plan_microbatches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Greedy, in the given order: indices of queries per micro-batch of <= max_tokens tokens.

    A pure function of the per-query packed lengths (`TokenizedExample.packed_len`), so that a
    trainer can shuffle the order with a seeded generator and resume it exactly. A query is never
    split; one that alone exceeds the budget is an error.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    plan: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if n > max_tokens:
            raise UserError(
                f"query {i} packs to {n} tokens (prompt + all its responses), over the micro-batch budget "
                f"of {max_tokens}; raise --micro-batch-tokens or lower max_prompt_len / max_response_len"
            )
        if current and used + n > max_tokens:
            plan.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        plan.append(current)
    return plan


def check_positions(items: Sequence[TokenizedExample], where: Sequence[str], limit: int | None) -> None:
    """Every response's last position (prompt + response - 1) must be one the model has: beyond
    max_position_embeddings, learned position tables index out of range and RoPE models run on
    positions they never saw, silently."""
    if not limit:
        return
    for item, loc in zip(items, where, strict=True):
        longest = len(item.prompt_ids) + max(map(len, item.response_ids))
        if longest > limit:
            raise UserError(
                f"{loc}: the prompt and its longest response take {longest} positions, over the model's "
                f"max_position_embeddings of {limit}; shorten the record or truncate with --max-prompt-len / "
                "--max-response-len"
            )


# ----------------------------------------------------------------------------------------------
# What packing saves


def packing_summary(items: Sequence[TokenizedExample]) -> dict[str, Any]:
    """Token counts of the data three ways: packed (each prompt once), unshared (each response with
    its own copy of the prompt), padded (each query's k sequences padded to its longest, as a
    collator that pads the k responses of a query does), and the packed/unshared, packed/padded
    ratios."""
    packed = sum(it.packed_len for it in items)
    unshared = sum(len(it.prompt_ids) * len(it.response_ids) + sum(map(len, it.response_ids)) for it in items)
    padded = sum(len(it.response_ids) * (len(it.prompt_ids) + max(map(len, it.response_ids))) for it in items)
    return {
        "queries": len(items),
        "responses": sum(len(it.response_ids) for it in items),
        "tokens_packed": packed,
        "tokens_unshared": unshared,
        "tokens_padded": padded,
        "packed_over_unshared": round(packed / unshared, 4) if unshared else None,
        "packed_over_padded": round(packed / padded, 4) if padded else None,
    }


def describe_packing(summary: dict[str, Any]) -> str:
    """One line for a person: what `packing_summary` found."""
    s = summary
    return (
        f"packing: {s['queries']:,} queries, {s['responses']:,} responses; {s['tokens_packed']:,} tokens "
        f"packed, {s['tokens_unshared']:,} if each response carried its own prompt "
        f"(packed/unshared {s['packed_over_unshared']}), {s['tokens_padded']:,} padded to each query's "
        f"longest, k copies per query (packed/padded {s['packed_over_padded']})"
    )
