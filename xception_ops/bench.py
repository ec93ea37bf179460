"""Benchmarks: Xception's separable-conv layers on every backend against PyTorch eager (cuDNN), and whole models
(Xception on our ops, timm's legacy_xception, torchvision's Inception V3) in training steps/s and images/s.

On a GPU, times are medians of CUDA-event timings after warm-up, over inputs rotated among enough buffers to
exceed the L2 cache. Without a GPU the same suite runs on the CPU at small sizes (host clock; indicative only).
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from . import backend as backends
from .nn import SeparableConvBN
from .ops import depthwise_conv2d
from .version import __version__

# Xception's separable convs at 299x299: (C_in, C_out, H=W, how many in one forward pass).
XCEPTION_LAYERS = [(64, 128, 147, 1), (128, 128, 147, 1), (128, 256, 74, 1), (256, 256, 74, 1),
                   (256, 728, 37, 1), (728, 728, 37, 1), (728, 728, 19, 25), (728, 1024, 19, 1),
                   (1024, 1536, 10, 1), (1536, 2048, 10, 1)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Timing:
    median_ms: float
    q10_ms: float
    q90_ms: float
    runs: int


@dataclass
class LayerRow:
    cin: int
    cout: int
    hw: int
    batch: int
    count: int
    dtype: str
    layout: str
    pass_: str        # "inference" (BN folded) or "training" (ReLU + BN with batch stats, forward + backward)
    impl: str         # "eager" (nn.Conv2d x2 + BatchNorm2d: cuDNN on GPU) or "xo:<backend>"
    median_ms: float
    q10_ms: float
    q90_ms: float
    gbps: float       # minimal bytes / time
    tflops: float
    speedup_vs_eager: float | None = None
    error: str | None = None


@dataclass
class ModelRow:
    model: str
    params: int
    dtype: str
    layout: str
    batch: int
    image: int
    train_step_ms: float
    train_steps_per_s: float
    infer_images_per_s: float
    error: str | None = None


def environment() -> dict:
    env = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "xception_ops": __version__,
           "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "cpu": platform.processor() or platform.machine(), "device": "cpu"}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device="cuda", gpu=props.name, sm=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   cudnn=torch.backends.cudnn.version())
        try:
            import subprocess
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    return env


def time_fn(fn: Callable[[int], object], device: torch.device, warmup: int, reps: int) -> Timing:
    """Times fn(i) for i = 0..reps-1 (i picks the input buffer); CUDA events on a GPU, the host clock on CPU."""
    for i in range(warmup):
        fn(i)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for i in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for i in range(reps):
            t0 = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - t0) * 1e3)
    qs = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return Timing(statistics.median(times), qs[0], qs[-1], len(times))


def _buffers_needed(bytes_per_input: int, device: torch.device) -> int:
    """How many input copies to rotate over so that they do not all sit in the L2 cache."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    return max(1, min(8, -(-3 * l2 // max(bytes_per_input, 1))))


class EagerSeparable(nn.Sequential):
    """What a user writes without this package: ReLU, depthwise conv, pointwise conv, BatchNorm."""

    def __init__(self, cin: int, cout: int, relu: bool):
        super().__init__(nn.ReLU() if relu else nn.Identity(), nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False),
                         nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))


def _measure(row: dict, make_fn: Callable[[], Callable], cin: int, cout: int, min_bytes: int, flops: int,
             device: torch.device, warmup: int, reps: int) -> LayerRow:
    """Times fn(x) (forward, or forward + backward in training) over rotated random inputs of row's shape.
    A configuration that cannot run is reported in the row, not raised."""
    training = row["pass_"] == "training"
    batch, hw, dtype = row["batch"], row["hw"], DTYPES[row["dtype"]]
    fmt = torch.channels_last if row["layout"] == "NHWC" else torch.contiguous_format
    try:
        fn = make_fn()
        nbuf = _buffers_needed(batch * cin * hw * hw * torch.tensor([], dtype=dtype).element_size(), device)
        inputs = [torch.randn(batch, cin, hw, hw, device=device, dtype=dtype).contiguous(memory_format=fmt)
                  .requires_grad_(training) for _ in range(nbuf)]
        grad = torch.randn(batch, cout, hw, hw, device=device, dtype=dtype).contiguous(memory_format=fmt)

        def run(i: int):
            if training:
                fn(inputs[i % nbuf]).backward(grad)
            else:
                with torch.no_grad():
                    fn(inputs[i % nbuf])

        t = time_fn(run, device, warmup, reps)
        return LayerRow(**row, median_ms=t.median_ms, q10_ms=t.q10_ms, q90_ms=t.q90_ms,
                        gbps=min_bytes / t.median_ms / 1e6, tflops=flops / t.median_ms / 1e9)
    except Exception as e:  # noqa: BLE001  (a backend that cannot run is reported, not fatal)
        return LayerRow(**row, median_ms=float("nan"), q10_ms=float("nan"), q90_ms=float("nan"), gbps=float("nan"),
                        tflops=float("nan"), error=f"{type(e).__name__}: {e}".splitlines()[0][:300])


def _row(cin, cout, hw, batch, count, dtype, layout, pass_, impl) -> dict:
    return dict(cin=cin, cout=cout, hw=hw, batch=batch, count=count, dtype=str(dtype).replace("torch.", ""),
                layout=layout, pass_=pass_, impl=impl)


def bench_layer(cin: int, cout: int, hw: int, batch: int, count: int, dtype: torch.dtype, layout: str, pass_: str,
                impl: str, device: torch.device, warmup: int, reps: int) -> LayerRow:
    """One separable conv + BN: the eager layers (ReLU first in training) against SeparableConvBN on a backend."""
    training = pass_ == "training"
    elem = torch.tensor([], dtype=dtype).element_size()
    min_bytes = batch * hw * hw * (cin + cout) * elem + (cin * 9 + cin * cout) * elem
    flops = 2 * batch * hw * hw * (cin * 9 + cin * cout)
    if training:  # forward + backward: about three times the work, the activations read and written again
        min_bytes, flops = 3 * min_bytes, 3 * flops
    fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format

    def make():
        if impl == "eager":
            module = EagerSeparable(cin, cout, relu=training)
        else:
            module = SeparableConvBN(cin, cout, 3, pre_relu=training, backend=impl.split(":", 1)[1])
        return module.to(device=device, dtype=dtype, memory_format=fmt).train(training)

    return _measure(_row(cin, cout, hw, batch, count, dtype, layout, pass_, impl), make, cin, cout, min_bytes, flops,
                    device, warmup, reps)


def bench_depthwise(channels: int, hw: int, batch: int, count: int, dtype: torch.dtype, layout: str, pass_: str,
                    impl: str, device: torch.device, warmup: int, reps: int) -> LayerRow:
    """The depthwise 3x3 stage alone: torch's F.conv2d(groups=C) (cuDNN or its native kernel) against ours."""
    training = pass_ == "training"
    elem = torch.tensor([], dtype=dtype).element_size()
    min_bytes = 2 * batch * hw * hw * channels * elem * (3 if training else 1)
    flops = 2 * batch * hw * hw * channels * 9 * (3 if training else 1)

    def make():
        weight = torch.randn(channels, 1, 3, 3, device=device, dtype=dtype, requires_grad=training)
        if impl == "eager":
            return lambda x: nn.functional.conv2d(x, weight, padding=1, groups=channels)
        backend = impl.split(":", 1)[1]
        return lambda x: depthwise_conv2d(x, weight, padding=1, backend=backend)

    return _measure(_row(channels, channels, hw, batch, count, dtype, layout, pass_, impl), make, channels, channels,
                    min_bytes, flops, device, warmup, reps)


def _make_model(name: str, image: int) -> nn.Module:
    if name.startswith("xception"):
        from .models import xception
        return xception(backend=name.split(":", 1)[1] if ":" in name else "auto")
    if name == "timm_legacy_xception":
        import timm
        return timm.create_model("legacy_xception", pretrained=False)
    if name == "inception_v3":
        from torchvision.models import inception_v3
        return inception_v3(weights=None, aux_logits=False, init_weights=False)
    raise ValueError(f"unknown model {name!r}")


def bench_model(name: str, dtype: torch.dtype, layout: str, batch: int, image: int, device: torch.device,
                warmup: int, reps: int) -> ModelRow:
    row = dict(model=name, dtype=str(dtype).replace("torch.", ""), layout=layout, batch=batch, image=image)
    try:
        model = _make_model(name, image)
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
        model = model.to(device=device, dtype=dtype, memory_format=fmt)
        # The paper's ImageNet optimizer.
        opt = torch.optim.SGD(model.parameters(), lr=0.045, momentum=0.9, weight_decay=1e-5)
        x = torch.randn(batch, 3, image, image, device=device, dtype=dtype).contiguous(memory_format=fmt)
        y = torch.randint(0, 1000, (batch,), device=device)

        def train_step(_):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        model.train()
        train = time_fn(train_step, device, warmup, reps)
        model.eval()

        def infer(_):
            with torch.no_grad():
                model(x)

        inference = time_fn(infer, device, warmup, reps)
        return ModelRow(**row, params=params, train_step_ms=train.median_ms,
                        train_steps_per_s=1e3 / train.median_ms, infer_images_per_s=batch * 1e3 / inference.median_ms)
    except Exception as e:  # noqa: BLE001
        return ModelRow(**row, params=0, train_step_ms=float("nan"), train_steps_per_s=float("nan"),
                        infer_images_per_s=float("nan"), error=f"{type(e).__name__}: {e}".splitlines()[0][:300])


def default_settings(device: torch.device) -> dict:
    """GPU: the paper's sizes at batch 32. CPU: a quick run on shrunken sizes, within about a minute."""
    if device.type == "cuda":
        return dict(batch=32, scale=1.0, dtypes=["bfloat16", "float32"], layouts=["NHWC", "NCHW"], image=299,
                    model_batch=32, warmup=10, reps=50)
    return dict(batch=2, scale=0.25, dtypes=["float32"], layouts=["NCHW", "NHWC"], image=75, model_batch=2,
                warmup=1, reps=3)


def run(device: str | None = None, backends_: Sequence[str] | None = None, dtypes: Sequence[str] | None = None,
        layouts: Sequence[str] | None = None, passes: Sequence[str] = ("inference", "training"),
        batch: int | None = None, scale: float | None = None, layers: bool = True, models: bool = True,
        warmup: int | None = None, reps: int | None = None, out_dir: str | None = None,
        progress: Callable[[str], None] = print) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings = default_settings(dev)
    settings.update({k: v for k, v in (("warmup", warmup), ("reps", reps)) if v is not None})
    batch = batch or settings["batch"]
    scale = scale or settings["scale"]
    dtypes = list(dtypes or settings["dtypes"])
    layouts = list(layouts or settings["layouts"])
    if backends_ is None:
        backends_ = [s.name for s in backends.status() if s.usable or s.name == "torch"]
    impls = ["eager"] + [f"xo:{b}" for b in backends_]
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    report = {"env": environment(), "settings": dict(settings, batch=batch, scale=scale, dtypes=dtypes,
                                                      layouts=layouts, impls=impls),
              "layers": [], "depthwise": [], "models": []}
    if dev.type == "cpu":
        progress("no GPU: running the CPU suite at small sizes (host-clock timings, indicative only)")
    for status in backends.status():
        if status.name in backends_ and not status.usable and status.name != "torch":
            progress(f"backend {status.name}: cannot run here: {status.detail}")
    total = 2 * len(XCEPTION_LAYERS) * len(dtypes) * len(layouts) * len(passes) * len(impls)
    done = 0

    def time_impls(bench_fn, section: str, *args) -> None:
        """Times every implementation of one configuration; speed-ups are against eager, timed first."""
        nonlocal done
        eager_ms = None
        for impl in impls:
            r = bench_fn(*args[:-2], impl, dev, *args[-2:])
            if impl == "eager":
                eager_ms = r.median_ms
            elif eager_ms and r.median_ms == r.median_ms:
                r.speedup_vs_eager = eager_ms / r.median_ms
            report[section].append(asdict(r))
            done += 1

    for dtype_name in dtypes if layers else []:
        for layout in layouts:
            for pass_ in passes:
                for cin, cout, hw, count in XCEPTION_LAYERS:
                    size, dtype, timing = max(3, round(hw * scale)), DTYPES[dtype_name], (settings["warmup"],
                                                                                           settings["reps"])
                    time_impls(bench_layer, "layers", cin, cout, size, batch, count, dtype, layout, pass_, *timing)
                    time_impls(bench_depthwise, "depthwise", cin, size, batch, count, dtype, layout, pass_, *timing)
                    progress(f"[{done}/{total}] layer {cin}->{cout} @{size}^2 {dtype_name} {layout} {pass_}")
    if models:
        names = ["xception", "timm_legacy_xception", "inception_v3"]
        for dtype_name in dtypes:
            for name in names:
                r = bench_model(name, DTYPES[dtype_name], layouts[0], settings["model_batch"], settings["image"],
                                dev, settings["warmup"], settings["reps"])
                report["models"].append(asdict(r))
                progress(f"model {name} {dtype_name}: {r.train_steps_per_s:.2f} train steps/s"
                         + (f" ({r.error})" if r.error else ""))
    if out_dir:
        write_outputs(report, Path(out_dir))
    return report


def weighted_totals(rows: list[dict]) -> list[dict]:
    """Per (dtype, layout, pass, impl): the time of all of Xception's separable convs, each layer times its count.
    An implementation that failed on any layer gets no total."""
    totals: dict[tuple, float] = {}
    for r in rows:
        key = (r["dtype"], r["layout"], r["pass_"], r["impl"])
        totals[key] = totals.get(key, 0.0) + (float("nan") if r["error"] else r["median_ms"] * r["count"])
    return [dict(dtype=k[0], layout=k[1], pass_=k[2], impl=k[3], total_ms=v) for k, v in totals.items()
            if v == v]


def _format_rows(rows: list[dict], title: str) -> list[str]:
    lines = [title, f"{'layer':<22}{'dtype':<10}{'layout':<7}{'pass':<10}{'impl':<12}{'ms':>10}{'GB/s':>9}"
                    f"{'TFLOP/s':>9}{'vs eager':>9}"]
    for r in rows:
        name = f"{r['cin']}->{r['cout']} @{r['hw']}^2"
        speed = f"{r['speedup_vs_eager']:.2f}x" if r["speedup_vs_eager"] else ""
        if r["error"]:
            lines.append(f"{name:<22}{r['dtype']:<10}{r['layout']:<7}{r['pass_']:<10}{r['impl']:<12}  {r['error']}")
            continue
        lines.append(f"{name:<22}{r['dtype']:<10}{r['layout']:<7}{r['pass_']:<10}{r['impl']:<12}"
                     f"{r['median_ms']:10.3f}{r['gbps']:9.1f}{r['tflops']:9.2f}{speed:>9}")
    return lines


def format_tables(report: dict) -> str:
    lines = _format_rows(report["layers"], "Separable conv + BN (eager: nn.Conv2d x2 + BatchNorm2d)")
    if report.get("depthwise"):
        lines += [""] + _format_rows(report["depthwise"], "Depthwise 3x3 alone (eager: F.conv2d groups=C)")
    lines.append("")
    for section, title in (("layers", "separable conv + BN"), ("depthwise", "depthwise stage")):
        totals = weighted_totals(report.get(section, []))
        if totals:
            lines.append(f"All of Xception's layers, each times its count ({title}):")
        for t in totals:
            lines.append(f"  {t['dtype']:<10}{t['layout']:<7}{t['pass_']:<10}{t['impl']:<12}{t['total_ms']:10.3f} ms")
    if report["models"]:
        lines.append("")
        lines.append(f"{'model (Table 3)':<24}{'params':>12}{'dtype':>10}{'train steps/s':>15}{'infer img/s':>13}")
        for m in report["models"]:
            if m["error"]:
                lines.append(f"{m['model']:<24}  {m['error']}")
                continue
            lines.append(f"{m['model']:<24}{m['params']:>12,}{m['dtype']:>10}{m['train_steps_per_s']:15.2f}"
                         f"{m['infer_images_per_s']:13.1f}")
    return "\n".join(lines)


def write_outputs(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(report, indent=1))
    env = report["env"]
    header = ", ".join(f"{k} {v}" for k, v in env.items() if v is not None)
    (out_dir / "bench.md").write_text(f"# xception-ops benchmark\n\n{header}\n\n```\n{format_tables(report)}\n```\n")
