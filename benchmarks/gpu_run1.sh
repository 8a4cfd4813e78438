#!/usr/bin/env bash
# First GPU command (about 7.5 minutes, estimated): the kernel headline, then plan vs the GPU. Run
# gpu_run2.sh right after it, while the machine is warm and keeps its Triton cache (~/.triton/cache: run 1 compiles run 2's
# kernels too).
#
#   bash benchmarks/gpu_run1.sh             # on the GPU machine (device tool: RRHF_BENCH_COMMIT=<sha>)
#   bash benchmarks/gpu_run1.sh --plan      # each part's limit and expected time, from the compile counts
#   bash benchmarks/gpu_run1.sh --dry-run   # the same sequence on the CPU: tiny shapes, interpreter
#
# Parts, in order (limits and estimates: benchmarks/gpu_plan.py; each part under `timeout -s INT`):
#   1. probe: versions, addmm / mm with out_dtype, the varlen signature, one 8192^3 bf16 GEMM
#   2. warm-compile: every token_logprobs config for every shape of run 1 and run 2, in parallel
#   3. kernel-tests: the GPU tests of the kernels (bf16, fp16, softcap, autocast, no-sync, the
#      out_dtype probe's answer and both of its branches)
#   4. kernels-headline: M=8192 D=4096 V=128256 bf16, fwd and fwd+bwd: torch, triton,
#      triton/cublas-dlogits, Liger and CCE if carried (.whl/); time and peak memory side by side
#   5. plan-vs-gpu (issue #24's first GPU check): `rrhf-fast plan`'s peak beside
#      torch.cuda.max_memory_allocated of two real steps, Llama-3.1-8B fp32 / bf16 + stochastic
#      updates in backward, then Llama-3.2-1B in every memory mode (offload last): the rest of the
#      budget, each row written as it ends (adamw8bit: bitsandbytes' wheel carried in .whl/)
#   6. the reports, the headline table, the copies into $OUT
# Results: benchmarks/results/ (CSV rows appended, markdown regenerated, probe_<gpu>.txt, the log
# gpu_run1_<UTC time>.log and the tests' junit XML), all of it also as $OUT/results.tar.gz.
RUN=run1
source "$(dirname "$0")/gpu_lib.sh"

start_run
run_part probe "$PLAN_LIMIT_probe" "$PYTHON" benchmarks/gpu_probe.py "${bench[@]}"
run_part warm-compile "$PLAN_LIMIT_warm_compile" "$PYTHON" benchmarks/warm_compile.py "${warm[@]}"
pytest_part kernel-tests "$PLAN_LIMIT_kernel_tests" -m gpu \
  tests/test_token_logprobs.py tests/test_token_logprobs_backward.py tests/test_rrhf_loss.py \
  tests/test_gpu_preflight.py
run_part kernels-headline "$PLAN_LIMIT_kernels_headline" "$PYTHON" benchmarks/bench_kernels.py "${bench[@]}" \
  --headline-only --profile --providers torch,triton,triton/cublas-dlogits,liger,cce
run_part plan-vs-gpu "$PLAN_LIMIT_plan_vs_gpu" "$PYTHON" benchmarks/plan_vs_gpu.py "${bench[@]}"
finish_run probe kernels
"$PYTHON" benchmarks/headline.py "$out_dir"/probe*.csv "$out_dir"/kernels*.csv | tee -a "$log"
