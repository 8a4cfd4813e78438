"""Which queries each optimizer step trains: a pure function of (seed, epoch, packed lengths, flags),
so that every rank plans the same steps and a resumed run replays them exactly.

A step is a list of micro-batches, a micro-batch a list of query indices whose packed lengths fit
--micro-batch-tokens. Each epoch is a seeded permutation of the queries cut into steps; under
torchrun every rank takes its share of each step's micro-batches (`rank_share`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rrhf_fast.config import TrainConfig
from rrhf_fast.data.packing import PackedBatch, TokenizedExample, pack_tokenized, plan_microbatches
from rrhf_fast.parallel import distributed
from rrhf_fast.parallel.distributed import Dist

Step = list[list[int]]  # micro-batches -> query indices


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def plan_steps(lengths: list[int], order: list[int], config: TrainConfig) -> list[Step]:
    """Steps -> micro-batches -> query indices.

    --queries-per-step N: each step takes the next N queries, split by the token budget (the
    update does not depend on the budget). Otherwise each step is --grad-accum micro-batches, each
    filled up to the budget (as fairseq's --max-tokens / --update-freq).
    """

    def split(indices: list[int]) -> list[list[int]]:
        groups = plan_microbatches([lengths[i] for i in indices], config.micro_batch_tokens)
        return [[indices[j] for j in group] for group in groups]

    if config.queries_per_step:
        n = config.queries_per_step
        return [split(order[s : s + n]) for s in range(0, len(order), n)]
    micro = split(order)
    return [micro[s : s + config.grad_accum] for s in range(0, len(micro), config.grad_accum)]


@dataclass(frozen=True)
class StepPlanner:
    """The steps of each epoch of a run over queries of these packed lengths, with these flags."""

    lengths: list[int]
    config: TrainConfig

    def steps_of_epoch(self, epoch: int, done: int = 0) -> list[Step]:
        """The epoch's steps after its first `done` queries (greedy planning: the same steps as the
        whole epoch's from that point on, whenever `done` ends a step of the same flags)."""
        order = epoch_order(len(self.lengths), self.config.seed, epoch)
        return plan_steps(self.lengths, order[done:], self.config)

    def total_steps(self) -> int:
        """--max-steps, or the steps of --epochs epochs."""
        config = self.config
        return config.max_steps or sum(len(self.steps_of_epoch(e)) for e in range(config.epochs))


def queries_in(steps: Sequence[Step]) -> int:
    return sum(len(group) for step in steps for group in step)


@dataclass
class RankStep:
    """This rank's share of one step: its packed micro-batches, of which the first `own` are its
    own and the rest repeat the step's smallest to keep in step with the other ranks (weight 0)."""

    batches: list[PackedBatch]
    own: int
    queries: int  # the whole step's query count, over every rank
    normalizer: float  # what its losses are divided by (Objective.normalizer of the whole step)

    @property
    def tokens(self) -> int:
        return sum(b.num_tokens for b in self.batches[: self.own])


def rank_share(step: Step, items: Sequence[TokenizedExample], dist: Dist, objective: Any = None) -> RankStep:
    groups, own = distributed.my_microbatches(step, dist)
    batches = [pack_tokenized([items[i] for i in group]) for group in groups]
    queries = queries_in([step])
    mine = [items[i] for group in step for i in group]
    return RankStep(batches, own, queries, objective.normalizer(mine) if objective else float(queries))


def plan_summary(planner: StepPlanner, schedule: dict[str, Any]) -> dict[str, Any]:
    """The run's step plan for a person and the trackers: the first epoch's steps and micro-batches,
    with the learning-rate schedule."""
    steps = planner.steps_of_epoch(0)
    micro = [len(step) for step in steps] or [0]
    per_step = queries_in(steps) / max(len(steps), 1)
    return {**schedule, "steps_per_epoch": len(steps), "queries_per_step": per_step,
            "micro_batches_per_step": [min(micro), max(micro)],
            "micro_batch_tokens": planner.config.micro_batch_tokens}  # fmt: skip
