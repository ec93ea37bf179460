"""Which backend runs an op: "torch" (the ATen reference), "cuda" (csrc/cuda) or "triton".

`backend="auto"` (the default everywhere) is resolved per call (`auto_choice`, cached): the XCEPTION_OPS_BACKEND
environment variable overrides it when set; otherwise, on a GPU, the measured table of xception_ops/autotable.py
picks the fastest backend for the arch, dtype, layout, pass and nearest layer shape, among those that can run;
configurations it has not measured take the CUDA ops compiled into the auto list (`_cuda_preferred`); the
reference path ("torch": the fused modules then run PyTorch's own layers) runs elsewhere. Asking for a backend
that cannot run raises an error that names what is missing.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from . import _library, autotable
from .checks import output_memory_format

BACKENDS = ("auto", "torch", "cuda", "triton")
ENV_VAR = "XCEPTION_OPS_BACKEND"


class BackendUnavailableError(NotImplementedError):
    """The requested backend is not built, not implemented for this op, or cannot run on this device."""


@dataclass(frozen=True)
class BackendStatus:
    name: str
    built: bool
    usable: bool  # on this machine's GPU, for the cuda and triton backends
    detail: str


def cuda_ops() -> tuple[str, ...]:
    """Ops (Python names, e.g. "xception_ops.depthwise_conv2d") the compiled CUDA backend has kernels for."""
    ext = _library.EXTENSION
    return tuple(ext.CUDA_OPS) if ext is not None and ext.WITH_CUDA else ()


def _cuda_problem(op: str | None, device: torch.device | None) -> str | None:
    """Why the cuda backend cannot run `op` on `device`, or None when it can."""
    ext = _library.EXTENSION
    if ext is None:
        return f"the compiled library is not loaded ({_library.LOAD_ERROR})"
    if not ext.WITH_CUDA:
        return ("this copy of xception_ops was compiled without CUDA (no CUDA toolkit, or a CPU-only torch, at "
                "build time)")
    if device is not None and device.type != "cuda":
        return f"it needs CUDA tensors, but x is on {device}"
    if op is not None and op not in cuda_ops():
        return f"it has no kernel for {op} yet"
    return None


def _cuda_preferred(op: str, x: torch.Tensor) -> bool:
    """Whether "auto" takes a CUDA kernel that can run: the compiled library lists the ops whose kernels beat the
    reference path wherever measured (csrc/cuda_ops_list.h, benchmarks/RESULTS.md); float64 never."""
    ext = _library.EXTENSION
    return x.dtype in (torch.float32, torch.float16, torch.bfloat16) and op in tuple(ext.CUDA_AUTO_OPS)


def _triton_problem(op: str | None, device: torch.device | None) -> str | None:
    """Why the triton backend cannot run `op` on `device`, or None when it can."""
    module = _library.TRITON
    if module is None:
        return _library.TRITON_ERROR
    if op is not None and op.removeprefix("xception_ops.") not in module.IMPLEMENTED:
        return f"it has no kernel for {op} yet"
    return None if device is None else module.device_problem(device)


@dataclass(frozen=True)
class AutoChoice:
    backend: str  # "torch", "cuda" or "triton"
    reason: str


_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_ARCHS: dict[int, str] = {}


def _arch(device: torch.device) -> str:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _ARCHS:
        _ARCHS[index] = autotable.arch_name(*torch.cuda.get_device_capability(index))
    return _ARCHS[index]


def _problem(backend: str, op: str, device: torch.device) -> str | None:
    if backend == "cuda":
        return _cuda_problem(op, device)
    if backend == "triton":
        return _triton_problem(op, device)
    return None


def choose_from_entry(entry: autotable.Entry, can_run) -> AutoChoice:
    """The fastest backend of a table entry that `can_run(backend)`, else PyTorch's layers."""
    where = f"{entry.source}: {entry.cin}->{entry.cout} @{entry.hw}^2"
    for name, speedup in entry.ranked():
        if can_run(name):
            return AutoChoice(name, f"measured {speedup:.2f}x PyTorch's layers ({where})")
    ours = ", ".join(f"{b} {s:.2f}x" for b, s in sorted(entry.speedup.items(), key=lambda bs: -bs[1]))
    return AutoChoice("torch", f"measured: PyTorch's layers are the fastest ({where}; ours: {ours or 'none'})")


# auto_choice's answers on CUDA tensors, by everything they depend on: ~12 us per call to work out (the table
# lookup, the candidates' checks, the reason's text), ~1 us to find here. Bounded, for dynamic shapes.
_CHOICES: dict[tuple, AutoChoice] = {}
_CHOICES_MAX = 4096


def auto_choice(op: str, x: torch.Tensor, out_channels: int | None = None,
                training: bool | None = None) -> AutoChoice:
    """What backend="auto" runs `op` with for input x, and why. `training`: whether autograd may need the
    backward (default: grad mode); `out_channels`: the op's output channels (default: x's).

    Cached per configuration; the key holds what the answer depends on besides it (the table file in use and
    autotable.clear_cache's generation, the compiled library and the triton module), so a different table, a
    cleared cache or a backend that loads differently gives a fresh answer."""
    if x.device.type != "cuda":
        return AutoChoice("torch", f"{x.device.type} tensors run on PyTorch's layers")
    dtype = _DTYPE_NAMES.get(x.dtype)
    if dtype is None:
        return AutoChoice("torch", f"{x.dtype}: none of our kernels takes it")
    pass_ = "training" if (torch.is_grad_enabled() if training is None else training) else "inference"
    layout = "NHWC" if output_memory_format(x) == torch.channels_last else "NCHW"
    cin = x.shape[1] if x.dim() == 4 else 0
    hw = x.shape[-2] if x.dim() == 4 else 0
    if torch.compiler.is_compiling():  # traced once into the graph: nothing to save, and no global dict to mutate
        return _auto_choice(op, x, dtype, layout, pass_, cin, out_channels or cin, hw)
    key = (op, x.device, dtype, layout, pass_, cin, out_channels or cin, hw, os.environ.get(autotable.TABLE_ENV),
           autotable.generation, _library.EXTENSION, _library.TRITON)
    choice = _CHOICES.get(key)
    if choice is None:
        if len(_CHOICES) >= _CHOICES_MAX:
            _CHOICES.clear()
        choice = _CHOICES[key] = _auto_choice(op, x, dtype, layout, pass_, cin, out_channels or cin, hw)
    return choice


def _auto_choice(op: str, x: torch.Tensor, dtype: str, layout: str, pass_: str, cin: int, cout: int,
                 hw: int) -> AutoChoice:
    arch = _arch(x.device)
    name = op.removeprefix("xception_ops.")
    entry = autotable.lookup(arch, name, dtype, layout, pass_, cin, cout, hw)
    if entry is not None:
        return choose_from_entry(entry, lambda b: _problem(b, op, x.device) is None)
    if _cuda_problem(op, x.device) is None and _cuda_preferred(op, x):
        return AutoChoice("cuda", "in the compiled-in auto list (csrc/cuda_ops_list.h)")
    return AutoChoice("torch", f"not measured for {arch} {dtype} {layout} {pass_}")


def checked_name(backend: str) -> str:
    """`backend` itself if it names one of BACKENDS, else a ValueError: for the modules that take a backend when
    they are built, so that a misspelt one fails there rather than at the first call."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def _env_override() -> str | None:
    override = os.environ.get(ENV_VAR, "").strip().lower()
    if override and override not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={override!r} is not a backend; expected one of {', '.join(BACKENDS)}")
    return None if override in ("", "auto") else override


def requested(backend: str) -> str:
    """The backend asked for: XCEPTION_OPS_BACKEND's when `backend` is "auto" and the variable is set."""
    return (_env_override() or "auto") if backend == "auto" else backend


def fused_backend(backend: str, op: str, x: torch.Tensor, out_channels: int | None = None,
                  mid_batch_stats: bool = False) -> str | None:
    """For the fused modules: the backend that runs the fused op, or None when "auto" finds no fused kernel for x.

    The modules then run the unfused PyTorch layers, as fast as the model was before fusing, rather than the
    reference operator (which recomputes in its backward). An explicit backend, or XCEPTION_OPS_BACKEND, always
    runs the operator.

    mid_batch_stats: the layer has a BatchNorm between its halves in training (MobileNet's, the aligned Xception's).
    Its statistics cost the fused op a depthwise forward and a depthwise backward of their own, which no measurement
    in the table includes: "auto" keeps the PyTorch layers there until a benchmark has timed such layers.
    """
    if backend == "auto" and _env_override() is None:
        if mid_batch_stats:
            return None
        chosen = auto_choice(op, x, out_channels).backend
        return None if chosen == "torch" else chosen
    return resolve(backend, op, x, out_channels)


def resolve(backend: str, op: str, x: torch.Tensor, out_channels: int | None = None) -> str:
    """The concrete backend ("torch", "cuda" or "triton") that runs `op` on x's device."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = _env_override() or "auto"
    if backend == "auto":
        return auto_choice(op, x, out_channels).backend
    if backend == "cuda":
        problem = _cuda_problem(op, x.device)
        if problem is not None:
            raise BackendUnavailableError(f"{op}: backend 'cuda' cannot run: {problem}")
    if backend == "triton":
        problem = _triton_problem(op, x.device)
        if problem is not None:
            raise BackendUnavailableError(f"{op}: backend 'triton' cannot run: {problem}")
    return backend


def wgmma_kernels_built() -> bool:
    """Whether the compiled library holds Hopper's wgmma kernels (csrc/kernels/pointwise_gemm.cuh,
    separable_wgmma.cuh): built for sm_90a (TORCH_CUDA_ARCH_LIST with 9.0a, the default for Hopper)."""
    ext = _library.EXTENSION
    if ext is None or not ext.WITH_CUDA:
        return False
    return "9.0a" in re.split(r"[;\s]+", ext.CUDA_ARCHS.replace("+PTX", ""))


def wgmma_configs() -> tuple[str, ...]:
    """The builds of Hopper's wgmma GEMM by the names XCEPTION_OPS_WGMMA_CONFIG takes ("128x3x0": output channels
    per block x pipeline stages x groups in flight), the default first; empty without the compiled CUDA library."""
    ext = _library.EXTENSION
    return tuple(getattr(ext, "WGMMA_CONFIGS", ())) if ext is not None else ()


def status() -> list[BackendStatus]:
    """What each backend is and whether it can run here; printed by `xception-ops info`."""
    gpu = torch.device("cuda") if torch.cuda.is_available() else None
    ext = _library.EXTENSION
    cuda_detail = _cuda_problem(None, gpu)
    if cuda_detail is None and gpu is None:
        cuda_detail = "no CUDA GPU is visible"
    cuda_built = ext is not None and bool(ext.WITH_CUDA)
    if cuda_built:
        built_for = (f"built for sm {ext.CUDA_ARCHS}; kernels: {', '.join(cuda_ops()) or 'none yet'}; "
                     f"taken by backend='auto': {', '.join(ext.CUDA_AUTO_OPS) or 'none yet'}; Hopper's wgmma "
                     + ("kernels built, opt-in (XCEPTION_OPS_SEPARABLE_STAGED_GEMM=wgmma, "
                        "XCEPTION_OPS_SEPARABLE_FORWARD=wgmma; compute capability 9.0 only; GEMM builds "
                        f"{', '.join(wgmma_configs())})"
                        if wgmma_kernels_built() else "kernels not built (no 9.0a in TORCH_CUDA_ARCH_LIST)"))
        cuda_detail = built_for if cuda_detail is None else f"{built_for}; not usable: {cuda_detail}"
    return [
        BackendStatus("torch", True, True, "ATen reference (cuDNN on CUDA, oneDNN / native on CPU); always usable"),
        BackendStatus("cuda", cuda_built, cuda_built and gpu is not None, cuda_detail or ""),
        _triton_status(gpu),
    ]


def _triton_status(gpu: torch.device | None) -> BackendStatus:
    module = _library.TRITON
    if module is None:
        return BackendStatus("triton", False, False, _library.TRITON_ERROR or "")
    import triton

    detail = f"triton {triton.__version__}; kernels: {', '.join(sorted(module.IMPLEMENTED)) or 'none yet'}"
    problem = "no CUDA GPU is visible" if gpu is None else module.device_problem(gpu)
    if problem is not None:
        detail += f"; not usable: {problem}"
    return BackendStatus("triton", True, problem is None, detail)
