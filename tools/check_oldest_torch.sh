#!/usr/bin/env bash
# Builds and tests this checkout against the oldest versions it supports, which are also the GPU machines' image
# (torch 2.11.0, triton 3.6.0; `make test` uses the pinned torch 2.14.1 and triton 3.8.0), on this machine's CPU:
# an API that torch 2.11's headers or Python package lack, or that triton 3.6 lacks, fails here rather than in the
# build step of a GPU session's few minutes.
#   tools/check_oldest_torch.sh [WORK_DIR]     (default: /tmp/xo-oldest; ~3.5 GB of packages, ~15 min on 2 cores)
# The environment (WORK_DIR/venv) is kept between runs; the checkout's tracked and untracked, not ignored, files are
# copied to WORK_DIR/src (those that changed since the last run), built there (incrementally) and tested with TESTS
# (default: tests benchmarks).
# numpy stays below 2.4: triton 3.6's interpreter converts 1-element arrays to int, which numpy 2.4 refuses
# (triton-lang/triton#9171).
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-/tmp/xo-oldest}"
venv="$work/venv"
src="$work/src"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
TORCH_VERSION="${TORCH_VERSION:-2.11.0}"
TRITON_VERSION="${TRITON_VERSION:-3.6.0}"
TORCHVISION_VERSION="${TORCHVISION_VERSION:-0.26.0}"

mkdir -p "$work"
if [ ! -f "$venv/.ready-$TORCH_VERSION-$TRITON_VERSION" ]; then
  "$PYTHON" -m venv "$venv"
  "$venv/bin/pip" install --quiet "torch==$TORCH_VERSION" "triton==$TRITON_VERSION" \
      "torchvision==$TORCHVISION_VERSION" "numpy<2.4" $(grep -E '^(ninja|pybind11|pytest|pytest-benchmark|timm|matplotlib)==' requirements.txt) setuptools wheel
  touch "$venv/.ready-$TORCH_VERSION-$TRITON_VERSION"
fi
"$venv/bin/python" -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"

# The checkout goes to a staging folder first; into $src go only the files whose content changed (with a new mtime:
# the build stays incremental and never keeps an object older than its source), and files it no longer has leave.
stage="$work/stage"
rm -rf "$stage"
mkdir -p "$stage" "$src"
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$stage"
(cd "$src" && find . -path ./build -prune -o -type f ! -name '*.so' -print) | while IFS= read -r f; do
  [ -e "$stage/$f" ] || rm -f "$src/$f"
done
(cd "$stage" && find . -type f -print) | while IFS= read -r f; do
  cmp -s "$stage/$f" "$src/$f" || { mkdir -p "$src/$(dirname "$f")" && cp "$stage/$f" "$src/$f"; }
done
cd "$src"
CUDA_HOME="${CUDA_HOME:-$(command -v nvcc >/dev/null && nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 \
    | sed -n 's/^#\$ TOP=//p' | head -n1 | xargs -r realpath)}"
export CUDA_HOME TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
PATH="$venv/bin:$PATH" "$venv/bin/python" setup.py --quiet build_ext --inplace
# shellcheck disable=SC2086  # TESTS is a list of paths
PYTHONPATH=. OMP_NUM_THREADS=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider ${TESTS:-tests benchmarks} \
    --benchmark-disable
