"""Is a whole model's step bound by its GPU kernels or by the host that issues them? One table per model and mode.

    python tools/profile_model.py [--models xception:cuda timm_legacy_xception] [--modes train infer]
                                  [--dtype bfloat16] [--layout NHWC] [--batch 32] [--image 299] [--steps 5]
                                  [--rows 12] [--out FILE] [--device cuda|cpu]

Runs the model benchmark's own steps (xception_ops.bench.model_steps: a training step is forward, cross-entropy,
backward and the paper's SGD step; inference is one forward under no_grad) after a warm-up, and reports per step:
- wall: the time per step of `steps` steps back to back (CUDA events on a GPU);
- issue: the host's time to run the same loop without waiting for the GPU (where it is close to wall, the GPU
  waits on the host: the step is host-bound);
- kernels: the GPU time of the step's kernels (torch.profiler), and how many there are;
then the kernels (or, on the CPU, the operators) that take the most time, and on a GPU the operators that take the
host's. The layer benchmark times one layer's kernels; this says whether a whole model gets to run at their speed.
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from xception_ops.bench import issue_and_wall_ms, model_steps, synchronize


def profile_steps(step, device: torch.device, steps: int) -> dict:
    """The profiled per-step totals and top events of `step`."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(steps):
            step(i)
        synchronize(device)
    averages = prof.key_averages()
    cpu = sorted((e for e in averages if e.self_cpu_time_total > 0), key=lambda e: e.self_cpu_time_total,
                 reverse=True)
    cpu_top = [(e.self_cpu_time_total / steps / 1e3, e.count / steps, e.key) for e in cpu]
    if device.type == "cuda":
        events = [e for e in averages if e.self_device_time_total > 0 and e.device_type.name != "CPU"]
        events.sort(key=lambda e: e.self_device_time_total, reverse=True)
        top = [(e.self_device_time_total / steps / 1e3, e.count / steps, e.key) for e in events]
    else:
        top = cpu_top
    return dict(busy=sum(t[0] for t in top), count=sum(t[1] for t in top), top=top, cpu_top=cpu_top,
                cpu_ms=sum(t[0] for t in cpu_top))


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["xception:cuda", "timm_legacy_xception"],
                        help="names as `xception-ops bench --models` takes them")
    parser.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--layout", default="NHWC", choices=("NHWC", "NCHW"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 32 on a GPU, 1 on the CPU")
    parser.add_argument("--image", type=int, default=None, help="default: 299 on a GPU, 75 on the CPU")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the timed ones")
    parser.add_argument("--steps", type=int, default=5, help="timed steps, and again profiled steps")
    parser.add_argument("--rows", type=int, default=12, help="kernels (operators on the CPU) listed per table")
    parser.add_argument("--out", metavar="FILE", help="also write the tables to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    batch = args.batch or (32 if gpu else 1)
    image = args.image or (299 if gpu else 75)
    if gpu:
        torch.backends.cudnn.benchmark = True  # as the model benchmark runs
    lines: list[str] = []

    def emit(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    what = "kernels" if gpu else "CPU operators' own time"
    # Every model's steps are timed before any is profiled: after a profile, the process's later steps ran slower
    # (session 12, H100: timm's training step timed after xception's profiles took 43.9 ms, issue 43.3, against
    # 22.9 ms in the model benchmark; CUDA's activity tracing is likely left attached).
    runs = []
    for name in args.models:
        model, train_step, infer = model_steps(name, getattr(torch, args.dtype), args.layout, batch, image, device)
        for mode in args.modes:
            model.train(mode == "train")
            step = train_step if mode == "train" else infer
            for i in range(max(1, args.warmup)):
                step(i)
            issue, wall = issue_and_wall_ms(step, device, args.steps)
            runs.append((name, mode, model, step, dict(issue=issue, wall=wall)))
    for name, mode, model, step, r in runs:
        model.train(mode == "train")
        r.update(profile_steps(step, device, args.steps))
        bound = "" if not gpu else (" (GPU-bound)" if r["busy"] >= 0.9 * r["wall"] else " (host-bound)")
        emit(f"=== {name} {mode} {args.dtype} {args.layout} batch {batch} @{image}^2 on {device.type}: "
             f"{r['wall']:.3f} ms per step{bound}; issue {r['issue']:.3f} ms; {what} {r['busy']:.3f} ms in "
             f"{r['count']:.0f} calls")
        for ms, count, key in r["top"][:args.rows]:
            emit(f"  {ms:8.3f} ms  {count:5.0f}x  {key[:110]}")
        if gpu:  # where the host's time goes: operators by their own CPU time (inflated by the profiler)
            emit(f"  host: operators' own CPU time {r['cpu_ms']:.3f} ms per step (profiled); the most:")
            for ms, count, key in r["cpu_top"][:args.rows]:
                emit(f"  {ms:8.3f} ms  {count:5.0f}x  {key[:110]}")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return lines


if __name__ == "__main__":
    main()
