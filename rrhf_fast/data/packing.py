"""Shared-prompt packing: each query's prompt once, its k responses after it, one unpadded row.

docs/DESIGN.md §3 is the contract for `PackedBatch`. Tokenisation (§2) is split from
packing so that a trainer can tokenise a dataset once and pack micro-batches from the token ids:
`tokenize_example` -> `TokenizedExample`, `pack_tokenized` -> `PackedBatch`; `pack` composes both.
`plan_microbatches` groups queries into micro-batches under a token budget.

A record may carry `ref_logps` (one number per response: a reference model's sum of the response's
token log-probs, what `--loss dpo` needs; see dpo.py); it travels to `PackedBatch.ref_logps`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rrhf_fast.data.records import Example
from rrhf_fast.errors import UserError


@dataclass
class TokenizedExample:
    """Token ids of one query: the prompt (with its special tokens) and each response (+ EOS)."""

    prompt_ids: list[int]
    response_ids: list[list[int]]
    scores: list[float]  # [] when unscored: PackedBatch.scores is then NaN
    ref_logps: list[float] = field(default_factory=list)  # [] when absent: PackedBatch.ref_logps is NaN

    @property
    def packed_len(self) -> int:
        """Tokens this query takes in a packed row: the prompt once plus every response."""
        return len(self.prompt_ids) + sum(len(r) for r in self.response_ids)


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
    scores: torch.Tensor  # [R] float32
    response_len: torch.Tensor  # [R] long
    prompt_len: torch.Tensor  # [G] long
    cu_seqlens_q: torch.Tensor  # [G + R + 1] int32
    cu_seqlens_k: torch.Tensor  # [G + R + 1] int32
    kv_index: torch.Tensor  # [sum of key lengths] long, rows of T
    max_seqlen_q: int
    max_seqlen_k: int
    max_responses: int  # the most responses of one query (rrhf_loss's k_max: no device read for it)
    ref_logps: torch.Tensor  # [R] float32, reference log-prob sum per response (NaN when absent)

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
# Tokenisation (docs/DESIGN.md §2)


def tokenize_example(
    example: Example,
    tokenizer: Any,
    *,
    max_prompt_len: int | None = None,
    max_response_len: int | None = None,
    chat_template: bool = False,
    where: str | None = None,
) -> TokenizedExample:
    """Prompt = the query with the tokenizer's special tokens; each response = its tokens + EOS.

    The prompt keeps its last `max_prompt_len` tokens; a response keeps its first
    `max_response_len` tokens (EOS included), so a truncated response has no EOS. Text is text:
    a literal "</s>" inside a query or response is not read as a special token (except inside
    a chat template, whose markup needs them). `where` (e.g. "FILE:LINE" of the record) starts the
    message of an error about this example.
    """
    for name, value in (("max_prompt_len", max_prompt_len), ("max_response_len", max_response_len)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive number of tokens, got {value}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no EOS token; set tokenizer.eos_token before packing")
    prompt = tokenize_prompt(example.query, tokenizer, chat_template)
    if max_prompt_len is not None:
        prompt = prompt[-max_prompt_len:]
    if not prompt:
        raise UserError(
            f"{_where(where, example)}: the query tokenises to no tokens and the tokenizer adds no BOS: "
            "the first response token would have nothing to condition on; give a non-empty query"
        )
    encoded = tokenizer(list(example.responses), add_special_tokens=False, split_special_tokens=True)
    responses = [list(ids) + [eos] for ids in encoded["input_ids"]]
    if max_response_len is not None:
        responses = [r[:max_response_len] for r in responses]
    scores = [float(s) for s in example.scores]
    return TokenizedExample(prompt, responses, scores, _ref_logps(example, where))


def _ref_logps(example: Example, where: str | None) -> list[float]:
    """The record's `ref_logps` (one finite number per response), or [] when it has none."""
    value = example.meta.get("ref_logps")
    if value is None:
        return []
    ok = isinstance(value, list) and len(value) == len(example.responses)
    ok = ok and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
    )
    if not ok:
        raise UserError(
            f"{_where(where, example)}: field 'ref_logps' must be a list of one finite number per "
            f"response ({len(example.responses)}), got {str(value)[:80]}"
        )
    return [float(v) for v in value]


def _where(where: str | None, example: Example) -> str:
    """How an error names the example: its location when known, else its query."""
    return where or f"query {example.query[:60]!r}"


def tokenize_prompt(query: str, tokenizer: Any, chat_template: bool = False) -> list[int]:
    """The prompt's token ids, untruncated: what sampling should feed the model for this query."""
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("chat_template=True but the tokenizer has no chat template")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": query}], add_generation_prompt=True, tokenize=False
        )
        # The template writes its own special tokens (BOS included) as text.
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
        ids = list(tokenizer(query, split_special_tokens=True)["input_ids"])
    bos = tokenizer.bos_token_id
    while bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]  # a template that writes BOS plus a tokenizer that adds one: keep one
    return ids


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
    ref_logps = []
    for g, item in enumerate(items):
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
        scores=torch.tensor(scores, dtype=torch.float32),
        response_len=torch.tensor(response_len, **as_long),
        ref_logps=torch.tensor(ref_logps, dtype=torch.float32),
    )


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
