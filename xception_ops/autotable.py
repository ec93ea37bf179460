"""The measurements behind backend="auto": which backend runs a fused op fastest, per GPU arch, dtype, layout,
pass and layer shape.

The table (auto_table.json, next to this file) is produced by the benchmark: `xception-ops bench --auto-table
FILE` turns a run's layer results into entries and merges them into FILE. An entry records, for one benchmarked
configuration, each backend's speed-up over PyTorch's own layers (eager: cuDNN on a GPU) measured in the same
run, so entries from different runs compare by ratio, not by raw time. "auto" takes the backend with the largest
speed-up of at least MIN_SPEEDUP that can run, and PyTorch's own layers otherwise.

Lookup: same arch (e.g. "sm_90"), op, dtype and layout; pass "training" when autograd may need a backward
(grad mode on), else "inference"; then the benchmarked shape nearest in log2 of (C_in, C_out, H). A
configuration the table has no entry for falls back to the CUDA ops compiled into the auto list
(csrc/cuda_ops_list.h), and to PyTorch's layers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

TABLE_PATH = Path(__file__).with_name("auto_table.json")
TABLE_ENV = "XCEPTION_OPS_AUTO_TABLE"  # another table file, for experiments
BENCH_OPS = {"separable": "separable_conv2d", "depthwise": "depthwise_conv2d", "pool": "max_pool2d"}
BENCH_IMPLS = {"eager": "torch", "xo:cuda": "cuda", "xo:triton": "triton"}  # "xo:torch" is the reference op
PASSES = ("inference", "training")
# A backend must beat PyTorch's layers by this factor to be taken: the two timings of one configuration in a
# run differ by a few percent, so a smaller margin would pick by noise.
MIN_SPEEDUP = 1.05


@dataclass(frozen=True)
class Entry:
    arch: str     # "sm_90"
    op: str       # "separable_conv2d", "depthwise_conv2d" or "max_pool2d"
    dtype: str    # "float32", "float16" or "bfloat16"
    layout: str   # "NCHW" or "NHWC"
    pass_: str    # "inference" or "training"
    cin: int
    cout: int
    hw: int
    eager_ms: float                                        # PyTorch's layers in the run the speed-ups come from
    speedup: dict[str, float] = field(default_factory=dict)  # backend -> eager time / backend time
    source: str = ""                                       # GPU and date of the run

    @property
    def key(self) -> tuple:
        return (self.arch, self.op, self.dtype, self.layout, self.pass_, self.cin, self.cout, self.hw)

    def ranked(self) -> list[tuple[str, float]]:
        """Backends faster than PyTorch's layers (by MIN_SPEEDUP at least), fastest first."""
        return sorted(((b, s) for b, s in self.speedup.items() if s >= MIN_SPEEDUP), key=lambda bs: -bs[1])

    @property
    def winner(self) -> str:
        ranked = self.ranked()
        return ranked[0][0] if ranked else "torch"


def arch_name(major: int, minor: int) -> str:
    return f"sm_{major}{minor}"


def entries_from_report(report: dict) -> list[Entry]:
    """Entries from a benchmark report (bench.json): one per (op, dtype, layout, pass, shape) that has an eager
    timing and at least one of our backends. Only GPU runs make entries."""
    env = report.get("env", {})
    if env.get("device") != "cuda" or not env.get("sm"):
        raise ValueError("an auto table needs a benchmark run on a CUDA GPU (this report is from "
                         f"{env.get('device', 'an unknown device')})")
    major, minor = (int(v) for v in str(env["sm"]).split("."))
    arch = arch_name(major, minor)
    source = f"{env.get('gpu', '?')}, {str(env.get('date', '?'))[:10]}"
    groups: dict[tuple, dict[str, float]] = {}
    for row in report.get("layers", []):
        op, impl, pass_ = BENCH_OPS.get(row["op"]), row["impl"], row["pass_"]
        if op is None or impl not in BENCH_IMPLS or pass_ not in PASSES or row.get("error"):
            continue
        # The faster of the configuration's two timings: interference only ever slows a run down (on the H100
        # an eager layer once timed 1.13 ms, then 0.55 ms, which would have handed "auto" to a slower kernel).
        timings = [t for t in (row.get("median_ms"), row.get("median2_ms"))
                   if t is not None and math.isfinite(t) and t > 0]
        if not timings:
            continue
        ms = min(timings)
        # The depthwise op maps C_in to C_in channels (the benchmark names it by the layer it belongs to).
        cout = row["cin"] if op == "depthwise_conv2d" else row["cout"]
        key = (arch, op, row["dtype"], row["layout"], pass_, row["cin"], cout, row["hw"])
        groups.setdefault(key, {})[BENCH_IMPLS[impl]] = ms
    entries = []
    for key, times in sorted(groups.items()):
        eager = times.pop("torch", None)
        if eager is None or not times:
            continue
        entries.append(Entry(*key, eager_ms=eager, speedup={b: eager / t for b, t in sorted(times.items())},
                             source=source))
    return entries


def merge(old: Iterable[Entry], new: Iterable[Entry]) -> list[Entry]:
    """`old` with `new` laid over it: per configuration, each backend's newest speed-up."""
    table = {e.key: e for e in old}
    for e in new:
        prev = table.get(e.key)
        if prev is not None:
            e = Entry(*e.key, eager_ms=e.eager_ms, speedup={**prev.speedup, **e.speedup},
                      source=e.source if e.source == prev.source else f"{prev.source}; {e.source}")
        table[e.key] = e
    return [table[k] for k in sorted(table)]


def save(entries: Iterable[Entry], path: str | os.PathLike) -> None:
    rows = [dict(asdict(e), speedup={b: round(s, 4) for b, s in e.speedup.items()}) for e in entries]
    Path(path).write_text(json.dumps({"version": 1, "entries": rows}, indent=1) + "\n")


def read(path: str | os.PathLike) -> list[Entry]:
    data = json.loads(Path(path).read_text())
    if data.get("version") != 1:
        raise ValueError(f"{path}: unknown auto table version {data.get('version')!r}")
    return [Entry(**row) for row in data["entries"]]


_LOADED: dict[str, list[Entry]] = {}
_NEAREST: dict[tuple, Entry | None] = {}


def table_path() -> Path:
    return Path(os.environ.get(TABLE_ENV) or TABLE_PATH)


def load() -> list[Entry]:
    """The table in use (cached); empty when the file is missing."""
    path = str(table_path())
    if path not in _LOADED:
        _LOADED[path] = read(path) if Path(path).exists() else []
        _NEAREST.clear()
    return _LOADED[path]


def lookup(arch: str, op: str, dtype: str, layout: str, pass_: str, cin: int, cout: int, hw: int) -> Entry | None:
    """The entry of the nearest benchmarked shape for this configuration, or None (cached)."""
    entries = load()
    key = (str(table_path()), arch, op, dtype, layout, pass_, cin, cout, hw)
    if key in _NEAREST:
        return _NEAREST[key]

    def distance(e: Entry) -> float:
        return sum(abs(math.log2(max(a, 1)) - math.log2(max(b, 1))) for a, b in
                   ((e.cin, cin), (e.cout, cout), (e.hw, hw)))

    same = [e for e in entries if (e.arch, e.op, e.dtype, e.layout, e.pass_) == (arch, op, dtype, layout, pass_)]
    best = min(same, key=distance) if same else None
    _NEAREST[key] = best
    return best


def summary(entries: Iterable[Entry], arch: str | None = None) -> list[str]:
    """One line per (arch, op, dtype, layout, pass): how many measured shapes each backend wins."""
    groups: dict[tuple, dict[str, int]] = {}
    sources: dict[tuple, set[str]] = {}
    for e in entries:
        if arch is not None and e.arch != arch:
            continue
        key = (e.arch, e.op, e.dtype, e.layout, e.pass_)
        wins = groups.setdefault(key, {})
        wins[e.winner] = wins.get(e.winner, 0) + 1
        sources.setdefault(key, set()).add(e.source)
    return [f"{' '.join(key)}: " + ", ".join(f"{b} wins {n}" for b, n in sorted(wins.items()))
            + f" ({'; '.join(sorted(sources[key]))})" for key, wins in sorted(groups.items())]


def clear_cache() -> None:
    global generation
    _LOADED.clear()
    _NEAREST.clear()
    generation += 1


generation = 0  # advanced by clear_cache: caches of choices made from the table (backend.auto_choice) key on it
