"""Optimizers and the learning-rate schedule of `rrhf-fast train`.

AdamW8bit (bitsandbytes, the default) keeps both Adam moments in 8 bits, blockwise quantised:
2 bytes of state per parameter instead of 8, the difference between fitting a full fine-tune on a
GPU or not. PagedAdamW8bit also pages those states to CPU memory under pressure. torch AdamW is
the exact fp32 fallback. Weight decay applies to matrices only, not to norms and biases (the
nanoGPT / GPT-3 habit).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch

from .config import OPTIMIZERS
from .errors import UserError


def build_optimizer(
    params: Iterable[tuple[str, torch.nn.Parameter]],
    name: str = "adamw8bit",
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """An AdamW flavour over the trainable `(name, param)` pairs (e.g. `model.named_parameters()`)."""
    trainable = [p for _, p in params if p.requires_grad]
    if not trainable:
        raise UserError("the model has no trainable parameters; check --lora-r and the model")
    groups = [
        {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    if name in ("adamw8bit", "paged-adamw8bit"):
        bnb = _import_bitsandbytes(name)
        cls = bnb.optim.AdamW8bit if name == "adamw8bit" else bnb.optim.PagedAdamW8bit
        return cls(groups, lr=lr, betas=betas, eps=eps)
    raise UserError(f"--optim must be one of {', '.join(OPTIMIZERS)}; got {name!r}")


def _import_bitsandbytes(name: str):
    # On a CPU with AVX512-BF16 its import warns that a 4-bit GEMM kernel from the hub is missing:
    # irrelevant to the optimizers, and noise on every run.
    cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops.level
    cpu_ops.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError as err:
        raise UserError(
            f"--optim {name} needs bitsandbytes ({err}); install it with `pip install bitsandbytes` "
            "or pass --optim adamw"
        ) from None
    finally:
        cpu_ops.setLevel(level)
    return bitsandbytes


def lr_at(step: int, *, lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup from lr/warmup to lr over `warmup_steps`, then cosine decay to `min_lr`.

    `step` counts optimizer steps from 0; the update of step s uses lr_at(s). The first step of a
    warmup is not 0 (a wasted step) but lr / warmup_steps. A pure function of the step (nanoGPT's
    get_lr): the loop sets each step's lr itself, so a resumed run needs only the step number and
    the schedule's parameters, which the checkpoint stores.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def default_warmup(total_steps: int) -> int:
    """3% of the steps, the warmup ratio of the RRHF authors' scripts."""
    return int(math.ceil(0.03 * total_steps))
