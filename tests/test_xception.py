"""The paper's Xception: structure, options, and parity with timm's legacy_xception."""

import copy

import pytest
import torch
import torch.nn as nn

from xception_ops.geometry import same_pool_padding
from xception_ops.models import MaxPool2dSame, from_timm, timm_key_map, xception
from xception_ops.nn import SeparableConvBN
from xception_ops.parity import randomize_batch_norm

from .conftest import check_compiled_matches_eager, relative_error

timm = pytest.importorskip("timm")


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_parameter_count_is_the_papers():
    assert trainable(xception()) == 22_855_952


def test_structure_follows_figure_5():
    model = xception()
    seps = [m for m in model.modules() if isinstance(m, SeparableConvBN)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.groups == 1]
    assert len(seps) == 34 and len(convs) == 2  # 36 convolutional layers
    assert all(s.depthwise.kernel_size == (3, 3) and s.depthwise.stride == (1, 1) and s.padding == "same"
               and s.mid_activation is None and s.depthwise.groups == s.depthwise.in_channels for s in seps)
    shapes = [(s.depthwise.in_channels, s.pointwise.out_channels) for s in seps]
    assert shapes.count((728, 728)) == 1 + 24 + 1  # block3's second, the middle flow, block12's first
    x = torch.randn(1, 3, 299, 299)
    sizes = []
    hooks = [b.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[1:]))) for b in model.blocks()]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    assert sizes[:3] == [(128, 74, 74), (256, 37, 37), (728, 19, 19)]
    assert sizes[3:11] == [(728, 19, 19)] * 8
    assert sizes[11] == (1024, 10, 10)


def test_options():
    fc = xception(fc_hidden=(4096, 4096))
    assert trainable(fc) - 22_855_952 == (2048 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 - 2048) * 1000
    no_res = xception(residual=False)
    assert all(b.skip is None and not b.residual for b in no_res.blocks())
    assert trainable(no_res) < 22_855_952
    elu = xception(mid_activation="elu")
    assert all(s.mid_activation == "elu" for s in elu.modules() if isinstance(s, SeparableConvBN))
    keras = xception(bn="keras")
    bns = [m for m in keras.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(b.eps == 1e-3 and b.momentum == pytest.approx(0.01) for b in bns)
    with pytest.raises(ValueError, match="bn must be one of"):
        xception(bn="tf")


def test_dropout_and_multi_label_head():
    model = xception(num_classes=7, drop_rate=0.5, multi_label=True)
    x = torch.randn(2, 3, 71, 71)
    model.train()
    logits = model(x)
    target = torch.randint(0, 2, (2, 7))
    loss = model.loss(logits, target)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    probs = model.eval().predict(x)
    assert probs.shape == (2, 7) and ((probs > 0) & (probs < 1)).all()
    assert not torch.allclose(probs.sum(1), torch.ones(2))  # sigmoid per class, not a softmax
    model.eval()
    assert torch.equal(model(x), model(x))  # dropout only in training


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("mid", [None, "relu"])
def test_ablations_train(residual, mid):
    model = xception(num_classes=5, residual=residual, mid_activation=mid, backend="torch")
    x = torch.randn(2, 3, 71, 71)
    loss = model.loss(model(x), torch.tensor([0, 3]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_pool_padding_is_tensorflow_same_by_default():
    x = torch.randn(1, 2, 8, 8)
    same, symmetric = MaxPool2dSame(3, 2, "same"), MaxPool2dSame(3, 2, "symmetric")
    assert same(x).shape == symmetric(x).shape == (1, 2, 4, 4)
    assert torch.equal(same(x)[..., 0, 0], x[..., :3, :3].amax((-1, -2)))  # window starts at row 0 (TF)
    assert torch.equal(symmetric(x)[..., 0, 0], x[..., :2, :2].amax((-1, -2)))  # starts at row -1 (PyTorch)
    odd = torch.randn(1, 2, 9, 9)
    assert torch.equal(same(odd), symmetric(odd))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_same_pool_without_a_padded_copy_is_the_padded_definition(layout):
    """MaxPool2dSame pools with PyTorch's implicit padding (ceil mode for the extra row) instead of padding x with
    -inf: the same outputs and, with ties (small integers), the same gradient routing, on every size and geometry
    it takes; the geometries PyTorch cannot express (stride 1 with an odd extra row) take the padded form."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    generator = torch.Generator().manual_seed(5)
    fast = 0
    for kernel, stride in [(3, 2), (3, 1), (2, 2), (4, 1), (5, 2), (5, 3), (4, 3)]:
        pool = MaxPool2dSame(kernel, stride, "same")
        for h, w in [(1, 1), (2, 5), (7, 8), (9, 9), (12, 13), (16, 3)]:
            x = torch.randint(-3, 3, (2, 3, h, w), generator=generator).float().contiguous(memory_format=fmt)
            x.requires_grad_(True)
            x_ref = x.detach().clone().requires_grad_(True)
            out, want = pool(x), pool.padded(x_ref)
            assert out.shape == want.shape and torch.equal(out, want), (kernel, stride, h, w)
            grad = torch.randn(out.shape, generator=generator)
            out.backward(grad)
            want.backward(grad)
            assert torch.equal(x.grad, x_ref.grad), (kernel, stride, h, w)
            fast += all(same_pool_padding(n, kernel, stride) is not None for n in (h, w))
    assert fast > 20  # most of them take the copy-free form
    assert same_pool_padding(147, 3, 2) == (1, False) and same_pool_padding(74, 3, 2) == (0, True)
    assert same_pool_padding(8, 4, 1) is None  # 1 before, 2 after: not PyTorch's


def test_same_pool_makes_no_padded_copy():
    """Xception's pools (3x3, stride 2, "same") at its sizes: no pad operator, only the pooling."""
    pool = MaxPool2dSame(3, 2, "same")
    for size in (147, 74, 37, 19):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            pool(torch.randn(1, 2, size, size))
        names = {e.key for e in prof.key_averages()}
        assert not any("pad" in n or "fill" in n for n in names), names


def _timm_pair(num_classes=1000, seed=0, backend="auto"):
    torch.manual_seed(seed)
    theirs = timm.create_model("legacy_xception", pretrained=False, num_classes=num_classes)
    randomize_batch_norm(theirs, torch.Generator().manual_seed(seed))
    ours = from_timm(theirs, backend=backend)
    assert trainable(ours) == trainable(theirs)
    assert len(timm_key_map(theirs)) == len(theirs.state_dict()) == len(ours.state_dict())
    return theirs, ours


def _grads(theirs, ours):
    """(name, timm's gradient, our gradient) for every parameter."""
    mapping = timm_key_map(theirs)
    params = dict(ours.named_parameters())
    return [(name, p.grad, params[mapping[name]].grad) for name, p in theirs.named_parameters()]


def _step(model, x, y):
    logits = model(x)
    nn.functional.cross_entropy(logits, y).backward()
    return logits


# "torch": every separable conv through the fused operator (reference path); "auto" on a CPU: the PyTorch layers.
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_timm_weights_give_identical_outputs_and_gradients_in_eval_mode(backend):
    theirs, ours = _timm_pair(backend=backend)
    theirs.eval()
    ours.eval()
    x, y = torch.randn(2, 3, 75, 75), torch.randint(0, 1000, (2,))
    assert relative_error(_step(ours, x, y), _step(theirs, x, y)) <= 1e-5
    for name, g_theirs, g_ours in _grads(theirs, ours):
        assert relative_error(g_ours, g_theirs) <= 1e-5, name


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_timm_parity_in_training_mode(backend):
    """Logits within 1e-5. Gradients: identical in float64. In float32 the backward of 36 layers of ReLU and batch
    statistics is ill-conditioned (activations near zero flip): timm itself lands 1e-3 to 2e-2 from float64, and
    differently in NCHW and channels_last. Ours must be no worse than twice PyTorch's own error."""
    theirs, ours = _timm_pair(seed=1, backend=backend)
    x, y = torch.randn(4, 3, 71, 71), torch.randint(0, 1000, (4,))
    theirs64, ours64 = copy.deepcopy(theirs).double(), copy.deepcopy(ours).double()
    theirs_cl = copy.deepcopy(theirs).to(memory_format=torch.channels_last)
    logits = [_step(m, x, y) for m in (theirs, ours)]
    logits64 = [_step(m, x.double(), y) for m in (theirs64, ours64)]
    _step(theirs_cl, x.contiguous(memory_format=torch.channels_last), y)
    assert relative_error(logits[1], logits[0]) <= 1e-5
    assert relative_error(logits64[1], logits64[0]) <= 1e-12
    grads_cl = {name: p.grad for name, p in theirs_cl.named_parameters()}
    for (name, g_t, g_o), (_, g_t64, g_o64) in zip(_grads(theirs, ours), _grads(theirs64, ours64)):
        assert relative_error(g_o64, g_t64) <= 1e-10, name
        pytorch_error = max(relative_error(g_t, g_t64), relative_error(grads_cl[name], g_t64))
        assert relative_error(g_o, g_t64) <= 2 * pytorch_error + 1e-5, name
    mapping, buffers = timm_key_map(theirs), dict(ours.named_buffers())
    for name, b_t in theirs.named_buffers():
        assert relative_error(buffers[mapping[name]], b_t) <= 1e-5, name


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_channels_last_and_zero_batch(backend):
    model = xception(num_classes=10, backend=backend).eval()
    x = torch.randn(2, 3, 71, 71)
    with torch.no_grad():
        a = model(x)
        b = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
        assert relative_error(b, a) <= 1e-5
        assert model(torch.randn(0, 3, 71, 71)).shape == (0, 10)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_torch_compile_fullgraph_has_no_graph_breaks(backend):
    check_compiled_matches_eager(xception(num_classes=10, backend=backend), torch.randn(2, 3, 71, 71), 1e-5)


def test_parity_turns_tf32_off_and_restores_the_callers_settings():
    """The parity check runs float32 without TF32 and puts the caller's settings back: the legacy flags, or, where
    per-operator settings differ (PyTorch >= 2.9, which then cannot read the legacy cuDNN flag), those."""
    from xception_ops.precision import tf32_override

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = (cudnn.allow_tf32, matmul.allow_tf32)
    with tf32_override(False):
        assert (cudnn.allow_tf32, matmul.allow_tf32) == (False, False)
    assert (cudnn.allow_tf32, matmul.allow_tf32) == before
    if not hasattr(cudnn, "conv"):
        pytest.skip("this PyTorch has no per-operator TF32 settings")
    saved = [(obj, obj.fp32_precision) for obj in (cudnn.conv, cudnn.rnn, matmul)]
    try:
        cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = "ieee", "tf32"
        with pytest.raises(RuntimeError):
            cudnn.allow_tf32  # noqa: B018  (mixed: the legacy read raises)
        matmul_before = matmul.fp32_precision
        with tf32_override(False):  # through the per-operator settings (the legacy read still refuses: PyTorch's rule)
            assert [o.fp32_precision for o in (cudnn.conv, cudnn.rnn, matmul)] == ["ieee"] * 3
        assert [o.fp32_precision for o in (cudnn.conv, cudnn.rnn, matmul)] == ["ieee", "tf32", matmul_before]
    finally:
        for obj, precision in saved:
            obj.fp32_precision = precision
    assert (cudnn.allow_tf32, matmul.allow_tf32) == before
