"""GPU tests of the "cuda" backend's max pooling (csrc/kernels/pool.cuh).

The kernels pick the same tap as PyTorch's (the first maximum, the last NaN, the first tap inside the image when all
are -inf) and add the gradients in PyTorch's order and precision, so everything is compared bit for bit with
PyTorch's own CUDA pooling (F.max_pool2d, its argmax turned into tap indices, and its backward), and the values with
float64. Inputs take few distinct values (ties in most windows) with NaN and -inf; outputs are poisoned with NaN
through the caching allocator before every call."""

import pytest
import torch
import torch.nn.functional as F

from xception_ops import pooling
from xception_ops.models import MaxPool2dSame

from .conftest import GPU_MARKS, poison, record_op_calls, require_cuda_kernel
from .test_pooling import codes_from_indices, same_bits, tie_heavy

pytestmark = GPU_MARKS
require_cuda_kernel("max_pool2d")

OPS = torch.ops.xception_ops
DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (shape, kernel, stride, padding, ceil_mode): Xception's four pools at batch 2 (147 -> 74 symmetric, 74 -> 37 and
# 38 -> 19 in ceil mode, 19 -> 10), odd channel counts (the scalar path), batch 1, other geometries.
GEOMETRIES = [
    ((2, 128, 147, 147), (3, 3), (2, 2), (1, 1), False),
    ((2, 256, 74, 74), (3, 3), (2, 2), (0, 0), True),
    ((2, 728, 37, 37), (3, 3), (2, 2), (1, 1), False),
    ((1, 1024, 19, 19), (3, 3), (2, 2), (1, 1), False),
    ((3, 13, 17, 22), (3, 3), (2, 2), (0, 0), True),
    ((1, 24, 9, 8), (5, 3), (3, 2), (2, 1), True),
    ((2, 12, 11, 7), (2, 2), (2, 2), (1, 0), False),
    ((1, 6, 5, 5), (3, 3), (1, 1), (1, 1), False),
    ((1, 8, 2, 5), (3, 3), (2, 2), (0, 0), True),  # ceil mode: a 2-row input, one 3-row window starting in it
]


def layout_of(name):
    return torch.channels_last if name == "channels_last" else torch.contiguous_format


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_forward_and_backward_are_pytorchs_bits(geometry, dtype, layout):
    shape, kernel, stride, padding, ceil_mode = geometry
    fmt = layout_of(layout)
    x = tie_heavy(shape, dtype, fmt).to(DEV)
    want, index = F.max_pool2d(x, kernel, stride, padding, ceil_mode=ceil_mode, return_indices=True)
    poison(want.shape, dtype)
    out, argmax = OPS.max_pool2d(x, kernel, stride, padding, ceil_mode, True, "cuda")
    assert out.is_contiguous(memory_format=fmt) and argmax.is_contiguous(memory_format=fmt)
    assert same_bits(out, want), "pooled values differ from PyTorch's"
    assert torch.equal(argmax.long(), codes_from_indices(index, shape, kernel, stride, padding))
    # float64: the maximum of each window (NaN where PyTorch's is).
    want64 = F.max_pool2d(x.double(), kernel, stride, padding, ceil_mode=ceil_mode)
    assert same_bits(out.double(), want64)

    poison(want.shape, dtype)
    plain, none = OPS.max_pool2d(x, kernel, stride, padding, ceil_mode, False, "cuda")
    assert none.numel() == 0 and same_bits(plain, want)

    grad = torch.randn(want.shape, device=DEV).to(dtype).contiguous(memory_format=fmt)
    want_grad = torch.ops.aten.max_pool2d_with_indices_backward(grad, x, kernel, stride, padding, [1, 1], ceil_mode,
                                                                index)
    poison(x.shape, dtype)
    got_grad = OPS.max_pool2d_backward(grad, argmax, list(shape), kernel, stride, padding, ceil_mode, "cuda")
    assert got_grad.is_contiguous(memory_format=fmt)
    assert torch.equal(got_grad, want_grad), "gradient differs from PyTorch's"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_windows_of_only_minus_infinity_keep_their_first_tap_inside_the_image(layout, dtype):
    for shape, kernel, stride, padding, ceil_mode in GEOMETRIES[4:]:
        x = torch.full(shape, float("-inf"), device=DEV, dtype=dtype).contiguous(memory_format=layout_of(layout))
        want, index = F.max_pool2d(x, kernel, stride, padding, ceil_mode=ceil_mode, return_indices=True)
        out, argmax = OPS.max_pool2d(x, kernel, stride, padding, ceil_mode, True, "cuda")
        assert torch.equal(out, want)
        assert torch.equal(argmax.long(), codes_from_indices(index, shape, kernel, stride, padding))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_autograd_with_an_expanded_and_a_transposed_gradient(layout):
    """The backward reads grad_out through its strides (the scalar path): the expanded ones of out.sum() and a
    gradient in the other layout."""
    fmt = layout_of(layout)
    x = tie_heavy((2, 16, 15, 15), torch.bfloat16, fmt).to(DEV).nan_to_num(0.0, 0.0, -3.0).requires_grad_()
    out = pooling.max_pool2d(x, 3, 2, 1, backend="cuda")
    (got,) = torch.autograd.grad(out.sum(), x)
    (want,) = torch.autograd.grad(F.max_pool2d(x, 3, 2, 1).sum(), x)
    assert torch.equal(got, want) and got.is_contiguous(memory_format=fmt)
    other = torch.contiguous_format if layout == "channels_last" else torch.channels_last
    grad = torch.randn(out.shape, device=DEV).to(torch.bfloat16).contiguous(memory_format=other)
    (got,) = torch.autograd.grad(pooling.max_pool2d(x, 3, 2, 1, backend="cuda"), x, grad)
    (want,) = torch.autograd.grad(F.max_pool2d(x, 3, 2, 1), x, grad)
    assert torch.equal(got, want)


def test_codes_that_name_no_tap_inside_the_image_add_nothing():
    """Codes not from a forward write nothing out of bounds and add nothing, as on the reference path."""
    x = torch.randn(1, 16, 9, 9, device=DEV)
    out, codes = OPS.max_pool2d(x, [3, 3], [2, 2], [1, 1], False, True, "cuda")
    bad = codes.clone()
    bad[0, :, 0, 0] = 0      # taps in the padding
    bad[0, :8, 2, 3] = 250   # past the window
    grad = torch.randn(out.shape, device=DEV)
    args = ([1, 16, 9, 9], [3, 3], [2, 2], [1, 1], False)
    assert torch.equal(OPS.max_pool2d_backward(grad, bad, *args, "cuda"),
                       OPS.max_pool2d_backward(grad, bad, *args, "torch"))


def test_repeat_bitwise_identical():
    x = tie_heavy((4, 64, 37, 37), torch.bfloat16, torch.channels_last).to(DEV)
    grad = torch.randn(4, 64, 19, 19, device=DEV).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)

    def run():
        out, argmax = OPS.max_pool2d(x, [3, 3], [2, 2], [1, 1], False, True, "cuda")
        return out, argmax, OPS.max_pool2d_backward(grad, argmax, list(x.shape), [3, 3], [2, 2], [1, 1], False, "cuda")

    first = run()
    for _ in range(5):
        for a, b in zip(first, run()):
            assert same_bits(a.float(), b.float())


def test_xception_pools_on_the_cuda_backend():
    """MaxPool2dSame on backend "cuda" runs the op, with the same values and gradients as PyTorch's pooling, and
    writes no argmax under no_grad."""
    for size in (147, 74, 37, 19):
        x = torch.randn(2, 32, size, size, device=DEV, dtype=torch.bfloat16).contiguous(
            memory_format=torch.channels_last).requires_grad_()
        cuda_pool, torch_pool = MaxPool2dSame(3, 2, "same", "cuda"), MaxPool2dSame(3, 2, "same", "torch")
        with record_op_calls("max_pool2d") as calls:
            got = cuda_pool(x)
        assert len(calls) == 1 and calls[0][5] is True  # the codes, for the backward
        want = torch_pool(x)
        assert torch.equal(got, want)
        grad = torch.randn_like(got)
        assert torch.equal(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(want, x, grad)[0])
        with torch.no_grad(), record_op_calls("max_pool2d") as calls:
            cuda_pool(x)
        assert calls[0][5] is False


def test_more_than_2_31_elements():
    """A float16 input of 2.15e9 elements takes the int64 index path; a few planes, the last one included (offsets
    past 2^31), are checked against PyTorch's pooling, with the gradient."""
    n, c, h, w = 1, 32, 8200, 8200
    assert n * c * h * w > 2**31
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n * c * h * w * 2:
        pytest.skip("needs about 13 GiB of free GPU memory")
    x = torch.randn(n, c, h, w, device=DEV, dtype=torch.float16)
    out, argmax = OPS.max_pool2d(x, [3, 3], [2, 2], [1, 1], False, True, "cuda")
    grad = torch.ones_like(out)
    grad_x = OPS.max_pool2d_backward(grad, argmax, list(x.shape), [3, 3], [2, 2], [1, 1], False, "cuda")
    del grad
    for ch in (0, 17, c - 1):
        plane = x[:, ch:ch + 1]
        want, index = F.max_pool2d(plane, 3, 2, 1, return_indices=True)
        assert torch.equal(out[:, ch:ch + 1], want)
        assert torch.equal(argmax[:, ch:ch + 1].long(), codes_from_indices(index, plane.shape, (3, 3), (2, 2), (1, 1)))
        want_grad = torch.ops.aten.max_pool2d_with_indices_backward(torch.ones_like(want), plane, [3, 3], [2, 2],
                                                                    [1, 1], [1, 1], False, index)
        assert torch.equal(grad_x[:, ch:ch + 1], want_grad)
    del x, out, argmax, grad_x
    torch.cuda.empty_cache()


# ---- the pending BatchNorm and the shortcut in the pool's pass ----

@pytest.mark.parametrize("extras", ["bn", "residual", "both"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geometry", GEOMETRIES[1:6], ids=str)
def test_pending_batchnorm_and_residual_are_the_separate_ops_bits(geometry, dtype, layout, extras):
    """One pass against the three ops it replaces on the same backend (scale_shift's fmaf, the pool, PyTorch's add),
    bit for bit, with any scale (negative ones too), outputs poisoned; the gradients of x, scale, shift and the
    residual against autograd through the separate ops, bit for bit."""
    from .test_pooling import affine_args

    shape, kernel, stride, padding, ceil_mode = geometry
    fmt = layout_of(layout)
    x = tie_heavy(shape, dtype, fmt).to(DEV).nan_to_num(0.0, 0.0, -3.0)
    kwargs = {}
    if extras != "residual":
        scale, shift = affine_args(shape[1])
        kwargs.update(scale=scale.to(DEV).requires_grad_(), shift=shift.to(DEV).requires_grad_())
    out_shape = OPS.max_pool2d(x, kernel, stride, padding, ceil_mode, False, "cuda")[0].shape
    if extras != "bn":
        kwargs["residual"] = torch.randn(out_shape, device=DEV).to(dtype).contiguous(memory_format=fmt)
        kwargs["residual"].requires_grad_()
    x.requires_grad_()
    z = OPS.scale_shift(x, kwargs["scale"], kwargs["shift"], False, "cuda") if "scale" in kwargs else x
    pooled, want_codes = OPS.max_pool2d(z, kernel, stride, padding, ceil_mode, True, "cuda")
    want = pooled + kwargs["residual"] if "residual" in kwargs else pooled
    poison(out_shape, dtype)
    got, codes = OPS.max_pool2d(x, kernel, stride, padding, ceil_mode, True, "cuda", **kwargs)
    assert got.is_contiguous(memory_format=fmt)
    assert same_bits(got, want) and torch.equal(codes, want_codes)
    names = ["x", *kwargs]
    grad = torch.randn(out_shape, device=DEV).to(dtype)
    got_grads = torch.autograd.grad(got, [x, *kwargs.values()], grad)
    want_grads = torch.autograd.grad(want, [x, *kwargs.values()], grad)
    for name, g, w in zip(names, got_grads, want_grads):
        if name in ("scale", "shift"):  # float32 sums, in the one pass's tile order: not the separate ops' order
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item())
        else:
            assert torch.equal(g, w), name


def test_xception_block_on_cuda_hands_its_last_batchnorm_and_shortcut_to_the_pool():
    from xception_ops.models.xception import XceptionBlock

    torch.manual_seed(0)
    block = XceptionBlock(64, 128, reps=2, stride=2, backend="cuda").to(DEV, torch.bfloat16)
    block = block.to(memory_format=torch.channels_last)
    x = torch.randn(4, 64, 37, 37, device=DEV, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    with record_op_calls("max_pool2d") as calls, record_op_calls("scale_shift") as ss_calls:
        out = block(x)
    assert len(calls) == 1 and len(ss_calls) == 0
    assert all(t is not None for t in calls[0][7:10])
    out.float().square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    block.eval()
    with torch.no_grad(), record_op_calls("max_pool2d") as calls:
        block(x)
    assert len(calls) == 1 and all(t is not None for t in calls[0][7:10])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geometry", GEOMETRIES[:6], ids=str)
def test_scale_shift_backward_is_one_deterministic_pass(geometry, dtype, layout):
    """max_pool2d_scale_shift_backward on "cuda" (channels-last: max_pool2d_backward_bn_kernel and the fixed-order
    reduction) against float64 sums and the two ops' grad_x bit for bit; ten calls give the same bits, and the
    profiler sees the fused kernel where the layout is channels-last. Outputs poisoned."""
    from .test_pooling import affine_args

    shape, kernel, stride, padding, ceil_mode = geometry
    fmt = layout_of(layout)
    x = torch.randn(shape, device=DEV).to(dtype).contiguous(memory_format=fmt)
    scale, shift = (t.to(DEV) for t in affine_args(shape[1]))
    args = (list(kernel), list(stride), list(padding), ceil_mode)
    out, codes = OPS.max_pool2d(x, *args, True, "cuda", scale=scale, shift=shift)
    grad = torch.randn(out.shape, device=DEV).to(dtype)
    poison(shape, dtype)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        got = OPS.max_pool2d_scale_shift_backward(grad, codes, x, scale, shift, *args, "cuda")
        torch.cuda.synchronize()
    fused = any("max_pool2d_backward_bn_kernel" in e.name for e in prof.events())
    assert fused == (layout == "channels_last")
    grad_z = OPS.max_pool2d_backward(grad, codes, list(shape), *args, "cuda")
    grad_x, _, _ = OPS.scale_shift_backward(grad_z, x, scale, shift, False, "cuda")
    assert torch.equal(got[0], grad_x) and got[0].is_contiguous(memory_format=fmt)
    g = grad_z.double()
    want_scale, want_shift = (g * x.double()).sum((0, 2, 3)), g.sum((0, 2, 3))
    for got_sum, want_sum in ((got[1], want_scale), (got[2], want_shift)):
        assert got_sum.dtype == torch.float32
        torch.testing.assert_close(got_sum.double(), want_sum, rtol=1e-4, atol=1e-4 * (1 + want_sum.abs().max().item()))
    for _ in range(10):
        again = OPS.max_pool2d_scale_shift_backward(grad, codes, x, scale, shift, *args, "cuda")
        assert all(torch.equal(a, b) for a, b in zip(again, got))


def test_pending_batchnorm_and_its_backward_past_2_31_elements():
    """The forward with scale, shift and residual, and the one-pass backward (channels-last: the fused kernel's
    64-bit index path), on a float16 input of 2.15e9 elements; a few channels, the last included, checked bit for bit
    against the definition computed plane by plane (scales that are powers of two: fma and PyTorch's multiply and
    add round alike, so the windows' maxima and ties are the same)."""
    from .test_pooling import affine_args

    n, c, h, w = 1, 32, 8200, 8200
    free, _ = torch.cuda.mem_get_info()
    if free < 4 * n * c * h * w * 2:
        pytest.skip("needs about 17 GiB of free GPU memory")
    x = torch.randn(n, c, h, w, device=DEV, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    scale, shift = (t.to(DEV) for t in affine_args(c, exact=True))
    out_hw = (h + 1) // 2
    residual = torch.randn(n, c, out_hw, out_hw, device=DEV, dtype=torch.float16)
    residual = residual.contiguous(memory_format=torch.channels_last)
    args = ([3, 3], [2, 2], [1, 1], False)
    out, codes = OPS.max_pool2d(x, *args, True, "cuda", scale=scale, shift=shift, residual=residual)
    grad = torch.ones_like(out)
    grad_x, grad_scale, grad_shift = OPS.max_pool2d_scale_shift_backward(grad, codes, x, scale, shift, *args, "cuda")
    del grad
    for ch in (0, 17, c - 1):
        plane = x[:, ch:ch + 1].contiguous()
        z = (plane.float() * scale[ch] + shift[ch]).half()
        pooled, index = F.max_pool2d(z, 3, 2, 1, return_indices=True)
        assert torch.equal(out[:, ch:ch + 1], pooled + residual[:, ch:ch + 1])
        assert torch.equal(codes[:, ch:ch + 1].long(), codes_from_indices(index, z.shape, (3, 3), (2, 2), (1, 1)))
        grad_z = torch.ops.aten.max_pool2d_with_indices_backward(torch.ones_like(pooled), z, [3, 3], [2, 2], [1, 1],
                                                                [1, 1], False, index)
        assert torch.equal(grad_x[:, ch:ch + 1], (grad_z.float() * scale[ch]).half())
        want_shift = grad_z.double().sum().item()
        assert abs(grad_shift[ch].item() - want_shift) <= 1e-5 * want_shift
    del x, out, codes, grad_x, residual
    torch.cuda.empty_cache()
