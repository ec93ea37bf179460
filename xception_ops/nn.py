"""Modules to drop into a model: a Keras-style SeparableConv2d, and SeparableConvBN with the BatchNorm and the
activations fused in.

Both keep their weights in ordinary nn.Conv2d / nn.BatchNorm2d children named `depthwise`, `pointwise` and `bn`,
so their state_dict is that of the layers they replace; the children's own forward is never called.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import backend as backends, batchnorm, checks, ops, reference
from .checks import MID_ACTIVATIONS, one_of
from .geometry import PaddingSpec, pair, resolve_padding


class PendingBatchNorm(NamedTuple):
    """A training-mode BatchNorm's output, not yet computed: the pre-BatchNorm y and the per-channel scale and
    shift that make it y * scale + shift. A SeparableConvBN given one applies them in its prologue as it reads y,
    so the normalized tensor is never written (the two phases of a training BatchNorm: the producer's epilogue
    collects the statistics, the consumer's prologue applies them)."""
    y: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor

    def apply(self) -> torch.Tensor:
        """The BatchNorm's output itself."""
        return batchnorm.apply_scale_shift(self.y, self.scale, self.shift)

    def __add__(self, other):
        """The BatchNorm's output plus `other`. A tensor of y's shape, dtype and device (a residual) is added in one
        pass: scale_shift with its residual, rounded as PyTorch's BatchNorm and add. fuse() defers a chain's
        BatchNorm to an add after it (MobileNet's inverted residuals: `x + self.conv(x)`), which then lands here.
        Anything else (a broadcast, a scalar, another PendingBatchNorm) is added to the applied output."""
        if isinstance(other, PendingBatchNorm):
            other = other.apply()
        if (isinstance(other, torch.Tensor) and other.shape == self.y.shape and other.dtype == self.y.dtype
                and other.device == self.y.device):
            return batchnorm.apply_scale_shift(self.y, self.scale, self.shift, residual=other)
        return self.apply() + other

    def __radd__(self, other):
        return self.__add__(other)  # (the same sum: IEEE addition commutes)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """A torch function given a PendingBatchNorm (`torch.add(x, p)`, `x + p` through Tensor.__add__,
        `torch.cat`, ...) gets the applied output; an add of two operands without `alpha` or `out` takes __add__."""
        kwargs = kwargs or {}
        if func in _TENSOR_ADDS and len(args) == 2 and not kwargs:
            a, b = args
            return a.__add__(b) if isinstance(a, PendingBatchNorm) else b.__radd__(a)
        return func(*_applied(args), **_applied(kwargs))


def _applied(value):
    """`value` with every PendingBatchNorm in it (in lists, tuples and dicts) replaced by its output."""
    if isinstance(value, PendingBatchNorm):
        return value.apply()
    if isinstance(value, (list, tuple)):
        return type(value)(_applied(v) for v in value)
    if isinstance(value, dict):
        return {k: _applied(v) for k, v in value.items()}
    return value


_TENSOR_ADDS = (torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__)


def is_same_padding_conv(m: nn.Module) -> bool:
    """timm's Conv2dSame: an nn.Conv2d whose forward pads as TensorFlow's "same" (from the input's size, the odd row
    at the end) and then convolves without padding: the op's padding="same" exactly."""
    return (isinstance(m, nn.Conv2d) and type(m).__name__ == "Conv2dSame"
            and type(m).__module__.startswith("timm."))


def hooks_problem(m: nn.Module) -> str | None:
    """Why the op cannot stand in for `m` because of hooks on it: the op never calls its forward, so forward and
    backward hooks would not run, and those that change the weights (torch.nn.utils.spectral_norm, weight_norm and
    prune register forward pre-hooks) would leave the op reading stale ones. (torch.nn.utils.parametrize, which
    parametrizations.spectral_norm / weight_norm use, computes the weight as it is read: fine.)"""
    if m._forward_pre_hooks or m._forward_hooks or m._backward_pre_hooks or m._backward_hooks:
        return (f"has hooks (a {type(m).__name__} with forward or backward hooks, e.g. torch.nn.utils.spectral_norm "
                "or prune): the fused op would not run them; use torch.nn.utils.parametrizations instead")
    return None


def _conv_problem(m: nn.Module) -> str | None:
    """Why `m` is not a convolution the op can stand in for: the op reads its parameters and never calls its
    forward, so a subclass's own forward (weight standardization, its own padding) would be silently dropped."""
    if not isinstance(m, nn.Conv2d) or m.transposed:
        return f"must be an nn.Conv2d, got {type(m).__name__}"
    if (hooks := hooks_problem(m)) is not None:
        return hooks
    if type(m).forward is not nn.Conv2d.forward and not is_same_padding_conv(m):
        return (f"is a {type(m).__name__}, whose forward is not nn.Conv2d's: the fused op would not run what it "
                "adds")
    if m.padding_mode != "zeros":
        return f"has padding_mode={m.padding_mode!r}; the fused op pads with zeros only"
    return None


def depthwise_problem(m: nn.Module) -> str | None:
    """Why `m` cannot be the depthwise stage of a SeparableConvBN (which reads its weight, bias, stride and
    dilation, pads with zeros and never calls its forward), or None when it can. fuse() takes the layers it can."""
    problem = _conv_problem(m)
    if problem is not None:
        return problem
    if m.groups != m.in_channels or m.out_channels % m.in_channels != 0:
        return (f"must be a depthwise convolution (groups == in_channels, out_channels a multiple of them), got "
                f"in_channels={m.in_channels}, out_channels={m.out_channels}, groups={m.groups}")
    return None


def pointwise_problem(m: nn.Module, channels: int) -> str | None:
    """Why `m` cannot be the pointwise stage after a depthwise stage of `channels` channels, or None when it can.
    (Its dilation does not matter: a 1x1 kernel spans one pixel at any dilation; nor does timm's "same" padding,
    which is none for a 1x1 kernel at stride 1.)"""
    problem = _conv_problem(m)
    if problem is not None:
        return problem
    if m.kernel_size != (1, 1) or m.stride != (1, 1) or m.groups != 1 or m.padding not in ((0, 0), "valid"):
        return (f"must be a 1x1 convolution with stride 1, padding 0 and groups 1, got kernel_size={m.kernel_size}, "
                f"stride={m.stride}, padding={m.padding!r}, groups={m.groups}")
    if m.in_channels != channels:
        return f"has {m.in_channels} input channels but the depthwise stage gives {channels}"
    return None


def is_batch_norm_act(m: nn.Module) -> bool:
    """timm's BatchNormAct2d: a BatchNorm2d subclass whose forward is BatchNorm2d's, then `drop`, then `act` (timm's
    MobileNet, EfficientNet and MNASNet blocks), taken where its `drop` is an identity. fuse() moves a non-identity
    `act` into the chain (the mid activation, or the ReLU after the BatchNorm) and sets it to nn.Identity."""
    return (isinstance(m, nn.BatchNorm2d) and type(m).__name__ == "BatchNormAct2d"
            and type(m).__module__.startswith("timm.") and type(getattr(m, "drop", None)) is nn.Identity
            and isinstance(getattr(m, "act", None), nn.Module))


def synchronizing_batch_norm(m: nn.Module) -> bool:
    """Whether a BatchNorm all-reduces its batch statistics across processes in training: torch's nn.SyncBatchNorm
    or this package's SyncBatchNorm2d. A SeparableConvBN built on one does the same (its sync_stats)."""
    return isinstance(m, nn.SyncBatchNorm) or bool(getattr(m, "sync_stats", False))


# The forwards that are BatchNorm's own (the op computes what they compute from the module's parameters and state).
_BATCH_NORM_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward,
                        batchnorm.SyncBatchNorm2d.forward)


def batch_norm_problem(m: nn.Module, channels: int, stage: str) -> str | None:
    """Why `m` cannot be the BatchNorm after the `stage` stage of `channels` channels, or None when it can: a 2-D
    BatchNorm whose forward is BatchNorm's (the op applies it from the module's parameters and statistics and never
    calls its forward, so a subclass's own forward would be silently dropped), or timm's BatchNormAct2d with an
    identity `act` (fuse() takes the activation out first)."""
    if not isinstance(m, nn.modules.batchnorm._BatchNorm):
        return f"must be an nn.BatchNorm2d or None, got {type(m).__name__}"
    if not isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        return f"must be a BatchNorm of 4-D inputs (nn.BatchNorm2d, nn.SyncBatchNorm), got {type(m).__name__}"
    if (hooks := hooks_problem(m)) is not None:
        return hooks
    if is_batch_norm_act(m):
        if type(m.act) is not nn.Identity:
            return (f"is timm's BatchNormAct2d with act={type(m.act).__name__}, which the fused op would not run "
                    "(pass it as the layer's activation and set the module's act to nn.Identity, as fuse() does)")
    elif type(m).forward not in _BATCH_NORM_FORWARDS:
        return (f"is a {type(m).__name__}, whose forward is not nn.BatchNorm2d's: the fused op would not run what "
                "it adds")
    if m.num_features != channels:
        return f"has {m.num_features} features but the {stage} stage gives {channels} channels"
    return None


def batch_norms_problem(bn: nn.Module | None, mid_bn: nn.Module | None) -> str | None:
    """Why a layer's two BatchNorms cannot share its one setting of synchronized statistics, or None: both must
    all-reduce their statistics over the same process group, or neither."""
    if bn is None or mid_bn is None:
        return None
    if synchronizing_batch_norm(bn) != synchronizing_batch_norm(mid_bn):
        return ("bn and mid_bn must both synchronize their statistics (nn.SyncBatchNorm, SyncBatchNorm2d) or "
                f"neither, got {type(mid_bn).__name__} and {type(bn).__name__}")
    if synchronizing_batch_norm(bn) and bn.process_group is not mid_bn.process_group:
        return "bn and mid_bn synchronize over different process groups"
    return None


def layers_problem(depthwise: nn.Module, pointwise: nn.Module, bn: nn.Module | None,
                   mid_bn: nn.Module | None = None) -> str | None:
    """What SeparableConvBN cannot take among these layers, as "<argument> <what is wrong>", or None."""
    problem = depthwise_problem(depthwise)
    if problem is not None:
        return f"depthwise {problem}"
    problem = pointwise_problem(pointwise, depthwise.out_channels)
    if problem is not None:
        return f"pointwise {problem}"
    for name, m, channels, stage in (("mid_bn", mid_bn, depthwise.out_channels, "depthwise"),
                                     ("bn", bn, pointwise.out_channels, "pointwise")):
        problem = None if m is None else batch_norm_problem(m, channels, stage)
        if problem is not None:
            return f"{name} {problem}"
    return batch_norms_problem(bn, mid_bn)


class SeparableConvBN(nn.Module):
    """relu?(x) → depthwise k×k (+bias) → BatchNorm? → act? → pointwise 1×1 (+bias) → BatchNorm? → (+residual) →
    relu?, in one op.

    Args:
        in_channels, out_channels: channels in and out.
        kernel_size, stride, dilation: of the depthwise stage (an int or a pair).
        padding: "same" (TensorFlow's: output = ceil(input / stride), asymmetric at stride 2 when needed),
            "valid", an int, a pair, or (top, bottom, left, right).
        depth_multiplier: depthwise output channels per input channel.
        bias: a bias on the pointwise stage.
        batch_norm: a BatchNorm2d after the pointwise stage (eps and momentum in PyTorch's convention).
        pre_relu: ReLU on the input, applied as it is read.
        mid_activation: None, "relu", "relu6", "hardswish" or "elu" between the depthwise and pointwise stages
            (paper section 4.7; MobileNet V2's ReLU6, V3's hardswish).
        post_relu: ReLU on the output (after the residual add, when forward is given one).
        backend: "auto", "torch", "cuda" or "triton" (see xception_ops.backend).
        mid_batch_norm: a BatchNorm2d (child `mid_bn`) on the depthwise result, before mid_activation: MobileNet's
            dw → BN → ReLU → pw. The op applies it as a per-channel affine on the depthwise result (mid_scale,
            mid_shift): folded in inference; in training from the batch statistics of the depthwise result, which
            one extra depthwise pass (our depthwise op) collects, so the normalized tensor is never written.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int] = 3,
                 stride: int | tuple[int, int] = 1, padding: PaddingSpec = "same",
                 dilation: int | tuple[int, int] = 1, depth_multiplier: int = 1, bias: bool = False,
                 batch_norm: bool = True, pre_relu: bool = False, mid_activation: str | None = None,
                 post_relu: bool = False, eps: float = 1e-5, momentum: float | None = 0.1, backend: str = "auto",
                 device=None, dtype=None, *, mid_batch_norm: bool = False):
        super().__init__()
        if depth_multiplier < 1:
            raise ValueError(f"depth_multiplier must be >= 1, got {depth_multiplier}")
        factory = {"device": device, "dtype": dtype}
        depthwise = nn.Conv2d(in_channels, in_channels * depth_multiplier, kernel_size, stride, 0, dilation,
                              groups=in_channels, bias=False, **factory)
        pointwise = nn.Conv2d(in_channels * depth_multiplier, out_channels, 1, bias=bias, **factory)
        bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, **factory) if batch_norm else None
        mid_bn = (nn.BatchNorm2d(in_channels * depth_multiplier, eps=eps, momentum=momentum, **factory)
                  if mid_batch_norm else None)
        self._setup(depthwise, pointwise, bn, padding, pre_relu, mid_activation, post_relu, backend, mid_bn)

    def _setup(self, depthwise: nn.Conv2d, pointwise: nn.Conv2d, bn: nn.BatchNorm2d | None, padding: PaddingSpec,
               pre_relu: bool, mid_activation: str | None, post_relu: bool, backend: str,
               mid_bn: nn.BatchNorm2d | None = None) -> None:
        if mid_activation not in (None, *MID_ACTIVATIONS):
            raise ValueError(f"mid_activation must be None, {one_of(MID_ACTIVATIONS[1:])}, got {mid_activation!r}")
        # Layers the fused op cannot represent are refused here: it would run without what they add (a reflect
        # padding, a strided pointwise conv) and give a silently different answer.
        problem = layers_problem(depthwise, pointwise, bn, mid_bn)
        if problem is not None:
            raise ValueError(f"{type(self).__name__}: {problem}")
        resolve_padding(padding, (1, 1), (1, 1), (1, 1), (1, 1))  # its form only (a misspelt one fails here)
        self.depthwise = depthwise
        self.mid_bn = mid_bn
        self.pointwise = pointwise
        self.bn = bn
        self.padding = padding
        self.pre_relu = pre_relu
        self.mid_activation = None if mid_activation == "none" else mid_activation
        self.post_relu = post_relu
        self.backend = backends.checked_name(backend)  # (a misspelt one fails here, not at the first call)
        # Synchronized statistics (see batchnorm.convert_sync_batchnorm) as the BatchNorms taken synchronize theirs:
        # the op uses their parameters, not their forward, which would have all-reduced.
        synced = next((m for m in (bn, mid_bn) if m is not None and synchronizing_batch_norm(m)), None)
        self.sync_stats, self.process_group = synced is not None, getattr(synced, "process_group", None)
        # forward's defer_bn when the caller does not say: fuse() sets it where this layer's output feeds the next
        # fused layer alone (through layers it turned into nn.Identity).
        self.defer_bn = False

    @classmethod
    def from_modules(cls, depthwise: nn.Conv2d, pointwise: nn.Conv2d, bn: nn.BatchNorm2d | None = None, *,
                     padding: PaddingSpec | None = None, pre_relu: bool = False, mid_activation: str | None = None,
                     post_relu: bool = False, backend: str = "auto",
                     mid_bn: nn.BatchNorm2d | None = None) -> SeparableConvBN:
        """Wraps existing layers (sharing their parameters); padding defaults to the depthwise layer's own. mid_bn:
        a BatchNorm2d between the depthwise layer and the mid activation."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        if padding is None and is_same_padding_conv(depthwise):
            padding = "same"
        elif padding is None and isinstance(depthwise, nn.Conv2d):  # (_setup names what else depthwise may be)
            padding = depthwise.padding if isinstance(depthwise.padding, str) else tuple(depthwise.padding)
        module._setup(depthwise, pointwise, bn, padding, pre_relu, mid_activation, post_relu, backend, mid_bn)
        return module

    def _bias_at_mid(self) -> bool:
        """Whether the depthwise bias joins the mid affine: where something non-linear (a mid activation) or a mid
        BatchNorm follows it. Otherwise it is carried through the linear pointwise stage into the epilogue."""
        return self.depthwise.bias is not None and (
            self.mid_activation is not None or getattr(self, "mid_bn", None) is not None)

    def extra_repr(self) -> str:
        flags = [f"padding={self.padding!r}"]
        flags += [name for name in ("pre_relu", "post_relu") if getattr(self, name)]
        if self.mid_activation:
            flags.append(f"mid_activation={self.mid_activation!r}")
        if self.backend != "auto":
            flags.append(f"backend={self.backend!r}")
        if self.frozen:
            flags.append("frozen")
        return ", ".join(flags)

    _CACHE_SLOTS = ("_epilogue_cache", "_mid_cache", "_conv_args_cache")
    frozen = False  # (xception_ops.nn.freeze; a class default, so modules pickled before it have it)

    def clear_cache(self) -> None:
        """Forgets the folded BatchNorm a frozen layer keeps for eager inference (xception_ops.nn.freeze)."""
        for slot in self._CACHE_SLOTS:
            self.__dict__.pop(slot, None)

    def __getstate__(self):
        state = super().__getstate__()  # (the caches hold weak references, which do not pickle)
        return {k: v for k, v in state.items() if k not in self._CACHE_SLOTS}

    def _cached(self, slot: str, sources: list[torch.Tensor], bn: nn.BatchNorm2d | None, compute):
        """compute(); in a frozen layer (xception_ops.nn.freeze), reused in eager inference while none of the
        tensors it comes from has changed as their version counters, storage and identities tell (which saves its
        handful of small kernels per layer and call); computed afresh when autograd may need its graph and under
        torch.compile. Not by default: a write through `.data` (an EMA update, a weight loader) or a
        torch.distributed collective leaves the version counter as it was, and the layer would compute with the
        old values."""
        cacheable = self.frozen and not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and any(t.requires_grad for t in sources))
        # (A tensor's data replaced through .data, as some weight-loading code does, keeps its version: its storage
        # pointer tells. A result computed under inference_mode cannot be saved for backward: not reused outside.)
        versions = ((tuple((t._version, t.data_ptr()) for t in sources), bn.eps if bn is not None else None,
                     torch.is_inference_mode_enabled()) if cacheable else None)
        cached = self.__dict__.get(slot)
        if (cacheable and cached is not None and cached[1] == versions and len(cached[0]) == len(sources)
                and all(ref() is t for ref, t in zip(cached[0], sources))):  # the same tensor objects, unchanged
            return cached[2]
        result = compute()
        self.__dict__[slot] = (tuple(weakref.ref(t) for t in sources), versions, result) if cacheable else None
        return result

    @staticmethod
    def _bn_sources(bn: nn.BatchNorm2d | None) -> list[torch.Tensor]:
        if bn is None:
            return []
        return [t for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var) if t is not None]

    def _folded_epilogue(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The inference epilogue (scale, shift): the BatchNorm folded, the biases carried into the shift."""
        bn = self.bn
        carried = self.depthwise.bias is not None and not self._bias_at_mid()
        sources = [t for t in (self.pointwise.bias, self.depthwise.bias if carried else None) if t is not None]
        if carried:
            sources.append(self.pointwise.weight)
        sources += self._bn_sources(bn)

        def compute():
            pre_bias = self._dw_bias_as_pre_bias()
            return (None, pre_bias) if bn is None else batchnorm.folded_scale_shift(bn, pre_bias)

        return self._cached("_epilogue_cache", sources, bn, compute)

    def _folded_mid(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The inference mid affine (mid_scale, mid_shift): the mid BatchNorm folded, with the depthwise bias (that
        bias alone without a mid BatchNorm; (None, None) without either)."""
        mid_bn, bias = getattr(self, "mid_bn", None), self.depthwise.bias if self._bias_at_mid() else None
        if mid_bn is None:
            return None, bias
        sources = ([bias] if bias is not None else []) + self._bn_sources(mid_bn)
        return self._cached("_mid_cache", sources, mid_bn, lambda: batchnorm.folded_scale_shift(mid_bn, bias))

    def _dw_bias_as_pre_bias(self) -> torch.Tensor | None:
        """The pointwise bias, plus a depthwise bias carried through the (linear) pointwise stage (unless it joins
        the mid affine)."""
        bias = self.pointwise.bias
        if self.depthwise.bias is not None and not self._bias_at_mid():
            carried = self.pointwise.weight.flatten(1) @ self.depthwise.bias
            bias = carried if bias is None else bias + carried
        return bias

    def forward(self, x: torch.Tensor | PendingBatchNorm, residual: torch.Tensor | None = None,
                defer_bn: bool | None = None) -> torch.Tensor | PendingBatchNorm:
        """x may be a PendingBatchNorm from the layer before, applied here as x is read. With defer_bn, a layer on
        the fused op with a BatchNorm and no residual or ReLU after it returns its output as a PendingBatchNorm for
        the next SeparableConvBN; otherwise the output itself. Without defer_bn, the module's own `defer_bn` attribute
        decides (False unless fuse() set it). In training that is the batch statistics' scale and
        shift; in inference the folded BatchNorm's, which the next layer's prologue applies with the same rounding
        as this layer's epilogue would (bit for bit), so the normalized tensor is never written: with the cuda
        backend's staged forward on cuBLAS that saves a pass over the output."""
        dw, pw, bn = self.depthwise, self.pointwise, self.bn
        if defer_bn is None:
            defer_bn = getattr(self, "defer_bn", False)  # (modules pickled before the attribute existed)
        pending = x if isinstance(x, PendingBatchNorm) else None
        if pending is not None:
            x = pending.y
        mid_bn = getattr(self, "mid_bn", None)
        batch_stats = bn is not None and batchnorm.uses_batch_stats(bn)
        mid_batch_stats = mid_bn is not None and batchnorm.uses_batch_stats(mid_bn)
        backend = backends.fused_backend(self.backend, "xception_ops.separable_conv2d", x, pw.out_channels,
                                         mid_batch_stats=mid_batch_stats)
        if backend is None:
            if not ((batch_stats or mid_batch_stats) and batchnorm.synchronizes(self)):
                return self._forward_unfused(x if pending is None else pending.apply(), residual)
            backend = "torch"  # synchronized statistics come from the operator's per-channel sums
        stride, padding, dilation = self._conv_args(x)
        in_scale, in_shift = (None, None) if pending is None else (pending.scale, pending.shift)
        mid = self.mid_activation
        if mid_batch_stats:
            mid_scale, mid_shift = self._mid_batch_affine(x, pending, stride, padding, dilation, backend)
        else:
            mid_scale, mid_shift = self._folded_mid()

        def separable(out_scale, out_shift, out_relu, residual, compute_stats):
            return ops.separable_conv2d_normalized(x, dw.weight, pw.weight, stride, padding, dilation, backend,
                                                   in_scale, in_shift, self.pre_relu, mid, out_scale, out_shift,
                                                   out_relu, residual, compute_stats, mid_scale, mid_shift)

        if not batch_stats:
            scale, shift = self._folded_epilogue()
            if defer_bn and bn is not None and residual is None and not self.post_relu:
                return PendingBatchNorm(separable(None, None, False, None, False), scale, shift)
            return separable(scale, shift, self.post_relu, residual, False)
        pre_bias = self._dw_bias_as_pre_bias()
        y, total, total_sq = separable(None, None, False, None, True)
        count = y.shape[0] * y.shape[2] * y.shape[3]
        scale, shift = batchnorm.scale_shift_from_stats(bn, total, total_sq, count, pre_bias, self.process_group,
                                                        sync=batchnorm.synchronizes(self), backend=backend)
        if defer_bn and residual is None and not self.post_relu:
            return PendingBatchNorm(y, scale, shift)
        if residual is not None:  # (under autocast, in y's dtype, as the op takes it in inference)
            residual = ops.autocast_inputs(residual)[0]
        return batchnorm.apply_scale_shift(y, scale, shift, residual, relu=self.post_relu)

    def _mid_batch_affine(self, x: torch.Tensor, pending: PendingBatchNorm | None, stride: list[int],
                          padding: list[int], dilation: list[int], backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Training's mid BatchNorm as (mid_scale, mid_shift) on the depthwise result: its batch statistics from one
        depthwise pass of their own (the fused op needs them before it starts), the running statistics updated as
        nn.BatchNorm2d does. Differentiable: the gradients of the statistics flow back through that pass."""
        if pending is not None:  # (the pending BatchNorm and the ReLU in one pass)
            a = batchnorm.apply_scale_shift(pending.y, pending.scale, pending.shift, relu=self.pre_relu)
        else:
            a = F.relu(x) if self.pre_relu else x
        dw, mid_bn = self.depthwise, self.mid_bn
        # (the depthwise op autocasts as the fused op does, so d has the dtype the fused op computes in)
        d = ops.depthwise_conv2d(a, dw.weight, None, tuple(stride), tuple(padding), tuple(dilation), backend=backend)
        total, total_sq, count = batchnorm.channel_moments(d)
        bias = dw.bias if self._bias_at_mid() else None
        return batchnorm.scale_shift_from_stats(mid_bn, total, total_sq, count, bias, self.process_group,
                                                sync=batchnorm.synchronizes(self), backend=backend)

    def _conv_args(self, x: torch.Tensor) -> tuple[list[int], list[int], list[int]]:
        """Stride, padding (top, bottom, left, right) and dilation as the op takes them, for x's size: worked out
        once per input size and module settings in eager mode (resolving "same" padding took ~6 us per call)."""
        dw = self.depthwise
        if x.dim() != 4 or torch.compiler.is_compiling():
            return ops.conv_args(x, dw.weight, dw.stride, self.padding, dw.dilation)
        key = (x.shape[2], x.shape[3], self.padding, dw.stride, dw.dilation, dw.kernel_size)
        cached = self.__dict__.get("_conv_args_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        args = ops.conv_args(x, dw.weight, dw.stride, self.padding, dw.dilation)
        self.__dict__["_conv_args_cache"] = (key, args)
        return args

    def _forward_unfused(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The same computation as separate PyTorch layers (cuDNN on a GPU), for where no fused kernel runs."""
        dw, pw = self.depthwise, self.pointwise
        x, dw_weight, pw_weight, residual = ops.autocast_inputs(x, dw.weight, pw.weight, residual)
        stride, padding, dilation = ops.conv_args(x, dw_weight, dw.stride, self.padding, dw.dilation)
        checks.check_separable("xception_ops.nn.SeparableConvBN", x, dw_weight, pw_weight, stride, padding,
                               dilation, residual=residual)
        d = reference.depthwise_conv2d(F.relu(x) if self.pre_relu else x, dw_weight, dw.bias, stride, padding,
                                       dilation)
        if getattr(self, "mid_bn", None) is not None:
            d = self.mid_bn(d)
        y = F.conv2d(reference.mid_activation_fn(self.mid_activation, d), pw_weight, pw.bias)
        if self.bn is not None:
            y = self.bn(y)
        if residual is not None:
            y = y + residual
        return F.relu(y) if self.post_relu else y


class SeparableConv2d(SeparableConvBN):
    """Keras SeparableConv2D in PyTorch: depthwise k×k then pointwise 1×1 with one bias, fused.

    Same arguments as Keras (`strides` is `stride`, `dilation_rate` is `dilation`, `use_bias` is `bias`);
    padding "valid" (the default) or "same" with TensorFlow's asymmetric split at stride 2. `activation` is
    None or "relu". The state_dict holds `depthwise.weight`, `pointwise.weight` and `pointwise.bias`: those of
    the nn.Conv2d pair it replaces.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: PaddingSpec = "valid",
                 dilation: int | tuple[int, int] = 1, depth_multiplier: int = 1, bias: bool = True,
                 activation: str | None = None, backend: str = "auto", device=None, dtype=None):
        if activation not in (None, "relu"):
            raise ValueError(f"activation must be None or 'relu', got {activation!r}")
        pair(kernel_size, "kernel_size")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, depth_multiplier,
                         bias=bias, batch_norm=False, post_relu=activation == "relu", backend=backend,
                         device=device, dtype=dtype)


def freeze(model: nn.Module, frozen: bool = True) -> nn.Module:
    """For deployment: every SeparableConvBN in `model` keeps its folded BatchNorm across eager inference calls
    (a handful of small kernels fewer per layer and call, which bounds eager inference on a fast GPU) until one of
    its parameters or statistics changes as autograd's version counters see it: in-place ops, optimizer steps,
    load_state_dict, .to(). Writes through `.data` (some EMA and weight-loading code) and torch.distributed
    collectives into them are not seen: after those, call clear_caches(model), or freeze(model, False) to fold on
    every call again (the default). Training and torch.compile are unaffected. Returns the model."""
    for m in model.modules():
        if isinstance(m, SeparableConvBN):
            m.frozen = frozen
            m.clear_cache()
    return model


def clear_caches(model: nn.Module) -> nn.Module:
    """Forgets the folded BatchNorms that frozen SeparableConvBN layers in `model` keep (freeze): after writes to
    their parameters or statistics through `.data` or torch.distributed collectives. Returns the model."""
    for m in model.modules():
        if isinstance(m, SeparableConvBN):
            m.clear_cache()
    return model
