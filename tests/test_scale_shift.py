"""The BatchNorm applied (xception_ops.scale_shift): relu?(round(y * scale + shift)) per channel, and its backward
(xception_ops.scale_shift_backward).

Against PyTorch's own inference BatchNorm (what apply_scale_shift ran before), in float64 with gradcheck and
gradgradcheck, both layouts, argument errors; on a GPU the CUDA kernels against the reference path.
"""
import pytest
import torch
import torch.nn.functional as F

from xception_ops import _library, batchnorm

from .conftest import record_op_calls, relative_error, requires_gpu

OPS = torch.ops.xception_ops
needs_ext = pytest.mark.skipif(_library.EXTENSION is None, reason="the compiled library is not loaded")


def pytorch_batch_norm(y, scale, shift, relu):
    """The map as PyTorch's eval BatchNorm computes it (mean 0, var + eps = 1), then ReLU."""
    c = y.shape[1]
    eps = 2.0 ** -20
    z = F.batch_norm(y, torch.zeros(c, dtype=scale.dtype), torch.full((c,), 1 - eps, dtype=scale.dtype), scale,
                     shift, training=False, momentum=0.0, eps=eps)
    return torch.relu(z) if relu else z


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_matches_pytorch_batch_norm_forward_and_backward(dtype, channels_last, relu):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y = torch.randn(2, 6, 5, 7).to(dtype).contiguous(memory_format=fmt).requires_grad_()
    scale = (torch.rand(6) + 0.5).requires_grad_()
    shift = torch.randn(6).requires_grad_()
    grad = torch.randn(2, 6, 5, 7).to(dtype)
    got = OPS.scale_shift(y, scale, shift, relu, "torch")
    assert got.dtype == dtype and got.is_contiguous(memory_format=fmt)
    gots = torch.autograd.grad(got, (y, scale, shift), grad)
    want = pytorch_batch_norm(y, scale, shift, relu)
    wants = torch.autograd.grad(want, (y, scale, shift), grad)
    assert relative_error(got, want) <= (1e-6 if dtype == torch.float32 else 1e-2)
    for g, w in zip(gots, wants):
        assert relative_error(g, w) <= (1e-5 if dtype == torch.float32 else 1e-2)


@needs_ext
@pytest.mark.parametrize("relu", [False, True])
def test_gradients_match_finite_differences(relu):
    y = torch.randn(2, 3, 4, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    # Away from the ReLU's kink, where finite differences are not a derivative.
    scale, shift = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    z = y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    y = torch.where(z.abs() < 0.05, y + 0.2 / scale.view(1, -1, 1, 1), y)
    inputs = (y.requires_grad_(), scale.requires_grad_(), shift.requires_grad_())

    def fn(a, b, c):
        return OPS.scale_shift(a, b, c, relu, "torch")

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@needs_ext
def test_apply_scale_shift_takes_the_op():
    y, scale, shift = torch.randn(2, 4, 3, 3), torch.rand(4), torch.randn(4)
    residual = torch.randn(2, 4, 3, 3)
    with record_op_calls("scale_shift") as calls, record_op_calls("add") as adds:
        batchnorm.apply_scale_shift(y, scale, shift, relu=True)
        batchnorm.apply_scale_shift(y, scale, shift, residual=residual, relu=True)
    # The ReLU and the residual folded in: one op each, no separate add.
    assert [args[3:5] for args in calls] == [(True, "torch"), (True, "torch")]
    assert calls[0][5:] in ((), (None,)) and calls[1][5] is residual and adds == []


@needs_ext
@pytest.mark.parametrize("bad,match", [
    (dict(y=torch.zeros(2, 3, 4)), "y must be a 4-D tensor"),
    (dict(y=torch.zeros(2, 3, 4, 4, dtype=torch.int32)), "y"),
    (dict(scale=torch.ones(4)), r"scale must have shape \[3\]"),
    (dict(shift=torch.zeros(3, dtype=torch.float16)), "shift must be float32 or float64"),
    (dict(shift=torch.zeros(3, dtype=torch.float64)), "shift has dtype"),
    (dict(scale=torch.ones(3, device="meta")), "scale is on meta"),
    (dict(backend="nope"), "unknown backend"),
])
def test_bad_arguments_are_named(bad, match):
    args = dict(y=torch.zeros(2, 3, 4, 4), scale=torch.ones(3), shift=torch.zeros(3), relu=False, backend="torch")
    args.update(bad)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        OPS.scale_shift(*args.values())


@needs_ext
def test_backward_checks_the_gradient():
    y = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="grad must have shape"):
        OPS.scale_shift_backward(torch.zeros(2, 3, 4, 5), y, torch.ones(3), torch.zeros(3), False, "torch")


@pytest.mark.gpu
@requires_gpu
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("channels", [3, 8, 128, 728])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_kernels_match_the_reference(dtype, channels, channels_last):
    if "xception_ops.scale_shift" not in _library.EXTENSION.CUDA_OPS:
        pytest.skip("built without the CUDA kernels")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    y = torch.randn(3, channels, 9, 11, device="cuda").to(dtype).contiguous(memory_format=fmt)
    scale = torch.rand(channels, device="cuda", dtype=stats) + 0.5
    shift = torch.randn(channels, device="cuda", dtype=stats)
    grad = torch.randn(3, channels, 9, 11, device="cuda").to(dtype).contiguous(memory_format=fmt)
    for relu in (False, True):
        out = torch.full_like(y, float("nan"))
        out = OPS.scale_shift(y, scale, shift, relu, "cuda")
        want = OPS.scale_shift(y, scale, shift, relu, "torch")
        assert out.is_contiguous(memory_format=fmt)
        # Each element one rounding of the same value computed in float32 with or without an fma: the two may
        # differ by the float32 error of that value, and so by one ulp of the dtype where it lies near a rounding
        # boundary (fp16 / bf16; seen on an H100).
        magnitude = (y.double().abs() * scale.double().abs().view(1, -1, 1, 1) + shift.double().abs().view(1, -1, 1, 1))
        ulp = torch.finfo(dtype).eps * want.double().abs()
        assert ((out.double() - want.double()).abs() <= ulp + 4 * torch.finfo(stats).eps * magnitude).all()
        assert relative_error(out, want) <= (1e-6 if dtype in (torch.float32, torch.float64) else 1e-4)
        got_b = OPS.scale_shift_backward(grad, y, scale, shift, relu, "cuda")
        want_b = OPS.scale_shift_backward(grad, y, scale, shift, relu, "torch")
        for g, w in zip(got_b, want_b):
            assert g.dtype == w.dtype and relative_error(g, w) <= 1e-5
        # Each output in memory of its own (an op's outputs must not alias: the sums of scale and shift came from
        # one buffer once).
        assert got_b[1].untyped_storage().data_ptr() != got_b[2].untyped_storage().data_ptr()


@needs_ext
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, requires_gpu])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("relu", [False, True])
def test_residual_joins_the_pass_bit_for_bit(device, dtype, relu):
    """scale_shift(..., residual=r) is round(y * scale + shift) + r (rounded in y's dtype), then the ReLU: what the
    op followed by PyTorch's add and relu gives, in one pass; and the same gradients, the residual's through the
    ReLU's mask of the sum."""
    backend = "cuda" if device == "cuda" else "torch"
    fmt = torch.channels_last
    y = torch.randn(2, 16, 5, 7, device=device).to(dtype).contiguous(memory_format=fmt).requires_grad_()
    r = torch.randn(2, 16, 5, 7, device=device).to(dtype).contiguous(memory_format=fmt).requires_grad_()
    scale = (torch.rand(16, device=device) + 0.5).requires_grad_()
    shift = torch.randn(16, device=device).requires_grad_()
    with record_op_calls("scale_shift") as calls:
        got = OPS.scale_shift(y, scale, shift, relu, backend, residual=r)
    assert calls[0][-1] is r and got.is_contiguous(memory_format=fmt)
    want = OPS.scale_shift(y, scale, shift, False, backend) + r
    want = torch.relu(want) if relu else want
    assert torch.equal(got, want)
    grad = torch.randn_like(got)
    gots = torch.autograd.grad(got, (y, scale, shift, r), grad)
    wants = torch.autograd.grad(want, (y, scale, shift, r), grad)
    for g, w in zip(gots, wants):
        assert torch.equal(g, w)


@needs_ext
def test_residual_gradients_match_finite_differences():
    y = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    r = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    scale, shift = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    z = y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1) + r
    r = torch.where(z.abs() < 0.05, r + 0.2, r)  # away from the ReLU's kink
    inputs = tuple(t.requires_grad_() for t in (y, scale, shift, r))

    def fn(a, b, c, d):
        return OPS.scale_shift(a, b, c, True, "torch", residual=d)

    assert torch.autograd.gradcheck(fn, inputs)


@needs_ext
@pytest.mark.parametrize("residual,error,match", [
    (torch.zeros(2, 3, 4, 4), ValueError, "residual must have shape"),
    (torch.zeros(2, 3, 4, 5, dtype=torch.float64), TypeError, "residual has dtype"),
])
def test_bad_residual_is_named(residual, error, match):
    y = torch.randn(2, 3, 4, 5)
    with pytest.raises(error, match=match):
        OPS.scale_shift(y, torch.ones(3), torch.zeros(3), False, "torch", residual=residual)
