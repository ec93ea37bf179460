"""pytest-benchmark suites for the kernels: `pytest benchmarks/ --benchmark-only` (add `--benchmark-json=FILE`).

Xception's ten separable-conv shapes, the fused layer and its depthwise stage, eager PyTorch against each usable
backend of ours. On a GPU at the paper's sizes (batch 32, 299x299, bf16 channels_last); without one on the CPU
at a tenth of the spatial size. `xception-ops bench` is the full suite with floors, spread and reports.
"""

import pytest
import torch

from xception_ops import backend
from xception_ops.bench import XCEPTION_LAYERS, layer_runner

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPE, LAYOUT, BATCH, SCALE = (torch.bfloat16, "NHWC", 32, 1.0) if GPU else (torch.float32, "NCHW", 2, 0.1)
SHAPES = [(cin, cout, max(3, round(hw * SCALE))) for cin, cout, hw, _ in XCEPTION_LAYERS]
IMPLS = ["eager"] + [f"xo:{s.name}" for s in backend.status() if s.usable]


@pytest.mark.parametrize("pass_", ["inference", "training"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["separable", "depthwise"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-{s[1]}@{s[2]}")
def test_layer(benchmark, shape, op, impl, pass_):
    cin, cout, hw = shape
    run = layer_runner(op, impl, cin, cout, hw, BATCH, DTYPE, LAYOUT, pass_, DEVICE)
    run(0)  # warm-up: cuDNN autotuning, Triton compilation

    def once():
        run(0)
        if GPU:
            torch.cuda.synchronize()

    benchmark.extra_info.update(device=str(DEVICE), dtype=str(DTYPE), layout=LAYOUT, batch=BATCH)
    benchmark(once)
