"""PyTorch's TF32 flags for float32 work, read and set: cuDNN's (convolutions; the cuda backend's fused separable
kernel follows it) and cuBLAS's (matrix products; the staged separable forward's product follows it).

PyTorch >= 2.9 also has per-operator settings (`torch.backends.cudnn.conv.fp32_precision` and the like). Where they
differ from one another, the legacy cuDNN flag cannot be read (it raises), and a legacy setter over them leaves a
mix that it refuses even once they are put back: there, only the per-operator settings are touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def tf32_flags() -> dict[str, bool | None]:
    """{"cudnn": .., "matmul": ..}: whether each uses TF32; None where PyTorch cannot answer with one value."""
    flags: dict[str, bool | None] = {}
    for name, module in (("cudnn", torch.backends.cudnn), ("matmul", torch.backends.cuda.matmul)):
        try:
            flags[name] = bool(module.allow_tf32)
        except RuntimeError:
            flags[name] = None
    return flags


@contextlib.contextmanager
def tf32_override(enabled: bool) -> Iterator[None]:
    """TF32 on or off for cuDNN and cuBLAS alike inside the block; the caller's settings put back after it. Under
    per-operator settings that differ, those are set ("tf32" / "ieee") and restored instead of the legacy flags."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    try:
        saved_flags = (cudnn.allow_tf32, matmul.allow_tf32)
    except RuntimeError:  # mixed per-operator settings
        saved_flags = None
    if saved_flags is not None:
        cudnn.allow_tf32 = matmul.allow_tf32 = enabled
        saved_precisions = []
    else:
        saved_precisions = [(obj, obj.fp32_precision) for obj in (cudnn.conv, cudnn.rnn, matmul)]
        for obj, _ in saved_precisions:
            obj.fp32_precision = "tf32" if enabled else "ieee"
    try:
        yield
    finally:
        if saved_flags is not None:
            cudnn.allow_tf32, matmul.allow_tf32 = saved_flags
        for obj, precision in saved_precisions:
            obj.fp32_precision = precision
