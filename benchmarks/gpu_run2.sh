#!/usr/bin/env bash
# Second GPU command (about 6.6 minutes, estimated), right after gpu_run1.sh: the end-to-end step,
# the attention backends, the remaining GPU tests, then sweeps with what is left of the 10 minutes.
#
#   bash benchmarks/gpu_run2.sh             # on the GPU machine (device tool: RRHF_BENCH_COMMIT=<sha>)
#   bash benchmarks/gpu_run2.sh --plan      # each part's limit and expected time, from the compile counts
#   bash benchmarks/gpu_run2.sh --dry-run   # the same sequence on the CPU: tiny shapes, interpreter
#
# Parts, in order (limits and estimates: benchmarks/gpu_plan.py; each part under `timeout -s INT`):
#   1. step-headline: one RRHF step of a 1B Llama, k=6, prompt 512, responses 128: rrhf-fast/packed
#      and rrhf-fast vs the naive official-style reference: tokens/s, peak memory, MFU
#   2. attention-headline: shared-prompt varlen / flex / dense vs k padded copies (SDPA, flex)
#   3. gpu-tests: the trainer, model and attention GPU tests without flex attention (QLoRA skips
#      without bitsandbytes); gpu-tests-flex: the flex ones (an inductor compile each)
#   4. sweeps: the step's in half the time left (rrhf-fast/packed with micro-batches of 4k-32k
#      tokens, then k = 2, 4, 8 responses sharing prompts of 128-2048 tokens: where the memory
#      saved turns into throughput), then the kernels' (D, V, M) grid in the rest
#   5. the reports, the headline table, the copies into $OUT
RUN=run2
source "$(dirname "$0")/gpu_lib.sh"

start_run
run_part step-headline "$PLAN_LIMIT_step_headline" "$PYTHON" benchmarks/bench_step.py "${bench[@]}" \
  --headline-only --profile
run_part attention-headline "$PLAN_LIMIT_attention_headline" "$PYTHON" benchmarks/bench_attention.py \
  "${bench[@]}" --headline-only --profile
pytest_part gpu-tests "$PLAN_LIMIT_gpu_tests" -m gpu -k "not flex" \
  tests/test_train_gpu.py tests/test_model.py tests/test_attention.py tests/test_lora.py
pytest_part gpu-tests-flex "$PLAN_LIMIT_gpu_tests_flex" -m gpu -k flex tests/test_attention.py tests/test_model.py
run_part step-sweep half "$PYTHON" benchmarks/bench_step.py "${bench[@]}" --sweep-only \
  --micro-batch-tokens 4096,8192,16384,32768
run_part kernels-sweep "$PLAN_LIMIT_sweeps" "$PYTHON" benchmarks/bench_kernels.py "${bench[@]}" --sweep-only \
  --providers torch,triton,triton/cublas-dlogits,liger,cce
finish_run step attention kernels
"$PYTHON" benchmarks/headline.py "$out_dir"/step*.csv "$out_dir"/attention*.csv | tee -a "$log"
