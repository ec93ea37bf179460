"""The ops in plain PyTorch, differentiable by autograd.

Two uses: the test oracle (run in float64), and the path every op takes when the compiled library is absent
(`XCEPTION_OPS_SKIP_EXT=1`). Arguments are already normalized: padding is (top, bottom, left, right).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .batchnorm import batch_stats
from .checks import output_memory_format, stats_dtype


def _per_channel(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return v.to(dtype).view(1, -1, 1, 1)


def channel_affine(x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None) -> torch.Tensor:
    """x * scale + shift per channel, computed in float32 (float64 for float64) and returned in x's dtype."""
    if scale is None and shift is None:
        return x
    dtype = stats_dtype(x)
    r = x.to(dtype)
    if scale is not None:
        r = r * _per_channel(scale, dtype)
    if shift is not None:
        r = r + _per_channel(shift, dtype)
    return r.to(x.dtype)


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    top, bottom, left, right = padding
    if top == bottom and left == right:
        y = F.conv2d(x, weight, bias, tuple(stride), (top, left), tuple(dilation), groups=x.shape[1])
    else:
        y = F.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, tuple(stride), 0, tuple(dilation),
                     groups=x.shape[1])
    return y.contiguous(memory_format=output_memory_format(x))


def mid_activation_fn(name: str | None, d: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return F.relu(d)
    if name == "relu6":
        return F.relu6(d)
    if name == "elu":
        return F.elu(d)
    if name == "hardswish":
        return F.hardswish(d)
    return d


def separable_conv2d(x: torch.Tensor, dw_weight: torch.Tensor, pw_weight: torch.Tensor,
                     in_scale: torch.Tensor | None, in_shift: torch.Tensor | None, in_relu: bool,
                     stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], mid_activation: str,
                     mid_scale: torch.Tensor | None, mid_shift: torch.Tensor | None, out_scale: torch.Tensor | None,
                     out_shift: torch.Tensor | None, out_relu: bool, residual: torch.Tensor | None,
                     compute_stats: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """out = relu?(pointwise(act(d * mid_scale + mid_shift)) * out_scale + out_shift + residual), with
    d = depthwise(relu?(x * in_scale + in_shift)) (each affine rounded to x's dtype).

    Also returns the per-channel sum and sum of squares of the pointwise result (before out_scale), in float32
    (float64 for float64 inputs), when compute_stats; empty tensors otherwise.
    """
    a = channel_affine(x, in_scale, in_shift)
    if in_relu:
        a = F.relu(a)
    d = depthwise_conv2d(a, dw_weight, None, stride, padding, dilation)
    y = F.conv2d(mid_activation_fn(mid_activation, channel_affine(d, mid_scale, mid_shift)), pw_weight)
    z = channel_affine(y, out_scale, out_shift)
    if residual is not None:
        z = z + residual
    if out_relu:
        z = F.relu(z)
    if compute_stats:
        total, total_sq, _ = batch_stats(y)
    else:
        total = total_sq = x.new_empty((0,), dtype=stats_dtype(x))
    return z.contiguous(memory_format=output_memory_format(x)), total, total_sq


def finalize_backward(total, total_sq, count, weight, eps, grad_scale, grad_shift, grad_mean, grad_var):
    """Gradients of batch_norm_finalize's (scale, shift, mean, var) with respect to (sum, sumsq, weight, bias), as
    differentiable PyTorch ops: the oracle of the op xception_ops.batch_norm_finalize_backward (one kernel on
    "cuda") and of the op's double backward (csrc/autograd.cpp writes the same formulas in ATen).

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
