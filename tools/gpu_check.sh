#!/usr/bin/env bash
# On a GPU machine: build for that GPU only, run the GPU tests, parity and the quick layer benchmark, and write
# the logs and results into an output folder.
#   tools/gpu_check.sh [OUT_DIR]          (default: $OUT, else ./gpu-check)
# Each step runs even if an earlier one failed; the exit status is non-zero if any failed. Everything printed goes
# to OUT_DIR/gpu_check.log; results to parity.json, bench.{json,md} (layers) and models/bench.{json,md}.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu-check}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
status=0
log="$out/gpu_check.log"
summary=""
step() {  # step NAME COMMAND...: runs the command into the log, remembers a failure
  local name="$1"; shift
  echo "=== $name: $*" >> "$log"
  local t0=$SECONDS
  "$@" >> "$log" 2>&1
  local rc=$?
  summary+="$name: exit $rc in $((SECONDS - t0)) s"$'\n'
  echo "=== $name: exit $rc in $((SECONDS - t0)) s" >> "$log"
  [ $rc -eq 0 ] || status=1
}

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1)
fi
export TORCH_CUDA_ARCH_LIST MAX_JOBS="${MAX_JOBS:-$(nproc)}"
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv > "$log" 2>&1

# Compile in place (offline, incremental), then register the package without compiling again.
step build "$PY" setup.py build_ext --inplace
step install env XCEPTION_OPS_SKIP_EXT=1 "$PY" -m pip install --no-deps --no-build-isolation -e .
step info "$PY" -m xception_ops.cli info
step gpu_tests "$PY" -m pytest -m gpu -q -p no:cacheprovider -rA
step bench_layers "$PY" -m xception_ops.cli bench --out "$out" --no-models ${BENCH_ARGS:---warmup 5 --reps 20}
step parity "$PY" -m xception_ops.cli parity --device cuda --json "$out/parity.json"
step bench_models "$PY" -m xception_ops.cli bench --out "$out/models" --no-layers \
  ${BENCH_MODEL_ARGS:---dtypes bfloat16 --layouts NHWC --warmup 3 --reps 10}
# The end of the log and the summary, for a caller that sees only the tail of the output.
grep -E "passed|failed|error|PASS|FAIL" "$log" | tail -n 15
tail -n 60 "$out/bench.md" 2>/dev/null
printf "%s" "$summary"
exit $status
