"""Max pooling (xception_ops.max_pool2d, its backward, xception_ops.pooling, MaxPool2dSame's backend) on the CPU:
the reference op against PyTorch's pooling (values, the argmax as tap indices, gradients, bit for bit), autograd
and the codes it saves, the argument errors of both the compiled op and its fake kernel, and backend routing.
The CUDA kernels are tested in test_cuda_pooling.py (GPU) and tests/cpp/test_pool_emulated.cpp (CPU)."""
import pytest
import torch
import torch.nn.functional as F

from xception_ops import _library, backend as backends, checks, pooling
from xception_ops.models import MaxPool2dSame

from .conftest import record_op_calls

OPS = torch.ops.xception_ops
needs_ext = pytest.mark.skipif(_library.EXTENSION is None, reason="the compiled library is not loaded")

# (shape, kernel, stride, padding, ceil_mode): Xception's "same" pools at odd and even sizes, and others.
GEOMETRIES = [
    ((2, 5, 9, 7), (3, 3), (2, 2), (1, 1), False),
    ((1, 4, 8, 10), (3, 3), (2, 2), (0, 0), True),
    ((2, 3, 6, 6), (2, 2), (2, 2), (0, 0), False),
    ((1, 3, 9, 8), (5, 3), (3, 2), (2, 1), True),
    ((2, 2, 3, 11), (3, 2), (2, 1), (1, 1), True),
    ((1, 8, 2, 5), (3, 3), (2, 2), (0, 0), True),  # ceil mode: a 2-row input, one 3-row window starting in it
]


def tie_heavy(shape, dtype, fmt):
    """Few distinct values (ties in most windows), with NaN and -inf sprinkled in."""
    x = torch.randint(-2, 3, shape).to(dtype)
    r = torch.rand(shape)
    x = torch.where(r < 0.03, torch.full_like(x, float("nan")), x)
    x = torch.where((r >= 0.03) & (r < 0.08), torch.full_like(x, float("-inf")), x)
    return x.contiguous(memory_format=fmt)


def codes_from_indices(index, shape, kernel, stride, padding):
    """PyTorch's flat argmax ih * W + iw as the window's tap index ky * kernel_w + kx."""
    oh = torch.arange(index.shape[2]).view(-1, 1) * stride[0] - padding[0]
    ow = torch.arange(index.shape[3]).view(1, -1) * stride[1] - padding[1]
    return (index // shape[3] - oh) * kernel[1] + (index % shape[3] - ow)


def same_bits(a, b):
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_reference_op_is_pytorchs_pooling(geometry, dtype, channels_last):
    shape, kernel, stride, padding, ceil_mode = geometry
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = tie_heavy(shape, dtype, fmt)
    want, index = F.max_pool2d(x, kernel, stride, padding, ceil_mode=ceil_mode, return_indices=True)
    out, argmax = OPS.max_pool2d(x, kernel, stride, padding, ceil_mode, True, "torch")
    assert same_bits(out, want) and out.is_contiguous(memory_format=checks.output_memory_format(x))
    assert argmax.dtype == torch.uint8 and argmax.is_contiguous(memory_format=checks.output_memory_format(x))
    assert torch.equal(argmax.long(), codes_from_indices(index, shape, kernel, stride, padding))

    grad = torch.randn(want.shape).to(dtype)
    want_grad = torch.ops.aten.max_pool2d_with_indices_backward(grad, x, kernel, stride, padding, [1, 1], ceil_mode,
                                                                 index)
    got_grad = OPS.max_pool2d_backward(grad, argmax, list(shape), kernel, stride, padding, ceil_mode, "torch")
    assert torch.equal(got_grad, want_grad) and got_grad.is_contiguous(memory_format=checks.output_memory_format(x))


@needs_ext
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_windows_of_only_minus_infinity_point_at_their_first_tap_inside_the_image(geometry):
    shape, kernel, stride, padding, ceil_mode = geometry
    x = torch.full(shape, float("-inf"))
    want, index = F.max_pool2d(x, kernel, stride, padding, ceil_mode=ceil_mode, return_indices=True)
    out, argmax = OPS.max_pool2d(x, kernel, stride, padding, ceil_mode, True, "torch")
    codes = codes_from_indices(index, shape, kernel, stride, padding)
    assert torch.equal(out, want) and torch.equal(argmax.long(), codes)
    # The first tap inside the image: (ky0, kx0) with ky0 = max(0, pad - oh * stride) (and for kx0).
    ky0 = (padding[0] - torch.arange(want.shape[2]) * stride[0]).clamp_min(0).view(-1, 1)
    kx0 = (padding[1] - torch.arange(want.shape[3]) * stride[1]).clamp_min(0).view(1, -1)
    assert torch.equal(argmax.long()[0, 0], ky0 * kernel[1] + kx0)


@needs_ext
def test_without_save_argmax_the_codes_are_empty_unless_autograd_needs_them():
    x = torch.randn(2, 3, 7, 7)
    out, argmax = OPS.max_pool2d(x, [3, 3], [2, 2], [1, 1], False, False, "torch")
    assert argmax.shape == (0,) and argmax.dtype == torch.uint8
    _, argmax = OPS.max_pool2d(x.requires_grad_(), [3, 3], [2, 2], [1, 1], False, False, "torch")
    assert argmax.shape == out.shape  # the node's backward needs them
    with torch.no_grad():
        _, argmax = OPS.max_pool2d(x, [3, 3], [2, 2], [1, 1], False, False, "torch")
    assert argmax.shape == (0,)


@needs_ext
@pytest.mark.parametrize("channels_last", [False, True])
def test_autograd_calls_the_backward_op_with_the_saved_codes(channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = tie_heavy((2, 4, 9, 9), torch.float32, fmt).nan_to_num(0.0, 0.0, -5.0).requires_grad_()
    out, argmax = OPS.max_pool2d(x, [3, 3], [2, 2], [0, 0], True, False, "torch")
    assert not argmax.requires_grad
    grad = torch.randn(out.shape)
    with record_op_calls("max_pool2d_backward") as calls:
        (got,) = torch.autograd.grad(out, x, grad)
    assert len(calls) == 1 and torch.equal(calls[0][1], argmax)
    want = F.max_pool2d(x, 3, 2, 0, ceil_mode=True)
    (want_grad,) = torch.autograd.grad(want, x, grad)
    assert torch.equal(got, want_grad) and got.is_contiguous(memory_format=fmt)


@needs_ext
def test_gradients_match_finite_differences():
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    x = (x + torch.arange(x.numel(), dtype=torch.float64).view(x.shape) * 1e-3).requires_grad_()  # no ties

    def fn(t):
        return OPS.max_pool2d(t, [3, 3], [2, 2], [1, 1], True, True, "torch")[0]

    assert torch.autograd.gradcheck(fn, (x,))


@needs_ext
@pytest.mark.parametrize("args, error, match", [
    (((2, 3, 7), [3, 3], [2, 2], [1, 1]), ValueError, "x must be a 4-D tensor"),
    (((2, 3, 7, 7), [3], [2, 2], [1, 1]), ValueError, "kernel_size must have 2 values"),
    (((2, 3, 7, 7), [3, 3], [0, 2], [1, 1]), ValueError, "every value of stride must be >= 1"),
    (((2, 3, 7, 7), [3, 3], [2, 2], [2, 1]), ValueError, "padding must be at most half of kernel_size"),
    (((2, 3, 40, 40), [17, 17], [1, 1], [0, 0]), ValueError, "more than 256 taps"),
    (((2, 3, 2, 7), [3, 3], [2, 2], [0, 0]), ValueError, "the output would be empty"),
])
def test_argument_errors_name_the_argument(args, error, match):
    shape, kernel, stride, padding = args
    x = torch.randn(shape)
    with pytest.raises(error, match=match):
        OPS.max_pool2d(x, kernel, stride, padding, False, False, "torch")
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode, pytest.raises(error, match=match):
        OPS.max_pool2d(mode.from_tensor(x), kernel, stride, padding, False, False, "torch")


@needs_ext
def test_integer_input_and_bad_codes_raise():
    with pytest.raises(TypeError, match="x has dtype"):
        OPS.max_pool2d(torch.zeros(1, 1, 4, 4, dtype=torch.int32), [2, 2], [2, 2], [0, 0], False, False, "torch")
    grad = torch.randn(1, 2, 2, 2)
    with pytest.raises(TypeError, match="argmax must be uint8"):
        OPS.max_pool2d_backward(grad, torch.zeros(1, 2, 2, 2, dtype=torch.int64), [1, 2, 4, 4], [2, 2], [2, 2],
                                [0, 0], False, "torch")
    with pytest.raises(ValueError, match="argmax must have shape"):
        OPS.max_pool2d_backward(grad, torch.zeros(1, 2, 3, 2, dtype=torch.uint8), [1, 2, 4, 4], [2, 2], [2, 2],
                                [0, 0], False, "torch")
    with pytest.raises(ValueError, match="grad_out must have shape"):
        OPS.max_pool2d_backward(grad, torch.zeros(1, 2, 2, 2, dtype=torch.uint8), [1, 2, 6, 4], [2, 2], [2, 2],
                                [0, 0], False, "torch")


@needs_ext
def test_codes_that_name_no_tap_inside_the_image_add_nothing():
    """Codes not from a forward (past the window, or a tap in the padding) must not write out of bounds: on every
    backend they add nothing, as the kernels' gather finds no input they name."""
    x = torch.randn(1, 2, 5, 5)
    out, codes = OPS.max_pool2d(x, [3, 3], [2, 2], [1, 1], False, True, "torch")
    bad = codes.clone()
    bad[0, 0, 0, 0] = 0    # the window's corner (-1, -1): in the padding
    bad[0, 1, 1, 1] = 200  # past the window's 9 taps
    grad = torch.randn(out.shape)
    got = OPS.max_pool2d_backward(grad, bad, [1, 2, 5, 5], [3, 3], [2, 2], [1, 1], False, "torch")
    masked = grad.clone()
    masked[0, 0, 0, 0] = masked[0, 1, 1, 1] = 0
    want = OPS.max_pool2d_backward(masked, codes, [1, 2, 5, 5], [3, 3], [2, 2], [1, 1], False, "torch")
    assert torch.equal(got, want)


def test_functional_api_on_torch_is_pytorchs_pooling():
    x = tie_heavy((2, 3, 9, 8), torch.float32, torch.channels_last).requires_grad_()
    got = pooling.max_pool2d(x, 3, 2, 1, backend="torch")
    want = F.max_pool2d(x, 3, 2, 1)
    assert same_bits(got, want)
    assert pooling.max_pool2d(x, (3, 3), None, (0, 0), True, backend="auto").shape == (2, 3, 3, 3)  # stride 3
    with pytest.raises(backends.BackendUnavailableError, match="backend 'cuda' cannot run"):
        pooling.max_pool2d(x, 3, 2, 1, backend="cuda")


def test_pool_output_size_follows_pytorch():
    """Where PyTorch refuses the window (no output) the size is 0; in ceil mode an input shorter than the window
    still has one when the window starts inside it (size 2, kernel 3, stride 2), which a first version gave 0."""
    for size in range(1, 30):
        for kernel, stride, pad in [(3, 2, 1), (3, 2, 0), (2, 2, 0), (5, 3, 2), (3, 1, 1), (3, 1, 0), (4, 3, 0)]:
            for ceil_mode in (False, True):
                try:
                    want = F.max_pool2d(torch.zeros(1, 1, size, 1), (kernel, 1), (stride, 1), (pad, 0),
                                        ceil_mode=ceil_mode).shape[2]
                except RuntimeError:
                    want = 0
                assert checks.pool_out_size(size, kernel, stride, pad, ceil_mode) == want, (size, kernel, stride,
                                                                                          pad, ceil_mode)


@pytest.mark.skipif(_library.EXTENSION is None, reason="compiled library not loaded")
@pytest.mark.parametrize("size", [1, 2, 3])
def test_ceil_mode_windows_longer_than_the_input(size):
    """The op (C++ checks: csrc/kernels/pool_geometry.h) pools what PyTorch pools, and refuses what it refuses."""
    x = torch.randn(2, 3, size, size + 1)
    for kernel, stride in [(3, 2), (4, 3), (3, 1)]:
        try:
            want = F.max_pool2d(x, kernel, stride, 0, ceil_mode=True)
        except RuntimeError:
            with pytest.raises(ValueError, match="the output would be empty"):
                torch.ops.xception_ops.max_pool2d(x, [kernel] * 2, [stride] * 2, [0, 0], True, False, "torch")
            continue
        got, _ = torch.ops.xception_ops.max_pool2d(x, [kernel] * 2, [stride] * 2, [0, 0], True, False, "torch")
        assert torch.equal(got, want), (kernel, stride)


def test_xception_pool_checks_its_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        MaxPool2dSame(3, 2, "same", backend="cudnn")


# ---- the pending BatchNorm (scale, shift) and the shortcut (residual) in the pool's one pass ----

def affine_args(channels, dtype=torch.float32, exact=False, generator=None):
    """A BatchNorm's scale and shift, negative scales included (they swap which tap is the maximum). exact: scales
    that are powers of two, so that x * scale is exact and fma and mul + add round alike (the backends' fma against
    the reference's two float32 steps, bit for bit)."""
    if exact:
        magnitude = 2.0 ** torch.randint(-2, 3, (channels,), generator=generator).to(dtype)
        scale = magnitude * torch.where(torch.rand(channels, generator=generator) < 0.3, -1.0, 1.0).to(dtype)
    else:
        scale = torch.randn(channels, generator=generator, dtype=dtype)
    return scale, torch.randn(channels, generator=generator, dtype=dtype)


def composed(x, scale, shift, residual, kernel, stride, padding, ceil_mode):
    """The definition on the reference ops: scale_shift, then the pool, then the add."""
    z = OPS.scale_shift(x, scale, shift, False, "torch") if scale is not None else x
    out, codes = OPS.max_pool2d(z, kernel, stride, padding, ceil_mode, True, "torch")
    return (out if residual is None else out + residual), codes


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("geometry", GEOMETRIES[:3], ids=str)
@pytest.mark.parametrize("extras", ["bn", "residual", "both"])
def test_reference_op_pools_the_normalized_values_and_adds_the_residual(geometry, dtype, channels_last, extras):
    shape, kernel, stride, padding, ceil_mode = geometry
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = tie_heavy(shape, dtype, fmt)
    out_shape = checks.check_max_pool2d("t", x, "x", shape, kernel, stride, padding, ceil_mode)
    vectors = torch.float64 if dtype == torch.float64 else torch.float32  # (the math runs in their dtype)
    scale, shift = affine_args(shape[1], vectors) if extras != "residual" else (None, None)
    residual = torch.randn(out_shape).to(dtype) if extras != "bn" else None
    out, codes = OPS.max_pool2d(x, kernel, stride, padding, ceil_mode, True, "torch", scale=scale, shift=shift,
                                residual=residual)
    want, want_codes = composed(x, scale, shift, residual, kernel, stride, padding, ceil_mode)
    assert same_bits(out, want) and torch.equal(codes, want_codes)
    assert out.is_contiguous(memory_format=checks.output_memory_format(x))
    # Against the definition in float64 (x's values normalized, then rounded to x's dtype as the BatchNorm's output).
    z = x.double() if scale is None else (x.double() * scale.double()[:, None, None] + shift.double()[:, None, None])
    z = z.to(dtype).double() if scale is not None and dtype != torch.float64 else z
    pooled = F.max_pool2d(z, kernel, stride, padding, ceil_mode=ceil_mode)
    definition = pooled if residual is None else pooled + residual.double()
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    finite = torch.isfinite(definition)
    assert torch.equal(torch.isnan(out), torch.isnan(definition))
    torch.testing.assert_close(out.double()[finite], definition[finite], rtol=tol, atol=tol)


@needs_ext
def test_extras_gradients_match_finite_differences():
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    x = (x + torch.arange(x.numel(), dtype=torch.float64).view(x.shape) * 1e-3).requires_grad_()  # no ties
    scale = torch.tensor([1.5, -0.75, 2.0], dtype=torch.float64, requires_grad=True)
    shift = torch.randn(3, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)

    def fn(t, s, b, r):
        return OPS.max_pool2d(t, [3, 3], [2, 2], [1, 1], True, True, "torch", scale=s, shift=b, residual=r)[0]

    assert torch.autograd.gradcheck(fn, (x, scale, shift, residual))


@needs_ext
@pytest.mark.parametrize("channels_last", [False, True])
def test_extras_backward_is_the_pools_then_scale_shifts(channels_last):
    """The node's gradients: the pool's backward of the normalized values, then scale_shift_backward's, in one op
    (max_pool2d_scale_shift_backward); the residual's gradient is grad_out itself. Bit for bit against autograd
    through the three separate ops."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 4, 9, 9).contiguous(memory_format=fmt).requires_grad_()
    scale, shift = (t.requires_grad_() for t in affine_args(4))
    residual = torch.randn(2, 4, 5, 5).requires_grad_()
    out, _ = OPS.max_pool2d(x, [3, 3], [2, 2], [1, 1], False, False, "torch", scale=scale, shift=shift,
                            residual=residual)
    grad = torch.randn(out.shape)
    with record_op_calls("max_pool2d_scale_shift_backward") as calls:
        got = torch.autograd.grad(out, (x, scale, shift, residual), grad)
    assert len(calls) == 1 and calls[0][2] is not None and calls[0][-1] == "torch"
    z = OPS.scale_shift(x, scale, shift, False, "torch")
    want_out = OPS.max_pool2d(z, [3, 3], [2, 2], [1, 1], False, True, "torch")[0] + residual
    assert torch.equal(out, want_out)
    want = torch.autograd.grad(want_out, (x, scale, shift, residual), grad)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert got[0].is_contiguous(memory_format=fmt)


@needs_ext
def test_extras_without_a_gradient_record_no_node():
    x = torch.randn(1, 2, 5, 5)
    scale, shift = affine_args(2)
    out, codes = OPS.max_pool2d(x, [3, 3], [2, 2], [1, 1], False, False, "torch", scale=scale, shift=shift)
    assert out.grad_fn is None and codes.shape == (0,)
    out, codes = OPS.max_pool2d(x, [3, 3], [2, 2], [1, 1], False, False, "torch", scale=scale.requires_grad_(),
                                shift=shift)
    assert out.grad_fn is not None and codes.shape == out.shape


@needs_ext
@pytest.mark.parametrize("kwargs, error, match", [
    (lambda c: {"scale": torch.ones(c)}, ValueError, "scale and shift come together.*got scale alone"),
    (lambda c: {"shift": torch.ones(c)}, ValueError, "scale and shift come together.*got shift alone"),
    (lambda c: {"scale": torch.ones(c + 1), "shift": torch.ones(c + 1)}, ValueError,
     r"scale must have shape \[3\] \(x's channels\)"),
    (lambda c: {"scale": torch.ones(c, dtype=torch.float16), "shift": torch.ones(c, dtype=torch.float16)},
     TypeError, "scale must be float32 or float64"),
    (lambda c: {"scale": torch.ones(c), "shift": torch.ones(c, dtype=torch.float64)}, TypeError,
     "shift has dtype (torch.float64|Double) but scale has dtype (torch.float32|Float)"),
    (lambda c: {"residual": torch.ones(2, c, 7, 7)}, ValueError, r"residual must have shape \[2, 3, 4, 4\]"),
    (lambda c: {"residual": torch.ones(2, c, 4, 4, dtype=torch.float64)}, TypeError, "residual has dtype"),
])
def test_extras_errors_name_the_argument(kwargs, error, match):
    x = torch.randn(2, 3, 7, 7)
    with pytest.raises(error, match=match):
        OPS.max_pool2d(x, [3, 3], [2, 2], [1, 1], False, False, "torch", **kwargs(3))
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode, pytest.raises(error, match=match):
        fake = {k: mode.from_tensor(v) for k, v in kwargs(3).items()}
        OPS.max_pool2d(mode.from_tensor(x), [3, 3], [2, 2], [1, 1], False, False, "torch", **fake)


def test_functional_extras_on_torch_are_the_separate_ops():
    x = torch.randn(2, 3, 9, 8).contiguous(memory_format=torch.channels_last)
    scale, shift = affine_args(3)
    residual = torch.randn(2, 3, 5, 4)
    got = pooling.max_pool2d(x, 3, 2, 1, backend="torch", scale=scale, shift=shift, residual=residual)
    from xception_ops import batchnorm
    want = F.max_pool2d(batchnorm.apply_scale_shift(x, scale, shift), 3, 2, 1) + residual
    assert same_bits(got, want)
    with pytest.raises(ValueError, match="scale and shift come together"):
        pooling.max_pool2d(x, 3, 2, 1, backend="torch", scale=scale)
    with pytest.raises(ValueError, match=r"residual must have shape \[2, 3, 5, 4\]"):  # no broadcasting
        pooling.max_pool2d(x, 3, 2, 1, backend="torch", residual=residual[:1])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_scale_shift_backward_op_is_the_two_backwards(dtype, channels_last):
    """The reference op against max_pool2d_backward then scale_shift_backward, bit for bit, in x's layout."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 5, 9, 8).to(dtype).contiguous(memory_format=fmt)
    vectors = torch.float64 if dtype == torch.float64 else torch.float32
    scale, shift = affine_args(5, vectors)
    args = ([3, 3], [2, 2], [1, 1], True)
    out, codes = OPS.max_pool2d(x, *args, True, "torch", scale=scale, shift=shift)
    grad = torch.randn(out.shape).to(dtype)
    got = OPS.max_pool2d_scale_shift_backward(grad, codes, x, scale, shift, *args, "torch")
    grad_z = OPS.max_pool2d_backward(grad, codes, list(x.shape), *args, "torch")
    want = OPS.scale_shift_backward(grad_z, x, scale, shift, False, "torch")
    for g, w in zip(got, want):
        assert torch.equal(g, w) and g.dtype == w.dtype
    assert got[0].is_contiguous(memory_format=fmt)


@needs_ext
@pytest.mark.parametrize("change, error, match", [
    ({"codes": torch.zeros(2, 3, 4, 4, dtype=torch.int64)}, TypeError, "argmax must be uint8"),
    ({"codes": torch.zeros(2, 3, 3, 4, dtype=torch.uint8)}, ValueError, "argmax must have shape"),
    ({"grad": torch.zeros(2, 3, 4, 3)}, ValueError, "grad_out must have shape"),
    ({"grad": torch.zeros(2, 3, 4, 4, dtype=torch.float64)}, TypeError, "grad_out has dtype"),
    ({"scale": torch.ones(4)}, ValueError, r"scale must have shape \[3\] \(x's channels\)"),
    ({"shift": torch.ones(3, dtype=torch.float64)}, TypeError, "shift has dtype"),
])
def test_scale_shift_backward_op_errors_name_the_argument(change, error, match):
    x = torch.randn(2, 3, 7, 7)
    args = {"grad": torch.randn(2, 3, 4, 4), "codes": torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "x": x,
            "scale": torch.ones(3), "shift": torch.zeros(3)}
    args.update(change)
    geometry = ([3, 3], [2, 2], [1, 1], False)
    with pytest.raises(error, match=match):
        OPS.max_pool2d_scale_shift_backward(*args.values(), *geometry, "torch")
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode, pytest.raises(error, match=match):
        OPS.max_pool2d_scale_shift_backward(*(mode.from_tensor(t) for t in args.values()), *geometry, "torch")
