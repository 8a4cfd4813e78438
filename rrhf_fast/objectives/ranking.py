"""What the ranking losses share (docs/DESIGN.md §4): each query's responses as one padded row, the
pairs to rank, the SFT term, DPO's pairwise loss types, and the Objective that runs them all.

A packed batch lists its R responses query after query. The losses see them as a [G, K] matrix
(`Lists`: K = the most responses of one query, padding masked out), so that every loss is a few
masked tensor operations over all queries at once, with no data-dependent shape (`rrhf-fast plan`
runs them on fake tensors). The inputs are per response: S, the sum of its token log-probs under
the policy (differentiable), n its token count, its dense rank in its query (0 = lowest, from the
fp64 scores: equal scores, equal ranks), the fp64 score itself, and S_ref, the reference model's
sum (`rrhf-fast ref-logps`) for the losses that need one.

Equal scores, the rule of every loss here: two responses with equal scores form no pair, so no
pairwise term and no Plackett-Luce "placed before" between them; listwise losses group them as in
Breslow's partial likelihood (each tied response's denominator holds the others, objectives/reward.py
does the same for `--rm-loss listwise`). The "best" response (SFT target, `--pairs best`) is the
first of the top-scored ones. A query with one response, or whose scores all tie, has no pair.
"""

from __future__ import annotations

import abc
import contextlib
import math
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from rrhf_fast.data.packing import PackedBatch, TokenizedExample
from rrhf_fast.errors import UserError
from rrhf_fast.objectives.base import Objective, ObjectiveOutput, token_logprobs
from rrhf_fast.objectives.metrics import Metrics
from rrhf_fast.objectives.reference import require_ref_logps

DPO_LOSSES = ("sigmoid", "hinge", "ipo", "robust")  # = config.DPO_LOSSES, TRL's DPOTrainer loss_type names
PAIRS = ("all", "best")  # = config.PAIRS


class Lists(NamedTuple):
    """Each query's responses as one row of a [G, K] matrix."""

    index: torch.Tensor  # [G, K] long: the response (0..R-1) in each slot, 0 in padding
    mask: torch.Tensor  # [G, K] bool: a real response

    def rows(self, values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """[R] per response -> [G, K], `fill` in the padding."""
        # index_select: its backward is deterministic on a multi-threaded CPU (an indexing backward
        # accumulates repeated indices, here the padding's 0, in a thread-dependent order)
        rows = values.index_select(0, self.index.flatten()).view(*self.index.shape, *values.shape[1:])
        return rows.masked_fill(~self.mask, fill)

    def to(self, device: torch.device) -> Lists:
        return Lists(self.index.to(device), self.mask.to(device))


def lists_of(response_query: torch.Tensor, num_queries: int, k_max: int | None = None) -> Lists:
    """The [G, K] layout of responses whose queries are `response_query` [R] (any order; a query keeps
    its responses' order). Built from host values (`tolist`), so that `rrhf-fast plan`, which runs the
    step under FakeTensorMode, gets the same shapes without a data-dependent tensor op."""
    rq = response_query.tolist()
    slots: list[list[int]] = [[] for _ in range(num_queries)]
    for r, q in enumerate(rq):
        slots[q].append(r)
    k = max([len(s) for s in slots] + [k_max or 1])
    index = [s + [0] * (k - len(s)) for s in slots]
    mask = [[True] * len(s) + [False] * (k - len(s)) for s in slots]
    return Lists(
        torch.tensor(index, dtype=torch.long).view(num_queries, k), torch.tensor(mask).view(num_queries, k)
    )


class ListInputs(NamedTuple):
    """A batch's responses as the losses read them, each [G, K] (padding: 0, ranks -1)."""

    sums: torch.Tensor  # S, differentiable
    lengths: torch.Tensor  # n, float
    ranks: torch.Tensor  # dense rank in the query, 0 = lowest; -1 in padding
    scores: torch.Tensor  # the fp64 scores (PRO's temperature, LiPO's gains)
    ref: torch.Tensor | None  # S_ref, or None
    mask: torch.Tensor  # [G, K] bool

    @property
    def better(self) -> torch.Tensor:
        """[G, K, K]: response i scored above response j (equal scores: no pair)."""
        m = self.mask[:, :, None] & self.mask[:, None, :]
        return m & (self.ranks[:, :, None] > self.ranks[:, None, :])

    @property
    def best(self) -> torch.Tensor:
        """[G] the slot of each query's best response, the first of the top-scored ones."""
        return self.ranks.masked_fill(~self.mask, -torch.inf).argmax(1)

    @property
    def paired(self) -> torch.Tensor:
        """[G] bool: the query has two responses of different scores."""
        return self.better.flatten(1).any(1)


def list_inputs(
    sums: torch.Tensor,
    lengths: torch.Tensor,
    ranks: torch.Tensor,
    scores: torch.Tensor,
    lists: Lists,
    ref: torch.Tensor | None = None,
) -> ListInputs:
    """Per-response tensors [R] -> ListInputs."""
    device = sums.device
    lists = lists.to(device)
    return ListInputs(
        lists.rows(sums),
        lists.rows(lengths.to(device, sums.dtype), 1.0),
        lists.rows(ranks.to(device, torch.float64), -1.0),
        lists.rows(scores.to(device, torch.float64)),
        None if ref is None else lists.rows(ref.to(device, sums.dtype)),
        lists.mask,
    )


class RankingOutput(NamedTuple):
    loss: torch.Tensor  # rank_loss + sft_loss
    rank_loss: torch.Tensor
    sft_loss: torch.Tensor
    margin: torch.Tensor  # detached: per query the mean of u_i - u_j over its pairs, summed / normalizer
    response_scores: torch.Tensor  # [G, K] detached: the loss's own score u of each response


def finish(
    x: ListInputs,
    rank_q: torch.Tensor,
    sft_q: torch.Tensor | None,
    u: torch.Tensor,
    normalizer: float | None,
) -> RankingOutput:
    """Sum the per-query terms [G] and divide by `normalizer` (default: the queries with a pair, or
    every query when the loss has an SFT term, which a query without a pair still trains)."""
    if normalizer is None:
        normalizer = float(x.mask.shape[0]) if sft_q is not None else x.paired.sum().clamp(min=1)
    rank_loss = rank_q.sum() / normalizer
    sft_loss = sft_q.sum() / normalizer if sft_q is not None else torch.zeros_like(rank_loss)
    with torch.no_grad():
        better = x.better
        gaps = (u[:, :, None] - u[:, None, :]).masked_fill(~better, 0.0)
        margin = (gaps.flatten(1).sum(1) / better.flatten(1).sum(1).clamp(min=1)).sum() / normalizer
    return RankingOutput(rank_loss + sft_loss, rank_loss, sft_loss, margin, u.detach())


# -------------------------------------------------------------------------------------------------
# shared terms


def sft_term(x: ListInputs) -> torch.Tensor:
    """[G] the token-mean negative log-likelihood of each query's best response, -S_b / n_b."""
    b = x.best[:, None]
    return -(x.sums.gather(1, b) / x.lengths.gather(1, b)).squeeze(1)


def pair_mask(x: ListInputs, pairs: str) -> torch.Tensor:
    """[G, K, K] the pairs (i better than j) a pairwise loss sums: every pair of different scores
    (`all`), or the best response against each lower-scored one (`best`)."""
    better = x.better
    if pairs == "all":
        return better
    if pairs != "best":
        raise ValueError(f"pairs must be one of {PAIRS}, got {pairs!r}")
    is_best = torch.nn.functional.one_hot(x.best, x.mask.shape[1]).bool()
    return better & is_best[:, :, None]


def pair_mean(values: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """[G] the mean of `values` [G, K, K] over each query's `pairs` (0 without a pair)."""
    total = values.masked_fill(~pairs, 0.0).flatten(1).sum(1)
    return total / pairs.flatten(1).sum(1).clamp(min=1)


def plackett_luce(u: torch.Tensor, x: ListInputs, numerator: torch.Tensor | None = None) -> torch.Tensor:
    """[G] the Plackett-Luce negative log-likelihood of each query's ranking under scores u [G, K] (or
    [G, K, K]: u[g, i, j], the score of j in the denominator of i's term), ties grouped: the terms
    are the responses i that beat another, -log(exp(num_i) / sum_{j: rank_j <= rank_i} exp(u_ij))."""
    pool = x.mask[:, None, :] & (x.ranks[:, None, :] <= x.ranks[:, :, None])  # [G, i, j]
    full = u if u.dim() == 3 else u[:, None, :].expand_as(pool)
    lse = full.masked_fill(~pool, -torch.inf).logsumexp(-1)
    num = u if numerator is None else numerator
    term = x.better.any(2)
    return (lse - num).masked_fill(~term, 0.0).sum(1)


def pairwise_preference(
    delta: torch.Tensor,
    kind: str,
    beta: float,
    *,
    label_smoothing: float = 0.0,
    delta_per_token: torch.Tensor | None = None,
) -> torch.Tensor:
    """DPO's loss of a pair whose log-ratio difference is `delta` (chosen minus rejected), as TRL's
    DPOTrainer `loss_type` (trl/trainer/dpo_trainer.py `_compute_loss`, TRL 1.16):
    sigmoid -log sigmoid(beta d) (DPO Eq. 7); hinge relu(1 - beta d) (SLiC);
    ipo (d' - 1 / (2 beta))^2 with d' the difference of per-token log-ratios (IPO Eq. 17, TRL's length
    normalisation); robust ((1 - e)(-log sigmoid(beta d)) - e(-log sigmoid(-beta d))) / (1 - 2e),
    e = label_smoothing, the probability that a label is flipped (Robust DPO, Chowdhury et al. 2024,
    arXiv 2403.00409)."""
    if kind == "sigmoid":
        return -F.logsigmoid(beta * delta)
    if kind == "hinge":
        return torch.relu(1 - beta * delta)
    if kind == "ipo":
        if delta_per_token is None:
            raise ValueError("the ipo loss needs delta_per_token")
        return (delta_per_token - 1 / (2 * beta)) ** 2
    if kind == "robust":
        e = label_smoothing
        return ((1 - e) * -F.logsigmoid(beta * delta) - e * -F.logsigmoid(-beta * delta)) / (1 - 2 * e)
    raise ValueError(f"kind must be one of {DPO_LOSSES}, got {kind!r}")


# -------------------------------------------------------------------------------------------------
# the objective every ranking loss runs through


class RankingObjective(Objective):
    """A loss over each query's list of responses, on the packed token log-probs (the fused kernel):
    subclasses say whether they need reference log-probs and an SFT term, and give `compute`."""

    terms = ("loss", "rank_loss", "sft_loss", "margin")
    needs_reference: ClassVar[bool] = False
    has_sft: ClassVar[bool] = False

    @abc.abstractmethod
    def compute(self, x: ListInputs, normalizer: float | None) -> RankingOutput:
        """The loss of the batch's lists, its per-query sums divided by `normalizer`."""

    def __call__(
        self,
        model: Any,
        batch: PackedBatch,
        *,
        normalizer: float,
        autocast: contextlib.AbstractContextManager | None = None,
    ) -> ObjectiveOutput:
        if self.needs_reference and any(math.isnan(v) for v in batch.ref_logps.tolist()):  # host values
            raise UserError(
                f'--loss {self.name}: a micro-batch has responses without "ref_logps"; add them to the data '
                "with `rrhf-fast ref-logps`"
            )
        logp = token_logprobs(model, batch, self.config, autocast)
        device = logp.device
        sums = logp.new_zeros(batch.num_responses).index_add(0, batch.token_response.to(device), logp)
        lists = lists_of(batch.response_query, batch.num_queries, batch.max_responses)
        ref = batch.ref_logps if self.needs_reference else None
        x = list_inputs(sums, batch.response_len, batch.ranks, batch.scores, lists, ref)
        out = self.compute(x, normalizer)
        slot = lists.index.to(device).masked_fill(~x.mask, batch.num_responses).flatten()  # padding: a spare
        u = out.response_scores.flatten()
        scores = u.new_zeros(batch.num_responses + 1).scatter(0, slot, u)[: batch.num_responses]
        terms = [out.loss, out.rank_loss, out.sft_loss, out.margin]
        return ObjectiveOutput(out.loss, Metrics.of_batch(self.terms, terms, scores, batch))

    def normalizer(self, items: Sequence[TokenizedExample]) -> float:
        """Every query with an SFT term; else the queries with a pair (a tied query adds nothing)."""
        return float(len(items)) if self.has_sft else float(max(paired_queries(items), 1))

    def check_data(
        self, items: Sequence[TokenizedExample], path: str, where: Sequence[str] | None = None
    ) -> None:
        if self.needs_reference:
            require_ref_logps(items, path, where, self.config.tokenizing(), loss=self.name)
        if not self.has_sft or not self.sft_weight():
            require_pairs(items, path, self.name)

    def sft_weight(self) -> float:
        return 0.0


def paired_queries(items: Sequence[TokenizedExample]) -> int:
    """How many of the queries have two responses of different scores."""
    return sum(1 for it in items if it.scores and min(it.scores) < max(it.scores))


def require_pairs(items: Sequence[TokenizedExample], path: str, loss: str) -> None:
    """A loss without an SFT term learns nothing from data without a pair of different scores."""
    if not paired_queries(items):
        raise UserError(
            f"{path}: no query has two responses with different scores, so --loss {loss} has nothing to "
            "train on; give each query at least two responses scored differently"
        )
