"""RRHF (`--loss rrhf`, the default): the ranking loss plus the SFT loss on each query's best response.

The math and its two normalisations (`--length-norm paper|official`, alias `--mode`) are the kernel's,
`rrhf_fast.kernels.rrhf_loss`; this objective feeds it the packed token log-probs and the flags.
"""

from __future__ import annotations

import contextlib
from typing import Any

from rrhf_fast.data.packing import PackedBatch
from rrhf_fast.kernels import rrhf_loss
from rrhf_fast.objectives.base import Objective, ObjectiveOutput, token_logprobs
from rrhf_fast.objectives.metrics import Metrics


class RRHF(Objective):
    name = "rrhf"
    terms = ("loss", "rank_loss", "sft_loss")

    def __call__(
        self,
        model: Any,
        batch: PackedBatch,
        *,
        normalizer: float,
        autocast: contextlib.AbstractContextManager | None = None,
    ) -> ObjectiveOutput:
        config = self.config
        logp = token_logprobs(model, batch, config, autocast)
        device = logp.device
        out = rrhf_loss(
            logp,
            batch.token_response.to(device),
            batch.response_query.to(device),
            batch.ranks.to(device),  # the exact order of the float64 scores (packing.score_ranks)
            prompt_len=batch.prompt_len.to(device),
            length_penalty=config.length_penalty,
            rank_weight=config.rank_weight,
            sft_weight=config.sft_weight,
            mode=config.length_norm,
            sft_reduction=config.sft_reduction,
            normalizer=normalizer,
            k_max=batch.max_responses,
            impl=config.kernels,
        )
        terms = [out.loss, out.rank_loss, out.sft_loss]
        metrics = Metrics.of_batch(self.terms, terms, out.response_scores, batch)
        return ObjectiveOutput(out.loss, metrics)
