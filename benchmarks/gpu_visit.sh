#!/usr/bin/env bash
# One GPU visit, one command: every headline number in at most 8 minutes planned, each part's
# results in $OUT as soon as the part ends (a command cut off at its limit keeps what it finished).
#
#   RRHF_BENCH_COMMIT=<sha> bash benchmarks/gpu_visit.sh   # on the GPU machine (device tool: timeout_s 600)
#   bash benchmarks/gpu_visit.sh --plan      # each part's expected time and cap, and the total
#   bash benchmarks/gpu_visit.sh --dry-run   # the same sequence on the CPU: tiny shapes, interpreter
#
# RRHF_GPU_SECONDS (default 480): the device time this command may take; a part that does not fit
# what is left is skipped and marked so in summary.md. Parts, in priority order (estimates and caps:
# benchmarks/gpu_plan.py; the runner: benchmarks/gpu_runner.py):
#   1. probe: versions, addmm / mm with out_dtype, the varlen signature, one 8192^3 bf16 GEMM
#   2. warm-compile: every token_logprobs config for every shape this visit launches, in parallel
#   3. kernel-tests: the kernels' GPU tests (bf16, fp16, softcap, autocast, no sync, out_dtype)
#   4. kernels-headline: M=8192 D=4096 V=128256 bf16, fwd and fwd+bwd: torch, triton,
#      triton/cublas-dlogits, Liger and CCE when their wheels are carried (.whl/)
#   5. step-headline: the packed step against the naive official-style step: tokens/s, peak, MFU
#   6. attention-headline: shared-prompt varlen / flex / dense against k padded copies
#   7. plan-vs-gpu: `rrhf-fast plan`'s peak against torch.cuda.max_memory_allocated, 8B goal rows
# Everything else: benchmarks/gpu_more.sh, an optional second command.
source "$(dirname "$0")/gpu_lib.sh"
exec "$PYTHON" benchmarks/gpu_runner.py visit "$@"
