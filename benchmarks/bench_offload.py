"""Time per training step with the optimizer offloaded to the host (--offload-optimizer) vs on the
device, on this machine's CPU, for a ~100M-parameter Llama-shaped model (fp32, torch AdamW).

On a CPU the "device" is host memory too, so what this measures is the offload's own overhead: the
gradient copies into the fp32 host buffers during backward, the host step on per-parameter copies,
and the copy back into the weights. Also measured: the AdamW throughput `rrhf-fast plan` uses for
its CPU step estimate (parameters per second). Writes benchmarks/results/offload_cpu.md and .csv.

    python benchmarks/bench_offload.py [--steps 5] [--tokens 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rrhf_fast.optimizers.optim import build_optimizer, cpu_step_throughput

SHAPE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=True)  # fmt: skip


def time_steps(offload: bool, steps: int, tokens: int) -> tuple[list[float], list[float], int]:
    """(seconds of each whole step, seconds of each optimizer step incl. clipping, parameters)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE)).train()
    optimizer = build_optimizer(model.named_parameters(), "adamw", lr=1e-5, offload=offload)
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, SHAPE["vocab_size"], (1, tokens))
    whole, opt = [], []
    for _ in range(steps + 1):  # the first creates the optimizer state: not timed
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        t1 = time.perf_counter()
        if offload:
            optimizer.clip_grad_norm_(1.0)
        else:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        whole.append(t2 - t0)
        opt.append(t2 - t1)
    return whole[1:], opt[1:], sum(p.numel() for p in params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "offload_cpu"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    meta = dict(date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), commit=commit,
                machine=f"{platform.processor() or platform.machine()}, {args.threads} torch threads",
                torch=torch.__version__, python=platform.python_version())  # fmt: skip
    rows = []
    for offload in (False, True):
        whole, opt, n = time_steps(offload, args.steps, args.tokens)
        rows.append(dict(provider="offloaded" if offload else "on device", params=n, tokens=args.tokens,
                         step_s=statistics.median(whole), optimizer_s=statistics.median(opt),
                         steps=args.steps, **meta))  # fmt: skip
        print(rows[-1], flush=True)
    rate = cpu_step_throughput("adamw")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(f"{args.out}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "# --offload-optimizer vs on-device optimizer, CPU (benchmarks/bench_offload.py)",
        "",
        f"{meta['date']}, commit {commit}, {meta['machine']}, torch {meta['torch']}, "
        f"Python {meta['python']}. "
        f"Llama-shaped model of {rows[0]['params'] / 1e6:.0f}M parameters, fp32, torch AdamW, one "
        f"micro-batch of {args.tokens} tokens, median of {args.steps} steps after a first. On a CPU the "
        "device is host memory too: the difference is the offload's overhead (gradient copies, "
        "per-parameter host step, copy back), not a PCIe transfer. A shared machine: other jobs ran.",
        "",
        "| optimizer | step (s) | optimizer step incl. clipping (s) |",
        "|---|---|---|",
        *(f"| {r['provider']} | {r['step_s']:.3f} | {r['optimizer_s']:.3f} |" for r in rows),
        "",
        f"torch AdamW on this CPU: {rate:,.0f} parameters/s (one 4M-value tensor; what `rrhf-fast plan "
        "--offload-optimizer` divides the trainable parameters by to estimate the host step).",
        "",
    ]
    Path(f"{args.out}.md").write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.out}.md and .csv")


if __name__ == "__main__":
    main()
