"""The BatchNorm finalize op (xception_ops.batch_norm_finalize): statistics sums -> scale, shift, mean, variance;
and the running statistics' update that follows it (xception_ops.batch_norm_update_stats).

Forward against the formulas in float64, its hand-written gradients against finite differences (gradcheck), the
plain-PyTorch fallback, argument errors, and on a GPU the CUDA kernels against the reference path.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from xception_ops import _library, backend as backends, batchnorm, reference

from .conftest import record_op_calls, requires_gpu

OPS = torch.ops.xception_ops
needs_ext = pytest.mark.skipif(_library.EXTENSION is None, reason="the compiled library is not loaded")


def sums(channels, count, dtype=torch.float64, device="cpu"):
    """Per-channel sums of `count` draws with means ~ N(0, 1) and standard deviations in [0.5, 2], as a fused
    forward would return them (variances not tiny next to the squared means: well conditioned in float32)."""
    kw = dict(dtype=dtype, device=device)
    std = torch.rand(channels, **kw) * 1.5 + 0.5
    y = torch.randn(count, channels, **kw) * std + torch.randn(channels, **kw)
    return y.sum(0), (y * y).sum(0)


def expected(total, total_sq, count, weight, bias, eps):
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(0)
    scale = torch.rsqrt(var + eps) * (1 if weight is None else weight.to(total.dtype))
    shift = (0 if bias is None else bias.to(total.dtype)) - mean * scale
    return scale, shift, mean, var


@needs_ext
@pytest.mark.parametrize("affine", [True, False])
def test_forward_matches_the_formulas(affine):
    total, total_sq = sums(6, 40)
    weight = torch.rand(6, dtype=torch.float64) + 0.5 if affine else None
    bias = torch.randn(6, dtype=torch.float64) if affine else None
    got = OPS.batch_norm_finalize(total, total_sq, 40, weight, bias, 1e-5, "torch")
    for g, e in zip(got, expected(total, total_sq, 40, weight, bias, 1e-5)):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


@needs_ext
def test_negative_variance_from_rounding_is_clamped():
    total = torch.tensor([3.0, -2.0])
    total_sq = total * total / 3 - torch.tensor([1e-3, 0.0])  # sumsq / n slightly below mean^2
    scale, shift, mean, var = OPS.batch_norm_finalize(total, total_sq, 3, None, None, 1e-5, "torch")
    assert torch.equal(var, torch.zeros(2)) and torch.allclose(scale, torch.full((2,), 1e-5 ** -0.5))


@needs_ext
@pytest.mark.parametrize("weight,bias", [(True, True), (False, True), (True, False), (False, False)])
def test_gradients_match_finite_differences(weight, bias):
    total, total_sq = sums(5, 30)
    args = [total.requires_grad_(), total_sq.requires_grad_()]
    w = (torch.rand(5, dtype=torch.float64) + 0.5).requires_grad_() if weight else None
    b = torch.randn(5, dtype=torch.float64).requires_grad_() if bias else None

    def fn(s, q, *params):
        it = iter(params)
        return OPS.batch_norm_finalize(s, q, 30, next(it) if weight else None, next(it) if bias else None, 1e-3,
                                       "torch")

    inputs = tuple(args + [t for t in (w, b) if t is not None])
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@needs_ext
def test_gradients_in_float32_parameters_keep_their_dtype():
    total, total_sq = sums(4, 20, dtype=torch.float32)
    weight = torch.rand(4, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(4, dtype=torch.bfloat16, requires_grad=True)
    scale, shift, _, _ = OPS.batch_norm_finalize(total.requires_grad_(), total_sq, 20, weight, bias, 1e-5, "torch")
    (scale.sum() + shift.sum()).backward()
    assert weight.grad.dtype == torch.bfloat16 and bias.grad.dtype == torch.bfloat16
    assert total.grad.dtype == torch.float32


@needs_ext
@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_backward_op_returns_16bit_parameters_gradients_in_their_dtype(param_dtype):
    """Beside float32 sums, a 16-bit weight's and bias's gradients come in that dtype, rounded once from the float32
    ones (so autograd converts nothing after the op); the sums' gradients stay float32."""
    total, total_sq = sums(6, 20, dtype=torch.float32)
    weight = torch.rand(6, dtype=param_dtype) + 0.5
    grads = [torch.randn(6) for _ in range(4)]
    got = OPS.batch_norm_finalize_backward(total, total_sq, 20, weight, 1e-5, *grads, "torch")
    want = OPS.batch_norm_finalize_backward(total, total_sq, 20, weight.float(), 1e-5, *grads, "torch")
    assert [g.dtype for g in got] == [torch.float32, torch.float32, param_dtype, param_dtype]
    for g, w in zip(got, want):
        assert torch.equal(g, w.to(g.dtype))


def test_python_fallback_matches_the_op(monkeypatch):
    total, total_sq = sums(6, 25, dtype=torch.float32)
    weight, bias = torch.rand(6) + 0.5, torch.randn(6)
    if _library.EXTENSION is not None:
        want = OPS.batch_norm_finalize(total, total_sq, 25, weight, bias, 1e-5, "torch")
    else:
        want = expected(total, total_sq, 25, weight, bias, 1e-5)
    monkeypatch.setattr(_library, "EXTENSION", None)
    got = batchnorm.finalize(total, total_sq, 25, weight, bias, 1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


@needs_ext
def test_triton_requests_run_the_reference(monkeypatch):
    total, total_sq = sums(3, 9, dtype=torch.float32)
    got = batchnorm.finalize(total, total_sq, 9, None, None, 1e-5, backend="triton")
    monkeypatch.setenv("XCEPTION_OPS_BACKEND", "triton")
    again = batchnorm.finalize(total, total_sq, 9, None, None, 1e-5)
    for g, a, e in zip(got, again, expected(total, total_sq, 9, None, None, 1e-5)):
        torch.testing.assert_close(g, e)
        torch.testing.assert_close(a, e)


class CudaVector:
    """What the per-channel backend choice reads of a CUDA tensor, for machines without a GPU."""
    is_cuda = True
    device = torch.device("cuda", 0)


VECTOR_OPS = ["batch_norm_finalize", "batch_norm_finalize_backward", "batch_norm_update_stats"]


@pytest.mark.parametrize("op", VECTOR_OPS)
def test_auto_takes_the_cuda_kernel_of_a_per_channel_op_where_built(monkeypatch, op):
    monkeypatch.delenv("XCEPTION_OPS_BACKEND", raising=False)
    built = {op}
    monkeypatch.setattr(_library, "_cuda_has", lambda name: name in built)
    name = f"xception_ops.{op}"
    assert batchnorm._vector_backend("auto", name, CudaVector()) == "cuda"
    assert batchnorm._vector_backend("auto", name, torch.zeros(3)) == "torch"  # CPU tensors
    monkeypatch.setenv("XCEPTION_OPS_BACKEND", "auto")
    assert batchnorm._vector_backend("auto", name, CudaVector()) == "cuda"
    built.clear()  # a build without this kernel: the reference path
    assert batchnorm._vector_backend("auto", name, CudaVector()) == "torch"


@pytest.mark.parametrize("op", VECTOR_OPS)
def test_explicit_per_channel_backends_and_the_override_are_respected(monkeypatch, op):
    monkeypatch.setattr(_library, "_cuda_has", lambda name: True)
    monkeypatch.setattr(backends, "_cuda_problem", lambda op, device: None)  # as if the GPU could run it
    name, vec = f"xception_ops.{op}", CudaVector()
    monkeypatch.delenv("XCEPTION_OPS_BACKEND", raising=False)
    assert batchnorm._vector_backend("torch", name, vec) == "torch"
    assert batchnorm._vector_backend("triton", name, vec) == "torch"  # no triton kernels for C-element vectors
    assert batchnorm._vector_backend("cuda", name, vec) == "cuda"
    for override, want in (("torch", "torch"), ("triton", "torch"), ("cuda", "cuda")):
        monkeypatch.setenv("XCEPTION_OPS_BACKEND", override)
        assert batchnorm._vector_backend("auto", name, vec) == want
        assert batchnorm._vector_backend("torch", name, vec) == "torch"  # an explicit backend beats the variable


@needs_ext
@pytest.mark.parametrize("bad,match", [
    (dict(count=0), "count must be at least 1"),
    (dict(total=torch.zeros(3, dtype=torch.float16)), "float32 or float64"),
    (dict(total=torch.zeros(3, 1)), "1-D"),
    (dict(total_sq=torch.zeros(4)), "sumsq must have sum's shape"),
    (dict(total_sq=torch.zeros(3, dtype=torch.float64)), "sumsq has dtype"),
    (dict(weight=torch.ones(4)), "weight must have shape \\[3\\]"),
    (dict(bias=torch.ones(3, device="meta")), "bias is on meta but sum is on cpu"),
    (dict(eps=-1.0), "eps must be >= 0"),
    (dict(backend="nope"), "unknown backend"),
])
def test_bad_arguments_are_named(bad, match):
    args = dict(total=torch.zeros(3), total_sq=torch.ones(3), count=4, weight=None, bias=None, eps=1e-5,
                backend="torch")
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        OPS.batch_norm_finalize(args["total"], args["total_sq"], args["count"], args["weight"], args["bias"],
                                args["eps"], args["backend"])


@pytest.mark.gpu
@requires_gpu
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("channels", [1, 7, 300, 2048])
def test_cuda_kernel_matches_the_reference(dtype, channels):
    if "xception_ops.batch_norm_finalize" not in _library.EXTENSION.CUDA_OPS:
        pytest.skip("built without the CUDA kernels")
    total, total_sq = sums(channels, 64, dtype=dtype, device="cuda")
    weight = torch.rand(channels, device="cuda", dtype=torch.bfloat16) + 0.5
    bias = torch.randn(channels, device="cuda")
    for w, b in ((weight, bias), (None, None)):
        got = OPS.batch_norm_finalize(total, total_sq, 64, w, b, 1e-5, "cuda")
        want = OPS.batch_norm_finalize(total.double(), total_sq.double(), 64, w, b, 1e-5, "torch")
        tol = 2e-5 if dtype == torch.float32 else 1e-12  # float32: rsqrtf and sumsq / n - mean^2
        for g, e in zip(got, want):
            assert g.dtype == dtype and g.is_cuda
            torch.testing.assert_close(g.double(), e, rtol=tol, atol=tol)


def expected_running(running_mean, running_var, mean, var, pre_bias, count, momentum):
    m = mean + (0 if pre_bias is None else pre_bias.to(mean.dtype))
    rm = running_mean.double() * (1 - momentum) + m.double() * momentum
    rv = running_var.double() * (1 - momentum) + var.double() * count / (count - 1) * momentum
    return rm, rv


@needs_ext
@pytest.mark.parametrize("buffers", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("momentum", [0.1, 1.0, 0.0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_running_statistics_update_in_place(buffers, momentum, with_bias):
    mean, var = torch.randn(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64) + 0.1
    pre_bias = torch.randn(6) if with_bias else None
    running_mean, running_var = torch.randn(6).to(buffers), (torch.rand(6) + 0.5).to(buffers)
    want = expected_running(running_mean, running_var, mean, var, pre_bias, 17, momentum)
    ids = (running_mean.data_ptr(), running_var.data_ptr())
    OPS.batch_norm_update_stats(running_mean, running_var, mean, var, pre_bias, 17, momentum, "torch")
    assert (running_mean.data_ptr(), running_var.data_ptr()) == ids and running_mean.dtype == buffers
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[buffers]
    torch.testing.assert_close(running_mean.double(), want[0].to(buffers).double(), rtol=tol, atol=tol)
    torch.testing.assert_close(running_var.double(), want[1].to(buffers).double(), rtol=tol, atol=tol)


@needs_ext
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, requires_gpu])])
def test_running_statistics_update_moves_the_version_counters(device):
    """The update is in place as aten's in-place ops are: the buffers' version counters move (the CUDA kernel writes
    through raw pointers, which the dispatcher does not count), and batch statistics that require grad record no
    graph (callers pass them without detach or no_grad)."""
    backend = "torch" if device == "cpu" else "cuda"
    mean = torch.randn(5, device=device, requires_grad=True)
    var = (torch.rand(5, device=device) + 0.1).requires_grad_()
    running_mean, running_var = torch.zeros(5, device=device), torch.ones(5, device=device)
    versions = running_mean._version, running_var._version
    OPS.batch_norm_update_stats(running_mean, running_var, mean * 1, var * 1, None, 8, 0.5, backend)
    assert running_mean._version > versions[0] and running_var._version > versions[1]
    assert running_mean.grad_fn is None and not running_mean.requires_grad
    want = expected_running(torch.zeros(5), torch.ones(5), mean.detach().cpu(), var.detach().cpu(), None, 8, 0.5)
    torch.testing.assert_close(running_mean.cpu().double(), want[0], rtol=1e-6, atol=1e-6)


@needs_ext
@pytest.mark.parametrize("backend", ["torch", pytest.param("cuda", marks=[pytest.mark.gpu, requires_gpu])])
def test_inference_sees_statistics_re_estimated_without_an_optimizer_step(backend):
    """swa_utils.update_bn's pattern: inference, then training-mode passes under no_grad that only move the running
    statistics, then inference again. The fused module's folded BatchNorm (cached while its sources' versions
    hold) must be folded again from the new statistics."""
    from xception_ops.nn import SeparableConvBN
    device = "cpu" if backend == "torch" else "cuda"
    torch.manual_seed(0)
    module = SeparableConvBN(4, 6, 3, backend=backend).to(device).eval()
    x = torch.randn(3, 4, 6, 6, device=device)
    with torch.no_grad():
        before = module(x)
        module.train()
        for _ in range(3):
            module(x * 2 + 1)
        module.eval()
        after = module(x)
        module.__dict__["_epilogue_cache"] = None  # folded afresh
        want = module(x)
    assert not after.equal(before)
    torch.testing.assert_close(after, want, rtol=0, atol=0)


@needs_ext
@pytest.mark.parametrize("bad,match", [
    (dict(mean=torch.zeros(3, 1)), "mean must be 1-D"),
    (dict(mean=torch.zeros(3, dtype=torch.float16)), "mean must be float32 or float64"),
    (dict(var=torch.zeros(4)), "var must have mean's shape"),
    (dict(var=torch.zeros(3, dtype=torch.float64)), "var has dtype"),
    (dict(running_mean=torch.zeros(2)), "running_mean must have mean's shape"),
    (dict(running_var=torch.zeros(3, dtype=torch.int64)), "must be floating point"),
    (dict(running_var=torch.zeros(3, device="meta")), "running_var is on meta"),
    (dict(pre_bias=torch.zeros(4)), r"pre_bias must have shape \[3\]"),
    (dict(count=1), "count must be at least 2"),
    (dict(momentum=1.5), r"momentum must be in \[0, 1\]"),
    (dict(backend="nope"), "unknown backend"),
])
def test_running_statistics_bad_arguments_are_named(bad, match):
    args = dict(running_mean=torch.zeros(3), running_var=torch.ones(3), mean=torch.zeros(3), var=torch.ones(3),
                pre_bias=None, count=4, momentum=0.1, backend="torch")
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        OPS.batch_norm_update_stats(*args.values())


def test_module_running_statistics_follow_pytorch_batch_norm():
    # The fused module's training step leaves the BatchNorm's running statistics where nn.BatchNorm2d's own would.
    from xception_ops.nn import SeparableConvBN
    torch.manual_seed(0)
    module = SeparableConvBN(4, 6, 3, backend="torch").train()
    plain = torch.nn.BatchNorm2d(6).train()
    x = torch.randn(3, 4, 5, 5)
    for _ in range(3):
        module(x)
        with torch.no_grad():
            y = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, module.depthwise.weight, padding=1, groups=4),
                                           module.pointwise.weight)
            plain(y)
    torch.testing.assert_close(module.bn.running_mean, plain.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(module.bn.running_var, plain.running_var, rtol=1e-5, atol=1e-6)
    assert int(module.bn.num_batches_tracked) == 3


@pytest.mark.gpu
@requires_gpu
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("buffers", ["stats", "bfloat16", "float16", "strided"])
@pytest.mark.parametrize("channels", [1, 300, 2048])
def test_cuda_running_statistics_match_the_reference(dtype, buffers, channels):
    if "xception_ops.batch_norm_update_stats" not in _library.EXTENSION.CUDA_OPS:
        pytest.skip("built without the CUDA kernels")
    mean = torch.randn(channels, device="cuda", dtype=dtype)
    var = torch.rand(channels, device="cuda", dtype=dtype) + 0.1
    pre_bias = torch.randn(channels, device="cuda", dtype=torch.bfloat16)
    bdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(buffers, dtype)
    start = [torch.randn(2 * channels, device="cuda"), torch.rand(2 * channels, device="cuda") + 0.5]

    def buffer_pair():  # fresh copies; "strided": every other element of a longer buffer (the reference's path)
        pair = [t.to(bdtype, copy=True) for t in start]
        return [t[::2] for t in pair] if buffers == "strided" else [t[:channels] for t in pair]

    for bias in (pre_bias, None):
        got, want = buffer_pair(), buffer_pair()
        assert got[0].is_contiguous() == (buffers != "strided" or channels == 1)
        OPS.batch_norm_update_stats(got[0], got[1], mean, var, bias, 50, 0.1, "cuda")
        OPS.batch_norm_update_stats(want[0], want[1], mean, var, bias, 50, 0.1, "torch")
        # The kernel (buffers in the statistics' dtype, or 16-bit beside float32 statistics, rounded once) against
        # ATen's ops: roundings apart (a 16-bit ulp at most); strided buffers run the reference itself.
        tol = {torch.float32: 1e-6, torch.float64: 1e-12}[dtype] if bdtype == dtype else 1e-2
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double(), w.double(), rtol=tol, atol=tol)


@needs_ext
@pytest.mark.parametrize("present", [(1, 1, 1, 1), (1, 0, 0, 1), (0, 1, 1, 0), (0, 0, 0, 0)])
@pytest.mark.parametrize("weight", [True, False])
def test_backward_op_matches_the_differentiable_formulas(present, weight):
    # The one-kernel backward (first-order autograd takes it) against the composite of PyTorch ops that a
    # create_graph backward takes; a clamped variance (channel 0) included.
    total, total_sq = sums(6, 30)
    total_sq[0] = total[0] * total[0] / 30 - 1e-3
    w = torch.rand(6, dtype=torch.float64) + 0.5 if weight else None
    grads = [torch.randn(6, dtype=torch.float64) if p else None for p in present]
    got = OPS.batch_norm_finalize_backward(total, total_sq, 30, w, 1e-3, *grads, "torch")
    want = reference.finalize_backward(total, total_sq, 30, w, 1e-3, *grads)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e.expand_as(g) if e.dim() == 0 else e, rtol=1e-12, atol=1e-12)


@needs_ext
def test_first_order_backward_runs_the_op():
    total, total_sq = sums(4, 12)
    total.requires_grad_()
    with record_op_calls("batch_norm_finalize_backward") as calls:
        scale, shift, _, _ = OPS.batch_norm_finalize(total, total_sq, 12, None, None, 1e-5, "torch")
        (scale.sum() + shift.sum()).backward()
    assert [args[-1] for args in calls] == ["torch"]


@needs_ext
def test_unused_outputs_reach_the_backward_as_none():
    """The mean and variance feed only the running statistics: the backward op gets None for their gradients, not
    tensors of zeros that autograd would allocate and fill on every step (two launches per BatchNorm)."""
    total, total_sq = sums(4, 12)
    total.requires_grad_()
    with record_op_calls("batch_norm_finalize_backward") as calls:
        scale, shift, mean, _ = OPS.batch_norm_finalize(total, total_sq, 12, None, None, 1e-5, "torch")
        (scale * 2).sum().backward(retain_graph=True)
        (mean.sum() + shift.sum()).backward()
    grads = [args[5:9] for args in calls]
    assert [[g is None for g in gs] for gs in grads] == [[False, True, True, True], [True, False, False, True]]
    ones = torch.ones(4, dtype=total.dtype)
    want = reference.finalize_backward(total.detach(), total_sq, 12, None, 1e-5, 2 * ones, ones, ones, None)[0]
    torch.testing.assert_close(total.grad, want)


@pytest.mark.gpu
@requires_gpu
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("channels", [1, 300, 2048])
def test_cuda_backward_kernel_matches_the_reference(dtype, channels):
    if "xception_ops.batch_norm_finalize_backward" not in _library.EXTENSION.CUDA_OPS:
        pytest.skip("built without the CUDA kernels")
    total, total_sq = sums(channels, 64, dtype=dtype, device="cuda")
    weight = torch.rand(channels, device="cuda", dtype=torch.bfloat16) + 0.5
    grads = [torch.randn(channels, device="cuda", dtype=dtype) for _ in range(4)]
    for w, g in ((weight, grads), (None, [grads[0], None, grads[2], None])):
        got = OPS.batch_norm_finalize_backward(total, total_sq, 64, w, 1e-5, *g, "cuda")
        want = OPS.batch_norm_finalize_backward(total.double(), total_sq.double(), 64, w, 1e-5,
                                                *[None if t is None else t.double() for t in g], "torch")
        tol = 2e-5 if dtype == torch.float32 else 1e-12
        for i, (a, b) in enumerate(zip(got, want)):
            # The parameters' gradients in the bf16 weight's dtype beside float32 sums: rounded once to bf16.
            in_params = i >= 2 and w is not None and dtype == torch.float32
            assert a.dtype == (torch.bfloat16 if in_params else dtype) and a.is_cuda
            rtol = 2.0**-8 if in_params else tol
            torch.testing.assert_close(a.double(), b, rtol=rtol, atol=tol)


# ---------------------------------------------------------------------------------------------- the update in finalize

def _separately(total, total_sq, count, weight, bias, backend, running, tracked, pre_bias, momentum):
    """batch_norm_finalize, then batch_norm_update_stats and num_batches_tracked += 1: what the keyword-only
    arguments do in one op."""
    out = OPS.batch_norm_finalize(total, total_sq, count, weight, bias, 1e-5, backend)
    OPS.batch_norm_update_stats(running[0], running[1], out[2], out[3], pre_bias, count, momentum, backend)
    tracked.add_(1)
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, requires_gpu])])
@pytest.mark.parametrize("params", [torch.float32, torch.bfloat16, None], ids=str)
@pytest.mark.parametrize("buffers", ["params", "float32", "strided"])
@needs_ext
def test_finalize_with_the_update_is_the_three_steps_bit_for_bit(device, params, buffers):
    """The finalize op's keyword-only update gives what finalize, batch_norm_update_stats and `+= 1` give, in the
    same bits: in the finalize kernel where the buffers are contiguous in the parameters' dtype (float32 or 16-bit),
    through the separate steps otherwise (float32 buffers beside bf16 parameters, strided buffers)."""
    backend = "cuda" if device == "cuda" else "torch"
    channels, count = 300, 50
    total, total_sq = sums(channels, count, torch.float32, device)
    weight = bias = None
    if params is not None:
        weight = (torch.rand(channels, device=device) + 0.5).to(params)
        bias = torch.randn(channels, device=device).to(params)
    pre_bias = torch.randn(channels, device=device)
    buffer_dtype = (params or torch.float32) if buffers == "params" else torch.float32
    start = [torch.randn(2 * channels, device=device), torch.rand(2 * channels, device=device) + 0.5]

    def state():
        pair = [t.to(buffer_dtype, copy=True) for t in start]
        pair = [t[::2] for t in pair] if buffers == "strided" else [t[:channels] for t in pair]
        return pair, torch.tensor(7, device=device)

    (got_running, got_tracked), (want_running, want_tracked) = state(), state()
    versions = [t._version for t in (*got_running, got_tracked)]
    got = OPS.batch_norm_finalize(total, total_sq, count, weight, bias, 1e-5, backend,
                                  running_mean=got_running[0], running_var=got_running[1],
                                  num_batches_tracked=got_tracked, pre_bias=pre_bias, momentum=0.1)
    want = _separately(total, total_sq, count, weight, bias, backend, want_running, want_tracked, pre_bias, 0.1)
    for g, w in zip((*got, *got_running), (*want, *want_running)):
        assert torch.equal(g, w)
    assert int(got_tracked) == 8
    assert all(t._version > v for t, v in zip((*got_running, got_tracked), versions))
    # The count alone, and none of it.
    OPS.batch_norm_finalize(total, total_sq, count, weight, bias, 1e-5, backend, num_batches_tracked=got_tracked)
    assert int(got_tracked) == 9
    plain = OPS.batch_norm_finalize(total, total_sq, count, weight, bias, 1e-5, backend)
    for g, w in zip(plain, want):
        assert torch.equal(g, w)


@needs_ext
def test_finalize_with_the_update_keeps_its_gradients():
    total, total_sq = sums(5, 20)
    total, total_sq = total.requires_grad_(), total_sq.requires_grad_()
    weight = torch.rand(5, dtype=torch.float64, requires_grad=True)
    pre_bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    running = [torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)]
    tracked = torch.tensor(0)

    def fn(t, q, w):
        return OPS.batch_norm_finalize(t, q, 20, w, None, 1e-5, "torch", running_mean=running[0],
                                       running_var=running[1], num_batches_tracked=tracked, pre_bias=pre_bias,
                                       momentum=0.1)[:2]

    assert torch.autograd.gradcheck(fn, (total, total_sq, weight))
    scale, shift = fn(total, total_sq, weight)
    (scale.sum() + shift.sum()).backward()
    assert pre_bias.grad is None  # it moves the running mean only


@needs_ext
@pytest.mark.parametrize("bad,match", [
    (dict(running_mean=torch.zeros(4)), "running_mean and running_var go together"),
    (dict(num_batches_tracked=torch.zeros(())), "num_batches_tracked must be one int64"),
    (dict(running_mean=torch.zeros(3), running_var=torch.ones(3)), "running_mean must have mean's shape"),
    (dict(running_mean=torch.zeros(4), running_var=torch.ones(4), momentum=2.0), "momentum must be in"),
])
def test_finalize_update_arguments_are_checked(bad, match):
    total, total_sq = sums(4, 10, torch.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        OPS.batch_norm_finalize(total, total_sq, 10, None, None, 1e-5, "torch", **bad)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode, pytest.raises((ValueError, TypeError), match=match):
        OPS.batch_norm_finalize(mode.from_tensor(total), mode.from_tensor(total_sq), 10, None, None, 1e-5, "torch",
                                **{k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v
                                   for k, v in bad.items()})


@needs_ext
def test_a_training_step_runs_one_op_per_batch_norm():
    """SeparableConvBN in training: the finalize op updates the running statistics and the batch count itself; no
    batch_norm_update_stats op and no separate `num_batches_tracked += 1` runs."""
    from xception_ops.nn import SeparableConvBN

    module = SeparableConvBN(4, 6, 3, padding=1, backend="torch").train()
    x = torch.randn(2, 4, 5, 5)
    with record_op_calls("batch_norm_update_stats") as updates, record_op_calls("batch_norm_finalize") as finals:
        module(x)
    assert updates == [] and len(finals) == 1
    assert int(module.bn.num_batches_tracked) == 1
    module.bn.momentum = None  # a cumulative average needs the count first: the separate steps
    with record_op_calls("batch_norm_update_stats") as updates:
        module(x)
    assert len(updates) == 1 and int(module.bn.num_batches_tracked) == 2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, requires_gpu])])
@needs_ext
def test_finalize_with_no_channels_still_counts_the_batch(device):
    backend = "cuda" if device == "cuda" else "torch"
    empty = torch.zeros(0, device=device)
    tracked = torch.tensor(5, device=device)
    out = OPS.batch_norm_finalize(empty, empty, 4, None, None, 1e-5, backend, running_mean=empty.clone(),
                                  running_var=empty.clone(), num_batches_tracked=tracked, momentum=0.1)
    assert all(t.shape == (0,) for t in out) and int(tracked) == 6


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, requires_gpu])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("which", ["both", "sum", "sumsq"])
def test_channel_moments_and_their_gradient_against_float64(device, dtype, layout, which):
    """The mid BatchNorm's statistics (one pass over y each way with the library): sums in float32, and
    grad_y = grad_sum + 2 y grad_sumsq rounded once to y's dtype, y's layout kept; a missing gradient is zero."""
    y = torch.randn(3, 5, 7, 6, device=device).mul(3).add(1).to(dtype).contiguous(memory_format=layout)
    y.requires_grad_()
    total, total_sq, count = batchnorm.channel_moments(y)
    assert count == 3 * 7 * 6 and total.dtype == total_sq.dtype == torch.float32
    exact = y.detach().double()
    torch.testing.assert_close(total.double(), exact.sum((0, 2, 3)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(total_sq.double(), (exact * exact).sum((0, 2, 3)), rtol=1e-5, atol=1e-4)
    g_sum, g_sumsq = torch.randn(5, device=device), torch.randn(5, device=device)
    outputs = {"both": (total, total_sq), "sum": (total,), "sumsq": (total_sq,)}[which]
    grads = {"both": (g_sum, g_sumsq), "sum": (g_sum,), "sumsq": (g_sumsq,)}[which]
    (grad_y,) = torch.autograd.grad(outputs, y, grads)
    want = torch.zeros_like(exact)
    if which != "sumsq":
        want += g_sum.double().view(1, -1, 1, 1)
    if which != "sum":
        want += 2 * exact * g_sumsq.double().view(1, -1, 1, 1)
    assert grad_y.dtype == dtype and grad_y.is_contiguous(memory_format=layout)
    # one rounding to y's dtype of a float32 value: half an ulp of each, relative to the largest term
    ulp = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    assert (grad_y.double() - want).abs().max() <= ulp * want.abs().max() + 1e-5


def test_convert_sync_batchnorm_keeps_the_parameters_and_buffers():
    """Every nn.BatchNorm2d becomes a SyncBatchNorm2d holding the very same parameters and buffers (an optimizer
    made before keeps training them; frozen ones stay frozen; float64 stays float64), as torch's own conversion."""
    frozen = nn.BatchNorm2d(3).double()
    frozen.weight.requires_grad_(False)
    with torch.no_grad():
        frozen.running_mean.fill_(1e-9)
    plain = nn.BatchNorm2d(2, affine=False, track_running_stats=False)
    hook_calls = []
    frozen.register_forward_hook(lambda *a: hook_calls.append(1))
    model = nn.Sequential(frozen, nn.Sequential(plain)).eval()
    before = {name: t for name, t in [*model.named_parameters(), *model.named_buffers()]}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batchnorm.convert_sync_batchnorm(model)
    assert type(model[0]) is batchnorm.SyncBatchNorm2d and type(model[1][0]) is batchnorm.SyncBatchNorm2d
    after = {name: t for name, t in [*model.named_parameters(), *model.named_buffers()]}
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert not model[0].weight.requires_grad and model[0].running_mean.dtype == torch.float64
    assert model[0].running_mean[0].item() == 1e-9 and not model[0].training
    assert model[1][0].weight is None and model[1][0].running_mean is None and not model[1][0].affine
    assert all(a is b for a, b in zip(optimizer.param_groups[0]["params"], (model[0].weight, model[0].bias)))
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(model[0](x), F.batch_norm(x, frozen.running_mean, frozen.running_var, frozen.weight,
                                                         frozen.bias, False, 0.1, frozen.eps))
    assert hook_calls == [1]
