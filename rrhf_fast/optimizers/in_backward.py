"""`--optim-in-backward`: each weight is updated the moment its gradient is final, and the gradient freed.

A post-accumulate-grad hook on every trainable parameter steps that parameter's own optimizer
(paramwise.py) and drops its `.grad`, so at most the gradients of the layers in flight exist at once,
never a whole-model gradient buffer: for full fine-tuning in fp32, 4 bytes a weight less at the
peak (LOMO, Lv et al. 2023; torch's "optimizer step in backward" tutorial). FSDP2 calls the same
hooks on each sharded parameter once its reduce-scatter is done.

What an update in backward cannot see is the whole gradient. Global-norm clipping and the
non-finite-step guard need its norm before the first weight moves, so with `--max-grad-norm X`
(the default) a step runs two passes, as LOMO and AdaLomo do: the first backward only measures the
norm (each gradient is freed as soon as its norm is taken), then, if the loss and the norm are
finite, the RNGs are rewound and the same forward and backward run again, each parameter stepped
with its gradient times the clip coefficient of `clip_grad_norm_`. The cost is a second forward and
backward per step. A non-finite step runs one pass and leaves every weight and state untouched.

With `--max-grad-norm 0` a step is one pass. Each gradient's norm is then checked before its
update, and at the first non-finite one the updates stop: no NaN or inf reaches a weight, but the
parameters stepped before it in that backward keep their update (the step is counted as skipped, and
a warning says how many were stepped).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from rrhf_fast.errors import UserError
from rrhf_fast.optimizers.paramwise import ParamwiseOptimizer, Slot
from rrhf_fast.parallel import distributed

RunBackward = Callable[[], Any]  # forward + backward of a step -> its metrics (with a float `.loss`)


class InBackwardOptimizer(ParamwiseOptimizer):
    """A ParamwiseOptimizer whose parameters step inside the backward of `backward_step`. Outside it
    the hooks stand idle and gradients accumulate in `.grad` as usual (so `step()` still works).

    `assume_finite = True` drops every check that reads a value (the per-gradient guard, the test
    between the passes; the norm returned is NaN): for a memory simulation on fake tensors, which
    have shapes but no values; the allocations are those of a finite step."""

    assume_finite = False

    def __init__(self, groups: list[dict[str, Any]], make: Any, *, order: list[torch.Tensor], **kw: Any):
        super().__init__(groups, make, **kw)
        position = {id(p): i for i, p in enumerate(order)}  # clip_grad_norm_ stacks norms in this order
        self._pass: str | None = None  # None (idle), "norm" or "update"
        self._norms: dict[int, torch.Tensor] = {}
        self._coef: torch.Tensor | None = None
        self._stopped, self.updated = False, 0
        for slot in self.slots:
            where = position[id(slot.param)]
            slot.param.register_post_accumulate_grad_hook(lambda p, s=slot, i=where: self._on_grad(s, i))

    def _on_grad(self, slot: Slot, where: int) -> None:
        if self._pass is None:
            return
        grad = slot.param.grad
        if self._pass == "norm" or self._coef is None:
            self._norms[where] = torch._foreach_norm([grad], 2.0)[0]  # what clip_grad_norm_ computes
        if self._coef is None and not self.assume_finite:  # one pass: the guard, gradient by gradient
            norm = float(distributed.local_value(self._norms[where]))
            self._stopped = self._stopped or not math.isfinite(norm)
        if self._pass == "update" and not self._stopped:
            if self._coef is not None:
                (grad.to_local() if hasattr(grad, "to_local") else grad).mul_(self._coef)
            grad = None  # noqa: F841  (no reference here: a rounded bf16 update frees it early)
            self.step_param(slot)
            self.updated += 1
        slot.param.grad = None

    def _run(self, kind: str, run_backward: RunBackward, coef: torch.Tensor | None) -> Any:
        self._pass, self._coef, self._norms, self._stopped, self.updated = kind, coef, {}, False, 0
        try:
            return run_backward()
        finally:
            self._pass = None

    def _total_norm(self) -> torch.Tensor:
        norms = [self._norms[i] for i in sorted(self._norms)]
        if not norms:
            return torch.zeros(())
        return torch.linalg.vector_norm(torch.stack(norms), 2.0)

    def run_step(self, run_backward: RunBackward, max_grad_norm: float) -> tuple[Any, float]:
        """One step's backward(s) and updates; returns (its metrics, the gradient norm before clipping)."""
        if not max_grad_norm:
            metrics = self._run("update", run_backward, None)
            norm = math.nan if self.assume_finite else float(distributed.local_value(self._total_norm()))
            if self._stopped and self.updated:
                logging.getLogger(__name__).warning(
                    f"warning: a non-finite gradient stopped this step's updates in backward after "
                    f"{self.updated} of {len(self.slots)} parameters had been stepped; --max-grad-norm X "
                    "checks the norm before any update (two passes)"
                )
            return metrics, norm
        rng = _rng_state()
        metrics = self._run("norm", run_backward, None)
        total = distributed.local_value(self._total_norm())
        norm = math.nan if self.assume_finite else float(total)
        if not self.assume_finite:
            loss = distributed.sum_over_ranks([metrics.loss], self.slots[0].param.device)[0]
            if not (math.isfinite(loss) and math.isfinite(norm)):
                return metrics, norm  # nothing was updated: the loop skips the step
        coef = torch.clamp(max_grad_norm / (total + 1e-6), max=1.0)  # as clip_grad_norm_
        _set_rng_state(rng)  # the same dropout masks: the second pass recomputes the same gradients
        metrics = self._run("update", run_backward, coef)
        return metrics, norm


def backward_step(
    optimizer: Any, run_backward: RunBackward, params: list[torch.Tensor], max_grad_norm: float
) -> tuple[Any, float]:
    """A training step's backward: (what `run_backward` returns, the gradient norm), the gradient
    clipped to `max_grad_norm` (0: no clipping).

    An ordinary optimizer: one backward, then clip_grad_norm_; the loop calls `optimizer.step()`
    next. An InBackwardOptimizer: the update happens here (its `step()` then finds no gradient)."""
    if isinstance(optimizer, InBackwardOptimizer):
        return optimizer.run_step(run_backward, max_grad_norm)
    metrics = run_backward()
    if hasattr(optimizer, "clip_grad_norm_"):  # --offload-optimizer: the gradients are on the host
        return metrics, float(optimizer.clip_grad_norm_(max_grad_norm))
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf)
    return metrics, float(distributed.local_value(norm))


def check_one_microbatch(
    config: Any, steps_of_epoch: Callable[[int], list[list[list[int]]]], total_steps: int, world: int
) -> None:
    """--optim-in-backward: every planned step must be at most one micro-batch per process, and
    several processes need FSDP2 (DDP all-reduces gradients after the hooks have already used them)."""
    if world > 1 and not config.fsdp:
        raise UserError(
            "--optim-in-backward under torchrun needs --fsdp: DDP averages the gradients only after "
            "the hooks that update the weights have run"
        )
    if not config.queries_per_step and config.grad_accum > world:
        raise UserError(
            f"--optim-in-backward updates each weight during the backward, so it cannot accumulate "
            f"--grad-accum {config.grad_accum} micro-batches on {world} process(es); give --grad-accum "
            f"{world} and a larger --micro-batch-tokens"
        )
    planned, epoch = 0, 0
    while planned < total_steps:
        steps = steps_of_epoch(epoch)
        if not steps:
            return
        for s, step in enumerate(steps[: total_steps - planned]):
            if len(step) > world:
                raise UserError(
                    f"--optim-in-backward updates each weight during the backward, so a step cannot "
                    f"accumulate micro-batches, but step {s + 1} of epoch {epoch + 1} packs into "
                    f"{len(step)} micro-batches for {world} process(es); raise --micro-batch-tokens or "
                    "lower --queries-per-step"
                )
        planned, epoch = planned + len(steps), epoch + 1


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])
