"""The two commands of a first GPU run: each part's time limit, and its expected time from the compile counts.

`python benchmarks/gpu_plan.py run1|run2 [--shell]` prints the plan of benchmarks/gpu_run1.sh or
gpu_run2.sh (the scripts print it first, and `--plan` prints it alone); `--shell` prints the limits
as shell assignments (PLAN_LIMIT_<part>=seconds) for the script to read.

Every figure here is an estimate, not a measurement: no GPU has run this project yet. The unit
costs are named constants; the counts come from the code (the autotune lists, warm_compile's
workloads, the GPU tests). The estimate of a part is its process start plus what it compiles plus
what it times; its limit (`timeout -s INT`) is the estimate with room, and the limits of one
command add up to less than the device's 10 minutes a command.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

import warm_compile

COMMAND_S = 600  # the device tool's limit for one command
MARGIN_S = 45  # setup, the copies into $OUT, and the tool's own start inside those 10 minutes
# Unit costs (estimates). TRITON_COMPILE_S: one Triton compile on one core; this project measured
# ~15 s on its 2 shared CPU cores (benchmarks/README.md), and the GPU host's 16 cores are likely
# faster each: an upper figure. INDUCTOR_S: one inductor graph (flex attention, torch.compile),
# ~20 s on the same 2 cores, less with the host's parallel compile workers.
TRITON_COMPILE_S = float(os.environ.get("RRHF_GPU_COMPILE_S", 15))
INDUCTOR_S = float(os.environ.get("RRHF_GPU_INDUCTOR_S", 12))
START_S = 15  # python, torch, triton, transformers imports and the CUDA context, per process
WORKERS = 15  # gpu_run1.sh's warm_compile --jobs: the GPU host's 16 cores less one
# One timed provider x mode at the headline: do_bench's estimate + 200 ms warm-up + 1 s timed +
# the peak-memory call + the profiler call.
KERNEL_ROW_S = 2.0
STEP_PROVIDER_S = 14  # the 1B model built on the GPU, a warm-up step, 1.5 s timed, peak, profile
ATTENTION_PROVIDER_S = 3
# benchmarks/plan_vs_gpu.py: a plan on the host (~5 s for 8B), the model built on the GPU, two steps
# (two passes each with --optim-in-backward); the offload rows add a CPU optimizer step, last.
PLAN_VS_GPU_RUNS = 7
PLAN_VS_GPU_ROW_S = 15
# The GPU tests each pytest part selects (tests/test_gpu_runs.py's dry runs count them).
TESTS = {"kernel-tests": 11, "gpu-tests": 14, "gpu-tests-flex": 7}


@dataclass
class Part:
    name: str
    limit_s: int
    expected_s: float
    basis: str


def run1_parts(liger_cce: bool) -> list[Part]:
    from bench_kernels import MODES

    compiles = warm_compile.compiles(warm_compile.WORKLOADS)
    rounds = math.ceil(compiles / WORKERS)
    kernel_tests = TESTS["kernel-tests"]
    uncached = 5  # rrhf_loss's forward (official / paper) and backward kernels, one fallback GEMM config
    providers = 3 + (2 if liger_cce else 0)  # torch, triton, triton/cublas-dlogits (+ liger, cce)
    third_party = 8 if liger_cce else 0  # their Triton kernels, compiled at the gate shape and the headline
    return [
        Part("probe", 60, START_S + 5, "versions, out_dtype GEMMs, varlen signature, 8192^3 bf16 GEMM"),
        Part(
            "warm-compile",
            200,
            START_S + rounds * TRITON_COMPILE_S,
            f"{compiles} Triton compiles on {WORKERS} workers: {rounds} rounds x {TRITON_COMPILE_S:.0f} s",
        ),
        Part(
            "kernel-tests",
            140,
            START_S + kernel_tests * 2 + uncached * TRITON_COMPILE_S,
            f"{kernel_tests} tests, token_logprobs configs cached, {uncached} compiles not warmed",
        ),
        Part(
            "kernels-headline",
            130,
            START_S + 8 + providers * len(MODES) * KERNEL_ROW_S + third_party * TRITON_COMPILE_S,
            f"{providers} providers x {len(MODES)} modes x {KERNEL_ROW_S:.0f} s"
            + (f" + {third_party} third-party compiles" if third_party else " (Liger / CCE not carried)"),
        ),
        Part(
            "plan-vs-gpu",
            0,
            START_S + PLAN_VS_GPU_RUNS * PLAN_VS_GPU_ROW_S,
            f"{PLAN_VS_GPU_RUNS} plan + two real steps x {PLAN_VS_GPU_ROW_S} s (8B rows first; the rest of "
            "the budget, each row kept as it ends; adamw8bit needs the carried bitsandbytes wheel)",
        ),
    ]


def run2_parts() -> list[Part]:
    flex_graphs_tests = 12  # test_attention (3 masks) and test_model (4 archs), forward + backward
    flex_graphs_bench = 4  # shared-prompt/flex and padded/flex_attention, forward + backward
    return [
        Part("step-headline", 120, START_S + 3 * STEP_PROVIDER_S + 2 * TRITON_COMPILE_S,
             f"3 providers x {STEP_PROVIDER_S} s (1B model), 2 rrhf_loss compiles"),
        Part("attention-headline", 150,
             START_S + 5 + 5 * ATTENTION_PROVIDER_S + flex_graphs_bench * INDUCTOR_S,
             f"5 providers (flash-attn absent), {flex_graphs_bench} flex graphs x {INDUCTOR_S:.0f} s"),
        Part("gpu-tests", 90, START_S + TESTS["gpu-tests"] * 2 + 2 * INDUCTOR_S,
             f"{TESTS['gpu-tests']} trainer, model, attention, QLoRA tests; Gemma 2's flex; Triton cached"),
        Part("gpu-tests-flex", 160, START_S + flex_graphs_tests * INDUCTOR_S,
             f"{TESTS['gpu-tests-flex']} flex tests: {flex_graphs_tests} graphs x {INDUCTOR_S:.0f} s"),
        Part("sweeps", 0, 0, "the rest of the command: the step sweep (k, prompt length), the kernels'"),
    ]  # fmt: skip


def parts(run: str, liger_cce: bool = False) -> list[Part]:
    if run == "run1":
        return run1_parts(liger_cce)
    if run == "run2":
        return run2_parts()
    raise SystemExit(f"gpu_plan.py: unknown run {run!r} (run1 or run2)")


def table(run: str, liger_cce: bool) -> str:
    ps = parts(run, liger_cce)
    lines = [f"plan of {run} (estimates from compile counts; no GPU has timed these yet):"]
    for p in ps:
        limit = f"{p.limit_s:4d} s" if p.limit_s else "  rest"
        lines.append(f"  {p.name:<20} expected {p.expected_s:5.0f} s  limit {limit}  ({p.basis})")
    expected, limits = sum(p.expected_s for p in ps), sum(p.limit_s for p in ps)
    lines.append(
        f"  total: expected {expected:.0f} s ({expected / 60:.1f} min), limits {limits} s "
        f"of {COMMAND_S - MARGIN_S} s ({COMMAND_S} s a command less {MARGIN_S} s of margin)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", choices=("run1", "run2"))
    p.add_argument("--shell", action="store_true", help="PLAN_LIMIT_<part>=seconds lines for the script")
    p.add_argument("--liger-cce", action="store_true", help="Liger and CCE wheels are carried")
    args = p.parse_args(argv)
    if args.shell:
        for part in parts(args.run, args.liger_cce):
            print(f"PLAN_LIMIT_{part.name.replace('-', '_')}={part.limit_s}")
        print(f"PLAN_BUDGET={COMMAND_S - MARGIN_S}")
        return 0
    print(table(args.run, args.liger_cce))
    return 0


if __name__ == "__main__":
    sys.exit(main())
