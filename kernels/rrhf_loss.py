"""rrhf_loss: RRHF rank + SFT loss over all queries of a packed batch."""

from __future__ import annotations

import torch

from .reference import RRHFOutput, rrhf_loss_torch
from .utils import resolve_impl


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
    impl = resolve_impl(impl, logp.device)
    if impl == "torch":
        return rrhf_loss_torch(
            logp,
            token_response,
            response_query,
            scores,
            prompt_len,
            length_penalty,
            rank_weight,
            sft_weight,
            mode,
            sft_reduction,
            normalizer,
        )
    raise NotImplementedError("triton path: in progress")
