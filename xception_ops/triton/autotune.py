"""Launch configurations for the Triton kernels, and a small autotuner that picks one per shape and caches it.

triton.autotune is not used directly because several ops size a workspace by the number of tiles, which
depends on the block sizes: here the whole launch sequence of an op (kernels + fixed-order reductions) is timed
per configuration, and the winner is cached under a key built from the shape, dtype, layout and flags.

The choices also persist in a JSON file (cache_path(): XCEPTION_OPS_TRITON_AUTOTUNE_CACHE, default
~/.cache/xception_ops/triton-autotune.json), so a model or a benchmark run does not time its shapes again in
every process. An entry counts only for the GPU model, the Triton, torch and package versions and the Triton
sources it was timed with, and only while its configuration is still in the op's list.

Under TRITON_INTERPRET=1 (CPU tests) every list collapses to one small configuration and nothing is timed.
XCEPTION_OPS_TRITON_AUTOTUNE=0 turns the timing off on a GPU too (the first configuration of each list is
used): weight gradients and statistics are then bitwise reproducible across processes, whatever the cache holds
(with the timing on, processes reproduce each other's bits where they read the same cache file). Nothing is
timed while a CUDA graph is being captured: a shape first seen there takes a cached choice, else the first
configuration, and is timed at its next call outside a capture.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch


class Config(NamedTuple):
    BLOCK_P: int  # pixels per tile
    BLOCK_C: int  # depthwise (or input) channels per tile
    BLOCK_K: int = 16  # pointwise output channels per tile (GEMM kernels only)
    num_warps: int = 4
    num_stages: int = 2
    staged: bool = False  # the separable forward's form (launch.separable_conv2d); not a kernel parameter
    rows: bool = False  # the depthwise stage by rows (kernels.dw_rows_kernel; BLOCK_P is then its BLOCK_W)

    def meta(self, gemm: bool) -> dict:
        m = dict(BLOCK_P=self.BLOCK_P, BLOCK_C=self.BLOCK_C, num_warps=self.num_warps, num_stages=self.num_stages)
        if gemm:
            m["BLOCK_K"] = self.BLOCK_K
        return m


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def tuning_enabled() -> bool:
    return os.environ.get("XCEPTION_OPS_TRITON_AUTOTUNE", "1").lower() not in ("0", "false", "no", "off")


# Depthwise kernels (no tl.dot). With channels fastest in memory (NHWC) a tile is wide in channels; with
# pixels fastest (NCHW, strided views) it is long in pixels. Every tile gives each thread 8 elements: at 16 the
# input-gradient kernel spilled on sm_90 (3x3, all taps' gathers live at once).
_DW_CHANNELS_LAST = (
    Config(32, 64, num_warps=8), Config(16, 64, num_warps=4), Config(64, 32, num_warps=8),
    Config(16, 128, num_warps=8),
)
_DW_PLANAR = (
    Config(128, 8, num_warps=4), Config(256, 4, num_warps=4), Config(64, 16, num_warps=4),
    Config(256, 8, num_warps=8),
)
# GEMM kernels (fused separable forward / backward): tl.dot needs every block dimension >= 16. The depthwise
# tile is gathered tap by tap into registers, so the list favours tiles that compile without spills (checked
# with ptxas for sm_90, fp16 and fp32, 3x3: the first three spill nothing in the forward, mid and pointwise-
# gradient kernels, the last two a few bytes; larger tiles spilled kilobytes). The first entry is the default.
# A program covers BLOCK_K output channels and computes the depthwise tile of all its input channels: with
# 728 output channels and BLOCK_K = 64 that depthwise work is done 12 times over. The last entry (32 pixels x
# 256 output channels, 241 registers and no spills in the bf16 forward, from cuobjdump -res-usage of the sm_90
# cubin) cuts it to 3 for the wide layers; the autotuner weighs that against its smaller pixel tile.
_GEMM = (
    Config(64, 32, 64, num_warps=8, num_stages=2), Config(32, 32, 64, num_warps=4, num_stages=2),
    Config(128, 16, 64, num_warps=8, num_stages=2), Config(64, 16, 128, num_warps=8, num_stages=2),
    Config(64, 32, 128, num_warps=8, num_stages=2), Config(32, 32, 256, num_warps=8, num_stages=2),
)
# The depthwise stage by rows (3x3, stride 1, no dilation: kernels.dw_rows_kernel): BLOCK_P output columns x
# BLOCK_C channels per row, nine float32 tiles of them live (three input rows at three column shifts), so the tiles
# are a quarter of the gather form's.
_DW_ROWS_CHANNELS_LAST = (
    Config(8, 64, num_warps=4, rows=True), Config(16, 32, num_warps=4, rows=True),
    Config(4, 128, num_warps=4, rows=True),
)
_DW_ROWS_PLANAR = (
    Config(64, 8, num_warps=4, rows=True), Config(32, 16, num_warps=4, rows=True),
    Config(128, 4, num_warps=4, rows=True),
)
# Interpreter: small tiles, so the CPU tests cover several tiles and channel chunks.
_DW_INTERPRET = (Config(32, 8),)
_DW_ROWS_INTERPRET = (Config(4, 8, rows=True),)
_GEMM_INTERPRET = (Config(32, 16, 16),)


def depthwise_configs(channels_last: bool) -> Sequence[Config]:
    if interpreting():
        return _DW_INTERPRET
    return _DW_CHANNELS_LAST if channels_last else _DW_PLANAR


def depthwise_rows_configs(channels_last: bool) -> Sequence[Config]:
    if interpreting():
        return _DW_ROWS_INTERPRET
    return _DW_ROWS_CHANNELS_LAST if channels_last else _DW_ROWS_PLANAR


def gemm_configs(dtype: torch.dtype) -> Sequence[Config]:
    if interpreting():
        return _GEMM_INTERPRET
    if dtype == torch.float32:
        # A float32 tl.dot is pipelined by staging every tap's gather in shared memory (about 90 KB at the first
        # tile size with 2 stages, over 300 KB at the larger ones, measured from the sm_90 compile): one stage.
        return tuple(dict.fromkeys(c._replace(num_stages=1) for c in _GEMM))
    return _GEMM


_CACHE: dict[Hashable, Config] = {}
CACHE_ENV = "XCEPTION_OPS_TRITON_AUTOTUNE_CACHE"
_CACHE_FORMAT = 1
_DISK: dict[str, dict] | None = None  # the file's entries as last read, loaded at the first miss


def cache_path() -> Path | None:
    """The file the choices persist in: $XCEPTION_OPS_TRITON_AUTOTUNE_CACHE ("0", "off" or empty: none), else
    triton-autotune.json under $XDG_CACHE_HOME/xception_ops (~/.cache/xception_ops)."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "0", "off", "false", "no") else Path(value).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "xception_ops" / "triton-autotune.json"


@functools.cache
def _sources_digest() -> str:
    """What the timings depend on in this package: the kernels, their launchers and the configuration lists."""
    digest = hashlib.sha256()
    for name in ("kernels.py", "launch.py", "autotune.py"):
        digest.update((Path(__file__).with_name(name)).read_bytes())
    return digest.hexdigest()[:16]


@functools.cache
def _context(device_index: int) -> str:
    """The setting an entry was timed in: the GPU model, the versions and the Triton sources."""
    import triton

    from ..version import __version__
    props = torch.cuda.get_device_properties(device_index)
    return (f"{props.name}|sm_{props.major}{props.minor}|{props.multi_processor_count}|triton {triton.__version__}|"
            f"torch {torch.__version__}|xception_ops {__version__}|{_sources_digest()}")


def _entry_name(op: str, key: Hashable) -> str:
    """The file's name for an entry on the current device: its context, the op and the key (shapes, strides,
    dtypes, device index and flags)."""
    return f"{_context(torch.cuda.current_device())}|{op}|{key!r}"


def _read(path: Path) -> dict[str, dict]:
    """The file's entries; none if it is missing or unreadable (it is rewritten at the next choice)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def cache_entries() -> dict[str, dict]:
    """The cache file's entries (none where it is off, missing or unreadable)."""
    path = cache_path()
    return {} if path is None else _read(path)


def _persisted(name: str, configs: Sequence[Config]) -> Config | None:
    global _DISK
    path = cache_path()
    if path is None:
        return None
    if _DISK is None:
        _DISK = _read(path)
    fields = _DISK.get(name)
    if not isinstance(fields, dict):
        return None
    try:
        config = Config(**fields)
    except TypeError:  # fields of another version of Config
        return None
    return config if config in configs else None


def _persist(name: str, config: Config) -> None:
    """Adds the entry to the file: read, merged and replaced in one rename, so that processes tuning at once
    (data-parallel ranks, test workers) never leave a torn file; at worst one's entry is lost and timed again."""
    global _DISK
    path = cache_path()
    if path is None:
        return
    entries = _read(path)
    entries[name] = config._asdict()
    _DISK = entries
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"format": _CACHE_FORMAT, "entries": entries}, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        warnings.warn(f"xception_ops: cannot write the Triton autotune cache {path} ({e}); set {CACHE_ENV}=0 to "
                      "keep the choices in memory only", RuntimeWarning, stacklevel=3)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _time(run: Callable[[Config], object], cfg: Config) -> float:
    from triton.testing import do_bench

    return do_bench(lambda: run(cfg), warmup=5, rep=20, return_mode="median")


def choose(op: str, key: Hashable, configs: Sequence[Config], run: Callable[[Config], object]) -> Config:
    """The configuration `run` is fastest with, timed once per (op, key) and cached, in memory and in
    cache_path(). `run(config)` launches the op's whole sequence with that configuration (it may be called several
    times, so it must be idempotent)."""
    if len(configs) == 1 or interpreting() or not tuning_enabled():
        return configs[0]
    cache_key = (op, key)
    best = _CACHE.get(cache_key)
    if best is not None:
        return best
    name = _entry_name(op, key)
    best = _persisted(name, configs)
    if best is not None:
        _CACHE[cache_key] = best
        return best
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():  # (timing would break it)
        return configs[0]
    timings = []
    error: Exception | None = None
    for cfg in configs:
        try:
            timings.append((_time(run, cfg), cfg))
        except Exception as e:  # a configuration that does not fit (shared memory, registers) is skipped
            error = e
    if not timings:
        raise RuntimeError(f"xception_ops triton backend: no launch configuration of {op} runs for {key}") from error
    best = min(timings, key=lambda tc: tc[0])[1]
    _CACHE[cache_key] = best
    _persist(name, best)
    return best


def cache_clear() -> None:
    """Forgets the choices in memory (the file stays: cache_path())."""
    global _DISK
    _CACHE.clear()
    _DISK = None
