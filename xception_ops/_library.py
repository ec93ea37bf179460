"""Loads the compiled operators and registers their fake (meta) kernels for torch.compile. The schemas are defined
once, in csrc/registration.cpp; the autograd formulas are C++ too (csrc/autograd.cpp).

Without the compiled library (XCEPTION_OPS_SKIP_EXT=1, or a failed build) `EXTENSION` is None, `LOAD_ERROR`
says why, and xception_ops.ops runs everything on the reference path in plain PyTorch.
"""

from __future__ import annotations

import os
import warnings

import torch

from . import checks

EXTENSION = None
LOAD_ERROR: str | None = None

if os.environ.get("XCEPTION_OPS_SKIP_EXT", "0").lower() in ("1", "true", "yes", "on"):
    LOAD_ERROR = "XCEPTION_OPS_SKIP_EXT is set"
else:
    try:
        from . import _C as EXTENSION  # noqa: N811  (importing runs the TORCH_LIBRARY registrations)
    except ImportError as e:
        LOAD_ERROR = f"xception_ops._C could not be imported: {e}"
        warnings.warn(f"{LOAD_ERROR}; every op runs on the reference path (backend 'torch'). Build the extension "
                      "with `pip install --no-build-isolation -e .`", RuntimeWarning, stacklevel=2)

OPS = ("depthwise_conv2d", "depthwise_conv2d_backward_input", "depthwise_conv2d_backward_weight",
       "separable_conv2d", "separable_conv2d_backward", "batch_norm_finalize", "batch_norm_finalize_backward",
       "batch_norm_update_stats", "scale_shift", "scale_shift_backward", "max_pool2d", "max_pool2d_backward",
       "max_pool2d_scale_shift_backward")


def _empty_vector(x: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty((0,), dtype=checks.stats_dtype(x) if like is None else like.dtype)


def _empty_like_fmt(x: torch.Tensor, shape, fmt_of: torch.Tensor) -> torch.Tensor:
    return x.new_empty(shape).contiguous(memory_format=checks.output_memory_format(fmt_of))


# The fake (meta) kernel of each op, by op name; the triton backend's private ops reuse them.
FAKES = {}


def _fake(name: str):
    def register(fn):
        FAKES[name] = fn
        torch.library.register_fake(f"xception_ops::{name}")(fn)
        return fn
    return register


def _register_fakes() -> None:
    op_name = "xception_ops.{}".format

    @_fake("depthwise_conv2d")
    def _(x, weight, bias, stride, padding, dilation, backend):
        g = checks.check_depthwise(op_name("depthwise_conv2d"), x, weight, bias, stride, padding, dilation)
        return _empty_like_fmt(x, g.output_shape(), x)

    @_fake("depthwise_conv2d_backward_input")
    def _(grad_out, weight, input_size, stride, padding, dilation, backend):
        op = op_name("depthwise_conv2d_backward_input")
        g = checks.make_geometry(op, input_size, weight.shape, stride, padding, dilation)
        checks.check_float_tensor(op, "weight", weight)
        checks.check_like(op, "grad_out", grad_out, g.output_shape(), weight)
        return _empty_like_fmt(grad_out, input_size, grad_out)

    @_fake("depthwise_conv2d_backward_weight")
    def _(grad_out, x, weight_size, stride, padding, dilation, backend):
        op = op_name("depthwise_conv2d_backward_weight")
        g = checks.make_geometry(op, x.shape, weight_size, stride, padding, dilation)
        checks.check_float_tensor(op, "x", x)
        checks.check_like(op, "grad_out", grad_out, g.output_shape(), x)
        return x.new_empty(weight_size)

    @_fake("separable_conv2d")
    def _(x, dw_weight, pw_weight, in_scale, in_shift, in_relu, stride, padding, dilation, mid_activation,
          mid_scale, mid_shift, out_scale, out_shift, out_relu, residual, compute_stats, backend):
        g = checks.check_separable(op_name("separable_conv2d"), x, dw_weight, pw_weight, stride, padding,
                                   dilation, in_scale=in_scale, in_shift=in_shift, mid_activation=mid_activation,
                                   mid_scale=mid_scale, mid_shift=mid_shift, out_scale=out_scale,
                                   out_shift=out_shift, residual=residual)
        stats_shape = (g.out_channels,) if compute_stats else (0,)
        dtype = checks.stats_dtype(x)
        return (_empty_like_fmt(x, g.output_shape(), x), x.new_empty(stats_shape, dtype=dtype),
                x.new_empty(stats_shape, dtype=dtype))

    @_fake("separable_conv2d_backward")
    def _(grad_out, grad_sum, grad_sumsq, out, x, dw_weight, pw_weight, in_scale, in_shift, in_relu, stride,
          padding, dilation, mid_activation, mid_scale, mid_shift, out_scale, out_shift, out_relu, backend):
        op = op_name("separable_conv2d_backward")
        g = checks.check_separable(op, x, dw_weight, pw_weight, stride, padding, dilation, in_scale=in_scale,
                                   in_shift=in_shift, mid_activation=mid_activation, mid_scale=mid_scale,
                                   mid_shift=mid_shift, out_scale=out_scale, out_shift=out_shift)
        checks.check_like(op, "grad_out", grad_out, g.output_shape(), x)
        checks.check_channel_vector(op, "grad_sum", grad_sum, g.out_channels, x)
        checks.check_channel_vector(op, "grad_sumsq", grad_sumsq, g.out_channels, x)

        def vector_grad(param):
            return _empty_vector(x) if param is None else param.new_empty(param.shape)

        return (_empty_like_fmt(x, x.shape, x), dw_weight.new_empty(dw_weight.shape),
                pw_weight.new_empty(pw_weight.shape), vector_grad(in_scale), vector_grad(in_shift),
                vector_grad(mid_scale), vector_grad(mid_shift), vector_grad(out_scale), vector_grad(out_shift))


def _cuda_has(op: str) -> bool:
    """Whether the compiled CUDA backend has a kernel for xception_ops.<op>."""
    return EXTENSION is not None and bool(EXTENSION.WITH_CUDA) and f"xception_ops.{op}" in EXTENSION.CUDA_OPS


def _register_finalize_fake() -> None:
    @_fake("batch_norm_finalize")
    def _(total, total_sq, count, weight, bias, eps, backend, *, running_mean=None, running_var=None,
          num_batches_tracked=None, pre_bias=None, momentum=0.0):
        checks.check_batch_norm_finalize("xception_ops.batch_norm_finalize", total, total_sq, count, weight, bias,
                                         eps, running_mean=running_mean, running_var=running_var,
                                         num_batches_tracked=num_batches_tracked, pre_bias=pre_bias,
                                         momentum=momentum)
        return tuple(total.new_empty(total.shape) for _ in range(4))

    @_fake("batch_norm_finalize_backward")
    def _(total, total_sq, count, weight, eps, grad_scale, grad_shift, grad_mean, grad_var, backend):
        checks.check_batch_norm_finalize_backward("xception_ops.batch_norm_finalize_backward", total, total_sq,
                                                  count, weight, eps, grad_scale, grad_shift, grad_mean, grad_var)
        # The parameters' gradients in weight's dtype where it is 16-bit beside float32 sums (csrc/ops.h).
        sixteen = weight is not None and weight.dtype in (torch.bfloat16, torch.float16)
        params = weight.dtype if sixteen and total.dtype == torch.float32 else total.dtype
        return (total.new_empty(total.shape), total.new_empty(total.shape), total.new_empty(total.shape, dtype=params),
                total.new_empty(total.shape, dtype=params))

    @_fake("scale_shift")
    def _(y, scale, shift, relu, backend, *, residual=None):
        checks.check_scale_shift("xception_ops.scale_shift", y, scale, shift, residual=residual)
        return _empty_like_fmt(y, y.shape, y)

    @_fake("scale_shift_backward")
    def _(grad, y, scale, shift, relu, backend):
        checks.check_scale_shift("xception_ops.scale_shift_backward", y, scale, shift, grad)
        return _empty_like_fmt(y, y.shape, y), scale.new_empty(scale.shape), scale.new_empty(scale.shape)

    @_fake("batch_norm_update_stats")
    def _(running_mean, running_var, mean, var, pre_bias, count, momentum, backend):
        checks.check_batch_norm_update_stats("xception_ops.batch_norm_update_stats", running_mean, running_var,
                                             mean, var, pre_bias, count, momentum)


def _register_pool_fakes() -> None:
    @_fake("max_pool2d")
    def _(x, kernel_size, stride, padding, ceil_mode, save_argmax, backend, *, scale=None, shift=None, residual=None):
        op = "xception_ops.max_pool2d"
        shape = checks.check_max_pool2d(op, x, "x", x.shape, kernel_size, stride, padding, ceil_mode)
        checks.check_max_pool2d_extras(op, x, scale, shift, residual, shape)
        out = _empty_like_fmt(x, shape, x)
        argmax = (x.new_empty(shape, dtype=torch.uint8).contiguous(memory_format=checks.output_memory_format(x))
                  if save_argmax else x.new_empty((0,), dtype=torch.uint8))
        return out, argmax

    @_fake("max_pool2d_backward")
    def _(grad_out, argmax, input_size, kernel_size, stride, padding, ceil_mode, backend):
        op = "xception_ops.max_pool2d_backward"
        shape = checks.check_max_pool2d(op, grad_out, "grad_out", input_size, kernel_size, stride, padding, ceil_mode)
        checks.check_pool_gradient(op, grad_out, argmax, shape)
        return _empty_like_fmt(grad_out, input_size, argmax)

    @_fake("max_pool2d_scale_shift_backward")
    def _(grad_out, argmax, x, scale, shift, kernel_size, stride, padding, ceil_mode, backend):
        op = "xception_ops.max_pool2d_scale_shift_backward"
        shape = checks.check_max_pool2d(op, x, "x", x.shape, kernel_size, stride, padding, ceil_mode)
        checks.check_pool_gradient(op, grad_out, argmax, shape)
        checks.check_same_device(op, "grad_out", grad_out, x)
        checks.check_same_dtype(op, "grad_out", grad_out, x)
        checks.check_max_pool2d_extras(op, x, scale, shift, None, shape)
        channels = x.shape[1]
        return _empty_like_fmt(x, x.shape, x), scale.new_empty((channels,)), shift.new_empty((channels,))


TRITON = None  # xception_ops.triton once it loads; TRITON_ERROR says why it did not
TRITON_ERROR: str | None = "the compiled library is not loaded" if EXTENSION is None else None

if EXTENSION is not None:
    _register_fakes()
    _register_finalize_fake()
    _register_pool_fakes()
    try:
        import triton  # noqa: F401  (optional: the triton backend)
    except ImportError as e:
        TRITON_ERROR = f"triton is not installed ({e})"
    else:
        try:
            from . import triton as TRITON  # noqa: N812  (registers the private ops xception_ops::triton_*)
        except Exception as e:  # noqa: BLE001  (an optional backend must not break the package)
            TRITON_ERROR = f"xception_ops.triton failed to load: {type(e).__name__}: {e}"
            warnings.warn(f"{TRITON_ERROR}; backend 'triton' is unavailable", RuntimeWarning, stacklevel=2)
