"""Where the host's time goes, by Python function and C++ entry point (cProfile): a whole model's training step, or
one layer's pass, after a warm-up.

    python tools/host_profile.py --model xception:cuda [--dtype bfloat16] [--layout NHWC] [--steps 5]
    python tools/host_profile.py --layer 728,728,19 --impl xo:triton [--pass training] [--steps 20]

Prints the uninstrumented issue and wall time per call first (issue: the host's time to run the calls without
waiting for the GPU; where it is close to wall, the GPU waits on the host), then the functions by own time and by
cumulative time. `tools/profile_model.py` says whether a step is host-bound; this says which code keeps it so
(session 12 on the H100: Triton's launcher, ~14 launches per layer pass, and the autograd engine's own time).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import torch

from xception_ops.bench import issue_and_wall_ms, layer_runner, model_steps, synchronize


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="a model as `xception-ops bench --models` names it: its training step")
    what.add_argument("--layer", metavar="CIN,COUT,HW", help="one separable layer's pass")
    parser.add_argument("--impl", default="xo:cuda", help="the layer's implementation (eager, xo:cuda, xo:triton...)")
    parser.add_argument("--pass", dest="pass_", default="training", choices=("training", "forward", "inference"))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--layout", default="NHWC", choices=("NHWC", "NCHW"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 32 on a GPU, 1 on the CPU")
    parser.add_argument("--image", type=int, default=None, help="the model's input size (default: 299 / 71 on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="calls timed, then profiled (model 5, layer 20)")
    parser.add_argument("--rows", type=int, default=40, help="functions listed per ordering")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype)
    batch = args.batch or (32 if gpu else 1)
    if args.model:
        if gpu:
            torch.backends.cudnn.benchmark = True  # as the model benchmark runs
        model, step, _ = model_steps(args.model, dtype, args.layout, batch, args.image or (299 if gpu else 71), device)
        model.train()
        steps = args.steps or 5
    else:
        cin, cout, hw = (int(v) for v in args.layer.split(","))
        step = layer_runner("separable", args.impl, cin, cout, hw, batch, dtype, args.layout, args.pass_, device)
        steps = args.steps or 20
    for i in range(3):
        step(i)
    issue, wall = issue_and_wall_ms(step, device, steps)
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(steps):
        step(i)
    synchronize(device)
    profiler.disable()
    out = io.StringIO()
    out.write(f"{args.model or args.layer} on {device}: issue {issue:.3f} ms, wall {wall:.3f} ms per call "
              f"(uninstrumented; the profile below covers {steps} calls)\n")
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(args.rows)
    stats.sort_stats("cumulative").print_stats(args.rows)
    text = out.getvalue()
    print(text)
    return text


if __name__ == "__main__":
    main()
