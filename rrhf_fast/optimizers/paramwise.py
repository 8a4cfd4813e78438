"""One optimizer per parameter: what `--optim-in-backward` and `--bf16-update stochastic|kahan` need.

An update in backward steps each parameter alone, the moment its gradient is final, so each one
gets its own optimizer (torch's AdamW or bitsandbytes' 8-bit AdamW over that one tensor: the same
arithmetic, per tensor, as one optimizer over all of them). A bf16 weight updated with stochastic
or Kahan rounding is stepped through an fp32 stand-in that exists only during its own step: the
optimizer's arithmetic and states are fp32, then bf16_update rounds the new value into the weight.

A tensor of more than 2 * UPDATE_CHUNK values (Llama-3.1-8B's 525M-value embedding and lm_head) is
stepped in flat pieces of UPDATE_CHUNK values (the last one takes the rest), each with its own fp32
stand-in: only one piece's fp32 copies of weight and gradient exist at a time, instead of 4 GiB for
that embedding. The pieces' optimizer states are those of the whole tensor cut at the same places
(AdamW is elementwise; bitsandbytes quantises its 8-bit states in blocks of 256 values, and a piece
boundary is a multiple of 256 and of the rounding's noise chunk), so a chunked step gives the whole
step's bits, and a checkpoint holds each tensor's state whole, as if it had not been cut.

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

from rrhf_fast.optimizers import bf16_update as rounding
from rrhf_fast.optimizers.bf16_update import kahan_round, rounding_generator, stochastic_round_into

_OWN_KEYS = ("bf16_round_step", "kahan_comp")  # what this class adds to a parameter's saved state
UPDATE_CHUNK = rounding.ROUND_CHUNK  # values of a rounded update at a time (a multiple of the noise chunk)
_STATE_BLOCK = 256  # values per absmax of bitsandbytes' blockwise 8-bit optimizer states


@dataclass
class Piece:
    """Values [start, stop) of a chunked parameter, flattened, and their fp32 stand-in."""

    start: int
    stop: int
    stand_in: torch.nn.Parameter


@dataclass
class Slot:
    """One trainable parameter and its optimizer."""

    index: int  # position in build_optimizer's order, the key of its saved state
    param: torch.nn.Parameter
    optimizer: torch.optim.Optimizer
    stand_in: torch.nn.Parameter | None = None  # fp32, what `optimizer` steps for a rounded bf16 weight
    rounded_steps: int = 0
    compensation: torch.Tensor | None = None  # --bf16-update kahan
    pieces: list[Piece] | None = None  # a large rounded weight, stepped piece by piece (stand_in None)

    @property
    def key(self) -> torch.Tensor:
        """What `optimizer.state` is keyed by (not for a chunked slot: one state per piece)."""
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
                ranges = _piece_ranges(p, UPDATE_CHUNK) if rounded else None
                if ranges:
                    pieces = [Piece(a, b, torch.nn.Parameter(_empty(p))) for a, b in ranges]
                    optimizer = make([piece.stand_in for piece in pieces], group["weight_decay"])
                    self.slots.append(Slot(len(self.slots), p, optimizer, pieces=pieces))
                    continue
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
        """Each parameter's state (a chunked one's pieces joined: a copy)."""
        out = {}
        for slot in self.slots:
            entry = _joined(slot) if slot.pieces else slot.optimizer.state.get(slot.key)
            if entry:
                out[slot.param] = entry
        return out

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
        if slot.pieces:
            self._step_pieces(slot)
            return
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

    def _step_pieces(self, slot: Slot) -> None:
        """A large rounded weight's update, one piece at a time: the piece's fp32 copies of weight and
        gradient, its optimizer step (the other pieces hold no gradient, so the optimizer skips them),
        its rounding into the bf16 weight. The bf16 gradient lives until the last piece; the noise
        generator runs on from piece to piece, drawing what the whole tensor's rounding draws."""
        p = slot.param
        weights, grads = p.data.view(-1), p.grad.reshape(-1)
        gen = None
        if self.bf16_update == "stochastic":
            gen = rounding_generator(p.device, self.seed, slot.index, slot.rounded_steps)
        elif slot.compensation is None:
            slot.compensation = torch.zeros_like(p)
        for piece in slot.pieces:
            part = slice(piece.start, piece.stop)
            piece.stand_in.data = weights[part].float()
            piece.stand_in.grad = grads[part].float()
            slot.optimizer.step()
            with torch.no_grad():
                new = piece.stand_in.data
                if gen is not None:
                    stochastic_round_into(weights[part], new, gen)
                else:
                    comp = slot.compensation.view(-1)[part]
                    rounded, kept = kahan_round(weights[part], new, comp)
                    weights[part].copy_(rounded)
                    comp.copy_(kept)
            piece.stand_in.grad, piece.stand_in.data = None, _empty(p)
        p.grad = None
        slot.rounded_steps += 1

    # ---------------------------------------------------------------------------------------------
    # checkpoints: torch's layout, one parameter per entry

    def state_dict(self) -> dict[str, Any]:
        state, groups = {}, []
        for slot in self.slots:
            inner = slot.optimizer.state_dict()
            entry = _joined(slot, inner["state"]) if slot.pieces else dict(inner["state"].get(0, {}))
            if (slot.stand_in is not None or slot.pieces) and slot.rounded_steps:
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
            if slot.pieces:
                states = dict(enumerate(_cut(slot, entry))) if entry else {}
            else:
                states = {0: entry} if entry else {}
            group = {
                **slot.optimizer.state_dict()["param_groups"][0],
                "params": list(range(len(slot.pieces or [0]))),
            }
            slot.optimizer.load_state_dict({"state": states, "param_groups": [group]})


def _empty(p: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=torch.float32, device=p.device)


def _piece_ranges(p: torch.Tensor, chunk: int) -> list[tuple[int, int]] | None:
    """[start, stop) of each piece of a weight stepped in pieces of `chunk` values, the last taking
    the rest (so every piece has at least `chunk` values: bitsandbytes gives tensors under 4096
    values fp32 states); None for a weight stepped whole (at most 2 * chunk values, a DTensor shard,
    a non-contiguous tensor)."""
    if chunk % _STATE_BLOCK or chunk % rounding.ROUND_CHUNK:
        raise ValueError(
            f"the update chunk {chunk} must be a multiple of {_STATE_BLOCK} and of the noise chunk"
        )
    n = p.numel()
    if n <= 2 * chunk or hasattr(p, "to_local") or not p.is_contiguous():
        return None
    starts = list(range(0, n - chunk + 1, chunk))[: n // chunk]
    return [(a, b) for a, b in zip(starts, starts[1:] + [n], strict=True)]


def _joined(slot: Slot, states: dict[int, dict[str, Any]] | None = None) -> dict[str, Any]:
    """A chunked slot's piece states joined into the whole tensor's, as one optimizer over the whole
    tensor would hold it: elementwise states (AdamW's moments, bitsandbytes' 8-bit codes) end to end
    in the weight's shape, bitsandbytes' per-block absmax end to end, the rest (step, the shared
    quantisation maps) from the first piece; nested dicts (bitsandbytes keeps its quantised states
    in one) alike. Empty before the first step."""
    if states is None:
        states = {i: slot.optimizer.state[piece.stand_in] for i, piece in enumerate(slot.pieces)}
    parts = [states.get(i, {}) for i in range(len(slot.pieces))]
    return _join(parts, slot.pieces[0].stop - slot.pieces[0].start, slot.param.shape) if all(parts) else {}


def _join(parts: list[dict[str, Any]], first_numel: int, shape: torch.Size) -> dict[str, Any]:
    whole: dict[str, Any] = {}
    for key, first in parts[0].items():
        values = [part[key] for part in parts]
        if isinstance(first, dict):
            whole[key] = _join(values, first_numel, shape)
        elif key.startswith("qmap"):  # bitsandbytes' 256-entry map, shared (a piece may be 256 values)
            whole[key] = first
        elif key.startswith("absmax"):
            whole[key] = torch.cat(values)
        elif isinstance(first, torch.Tensor) and first.numel() == first_numel:
            whole[key] = torch.cat([v.reshape(-1) for v in values]).view(shape)
        else:
            whole[key] = first
    return whole


def _cut(slot: Slot, entry: dict[str, Any]) -> list[dict[str, Any]]:
    """A whole tensor's state cut into its pieces' (the inverse of _joined): elementwise states as
    views, every other tensor copied (AdamW counts its step in place, one count per piece)."""
    n, pieces = slot.param.numel(), slot.pieces
    out: list[dict[str, Any]] = [{} for _ in pieces]
    for key, value in entry.items():
        if isinstance(value, dict):
            for part, sub in zip(out, _cut(slot, value), strict=True):
                part[key] = sub
        elif key.startswith("absmax"):
            counts = [-(-(piece.stop - piece.start) // _STATE_BLOCK) for piece in pieces]
            if value.numel() != sum(counts):
                raise ValueError(
                    f"{key} has {value.numel()} blocks, the weight's {n} values need {sum(counts)}"
                )
            for part, v in zip(out, value.split(counts), strict=True):
                part[key] = v.clone()
        elif isinstance(value, torch.Tensor) and value.numel() == n:
            flat = value.reshape(-1)
            for part, piece in zip(out, pieces, strict=True):
                part[key] = flat[piece.start : piece.stop]
        else:
            for part in out:
                part[key] = value.clone() if isinstance(value, torch.Tensor) else value
    return out
