"""The `xception-ops` command: info, parity, bench."""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cmd_info(args: argparse.Namespace) -> int:
    from . import _library, backend
    from .version import __version__

    info = {"xception_ops": __version__, "torch": torch.__version__, "cuda (torch build)": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info[f"gpu {i}"] = f"{p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, " \
                               f"{p.total_memory / 2**30:.0f} GiB"
    else:
        info["gpu"] = "none visible"
    ext = _library.EXTENSION
    info["compiled library"] = ext.__file__ if ext is not None else f"not loaded: {_library.LOAD_ERROR}"
    statuses = backend.status()
    if args.json:
        info["backends"] = [s.__dict__ for s in statuses]
        print(json.dumps(info, indent=1))
        return 0
    for key, value in info.items():
        print(f"{key + ':':<20} {value}")
    print("backends:")
    for s in statuses:
        state = "usable" if s.usable else ("built, not usable here" if s.built else "not available")
        print(f"  {s.name:<7} {state}: {s.detail}")
    if os.environ.get(backend.ENV_VAR):
        print(f"{backend.ENV_VAR}={os.environ[backend.ENV_VAR]} overrides backend='auto'")
    return 0


def cmd_parity(args: argparse.Namespace) -> int:
    from .parity import run_parity

    report = run_parity(backend=args.backend, device=args.device, dtype=DTYPES[args.dtype], batch=args.batch,
                        image_size=args.size, mode=args.mode, seed=args.seed)
    print(report.format())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=1)
    return 0 if report.passed else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    report = bench.run(device=args.device, backends_=args.backends, dtypes=args.dtypes, layouts=args.layouts,
                       passes=args.passes, batch=args.batch, scale=args.scale, layers=not args.no_layers,
                       models=not args.no_models, warmup=args.warmup, reps=args.reps,
                       out_dir=args.out, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(bench.format_tables(report))
    if args.out:
        print(f"\nwrote {args.out}/bench.json and {args.out}/bench.md")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xception-ops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="versions, GPU, and which backends are built and usable (and why not)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("parity", help="compare Xception on a backend with the reference path and float64")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "cuda", "triton"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=71, help="image size (at least 71)")
    p.add_argument("--mode", default="train", choices=["train", "eval"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the report to this JSON file")
    p.set_defaults(func=cmd_parity)

    p = sub.add_parser("bench", help="layer and model benchmarks (CPU: a quick run at small sizes)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--backends", nargs="+", choices=["torch", "cuda", "triton"], default=None,
                   help="our backends to time (default: every usable one); eager PyTorch is always timed")
    p.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--layouts", nargs="+", choices=["NCHW", "NHWC"], default=None)
    p.add_argument("--passes", nargs="+", choices=["inference", "training"], default=["inference", "training"])
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--scale", type=float, default=None, help="spatial scale of the layer shapes (1.0 = 299x299)")
    p.add_argument("--no-models", action="store_true", help="skip the whole-model comparison")
    p.add_argument("--no-layers", action="store_true", help="skip the layer benchmarks")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs before timing")
    p.add_argument("--reps", type=int, default=None, help="timed runs per configuration (the median is reported)")
    p.add_argument("--out", default=None, help="directory for bench.json and bench.md")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, NotImplementedError) as e:
        print(f"xception-ops: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
