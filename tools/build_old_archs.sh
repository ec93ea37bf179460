#!/usr/bin/env bash
# Compiles the torch-free CUDA sources (csrc/kernels/*.cuh through csrc/cuda/*.cu launchers) for GPUs older than
# Turing, which CUDA 13 no longer targets: clang-19 as the CUDA compiler, with CUDA 11.8's headers, ptxas and
# libdevice taken from PyPI wheels and gathered into one folder passed as --cuda-path.
#   tools/build_old_archs.sh [ARCH...]        (default: sm_37 sm_60 sm_70; objects go to build/old-archs/)
# Needs clang-19 (Debian: apt-get install clang-19; installed here when running as root) and pip.
set -euo pipefail
cd "$(dirname "$0")/.."
archs=("$@")
[ ${#archs[@]} -gt 0 ] || archs=(sm_37 sm_60 sm_70)
clang="${CLANG:-clang-19}"
python="${PYTHON:-python3}"
root="build/cuda-11.8"
out="build/old-archs"

if ! command -v "$clang" >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -q clang-19 >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q clang-19 >/dev/null; }
  else
    echo "build_old_archs: $clang not found; install it (Debian: apt-get install clang-19)" >&2
    exit 1
  fi
fi

if [ ! -x "$root/bin/ptxas" ]; then
  wheels="build/cuda-11.8-wheels"
  mkdir -p "$wheels"
  "$python" -m pip download --quiet --no-deps --only-binary=:all: -d "$wheels" \
    nvidia-cuda-nvcc-cu11==11.8.89 nvidia-cuda-runtime-cu11==11.8.89 nvidia-curand-cu11==10.3.0.86
  "$python" - "$wheels" "$root" <<'PY'
import pathlib, shutil, sys, zipfile
wheels, root = map(pathlib.Path, sys.argv[1:])
parts = {"bin/ptxas": "bin", "nvvm/libdevice/": "nvvm/libdevice", "include/": "include", "lib/": "lib64"}
for wheel in sorted(wheels.glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            # nvidia/<package>/<part>/...: keep the toolkit parts, in the layout clang expects
            rel = name.split("/", 2)[2] if name.startswith("nvidia/") and name.count("/") >= 2 else None
            for prefix, dest in parts.items() if rel else []:
                if rel.startswith(prefix) and not rel.endswith(("/", "__init__.py")):
                    target = root / dest / rel[len(prefix.rsplit("/", 1)[0]) + 1:] if prefix.endswith("/") \
                        else root / dest / pathlib.Path(rel).name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(name) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
(root / "bin" / "ptxas").chmod(0o755)
PY
fi

mkdir -p "$out"
for arch in "${archs[@]}"; do
  for src in csrc/cuda/*.cu csrc/cuda/instances/*.cu; do
    obj="$out/$(basename "${src%.cu}").$arch.o"
    "$clang" -x cuda --cuda-path="$root" --cuda-gpu-arch="$arch" --cuda-device-only -O3 -std=c++17 -Icsrc \
      -Wno-unknown-cuda-version -Wno-pass-failed -c "$src" -o "$obj"
    # A cubin's ELF header names its SM in the low byte of e_flags: check it is the arch asked for.
    flags=$(readelf -h "$obj" | sed -n 's/.*Flags:[[:space:]]*0x//p')
    sm=$((16#${flags: -2}))
    [ "sm_$sm" = "$arch" ] || { echo "build_old_archs: $obj holds sm_$sm code, not $arch" >&2; exit 1; }
    echo "built $obj: sm_$sm machine code, $(stat -c %s "$obj") bytes"
  done
done
