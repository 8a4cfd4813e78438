"""One optimizer per parameter: what `--optim-in-backward` and `--bf16-update stochastic|kahan` need.

An update in backward steps each parameter alone, the moment its gradient is final, so each one
gets its own optimizer (torch's AdamW or bitsandbytes' 8-bit AdamW over that one tensor: the same
arithmetic, per tensor, as one optimizer over all of them). A bf16 weight updated with stochastic
or Kahan rounding is stepped through an fp32 stand-in that exists only during its own step: the
optimizer's arithmetic and states are fp32, then bf16_update rounds the new value into the weight.

To the training loop, the checkpoint code and torch.distributed.checkpoint it looks like one
optimizer: `param_groups` (the per-parameter groups, which set_lr changes), `state`, `step()` (steps
every parameter that holds a gradient), `zero_grad()`, and a `state_dict()` in torch's layout with
one entry per parameter in build_optimizer's order (matrices, then vectors), so a checkpoint of the
ordinary optimizer loads here (a run can resume with --optim-in-backward; the other way round
torch's AdamW refuses the per-parameter groups, and the resume says to keep the flags).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rrhf_fast.training.bf16_update import kahan_round, rounding_generator, stochastic_round_into

_OWN_KEYS = ("bf16_round_step", "kahan_comp")  # what this class adds to a parameter's saved state


@dataclass
class Slot:
    """One trainable parameter and its optimizer."""

    index: int  # position in build_optimizer's order, the key of its saved state
    param: torch.nn.Parameter
    optimizer: torch.optim.Optimizer
    stand_in: torch.nn.Parameter | None = None  # fp32, what `optimizer` steps for a rounded bf16 weight
    rounded_steps: int = 0
    compensation: torch.Tensor | None = None  # --bf16-update kahan

    @property
    def key(self) -> torch.Tensor:
        """What `optimizer.state` is keyed by."""
        return self.param if self.stand_in is None else self.stand_in


class ParamwiseOptimizer(torch.optim.Optimizer):
    """`make(params, weight_decay)` builds each parameter's optimizer; `bf16_update` says how fp32
    updates land in bf16 weights ("nearest": the optimizer steps the bf16 weight itself).

    A torch.optim.Optimizer to isinstance checks (torch.distributed.checkpoint takes anything else
    for a list of optimizers), but its base __init__ never runs: `param_groups` and `state` are views
    of the per-parameter optimizers, not containers of its own."""

    def __init__(
        self,
        groups: list[dict[str, Any]],
        make: Callable[[list[torch.nn.Parameter], float], torch.optim.Optimizer],
        *,
        bf16_update: str = "nearest",
        seed: int = 0,
    ) -> None:
        self.bf16_update, self.seed, self.defaults = bf16_update, seed, {}
        self.slots: list[Slot] = []
        for group in groups:
            for p in group["params"]:
                rounded = bf16_update != "nearest" and p.dtype == torch.bfloat16
                stand_in = torch.nn.Parameter(_empty(p)) if rounded else None
                optimizer = make([stand_in if rounded else p], group["weight_decay"])
                self.slots.append(Slot(len(self.slots), p, optimizer, stand_in))

    # ---------------------------------------------------------------------------------------------
    # the optimizer interface

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for s in self.slots for g in s.optimizer.param_groups]

    @property
    def state(self) -> dict[torch.nn.Parameter, dict[str, Any]]:
        return {s.param: s.optimizer.state[s.key] for s in self.slots if s.optimizer.state.get(s.key)}

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        """Step every parameter that holds a gradient (after an update in backward, none does)."""
        for slot in self.slots:
            if slot.param.grad is not None:
                self.step_param(slot)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for slot in self.slots:
            slot.param.grad = None

    def step_param(self, slot: Slot) -> None:
        """Update one parameter from its `.grad` (left in place, but for a rounded bf16 weight, whose
        step frees it; the caller frees it)."""
        p = slot.param
        if slot.stand_in is None:
            slot.optimizer.step()
            return
        stand_in = slot.stand_in
        # the bf16 gradient is freed once its fp32 copy exists, before the fp32 weight's is made (the
        # largest tensor's update is the peak of a bf16 run: 1 GiB less for Llama-3.1-8B's embedding)
        grad, p.grad = p.grad.float(), None
        stand_in.data = p.detach().float()
        stand_in.grad = grad
        del grad
        slot.optimizer.step()
        with torch.no_grad():
            if self.bf16_update == "stochastic":
                gen = rounding_generator(p.device, self.seed, slot.index, slot.rounded_steps)
                stochastic_round_into(p.data, stand_in.data, gen)
            else:
                if slot.compensation is None:
                    slot.compensation = torch.zeros_like(p)
                weights, slot.compensation = kahan_round(p, stand_in.data, slot.compensation)
                p.copy_(weights)
        slot.rounded_steps += 1
        stand_in.grad, stand_in.data = None, _empty(p)

    # ---------------------------------------------------------------------------------------------
    # checkpoints: torch's layout, one parameter per entry

    def state_dict(self) -> dict[str, Any]:
        state, groups = {}, []
        for slot in self.slots:
            inner = slot.optimizer.state_dict()
            entry = dict(inner["state"].get(0, {}))
            if slot.stand_in is not None and slot.rounded_steps:
                entry["bf16_round_step"] = slot.rounded_steps
            if slot.compensation is not None:
                entry["kahan_comp"] = slot.compensation
            if entry:
                state[slot.index] = entry
            groups.append({**inner["param_groups"][0], "params": [slot.index]})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Per-parameter states by position in build_optimizer's order, whatever the saved groups
        (an ordinary optimizer's two groups, or one per parameter); hyperparameters stay this run's."""
        count = sum(len(g["params"]) for g in state_dict["param_groups"])
        if count != len(self.slots):
            raise ValueError(f"the saved state has {count} parameters, this model trains {len(self.slots)}")
        ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        for slot, pid in zip(self.slots, ids, strict=True):
            entry = dict(state_dict["state"].get(pid, {}))
            slot.rounded_steps = int(entry.pop("bf16_round_step", 0))
            comp = entry.pop("kahan_comp", None)
            slot.compensation = None if comp is None else comp.to(slot.param.device, torch.bfloat16)
            group = {**slot.optimizer.state_dict()["param_groups"][0], "params": [0]}
            slot.optimizer.load_state_dict({"state": {0: entry} if entry else {}, "param_groups": [group]})


def _empty(p: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=torch.float32, device=p.device)
