"""token_logprobs: log_softmax(hidden[rows] @ weight.T)[m, targets[m]] without the [M, V] logits."""

from __future__ import annotations

import torch

from .reference import token_logprobs_torch
from .utils import resolve_impl


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    *,
    softcap: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    impl = resolve_impl(impl, hidden.device)
    if impl == "torch":
        return token_logprobs_torch(hidden, weight, rows, targets, softcap=softcap)
    raise NotImplementedError("triton path: in progress")
