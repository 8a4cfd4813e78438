# Shared by gpu_run1.sh and gpu_run2.sh (sourced, not run): arguments, setup, the parts under
# `timeout -s INT`, the reports and the copies into $OUT. The caller sets RUN=run1|run2 first.
#
#   --dry-run   the same sequence on this CPU: tiny shapes, Triton's interpreter, results in a temp
#               directory (SMOKE_OUT_DIR), never in benchmarks/results/
#   --plan      print the plan (each part's limit and expected time, from the compile counts) and exit
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

dry=0
plan_only=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry=1 ;;
    --plan) plan_only=1 ;;
    *) echo "gpu_$RUN.sh: unknown argument '$arg' (--dry-run, --plan)" >&2; exit 2 ;;
  esac
done

# ---- setup: carried wheels, rrhf_fast importable, the plan's limits
if [ "$dry" = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
  echo "installing carried wheels: $(ls .whl | tr '\n' ' ')"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# This tree's rrhf_fast is the one measured, installed or not (an installed copy may be another tree).
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
liger_cce=()
"$PYTHON" -c "import liger_kernel, cut_cross_entropy" 2>/dev/null && liger_cce=(--liger-cce)
if [ "$plan_only" = 1 ]; then
  (cd benchmarks && "$PYTHON" gpu_plan.py "$RUN" "${liger_cce[@]}")
  exit $?
fi
eval "$(cd benchmarks && "$PYTHON" gpu_plan.py "$RUN" --shell "${liger_cce[@]}")" || { echo "no plan"; exit 1; }

if [ "$dry" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  out_dir=${SMOKE_OUT_DIR:-$(mktemp -d)}
  bench=(--cpu-smoke --out-dir "$out_dir")
  warm=(--dry-run --jobs 2)
else
  out_dir=benchmarks/results
  bench=(--out-dir "$out_dir")
  warm=(--jobs "${WARM_JOBS:-15}")
fi
mkdir -p "$out_dir"
stamp=$(date -u +%Y%m%dT%H%MZ)
log=$out_dir/gpu_${RUN}_$stamp.log
summary=()
say() { echo "[gpu_$RUN $(date -u +%T) +${SECONDS}s] $*" | tee -a "$log"; }

# A part runs under `timeout -s INT`: pytest then writes its summary and junit XML, and a benchmark
# keeps the rows it wrote. Its limit shrinks to what is left of the command's budget.
run_part() {  # name, limit in seconds (0: the rest of the budget; half: half of it), command...
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  local left=$((PLAN_BUDGET - SECONDS))
  [ "$limit" = half ] && limit=$((left / 2))
  if [ "$limit" = 0 ] || [ "$limit" -gt "$left" ]; then limit=$left; fi
  if [ "$limit" -lt 10 ]; then
    say "$name: skipped, ${left}s left of the ${PLAN_BUDGET}s budget"
    summary+=("$name: skipped (no time left)")
    return
  fi
  say "$name: start (limit ${limit}s)"
  timeout -s INT -k 20 "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]} took=$((SECONDS - start))
  local how="exit $rc"
  [ "$rc" = 124 ] && how="cut at its ${limit}s limit"
  say "$name: $how after ${took}s"
  summary+=("$name: $how, ${took}s")
}

pytest_part() {  # name, limit, pytest arguments...
  local name=$1 limit=$2
  shift 2
  run_part "$name" "$limit" "$PYTHON" -P -m pytest "$@" -v -rA -p no:cacheprovider --durations=15 \
    --junitxml="$out_dir/gpu_${RUN}_${name}_$stamp.xml"
}

start_run() {
  say "gpu_$RUN.sh$([ "$dry" = 1 ] && echo ' --dry-run (CPU, interpreter, tiny shapes)'): results in $out_dir"
  command -v nvidia-smi >/dev/null && [ "$dry" = 0 ] &&
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$log"
  local commit
  commit=$("$PYTHON" -P -c "import sys; sys.path.insert(0, 'benchmarks'); import common; print(common.git_commit())")
  say "commit recorded in the rows: $commit"
  [ "$commit" != unknown ] || say "WARNING: no git here; pass RRHF_BENCH_COMMIT=<short sha> so rows name their commit"
  (cd benchmarks && "$PYTHON" gpu_plan.py "$RUN" "${liger_cce[@]}") | tee -a "$log"
}

finish_run() {  # the topics this run wrote
  local csvs=()
  for topic in "$@"; do
    for f in "$out_dir/$topic.csv" "$out_dir/${topic}_cpu_smoke.csv"; do [ -f "$f" ] && csvs+=("$f"); done
  done
  [ ${#csvs[@]} -gt 0 ] && "$PYTHON" benchmarks/report.py "${csvs[@]}" 2>&1 | tee -a "$log"
  say "parts:"
  for line in "${summary[@]}"; do say "  $line"; done
  if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/results.tar.gz" -C "$out_dir" .
    cp "$log" "$OUT/"
    say "copied to \$OUT: results.tar.gz (unpack into benchmarks/results/) and $(basename "$log")"
  fi
  say "done in ${SECONDS}s: results in $out_dir"
}
