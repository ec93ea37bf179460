"""GPU tests of the "cuda" backend's separable forward (csrc/cuda/separable_backend.cpp): the staged form by
default, the fused kernel (csrc/kernels/separable.cuh) and its variants in fresh processes
(test_implementations_kept_for_comparison), and the backward.

The op is called through torch.ops with backend="cuda" and compared with the float64 reference
(xception_ops.reference on float64 copies) on fresh random inputs: odd sizes (H, W not multiples of the tile,
channels not multiples of 8, batch 1), every prologue / mid (affine and activation) / epilogue option, three layouts
(contiguous,
channels_last, strided views), three dtypes, TF32 on and off, and depthwise channel counts large enough that
the depthwise tile no longer fits in shared memory at once. Tolerances: float32 1e-5 relative (1e-3 with TF32);
float16 / bfloat16 no worse than twice PyTorch's own error in that dtype (the reference run on the
low-precision tensors, i.e. cuDNN) plus a small floor. Outputs are poisoned with NaN through the caching
allocator before every call.
"""

import pytest
import torch

from .conftest import GPU_MARKS, poison, require_cuda_kernel

pytestmark = GPU_MARKS
require_cuda_kernel("separable_conv2d")

from xception_ops import reference  # noqa: E402
from xception_ops.backend import wgmma_configs  # noqa: E402

OPS = torch.ops.xception_ops
DEV = "cuda"
LAYOUTS = ["contiguous", "channels_last", "strided"]
FLOOR = {torch.float16: 2e-5, torch.bfloat16: 2e-4}

# (N, C_in, C_out, H, W, multiplier, kernel, stride, padding (t, b, l, r), dilation)
SHAPES = [
    (2, 13, 21, 11, 9, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),     # odd channels, 198 pixels: 4 tiles
    (1, 40, 70, 17, 19, 1, (3, 3), (2, 2), (0, 1, 0, 1), (1, 1)),    # TensorFlow "same" at stride 2
    (3, 8, 16, 7, 10, 2, (5, 5), (1, 1), (2, 2, 2, 2), (1, 1)),      # depth multiplier, generic kernel size
    (1, 96, 130, 9, 9, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),     # K = 96 (3 steps), 3 output tiles
    (2, 5, 3, 6, 7, 1, (3, 2), (2, 1), (1, 0, 0, 1), (1, 2)),        # tiny, asymmetric everything
    (1, 1, 1, 1, 1, 1, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),        # one pixel, one channel
    (2, 24, 44, 11, 13, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),    # whole vectors of channels in and out
    (1, 44, 12, 9, 9, 1, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),      # vectors, but K not a multiple of 8
]
OPTIONS = [
    dict(),
    dict(out_scale=True, out_shift=True, out_relu=True),                         # inference: folded BN + ReLU
    dict(compute_stats=True, in_scale=True, in_shift=True, in_relu=True),        # training: BN of the producer
    dict(mid="relu", residual=True, out_relu=True, out_shift=True),
    dict(mid="elu", in_scale=True, out_scale=True, compute_stats=True),
    dict(in_relu=True, in_shift=True, mid="relu", out_scale=True, out_shift=True, residual=True,
         compute_stats=True, out_relu=True),
]


def randn(shape, dtype, layout, scale=1.0):
    if layout == "strided":
        n, c, h, w = shape
        big = torch.randn(n, 2 * c, h + 2, 2 * w + 1, device=DEV, dtype=dtype) * scale
        t = big[:, 1::2, 1:1 + h, 1::2]
        assert t.shape == tuple(shape)
        return t
    t = torch.randn(shape, device=DEV, dtype=dtype) * scale
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t


def make_inputs(shape, opts, dtype, layout):
    n, cin, cout, h, w, mult, k, stride, padding, dilation = shape
    k_dw = cin * mult
    x = randn((n, cin, h, w), dtype, layout)
    dw = randn((k_dw, 1, *k), dtype, "strided" if layout == "strided" else "contiguous")
    pw = randn((cout, k_dw, 1, 1), dtype, "contiguous", scale=k_dw ** -0.5)
    vec = dict(device=DEV, dtype=torch.float32)
    # The mid affine in the vectors' dtype `mid_dtype` (float32 by default): a BatchNorm's scale and shift, large
    # enough that relu6 clamps at 6 (the depthwise sums' spread is ~3).
    mid_vec = dict(device=DEV, dtype=opts.get("mid_dtype", torch.float32))
    t = dict(in_scale=torch.rand(cin, **vec) + 0.5 if opts.get("in_scale") else None,
             in_shift=torch.randn(cin, **vec) * 0.3 if opts.get("in_shift") else None,
             mid_scale=torch.rand(k_dw, **mid_vec) * 1.5 + 0.25 if opts.get("mid_scale") else None,
             mid_shift=torch.randn(k_dw, **mid_vec) * 0.5 if opts.get("mid_shift") else None,
             out_scale=torch.rand(cout, **vec) + 0.5 if opts.get("out_scale") else None,
             out_shift=torch.randn(cout, **vec) * 0.3 if opts.get("out_shift") else None)
    span = [d * (kk - 1) + 1 for d, kk in zip(dilation, k)]
    ho = (h + padding[0] + padding[1] - span[0]) // stride[0] + 1
    wo = (w + padding[2] + padding[3] - span[1]) // stride[1] + 1
    t["residual"] = randn((n, cout, ho, wo), dtype, layout) if opts.get("residual") else None
    args = dict(in_relu=opts.get("in_relu", False), stride=list(stride), padding=list(padding),
                dilation=list(dilation), mid_activation=opts.get("mid", "none"), out_relu=opts.get("out_relu", False),
                compute_stats=opts.get("compute_stats", False))
    return x, dw, pw, t, args


def call(fn, x, dw, pw, t, a, *backend):
    return fn(x, dw, pw, t["in_scale"], t["in_shift"], a["in_relu"], a["stride"], a["padding"], a["dilation"],
              a["mid_activation"], t["mid_scale"], t["mid_shift"], t["out_scale"], t["out_shift"], a["out_relu"],
              t["residual"], a["compute_stats"], *backend)


def to64(v):
    return None if v is None else v.double()


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def check(shape, opts, dtype, layout, tf32=False):
    x, dw, pw, t, a = make_inputs(shape, opts, dtype, layout)
    ref = call(reference.separable_conv2d, x.double(), dw.double(), pw.double(),
               {k: to64(v) for k, v in t.items()}, a)
    plain = call(OPS.separable_conv2d, x, dw, pw, t, a, "torch") if dtype != torch.float32 else None
    poison(ref[0].shape, dtype)
    got = call(OPS.separable_conv2d, x, dw, pw, t, a, "cuda")
    torch.cuda.synchronize()
    names = ("out", "sum", "sumsq") if a["compute_stats"] else ("out",)
    for i, name in enumerate(names):
        out, exact = got[i], ref[i]
        assert out.shape == exact.shape, f"{name}: shape {tuple(out.shape)} != {tuple(exact.shape)}"
        assert out.dtype == (dtype if i == 0 else torch.float32), f"{name}: dtype {out.dtype}"
        assert torch.isfinite(out).all(), f"{name}: non-finite values (an element left unwritten?)"
        err = rel_err(out, exact)
        if dtype == torch.float32:
            tol = 1e-3 if tf32 else 1e-5
            assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"
        else:
            torch_err = rel_err(plain[i], exact)
            bound = 2 * torch_err + FLOOR[dtype]
            assert err <= bound, f"{name}: relative error {err:.3g} > 2 x PyTorch's {torch_err:.3g} + {FLOOR[dtype]}"
    if not a["compute_stats"]:
        assert got[1].numel() == 0 and got[2].numel() == 0
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert got[0].is_contiguous(memory_format=fmt), "output layout does not follow the input's"
    return got


@pytest.fixture
def tf32_off():
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_per_operator_tf32_flags(layout):
    """PyTorch >= 2.9's per-operator TF32 flags set differently for cuDNN's convolutions and RNNs (its new API): the
    op runs, without TF32 (asking the cuDNN flag without an operator's name raises then), exact to 1e-5."""
    cudnn = torch.backends.cudnn
    if not hasattr(getattr(cudnn, "conv", None), "fp32_precision"):
        pytest.skip("this PyTorch has no per-operator TF32 flags")
    saved = cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision
    cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = "ieee", "tf32"
    try:
        for opts in (OPTIONS[1], OPTIONS[5]):
            check(SHAPES[0], opts, torch.float32, layout)
    finally:
        cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = saved


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(sorted(o)) or "plain")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])))
def test_float32(shape, opts, layout, tf32_off):
    check(shape, opts, torch.float32, layout)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("opts", [OPTIONS[1], OPTIONS[5]], ids=["inference", "everything"])
@pytest.mark.parametrize("shape", SHAPES[:4], ids=lambda s: "x".join(map(str, s[:5])))
def test_float32_tf32(shape, opts, layout):
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        check(shape, opts, torch.float32, layout, tf32=True)
    finally:
        torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(sorted(o)) or "plain")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision(dtype, shape, opts, layout):
    check(shape, opts, dtype, layout)


# Depthwise channels beyond what shared memory holds at once (the tile is then computed per output tile).
@pytest.mark.parametrize("dtype,channels", [(torch.float32, 1024), (torch.bfloat16, 1696)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_more_channels_than_shared_memory(dtype, channels, layout, tf32_off):
    shape = (1, channels, 72, 5, 6, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    check(shape, OPTIONS[5], dtype, layout)


# The mid affine (a BatchNorm or bias between the halves: d * mid_scale + mid_shift per depthwise channel) with each
# mid activation, relu6 and hardswish among them; one option set without an affine (relu6 alone).
MID_OPTIONS = [
    dict(mid="relu6", mid_scale=True, mid_shift=True, out_scale=True, out_shift=True),  # MobileNet: dw-BN-ReLU6-pw
    dict(mid="relu", mid_scale=True, mid_shift=True, compute_stats=True, in_scale=True, in_shift=True, in_relu=True),
    dict(mid_scale=True, residual=True, out_relu=True),
    dict(mid="elu", mid_shift=True, out_shift=True, compute_stats=True),
    dict(mid="relu6", compute_stats=True),
    dict(mid="hardswish", mid_scale=True, mid_shift=True, compute_stats=True),  # MobileNet V3
]
# The shapes: channels that leave padding columns in the kernels' tiles (13, 40 = 20 x multiplier 2, 24), a generic
# kernel size with a depth multiplier (the vectors are per depthwise channel), stride 2, whole vectors of channels,
# and rows of 20 outputs (run tiles apply: XCEPTION_OPS_SEPARABLE_TILES=runs in test_implementations_kept...).
MID_SHAPES = [
    SHAPES[0],
    (1, 20, 36, 9, 11, 2, (5, 3), (1, 2), (2, 2, 1, 1), (1, 1)),
    SHAPES[1],
    (2, 24, 40, 9, 20, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("opts", MID_OPTIONS, ids=lambda o: "-".join(sorted(o)))
@pytest.mark.parametrize("shape", MID_SHAPES, ids=lambda s: "x".join(map(str, s[:5])))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_mid_affine_forward(dtype, shape, opts, layout, tf32_off):
    """out and the statistics with the mid affine and relu6, against float64, the output poisoned."""
    check(shape, opts, dtype, layout)


def test_mid_affine_forward_with_16bit_vectors(tf32_off):
    """mid_scale / mid_shift in float16 (a model cast to half): read as their float32 values."""
    opts = dict(mid="relu6", mid_scale=True, mid_shift=True, mid_dtype=torch.float16, compute_stats=True)
    for layout in ("contiguous", "channels_last"):
        check(MID_SHAPES[3], opts, torch.float32, layout)
        check(MID_SHAPES[3], opts, torch.bfloat16, layout)


def test_mid_affine_of_ones_and_zeros_is_no_affine():
    """mid_scale = 1 and mid_shift = 0 give the bits of no affine (x 1 + 0 is exact, and rounds to itself)."""
    x, dw, pw, t, a = make_inputs(MID_SHAPES[3], dict(mid="relu6", out_scale=True), torch.bfloat16, "channels_last")
    k_dw = dw.shape[0]
    without = call(OPS.separable_conv2d, x, dw, pw, t, a, "cuda")
    t = {**t, "mid_scale": torch.ones(k_dw, device=DEV), "mid_shift": torch.zeros(k_dw, device=DEV)}
    with_ones = call(OPS.separable_conv2d, x, dw, pw, t, a, "cuda")
    assert torch.equal(without[0], with_ones[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_xception_shapes(dtype, tf32_off):
    """Two of the model's layer shapes at batch 2: entry flow (128 -> 256 at 74^2) and middle flow (728 at 19^2)."""
    check((2, 128, 256, 74, 74, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)), OPTIONS[1], dtype, "channels_last")
    check((2, 728, 728, 19, 19, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)), OPTIONS[5], dtype, "channels_last")


def test_repeatable_bitwise():
    """Ten runs give the same bits: outputs and statistics (fixed-order reduction, no atomics, no races)."""
    shape = (4, 64, 96, 37, 37, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    x, dw, pw, t, a = make_inputs(shape, OPTIONS[2], torch.bfloat16, "channels_last")
    first = call(OPS.separable_conv2d, x, dw, pw, t, a, "cuda")
    for _ in range(10):
        again = call(OPS.separable_conv2d, x, dw, pw, t, a, "cuda")
        for u, v in zip(first, again):
            assert torch.equal(u, v)


def test_empty_batch_gives_zero_statistics():
    shape = (0, 8, 16, 5, 5, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    x, dw, pw, t, a = make_inputs(shape, dict(compute_stats=True), torch.float32, "contiguous")
    out, total, total_sq = call(OPS.separable_conv2d, x, dw, pw, t, a, "cuda")
    assert out.shape == (0, 16, 5, 5)
    assert torch.equal(total, torch.zeros(16, device=DEV)) and torch.equal(total_sq, torch.zeros(16, device=DEV))


def test_cuda_graph_capture():
    shape = (2, 32, 48, 19, 19, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    x, dw, pw, t, a = make_inputs(shape, OPTIONS[5], torch.bfloat16, "channels_last")
    eager = call(OPS.separable_conv2d, x, dw, pw, t, a, "cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the capture (first launches set kernel attributes)
        call(OPS.separable_conv2d, x, dw, pw, t, a, "cuda")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call(OPS.separable_conv2d, x, dw, pw, t, a, "cuda")
    graph.replay()
    torch.cuda.synchronize()
    for u, v in zip(eager, captured):
        assert torch.equal(u, v)


@pytest.mark.slow
def test_more_than_2_31_elements():
    """x and out of 2^31 + elements each: every offset is 64-bit."""
    x = torch.randn(1, 8, 16400, 16400, device=DEV, dtype=torch.bfloat16)
    assert x.numel() > 2**31
    dw = torch.randn(8, 1, 3, 3, device=DEV, dtype=torch.bfloat16)
    pw = torch.randn(8, 8, 1, 1, device=DEV, dtype=torch.bfloat16)
    args = ([1, 1], [1, 1, 1, 1], [1, 1], "none", None, None, None, None, False, None, False)
    out, _, _ = OPS.separable_conv2d(x, dw, pw, None, None, False, *args, "cuda")
    # Compare the last rows (the far end of both tensors) with the reference on that slice.
    tail = x[:, :, -6:, :]
    ref = reference.separable_conv2d(tail.double(), dw.double(), pw.double(), None, None, False, *args)[0]
    got = out[:, :, -5:, :]  # the last output row sees the bottom padding; the slice's first row is not compared
    assert rel_err(got[:, :, 1:], ref[:, :, 2:]) <= 2e-2
    del x, out


def test_bad_input_raises_before_launch():
    x = torch.randn(1, 4, 5, 5, device=DEV)
    dw = torch.randn(4, 1, 3, 3, device=DEV)
    pw = torch.randn(6, 4, 1, 1, device=DEV)
    # stride, padding, dilation, mid_activation, mid_scale, mid_shift, out_scale, out_shift, out_relu, residual,
    # compute_stats
    base = ([1, 1], [1, 1, 1, 1], [1, 1], "none", None, None, None, None, False, None, False)
    with pytest.raises(TypeError, match="pw_weight"):
        OPS.separable_conv2d(x, dw, pw.half(), None, None, False, *base, "cuda")
    with pytest.raises(ValueError, match="residual"):
        bad = list(base)
        bad[9] = torch.randn(1, 5, 5, 5, device=DEV)
        OPS.separable_conv2d(x, dw, pw, None, None, False, *bad, "cuda")
    with pytest.raises(ValueError, match="mid_scale"):  # one per depthwise channel (4), not per output channel
        bad = list(base)
        bad[4] = torch.ones(6, device=DEV)
        OPS.separable_conv2d(x, dw, pw, None, None, False, *bad, "cuda")
    with pytest.raises(TypeError, match="float64"):
        OPS.separable_conv2d(x.double(), dw.double(), pw.double(), None, None, False, *base, "cuda")


def test_autograd_through_the_cuda_forward():
    """The forward and the backward run on the cuda backend; the gradients match the reference's."""
    import xception_ops

    x = torch.randn(2, 16, 9, 9, device=DEV, requires_grad=True)
    dw = torch.randn(16, 1, 3, 3, device=DEV, requires_grad=True)
    pw = torch.randn(24, 16, 1, 1, device=DEV, requires_grad=True)
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        grads = {}
        for backend in ("torch", "cuda"):
            y = xception_ops.separable_conv2d(x, dw, pw, padding=1, backend=backend)
            grads[backend] = torch.autograd.grad(y.square().sum(), (x, dw, pw))
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    for u, v in zip(grads["torch"], grads["cuda"]):
        assert rel_err(v, u) <= 1e-5


FUSED = {"XCEPTION_OPS_SEPARABLE_FORWARD": "fused"}
# The fused kernel's own cases: every forward check of this file (its channel chunks, empty batch, graphs, ...).
FUSED_CASES = "not backward and not implementations_kept and not 2_31"
# Its variants: the low-precision checks of one shape, the Xception shapes and the bitwise repeatability check
# (the run tiles take the last two: 3x3 at stride 1, channels_last, rows of 19, 37 and 74).
VARIANT_CASES = ("(low_precision and 40x70) or xception_shapes or repeatable_bitwise"
                 " or (mid_affine_forward and channels_last and not float32)")
# The staged form's products forced either way differ from the default only in fp16 / bf16 channels_last.
STAGED_CASES = ("(low_precision and channels_last) or xception_shapes or repeatable_bitwise or graph or more_channels"
                " or (mid_affine_forward and channels_last)")
# The staged form forced (None: the variable unset in the subprocess, whatever this process has), so that its
# depthwise kernels' mid stage (applied as they store mid, DepthwiseParams::mid) runs in every layout and dtype
# even where this process runs with XCEPTION_OPS_SEPARABLE_FORWARD=fused.
STAGED = {"XCEPTION_OPS_SEPARABLE_FORWARD": None}


@pytest.mark.parametrize("env,cases", [
    (FUSED, FUSED_CASES),
    ({**STAGED, "XCEPTION_OPS_SEPARABLE_STAGED_GEMM": "cublas"}, STAGED_CASES + " or mid_affine_forward"),
    ({**STAGED, "XCEPTION_OPS_SEPARABLE_STAGED_GEMM": "fused"}, STAGED_CASES),
    ({"XCEPTION_OPS_SEPARABLE_STAGED_GEMM": "wgmma"}, STAGED_CASES + " or (backward and channels_last)"),
    ({"XCEPTION_OPS_SEPARABLE_FORWARD": "wgmma"}, STAGED_CASES + " or (backward and channels_last)"),
    ({**FUSED, "XCEPTION_OPS_SEPARABLE_GEMM": "wmma"}, VARIANT_CASES),
    ({**FUSED, "XCEPTION_OPS_SEPARABLE_TILES": "square"}, VARIANT_CASES),
    ({**FUSED, "XCEPTION_OPS_SEPARABLE_TILES": "runs"}, VARIANT_CASES),
], ids=["fused", "staged-cublas", "staged-fused-gemm", "staged-wgmma-gemm", "fused-wgmma", "fused-wmma-gemm",
        "fused-square-tiles", "fused-run-tiles"])
def test_implementations_kept_for_comparison(env, cases):
    """The forward's other implementations, selected by environment variables (read when the library loads, hence
    a fresh process; the default is the staged form, its product on the fused kernel's GEMM up to 128 channels):
    the fused kernel passes this file's forward checks; the staged form with its product on cuBLAS everywhere, or
    on the fused kernel's GEMM everywhere it applies, those in fp16 / bf16 channels_last (and on cuBLAS the mid affine
    forward in every layout and dtype: the depthwise kernels' mid stage on their stores); the fused kernel's
    variants a subset."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).relative_to(root)),
           "-k", cases]
    env = {k: v for k, v in {**os.environ, **env}.items() if v is not None}  # None: unset
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout


# ---- Hopper's wgmma kernels (kernels/pointwise_gemm.cuh, kernels/separable_wgmma.cuh), opt-in ----

def _wgmma_built_and_hopper():
    from xception_ops.backend import wgmma_kernels_built
    return wgmma_kernels_built() and torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


WGMMA_SKIP = pytest.mark.skipif(not _wgmma_built_and_hopper(),
                                reason="Hopper's wgmma GEMM needs a compute capability 9.0 GPU and a 9.0a build")
WGMMA_SHAPES = [
    (2, 24, 136, 11, 13, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),  # 286 pixels, 136 channels: partial tiles of both
    (1, 200, 72, 9, 9, 1, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),    # K = 200: four stages through a ring of three
    (3, 8, 8, 5, 4, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),       # one stage of 8 channels, 60 pixels
]


# The builds of kernels/pointwise_gemm_params.h's kPointwiseConfigs (N x stages x groups in flight), as the
# compiled library names them (none without it: the tests below are skipped then anyway).
WGMMA_CONFIGS = list(wgmma_configs())


@WGMMA_SKIP
@pytest.mark.parametrize("config", WGMMA_CONFIGS)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(sorted(o)) or "plain")
@pytest.mark.parametrize("shape", WGMMA_SHAPES, ids=lambda s: "x".join(map(str, s[:5])))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_staged_wgmma_gemm(dtype, shape, opts, config, monkeypatch):
    """Every epilogue option against float64, with the output poisoned, in every build (the variables are read at
    each call)."""
    monkeypatch.setenv("XCEPTION_OPS_SEPARABLE_STAGED_GEMM", "wgmma")
    monkeypatch.setenv("XCEPTION_OPS_WGMMA_CONFIG", config)
    check(shape, opts, dtype, "channels_last")


@WGMMA_SKIP
def test_staged_wgmma_gemm_names_a_bad_config(monkeypatch):
    monkeypatch.setenv("XCEPTION_OPS_SEPARABLE_STAGED_GEMM", "wgmma")
    monkeypatch.setenv("XCEPTION_OPS_WGMMA_CONFIG", "96x3x0")
    x, dw, pw, t, a = make_inputs(WGMMA_SHAPES[0], {}, torch.bfloat16, "channels_last")
    with pytest.raises(ValueError, match="XCEPTION_OPS_WGMMA_CONFIG=96x3x0 names none of the builds"):
        call(OPS.separable_conv2d, x, dw, pw, t, a, "cuda")


@WGMMA_SKIP
@pytest.mark.parametrize("config", WGMMA_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_staged_wgmma_gemm_permutes_exactly(dtype, config, monkeypatch):
    """With a 1x1 depthwise kernel of ones, mid = x, and a permutation matrix for the pointwise weight the output is
    x with its channels permuted, exactly: one product per output. Where the fragment layouts or the descriptor are
    read wrong this says which (pixel, channel) went where, the quickest way to the mistake on a first run."""
    monkeypatch.setenv("XCEPTION_OPS_SEPARABLE_STAGED_GEMM", "wgmma")
    monkeypatch.setenv("XCEPTION_OPS_WGMMA_CONFIG", config)
    n, c, h, w = 1, 136, 13, 11  # 143 pixels, 136 channels: partial tiles of both, three stages
    gen = torch.Generator().manual_seed(0)
    x = (torch.randint(-64, 64, (n, c, h, w), generator=gen).float() / 8).to(DEV, dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    dw = torch.ones(c, 1, 1, 1, device=DEV, dtype=dtype)
    perm = torch.randperm(c, generator=gen)
    pw = torch.zeros(c, c, 1, 1, dtype=dtype)
    pw[torch.arange(c), perm, 0, 0] = 1
    pw = pw.to(DEV)
    out = OPS.separable_conv2d(x, dw, pw, None, None, False, [1, 1], [0, 0, 0, 0], [1, 1], "none", None, None, None,
                               None, False, None, False, "cuda")[0]
    want = x[:, perm.to(DEV)]
    wrong = (out != want).nonzero()
    if len(wrong):
        lines = []
        for _, ch, i, j in wrong[:8].tolist():
            match = (x[0, :, i, j] == out[0, ch, i, j]).nonzero().flatten().tolist()
            lines.append(f"out[pixel ({i}, {j}), channel {ch}] = {out[0, ch, i, j].item()}: want input channel "
                         f"{perm[ch].item()}, equal to input channels {match[:4]}")
        raise AssertionError(f"{len(wrong)} of {out.numel()} wrong:\n" + "\n".join(lines))


# The fused forward on wgmma (kernels/separable_wgmma.cuh), XCEPTION_OPS_SEPARABLE_FORWARD=wgmma: 3x3 at stride 1,
# at most 128 depthwise and 256 output channels.
FUSED_WGMMA_SHAPES = [
    (2, 24, 40, 11, 13, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),    # 286 pixels: a partial tile; K < 64
    (1, 64, 128, 19, 17, 1, (3, 3), (1, 1), (0, 1, 1, 0), (1, 1)),   # padding on one side of each dimension
    (1, 72, 136, 9, 9, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),     # K past 64, N past 128
    (2, 128, 256, 15, 15, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),  # the largest build
]


@WGMMA_SKIP
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(sorted(o)) or "plain")
@pytest.mark.parametrize("shape", FUSED_WGMMA_SHAPES, ids=lambda s: "x".join(map(str, s[:5])))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fused_wgmma_forward(dtype, shape, opts, monkeypatch):
    """Every prologue / mid / epilogue option against float64, with the output poisoned."""
    monkeypatch.setenv("XCEPTION_OPS_SEPARABLE_FORWARD", "wgmma")
    check(shape, opts, dtype, "channels_last")


@WGMMA_SKIP
@pytest.mark.parametrize("opts", MID_OPTIONS, ids=lambda o: "-".join(sorted(o)))
@pytest.mark.parametrize("shape", FUSED_WGMMA_SHAPES, ids=lambda s: "x".join(map(str, s[:5])))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fused_wgmma_forward_mid_affine(dtype, shape, opts, monkeypatch):
    """The mid affine and relu6 in the wgmma kernel's depthwise stage, against float64."""
    monkeypatch.setenv("XCEPTION_OPS_SEPARABLE_FORWARD", "wgmma")
    check(shape, opts, dtype, "channels_last")


def runs_and_repeats(shape, opts, kernel):
    """`kernel` is the one that runs (by the profiler's names: not a silent fallback), the results are within the
    tolerance, and ten runs give the same bits."""
    check(shape, opts, torch.bfloat16, "channels_last")
    x, dw, pw, t, a = make_inputs(shape, opts, torch.bfloat16, "channels_last")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        first = call(OPS.separable_conv2d, x, dw, pw, t, a, "cuda")
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages()]
    assert any(kernel in n for n in names), names
    for _ in range(10):
        again = call(OPS.separable_conv2d, x, dw, pw, t, a, "cuda")
        for u, v in zip(first, again):
            assert torch.equal(u, v)


@WGMMA_SKIP
def test_fused_wgmma_forward_runs_and_repeats(monkeypatch):
    """At an entry-flow shape (batch 2, 128 -> 256 channels at 74^2; a persistent grid of one block per SM)."""
    monkeypatch.setenv("XCEPTION_OPS_SEPARABLE_FORWARD", "wgmma")
    runs_and_repeats((2, 128, 256, 74, 74, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)), OPTIONS[2],
                     "separable_wgmma_kernel")


@WGMMA_SKIP
def test_staged_wgmma_gemm_runs_and_repeats(monkeypatch):
    """At the middle flow's shape (batch 2, 728 channels at 19^2)."""
    monkeypatch.setenv("XCEPTION_OPS_SEPARABLE_STAGED_GEMM", "wgmma")
    runs_and_repeats((2, 728, 728, 19, 19, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)), OPTIONS[5],
                     "pointwise_wgmma_kernel")


@WGMMA_SKIP
def test_staged_wgmma_auto_config_picks_by_the_busiest_sm(monkeypatch):
    """XCEPTION_OPS_WGMMA_CONFIG=auto at the middle flow's product (batch 32, 728 channels at 19^2: 91 tiles of 128
    pixels): the build whose busiest SM gets the least work runs (kernels/pointwise_gemm_params.h,
    pick_pointwise_config: ceil(tiles / SMs) x the tile width, ties to the earlier of 128, 256, 192), and is right.
    On 132 SMs (H100 SXM, H200) that is the 192-wide build; on 114 (H100 PCIe) the 128-wide one."""
    monkeypatch.setenv("XCEPTION_OPS_SEPARABLE_STAGED_GEMM", "wgmma")
    monkeypatch.setenv("XCEPTION_OPS_WGMMA_CONFIG", "auto")
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    m_tiles = -(-32 * 19 * 19 // 128)
    widths = (128, 256, 192)
    cost = {w: -(-(m_tiles * -(-728 // w)) // sms) * w for w in widths}
    width = min(widths, key=lambda w: (cost[w], widths.index(w)))
    runs_and_repeats((32, 728, 728, 19, 19, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)), OPTIONS[5],
                     f"pointwise_wgmma_kernel<__nv_bfloat16, {width}, ")


# ---- the backward (csrc/cuda/separable_backward_backend.cpp, kernels/separable_backward.cuh) ----

BACKWARD_OPTIONS = [
    dict(),
    dict(compute_stats=True, in_scale=True, in_shift=True, in_relu=True),   # training: the statistics' gradients
    dict(out_scale=True, out_shift=True, out_relu=True),                    # folded BN + ReLU after it
    dict(in_relu=True, out_shift=True, compute_stats=True, out_relu=True),
    dict(mid="relu", in_scale=True, compute_stats=True),
    dict(mid="elu", out_scale=True, in_relu=True),
]


def check_backward(shape, opts, dtype, layout):
    """Every gradient of separable_conv2d_backward on the cuda backend against the reference op in float64, with
    the same upstream gradients (random grad_out, grad_sum, grad_sumsq); outputs poisoned before the call."""
    x, dw, pw, t, a = make_inputs(shape, opts, dtype, layout)
    out = call(OPS.separable_conv2d, x, dw, pw, t, a, "torch")[0]
    grad_out = torch.randn_like(out)
    c_out = pw.shape[0]
    stats = a["compute_stats"]
    gsum = torch.randn(c_out, device=DEV) if stats else None
    gsumsq = torch.randn(c_out, device=DEV) * 0.1 if stats else None
    # out as the op's autograd passes it: for the ReLU mask, or as y itself when there is no epilogue
    plain = not (a["out_relu"] or t["out_scale"] is not None or t["out_shift"] is not None or t["residual"] is not None)

    def run(tensors, backend, cast):
        v = {k: (None if u is None else cast(u)) for k, u in t.items()}
        return OPS.separable_conv2d_backward(
            cast(grad_out), None if gsum is None else cast(gsum), None if gsumsq is None else cast(gsumsq),
            cast(out) if a["out_relu"] or plain else None, *[cast(u) for u in tensors], v["in_scale"], v["in_shift"],
            a["in_relu"], a["stride"], a["padding"], a["dilation"], a["mid_activation"], v["mid_scale"],
            v["mid_shift"], v["out_scale"], v["out_shift"], a["out_relu"], backend)

    exact = run((x, dw, pw), "torch", lambda u: u.double())
    plain = run((x, dw, pw), "torch", lambda u: u) if dtype != torch.float32 else None
    poison(x.shape, dtype)
    got = run((x, dw, pw), "cuda", lambda u: u)
    torch.cuda.synchronize()
    names = ("grad_x", "grad_dw", "grad_pw", "grad_in_scale", "grad_in_shift", "grad_mid_scale", "grad_mid_shift",
             "grad_out_scale", "grad_out_shift")
    assert len(got) == len(names) == len(exact)
    vectors = dict(grad_in_scale="in_scale", grad_in_shift="in_shift", grad_mid_scale="mid_scale",
                   grad_mid_shift="mid_shift", grad_out_scale="out_scale", grad_out_shift="out_shift")
    for i, name in enumerate(names):
        assert got[i].shape == exact[i].shape, f"{name}: shape {tuple(got[i].shape)} != {tuple(exact[i].shape)}"
        if exact[i].numel() == 0:
            continue
        want_dtype = t[vectors[name]].dtype if name in vectors else dtype  # a vector's gradient in its dtype
        assert got[i].dtype == want_dtype, f"{name}: dtype {got[i].dtype}, want {want_dtype}"
        assert torch.isfinite(got[i]).all(), f"{name}: non-finite values"
        err = rel_err(got[i], exact[i])
        if dtype == torch.float32:
            assert err <= 1e-5, f"{name}: relative error {err:.3g} > 1e-5"
        else:
            bound = 2 * rel_err(plain[i], exact[i]) + FLOOR[dtype]
            assert err <= bound, f"{name}: relative error {err:.3g} > {bound:.3g} (twice PyTorch's, plus a floor)"
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert got[0].is_contiguous(memory_format=fmt)
    # No two outputs share memory (the per-channel pairs were once two halves of one buffer).
    storages = [g.untyped_storage().data_ptr() for g in got if g.numel() > 0]
    assert len(storages) == len(set(storages)), "outputs alias each other"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("opts", BACKWARD_OPTIONS, ids=lambda o: "-".join(sorted(o)) or "plain")
@pytest.mark.parametrize("shape", SHAPES[:4] + SHAPES[6:], ids=lambda s: "x".join(map(str, s[:5])))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_backward(dtype, shape, opts, layout, tf32_off):
    check_backward(shape, opts, dtype, layout)


# The mid stage's backward: grad_pre through relu6's (0 < pre < 6) / relu's / elu's mask of pre (recomputed from d
# with the affine), the sums for mid_scale and mid_shift, grad_d = grad_pre * mid_scale into the depthwise backward.
MID_BACKWARD_OPTIONS = [
    dict(mid="relu6", mid_scale=True, mid_shift=True),
    dict(mid="relu", mid_scale=True, mid_shift=True, compute_stats=True, in_scale=True, in_shift=True, in_relu=True),
    dict(mid_scale=True, out_scale=True, out_shift=True, out_relu=True),
    dict(mid="elu", mid_shift=True, compute_stats=True),
    dict(mid="relu6", out_shift=True),
    dict(mid="hardswish", mid_scale=True, mid_shift=True, out_relu=True),
]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("opts", MID_BACKWARD_OPTIONS, ids=lambda o: "-".join(sorted(o)))
@pytest.mark.parametrize("shape", MID_SHAPES, ids=lambda s: "x".join(map(str, s[:5])))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_mid_affine_backward(dtype, shape, opts, layout, tf32_off):
    """All nine gradients with the mid affine and relu6, against float64, grad_x poisoned."""
    check_backward(shape, opts, dtype, layout)


def test_mid_affine_backward_with_16bit_vectors(tf32_off):
    """Their gradients come back in the vectors' dtype (float16 here), the values float32 sums rounded once."""
    opts = dict(mid="relu6", mid_scale=True, mid_shift=True, mid_dtype=torch.float16)
    x, dw, pw, t, a = make_inputs(MID_SHAPES[3], opts, torch.float32, "channels_last")
    out = call(OPS.separable_conv2d, x, dw, pw, t, a, "cuda")[0]
    g = torch.randn_like(out)

    def run(backend, cast):
        v = {k: (None if u is None else cast(u)) for k, u in t.items()}
        return OPS.separable_conv2d_backward(cast(g), None, None, None, cast(x), cast(dw), cast(pw), None, None,
                                             False, a["stride"], a["padding"], a["dilation"], "relu6",
                                             v["mid_scale"], v["mid_shift"], None, None, False, backend)
    exact = run("torch", lambda u: u.double())
    got = run("cuda", lambda u: u)
    for i in (5, 6):
        assert got[i].dtype == torch.float16
        assert rel_err(got[i], exact[i]) <= 2e-3  # float16's rounding of each sum (2^-11), with room
    for i in (0, 1, 2):
        assert rel_err(got[i], exact[i]) <= 1e-5


def test_mid_affine_backward_repeatable_bitwise():
    """The mid vectors' gradients are fixed-order sums: ten backward passes give the same bits."""
    shape = (4, 64, 96, 19, 19, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    x, dw, pw, t, a = make_inputs(shape, MID_BACKWARD_OPTIONS[1], torch.bfloat16, "channels_last")
    out = call(OPS.separable_conv2d, x, dw, pw, t, a, "cuda")[0]
    g = torch.randn_like(out)

    def once():
        return OPS.separable_conv2d_backward(g, None, None, None, x, dw, pw, t["in_scale"], t["in_shift"], True,
                                             a["stride"], a["padding"], a["dilation"], "relu", t["mid_scale"],
                                             t["mid_shift"], None, None, False, "cuda")
    first = once()
    assert first[5].numel() == 64 and first[6].numel() == 64
    for _ in range(10):
        for u, v in zip(first, once()):
            assert torch.equal(u, v)


def test_backward_of_xception_shapes(tf32_off):
    """The middle flow's 728 channels (several output-channel and depthwise-channel tiles of the kernel)."""
    check_backward((2, 728, 728, 19, 19, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)), BACKWARD_OPTIONS[1],
                   torch.bfloat16, "channels_last")
    check_backward((2, 128, 256, 37, 37, 1, (3, 3), (2, 2), (0, 1, 0, 1), (1, 1)), BACKWARD_OPTIONS[1],
                   torch.float32, "contiguous")


def test_backward_repeatable_bitwise():
    """Fixed-order reductions throughout: ten backward passes give the same bits."""
    shape = (4, 64, 96, 19, 19, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    x, dw, pw, t, a = make_inputs(shape, BACKWARD_OPTIONS[1], torch.bfloat16, "channels_last")
    out = call(OPS.separable_conv2d, x, dw, pw, t, a, "cuda")[0]
    g = torch.randn_like(out)
    s, ss = torch.randn(96, device=DEV), torch.randn(96, device=DEV)

    def once():
        return OPS.separable_conv2d_backward(g, s, ss, None, x, dw, pw, t["in_scale"], t["in_shift"], True,
                                             a["stride"], a["padding"], a["dilation"], "none", None, None, None, None,
                                             False, "cuda")
    first = once()
    for _ in range(10):
        for u, v in zip(first, once()):
            assert torch.equal(u, v)


@WGMMA_SKIP
@pytest.mark.parametrize("config", WGMMA_CONFIGS)
@pytest.mark.parametrize("opts", BACKWARD_OPTIONS[:3], ids=["plain", "training", "folded-bn-relu"])
def test_backward_products_on_wgmma(opts, config, monkeypatch):
    """The backward's grad_mid = grad_y W (the GEMM, the weight transposed) and grad_pw = grad_y^T mid (the
    split-pixel kernel) on Hopper's wgmma: every gradient against float64, and the profiler sees both kernels run."""
    monkeypatch.setenv("XCEPTION_OPS_SEPARABLE_STAGED_GEMM", "wgmma")
    monkeypatch.setenv("XCEPTION_OPS_WGMMA_CONFIG", config)
    shape = WGMMA_SHAPES[0]  # 24 -> 136 channels
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        check_backward(shape, opts, torch.bfloat16, "channels_last")
    names = [e.key for e in prof.key_averages()]
    assert any("pointwise_wgmma_kernel" in n for n in names), names
    assert any("pointwise_wgrad_kernel" in n for n in names), names


@WGMMA_SKIP
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_backward_on_wgmma_at_the_middle_flow(dtype, monkeypatch):
    """728 -> 728 channels at 19^2, batch 2: 36 tiles of the weight gradient, its 722 pixels in 3 splits."""
    monkeypatch.setenv("XCEPTION_OPS_SEPARABLE_STAGED_GEMM", "wgmma")
    check_backward((2, 728, 728, 19, 19, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)), BACKWARD_OPTIONS[1], dtype,
                   "channels_last")
