"""torch.compile's modes, as `xception-ops bench --compile` and `xception-ops train --compile` take them by name."""

from __future__ import annotations

# "reduce-overhead" replays CUDA graphs: the remedy where eager steps are bound by the host (the Python and launches
# of ~40 fused layers per Xception step; benchmarks/RESULTS.md).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(mode: str) -> str | None:
    """torch.compile's `mode` argument for a mode name (None for "default"); an unknown name is a ValueError."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; expected one of {', '.join(COMPILE_MODES)}")
    return None if mode == "default" else mode


def compiled_label(compiled: bool | str) -> str:
    """A model row's `compiled` as report text: "", " compiled" (the default mode) or " compiled (<mode>)"."""
    return "" if compiled is False else " compiled" if compiled is True else f" compiled ({compiled})"


def uses_cuda_graphs(compiled: bool | str) -> bool:
    """Whether a model row's compile mode replays CUDA graphs ("reduce-overhead", and "max-autotune", which turns
    them on too). Their memory pool is allocated while the graphs are recorded, before the timed steps."""
    return compiled in ("reduce-overhead", "max-autotune")
