"""The interface of a training objective, what `--loss` chooses (the registry is objectives/__init__).

An objective owns its forward: given the model (or the module DDP / FSDP2 wrap, `packed_module`)
and a PackedBatch, it runs the model the way its loss needs (RRHF and DPO: token log-probs of the
packed responses through the fused kernel; a reward model would read last-token hidden states
through a score head) and returns the differentiable loss and the batch's summed metrics. The
training loop and held-out evaluation only call it: they never look inside a loss.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import torch

from rrhf_fast.config import TrainConfig
from rrhf_fast.data.packing import PackedBatch, TokenizedExample
from rrhf_fast.errors import UserError
from rrhf_fast.models.loading import load_model
from rrhf_fast.models.logprobs import PackedLogprobs, check_logit_parity, packed_logprobs, prepare_model
from rrhf_fast.objectives.metrics import Metrics


class ObjectiveOutput(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable: the batch's summed loss / normalizer
    metrics: Metrics  # the same loss's terms, detached, and the batch's ranking counts


class Objective(abc.ABC):
    """A loss over packed batches, built from the run's TrainConfig."""

    name: ClassVar[str]  # the --loss value
    terms: ClassVar[tuple[str, ...]]  # the loss terms its metrics report, "loss" first
    # A loss of a better and a worse response of one query (DPO, a reward model's Bradley-Terry):
    # on data where no query has two differently scored responses it is 0 with a zero gradient, and
    # a run would end "done" with unchanged weights; check_data refuses such data.
    needs_pair: ClassVar[bool] = False

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    @abc.abstractmethod
    def __call__(
        self,
        model: Any,
        batch: PackedBatch,
        *,
        normalizer: float,
        autocast: contextlib.AbstractContextManager | None = None,
    ) -> ObjectiveOutput:
        """Forward `batch` through `model` (under `autocast`, the loss itself outside it) and return
        its loss: sums over the batch's queries divided by `normalizer` queries, so the micro-batches
        of a step (and the ranks of a torchrun job) add up to the gradient of the step's mean.

        `model` is the causal LM (or a peft model around one) in a single process, and under torchrun
        what DDP / FSDP2 made of `packed_module(model)`: the forward must go through it then."""

    def packed_module(self, model: Any) -> torch.nn.Module:
        """The module whose forward is this objective's whole forward: what DDP / FSDP2 wrap, since
        both act only on a forward that runs through the wrapped module (parallel/distributed.py)."""
        return PackedLogprobs(model)

    def load_model(
        self, device: torch.device, tokenizer: Any, autocast: contextlib.AbstractContextManager
    ) -> Any:
        """The model this objective trains, from --model, switched to packed attention and checked
        against its own forward under the run's `autocast` (what packing cannot mirror is refused):
        here the causal LM."""
        model = prepare_model(load_model(self.config, device))
        with autocast:
            check_logit_parity(model, attn=self.config.attn, impl=self.config.kernels)
        return model

    def check_data(
        self, items: Sequence[TokenizedExample], path: str, where: Sequence[str] | None = None
    ) -> None:
        """Raise UserError, naming `path` (or the record's `where`, "FILE:LINE"), if the tokenised data
        lacks a field this objective needs, or has no pair to learn from when it `needs_pair`. It runs
        before the model loads. A subclass that extends it calls it too."""
        if self.needs_pair and not any(has_pair(it) for it in items):
            raise UserError(
                f"{path}: no query has two responses with different scores, so --loss {self.name} has no "
                "pair to learn from and would train nothing; give each query at least two responses "
                "scored differently"
            )

    def normalizer(self, items: Sequence[TokenizedExample]) -> float:
        """What the loss sums of a step (or an evaluation) over `items` are divided by: its queries."""
        return float(len(items))

    def zero_metrics(self) -> Metrics:
        return Metrics.zeros(self.terms)


def has_pair(item: TokenizedExample) -> bool:
    """Whether the query has a better and a worse response (its scores are not all equal)."""
    return len(item.scores) > 1 and min(item.scores) < max(item.scores)


def token_logprobs(
    model: Any, batch: PackedBatch, config: TrainConfig, autocast: contextlib.AbstractContextManager | None
) -> torch.Tensor:
    """The packed forward of the log-prob objectives: log pi of every response token of `batch`, [M] fp32."""
    with autocast or contextlib.nullcontext():
        return packed_logprobs(model, batch, attn=config.attn, impl=config.kernels)
