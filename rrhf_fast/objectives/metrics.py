"""The metrics every objective reports, for a training step and for held-out evaluation alike.

- the loss terms the objective names (`Objective.terms`, "loss" first), each a sum over the
  batch's queries divided by the step's (or evaluation's) query count, so micro-batches and ranks
  add up to the mean;
- whether the model orders each query's responses like their reward scores, from the model's own
  score of each response (RRHF: the length-normalised log-probability it ranks by; DPO, dpo-pl,
  lipo: the implicit reward beta * (S - S_ref); pro: S / n; simpo: beta * S / n; orpo: the log odds):
  accuracy: over the ordered pairs (i, j) of a query with r_i < r_j, the fraction with p_i < p_j
  (equal rewards are no pair); top1: the fraction of queries whose highest-p response has the
  highest reward; best_reward: the mean reward of the highest-p response, the reward a best-of-k
  pick by the model itself would collect.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rrhf_fast.data.packing import PackedBatch
from rrhf_fast.kernels.reference import best_response


@dataclass
class RankingCounts:
    """Sums over queries, so that micro-batches add up before dividing."""

    correct_pairs: int = 0
    pairs: int = 0
    top1: int = 0
    best_reward: float = 0.0
    queries: int = 0
    tied: int = 0  # queries whose rewards all tie: no pair to rank (DPO leaves them out of its mean)

    def __iadd__(self, other: RankingCounts) -> RankingCounts:
        self.correct_pairs += other.correct_pairs
        self.pairs += other.pairs
        self.top1 += other.top1
        self.best_reward += other.best_reward
        self.queries += other.queries
        self.tied += other.tied
        return self

    def summary(self, prefix: str = "") -> dict[str, float | None]:
        q = max(self.queries, 1)
        return {
            f"{prefix}accuracy": self.correct_pairs / self.pairs if self.pairs else None,
            f"{prefix}top1": self.top1 / q,
            f"{prefix}best_reward": self.best_reward / q,
            f"{prefix}tied_queries": self.tied,
        }


def ranking_counts(
    p: torch.Tensor, r: torch.Tensor, response_query: torch.Tensor, num_queries: int
) -> RankingCounts:
    """Pairwise and top-1 agreement of model scores `p` [R] with rewards `r` [R], per query.

    The rewards are compared in float64 (PackedBatch.scores): a float32 cast ties rewards that differ."""
    p, r, rq = p.detach().double().cpu(), r.detach().double().cpu(), response_query.cpu()
    pairs = (rq[:, None] == rq[None, :]) & (r[:, None] < r[None, :])
    correct = pairs & (p[:, None] < p[None, :])
    first = _first_argmax(p, rq, num_queries)
    r_max = torch.full((num_queries,), -torch.inf, dtype=r.dtype).scatter_reduce(0, rq, r, "amax")
    r_min = torch.full((num_queries,), torch.inf, dtype=r.dtype).scatter_reduce(0, rq, r, "amin")
    chosen = r[first]
    return RankingCounts(
        correct_pairs=int(correct.sum()),
        pairs=int(pairs.sum()),
        top1=int((chosen == r_max).sum()),
        best_reward=float(chosen.sum()),
        queries=num_queries,
        tied=int((r_max == r_min).sum()),
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


@dataclass
class Metrics:
    """An objective's loss terms (float64 sums on the CPU, named by `names`) and ranking counts."""

    names: tuple[str, ...]
    terms: torch.Tensor  # [len(names)] float64
    counts: RankingCounts = field(default_factory=RankingCounts)

    @classmethod
    def zeros(cls, names: tuple[str, ...]) -> Metrics:
        return cls(names, torch.zeros(len(names), dtype=torch.float64))

    @classmethod
    def of_batch(
        cls,
        names: tuple[str, ...],
        terms: list[torch.Tensor],
        response_scores: torch.Tensor,
        batch: PackedBatch,
    ) -> Metrics:
        """A micro-batch's metrics: its loss terms (scalars, `names` order) and the model's score of
        each of its responses [R], ranked against the batch's rewards."""
        values = torch.stack([t.detach() for t in terms]).double().cpu()
        counts = ranking_counts(response_scores, batch.scores, batch.response_query, batch.num_queries)
        return cls(names, values, counts)

    def __iadd__(self, other: Metrics) -> Metrics:
        self.terms = self.terms + other.terms
        self.counts += other.counts
        return self

    @property
    def loss(self) -> float:
        return float(self.terms[0])

    def summary(self, prefix: str = "") -> dict[str, float | None]:
        """The metrics row's fields: each loss term, then accuracy, top1, best_reward."""
        return {**{prefix + n: v for n, v in zip(self.names, self.terms.tolist(), strict=True)},
                **self.counts.summary(prefix)}  # fmt: skip

    def to_list(self) -> list[float]:
        """Every sum as one flat list (what an all-reduce over ranks adds up); from_list reads it back."""
        c = self.counts
        return [*self.terms.tolist(), c.correct_pairs, c.pairs, c.top1, c.best_reward, c.queries, c.tied]

    @classmethod
    def from_list(cls, names: tuple[str, ...], values: list[float]) -> Metrics:
        n = len(names)
        correct, pairs, top1, best, queries, tied = values[n : n + 6]
        counts = RankingCounts(int(correct), int(pairs), int(top1), best, int(queries), int(tied))
        return cls(names, torch.tensor(values[:n], dtype=torch.float64), counts)
