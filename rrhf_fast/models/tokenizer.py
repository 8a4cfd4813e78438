"""Tokenizer helpers of generation: a pad token, the EOS ids that end a response, decoding up to EOS,
and left-padded batches of token lists."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rrhf_fast.errors import UserError


def left_pad(
    seqs: Sequence[Sequence[int]], pad_id: int, device: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input_ids and attention_mask for a batch of token lists."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, s in enumerate(seqs):
        if s:
            ids[row, width - len(s) :] = torch.tensor(list(s))
            mask[row, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def ensure_pad_token(tokenizer: Any) -> int:
    """The tokenizer's pad id, falling back to EOS (generation needs one to pad batches)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise UserError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.pad_token_id


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """EOS ids of the tokenizer and the model's generation config (chat models often add one)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([gen] if isinstance(gen, int) else (gen or []))
    if not ids:
        raise UserError("neither the tokenizer nor the model's generation config defines an EOS token")
    return ids


def decode(tokenizer: Any, tokens: Sequence[int], eos_ids: set[int]) -> str:
    """The text of generated tokens up to (not including) the first EOS."""
    tokens = list(tokens)
    end = next((i for i, t in enumerate(tokens) if t in eos_ids), len(tokens))
    return tokenizer.decode(tokens[:end], skip_special_tokens=True)
