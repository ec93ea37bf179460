"""Where does a layer's training pass spend its GPU time? One table of kernels per layer, from torch.profiler.

    python tools/profile_training.py [--impl cuda] [--dtype bfloat16] [--layout NHWC] [--shapes 64,128,147 ...]
                                     [--trace DIR]

Runs the benchmark's own "training" pass (xception_ops.bench.layer_runner: training-mode forward with batch
statistics and ReLU, then backward) a few times, profiles the last ones, and prints the kernels by GPU time
(totals over the profiled passes divided by their number), so that the slowest stage of the backward is named
by a measurement instead of a guess. Also the pass's wall time (CUDA events) against its kernels' sum, and its
kernel launches: a pass whose wall time far exceeds its kernels is launch- or CPU-bound. With --trace, the CPU
side is recorded too and a Chrome trace per layer written to DIR (open it in Perfetto / chrome://tracing).
"""
from __future__ import annotations

import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile

from xception_ops.bench import layer_runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impl", default="cuda", help="xo backend (cuda, triton, torch) or 'eager' (cuDNN)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--layout", default="NHWC", choices=("NHWC", "NCHW"))
    parser.add_argument("--pass", dest="pass_", default="training", choices=("training", "forward", "inference"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--shapes", nargs="+", default=["64,128,147", "728,728,19", "1536,2048,10"],
                        help="cin,cout,hw of each layer")
    parser.add_argument("--passes", type=int, default=3, help="profiled passes per layer (after 3 warm-ups)")
    parser.add_argument("--rows", type=int, default=14, help="kernels listed per layer")
    parser.add_argument("--trace", metavar="DIR", help="also record the CPU side; write a Chrome trace per layer here")
    parser.add_argument("--out", metavar="FILE", help="also write the tables to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_training.py needs a CUDA GPU")
    device = torch.device("cuda")
    impl = args.impl if args.impl == "eager" else f"xo:{args.impl}"
    lines: list[str] = []

    def emit(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    for shape in args.shapes:
        cin, cout, hw = (int(v) for v in shape.split(","))
        run = layer_runner("separable", impl, cin, cout, hw, args.batch, getattr(torch, args.dtype), args.layout,
                           args.pass_, device)
        for i in range(3):
            run(i)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(args.passes):
            run(i)
        end.record()
        torch.cuda.synchronize()
        wall = start.elapsed_time(end) / args.passes
        activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if args.trace else [])
        with profile(activities=activities) as prof:
            for i in range(args.passes):
                run(i)
            torch.cuda.synchronize()
        if args.trace:
            os.makedirs(args.trace, exist_ok=True)
            prof.export_chrome_trace(os.path.join(args.trace, f"{args.impl}-{cin}-{cout}-{hw}.json"))
        events = [e for e in prof.key_averages() if e.self_device_time_total > 0 and e.device_type.name != "CPU"]
        events.sort(key=lambda e: e.self_device_time_total, reverse=True)
        total = sum(e.self_device_time_total for e in events) / args.passes / 1000
        launches = sum(e.count for e in events) / args.passes
        emit(f"=== {impl} {cin}->{cout} @{hw}^2 {args.dtype} {args.layout} {args.pass_}: {wall:.3f} ms per pass, "
             f"{total:.3f} ms of it in {launches:.0f} kernels")
        for e in events[:args.rows]:
            ms = e.self_device_time_total / args.passes / 1000
            emit(f"  {ms:8.3f} ms  {e.count // args.passes:3d}x  {e.key[:110]}")
        if args.trace:  # the CPU side: operators by their own CPU time (what a launch-bound pass waits on)
            cpu = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
            cpu.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
            host = sum(e.self_cpu_time_total for e in cpu) / args.passes / 1000
            emit(f"  CPU: {host:.3f} ms of operators' own time per pass; the most:")
            for e in cpu[:args.rows]:
                ms = e.self_cpu_time_total / args.passes / 1000
                emit(f"  {ms:8.3f} ms  {e.count // args.passes:3d}x  {e.key[:110]}")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
