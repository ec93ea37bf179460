#!/usr/bin/env bash
# The next GPU session's plan (benchmarks/RESULTS.md, "Next GPU call") as one command that ends by itself inside
# one device call, writing everything into one archive: a lent machine is warm for 30 s after a call, so a plan of
# several calls pays a fresh start (a minute or more of the 15) at each gap, and a call returns at most 8 files.
#   tools/gpu_next.sh [OUT_DIR]     (default: $OUT, else ./gpu-next)
# OUT_DIR receives gpu_next.tgz (every log and result of tools/gpu_check.sh), gpu_check.log and summary.txt.
# Knobs: DEADLINE (seconds for the whole plan, default 540: a run's limit is 600), STEPS and MORE_STEPS (the two
# runs' steps), and gpu_check.sh's.
# The steps, in two runs of gpu_check.sh sharing the deadline, so that the layer benchmark (#3's targets) comes
# before the sweeps; each step capped by STEP_TIMEOUT and by what is left:
#   build, install              the extension for this GPU (~100 s on 16 cores)
#   tests                       the CUDA and Triton GPU tests side by side (sessions 13-21's kernels' first run)
#   profile                     the 728 -> 728 @19^2 and 64 -> 128 @147^2 training passes' kernels, with
#                               Hopper's wgmma GEMM (its weight gradient's splits against session 19's table)
#   bench_layers                bf16 channels-last layers: cuda against cuDNN
#   then (OUT_DIR's more/): wgmma (each wgmma build and `auto` against the default staged forward), pools
#   (Xception's pools and strided tails) and bench_models (the models in bf16: steps/s, peak memory)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu-next}}"
work="$(mktemp -d)"
deadline="${DEADLINE:-540}"
first_steps="${STEPS:-build install tests profile bench_layers}"
more_steps="${MORE_STEPS:-wgmma pools bench_models}"
export STEP_TIMEOUT="${STEP_TIMEOUT:-240}"
export GPU_XDIST_WORKERS="${GPU_XDIST_WORKERS:-8}"
export PROFILE_ENV="${PROFILE_ENV:-XCEPTION_OPS_SEPARABLE_STAGED_GEMM=wgmma}"
export PROFILE_IMPLS="${PROFILE_IMPLS:-cuda}" PROFILE_PASSES="${PROFILE_PASSES:-training}"
export PROFILE_SHAPES="${PROFILE_SHAPES:-728,728,19 64,128,147}"
export BENCH_ARGS="${BENCH_ARGS:---backends cuda --dtypes bfloat16 --layouts NHWC --warmup 3 --reps 10}"
export BENCH_MODEL_ARGS="${BENCH_MODEL_ARGS:---dtypes bfloat16 --layouts NHWC --warmup 3 --reps 10 --models xception:cuda \
xception:cuda+frozen timm_legacy_xception inception_v3}"
DEADLINE=$deadline STEPS="$first_steps" bash tools/gpu_check.sh "$work" > "$work/summary.txt" 2>&1
status=$?
DEADLINE=$((deadline - SECONDS)) STEPS="$more_steps" bash tools/gpu_check.sh "$work/more" >> "$work/summary.txt" 2>&1 \
  || status=1
mkdir -p "$out"
tar czf "$out/gpu_next.tgz" -C "$work" .
cp "$work/gpu_check.log" "$work/summary.txt" "$out/" 2>/dev/null
cat "$work/summary.txt"
rm -rf "$work"
exit $status
