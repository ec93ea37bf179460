"""The benchmark suite: report schema, CLI options, outputs, and backends that cannot run."""

import dataclasses
import json

import pytest
import torch

from xception_ops import backend as backends
from xception_ops import bench, bench_report, cli
from xception_ops.bench import LayerRow, ModelRow
from xception_ops.progress import Progress

from .conftest import requires_ext, requires_gpu

LAYER_FIELDS = set(LayerRow.__dataclass_fields__)
MODEL_FIELDS = set(ModelRow.__dataclass_fields__)


@pytest.fixture(scope="module")
def small_report():
    return bench.run(device="cpu", backends_=["torch", "cuda"], dtypes=["float32"], layouts=["NCHW", "NHWC"],
                     passes=bench.PASSES, shapes=[(4, 6, 7, 2), (6, 6, 5, 1)], models=["xception"], image=71,
                     warmup=0, reps=2, progress=lambda line: None)


def test_report_schema(small_report):
    assert set(small_report) == set(bench_report.REPORT_KEYS)
    env = small_report["env"]
    assert {"date", "torch", "xception_ops", "device", "python", "triton", "cuda"} <= set(env)
    assert env["device"] == "cpu" and env["torch"] == torch.__version__
    ceilings = small_report["ceilings"]
    assert ceilings["copy_gbps"] > 0 and {"float32", "bfloat16"} <= set(ceilings["matmul_tflops"])
    rows = small_report["layers"]
    # 2 shapes x 2 layouts x 4 passes x 2 ops x (eager, xo:torch, xo:cuda)
    assert len(rows) == 2 * 2 * 4 * 2 * 3
    assert all(set(r) == LAYER_FIELDS for r in rows)
    ok = [r for r in rows if r["error"] is None]
    assert {r["impl"] for r in ok} == {"eager", "xo:torch"}
    for r in ok:
        assert r["median_ms"] > 0 and r["median2_ms"] > 0 and r["q10_ms"] <= r["q90_ms"]
        assert r["min_bytes"] > 0 and r["flops"] > 0 and r["floor_ms"] > 0
        assert r["gbps"] == pytest.approx(r["min_bytes"] / r["median_ms"] / 1e6)
    assert all(r["speedup_vs_eager"] is not None for r in ok if r["impl"] == "xo:torch")
    (model,) = small_report["models"]
    assert set(model) == MODEL_FIELDS and model["params"] == 22_855_952 and model["train_steps_per_s"] > 0


def test_a_backend_that_cannot_run_is_reported_not_crashed_on(small_report):
    cuda_rows = [r for r in small_report["layers"] if r["impl"] == "xo:cuda"]
    assert cuda_rows and all("backend 'cuda'" in r["error"] for r in cuda_rows)
    table = bench_report.format_tables(small_report)
    assert "backend 'cuda'" in table
    totals = bench_report.weighted_totals(small_report["layers"])
    assert {t["impl"] for t in totals} == {"eager", "xo:torch"}  # no total for a backend that failed
    separable_eager = [t for t in totals if t["impl"] == "eager" and t["op"] == "separable"
                       and t["pass_"] == "inference" and t["layout"] == "NCHW"]
    rows = [r for r in small_report["layers"] if r["impl"] == "eager" and r["op"] == "separable"
            and r["pass_"] == "inference" and r["layout"] == "NCHW"]
    assert separable_eager[0]["total_ms"] == pytest.approx(sum(r["median_ms"] * r["count"] for r in rows))


def test_outputs(small_report, tmp_path):
    written = bench_report.write_outputs(small_report, tmp_path)
    assert written == ["bench.json", "bench.md", "roofline.png", "models.png"]
    assert (tmp_path / "bench.json").read_text() == json.dumps(small_report, indent=1)
    assert (tmp_path / "bench.md").read_text().startswith("# xception-ops benchmark")
    for png in ("roofline.png", "models.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_options(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["bench", "--device", "cpu", "--shapes", "3,5,6", "8,4,5,3", "--batch", "1", "--dtypes",
                     "float16", "--layouts", "NHWC", "--passes", "forward", "--ops", "depthwise", "--backends",
                     "torch", "--no-models", "--warmup", "0", "--reps", "2", "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    rows = report["layers"]
    assert {(r["cin"], r["cout"], r["hw"], r["count"]) for r in rows} == {(3, 5, 6, 1), (8, 4, 5, 3)}
    assert {r["dtype"] for r in rows} == {"float16"} and {r["layout"] for r in rows} == {"NHWC"}
    assert {r["pass_"] for r in rows} == {"forward"} and {r["op"] for r in rows} == {"depthwise"}
    assert {r["impl"] for r in rows} == {"eager", "xo:torch"} and all(r["batch"] == 1 for r in rows)
    assert report["models"] == []
    assert "wrote" in capsys.readouterr().out


def test_a_stopped_run_resumes_where_it_stopped(tmp_path, monkeypatch, capsys):
    """bench.json is saved after each configuration; --resume keeps its rows and times only the configurations it
    lacks or measured with an error (a long GPU run in several calls, each under a time limit)."""
    out = tmp_path / "run"
    args = ["bench", "--device", "cpu", "--shapes", "3,5,6", "--batch", "1", "--dtypes", "float32", "--passes",
            "inference", "--ops", "depthwise", "--backends", "torch", "--no-models", "--warmup", "0", "--reps", "1",
            "--out", str(out), "--layouts", "NCHW", "NHWC"]
    real, timed = bench.bench_layer, []

    def stopped_at_the_third(*a, **k):  # a time limit that strikes during the second configuration
        timed.append((a[7], a[9]))
        if len(timed) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(bench, "bench_layer", stopped_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        cli.main(args)
    first = json.loads((out / "bench.json").read_text())
    assert [(r["layout"], r["impl"]) for r in first["layers"]] == [("NCHW", "eager"), ("NCHW", "xo:torch")]
    first["layers"][1]["error"] = "RuntimeError: out of memory"  # a row that failed is timed again
    (out / "bench.json").write_text(json.dumps(first))

    timed.clear()
    monkeypatch.setattr(bench, "bench_layer", lambda *a, **k: timed.append((a[7], a[9])) or real(*a, **k))
    assert cli.main([*args, "--resume"]) == 0
    assert timed == [("NCHW", "xo:torch"), ("NHWC", "eager"), ("NHWC", "xo:torch")]
    final = json.loads((out / "bench.json").read_text())
    assert [(r["layout"], r["impl"]) for r in final["layers"]] == [("NCHW", "eager"), ("NCHW", "xo:torch"),
                                                                   ("NHWC", "eager"), ("NHWC", "xo:torch")]
    assert all(r["error"] is None and r["median_ms"] > 0 for r in final["layers"])
    assert final["layers"][0] == first["layers"][0]
    assert final["settings"]["resumed_from"] == [first["env"]["date"]]
    assert (out / "bench.md").exists()

    # Timing settings that change what a row measures must match; so must the device.
    capsys.readouterr()
    assert cli.main([*args, "--reps", "2", "--resume"]) == 2
    assert "reps=1" in capsys.readouterr().err
    monkeypatch.setenv("XCEPTION_OPS_SEPARABLE_FORWARD", "fused")  # another implementation: other measurements
    assert cli.main([*args, "--resume"]) == 2
    assert "kernel_settings" in capsys.readouterr().err
    monkeypatch.delenv("XCEPTION_OPS_SEPARABLE_FORWARD")
    assert cli.main([*args, "--tf32", "on", "--resume"]) == 2  # other TF32 flags: other float32 measurements
    assert "tf32" in capsys.readouterr().err
    final["env"]["gpu"] = "NVIDIA H100 80GB HBM3"
    (out / "bench.json").write_text(json.dumps(final))
    assert cli.main([*args, "--resume"]) == 2
    assert "gpu" in capsys.readouterr().err
    assert cli.main(["bench", "--device", "cpu", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err


def test_a_time_limit_ends_the_run_with_reports_and_resume_goes_on(tmp_path, monkeypatch, capsys):
    """--time-limit: no configuration starts after it (the one running finishes); the reports say what is left;
    --resume times the rest. The clock advances 6 s per configuration timed, the limit is 10 s: the first
    layout's two configurations run, the second's two are left, and the model after them."""
    out = tmp_path / "run"
    args = ["bench", "--device", "cpu", "--shapes", "3,5,6", "--batch", "1", "--dtypes", "float32", "--passes",
            "inference", "--ops", "depthwise", "--backends", "torch", "--models", "xception", "--image", "32",
            "--model-batch", "1", "--warmup", "0", "--reps", "1", "--out", str(out), "--layouts", "NCHW", "NHWC"]
    now, timed = [0.0], []
    real_layer, real_model = bench.bench_layer, bench.bench_model

    def layer(*a, **k):
        now[0] += 6
        timed.append(a[7])
        return real_layer(*a, **k)

    def model(*a, **k):
        now[0] += 6
        timed.append(a[0])
        return real_model(*a, **k)

    monkeypatch.setattr(bench, "_clock", lambda: now[0])
    monkeypatch.setattr(bench, "bench_layer", layer)
    monkeypatch.setattr(bench, "bench_model", model)
    assert cli.main([*args, "--time-limit", "10"]) == 0
    assert timed == ["NCHW", "NCHW"]
    captured = capsys.readouterr()
    assert "3 configurations not timed" in captured.err and "--resume" in captured.err
    assert captured.out.startswith("INCOMPLETE: the time limit of 10 s left 3 configurations untimed")
    first = json.loads((out / "bench.json").read_text())
    assert first["incomplete"] == {"left": 3, "time_limit_s": 10.0} and len(first["layers"]) == 2
    assert "INCOMPLETE" in (out / "bench.md").read_text()

    timed.clear()
    assert cli.main([*args, "--resume", "--time-limit", "100"]) == 0
    assert timed == ["NHWC", "NHWC", "xception"]
    final = json.loads((out / "bench.json").read_text())
    assert "incomplete" not in final and len(final["layers"]) == 4 and len(final["models"]) == 1
    assert "INCOMPLETE" not in (out / "bench.md").read_text()
    assert final["layers"][:2] == first["layers"]
    assert cli.main([*args, "--time-limit", "0"]) == 2
    assert "time_limit must be a positive number" in capsys.readouterr().err


@pytest.mark.parametrize("setting", ["on", "off"])
def test_tf32_setting_holds_during_the_run_is_recorded_and_restored(tmp_path, setting):
    """--tf32 on / off sets cuDNN's and cuBLAS's flags alike while the run times (float32 rows at the same setting
    for cuDNN and this package's products), records them in the report, and restores the caller's after."""
    before = bench.tf32_flags()
    during = []
    out = tmp_path / "run"
    args = ["bench", "--device", "cpu", "--shapes", "3,5,6", "--batch", "1", "--dtypes", "float32", "--passes",
            "inference", "--ops", "depthwise", "--backends", "torch", "--no-models", "--warmup", "0", "--reps", "1",
            "--layouts", "NCHW", "--tf32", setting, "--out", str(out)]
    real = bench.bench_layer

    def spy(*a, **k):
        during.append(bench.tf32_flags())
        return real(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "bench_layer", spy)
        assert cli.main(args) == 0
    want = {"cudnn": setting == "on", "matmul": setting == "on"}
    assert during and all(flags == want for flags in during)
    report = json.loads((out / "bench.json").read_text())
    assert report["env"]["tf32"] == want
    assert f"tf32 {want}" in (out / "bench.md").read_text()
    assert bench.tf32_flags() == before


def test_tf32_default_leaves_the_flags_and_records_them():
    report = bench.run(device="cpu", backends_=["torch"], dtypes=["float32"], layouts=["NCHW"], passes=["inference"],
                       shapes=[(3, 4, 5, 1)], ops=["depthwise"], models=False, warmup=0, reps=1,
                       progress=lambda line: None)
    assert report["env"]["tf32"] == bench.tf32_flags()
    with pytest.raises(ValueError, match="tf32 must be one of"):
        bench.run(device="cpu", tf32="maybe")


def test_cli_rejects_a_bad_shape(capsys):
    assert cli.main(["bench", "--device", "cpu", "--shapes", "3,5"]) == 2
    assert "CIN,COUT,HW" in capsys.readouterr().err


def test_unknown_model_is_reported():
    row = bench.bench_model("resnet", torch.float32, "NCHW", 1, 71, torch.device("cpu"), 0, 1)
    assert row.error and "unknown model 'resnet'" in row.error


def test_progress_bar_reaches_the_total():
    lines = []
    bar = Progress(4, lines.append)
    for _ in range(2):
        bar.step("x", 2)
    assert lines[-1].startswith("[" + "#" * 24 + "] 4/4")


@pytest.fixture
def fake_peak_memory(monkeypatch):
    """A stand-in for CUDA's peak-memory counter: the dict's "peak", which bench's reset zeroes."""
    memory = {"peak": 0.0}
    monkeypatch.setattr(bench, "_reset_peak_memory", lambda device: memory.update(peak=0.0))
    monkeypatch.setattr(bench, "_peak_memory", lambda device: memory["peak"])
    return memory


@pytest.mark.parametrize("direct,replay,pass_,want_ms,want_graph", [
    (1.0, 0.5, "training", 0.5, True),     # launch-bound: the replays are reported, the direct time kept
    (1.0, 0.95, "training", 1.0, False),   # replays barely faster: not launch-bound, direct calls reported
    (5.0, 1.0, "inference", 5.0, False),   # too long to be launch-bound: no capture tried
    (1.0, 0.5, "backward", 1.0, False),    # backward alone reuses one graph per buffer: never captured
    (1.0, None, "forward", 1.0, False),    # capture failed: timed directly
])
def test_launch_bound_layers_are_timed_as_graph_replays(monkeypatch, fake_peak_memory, direct, replay, pass_,
                                                        want_ms, want_graph):
    # The selection only (no GPU here): time_fn stands in with fixed medians for direct calls and for replays.
    tried = []

    def fake_time_fn(fn, device, warmup, reps, graph=False):
        if graph:
            tried.append(True)
            if replay is None:
                raise RuntimeError("operation not permitted when stream is capturing")
            return bench.Timing(replay, replay, replay, reps, True)
        return bench.Timing(direct, direct, direct, reps, False)

    monkeypatch.setattr(bench, "time_fn", fake_time_fn)
    monkeypatch.setattr(bench, "layer_runner", lambda *args: (lambda i: None))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    row = bench.bench_layer("separable", 8, 8, 19, 1, 1, torch.float32, "NHWC", pass_, "eager",
                            torch.device("cuda"), 1, 3)
    assert row.error is None
    assert (row.median_ms, row.graph) == (want_ms, want_graph)
    assert row.median2_ms == want_ms  # the second timing takes the same mode
    assert (row.direct_ms == direct) if want_graph else (row.direct_ms != row.direct_ms)
    assert bool(tried) == (pass_ != "backward" and direct < bench.LAUNCH_BOUND_BELOW_MS)
    line = bench_report._layer_lines([dataclasses.asdict(row)])[1]
    assert line.endswith(f"{direct:9.3f}") == want_graph  # the table shows the direct calls' time beside


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("impl", ["eager", "xo:torch", "xo:cuda"])
@pytest.mark.parametrize("pass_", ["inference", "training"])
def test_a_small_layer_is_captured_and_replayed_on_gpu(impl, pass_):
    # What the CPU test above stands in for: capturing each implementation's pass (training: forward and backward,
    # after a warm-up on a side stream, one memory pool for the buffers' graphs) and timing its replays. A capture
    # failure would only fall back to direct timing in bench_layer, so it is called directly here.
    usable = {s.name for s in backends.status() if s.usable}
    if impl.startswith("xo:") and impl[3:] not in usable:
        pytest.skip(f"backend {impl[3:]} is not usable here")
    device = torch.device("cuda")
    run = bench.layer_runner("separable", impl, 16, 24, 9, 2, torch.float32, "NHWC", pass_, device)
    timing = bench.time_fn(run, device, 1, 3, graph=True)
    assert timing.graph and timing.runs == 3 and timing.median_ms > 0
    row = bench.bench_layer("separable", 16, 24, 9, 2, 1, torch.float32, "NHWC", pass_, impl, device, 1, 3)
    assert row.error is None
    assert row.graph == (row.direct_ms == row.direct_ms)  # a row timed as replays keeps the direct calls' time


def test_layer_peak_memory_is_that_of_the_calls_after_the_warm_up(monkeypatch, fake_peak_memory):
    # As for the models below: the first call of a configuration may try cuDNN's algorithms (the "eager" row of each
    # configuration ran first and carried them). A fake device memory: the first call peaks at 100 GiB, later ones
    # at 1 GiB.
    memory = fake_peak_memory
    calls = []

    def runner(*args):
        def run(i):
            calls.append(i)
            memory["peak"] = max(memory["peak"], (100 if len(calls) == 1 else 1) * 2.0**30)
        return run

    monkeypatch.setattr(bench, "layer_runner", runner)
    for warmup in (0, 2):
        calls.clear()
        memory["peak"] = 0.0
        row = bench.bench_layer("separable", 8, 8, 5, 1, 1, torch.float32, "NCHW", "inference", "eager",
                                torch.device("cpu"), warmup, 3)
        assert row.error is None
        assert row.peak_mib == 1024.0, f"warmup={warmup}: the peak includes the first call's"


def test_model_peak_memory_is_that_of_the_steps_after_the_warm_up(monkeypatch, fake_peak_memory):
    # cuDNN's benchmark mode tries its algorithms on the first step of each conv shape, with workspaces that dwarf
    # the step itself (H100, float32, batch 32: Xception's first step peaked at 22.3 GiB, its later ones at 7.65),
    # and only the model that runs first pays it. A fake device memory stands in for CUDA's here: the first
    # training step's peak is 100 GiB, every later one's 1 GiB.
    memory = fake_peak_memory
    steps = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 1000)

        def forward(self, x):
            if self.training:
                steps.append(None)
                memory["peak"] = max(memory["peak"], (100 if len(steps) == 1 else 1) * 2.0**30)
            return self.fc(x.mean((2, 3)))

    monkeypatch.setattr(bench, "make_model", lambda name: Probe())
    for warmup in (0, 2):
        steps.clear()
        row = bench.bench_model("probe", torch.float32, "NCHW", 2, 5, torch.device("cpu"), warmup, 3)
        assert row.error is None
        assert row.peak_gib == 1.0, f"warmup={warmup}: the peak includes the first step's"
        assert len(steps) == max(1, warmup) + 3  # the warm-up steps (at least one), then the timed ones


def test_models_by_name_include_timms_model_through_fuse():
    """"timm_legacy_xception:fused:BACKEND" is timm's model after xception_ops.fuse: the same parameters, 34 fused
    separable convs on that backend; an unknown name is refused, naming the choices."""
    pytest.importorskip("timm")
    from xception_ops.nn import SeparableConvBN
    plain, fused = bench.make_model("timm_legacy_xception"), bench.make_model("timm_legacy_xception:fused:torch")
    seps = [m for m in fused.modules() if isinstance(m, SeparableConvBN)]
    assert len(seps) == 34 and {m.backend for m in seps} == {"torch"}
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in plain.parameters())
    assert {m.backend for m in bench.make_model("timm_legacy_xception:fused").modules()
            if isinstance(m, SeparableConvBN)} == {"auto"}
    with pytest.raises(ValueError, match="timm_legacy_xception:fused"):
        bench.make_model("resnet50")


def test_models_by_name_frozen():
    """NAME+frozen: the model under xception_ops.nn.freeze, whose inference reuses its folded BatchNorms."""
    from xception_ops.nn import SeparableConvBN
    model = bench.make_model("xception:torch+frozen")
    layers = [m for m in model.modules() if isinstance(m, SeparableConvBN)]
    assert len(layers) == 34 and all(m.frozen for m in layers)
    assert not any(m.frozen for m in bench.make_model("xception:torch").modules() if isinstance(m, SeparableConvBN))


def test_mobilenet_v2_by_name_through_fuse():
    """"mobilenet_v2:fused:BACKEND": torchvision's MobileNet V2 with its 17 dw -> BN -> ReLU6 -> pw -> BN chains
    fused (the mid BatchNorm kept as a child), the same parameters."""
    from xception_ops.nn import SeparableConvBN
    plain, fused = bench.make_model("mobilenet_v2"), bench.make_model("mobilenet_v2:fused:torch")
    seps = [m for m in fused.modules() if isinstance(m, SeparableConvBN)]
    assert len(seps) == 17 and all(m.backend == "torch" and m.mid_bn is not None for m in seps)
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in plain.parameters())


def test_any_timm_model_by_name_through_fuse():
    """"timm:NAME[:fused[:BACKEND]]": a timm model as it is, or through fuse(); timm's aligned Xception-41 fuses all 39
    of its dw -> BN -> pw -> BN chains (not to be taken for our "xception")."""
    from xception_ops.nn import SeparableConvBN
    fused = bench.make_model("timm:xception41:fused:torch")
    seps = [m for m in fused.modules() if isinstance(m, SeparableConvBN)]
    assert len(seps) == 39 and all(m.backend == "torch" and m.mid_bn is not None for m in seps)
    assert type(bench.make_model("timm:xception41")).__name__ == "XceptionAligned"
    for bad in ("timm:xception41:fast", "timm:xception41:fused:cuda:x"):
        with pytest.raises(ValueError, match="timm:NAME"):
            bench.make_model(bad)


def test_profile_model_tool_reports_each_model_and_mode(tmp_path):
    """tools/profile_model.py (host- or GPU-bound whole-model steps) runs on the CPU too: one table per model and
    mode, its first line with the step's wall, issue and operator times, written to --out as printed."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "profile_model.py"
    spec = importlib.util.spec_from_file_location("profile_model", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "profile.txt"
    lines = tool.main(["--models", "xception:torch", "--device", "cpu", "--dtype", "float32", "--batch", "1",
                       "--image", "71", "--warmup", "1", "--steps", "1", "--rows", "3", "--out", str(out)])
    headers = [line for line in lines if line.startswith("===")]
    assert [h.split()[1:3] for h in headers] == [["xception:torch", "train"], ["xception:torch", "infer"]]
    for header in headers:
        assert "ms per step; issue" in header and "in " in header
    assert len(lines) == 2 * (1 + 3)
    assert out.read_text().splitlines() == lines


def test_issue_and_wall_time_each_call_of_the_loop():
    """bench.issue_and_wall_ms runs step(0..steps-1) once each and gives per-call milliseconds, the wall (to the
    device's last work) no less than the host's issue time; on the CPU both are the host clock's."""
    import time

    calls = []
    issue, wall = bench.issue_and_wall_ms(lambda i: (calls.append(i), time.sleep(0.002)), torch.device("cpu"), 5)
    assert calls == [0, 1, 2, 3, 4]
    assert 2.0 <= issue <= wall


@requires_ext
def test_op_overhead_tool_times_every_case_on_the_device(tmp_path):
    """tools/op_overhead.py: every case runs on the named device and backend (here the CPU's reference ops),
    and the timer gives the microseconds per call of a callable."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "op_overhead.py"
    spec = importlib.util.spec_from_file_location("op_overhead", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    cases = tool.cases(torch.device("cpu"), "torch")
    assert len(cases) >= 15
    for name, fn in cases.items():
        fn()  # each runs once (forward, backward, module steps)
    calls = []
    wall, cpu = tool.timed(lambda: calls.append(1), 40, rounds=4)
    assert len(calls) == 20 + 40 and wall >= 0 and cpu >= 0


def test_host_profile_tool_profiles_a_model_step_and_a_layer_pass():
    """tools/host_profile.py: the uninstrumented issue and wall times, then cProfile's tables, for a model's
    training step and for one layer's pass (here on the CPU's reference ops)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "host_profile.py"
    spec = importlib.util.spec_from_file_location("host_profile", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    text = tool.main(["--model", "xception:torch", "--device", "cpu", "--dtype", "float32", "--image", "71",
                      "--steps", "1", "--rows", "40"])
    assert text.startswith("xception:torch on cpu: issue ") and "ms per call" in text
    assert "Ordered by: internal time" in text and "Ordered by: cumulative time" in text
    assert "separable_conv2d" in text  # the fused layers' op shows up among the entry points
    text = tool.main(["--layer", "8,16,9", "--impl", "xo:torch", "--device", "cpu", "--dtype", "float32",
                      "--batch", "2", "--steps", "2", "--rows", "5"])
    assert text.startswith("8,16,9 on cpu: issue ")


def test_default_backends_leave_the_reference_op_out_on_a_gpu():
    """Unnamed, the timed backends are every usable one; on a GPU not the reference op, which is the tests' oracle
    and the fallback path, not a contender (a quarter of a full run's configurations)."""
    statuses = [backends.BackendStatus("torch", True, True, ""), backends.BackendStatus("cuda", True, True, ""),
                backends.BackendStatus("triton", True, False, "no triton")]
    assert bench.default_backends(torch.device("cuda"), statuses) == ["cuda"]
    assert bench.default_backends(torch.device("cpu"), statuses) == ["torch", "cuda"]


@pytest.mark.parametrize("asked,impl,compiled", [(True, "compile", True), ("default", "compile", True),
                                                 ("reduce-overhead", "compile:reduce-overhead", "reduce-overhead")])
def test_compile_modes_reach_torch_compile(monkeypatch, asked, impl, compiled):
    """--compile [MODE]: the eager layers and the models go through torch.compile in that mode (recorded here, the
    callable returned as it is: inductor takes minutes on this CPU); the rows say which."""
    modes = []
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **kw: modes.append(mode) or fn)
    report = bench.run(device="cpu", backends_=[], dtypes=["float32"], layouts=["NCHW"], passes=["inference"],
                       shapes=[(4, 6, 5, 1)], ops=["separable"], compile_=asked, models=["xception"], image=71,
                       warmup=0, reps=1, progress=lambda line: None)
    assert [r["impl"] for r in report["layers"]] == ["eager", impl]
    assert [r["compiled"] for r in report["models"]] == [False, compiled]
    want = None if compiled is True else compiled
    assert modes == [want, want]  # one layer, one model
    assert all(r["error"] is None for r in report["layers"] + report["models"])


def test_cuda_graph_modes_report_the_peak_of_the_recording_step(monkeypatch, fake_peak_memory):
    """A model compiled in a mode that replays CUDA graphs allocates its graphs' pool while recording them (its
    second step: CUDA graph trees run a function once eagerly first) and nothing while replaying: its peak spans
    the warm-up steps after the first, so it includes the recording and still leaves out the first step's cuDNN
    trials. An eager row's peak is the timed steps'. Fake device memory: the first step peaks at 100 GiB, the
    second at 5, later ones at 1 (a graph mode's replays allocate nothing: 0)."""
    from xception_ops import compiling

    assert compiling.uses_cuda_graphs("reduce-overhead") and compiling.uses_cuda_graphs("max-autotune")
    assert not any(compiling.uses_cuda_graphs(m) for m in (False, True, "default", "max-autotune-no-cudagraphs"))
    memory, steps = fake_peak_memory, []

    class Probe(torch.nn.Module):
        def __init__(self, graphs):
            super().__init__()
            self.fc, self.graphs = torch.nn.Linear(3, 1000), graphs

        def forward(self, x):
            if self.training:
                steps.append(None)
                n = len(steps)
                gib = 100 if n == 1 else 5 if n == 2 else 0 if self.graphs else 1
                memory["peak"] = max(memory["peak"], gib * 2.0**30)
            return self.fc(x.mean((2, 3)))

    monkeypatch.setattr(torch, "compile", lambda model, mode=None: model)  # the eager model under each label
    for compiled, warmup, want_gib, want_steps in [(False, 3, 1.0, 3), ("reduce-overhead", 3, 5.0, 3),
                                                   ("reduce-overhead", 0, 5.0, 2), ("max-autotune", 1, 5.0, 2)]:
        steps.clear()
        monkeypatch.setattr(bench, "make_model", lambda name: Probe(compiled is not False))
        row = bench.bench_model("probe", torch.float32, "NCHW", 2, 5, torch.device("cpu"), warmup, 2, compiled)
        assert row.error is None
        assert row.peak_gib == want_gib, (compiled, warmup)
        assert len(steps) == want_steps + 2, (compiled, warmup)  # the warm-up (2 at least with graphs), timed 2


def test_unknown_compile_mode_is_refused_before_anything_runs():
    with pytest.raises(ValueError, match="unknown compile mode 'fastest'"):
        bench.run(device="cpu", backends_=[], compile_="fastest", models=[], progress=lambda line: None)
    args = cli.build_parser().parse_args(["bench", "--compile"])
    assert args.compile == "default"
    assert cli.build_parser().parse_args(["bench", "--compile", "max-autotune"]).compile == "max-autotune"


def test_pool_rows_time_xceptions_pools_on_each_backend(tmp_path):
    """--ops pool: Xception's four max pools (or the given shapes' C_in), eager against the package's backends, with
    their bytes: x and the pooled values, the one-byte argmax codes when training, and the backward's traffic."""
    report = bench.run(device="cpu", backends_=["torch"], dtypes=["float32"], layouts=["NHWC"],
                       passes=["inference", "training"], scale=0.05, ops=["pool"], models=False, warmup=0, reps=1,
                       progress=lambda line: None)
    rows = report["layers"]
    assert {(r["cin"], r["hw"]) for r in rows} == {(c, max(3, round(hw * 0.05))) for c, hw in bench.XCEPTION_POOLS}
    assert {r["impl"] for r in rows} == {"eager", "xo:torch"} and all(r["error"] is None for r in rows)
    assert all(r["op"] == "pool" and r["cout"] == r["cin"] for r in rows)
    row = next(r for r in rows if r["cin"] == 128 and r["pass_"] == "inference")
    hw, pooled_hw = row["hw"], (row["hw"] + 1) // 2
    assert row["min_bytes"] == row["batch"] * 128 * (hw * hw + pooled_hw * pooled_hw) * 4
    training = next(r for r in rows if r["cin"] == 128 and r["pass_"] == "training")
    pooled = row["batch"] * 128 * pooled_hw * pooled_hw
    assert training["min_bytes"] == 2 * row["min_bytes"] + 2 * pooled
    assert all(r["flops"] == 0 and r["floor_ms"] > 0 for r in rows)  # bytes only: off the roofline
    # The tables show them; a roofline of pools alone has nothing to plot.
    assert bench_report.write_outputs(report, tmp_path) == ["bench.json", "bench.md"]
    assert "pool" in (tmp_path / "bench.md").read_text()
    given = bench.run(device="cpu", backends_=["torch"], dtypes=["float32"], layouts=["NCHW"], passes=["forward"],
                      shapes=[(3, 4, 9, 1)], ops=["pool", "depthwise"], models=False, warmup=0, reps=1,
                      progress=lambda line: None)
    assert [(r["op"], r["cin"], r["cout"]) for r in given["layers"] if r["impl"] == "eager"] == [
        ("depthwise", 3, 4), ("pool", 3, 3)]


def test_bnpool_rows_time_the_strided_blocks_tail(tmp_path):
    """--ops bnpool: a BatchNorm with known statistics, the max pool and the shortcut add; eager's three ops against
    the package's (one pass on a kernel backend), the same values; its bytes add the shortcut's read to the pool's,
    and the backward's read of x for the gradient of scale."""
    report = bench.run(device="cpu", backends_=["torch"], dtypes=["float32"], layouts=["NHWC"],
                       passes=["inference", "training"], scale=0.05, ops=["bnpool", "pool"], models=False, warmup=0,
                       reps=1, progress=lambda line: None)
    rows = [r for r in report["layers"] if r["op"] == "bnpool"]
    assert len(rows) == 2 * 2 * len(bench.XCEPTION_POOLS) and all(r["error"] is None for r in rows)
    pool = {(r["cin"], r["pass_"], r["impl"]): r["min_bytes"] for r in report["layers"] if r["op"] == "pool"}
    for r in rows:
        hw, pooled_hw = r["hw"], (r["hw"] + 1) // 2
        pooled, pixels = r["batch"] * r["cin"] * pooled_hw ** 2, r["batch"] * r["cin"] * hw * hw
        extra = pooled * 4 + (pixels * 4 if r["pass_"] == "training" else 0)
        assert r["min_bytes"] == pool[(r["cin"], r["pass_"], r["impl"])] + extra
    # Both impls compute the same tail (the same scale, shift and shortcut: drawn after the same seed).
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    outs = []
    for impl in ("eager", "xo:torch"):
        torch.manual_seed(0)
        outs.append(bench._bn_pool_fn(impl, 8, 9, 2, False, torch.device("cpu"), torch.float32,
                                      torch.channels_last)[0](x))
    assert outs[0].shape == (2, 8, 5, 5) and torch.equal(outs[0], outs[1])


def test_op_census_counts_a_cuda_training_step_without_a_gpu():
    """tools/op_census.py on fake CUDA tensors: the model on backend "cuda" dispatches one separable conv and one
    finalize op (with the running-statistics update and the batch count in it) per fused layer, its four pools on
    the package's op, and its backward graph holds a node per parameter."""
    import importlib.util
    from pathlib import Path

    from xception_ops import _library

    if _library.EXTENSION is None or not _library.EXTENSION.WITH_CUDA:
        pytest.skip("needs the library built with its CUDA kernels (backend 'cuda' must resolve)")
    path = Path(__file__).resolve().parents[1] / "tools" / "op_census.py"
    spec = importlib.util.spec_from_file_location("op_census", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    ops, nodes = tool.census("xception:cuda", torch.bfloat16, "NHWC", 2, 71)
    assert ops["xception_ops::separable_conv2d"] == 34 and ops["xception_ops::batch_norm_finalize"] == 34
    assert ops["xception_ops::max_pool2d"] == 4
    assert ops["xception_ops::batch_norm_update_stats"] == 0
    assert ops["aten::add_"] == 6  # the six nn.BatchNorm2d's own counters (stem and shortcuts)
    # The shortcuts: the pooled blocks' join their pool's pass (with the block's last BatchNorm), the middle flow's
    # their scale_shift pass (8 calls; the exit flow's conv4 makes the ninth, with its ReLU: conv3's goes to conv4's
    # prologue).
    assert ops["aten::add"] == 0 and ops["xception_ops::scale_shift"] == 9
    assert nodes["torch::autograd::AccumulateGrad"] == 156
    # Inference folds each layer's BatchNorm at every call (two products each), unless the model is frozen
    # (xception_ops.nn.freeze): then the folds of the first call are reused.
    ops, nodes = tool.census("xception:cuda", torch.bfloat16, "NHWC", 2, 71, training=False)
    assert ops["xception_ops::separable_conv2d"] == 34 and ops["aten::mul"] == 68 and not nodes
    ops, nodes = tool.census("xception:cuda", torch.bfloat16, "NHWC", 2, 71, training=False, frozen=True)
    assert ops["xception_ops::separable_conv2d"] == 34 and ops["aten::mul"] == 0 and not nodes


@pytest.mark.parametrize("op", ["separable", "depthwise", "bnpool"])
@pytest.mark.parametrize("pass_", ["training", "backward"])
def test_backward_passes_form_gradients_without_accumulating_them(op, pass_):
    """A layer's backward pass hands x's gradient on and writes its parameters' afresh, as in a training step:
    no AccumulateGrad node runs (`.backward()` added each pass's gradient into the last one's `.grad`, an extra
    add of x's size per pass that no training step has). The engine still enters those nodes to capture what
    torch.autograd.grad returns ("evaluate_function: ..."), but runs none ("torch::autograd::AccumulateGrad")."""
    run = bench.layer_runner(op, "eager", 4, 6, 5, 2, torch.float32, "NCHW", pass_, torch.device("cpu"))
    run(0)  # a first pass: with `.backward()`, the later ones would add into the .grad it leaves
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run(1)
        run(0)
    names = [e.name for e in prof.events()]
    assert any("Backward" in n for n in names), "the pass runs a backward"
    assert "torch::autograd::AccumulateGrad" not in names
