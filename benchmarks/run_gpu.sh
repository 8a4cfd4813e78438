#!/usr/bin/env bash
# Every benchmark in one command, for a session with a GPU. A first, short GPU lease runs
# benchmarks/gpu_visit.sh instead (benchmarks/README.md, "The GPU visit").
# Results go to benchmarks/results/ (CSV rows appended, markdown + PNG regenerated, profiler summaries) and, where $OUT is set (the
# device tool), also to $OUT: results.tar.gz (the whole results folder), the three reports and the log.
#
#   bash benchmarks/run_gpu.sh                    # all parts, in the order below
#   bash benchmarks/run_gpu.sh kernels step       # some parts (kernels | step | attention | rm | losses | pytest-bench)
#   bash benchmarks/run_gpu.sh gpu-tests          # the @pytest.mark.gpu tests (bf16 kernels, CUDA attention
#                                                 # backends); run it in its own call, before the benchmarks
#   bash benchmarks/run_gpu.sh --cpu-smoke        # the same sequence on CPU, tiny shapes, into a temp dir
#
# Order and time budget (H100; the device allows 10 minutes a command, this aims at about 8). Each
# part runs under `timeout`; rows are written as they are measured, so a part cut short keeps what
# it measured, and the reports are regenerated at the end in any case.
#   0. setup: carried wheels (.whl/), rrhf_fast importable, nvidia-smi        ~10 s
#   1. kernels:   bench_kernels.py --profile  (19 shapes x fwd, fwd+bwd x 5 providers)   KERNELS_S=210
#   2. step:      bench_step.py --profile     (10 configs x 3 providers, 1B Llama)       STEP_S=180
#   3. attention: bench_attention.py --profile (6 configs x 6 providers, 1B Llama)      ATTENTION_S=90
#   4. report.py over every CSV, then the copies into $OUT                      ~5 s
#   (rm: bench_rm.py --profile, reward-model step, packed vs padded pairs, 9 configs x 3 providers,
#    1B Llama reward model; only when named; RM_S=120)
#   (losses: bench_losses.py --profile, SimPO step over k = 2, 4, 8 responses, packed vs padded pair
#    copies, 1B Llama; only when named; LOSSES_S=120)
#   (pytest-bench: `pytest benchmarks/bench_kernels.py`, only when named; PYTEST_BENCH_S=120)
#   (gpu-tests: `pytest -m gpu tests/`, only when named; GPU_TESTS_S=420; log in $OUT/gpu_tests.log)
#
# No network on the device: nothing is installed except wheels carried in .whl/ (e.g. liger-kernel,
# cut-cross-entropy), with `pip install --no-index --no-deps --target /tmp/site`. A copy of the tree
# without .git (the device tool's) cannot see its commit: run it as
# `RRHF_BENCH_COMMIT=<git rev-parse --short HEAD, plus -dirty if so> bash benchmarks/run_gpu.sh`.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

smoke=()
out_dir=benchmarks/results
parts=()
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) smoke=(--cpu-smoke); out_dir=${SMOKE_OUT_DIR:-$(mktemp -d)} ;;
    kernels|step|attention|rm|losses|pytest-bench|gpu-tests) parts+=("$arg") ;;
    *) echo "run_gpu.sh: unknown argument '$arg' (parts: kernels step attention rm losses pytest-bench gpu-tests; --cpu-smoke)" >&2
       exit 2 ;;
  esac
done
[ ${#parts[@]} -gt 0 ] || parts=(kernels step attention)
log=${OUT:+$OUT/run_gpu.log}
log=${log:-/dev/null}
say() { echo "[run_gpu $(date +%T)] $*" | tee -a "$log"; }
run_part() {  # name, seconds, command...
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  say "$name: start (limit ${limit}s)"
  # INT, not TERM: pytest then writes its summary and junit XML, a benchmark keeps its rows.
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  say "$name: exit $rc after $((SECONDS - start))s"
}

# ---- 0. setup
if compgen -G ".whl/*.whl" >/dev/null; then
  say "installing carried wheels: $(ls .whl | tr '\n' ' ')"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# Not installed here: the repository root is the package's home (rrhf_fast/ with its kernels inside).
if ! "$PYTHON" -P -c "import rrhf_fast.kernels, rrhf_fast.models.logprobs" 2>/dev/null; then
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  "$PYTHON" -P -c "import rrhf_fast.kernels, rrhf_fast.models.logprobs" || { say "cannot import rrhf_fast"; exit 1; }
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$log"
"$PYTHON" -c "import torch, triton, transformers as t; print('torch', torch.__version__, 'triton',
triton.__version__, 'transformers', t.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$log"

commit=$("$PYTHON" -P -c "import sys; sys.path.insert(0, 'benchmarks'); import common; print(common.git_commit())")
say "commit recorded in the rows: $commit"
[ "$commit" != unknown ] || say "WARNING: no git here; pass RRHF_BENCH_COMMIT=<short sha> so rows name their commit"

# ---- 1-3. the benchmarks
common=("${smoke[@]}" --out-dir "$out_dir" --profile)
for part in "${parts[@]}"; do
  case "$part" in
    kernels) run_part kernels "${KERNELS_S:-210}" "$PYTHON" benchmarks/bench_kernels.py "${common[@]}" ;;
    step) run_part step "${STEP_S:-180}" "$PYTHON" benchmarks/bench_step.py "${common[@]}" ;;
    attention) run_part attention "${ATTENTION_S:-90}" "$PYTHON" benchmarks/bench_attention.py "${common[@]}" ;;
    rm) run_part rm "${RM_S:-120}" "$PYTHON" benchmarks/bench_rm.py "${common[@]}" ;;
    losses) run_part losses "${LOSSES_S:-120}" "$PYTHON" benchmarks/bench_losses.py "${common[@]}" ;;
    pytest-bench) run_part pytest-bench "${PYTEST_BENCH_S:-120}" "$PYTHON" -P -m pytest benchmarks/bench_kernels.py \
      -q -p no:cacheprovider --benchmark-only --benchmark-json="$out_dir/kernels_pytest_benchmark.json" ;;
    gpu-tests) run_part gpu-tests "${GPU_TESTS_S:-420}" "$PYTHON" -P -m pytest tests -m gpu -v -rA \
      -p no:cacheprovider --durations=15 --junitxml="${OUT:-/tmp}/gpu_tests.xml" ;;
  esac
done

# ---- 4. reports (also for a part that was cut short) and the copies for the device tool
if compgen -G "$out_dir/*.csv" >/dev/null; then "$PYTHON" benchmarks/report.py "$out_dir"/*.csv | tee -a "$log"; fi
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/results.tar.gz" -C "$out_dir" .
  cp "$out_dir"/*.md "$OUT/" 2>/dev/null
  say "copied to \$OUT: results.tar.gz (unpack into benchmarks/results/), the reports, run_gpu.log"
fi
say "done: results in $out_dir"
