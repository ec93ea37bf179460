#!/usr/bin/env bash
# On a GPU machine: build for that GPU only, run the GPU tests (CUDA and Triton backends), parity and the layer
# and model benchmarks, and write the logs and results into an output folder.
#   tools/gpu_check.sh [OUT_DIR]          (default: $OUT, else ./gpu-check)
# Knobs (environment):
#   STEPS         which steps to run, in order (default: all of them, see below)
#   PYTEST_ARGS   extra pytest arguments for the test steps, split on spaces without quote handling (e.g.
#                 "--maxfail=20 --deselect tests/test_x.py::test_y"; a -k expression cannot contain spaces)
#   GPU_TESTS     the test files or folders of the gpu_tests step (default: tests)
#   BENCH_ARGS    arguments of the layer benchmark (default: the quick one, bf16 channels-last on every backend and
#                 float32 NCHW inference on cuda and cuDNN with TF32 on for both, ~4 min on an H200; `make bench`
#                 runs them all: ~10 min for the layers alone); BENCH_MODEL_ARGS those of the model benchmark
#   PROFILE_SHAPES  the layers of the profile step (cin,cout,hw each); PROFILE_IMPLS its implementations (cuda eager),
#                 PROFILE_PASSES its passes (inference training)
#   FORWARD_VARIANTS  the forward step's variants, NAME:SETTING[,SETTING...] each (default: all seven, below)
#   STEP_TIMEOUT  seconds after which a step is stopped (default 600), so one hang does not eat the others' time
#   DEADLINE      seconds for the whole script (default: none): a step gets at most what is left of it less 15 s,
#                 and a step that would start with under 30 s left is skipped (logged as such), so that a call
#                 with a hard time limit still ends by itself and writes its summary
#   PROFILE_ENV   VAR=VALUE settings (space-separated) for the profile step's processes, e.g.
#                 XCEPTION_OPS_SEPARABLE_STAGED_GEMM=wgmma for Hopper's GEMM in the staged forward and backward
#   GPU_XDIST_WORKERS / XDIST_WORKERS   pytest-xdist processes for the CUDA tests (4) and the Triton tests (nproc);
#                 TRITON_TEST_WORKERS those of the Triton tests in the "tests" step, beside the CUDA tests (6)
# Steps: build install info tests (or gpu_tests and triton_tests one after the other) forward wgmma profile ncu
# (when Nsight Compute is installed) bench_layers pools sweep parity bench_models profile_models.
# Each step runs even if an earlier one failed; the exit status is non-zero if any failed. Everything printed goes
# to OUT_DIR/gpu_check.log (the "tests" step's full logs to gpu_tests.log and triton_tests.log, ncu's report into
# the log too); results to parity.json, bench.{json,md} and nchw-fp32/bench.{json,md} (layers),
# pools/bench.{json,md} (Xception's max pools), sweep-*.json (the depthwise kernels alone), forward-*/bench.{json,md}
# (the separable forward's implementations), wgmma-sweep.json (Hopper's GEMM builds),
# profile-*.txt (the kernels of a layer's passes), models/bench.{json,md} and profile-models.txt (host- or GPU-bound
# model steps; PROFILE_MODEL_ARGS replaces its arguments).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu-check}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
STEPS="${STEPS:-build install info tests forward wgmma profile ncu bench_layers pools sweep parity bench_models profile_models}"
status=0
log="$out/gpu_check.log"
summary=""
step() {  # step NAME COMMAND...: runs the command into the log (if NAME is in STEPS), remembers a failure
  local name="$1"; shift
  [[ " $STEPS " == *" $name "* ]] || return 0
  local limit="${STEP_TIMEOUT:-600}"
  if [ -n "${DEADLINE:-}" ]; then
    local left=$((DEADLINE - SECONDS - 15))
    if [ "$left" -lt 15 ]; then
      summary+="$name: skipped, $((DEADLINE - SECONDS)) s of the deadline left"$'\n'
      echo "=== $name: skipped (deadline): $*" >> "$log"
      return 0
    fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  echo "=== $name (limit $limit s): $*" >> "$log"
  local t0=$SECONDS
  timeout "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  summary+="$name: exit $rc in $((SECONDS - t0)) s"$'\n'
  echo "=== $name: exit $rc in $((SECONDS - t0)) s" >> "$log"
  [ $rc -eq 0 ] || status=1
}

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | sed "s/^9\.0$/9.0a/")
fi
export TORCH_CUDA_ARCH_LIST MAX_JOBS="${MAX_JOBS:-$(nproc)}"
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv > "$log" 2>&1

# Compile in place (offline, incremental), then register the package without compiling again.
step build "$PY" setup.py build_ext --inplace
# The slowest compiles of that build (ninja's log: milliseconds start, end): the build's critical path, which the
# one-instantiation-per-file split of csrc/cuda/instances/ is there to shorten on many cores.
if [[ " $STEPS " == *" build "* ]]; then
  for ninja_log in build/temp*/.ninja_log; do
    [ -f "$ninja_log" ] || continue
    echo "=== the build's slowest compiles (s, file):" >> "$log"
    awk -F'\t' 'NR > 1 {printf "%7.1f %s\n", ($2 - $1) / 1000, $4}' "$ninja_log" | sort -rn | head -8 \
      | sed 's|[^ ]*/build/temp[^/]*/||' >> "$log"
  done
fi
step install env XCEPTION_OPS_SKIP_EXT=1 "$PY" -m pip install --no-deps --no-build-isolation -e .
step info "$PY" -m xception_ops.cli info
# With pytest-xdist installed, tests run in parallel processes: the Triton modules on every core (Triton compiles
# each new specialization on the CPU, one at a time per process: in session 2 one process managed 64 tests in
# 170 s), the CUDA tests in GPU_XDIST_WORKERS processes sharing the GPU (806 of them took 111 s in one process in
# session 4). One seed for every worker (printed in the header), so that a failure replays.
xdist=""
gpu_xdist=""
if "$PY" -c "import xdist" 2>/dev/null; then
  xdist="-n ${XDIST_WORKERS:-$(nproc)}"
  gpu_xdist="-n ${GPU_XDIST_WORKERS:-4}"
fi
# The tests marked gpu, then the whole Triton modules: their unmarked tests run compiled on the GPU when there is one.
# ${PYTEST_ARGS} is unquoted on purpose: it is a list of arguments; so is each function's $1 (its xdist workers).
seed="${XO_TEST_SEED:-$RANDOM}"
cuda_tests() {
  # shellcheck disable=SC2086
  env XO_TEST_SEED="$seed" "$PY" -m pytest -m gpu -q -p no:cacheprovider -rfE $1 ${PYTEST_ARGS:-} \
    --ignore=tests/test_triton_kernels.py --ignore=tests/test_triton_backend.py ${GPU_TESTS:-tests}
}
triton_tests() {
  # shellcheck disable=SC2086
  env XCEPTION_OPS_TRITON_AUTOTUNE=0 XO_TEST_SEED="$seed" "$PY" -m pytest -q -p no:cacheprovider -rfE $1 \
    ${PYTEST_ARGS:-} tests/test_triton_kernels.py tests/test_triton_backend.py
}
# Step "tests" (the default): the two side by side, the CUDA tests on GPU_XDIST_WORKERS processes and the Triton
# tests on TRITON_TEST_WORKERS (6), each into its own log: the CUDA tests wait on the GPU, the Triton ones mostly
# on the CPU compiling (session 12, H100: 143 s for both, where they took 125 and >165 s one after the other). The
# step's limit (STEP_TIMEOUT) covers both.
both_tests() {
  cuda_tests "$gpu_xdist" > "$out/gpu_tests.log" 2>&1 &
  local cuda_pid=$!
  local triton_workers=""
  [ -n "$xdist" ] && triton_workers="-n ${TRITON_TEST_WORKERS:-6}"
  triton_tests "$triton_workers" > "$out/triton_tests.log" 2>&1 &
  local triton_pid=$!
  wait "$cuda_pid"; local cuda_rc=$?
  wait "$triton_pid"; local triton_rc=$?
  for f in gpu_tests triton_tests; do echo "--- $f (exit $([ $f = gpu_tests ] && echo $cuda_rc || echo $triton_rc))"
    grep -v "PytestBenchmarkWarning\|warner(" "$out/$f.log" | tail -n 25; done
  [ "$cuda_rc" -eq 0 ] && [ "$triton_rc" -eq 0 ]
}
export -f cuda_tests triton_tests both_tests
export PY out seed gpu_xdist xdist PYTEST_ARGS GPU_TESTS TRITON_TEST_WORKERS
# The steps run these through `bash -c` (timeout needs a program); "$1" there is the workers argument.
step gpu_tests bash -c 'cuda_tests "$1"' cuda_tests "$gpu_xdist"
step triton_tests bash -c 'triton_tests "$1"' triton_tests "$xdist"
step tests bash -c both_tests
# The separable forward's implementations, each in its own process (read when the library loads), on the cuda
# backend's layers in bf16 channels-last: the staged form (the default), its product on cuBLAS and an epilogue
# pass everywhere, its product on the fused kernel's GEMM everywhere, on Hopper's wgmma GEMM with the epilogue in
# it, the fused wgmma forward (up to 128 depthwise channels), the fused kernel on flat tiles and on run tiles.
fused=XCEPTION_OPS_SEPARABLE_FORWARD=fused
gemm=XCEPTION_OPS_SEPARABLE_STAGED_GEMM
for variant in ${FORWARD_VARIANTS:-staged:XCEPTION_OPS_SEPARABLE_FORWARD=staged staged-cublas:$gemm=cublas \
  staged-fused:$gemm=fused staged-wgmma:$gemm=wgmma fused-wgmma:XCEPTION_OPS_SEPARABLE_FORWARD=wgmma fused:$fused \
  runs:$fused,XCEPTION_OPS_SEPARABLE_TILES=runs}; do
  # shellcheck disable=SC2046
  step forward env $(echo "${variant#*:}" | tr , ' ') "$PY" -m xception_ops.cli bench \
    --out "$out/forward-${variant%%:*}" --no-models --backends cuda --ops separable --dtypes bfloat16 \
    --layouts NHWC --warmup 3 --reps 10
done
# Hopper's wgmma GEMM for the staged forward, each build of kPointwiseConfigs against the default staged form over
# Xception's layers (inference and the training forward), in one process: which build, and whether it becomes the
# default (tools/wgmma_sweep.py; skipped off Hopper).
step wgmma "$PY" tools/wgmma_sweep.py --json "$out/wgmma-sweep.json"
# Where each implementation spends a layer's passes: its kernels by GPU time (torch.profiler), cuda and cuDNN,
# inference and training, bf16 channels-last.
for impl in ${PROFILE_IMPLS:-cuda eager}; do
  for pass_ in ${PROFILE_PASSES:-inference training}; do
    # shellcheck disable=SC2086
    step profile env ${PROFILE_ENV:-} "$PY" tools/profile_training.py --impl $impl --pass $pass_ \
      --shapes ${PROFILE_SHAPES:-64,128,147 128,128,147 256,728,37 728,728,37 728,728,19 1024,1536,10} \
      --out "$out/profile-$impl-$pass_.txt"
  done
done
# Nsight Compute, where the image has it: the depthwise strip kernels of a 728 -> 728 @19^2 training pass (the
# forward with the prologue and its recompute, the input and weight gradients): throughput, issue rate, warp
# states, occupancy. In session 12 it showed the forward strip kernel bound by instruction issue.
if command -v ncu > /dev/null; then
  step ncu ncu -k regex:depthwise_.*strip_kernel -c 4 --section SpeedOfLight --section SchedulerStats \
    --section WarpStateStats --section Occupancy --section LaunchStats "$PY" tools/profile_training.py --impl cuda \
    --pass training --shapes 728,728,19 --passes 1 --out "$out/ncu-profile.txt"
fi
# The quick layer benchmark (BENCH_ARGS replaces both runs).
if [ -n "${BENCH_ARGS:-}" ]; then
  # shellcheck disable=SC2086
  step bench_layers "$PY" -m xception_ops.cli bench --out "$out" --no-models ${BENCH_ARGS}
else
  step bench_layers "$PY" -m xception_ops.cli bench --out "$out" --no-models --dtypes bfloat16 --layouts NHWC \
    --warmup 5 --reps 20
  # float32 at the same TF32 setting for cuDNN and the staged product (cuDNN's default: on), as #3's target reads.
  step bench_layers "$PY" -m xception_ops.cli bench --out "$out/nchw-fp32" --no-models --dtypes float32 \
    --layouts NCHW --passes inference --backends cuda --warmup 5 --reps 20 --tf32 on
fi
# Xception's four max pools and its strided blocks' tails (--ops bnpool: BatchNorm, pool and shortcut add in one
# pass): the cuda backend's kernels (one-byte argmax, gathered backward) against PyTorch's.
step pools "$PY" -m xception_ops.cli bench --out "$out/pools" --no-models --ops pool bnpool --backends cuda \
  --dtypes bfloat16 float32 --layouts NHWC NCHW --warmup 5 --reps 20
# The depthwise kernels alone against cuDNN, with the strip kernels and without (tools/depthwise_sweep.py): bf16
# channels-last and float32 NCHW.
step sweep "$PY" tools/depthwise_sweep.py --settings auto off --json "$out/sweep-nhwc-bf16.json"
step sweep "$PY" tools/depthwise_sweep.py --settings auto off --layout NCHW --dtype float32 \
  --json "$out/sweep-nchw-fp32.json"
step parity "$PY" -m xception_ops.cli parity --device cuda --json "$out/parity.json"
# shellcheck disable=SC2086
step bench_models "$PY" -m xception_ops.cli bench --out "$out/models" --no-layers \
  ${BENCH_MODEL_ARGS:---dtypes bfloat16 --layouts NHWC --warmup 3 --reps 10 --models xception xception:cuda \
  timm_legacy_xception timm_legacy_xception:fused:cuda inception_v3}
# Whether the whole models run at their kernels' speed: a step's wall time against its kernels' GPU time and the
# host's time to issue it (tools/profile_model.py), ours on cuda against timm's, training and inference.
# shellcheck disable=SC2086
step profile_models "$PY" tools/profile_model.py --out "$out/profile-models.txt" \
  ${PROFILE_MODEL_ARGS:---models xception:cuda timm_legacy_xception --dtype bfloat16 --layout NHWC}
# The end of the log and the summary, for a caller that sees only the tail of the output.
grep -E "passed|failed|error|PASS|FAIL" "$log" | tail -n 15
tail -n 60 "$out/bench.md" 2>/dev/null
printf "%s" "$summary"
exit $status
