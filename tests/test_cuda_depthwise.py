"""GPU tests of the "cuda" backend's depthwise kernels (csrc/kernels/depthwise.cuh).

Each op is called directly through torch.ops with backend="cuda" and compared with a float64 reference
(torch.nn.functional.conv2d on float64 copies, F.pad for asymmetric padding; autograd for the gradients) on
fresh random inputs. Tolerances: float32 relative error ||out - ref|| / ||ref|| <= 1e-5; float16 and bfloat16
no worse than twice PyTorch's own error in that dtype (F.conv2d / autograd run on the low-precision tensors,
measured against the same reference) plus a small floor. Outputs are poisoned with NaN through the caching
allocator before every call, so an element the kernel forgets to write shows up.
"""

import pytest
import torch
import torch.nn.functional as F

from .conftest import GPU_MARKS, poison, require_cuda_kernel

pytestmark = GPU_MARKS
require_cuda_kernel("depthwise_conv2d")

OPS = torch.ops.xception_ops
DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "strided"]
# Floor added to 2x PyTorch's relative error for the low-precision dtypes.
FLOOR = {torch.float16: 2e-5, torch.bfloat16: 2e-4}


class Case:
    def __init__(self, n, c, h, w, m, k, stride, padding, dilation, bias):
        self.n, self.c, self.h, self.w, self.m = n, c, h, w, m
        self.kh, self.kw = k
        self.stride, self.padding, self.dilation, self.bias = list(stride), list(padding), list(dilation), bias

    @property
    def oc(self):
        return self.c * self.m

    def out_hw(self):
        pt, pb, pl, pr = self.padding
        oh = (self.h + pt + pb - self.dilation[0] * (self.kh - 1) - 1) // self.stride[0] + 1
        ow = (self.w + pl + pr - self.dilation[1] * (self.kw - 1) - 1) // self.stride[1] + 1
        return oh, ow

    def __repr__(self):
        return (f"n{self.n}c{self.c}h{self.h}w{self.w}m{self.m}k{self.kh}x{self.kw}s{self.stride[0]}{self.stride[1]}"
                f"p{''.join(map(str, self.padding))}d{self.dilation[0]}{self.dilation[1]}{'b' if self.bias else ''}")


# Odd sizes, channels not a multiple of 8, every specialization (3x3 at stride 1, 2, any; the generic size) and
# the weight-gradient paths (3x3 and 1x1 with all taps in registers, other sizes one tap per block).
CASES = [
    Case(2, 5, 13, 11, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), True),
    Case(1, 7, 17, 19, 1, (3, 3), (2, 2), (0, 1, 0, 1), (1, 1), False),  # TensorFlow "same" at stride 2
    Case(3, 12, 9, 15, 2, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), True),
    Case(1, 33, 7, 9, 1, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), True),
    Case(1, 10, 19, 23, 1, (3, 3), (3, 3), (2, 1, 1, 2), (2, 2), False),
    Case(2, 4, 16, 17, 2, (3, 3), (1, 2), (2, 2, 2, 2), (2, 1), True),
    Case(4, 37, 33, 35, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), False),  # several wgrad slices and channel blocks
    Case(2, 6, 21, 10, 2, (5, 5), (1, 1), (2, 2, 2, 2), (1, 1), False),
    Case(1, 9, 11, 13, 1, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), True),
    Case(2, 3, 15, 14, 1, (3, 5), (2, 1), (1, 2, 0, 3), (1, 1), True),
    Case(1, 13, 14, 9, 3, (5, 3), (3, 2), (0, 0, 4, 1), (2, 3), True),
    Case(1, 1, 9, 10, 2, (3, 3), (2, 2), (1, 0, 1, 0), (1, 1), True),  # one input channel
    # Whole vectors of 4 channels, no depth multiplier: in channels_last the vector kernels (forward, input
    # gradient at stride 1, weight gradient), with 2 pixels per block (8 channels), partial lanes (132) and two
    # vectors per thread (1040), at stride 2 and with dilation.
    Case(2, 8, 13, 11, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), True),
    Case(1, 132, 9, 10, 1, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), False),
    Case(1, 1040, 6, 7, 1, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), True),
]


def randn(shape, dtype, layout):
    """Fresh normal values in the given layout; "strided" is a non-contiguous view into a larger tensor."""
    if layout == "strided":
        n, c, h, w = shape
        big = torch.randn(n, 2 * c, h + 3, 2 * w + 1, device=DEV, dtype=dtype)
        t = big[:, 1::2, 2:2 + h, 1::2]
        assert t.shape == tuple(shape) and not t.is_contiguous()
        return t
    t = torch.randn(shape, device=DEV, dtype=dtype)
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def make_weight(case, dtype, layout):
    shape = (case.oc, 1, case.kh, case.kw)
    if layout == "strided":
        return torch.randn(case.oc, 1, case.kh, 2 * case.kw, device=DEV, dtype=dtype)[..., ::2]
    w = torch.randn(shape, device=DEV, dtype=dtype)
    return w.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else w


def make_bias(case, dtype, layout):
    if not case.bias:
        return None
    if layout == "strided":
        return torch.randn(2 * case.oc, device=DEV, dtype=dtype)[::2]
    return torch.randn(case.oc, device=DEV, dtype=dtype)


def expected_format(t):
    """The ops' output layout rule (ops.h output_memory_format): channels_last in, channels_last out."""
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def conv_ref(x, w, b, case):
    """Depthwise conv through PyTorch, in whatever dtype x has."""
    pt, pb, pl, pr = case.padding
    return F.conv2d(F.pad(x, (pl, pr, pt, pb)), w, b, case.stride, 0, case.dilation, groups=x.shape[1])


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_close(out, ref, torch_out, dtype, what):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == dtype, f"{what}: dtype {out.dtype}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (an element left unwritten?)"
    err = rel_err(out, ref)
    if dtype == torch.float32:
        assert err <= 1e-5, f"{what}: relative error {err:.3g} > 1e-5"
    else:
        torch_err = rel_err(torch_out, ref)
        bound = 2 * torch_err + FLOOR[dtype]
        assert err <= bound, f"{what}: relative error {err:.3g} > 2 x PyTorch's {torch_err:.3g} + {FLOOR[dtype]}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_forward(case, dtype, layout):
    x = randn((case.n, case.c, case.h, case.w), dtype, layout)
    w = make_weight(case, dtype, layout)
    b = make_bias(case, dtype, layout)
    ref = conv_ref(x.double(), w.double(), None if b is None else b.double(), case)
    torch_out = conv_ref(x, w, b, case) if dtype != torch.float32 else None

    poison(ref.shape, dtype)
    out = OPS.depthwise_conv2d(x, w, b, case.stride, case.padding, case.dilation, "cuda")
    assert_close(out, ref, torch_out, dtype, "forward")
    assert out.is_contiguous(memory_format=expected_format(x)), "output layout does not follow the input's"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_backward(case, dtype, layout):
    x = randn((case.n, case.c, case.h, case.w), dtype, layout)
    w = make_weight(case, dtype, layout)
    oh, ow = case.out_hw()
    gy = randn((case.n, case.oc, oh, ow), dtype, layout)

    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    conv_ref(x64, w64, None, case).backward(gy.double())
    torch_gx = torch_gw = None
    if dtype != torch.float32:
        xl = x.detach().clone().requires_grad_()
        wl = w.detach().clone().requires_grad_()
        conv_ref(xl, wl, None, case).backward(gy)
        torch_gx, torch_gw = xl.grad, wl.grad

    poison(x.shape, dtype)
    gx = OPS.depthwise_conv2d_backward_input(gy, w, list(x.shape), case.stride, case.padding, case.dilation, "cuda")
    assert_close(gx, x64.grad, torch_gx, dtype, "grad_x")
    assert gx.is_contiguous(memory_format=expected_format(gy)), "grad_x layout does not follow grad_out's"

    poison(w.shape, dtype)
    gw = OPS.depthwise_conv2d_backward_weight(gy, x, list(w.shape), case.stride, case.padding, case.dilation, "cuda")
    assert_close(gw, w64.grad, torch_gw, dtype, "grad_w")
    assert gw.is_contiguous()


def as_bits(t):
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [
    Case(8, 48, 37, 41, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), True),
    Case(4, 40, 29, 31, 2, (5, 5), (2, 2), (1, 2, 1, 2), (1, 1), True),
], ids=repr)
def test_repeat_bitwise_identical(case, dtype, layout):
    """Same inputs ten times: every pass, the weight gradient included, gives the same bits (no races, no
    order-dependent sums)."""
    x = randn((case.n, case.c, case.h, case.w), dtype, layout)
    w = make_weight(case, dtype, layout)
    b = make_bias(case, dtype, layout)
    oh, ow = case.out_hw()
    gy = randn((case.n, case.oc, oh, ow), dtype, layout)
    args = (case.stride, case.padding, case.dilation, "cuda")

    def run():
        return (OPS.depthwise_conv2d(x, w, b, *args),
                OPS.depthwise_conv2d_backward_input(gy, w, list(x.shape), *args),
                OPS.depthwise_conv2d_backward_weight(gy, x, list(w.shape), *args))

    first = run()
    for t in first:
        assert torch.isfinite(t).all()
    for _ in range(9):
        for name, a, b_ in zip(("forward", "grad_x", "grad_w"), first, run()):
            assert torch.equal(as_bits(a), as_bits(b_)), f"{name} differs between identical calls"


def conv_skipping_outside(x, w):
    """Depthwise 3x3 conv at stride 1 with padding 1, in float64, where a tap outside x adds nothing (rather than
    0 * w, which is NaN for an inf or NaN weight): the kernels' answer for non-finite weights."""
    n, c, h, wd = x.shape
    xp = F.pad(x, (1, 1, 1, 1))
    inside = F.pad(torch.ones_like(x, dtype=torch.bool), (1, 1, 1, 1))
    out = torch.zeros(n, c, h, wd, dtype=torch.float64, device=x.device)
    for kh in range(3):
        for kw in range(3):
            taps = xp[:, :, kh:kh + h, kw:kw + wd] * w[:, 0, kh, kw].view(1, c, 1, 1)
            out += torch.where(inside[:, :, kh:kh + h, kw:kw + wd], taps, 0.0)
    return out


def assert_same_non_finite_and_close(out, ref, dtype, what):
    """NaN where the reference has NaN, the same infinities, and the finite values close."""
    out = out.double()
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), f"{what}: NaN in other places than the reference's"
    assert torch.equal(torch.isposinf(out), torch.isposinf(ref)), f"{what}: +inf in other places"
    assert torch.equal(torch.isneginf(out), torch.isneginf(ref)), f"{what}: -inf in other places"
    finite = torch.isfinite(ref)
    assert finite.any() and not finite.all(), f"{what}: the case has no finite or no non-finite values"
    err = rel_err(out[finite], ref[finite])
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    assert err <= bound, f"{what}: relative error {err:.3g} > {bound} on the finite values"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_finite_values_outside_the_image_add_nothing(dtype, layout):
    """An inf weight, or an inf in x: a tap outside the image adds nothing, as in the scalar kernels. The strip
    kernels (3x3 at stride 1; rows of 13, runs cut short at the right edge) sum without predicates only where that
    gives the same bits, and take their predicated walks here."""
    n, c, h, wd = 2, 8, 9, 13
    args = ([1, 1], [1, 1, 1, 1], [1, 1], "cuda")
    x = randn((n, c, h, wd), dtype, layout)
    gy = randn((n, c, h, wd), dtype, layout)
    w = torch.randn(c, 1, 3, 3, device=DEV, dtype=dtype)
    w[0, 0, 0, 0] = float("inf")  # channel 0: outside along the top and left edges (forward), bottom and right (grad_x)
    w[1, 0, 2, 1] = float("-inf")
    y = OPS.depthwise_conv2d(x, w, None, *args)
    assert_same_non_finite_and_close(y, conv_skipping_outside(x.double(), w.double()), dtype, "forward")
    gx = OPS.depthwise_conv2d_backward_input(gy, w, list(x.shape), *args)
    assert_same_non_finite_and_close(gx, conv_skipping_outside(gy.double(), w.double().flip(2, 3)), dtype, "grad_x")
    # The weight gradient with an inf in x at image 0's bottom-right pixel of channel 0: the taps that read it for an
    # output inside grad_y are inf, the others finite. Products of grad_y (finite) and x's zero padding are zeros,
    # so the sums over the padded x are the reference.
    x = x.clone()
    x[0, 0, h - 1, wd - 1] = float("inf")
    xp, gy64 = F.pad(x.double(), (1, 1, 1, 1)), gy.double()
    ref = torch.stack([(gy64 * xp[:, :, kh:kh + h, kw:kw + wd]).sum((0, 2, 3)) for kh in range(3) for kw in range(3)])
    gw = OPS.depthwise_conv2d_backward_weight(gy, x, list(w.shape), *args)
    assert_same_non_finite_and_close(gw, ref.t().reshape(c, 1, 3, 3), dtype, "grad_w")


def ref_rows(x, w, b, c_out, oh, stride, padding, dilation, dtype):
    """Output row (0, c_out, oh, :) of a depth-multiplier-1 conv computed in `dtype` from just the input rows
    that row reads (zeros for rows in the padding); only those rows are converted, never all of x."""
    _, _, h, wdt = x.shape
    kh_n = w.shape[2]
    rows = []
    for kh in range(kh_n):
        ih = oh * stride[0] - padding[0] + kh * dilation[0]
        rows.append(x[0, c_out, ih].to(dtype) if 0 <= ih < h else torch.zeros(wdt, device=x.device, dtype=dtype))
    slab = torch.stack(rows).view(1, 1, kh_n, wdt)
    slab = F.pad(slab, (padding[2], padding[3], 0, 0))
    bias = None if b is None else b[c_out:c_out + 1].to(dtype)
    return F.conv2d(slab, w[c_out:c_out + 1].to(dtype), bias, (1, stride[1]), 0, (1, dilation[1]))[0, 0, 0]


def test_more_than_2_31_elements():
    """A float16 input of 2.15e9 elements takes the int64 index path; a few rows, the last channel's
    included (offsets past 2^31), are checked against float64."""
    n, c, h, wdt = 1, 16, 16400, 8200
    numel = n * c * h * wdt
    assert numel > 2**31
    free, _ = torch.cuda.mem_get_info()
    if free < 3.2 * numel * 2:
        pytest.skip(f"needs about {3.2 * numel * 2 / 2**30:.0f} GiB of free GPU memory")
    stride, padding, dilation = [1, 1], [1, 1, 1, 1], [1, 1]
    x = torch.randn(n, c, h, wdt, device=DEV, dtype=torch.float16)
    w = torch.randn(c, 1, 3, 3, device=DEV, dtype=torch.float16)
    b = torch.randn(c, device=DEV, dtype=torch.float16)
    poison(x.shape, torch.float16)
    out = OPS.depthwise_conv2d(x, w, b, stride, padding, dilation, "cuda")
    assert out.shape == x.shape and out.numel() > 2**31
    assert not torch.isnan(out).any(), "some outputs were not written"
    for ch, oh in [(0, 0), (7, 8191), (15, 12345), (15, h - 1)]:
        ref = ref_rows(x, w, b, ch, oh, stride, padding, dilation, torch.float64)
        torch_row = ref_rows(x, w, b, ch, oh, stride, padding, dilation, torch.float16)
        assert_close(out[0, ch, oh], ref, torch_row, torch.float16, f"row (channel {ch}, oh {oh})")
    del x, out
    torch.cuda.empty_cache()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_zero_batch(layout):
    case = Case(0, 4, 7, 9, 2, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), True)
    x = randn((0, 4, 7, 9), torch.float32, layout)
    w = make_weight(case, torch.float32, layout)
    b = make_bias(case, torch.float32, layout)
    gy = randn((0, 8, 7, 9), torch.float32, layout)
    args = (case.stride, case.padding, case.dilation, "cuda")
    out = OPS.depthwise_conv2d(x, w, b, *args)
    assert out.shape == (0, 8, 7, 9)
    gx = OPS.depthwise_conv2d_backward_input(gy, w, list(x.shape), *args)
    assert gx.shape == (0, 4, 7, 9)
    gw = OPS.depthwise_conv2d_backward_weight(gy, x, list(w.shape), *args)
    assert gw.shape == (8, 1, 3, 3) and torch.equal(gw, torch.zeros_like(gw))


def test_device_mismatch_raises_value_error():
    args = ([1, 1], [1, 1, 1, 1], [1, 1], "cuda")
    x = torch.randn(1, 3, 8, 8, device=DEV)
    w = torch.randn(3, 1, 3, 3, device=DEV)
    gy = torch.randn(1, 3, 8, 8, device=DEV)
    with pytest.raises(ValueError, match="device|cpu"):
        OPS.depthwise_conv2d(x, w.cpu(), None, *args)
    with pytest.raises(ValueError, match="device|cpu"):
        OPS.depthwise_conv2d(x, w, torch.randn(3), *args)
    with pytest.raises(ValueError, match="device|cpu"):
        OPS.depthwise_conv2d_backward_input(gy, w.cpu(), [1, 3, 8, 8], *args)
    with pytest.raises(ValueError, match="device|cpu"):
        OPS.depthwise_conv2d_backward_weight(gy.cpu(), x, [3, 1, 3, 3], *args)
    with pytest.raises(ValueError, match="CUDA tensors"):
        OPS.depthwise_conv2d(x.cpu(), w.cpu(), None, *args)
    torch.cuda.synchronize()  # nothing was launched, and nothing failed asynchronously


def test_float64_raises_type_error():
    args = ([1, 1], [1, 1, 1, 1], [1, 1], "cuda")
    x = torch.randn(1, 3, 8, 8, device=DEV, dtype=torch.float64)
    w = torch.randn(3, 1, 3, 3, device=DEV, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64.*torch"):
        OPS.depthwise_conv2d(x, w, None, *args)
    with pytest.raises(TypeError, match="float64.*torch"):
        OPS.depthwise_conv2d_backward_input(x, w, [1, 3, 8, 8], *args)
    with pytest.raises(TypeError, match="float64.*torch"):
        OPS.depthwise_conv2d_backward_weight(x, x, [3, 1, 3, 3], *args)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_output_memory_format_follows_input(layout):
    x = randn((2, 6, 11, 13), torch.float16, layout)
    w = torch.randn(12, 1, 3, 3, device=DEV, dtype=torch.float16)
    out = OPS.depthwise_conv2d(x, w, None, [2, 2], [0, 1, 0, 1], [1, 1], "cuda")
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    gx = OPS.depthwise_conv2d_backward_input(randn(tuple(out.shape), torch.float16, layout), w, list(x.shape),
                                             [2, 2], [0, 1, 0, 1], [1, 1], "cuda")
    assert gx.is_contiguous(memory_format=fmt)
