"""What a benchmark run writes: the terminal tables, bench.json, bench.md, and PNG charts (a roofline of the
layers, the model throughput bars)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .compiling import compiled_label

REPORT_KEYS = ("env", "ceilings", "settings", "layers", "models")


def weighted_totals(rows: list[dict]) -> list[dict]:
    """Per (op, dtype, layout, pass, impl): all of Xception's layers, each time its count. An implementation that
    failed on any layer gets no total."""
    totals: dict[tuple, float] = {}
    for r in rows:
        key = (r["op"], r["dtype"], r["layout"], r["pass_"], r["impl"])
        totals[key] = totals.get(key, 0.0) + (math.nan if r["error"] else r["median_ms"] * r["count"])
    return [dict(op=k[0], dtype=k[1], layout=k[2], pass_=k[3], impl=k[4], total_ms=v)
            for k, v in totals.items() if v == v]


def _layer_lines(rows: list[dict]) -> list[str]:
    lines = [f"{'op':<10}{'layer':<20}{'dtype':<10}{'layout':<7}{'pass':<10}{'impl':<11}{'ms':>9}{'again':>9}"
             f"{'floor%':>8}{'GB/s':>8}{'TFLOP/s':>9}{'vs eager':>9}{'MiB':>8}{'direct':>9}"]
    for r in rows:
        name = f"{r['cin']}->{r['cout']} @{r['hw']}^2"
        head = f"{r['op']:<10}{name:<20}{r['dtype']:<10}{r['layout']:<7}{r['pass_']:<10}{r['impl']:<11}"
        if r["error"]:
            lines.append(f"{head}  {r['error']}")
            continue
        floor = f"{100 * r['floor_ms'] / r['median_ms']:.0f}" if r["floor_ms"] == r["floor_ms"] else ""
        speed = f"{r['speedup_vs_eager']:.2f}x" if r["speedup_vs_eager"] else ""
        mib = f"{r['peak_mib']:.0f}" if r["peak_mib"] == r["peak_mib"] else ""
        # Rows timed as graph replays: "graph", and the direct calls' time where it was measured too.
        direct = r.get("direct_ms", math.nan)
        direct = f"{direct:9.3f}" if direct == direct else f"{'graph' if r['graph'] else '':>9}"
        lines.append(f"{head}{r['median_ms']:9.3f}{r['median2_ms']:9.3f}{floor:>8}{r['gbps']:8.1f}"
                     f"{r['tflops']:9.2f}{speed:>9}{mib:>8}{direct}")
    return lines


def format_tables(report: dict) -> str:
    c = report["ceilings"]
    rates = ", ".join(f"{k} matmul {v:.3g} TFLOP/s" for k, v in c["matmul_tflops"].items())
    lines = [f"ceilings measured in this run: copy {c['copy_gbps']:.3g} GB/s, {rates}", ""]
    if report.get("incomplete"):
        i = report["incomplete"]
        lines[:0] = [f"INCOMPLETE: the time limit of {i['time_limit_s']:g} s left {i['left']} configurations "
                     "untimed; run the same command with --resume to go on", ""]
    if report["layers"]:
        lines += _layer_lines(report["layers"])
        lines += ["", "All of Xception's layers, each times its count:"]
        for t in weighted_totals(report["layers"]):
            lines.append(f"  {t['op']:<10}{t['dtype']:<10}{t['layout']:<7}{t['pass_']:<10}{t['impl']:<11}"
                         f"{t['total_ms']:10.3f} ms")
    if report["models"]:
        w = max(24, *(len(m["model"]) + 2 for m in report["models"]))  # the name column fits the longest name
        lines += ["", f"{'model (Table 3)':<{w}}{'params':>12}{'dtype':>10}{'compiled':>17}{'train steps/s':>15}"
                      f"{'infer img/s':>13}{'peak GiB':>10}"]
        for m in report["models"]:
            if m["error"]:
                lines.append(f"{m['model']:<{w}}  {m['error']}")
                continue
            peak = f"{m['peak_gib']:.2f}" if m["peak_gib"] == m["peak_gib"] else ""
            lines.append(f"{m['model']:<{w}}{m['params']:>12,}{m['dtype']:>10}{str(m['compiled']):>17}"
                         f"{m['train_steps_per_s']:15.2f}{m['infer_images_per_s']:13.1f}{peak:>10}")
    return "\n".join(lines)


def _charts(report: dict, out_dir: Path) -> list[str]:
    """roofline.png and models.png; returns what it wrote (nothing without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    # (Rows without FLOPs, the pools, have no place on a roofline: their GB/s are in the tables.)
    rows = [r for r in report["layers"] if not r["error"] and r["median_ms"] > 0 and r["flops"] > 0]
    if rows:
        fig, ax = plt.subplots(figsize=(8, 5.5))
        c = report["ceilings"]
        intensities = [r["flops"] / r["min_bytes"] for r in rows]
        lo, hi = min(intensities) / 2, max(intensities) * 2
        xs = [lo * (hi / lo) ** (i / 50) for i in range(51)]
        for dtype in sorted({r["dtype"] for r in rows}):
            peak = c["matmul_tflops"][dtype]
            ax.plot(xs, [min(peak, x * c["copy_gbps"] / 1e3) for x in xs], "--", linewidth=1,
                    label=f"roof: copy {c['copy_gbps']:.3g} GB/s, {dtype} matmul {peak:.3g} TFLOP/s")
        impls = sorted({r["impl"] for r in rows})
        markers = {"inference": "o", "forward": "^", "backward": "v", "training": "s"}
        for k, impl in enumerate(impls):
            for pass_, marker in markers.items():
                pts = [(r["flops"] / r["min_bytes"], r["tflops"]) for r in rows
                       if r["impl"] == impl and r["pass_"] == pass_]
                if pts:
                    ax.scatter(*zip(*pts), marker=marker, color=f"C{k}", s=22, label=f"{impl} {pass_}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (FLOP / minimal byte)")
        ax.set_ylabel("achieved TFLOP/s")
        env = report["env"]
        ax.set_title(f"Xception separable-conv layers on {env.get('gpu', env.get('cpu'))}")
        ax.legend(fontsize=6, loc="lower right")
        fig.tight_layout()
        fig.savefig(out_dir / "roofline.png", dpi=120)
        plt.close(fig)
        written.append("roofline.png")
    models = [m for m in report["models"] if not m["error"]]
    if models:
        fig, ax = plt.subplots(figsize=(8, 0.4 * len(models) + 1.5))
        labels = [f"{m['model']} {m['dtype']}{compiled_label(m['compiled'])}" for m in models]
        ax.barh(labels, [m["train_steps_per_s"] for m in models], color="C0")
        ax.set_xlabel(f"training steps/s (batch {models[0]['batch']}, {models[0]['image']}x{models[0]['image']})")
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(out_dir / "models.png", dpi=120)
        plt.close(fig)
        written.append("models.png")
    return written


def write_outputs(report: dict, out_dir: str | Path) -> list[str]:
    """bench.json (everything), bench.md (the tables), and the charts. Returns the file names written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(report, indent=1))
    env = report["env"]
    header = ", ".join(f"{k} {v}" for k, v in env.items() if v is not None and v != {})
    (out_dir / "bench.md").write_text(f"# xception-ops benchmark\n\n{header}\n\n```\n{format_tables(report)}\n```\n")
    return ["bench.json", "bench.md", *_charts(report, out_dir)]
