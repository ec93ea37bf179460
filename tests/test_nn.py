"""The drop-in modules against the unfused PyTorch layers they replace, in training and eval mode."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from xception_ops import batchnorm
from xception_ops.geometry import same_padding
from xception_ops.parity import randomize_batch_norm
from xception_ops.nn import PendingBatchNorm, SeparableConv2d, SeparableConvBN

from .conftest import record_op_calls, relative_error, requires_ext


def keras_same(x, kernel, stride, dilation=1):
    """TensorFlow's "same" padding applied explicitly."""
    top, bottom = same_padding(x.shape[2], kernel, stride, dilation)
    left, right = same_padding(x.shape[3], kernel, stride, dilation)
    return F.pad(x, (left, right, top, bottom))


@pytest.mark.parametrize("size", [9, 10])
@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (1, 2)])
@pytest.mark.parametrize("depth_multiplier", [1, 2])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_separable_conv2d_has_keras_semantics(size, stride, dilation, depth_multiplier, backend):
    layer = SeparableConv2d(3, 5, 3, stride=stride, padding="same", dilation=dilation,
                            depth_multiplier=depth_multiplier, backend=backend)
    nn.init.normal_(layer.pointwise.bias)
    x = torch.randn(2, 3, size, size + 1)
    out = layer(x)
    d = F.conv2d(keras_same(x, 3, stride, dilation), layer.depthwise.weight, stride=stride, dilation=dilation,
                 groups=3)
    expected = F.conv2d(d, layer.pointwise.weight, layer.pointwise.bias)
    assert out.shape == (2, 5, -(-size // stride), -(-(size + 1) // stride))
    assert relative_error(out, expected) <= 1e-6


def test_separable_conv2d_valid_padding_and_relu_activation():
    layer = SeparableConv2d(4, 6, (3, 5), padding="valid", activation="relu")
    x = torch.randn(1, 4, 8, 9)
    expected = F.relu(layer.pointwise(F.conv2d(x, layer.depthwise.weight, groups=4)))
    assert layer(x).shape == (1, 6, 6, 5)
    assert relative_error(layer(x), expected) <= 1e-6


def test_separable_conv2d_state_dict_is_that_of_the_pair_it_replaces():
    pair = nn.Sequential()
    pair.add_module("depthwise", nn.Conv2d(8, 16, 3, groups=8, bias=False))
    pair.add_module("pointwise", nn.Conv2d(16, 4, 1))
    layer = SeparableConv2d(8, 4, 3, depth_multiplier=2)
    theirs, ours = pair.state_dict(), layer.state_dict()
    assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in ours.items()}
    layer.load_state_dict(theirs)
    x = torch.randn(2, 8, 7, 7)
    assert relative_error(layer(x), pair(x)) <= 1e-6


def test_keras_bias_flag():
    assert SeparableConv2d(2, 3, 3, bias=False).pointwise.bias is None
    with pytest.raises(ValueError, match="activation must be None or 'relu'"):
        SeparableConv2d(2, 3, 3, activation="tanh")


def unfused(module: SeparableConvBN) -> nn.Module:
    """The same computation as separate PyTorch layers, sharing nothing with `module`."""
    m = copy.deepcopy(module)
    layers = [nn.ReLU()] if m.pre_relu else []
    pad = m.padding

    class Pad(nn.Module):
        def forward(self, x):
            if pad == "same":
                return keras_same(x, m.depthwise.kernel_size[0], m.depthwise.stride[0], m.depthwise.dilation[0])
            return F.pad(x, (pad,) * 4)

    layers += [Pad(), m.depthwise]
    layers += {None: [], "relu": [nn.ReLU()], "elu": [nn.ELU()]}[m.mid_activation]
    layers += [m.pointwise] + ([m.bn] if m.bn is not None else [])
    seq = nn.Sequential(*layers)

    class Unfused(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = seq

        def forward(self, x, residual=None):
            y = self.seq(x)
            if residual is not None:
                y = y + residual
            return F.relu(y) if m.post_relu else y

    return Unfused()


CONFIGS = [
    dict(),
    dict(pre_relu=True, post_relu=True),
    dict(pre_relu=True, mid_activation="elu", bias=True),
    dict(stride=2, padding="same", mid_activation="relu"),
    dict(padding=1, depth_multiplier=2, post_relu=True, momentum=None),
    dict(batch_norm=False, bias=True, post_relu=True),
]


# "torch": the fused operator on its reference path; "auto" on a CPU: no fused kernel, the PyTorch layers.
BACKENDS = ["torch", "auto"]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_separable_conv_bn_matches_unfused_layers(config, training, residual, backend):
    module = SeparableConvBN(5, 6, 3, backend=backend, **config)
    with torch.no_grad():
        if module.bn is not None:
            module.bn.running_mean.uniform_(-0.5, 0.5)
            module.bn.running_var.uniform_(0.5, 1.5)
            module.bn.weight.uniform_(0.5, 1.5)
            module.bn.bias.uniform_(-0.5, 0.5)
        if module.pointwise.bias is not None:
            module.pointwise.bias.uniform_(-0.5, 0.5)
    reference = unfused(module)
    module.train(training)
    reference.train(training)
    x = torch.randn(3, 5, 9, 8)
    x_ref = x.clone().requires_grad_()
    x.requires_grad_()
    out_shape = copy.deepcopy(reference)(x_ref.detach()).shape  # a copy: keep the running stats as they are
    res = torch.randn(out_shape, requires_grad=True) if residual else None
    res_ref = res.detach().clone().requires_grad_() if residual else None
    for step in range(2):  # two steps: running statistics (and num_batches_tracked) must evolve alike
        out, want = module(x, res), reference(x_ref, res_ref)
        assert relative_error(out, want) <= 1e-5
        grad = torch.randn_like(out)
        out.backward(grad)
        want.backward(grad)
    assert relative_error(x.grad, x_ref.grad) <= 1e-5
    if residual:
        assert relative_error(res.grad, res_ref.grad) <= 1e-5
    pairs = list(zip(module.named_parameters(), _params_in_module_order(reference, module)))
    # A bias before a training BatchNorm has a zero gradient, which the unfused layers compute as rounding noise:
    # compare such gradients against the scale of the others.
    scale = max(p2.grad.norm().item() for _, (_, p2) in pairs)
    for (name, p1), (_, p2) in pairs:
        assert relative_error(p1.grad, p2.grad) <= 1e-5 or (p1.grad - p2.grad).norm() <= 1e-5 * scale, name
    if module.bn is not None:
        bn_ref = _find(reference, nn.BatchNorm2d)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.allclose(getattr(module.bn, name).double(), getattr(bn_ref, name).double(), rtol=1e-5,
                                  atol=1e-6), name


def _find(module, kind):
    return next(m for m in module.modules() if isinstance(m, kind))


def _params_in_module_order(reference, module):
    """The reference's parameters listed in the order of module.named_parameters()."""
    by_role = {"depthwise": _find_conv(reference, depthwise=True), "pointwise": _find_conv(reference, False)}
    if module.bn is not None:
        by_role["bn"] = _find(reference, nn.BatchNorm2d)
    return [(name, dict(by_role[name.split(".")[0]].named_parameters())[name.split(".", 1)[1]])
            for name, _ in module.named_parameters()]


def _find_conv(module, depthwise):
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d) and (m.groups > 1) == depthwise)


@pytest.mark.parametrize("backend", BACKENDS)
def test_depthwise_bias_is_carried_through_the_pointwise_stage(backend):
    dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=True)
    pw = nn.Conv2d(4, 6, 1, bias=True)
    bn = nn.BatchNorm2d(6)
    fused = SeparableConvBN.from_modules(copy.deepcopy(dw), copy.deepcopy(pw), copy.deepcopy(bn), backend=backend)
    x = torch.randn(2, 4, 7, 7)
    for training in (True, False):
        fused.train(training)
        bn.train(training)
        assert relative_error(fused(x), bn(pw(dw(x)))) <= 1e-5
    assert torch.allclose(fused.bn.running_mean, bn.running_mean, atol=1e-6)


@pytest.mark.parametrize("training", [False, True])
def test_mid_batch_norm_and_depthwise_bias_match_the_unfused_layers(training):
    """relu(x) -> dw (+bias) -> BN -> ReLU6 -> pw -> BN on the op (mid_scale / mid_shift) against the same layers in
    plain PyTorch: outputs, every parameter's gradient, and the running statistics after a training step."""
    fused = SeparableConvBN(4, 6, 3, stride=2, pre_relu=True, mid_activation="relu6", mid_batch_norm=True,
                            backend="torch")
    fused.depthwise.bias = nn.Parameter(torch.randn(4))
    randomize_batch_norm(fused, torch.Generator().manual_seed(4))
    with torch.no_grad():
        fused.depthwise.weight.mul_(3)  # results past ReLU6's 6 in eval mode
    plain = copy.deepcopy(fused)
    fused.train(training)
    plain.train(training)
    x = torch.randn(3, 4, 9, 8)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = plain._forward_unfused(xa, None)
    got = fused(xb)
    assert relative_error(got, want) <= 1e-5
    grad = torch.randn_like(want)
    want.backward(grad)
    got.backward(grad)
    assert relative_error(xb.grad, xa.grad) <= 1e-5
    for (name, a), (_, b) in zip(plain.named_parameters(), fused.named_parameters()):
        if training and name == "depthwise.bias":  # the batch statistics cancel it: zero, up to rounding
            assert b.grad.abs().max() <= 1e-5 and a.grad.abs().max() <= 1e-5
        else:
            assert relative_error(b.grad, a.grad) <= 1e-5, name
    for (name, a), (_, b) in zip(plain.named_buffers(), fused.named_buffers()):
        assert relative_error(b.double(), a.double()) <= 1e-6, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_batch_norm_needs_more_than_one_value(backend):
    module = SeparableConvBN(2, 3, 1, padding="valid", backend=backend).train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        module(torch.randn(1, 2, 1, 1))


def test_folded_scale_shift_is_inference_batch_norm():
    bn = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    y = torch.randn(2, 4, 3, 3)
    scale, shift = batchnorm.folded_scale_shift(bn)
    assert relative_error(batchnorm.apply_scale_shift(y, scale, shift), bn(y)) <= 1e-6


@pytest.mark.parametrize("compiled", [True, False])
def test_apply_scale_shift_is_exact_and_passes_a_positive_eps(monkeypatch, compiled):
    # The op (compiled library), or PyTorch's BatchNorm without it: torch 2.11 rejects eps <= 0 in every mode
    # (2.14 only in training), so there the unit variance comes from var + eps.
    from xception_ops import _library
    if compiled and _library.EXTENSION is None:
        pytest.skip("the compiled library is not loaded")
    if not compiled:
        monkeypatch.setattr(_library, "EXTENSION", None)
    real = F.batch_norm
    seen = []
    monkeypatch.setattr(F, "batch_norm", lambda *a, **k: seen.append(k["eps"]) or real(*a, **k))
    y = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    scale, shift = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    z = batchnorm.apply_scale_shift(y, scale, shift, relu=True)
    assert all(eps > 0 for eps in seen) and (compiled or seen)
    # Unit variance exactly: a wrong eps (var 1 + 1e-5) would be ~5e-6 off; fused multiply-adds only ~1e-16.
    assert relative_error(z, torch.relu(y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))) <= 1e-14


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_module_output_keeps_the_layout(backend):
    module = SeparableConvBN(4, 8, 3, pre_relu=True, backend=backend).eval()
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    out = module(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(out, module(x.contiguous())) <= 1e-6


@requires_ext
def test_auto_without_a_fused_kernel_runs_the_pytorch_layers(monkeypatch):
    """On a CPU no fused kernel runs: "auto" takes the unfused layers, XCEPTION_OPS_BACKEND=torch the operator."""
    calls = []
    real = torch.ops.xception_ops.separable_conv2d
    module = SeparableConvBN(4, 4, 3).eval()
    x = torch.randn(1, 4, 5, 5)
    monkeypatch.setattr(torch.ops.xception_ops, "separable_conv2d", lambda *a: calls.append(1) or real(*a),
                        raising=False)
    unfused_out = module(x)
    assert calls == []
    monkeypatch.setenv("XCEPTION_OPS_BACKEND", "torch")
    fused_out = module(x)
    assert calls == [1]
    assert relative_error(fused_out, unfused_out) <= 1e-6


def test_auto_keeps_the_pytorch_layers_for_a_training_mid_batch_norm(monkeypatch):
    """A mid BatchNorm in training costs the fused op a depthwise forward and backward of its own for its
    statistics, which the table behind "auto" has not measured: "auto" runs the PyTorch layers there even where the
    table picks a kernel (here every answer of the table is "triton"), and the fused op in eval mode, without a mid
    BatchNorm, or when a backend is asked for."""
    from xception_ops import backend as backends
    from xception_ops import nn as xnn

    class Called(Exception):
        pass

    def fused_op(*args):  # separable_conv2d_normalized(x, dw, pw, stride, padding, dilation, backend, ...)
        raise Called(args[6])

    monkeypatch.setattr(backends, "auto_choice", lambda *a, **k: backends.AutoChoice("triton", "test"))
    monkeypatch.setattr(xnn.ops, "separable_conv2d_normalized", fused_op)
    x = torch.randn(2, 4, 5, 5)
    module = SeparableConvBN(4, 6, 3, mid_batch_norm=True).train()
    module(x)  # the unfused layers: the op is not called
    for training, mid_bn, backend, expected in [(False, True, "auto", "triton"), (True, False, "auto", "triton"),
                                                (True, True, "torch", "torch")]:
        module = SeparableConvBN(4, 6, 3, mid_batch_norm=mid_bn, backend=backend).train(training)
        with pytest.raises(Called) as called:
            module(x)
        assert called.value.args == (expected,), (training, mid_bn, backend)


def test_inference_folds_the_batch_norm_at_every_call_unless_frozen():
    """By default the BatchNorm is folded at every call, so even a write that bypasses autograd's version counters
    (an EMA update through `.data`) is seen."""
    m = SeparableConvBN(4, 6, 3, bias=True, backend="torch").eval()
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        first = m(x)
        m.bn.weight.data.mul_(3)
        m.bn.running_mean.data.add_(1)
        second = m(x)
    assert m.__dict__.get("_epilogue_cache") is None and not second.equal(first)
    torch.testing.assert_close(second, m._forward_unfused(x, None).detach())


def test_frozen_inference_epilogue_is_reused_until_a_parameter_changes():
    """A frozen layer (xception_ops.nn.freeze) folds the BatchNorm once and reuses it; any in-place change of a
    parameter or running statistic (and a new tensor in its place) folds it again."""
    from xception_ops.nn import freeze
    m = SeparableConvBN(4, 6, 3, bias=True, backend="torch").eval()
    assert freeze(m) is m and m.frozen
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        first = m(x)
        cached = m._epilogue_cache[2]
        assert m(x).equal(first) and m._epilogue_cache[2] is cached  # reused
        m.bn.weight.mul_(2)  # in place: the version counter moves
        second = m(x)
        assert m._epilogue_cache[2] is not cached and not second.equal(first)
        cached = m._epilogue_cache[2]
        m.bn.weight.data = m.bn.weight.data * 3  # new data, the same object and version
        assert not m(x).equal(second) and m._epilogue_cache[2] is not cached
        m.pointwise.bias = torch.nn.Parameter(torch.randn(6))  # a new tensor object
        third = m(x)
    reference = torch.nn.functional.conv2d(
        torch.nn.functional.conv2d(x, m.depthwise.weight, padding=1, groups=4), m.pointwise.weight,
        m.pointwise.bias)
    expected = m.bn(reference)
    torch.testing.assert_close(third, expected.detach(), rtol=1e-5, atol=1e-5)
    # With grad mode on and trainable parameters the epilogue is recomputed (autograd needs its graph).
    y = m(x)
    y.sum().backward()
    assert m.bn.weight.grad is not None


# ---- training BatchNorm applied by the next layer's prologue (PendingBatchNorm) ----

def _two_layers(backend, mid_batch_norm=False):
    first = SeparableConvBN(5, 6, 3, pre_relu=True, backend=backend).train()
    second = SeparableConvBN(6, 7, 3, pre_relu=True, mid_batch_norm=mid_batch_norm, backend=backend).train()
    for bn in (first.bn, second.bn) + ((second.mid_bn,) if mid_batch_norm else ()):
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.5, 0.5)
    return first, second


@pytest.mark.parametrize("backend, mid_batch_norm", [("torch", False), ("auto", False), ("torch", True)])
def test_a_deferred_batch_norm_gives_the_same_output_and_gradients(backend, mid_batch_norm):
    """defer_bn hands the BatchNorm to the next layer ("torch": applied in the fused op's prologue; "auto" on a
    CPU: the unfused layers apply it first); outputs, gradients and running statistics match the applied path.
    In float64: the same mathematics in another order (in float32 both paths are ~3e-4 from float64 in these
    gradients, which two training BatchNorms make ill-conditioned). With a mid BatchNorm in the next layer, its
    statistics' own depthwise pass takes the pending BatchNorm and the ReLU too."""
    x = torch.randn(3, 5, 9, 8, dtype=torch.float64, requires_grad=True)
    results = []
    for defer in (False, True):
        torch.manual_seed(0)
        first, second = (m.double() for m in _two_layers(backend, mid_batch_norm))
        mid = first(x, defer_bn=defer)
        if backend == "torch":
            assert isinstance(mid, PendingBatchNorm) == defer
        out = second(mid)
        grads = torch.autograd.grad(out.square().sum(), (x, first.depthwise.weight, first.bn.weight,
                                                         second.pointwise.weight))
        results.append((out, *grads, first.bn.running_var.clone())
                       + ((second.mid_bn.running_var.clone(),) if mid_batch_norm else ()))
    for a, b in zip(*results):
        assert relative_error(b, a) <= 1e-10


def test_a_layer_with_residual_or_post_relu_does_not_defer():
    module = SeparableConvBN(4, 4, 3, post_relu=True, backend="torch").train()
    assert isinstance(module(torch.randn(2, 4, 5, 5), defer_bn=True), torch.Tensor)
    module = SeparableConvBN(4, 4, 3, backend="torch").train()
    x = torch.randn(2, 4, 5, 5)
    assert isinstance(module(x, residual=x, defer_bn=True), torch.Tensor)
    module.eval()  # folded BatchNorm: deferred too
    assert isinstance(module(x, defer_bn=True), PendingBatchNorm)
    assert isinstance(module(x, residual=x, defer_bn=True), torch.Tensor)
    assert isinstance(SeparableConvBN(4, 4, 3, batch_norm=False, backend="torch")(x, defer_bn=True), torch.Tensor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_deferred_folded_batch_norm_gives_the_same_bits_in_inference(dtype):
    """In inference the folded BatchNorm deferred to the next layer's prologue rounds as the epilogue did: the
    output is the same bit for bit (on "torch", the reference operator)."""
    x = torch.randn(2, 5, 9, 8, dtype=dtype)
    first, second = _two_layers("torch")
    for bn in (first.bn, second.bn):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    first, second = first.eval().to(dtype), second.eval().to(dtype)
    with torch.no_grad():
        mid = first(x, defer_bn=True)
        assert isinstance(mid, PendingBatchNorm)
        deferred = second(mid)
        applied = second(first(x))
    assert torch.equal(deferred, applied)


def test_xception_blocks_apply_batch_norm_once_per_block(monkeypatch):
    """In training on the fused op, only a module's last BatchNorm is applied as a separate pass."""
    from xception_ops.models.xception import XceptionBlock
    calls = []
    real = batchnorm.apply_scale_shift
    monkeypatch.setattr(batchnorm, "apply_scale_shift", lambda *a, **k: calls.append(1) or real(*a, **k))
    block = XceptionBlock(8, 8, reps=3, backend="torch").train()
    out = block(torch.randn(2, 8, 7, 7))
    assert out.shape == (2, 8, 7, 7) and len(calls) == 1


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_meta_tensors_give_shapes_without_computing(backend):
    """Shape inference and deferred initialization on the meta device: the modules, the functional ops and the whole
    Xception run forward and backward there (asking autocast about meta tensors raised before)."""
    from xception_ops import depthwise_conv2d, separable_conv2d
    from xception_ops.models import xception

    x = torch.randn(2, 8, 9, 11, device="meta", requires_grad=True)
    layer = SeparableConvBN(8, 16, 3, pre_relu=True, backend=backend).to("meta")
    for training in (True, False):
        out = layer.train(training)(x)
        assert out.shape == (2, 16, 9, 11) and out.device.type == "meta"
    keras = SeparableConv2d(8, 4, 3, stride=2, padding="same", backend=backend).to("meta")
    assert keras(x).shape == (2, 4, 5, 6)
    y = separable_conv2d(x, layer.depthwise.weight, layer.pointwise.weight, padding="same", backend=backend)
    assert y.shape == (2, 16, 9, 11)
    assert depthwise_conv2d(x, layer.depthwise.weight, padding=1, backend=backend).shape == (2, 8, 9, 11)
    with torch.device("meta"):
        net = xception(backend=backend)
    logits = net(torch.randn(2, 3, 299, 299, device="meta"))
    assert logits.shape == (2, 1000) and logits.device.type == "meta"
    logits.sum().backward()
    assert net.conv1.weight.grad.shape == net.conv1.weight.shape
    assert net.block4.convs[0].pointwise.weight.grad.shape == (728, 728, 1, 1)


def test_conv_arguments_follow_the_input_size_and_the_modules_settings():
    """The stride / padding / dilation the op takes are kept per input size in eager mode; another size, or a
    changed padding, stride or dilation, works them out again."""
    m = SeparableConvBN(4, 6, 3, padding="same", backend="torch").eval()
    with torch.no_grad():
        assert m(torch.randn(1, 4, 7, 7)).shape[2:] == (7, 7)
        assert m(torch.randn(1, 4, 9, 8)).shape[2:] == (9, 8)
        m.padding = "valid"
        assert m(torch.randn(1, 4, 9, 8)).shape[2:] == (7, 6)
        m.depthwise.stride = (2, 2)
        assert m(torch.randn(1, 4, 9, 8)).shape[2:] == (4, 3)
        m.padding, m.depthwise.dilation = "same", (2, 2)
        x = torch.randn(1, 4, 9, 8)
        # TensorFlow's "same" at stride 2, dilation 2 (5 x 5 effective): 4 rows of padding (2 + 2), 3 columns (1 + 2)
        padded = torch.nn.functional.pad(x, (1, 2, 2, 2))
        want = torch.nn.functional.conv2d(torch.nn.functional.conv2d(padded, m.depthwise.weight, stride=2, dilation=2,
                                                                     groups=4), m.pointwise.weight)
        torch.testing.assert_close(m(x), m.bn(want), rtol=1e-5, atol=1e-5)


@requires_ext
def test_pending_batch_norm_plus_a_tensor_is_one_scale_shift_with_the_residual():
    """PendingBatchNorm + tensor (either side, and `+=`): the BatchNorm applied and the residual added in one
    scale_shift call, the same values and gradients as applying it and adding."""
    y = torch.randn(2, 3, 5, 5, requires_grad=True)
    scale, shift = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    residual = torch.randn(2, 3, 5, 5, requires_grad=True)
    pending = PendingBatchNorm(y, scale, shift)
    with record_op_calls("scale_shift") as calls:
        left, right = pending + residual, residual + pending
        acc = pending
        acc += residual
    assert len(calls) == 3 and all(c[-1] is residual for c in calls)
    want = pending.apply() + residual
    assert torch.equal(left, want) and torch.equal(right, want) and torch.equal(acc, want)
    grads = torch.autograd.grad(left.sum(), (y, scale, shift, residual))
    want_grads = torch.autograd.grad(want.sum(), (y, scale, shift, residual))
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)
    # Anything else is added to the applied output: a broadcast, a scalar, another PendingBatchNorm, torch.add.
    applied = pending.apply()
    bias = torch.randn(3, 1, 1)
    for got, expected in [(pending + 1.0, applied + 1.0), (2 + pending, 2 + applied), (pending + bias, applied + bias),
                          (pending + pending, applied + applied), (torch.add(residual, pending), residual + applied),
                          (torch.add(pending, residual, alpha=2), applied + 2 * residual),
                          (torch.cat([pending, residual]), torch.cat([applied, residual])),
                          (torch.relu(pending), torch.relu(applied)),
                          (pending + residual.double(), applied + residual.double())]:
        assert torch.equal(got, expected)
    with record_op_calls("scale_shift") as calls:
        torch.add(residual, pending)
        residual.add(pending)
    assert len(calls) == 2 and all(c[-1] is residual for c in calls)  # torch.add and Tensor.add take __add__


def test_frozen_layer_pickles_after_inference_and_forgets_its_cache():
    """The folded BatchNorm a frozen layer keeps (weak references) is left out of a pickle; clear_caches forgets
    it after a write that bypasses the version counters (`.data`); freeze(model, False) stops keeping it."""
    import io

    from xception_ops.nn import clear_caches, freeze
    m = freeze(SeparableConvBN(4, 6, 3, mid_batch_norm=True, mid_activation="relu", backend="torch").eval())
    randomize_batch_norm(m, torch.Generator().manual_seed(0))
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        first = m(x)
    assert m.__dict__.get("_epilogue_cache") is not None and m.__dict__.get("_mid_cache") is not None
    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), first)
        m.bn.running_var.data.mul_(4)
        m.mid_bn.weight.data.mul_(3)
        assert torch.equal(m(x), first)  # (the documented limit: .data writes are not seen)
        clear_caches(nn.Sequential(m))
        assert m.__dict__.get("_epilogue_cache") is None
        torch.testing.assert_close(m(x), m._forward_unfused(x, None), rtol=1e-5, atol=1e-5)
        assert not torch.equal(m(x), first)
        freeze(m, False)
        assert not m.frozen and m.__dict__.get("_epilogue_cache") is None
        m.bn.running_var.data.mul_(4)
        m(x)
        assert m.__dict__.get("_epilogue_cache") is None
    assert loaded.frozen  # (a pickle keeps the setting, not the cache)


def test_frozen_layer_folded_under_inference_mode_still_differentiates_outside():
    """A fold computed under torch.inference_mode (inference tensors, which autograd cannot save) is not reused
    outside it: input gradients (saliency maps) of a frozen eval model still work."""
    from xception_ops.nn import freeze
    m = freeze(SeparableConvBN(4, 6, 3, backend="torch").eval())
    for p in m.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 4, 5, 5)
    with torch.inference_mode():
        expected = m(x)
    x.requires_grad_(True)
    y = m(x)
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(y.detach(), expected) and grad.abs().sum() > 0


@pytest.mark.parametrize("training", [False, True])
def test_autocast_takes_a_float32_residual_in_both_modes_and_leaves_float64_alone(training):
    """Under autocast the layer computes in the autocast dtype, its residual included, in eval (the op) and in
    training (the BatchNorm applied with the residual); float64 tensors stay float64, as autocast leaves them."""
    import xception_ops
    m = SeparableConvBN(4, 6, 3, backend="torch").train(training)
    x, residual = torch.randn(2, 4, 5, 5), torch.randn(2, 6, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x, residual)
        x64, w64 = x.double(), torch.randn(4, 1, 3, 3, dtype=torch.float64)
        assert xception_ops.depthwise_conv2d(x64, w64, padding=1, backend="torch").dtype == torch.float64
        assert F.conv2d(x64, w64, padding=1, groups=4).dtype == torch.float64
        want = m._forward_unfused(x, residual)
    assert y.dtype == torch.bfloat16
    assert relative_error(y, want) <= 2e-2
