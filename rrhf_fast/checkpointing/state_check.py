"""A resumed run's optimizer state, checked against the model and --optim before the first step.

The checkpoint's hashes (integrity.py) say its files are the ones that were saved; this says that
what was saved is a state this run can continue: every trainable parameter has its state (but those
the saving run recorded as having none: a parameter that never had a gradient), every tensor of it
has the shape and dtype the optimizer keeps for that parameter and lies on the parameter's device
once loaded, every floating-point value is finite, and --offload-optimizer's fp32 master of a bf16
weight rounds to that weight (the master of an fp32 weight is the weight itself and is not saved).
A state that fails is one sentence naming the checkpoint and the parameter, raised before anything
is trained or written. Without this, a missing moment or master is silently re-made from zeros or
from the weight (the run is no longer the run it continues), a moment of another shape ends in a
traceback inside torch.optim, and a NaN moment looks like a diverging run.

What each optimizer keeps per parameter (its "layout"), as its own code makes it:
- torch AdamW: `step` (a scalar tensor), `exp_avg` and `exp_avg_sq`, each in the stepped tensor's
  shape and dtype.
- bitsandbytes' 8-bit AdamW (Optimizer2State): `step` (an int) and, in its quantisation-state dict,
  `state1` / `state2` as uint8 codes in the tensor's shape with `qmap1` / `qmap2` (256 floats) and
  `absmax1` / `absmax2` (one float per 256-value block); a tensor under `min_8bit_size` values has
  fp32 `state1` / `state2` instead.
- the one-optimizer-per-parameter classes (paramwise.py, in_backward.py, offload.py) add
  `bf16_round_step` (int), `kahan_comp` (bf16, the weight's shape) and `offload_master` (fp32, the
  weight's shape; required for a non-fp32 weight); the stepped tensor is the fp32 stand-in or master.
- FSDP2 (torch AdamW or torchao's 8-bit AdamW over DTensor shards): torch.distributed.checkpoint
  loads into states shaped by the optimizer itself and refuses a missing or misshapen one; what is
  left to check is presence and finiteness, each rank on its shards, the ranks agreeing on the error.

The dtype of a moment may also be the weight's own dtype: a checkpoint of the ordinary optimizer
over bf16 weights resumes with --bf16-update (whose fp32 stand-ins' optimizers cast it up).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rrhf_fast.errors import UserError

_DAMAGED = " (damaged)"  # ends the problems that no change of flags explains
STATELESS_KEY = "optimizer_stateless"  # trainer-state key: positions of parameters saved without state
_BNB_QUANT = "__bnb_optimizer_quant_state__"  # bitsandbytes' wrapper of its quantisation state
_BLOCK = 256  # values per absmax block of bitsandbytes' blockwise 8-bit states


class DamagedOptimizerState(UserError):
    """A checkpoint's optimizer state that this run cannot continue from."""


@dataclass
class Target:
    """One trainable parameter as the optimizer steps it."""

    param: torch.Tensor  # the model's parameter
    optimizer: torch.optim.Optimizer  # the optimizer that keeps its state (the inner one, per parameter)
    key: torch.Tensor | None  # what that optimizer's state is keyed by (None: a parameter stepped in pieces)
    dtype: torch.dtype  # of what it steps: the parameter's, or fp32 for a stand-in or master
    blocks: int  # bitsandbytes' absmax blocks of its (joined) state
    extras: dict[str, str]  # the wrapper's own keys -> "required" | "optional" | "absent"


def targets(optimizer: Any) -> list[Target]:
    """The optimizer's trainable parameters in its state dict's order."""
    from rrhf_fast.optimizers.offload import OffloadOptimizer
    from rrhf_fast.optimizers.paramwise import ParamwiseOptimizer

    if not isinstance(optimizer, ParamwiseOptimizer):
        return [Target(p, optimizer, p, p.dtype, _blocks(p.numel()), {})
                for group in optimizer.param_groups for p in group["params"]]  # fmt: skip
    out = []
    for slot in optimizer.slots:
        p = slot.param
        if isinstance(optimizer, OffloadOptimizer):
            extras = {"offload_master": "required" if p.dtype != torch.float32 else "absent"}
            out.append(Target(p, slot.optimizer, slot.stand_in, torch.float32, _blocks(p.numel()), extras))
            continue
        rounded = slot.stand_in is not None or bool(slot.pieces)
        kahan = rounded and optimizer.bf16_update == "kahan"
        extras = {"bf16_round_step": "optional" if rounded else "absent",
                  "kahan_comp": "optional" if kahan else "absent"}  # fmt: skip
        blocks = (
            sum(_blocks(piece.stop - piece.start) for piece in slot.pieces)
            if slot.pieces
            else _blocks(p.numel())
        )
        key = None if slot.pieces else slot.key
        out.append(Target(p, slot.optimizer, key, torch.float32 if rounded else p.dtype, blocks, extras))
    return out


def _blocks(n: int) -> int:
    return -(-n // _BLOCK)


def check_saved_state(
    saved: dict[str, Any], optimizer: Any, model: torch.nn.Module, where: Path, optim: str,
    stateless: list[int] | None,
) -> None:  # fmt: skip
    """The saved state dict (torch's layout, before load_state_dict) against this run's optimizer
    and weights. `stateless`: the positions the saving run recorded without state (None: a
    checkpoint from before they were recorded, where a missing state is allowed only if none has one)."""
    names = _names(model)
    wanted = targets(optimizer)
    try:
        ids = [pid for group in saved["param_groups"] for pid in group["params"]]
        states = saved["state"]
        if not isinstance(states, dict):
            raise TypeError
    except (KeyError, TypeError):
        raise DamagedOptimizerState(f"{where}: optimizer.pt is not an optimizer state (no param_groups and "
                                    "state); delete this checkpoint") from None  # fmt: skip
    if len(ids) != len(wanted):
        raise DamagedOptimizerState(
            f"{where}: the optimizer state holds {len(ids)} parameters, this model and --optim train "
            f"{len(wanted)}; resume with the --model, --lora-r and --optim of the run that wrote it"
        )
    allowed_missing = (
        set(stateless or []) if stateless is not None else (set(range(len(ids))) if not states else set())
    )
    for position, (pid, target) in enumerate(zip(ids, wanted, strict=True)):
        name = names.get(id(target.param), f"parameter {position}")
        entry = states.get(pid)
        if entry is None:
            if position in allowed_missing:
                continue
            raise DamagedOptimizerState(
                f"{where}: the optimizer state has no entry for {name}; the checkpoint is damaged (a run "
                "resumed from it would restart that parameter's moments from zero), delete it to resume "
                "from the one before"
            )
        problem = _entry_problem(entry, target, optim)
        if (
            problem is None
            and "offload_master" in entry
            and target.extras.get("offload_master") == "required"
        ):
            problem = _master_problem(entry["offload_master"], target.param)
        if problem:
            raise DamagedOptimizerState(f"{where}: the optimizer state of {name} {_advice(problem)}")


def stateless_positions(optimizer: Any) -> list[int]:
    """The positions (state-dict order) of parameters that hold no optimizer state: what a checkpoint
    records so that resume can tell a parameter that never had a gradient from a lost state."""
    out = []
    for position, target in enumerate(targets(optimizer)):
        if target.key is None:  # a parameter stepped in pieces: stateless if its pieces are
            pieces = [piece for group in target.optimizer.param_groups for piece in group["params"]]
            held = all(target.optimizer.state.get(piece) for piece in pieces)
        else:
            held = bool(target.optimizer.state.get(target.key))
        if not held:
            out.append(position)
    return out


def _advice(problem: str) -> str:
    """The problem and what to do: a damaged state is deleted; another layout, other flags."""
    if problem.endswith(_DAMAGED):
        return f"{problem.removesuffix(_DAMAGED)}; delete this checkpoint to resume from the one before"
    return (f"{problem}; resume with the flags of the run that wrote it (--optim, --dtype, --lora-r, "
            "--offload-optimizer, --bf16-update), or delete this checkpoint if they are those")  # fmt: skip


def _entry_problem(entry: Any, target: Target, optim: str) -> str | None:
    if not isinstance(entry, dict):
        return f"is a {type(entry).__name__}, not a dict of tensors"
    extras = target.extras
    own = {k: v for k, v in entry.items() if k not in extras}
    for key, rule in extras.items():
        if key in entry and rule == "absent":
            return f"holds {key}, which this run's optimizer does not keep for it"
        if key not in entry and rule == "required":
            dtype = str(target.param.dtype).removeprefix("torch.")
            return f"lacks {key}, the fp32 master weight of this {dtype} weight{_DAMAGED}"
    if "kahan_comp" in entry:
        problem = _tensor_problem("kahan_comp", entry["kahan_comp"], target.param.shape, {torch.bfloat16})
        if problem:
            return problem
    for key in ("bf16_round_step",):
        if key in entry and (not isinstance(entry[key], int) or entry[key] < 0):
            return f"has {key} {entry[key]!r}, not a step count"
    layout = _layout(target)
    if layout is None:  # an optimizer this module does not know: only finiteness
        return next((p for k, v in _tensors(own) if (p := _finite_problem(k, v))), None)
    expected_keys, check = layout
    if set(own) != expected_keys:
        have = ", ".join(sorted(own)) or "nothing"
        return (f"holds {have}, where --optim {optim} keeps {', '.join(sorted(expected_keys))} for it "
                "(a state of another optimizer, or damaged)")  # fmt: skip
    return check(own)


def _layout(target: Target) -> tuple[set[str], Any] | None:
    """The keys the optimizer keeps for this parameter and a function checking their values."""
    opt, param = target.optimizer, target.param
    dtypes = {target.dtype, param.dtype}
    if type(opt) in (torch.optim.AdamW, torch.optim.Adam):
        group = opt.param_groups[0]
        keys = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if group.get("amsgrad") else set())

        def check_torch(entry: dict[str, Any]) -> str | None:
            step = entry["step"]
            if not isinstance(step, torch.Tensor) or step.numel() != 1 or not step.is_floating_point():
                return f"has step {step!r}, not torch's one-value step tensor"
            if not (torch.isfinite(step).all() and step.item() >= 0):
                return f"has step {step.item()}, not a step count"
            for key in sorted(keys - {"step"}):
                problem = _tensor_problem(key, entry[key], param.shape, dtypes)
                if problem:
                    return problem
            return None

        return keys, check_torch
    if type(opt).__module__.startswith("bitsandbytes") and hasattr(opt, "args"):
        eight = (
            param.numel() >= getattr(opt.args, "min_8bit_size", 4096)
            and getattr(opt.args, "optim_bits", 8) == 8
        )
        quant = {"state1", "state2", *(("qmap1", "qmap2", "absmax1", "absmax2") if eight else ())}

        def check_bnb(entry: dict[str, Any]) -> str | None:
            step = entry["step"]
            if not isinstance(step, int) or isinstance(step, bool) or step < 0:
                return f"has step {step!r}, not a step count"
            inner = entry[_BNB_QUANT]
            if not isinstance(inner, dict) or set(inner) - {"unorm_vec"} != quant:
                have = ", ".join(sorted(inner)) if isinstance(inner, dict) else type(inner).__name__
                keeps = ", ".join(sorted(quant))
                return (f"holds {have} in its 8-bit state, where bitsandbytes keeps {keeps} for a tensor "
                        f"of {param.numel()} values")  # fmt: skip
            codes = {torch.uint8} if eight else {torch.float32}
            fp32, blocks = {torch.float32}, (target.blocks,)
            shapes = {"state1": (param.shape, codes), "state2": (param.shape, codes),
                      "qmap1": ((256,), fp32), "qmap2": ((256,), fp32),
                      "absmax1": (blocks, fp32), "absmax2": (blocks, fp32)}  # fmt: skip
            for key in sorted(quant):
                problem = _tensor_problem(key, inner[key], *shapes[key])
                if problem:
                    return problem
            return None

        return {"step", _BNB_QUANT}, check_bnb
    return None


def _tensor_problem(key: str, value: Any, shape: Any, dtypes: set[torch.dtype]) -> str | None:
    if not isinstance(value, torch.Tensor):
        return f"has {key} of type {type(value).__name__}, not a tensor"
    if tuple(value.shape) != tuple(shape):
        return f"has {key} of shape {tuple(value.shape)}, the parameter's is {tuple(shape)}"
    if value.dtype not in dtypes:
        want = " or ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        return f"has {key} in {str(value.dtype).removeprefix('torch.')}, the optimizer keeps it in {want}"
    return _finite_problem(key, value)


def _finite_problem(key: str, value: torch.Tensor) -> str | None:
    local = value.to_local() if hasattr(value, "to_local") else value
    for part in _float_parts(local):
        if not torch.isfinite(part).all():
            bad = int((~torch.isfinite(part)).sum())
            return f"has {bad} NaN or inf value(s) in {key}, which no saved step leaves there{_DAMAGED}"
    return None


def _float_parts(value: torch.Tensor) -> Iterator[torch.Tensor]:
    """The floating-point tensors a state value is made of: itself, or the plain tensors a tensor
    subclass (torchao's 8-bit state: codes, scale, qmap) holds."""
    if type(value) is torch.Tensor or isinstance(value, torch.nn.Parameter):
        if value.is_floating_point():
            yield value
        return
    flatten = getattr(value, "__tensor_flatten__", None)
    if flatten is None:
        if value.is_floating_point():
            yield value
        return
    for attr in flatten()[0]:
        yield from _float_parts(getattr(value, attr))


def _master_problem(master: Any, weight: torch.Tensor) -> str | None:
    problem = _tensor_problem("offload_master", master, weight.shape, {torch.float32})
    if problem:
        return problem
    rounded = master.to(weight.dtype)
    if not torch.equal(rounded, weight.detach().to("cpu")):
        differ = int((rounded != weight.detach().to("cpu")).sum())
        return (f"has an fp32 master that does not round to the saved weight ({differ} of "
                f"{weight.numel()} values differ): the weights and the optimizer state are not from the "
                f"same step{_DAMAGED}")  # fmt: skip
    return None


def _tensors(entry: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    for key, value in entry.items():
        if isinstance(value, dict):
            yield from _tensors(value, f"{prefix}{key}.")
        elif isinstance(value, torch.Tensor):
            yield f"{prefix}{key}", value


def _names(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


# -------------------------------------------------------------------------------------------------
# after loading: devices (every run), and the sharded state of an FSDP2 run


def check_loaded_state(optimizer: Any, model: torch.nn.Module, where: Path, sharded: bool) -> None:
    """The loaded state: on the stepped tensors' devices; an FSDP2 run's also present and finite
    (each rank its shards, the first problem on any rank raised on every rank)."""
    names = _names(model)
    problem = None
    for target in targets(optimizer):
        if target.key is None:  # stepped in pieces: its pieces' states are checked before loading
            continue
        state = target.optimizer.state.get(target.key)
        name = names.get(id(target.param), "a parameter")
        for key, value in _tensors(state or {}):
            if problem:
                break
            device = target.key.device
            if value.numel() == target.param.numel() and value.device != device:
                problem = (
                    f"the optimizer state of {name} has {key} on {value.device}, the parameter is on {device}"
                )
            elif sharded and (finite := _finite_problem(key, value)):
                problem = f"the optimizer state of {name} {finite}"
        if sharded and not state and not problem:
            problem = f"the optimizer state has no entry for {name}{_DAMAGED}"
        if problem:
            break
    if sharded:
        problem = _first_over_ranks(problem)
    if problem:
        raise DamagedOptimizerState(
            f"{where}: {problem}; delete this checkpoint to resume from the one before"
        )


def _first_over_ranks(problem: str | None) -> str | None:
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()):
        return problem
    every: list[str | None] = [None] * tdist.get_world_size()
    tdist.all_gather_object(every, problem)
    return next((p for p in every if p), None)
