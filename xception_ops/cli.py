"""The `xception-ops` command: info, parity, bench, autotable, train."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from .bench import LAYER_OPS, MODELS, PASSES, TF32_CHOICES, kernel_settings
from .compiling import COMPILE_MODES

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cmd_info(args: argparse.Namespace) -> int:
    from . import _library, backend
    from .version import __version__

    info = {"xception_ops": __version__, "torch": torch.__version__, "cuda (torch build)": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    try:
        import triton
        info["triton"] = triton.__version__
        from .triton import autotune
        path = autotune.cache_path()
        info["triton autotune"] = (f"{path}, {len(autotune.cache_entries())} choices" if path is not None
                                   else f"choices kept in memory only ({autotune.CACHE_ENV})")
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
    settings = kernel_settings()  # as bench reports record them
    info["settings"] = " ".join(f"{k}={v}" for k, v in settings.items()) or "none (the defaults)"
    statuses = backend.status()
    if args.json:
        info["settings"] = settings
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
    from . import autotable

    entries = autotable.load()
    arch = (autotable.arch_name(*torch.cuda.get_device_capability()) if torch.cuda.is_available() else None)
    print(f"auto table:          {autotable.table_path()}, {len(entries)} measured configurations")
    lines = autotable.summary(entries, arch)
    if arch is not None and not lines:
        print(f"  nothing measured for {arch}: backend='auto' falls back to the compiled-in list "
              "(csrc/cuda_ops_list.h), then PyTorch's layers")
    for line in lines:
        print(f"  {line}")
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
    from . import bench, bench_report

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.auto_table and not device.startswith("cuda"):  # fail before the run, not after
        raise ValueError("--auto-table needs a run on a CUDA GPU: the table records GPU measurements")
    shapes = [bench.parse_shape(s) for s in args.shapes] if args.shapes else None
    models = False if args.no_models else (args.models or True)
    if args.resume and not args.out:
        raise ValueError("--resume needs --out: the directory whose bench.json the run goes on from")
    saved = Path(args.out) / "bench.json" if args.out else None
    previous = json.loads(saved.read_text()) if args.resume and saved.exists() else None

    def checkpoint(report: dict) -> None:  # bench.json as the run goes, so that a run stopped part way keeps its rows
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(report, indent=1))

    report = bench.run(device=args.device, backends_=args.backends, dtypes=args.dtypes, layouts=args.layouts,
                       passes=args.passes, batch=args.batch, scale=args.scale, shapes=shapes, ops=args.ops,
                       compile_=args.compile, layers=not args.no_layers, models=models, image=args.image,
                       model_batch=args.model_batch, warmup=args.warmup, reps=args.reps, previous=previous,
                       checkpoint=checkpoint if saved is not None else None, tf32=args.tf32,
                       time_limit=args.time_limit)
    print(bench_report.format_tables(report))
    if args.out:
        written = bench_report.write_outputs(report, args.out)
        print(f"\nwrote {', '.join(f'{args.out}/{name}' for name in written)}")
    if args.auto_table:
        _update_auto_table(args.auto_table, [report])
    return 0


def _update_auto_table(path: str, reports: list[dict]) -> None:
    from . import autotable

    new = [e for r in reports for e in autotable.entries_from_report(r)]
    old = autotable.read(path) if Path(path).exists() else []
    merged = autotable.merge(old, new)
    autotable.save(merged, path)
    print(f"auto table {path}: {len(new)} measured configurations merged, {len(merged)} entries")
    for line in autotable.summary(merged):
        print(f"  {line}")


def cmd_autotable(args: argparse.Namespace) -> int:
    reports = [json.loads(Path(p).read_text()) for p in args.reports]
    _update_auto_table(args.out, reports)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    cfg = TrainConfig(model=args.model, preset=args.preset, data=args.data, synthetic_size=args.synthetic_size,
                      num_classes=args.num_classes, multi_label=args.multi_label, image_size=args.image_size,
                      batch_size=args.batch_size, epochs=args.epochs, max_steps=args.max_steps, lr=args.lr,
                      weight_decay=args.weight_decay, dropout=args.dropout, backend=args.backend,
                      residual=not args.no_residual, mid_activation=args.mid_activation, bf16=args.bf16,
                      dtype=args.dtype, channels_last=args.channels_last, compile=args.compile,
                      sync_bn=args.sync_bn,
                      ema_decay=None if args.no_ema else args.ema_decay, checkpoint=args.checkpoint,
                      checkpoint_every=args.checkpoint_every, resume=args.resume, seed=args.seed,
                      workers=args.workers, eval_batches=args.eval_batches)
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        summary = {"steps": result.steps, "final_loss": result.losses[-1] if result.losses else None,
                   "top1": result.top1, "top5": result.top5, "steps_per_s": result.steps_per_s,
                   "images_per_s": result.images_per_s}
        print(json.dumps(summary))
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

    p = sub.add_parser("bench", help="layer and model benchmarks (without a GPU: a quick CPU run at small sizes)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--backends", nargs="+", choices=["torch", "cuda", "triton"], default=None,
                   help="our backends to time (default: every usable one, but on a GPU not the reference op "
                        "'torch'); eager PyTorch is always timed")
    p.add_argument("--compile", nargs="?", const="default", default=None, choices=list(COMPILE_MODES),
                   help="also time torch.compile of the eager layers and of the models, in this mode (default: "
                        "'default'; 'reduce-overhead' replays CUDA graphs)")
    p.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--layouts", nargs="+", choices=["NCHW", "NHWC"], default=None)
    p.add_argument("--passes", nargs="+", choices=list(PASSES), default=["inference", "training"])
    p.add_argument("--ops", nargs="+", choices=list(LAYER_OPS), default=["separable", "depthwise"],
                   help="layer ops to time (pool: Xception's max pools; not in the default set)")
    p.add_argument("--shapes", nargs="+", metavar="CIN,COUT,HW[,COUNT]",
                   help="layer shapes to time instead of Xception's ten")
    p.add_argument("--batch", type=int, default=None, help="layer batch size (default: 32 on GPU, 2 on CPU)")
    p.add_argument("--scale", type=float, default=None, help="spatial scale of Xception's shapes (1.0 = 299x299)")
    p.add_argument("--models", nargs="+", default=None,
                   help=f"models to time (default: {', '.join(MODELS)}; also xception:BACKEND, and "
                        "timm_legacy_xception:fused[:BACKEND], timm's model through xception_ops.fuse; "
                        "mobilenet_v2 and mobilenet_v2:fused[:BACKEND], torchvision's; timm:NAME and "
                        "timm:NAME:fused[:BACKEND], any timm model; NAME+frozen under xception_ops.nn.freeze)")
    p.add_argument("--no-models", action="store_true", help="skip the whole-model comparison")
    p.add_argument("--no-layers", action="store_true", help="skip the layer benchmarks")
    p.add_argument("--image", type=int, default=None, help="model input size (default: 299 on GPU, 75 on CPU)")
    p.add_argument("--model-batch", type=int, default=None, help="model batch size (default: 32 on GPU, 2 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs before timing")
    p.add_argument("--reps", type=int, default=None, help="timed runs per configuration (the median is reported)")
    p.add_argument("--out", default=None, help="directory for bench.json (saved after each configuration), "
                   "bench.md and the PNG charts")
    p.add_argument("--resume", action="store_true",
                   help="go on from --out's bench.json: keep its rows and time only what it lacks (or measured with "
                        "an error); for runs longer than a session's time limit, in several calls")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="start no configuration after SECONDS (the one running finishes), then write the reports "
                        "with what was timed and say how many are left: with --out, the same command with --resume "
                        "goes on from there (a full GPU run in several calls under a machine's time limit)")
    p.add_argument("--tf32", default="default", choices=list(TF32_CHOICES),
                   help="TF32 for float32 convolutions and products during the run: 'on' / 'off' sets cuDNN's and "
                        "cuBLAS's flags alike (float32 rows then compare cuDNN and this package at the same "
                        "setting); 'default' leaves PyTorch's (cuDNN's on, cuBLAS's off). Recorded in the report")
    p.add_argument("--auto-table", default=None, metavar="FILE",
                   help="merge this GPU run's layer results into an auto table (JSON; the package's own is "
                        "xception_ops/auto_table.json)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("autotable", help="build or update the table behind backend='auto' from bench.json files")
    p.add_argument("reports", nargs="+", help="bench.json files of GPU runs (later ones win per configuration)")
    p.add_argument("--out", default=str(Path(__file__).with_name("auto_table.json")),
                   help="the table to update (default: the package's own)")
    p.set_defaults(func=cmd_autotable)

    p = sub.add_parser("train", help="train Xception or Inception V3 with the paper's recipes (torchrun for DDP)")
    p.add_argument("--model", default="xception", choices=["xception", "inception_v3"])
    p.add_argument("--preset", default="imagenet", choices=["imagenet", "jft"],
                   help="imagenet: SGD 0.045, x0.94 every 2 epochs, dropout 0.5; jft: RMSprop 0.001, x0.9 every 3M "
                        "samples, no dropout (weight decay 1e-5 for Xception, 4e-5 for Inception V3)")
    p.add_argument("--data", help="ImageFolder root (with train/ and optionally val/); default: synthetic data")
    p.add_argument("--synthetic-size", type=int, default=256, help="images in the synthetic training set")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--multi-label", action="store_true", help="synthetic multi-hot targets, sigmoid head")
    p.add_argument("--image-size", type=int, default=299)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="override the preset's initial learning rate")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "cuda", "triton"])
    p.add_argument("--no-residual", action="store_true", help="Xception without residual connections (4.6)")
    p.add_argument("--mid-activation", choices=["relu", "elu"], default=None, help="between dw and pw (4.7)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", nargs="?", const="default", default=None, choices=list(COMPILE_MODES),
                   help="torch.compile the training step's model, in this mode (default: 'default'); "
                        "'reduce-overhead' replays CUDA graphs, for steps bound by the host")
    p.add_argument("--sync-bn", action="store_true", help="all-reduce BatchNorm statistics across processes")
    p.add_argument("--ema-decay", type=float, default=0.9999, help="Polyak averaging of the weights")
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--checkpoint", help="checkpoint file (written at the end and every --checkpoint-every steps)")
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="data-loading processes")
    p.add_argument("--eval-batches", type=int, default=None)
    p.set_defaults(func=cmd_train)
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
