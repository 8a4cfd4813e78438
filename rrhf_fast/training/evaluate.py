"""Held-out evaluation: does the model order each query's responses like their reward scores?

- accuracy: over the ordered pairs (i, j) of a query with r_i < r_j, the fraction with p_i < p_j
  (p = the length-normalised log-probability the RRHF loss ranks by; equal rewards are no pair);
- top1: the fraction of queries whose highest-p response has the highest reward;
- best_reward: the mean reward of the highest-p response, the reward a best-of-k pick by the model
  itself would collect;
- loss, rank_loss, sft_loss: the training objective on the held-out queries.

With `--loss dpo` (dpo.py) the loss is DPO's (reported as rank_loss, sft_loss 0) and the response
scores ranked are DPO's implicit rewards beta * (S - S_ref).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rrhf_fast.data.packing import TokenizedExample, pack_tokenized, plan_microbatches
from rrhf_fast.errors import UserError
from rrhf_fast.kernels import rrhf_loss
from rrhf_fast.kernels.reference import best_response
from rrhf_fast.models.logprobs import packed_logprobs
from rrhf_fast.objectives.dpo import dpo_loss


@dataclass
class RankingCounts:
    """Sums over queries, so that micro-batches add up before dividing."""

    correct_pairs: int = 0
    pairs: int = 0
    top1: int = 0
    best_reward: float = 0.0
    queries: int = 0

    def __iadd__(self, other: RankingCounts) -> RankingCounts:
        self.correct_pairs += other.correct_pairs
        self.pairs += other.pairs
        self.top1 += other.top1
        self.best_reward += other.best_reward
        self.queries += other.queries
        return self

    def summary(self, prefix: str = "") -> dict[str, float | None]:
        q = max(self.queries, 1)
        return {
            f"{prefix}accuracy": self.correct_pairs / self.pairs if self.pairs else None,
            f"{prefix}top1": self.top1 / q,
            f"{prefix}best_reward": self.best_reward / q,
        }


def ranking_counts(
    p: torch.Tensor, r: torch.Tensor, response_query: torch.Tensor, num_queries: int
) -> RankingCounts:
    """Pairwise and top-1 agreement of model scores `p` [R] with rewards `r` [R], per query."""
    p, r, rq = p.detach().float().cpu(), r.detach().float().cpu(), response_query.cpu()
    pairs = (rq[:, None] == rq[None, :]) & (r[:, None] < r[None, :])
    correct = pairs & (p[:, None] < p[None, :])
    first = _first_argmax(p, rq, num_queries)
    r_max = torch.full((num_queries,), -torch.inf).scatter_reduce(0, rq, r, "amax")
    chosen = r[first]
    return RankingCounts(
        correct_pairs=int(correct.sum()),
        pairs=int(pairs.sum()),
        top1=int((chosen == r_max).sum()),
        best_reward=float(chosen.sum()),
        queries=num_queries,
    )


def _first_argmax(values: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Index of the first maximum of `values` within each group (NaN counts as no maximum)."""
    first = best_response(group, values, num_groups)
    # A group whose values are all NaN has no maximum: take its first response.
    index = torch.arange(values.numel())
    fallback = torch.full((num_groups,), values.numel(), dtype=torch.long).scatter_reduce(
        0, group, index, "amin"
    )
    return torch.where(first == values.numel(), fallback, first)


@torch.no_grad()
def evaluate(
    model: Any,
    items: Sequence[TokenizedExample],
    config: Any,
    *,
    autocast: contextlib.AbstractContextManager | None = None,
) -> dict[str, float | None]:
    """Loss and ranking metrics of `model` on tokenised held-out queries, keys prefixed `eval_`."""
    was_training = model.training
    model.eval()
    plan = plan_microbatches([it.packed_len for it in items], config.micro_batch_tokens)
    totals = torch.zeros(3, dtype=torch.float64)
    counts = RankingCounts()
    try:
        for group in plan:
            batch = pack_tokenized([items[i] for i in group])
            with autocast or contextlib.nullcontext():
                logp = packed_logprobs(model, batch, attn=config.attn, impl=config.loss_impl)
            out = loss_of(logp, batch, config, normalizer=float(len(items)))
            totals += torch.stack([out.loss, out.rank_loss, out.sft_loss]).double().cpu()
            counts += ranking_counts(
                out.response_scores, batch.scores, batch.response_query, batch.num_queries
            )
    finally:
        model.train(was_training)
    loss, rank, sft = totals.tolist()
    return {"eval_loss": loss, "eval_rank_loss": rank, "eval_sft_loss": sft, **counts.summary("eval_")}


def loss_of(logp: torch.Tensor, batch: Any, config: Any, *, normalizer: float) -> Any:
    """The run's loss (`--loss rrhf`: rrhf_loss with the loss flags; `--loss dpo`: dpo.dpo_loss) of a
    packed batch, as sums divided by `normalizer` queries; `.loss/.rank_loss/.sft_loss/.response_scores`."""
    device = logp.device
    if getattr(config, "loss", "rrhf") == "dpo":
        if torch.isnan(batch.ref_logps).any():  # on the CPU side: no device sync
            raise UserError(
                '--loss dpo: a micro-batch has responses without "ref_logps"; add them to the data with '
                "`rrhf-fast ref-logps`"
            )
        return dpo_loss(
            logp,
            batch.token_response.to(device),
            batch.response_query.to(device),
            batch.scores.to(device),
            batch.ref_logps.to(device),
            num_queries=batch.num_queries,
            beta=config.dpo_beta,
            normalizer=normalizer,
        )
    return rrhf_loss(
        logp,
        batch.token_response.to(device),
        batch.response_query.to(device),
        batch.scores.to(device),
        prompt_len=batch.prompt_len.to(device),
        length_penalty=config.length_penalty,
        rank_weight=config.rank_weight,
        sft_weight=config.sft_weight,
        mode=config.mode,
        sft_reduction=config.sft_reduction,
        normalizer=normalizer,
        impl=config.loss_impl,
    )
