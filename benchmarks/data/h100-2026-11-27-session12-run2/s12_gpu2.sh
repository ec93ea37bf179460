#!/usr/bin/env bash
# Session 12's second device call (not committed): build, then measurements and host diagnostics, each copied to
# $OUT as it ends.
set -u
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/o}; mkdir -p "$O" /tmp/gc
L=$O/run.log
t0=$SECONDS
mark() { echo "### $1 at $((SECONDS - t0)) s" >> "$L"; }
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv >> "$L" 2>&1
STEPS="build install" STEP_TIMEOUT=150 bash tools/gpu_check.sh /tmp/gc >> "$L" 2>&1
mark build
timeout 45 python3 -m xception_ops.cli bench --out /tmp/models --no-layers --dtypes bfloat16 --layouts NHWC \
  --warmup 3 --reps 10 --models xception:cuda timm_legacy_xception >> "$L" 2>&1; mark models
timeout 50 python3 tools/profile_model.py --out "$O/pm.txt" >> "$L" 2>&1; mark pm
timeout 40 python3 tools/op_overhead.py --device cuda --calls 200 > "$O/op_overhead.txt" 2>&1; mark opo
timeout 45 python3 tools/s12_cprofile.py cuda > "$O/cprof_cuda.txt" 2>&1; mark cprof_cuda
timeout 70 env XCEPTION_OPS_TRITON_AUTOTUNE=0 python3 tools/s12_cprofile.py triton > "$O/cprof_triton.txt" 2>&1
mark cprof_triton
if command -v ncu > /dev/null; then
  timeout 60 ncu -k regex:depthwise_strip_kernel -c 4 --section SpeedOfLight --section WarpStateStats \
    --section Occupancy --section SchedulerStats --section LaunchStats python3 tools/profile_training.py \
    --impl cuda --pass inference --shapes 728,728,19 --passes 1 > "$O/ncu.txt" 2>&1
else
  echo "no ncu; nsys: $(command -v nsys)" > "$O/ncu.txt"
fi
mark ncu
timeout 100 python3 -m xception_ops.cli bench --out /tmp/modelsc --no-layers --dtypes bfloat16 --layouts NHWC \
  --warmup 3 --reps 10 --models xception:cuda --compile reduce-overhead >> "$L" 2>&1; mark compiled
