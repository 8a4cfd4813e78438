"""The naive official-style RRHF step (docs/DESIGN.md §12): what bench_step.py compares against.

It computes RRHF the way the authors' released train.py does, written here from the definitions in
docs/DESIGN.md §4 with plain torch (not rrhf_fast.kernels): one query per forward (their per-device
batch), its k responses as k copies of prompt + response right-padded to the longest (their
collator), a full forward producing the logits [k, L, V], log_softmax in fp32, a gather of the
response tokens, per-response sums, the loss in either mode; gradients are accumulated over the
queries of a step (mean over queries) and the optimizer steps once. It takes the same tokenised
queries as rrhf-fast's packing (`rrhf_fast.data.packing.TokenizedExample`), so both see the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rrhf_fast.data.packing import TokenizedExample

IGNORE = -100


@dataclass
class ReferenceOutput:
    loss: torch.Tensor  # mean over queries of rank_weight * rank + sft_weight * sft
    rank_loss: torch.Tensor
    sft_loss: torch.Tensor
    response_scores: torch.Tensor  # [R] p_i of every response, queries in order


def collate(
    items: list[TokenizedExample], pad_id: int, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row of prompt + response per response, right-padded to the longest (the authors'
    collator; they pass one query at a time): (input_ids, attention_mask, labels), each [rows, L]."""
    seqs = [(q.prompt_ids, r) for q in items for r in q.response_ids]
    length = max(len(p) + len(r) for p, r in seqs)
    input_ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, (p, r) in enumerate(seqs):
        input_ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        labels[i, len(p) : len(p) + len(r)] = torch.tensor(r)
        mask[i, : len(p) + len(r)] = 1
    return input_ids.to(device), mask.to(device), labels.to(device)


def query_loss(
    model,
    q: TokenizedExample,
    *,
    pad_id: int,
    mode: str = "paper",
    length_penalty: float = 1.0,
    rank_weight: float = 1.0,
    sft_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, rank, sft, p[k]) of one query."""
    device = next(model.parameters()).device
    input_ids, mask, labels = collate([q], pad_id, device)
    logits = model(input_ids=input_ids, attention_mask=mask).logits  # [k, L, V]
    logprobs = logits[:, :-1].float().log_softmax(-1)
    targets = labels[:, 1:]
    valid = targets != IGNORE
    token_logp = logprobs.gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1) * valid
    sums = token_logp.sum(-1)
    if mode == "paper":
        denom = valid.sum(-1).to(sums.dtype)
    elif mode == "official":
        # train.py overwrites the -100 labels in place before taking the mask, so every response
        # divides by the padded label length: prompt + longest response (docs/DESIGN.md §4).
        padded = len(q.prompt_ids) + max(len(r) for r in q.response_ids)
        denom = torch.full_like(sums, float(padded))
    else:
        raise ValueError(f"mode must be 'paper' or 'official', got {mode!r}")
    p = sums / denom**length_penalty

    r = torch.tensor(q.scores, dtype=torch.float32, device=device)
    diff = p[None, :] - p[:, None]  # [i, j] = p_j - p_i
    aval = (r[None, :] - r[:, None] > 0) & (diff < 0)  # r_j > r_i but p_j < p_i
    rank = -diff[aval].sum()
    best = int(torch.argmax(r))  # first index on ties
    sft = -sums[best] / denom[best]
    return rank_weight * rank + sft_weight * sft, rank, sft, p


def reference_backward(
    model, queries: list[TokenizedExample], *, pad_id: int, **loss_kwargs
) -> ReferenceOutput:
    """Forward and backward of every query, one at a time; gradients hold the mean over queries."""
    parts = []
    for q in queries:
        loss, rank, sft, p = query_loss(model, q, pad_id=pad_id, **loss_kwargs)
        (loss / len(queries)).backward()
        parts.append((loss.detach(), rank.detach(), sft.detach(), p.detach()))
    loss, rank, sft, p = zip(*parts, strict=True)
    return ReferenceOutput(
        torch.stack(loss).mean(), torch.stack(rank).mean(), torch.stack(sft).mean(), torch.cat(p)
    )


def reference_step(
    model, optimizer, queries: list[TokenizedExample], *, pad_id: int, **loss_kwargs
) -> ReferenceOutput:
    """One training step: forward and backward of every query, then one optimizer step."""
    out = reference_backward(model, queries, pad_id=pad_id, **loss_kwargs)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out
