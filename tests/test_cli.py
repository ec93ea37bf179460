"""The xception-ops command (info, parity, bench), the parity report, and the Python-only install."""

import json
import os
import subprocess
import sys

import pytest
import torch

from xception_ops import cli
from xception_ops.parity import run_parity


def test_info_lists_every_backend(capsys, monkeypatch):
    monkeypatch.setenv("XCEPTION_OPS_SEPARABLE_FORWARD", "fused")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "backends:" in out
    assert "settings:" in out and "XCEPTION_OPS_SEPARABLE_FORWARD=fused" in out  # the implementation choices
    for name in ("torch", "cuda", "triton"):
        assert f"  {name}" in out
    from xception_ops import _library
    if _library.EXTENSION is not None and _library.EXTENSION.WITH_CUDA:  # whether Hopper's kernels are there
        assert "Hopper's wgmma kernels built" in out or "Hopper's wgmma kernels not built" in out
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {b["name"] for b in info["backends"]} == {"torch", "cuda", "triton"}
    assert info["torch"] == torch.__version__
    assert info["settings"]["XCEPTION_OPS_SEPARABLE_FORWARD"] == "fused"


def test_info_names_the_triton_autotune_cache(capsys, monkeypatch, tmp_path):
    pytest.importorskip("triton")
    cache = tmp_path / "tune.json"
    cache.write_text(json.dumps({"format": 1, "entries": {"a": {}, "b": {}}}))
    monkeypatch.setenv("XCEPTION_OPS_TRITON_AUTOTUNE_CACHE", str(cache))
    assert cli.main(["info"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("triton autotune:"))
    assert line.endswith(f" {cache}, 2 choices")
    monkeypatch.setenv("XCEPTION_OPS_TRITON_AUTOTUNE_CACHE", "0")
    assert cli.main(["info", "--json"]) == 0
    assert "memory only" in json.loads(capsys.readouterr().out)["triton autotune"]


def test_parity_report_on_cpu():
    report = run_parity(device="cpu", batch=2, image_size=71, mode="train")
    assert report.passed
    layers = [name for name, *_ in report.worst_by_layer()]
    assert "block4.convs.2" in layers and "conv4" in layers and "(output)" in layers
    names = {r.name for r in report.rows}
    assert {"logits", "loss", "block4.convs.2.bn.running_var", "conv1.weight.grad"} <= names
    # every parameter's gradient and every BatchNorm statistic is compared
    model = __import__("xception_ops").models.xception()
    assert sum(n.endswith(".grad") for n in names) == len(list(model.parameters()))
    assert sum(n.endswith("running_var") for n in names) == sum(1 for n, _ in model.named_buffers()
                                                               if n.endswith("running_var"))
    worst = max(r.error for r in report.rows)
    assert 0 < worst < 1e-3  # float32 on the reference path, against float64


def test_parity_fails_a_wrong_backend(monkeypatch):
    """The verdict can fail: a backend whose result is off by 1e-3 is caught. On a CPU, "auto" runs the unfused
    PyTorch layers while the reference copy runs the operator: perturb the former."""
    from xception_ops.nn import SeparableConvBN
    real = SeparableConvBN._forward_unfused
    monkeypatch.setattr(SeparableConvBN, "_forward_unfused", lambda self, x, r: real(self, x, r) * (1 + 1e-3))
    report = run_parity(backend="auto", device="cpu", batch=2, image_size=71, mode="eval")
    assert not report.passed
    assert report.format().endswith("FAIL")


def test_parity_command(tmp_path, capsys):
    path = tmp_path / "parity.json"
    assert cli.main(["parity", "--device", "cpu", "--mode", "eval", "--json", str(path)]) == 0
    assert "PASS" in capsys.readouterr().out
    data = json.loads(path.read_text())
    assert data["passed"] and data["mode"] == "eval" and data["rows"]


def test_parity_rejects_small_images(capsys):
    assert cli.main(["parity", "--device", "cpu", "--size", "64"]) == 2
    assert "at least 71" in capsys.readouterr().err


def test_python_only_install_runs_on_the_reference_path(tmp_path):
    """XCEPTION_OPS_SKIP_EXT=1: no compiled library; the model still trains; asking for cuda names the cause."""
    script = """
import torch, xception_ops
from xception_ops import _library
assert _library.EXTENSION is None, _library.LOAD_ERROR
m = xception_ops.models.xception(num_classes=4)
x = torch.randn(2, 3, 71, 71)
m.loss(m(x), torch.tensor([0, 1])).backward()
assert m.conv3.depthwise.weight.grad is not None
try:
    xception_ops.separable_conv2d(x, torch.randn(3, 1, 3, 3), torch.randn(4, 3, 1, 1), backend="cuda")
except NotImplementedError as e:
    assert "compiled library is not loaded" in str(e) and "XCEPTION_OPS_SKIP_EXT" in str(e), e
else:
    raise AssertionError("backend='cuda' did not raise")
print("ok")
"""
    env = dict(os.environ, XCEPTION_OPS_SKIP_EXT="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit):
        cli.main(["frobnicate"])


def test_a_hopper_build_names_its_wgmma_gemm_builds():
    """The wgmma GEMM's builds, as the compiled library names them: what the GPU tests and tools/wgmma_sweep.py
    iterate over, so an empty or misspelled list would silently leave builds untested."""
    from xception_ops import backend
    if not backend.wgmma_kernels_built():
        pytest.skip("the compiled library is not built for 9.0a")
    names = backend.wgmma_configs()
    assert names[0] == "128x3x0" and len(names) == len(set(names)) >= 2, names  # the default first
    for name in names:
        n, stages, in_flight = map(int, name.split("x"))
        assert n % 64 == 0 and 0 <= in_flight < stages - 1, name
