"""DPO on the packed batch (`--loss dpo`), and the reference log-probs it needs (`rrhf-fast ref-logps`).

For each query with k responses, w = its best response by reward and l = its worst (first index
on ties); a query whose rewards all tie has no pair and adds 0. With S = a response's SUM of token
log-probs under the policy and S_ref the same under the reference model:

    loss_q = -log sigmoid(beta * ((S_w - S_ref_w) - (S_l - S_ref_l)))

summed over queries and divided by `normalizer` (the global query count, as rrhf_loss does), or
averaged over the batch's queries without one. S_ref is computed ONCE, before training, by the
same fused path (packed_logprobs over packed batches) and stored in each JSONL record as
`ref_logps` (one number per response), so only the policy is in memory while training.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from rrhf_fast import config as config_module
from rrhf_fast.config import TrainConfig
from rrhf_fast.data.packing import (
    PackedBatch,
    TokenizedExample,
    pack_tokenized,
    plan_microbatches,
    tokenize_example,
)
from rrhf_fast.data.records import Example, load_examples_with_stats, write_examples
from rrhf_fast.errors import UserError
from rrhf_fast.kernels.reference import best_response
from rrhf_fast.models.logprobs import packed_logprobs
from rrhf_fast.models.wrapping import eval_mode
from rrhf_fast.objectives.base import Objective, ObjectiveOutput, token_logprobs
from rrhf_fast.objectives.metrics import Metrics


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
) -> DPOOutput:
    """DPO loss of a packed batch (module docstring); differentiable in `logp` [M]."""
    num_responses = response_query.numel()
    implicit = beta * (response_sums(logp, token_response, num_responses) - ref_logps.to(logp.dtype))
    scores = scores.to(logp.dtype)
    best = best_response(response_query, scores, num_queries)
    worst = best_response(response_query, -scores, num_queries)  # the first minimum
    per_query = -F.logsigmoid(implicit[best] - implicit[worst])
    has_pair = scores[best] > scores[worst]  # else all rewards of the query tie
    per_query = torch.where(has_pair, per_query, torch.zeros_like(per_query))
    loss = per_query.sum() / (normalizer if normalizer is not None else max(num_queries, 1))
    return DPOOutput(loss, loss, torch.zeros_like(loss), implicit.detach())


class DPO(Objective):
    """`--loss dpo`: dpo_loss on the packed token log-probs, with each response's stored ref_logps."""

    name = "dpo"
    terms = ("loss", "rank_loss", "sft_loss")  # as RRHF's, so that runs of either plot alike

    def __call__(
        self,
        model: Any,
        batch: PackedBatch,
        *,
        normalizer: float,
        autocast: contextlib.AbstractContextManager | None = None,
    ) -> ObjectiveOutput:
        if torch.isnan(batch.ref_logps).any():  # on the CPU side: no device sync
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
            batch.scores.to(device),
            batch.ref_logps.to(device),
            num_queries=batch.num_queries,
            beta=self.config.dpo_beta,
            normalizer=normalizer,
        )
        terms = [out.loss, out.rank_loss, out.sft_loss]
        metrics = Metrics.of_batch(self.terms, terms, out.response_scores, batch)
        return ObjectiveOutput(out.loss, metrics)

    def check_data(self, items: Sequence[TokenizedExample], path: str) -> None:
        require_ref_logps(items, path)


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


def add_reference_logps(model: Any, tokenizer: Any, examples: list[Example], config: TrainConfig) -> None:
    """Set each example's meta["ref_logps"], tokenised exactly as training with `config` will."""
    items = [
        tokenize_example(ex, tokenizer, max_prompt_len=config.max_prompt_len,
                         max_response_len=config.max_response_len, chat_template=config.chat_template)
        for ex in examples
    ]  # fmt: skip
    device = next(model.parameters()).device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    sums = reference_logps(model, items, micro_batch_tokens=config.micro_batch_tokens, attn=config.attn,
                           impl=config.kernels, autocast=autocast)  # fmt: skip
    for ex, row in zip(examples, sums, strict=True):
        ex.meta["ref_logps"] = row


def require_ref_logps(items: Sequence[TokenizedExample], path: str) -> None:
    """--loss dpo: every training example must carry its reference log-probs."""
    missing = [i for i, it in enumerate(items) if not it.ref_logps]
    if missing:
        raise UserError(
            f'{path}: --loss dpo needs a "ref_logps" list (the reference model\'s log-prob sum of each '
            f"response) in every record, but {len(missing)} of {len(items)} have none (the first is record "
            f"{missing[0] + 1}); add them with `rrhf-fast ref-logps --model REF --in {path} --out FILE`"
        )


# -------------------------------------------------------------------------------------------------
# rrhf-fast ref-logps

# The TrainConfig flags that decide the tokens and the numerics of the log-probs.
_FLAGS = ("model", "max_prompt_len", "max_response_len", "chat_template", "micro_batch_tokens", "attn",
          "kernels", "dtype", "device")  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--in", dest="in_path", required=True, metavar="FILE", help="scored training JSONL")
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
    examples = load_examples_with_stats(config.data, require_scores=False).examples
    if not examples:
        raise UserError(f"{config.data}: holds no examples")
    device = resolve_device(config.device)
    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[weight_dtype(config.dtype)]
    from transformers import AutoModelForCausalLM

    model, _ = load_pretrained(config.model, AutoModelForCausalLM, str(device), dtype)
    add_reference_logps(model, load_tokenizer(config.model), examples, config)
    write_examples(out_path, examples)
    return examples
