"""Reward-model losses over packed batches (`rrhf-fast train-rm --rm-loss bt|listwise`).

Each query q has k responses with rewards r_i (the model's outputs) and scores s_i (the labels:
higher is better). All sums below run over the responses of one query; a query's loss is divided
by the number of its terms, and the batch's loss is the sum over queries divided by `normalizer`
(the step's query count, so micro-batches and ranks add up to the step's mean; a query without a
term counts in the normalizer and adds 0, as in rrhf_loss and dpo_loss).

- bt (Bradley-Terry): the terms are the ordered pairs (i, j) with s_i > s_j (tied scores make no
  pair, so ties contribute nothing):  -log sigmoid(r_i - r_j - m_ij), with m_ij = --rm-margin, or
  --rm-margin * (s_i - s_j) with --rm-margin-scale (Llama 2's margin grows with the rating gap).
- listwise (Plackett-Luce, ties grouped as in Breslow's partial likelihood): the terms are the
  responses i that beat at least one other response (s_i > s_j for some j):
  -log( exp(r_i) / sum_{j: s_j <= s_i} exp(r_j) ), i.e. i is drawn first from everything not better
  than it; tied responses share their group's denominator and none is ranked above another, and
  the lowest tie group has no term. For k = 2 with different scores this is BT without margin.
- --rm-center c adds c * (mean_i r_i)^2 per query: rewards are only defined up to a shift per
  query, and this pins the shift near zero (TRL's center_rewards_coefficient is the same penalty on
  (r_chosen + r_rejected)^2, i.e. 4x this one for k = 2).

The reported `margin` is, per query, the mean of r_i - r_j over its ordered pairs (s_i > s_j),
summed over queries / normalizer like the loss: the mean margin when every query has a pair.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from rrhf_fast.data.packing import PackedBatch
from rrhf_fast.models.reward import PackedRewards, load_reward_model, packed_rewards
from rrhf_fast.objectives.base import Objective, ObjectiveOutput
from rrhf_fast.objectives.metrics import Metrics

RM_LOSSES = ("bt", "listwise")


class RewardLossOutput(NamedTuple):
    loss: torch.Tensor  # rm_loss + center_loss
    rm_loss: torch.Tensor
    center_loss: torch.Tensor
    margin: torch.Tensor  # detached


def reward_loss(
    rewards: torch.Tensor,
    scores: torch.Tensor,
    response_query: torch.Tensor,
    num_queries: int,
    *,
    kind: str = "bt",
    margin: float = 0.0,
    margin_scale: bool = False,
    center: float = 0.0,
    normalizer: float | None = None,
) -> RewardLossOutput:
    """The reward-model loss of one packed batch (module docstring); differentiable in `rewards` [R]."""
    if kind not in RM_LOSSES:
        raise ValueError(f"kind must be one of {RM_LOSSES}, got {kind!r}")
    r = rewards.float()
    s = scores.to(r.device, torch.float64)  # exact comparisons and gaps, whatever the label scale
    q = response_query.to(r.device)
    same = q[:, None] == q[None, :]
    better = same & (s[:, None] > s[None, :])  # [R, R]: i beats j
    per_query = r.new_zeros(num_queries)
    if kind == "bt":
        m = margin * (s[:, None] - s[None, :]).to(r.dtype) if margin_scale else margin
        pair_loss = -F.logsigmoid(r[:, None] - r[None, :] - m)
        per_query = _query_mean(pair_loss[better], q[better.nonzero()[:, 0]], num_queries)
    else:
        pool = same & (s[None, :] <= s[:, None])  # [i, j]: j is in i's denominator
        lse = r[None, :].expand_as(pool).masked_fill(~pool, -torch.inf).logsumexp(-1)
        term = better.any(1)
        per_query = _query_mean((lse - r)[term], q[term], num_queries)
    norm = float(normalizer) if normalizer is not None else float(max(num_queries, 1))
    rm_loss = per_query.sum() / norm
    center_loss = r.new_zeros(())
    if center:
        mean = _query_mean(r, q, num_queries)
        center_loss = center * mean.square().sum() / norm
    with torch.no_grad():
        gaps = (r[:, None] - r[None, :])[better]
        margins = _query_mean(gaps, q[better.nonzero()[:, 0]], num_queries).sum() / norm
    return RewardLossOutput(rm_loss + center_loss, rm_loss, center_loss, margins)


def _query_mean(values: torch.Tensor, query: torch.Tensor, num_queries: int) -> torch.Tensor:
    """[G]: the mean of `values` per query (0 for a query with none)."""
    total = values.new_zeros(num_queries).index_add(0, query, values)
    count = torch.zeros(num_queries, device=values.device).index_add(0, query, torch.ones_like(values))
    return total / count.clamp(min=1)


class RewardModel(Objective):
    """`--loss rm` (`rrhf-fast train-rm`): reward_loss on the packed rewards of a one-label
    sequence-classification model; its rewards are the scores the ranking metrics rank."""

    name = "rm"
    terms = ("loss", "rm_loss", "center_loss", "margin")
    needs_pair = True

    def __call__(
        self,
        model: Any,
        batch: PackedBatch,
        *,
        normalizer: float,
        autocast: contextlib.AbstractContextManager | None = None,
    ) -> ObjectiveOutput:
        config = self.config
        with autocast or contextlib.nullcontext():
            rewards = packed_rewards(model, batch, attn=config.attn)
        device = rewards.device
        out = reward_loss(
            rewards,
            batch.scores.to(device),
            batch.response_query.to(device),
            batch.num_queries,
            kind=config.rm_loss,
            margin=config.rm_margin,
            margin_scale=config.rm_margin_scale,
            center=config.rm_center,
            normalizer=normalizer,
        )
        terms = [out.loss, out.rm_loss, out.center_loss, out.margin]
        return ObjectiveOutput(out.loss, Metrics.of_batch(self.terms, terms, rewards, batch))

    def packed_module(self, model: Any) -> torch.nn.Module:
        return PackedRewards(model)

    def load_model(
        self, device: torch.device, tokenizer: Any, autocast: contextlib.AbstractContextManager
    ) -> Any:
        return load_reward_model(self.config, device, tokenizer, autocast)
