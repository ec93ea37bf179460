"""backend="triton" through the public operators: routing (C++ router -> private op -> Triton kernel), autograd,
fake kernels and opcheck, and the errors. The kernels' own numerics are in test_triton_kernels.py. Without a GPU
these run in Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py)."""

import pytest
import torch

import xception_ops
from xception_ops import _library, reference
from xception_ops.backend import BackendUnavailableError, resolve
from xception_ops.geometry import resolve_padding

from .conftest import record_op_calls, relative_error

pytest.importorskip("triton")
if _library.TRITON is None:
    pytest.fail(f"triton is installed but the triton backend did not load: {_library.TRITON_ERROR}",
                pytrace=False)
IMPLEMENTED = _library.TRITON.IMPLEMENTED
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def needs(name):
    return pytest.mark.skipif(name not in IMPLEMENTED, reason=f"the triton backend has no {name} yet")


@needs("depthwise_conv2d")
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_depthwise_through_the_public_op(layout):
    x = torch.randn(2, 5, 9, 7, device=DEVICE).contiguous(memory_format=layout).requires_grad_()
    w = torch.randn(10, 1, 3, 3, device=DEVICE, requires_grad=True)
    out = xception_ops.depthwise_conv2d(x, w, stride=2, padding="same", backend="triton")
    grad = torch.randn_like(out)
    out.backward(grad)
    x64, w64 = x.detach().double().cpu().requires_grad_(), w.detach().double().cpu().requires_grad_()
    ref = reference.depthwise_conv2d(x64, w64, None, (2, 2), resolve_padding("same", (9, 7), (3, 3), (2, 2), (1, 1)),
                                     (1, 1))
    ref.backward(grad.double().cpu())
    assert relative_error(out, ref) <= 1e-5
    if "depthwise_conv2d_backward_input" in IMPLEMENTED:
        assert relative_error(x.grad, x64.grad) <= 1e-5
    if "depthwise_conv2d_backward_weight" in IMPLEMENTED:
        assert relative_error(w.grad, w64.grad) <= 1e-5
    assert out.is_contiguous(memory_format=layout)


@needs("separable_conv2d")
@pytest.mark.parametrize("training", [False, True])
def test_model_block_on_triton_matches_the_reference(training):
    """A fused module end to end: forward, the BN statistics path, and (with the backward kernel) gradients."""
    from xception_ops.nn import SeparableConvBN
    block = SeparableConvBN(6, 10, 3, pre_relu=True, post_relu=True).to(DEVICE).train(training)
    with torch.no_grad():
        block.bn.running_var.uniform_(0.5, 1.5)
        block.bn.weight.uniform_(0.5, 1.5)
    ref_block = __import__("copy").deepcopy(block)
    block.backend, ref_block.backend = "triton", "torch"
    x = torch.randn(2, 6, 8, 9, device=DEVICE)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, want = block(xa), ref_block(xb)
    assert relative_error(out, want) <= 1e-5
    if "separable_conv2d_backward" in IMPLEMENTED:
        grad = torch.randn_like(out)
        out.backward(grad)
        want.backward(grad)
        assert relative_error(xa.grad, xb.grad) <= 1e-5
        for (name, p), (_, q) in zip(block.named_parameters(), ref_block.named_parameters()):
            assert relative_error(p.grad, q.grad) <= 1e-5, name
    if training:
        assert relative_error(block.bn.running_var, ref_block.bn.running_var) <= 1e-6


@needs("separable_conv2d")
@pytest.mark.parametrize("mid", ["plain", "affine"])
def test_private_op_opcheck(mid):
    x = torch.randn(2, 3, 6, 5, device=DEVICE)
    dw, pw = torch.randn(3, 1, 3, 3, device=DEVICE), torch.randn(4, 3, 1, 1, device=DEVICE)
    if mid == "affine":
        mid_args = ("relu6", torch.rand(3, device=DEVICE), torch.randn(3, dtype=torch.float16, device=DEVICE))
    else:
        mid_args = ("none", None, None)
    args = (x, dw, pw, None, None, True, [1, 1], [1, 1, 1, 1], [1, 1], *mid_args, None, None, False, None, True)
    torch.library.opcheck(torch.ops.xception_ops.triton_separable_conv2d.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    if "separable_conv2d_backward" in IMPLEMENTED:  # the 9 gradients' shapes, dtypes and layouts as the fake's
        grad = torch.randn(2, 4, 6, 5, device=DEVICE)
        bwd_args = (grad, None, None, None, x, dw, pw, None, None, True, [1, 1], [1, 1, 1, 1], [1, 1], *mid_args,
                    None, None, False)
        torch.library.opcheck(torch.ops.xception_ops.triton_separable_conv2d_backward.default, bwd_args,
                              test_utils=("test_schema", "test_faketensor"))


@needs("separable_conv2d")
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_mid_affine_through_the_public_op(layout):
    """mid_scale / mid_shift and relu6 through the router, the private ops and autograd (the backward's gradients
    of both vectors), against the torch backend in float64."""
    x = torch.randn(2, 4, 7, 6, device=DEVICE).contiguous(memory_format=layout)
    params = [torch.randn(8, 1, 3, 3, device=DEVICE), torch.randn(5, 8, 1, 1, device=DEVICE) / 8 ** 0.5,
              torch.rand(8, device=DEVICE) * 1.5 + 0.5, torch.randn(8, device=DEVICE) * 2.0,
              torch.rand(5, device=DEVICE) + 0.5]
    grad = torch.randn(2, 5, 4, 3, device=DEVICE)

    def run(backend, cast):
        leaves = [cast(t).requires_grad_() for t in [x] + params]
        xs, dw, pw, mid_scale, mid_shift, out_scale = leaves
        out = xception_ops.separable_conv2d(xs, dw, pw, stride=2, padding=1, mid_activation="relu6",
                                            mid_scale=mid_scale, mid_shift=mid_shift, out_scale=out_scale,
                                            backend=backend)
        out.backward(cast(grad))
        return out, [t.grad for t in leaves]

    with record_op_calls("separable_conv2d_backward") as backward_calls:
        out, grads = run("triton", lambda t: t.detach().clone())
    assert [call[-1] for call in backward_calls] == ["triton"]  # the gradients are the triton backward's
    want, want_grads = run("torch", lambda t: t.detach().double().cpu())
    assert relative_error(out, want) <= 1e-5
    assert out.is_contiguous(memory_format=layout)
    names = ("x", "dw_weight", "pw_weight", "mid_scale", "mid_shift", "out_scale")
    for name, got, expected in zip(names, grads, want_grads):
        assert relative_error(got, expected) <= 1e-5, name


def test_private_schemas_are_the_public_ones_less_backend():
    for name in IMPLEMENTED:
        public = str(getattr(torch.ops.xception_ops, name).default._schema)
        private = str(getattr(torch.ops.xception_ops, f"triton_{name}").default._schema)
        renamed = public.replace(f"::{name}(", f"::triton_{name}(")
        # `str backend` ends the positional arguments: before `)`, or before keyword-only ones (max_pool2d's).
        assert private == renamed.replace(", str backend)", ")").replace(", str backend, *,", ", *,")
        assert "backend" not in private


def test_unknown_op_and_unsupported_device_are_reported():
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(BackendUnavailableError, match="has no kernel for xception_ops.nonexistent"):
        resolve("triton", "xception_ops.nonexistent", x)
    name = sorted(IMPLEMENTED)[0]
    with pytest.raises(BackendUnavailableError, match="cannot run on meta"):
        resolve("triton", f"xception_ops.{name}", x.to("meta"))


@needs("depthwise_conv2d")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w = torch.randn(1, 2, 5, 5), torch.randn(2, 1, 3, 3)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        xception_ops.depthwise_conv2d(x, w, padding=1, backend="triton")
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET=1"):  # the private op checks too
        torch.ops.xception_ops.depthwise_conv2d(x, w, None, [1, 1], [1] * 4, [1, 1], "triton")


@needs("separable_conv2d")
def test_float64_is_refused_where_the_kernels_compute_in_float32():
    """The conv kernels accumulate in float32: float64 tensors raise a TypeError pointing to backend="torch" (as
    the cuda backend's do) instead of a float32-accurate result; the pools compute float64 in float64."""
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, device=DEVICE)
    w, pw = torch.randn(2, 1, 3, 3, dtype=torch.float64, device=DEVICE), torch.randn(3, 2, 1, 1, dtype=torch.float64,
                                                                                    device=DEVICE)
    with pytest.raises(TypeError, match='does not support float64.*backend="torch"'):
        xception_ops.depthwise_conv2d(x, w, padding=1, backend="triton")
    with pytest.raises(TypeError, match='does not support float64.*backend="torch"'):
        xception_ops.separable_conv2d(x, w, pw, padding=1, backend="triton")
    pooled = xception_ops.pooling.max_pool2d(x, 3, 2, 1, backend="triton")
    assert pooled.dtype == torch.float64
    assert torch.equal(pooled, torch.nn.functional.max_pool2d(x, 3, 2, 1))


def test_auto_does_not_take_triton_until_measured():
    x = torch.randn(1, 2, 5, 5, device=DEVICE)
    assert resolve("auto", "xception_ops.separable_conv2d", x) in ("torch", "cuda")
