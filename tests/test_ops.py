"""The operators on the reference path ("torch" backend) against the float64 PyTorch reference, forward and
backward; opcheck; argument errors from both the Python API and the compiled operators."""

import itertools
import os

import pytest
import torch
import torch.nn.functional as F

import xception_ops
from xception_ops import _library, reference
from xception_ops.backend import BackendUnavailableError
from xception_ops.geometry import resolve_padding

from .conftest import relative_error

needs_ext = pytest.mark.skipif(_library.EXTENSION is None, reason=f"compiled library not loaded: {_library.LOAD_ERROR}")
ops = torch.ops.xception_ops

LAYOUTS = ["contiguous", "channels_last", "strided"]


def make_input(shape, dtype, layout):
    """A random tensor in the given layout; "strided" is a non-contiguous slice of a larger tensor."""
    if layout == "strided":
        n, c, h, w = shape
        return torch.randn(n, c, h, 2 * w + 1, dtype=dtype)[..., 1::2]
    x = torch.randn(shape, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def to64(*tensors):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


def grads_of(tensors):
    return [None if t is None else t.grad for t in tensors]


# ---------------------------------------------------------------------------------------------- depthwise

DEPTHWISE_CASES = [
    # (N, C, H, W, multiplier, kernel, stride, padding spec, dilation, bias)
    (2, 5, 11, 13, 1, (3, 3), (1, 1), 1, (1, 1), False),
    (1, 3, 9, 10, 2, (3, 3), (2, 2), "same", (1, 1), True),      # asymmetric TF "same" at stride 2
    (3, 7, 8, 7, 1, (5, 3), (1, 2), (2, 1), (2, 1), True),
    (2, 4, 6, 6, 1, (1, 1), (3, 3), "valid", (1, 1), False),
    (1, 6, 12, 9, 3, (3, 3), (2, 1), (0, 2, 1, 0), (1, 2), False),
]


@needs_ext
@pytest.mark.parametrize("case", DEPTHWISE_CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_depthwise_forward_backward_matches_float64(case, layout):
    n, c, h, w, mult, k, stride, padding, dilation, with_bias = case
    x = make_input((n, c, h, w), torch.float32, layout).requires_grad_()
    weight = torch.randn(c * mult, 1, *k, requires_grad=True)
    bias = torch.randn(c * mult, requires_grad=True) if with_bias else None
    out = xception_ops.depthwise_conv2d(x, weight, bias, stride, padding, dilation, backend="torch")
    grad = torch.randn_like(out)
    out.backward(grad)

    x64, w64, b64 = to64(x, weight, bias)
    pad4 = resolve_padding(padding, (h, w), k, stride, dilation)
    ref = reference.depthwise_conv2d(x64, w64, b64, stride, pad4, dilation)
    ref.backward(grad.double())
    assert relative_error(out, ref) <= 1e-5
    for got, want in zip(grads_of([x, weight, bias]), grads_of([x64, w64, b64])):
        if want is not None:
            assert relative_error(got, want) <= 1e-5
    expected_fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=expected_fmt)
    assert x.grad.is_contiguous(memory_format=expected_fmt)


# ---------------------------------------------------------------------------------------------- separable

SEPARABLE_OPTIONS = [
    dict(),
    dict(in_affine=True, in_relu=True, out_affine=True, out_relu=True),
    dict(residual=True, out_relu=True, out_affine=True),
    dict(residual=True),
    dict(in_affine=True, residual=True, out_affine=True),  # residual's gradient: the 8th tensor input
    dict(compute_stats=True, in_affine=True, in_relu=True),
    dict(mid_activation="relu", compute_stats=True),
    dict(mid_activation="elu", out_affine=True),
    # MobileNet's dw -> BN -> ReLU6 -> pw -> BN; the residual's gradient after both mid vectors
    dict(mid_affine=True, mid_activation="relu6", out_affine=True, residual=True),
    dict(mid_shift=True, mid_activation="relu", in_affine=True, compute_stats=True),  # a depthwise bias
    dict(mid_affine=True, mid_activation="hardswish", compute_stats=True),  # MobileNet V3
]
SEPARABLE_SHAPES = [
    # (N, C_in, C_out, H, W, multiplier, kernel, stride, padding, dilation)
    (2, 5, 7, 9, 11, 1, (3, 3), (1, 1), "same", (1, 1)),
    (1, 4, 6, 10, 9, 2, (3, 3), (2, 2), "same", (1, 1)),
    (3, 3, 5, 8, 8, 1, (5, 3), (1, 1), (1, 2, 0, 1), (2, 1)),
]


def separable_inputs(shape, options, dtype, layout):
    n, cin, cout, h, w, mult, k, stride, padding, dilation = shape
    x = make_input((n, cin, h, w), dtype, layout).requires_grad_()
    t = dict(
        dw_weight=torch.randn(cin * mult, 1, *k, dtype=dtype, requires_grad=True),
        pw_weight=(torch.randn(cout, cin * mult, 1, 1, dtype=dtype) / (cin * mult) ** 0.5).requires_grad_(),
        in_scale=None, in_shift=None, mid_scale=None, mid_shift=None, out_scale=None, out_shift=None, residual=None)
    if options.get("in_affine"):
        t["in_scale"] = (torch.rand(cin) + 0.5).requires_grad_()
        t["in_shift"] = (torch.randn(cin) * 0.3).requires_grad_()
    if options.get("mid_affine"):
        t["mid_scale"] = (torch.rand(cin * mult) * 2 + 0.5).requires_grad_()
    if options.get("mid_affine") or options.get("mid_shift"):
        t["mid_shift"] = (torch.randn(cin * mult) * 2).requires_grad_()  # spans relu6's clamp at 6 too
    if options.get("out_affine"):
        t["out_scale"] = (torch.rand(cout) + 0.5).requires_grad_()
        t["out_shift"] = (torch.randn(cout) * 0.3).requires_grad_()
    pad4 = resolve_padding(padding, (h, w), k, stride, dilation)
    ho = (h + pad4[0] + pad4[1] - dilation[0] * (k[0] - 1) - 1) // stride[0] + 1
    wo = (w + pad4[2] + pad4[3] - dilation[1] * (k[1] - 1) - 1) // stride[1] + 1
    if options.get("residual"):
        t["residual"] = make_input((n, cout, ho, wo), dtype, layout).requires_grad_()
    flags = dict(stride=stride, padding=padding, dilation=dilation, in_relu=options.get("in_relu", False),
                 out_relu=options.get("out_relu", False), mid_activation=options.get("mid_activation"),
                 compute_stats=options.get("compute_stats", False))
    return x, t, flags, pad4


def run_separable(fn, x, t, flags):
    """Runs forward and backward with random output gradients (for the statistics too); returns the outputs."""
    result = fn(x, **t, **flags)
    outs = result if isinstance(result, tuple) else (result,)
    loss = sum((o.double() * torch.randn(o.shape, dtype=torch.float64)).sum() for o in outs)
    loss.backward()
    return outs


def reference_fn(x, dw_weight, pw_weight, *, stride, padding, dilation, in_scale, in_shift, in_relu,
                 mid_activation, mid_scale, mid_shift, out_scale, out_shift, out_relu, residual, compute_stats):
    pad4 = resolve_padding(padding, x.shape[2:], dw_weight.shape[2:], stride, dilation)
    out = reference.separable_conv2d(x, dw_weight, pw_weight, in_scale, in_shift, in_relu, stride, pad4, dilation,
                                     mid_activation or "none", mid_scale, mid_shift, out_scale, out_shift, out_relu,
                                     residual, compute_stats)
    return out if compute_stats else out[0]


@needs_ext
@pytest.mark.parametrize("shape", SEPARABLE_SHAPES)
@pytest.mark.parametrize("options", SEPARABLE_OPTIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_separable_matches_float64(shape, options, layout):
    x, t, flags, _ = separable_inputs(shape, options, torch.float32, layout)
    state = torch.random.get_rng_state()
    outs = run_separable(lambda *a, **k: xception_ops.separable_conv2d(*a, **k, backend="torch"), x, t, flags)
    x64 = to64(x)[0]
    t64 = dict(zip(t, to64(*t.values())))
    torch.random.set_rng_state(state)  # the same random output gradients
    refs = run_separable(reference_fn, x64, t64, flags)
    for got, want in zip(outs, refs):
        assert relative_error(got, want) <= 1e-5
    assert relative_error(x.grad, x64.grad) <= 1e-5
    for name in t:
        if t[name] is not None:
            assert relative_error(t[name].grad, t64[name].grad) <= 1e-5, name
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert outs[0].is_contiguous(memory_format=fmt)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_separable_low_precision_error_no_worse_than_pytorch(dtype):
    """Our op in bf16/fp16 against float64, next to the same chain of plain PyTorch ops in that dtype."""
    shape = SEPARABLE_SHAPES[0]
    options = dict(in_affine=True, in_relu=True, out_affine=True, out_relu=True, residual=True)
    x, t, flags, _ = separable_inputs(shape, options, dtype, "channels_last")
    out = xception_ops.separable_conv2d(x, **t, **flags, backend="torch")
    plain = reference_fn(x, **t, **flags)
    exact = reference_fn(*to64(x), **dict(zip(t, to64(*t.values()))), **flags)
    assert out.dtype == dtype
    assert relative_error(out, exact) <= 2 * relative_error(plain, exact) + 1e-3


@needs_ext
def test_statistics_are_float32_sums_of_the_pointwise_output():
    x = torch.randn(2, 4, 7, 7, dtype=torch.bfloat16)
    dw, pw = torch.randn(4, 1, 3, 3, dtype=torch.bfloat16), torch.randn(6, 4, 1, 1, dtype=torch.bfloat16)
    out, total, total_sq = xception_ops.separable_conv2d(x, dw, pw, padding=1, compute_stats=True, backend="torch")
    assert total.dtype == total_sq.dtype == torch.float32
    torch.testing.assert_close(total, out.float().sum((0, 2, 3)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(total_sq, (out.float() ** 2).sum((0, 2, 3)), rtol=1e-5, atol=1e-4)


@needs_ext
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_zero_batch_gives_empty_results(layout):
    x = make_input((0, 4, 8, 8), torch.float32, layout).requires_grad_()
    dw = torch.randn(4, 1, 3, 3, requires_grad=True)
    pw = torch.randn(5, 4, 1, 1, requires_grad=True)
    out = xception_ops.separable_conv2d(x, dw, pw, padding=1, backend="torch")
    assert out.shape == (0, 5, 8, 8)
    out.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(dw.grad, torch.zeros_like(dw))
    y = xception_ops.depthwise_conv2d(x, dw, padding=1, backend="torch")
    assert y.shape == (0, 4, 8, 8)


@needs_ext
def test_layouts_give_the_same_result():
    x = torch.randn(2, 6, 10, 10)
    dw, pw = torch.randn(6, 1, 3, 3), torch.randn(8, 6, 1, 1)
    results = [xception_ops.separable_conv2d(v, dw, pw, padding="same", in_relu=True, backend="torch")
               for v in (x, x.contiguous(memory_format=torch.channels_last), torch.cat([x, x], 3)[..., :10])]
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- opcheck

def _opcheck_cases():
    x = torch.randn(2, 3, 7, 6, requires_grad=True)
    xl = torch.randn(2, 3, 7, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    dw = torch.randn(6, 1, 3, 3, requires_grad=True)
    pw = torch.randn(4, 6, 1, 1, requires_grad=True)
    scale, shift = torch.rand(3, requires_grad=True), torch.randn(3, requires_grad=True)
    oscale, oshift = torch.rand(4, requires_grad=True), torch.randn(4, requires_grad=True)
    mscale, mshift = torch.rand(6, requires_grad=True) + 0.5, (torch.randn(6) * 3).requires_grad_()
    bias = torch.randn(6, requires_grad=True)
    pad, stride, dil = [1, 1, 1, 1], [1, 1], [1, 1]
    pad_s2 = [0, 1, 0, 1]
    res = torch.randn(2, 4, 7, 6, requires_grad=True)
    g_dw = torch.randn(2, 6, 7, 6)
    g_pw = torch.randn(2, 4, 7, 6)
    return [
        (ops.depthwise_conv2d.default, (x, dw, bias, stride, pad, dil, "torch")),
        (ops.depthwise_conv2d.default, (xl, dw, None, [2, 2], pad_s2, dil, "torch")),
        (ops.depthwise_conv2d_backward_input.default, (g_dw, dw.detach(), [2, 3, 7, 6], stride, pad, dil, "torch")),
        (ops.depthwise_conv2d_backward_weight.default, (g_dw, x.detach(), [6, 1, 3, 3], stride, pad, dil, "torch")),
        (ops.separable_conv2d.default, (x, dw, pw, None, None, False, stride, pad, dil, "none", None, None, None,
                                        None, False, None, False, "torch")),
        (ops.separable_conv2d.default, (xl, dw, pw, scale, shift, True, stride, pad, dil, "elu", None, None,
                                        oscale, oshift, True, res, False, "torch")),
        (ops.separable_conv2d.default, (x, dw, pw, scale, shift, True, stride, pad, dil, "relu6", mscale, mshift,
                                        None, None, False, None, True, "torch")),
        (ops.separable_conv2d_backward.default, (g_pw, torch.randn(4), torch.randn(4), torch.randn(2, 4, 7, 6),
                                                 x.detach(), dw.detach(), pw.detach(), scale.detach(),
                                                 shift.detach(), True, stride, pad, dil, "none", mscale.detach(),
                                                 mshift.detach(), oscale.detach(), oshift.detach(), True, "torch")),
        (ops.batch_norm_finalize.default, (torch.rand(4, requires_grad=True) * 10,
                                           torch.rand(4, requires_grad=True) * 50 + 30, 12, oscale, oshift, 1e-5,
                                           "torch")),
        (ops.batch_norm_finalize.default, (torch.randn(4, dtype=torch.float64, requires_grad=True),
                                           torch.rand(4, dtype=torch.float64, requires_grad=True) + 3, 7, None, None,
                                           1e-3, "torch")),
        (ops.batch_norm_finalize_backward.default, (torch.randn(4) * 10, torch.rand(4) * 50 + 30, 12, torch.rand(4),
                                                    1e-5, torch.randn(4), torch.randn(4), None, torch.randn(4),
                                                    "torch")),
        (ops.batch_norm_finalize_backward.default, (torch.randn(3, dtype=torch.float64),
                                                    torch.rand(3, dtype=torch.float64) + 3, 5, None, 1e-3, None,
                                                    torch.randn(3), torch.randn(3), None, "torch")),
        (ops.scale_shift.default, (torch.randn(2, 3, 4, 5, requires_grad=True), torch.randn(3, requires_grad=True),
                                   torch.randn(3, requires_grad=True), True, "torch")),
        (ops.scale_shift.default, (torch.randn(2, 4, 3, 3, dtype=torch.float64).contiguous(
            memory_format=torch.channels_last).requires_grad_(), torch.randn(4, dtype=torch.float64),
            torch.randn(4, dtype=torch.float64, requires_grad=True), False, "torch")),
        (ops.scale_shift.default, (torch.randn(2, 3, 4, 5, requires_grad=True), torch.randn(3, requires_grad=True),
                                   torch.randn(3), True, "torch"),
         dict(residual=torch.randn(2, 3, 4, 5, requires_grad=True))),
        (ops.scale_shift_backward.default, (torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5), torch.randn(3),
                                            torch.randn(3), True, "torch")),
        (ops.batch_norm_update_stats.default, (torch.zeros(4), torch.ones(4), torch.randn(4), torch.rand(4), None,
                                               9, 0.1, "torch")),
        (ops.batch_norm_update_stats.default, (torch.zeros(4, dtype=torch.bfloat16), torch.ones(4), torch.randn(4),
                                               torch.rand(4), torch.randn(4), 2, 1.0, "torch")),
        (ops.batch_norm_finalize.default, (torch.rand(4, requires_grad=True) * 10,
                                           torch.rand(4, requires_grad=True) * 50 + 30, 12, oscale, oshift, 1e-5,
                                           "torch"),
         dict(running_mean=torch.zeros(4), running_var=torch.ones(4), num_batches_tracked=torch.tensor(3),
              pre_bias=torch.randn(4), momentum=0.1)),
        (ops.max_pool2d.default, (torch.randn(2, 3, 7, 8, requires_grad=True), [3, 3], [2, 2], [1, 1], False, True,
                                  "torch")),
        (ops.max_pool2d.default, (xl, [3, 3], [2, 2], [0, 0], True, False, "torch")),
        (ops.max_pool2d.default, (torch.randn(2, 3, 7, 8), [2, 3], [2, 1], [1, 1], False, False, "torch")),
        (ops.max_pool2d.default, (xl.detach().requires_grad_(), [3, 3], [2, 2], [1, 1], False, True, "torch"),
         dict(scale=torch.randn(xl.shape[1], requires_grad=True), shift=torch.randn(xl.shape[1], requires_grad=True),
              residual=torch.randn(xl.shape[0], xl.shape[1], (xl.shape[2] + 1) // 2, (xl.shape[3] + 1) // 2,
                                   requires_grad=True))),
        (ops.max_pool2d_scale_shift_backward.default, (torch.randn(2, 3, 4, 3), ops.max_pool2d(
            torch.randn(2, 3, 7, 6), [3, 3], [2, 2], [1, 1], False, True, "torch")[1], torch.randn(2, 3, 7, 6),
            torch.randn(3), torch.randn(3), [3, 3], [2, 2], [1, 1], False, "torch")),
        (ops.max_pool2d_backward.default, (torch.randn(2, 3, 4, 3), ops.max_pool2d(
            torch.randn(2, 3, 7, 6), [3, 3], [2, 2], [1, 1], False, True, "torch")[1], [2, 3, 7, 6], [3, 3], [2, 2],
            [1, 1], False, "torch")),
    ]


@needs_ext
@pytest.mark.parametrize("index", range(23))
def test_opcheck(index):
    op, args, *kwargs = _opcheck_cases()[index]
    torch.library.opcheck(op, args, *kwargs)


@needs_ext
def test_every_op_has_an_opcheck_case():
    checked = {case[0]._schema.name.split("::")[1] for case in _opcheck_cases()}
    assert checked == set(_library.OPS)


@needs_ext
def test_differentiable_ops_run_no_python_code():
    """The ops' Autograd kernels are C++ (csrc/autograd.cpp): calling an op runs no Python of this package, whether
    it records a graph node or not (a Python kernel at the Autograd key cost ~35 us per separable_conv2d call, even
    under no_grad), and neither does the backward pass through them."""
    import sys

    package = os.path.dirname(xception_ops.__file__)

    def package_frames(fn):
        frames = []

        def profile(frame, event, arg):
            if event == "call" and frame.f_code.co_filename.startswith(package):
                frames.append(f"{frame.f_code.co_filename}:{frame.f_code.co_qualname}")

        sys.setprofile(profile)
        try:
            result = fn()
        finally:
            sys.setprofile(None)
        return frames, result

    x = torch.randn(1, 3, 5, 5, requires_grad=True)
    dw, pw = torch.randn(3, 1, 3, 3, requires_grad=True), torch.randn(4, 3, 1, 1, requires_grad=True)
    scale, shift = torch.rand(4, requires_grad=True), torch.randn(4, requires_grad=True)
    conv = ([1, 1], [1, 1, 1, 1], [1, 1])

    def forward():
        y, total, total_sq = ops.separable_conv2d(x, dw, pw, None, None, True, *conv, "none", None, None, None,
                                                  None, False, None, True, "torch")
        s, t, _, _ = ops.batch_norm_finalize(total, total_sq, 25, scale, shift, 1e-5, "torch")
        z = ops.scale_shift(y, s, t, True, "torch")
        return ops.depthwise_conv2d(z, torch.randn(4, 1, 3, 3), None, *conv, "torch")

    with torch.no_grad():
        assert package_frames(forward)[0] == []
    frames, out = package_frames(forward)
    assert frames == [] and out.requires_grad
    frames, _ = package_frames(lambda: out.sum().backward())
    assert frames == []
    assert x.grad is not None and dw.grad is not None and pw.grad is not None and scale.grad is not None


@needs_ext
def test_autograd_kernels_skip_torchs_per_call_argument_filling(monkeypatch):
    """Our Autograd kernels (C++, csrc/autograd.cpp) run forward, backward and double backward without
    torch.library's generic Python wrapper, whose fill_defaults cost ~55 us per separable_conv2d call."""
    import torch._library.utils as library_utils

    def fail(*args, **kwargs):
        raise AssertionError("torch.library's generic autograd wrapper ran")

    monkeypatch.setattr(library_utils, "fill_defaults", fail)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    dw = torch.randn(2, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    pw = torch.randn(3, 2, 1, 1, dtype=torch.float64)  # needs no gradient: its entry of needs_input_grad is False
    out, total, _ = ops.separable_conv2d(x, dw, pw, None, None, True, [1, 1], [1, 1, 1, 1], [1, 1], "none", None,
                                         None, None, None, False, None, True, "torch")
    grad_x, grad_dw = torch.autograd.grad(out.sum() + total.sum(), (x, dw), create_graph=True)
    want = to64(x, dw)
    ref, ref_total, _ = reference.separable_conv2d(want[0], want[1], pw, None, None, True, [1, 1], [1, 1, 1, 1],
                                                   [1, 1], "none", None, None, None, None, False, None, True)
    torch.testing.assert_close((grad_x, grad_dw),
                               torch.autograd.grad(ref.sum() + ref_total.sum(), want, create_graph=True))
    y = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    scale, shift = torch.rand(2, dtype=torch.float64), torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda y, shift: ops.scale_shift(y, scale, shift, False, "torch"),
                                        (y, shift))


# ---------------------------------------------------------------------------------------------- errors

def _api_call(name):
    def call(x, dw, pw, **kw):
        if name == "depthwise":
            return xception_ops.depthwise_conv2d(x, dw, kw.get("bias"), padding=kw.get("padding", 1),
                                                 backend=kw.get("backend", "torch"))
        return xception_ops.separable_conv2d(x, dw, pw, padding=kw.get("padding", 1),
                                             backend=kw.get("backend", "torch"), residual=kw.get("residual"),
                                             out_scale=kw.get("out_scale"))
    return call


def _op_call(name):
    def call(x, dw, pw, **kw):
        padding = kw.get("padding", 1)
        padding = [padding] * 4 if isinstance(padding, int) else list(padding)
        if name == "depthwise":
            return ops.depthwise_conv2d(x, dw, kw.get("bias"), [1, 1], padding, [1, 1], kw.get("backend", "torch"))
        return ops.separable_conv2d(x, dw, pw, None, None, False, [1, 1], padding, [1, 1], "none", None, None,
                                    kw.get("out_scale"), None, False, kw.get("residual"), False,
                                    kw.get("backend", "torch"))
    return call


CALLERS = [("api", "depthwise"), ("api", "separable"), ("op", "depthwise"), ("op", "separable")]


def _caller(kind, name):
    if kind == "op" and _library.EXTENSION is None:
        pytest.skip("compiled library not loaded")
    return (_api_call if kind == "api" else _op_call)(name)


def _good():
    return torch.randn(2, 4, 6, 6), torch.randn(4, 1, 3, 3), torch.randn(5, 4, 1, 1)


@pytest.mark.parametrize("kind,name", CALLERS)
def test_wrong_rank_is_a_value_error(kind, name):
    x, dw, pw = _good()
    with pytest.raises(ValueError, match="x must be a 4-D tensor"):
        _caller(kind, name)(x[0], dw, pw)


@pytest.mark.parametrize("kind,name", CALLERS)
def test_channel_mismatch_names_the_weight(kind, name):
    x, dw, pw = _good()
    with pytest.raises(ValueError, match="dw_weight has 3 output channels"):
        _caller(kind, name)(x, dw[:3], pw)


@pytest.mark.parametrize("kind", ["api", "op"])
def test_pointwise_channel_mismatch(kind):
    x, dw, pw = _good()
    with pytest.raises(ValueError, match="pw_weight has 3 input channels"):
        _caller(kind, "separable")(x, dw, pw[:, :3])


@pytest.mark.parametrize("kind,name", CALLERS)
def test_weight_on_another_device(kind, name):
    x, dw, pw = _good()
    with pytest.raises(ValueError, match="dw_weight is on meta but x is on cpu"):
        _caller(kind, name)(x, dw.to("meta"), pw)


@pytest.mark.parametrize("kind,name", CALLERS)
def test_unsupported_dtype_is_a_type_error(kind, name):
    x, dw, pw = _good()
    with pytest.raises(TypeError, match="x has dtype torch.int32|x has dtype Int"):
        _caller(kind, name)(x.int(), dw.int(), pw.int())
    with pytest.raises(TypeError, match="dw_weight has dtype"):
        _caller(kind, name)(x, dw.double(), pw)


@pytest.mark.parametrize("kind,name", CALLERS)
def test_kernel_larger_than_padded_input(kind, name):
    x, dw, pw = _good()
    with pytest.raises(ValueError, match="larger than the padded input 2x2"):
        _caller(kind, name)(x[:, :, :2, :2], dw, pw, padding=0)


@pytest.mark.parametrize("kind", ["api", "op"])
def test_residual_shape_mismatch(kind):
    x, dw, pw = _good()
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        _caller(kind, "separable")(x, dw, pw, residual=torch.randn(2, 5, 5, 6))
    with pytest.raises(ValueError, match="out_scale must have shape"):
        _caller(kind, "separable")(x, dw, pw, out_scale=torch.ones(4))


@pytest.mark.parametrize("kind,name", CALLERS)
def test_unknown_backend(kind, name):
    x, dw, pw = _good()
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        _caller(kind, name)(x, dw, pw, backend="cudnn")


@pytest.mark.parametrize("kind,name", CALLERS)
def test_cuda_backend_on_cpu_tensors_names_what_is_missing(kind, name):
    x, dw, pw = _good()
    with pytest.raises((ValueError, NotImplementedError), match="backend 'cuda'"):
        _caller(kind, name)(x, dw, pw, backend="cuda")


def test_environment_variable_overrides_auto(monkeypatch):
    x, dw, pw = _good()
    monkeypatch.setenv("XCEPTION_OPS_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="backend 'cuda'"):
        xception_ops.separable_conv2d(x, dw, pw, padding=1)
    # An explicit backend wins over the variable.
    xception_ops.separable_conv2d(x, dw, pw, padding=1, backend="torch")
    monkeypatch.setenv("XCEPTION_OPS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="XCEPTION_OPS_BACKEND='bogus' is not a backend"):
        xception_ops.separable_conv2d(x, dw, pw, padding=1)


def test_padding_spec_errors():
    x, dw, pw = _good()
    for bad in ("full", -1, (1, 2, 3), (1.5, 1)):
        with pytest.raises(ValueError, match="padding must be"):
            xception_ops.separable_conv2d(x, dw, pw, padding=bad)


def test_mid_activation_must_be_known():
    x, dw, pw = _good()
    with pytest.raises(ValueError, match="mid_activation must be 'none', 'relu', 'relu6', 'hardswish' or 'elu'"):
        xception_ops.separable_conv2d(x, dw, pw, padding=1, mid_activation="gelu")


def test_mid_vectors_have_one_value_per_depthwise_channel():
    """mid_scale / mid_shift: one float per depthwise output channel (C_in * multiplier), on x's device."""
    x, dw, pw = _good()
    k = dw.shape[0]
    for name in ("mid_scale", "mid_shift"):
        with pytest.raises(ValueError, match=rf"{name} must have shape \[{k}\]"):
            xception_ops.separable_conv2d(x, dw, pw, padding=1, **{name: torch.ones(k + 1)})
        with pytest.raises(TypeError, match=name):
            xception_ops.separable_conv2d(x, dw, pw, padding=1, **{name: torch.ones(k, dtype=torch.int32)})


@pytest.mark.parametrize("size,stride", list(itertools.product([5, 6, 7, 8], [1, 2, 3])))
def test_same_padding_gives_ceil_of_size_over_stride(size, stride):
    x, weight = torch.randn(1, 2, size, size), torch.randn(2, 1, 3, 3)
    out = xception_ops.depthwise_conv2d(x, weight, stride=stride, padding="same")
    assert out.shape[2:] == (-(-size // stride),) * 2
    top, bottom, _, _ = resolve_padding("same", (size, size), (3, 3), (stride, stride), (1, 1))
    assert bottom - top in (0, 1)  # TensorFlow puts the odd row at the end
    expected = F.conv2d(F.pad(x, (top, bottom, top, bottom)), weight, stride=stride, groups=2)
    torch.testing.assert_close(out, expected)


# Each check below runs in the compiled op (real CPU tensors) and in its fake kernel (meta tensors), which must
# agree: torch.compile sees the fake's errors, eager mode the op's.
DEVICES_OF_CHECKS = ["cpu", "meta"]


@needs_ext
@pytest.mark.parametrize("device", DEVICES_OF_CHECKS)
@pytest.mark.parametrize("name, value", [("stride", [2**62, 1]), ("padding", [0, 0, 2**40, 0]),
                                         ("dilation", [1, 2**62])])
def test_geometry_values_past_int32_are_refused(device, name, value):
    """2^62 as a dilation overflowed the span (dilation * (k - 1) + 1) in int64: an empty output on "triton" and
    oneDNN's error on "torch"; padding 2^40 an allocation error. Each value is bounded by 2^31 - 1 now."""
    x, dw = torch.randn(2, 4, 6, 6, device=device), torch.randn(4, 1, 3, 3, device=device)
    args = dict(stride=[1, 1], padding=[1, 1, 1, 1], dilation=[1, 1]) | {name: value}
    with pytest.raises(ValueError, match=rf"every value of {name} must be <= 2147483647"):
        ops.depthwise_conv2d(x, dw, None, args["stride"], args["padding"], args["dilation"], "torch")
    with pytest.raises(ValueError, match=rf"every value of {name} must be <= 2147483647"):
        ops.depthwise_conv2d_backward_input(torch.randn(2, 4, 6, 6, device=device), dw, [2, 4, 6, 6],
                                            args["stride"], args["padding"], args["dilation"], "torch")


@needs_ext
@pytest.mark.parametrize("device", DEVICES_OF_CHECKS)
def test_pool_kernel_sizes_whose_product_overflows_are_refused(device):
    """kernel_size 2^32 x 2^32 has 2^64 taps: the product wrapped to 0, under the 256-tap limit."""
    x = torch.randn(2, 4, 8, 8, device=device)
    with pytest.raises(ValueError, match="every value of kernel_size must be <= 2147483647"):
        ops.max_pool2d(x, [2**32, 2**32], [1, 1], [0, 0], False, False, "torch")
    with pytest.raises(ValueError, match="x has 0 channels"):
        ops.max_pool2d(torch.randn(2, 0, 8, 8, device=device), [2, 2], [2, 2], [0, 0], False, False, "torch")


def _backward_args(device):
    x = torch.randn(1, 2, 4, 4, device=device)
    dw, pw = torch.randn(2, 1, 3, 3, device=device), torch.randn(3, 2, 1, 1, device=device)
    return torch.randn(1, 3, 2, 2, device=device), x, dw, pw


@needs_ext
@pytest.mark.parametrize("device", DEVICES_OF_CHECKS)
@pytest.mark.parametrize("which", ["grad_sum", "grad_sumsq"])
def test_separable_backward_checks_the_statistics_gradients(device, which):
    """grad_sum / grad_sumsq were checked for their shape only: a tensor on another device (an illegal address on
    "cuda") or of an integer dtype gave garbage."""
    grad_out, x, dw, pw = _backward_args(device)

    def call(grad):
        grads = {"grad_sum": None, "grad_sumsq": None, which: grad}
        return ops.separable_conv2d_backward(grad_out, grads["grad_sum"], grads["grad_sumsq"], None, x, dw, pw,
                                             None, None, False, [1, 1], [0, 0, 0, 0], [1, 1], "none", None, None,
                                             None, None, False, "torch")

    other = "cpu" if device == "meta" else "meta"
    with pytest.raises(ValueError, match=rf"{which} is on {other} but x is on {device}"):
        call(torch.zeros(3, device=other))
    with pytest.raises(TypeError, match=rf"{which} has dtype"):
        call(torch.zeros(3, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match=rf"{which} must have shape \[3\]"):
        call(torch.zeros(4, device=device))


@needs_ext
@pytest.mark.parametrize("device", DEVICES_OF_CHECKS)
def test_depthwise_backward_ops_refuse_integer_tensors(device):
    """The forward refused them; the backward ops ran them (int64 results on "triton")."""
    g = torch.ones(2, 4, 6, 6, dtype=torch.int64, device=device)
    w = torch.ones(4, 1, 3, 3, dtype=torch.int64, device=device)
    with pytest.raises(TypeError, match="weight has dtype"):
        ops.depthwise_conv2d_backward_input(g, w, [2, 4, 6, 6], [1, 1], [1, 1, 1, 1], [1, 1], "torch")
    with pytest.raises(TypeError, match="x has dtype"):
        ops.depthwise_conv2d_backward_weight(g, g, [4, 1, 3, 3], [1, 1], [1, 1, 1, 1], [1, 1], "torch")


@needs_ext
@pytest.mark.parametrize("momentum", [1.5, -0.25])
def test_a_floating_point_value_in_an_error_is_printed_as_it_is(momentum):
    """Messages took a double as a one-element list of its integer part: "momentum ... got [1]"."""
    total, total_sq = torch.randn(3), torch.rand(3) + 1
    with pytest.raises(ValueError, match=rf"momentum must be in \[0, 1\], got {momentum}$"):
        ops.batch_norm_finalize(total, total_sq, 4, None, None, 1e-5, "torch", running_mean=torch.zeros(3),
                                running_var=torch.ones(3), momentum=momentum)


def _backends_here():
    """The kernel backends that can run here: triton (its interpreter on the CPU), cuda on a GPU."""
    out = []
    if _library.TRITON is not None:
        out.append(("triton", "cuda" if torch.cuda.is_available() else "cpu"))
    if torch.cuda.is_available() and _library.EXTENSION is not None and _library.EXTENSION.WITH_CUDA:
        out.append(("cuda", "cuda"))
    return out


@pytest.mark.parametrize("backend,device", _backends_here())
@pytest.mark.parametrize("where", ["in_relu", "mid_relu", "mid_relu6", "out_relu", "scale_shift_relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_relus_keep_nan_as_torch_does(backend, device, where, dtype):
    """A NaN reaching a fused ReLU / ReLU6 stays NaN (torch.relu keeps it), as on the reference path: fmaxf and
    tl.maximum's default turn it into 0, which would hide a diverged activation from the loss and from AMP's
    overflow check. The NaN positions of every output must be the reference's."""
    if dtype == torch.bfloat16 and backend == "triton" and device == "cpu":
        pytest.skip("bf16 Triton is checked on a GPU (the interpreter's bf16 is not the GPU's)")
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 8, 6, 7, generator=gen)
    x[0, 1, 2, 3] = x[1, 5, 0, 0] = float("nan")
    x = x.to(device, dtype).contiguous(memory_format=torch.channels_last)
    dw = torch.randn(8, 1, 3, 3, generator=gen).to(device, dtype)
    pw = torch.randn(16, 8, 1, 1, generator=gen).to(device, dtype)

    if where == "scale_shift_relu" and backend != "cuda":
        pytest.skip("the triton backend has no scale_shift kernel (its requests run the reference)")
    scale, shift = torch.rand(8, device=device) + 0.5, torch.randn(8, device=device)

    def run(b):
        if where == "scale_shift_relu":
            return [ops.scale_shift(x, scale, shift, True, b)]
        kwargs = dict(padding=1, in_relu=where == "in_relu", out_relu=where == "out_relu",
                      mid_activation={"mid_relu": "relu", "mid_relu6": "relu6"}.get(where))
        if where == "in_relu":  # the prologue's ReLU acts on x * in_scale + in_shift
            kwargs.update(in_scale=torch.ones(8, device=device), in_shift=torch.zeros(8, device=device))
        return [xception_ops.separable_conv2d(x, dw, pw, backend=b, **kwargs)]

    for got, want in zip(run(backend), run("torch")):
        assert torch.isnan(want).any()
        assert torch.equal(torch.isnan(got), torch.isnan(want)), where
        ok = ~torch.isnan(want)
        assert relative_error(got[ok], want[ok]) <= (1e-5 if dtype == torch.float32 else 2e-2)
