"""Optimizers and the learning-rate schedule of `rrhf-fast train`.

AdamW8bit (bitsandbytes, the default) keeps both Adam moments in 8 bits, blockwise quantised:
2 bytes of state per parameter instead of 8, the difference between fitting a full fine-tune on a
GPU or not. PagedAdamW8bit also pages those states to CPU memory under pressure. torch AdamW is
the exact fp32 fallback. Weight decay applies to matrices only, not to norms and biases (the
nanoGPT / GPT-3 habit).

Under FSDP2 (`sharded=True`) the parameters are DTensor shards, which bitsandbytes' optimizers
cannot step (its 8-bit kernels take plain tensors): there `adamw8bit` is torchao's AdamW8bit, which
keeps DTensor-aware 8-bit states (blockwise, 256 values a block), and without torchao it is an error,
never a silent fall-back to 32-bit states.

`in_backward=True` (--optim-in-backward) and `bf16_update` "stochastic" / "kahan" give one optimizer
per parameter instead (in_backward.py, paramwise.py), behind the same interface.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from rrhf_fast.config import OPTIMIZERS, TrainConfig
from rrhf_fast.errors import UserError
from rrhf_fast.models.loading import import_bitsandbytes
from rrhf_fast.optimizers.in_backward import InBackwardOptimizer
from rrhf_fast.optimizers.offload import OffloadOptimizer
from rrhf_fast.optimizers.paramwise import ParamwiseOptimizer


def build_optimizer(
    params: Iterable[tuple[str, torch.nn.Parameter]],
    name: str = "adamw8bit",
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    sharded: bool = False,
    in_backward: bool = False,
    bf16_update: str = "nearest",
    seed: int = 0,
    offload: bool = False,
) -> Any:
    """An AdamW flavour over the trainable `(name, param)` pairs (e.g. `model.named_parameters()`);
    `sharded`: the parameters are FSDP2's DTensors.

    `in_backward`: an InBackwardOptimizer, whose hooks update each parameter during the backward of
    in_backward.backward_step; `bf16_update` ("stochastic", "kahan"): bf16 weights get fp32 updates
    rounded that way (paramwise.py), the noise seeded by `seed`. Either returns one optimizer per
    parameter with the optimizer interface (param_groups, step, zero_grad, state_dict)."""
    trainable = [p for _, p in params if p.requires_grad]
    if not trainable:
        raise UserError("the model has no trainable parameters; check --lora-r and the model")
    groups = [
        {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if offload:  # --offload-optimizer: one optimizer per host copy, on the CPU (offload.py)

        def make_host(ps: list[torch.nn.Parameter], decay: float) -> torch.optim.Optimizer:
            return _build(name, [{"params": ps, "weight_decay": decay}], lr, betas, eps, False)

        return OffloadOptimizer(groups, make_host, order=trainable)
    if in_backward or bf16_update != "nearest":

        def make(ps: list[torch.nn.Parameter], decay: float) -> torch.optim.Optimizer:
            return _build(name, [{"params": ps, "weight_decay": decay}], lr, betas, eps, sharded)

        if in_backward:
            return InBackwardOptimizer(groups, make, order=trainable, bf16_update=bf16_update, seed=seed)
        return ParamwiseOptimizer(groups, make, bf16_update=bf16_update, seed=seed)
    return _build(name, groups, lr, betas, eps, sharded)


def make_optimizer(model: Any, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer over the model's trainable parameters (under FSDP2: once they are sharded)."""
    return build_optimizer(model.named_parameters(), config.optim, lr=config.lr,
                           weight_decay=config.weight_decay, sharded=config.fsdp,
                           in_backward=config.optim_in_backward, bf16_update=config.bf16_update,
                           seed=config.seed, offload=config.offload_optimizer)  # fmt: skip


def _build(
    name: str, groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], eps: float, sharded: bool
) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    if name == "adamw8bit" and sharded:
        return _torchao_adamw8bit()(groups, lr=lr, betas=betas, eps=eps)
    if name == "paged-adamw8bit" and sharded:
        raise UserError("--optim paged-adamw8bit cannot step FSDP2 shards; use --optim adamw8bit or adamw")
    if name in ("adamw8bit", "paged-adamw8bit"):
        bnb = import_bitsandbytes(f"--optim {name}", " or pass --optim adamw")
        cls = bnb.optim.AdamW8bit if name == "adamw8bit" else bnb.optim.PagedAdamW8bit
        return cls(groups, lr=lr, betas=betas, eps=eps)
    raise UserError(f"--optim must be one of {', '.join(OPTIMIZERS)}; got {name!r}")


def _torchao_adamw8bit() -> type:
    try:
        from torchao.optim import AdamW8bit
    except ImportError as err:
        raise UserError(
            f"--fsdp with --optim adamw8bit needs torchao's DTensor-aware 8-bit AdamW ({err}): "
            "`pip install torchao`, or pass --optim adamw for 32-bit states"
        ) from None
    # Its step is torch.compile'd per parameter shape, and AOTAutograd's on-disk cache keys its
    # 8-bit state subclass without the shape (torch warns it lacks `_stable_hash_for_caching`): two
    # ranks with shards of different sizes then share one compiled step and fail (seen with torchao
    # 0.18 on torch 2.13). Compiling afresh costs seconds, once per shape.
    import torch._functorch.config as functorch_config

    functorch_config.enable_autograd_cache = False
    return AdamW8bit


def cpu_step_throughput(optim: str, numel: int = 1 << 22, steps: int = 3) -> float:
    """Parameters per second of `optim`'s step on this machine's CPU, with torch's current thread
    count: one tensor of `numel` fp32 values stepped `steps` times after a first (state-creating)
    step. What `plan --offload-optimizer` divides the trainable parameters by."""
    import time

    p = torch.nn.Parameter(torch.randn(numel))
    p.grad = torch.randn(numel)
    opt = _build(optim, [{"params": [p], "weight_decay": 0.0}], 1e-5, (0.9, 0.999), 1e-8, False)
    opt.step()
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return numel * steps / (time.perf_counter() - start)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's learning rate; in place where it is a tensor (torchao's optimizers hold it so)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


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
