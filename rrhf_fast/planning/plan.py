"""`rrhf-fast plan`: will a training run fit a GPU? One training step simulated on fake tensors.

`--model PATH` needs only the model's config.json (no weights are read). The step is the trainer's
own (planning/simulate.py), with a packed micro-batch of the token budget; memory is tracked per
category by a dispatch-mode tracker (planning/memtrack.py). Models with more than four decoder
layers are simulated with two and with four layers and extrapolated along the straight line the
identical layers draw (tests/test_plan.py checks it against a full simulation).

Attention is counted as the chosen backend runs it: `--attn auto|varlen|flex` by flash-attn's
varlen allocations (plan_cuda.py), `--attn dense` by the per-segment dense path itself
(models/segment_attention.py on fake tensors), whose memory grows with the micro-batch's queries,
never with the square of its tokens (tests/test_plan.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch

from rrhf_fast import config as config_module
from rrhf_fast.config import TrainConfig
from rrhf_fast.errors import UserError
from rrhf_fast.models import gguf
from rrhf_fast.models.loading import load_config
from rrhf_fast.optimizers.in_backward import check_one_microbatch
from rrhf_fast.optimizers.optim import cpu_step_throughput
from rrhf_fast.planning.memtrack import CATEGORIES, MemoryReport
from rrhf_fast.planning.simulate import BatchShape, batch_shape, num_layers, plan_step

GiB = 1 << 30
# Train flags that change memory; the rest of TrainConfig does not (or is not simulated).
MEMORY_FLAGS = (
    "micro_batch_tokens", "grad_accum", "dtype", "optim", "optim_in_backward", "bf16_update",
    "max_grad_norm", "gradient_checkpointing", "lora_r", "lora_target_modules", "load_in_4bit",
    "load_in_8bit", "loss", "attn", "kernels", "offload_optimizer",
)  # fmt: skip
# What the allocator and CUDA need besides the tensors: the CUDA context, cuBLAS and NCCL
# workspaces (~1 GiB together on an H100 with torch 2.x), plus fragmentation of the caching
# allocator, typically a few percent of the peak: a plan fits when peak <= FRACTION * memory - FIXED.
MARGIN_FIXED = int(1.5 * GiB)
MARGIN_FRACTION = 0.92
SEARCH_STEP = 256  # --search reports a multiple of this many tokens
SEARCH_MAX = 1 << 17


def add_arguments(parser: argparse.ArgumentParser) -> None:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    keep = {"model", *MEMORY_FLAGS} & fields
    config_module.add_arguments(parser, TrainConfig, skip=fields - keep)
    switch = dict(action=argparse.BooleanOptionalAction, default=False)
    add = parser.add_argument
    add("--gpu-memory", metavar="SIZE", help="GPU memory to fit in: 80GiB, 24GB (10**9 bytes), 81920MiB")
    add("--search", **switch, help="find the largest --micro-batch-tokens that fits --gpu-memory")
    add("--json", **switch, help="print one JSON object")
    add("--plan-prompt-len", type=int, metavar="N", help="prompt tokens of a simulated query")
    add("--plan-response-len", type=int, metavar="N", help="tokens of each simulated response")
    add("--plan-k", type=int, default=4, metavar="K", help="responses per simulated query")


def main(args: argparse.Namespace) -> int:
    fields = dataclasses.fields(TrainConfig)
    fixed = {f.name: f.default for f in fields if not hasattr(args, f.name)}
    fixed.update(data="-", output_dir="-")
    config = config_module.config_from_args(args, TrainConfig, **fixed).validate()
    if config.optim_in_backward:  # what train refuses, with the same sentence
        check_one_microbatch(config, lambda epoch: [], 0, world=1)
    if args.search and not args.gpu_memory:
        raise UserError("--search needs --gpu-memory (the memory to fit in)")
    gpu = parse_memory(args.gpu_memory) if args.gpu_memory else None
    hf_config = read_config(config.model)
    lengths = dict(prompt_len=args.plan_prompt_len, response_len=args.plan_response_len, k=args.plan_k)
    result = run_plan(hf_config, config, gpu, search=args.search, **lengths)
    if config.offload_optimizer:  # measured once here, not in each planned step of a search
        result.cpu_params_per_s = cpu_step_throughput(config.optim)
    print(json.dumps(result.as_json()) if args.json else result.describe(config))
    return 0


@dataclasses.dataclass
class PlanResult:
    report: MemoryReport
    shape: BatchShape
    layers: int
    micro_batch_tokens: int
    gpu_bytes: int | None
    max_micro_batch_tokens: int | None = None
    searched: bool = False
    cpu_params_per_s: float | None = None  # --offload-optimizer: the host step's measured throughput

    @property
    def cpu_step_seconds(self) -> float | None:
        """The host optimizer step's time: trainable parameters / measured parameters per second."""
        if not self.cpu_params_per_s:
            return None
        return self.report.trainable_params / self.cpu_params_per_s

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_bytes is None else self.report.peak_bytes <= usable(self.gpu_bytes)

    def as_json(self) -> dict[str, Any]:
        return {
            "peak_bytes": self.report.peak_bytes,
            "peak_phase": self.report.peak_phase,
            "by_category": dict(self.report.by_category),
            "micro_batch_tokens": self.micro_batch_tokens,
            "fits": self.fits,
            "max_micro_batch_tokens": self.max_micro_batch_tokens,
            "host_peak_bytes": self.report.host_peak_bytes,
            "host_by_category": dict(self.report.host_by_category),
            "trainable_params": self.report.trainable_params,
            "cpu_params_per_s": self.cpu_params_per_s,
            "cpu_step_seconds": self.cpu_step_seconds,
        }

    def describe(self, config: TrainConfig) -> str:
        r = self.report
        how = "simulated whole" if self.layers <= 4 else "2 and 4 simulated, extrapolated"
        lines = [
            f"plan: {config.model} ({self.layers} decoder layers; {how}), {method(config)}",
            f"micro-batch: {self.micro_batch_tokens} tokens budget, simulated as {self.shape.describe()}",
            f"peak: {r.peak_bytes / GiB:.2f} GiB, during {r.peak_phase}",
            "largest value of each category over the step (they need not peak together):",
            *(f"  {c:<14} {r.by_category[c] / GiB:8.2f} GiB" for c in CATEGORIES),
        ]
        if r.host_peak_bytes:
            host = ", ".join(f"{c} {v / GiB:.2f}" for c, v in sorted(r.host_by_category.items()))
            lines.append(f"host memory (--offload-optimizer): peak {r.host_peak_bytes / GiB:.2f} GiB "
                         f"({host} GiB); the GPU figures above exclude it")  # fmt: skip
        if self.cpu_step_seconds is not None:
            lines.append(
                f"CPU optimizer step: {r.trainable_params:,} parameters / {self.cpu_params_per_s:,.0f} "
                f"parameters/s (--optim {config.optim} measured on this CPU, {torch.get_num_threads()} "
                f"threads) = {self.cpu_step_seconds:.1f} s a step on top of the GPU's forward and backward"
            )
        if self.gpu_bytes is not None:
            lines.append(
                f"fits in {self.gpu_bytes / GiB:.1f} GiB: {'yes' if self.fits else 'no'} (usable "
                f"{usable(self.gpu_bytes) / GiB:.1f} GiB: {MARGIN_FRACTION:.0%} of it, less "
                f"{MARGIN_FIXED / GiB:.1f} GiB for the CUDA context and allocator)"
            )
        if self.searched:
            best = self.max_micro_batch_tokens
            lines.append(
                f"largest --micro-batch-tokens that fits: {best}" if best else
                f"no --micro-batch-tokens fits (not even {SEARCH_STEP})"
            )  # fmt: skip
        return "\n".join(lines)


def run_plan(
    hf_config: Any, config: TrainConfig, gpu: int | None, *, search: bool = False,
    prompt_len: int | None = None, response_len: int | None = None, k: int = 4,
) -> PlanResult:  # fmt: skip
    def at(tokens: int) -> tuple[MemoryReport, BatchShape]:
        shape = batch_shape(tokens, prompt_len, response_len, k)
        return plan_step(hf_config, dataclasses.replace(config, micro_batch_tokens=tokens), shape), shape

    tokens = config.micro_batch_tokens
    report, shape = at(tokens)
    result = PlanResult(report, shape, num_layers(hf_config), tokens, gpu)
    if search and gpu is not None:
        result.searched = True
        peaks = {tokens: report.peak_bytes}

        def fits(t: int) -> bool:
            if t not in peaks:
                peaks[t] = at(t)[0].peak_bytes
            return peaks[t] <= usable(gpu)

        result.max_micro_batch_tokens = search_tokens(fits, guess=affine_guess(tokens, fits, peaks, gpu))
    return result


def affine_guess(tokens: int, fits: Any, peaks: dict[int, int], gpu: int) -> int:
    """Where the line through the peaks at `tokens` and at half of it reaches the usable memory:
    the search starts there (the peak is close to affine in the budget; the bisection settles it)."""
    half = max(SEARCH_STEP, tokens // 2 // SEARCH_STEP * SEARCH_STEP)
    if half == tokens:
        half = 2 * tokens
    fits(half)
    slope = (peaks[tokens] - peaks[half]) / (tokens - half)
    if slope <= 0:
        return tokens
    return int(tokens + (usable(gpu) - peaks[tokens]) / slope)


def search_tokens(fits: Any, guess: int | None = None, limit: int = SEARCH_MAX) -> int | None:
    """Largest multiple of SEARCH_STEP (up to limit) for which `fits(tokens)`: peak memory grows
    with the token budget, so a bracket found by steps doubling away from `guess`, then bisection;
    `limit` (a multiple of SEARCH_STEP) is returned when it fits."""
    start = min(limit, max(SEARCH_STEP, (guess or SEARCH_STEP) // SEARCH_STEP * SEARCH_STEP))
    step = SEARCH_STEP
    if fits(start):
        lo, hi = start, start + step
        while hi <= limit and fits(hi):
            lo, step = hi, 2 * step
            hi = lo + step
        if hi > limit:
            if fits(limit):
                return limit
            hi = limit
    else:
        lo, hi = start - step, start
        while lo >= SEARCH_STEP and not fits(lo):
            hi, step = lo, 2 * step
            lo = hi - step
        if lo < SEARCH_STEP:
            if not fits(SEARCH_STEP):
                return None
            lo = SEARCH_STEP
    while hi - lo > SEARCH_STEP:
        mid = (lo + hi) // 2 // SEARCH_STEP * SEARCH_STEP
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def usable(gpu_bytes: int) -> int:
    return int(MARGIN_FRACTION * gpu_bytes) - MARGIN_FIXED


def method(config: TrainConfig) -> str:
    if config.load_in_4bit or config.load_in_8bit:
        kind = f"QLoRA r={config.lora_r} ({'4' if config.load_in_4bit else '8'}-bit base)"
    else:
        kind = f"LoRA r={config.lora_r}" if config.lora_r else "full fine-tuning"
    if config.loss == "rm":
        kind += " of a reward model (score head, no lm_head)"
    weights = "bf16 weights" if config.dtype == "bfloat16" else "fp32 weights"
    extras = [kind, f"{weights}, bf16 autocast", f"--optim {config.optim}"]
    if config.bf16_update != "nearest":
        extras.append(f"--bf16-update {config.bf16_update}")
    if config.offload_optimizer:
        extras.append("optimizer offloaded to the host")
    if config.optim_in_backward:
        extras.append("in backward" + (" (two passes: clipping)" if config.max_grad_norm else ""))
    extras.append("gradient checkpointing" if config.gradient_checkpointing else "no checkpointing")
    return ", ".join(extras)


_UNITS = {"": GiB, "g": GiB, "gib": GiB, "gb": 10**9, "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
          "t": 1 << 40, "tib": 1 << 40, "tb": 10**12}  # fmt: skip


def parse_memory(text: str) -> int:
    """Bytes of "80GiB", "80GB" (10**9), "81920MiB", "80" (GiB)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS:
        raise UserError(f"--gpu-memory {text!r}: give a size such as 80GiB, 24GB or 81920MiB")
    return int(float(match.group(1)) * _UNITS[unit])


def read_config(model: str) -> Any:
    """The model's configuration from PATH/config.json alone, or from a GGUF file's metadata (no
    tensor read)."""
    from transformers import AutoConfig

    if gguf.is_gguf(model):
        return load_config(model)
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(
            f"--model {model}: no config.json there; give a directory holding the model's config.json"
        )
    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise UserError(
            f"--model {model}: cannot read its config.json ({str(err).splitlines()[0][:200]})"
        ) from None
