#!/usr/bin/env bash
# Session 12's one-off device call (not committed): build, tests, then measurements, each copied to $OUT as it ends.
set -u
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/o}; mkdir -p "$O" /tmp/gc /tmp/gt
L=$O/run.log
t0=$SECONDS
mark() { echo "### $1 at $((SECONDS - t0)) s" >> "$L"; }
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv >> "$L" 2>&1
python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, torch.backends.cudnn.version(), triton.__version__)" >> "$L" 2>&1
STEPS="build install" STEP_TIMEOUT=170 bash tools/gpu_check.sh /tmp/gc >> "$L" 2>&1; cp /tmp/gc/gpu_check.log "$O/build.log"
mark build
( STEPS="gpu_tests" STEP_TIMEOUT=${TEST_T:-165} GPU_XDIST_WORKERS=8 bash tools/gpu_check.sh /tmp/gt > /dev/null 2>&1
  cp /tmp/gt/gpu_check.log "$O/gpu_tests.log" ) &
( timeout ${TEST_T:-165} env XCEPTION_OPS_TRITON_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider -rfE -n 6 \
    tests/test_triton_kernels.py tests/test_triton_backend.py > "$O/triton_tests.log" 2>&1 ) &
wait
mark tests
B="python3 -m xception_ops.cli bench --no-models --dtypes bfloat16 --layouts NHWC --warmup 3 --reps 10"
timeout 70 $B --out "$O/sep" --backends cuda --ops separable >> "$L" 2>&1; mark sep
timeout 30 python3 tools/profile_training.py --impl cuda --pass training --shapes 728,728,19 256,728,37 \
  --out "$O/prof.txt" >> "$L" 2>&1; mark prof
timeout 60 python3 tools/profile_model.py --out "$O/pm.txt" >> "$L" 2>&1; mark pm
timeout 50 python3 -m xception_ops.cli bench --out "$O/models" --no-layers --dtypes bfloat16 --layouts NHWC \
  --warmup 3 --reps 10 --models xception:cuda timm_legacy_xception >> "$L" 2>&1; mark models
timeout 50 $B --out "$O/tdw" --backends triton --ops depthwise --passes inference forward >> "$L" 2>&1; mark tdw
