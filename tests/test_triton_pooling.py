"""The Triton backend's max pooling (xception_ops/triton/kernels.py: max_pool_fwd_kernel, max_pool_bwd_kernel),
through the ops with backend="triton", against the reference op bit for bit: values, argmax codes and gradients.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (small shapes: it is slow). bf16 gradients
are a sum rounded to bf16, which the interpreter truncates instead of rounding to nearest even: GPU only. The
pooled values themselves are input values, exact in every dtype.
"""

import os

import pytest
import torch

pytest.importorskip("triton")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"] != "1":
        pytest.skip("no CUDA GPU, and TRITON_INTERPRET is set to something other than 1", allow_module_level=True)

from xception_ops import _library, pooling  # noqa: E402
from xception_ops.models import MaxPool2dSame  # noqa: E402

from .conftest import record_op_calls, requires_gpu  # noqa: E402
from .test_pooling import affine_args, same_bits, tie_heavy  # noqa: E402

if _library.TRITON is None:
    pytest.skip(f"the triton backend is not loaded: {_library.TRITON_ERROR}", allow_module_level=True)

OPS = torch.ops.xception_ops
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GEOMETRIES = [
    ((2, 5, 9, 7), (3, 3), (2, 2), (1, 1), False),
    ((1, 16, 8, 10), (3, 3), (2, 2), (0, 0), True),
    ((1, 3, 9, 8), (5, 3), (3, 2), (2, 1), True),
    ((2, 8, 6, 6), (3, 3), (1, 1), (1, 1), False),
    ((1, 8, 2, 5), (3, 3), (2, 2), (0, 0), True),  # ceil mode: a 2-row input, one 3-row window starting in it
]
BF16_GRAD_GPU_ONLY = pytest.param(torch.bfloat16, marks=[pytest.mark.gpu, requires_gpu], id="bfloat16")


def make(shape, dtype, layout):
    if layout == "strided":  # a non-contiguous slice: read through its strides
        n, c, h, w = shape
        return tie_heavy((n, c, h, 2 * w), dtype, torch.contiguous_format).to(DEVICE)[..., ::2]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return tie_heavy(shape, dtype, fmt).to(DEVICE)


def check(geometry, dtype, layout, backward):
    shape, kernel, stride, padding, ceil_mode = geometry
    x = make(shape, dtype, layout)
    want, want_codes = OPS.max_pool2d(x, kernel, stride, padding, ceil_mode, True, "torch")
    got, codes = OPS.max_pool2d(x, kernel, stride, padding, ceil_mode, True, "triton")
    assert same_bits(got, want) and torch.equal(codes, want_codes)
    assert got.stride() == want.stride() and codes.stride() == want_codes.stride()
    plain, none = OPS.max_pool2d(x, kernel, stride, padding, ceil_mode, False, "triton")
    assert none.numel() == 0 and same_bits(plain, want)
    if backward:
        grad = torch.randn(want.shape, device=DEVICE).to(dtype)
        # Summed in float32 (float64 for float64) and rounded once, as PyTorch's CUDA kernels do (its CPU kernel
        # rounds fp16 / bf16 sums at every add).
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        want_grad = OPS.max_pool2d_backward(grad.to(wide), codes, list(shape), kernel, stride, padding, ceil_mode,
                                            "torch").to(dtype)
        got_grad = OPS.max_pool2d_backward(grad, codes, list(shape), kernel, stride, padding, ceil_mode, "triton")
        assert torch.equal(got_grad, want_grad) and got_grad.stride() == want_grad.stride()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, BF16_GRAD_GPU_ONLY], ids=str)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_forward_and_backward_match_the_reference_bit_for_bit(geometry, dtype, layout):
    check(geometry, dtype, layout, backward=True)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bfloat16_forward_matches_the_reference(layout):
    check(GEOMETRIES[0], torch.bfloat16, layout, backward=False)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_windows_of_only_minus_infinity_keep_their_first_tap_inside_the_image(layout):
    """PyTorch's rule: no value beats the initial -inf, so the argmax stays at the window's first tap inside the
    image (ky0, kx0): not (0, 0) where the window starts in the padding."""
    for geometry in GEOMETRIES:
        shape, kernel, stride, padding, ceil_mode = geometry
        x = torch.full(shape, float("-inf"), device=DEVICE).contiguous(
            memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
        want, want_codes = OPS.max_pool2d(x, kernel, stride, padding, ceil_mode, True, "torch")
        got, codes = OPS.max_pool2d(x, kernel, stride, padding, ceil_mode, True, "triton")
        assert torch.equal(got, want) and torch.equal(codes, want_codes)


def test_codes_that_name_no_tap_inside_the_image_add_nothing():
    x = torch.randn(1, 2, 5, 5, device=DEVICE)
    out, codes = OPS.max_pool2d(x, [3, 3], [2, 2], [1, 1], False, True, "torch")
    bad = codes.clone()
    bad[0, 0, 0, 0] = 0    # a tap in the padding
    bad[0, 1, 1, 1] = 200  # past the window
    grad = torch.randn(out.shape, device=DEVICE)
    args = ([1, 2, 5, 5], [3, 3], [2, 2], [1, 1], False)
    assert torch.equal(OPS.max_pool2d_backward(grad, bad, *args, "triton"),
                       OPS.max_pool2d_backward(grad, bad, *args, "torch"))


def test_xception_pool_on_the_triton_backend_runs_the_op_with_autograd():
    x = tie_heavy((2, 8, 9, 9), torch.float32, torch.channels_last).to(DEVICE).nan_to_num(0.0, 0.0, -4.0)
    x.requires_grad_()
    with record_op_calls("max_pool2d") as calls:
        got = MaxPool2dSame(3, 2, "same", "triton")(x)
    assert len(calls) == 1 and calls[0][-1] == "triton"
    want = pooling.max_pool2d(x, 3, 2, 1, backend="torch")
    assert torch.equal(got, want)
    grad = torch.randn_like(got)
    with record_op_calls("max_pool2d_backward") as calls:
        (got_grad,) = torch.autograd.grad(got, x, grad)
    assert len(calls) == 1 and calls[0][-1] == "triton"
    assert torch.equal(got_grad, torch.autograd.grad(want, x, grad)[0])


def check_extras(geometry, dtype, layout, extras):
    """The pending BatchNorm and the shortcut, bit for bit against the reference: with scales that are powers of two
    (test_pooling.affine_args) the kernel's fma and the reference's float32 multiply and add round alike."""
    shape, kernel, stride, padding, ceil_mode = geometry
    x = make(shape, dtype, layout)
    out_shape = [int(v) for v in OPS.max_pool2d(x, kernel, stride, padding, ceil_mode, False, "torch")[0].shape]
    kwargs = {}
    if extras in ("bn", "both"):
        scale, shift = affine_args(shape[1], exact=True)
        kwargs.update(scale=scale.to(DEVICE), shift=shift.to(DEVICE))
    if extras in ("residual", "both"):
        kwargs["residual"] = make(out_shape, dtype, layout)
    want, want_codes = OPS.max_pool2d(x, kernel, stride, padding, ceil_mode, True, "torch", **kwargs)
    got, codes = OPS.max_pool2d(x, kernel, stride, padding, ceil_mode, True, "triton", **kwargs)
    assert same_bits(got, want) and torch.equal(codes, want_codes)
    assert got.stride() == want.stride()


# bf16: the interpreter truncates float32 to bf16 where the normalization and the add round: GPU only.
BF16_GPU_ONLY = pytest.param(torch.bfloat16, marks=[pytest.mark.gpu, requires_gpu], id="bfloat16")


@pytest.mark.parametrize("extras", ["bn", "residual", "both"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, BF16_GPU_ONLY], ids=str)
@pytest.mark.parametrize("geometry", GEOMETRIES[:2], ids=str)
def test_pending_batchnorm_and_residual_match_the_reference(geometry, dtype, layout, extras):
    check_extras(geometry, dtype, layout, extras)


def test_xception_block_hands_its_last_batchnorm_and_shortcut_to_the_pool():
    """A strided block on "triton" in training: its last BatchNorm's statistics come from the separable op, and the
    pool applies the BatchNorm and adds the shortcut (one op call with scale, shift and residual) instead of
    scale_shift, the pool and an add. Outputs and gradients as the same block on "torch"."""
    from xception_ops.models.xception import XceptionBlock

    torch.manual_seed(0)
    block = XceptionBlock(4, 8, reps=2, stride=2, backend="triton").to(DEVICE)
    ref = XceptionBlock(4, 8, reps=2, stride=2, backend="torch").to(DEVICE)
    ref.load_state_dict(block.state_dict())
    x = torch.randn(2, 4, 7, 7, device=DEVICE, requires_grad=True)
    with record_op_calls("max_pool2d") as calls, record_op_calls("scale_shift") as ss_calls:
        got = block(x)
    assert len(calls) == 1 and len(ss_calls) == 0
    backend_arg, scale, shift, residual = calls[0][6:10]
    assert backend_arg == "triton" and scale is not None and shift is not None and residual is not None
    want = ref(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(got)
    params = [p for p in block.parameters()]
    got_grads = torch.autograd.grad(got, [x, *params], grad)
    want_grads = torch.autograd.grad(want, [x, *ref.parameters()], grad)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    for name, buf in block.named_buffers():
        torch.testing.assert_close(buf, dict(ref.named_buffers())[name])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, BF16_GPU_ONLY], ids=str)
@pytest.mark.parametrize("geometry", GEOMETRIES[:3], ids=str)
def test_scale_shift_backward_matches_the_reference(geometry, dtype, layout):
    """max_pool_bwd_bn_kernel: grad_x bit for bit against the reference (the pool's backward, then scale_shift's),
    the sums of g x and g to float32 rounding (a tree of tile sums, not the reference's order), every value written;
    float64 takes the two ops (bit for bit)."""
    shape, kernel, stride, padding, ceil_mode = geometry
    x = make(shape, dtype, layout).nan_to_num(0.0, 0.0, -3.0)
    vectors = torch.float64 if dtype == torch.float64 else torch.float32
    scale, shift = (t.to(DEVICE) for t in affine_args(shape[1], vectors))
    args = (list(kernel), list(stride), list(padding), ceil_mode)
    _, codes = OPS.max_pool2d(x, *args, True, "torch", scale=scale, shift=shift)
    grad = torch.randn(codes.shape, device=DEVICE).to(dtype)
    # The pool's gradient summed in float32 and rounded once, as the kernels and PyTorch's CUDA pooling do (its CPU
    # kernel rounds fp16 sums at every add), then the reference scale_shift_backward.
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    grad_z = OPS.max_pool2d_backward(grad.to(wide), codes, list(shape), *args, "torch").to(dtype)
    want = OPS.scale_shift_backward(grad_z, x, scale, shift, False, "torch")
    got = OPS.max_pool2d_scale_shift_backward(grad, codes, x, scale, shift, *args, "triton")
    assert torch.equal(got[0], want[0]) and got[0].stride() == want[0].stride()
    for g, w in zip(got[1:], want[1:]):
        assert g.dtype == w.dtype == vectors
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * (1 + w.abs().max().item()))


def test_autograd_through_a_pending_batchnorm_takes_the_one_pass_backward():
    x = torch.randn(2, 8, 9, 9, device=DEVICE).contiguous(memory_format=torch.channels_last).requires_grad_()
    scale, shift = (t.to(DEVICE).requires_grad_() for t in affine_args(8))
    out = pooling.max_pool2d(x, 3, 2, 1, backend="triton", scale=scale, shift=shift)
    grad = torch.randn_like(out)
    with record_op_calls("max_pool2d_scale_shift_backward") as calls:
        got = torch.autograd.grad(out, (x, scale, shift), grad)
    assert len(calls) == 1 and calls[0][-1] == "triton"
    want_out = pooling.max_pool2d(x, 3, 2, 1, backend="torch", scale=scale, shift=shift)
    assert torch.equal(out, want_out)
    want = torch.autograd.grad(want_out, (x, scale, shift), grad)
    assert torch.equal(got[0], want[0])
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
