"""Compile every token_logprobs kernel config a GPU run will launch, in parallel, before it launches them.

`python benchmarks/warm_compile.py [--jobs N] [--dry-run] [--count]`

A config compiles per shape specialisation (D and the dtypes are compile-time; ints and pointers
specialise on divisibility by 16), ~15 s each on 2 CPU cores (this project's figure), one after the
other inside an autotuner. Here each (workload, kernel, config) is one job: a worker process
launches the kernel with that config pinned (rrhf_fast.kernels.autotune.pinned_configs) on the
workload's real shapes, which compiles it into Triton's on-disk cache (~/.triton/cache). The
autotuners of the benchmarks and tests that follow find every config there and only time them.

WORKLOADS lists the shapes gpu_visit.sh and gpu_more.sh launch (benchmarks/README.md, "The GPU
visit"; gpu_plan.py splits them between the two scripts, `--only`): the
kernel benchmark's headline and its correctness gate, the GPU kernel tests, and the 1B model's
lm_head in the step and attention benchmarks; tests/test_gpu_runs.py checks them against the
tests' and benchmarks' own constants. A config that does not fit the chip (shared memory) fails
to compile here as it does in the autotuner, which skips it: reported, not an error.

`--dry-run`: the same jobs on tiny shapes under the Triton interpreter (CPU), each real config's
tile sizes included; `--count`: print the number of compiles per workload and exit.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, replace

DTYPES = ("bf16", "fp16", "fp32", "bf16w32")  # bf16w32: bf16 hidden, fp32 weight (autocast)


@dataclass(frozen=True)
class Workload:
    name: str
    N: int  # hidden rows
    M: int  # targets
    D: int
    V: int
    dtype: str
    softcap: float | None = None
    cublas: bool = False  # also the cuBLAS-dlogits variant's epilogue kernel


WORKLOADS = [
    # bench_kernels.py: the headline (make_inputs: N = M + M // 4 + 1), then its provider gate.
    Workload("kernels-headline", 10241, 8192, 4096, 128256, "bf16", cublas=True),
    Workload("kernels-gate", 47, 37, 80, 523, "bf16", cublas=True),
    # tests/test_token_logprobs.py GPU_CASES and test_gpu_peak_memory_grows_with_md_plus_vd_only.
    Workload("test-bf16", 1200, 1031, 4096, 32013, "bf16"),
    Workload("test-bf16-softcap", 1200, 1031, 4096, 32013, "bf16", softcap=30.0),
    Workload("test-fp16", 1200, 1031, 4096, 32013, "fp16"),
    Workload("test-fp32", 1200, 1031, 4096, 32013, "fp32"),
    Workload("test-peak-memory", 8292, 8192, 2048, 128256, "bf16"),
    # tests/test_token_logprobs_backward.py GPU_SHAPE: autocast, fp16, bf16.
    Workload("test-backward-autocast", 1200, 1031, 1024, 32013, "bf16w32"),
    Workload("test-backward-fp16", 1200, 1031, 1024, 32013, "fp16"),
    Workload("test-backward-bf16", 1200, 1031, 1024, 32013, "bf16"),
    # bench_step.py / bench_attention.py: the 1B Llama's lm_head (D = 2048, V = 128256, bf16);
    # a micro-batch's target count M is a multiple of 16 or not, two specialisations.
    Workload("step-1b", 16500, 16000, 2048, 128256, "bf16"),
    Workload("step-1b-ragged", 16500, 16001, 2048, 128256, "bf16"),
    # tests/test_train_gpu.py: the tiny models (D = 64, V = 259), bf16 (logit parity; Gemma 2's
    # final soft-cap of 30) and the trainer's fp32 weights under bf16 autocast.
    Workload("tiny-bf16", 300, 256, 64, 259, "bf16"),
    Workload("tiny-bf16-ragged", 300, 257, 64, 259, "bf16"),
    Workload("tiny-gemma2", 300, 256, 64, 259, "bf16", softcap=30.0),
    Workload("tiny-gemma2-ragged", 300, 257, 64, 259, "bf16", softcap=30.0),
    Workload("tiny-autocast", 300, 256, 64, 259, "bf16w32"),
    Workload("tiny-autocast-ragged", 300, 257, 64, 259, "bf16w32"),
]


def dry(w: Workload) -> Workload:
    """The same workload on a tiny ragged shape in a dtype the interpreter computes (no bf16)."""
    dtype = {"bf16": "fp16", "bf16w32": "fp32"}.get(w.dtype, w.dtype)
    return replace(w, N=47, M=37, D=80, V=523, dtype=dtype)


def distinct_dry(workloads: list[Workload]) -> list[Workload]:
    """The dry versions, each distinct one once (tiny shapes make several workloads the same)."""
    seen: dict[Workload, Workload] = {}
    for w in workloads:
        seen.setdefault(replace(dry(w), name=""), dry(w))
    return list(seen.values())


def jobs(workloads: list[Workload]) -> list[tuple[Workload, str, int]]:
    """(workload, kernel, config index): each forward config, each dlogits config (with the dhidden
    fallback GEMM's config of the same index, compiled only where out_dtype GEMMs are refused), and
    the cuBLAS variant's epilogue."""
    tlp = importlib.import_module("rrhf_fast.kernels.token_logprobs")
    out = []
    for w in workloads:
        out += [(w, "fwd", i) for i in range(len(tlp.FWD_CONFIGS))]
        out += [(w, "dlogits", i) for i in range(len(tlp.DLOGITS_CONFIGS))]
        if w.cublas:
            out.append((w, "epilogue", 0))
    return out


def compiles(workloads: list[Workload]) -> int:
    """Triton compiles the jobs make (the fallback GEMM's not counted: only where out_dtype is refused)."""
    return len(jobs(workloads))


def run_job(job: tuple[Workload, str, int], device_name: str) -> tuple[str, float, str]:
    """Launch one kernel with one config on the workload's shapes; (label, seconds, status)."""
    import torch
    from triton.runtime.errors import OutOfResources

    from rrhf_fast.kernels import autotune
    from rrhf_fast.kernels import ops as kops

    tlp = importlib.import_module("rrhf_fast.kernels.token_logprobs")
    w, kernel, i = job
    label = f"{w.name} {kernel}:{i}"
    device = torch.device(device_name)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "bf16w32": torch.bfloat16}
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(w.N, w.D, generator=gen, device=device).to(half[w.dtype])
    weight = torch.randn(w.V, w.D, generator=gen, device=device).div_(w.D**0.5)
    weight = weight if w.dtype == "bf16w32" else weight.to(half[w.dtype])
    rows = torch.randint(0, w.N, (w.M,), generator=gen, device=device)
    targets = torch.randint(0, w.V, (w.M,), generator=gen, device=device)
    start = time.perf_counter()
    try:
        if kernel == "fwd":
            with autotune.pinned_configs(fwd=tlp.FWD_CONFIGS[i]):
                kops.token_logprobs_op(hidden, weight, rows, targets, w.softcap)
        else:
            # The backward op on its own, as autograd calls it: any finite LSE compiles the same kernels.
            lse = torch.full((w.M,), 1e4, device=device)
            grad = torch.rand(w.M, generator=gen, device=device)
            pins = dict(dlogits=tlp.DLOGITS_CONFIGS[i], mm=tlp.MM_CONFIGS[i % len(tlp.MM_CONFIGS)])
            how = "cublas" if kernel == "epilogue" else "fused"
            with autotune.pinned_configs(**pins):
                torch.ops.rrhf_fast.token_logprobs_backward(
                    hidden, weight, rows, targets, lse, grad, w.softcap, True, True, how
                )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        status = "ok"
    except OutOfResources as exc:
        status = f"does not fit ({str(exc).splitlines()[0][:80]}): the autotuner skips it"
    except Exception as exc:  # reported per job; the run goes on
        status = f"ERROR {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
    return label, time.perf_counter() - start, status


def _worker_init(interpret: bool) -> None:
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    torch.set_num_threads(1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="worker processes")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes under the Triton interpreter (CPU)")
    p.add_argument("--count", action="store_true", help="print the compiles per workload and exit")
    p.add_argument("--only", default=None, help="comma-separated workload names (default: all)")
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported, here and in the workers
    selected = [w for w in WORKLOADS if not args.only or w.name in args.only.split(",")]
    workloads = distinct_dry(selected) if args.dry_run else selected
    todo = jobs(workloads)
    if args.count:
        for w in workloads:
            print(f"{w.name}: {sum(1 for j in todo if j[0] == w)} compiles")
        print(f"total: {len(todo)} compiles")
        return 0
    import torch

    device = "cpu" if args.dry_run or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.dry_run:
        print("warm_compile: no CUDA device; nothing to compile (use --dry-run for the CPU rehearsal)")
        return 1
    print(f"warm compile: {len(todo)} jobs on {args.jobs} workers ({device})", flush=True)
    start, failed = time.perf_counter(), 0
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in forked children
    with cf.ProcessPoolExecutor(
        args.jobs, mp_context=ctx, initializer=_worker_init, initargs=(args.dry_run,)
    ) as ex:
        for label, seconds, status in ex.map(run_job, todo, [device] * len(todo)):
            failed += status.startswith("ERROR")
            print(f"  {label:<36} {seconds:6.1f} s  {status}", flush=True)
    print(f"warm compile: {len(todo)} jobs, {failed} errors, {time.perf_counter() - start:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
