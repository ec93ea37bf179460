#!/usr/bin/env bash
# Why is the fused separable CUDA forward slow? One GPU call that collects what the next change needs
# (benchmarks/RESULTS.md, 2026-11-26 session 2: 3-10x slower than cuDNN, unexplained by a latency model).
#   tools/profile_separable.sh [OUT_DIR]     (default: $OUT, else ./profile)
# 1. builds for the visible GPU (tools/gpu_check.sh's build and install steps);
# 2. times shapes that isolate the phases (bf16 NHWC inference, batch 32): 8 output channels (the depthwise
#    stage dominates), 8 input channels (the epilogue dominates), and full layers (the GEMM), for the default
#    staged forward (the default), the fused kernel, and its alternatives kept for comparison (run tiles, wmma
#    GEMM, square pixel tiles; PROFILE_VARIANTS names the ones to run, each a comma-separated list of settings,
#    default all five);
# 3. with Nsight Compute (ncu) installed: speed of light, occupancy, warp stall reasons, instruction mix and the
#    hottest instructions (SourceCounters; the extension is built with -lineinfo) of the kernel on three layers;
# 4. with cuobjdump installed: each kernel's instruction count and mix (code size, local memory).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-profile}}"
mkdir -p "$out"
PY="${PYTHON:-python3}"
log="$out/profile.log"

STEPS="build install" bash tools/gpu_check.sh "$out" > /dev/null 2>&1
mv "$out/gpu_check.log" "$out/build.log"

# The same shapes for each implementation kept for comparison (csrc/cuda/separable_backend.cpp).
fused=XCEPTION_OPS_SEPARABLE_FORWARD=fused
for variant in ${PROFILE_VARIANTS:-default $fused $fused,XCEPTION_OPS_SEPARABLE_TILES=runs \
    $fused,XCEPTION_OPS_SEPARABLE_GEMM=wmma $fused,XCEPTION_OPS_SEPARABLE_TILES=square}; do
  echo "=== phase-isolating shapes, $variant" >> "$log"
  # shellcheck disable=SC2046
  env $([ "$variant" = default ] || echo "$variant" | tr , ' ') "$PY" -m xception_ops.cli bench --backends cuda --ops separable \
    --dtypes bfloat16 --layouts NHWC --passes inference --no-models --warmup 3 --reps 10 \
    --shapes 64,8,147 64,128,147 64,512,147 8,128,147 728,8,19 728,728,19 8,728,19 1536,2048,10 2>&1 \
    | grep -E "xo:cuda|eager" >> "$log"
done

cat > "$out/one_layer.py" <<'PY'
# Runs the fused forward once per shape (after one warm-up), for a profiler to capture.
import torch
import xception_ops

for cin, cout, hw in ((64, 128, 147), (728, 728, 19), (1536, 2048, 10)):
    x = torch.randn(32, cin, hw, hw, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    dw = torch.randn(cin, 1, 3, 3, device="cuda", dtype=torch.bfloat16)
    pw = torch.randn(cout, cin, 1, 1, device="cuda", dtype=torch.bfloat16)
    scale = torch.rand(cout, device="cuda") + 0.5
    shift = torch.randn(cout, device="cuda")
    for _ in range(2):
        with torch.no_grad():
            xception_ops.separable_conv2d(x, dw, pw, padding=1, out_scale=scale, out_shift=shift, out_relu=True,
                                          backend="cuda")
    torch.cuda.synchronize()
PY
NCU="$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n1)"
if [ -n "$NCU" ]; then
  echo "=== ncu ($NCU)" >> "$log"
  XCEPTION_OPS_SEPARABLE_FORWARD=fused "$NCU" --kernel-name regex:separable_forward_kernel --launch-skip 1 --launch-count 3 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section InstructionStats --section MemoryWorkloadAnalysis --section SchedulerStats --section SourceCounters \
    "$PY" "$out/one_layer.py" >> "$log" 2>&1
else
  echo "=== ncu: not installed here" >> "$log"
fi

OBJDUMP="$(command -v cuobjdump || ls /usr/local/cuda/bin/cuobjdump 2>/dev/null | head -n1)"
if [ -n "$OBJDUMP" ]; then
  echo "=== SASS instruction counts per kernel" >> "$log"
  "$OBJDUMP" -sass xception_ops/_C*.so 2>/dev/null | awk '
    /Function :/ { name = $3 }
    /^ +\/\*[0-9a-f]+\*\// { n[name]++; if ($0 ~ /LDL|STL/) lm[name]++ }
    END { for (k in n) if (k ~ /separable/) printf "%7d instructions, %4d local-memory ops: %s\n", n[k], lm[k], k }' \
    >> "$log"
else
  echo "=== cuobjdump: not installed here" >> "$log"
fi
tail -n 40 "$log"
