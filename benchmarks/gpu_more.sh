#!/usr/bin/env bash
# The optional second GPU command, after gpu_visit.sh: what the visit leaves out. It has its own
# warm compile (a fresh machine has no Triton cache) and the same part-by-part saving into $OUT.
#
#   RRHF_BENCH_COMMIT=<sha> bash benchmarks/gpu_more.sh    # device tool: timeout_s 600
#   bash benchmarks/gpu_more.sh --plan | --dry-run
#
# Parts (benchmarks/gpu_plan.py, more_parts): warm-compile (the trainer tests' tiny models, the 1B
# lm_head), gpu-tests (trainer, model, attention, QLoRA), gpu-tests-flex, plan-vs-gpu-1b (Llama-3.2-1B
# in every memory mode), step-sweep (half of what is left), kernels-sweep (the rest).
source "$(dirname "$0")/gpu_lib.sh"
exec "$PYTHON" benchmarks/gpu_runner.py more "$@"
