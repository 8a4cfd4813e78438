"""The parts of a GPU visit: what each runs, its expected time from the compile counts, its time cap.

Two scripts share this plan (benchmarks/gpu_runner.py runs it, part by part):
- `visit` (benchmarks/gpu_visit.sh): every headline number in one command of at most 8 minutes
  planned, in priority order: probe, warm compile, the kernels' GPU tests, the kernel headline, the
  end-to-end step headline, the attention headline, plan vs measured memory for the 8B goal rows;
- `more` (benchmarks/gpu_more.sh, optional, a second command): its own warm compile, the other GPU
  tests, plan vs GPU for the 1B model in every memory mode, then the step's and the kernels' sweeps.

`python benchmarks/gpu_plan.py visit|more [--liger-cce] [--budget S]` prints the plan (the scripts'
`--plan` prints the same). Every figure here is an estimate, not a measurement: no GPU has run
this project yet. The unit costs are named constants; the counts come from the code (the autotune
lists, warm_compile's workloads, the GPU tests). A part's estimate is its process start plus what
it compiles plus what it times; its cap is the estimate with room. At run time a part whose
estimate does not fit what is left of the budget (RRHF_GPU_SECONDS, default 480 s) is skipped and
marked so, and a part that runs gets the smaller of its cap and what is left.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import warm_compile

BUDGET_S = 480  # RRHF_GPU_SECONDS' default: 8 minutes of a 10-minute command
COMMAND_S = 600  # the device tool's limit for one command
# Unit costs (estimates). TRITON_COMPILE_S: one Triton compile on one core; this project measured
# ~15 s on its 2 shared CPU cores (benchmarks/README.md), and the GPU host's 16 cores are likely
# faster each: an upper figure. INDUCTOR_S: one inductor graph (flex attention, torch.compile),
# ~20 s on the same 2 cores, less with the host's parallel compile workers.
TRITON_COMPILE_S = float(os.environ.get("RRHF_GPU_COMPILE_S", 15))
INDUCTOR_S = float(os.environ.get("RRHF_GPU_INDUCTOR_S", 12))
START_S = 15  # python, torch, triton, transformers imports and the CUDA context, per process
WORKERS = 15  # warm_compile --jobs: the GPU host's 16 cores less one
# One timed provider x mode at the headline: do_bench's estimate + 200 ms warm-up + 1 s timed +
# the peak-memory call + the profiler call.
KERNEL_ROW_S = 2.0
STEP_PROVIDER_S = 14  # the 1B model built on the GPU, a warm-up step, 1.5 s timed, peak, profile
ATTENTION_PROVIDER_S = 3
# benchmarks/plan_vs_gpu.py: a plan on the host (~5 s for 8B), the model built on the GPU, two steps
# (two passes each with --optim-in-backward); the offload rows add a CPU optimizer step, last.
PLAN_VS_GPU_ROW_S = 15
# The GPU tests each pytest part selects (tests/test_gpu_runs.py's dry runs count them).
TESTS = {"kernel-tests": 11, "gpu-tests": 14, "gpu-tests-flex": 7}
KERNEL_TEST_FILES = ("tests/test_token_logprobs.py", "tests/test_token_logprobs_backward.py",
                     "tests/test_rrhf_loss.py", "tests/test_gpu_preflight.py")  # fmt: skip
GPU_TEST_FILES = (
    "tests/test_train_gpu.py",
    "tests/test_model.py",
    "tests/test_attention.py",
    "tests/test_lora.py",
)
FLEX_TEST_FILES = ("tests/test_attention.py", "tests/test_model.py")
# plan_vs_gpu.py rows: the visit's are issue #24's 8B goal rows; the second script's the 1B model.
GOAL_MODES = ("bf16-stochastic-in-backward", "fp32-in-backward")
GOAL_RUNS = ",".join(f"Llama-3.1-8B:{m}" for m in GOAL_MODES)
MORE_RUNS = "Llama-3.2-1B:*"
KERNEL_PROVIDERS = "torch,triton,triton/cublas-dlogits,liger,cce"
# warm_compile.py's workloads each script launches (the rest are the second script's).
VISIT_WORKLOADS = tuple(w.name for w in warm_compile.WORKLOADS if not w.name.startswith("tiny-"))
MORE_WORKLOADS = tuple(w.name for w in warm_compile.WORKLOADS if w.name.startswith(("tiny-", "step-1b")))


@dataclass
class Context:
    """What a part's command line depends on: the interpreter, the results folder, the mode."""

    python: str = sys.executable
    out_dir: str = "benchmarks/results"
    dry: bool = False  # the CPU rehearsal: tiny shapes, Triton's interpreter

    def bench(self) -> list[str]:
        return (["--cpu-smoke"] if self.dry else []) + ["--out-dir", self.out_dir]

    def warm(self, workloads: tuple[str, ...]) -> list[str]:
        jobs = (
            ["--dry-run", "--jobs", "2"]
            if self.dry
            else ["--jobs", os.environ.get("WARM_JOBS", str(WORKERS))]
        )
        return [*jobs, "--only", ",".join(workloads)]

    def pytest(self, name: str, *args: str) -> list[str]:
        flags = [
            "-v",
            "-rA",
            "-p",
            "no:cacheprovider",
            "--durations=15",
            f"--junitxml={self.out_dir}/{name}.xml",
        ]
        return [self.python, "-P", "-m", "pytest", *args, *flags]


@dataclass
class Part:
    name: str
    cap_s: int  # the most it may take; 0: what is left of the budget; -1: half of what is left
    expected_s: float
    basis: str
    command: Callable[[Context], list[str]] = field(repr=False)
    topics: tuple[str, ...] = ()  # the benchmark CSVs it writes (for the headline tables)


def _py(script: str, *args: str) -> Callable[[Context], list[str]]:
    return lambda c: [c.python, f"benchmarks/{script}", *c.bench(), *args]


def visit_parts(liger_cce: bool) -> list[Part]:
    from bench_kernels import MODES

    compiles = warm_compile.compiles([w for w in warm_compile.WORKLOADS if w.name in VISIT_WORKLOADS])
    rounds = math.ceil(compiles / WORKERS)
    uncached = 5  # rrhf_loss's forward (official / paper) and backward kernels, one fallback GEMM config
    providers = 3 + (2 if liger_cce else 0)  # torch, triton, triton/cublas-dlogits (+ liger, cce)
    third_party = 8 if liger_cce else 0  # their Triton kernels, compiled at the gate shape and the headline
    flex_graphs = 4  # shared-prompt/flex and padded/flex_attention, forward + backward
    n_tests = TESTS["kernel-tests"]
    return [
        Part("probe", 60, START_S + 5, "versions, out_dtype GEMMs, varlen signature, 8192^3 bf16 GEMM",
             _py("gpu_probe.py"), ("probe",)),
        Part("warm-compile", 180, START_S + rounds * TRITON_COMPILE_S,
             f"{compiles} Triton compiles on {WORKERS} workers: {rounds} rounds x {TRITON_COMPILE_S:.0f} s",
             lambda c: [c.python, "benchmarks/warm_compile.py", *c.warm(VISIT_WORKLOADS)]),
        Part("kernel-tests", 140, START_S + n_tests * 2 + uncached * TRITON_COMPILE_S,
             f"{n_tests} tests, token_logprobs configs cached, {uncached} compiles not warmed",
             lambda c: c.pytest("kernel-tests", "-m", "gpu", *KERNEL_TEST_FILES)),
        Part("kernels-headline", 180,
             START_S + 8 + providers * len(MODES) * KERNEL_ROW_S + third_party * TRITON_COMPILE_S,
             f"{providers} providers x {len(MODES)} modes x {KERNEL_ROW_S:.0f} s"
             + (f" + {third_party} third-party compiles" if third_party else " (Liger / CCE not carried)"),
             _py("bench_kernels.py", "--headline-only", "--profile", "--providers", KERNEL_PROVIDERS),
             ("kernels",)),
        Part("step-headline", 120, START_S + 3 * STEP_PROVIDER_S,
             f"3 providers x {STEP_PROVIDER_S} s (1B model; rrhf_loss compiled by kernel-tests)",
             _py("bench_step.py", "--headline-only", "--profile"), ("step",)),
        Part("attention-headline", 150, START_S + 5 + 5 * ATTENTION_PROVIDER_S + flex_graphs * INDUCTOR_S,
             f"5 providers (flash-attn absent), {flex_graphs} flex graphs x {INDUCTOR_S:.0f} s",
             _py("bench_attention.py", "--headline-only", "--profile"), ("attention",)),
        Part("plan-vs-gpu", 0, START_S + len(GOAL_MODES) * PLAN_VS_GPU_ROW_S,
             f"the 8B goal rows: {len(GOAL_MODES)} x (plan + two real steps) x {PLAN_VS_GPU_ROW_S} s "
             "(adamw8bit: bitsandbytes' wheel carried); the rest of the budget",
             lambda c: [c.python, "benchmarks/plan_vs_gpu.py", *c.bench(), "--runs", GOAL_RUNS,
                        "--modes", ",".join(GOAL_MODES)], ("plan_vs_gpu",)),
    ]  # fmt: skip


def more_parts(liger_cce: bool) -> list[Part]:
    compiles = warm_compile.compiles([w for w in warm_compile.WORKLOADS if w.name in MORE_WORKLOADS])
    rounds = math.ceil(compiles / WORKERS)
    flex_graphs_tests = 12  # test_attention (3 masks) and test_model (4 archs), forward + backward
    from plan_vs_gpu import MODES as PLAN_MODES

    return [
        Part("warm-compile", 120, START_S + rounds * TRITON_COMPILE_S,
             f"{compiles} Triton compiles on {WORKERS} workers (the trainer tests' models, the 1B lm_head)",
             lambda c: [c.python, "benchmarks/warm_compile.py", *c.warm(MORE_WORKLOADS)]),
        Part("gpu-tests", 90, START_S + TESTS["gpu-tests"] * 2 + 2 * INDUCTOR_S,
             f"{TESTS['gpu-tests']} trainer, model, attention, QLoRA tests; Gemma 2's flex",
             lambda c: c.pytest("gpu-tests", "-m", "gpu", "-k", "not flex", *GPU_TEST_FILES)),
        Part("gpu-tests-flex", 160, START_S + flex_graphs_tests * INDUCTOR_S,
             f"{TESTS['gpu-tests-flex']} flex tests: {flex_graphs_tests} graphs x {INDUCTOR_S:.0f} s",
             lambda c: c.pytest("gpu-tests-flex", "-m", "gpu", "-k", "flex", *FLEX_TEST_FILES)),
        Part("plan-vs-gpu-1b", 120, START_S + len(PLAN_MODES) * PLAN_VS_GPU_ROW_S,
             f"Llama-3.2-1B in {len(PLAN_MODES)} memory modes (offload last)",
             lambda c: [c.python, "benchmarks/plan_vs_gpu.py", *c.bench(), "--runs", MORE_RUNS],
             ("plan_vs_gpu",)),
        Part("step-sweep", -1, START_S + 4 * STEP_PROVIDER_S,
             "micro-batches of 4k-32k tokens, then k and prompt length",
             _py("bench_step.py", "--sweep-only", "--micro-batch-tokens", "4096,8192,16384,32768"),
             ("step",)),
        Part("kernels-sweep", 0, START_S + 20, "the kernels' (D, V, M) grid: the rest of the budget",
             _py("bench_kernels.py", "--sweep-only", "--providers", KERNEL_PROVIDERS), ("kernels",)),
    ]  # fmt: skip


SCRIPTS = {"visit": visit_parts, "more": more_parts}


def parts(script: str, liger_cce: bool = False) -> list[Part]:
    if script not in SCRIPTS:
        raise SystemExit(f"gpu_plan.py: unknown script {script!r} (visit or more)")
    return SCRIPTS[script](liger_cce)


def budget() -> int:
    """RRHF_GPU_SECONDS (default 480): the device time this command may take."""
    raw = os.environ.get("RRHF_GPU_SECONDS", str(BUDGET_S))
    try:
        value = int(float(raw))
    except ValueError:
        raise SystemExit(f"RRHF_GPU_SECONDS must be a number of seconds, got {raw!r}") from None
    if not 0 < value <= COMMAND_S:
        raise SystemExit(
            f"RRHF_GPU_SECONDS must lie in 1..{COMMAND_S} (the device's limit a command), got {value}"
        )
    return value


def table(script: str, liger_cce: bool, budget_s: int) -> str:
    ps = parts(script, liger_cce)
    lines = [f"plan of gpu_{script}.sh (estimates from compile counts; no GPU has timed these yet):"]
    for p in ps:
        cap = {0: "  rest", -1: "  half"}.get(p.cap_s, f"{p.cap_s:4d} s")
        lines.append(f"  {p.name:<20} expected {p.expected_s:5.0f} s  cap {cap}  ({p.basis})")
    expected = sum(p.expected_s for p in ps)
    lines.append(
        f"  total: expected {expected:.0f} s ({expected / 60:.1f} min) of a {budget_s} s budget "
        f"(RRHF_GPU_SECONDS); a part that does not fit what is left is skipped and marked"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("script", choices=sorted(SCRIPTS))
    p.add_argument("--liger-cce", action="store_true", help="Liger and CCE wheels are carried")
    p.add_argument("--budget", type=int, default=None, help="seconds (default: RRHF_GPU_SECONDS or 480)")
    args = p.parse_args(argv)
    print(table(args.script, args.liger_cce, args.budget or budget()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
