# The set-up gpu_visit.sh and gpu_more.sh share (sourced, not run): carried wheels, rrhf_fast
# importable, the budget's start; then the caller execs benchmarks/gpu_runner.py, which runs the
# parts (benchmarks/gpu_plan.py) and writes each part's results into $OUT as it ends.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# The device time this command may take is counted from here (RRHF_GPU_SECONDS, default 480).
export RRHF_GPU_T0=${RRHF_GPU_T0:-$(date +%s)}
dry=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry=1 ;;
    --plan) ;;
    *) echo "$(basename "$0"): unknown argument '$arg' (--dry-run, --plan)" >&2; exit 2 ;;
  esac
done
# Wheels carried in .whl/ (no registry on the device): liger-kernel, cut-cross-entropy, bitsandbytes.
if [ "$dry" = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
  echo "installing carried wheels: $(ls .whl | tr '\n' ' ')"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# This tree's rrhf_fast is the one measured, installed or not (an installed copy may be another tree).
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
