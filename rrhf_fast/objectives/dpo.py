"""DPO on the packed batch (`--loss dpo`), and the reference log-probs it needs (`rrhf-fast ref-logps`).

For each query with k responses, w = its best response by reward and l = its worst (first index
on ties); a query whose rewards all tie has no pair and adds 0. With S = a response's SUM of token
log-probs under the policy and S_ref the same under the reference model:

    loss_q = -log sigmoid(beta * ((S_w - S_ref_w) - (S_l - S_ref_l)))

(`--dpo-loss sigmoid`, the default; hinge, ipo and robust are TRL's DPOTrainer loss types of the
same pair, objectives/ranking.py `pairwise_preference`)
summed over the queries with a pair and divided by `normalizer` (the step's count of queries with
a pair, `paired_queries`), or averaged over the batch's paired queries without one: TRL's
`loss_type="sigmoid"` mean over pairs (trl/trainer/dpo_trainer.py, `_compute_loss`). S_ref is
computed ONCE, before training, by the same fused path (packed_logprobs over packed batches) and
stored in each record as `ref_logps` (one number per response), so only the policy is in memory
while training.

Beside them, `ref_logps_from` records what produced them: the tokenising flags and each response's
token count. `train --loss dpo` refuses a record whose provenance differs from the run's (other
flags or tokenizer: the numbers belong to other tokens; step 1 of a policy that is its own
reference read 7.06 instead of ln 2). Records with bare `ref_logps` (written before the
provenance existed) are used unchecked, with one warning: their numbers may be right, and a
re-run of `ref-logps` makes them checkable.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from rrhf_fast import config as config_module
from rrhf_fast.config import TrainConfig
from rrhf_fast.data.outputs import check_output_file
from rrhf_fast.data.packing import (
    PackedBatch,
    TokenizedExample,
    check_positions,
    pack_tokenized,
    plan_microbatches,
)
from rrhf_fast.data.records import Example, load_examples_with_stats, write_examples
from rrhf_fast.data.tokenize import tokenize_examples
from rrhf_fast.errors import UserError
from rrhf_fast.kernels.reference import best_response
from rrhf_fast.models.loading import max_positions
from rrhf_fast.models.logprobs import packed_logprobs
from rrhf_fast.models.wrapping import eval_mode
from rrhf_fast.objectives.base import Objective, ObjectiveOutput, token_logprobs
from rrhf_fast.objectives.metrics import Metrics
from rrhf_fast.objectives.ranking import paired_queries, pairwise_preference, require_pairs
from rrhf_fast.objectives.reference import provenance, require_ref_logps

logger = logging.getLogger(__name__)


class DPOOutput(NamedTuple):
    """The DPO term is also reported as the ranking loss (the metrics keep RRHF's three terms)."""

    loss: torch.Tensor
    rank_loss: torch.Tensor
    sft_loss: torch.Tensor
    response_scores: torch.Tensor  # [R] the implicit reward beta * (S - S_ref)


def response_sums(logp: torch.Tensor, token_response: torch.Tensor, num_responses: int) -> torch.Tensor:
    """S_i = the sum of response i's token log-probs: [R] in logp's dtype."""
    return logp.new_zeros(num_responses).index_add(0, token_response, logp)


def dpo_loss(
    logp: torch.Tensor,
    token_response: torch.Tensor,
    response_query: torch.Tensor,
    scores: torch.Tensor,
    ref_logps: torch.Tensor,
    *,
    num_queries: int,
    beta: float = 0.1,
    normalizer: float | None = None,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    response_len: torch.Tensor | None = None,
) -> DPOOutput:
    """DPO loss of a packed batch (module docstring); differentiable in `logp` [M]. `loss_type` and
    `label_smoothing` as TRL's; `ipo` needs `response_len` [R] (its log-ratios are per token)."""
    num_responses = response_query.numel()
    ratio = response_sums(logp, token_response, num_responses) - ref_logps.to(logp.dtype)
    implicit = beta * ratio
    scores = scores.to(logp.dtype)
    best = best_response(response_query, scores, num_queries)
    worst = best_response(response_query, -scores, num_queries)  # the first minimum
    per_token = None
    if loss_type == "ipo":
        if response_len is None:
            raise ValueError("loss_type='ipo' needs response_len")
        per_token_ratio = ratio / response_len.to(ratio.device, ratio.dtype).clamp(min=1)
        per_token = per_token_ratio[best] - per_token_ratio[worst]
    delta = ratio[best] - ratio[worst]
    per_query = pairwise_preference(delta, loss_type, beta, label_smoothing=label_smoothing,
                                    delta_per_token=per_token)  # fmt: skip
    has_pair = scores[best] > scores[worst]  # else all rewards of the query tie
    per_query = torch.where(has_pair, per_query, torch.zeros_like(per_query))
    if normalizer is None:
        normalizer = has_pair.sum().clamp(min=1)
    loss = per_query.sum() / normalizer
    return DPOOutput(loss, loss, torch.zeros_like(loss), implicit.detach())


class DPO(Objective):
    """`--loss dpo`: dpo_loss on the packed token log-probs, with each response's stored ref_logps."""

    name = "dpo"
    terms = ("loss", "rank_loss", "sft_loss")  # as RRHF's, so that runs of either plot alike
    needs_pair = True

    def __call__(
        self,
        model: Any,
        batch: PackedBatch,
        *,
        normalizer: float,
        autocast: contextlib.AbstractContextManager | None = None,
    ) -> ObjectiveOutput:
        if any(math.isnan(v) for v in batch.ref_logps.tolist()):  # host values (also under `plan`'s fakes)
            raise UserError(
                '--loss dpo: a micro-batch has responses without "ref_logps"; add them to the data with '
                "`rrhf-fast ref-logps`"
            )
        logp = token_logprobs(model, batch, self.config, autocast)
        device = logp.device
        out = dpo_loss(
            logp,
            batch.token_response.to(device),
            batch.response_query.to(device),
            batch.ranks.to(device),  # the exact order of the float64 scores (packing.score_ranks)
            batch.ref_logps.to(device),
            num_queries=batch.num_queries,
            beta=self.config.dpo_beta,
            normalizer=normalizer,
            loss_type=self.config.dpo_loss,
            label_smoothing=self.config.dpo_label_smoothing,
            response_len=batch.response_len.to(device),
        )
        terms = [out.loss, out.rank_loss, out.sft_loss]
        metrics = Metrics.of_batch(self.terms, terms, out.response_scores, batch)
        return ObjectiveOutput(out.loss, metrics)

    def check_data(
        self, items: Sequence[TokenizedExample], path: str, where: Sequence[str] | None = None
    ) -> None:
        super().check_data(items, path, where)
        require_ref_logps(items, path, where, self.config.tokenizing())
        require_pairs(items, path, self.name)

    def normalizer(self, items: Sequence[TokenizedExample]) -> float:
        """The queries that form a pair: a query whose rewards all tie adds nothing to the sum, so it
        must not dilute the mean (1.5363 -> 1.2803 with one tied query among six)."""
        return float(max(paired_queries(items), 1))


# -------------------------------------------------------------------------------------------------
# the reference log-probs, once per dataset


@torch.no_grad()
def reference_logps(
    model: Any,
    items: Sequence[TokenizedExample],
    *,
    micro_batch_tokens: int,
    attn: str = "auto",
    impl: str = "auto",
    autocast: contextlib.AbstractContextManager | None = None,
) -> list[list[float]]:
    """Per query, the sum of each response's token log-probs under `model`, by the training path."""
    out: list[list[float]] = []
    with eval_mode(model):
        for group in plan_microbatches([it.packed_len for it in items], micro_batch_tokens):
            batch = pack_tokenized([items[i] for i in group])
            with autocast or contextlib.nullcontext():
                logp = packed_logprobs(model, batch, attn=attn, impl=impl)
            sums = response_sums(logp.float(), batch.token_response.to(logp.device), batch.num_responses)
            sums = sums.cpu().tolist()
            for i in group:
                k = len(items[i].response_ids)
                out.append(sums[:k])
                sums = sums[k:]
    return out


def add_reference_logps(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    config: TrainConfig,
    locations: Sequence[str] | None = None,
) -> None:
    """Set each example's meta["ref_logps"], tokenised exactly as training with `config` will, and
    meta["ref_logps_from"], what produced them (`provenance`). A record longer than the model's
    max_position_embeddings is refused, as `train` refuses it (`locations` name the records)."""
    where = list(locations) if locations is not None else [f"record {i + 1}" for i in range(len(examples))]
    items = tokenize_examples(examples, tokenizer, locations=where, **config.tokenizing())
    check_positions(items, where, max_positions(model.config))
    device = next(model.parameters()).device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    sums = reference_logps(model, items, micro_batch_tokens=config.micro_batch_tokens, attn=config.attn,
                           impl=config.kernels, autocast=autocast)  # fmt: skip
    for ex, item, row in zip(examples, items, sums, strict=True):
        ex.meta["ref_logps"] = row
        ex.meta["ref_logps_from"] = provenance(item, config.tokenizing())


# -------------------------------------------------------------------------------------------------
# rrhf-fast ref-logps

# The TrainConfig flags that decide the tokens and the numerics of the log-probs.
_FLAGS = ("model", "max_prompt_len", "max_response_len", "chat_template", "micro_batch_tokens", "attn",
          "kernels", "dtype", "device", "data_split", "query_field", "responses_field",
          "scores_field")  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--in",
        dest="in_path",
        required=True,
        metavar="FILE",
        help="scored training data (any format of `train --data`)",
    )
    parser.add_argument("--out", required=True, metavar="FILE", help="the same records with ref_logps added")
    skip = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in _FLAGS]
    config_module.add_arguments(parser, TrainConfig, skip=skip)


def main(args: argparse.Namespace) -> int:
    config = TrainConfig(data=args.in_path, output_dir=".", **{name: getattr(args, name) for name in _FLAGS})
    examples = reference_file(config, args.out)
    print(f"wrote the reference log-probs of {len(examples)} queries to {args.out} (model {config.model})")
    return 0


def reference_file(config: TrainConfig, out_path: str) -> list[Example]:
    """Read `config.data`, add ref_logps computed with `config.model`, write `out_path` atomically."""

    from rrhf_fast.models.loading import load_pretrained, load_tokenizer, resolve_device, weight_dtype

    config.validate()
    stats = load_examples_with_stats(config.data, require_scores=False, **config.data_options())
    examples = stats.examples
    if not examples:
        raise UserError(f"{config.data}: holds no examples")
    check_output_file(out_path)
    device = resolve_device(config.device)
    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[weight_dtype(config.dtype)]
    from transformers import AutoModelForCausalLM

    model, _ = load_pretrained(config.model, AutoModelForCausalLM, str(device), dtype)
    add_reference_logps(model, load_tokenizer(config.model), examples, config, stats.locations())
    write_examples(out_path, examples)
    return examples
