"""`--offload-optimizer`: the optimizer states and the optimizer step in host memory, the gradients
moved there as the backward produces them.

Each trainable parameter keeps a host copy in fp32 (its master weight: for fp32 weights the same
values, for bf16 weights the fp32 value the updates accumulate in, as DeepSpeed ZeRO-Offload keeps
fp32 masters on the CPU for fp16 GPU weights). A post-accumulate-grad hook adds each gradient to its
host copy's fp32 `.grad` the moment it is final and frees it on the GPU, so no whole-model gradient
buffer ever lives there, and micro-batches accumulate on the host. The step (clipping by the global
norm of the host gradients, then the per-parameter optimizer over the host copies, paramwise.py)
runs on the CPU; each new value is then copied into the GPU weight (rounded to nearest for bf16).
GPU memory: the weights, activations, one tensor's gradient at a time; host memory: the masters, the
gradients and the states.

Why not an existing one: torchao's `CPUOffloadOptimizer(offload_gradients=True)` is the same idea
(hooks, host copies, the step on the CPU, CUDA streams for overlap), but it asserts a CUDA or XPU
device (no CPU tests), its `offload_gradients` drops gradient accumulation, clipping would see no
GPU gradients, and its state dict is its own list, not torch's layout our checkpoints and resume
read. bitsandbytes' paged optimizers page states to host memory only under pressure and still step
on the GPU with a GPU gradient buffer. DeepSpeed's ZeRO-Offload needs its engine around the model
and the loop. This class reuses ParamwiseOptimizer's slots and checkpoint layout instead.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rrhf_fast.optimizers.paramwise import ParamwiseOptimizer, Slot

HOST = torch.device("cpu")


class OffloadOptimizer(ParamwiseOptimizer):
    """`make(params, weight_decay)` builds each host copy's optimizer (paramwise.py)."""

    def __init__(self, groups: list[dict[str, Any]], make: Any, *, order: list[torch.Tensor]) -> None:
        self.bf16_update, self.seed, self.defaults = "nearest", 0, {}
        self.slots = []
        position = {id(p): i for i, p in enumerate(order)}  # the model's order, as clip_grad_norm_ sees it
        for group in groups:
            for p in group["params"]:
                master = torch.nn.Parameter(p.detach().to(HOST, torch.float32, copy=True))
                self.slots.append(Slot(len(self.slots), p, make([master], group["weight_decay"]), master))
        for slot in self.slots:
            slot.param.register_post_accumulate_grad_hook(lambda p, s=slot: self.to_host(s))
        self._clip_order = sorted(self.slots, key=lambda s: position[id(s.param)])

    def to_host(self, slot: Slot) -> None:
        """A final gradient of this backward: added to the host copy's, freed on the device."""
        grad, host = slot.param.grad, slot.stand_in
        if host.grad is None:
            host.grad = grad.detach().to(HOST, torch.float32, copy=True)
        else:
            host.grad.add_(grad.detach().to(HOST, torch.float32))
        slot.param.grad = None

    def host_tensors(self) -> list[torch.Tensor]:
        return [s.stand_in for s in self.slots]

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """clip_grad_norm_ over the host gradients (the device holds none): the norm before clipping."""
        grads = [s.stand_in for s in self._clip_order if s.stand_in.grad is not None]
        if not grads:
            return torch.zeros(())
        return torch.nn.utils.clip_grad_norm_(grads, max_norm or math.inf)

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for slot in self.slots:
            if slot.stand_in.grad is not None:
                self.step_param(slot)

    def step_param(self, slot: Slot) -> None:
        slot.optimizer.step()
        with torch.no_grad():
            host = slot.stand_in.detach()
            # cast on the host: a bf16 weight then gets a bf16 copy, never an fp32 one on the device
            slot.param.copy_(host if slot.param.dtype == torch.float32 else host.to(slot.param.dtype))
        slot.stand_in.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for slot in self.slots:
            slot.param.grad = None
            slot.stand_in.grad = None

    # checkpoints: ParamwiseOptimizer's layout; a bf16 weight's fp32 master travels with its state
    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        for slot in self.slots:
            if slot.param.dtype != torch.float32:
                out["state"].setdefault(slot.index, {})["offload_master"] = slot.stand_in.detach().clone()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = {**state_dict, "state": dict(state_dict["state"])}
        masters = {}
        for pid, entry in state_dict["state"].items():
            if "offload_master" in entry:
                entry = dict(entry)
                masters[pid] = entry.pop("offload_master")
                state_dict["state"][pid] = entry
        super().load_state_dict(state_dict)
        ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        for slot, pid in zip(self.slots, ids, strict=True):
            if pid in masters:
                slot.stand_in.data.copy_(masters[pid])
