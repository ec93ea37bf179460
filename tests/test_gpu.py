"""On a GPU: the reference path there (cuDNN), the model in bf16 / channels_last, parity, CUDA graphs.
(The CUDA kernels' own tests are in test_cuda_*.py.)"""

import pytest
import torch

import xception_ops
from xception_ops.models import xception
from xception_ops.nn import SeparableConvBN
from xception_ops.parity import run_parity

from .conftest import check_compiled_matches_eager, relative_error, requires_gpu

pytestmark = [pytest.mark.gpu, requires_gpu]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_torch_backend_on_gpu_against_float64(dtype, layout):
    x = torch.randn(3, 13, 17, 15, device="cuda", dtype=dtype).contiguous(memory_format=layout)
    dw = torch.randn(13, 1, 3, 3, device="cuda", dtype=dtype)
    pw = torch.randn(21, 13, 1, 1, device="cuda", dtype=dtype) / 13 ** 0.5
    scale, shift = torch.rand(13, device="cuda") + 0.5, torch.randn(13, device="cuda")
    kwargs = dict(padding="same", stride=2, in_scale=scale, in_shift=shift, in_relu=True, compute_stats=True)
    out, total, total_sq = xception_ops.separable_conv2d(x, dw, pw, backend="torch", **kwargs)
    exact = xception_ops.separable_conv2d(x.double().cpu(), dw.double().cpu(), pw.double().cpu(),
                                          **{**kwargs, "in_scale": scale.double().cpu(),
                                             "in_shift": shift.double().cpu()}, backend="torch")
    tol = 1e-3 if dtype == torch.float32 else 2e-2  # fp32: cuDNN may use TF32
    assert relative_error(out, exact[0]) <= tol
    assert relative_error(total_sq, exact[2]) <= tol
    assert out.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("backend", ["auto", "cuda"])
def test_model_trains_in_bf16_channels_last(backend):
    """Three SGD steps lower the loss; with backend="cuda" every separable conv runs the fused forward and the
    CUDA backward, its BatchNorms applied by the next conv's prologue inside each module."""
    model = xception(num_classes=10, backend=backend).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(4, 3, 107, 107, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (4,), device="cuda")
    losses = []
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("backend", ["auto", "torch", "cuda"])
def test_parity_on_gpu(backend):
    report = run_parity(backend=backend, device="cuda", batch=2, image_size=71, mode="train")
    assert report.passed, report.format()


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deferred_inference_batch_norm_gives_the_same_bits_on_cuda(dtype, layout):
    """The folded BatchNorm applied by the next layer's prologue (the CUDA depthwise kernels' round(fma(y, scale,
    shift))) instead of the first layer's epilogue (the epilogue pass, or the fused kernel's): the same bits."""
    first = SeparableConvBN(32, 48, 3, pre_relu=True, backend="cuda")
    second = SeparableConvBN(48, 40, 3, pre_relu=True, backend="cuda")
    for bn in (first.bn, second.bn):
        torch.nn.init.uniform_(bn.weight, 0.5, 1.5)
        torch.nn.init.uniform_(bn.bias, -0.5, 0.5)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    first, second = (m.eval().cuda().to(dtype) for m in (first, second))
    x = torch.randn(4, 32, 19, 19, device="cuda", dtype=dtype).contiguous(memory_format=layout)
    with torch.no_grad():
        deferred = second(first(x, defer_bn=True))
        applied = second(first(x))
    assert torch.equal(deferred, applied)


@pytest.mark.parametrize("backend,training", [("auto", False), ("cuda", False), ("cuda", True)])
def test_cuda_graph_capture_of_a_fused_module(backend, training):
    module = SeparableConvBN(32, 48, 3, pre_relu=True, post_relu=True, backend=backend).cuda().train(training)
    x = torch.randn(4, 32, 19, 19, device="cuda")
    reference = module(x)
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        module(static_x)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = module(static_x)
    static_x.copy_(x)
    graph.replay()
    torch.cuda.synchronize()
    assert relative_error(static_out, reference) <= 1e-6


def test_auto_routing_on_gpu():
    from xception_ops.backend import resolve
    op = "xception_ops.depthwise_conv2d"
    x = torch.randn(2, 8, 9, 9, device="cuda")
    assert resolve("cuda", op, x) == "cuda"
    assert resolve("auto", op, x) == "torch"  # PyTorch's depthwise forward is faster (benchmarks/RESULTS.md)
    assert resolve("auto", op, x.double()) == "torch"  # the kernels take no float64
    # The C++ router's own "auto" keeps float64 off the kernels too.
    w64 = torch.randn(8, 1, 3, 3, device="cuda", dtype=torch.float64)
    out = torch.ops.xception_ops.depthwise_conv2d(x.double(), w64, None, [1, 1], [1] * 4, [1, 1], "auto")
    assert out.dtype == torch.float64
    w = torch.randn(8, 1, 3, 3, device="cuda", dtype=torch.float64)
    out = xception_ops.depthwise_conv2d(x.double(), w, padding=1)  # auto with float64 runs, on the reference
    assert out.dtype == torch.float64
    # Measured slower than PyTorch's layers on sm_90 (auto_table.json); not measured elsewhere: the compiled-in
    # list, which does not have it.
    assert resolve("auto", "xception_ops.separable_conv2d", x, 16) == "torch"


def test_auto_follows_the_measured_table(tmp_path, monkeypatch):
    """A table that says the CUDA kernel wins for this GPU makes "auto" take it; one that says it loses does not."""
    from xception_ops import autotable
    from xception_ops.backend import auto_choice
    op = "xception_ops.separable_conv2d"
    x = torch.randn(2, 64, 37, 37, device="cuda").contiguous(memory_format=torch.channels_last)
    arch = autotable.arch_name(*torch.cuda.get_device_capability())
    path = tmp_path / "table.json"
    monkeypatch.setenv(autotable.TABLE_ENV, str(path))
    try:
        for speedup, expected in ((2.0, "cuda"), (0.5, "torch")):
            entry = autotable.Entry(arch, "separable_conv2d", "float32", "NHWC", "inference", 64, 128, 37, 1.0,
                                    {"cuda": speedup}, source="test")
            autotable.save([entry], path)
            autotable.clear_cache()
            with torch.no_grad():
                choice = auto_choice(op, x, 128)
                assert choice.backend == expected, choice.reason
                assert xception_ops.backend.resolve("auto", op, x, 128) == expected
            with torch.enable_grad():  # the training pass has no entry: the compiled-in list, without it
                assert auto_choice(op, x, 128).backend == "torch"
    finally:
        autotable.clear_cache()


@pytest.mark.parametrize("backend", ["cuda", "torch"])
def test_torch_compile_fullgraph_on_gpu(backend):
    """The model on the fused ops compiles into one graph (training with its backward, and inference) and
    matches eager; with backend="cuda" that is the fused CUDA forward and the BatchNorm finalize kernel."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        check_compiled_matches_eager(xception(num_classes=10, backend=backend).cuda(),
                                     torch.randn(2, 3, 71, 71, device="cuda"), 1e-4)
    finally:
        torch.backends.cudnn.allow_tf32 = saved
