"""Builds xception_ops and its compiled library xception_ops._C.

Torch must already be installed: build with `pip install --no-build-isolation -e .` so that the extension is
compiled against the torch you run (an isolated build could pick a different one).

Environment knobs:
  TORCH_CUDA_ARCH_LIST    GPU archs to build for (default: the visible GPU's, Hopper as 9.0a; 9.0a when none is visible)
  MAX_JOBS                parallel compile jobs (default: from the cores and free memory)
  CUDA_HOME               the CUDA toolkit's root (default: found from nvcc, following wrapper scripts)
  XCEPTION_OPS_SKIP_EXT=1 install the Python package only; every op then runs on the reference path
  XCEPTION_OPS_NO_CUDA=1  build the C++ library without the CUDA kernels even when CUDA is available
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "xception_ops" / "version.py").read_text()).group(1)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def find_cuda_home() -> str | None:
    """The CUDA toolkit's root. `nvcc` on PATH may be a wrapper script; `nvcc --dryrun` prints the real root."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "/usr/local/cuda" if Path("/usr/local/cuda/bin/nvcc").exists() else None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", "/dev/null", "-o", "/dev/null"],
                             capture_output=True, text=True, timeout=60)
        match = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
        if match:
            return str(Path(match.group(1)).resolve())
    except (OSError, subprocess.SubprocessError):
        pass
    return str(Path(nvcc).resolve().parent.parent)


def default_max_jobs() -> int:
    """One job per core, but no more than free memory allows (about 2 GB per nvcc job)."""
    cores = os.cpu_count() or 1
    try:
        free_gb = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
        return max(1, min(cores, int(free_gb // 2)))
    except (ValueError, OSError):
        return cores


def extensions():
    if env_flag("XCEPTION_OPS_SKIP_EXT"):
        print("xception_ops: XCEPTION_OPS_SKIP_EXT=1, installing the Python package only", file=sys.stderr)
        return [], {}
    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension when it is imported
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        raise SystemExit("xception_ops: building the extension needs torch installed first; install torch, then "
                         "`pip install --no-build-isolation -e .` (or set XCEPTION_OPS_SKIP_EXT=1)") from e

    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    with_cuda = (torch.version.cuda is not None and cuda_home is not None and not env_flag("XCEPTION_OPS_NO_CUDA"))
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            # Hopper as sm_90a: its wgmma kernels exist only for the arch-specific target.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0a" if (major, minor) == (9, 0) else f"{major}.{minor}"
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0a"

    csrc = Path("csrc")
    sources = [str(p) for p in sorted(csrc.glob("*.cpp"))]
    cxx_flags = ["-O3", "-std=c++20"]
    macros = [("XCEPTION_OPS_PYTHON_MODULE", None)]
    if with_cuda:
        sources += [str(p) for p in sorted((csrc / "cuda").glob("*.cpp"))]
        # instances/: one kernel instantiation per file, so that MAX_JOBS compilers build them side by side.
        sources += [str(p) for p in sorted((csrc / "cuda").glob("*.cu"))]
        sources += [str(p) for p in sorted((csrc / "cuda" / "instances").glob("*.cu"))]
        macros.append(("XCEPTION_OPS_WITH_CUDA", None))
        macros.append(("XCEPTION_OPS_CUDA_ARCHS", f'"{os.environ["TORCH_CUDA_ARCH_LIST"]}"'))
        if "9.0a" in re.split(r"[;\s]+", os.environ["TORCH_CUDA_ARCH_LIST"].replace("+PTX", "")):
            macros.append(("XCEPTION_OPS_SM90A", None))  # Hopper's wgmma kernels are built (pointwise_gemm.cuh)
        # The .cu files are torch-free C++17 (tools/build_old_archs.sh compiles them so): C++20 where nvcc has
        # it (CUDA 12 on), 17 with the CUDA 11 toolkits that old GPUs (sm_37) need.
        cuda_major = int(torch.version.cuda.split(".")[0])
        nvcc_flags = ["-O3", f"-std=c++{20 if cuda_major >= 12 else 17}", "-lineinfo", "--expt-relaxed-constexpr",
                      f"--threads={os.environ.get('NVCC_THREADS', '2')}"]
        ext = cpp_extension.CUDAExtension(
            "xception_ops._C", sources, define_macros=macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, include_dirs=[str(ROOT / "csrc")])
    else:
        ext = cpp_extension.CppExtension(
            "xception_ops._C", sources, define_macros=macros, extra_compile_args={"cxx": cxx_flags},
            include_dirs=[str(ROOT / "csrc")])
    print(f"xception_ops: building {'CUDA (archs ' + os.environ['TORCH_CUDA_ARCH_LIST'] + ')' if with_cuda else 'CPU'}"
          f" extension with MAX_JOBS={os.environ['MAX_JOBS']}", file=sys.stderr)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="xception-ops",
    version=VERSION,
    description="Fused depthwise-separable convolution kernels for PyTorch, and the paper's Xception built on them",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.10",
    packages=find_packages(include=["xception_ops", "xception_ops.*"]),
    package_data={"xception_ops": ["auto_table.json"]},  # the measurements behind backend="auto"
    install_requires=["torch>=2.11", "numpy"],
    extras_require={"timm": ["timm"], "triton": ["triton>=3.6"], "test": ["pytest", "pytest-benchmark", "timm"]},
    entry_points={"console_scripts": ["xception-ops = xception_ops.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
