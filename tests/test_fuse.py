"""fuse(): finds the chains by dataflow, swaps them, and the model computes what it did."""

import copy
import functools

import pytest
import torch
import torch.nn as nn

import xception_ops
from xception_ops.fuse import find_chains
from xception_ops.nn import SeparableConvBN
from xception_ops.parity import randomize_batch_norm
from xception_ops.pooling import MaxPool2d

from .conftest import record_op_calls, relative_error, requires_gpu

timm = pytest.importorskip("timm")


def sep_block(cin, cout, pre_relu=True, inplace=False):
    layers = [nn.ReLU(inplace=inplace)] if pre_relu else []
    layers += [nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False), nn.Conv2d(cin, cout, 1, bias=False),
               nn.BatchNorm2d(cout), nn.ReLU()]
    return layers


def compare_train_and_eval(original, fused, x):
    for training in (False, True):
        original.train(training)
        fused.train(training)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_a, out_b = original(xa), fused(xb)
        assert relative_error(out_b, out_a) <= 1e-5
        grad = torch.randn_like(out_a)
        out_a.backward(grad)
        out_b.backward(grad)
        assert relative_error(xb.grad, xa.grad) <= 1e-4
    for (name, pa), (_, pb) in zip(original.named_parameters(), fused.named_parameters()):
        assert pa.shape == pb.shape


def test_plain_sequential():
    model = nn.Sequential(*sep_block(3, 8, pre_relu=False), *sep_block(8, 8), nn.Conv2d(8, 4, 1))
    randomize_batch_norm(model, torch.Generator().manual_seed(0))
    chains = find_chains(model)
    assert [(c.depthwise, c.pointwise, c.batch_norm, c.pre_relu, c.post_relu) for c in chains] == [
        ("0", "1", "2", None, "3"), ("5", "6", "7", "4", "8")]
    fused = xception_ops.fuse(model)
    assert sum(isinstance(m, SeparableConvBN) for m in fused.modules()) == 2
    assert isinstance(model[0], nn.Conv2d)  # not inplace: the original is untouched
    compare_train_and_eval(model, fused, torch.randn(2, 3, 9, 9))


def test_relu_shared_between_chains_is_applied_once():
    model = nn.Sequential(*sep_block(4, 4, pre_relu=False), *sep_block(4, 4, pre_relu=False))
    model = nn.Sequential(*list(model)[:4], *list(model)[4:])  # [dw pw bn relu dw pw bn relu]
    fused = xception_ops.fuse(model)
    seps = [m for m in fused.modules() if isinstance(m, SeparableConvBN)]
    # The ReLU between them is the second one's prologue; the first hands its BatchNorm on to it.
    assert [(s.pre_relu, s.post_relu, s.defer_bn) for s in seps] == [(False, False, True), (True, True, False)]
    compare_train_and_eval(model, fused, torch.randn(2, 4, 7, 7))


def test_mid_activation_is_fused():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.ELU(), nn.Conv2d(4, 6, 1),
                          nn.BatchNorm2d(6))
    fused = xception_ops.fuse(model)
    (sep,) = [m for m in fused.modules() if isinstance(m, SeparableConvBN)]
    assert sep.mid_activation == "elu"
    compare_train_and_eval(model, fused, torch.randn(2, 4, 7, 7))


def fuse_a_twin(model, backend="torch"):
    """fuse() on a copy of `model`, with that copy's parameters and buffers by their original names (the fused
    model keeps those very tensors). Backend "torch" by default: the fused op itself ("auto" takes the unfused
    layers on a CPU)."""
    twin = copy.deepcopy(model)
    tensors = {**dict(twin.named_parameters()), **dict(twin.named_buffers())}
    return xception_ops.fuse(twin, inplace=True, backend=backend), tensors


def compare_parameters_and_statistics(original, twin_tensors):
    """The parameters' gradients and the BatchNorms' running statistics of the original and the fused twin."""
    for name, p in original.named_parameters():
        if p.grad.abs().max() <= 1e-6:  # a bias that training's BatchNorm cancels: zero, up to rounding
            assert twin_tensors[name].grad.abs().max() <= 1e-6, name
        else:
            assert relative_error(twin_tensors[name].grad, p.grad) <= 1e-4, name
    for name, b in original.named_buffers():
        assert relative_error(twin_tensors[name].double(), b.double()) <= 1e-5, name


@pytest.mark.parametrize("dw_bias", [False, True])
@pytest.mark.parametrize("act", [nn.ReLU6, nn.ReLU, None])
def test_mobilenet_chain_with_a_mid_batch_norm_is_fused(dw_bias, act):
    """dw (+bias) -> BN -> ReLU6 / ReLU / nothing -> pw -> BN: the mid BatchNorm becomes the op's mid affine, folded
    in eval mode, from the depthwise result's batch statistics in training (running statistics updated as
    nn.BatchNorm2d updates them)."""
    layers = [nn.Conv2d(6, 12, 3, stride=2, padding=1, groups=6, bias=dw_bias), nn.BatchNorm2d(12)]
    layers += [act(inplace=True)] if act is not None else []
    model = nn.Sequential(*layers, nn.Conv2d(12, 5, 1, bias=False), nn.BatchNorm2d(5))
    randomize_batch_norm(model, torch.Generator().manual_seed(2))
    with torch.no_grad():  # depthwise results of several units, so that ReLU6 clamps at 6 too
        model[0].weight.mul_(4)
    (chain,) = find_chains(model)
    assert (chain.mid_batch_norm, chain.mid_activation) == ("1", "2" if act else None)
    fused, tensors = fuse_a_twin(model)
    (sep,) = [m for m in fused.modules() if isinstance(m, SeparableConvBN)]
    assert sep.mid_bn is not None and sep.mid_activation == {nn.ReLU6: "relu6", nn.ReLU: "relu", None: None}[act]
    with record_op_calls("separable_conv2d") as calls:
        compare_train_and_eval(model, fused, torch.randn(3, 6, 11, 9))
    if xception_ops._library.EXTENSION is not None:  # without it every module runs its unfused PyTorch layers
        assert len(calls) == 2  # eval and training: the fused op ran (not the unfused fallback)
    compare_parameters_and_statistics(model, tensors)


def test_depthwise_bias_before_a_mid_activation_is_the_mid_shift():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=True), nn.ReLU(), nn.Conv2d(4, 6, 1),
                          nn.BatchNorm2d(6))
    (chain,) = find_chains(model)
    assert chain.mid_activation == "1" and chain.mid_batch_norm is None
    fused, tensors = fuse_a_twin(model)
    compare_train_and_eval(model, fused, torch.randn(2, 4, 7, 7))
    compare_parameters_and_statistics(model, tensors)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_torchvision_mobilenet_v2(backend):
    """Every inverted-residual block's dw -> BN -> ReLU6 -> pw -> BN is one fused op: the same outputs and
    gradients as the original in eval and training mode."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.mobilenet_v2(num_classes=7, width_mult=0.25)
    model.classifier[0].p = 0.0  # (dropout: the two models would draw different masks in training)
    # float64: 17 training BatchNorms over a few values per channel at the end (2 x 2 pixels, batch 2) amplify
    # float32's rounding differences past any fixed tolerance (6e-5 of the output at the last block).
    model.double()
    randomize_batch_norm(model, torch.Generator().manual_seed(3))
    fused, tensors = fuse_a_twin(model, backend)
    seps = [m for m in fused.modules() if isinstance(m, SeparableConvBN)]
    assert len(seps) == 17 and all(s.mid_bn is not None and s.mid_activation == "relu6" for s in seps)
    # The blocks with a residual (11 at this width) hand their last BatchNorm to `x + self.conv(x)`.
    assert sum(s.defer_bn for s in seps) == 11
    assert type(fused) is type(model)
    compare_train_and_eval(model, fused, torch.randn(2, 3, 48, 40, dtype=torch.float64))
    compare_parameters_and_statistics(model, tensors)


def test_torchvision_mobilenet_v3_hardswish_chains():
    """MobileNet V3's blocks without squeeze-and-excitation between the halves fuse, hardswish ones included: 7 of
    mobilenet_v3_large's 15 depthwise convs (3 with ReLU, 4 with hardswish); the others keep their layers. The same
    outputs, gradients and running statistics as the original (float64)."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.mobilenet_v3_large(num_classes=7, width_mult=0.25, dropout=0.0).double()
    randomize_batch_norm(model, torch.Generator().manual_seed(6))
    fused, tensors = fuse_a_twin(model)
    seps = [m for m in fused.modules() if isinstance(m, SeparableConvBN)]
    assert sorted(s.mid_activation for s in seps) == ["hardswish"] * 4 + ["relu"] * 3
    compare_train_and_eval(model, fused, torch.randn(2, 3, 40, 36, dtype=torch.float64))
    compare_parameters_and_statistics(model, tensors)


class Branchy(nn.Module):
    """The depthwise output also feeds a second branch: not fusable. The ReLU's input is also used: in-place
    ReLU is not folded, out-of-place is."""

    def __init__(self, inplace):
        super().__init__()
        self.relu = nn.ReLU(inplace=inplace)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.pw = nn.Conv2d(4, 4, 1, bias=False)
        self.dw2 = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.pw2 = nn.Conv2d(4, 4, 1, bias=False)

    def forward(self, x):
        d = self.dw(x)
        a = self.pw(d) + d
        return self.pw2(self.dw2(self.relu(a))) + a


@pytest.mark.parametrize("inplace", [False, True])
def test_dataflow_decides_what_fuses(inplace):
    model = Branchy(inplace)
    chains = find_chains(model)
    assert [c.depthwise for c in chains] == ["dw2"]
    assert chains[0].pre_relu == (None if inplace else "relu")
    fused = xception_ops.fuse(model)
    compare_train_and_eval(model, fused, torch.randn(2, 4, 6, 6))


class TappedBetween(nn.Module):
    """Two chains with a ReLU between them whose output is also returned: the BatchNorm must be applied (the ReLU
    stays the first chain's epilogue), not handed on."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(*sep_block(4, 4, pre_relu=False))
        self.b = nn.Sequential(*sep_block(4, 4, pre_relu=False))

    def forward(self, x):
        mid = self.a(x)
        return self.b(mid), mid


def test_a_batch_norm_is_handed_on_only_to_a_sole_consumer():
    model = TappedBetween()
    randomize_batch_norm(model, torch.Generator().manual_seed(2))
    fused = xception_ops.fuse(model, backend="torch")
    seps = [m for m in fused.modules() if isinstance(m, SeparableConvBN)]
    assert [(s.post_relu, s.defer_bn) for s in seps] == [(True, False), (True, False)]
    x = torch.randn(2, 4, 6, 6)
    for mode in (True, False):
        model.train(mode), fused.train(mode)
        for u, v in zip(model(x), fused(x)):
            assert isinstance(v, torch.Tensor) and relative_error(v, u) <= 1e-5


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(*sep_block(4, 6))

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow defeats torch.fx
            return self.body(x)
        return self.body(-x)


def test_untraceable_model_falls_back_to_sequential_containers():
    model = Untraceable()
    with pytest.warns(RuntimeWarning, match="could not trace"):
        fused = xception_ops.fuse(model)
    assert sum(isinstance(m, SeparableConvBN) for m in fused.modules()) == 1
    compare_train_and_eval(model, fused, torch.randn(2, 4, 5, 5))


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_timm_legacy_xception(backend):
    model = timm.create_model("legacy_xception", pretrained=False, num_classes=10)
    randomize_batch_norm(model, torch.Generator().manual_seed(1))
    fused = xception_ops.fuse(model, backend=backend)
    seps = [m for m in fused.modules() if isinstance(m, SeparableConvBN)]
    assert len(seps) == 34  # 36 conv layers, less the two stem convs
    # Each block's opening ReLU (blocks 2-12) becomes a prologue, and so do the ReLUs between two separable convs
    # (inside the blocks, and the exit flow's act3), whose conv before hands its BatchNorm on (defer_bn); the exit
    # flow's act4, before the pooling, stays an epilogue.
    between = 3 * 1 + 8 * 2 + 1 + 1
    assert sum(s.pre_relu for s in seps) == 11 + between
    # The middle flow's last convs hand theirs to the residual add (`x += skip`: one scale_shift pass with it).
    assert sum(s.defer_bn for s in seps) == between + 8
    assert sum(s.post_relu for s in seps) == 1
    pools = [m for m in fused.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 4 and all(type(m) is MaxPool2d and m.backend == backend for m in pools)
    assert type(fused) is type(model)
    x = torch.randn(2, 3, 71, 71)
    fused.eval()
    model.eval()
    assert relative_error(fused(x), model(x)) <= 1e-5
    model.train()
    fused.train()
    assert relative_error(fused(x), model(x)) <= 1e-5


@pytest.mark.parametrize("output_stride", [32, 8])
def test_timm_aligned_xception(output_stride):
    """timm's aligned Xception (xception41/65/71, DeepLab's backbone; here with narrow blocks): its SeparableConv2d is
    dw -> BN -> nn.Identity -> pw -> BN -> nn.Identity between ReLU modules, so every chain has a mid BatchNorm and
    fuses through the Identity layers; the ReLUs between two chains become prologues with the BatchNorm handed on.
    output_stride 8 dilates the depthwise convs of the later blocks (dilation 2 and 4). The same outputs, gradients
    and running statistics as the original, in eval and training mode (float64)."""
    from timm.models.xception_aligned import XceptionAligned
    blocks = [dict(in_chs=64, out_chs=16, stride=2), dict(in_chs=16, out_chs=24, stride=2),
              dict(in_chs=24, out_chs=24, stride=1), dict(in_chs=24, out_chs=(24, 32, 32), stride=2),
              dict(in_chs=32, out_chs=(48, 48, 64), stride=1, no_skip=True, start_with_relu=False)]
    model = XceptionAligned(blocks, num_classes=5, output_stride=output_stride,
                            norm_layer=functools.partial(nn.BatchNorm2d, eps=1e-3)).double()
    randomize_batch_norm(model, torch.Generator().manual_seed(4))
    dilated = sum(m.dilation != (1, 1) for m in model.modules() if isinstance(m, nn.Conv2d))
    assert (dilated > 0) == (output_stride == 8)
    fused, tensors = fuse_a_twin(model)
    seps = [m for m in fused.modules() if isinstance(m, SeparableConvBN)]
    assert len(seps) == 15 and all(s.mid_bn is not None for s in seps)
    # The last block (no_skip) keeps its activations inside its SeparableConv2d: act_dw is the mid ReLU, act_pw a
    # ReLU after the BatchNorm; the others have none there.
    assert [s.mid_activation for s in seps] == [None] * 12 + ["relu"] * 3
    # Every ReLU that feeds one depthwise conv becomes its prologue: the ReLU opening each of the first four blocks
    # and the two between a block's convs (act2, act3; in the last block the act_pw before conv2 and conv3), and the
    # conv before such a ReLU hands its BatchNorm on. Only the last act_pw stays an epilogue. The last conv of each
    # of the four blocks with a shortcut hands its BatchNorm to the residual add.
    assert sum(s.pre_relu for s in seps) == 4 + 5 * 2 and sum(s.defer_bn for s in seps) == 5 * 2 + 4
    assert [s.post_relu for s in seps] == [False] * 14 + [True]
    compare_train_and_eval(model, fused, torch.randn(2, 3, 37, 35, dtype=torch.float64))
    compare_parameters_and_statistics(model, tensors)


def test_timm_mobilenet_v2_with_batch_norm_act_layers():
    """timm builds its MobileNet / EfficientNet blocks with BatchNormAct2d (BatchNorm, then an activation, in one
    module): dw -> BNAct(ReLU6) -> pw -> BNAct(identity). The activation inside becomes the mid activation, and is
    set to an identity inside the module the fused op keeps; the same outputs, gradients and running statistics as
    the original (float64)."""
    from timm.layers import BatchNormAct2d
    model = timm.create_model("mobilenetv2_050", pretrained=False, num_classes=5).double()
    randomize_batch_norm(model, torch.Generator().manual_seed(5))
    fused, tensors = fuse_a_twin(model)
    seps = [m for m in fused.modules() if isinstance(m, SeparableConvBN)]
    assert len(seps) == 17 and all(s.mid_activation == "relu6" and type(s.mid_bn) is BatchNormAct2d for s in seps)
    assert all(type(s.mid_bn.act) is nn.Identity and type(s.bn.act) is nn.Identity for s in seps)
    assert type(model.blocks[1][0].bn2.act) is nn.ReLU6  # the original keeps its own
    compare_train_and_eval(model, fused, torch.randn(2, 3, 40, 36, dtype=torch.float64))
    compare_parameters_and_statistics(model, tensors)


@pytest.mark.parametrize("where", ["mid", "after"])
def test_a_batch_norm_act_holding_another_activation(where):
    """A BatchNormAct2d whose activation the op has no form of (SiLU) ends the chain before it: between the halves
    nothing fuses; after the pointwise conv the chain fuses without it."""
    from timm.layers import BatchNormAct2d
    silu, plain = BatchNormAct2d(4, act_layer=nn.SiLU), BatchNormAct2d(4, act_layer=nn.ReLU)
    dw, pw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.Conv2d(4, 4, 1, bias=False)
    model = nn.Sequential(dw, silu, pw, plain) if where == "mid" else nn.Sequential(dw, plain, pw, silu)
    chains = find_chains(model)
    if where == "mid":
        assert chains == []
    else:
        assert [(c.mid_batch_norm, c.mid_activation, c.batch_norm, c.post_relu) for c in chains] == [
            ("1", "1.act", None, None)]
    fused, _ = fuse_a_twin(model.double())
    compare_train_and_eval(model, fused, torch.randn(2, 4, 6, 7, dtype=torch.float64))


def test_tracing_leaves_the_buffers_as_they_were():
    """torch.fx runs a model's Python while tracing it, and buffers are real tensors to it: timm's BatchNormAct2d
    (the aligned Xception's stem) counts num_batches_tracked itself in training mode, which tracing ran once."""
    from timm.layers import BatchNormAct2d
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4), *sep_block(4, 4)).train()
    before = [(b, b.clone()) for b in model.buffers()]  # the fused model keeps these very tensors
    xception_ops.fuse(model, inplace=True)
    assert sum(isinstance(m, SeparableConvBN) for m in model.modules()) == 1
    assert all(torch.equal(b, value) for b, value in before), [(b, value) for b, value in before]


def test_fuse_inplace_returns_the_same_object():
    model = nn.Sequential(*sep_block(3, 3))
    assert xception_ops.fuse(model, inplace=True) is model
    assert any(isinstance(m, SeparableConvBN) for m in model.modules())


def test_fuse_inplace_that_fails_leaves_the_model_as_it_was(monkeypatch):
    """A layer that cannot be built after others were swapped (here the second chain's) undoes every swap, the
    activation taken out of a BatchNormAct2d included: the model is either fused or unchanged."""
    from timm.layers import BatchNormAct2d
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), BatchNormAct2d(4),
                          nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU(), *sep_block(6, 6),
                          nn.MaxPool2d(2))
    assert len(find_chains(model)) == 2
    before = list(model.named_modules(remove_duplicate=False))
    x = torch.randn(2, 4, 7, 7)
    expected = model.eval()(x)
    built = []
    real = SeparableConvBN.from_modules.__func__

    def fails_second(cls, *args, **kwargs):
        if built:
            raise RuntimeError("cannot build this one")
        built.append(real(cls, *args, **kwargs))
        return built[-1]

    monkeypatch.setattr(SeparableConvBN, "from_modules", classmethod(fails_second))
    with pytest.raises(RuntimeError, match="cannot build this one"):
        xception_ops.fuse(model, inplace=True)
    assert len(built) == 1
    after = list(model.named_modules(remove_duplicate=False))
    assert [name for name, _ in after] == [name for name, _ in before]
    assert all(a is b for (_, a), (_, b) in zip(after, before))
    assert type(model[1].act) is nn.ReLU
    assert torch.equal(model(x), expected)
    monkeypatch.undo()
    xception_ops.fuse(model, inplace=True)  # and it fuses afterwards
    assert sum(isinstance(m, SeparableConvBN) for m in model.modules()) == 2
    assert relative_error(model(x), expected) <= 1e-5


def test_shared_module_is_not_fused():
    dw = nn.Conv2d(3, 3, 3, padding=1, groups=3, bias=False)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw, self.pw = dw, nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.pw(self.dw(x)) + self.dw(x)

    assert find_chains(Shared()) == []
    model = Shared()
    x = torch.randn(1, 3, 4, 4)
    assert torch.equal(xception_ops.fuse(model)(x), model(x))


def test_max_pools_take_the_packages_pooling_with_the_same_values_and_gradients():
    """Every nn.MaxPool2d becomes pooling.MaxPool2d on the fuse backend (a shared one at each of its names); the
    ones the kernels do not take (dilation, return_indices) keep PyTorch's pooling; pools=False keeps them all."""
    shared = nn.MaxPool2d(3, 2, 1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), shared, nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
                          nn.Sequential(shared), nn.MaxPool2d(2, dilation=2, padding=1))
    fused = xception_ops.fuse(model, backend="torch")
    assert [type(m).__name__ for m in fused] == ["Conv2d", "MaxPool2d", "ReLU", "MaxPool2d", "Sequential",
                                                  "MaxPool2d"]
    assert all(type(m) is MaxPool2d for m in (fused[1], fused[3], fused[4][0], fused[5]))
    assert fused[1].kernel_size == 3 and fused[1].stride == 2 and fused[3].ceil_mode and fused[5].dilation == 2
    assert "backend='torch'" in repr(fused[1])
    assert all(type(m) is nn.MaxPool2d for m in xception_ops.fuse(model, pools=False)[1:4:2])
    x = torch.randn(2, 3, 40, 37, requires_grad=True)
    want = model(x)
    got = fused(x)
    assert torch.equal(got, want)
    grad = torch.randn_like(want)
    assert torch.equal(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(want, x, grad)[0])
    with pytest.raises(ValueError, match="backend must be one of"):
        MaxPool2d(3, backend="cudnn")


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=[pytest.mark.gpu, requires_gpu])])
def test_pools_on_a_kernel_backend_run_the_op(backend):
    """On a kernel backend (triton: its interpreter without a GPU) the swapped pools call xception_ops.max_pool2d,
    and the dilated one PyTorch's pooling."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if backend == "triton":
        pytest.importorskip("triton")
        if xception_ops._library.TRITON is None or xception_ops._library.TRITON.device_problem(device) is not None:
            pytest.skip("the triton backend cannot run here")
    elif "xception_ops.max_pool2d" not in xception_ops.backend.cuda_ops():
        pytest.skip("built without the CUDA kernels")
    model = nn.Sequential(nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(2, dilation=2)).to(device)
    fused = xception_ops.fuse(model, backend=backend)
    x = torch.randn(1, 4, 17, 17, device=device)
    with record_op_calls("max_pool2d") as calls:
        got = fused(x)
    assert len(calls) == 1 and calls[0][-1] == backend
    assert torch.equal(got, model(x))


def test_a_batch_norm_before_a_pool_goes_to_the_pool_on_a_kernel_backend():
    """A chain whose BatchNorm feeds an nn.MaxPool2d alone defers it to the pool where the pool runs the package's
    kernel ("triton" here: its interpreter on the CPU): one pool call with scale and shift, no scale_shift pass, the
    original model's values and gradients in training and eval. On "torch" and "auto", and for a pool the kernels do
    not take, the chain's epilogue keeps it."""
    pytest.importorskip("triton")
    if xception_ops._library.TRITON is None or xception_ops._library.TRITON.device_problem(torch.device("cpu")):
        pytest.skip("the triton backend cannot run here")
    torch.manual_seed(0)
    model = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.Conv2d(4, 8, 1, bias=False),
                          nn.BatchNorm2d(8), nn.Identity(), nn.MaxPool2d(3, 2, 1))
    randomize_batch_norm(model, torch.Generator().manual_seed(2))
    assert [c.pool for c in find_chains(model)] == ["5"]
    for backend in ("torch", "auto"):
        assert not any(getattr(m, "defer_bn", False) for m in xception_ops.fuse(model, backend=backend).modules())
    dilated = copy.deepcopy(model)
    dilated[5] = nn.MaxPool2d(3, 2, 1, dilation=2)
    assert not xception_ops.fuse(dilated, backend="triton")[1].defer_bn
    fused = xception_ops.fuse(model, backend="triton")
    assert fused[1].defer_bn
    compare_train_and_eval(model, fused, torch.randn(2, 4, 9, 9))
    fused.train()
    with record_op_calls("max_pool2d") as calls, record_op_calls("scale_shift") as ss_calls:
        fused(torch.randn(2, 4, 9, 9))
    assert len(calls) == 1 and calls[0][7] is not None and calls[0][8] is not None and not ss_calls


def test_timm_legacy_xception_hands_its_strided_blocks_batch_norms_to_the_pools():
    model = timm.create_model("legacy_xception", pretrained=False, num_classes=10)
    assert sum(c.pool is not None for c in find_chains(model)) == 4
    fused = xception_ops.fuse(model, backend="triton")
    between = 3 * 1 + 8 * 2 + 1 + 1 + 8  # as in test_timm_legacy_xception
    assert sum(m.defer_bn for m in fused.modules() if isinstance(m, SeparableConvBN)) == between + 4


@pytest.mark.parametrize("stride", [1, 2])
def test_timm_conv2d_same_fuses_as_same_padding(stride):
    """timm's Conv2dSame pads in its forward (TensorFlow's "same", from the input's size): fuse() takes it as the
    op's padding="same". It used to take its padding attribute (0): a 5x5 output where the original gives 6x5."""
    from timm.layers import Conv2dSame
    model = nn.Sequential(Conv2dSame(4, 4, 3, stride=stride, groups=4, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          Conv2dSame(4, 6, 1, bias=False), nn.BatchNorm2d(6)).double()
    randomize_batch_norm(model, torch.Generator().manual_seed(7))
    fused, tensors = fuse_a_twin(model)
    seps = [m for m in fused.modules() if isinstance(m, SeparableConvBN)]
    assert len(seps) == 1 and seps[0].padding == "same"
    for size in ((11, 9), (10, 12)):  # odd and even: the odd row of padding at the end
        compare_train_and_eval(model, fused, torch.randn(2, 4, *size, dtype=torch.float64))


def test_a_conv_subclass_with_its_own_forward_is_not_fused():
    """The op reads a convolution's parameters and never calls its forward: a subclass that changes the forward
    (here weight standardization) would be silently dropped. fuse() leaves it alone; from_modules refuses it."""

    class StandardizedConv2d(nn.Conv2d):
        def forward(self, x):
            w = self.weight
            w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
            return self._conv_forward(x, w, self.bias)

    dw, pw = StandardizedConv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.Conv2d(4, 6, 1, bias=False)
    model = nn.Sequential(dw, nn.BatchNorm2d(4), pw, nn.BatchNorm2d(6))
    assert find_chains(model) == []
    with pytest.raises(ValueError, match="depthwise is a StandardizedConv2d, whose forward is not nn.Conv2d's"):
        SeparableConvBN.from_modules(dw, pw, nn.BatchNorm2d(6))
    with pytest.raises(ValueError, match="pointwise is a StandardizedConv2d"):
        SeparableConvBN.from_modules(nn.Conv2d(4, 4, 3, groups=4), StandardizedConv2d(4, 6, 1), None)


def test_timm_tf_mobilenet_v3_with_same_padding():
    """timm's TensorFlow ports build their strided convs as Conv2dSame: the trace takes it as a leaf (its padding,
    worked out from the input's size, stopped the trace, and nothing fused), and those chains fuse with "same"."""
    model = timm.create_model("tf_mobilenetv3_small_minimal_100", pretrained=False, num_classes=5).double()
    randomize_batch_norm(model, torch.Generator().manual_seed(8))
    fused, tensors = fuse_a_twin(model)
    seps = [m for m in fused.modules() if isinstance(m, SeparableConvBN)]
    # (timm makes a conv Conv2dSame where "same" is not a fixed symmetric padding: the strided ones)
    dynamic = [s for s in seps if type(s.depthwise).__name__ == "Conv2dSame"]
    assert len(seps) == 11 and dynamic and all(s.padding == "same" for s in dynamic)
    compare_train_and_eval(model, fused, torch.randn(2, 3, 41, 38, dtype=torch.float64))
    compare_parameters_and_statistics(model, tensors)


def test_a_float64_model_folds_its_batch_norm_in_float64():
    """Inference in float64 matches the unfused layers to float64's precision (the fold was float32: ~1e-7)."""
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6)).double()
    randomize_batch_norm(model, torch.Generator().manual_seed(9))
    model.eval()
    fused, _ = fuse_a_twin(model)
    x = torch.randn(2, 4, 10, 9, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(fused(x), model(x)) <= 1e-14


@pytest.mark.parametrize("affine, track_running_stats", [(False, True), (True, False), (False, False)])
def test_batch_norms_without_affine_terms_or_running_statistics(affine, track_running_stats):
    """BatchNorms with no weight and bias, or none of the running statistics (batch statistics in eval mode too),
    in both places of a chain with depthwise and pointwise biases: the same outputs and gradients as the layers."""
    bn = functools.partial(nn.BatchNorm2d, affine=affine, track_running_stats=track_running_stats)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=4), bn(8), nn.ReLU6(), nn.Conv2d(8, 6, 1), bn(6),
                          nn.ReLU()).double()
    randomize_batch_norm(model, torch.Generator().manual_seed(10))
    fused, _ = fuse_a_twin(model)
    assert sum(isinstance(m, SeparableConvBN) for m in fused.modules()) == 1
    compare_train_and_eval(model, fused, torch.randn(2, 4, 7, 6, dtype=torch.float64))


class _RenormBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d subclass whose forward adds something of its own (a stand-in for batch renormalization)."""

    def forward(self, x):
        return super().forward(x).clamp(-3, 3)


def test_a_batch_norm_subclass_with_its_own_forward_is_not_taken():
    """The op applies a BatchNorm from its parameters and statistics and never calls its forward: a subclass that
    changes the forward would be silently dropped. fuse() ends the chain before it; from_modules refuses it, as it
    refuses BatchNorms of other ranks and timm's BatchNormAct2d still holding its activation."""
    from timm.layers import BatchNormAct2d

    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.Conv2d(4, 6, 1, bias=False),
                          _RenormBatchNorm2d(6))
    chains = find_chains(model)
    assert [(c.pointwise, c.batch_norm) for c in chains] == [("1", None)]
    dw, pw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.Conv2d(4, 6, 1, bias=False)
    for bn, match in [(_RenormBatchNorm2d(6), "bn is a _RenormBatchNorm2d, whose forward is not nn.BatchNorm2d's"),
                      (nn.BatchNorm1d(6), "bn must be a BatchNorm of 4-D inputs .* got BatchNorm1d"),
                      (BatchNormAct2d(6, act_layer=nn.ReLU), "bn is timm's BatchNormAct2d with act=ReLU")]:
        with pytest.raises(ValueError, match=match):
            SeparableConvBN.from_modules(dw, pw, bn)
    fused = SeparableConvBN.from_modules(dw, pw, BatchNormAct2d(6, apply_act=False))
    assert type(fused.bn.act) is nn.Identity


@pytest.mark.parametrize("sync_type", ["torch", "package"])
def test_synchronized_batch_norms_make_a_synchronized_layer(sync_type):
    """A SeparableConvBN built on a synchronizing BatchNorm (torch's nn.SyncBatchNorm, this package's
    SyncBatchNorm2d) all-reduces its statistics as that BatchNorm would have: the op uses its parameters, not its
    forward. Such BatchNorms fuse; a layer's two BatchNorms must synchronize alike (fuse() then leaves the second
    out of the chain)."""
    def sync_bn(channels, group=None):
        if sync_type == "torch":
            return nn.SyncBatchNorm(channels, process_group=group)
        return xception_ops.batchnorm.SyncBatchNorm2d(channels, process_group=group)

    dw, pw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.Conv2d(4, 6, 1, bias=False)
    group = object()  # (a stand-in: nothing is all-reduced outside a multi-process run)
    plain = SeparableConvBN.from_modules(dw, pw, nn.BatchNorm2d(6))
    assert (plain.sync_stats, plain.process_group) == (False, None)
    synced = SeparableConvBN.from_modules(dw, pw, sync_bn(6, group))
    assert synced.sync_stats and synced.process_group is group
    both = SeparableConvBN.from_modules(dw, pw, sync_bn(6, group), mid_bn=sync_bn(4, group))
    assert both.sync_stats and both.process_group is group
    with pytest.raises(ValueError, match="bn and mid_bn must both synchronize their statistics .* or neither"):
        SeparableConvBN.from_modules(dw, pw, nn.BatchNorm2d(6), mid_bn=sync_bn(4))
    with pytest.raises(ValueError, match="bn and mid_bn synchronize over different process groups"):
        SeparableConvBN.from_modules(dw, pw, sync_bn(6, group), mid_bn=sync_bn(4, object()))

    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.Conv2d(4, 6, 1, bias=False),
                          sync_bn(6), nn.ReLU())
    randomize_batch_norm(model, torch.Generator().manual_seed(4))
    fused = xception_ops.fuse(model)
    assert isinstance(fused[0], SeparableConvBN) and fused[0].sync_stats and fused[0].post_relu
    # Outside a multi-process run a synchronizing BatchNorm is a BatchNorm: the same values (torch's SyncBatchNorm
    # needs CUDA to train, so the comparison is in eval mode for it).
    for training in ([False] if sync_type == "torch" else [False, True]):
        model.train(training), fused.train(training)
        x = torch.randn(2, 4, 5, 5)
        assert relative_error(fused(x), model(x)) <= 1e-5
    mixed = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), sync_bn(4),
                          nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6))
    assert [(c.mid_batch_norm, c.batch_norm) for c in find_chains(mixed)] == [("1", None)]


# ---- what fuse() leaves alone: hooks, aliases, mode-dependent dataflow, in-place side effects ----

def test_layers_with_hooks_are_not_fused():
    """The fused module never calls its layers' forward, so a layer with hooks stays as it is: torch.nn.utils'
    spectral_norm / weight_norm / prune recompute the weight in a forward pre-hook (the op would read a stale
    one), and any other hook would not run. from_modules refuses such layers by name."""
    normed = nn.Sequential(*sep_block(4, 6, pre_relu=False)).eval()
    torch.nn.utils.spectral_norm(normed[1])
    with pytest.raises(ValueError, match="pointwise has hooks"):
        SeparableConvBN.from_modules(normed[0], normed[1], normed[2], backend="torch")
    seen = []
    hooked_relu = nn.Sequential(*sep_block(4, 6)).eval()
    hooked_relu[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    hooked_pool = nn.Sequential(*sep_block(4, 6, pre_relu=False), nn.MaxPool2d(2)).eval()
    hooked_pool[4].register_forward_pre_hook(lambda m, i: seen.append(i[0].shape))
    x = torch.randn(2, 4, 7, 7)
    for model in (normed, hooked_relu, hooked_pool):
        expected = model(x)
        fused = xception_ops.fuse(model, inplace=True, backend="torch")  # (spectral_norm's model cannot deepcopy)
        torch.testing.assert_close(fused(x), expected)
    assert not any(isinstance(m, SeparableConvBN) for m in normed.modules())
    assert not any(isinstance(m, SeparableConvBN) for m in hooked_relu.modules())
    assert type(hooked_pool[4]) is nn.MaxPool2d and isinstance(hooked_pool[0], SeparableConvBN)
    assert len(seen) == 4  # each hook ran before and after fuse()


@pytest.mark.parametrize("alias", ["depthwise", "batch_norm"])
def test_a_layer_under_two_names_is_not_fused(alias):
    """A module registered twice (an alias attribute, here registered first: the name torch.fx reports) would be
    swapped under one name while the forward calls it by the other: the chain stays unfused."""
    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            dw, bn = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4)
            self.alias = dw if alias == "depthwise" else bn
            self.dw, self.pw, self.bn = dw, nn.Conv2d(4, 4, 1, bias=False), bn

        def forward(self, x):
            return self.bn(self.pw(self.dw(x)))

    model = Aliased().train()
    randomize_batch_norm(model, torch.Generator().manual_seed(3))
    assert find_chains(model) == []
    fused = xception_ops.fuse(model, backend="torch")
    assert not any(isinstance(m, SeparableConvBN) for m in fused.modules())
    compare_train_and_eval(model, fused, torch.randn(2, 4, 6, 6))


def test_untraceable_model_keeps_the_side_effect_of_a_leading_in_place_relu():
    """Without a trace, an in-place ReLU first in an nn.Sequential rewrites the container's input, which the
    caller may read again (`rep(x) + x`): it is not taken as the prologue there."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.rep = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),
                                     nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))

        def forward(self, x):
            h = x * 2
            if h.sum() > -1e9:  # data-dependent control flow: torch.fx cannot trace this
                return self.rep(h) + h
            return h

    model = Block()
    with pytest.warns(RuntimeWarning, match="could not trace"):
        (chain,) = find_chains(model)
    assert chain.pre_relu is None
    with pytest.warns(RuntimeWarning, match="could not trace"):
        fused = xception_ops.fuse(model, backend="torch")
    compare_train_and_eval(model, fused, torch.randn(2, 4, 6, 6))


def compare_with_the_same_randomness(original, fused, x, tolerance):
    """Outputs in eval and training mode, each model's dropout / drop-path drawing from the same seed."""
    for training in (False, True):
        original.train(training)
        fused.train(training)
        torch.manual_seed(0)
        expected = original(x)
        torch.manual_seed(0)
        assert relative_error(fused(x), expected) <= tolerance, training


def test_chains_are_those_of_both_modes():
    """A model's forward may differ between training and eval (dropout, drop-path): fuse() traces both and takes
    a chain as far as they agree, whatever mode the model is in when fused."""
    class TrainOnlyDropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
            self.pw, self.bn, self.drop = nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6), nn.Dropout(0.5)

        def forward(self, x):
            y = self.pw(self.dw(x))
            if self.training:
                y = self.drop(y)
            return self.bn(y)

    model = TrainOnlyDropout().eval()
    (chain,) = find_chains(model)
    assert chain.batch_norm is None  # dropout sits between the product and the BatchNorm in training
    assert not model.training and not model.bn.training  # the modes are restored
    fused = xception_ops.fuse(model, backend="torch")
    compare_with_the_same_randomness(model, fused, torch.randn(2, 4, 6, 6), 1e-6)


def test_timm_drop_path_blocks_fused_in_eval_train_as_the_original():
    """timm's inverted residuals with drop-path: in training a drop-path sits between the last BatchNorm and the
    residual add, so that BatchNorm is not handed to the add (eval's dataflow alone would), whichever mode the
    model is fused in."""
    model = timm.create_model("mobilenetv2_050", pretrained=False, num_classes=5, drop_path_rate=0.2).double()
    randomize_batch_norm(model, torch.Generator().manual_seed(4))
    fused, tensors = fuse_a_twin(model.eval())
    seps = [m for m in fused.modules() if isinstance(m, SeparableConvBN)]
    assert len(seps) == 17 and not any(s.defer_bn for s in seps)
    compare_with_the_same_randomness(model, fused, torch.randn(2, 3, 32, 32, dtype=torch.float64), 1e-8)
    without = timm.create_model("mobilenetv2_050", pretrained=False, num_classes=5).double()
    assert sum(getattr(m, "defer_bn", False) for m in xception_ops.fuse(without.eval(), backend="torch").modules())


def test_batch_norms_handed_to_any_add():
    """A chain's BatchNorm handed to the add after it (PendingBatchNorm): two such branches added together,
    torch.add, and a broadcast add all compute what the original does."""
    class Adds(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.Conv2d(4, 4, 1),
                                   nn.BatchNorm2d(4))
            self.b = copy.deepcopy(self.a)
            self.c = copy.deepcopy(self.a)
            self.d = copy.deepcopy(self.a)
            self.bias = nn.Parameter(torch.randn(4, 1, 1))

        def forward(self, x):
            return self.a(x) + self.b(x) + torch.add(x, self.c(x)) + (self.d(x) + self.bias)

    model = Adds()
    randomize_batch_norm(model, torch.Generator().manual_seed(5))
    chains = find_chains(model)
    assert len(chains) == 4 and all(c.residual_add for c in chains)
    fused = xception_ops.fuse(model, backend="torch")
    assert all(m.defer_bn for m in fused.modules() if isinstance(m, SeparableConvBN))
    compare_train_and_eval(model, fused, torch.randn(2, 4, 6, 6))
