"""Benchmarks: Xception's separable-conv layers on every backend against PyTorch eager (cuDNN) and torch.compile,
and whole models (Xception on our ops, timm's legacy_xception, torchvision's Inception V3) in training steps/s
and images/s: the paper's Table 3 on your GPU.

Honest timing: warm-up first; inputs rotated among enough buffers to exceed the L2 cache; CUDA-event medians
with quantiles; CUDA graphs for launch-bound cases; every configuration timed twice to show the spread; the
floors (a device-to-device copy, a bf16 and an fp32 matrix product) measured in the same run. Without a GPU the
same suite runs on the CPU at small sizes (host clock; indicative only). Reports: bench_report.py.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import inspect
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from . import backend as backends
from .compiling import compile_mode, compiled_label, uses_cuda_graphs
from .models.xception import MaxPool2dSame
from .nn import PendingBatchNorm, SeparableConvBN
from .ops import depthwise_conv2d
from .precision import tf32_flags, tf32_override
from .progress import Progress
from .version import __version__

# Xception's separable convs at 299x299: (C_in, C_out, H=W, how many in one forward pass).
XCEPTION_LAYERS = [(64, 128, 147, 1), (128, 128, 147, 1), (128, 256, 74, 1), (256, 256, 74, 1),
                   (256, 728, 37, 1), (728, 728, 37, 1), (728, 728, 19, 25), (728, 1024, 19, 1),
                   (1024, 1536, 10, 1), (1536, 2048, 10, 1)]
# Xception's max pools (3x3, stride 2, "same"): (channels, H=W of their input), one of each per forward pass.
XCEPTION_POOLS = [(128, 147), (256, 74), (728, 37), (1024, 19)]
# The layer ops: a separable layer, its depthwise stage alone, a max pool, or a strided block's tail (opt-in: --ops
# pool bnpool): a BatchNorm applied with known statistics, the max pool and the shortcut added (the package's one
# pass, where eager PyTorch writes x * scale + shift, F.max_pool2d and the add).
LAYER_OPS = ("separable", "depthwise", "pool", "bnpool")
POOL_OPS = ("pool", "bnpool")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# inference: eval mode, no autograd, BatchNorm folded. The others: training mode (ReLU before, batch-statistics
# BatchNorm after), forward alone, backward alone, or both.
PASSES = ("inference", "forward", "backward", "training")
MODELS = ("xception", "timm_legacy_xception", "inception_v3")
# Passes (but backward alone) whose direct calls take less than this are also timed as CUDA-graph replays; where
# the replays are LAUNCH_BOUND_RATIO times faster or more, the calls are launch- or CPU-bound (at 19x19 and 10x10 a
# layer's Python and launches outlast its kernels): the row reports the replays and keeps the direct calls' time
# in direct_ms.
LAUNCH_BOUND_BELOW_MS = 3.0
LAUNCH_BOUND_RATIO = 1.1


@dataclass
class Timing:
    median_ms: float
    q10_ms: float
    q90_ms: float
    runs: int
    graph: bool = False


@dataclass
class LayerRow:
    op: str           # "separable" (dw + pw + BN), "depthwise" (the depthwise stage alone), "pool" or "bnpool"
                      # (cin = cout)
    cin: int
    cout: int
    hw: int
    batch: int
    count: int        # how many such layers one Xception forward pass has
    dtype: str
    layout: str       # "NCHW" or "NHWC"
    pass_: str        # one of PASSES
    impl: str         # "eager" (PyTorch layers: cuDNN on GPU), "compile" or "compile:<mode>" (torch.compile of
                      # those, in its default mode or that one) or "xo:<backend>"
    median_ms: float = float("nan")
    q10_ms: float = float("nan")
    q90_ms: float = float("nan")
    median2_ms: float = float("nan")  # the same configuration timed a second time
    graph: bool = False               # timed as CUDA-graph replays
    direct_ms: float = float("nan")   # with graph: the median of direct calls (Python and launches included)
    min_bytes: int = 0                # each input read once, each output written once
    flops: int = 0
    floor_ms: float = float("nan")    # max(bytes / copy rate, flops / matmul rate), from this run's ceilings
    gbps: float = float("nan")
    tflops: float = float("nan")
    peak_mib: float = float("nan")    # device memory beyond what was allocated before the run (CUDA only)
    speedup_vs_eager: float | None = None
    error: str | None = None

    @property
    def spread(self) -> float:
        return abs(self.median_ms - self.median2_ms) / min(self.median_ms, self.median2_ms)


@dataclass
class ModelRow:
    model: str
    params: int
    dtype: str
    layout: str
    compiled: bool | str  # False, or the torch.compile mode ("default", "reduce-overhead", ...)
    batch: int
    image: int
    train_step_ms: float = float("nan")
    train_steps_per_s: float = float("nan")
    infer_images_per_s: float = float("nan")
    peak_gib: float = float("nan")  # device memory allocated at the peak of the training steps after the first (CUDA
    # only; with CUDA graphs, compiling.uses_cuda_graphs, the steps that record them included)
    error: str | None = None


@dataclass
class Ceilings:
    copy_gbps: float                                   # device-to-device copy, bytes read + written
    matmul_tflops: dict[str, float] = field(default_factory=dict)  # by dtype (float32 without TF32)


def kernel_settings() -> dict[str, str]:
    """The XCEPTION_OPS_* variables in effect: those that pick kernels and implementations (README's table)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("XCEPTION_OPS_")}


def environment() -> dict:
    env = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "xception_ops": __version__,
           "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "cpu": platform.processor() or platform.machine(), "device": "cpu"}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    # Rows measured under other implementation choices measure other code; float32 ones under other TF32 flags too.
    env["kernel_settings"] = kernel_settings()
    env["tf32"] = tf32_flags()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device="cuda", gpu=props.name, sm=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   cudnn=torch.backends.cudnn.version())
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    return env


# ---------------------------------------------------------------------------------------------- timing

def synchronize(device: torch.device) -> None:
    """Waits for `device`'s queued work (CUDA); nothing elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def issue_and_wall_ms(step: Callable[[int], object], device: torch.device, steps: int) -> tuple[float, float]:
    """(issue, wall) milliseconds per call of step(i), i = 0..steps-1, run back to back: issue is the host's time
    to run the loop without waiting for the device, wall the loop's time to the device's last work (CUDA events on
    a GPU). Where issue is close to wall, the device waits on the host: the calls are host-bound."""
    synchronize(device)
    start = time.perf_counter()
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
    for i in range(steps):
        step(i)
    issue = (time.perf_counter() - start) * 1e3 / steps
    if device.type == "cuda":
        end.record()
        end.synchronize()
        wall = begin.elapsed_time(end) / steps
    else:
        wall = (time.perf_counter() - start) * 1e3 / steps
    return issue, wall


def time_fn(fn: Callable[[int], object], device: torch.device, warmup: int, reps: int,
            graph: bool = False) -> Timing:
    """Times fn(i) for i = 0..reps-1 (i picks the input buffer): CUDA events on a GPU, the host clock on CPU.
    With graph=True (CUDA only) fn's launches are captured once per buffer and the replays are timed."""
    for i in range(warmup):
        fn(i)
    if device.type == "cuda" and graph:
        # Warm-up on a side stream before capturing (autograd's streams, cuBLAS workspaces), as PyTorch's
        # whole-network capture does; one memory pool for all the buffers' graphs, replayed in capture order.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(2):
                fn(i)
        torch.cuda.current_stream().wait_stream(side)
        graphs: list = []
        for i in range(max(1, reps if reps < 8 else 8)):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=graphs[0].pool() if graphs else None):
                fn(i)
            graphs.append(g)
        run = lambda i: graphs[i % len(graphs)].replay()  # noqa: E731
    else:
        run = fn
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for i in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for i in range(reps):
            t0 = time.perf_counter()
            run(i)
            times.append((time.perf_counter() - t0) * 1e3)
    qs = statistics.quantiles(times, n=10, method="inclusive") if len(times) >= 2 else [times[0]] * 9
    return Timing(statistics.median(times), qs[0], qs[-1], len(times), graph and device.type == "cuda")


def measure_ceilings(device: torch.device) -> Ceilings:
    """The two rates every floor is computed from, measured now on this device."""
    if device.type == "cuda":
        n_copy, sizes, reps = 2**28, {"bfloat16": 8192, "float32": 4096}, 10
    else:
        n_copy, sizes, reps = 2**24, {"bfloat16": 256, "float32": 512}, 3
    src = torch.randn(n_copy, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda i: dst.copy_(src), device, 2, reps)
    ceilings = Ceilings(copy_gbps=2 * src.numel() * src.element_size() / t.median_ms / 1e6)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 ceiling is plain fp32
    try:
        for name, n in sizes.items():
            a = torch.randn(n, n, device=device, dtype=DTYPES[name])
            b = torch.randn(n, n, device=device, dtype=DTYPES[name])
            t = time_fn(lambda i: a @ b, device, 2, reps)
            ceilings.matmul_tflops[name] = 2 * n**3 / t.median_ms / 1e9
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    ceilings.matmul_tflops.setdefault("float16", ceilings.matmul_tflops["bfloat16"])
    return ceilings


def _buffers_needed(bytes_per_input: int, device: torch.device) -> int:
    """How many input copies to rotate over so that they do not all sit in the L2 cache."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    return max(1, min(8, -(-3 * l2 // max(bytes_per_input, 1))))


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:300]


# ---------------------------------------------------------------------------------------------- layers

class EagerSeparable(nn.Sequential):
    """What a user writes without this package: ReLU, depthwise conv, pointwise conv, BatchNorm."""

    def __init__(self, cin: int, cout: int, relu: bool):
        super().__init__(nn.ReLU() if relu else nn.Identity(), nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False),
                         nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))


def layer_cost(op: str, cin: int, cout: int, hw: int, batch: int, elem: int, pass_: str) -> tuple[int, int]:
    """(minimal bytes, FLOPs) of one layer; the backward counts about twice the forward's work and traffic."""
    pixels = batch * hw * hw
    if op in POOL_OPS:  # x read, the pooled values (and the one-byte argmax codes when training) written; and back
        pooled = batch * cin * ((hw + 1) // 2) ** 2
        forward = pixels * cin * elem + pooled * elem + (0 if pass_ == "inference" else pooled)
        backward = pooled * (elem + 1) + pixels * cin * elem
        if op == "bnpool":  # the shortcut read; x read again by the backward (the gradient of scale)
            forward += pooled * elem
            backward += pixels * cin * elem
        nbytes = {"inference": forward, "forward": forward, "backward": backward, "training": forward + backward}[pass_]
        return nbytes, 0  # no arithmetic to speak of: its floor is the bytes' (and it stays off the roofline)
    if op == "separable":
        nbytes = pixels * (cin + cout) * elem + (cin * 9 + cin * cout) * elem
        flops = 2 * pixels * (cin * 9 + cin * cout)
    else:
        nbytes, flops = 2 * pixels * cin * elem + cin * 9 * elem, 2 * pixels * cin * 9
    factor = {"inference": 1, "forward": 1, "backward": 2, "training": 3}[pass_]
    return factor * nbytes, factor * flops


def _bn_pool_fn(impl: str, cin: int, hw: int, batch: int, training: bool, device, dtype,
                fmt) -> tuple[Callable, list[torch.Tensor]]:
    """A strided block's tail on x: the BatchNorm (per-channel scale and shift, as the statistics give them), the
    3x3 / 2 "same" max pool, and the shortcut added. The package: a PendingBatchNorm and the shortcut handed to
    MaxPool2dSame (one pass on a kernel backend); otherwise the three PyTorch ops. Returns it with scale and
    shift."""
    scale = (torch.rand(cin, device=device) + 0.5).requires_grad_(training)
    shift = torch.randn(cin, device=device).requires_grad_(training)
    out_hw = (hw + 1) // 2
    shortcut = torch.randn(batch, cin, out_hw, out_hw, device=device, dtype=dtype).contiguous(memory_format=fmt)
    if impl.startswith("xo:"):
        pool = MaxPool2dSame(3, 2, "same", impl.split(":", 1)[1])
        return lambda x: pool(PendingBatchNorm(x, scale, shift), residual=shortcut), [scale, shift]  # noqa: E731
    pool = MaxPool2dSame(3, 2, "same", "torch")
    return (lambda x: pool((x * scale[:, None, None] + shift[:, None, None]).to(dtype)) + shortcut,  # noqa: E731
            [scale, shift])


def _layer_fn(op: str, impl: str, cin: int, cout: int, hw: int, batch: int, training: bool, device, dtype,
              fmt) -> tuple[Callable, list[torch.Tensor]]:
    """The layer as a function of x, and the tensors besides x whose gradients its training pass computes."""
    if op == "bnpool":
        fn, leaves = _bn_pool_fn(impl, cin, hw, batch, training, device, dtype, fmt)
    elif op == "pool":
        fn, leaves = MaxPool2dSame(3, 2, "same", impl.split(":", 1)[1] if impl.startswith("xo:") else "torch"), []
    elif op == "separable":
        if impl.startswith("xo:"):
            module = SeparableConvBN(cin, cout, 3, pre_relu=training, backend=impl.split(":", 1)[1])
        else:
            module = EagerSeparable(cin, cout, relu=training)
        module = module.to(device=device, dtype=dtype, memory_format=fmt).train(training)
        fn, leaves = module, [p for p in module.parameters() if p.requires_grad]
    else:
        weight = torch.randn(cin, 1, 3, 3, device=device, dtype=dtype, requires_grad=training)
        if impl.startswith("xo:"):
            backend = impl.split(":", 1)[1]
            fn = lambda x: depthwise_conv2d(x, weight, padding=1, backend=backend)  # noqa: E731
        else:
            fn = lambda x: nn.functional.conv2d(x, weight, padding=1, groups=cin)  # noqa: E731
        leaves = [weight]
    if impl == "compile" or impl.startswith("compile:"):
        fn = torch.compile(fn, mode=compile_mode(impl.partition(":")[2] or "default"))
    return fn, leaves


def layer_runner(op: str, impl: str, cin: int, cout: int, hw: int, batch: int, dtype: torch.dtype, layout: str,
                 pass_: str, device: torch.device) -> Callable[[int], None]:
    """run(i): one pass of one layer configuration on input buffer i (inputs rotated past the L2 cache).

    The backward passes return the gradients of x and of the layer's parameters as a training step forms them
    (torch.autograd.grad): x's flows on to the layer before, and an optimizer that zeroes with set_to_none has
    the parameters' written afresh. `.backward()` would instead add each pass's into the `.grad` of the last: an
    add per tensor, one of x's size (~17 us at 728 @19^2 in bf16 on the H100, 5 adds in session 12's profiles),
    which no training step runs."""
    training = pass_ != "inference"
    fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
    fn, leaves = _layer_fn(op, impl, cin, cout, hw, batch, training, device, dtype, fmt)
    elem = torch.tensor([], dtype=dtype).element_size()
    nbuf = _buffers_needed(batch * cin * hw * hw * elem, device)
    inputs = [torch.randn(batch, cin, hw, hw, device=device, dtype=dtype).contiguous(memory_format=fmt)
              .requires_grad_(training) for _ in range(nbuf)]
    out_hw = (hw + 1) // 2 if op in POOL_OPS else hw
    grad = torch.randn(batch, cout if op == "separable" else cin, out_hw, out_hw, device=device,
                       dtype=dtype).contiguous(memory_format=fmt)
    if pass_ == "inference":
        def run(i):
            with torch.no_grad():
                fn(inputs[i % nbuf])
    elif pass_ == "forward":
        def run(i):
            fn(inputs[i % nbuf])
    elif pass_ == "training":
        def run(i):
            x = inputs[i % nbuf]
            torch.autograd.grad(fn(x), [x, *leaves], grad, allow_unused=True)
    else:  # backward alone, over graphs recorded once per buffer
        outputs = [fn(x) for x in inputs]

        def run(i):
            torch.autograd.grad(outputs[i % nbuf], [inputs[i % nbuf], *leaves], grad, retain_graph=True,
                                allow_unused=True)
    return run


def bench_layer(op: str, cin: int, cout: int, hw: int, batch: int, count: int, dtype: torch.dtype, layout: str,
                pass_: str, impl: str, device: torch.device, warmup: int, reps: int,
                ceilings: Ceilings | None = None) -> LayerRow:
    """Times one layer configuration twice. A configuration that cannot run is reported in the row, not raised."""
    dtype_name = str(dtype).replace("torch.", "")
    nbytes, flops = layer_cost(op, cin, cout, hw, batch, torch.tensor([], dtype=dtype).element_size(), pass_)
    row = LayerRow(op, cin, cout, hw, batch, count, dtype_name, layout, pass_, impl, min_bytes=nbytes, flops=flops)
    if ceilings is not None:
        row.floor_ms = max(nbytes / ceilings.copy_gbps / 1e6, flops / ceilings.matmul_tflops[dtype_name] / 1e9)
    try:
        run = layer_runner(op, impl, cin, cout, hw, batch, dtype, layout, pass_, device)
        baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        graph = False
        first = time_fn(run, device, warmup, reps)
        if device.type == "cuda" and pass_ != "backward" and first.median_ms < LAUNCH_BOUND_BELOW_MS:
            try:
                replays = time_fn(run, device, 0, reps, graph=True)
            except Exception:  # noqa: BLE001  (an implementation that cannot be captured is timed directly)
                replays = None
            if replays is not None and replays.median_ms * LAUNCH_BOUND_RATIO <= first.median_ms:
                row.direct_ms, first, graph = first.median_ms, replays, True
        # The peak is that of the second timing, after the warm-up: with cudnn.benchmark, a shape's first calls try
        # cuDNN's algorithms with their own workspaces, which the first implementation timed would otherwise carry.
        _reset_peak_memory(device)
        second = time_fn(run, device, 0, reps, graph)
        row.median_ms, row.q10_ms, row.q90_ms, row.graph = first.median_ms, first.q10_ms, first.q90_ms, first.graph
        row.median2_ms = second.median_ms
        row.gbps, row.tflops = nbytes / first.median_ms / 1e6, flops / first.median_ms / 1e9
        row.peak_mib = (_peak_memory(device) - baseline) / 2**20  # NaN off CUDA
    except Exception as e:  # noqa: BLE001  (a backend that cannot run is reported, not fatal)
        row.error = _error(e)
    return row


# ---------------------------------------------------------------------------------------------- models

def make_model(name: str) -> nn.Module:
    """A contender by name: "xception[:BACKEND]" (ours), "timm_legacy_xception", "timm_legacy_xception:fused[:BACKEND]"
    (timm's model through xception_ops.fuse: what fuse() does for an existing model) or "inception_v3"; and, asked
    for by name only, torchvision's "mobilenet_v2" and "mobilenet_v2:fused[:BACKEND]", and any timm model as
    "timm:NAME" or "timm:NAME:fused[:BACKEND]" ("timm:xception65:fused:cuda": DeepLab's aligned Xception). Any of
    them with "+frozen" appended: under xception_ops.nn.freeze (the folded BatchNorms kept across inference calls)."""
    if name.endswith("+frozen"):
        from .nn import freeze
        return freeze(make_model(name.removesuffix("+frozen")))
    if name.startswith("timm:"):
        import timm
        _, model_name, *rest = name.split(":")
        if (rest and rest[0] != "fused") or len(rest) > 2:
            raise ValueError(f"unknown model {name!r}: expected timm:NAME or timm:NAME:fused[:BACKEND]")
        model = timm.create_model(model_name, pretrained=False)
        if not rest:
            return model
        from .fuse import fuse
        return fuse(model, inplace=True, backend=rest[1] if len(rest) == 2 else "auto")
    if name == "xception" or name.startswith("xception:"):
        from .models import xception
        return xception(backend=name.split(":", 1)[1] if ":" in name else "auto")
    if name == "timm_legacy_xception" or name.startswith("timm_legacy_xception:fused"):
        import timm
        model = timm.create_model("legacy_xception", pretrained=False)
        if name == "timm_legacy_xception":
            return model
        from .fuse import fuse
        backend = name.split(":", 2)[2] if name.count(":") == 2 else "auto"
        return fuse(model, inplace=True, backend=backend)
    if name == "inception_v3":
        from torchvision.models import inception_v3
        return inception_v3(weights=None, aux_logits=False, init_weights=False)
    if name == "mobilenet_v2" or name.startswith("mobilenet_v2:fused"):
        from torchvision.models import mobilenet_v2
        model = mobilenet_v2(weights=None)
        if name == "mobilenet_v2":
            return model
        from .fuse import fuse  # its 17 dw -> BN -> ReLU6 -> pw -> BN chains, the mid BN as the op's mid affine
        backend = name.split(":", 2)[2] if name.count(":") == 2 else "auto"
        return fuse(model, inplace=True, backend=backend)
    raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)} (or xception:<backend>, "
                     "timm_legacy_xception:fused[:<backend>], mobilenet_v2, mobilenet_v2:fused[:<backend>], "
                     "timm:<name>, timm:<name>:fused[:<backend>])")


def _reset_peak_memory(device: torch.device) -> None:
    """Starts a new peak for `_peak_memory` (CUDA only)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> float:
    """Bytes: the most allocated on `device` at once since `_reset_peak_memory`; NaN off CUDA."""
    if device.type != "cuda":
        return float("nan")
    synchronize(device)
    return float(torch.cuda.max_memory_allocated(device))


def model_steps(name: str, dtype: torch.dtype, layout: str, batch: int, image: int, device: torch.device,
                compiled: bool | str = False) -> tuple[nn.Module, Callable[[int], None], Callable[[int], None]]:
    """A contender on `device` in `dtype` and `layout`, with its two timed callables: a training step (forward,
    cross-entropy, backward and the paper's SGD step) and an inference call, on one random batch. compiled: a
    torch.compile mode (True: "default") for the model, or False."""
    model = make_model(name)
    fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
    model = model.to(device=device, dtype=dtype, memory_format=fmt)
    run_model = torch.compile(model, mode=compile_mode("default" if compiled is True else compiled)) if compiled \
        else model
    opt = torch.optim.SGD(model.parameters(), lr=0.045, momentum=0.9, weight_decay=1e-5)
    x = torch.randn(batch, 3, image, image, device=device, dtype=dtype).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (batch,), device=device)

    def train_step(_):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(run_model(x), y).backward()
        opt.step()

    def infer(_):
        with torch.no_grad():
            run_model(x)

    return model, train_step, infer


def bench_model(name: str, dtype: torch.dtype, layout: str, batch: int, image: int, device: torch.device,
                warmup: int, reps: int, compiled: bool | str = False) -> ModelRow:
    """Training steps/s (forward, loss, backward and the paper's SGD step) and inference images/s."""
    row = ModelRow(name, 0, str(dtype).replace("torch.", ""), layout, compiled, batch, image)
    try:
        model, train_step, infer = model_steps(name, dtype, layout, batch, image, device, compiled)
        row.params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        model.train()
        # The peak is that of the steps after the first: in cuDNN's benchmark mode (`run` sets it) the first step
        # of each new conv shape tries cuDNN's algorithms with their workspaces, and the model that runs first in a
        # dtype pays that for the next ones, which find them cached. On the H100 (float32, NHWC, batch 32) it made
        # Xception's first step peak at 22.3 GiB against 7.65 GiB afterwards, and whichever of Xception and timm's
        # legacy_xception ran first showed the 22 GiB. Eager: the timed steps' peak. CUDA graphs (torch.compile's
        # CUDA graph trees run a function once eagerly, record it at its second call, then replay): a replay
        # allocates nothing, so the timed steps alone showed 0.15 GiB for Xception (H100, session 12); the peak
        # then also spans the warm-up steps after the first, the recording among them (which allocates as an
        # eager step does, into the graphs' pool).
        graphs = uses_cuda_graphs(compiled)
        train_step(0)
        if graphs:
            _reset_peak_memory(device)
        for i in range(1, max(2 if graphs else 1, warmup)):
            train_step(i)
        if not graphs:
            _reset_peak_memory(device)
        train = time_fn(train_step, device, 0, reps)
        row.peak_gib = _peak_memory(device) / 2**30
        model.eval()
        inference = time_fn(infer, device, warmup, reps)
        row.train_step_ms, row.train_steps_per_s = train.median_ms, 1e3 / train.median_ms
        row.infer_images_per_s = batch * 1e3 / inference.median_ms
    except Exception as e:  # noqa: BLE001
        row.error = _error(e)
    return row


# ---------------------------------------------------------------------------------------------- the suite

def default_settings(device: torch.device) -> dict:
    """GPU: the paper's sizes at batch 32. CPU: a quick run on shrunken sizes, within about a minute."""
    if device.type == "cuda":
        return dict(batch=32, scale=1.0, dtypes=["bfloat16", "float32"], layouts=["NHWC", "NCHW"], image=299,
                    model_batch=32, warmup=10, reps=50)
    return dict(batch=2, scale=0.25, dtypes=["float32"], layouts=["NCHW", "NHWC"], image=75, model_batch=2,
                warmup=1, reps=3)


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """"CIN,COUT,HW" or "CIN,COUT,HW,COUNT" as a layer shape."""
    parts = [int(p) for p in text.split(",")]
    if len(parts) not in (3, 4) or min(parts) <= 0:
        raise ValueError(f"a shape is CIN,COUT,HW[,COUNT] with positive integers, got {text!r}")
    return (*parts, 1)[:4] if len(parts) == 3 else tuple(parts)  # type: ignore[return-value]


TF32_CHOICES = ("default", "on", "off")


def run(*args, tf32: str = "default", **kwargs) -> dict:
    """Runs the suite and returns the report (see bench_report for its outputs); arguments as `_run_suite`'s.
    cuDNN's autotuning is on while it runs on a GPU (as a tuned training script runs cuDNN), and restored after.

    tf32: "on" or "off" sets cuDNN's and cuBLAS's TF32 flags alike for the run (restored after), so that float32
    rows compare cuDNN and this package at the same setting; "default" leaves PyTorch's (cuDNN's on, cuBLAS's off:
    eager convolutions then use TF32 where the staged product does not). The report's env records them."""
    if tf32 not in TF32_CHOICES:
        raise ValueError(f"tf32 must be one of {', '.join(TF32_CHOICES)}, got {tf32!r}")
    if tf32 != "default" and None in tf32_flags().values():
        raise ValueError(f"tf32={tf32!r} sets PyTorch's legacy TF32 flags, which cannot be read back under the "
                         "per-operator fp32_precision settings in effect; run with tf32='default'")
    saved_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        with tf32_override(tf32 == "on") if tf32 != "default" else contextlib.nullcontext():
            return _run_suite(*args, **kwargs)
    finally:
        torch.backends.cudnn.benchmark = saved_benchmark


# What identifies a row of a report: the configuration it measures (resume reuses rows by these).
LAYER_KEY = ("op", "cin", "cout", "hw", "batch", "dtype", "layout", "pass_", "impl")
MODEL_KEY = ("model", "dtype", "layout", "compiled", "batch", "image")
# Settings that change what a row measures: a run resumes only a report made with the same ones.
RESUME_SETTINGS = ("batch", "scale", "warmup", "reps", "image", "model_batch")
RESUME_ENV = ("device", "gpu", "torch", "cuda", "kernel_settings", "tf32")


def _row_key(row: dict, fields: Sequence[str]) -> tuple:
    return tuple(row[f] for f in fields)


def check_resumable(previous: dict, env: dict, settings: dict) -> None:
    """Raises ValueError unless `previous` (a report) was measured on this machine's device and software with these
    timing settings, naming the first field that differs."""
    for name in RESUME_ENV:
        if name == "tf32" and name not in previous["env"]:  # reports from before it was recorded
            continue
        empty = {} if name == "kernel_settings" else None  # (reports from before it was recorded: none set)
        if previous["env"].get(name, empty) != env.get(name, empty):
            raise ValueError(f"cannot resume: the earlier report's {name} is {previous['env'].get(name)!r}, this run's "
                             f"is {env.get(name)!r}; start a new --out directory")
    for name in RESUME_SETTINGS:
        if previous["settings"].get(name) != settings.get(name):
            raise ValueError(f"cannot resume: the earlier report was run with {name}={previous['settings'].get(name)!r}"
                             f", this one with {name}={settings.get(name)!r}; use the same value or a new --out")


_clock = time.monotonic  # the time limit's clock (a test replaces it)


def _union(first: Sequence, second: Sequence) -> list:
    seen = []
    for item in [*first, *second]:
        if item not in seen:
            seen.append(item)
    return seen


def default_backends(device: torch.device, statuses) -> list[str]:
    """Our backends timed when none are named: every usable one, but on a GPU not the reference op ("torch", the
    tests' oracle and the fallback path, a few times eager's time), which the issue's contenders leave out and which
    took a quarter of a full run's configurations. `--backends torch` still times it; on the CPU it is what runs."""
    return [s.name for s in statuses if s.usable and not (device.type == "cuda" and s.name == "torch")]


def _run_suite(device: str | None = None, backends_: Sequence[str] | None = None, dtypes: Sequence[str] | None = None,
        layouts: Sequence[str] | None = None, passes: Sequence[str] = ("inference", "training"),
        batch: int | None = None, scale: float | None = None, shapes: Sequence[tuple] | None = None,
        ops: Sequence[str] = ("separable", "depthwise"), compile_: bool | str | None = False, layers: bool = True,
        models: Sequence[str] | bool = True, image: int | None = None, model_batch: int | None = None,
        warmup: int | None = None, reps: int | None = None, progress: Callable[[str], None] | None = None,
        previous: dict | None = None, checkpoint: Callable[[dict], None] | None = None,
        time_limit: float | None = None) -> dict:
    """previous: an earlier report of this suite (check_resumable): its rows are kept, and the configurations it
    measured without an error are not timed again, so that a long run stopped part way (a time limit) goes on
    where it stopped. checkpoint(report): called with the report so far after each configuration, for a caller
    that saves it as it goes. time_limit: seconds after which no configuration starts (the one running finishes);
    the report then has "incomplete" (how many were left), and a run with `previous` goes on from it. compile_:
    also time torch.compile of the eager layers and of the models, in that mode
    (True: "default"; the impl "compile", or "compile:<mode>" in another mode)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    mode = "default" if compile_ is True else (compile_ or None)
    if mode is not None:
        compile_mode(mode)  # an unknown mode is refused before anything runs
    settings = default_settings(dev)
    settings.update({k: v for k, v in (("warmup", warmup), ("reps", reps), ("image", image),
                                       ("model_batch", model_batch)) if v is not None})
    batch, scale = batch or settings["batch"], scale or settings["scale"]
    dtypes, layouts = list(dtypes or settings["dtypes"]), list(layouts or settings["layouts"])
    statuses = {s.name: s for s in backends.status()}
    if backends_ is None:
        backends_ = default_backends(dev, statuses.values())
    impls = (["eager"] + ([] if mode is None else ["compile" if mode == "default" else f"compile:{mode}"])
             + [f"xo:{b}" for b in backends_])
    model_names = list(MODELS if models is True else (models or []))
    if shapes:
        layer_shapes = [tuple(s) for s in shapes]
    else:
        layer_shapes = [(cin, cout, max(3, round(hw * scale)), count) for cin, cout, hw, count in XCEPTION_LAYERS]
    # (op, shape) in the order timed: each shape's ops side by side, then the pools (theirs, or the given shapes' C_in).
    if shapes:
        pool_shapes = [(cin, cin, hw, count) for cin, _, hw, count in layer_shapes]
    else:
        pool_shapes = [(c, c, max(3, round(hw * scale)), 1) for c, hw in XCEPTION_POOLS]
    layer_ops = ([(op, shape) for shape in layer_shapes for op in ops if op not in POOL_OPS]
                 + [(op, shape) for shape in pool_shapes for op in POOL_OPS if op in ops])
    n_layers = len(layer_ops) * len(dtypes) * len(layouts) * len(passes) * len(impls) if layers else 0
    n_models = len(model_names) * len(dtypes) * (1 if mode is None else 2)
    bar = Progress(n_layers + n_models, progress)
    if dev.type == "cpu":
        bar.note("no GPU: running the CPU suite at small sizes (host-clock timings, indicative only)")
    for name in backends_:
        status = statuses.get(name)
        if status is not None and not status.usable:
            bar.note(f"backend {name}: cannot run here: {status.detail}")
    env = environment()
    run_settings = dict(settings, batch=batch, scale=scale, dtypes=dtypes, layouts=layouts, passes=list(passes),
                        ops=list(ops), impls=impls, shapes=[list(s) for s in layer_shapes])
    layer_rows: dict[tuple, dict] = {}  # by LAYER_KEY, in the order first measured
    model_rows: dict[tuple, dict] = {}
    if previous is not None:
        check_resumable(previous, env, run_settings)
        before = previous["settings"]
        for name in ("dtypes", "layouts", "passes", "ops", "impls", "shapes"):
            run_settings[name] = _union(before.get(name, []), run_settings[name])
        run_settings["resumed_from"] = [*before.get("resumed_from", []), previous["env"]["date"]]
        layer_rows = {_row_key(r, LAYER_KEY): r for r in previous["layers"]}
        model_rows = {_row_key(r, MODEL_KEY): r for r in previous["models"]}
        bar.note(f"resuming a report of {previous['env']['date']}: {len(layer_rows)} layer and {len(model_rows)} "
                 "model rows; the configurations it measured without an error are not timed again")
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be a positive number of seconds, got {time_limit!r}")
    deadline = None if time_limit is None else _clock() + time_limit
    ceilings = measure_ceilings(dev)
    report = {"env": env, "ceilings": asdict(ceilings), "settings": run_settings, "layers": [], "models": []}
    left = 0  # configurations not timed for the time limit

    def out_of_time(untimed: int) -> bool:
        """Whether the time limit has passed; then the `untimed` configurations about to run are counted as left."""
        nonlocal left
        if deadline is None or untimed == 0 or _clock() < deadline:
            return False
        left += untimed
        return True

    def save() -> None:
        report["layers"], report["models"] = list(layer_rows.values()), list(model_rows.values())
        if checkpoint is not None:
            checkpoint(report)

    for dtype_name in dtypes if layers else []:
        for layout in layouts:
            for pass_ in passes:
                for op, (cin, cout, hw, count) in layer_ops:
                    keys = [(op, cin, cout, hw, batch, dtype_name, layout, pass_, impl) for impl in impls]
                    if out_of_time(sum(layer_rows.get(k) is None or layer_rows[k]["error"] is not None
                                       for k in keys)):
                        continue
                    eager_ms, timings = None, []
                    for impl in impls:
                        key = (op, cin, cout, hw, batch, dtype_name, layout, pass_, impl)
                        row = layer_rows.get(key)
                        if row is None or row["error"] is not None:
                            r = bench_layer(op, cin, cout, hw, batch, count, DTYPES[dtype_name], layout, pass_,
                                            impl, dev, settings["warmup"], settings["reps"], ceilings)
                            row = layer_rows[key] = asdict(r)
                        if impl == "eager":
                            eager_ms = row["median_ms"]
                        elif eager_ms and row["error"] is None:
                            row["speedup_vs_eager"] = eager_ms / row["median_ms"]
                        timings.append(f"{impl} " + ("error" if row["error"] else f"{row['median_ms']:.3f} ms"))
                    # The timings are in the progress line too, so a run stopped early still shows them.
                    bar.step(f"{op} {cin}->{cout} @{hw}^2 {dtype_name} {layout} {pass_}: " + ", ".join(timings),
                             len(impls))
                    save()
    for dtype_name in dtypes:
        for compiled in (False,) if mode is None else (False, True if mode == "default" else mode):
            for name in model_names:
                key = (name, dtype_name, layouts[0], compiled, settings["model_batch"], settings["image"])
                row = model_rows.get(key)
                if out_of_time(int(row is None or row["error"] is not None)):
                    continue
                if row is None or row["error"] is not None:
                    r = bench_model(name, DTYPES[dtype_name], layouts[0], settings["model_batch"], settings["image"],
                                    dev, settings["warmup"], settings["reps"], compiled)
                    row = model_rows[key] = asdict(r)
                bar.step(f"model {name} {dtype_name}{compiled_label(compiled)}: "
                         + (row["error"] or f"{row['train_steps_per_s']:.2f} train steps/s"))
                save()
    if left:
        report["incomplete"] = {"left": left, "time_limit_s": time_limit}
        bar.note(f"time limit of {time_limit:g} s reached: {left} configurations not timed; the same command with "
                 "--resume (and its --out) goes on from here")
    save()
    return report


_SUITE_SIGNATURE = inspect.signature(_run_suite)
run.__signature__ = _SUITE_SIGNATURE.replace(parameters=[  # the CLI's and the docs' view of run()
    *_SUITE_SIGNATURE.parameters.values(),
    inspect.Parameter("tf32", inspect.Parameter.KEYWORD_ONLY, default="default", annotation=str)])
