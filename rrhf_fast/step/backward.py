"""One step's forward and backward over its micro-batches: what `train` runs and `plan` simulates
(a module of its own so that plan, which train's fit check calls, need not import train)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from rrhf_fast.data.packing import PackedBatch
from rrhf_fast.objectives import Metrics, Objective
from rrhf_fast.parallel import distributed


def forward_backward(
    model: Any,
    objective: Objective,
    batches: list[PackedBatch],
    autocast: contextlib.AbstractContextManager,
    *,
    queries: int | None = None,
    own: int | None = None,
    world: int = 1,
) -> Metrics:
    """Backward of the step's mean loss over all its queries; returns the summed metrics of the batches.

    Under torchrun, `queries` is the step's query count over every rank, the batches after the
    first `own` only keep this rank in step with the others (they train with weight 0), and the
    loss is multiplied by `world`, since DDP and FSDP2 average the ranks' gradients.
    """
    queries = float(sum(b.num_queries for b in batches) if queries is None else queries)
    own = len(batches) if own is None else own
    metrics = None
    for i, batch in enumerate(batches):
        weight = world if i < own else 0
        with distributed.gradient_sync(model, enabled=i == len(batches) - 1):
            out = objective(model, batch, normalizer=queries, autocast=autocast)
            (out.loss if weight == 1 else out.loss * weight).backward()
        if i < own and metrics is None:
            metrics = out.metrics
        elif i < own:
            metrics += out.metrics
    return metrics if metrics is not None else objective.zero_metrics()


def training_autocast(device_type: str) -> torch.autocast:
    """bf16 autocast without its weight cache: each fp32 weight's bf16 copy is made when its layer
    uses it and freed when nothing holds it (with gradient checkpointing: right after the layer; in
    the recompute it is made again), instead of cached for the whole forward. The cast is the same
    rounding either way, so the numbers are bitwise the same (tests/test_autocast_copies.py); the
    cache cost Llama-3.1-8B 13 GiB at the forward's end (rrhf-fast plan, fp32 weights)."""
    return torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=False)
