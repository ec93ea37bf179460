"""The functional API: depthwise and fused separable convolutions.

Each function normalizes its arguments (padding specs, autocast), picks the backend and calls the registered
operator `torch.ops.xception_ops.*`, which checks them (once, in C++: ~9 us of Python checks per call saved), or
checks them in Python and runs the plain-PyTorch reference when the compiled library is absent. Both paths are
differentiable.
"""

from __future__ import annotations

import torch

from . import _library, backend as backends, checks, reference
from .geometry import PaddingSpec, pair, resolve_padding


@torch.compiler.assume_constant_result
def _has_autocast(device_type: str) -> bool:
    # A constant for torch.compile, which traces neither this builtin (torch 2.11: a graph break, so
    # fullgraph=True fails) nor needs to: a device type has autocast or not for the whole process.
    return torch.amp.is_autocast_available(device_type)


def check_tensor_args(op: str, required: dict[str, object], optional: dict[str, object] | None = None) -> None:
    """The tensor arguments as tensors (None allowed for the optional ones): a list or a missing weight would
    otherwise fail deep inside with an AttributeError that names none of them."""
    for name, t in required.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    for name, t in (optional or {}).items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor or None, got {type(t).__name__}")


def autocast_inputs(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Under autocast, the convolution's tensors run in the autocast dtype, as torch's own convolutions do (float64
    ones stay float64, as autocast leaves them)."""
    first = tensors[0]
    device_type = first.device.type
    # Devices without autocast (meta, for shape inference and deferred initialization) have nothing to cast; asking
    # torch.is_autocast_enabled about them raises.
    if not _has_autocast(device_type) or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def conv_args(x: torch.Tensor, weight: torch.Tensor, stride, padding: PaddingSpec, dilation):
    """stride, padding spec and dilation as the operators take them: [sh, sw], [top, bottom, left, right], [dh, dw]."""
    stride2, dilation2 = pair(stride, "stride"), pair(dilation, "dilation")
    if x.dim() != 4:  # checked again below; needed here for the spatial size of "same"
        raise ValueError(f"x must be a 4-D tensor (N, C, H, W), got {x.dim()}-D with shape {list(x.shape)}")
    if isinstance(padding, str) and (weight.dim() != 4 or min(stride2) < 1 or min(dilation2) < 1):
        # "same" cannot be worked out from these; the op's checks, which run next, name what is wrong.
        return list(stride2), [0, 0, 0, 0], list(dilation2)
    pad4 = resolve_padding(padding, x.shape[2:], weight.shape[2:], stride2, dilation2)
    return list(stride2), list(pad4), list(dilation2)


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     stride: int | tuple[int, int] = 1, padding: PaddingSpec = 0,
                     dilation: int | tuple[int, int] = 1, *, backend: str = "auto") -> torch.Tensor:
    """Depthwise 2-D convolution: `F.conv2d(x, weight, bias, stride, padding, dilation, groups=C)`.

    weight has shape (C * depth_multiplier, 1, kH, kW). padding is "valid", "same" (TensorFlow's, asymmetric
    at stride 2 when needed), an int, (pad_h, pad_w) or (top, bottom, left, right).
    """
    op = "xception_ops.depthwise_conv2d"
    check_tensor_args(op, {"x": x, "weight": weight}, {"bias": bias})
    x, weight, bias = autocast_inputs(x, weight, bias)
    stride_, padding_, dilation_ = conv_args(x, weight, stride, padding, dilation)
    if _library.EXTENSION is None:
        checks.check_depthwise(op, x, weight, bias, stride_, padding_, dilation_)
        backends.resolve(backend, op, x, weight.shape[0])
        return reference.depthwise_conv2d(x, weight, bias, stride_, padding_, dilation_)
    # The compiled op checks its arguments (csrc/checks.cpp: the same rules and messages as checks.py).
    chosen = backends.resolve(backend, op, x, weight.shape[0])
    return torch.ops.xception_ops.depthwise_conv2d(x, weight, bias, stride_, padding_, dilation_, chosen)


def separable_conv2d(x: torch.Tensor, dw_weight: torch.Tensor, pw_weight: torch.Tensor, *,
                     stride: int | tuple[int, int] = 1, padding: PaddingSpec = 0,
                     dilation: int | tuple[int, int] = 1, in_scale: torch.Tensor | None = None,
                     in_shift: torch.Tensor | None = None, in_relu: bool = False, mid_activation: str | None = None,
                     mid_scale: torch.Tensor | None = None, mid_shift: torch.Tensor | None = None,
                     out_scale: torch.Tensor | None = None, out_shift: torch.Tensor | None = None,
                     out_relu: bool = False, residual: torch.Tensor | None = None, compute_stats: bool = False,
                     backend: str = "auto"):
    """Fused separable convolution with BatchNorm and activations folded in:

        a   = relu?(x * in_scale + in_shift)            prologue: the previous BatchNorm + ReLU, per input channel
        d   = depthwise(a)
        y   = pointwise(act(d * mid_scale + mid_shift))  per depthwise channel (a BatchNorm or bias between the
                                                        halves, as in MobileNet); act is mid_activation: None,
                                                        "relu", "relu6", "hardswish" or "elu"
        out = relu?(y * out_scale + out_shift + residual)  epilogue: folded BatchNorm or bias, per output channel

    With compute_stats=True returns (out, sum, sumsq): the per-channel sum and sum of squares of y in float32,
    which training-mode BatchNorm turns into batch statistics (see xception_ops.batchnorm). Otherwise returns out.
    """
    check_tensor_args("xception_ops.separable_conv2d", {"x": x, "dw_weight": dw_weight, "pw_weight": pw_weight},
                      {"in_scale": in_scale, "in_shift": in_shift, "mid_scale": mid_scale, "mid_shift": mid_shift,
                       "out_scale": out_scale, "out_shift": out_shift, "residual": residual})
    stride_, padding_, dilation_ = conv_args(x, dw_weight, stride, padding, dilation)
    return separable_conv2d_normalized(x, dw_weight, pw_weight, stride_, padding_, dilation_, backend, in_scale,
                                       in_shift, in_relu, mid_activation, out_scale, out_shift, out_relu, residual,
                                       compute_stats, mid_scale, mid_shift)


def separable_conv2d_normalized(x: torch.Tensor, dw_weight: torch.Tensor, pw_weight: torch.Tensor,
                                stride: list[int], padding: list[int], dilation: list[int], backend: str,
                                in_scale: torch.Tensor | None, in_shift: torch.Tensor | None, in_relu: bool,
                                mid_activation: str | None, out_scale: torch.Tensor | None,
                                out_shift: torch.Tensor | None, out_relu: bool, residual: torch.Tensor | None,
                                compute_stats: bool, mid_scale: torch.Tensor | None = None,
                                mid_shift: torch.Tensor | None = None):
    """separable_conv2d with stride, padding and dilation already as conv_args returns them, every argument
    positional: the fused modules' path, which keeps them per input size (a few microseconds of Python per call
    on the host that issues a model's ~40 layers)."""
    op = "xception_ops.separable_conv2d"
    mid = "none" if mid_activation is None else mid_activation
    x, dw_weight, pw_weight, residual = autocast_inputs(x, dw_weight, pw_weight, residual)
    args = (x, dw_weight, pw_weight, in_scale, in_shift, in_relu, stride, padding, dilation, mid, mid_scale,
            mid_shift, out_scale, out_shift, out_relu, residual, compute_stats)
    if _library.EXTENSION is None:
        checks.check_separable(op, x, dw_weight, pw_weight, stride, padding, dilation, in_scale=in_scale,
                               in_shift=in_shift, mid_activation=mid, mid_scale=mid_scale, mid_shift=mid_shift,
                               out_scale=out_scale, out_shift=out_shift, residual=residual)
        backends.resolve(backend, op, x, pw_weight.shape[0])
        out, total, total_sq = reference.separable_conv2d(*args)
    else:  # the compiled op checks its arguments (csrc/checks.cpp: the same rules and messages as checks.py)
        chosen = backends.resolve(backend, op, x, pw_weight.shape[0])
        out, total, total_sq = torch.ops.xception_ops.separable_conv2d(*args, chosen)
    return (out, total, total_sq) if compute_stats else out
