"""Time the cuda backend's separable forward with its product on each build of Hopper's wgmma GEMM, and the fused
wgmma forward, against the default staged form, over Xception's ten layer shapes: the sweep that picks
kernels/pointwise_gemm_params.h's default configuration (kPointwiseConfigs; "auto", pick_pointwise_config's choice
per shape, is timed beside the builds) and decides whether the wgmma forms
become the defaults (the fused one applies up to 128 depthwise channels; elsewhere its column is the staged form's).

    python tools/wgmma_sweep.py [--configs 128x3x0 128x4x1 ...] [--dtype bfloat16] [--batch 32] [--json FILE]

One process: XCEPTION_OPS_SEPARABLE_FORWARD, XCEPTION_OPS_SEPARABLE_STAGED_GEMM and XCEPTION_OPS_WGMMA_CONFIG are
read at each call. Two passes per layer: inference (folded BatchNorm and ReLU in the epilogue) and the training
forward (the batch statistics). Times are medians of CUDA-event timings (xception_ops.bench.time_fn) over --reps
calls after --warmup, in ms; the weighted total counts each layer as often as the model has it. Before timing, each
variant's output is compared with the default's (relative error).
Needs a compute capability 9.0 GPU and a 9.0a build (tools/gpu_check.sh builds one).
"""
from __future__ import annotations

import argparse
import json
import os

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=None, help="builds to time (default: every one built)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import torch

    import xception_ops  # noqa: F401  (registers the ops)
    from xception_ops import _library
    from xception_ops.backend import wgmma_configs, wgmma_kernels_built
    from xception_ops.bench import XCEPTION_LAYERS, time_fn

    # Off Hopper there is nothing to time: said, and not an error (tools/gpu_check.sh runs this on any GPU).
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        print("wgmma_sweep: skipped: needs a compute capability 9.0 GPU")
        return
    if not wgmma_kernels_built():
        archs = getattr(_library.EXTENSION, "CUDA_ARCHS", None)
        print(f"wgmma_sweep: skipped: xception_ops._C is not built for 9.0a (archs {archs!r})")
        return
    ops = torch.ops.xception_ops
    dtype = getattr(torch, args.dtype)
    dev = "cuda"
    variables = ("XCEPTION_OPS_SEPARABLE_FORWARD", "XCEPTION_OPS_SEPARABLE_STAGED_GEMM", "XCEPTION_OPS_WGMMA_CONFIG")
    variants = ([("staged", None)] +
                [(f"wgmma-{c}", {"XCEPTION_OPS_SEPARABLE_STAGED_GEMM": "wgmma", "XCEPTION_OPS_WGMMA_CONFIG": c})
                 for c in (args.configs or (*wgmma_configs(), "auto"))] +
                [("fused-wgmma", {"XCEPTION_OPS_SEPARABLE_FORWARD": "wgmma"})])

    def set_variant(env):
        for name in variables:
            os.environ.pop(name, None)
        os.environ.update(env or {})

    rows = []
    totals = {(name, p): 0.0 for name, _ in variants for p in ("inference", "training")}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype} NHWC, batch {args.batch}")
    print(f"{'layer':<20} {'pass':<10} " + " ".join(f"{name:>16}" for name, _ in variants))
    for cin, cout, hw, count in XCEPTION_LAYERS:
        x = torch.randn(args.batch, cin, hw, hw, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
        dw = torch.randn(cin, 1, 3, 3, device=dev, dtype=dtype)
        pw = torch.randn(cout, cin, 1, 1, device=dev, dtype=dtype) * cin ** -0.5
        scale = torch.rand(cout, device=dev) + 0.5
        shift = torch.randn(cout, device=dev) * 0.1
        for pass_ in ("inference", "training"):
            inference = pass_ == "inference"

            def run():
                return ops.separable_conv2d(x, dw, pw, None, None, False, [1, 1], [1, 1, 1, 1], [1, 1], "none", None,
                                            None, scale if inference else None, shift if inference else None, inference,
                                            None, not inference, "cuda")

            set_variant(None)
            want = run()
            times, errors = [], []
            for name, env in variants:
                set_variant(env)
                got = run()
                err = max(((g.double() - w.double()).norm() / w.double().norm().clamp_min(1e-30)).item()
                          for g, w in zip(got, want) if w.numel())
                times.append(time_fn(lambda i: run(), torch.device(dev), args.warmup, args.reps).median_ms)
                errors.append(err)
                totals[(name, pass_)] += count * times[-1]
            set_variant(None)
            layer = f"{cin}->{cout} @{hw}^2"
            print(f"{layer:<20} {pass_:<10} " + " ".join(f"{t:>10.4f} {e:5.0e}" for t, e in zip(times, errors)))
            rows.append(dict(layer=layer, count=count, pass_=pass_,
                             ms={name: t for (name, _), t in zip(variants, times)},
                             rel_err={name: e for (name, _), e in zip(variants, errors)}))
    for pass_ in ("inference", "training"):
        print(f"{'weighted total':<20} {pass_:<10} " +
              " ".join(f"{totals[(name, pass_)]:>16.3f}" for name, _ in variants))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, dtype=args.dtype,
                           batch=args.batch, rows=rows,
                           weighted={f"{n}/{p}": v for (n, p), v in totals.items()}), f, indent=1)


if __name__ == "__main__":
    main()
