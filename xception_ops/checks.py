"""Argument checks for the ops, shared by the Python API, the fake (meta) kernels and the Python-only path.

The Python twin of csrc/checks.cpp: same rules, same error types (ValueError for shapes, devices and values,
TypeError for dtypes), each message naming the op and the argument at fault.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .geometry import output_hw

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MID_ACTIVATIONS = ("none", "relu", "relu6", "hardswish", "elu")


def one_of(names) -> str:
    """"'a', 'b' or 'c'": the choices an error message names, from the tuple the check uses."""
    quoted = [repr(n) for n in names]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1]


@dataclass(frozen=True)
class Geometry:
    batch: int
    in_channels: int
    in_hw: tuple[int, int]
    depth_multiplier: int
    dw_channels: int
    kernel_hw: tuple[int, int]
    out_channels: int
    out_hw: tuple[int, int]

    def output_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.out_channels, *self.out_hw)


def check_float_tensor(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported dtypes are float32, float16, bfloat16 "
                        "and float64")


def check_same_device(op: str, name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}; move both to the same device")


def check_same_dtype(op: str, name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if t.dtype != x.dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but x has dtype {x.dtype}; cast them to one dtype "
                        "(or use autocast)")


MAX_GEOMETRY_VALUE = 2**31 - 1  # stride, padding, dilation, kernel_size (csrc/checks.cpp's kMaxGeometryValue)


def _check_ints(op: str, name: str, values: Sequence[int], length: int, minimum: int) -> None:
    if len(values) != length:
        raise ValueError(f"{op}: {name} must have {length} values, got {len(values)}")
    if any(v < minimum for v in values):
        raise ValueError(f"{op}: every value of {name} must be >= {minimum}, got {list(values)}")
    # (bounded as the C++ checks are, where the geometry's spans and padded sizes must not overflow 64 bits)
    if any(v > MAX_GEOMETRY_VALUE for v in values):
        raise ValueError(f"{op}: every value of {name} must be <= {MAX_GEOMETRY_VALUE}, got {list(values)}")


def check_channel_vector(op: str, name: str, t: torch.Tensor | None, channels: int, x: torch.Tensor) -> None:
    if t is None:
        return
    if t.dim() != 1 or t.shape[0] != channels:
        raise ValueError(f"{op}: {name} must have shape [{channels}], got {list(t.shape)}")
    check_float_tensor(op, name, t)
    check_same_device(op, name, t, x)


def make_geometry(op: str, x_shape: Sequence[int], weight_shape: Sequence[int], stride: Sequence[int],
                  padding: Sequence[int], dilation: Sequence[int]) -> Geometry:
    """Shape checks; the backward ops know the input and the weight by their shapes only."""
    if len(x_shape) != 4:
        raise ValueError(f"{op}: x must be a 4-D tensor (N, C, H, W), got {len(x_shape)}-D with shape "
                         f"{list(x_shape)}")
    if len(weight_shape) != 4 or weight_shape[1] != 1:
        raise ValueError(f"{op}: dw_weight must have shape (C * depth_multiplier, 1, kH, kW), got "
                         f"{list(weight_shape)}")
    channels = x_shape[1]
    if channels <= 0:
        raise ValueError(f"{op}: x has 0 channels")
    if weight_shape[0] <= 0 or weight_shape[0] % channels != 0:
        raise ValueError(f"{op}: dw_weight has {weight_shape[0]} output channels, which is not a positive "
                         f"multiple of x's {channels} channels")
    if weight_shape[2] <= 0 or weight_shape[3] <= 0:
        raise ValueError(f"{op}: dw_weight has an empty kernel {list(weight_shape)}")
    _check_ints(op, "stride", stride, 2, 1)
    _check_ints(op, "padding", padding, 4, 0)
    _check_ints(op, "dilation", dilation, 2, 1)
    kernel = (weight_shape[2], weight_shape[3])
    span = tuple(d * (k - 1) + 1 for d, k in zip(dilation, kernel))
    padded = (x_shape[2] + padding[0] + padding[1], x_shape[3] + padding[2] + padding[3])
    if span[0] > padded[0] or span[1] > padded[1]:
        raise ValueError(f"{op}: the kernel {kernel[0]}x{kernel[1]} with dilation {list(dilation)} spans "
                         f"{span[0]}x{span[1]}, larger than the padded input {padded[0]}x{padded[1]} (x is "
                         f"{x_shape[2]}x{x_shape[3]}, padding (top, bottom, left, right) = {list(padding)})")
    return Geometry(batch=x_shape[0], in_channels=channels, in_hw=(x_shape[2], x_shape[3]),
                    depth_multiplier=weight_shape[0] // channels, dw_channels=weight_shape[0], kernel_hw=kernel,
                    out_channels=weight_shape[0], out_hw=output_hw(x_shape[2:], kernel, stride, padding, dilation))


def check_depthwise(op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> Geometry:
    g = make_geometry(op, x.shape, weight.shape, stride, padding, dilation)
    check_float_tensor(op, "x", x)
    check_same_device(op, "dw_weight", weight, x)
    check_same_dtype(op, "dw_weight", weight, x)
    check_channel_vector(op, "bias", bias, g.dw_channels, x)
    if bias is not None:
        check_same_dtype(op, "bias", bias, x)
    return g


def check_separable(op: str, x: torch.Tensor, dw_weight: torch.Tensor, pw_weight: torch.Tensor,
                    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], *,
                    in_scale: torch.Tensor | None = None, in_shift: torch.Tensor | None = None,
                    mid_activation: str = "none", mid_scale: torch.Tensor | None = None,
                    mid_shift: torch.Tensor | None = None, out_scale: torch.Tensor | None = None,
                    out_shift: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> Geometry:
    g = check_depthwise(op, x, dw_weight, None, stride, padding, dilation)
    if pw_weight.dim() != 4 or pw_weight.shape[2:] != (1, 1):
        raise ValueError(f"{op}: pw_weight must have shape (C_out, C * depth_multiplier, 1, 1), got "
                         f"{list(pw_weight.shape)}")
    if pw_weight.shape[1] != g.dw_channels:
        raise ValueError(f"{op}: pw_weight has {pw_weight.shape[1]} input channels but the depthwise stage gives "
                         f"{g.dw_channels} (channel mismatch between dw_weight and pw_weight)")
    if pw_weight.shape[0] <= 0:
        raise ValueError(f"{op}: pw_weight has 0 output channels")
    check_same_device(op, "pw_weight", pw_weight, x)
    check_same_dtype(op, "pw_weight", pw_weight, x)
    if mid_activation not in MID_ACTIVATIONS:
        raise ValueError(f"xception_ops: mid_activation must be {one_of(MID_ACTIVATIONS)}, got '{mid_activation}'")
    g = replace(g, out_channels=pw_weight.shape[0])  # (Dynamo of torch 2.11 cannot trace **g.__dict__)
    check_channel_vector(op, "in_scale", in_scale, g.in_channels, x)
    check_channel_vector(op, "in_shift", in_shift, g.in_channels, x)
    check_channel_vector(op, "mid_scale", mid_scale, g.dw_channels, x)
    check_channel_vector(op, "mid_shift", mid_shift, g.dw_channels, x)
    check_channel_vector(op, "out_scale", out_scale, g.out_channels, x)
    check_channel_vector(op, "out_shift", out_shift, g.out_channels, x)
    if residual is not None:
        if tuple(residual.shape) != g.output_shape():
            raise ValueError(f"{op}: residual must have the output's shape {list(g.output_shape())}, got "
                             f"{list(residual.shape)}")
        check_same_device(op, "residual", residual, x)
        check_same_dtype(op, "residual", residual, x)
    return g


def check_batch_norm_finalize(op: str, total: torch.Tensor, total_sq: torch.Tensor, count: int,
                              weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, *,
                              running_mean: torch.Tensor | None = None, running_var: torch.Tensor | None = None,
                              num_batches_tracked: torch.Tensor | None = None, pre_bias: torch.Tensor | None = None,
                              momentum: float = 0.0) -> None:
    """The same checks as the C++ op (csrc/checks.cpp), for the fake kernel and the Python fallback; with the
    running-statistics update's tensors, theirs too."""
    if total.dim() != 1:
        raise ValueError(f"{op}: sum must be 1-D (one value per channel), got shape {list(total.shape)}")
    if total.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: sum must be float32 or float64 (the fused ops' statistics), got {total.dtype}")
    if total_sq.shape != total.shape:
        raise ValueError(f"{op}: sumsq must have sum's shape {list(total.shape)}, got {list(total_sq.shape)}")
    for name, t in (("sumsq", total_sq), ("weight", weight), ("bias", bias)):
        if t is not None and t.device != total.device:
            raise ValueError(f"{op}: {name} is on {t.device} but sum is on {total.device}; move both to the same "
                             "device")
    if total_sq.dtype != total.dtype:
        raise TypeError(f"{op}: sumsq has dtype {total_sq.dtype} but sum has dtype {total.dtype}")
    if count < 1:
        raise ValueError(f"{op}: count must be at least 1, got {count}")
    if eps < 0:
        raise ValueError(f"{op}: eps must be >= 0")
    check_channel_vector(op, "weight", weight, total.shape[0], total)
    check_channel_vector(op, "bias", bias, total.shape[0], total)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: running_mean and running_var go together: give both or neither")
    if running_mean is not None:  # the batch mean and variance will have sum's shape, dtype and device
        check_batch_norm_update_stats(op, running_mean, running_var, total, total_sq, pre_bias, count, momentum)
    if num_batches_tracked is not None:
        if num_batches_tracked.dtype != torch.int64 or num_batches_tracked.numel() != 1:
            raise TypeError(f"{op}: num_batches_tracked must be one int64 (nn.BatchNorm2d's), got "
                            f"{num_batches_tracked.dtype} of shape {list(num_batches_tracked.shape)}")
        if num_batches_tracked.device != total.device:
            raise ValueError(f"{op}: num_batches_tracked is on {num_batches_tracked.device} but sum is on "
                             f"{total.device}; move both to the same device")


def _check_scale_shift_vectors(op: str, y: torch.Tensor, y_name: str, scale: torch.Tensor,
                               shift: torch.Tensor) -> None:
    for name, t in (("scale", scale), ("shift", shift)):
        if t.dim() != 1 or t.shape[0] != y.shape[1]:
            raise ValueError(f"{op}: {name} must have shape [{y.shape[1]}] ({y_name}'s channels), got {list(t.shape)}")
        if t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{op}: {name} must be float32 or float64 (per-channel math), got {t.dtype}")
        check_same_device(op, name, t, y)
    if shift.dtype != scale.dtype:
        raise TypeError(f"{op}: shift has dtype {shift.dtype} but scale has dtype {scale.dtype}")


def check_scale_shift(op: str, y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                      grad: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> None:
    """The same checks as the C++ op (csrc/checks.cpp), for the fake kernels."""
    if y.dim() != 4:
        raise ValueError(f"{op}: y must be a 4-D tensor (N, C, H, W), got shape {list(y.shape)}")
    check_float_tensor(op, "y", y)
    _check_scale_shift_vectors(op, y, "y", scale, shift)
    if grad is not None:
        check_like(op, "grad", grad, y.shape, y)
    if residual is not None:
        check_like(op, "residual", residual, y.shape, y)


def check_batch_norm_finalize_backward(op: str, total: torch.Tensor, total_sq: torch.Tensor, count: int,
                                       weight: torch.Tensor | None, eps: float, *grads: torch.Tensor | None) -> None:
    """The same checks as the C++ op (csrc/checks.cpp), for the fake kernel."""
    check_batch_norm_finalize(op, total, total_sq, count, weight, None, eps)
    for name, g in zip(("grad_scale", "grad_shift", "grad_mean", "grad_var"), grads):
        check_channel_vector(op, name, g, total.shape[0], total)


def check_batch_norm_update_stats(op: str, running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor,
                                  var: torch.Tensor, pre_bias: torch.Tensor | None, count: int,
                                  momentum: float) -> None:
    """The same checks as the C++ op (csrc/checks.cpp), for the fake kernel."""
    if mean.dim() != 1:
        raise ValueError(f"{op}: mean must be 1-D (one value per channel), got shape {list(mean.shape)}")
    if mean.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: mean must be float32 or float64 (the finalize step's output), got {mean.dtype}")
    for name, t in (("var", var), ("running_mean", running_mean), ("running_var", running_var)):
        if t.shape != mean.shape:
            raise ValueError(f"{op}: {name} must have mean's shape {list(mean.shape)}, got {list(t.shape)}")
        if t.device != mean.device:
            raise ValueError(f"{op}: {name} is on {t.device} but mean is on {mean.device}; move both to the same "
                             "device")
    if var.dtype != mean.dtype:
        raise TypeError(f"{op}: var has dtype {var.dtype} but mean has dtype {mean.dtype}")
    if not (running_mean.is_floating_point() and running_var.is_floating_point()):
        raise TypeError(f"{op}: running_mean and running_var must be floating point, got {running_mean.dtype} and "
                        f"{running_var.dtype}")
    if count < 2:
        raise ValueError(f"{op}: count must be at least 2 (the unbiased variance divides by count - 1), got {count}")
    if not 0 <= momentum <= 1:
        raise ValueError(f"{op}: momentum must be in [0, 1], got {momentum}")
    check_channel_vector(op, "pre_bias", pre_bias, mean.shape[0], mean)


MAX_POOL_MAX_TAPS = 256  # csrc/kernels/pool_geometry.h: the argmax is one byte per output


def pool_out_size(size: int, kernel: int, stride: int, pad: int, ceil_mode: bool) -> int:
    """torch.nn.functional.max_pool2d's output length along one axis (csrc/kernels/pool_geometry.h)."""
    # (// rounds toward -infinity, as PyTorch's division there: in ceil mode an input shorter than the window still
    # gives one output when the window starts inside it)
    out = (size + 2 * pad - kernel + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return max(out, 0)


def check_pool_input(op: str, values: torch.Tensor, values_name: str, x_shape: Sequence[int]) -> None:
    """The pooled input the kernels take: 4-D, with channels, `values` (x, or the backward's gradient) of a float
    dtype."""
    if len(x_shape) != 4:
        raise ValueError(f"{op}: x must be a 4-D tensor (N, C, H, W), got shape {list(x_shape)}")
    if x_shape[1] <= 0:
        raise ValueError(f"{op}: x has 0 channels")
    check_float_tensor(op, values_name, values)


def check_max_pool2d(op: str, values: torch.Tensor, values_name: str, x_shape: Sequence[int],
                     kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                     ceil_mode: bool) -> tuple[int, int, int, int]:
    """The same checks as the C++ op (csrc/checks.cpp); returns the pooled shape."""
    check_pool_input(op, values, values_name, x_shape)
    _check_ints(op, "kernel_size", kernel_size, 2, 1)
    _check_ints(op, "stride", stride, 2, 1)
    _check_ints(op, "padding", padding, 2, 0)
    if kernel_size[0] * kernel_size[1] > MAX_POOL_MAX_TAPS:
        raise ValueError(f"{op}: kernel_size {list(kernel_size)} has more than {MAX_POOL_MAX_TAPS} taps (the argmax "
                         "is kept as one byte per output)")
    if any(2 * p > k for p, k in zip(padding, kernel_size)):
        raise ValueError(f"{op}: padding must be at most half of kernel_size, got padding {list(padding)} and "
                         f"kernel_size {list(kernel_size)}")
    out_h, out_w = (pool_out_size(x_shape[2 + d], kernel_size[d], stride[d], padding[d], ceil_mode) for d in range(2))
    if out_h < 1 or out_w < 1:
        raise ValueError(f"{op}: the output would be empty: x's size {list(x_shape[2:])} is smaller than kernel_size "
                         f"{list(kernel_size)} with padding {list(padding)}")
    return (x_shape[0], x_shape[1], out_h, out_w)


def check_max_pool2d_extras(op: str, x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None,
                            residual: torch.Tensor | None, out_shape: Sequence[int]) -> None:
    """max_pool2d's keyword arguments, as the C++ op checks them (csrc/checks.cpp)."""
    if (scale is None) != (shift is None):
        alone = "scale" if shift is None else "shift"
        raise ValueError(f"{op}: scale and shift come together (the BatchNorm applied to x), got {alone} alone")
    if scale is not None:
        _check_scale_shift_vectors(op, x, "x", scale, shift)
    if residual is not None:
        check_like(op, "residual", residual, out_shape, x)


def check_pool_gradient(op: str, grad_out: torch.Tensor, argmax: torch.Tensor, out_shape: Sequence[int]) -> None:
    """grad_out and argmax of the pooled shape, argmax uint8 on grad_out's device (csrc/registration.cpp)."""
    for name, t in (("grad_out", grad_out), ("argmax", argmax)):
        if tuple(t.shape) != tuple(out_shape):
            raise ValueError(f"{op}: {name} must have shape {list(out_shape)}, got {list(t.shape)}")
    if argmax.dtype != torch.uint8:
        raise TypeError(f"{op}: argmax must be uint8 (the forward's), got {argmax.dtype}")
    if argmax.device != grad_out.device:
        raise ValueError(f"{op}: argmax is on {argmax.device} but grad_out is on {grad_out.device}; move both to the "
                         "same device")


def check_like(op: str, name: str, t: torch.Tensor, shape: Sequence[int], x: torch.Tensor) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(t.shape)}")
    check_same_device(op, name, t, x)
    check_same_dtype(op, name, t, x)


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last in, channels_last out; plain contiguous wins ties. Same rule as csrc/checks.cpp."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    """BatchNorm statistics and per-channel math: float32, or float64 for float64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
