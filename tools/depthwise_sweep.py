"""Time the depthwise kernels alone (forward, input gradient, weight gradient) at each strip setting, against cuDNN.

    python tools/depthwise_sweep.py [--settings auto off 2 4 8 16] [--dtype bfloat16] [--layout NHWC] [--batch 32]
                                    [--json FILE]

Each setting of XCEPTION_OPS_DEPTHWISE_STRIPS (read once per process by csrc/cuda/depthwise_launch.cu: "auto" leaves
it unset, "off" takes the run kernels, N fixes the rows per strip) runs in its own process over Xception's six
depthwise shapes (3x3, stride 1, padding 1, channels_last or NCHW); the first process also times PyTorch's own depthwise
convolution and its two gradients (cuDNN). Times are CUDA-event means over --reps calls after --warmup, in ms, and
each kernel's bytes over its time as GB/s (the byte floor: read x or grad_y once, write the result once).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SHAPES = [(64, 147), (128, 147), (256, 74), (728, 37), (728, 19), (1536, 10)]


def time_ms(fn, warmup: int, reps: int) -> float:
    import torch

    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def child(args) -> None:
    import torch
    import torch.nn.functional as F

    import xception_ops  # noqa: F401  (registers torch.ops.xception_ops)

    ops = torch.ops.xception_ops
    dtype = getattr(torch, args.dtype)
    rows = []
    for c, hw in SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(c + hw)
        x = torch.randn(args.batch, c, hw, hw, device="cuda", dtype=dtype, generator=gen)
        if args.layout == "NHWC":
            x = x.contiguous(memory_format=torch.channels_last)
        w = torch.randn(c, 1, 3, 3, device="cuda", dtype=dtype, generator=gen)
        gy = torch.randn_like(x)
        stride, pad, dil = [1, 1], [1, 1, 1, 1], [1, 1]
        size, wsize = list(x.shape), list(w.shape)
        bytes_moved = 2 * x.numel() * x.element_size()
        impls = {
            "forward": lambda: ops.depthwise_conv2d(x, w, None, stride, pad, dil, "cuda"),
            "input_grad": lambda: ops.depthwise_conv2d_backward_input(gy, w, size, stride, pad, dil, "cuda"),
            "weight_grad": lambda: ops.depthwise_conv2d_backward_weight(gy, x, wsize, stride, pad, dil, "cuda"),
        }
        if args.eager:
            impls.update({
                "cudnn_forward": lambda: F.conv2d(x, w, None, 1, 1, 1, c),
                "cudnn_input_grad": lambda: torch.ops.aten.convolution_backward(
                    gy, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], c, [True, False, False]),
                "cudnn_weight_grad": lambda: torch.ops.aten.convolution_backward(
                    gy, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], c, [False, True, False]),
            })
        for name, fn in impls.items():
            ms = time_ms(fn, args.warmup, args.reps)
            rows.append({"channels": c, "hw": hw, "kernel": name, "ms": ms, "GBps": bytes_moved / ms / 1e6})
    json.dump(rows, sys.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="+", default=["auto", "off", "2", "4", "8", "16"])
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--layout", default="NHWC", choices=("NHWC", "NCHW"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json", help="also write every row here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--eager", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("depthwise_sweep.py needs a CUDA GPU")
    results = []
    for i, setting in enumerate(args.settings):
        env = dict(os.environ)
        env.pop("XCEPTION_OPS_DEPTHWISE_STRIPS", None)
        if setting != "auto":
            env["XCEPTION_OPS_DEPTHWISE_STRIPS"] = setting
        cmd = [sys.executable, __file__, "--child", "--dtype", args.dtype, "--layout", args.layout,
               "--batch", str(args.batch), "--warmup", str(args.warmup), "--reps", str(args.reps)]
        cmd += ["--eager"] if i == 0 else []
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        for row in json.loads(out):
            row["setting"] = "cudnn" if row["kernel"].startswith("cudnn_") else setting
            row["kernel"] = row["kernel"].removeprefix("cudnn_")
            results.append(row)
    kernels = ("forward", "input_grad", "weight_grad")
    settings = (["cudnn"] if any(r["setting"] == "cudnn" for r in results) else []) + list(args.settings)
    print(f"depthwise 3x3 stride 1, {args.dtype} {args.layout}, batch {args.batch}: ms (GB/s at the byte floor)")
    print(f"{'layer':<12} {'kernel':<12} " + " ".join(f"{s:>15}" for s in settings))
    by_key = {(r["channels"], r["hw"], r["kernel"], r["setting"]): r for r in results}
    for c, hw in SHAPES:
        for k in kernels:
            cells = []
            for s in settings:
                r = by_key.get((c, hw, k, s))
                cells.append(f"{r['ms']:7.3f} ({r['GBps']:4.0f})" if r else " " * 15)
            print(f"{c:>4}@{hw:<3}^2    {k:<12} " + " ".join(f"{cell:>15}" for cell in cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
