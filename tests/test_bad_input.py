"""Bad input gets a clear Python error naming the argument at fault: never a crash deep inside, and never a silently
different answer. Backend "triton" runs in Triton's interpreter without a GPU (conftest.py)."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import xception_ops
from xception_ops import _library, batchnorm, pooling
from xception_ops.fuse import fuse
from xception_ops.geometry import pair, resolve_padding
from xception_ops.nn import SeparableConv2d, SeparableConvBN

from .conftest import relative_error

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    _library.TRITON is None, reason=f"the triton backend did not load: {_library.TRITON_ERROR}"))]


def _x_w():
    return torch.randn(2, 4, 7, 7), torch.randn(4, 1, 3, 3)


def _dw(**kwargs):
    return nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False, **kwargs)


# A. SeparableConvBN.from_modules refuses the layers the fused op cannot represent.

@pytest.mark.parametrize("depthwise,pointwise,bn,match", [
    (_dw(padding_mode="reflect"), nn.Conv2d(4, 6, 1), None, "depthwise has padding_mode='reflect'"),
    (nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Conv2d(4, 6, 1), None, "depthwise must be a depthwise conv"),
    (nn.Linear(4, 4), nn.Conv2d(4, 6, 1), None, "depthwise must be an nn.Conv2d"),
    (_dw(), nn.Conv2d(4, 6, 1, stride=2), None, r"pointwise must be a 1x1 .* stride=\(2, 2\)"),
    (_dw(), nn.Conv2d(4, 6, 1, padding=1), None, r"pointwise must be a 1x1 .* padding=\(1, 1\)"),
    (_dw(), nn.Conv2d(4, 6, 3, padding=1), None, r"pointwise must be a 1x1 .* kernel_size=\(3, 3\)"),
    (_dw(), nn.Conv2d(4, 6, 1, groups=2), None, "pointwise must be a 1x1 .* groups=2"),
    (_dw(), nn.Conv2d(5, 6, 1), None, "pointwise has 5 input channels but the depthwise stage gives 4"),
    (_dw(), nn.Conv2d(4, 6, 1), nn.BatchNorm2d(5), "bn has 5 features but the pointwise stage gives 6"),
    (_dw(), nn.Conv2d(4, 6, 1), nn.ReLU(), "bn must be an nn.BatchNorm2d or None, got ReLU"),
])
def test_from_modules_refuses_layers_it_cannot_represent(depthwise, pointwise, bn, match):
    with pytest.raises(ValueError, match=f"SeparableConvBN: {match}"):
        SeparableConvBN.from_modules(depthwise, pointwise, bn)


def test_from_modules_refuses_a_mismatched_pointwise_after_a_depthwise_bias():
    with pytest.raises(ValueError, match="pointwise has 5 input channels"):
        SeparableConvBN.from_modules(nn.Conv2d(4, 4, 3, groups=4, bias=True), nn.Conv2d(5, 6, 1),
                                     mid_activation="relu")


def test_from_modules_refuses_a_mismatched_mid_bn():
    with pytest.raises(ValueError, match="mid_bn has 3 features but the depthwise stage gives 4"):
        SeparableConvBN.from_modules(_dw(), nn.Conv2d(4, 6, 1), mid_bn=nn.BatchNorm2d(3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_modules_still_takes_what_it_represents(backend):
    """A dilated 1x1 pointwise conv (a 1x1 kernel spans one pixel at any dilation) and PyTorch's "same" padding."""
    dw, pw, bn = nn.Conv2d(4, 8, 3, padding="same", groups=4), nn.Conv2d(8, 6, 1, dilation=2), nn.BatchNorm2d(6)
    fused = SeparableConvBN.from_modules(dw, pw, bn, backend=backend).eval()
    bn.eval()
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        assert relative_error(fused(x), bn(pw(dw(x)))) <= 1e-5


def test_fuse_leaves_unrepresentable_chains_alone():
    model = nn.Sequential(_dw(padding_mode="reflect"), nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6),
                          _dw(), nn.Conv2d(4, 6, 1, stride=2)).eval()
    fused = fuse(nn.Sequential(*model[:3], nn.ReLU(), nn.Conv2d(6, 4, 1), *model[3:]))
    assert not any(isinstance(m, SeparableConvBN) for m in fused.modules())


# B. Geometry arguments: ints (numpy's too), nothing else.

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,value", [
    ("stride", 1.0), ("stride", True), ("stride", None), ("stride", "1"), ("stride", torch.tensor(1)),
    ("stride", (1, 1, 1)), ("stride", (1.0, 1)), ("dilation", 2.0), ("dilation", (2, False)),
    ("padding", None), ("padding", 1.0), ("padding", True), ("padding", (1, 1, 1)), ("padding", -1),
])
def test_depthwise_geometry_must_be_ints(backend, name, value):
    x, w = _x_w()
    with pytest.raises(ValueError, match=f"{name} must be"):
        xception_ops.depthwise_conv2d(x, w, **{name: value}, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_separable_geometry_must_be_ints(backend):
    x, w = _x_w()
    with pytest.raises(ValueError, match="stride must be an int or a pair of ints, got 2.0"):
        xception_ops.separable_conv2d(x, w, torch.randn(6, 4, 1, 1), stride=2.0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs,weight_shape,match", [
    ({"stride": 0}, (4, 1, 3, 3), r"stride must be >= 1, got \[0, 0\]"),
    ({"stride": (1, 0)}, (4, 1, 3, 3), r"stride must be >= 1, got \[1, 0\]"),
    ({"dilation": (0, 1)}, (4, 1, 3, 3), r"dilation must be >= 1"),
    ({}, (4, 3, 3), r"dw_weight must have shape \(C \* depth_multiplier, 1, kH, kW\), got \[4, 3, 3\]"),
    ({}, (4, 9), r"dw_weight must have shape .* got \[4, 9\]"),
])
def test_same_padding_with_a_bad_geometry_names_it(backend, kwargs, weight_shape, match):
    """"same" is worked out from the stride, dilation and kernel: where those are wrong the op's own checks name
    them (not a ZeroDivisionError or an IndexError from the padding arithmetic)."""
    x = torch.randn(2, 4, 8, 8)
    w = torch.randn(weight_shape)
    with pytest.raises(ValueError, match=match):
        xception_ops.depthwise_conv2d(x, w, padding="same", backend=backend, **kwargs)
    with pytest.raises(ValueError, match=match):
        xception_ops.separable_conv2d(x, w, torch.randn(6, 4, 1, 1), padding="same", backend=backend, **kwargs)
    if len(weight_shape) == 4:
        with pytest.raises(ValueError, match=match):
            SeparableConvBN(4, 6, 3, padding="same", backend=backend, **kwargs)(x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_ints_are_ints(backend):
    x, w = _x_w()
    expected = F.conv2d(x, w, stride=2, padding=1, dilation=2, groups=4)
    out = xception_ops.depthwise_conv2d(x, w, stride=np.int64(2), padding=(np.int32(1), 1),
                                        dilation=[np.int16(2), 2], backend=backend)
    assert relative_error(out, expected) <= 1e-5


def test_geometry_helpers_give_python_ints():
    assert pair(np.int64(3), "kernel_size") == (3, 3) and type(pair(np.int64(3), "kernel_size")[0]) is int
    assert resolve_padding(np.int64(1), (5, 5), (3, 3), (1, 1), (1, 1)) == (1, 1, 1, 1)
    assert resolve_padding([1, 2, 3, 4], (5, 5), (3, 3), (1, 1), (1, 1)) == (1, 2, 3, 4)


def test_geometry_takes_sizes_under_torch_compile():
    """A stride or padding worked out from x's (symbolic) size is an int to the checks."""
    def f(x, w):
        return xception_ops.depthwise_conv2d(x, w, stride=x.shape[2] // 7, padding=(x.shape[3] // 7, 1),
                                             backend="torch")

    x, w = _x_w()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    for size in (7, 14):
        x = torch.randn(2, 4, size, size)
        assert relative_error(compiled(x, w), f(x, w)) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel_size", [3.0, None, True, (3, 3, 3)])
def test_max_pool2d_kernel_size_must_be_ints(backend, kernel_size):
    with pytest.raises(ValueError, match="kernel_size must be an int or a pair of ints"):
        pooling.max_pool2d(torch.randn(2, 4, 8, 8), kernel_size, backend=backend)


def test_max_pool2d_module_checks_its_geometry_when_built():
    with pytest.raises(ValueError, match="kernel_size must be an int or a pair of ints"):
        pooling.MaxPool2d(3.0)
    with pytest.raises(ValueError, match="stride must be an int or a pair of ints"):
        pooling.MaxPool2d(3, stride=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,value,error", [
    ("x", [[1.0]], "x must be a tensor, got list"), ("weight", None, "weight must be a tensor, got NoneType"),
    ("bias", [0.0] * 4, "bias must be a tensor or None, got list"),
])
def test_depthwise_tensor_arguments_must_be_tensors(backend, name, value, error):
    x, w = _x_w()
    args = dict(x=x, weight=w, bias=None)
    args[name] = value
    with pytest.raises(TypeError, match=f"xception_ops.depthwise_conv2d: {error}"):
        xception_ops.depthwise_conv2d(**args, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_separable_tensor_arguments_must_be_tensors(backend):
    x, w = _x_w()
    with pytest.raises(TypeError, match="xception_ops.separable_conv2d: pw_weight must be a tensor, got NoneType"):
        xception_ops.separable_conv2d(x, w, None, backend=backend)
    with pytest.raises(TypeError, match="xception_ops.separable_conv2d: x must be a tensor, got list"):
        xception_ops.separable_conv2d(x.tolist(), w, torch.randn(6, 4, 1, 1), backend=backend)
    for name in ("in_scale", "in_shift", "mid_scale", "mid_shift", "out_scale", "out_shift"):
        with pytest.raises(TypeError, match=f"separable_conv2d: {name} must be a tensor or None, got list"):
            xception_ops.separable_conv2d(x, w, torch.randn(6, 4, 1, 1), backend=backend, **{name: [1.0] * 4})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["x", "scale", "shift", "residual"])
def test_max_pool2d_tensor_arguments_must_be_tensors(backend, name):
    args = dict(x=torch.randn(2, 4, 8, 8), scale=torch.rand(4), shift=torch.randn(4), residual=None)
    args[name] = [1.0] * 4
    kind = "a tensor" if name == "x" else "a tensor or None"
    with pytest.raises(TypeError, match=f"xception_ops.max_pool2d: {name} must be {kind}, got list"):
        pooling.max_pool2d(args.pop("x"), 2, backend=backend, **args)


# C. max_pool2d takes the same inputs on every backend.

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("extras", [{}, {"scale": torch.rand(8), "shift": torch.randn(8)}])
def test_max_pool2d_wants_4d_x_on_every_backend(backend, extras):
    with pytest.raises(ValueError, match=r"xception_ops.max_pool2d: x must be a 4-D tensor .* \[4, 8, 8\]"):
        pooling.max_pool2d(torch.randn(4, 8, 8), 2, backend=backend, **extras)


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_pool2d_wants_float_x_on_every_backend(backend):
    with pytest.raises(TypeError, match="xception_ops.max_pool2d: x has dtype"):
        pooling.max_pool2d(torch.randint(0, 5, (2, 3, 8, 8), dtype=torch.int32), 2, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_pool2d_refuses_zero_channels_on_every_backend(backend):
    with pytest.raises(ValueError, match="xception_ops.max_pool2d: x has 0 channels"):
        pooling.max_pool2d(torch.randn(2, 0, 8, 8), 2, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_pool2d_checks_scale_against_the_channels(backend):
    with pytest.raises(ValueError, match=r"scale must have shape \[4\]"):
        pooling.max_pool2d(torch.randn(2, 4, 8, 8), 2, backend=backend, scale=torch.rand(8), shift=torch.randn(8))


def test_max_pool2d_on_torch_refuses_a_residual_that_would_broadcast():
    with pytest.raises(ValueError, match=r"residual must have shape \[2, 4, 4, 4\]"):
        pooling.max_pool2d(torch.randn(2, 4, 8, 8), 2, backend="torch", residual=torch.randn(4, 1, 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_pool2d_module_runs_pytorch_for_what_the_op_does_not_take(backend):
    """nn.MaxPool2d's own inputs (3-D, integer) still pool, as PyTorch's."""
    pool = pooling.MaxPool2d(2, backend=backend)
    x3 = torch.randn(4, 8, 8)
    assert torch.equal(pool(x3), F.max_pool2d(x3, 2))
    xi = torch.randint(0, 9, (2, 3, 8, 8), dtype=torch.int32)
    assert torch.equal(pool(xi), F.max_pool2d(xi, 2))


# D. BatchNorm helpers.

@pytest.mark.parametrize("fn", [batchnorm.batch_stats, batchnorm.channel_moments])
def test_statistics_want_4d_y(fn):
    with pytest.raises(ValueError, match=r"y must be a 4-D tensor \(N, C, H, W\), got shape \[4, 5, 5\]"):
        fn(torch.randn(4, 5, 5))


def test_a_batch_norm_without_running_stats_does_not_fold():
    with pytest.raises(ValueError, match="bn has no running statistics"):
        batchnorm.folded_scale_shift(nn.BatchNorm2d(4, track_running_stats=False))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["bn", "mid_bn"])
def test_batch_norm_without_running_stats_uses_batch_stats_in_eval(backend, where):
    """As nn.BatchNorm2d does: eval mode without running statistics normalizes with the batch's."""
    dw, pw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.Conv2d(4, 6, 1, bias=False)
    bn = nn.BatchNorm2d(6 if where == "bn" else 4, track_running_stats=False)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    layers = {"bn": bn} if where == "bn" else {"bn": None, "mid_bn": bn, "mid_activation": "relu"}
    fused = SeparableConvBN.from_modules(dw, pw, **layers, backend=backend).eval()
    mid = (lambda d: d) if where == "bn" else (lambda d: F.relu(bn(d)))
    out = (lambda y: bn(y)) if where == "bn" else (lambda y: y)
    x = torch.randn(2, 4, 7, 7) * 3 + 1
    with torch.no_grad():
        expected = out(pw(mid(dw(x))))
        assert relative_error(fused(x), expected) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [-0.5, 1.5, float("nan")])
def test_momentum_outside_0_1_is_refused(backend, momentum):
    layer = SeparableConvBN(4, 6, backend=backend, momentum=momentum).train()
    with pytest.raises(ValueError, match="bn.momentum must be in \\[0, 1\\]"):
        layer(torch.randn(2, 4, 5, 5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_none_is_a_cumulative_average(backend):
    layer = SeparableConvBN(4, 6, padding="valid", backend=backend, momentum=None).train()
    reference = nn.Sequential(layer.depthwise, layer.pointwise, nn.BatchNorm2d(6, momentum=None)).train()
    for _ in range(3):
        x = torch.randn(2, 4, 5, 5)
        layer(x)
        reference(x)
    assert relative_error(layer.bn.running_mean, reference[2].running_mean) <= 1e-5
    assert relative_error(layer.bn.running_var, reference[2].running_var) <= 1e-5
    assert int(layer.bn.num_batches_tracked) == 3


# E. A misspelt backend fails when the module is built.

@pytest.mark.parametrize("build", [
    lambda: SeparableConvBN(4, 6, backend="bogus"),
    lambda: SeparableConv2d(4, 6, 3, backend="bogus"),
    lambda: SeparableConvBN.from_modules(_dw(), nn.Conv2d(4, 6, 1), backend="bogus"),
])
def test_backend_name_is_checked_when_built(build):
    with pytest.raises(ValueError, match="backend must be one of auto, torch, cuda, triton, got 'bogus'"):
        build()


def test_padding_spec_is_checked_when_built():
    with pytest.raises(ValueError, match="padding must be 'same', 'valid'"):
        SeparableConvBN(4, 6, padding="full")


@pytest.mark.parametrize("compiled", [True, False])
def test_batch_norm_helpers_check_their_arguments_with_or_without_the_compiled_library(monkeypatch, compiled):
    """The Python paths that run without the compiled library (XCEPTION_OPS_SKIP_EXT=1, a failed build) check what
    the ops check: a residual that would broadcast or promote, a momentum out of [0, 1], a count under 2, an
    unknown backend."""
    if compiled and _library.EXTENSION is None:
        pytest.skip("the compiled library is not loaded")
    if not compiled:
        monkeypatch.setattr(_library, "EXTENSION", None)
    y, scale, shift = torch.randn(2, 6, 8, 8), torch.rand(6), torch.randn(6)
    with pytest.raises(ValueError, match=r"residual must have shape \[2, 6, 8, 8\], got \[2, 6, 8, 1\]"):
        batchnorm.apply_scale_shift(y, scale, shift, residual=torch.randn(2, 6, 8, 1))
    with pytest.raises(TypeError, match="residual"):
        batchnorm.apply_scale_shift(y, scale, shift, residual=torch.randn(2, 6, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="y must be a 4-D tensor"):
        batchnorm.apply_scale_shift(torch.randn(2, 6, 8), scale, shift)
    bn = nn.BatchNorm2d(6)
    mean, var = torch.randn(6), torch.rand(6)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\], got 5"):
        batchnorm.update_running_stats(bn, mean, var, 10, 5.0)
    with pytest.raises(ValueError, match="count must be at least 2"):
        batchnorm.update_running_stats(bn, mean, var, 1, 0.1)
    assert torch.equal(bn.running_mean, torch.zeros(6)) and torch.equal(bn.running_var, torch.ones(6))
    with pytest.raises(ValueError, match="nonsense"):
        batchnorm.finalize(torch.randn(6), torch.rand(6) + 1, 10, None, None, 1e-5, backend="nonsense")
