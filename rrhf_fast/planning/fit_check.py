"""Before `train` (and `train-rm`, `iterate`) loads the weights on CUDA: will the step fit?

A run that cannot fit otherwise finds out by an out-of-memory error minutes in, after the weights
have loaded and the first forward has run. The check is `rrhf-fast plan` on the run's own flags
(fake tensors, the model's config.json only: seconds), against the GPU's free memory less plan's
margin. When the planned peak is over it, the run stops with one sentence: the planned peak, and
the flags that make it fit, found as `plan --search` finds them: first the largest
--micro-batch-tokens that fits with the run's flags (if it still holds the longest query), then
the memory flags added one by one (each on top of the ones before) at the run's budget, then the
budget searched with all of them. `--no-fit-check` skips it. FSDP2 shards are not planned (plan
simulates one GPU holding the whole model), so under --fsdp the check is skipped with a note.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from rrhf_fast.config import TrainConfig
from rrhf_fast.errors import UserError
from rrhf_fast.planning import plan

GiB = plan.GiB


def free_memory(device: torch.device) -> int | None:
    """Bytes free on `device` now (None off CUDA: no check there). Tests pretend a GPU by
    replacing this function."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.mem_get_info(device)[0])


def host_memory() -> int | None:
    """Bytes of host memory available now (Linux's MemAvailable; None where unknown). Tests pretend a
    size by replacing this function."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def savings(config: TrainConfig) -> list[tuple[str, dict[str, Any]]]:
    """The memory flags the check tries, in order (each kept for the next): those this run does
    not have yet, cheapest in step time first."""
    steps: list[tuple[str, dict[str, Any]]] = [
        ("--gradient-checkpointing", dict(gradient_checkpointing=True))
    ]
    full = not config.lora_r
    if full and config.grad_accum == 1 and config.queries_per_step is None and not config.fsdp:
        steps.append(("--optim-in-backward", dict(optim_in_backward=True)))
    if full and not config.fsdp and config.bf16_update == "nearest":
        # in place of --optim-in-backward (they do not combine); then bf16 weights on the GPU, whose
        # fp32 masters the host keeps
        steps.append(("--offload-optimizer", dict(offload_optimizer=True, optim_in_backward=False)))
        if config.dtype != "bfloat16":
            steps.append(("--dtype bfloat16", dict(dtype="bfloat16")))
    if config.lora_r and not (config.load_in_4bit or config.load_in_8bit):
        steps.append(("--load-in-4bit", dict(load_in_4bit=True)))
    # a step whose flag (its first field) the run already has is not one
    return [(flag, kw) for flag, kw in steps if getattr(config, next(iter(kw))) != next(iter(kw.values()))]


def check_fit(config: TrainConfig, device: torch.device, longest: int, log: Callable[[str], None]) -> Any:
    """Plan `config`'s step and raise UserError if it cannot fit `device`'s free memory; `longest`:
    the packed length of the longest query (the smallest --micro-batch-tokens the data allows)."""
    free = free_memory(device)
    if free is None or not config.fit_check:
        return None
    if config.fsdp:
        log("fit check skipped: --fsdp shards are not planned (rrhf-fast plan simulates one GPU)")
        return None
    try:
        hf_config = _model_config(config.model)
        result = plan.run_plan(hf_config, config, free)
    except Exception as err:  # a check that cannot plan must not stop a run that may well fit
        log(f"fit check skipped: cannot plan this model ({type(err).__name__}: {str(err)[:200]})")
        return None
    peak, usable = result.report.peak_bytes, plan.usable(free)
    host, host_free = result.report.host_peak_bytes, host_memory()
    if host and host_free is not None and host > host_free:
        raise UserError(
            f"--offload-optimizer: the planned host memory of this run is {host / GiB:.1f} GiB (fp32 "
            f"master weights, gradients and optimizer states), over the {host_free / GiB:.1f} GiB this "
            "machine has available; use a machine with more memory, LoRA (--lora-r), or pass "
            "--no-fit-check to try anyway"
        )
    if result.fits:
        log(f"fit check: planned peak {peak / GiB:.1f} GiB ({result.report.peak_phase}), "
            f"{usable / GiB:.1f} GiB usable of {free / GiB:.1f} GiB free")  # fmt: skip
        return result
    found = find_fit(hf_config, config, free, longest)
    fix = (
        f"it fits with {found[0]} (planned {found[1] / GiB:.1f} GiB)"
        if found
        else "no flag the check tries makes it fit (see rrhf-fast plan; LoRA with --lora-r, or more "
        "GPUs with --fsdp)"
    )
    raise UserError(
        f"the planned peak of this run's step is {peak / GiB:.1f} GiB ({result.report.peak_phase}), over "
        f"the {usable / GiB:.1f} GiB usable of the GPU's {free / GiB:.1f} GiB free (rrhf-fast plan with "
        f"these flags); {fix}, or pass --no-fit-check to try anyway"
    )


def find_fit(hf_config: Any, config: TrainConfig, free: int, longest: int) -> tuple[str, int] | None:
    """(the flags to add, the planned peak with them), or None: the search module doc describes."""
    searched = plan.run_plan(hf_config, config, free, search=True)
    best = searched.max_micro_batch_tokens
    if best is not None and best >= longest:
        peak = plan.run_plan(hf_config, _with(config, best), free).report.peak_bytes
        return f"--micro-batch-tokens {best}", peak
    flags, changed = [], config
    for flag, kw in savings(config):
        if kw.get("optim_in_backward") is False and "--optim-in-backward" in flags:
            flags.remove("--optim-in-backward")
        flags.append(flag)
        changed = dataclasses.replace(changed, **kw)
        result = plan.run_plan(hf_config, changed, free)
        if result.fits:
            return " ".join(flags), result.report.peak_bytes
    if not flags:
        return None
    best = plan.run_plan(hf_config, changed, free, search=True).max_micro_batch_tokens
    if best is None or best < longest:
        return None
    peak = plan.run_plan(hf_config, _with(changed, best), free).report.peak_bytes
    return " ".join([*flags, f"--micro-batch-tokens {best}"]), peak


def _with(config: TrainConfig, tokens: int) -> TrainConfig:
    return dataclasses.replace(config, micro_batch_tokens=tokens)


def _model_config(model: str) -> Any:
    """The model's config: PATH/config.json, or a hub id's (from the cache or the hub)."""
    from transformers import AutoConfig

    try:
        return plan.read_config(model)
    except UserError:
        return AutoConfig.from_pretrained(model)
