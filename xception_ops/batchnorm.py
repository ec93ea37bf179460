"""BatchNorm in two phases, as the fused ops use it.

Inference: the BatchNorm folds into a per-channel scale and shift that the producing op applies in its epilogue.
Training: the producing op returns per-channel float32 sums of y and y^2; `scale_shift_from_stats` turns them into
batch mean and variance, updates the running statistics exactly as nn.BatchNorm2d does, and returns the scale
and shift that the consumer applies (`apply_scale_shift`, or a later op's prologue).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _library, backend as backends, checks
from .checks import stats_dtype


def uses_batch_stats(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    """nn.BatchNorm2d's rule: batch statistics in training, and always without running statistics."""
    return bn.training or bn.running_mean is None


def _scale_shift(bn, mean: torch.Tensor, invstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = invstd if bn.weight is None else bn.weight.to(invstd.dtype) * invstd
    if bn.bias is None:
        return scale, -mean * scale
    return scale, bn.bias.to(invstd.dtype) - mean * scale  # (the same bits as -mean * scale + bias, one op fewer)


def folded_scale_shift(bn: nn.modules.batchnorm._BatchNorm, pre_bias: torch.Tensor | None = None,
                       dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference BatchNorm as out = y * scale + shift, with an optional bias added to y before the BatchNorm. In
    float32, or float64 for statistics kept in float64 (a model in float64 folded in float32 was ~1e-7 off)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("folded_scale_shift: bn has no running statistics (track_running_stats=False): it normalizes "
                         "with the batch statistics in eval mode too, so it has no fixed scale and shift to fold "
                         "(uses_batch_stats(bn) is True)")
    if dtype is None:
        dtype = torch.float64 if bn.running_mean.dtype == torch.float64 else torch.float32
    mean = bn.running_mean.to(dtype)
    if pre_bias is not None:
        mean = mean - pre_bias.to(dtype)
    return _scale_shift(bn, mean, torch.rsqrt(bn.running_var.to(dtype) + bn.eps))


def _momentum(bn) -> float:
    """The running-average factor for this step, advancing num_batches_tracked as nn.BatchNorm2d does."""
    if not (bn.training and bn.track_running_stats):
        return 0.0
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            return 1.0 / float(bn.num_batches_tracked)
    return bn.momentum if bn.momentum is not None else 0.0


def _updates_in_finalize(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    """Whether the finalize op does the training step's bookkeeping itself (its keyword-only arguments): the
    compiled library, eager mode (under torch.compile the update stays an op of its own, as it was traced before),
    and nn.BatchNorm2d's usual state: running statistics, a batch counter, a fixed momentum (a cumulative average,
    momentum None, needs the count on the host first)."""
    return (_library.EXTENSION is not None and bn.training and bn.track_running_stats
            and bn.running_mean is not None and bn.num_batches_tracked is not None and bn.momentum is not None
            and not torch.compiler.is_compiling())


def synchronizes(module: nn.Module) -> bool:
    """Whether `module` all-reduces its batch statistics now: asked to, and more than one process in its group."""
    if not getattr(module, "sync_stats", False):
        return False
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(module.process_group) > 1


def all_reduce_stats(total: torch.Tensor, total_sq: torch.Tensor, count: int,
                     group=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sums the per-channel statistics (2 x C values and the count) over a process group, differentiably:
    synchronized BatchNorm is this one all-reduce before the finalize step."""
    from torch.distributed.nn.functional import all_reduce
    channels = total.shape[0]
    packed = torch.cat([total, total_sq, total.new_tensor([float(count)])])
    packed = all_reduce(packed, group=group) if group is not None else all_reduce(packed)
    return packed[:channels], packed[channels:2 * channels], int(round(packed[-1].item()))


def finalize(total: torch.Tensor, total_sq: torch.Tensor, count: int, weight: torch.Tensor | None,
             bias: torch.Tensor | None, eps: float, backend: str = "auto"
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, shift, batch mean, biased batch variance) from the per-channel sums of y and y^2 over `count`
    values: the op xception_ops.batch_norm_finalize (one kernel on the "cuda" backend), differentiable. The
    "triton" backend has no kernel for it (C-element vectors): it runs on the reference path."""
    op = "xception_ops.batch_norm_finalize"
    if _library.EXTENSION is None:
        checks.check_batch_norm_finalize(op, total, total_sq, count, weight, bias, eps)
        _vector_backend(backend, op, total)  # (a backend that cannot run is refused as the op would refuse it)
        mean = total / count
        var = (total_sq / count - mean * mean).clamp_min(0)
        scale = torch.rsqrt(var + eps)
        if weight is not None:
            scale = weight.to(scale.dtype) * scale
        shift = -mean * scale if bias is None else bias.to(scale.dtype) - mean * scale
        return scale, shift, mean, var
    return torch.ops.xception_ops.batch_norm_finalize(total, total_sq, count, weight, bias, eps,
                                                      _vector_backend(backend, op, total))


def _vector_backend(backend: str, op: str, like: torch.Tensor) -> str:
    """The backend of the per-channel BatchNorm ops. "auto" (with XCEPTION_OPS_BACKEND unset or "auto") takes the
    CUDA kernel on CUDA tensors whenever the compiled library has one: on C-element vectors one launch always beats
    the reference path's 6-15 element-wise launches (and their CPU time), so no table or auto list decides. The
    "triton" backend has no kernels for C-element vectors: the reference path runs them there. Any other explicit
    backend, or XCEPTION_OPS_BACKEND, as requested."""
    wanted = backends.requested(backend)
    if wanted == "auto":
        return "cuda" if like.is_cuda and _library._cuda_has(op.removeprefix("xception_ops.")) else "torch"
    return "torch" if wanted == "triton" else backends.resolve(wanted, op, like)


def update_running_stats(bn: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor, count: int,
                         momentum: float, pre_bias: torch.Tensor | None = None, backend: str = "auto") -> None:
    """bn's running statistics after a training step, in place, from the batch mean and (biased) variance over
    `count` values: the running variance takes the unbiased estimate, and the mean moves with a bias the fused op
    left out of y. The op xception_ops.batch_norm_update_stats: one kernel on the "cuda" backend, instead of the
    six element-wise launches this took in Python."""
    if _library.EXTENSION is not None:  # (its Autograd kernel records nothing: no detach or no_grad needed)
        op = "xception_ops.batch_norm_update_stats"
        torch.ops.xception_ops.batch_norm_update_stats(bn.running_mean, bn.running_var, mean, var, pre_bias, count,
                                                       float(momentum), _vector_backend(backend, op, mean))
        return
    checks.check_batch_norm_update_stats("xception_ops.batch_norm_update_stats", bn.running_mean, bn.running_var,
                                         mean, var, pre_bias, count, float(momentum))
    with torch.no_grad():
        if pre_bias is not None:
            mean = mean + pre_bias.to(mean.dtype)
        unbiased = var * (count / (count - 1))
        bn.running_mean.copy_(bn.running_mean.to(mean.dtype) * (1 - momentum) + mean * momentum)
        bn.running_var.copy_(bn.running_var.to(var.dtype) * (1 - momentum) + unbiased * momentum)


def scale_shift_from_stats(bn: nn.modules.batchnorm._BatchNorm, total: torch.Tensor, total_sq: torch.Tensor,
                           count: int, pre_bias: torch.Tensor | None = None,
                           sync_group=None, sync: bool = False, backend: str = "auto"
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Training BatchNorm from the sums of y and y^2 over `count` values per channel; the returned scale and
    shift apply to y itself (a bias added before the BatchNorm cancels in the normalization).

    The batch variance is biased, as in the normalization; the running variance gets the unbiased estimate.
    Differentiable with respect to the sums, the BatchNorm's affine parameters and pre_bias. With sync=True the
    sums are first all-reduced over `sync_group` (default: every process), which makes it SyncBatchNorm.
    `backend` runs the finalize step (`finalize`).
    """
    if bn.training and bn.track_running_stats and bn.momentum is not None and not 0 <= bn.momentum <= 1:
        # (nn.BatchNorm2d would use it; the update here would skip a non-positive one: refused, not mismatched)
        raise ValueError(f"bn.momentum must be in [0, 1] (or None: a cumulative average), got {bn.momentum}")
    if sync:
        total, total_sq, count = all_reduce_stats(total, total_sq, count, sync_group)
    if count <= 1 and bn.training:
        raise ValueError(f"Expected more than 1 value per channel when training, got {count}")
    if _updates_in_finalize(bn):
        # One op (one kernel on "cuda") for the statistics, the running statistics' update and the batch count.
        op = "xception_ops.batch_norm_finalize"
        update = dict(running_mean=bn.running_mean, running_var=bn.running_var,
                      pre_bias=pre_bias, momentum=float(bn.momentum)) if bn.momentum > 0 else {}
        scale, shift, _, _ = torch.ops.xception_ops.batch_norm_finalize(
            total, total_sq, count, bn.weight, bn.bias, bn.eps, _vector_backend(backend, op, total),
            num_batches_tracked=bn.num_batches_tracked, **update)
    else:
        scale, shift, mean, var = finalize(total, total_sq, count, bn.weight, bn.bias, bn.eps, backend)
        factor = _momentum(bn)
        if bn.running_mean is not None and factor > 0:
            update_running_stats(bn, mean, var, count, factor, pre_bias, backend)
    if pre_bias is not None:
        # The bias cancels in the normalization. It still gets an exactly zero gradient, as in the unfused layers,
        # rather than none (which DistributedDataParallel would take for an unused parameter).
        shift = shift + pre_bias.to(shift.dtype) * 0
    return scale, shift


_UNIT_VAR_EPS = 2.0 ** -20  # apply_scale_shift: positive, and 1 - eps + eps == 1 exactly


def _elementwise_backend(op: str, y: torch.Tensor) -> str:
    """The CUDA kernel of xception_ops.<op> on CUDA tensors where the library has one, else the reference."""
    return "cuda" if y.is_cuda and _library._cuda_has(op) else "torch"


def apply_scale_shift(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                      residual: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
    """relu?(y * scale + shift + residual), per channel: y * scale + shift computed in float32 and rounded to y's
    dtype, then the residual added in that dtype, as PyTorch's unfused BatchNorm and add do (and the fused
    epilogue of the "cuda" backend).

    One pass over y each way: the op xception_ops.scale_shift (the residual and the ReLU folded in; on
    "cuda" the separable backward's element-wise kernels: 4 channels per access, the gradient sums in a fixed
    order). PyTorch's eval BatchNorm backward, which it replaces, ran a broadcast element-wise kernel at ~0.5 TB/s
    (0.70 ms at 64->128 @147^2 on the H100, session 4). Without the compiled library: PyTorch's inference BatchNorm
    kernel with mean 0 and var + eps exactly 1 (torch 2.11 rejects eps = 0, so eps is 2^-20 and var 1 - 2^-20:
    both exact, and so is their sum, in float32 and float64).
    """
    dtype = stats_dtype(y)
    if _library.EXTENSION is not None:  # (the op checks its arguments: csrc/checks.cpp)
        backend = _elementwise_backend("scale_shift", y)
        # (.to only where the dtype differs: a same-dtype .to is still a dispatched aten::to, ~1 us of CPU each)
        scale = scale if scale.dtype == dtype else scale.to(dtype)
        shift = shift if shift.dtype == dtype else shift.to(dtype)
        return torch.ops.xception_ops.scale_shift(y, scale, shift, relu, backend, residual=residual)
    checks.check_scale_shift("xception_ops.scale_shift", y, scale, shift, residual=residual)
    channels = y.shape[1]
    mean = torch.zeros(channels, dtype=dtype, device=y.device)
    var = torch.full((channels,), 1.0 - _UNIT_VAR_EPS, dtype=dtype, device=y.device)
    z = F.batch_norm(y, mean, var, scale.to(dtype), shift.to(dtype), training=False, momentum=0.0,
                     eps=_UNIT_VAR_EPS)
    if residual is not None:
        z = z + residual
    return torch.relu(z) if relu else z


class _ChannelMoments(torch.autograd.Function):
    """Per-channel sum and sum of squares of y in float32 (float64 for float64), keeping only y for the backward.

    With the compiled library, one pass over y each way: the sums are scale_shift_backward's parameter gradients
    for grad = y and scale = 1 (sum of g y and sum of g; its grad_y, y again, is the price), and the backward,
    sum_grad + 2 y sumsq_grad per channel, is scale_shift(y, 2 sumsq_grad, sum_grad). In PyTorch ops they were four
    passes forward (a float32 copy, its square, two sums) and five back, each a launch and each a float32 tensor
    of y's size in 16-bit training."""

    @staticmethod
    def forward(ctx, y):
        ctx.save_for_backward(y)
        dtype = stats_dtype(y)
        if _library.EXTENSION is not None and y.dim() == 4:
            backend = _elementwise_backend("scale_shift_backward", y)
            ones = torch.ones(y.shape[1], dtype=dtype, device=y.device)  # (the shift is unused without a ReLU)
            _, total_sq, total = torch.ops.xception_ops.scale_shift_backward(y, y, ones, ones, False, backend)
            return total, total_sq
        yf = y.to(dtype)
        return yf.sum((0, 2, 3)), (yf * yf).sum((0, 2, 3))

    @staticmethod
    def backward(ctx, grad_sum, grad_sumsq):
        (y,) = ctx.saved_tensors
        dtype = stats_dtype(y)
        zeros = torch.zeros((y.shape[1],), dtype=dtype, device=y.device)
        shift = zeros if grad_sum is None else grad_sum.to(dtype)
        scale = zeros if grad_sumsq is None else 2 * grad_sumsq.to(dtype)
        return apply_scale_shift(y, scale, shift)


def _check_4d(op: str, y: torch.Tensor) -> None:
    # (the statistics are over dims 0, 2 and 3: any other rank would fail with an IndexError, or sum the wrong dims)
    if y.dim() != 4:
        raise ValueError(f"{op}: y must be a 4-D tensor (N, C, H, W), got shape {list(y.shape)}")


def channel_moments(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """batch_stats, differentiable, saving only y: the statistics of a tensor the caller does not keep otherwise
    (the depthwise result of SeparableConvBN's mid BatchNorm in training)."""
    _check_4d("channel_moments", y)
    total, total_sq = _ChannelMoments.apply(y)
    return total, total_sq, y.shape[0] * y.shape[2] * y.shape[3]


def batch_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel sum and sum of squares of y in float32 (float64 for float64), and the count per channel."""
    _check_4d("batch_stats", y)
    yf = y.to(stats_dtype(y))
    return yf.sum((0, 2, 3)), (yf * yf).sum((0, 2, 3)), y.shape[0] * y.shape[2] * y.shape[3]


class SyncBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose batch statistics are all-reduced across a process group (2 x C sums and a count), on
    any device and any distributed backend (gloo on CPU too, which torch's SyncBatchNorm does not support).
    Same parameters and state_dict as nn.BatchNorm2d; outside a multi-process run it is nn.BatchNorm2d."""

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sync_stats, self.process_group = True, process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (uses_batch_stats(self) and synchronizes(self)):
            return super().forward(x)
        total, total_sq, count = batch_stats(x)
        scale, shift = scale_shift_from_stats(self, total, total_sq, count, sync_group=self.process_group, sync=True)
        return apply_scale_shift(x, scale, shift)


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Synchronized batch statistics everywhere in `model`, in place: every nn.BatchNorm2d becomes a
    SyncBatchNorm2d (same parameters and buffers), and the fused modules all-reduce their statistics."""
    for name, child in list(model.named_children()):
        if hasattr(child, "sync_stats"):  # SeparableConvBN (its own bn is used through the fused statistics)
            child.sync_stats, child.process_group = True, process_group
        elif type(child) is nn.BatchNorm2d:
            # The same parameter and buffer objects (an optimizer made before keeps updating them, frozen ones stay
            # frozen, every dtype stays), as torch's nn.SyncBatchNorm.convert_sync_batchnorm keeps them.
            sync = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats, process_group=process_group, device="meta")
            for slot in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_forward_pre_hooks",
                         "_forward_hooks", "_backward_pre_hooks", "_backward_hooks", "_state_dict_hooks",
                         "_load_state_dict_pre_hooks"):
                if slot in child.__dict__:
                    sync.__dict__[slot] = child.__dict__[slot]
            sync.train(child.training)
            setattr(model, name, sync)
            continue
        convert_sync_batchnorm(child, process_group)
    return model
