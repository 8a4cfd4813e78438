"""RRHF (`--loss rrhf`, the default): the ranking loss plus the SFT loss on each query's best response.

The math and its two normalisations (`--length-norm paper|official`, alias `--mode`) are the kernel's,
`rrhf_fast.kernels.rrhf_loss`; this objective feeds it the packed token log-probs and the flags.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from typing import Any

from rrhf_fast.data.packing import PackedBatch, TokenizedExample
from rrhf_fast.errors import UserError
from rrhf_fast.kernels import rrhf_loss
from rrhf_fast.objectives.base import Objective, ObjectiveOutput, has_pair, token_logprobs
from rrhf_fast.objectives.metrics import Metrics

logger = logging.getLogger(__name__)


class RRHF(Objective):
    name = "rrhf"
    terms = ("loss", "rank_loss", "sft_loss")

    def check_data(
        self, items: Sequence[TokenizedExample], path: str, where: Sequence[str] | None = None
    ) -> None:
        """Without a query of two differently scored responses (k = 1 everywhere, or all tied) the
        ranking term is 0: the run trains the SFT term alone. Said once; refused when that is 0 too."""
        super().check_data(items, path, where)
        if any(has_pair(it) for it in items) or self.config.rank_weight == 0:
            return
        if self.config.sft_weight == 0:
            raise UserError(
                f"{path}: no query has two responses with different scores, so RRHF's ranking term is 0, and "
                "with --sft-weight 0 the run would train nothing; give queries two or more scored responses"
            )
        if os.environ.get("RANK", "0") != "0":  # under torchrun every rank checks; rank 0 says it
            return
        logger.warning(
            "note: %s: no query has two responses with different scores (one response each, or tied "
            "scores), so RRHF's ranking term is 0 and this run trains the SFT term only",
            path,
        )

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
