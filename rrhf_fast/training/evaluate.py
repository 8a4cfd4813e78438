"""Held-out evaluation: the run's objective and ranking metrics on held-out queries, no gradients.

The metrics (objectives/metrics.py) are the training step's: the objective's loss terms (RRHF:
loss, rank_loss, sft_loss) and accuracy, top1, best_reward: does the model order each query's
responses like their reward scores? Each key is prefixed `eval_`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from rrhf_fast.config import TrainConfig
from rrhf_fast.data.packing import TokenizedExample, pack_tokenized, plan_microbatches
from rrhf_fast.models.wrapping import eval_mode
from rrhf_fast.objectives import Objective, build_objective


@torch.no_grad()
def evaluate(
    model: Any,
    items: Sequence[TokenizedExample],
    config: TrainConfig,
    *,
    objective: Objective | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
) -> dict[str, float | None]:
    """Loss and ranking metrics of `model` on tokenised held-out queries (the objective `config.loss`
    names unless given), micro-batched by --micro-batch-tokens; keys prefixed `eval_`."""
    objective = objective or build_objective(config)
    plan = plan_microbatches([it.packed_len for it in items], config.micro_batch_tokens)
    metrics = objective.zero_metrics()
    with eval_mode(model):
        for group in plan:
            batch = pack_tokenized([items[i] for i in group])
            normalizer = objective.normalizer(items)
            metrics += objective(model, batch, normalizer=normalizer, autocast=autocast).metrics
    _reshard(model)
    return metrics.summary("eval_")


def _reshard(model: Any) -> None:
    """Under FSDP2, free what a forward without backward left gathered. The root module keeps its
    parameters unsharded after its forward (it expects the backward next); left so, the next
    training step's gradients of the root group (embedding, final norm, head) came out wrong, and 2
    ranks no longer equalled 1 process (tests/test_distributed.py)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return
    for module in model.modules() if isinstance(model, torch.nn.Module) else ():
        if isinstance(module, FSDPModule):
            module.reshard()
