"""The "what fits where" table of docs/memory.md, produced by `rrhf-fast plan` (fake tensors, no GPU).

For each model (configs written from the published dimensions, benchmarks/memory_models.py), each
method and each GPU size: the largest --micro-batch-tokens whose simulated step fits, found by
plan's own search. Writes benchmarks/results/plan_table.md.

    python benchmarks/plan_table.py [--models Llama-3.2-1B,...] [--out FILE] [--readme docs/memory.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig

sys.path.insert(0, str(Path(__file__).parent))
from memory_models import LLAMA3, model_config  # noqa: E402

from rrhf_fast.config import TrainConfig  # noqa: E402
from rrhf_fast.planning import plan  # noqa: E402
from rrhf_fast.planning.simulate import batch_shape, plan_step  # noqa: E402

LLAMA_70B = dict(LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                 num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False)  # fmt: skip
MODELS = ["Llama-3.2-1B", "Llama-3.2-3B", "Llama-3.1-8B", "Qwen2.5-7B", "Llama-3.1-70B"]
ADAPTER = dict(lora_r=16, lora_alpha=32.0, lora_dropout=0.0)
METHODS = {  # every one with gradient checkpointing and 8-bit AdamW (the train defaults otherwise)
    "full": dict(),  # fp32 master weights, bf16 autocast
    "LoRA": dict(dtype="bfloat16", **ADAPTER),
    "QLoRA": dict(load_in_4bit=True, **ADAPTER),
}
LIMIT = 32768  # budgets above are not searched (shown as ">= 32768"): 2 shared CPU cores
GPUS = {"24 GB": 24 << 30, "48 GB": 48 << 30, "80 GB": 80 << 30}
GOAL_GPUS = {"24 GB": 24 << 30, "40 GB": 40 << 30, "48 GB": 48 << 30, "80 GB": 80 << 30}  # + A100 40GB
GOALS = {  # the memory goals: 8B full fine-tuning at 4096 tokens, with and without the flags
    "fp32 master, AdamW8bit (no in-backward: today's default)": dict(),
    "bf16 weights, AdamW8bit (no in-backward, no stochastic rounding)": dict(dtype="bfloat16"),
    "fp32 master, AdamW8bit, in backward (clipping: two passes)": dict(optim_in_backward=True),
    "fp32 master, AdamW fp32 states, in backward (clipping: two passes)": dict(
        optim="adamw", optim_in_backward=True
    ),
    "bf16 + stochastic rounding, AdamW8bit, in backward (clipping: two passes)": dict(
        dtype="bfloat16", optim="adamw8bit", optim_in_backward=True, bf16_update="stochastic"
    ),
    "bf16 + Kahan updates, AdamW8bit, in backward (clipping: two passes)": dict(
        dtype="bfloat16", optim="adamw8bit", optim_in_backward=True, bf16_update="kahan"
    ),
    "fp32 weights on the GPU, --offload-optimizer (states, gradients, step on the host)": dict(
        offload_optimizer=True
    ),
    "bf16 weights on the GPU (fp32 masters on the host), --offload-optimizer, 2048 tokens": dict(
        dtype="bfloat16", offload_optimizer=True, micro_batch_tokens=2048
    ),
}


def hf_config(name: str):
    return LlamaConfig(**LLAMA_70B) if name == "Llama-3.1-70B" else model_config(name, smoke=False)


def flags(**kw) -> TrainConfig:
    return TrainConfig(model="-", data="-", output_dir="-", gradient_checkpointing=True, **kw)


def largest(name: str, method: str) -> dict[str, int | None]:
    """The largest budget per GPU size, every simulated budget shared by the three searches."""
    cfg, config = hf_config(name), flags(**METHODS[method])
    peaks: dict[int, int] = {}

    def peak(tokens: int) -> int:
        if tokens not in peaks:
            shape = batch_shape(tokens)
            peaks[tokens] = plan_step(
                cfg, dataclasses.replace(config, micro_batch_tokens=tokens), shape
            ).peak_bytes
        return peaks[tokens]

    out = {}
    for gpu_name, gpu in GPUS.items():

        def fits(t: int, gpu: int = gpu) -> bool:
            return peak(t) <= plan.usable(gpu)

        peak(4096)
        out[gpu_name] = plan.search_tokens(fits, guess=plan.affine_guess(4096, fits, peaks, gpu), limit=LIMIT)
    out["peak at 4096"] = peaks[4096]
    return out


def _cell(tokens: int | None) -> str:
    if tokens is None:
        return "does not fit"
    return f">= {tokens}" if tokens >= LIMIT else str(tokens)


def goal_rows() -> list[str]:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    rows = []
    for label, kw in GOALS.items():
        if not set(kw) <= fields:
            missing = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(set(kw) - fields))
            rows.append(f"| Llama-3.1-8B full, {label} | not planned: this build has no {missing} |")
            continue
        config = flags(**{"micro_batch_tokens": 4096, **kw})
        report = plan_step(hf_config("Llama-3.1-8B"), config, batch_shape(config.micro_batch_tokens))
        gib = report.peak_bytes / 2**30
        fits = [g for g, b in GOAL_GPUS.items() if report.peak_bytes <= plan.usable(b)]
        host = f"; host {report.host_peak_bytes / 2**30:.1f} GiB" if report.host_peak_bytes else ""
        rows.append(f"| Llama-3.1-8B full, {label} | planned: {gib:.1f} GiB peak ({report.peak_phase})"
                    f"{host}; fits: {', '.join(fits) or 'none of 24/40/48/80 GB'} |")  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "plan_table.md"))
    parser.add_argument(
        "--readme", default=str(Path(__file__).parent.parent / "docs" / "memory.md"), help="'' to skip"
    )
    parser.add_argument("--goals-only", action="store_true", help="recompute only the goal rows")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.goals_only:
        return refresh_goals(Path(args.out), Path(args.readme) if args.readme else None)
    t0 = time.time()
    lines = [
        "| model | method | peak at 4096 tokens | " + " | ".join(GPUS) + " |",
        "|---|---|---|" + "---|" * len(GPUS),
    ]
    for name in args.models.split(","):
        for method in METHODS:
            cell = largest(name, method)
            sizes = [_cell(cell[g]) for g in GPUS]
            lines.append(
                f"| {name} | {method} | {cell['peak at 4096'] / 2**30:.1f} GiB | " + " | ".join(sizes) + " |"
            )
            print(lines[-1], flush=True)
    goals = ["| goal | plan |", "|---|---|", *goal_rows()]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    header = [
        "# What fits where: largest --micro-batch-tokens per GPU (rrhf-fast plan)",
        "",
        f"Generated by `python benchmarks/plan_table.py` on {datetime.date.today()}, commit {commit}, "
        f"torch {torch.__version__}, in {time.time() - t0:.0f} s on a CPU (fake tensors, no GPU). Every "
        "method with gradient checkpointing and --optim adamw8bit; full = fp32 master weights + bf16 "
        "autocast; LoRA = r 16 on all linears, bf16 base; QLoRA = NF4 base (double quantisation). Each "
        "micro-batch is one query: a prompt and k = 4 responses of a quarter of its length. Cells: the "
        f"largest --micro-batch-tokens (multiple of {plan.SEARCH_STEP}, searched up to {LIMIT}) whose "
        f"simulated peak <= {plan.MARGIN_FRACTION:.0%} of the GPU's memory - "
        f"{plan.MARGIN_FIXED / 2**30:.1f} GiB (CUDA context, allocator). Models over 4 layers: 2 and 4 "
        "layers simulated, extrapolated (tests/test_plan.py checks the extrapolation against whole "
        "simulations). Not measured on a GPU.",
        "",
    ]
    Path(args.out).write_text("\n".join(header + lines + [""] + goals) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    if args.readme:
        write_readme(Path(args.readme), lines + [""] + goals)


def refresh_goals(out: Path, readme: Path | None) -> None:
    """Replace the goal rows of an existing table (and the README's copy) with fresh ones."""
    goals = goal_rows()
    for path in [out] + ([readme] if readme else []):
        text = path.read_text(encoding="utf-8")
        head, rest = text.split("| goal | plan |\n|---|---|\n", 1)
        old = [line for line in rest.splitlines(keepends=True) if line.startswith("| Llama-3.1-8B full, ")]
        tail = rest[len("".join(old)) :]
        path.write_text(head + "| goal | plan |\n|---|---|\n" + "\n".join(goals) + "\n" + tail)
        print(f"updated {path}")


def write_readme(path: Path, table: list[str]) -> None:
    """The table between the README's plan-table markers."""
    text = path.read_text(encoding="utf-8")
    start, end = "<!-- plan-table -->\n", "<!-- /plan-table -->"
    head, rest = text.split(start, 1)
    path.write_text(head + start + "\n".join(table) + "\n" + end + rest.split(end, 1)[1], encoding="utf-8")
    print(f"updated {path}")


if __name__ == "__main__":
    main()
