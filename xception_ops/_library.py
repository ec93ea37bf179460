"""Loads the compiled operators and registers what PyTorch needs around them: fake (meta) kernels for
torch.compile and autograd formulas. The schemas themselves are defined once, in csrc/registration.cpp.

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
       "batch_norm_update_stats", "scale_shift", "scale_shift_backward")


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
        checks.check_like(op, "grad_out", grad_out, g.output_shape(), weight)
        return _empty_like_fmt(grad_out, input_size, grad_out)

    @_fake("depthwise_conv2d_backward_weight")
    def _(grad_out, x, weight_size, stride, padding, dilation, backend):
        op = op_name("depthwise_conv2d_backward_weight")
        g = checks.make_geometry(op, x.shape, weight_size, stride, padding, dilation)
        checks.check_like(op, "grad_out", grad_out, g.output_shape(), x)
        return x.new_empty(weight_size)

    @_fake("separable_conv2d")
    def _(x, dw_weight, pw_weight, in_scale, in_shift, in_relu, stride, padding, dilation, mid_activation,
          out_scale, out_shift, out_relu, residual, compute_stats, backend):
        g = checks.check_separable(op_name("separable_conv2d"), x, dw_weight, pw_weight, stride, padding,
                                   dilation, in_scale=in_scale, in_shift=in_shift, mid_activation=mid_activation,
                                   out_scale=out_scale, out_shift=out_shift, residual=residual)
        stats_shape = (g.out_channels,) if compute_stats else (0,)
        dtype = checks.stats_dtype(x)
        return (_empty_like_fmt(x, g.output_shape(), x), x.new_empty(stats_shape, dtype=dtype),
                x.new_empty(stats_shape, dtype=dtype))

    @_fake("separable_conv2d_backward")
    def _(grad_out, grad_sum, grad_sumsq, out, x, dw_weight, pw_weight, in_scale, in_shift, in_relu, stride,
          padding, dilation, mid_activation, out_scale, out_shift, out_relu, backend):
        op = op_name("separable_conv2d_backward")
        g = checks.check_separable(op, x, dw_weight, pw_weight, stride, padding, dilation, in_scale=in_scale,
                                   in_shift=in_shift, mid_activation=mid_activation, out_scale=out_scale,
                                   out_shift=out_shift)
        checks.check_like(op, "grad_out", grad_out, g.output_shape(), x)

        def vector_grad(param):
            return _empty_vector(x) if param is None else param.new_empty(param.shape)

        return (_empty_like_fmt(x, x.shape, x), dw_weight.new_empty(dw_weight.shape),
                pw_weight.new_empty(pw_weight.shape), vector_grad(in_scale), vector_grad(in_shift),
                vector_grad(out_scale), vector_grad(out_shift))


def _cuda_has(op: str) -> bool:
    """Whether the compiled CUDA backend has a kernel for xception_ops.<op>."""
    return EXTENSION is not None and bool(EXTENSION.WITH_CUDA) and f"xception_ops.{op}" in EXTENSION.CUDA_OPS


def _backward_backend(backend: str, op: str) -> str:
    """The backend of a backward op, given its forward's: a build whose CUDA backend has the forward kernel but not
    the backward's computes the gradients on the reference path."""
    return "torch" if backend == "cuda" and not _cuda_has(op) else backend


def _register_finalize_fake() -> None:
    @_fake("batch_norm_finalize")
    def _(total, total_sq, count, weight, bias, eps, backend):
        checks.check_batch_norm_finalize("xception_ops.batch_norm_finalize", total, total_sq, count, weight, bias,
                                         eps)
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
    def _(y, scale, shift, relu, backend):
        checks.check_scale_shift("xception_ops.scale_shift", y, scale, shift)
        return _empty_like_fmt(y, y.shape, y)

    @_fake("scale_shift_backward")
    def _(grad, y, scale, shift, relu, backend):
        checks.check_scale_shift("xception_ops.scale_shift_backward", y, scale, shift, grad)
        return _empty_like_fmt(y, y.shape, y), scale.new_empty(scale.shape), scale.new_empty(scale.shape)

    @_fake("batch_norm_update_stats")
    def _(running_mean, running_var, mean, var, pre_bias, count, momentum, backend):
        checks.check_batch_norm_update_stats("xception_ops.batch_norm_update_stats", running_mean, running_var,
                                             mean, var, pre_bias, count, momentum)


def finalize_backward(total, total_sq, count, weight, eps, grad_scale, grad_shift, grad_mean, grad_var):
    """Gradients of batch_norm_finalize's (scale, shift, mean, var) with respect to (sum, sumsq, weight, bias), as
    differentiable PyTorch ops (a graph of the backward, for double backward); the op
    xception_ops.batch_norm_finalize_backward computes the same in one kernel on "cuda".

    With m = sum / n, v = max(sumsq / n - m^2, 0), r = (v + eps)^-1/2, scale = w r, shift = b - m w r:
    dL/dr = (g_scale - g_shift m) w;  dL/dv = (g_var - dL/dr r^3 / 2) [v >= 0 before the clamp];
    dL/dm = g_mean - g_shift w r - 2 m dL/dv;  dL/dsum = dL/dm / n;  dL/dsumsq = dL/dv / n;
    dL/dw = (g_scale - g_shift m) r;  dL/db = g_shift. Missing output gradients count as zeros.
    """
    n = float(count)
    zero = torch.zeros_like(total)
    g_scale, g_shift, g_mean, g_var = (zero if g is None else g for g in (grad_scale, grad_shift, grad_mean, grad_var))
    w = torch.ones_like(total) if weight is None else weight.to(total.dtype)
    m = total / n
    raw_var = total_sq / n - m * m
    r = torch.rsqrt(raw_var.clamp_min(0) + eps)
    g_r = (g_scale - g_shift * m) * w
    g_v = (g_var - 0.5 * g_r * r * r * r) * (raw_var >= 0).to(total.dtype)
    g_m = g_mean - g_shift * w * r - 2 * m * g_v
    g_w = (g_scale - g_shift * m) * r
    return g_m / n, g_v / n, g_w, g_shift


def _passes_every_argument(arguments) -> bool:
    """Whether the dispatcher hands a kernel every argument of a schema, positionally: none is keyword-only or has
    a default (which the dispatcher leaves out of a call when it equals the default)."""
    return not any(a.kwarg_only or a.has_default_value() for a in arguments)


_AUTOGRAD_LIB: torch.library.Library | None = None  # holds the Autograd kernels registered by register_autograd
# The torch internals register_autograd builds on (those of torch/_library/autograd.py), checked once: private
# names, so a torch release without one of them gets torch.library.register_autograd instead of an import error.
_LIGHT_AUTOGRAD = all(hasattr(torch._C, n) for n in ("_after_autograd_keyset", "_AutoDispatchBelowAutograd",
                                                      "_any_requires_grad", "is_grad_enabled")) and hasattr(
    getattr(getattr(torch, "_library", None), "utils", None), "is_functional_schema")


def register_autograd(name: str, backward, setup_context, materialize_grads: bool = True) -> None:
    """torch.library.register_autograd(f"xception_ops::{name}", backward, setup_context=setup_context), less its
    per-call cost: the same mechanism (an autograd.Function run by a kernel at the Autograd dispatch key, which
    redispatches below autograd), so torch.compile, opcheck and double backward see no difference.

    materialize_grads=False hands `backward` None for the outputs nothing used, instead of tensors of zeros that
    autograd would allocate and fill (two launches per BatchNorm and step for batch_norm_finalize's mean and var).
    `backward` must take either: torch's own registration (the fallback below) materializes them.

    torch's generic kernel (torch/_library/autograd.py) calls `utils.fill_defaults` on every forward, which reads
    `schema.arguments` (a fresh list of every argument, built in C++) once per argument: ~55 us per call for the
    16 arguments of separable_conv2d on the CPU, more than its three CUDA launches. Our schemas have no
    keyword-only arguments and no defaults, so the dispatcher always hands over every argument and nothing needs
    filling in.
    """
    global _AUTOGRAD_LIB
    if not _LIGHT_AUTOGRAD:  # a torch without the internals used below: its own (slower) registration
        torch.library.register_autograd(f"xception_ops::{name}", backward, setup_context=setup_context)
        return
    op = getattr(torch.ops.xception_ops, name).default
    schema = op._schema
    arguments = schema.arguments
    if not (_passes_every_argument(arguments) and torch._library.utils.is_functional_schema(schema)):
        raise AssertionError(f"register_autograd: {schema} needs torch.library.register_autograd")
    num_args = len(arguments)
    below_autograd = torch._C._after_autograd_keyset

    def forward(ctx, *args):
        keyset = args[-1]
        args = args[:-1]
        if not materialize_grads:
            ctx.set_materialize_grads(False)
        with torch._C._AutoDispatchBelowAutograd():
            result = op.redispatch(keyset & below_autograd, *args)
        setup_context(ctx, args, result)
        return result

    def backward_(ctx, *grads):
        needs_input_grad = ctx.needs_input_grad
        ctx.needs_input_grad = needs_input_grad[:-1]  # less the keyset's entry
        try:
            result = backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = needs_input_grad
        if len(result) != num_args:
            raise RuntimeError(f"the backward formula of {op} returned {len(result)} gradients, expected {num_args}")
        return (*result, None)

    generated = type(f"GeneratedBackwardFor_xception_ops_{name}_default", (torch.autograd.Function,),
                     {"forward": staticmethod(forward), "backward": staticmethod(backward_)})
    apply = generated.apply
    is_grad_enabled, any_requires_grad = torch._C.is_grad_enabled, torch._C._any_requires_grad

    def autograd_kernel(keyset, *args):
        if is_grad_enabled() and any_requires_grad(*args):
            return apply(*args, keyset)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & below_autograd, *args)

    if _AUTOGRAD_LIB is None:
        _AUTOGRAD_LIB = torch.library.Library("xception_ops", "FRAGMENT")
    _AUTOGRAD_LIB.impl(name, autograd_kernel, "Autograd", with_keyset=True)


def _register_autograd() -> None:
    ops = torch.ops.xception_ops

    def finalize_setup(ctx, inputs, output):
        total, total_sq, count, weight, bias, eps, backend = inputs
        ctx.save_for_backward(total, total_sq, weight)
        ctx.count, ctx.eps, ctx.backend = count, eps, backend
        ctx.has_bias = bias is not None
        ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)

    def finalize_grads(ctx, grad_scale, grad_shift, grad_mean, grad_var):
        total, total_sq, weight = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the backward itself must be differentiable
            g_sum, g_sumsq, g_w, g_b = finalize_backward(total, total_sq, ctx.count, weight, ctx.eps, grad_scale,
                                                         grad_shift, grad_mean, grad_var)
        else:  # one op (one kernel on "cuda"), instead of ~15 element-wise launches
            g_sum, g_sumsq, g_w, g_b = ops.batch_norm_finalize_backward(
                total, total_sq, ctx.count, weight, ctx.eps, grad_scale, grad_shift, grad_mean, grad_var,
                _backward_backend(ctx.backend, "batch_norm_finalize_backward"))
        w_dtype, b_dtype = ctx.param_dtypes
        if weight is not None and g_w.dtype != w_dtype:  # (a same-dtype .to is still a dispatched aten::to)
            g_w = g_w.to(w_dtype)
        if ctx.has_bias and g_b.dtype != b_dtype:
            g_b = g_b.to(b_dtype)
        return g_sum, g_sumsq, None, None if weight is None else g_w, g_b if ctx.has_bias else None, None, None

    # The mean and variance go to the running statistics alone: their gradients are None, not zeros.
    register_autograd("batch_norm_finalize", finalize_grads, finalize_setup, materialize_grads=False)

    def scale_shift_setup(ctx, inputs, output):
        y, scale, shift, relu, backend = inputs
        ctx.save_for_backward(y, scale, shift)
        ctx.relu, ctx.backend = relu, backend

    def scale_shift_grads(ctx, grad):
        y, scale, shift = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the same formulas as differentiable PyTorch ops
            z = y.to(scale.dtype) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
            g = grad.to(scale.dtype)
            if ctx.relu:
                g = torch.where(z.to(y.dtype) > 0, g, torch.zeros((), dtype=g.dtype, device=g.device))
            grad_y = (g * scale.view(1, -1, 1, 1)).to(y.dtype)
            grad_scale, grad_shift = (g * y.to(scale.dtype)).sum((0, 2, 3)), g.sum((0, 2, 3))
        else:
            grad_y, grad_scale, grad_shift = ops.scale_shift_backward(
                grad, y, scale, shift, ctx.relu, _backward_backend(ctx.backend, "scale_shift_backward"))
        return grad_y, grad_scale, grad_shift, None, None

    register_autograd("scale_shift", scale_shift_grads, scale_shift_setup)

    def depthwise_setup(ctx, inputs, output):
        x, weight, bias, stride, padding, dilation, backend = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.args = (list(stride), list(padding), list(dilation), backend)

    def depthwise_backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, backend = ctx.args
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = ops.depthwise_conv2d_backward_input(grad_out, weight, list(x.shape), stride, padding,
                                                         dilation, backend)
        if ctx.needs_input_grad[1]:
            grad_w = ops.depthwise_conv2d_backward_weight(grad_out, x, list(weight.shape), stride, padding,
                                                          dilation, backend)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None

    register_autograd("depthwise_conv2d", depthwise_backward, depthwise_setup)

    def separable_setup(ctx, inputs, output):
        (x, dw_weight, pw_weight, in_scale, in_shift, in_relu, stride, padding, dilation, mid_activation,
         out_scale, out_shift, out_relu, residual, compute_stats, backend) = inputs
        out = output[0]
        # The output goes to the backward for its ReLU mask, and when the forward had no epilogue at all, since it
        # is then y itself, which a backend can use instead of recomputing it (training: the next layer saves
        # it anyway).
        plain = out_scale is None and out_shift is None and residual is None and not out_relu
        ctx.save_for_backward(x, dw_weight, pw_weight, in_scale, in_shift, out_scale, out_shift,
                              out if out_relu or plain else None)
        ctx.args = (in_relu, list(stride), list(padding), list(dilation), mid_activation, out_relu, backend)
        ctx.has_residual = residual is not None
        ctx.compute_stats = compute_stats

    def separable_backward(ctx, grad_out, grad_sum, grad_sumsq):
        x, dw_weight, pw_weight, in_scale, in_shift, out_scale, out_shift, out = ctx.saved_tensors
        in_relu, stride, padding, dilation, mid_activation, out_relu, backend = ctx.args
        if not ctx.compute_stats:  # autograd hands in zero grads for the empty statistics outputs
            grad_sum = grad_sumsq = None
        backend = _backward_backend(backend, "separable_conv2d_backward")
        grads = ops.separable_conv2d_backward(grad_out, grad_sum, grad_sumsq, out, x, dw_weight, pw_weight,
                                              in_scale, in_shift, in_relu, stride, padding, dilation,
                                              mid_activation, out_scale, out_shift, out_relu, backend)
        grad_x, grad_dw, grad_pw, grad_in_scale, grad_in_shift, grad_out_scale, grad_out_shift = grads
        grad_residual = None
        if ctx.has_residual and ctx.needs_input_grad[13]:
            grad_residual = grad_out.masked_fill(out <= 0, 0) if out_relu else grad_out
        return (grad_x, grad_dw, grad_pw, grad_in_scale if in_scale is not None else None,
                grad_in_shift if in_shift is not None else None, None, None, None, None, None,
                grad_out_scale if out_scale is not None else None,
                grad_out_shift if out_shift is not None else None, None, grad_residual, None, None)

    register_autograd("separable_conv2d", separable_backward, separable_setup)


TRITON = None  # xception_ops.triton once it loads; TRITON_ERROR says why it did not
TRITON_ERROR: str | None = "the compiled library is not loaded" if EXTENSION is None else None

if EXTENSION is not None:
    _register_fakes()
    _register_finalize_fake()
    _register_autograd()
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
