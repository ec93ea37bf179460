"""The measured table behind backend="auto" (xception_ops/autotable.py): building it from benchmark reports,
merging, lookup, the choice among backends, the CLI, and the table shipped with the package."""

import json

import pytest
import torch

from xception_ops import autotable, backend, cli

from .conftest import requires_ext


def report(rows, device="cuda", sm="9.0"):
    return {"env": {"device": device, "sm": sm, "gpu": "Test GPU", "date": "2026-11-26T00:00:00"}, "layers": rows}


def row(op, impl, ms, pass_="inference", cin=64, cout=128, hw=147, dtype="bfloat16", layout="NHWC", error=None):
    return dict(op=op, impl=impl, median_ms=ms, pass_=pass_, cin=cin, cout=cout, hw=hw, dtype=dtype, layout=layout,
                error=error)


@pytest.fixture
def table_file(tmp_path, monkeypatch):
    """Points the package at a table file of the test's own (and forgets cached lookups around the test)."""
    path = tmp_path / "table.json"
    monkeypatch.setenv(autotable.TABLE_ENV, str(path))
    autotable.clear_cache()
    yield path
    autotable.clear_cache()


def test_the_faster_of_a_configurations_two_timings_counts():
    """A slow first timing (interference) does not hand "auto" to a kernel that is slower than PyTorch."""
    noisy = dict(row("separable", "eager", 1.13), median2_ms=0.55)
    (entry,) = autotable.entries_from_report(report([noisy, dict(row("separable", "xo:cuda", 0.69), median2_ms=0.67)]))
    assert entry.eager_ms == pytest.approx(0.55) and entry.speedup["cuda"] == pytest.approx(0.55 / 0.67)
    (entry,) = autotable.entries_from_report(report([row("separable", "eager", 1.0), row("separable", "xo:cuda", 0.5)]))
    assert entry.speedup["cuda"] == pytest.approx(2.0)  # reports without a second timing


def test_entries_are_speedups_over_pytorch_in_the_same_run():
    entries = autotable.entries_from_report(report([
        row("separable", "eager", 1.0), row("separable", "xo:cuda", 0.5), row("separable", "xo:triton", 2.0),
        row("separable", "xo:torch", 3.0),      # the reference operator is not a candidate
        row("separable", "compile", 0.1),       # nor is torch.compile
        row("separable", "eager", 1.0, pass_="forward"), row("separable", "xo:cuda", 0.1, pass_="forward"),
        row("depthwise", "eager", 0.2, cin=256, cout=728, hw=37), row("depthwise", "xo:cuda", 0.4, cin=256, cout=728,
                                                                      hw=37),
        row("depthwise", "xo:triton", float("nan"), cin=256, cout=728, hw=37),
        row("separable", "eager", 1.0, hw=19), row("separable", "xo:cuda", None, hw=19, error="boom"),
    ]))
    by_op = {e.op: e for e in entries}
    assert len(entries) == 2  # the forward pass and the configuration whose only kernel failed make none
    sep = by_op["separable_conv2d"]
    assert (sep.arch, sep.dtype, sep.layout, sep.pass_, sep.cin, sep.cout, sep.hw) == \
        ("sm_90", "bfloat16", "NHWC", "inference", 64, 128, 147)
    assert sep.speedup == {"cuda": 2.0, "triton": 0.5} and sep.eager_ms == 1.0
    assert sep.winner == "cuda" and sep.source == "Test GPU, 2026-11-26"
    dw = by_op["depthwise_conv2d"]
    assert (dw.cin, dw.cout) == (256, 256)  # the depthwise op keeps its channel count
    assert dw.speedup == {"cuda": 0.5} and dw.winner == "torch"


def test_a_cpu_report_makes_no_table():
    with pytest.raises(ValueError, match="CUDA GPU"):
        autotable.entries_from_report(report([row("separable", "eager", 1.0)], device="cpu", sm=None))


def test_noise_is_not_a_win():
    e = autotable.Entry("sm_90", "separable_conv2d", "bfloat16", "NHWC", "inference", 64, 128, 147, 1.0,
                        {"cuda": autotable.MIN_SPEEDUP - 0.02, "triton": 0.5})
    assert e.winner == "torch" and e.ranked() == []


def test_merge_keeps_each_backends_newest_speedup(tmp_path):
    key = ("sm_90", "separable_conv2d", "float32", "NCHW", "training", 728, 728, 19)
    old = [autotable.Entry(*key, eager_ms=1.0, speedup={"cuda": 0.5, "triton": 1.5}, source="A")]
    new = [autotable.Entry(*key, eager_ms=0.9, speedup={"cuda": 2.0}, source="B"),
           autotable.Entry(*key[:5], 64, 128, 147, eager_ms=0.4, speedup={"triton": 0.3}, source="B")]
    merged = autotable.merge(old, new)
    assert len(merged) == 2
    first = next(e for e in merged if e.key == key)
    assert first.speedup == {"cuda": 2.0, "triton": 1.5} and first.source == "A; B" and first.winner == "cuda"
    path = tmp_path / "t.json"
    autotable.save(merged, path)
    assert autotable.read(path) == merged


def test_read_rejects_an_unknown_version(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"version": 99, "entries": []}))
    with pytest.raises(ValueError, match="version"):
        autotable.read(path)


def test_pool_rows_make_max_pool_entries(table_file):
    """`bench --ops pool` on a GPU feeds the table too: backend="auto" then takes the pooling kernels where they
    beat PyTorch's pools (xception_ops.pooling resolves "auto" through it, channels C and the input's size)."""
    (entry,) = autotable.entries_from_report(report([row("pool", "eager", 0.30, cin=128, cout=128, hw=147),
                                                     row("pool", "xo:cuda", 0.06, cin=128, cout=128, hw=147)]))
    assert (entry.op, entry.cin, entry.cout, entry.hw, entry.winner) == ("max_pool2d", 128, 128, 147, "cuda")
    autotable.save([entry], table_file)
    assert autotable.lookup("sm_90", "max_pool2d", "bfloat16", "NHWC", "inference", 256, 256, 74).hw == 147


def test_lookup_takes_the_nearest_shape_of_the_same_configuration(table_file):
    base = ("sm_90", "separable_conv2d", "bfloat16", "NHWC", "inference")
    autotable.save([autotable.Entry(*base, 64, 128, 147, 1.0, {"cuda": 2.0}),
                    autotable.Entry(*base, 728, 728, 19, 1.0, {"triton": 3.0})], table_file)
    assert autotable.lookup(*base, 700, 700, 20).hw == 19
    assert autotable.lookup(*base, 32, 64, 150).hw == 147
    assert autotable.lookup("sm_90", "separable_conv2d", "bfloat16", "NCHW", "inference", 64, 128, 147) is None
    assert autotable.lookup("sm_80", *base[1:], 64, 128, 147) is None
    assert autotable.lookup(*base[:4], "training", 64, 128, 147) is None


def test_the_choice_skips_backends_that_cannot_run():
    e = autotable.Entry("sm_90", "separable_conv2d", "bfloat16", "NHWC", "inference", 64, 128, 147, 1.0,
                        {"cuda": 3.0, "triton": 2.0}, source="Test GPU, 2026-11-26")
    chosen = backend.choose_from_entry(e, lambda b: True)
    assert chosen.backend == "cuda" and "3.00x" in chosen.reason and "Test GPU" in chosen.reason
    assert backend.choose_from_entry(e, lambda b: b != "cuda").backend == "triton"
    fallback = backend.choose_from_entry(e, lambda b: False)
    assert fallback.backend == "torch" and "cuda 3.00x" in fallback.reason


def test_auto_on_cpu_tensors_is_pytorch(table_file):
    x = torch.randn(1, 4, 5, 5)
    choice = backend.auto_choice("xception_ops.separable_conv2d", x, 8)
    assert choice.backend == "torch" and "cpu" in choice.reason
    assert backend.resolve("auto", "xception_ops.separable_conv2d", x, 8) == "torch"


def test_cli_builds_a_table_from_reports(tmp_path, capsys):
    r1 = tmp_path / "a.json"
    r1.write_text(json.dumps(report([row("separable", "eager", 1.0), row("separable", "xo:triton", 0.25)])))
    r2 = tmp_path / "b.json"
    r2.write_text(json.dumps(report([row("separable", "eager", 1.0), row("separable", "xo:cuda", 0.5)])))
    out = tmp_path / "table.json"
    assert cli.main(["autotable", str(r1), str(r2), "--out", str(out)]) == 0
    (entry,) = autotable.read(out)
    assert entry.speedup == {"cuda": 2.0, "triton": 4.0} and entry.winner == "triton"
    assert "triton wins 1" in capsys.readouterr().out


def test_cli_refuses_a_cpu_report(tmp_path, capsys):
    r = tmp_path / "cpu.json"
    r.write_text(json.dumps(report([row("separable", "eager", 1.0)], device="cpu", sm=None)))
    assert cli.main(["autotable", str(r), "--out", str(tmp_path / "t.json")]) == 2
    assert "CUDA GPU" in capsys.readouterr().err


def test_the_shipped_table_is_valid():
    entries = autotable.read(autotable.TABLE_PATH)
    assert entries, "the package ships its measurements"
    for e in entries:
        assert e.arch.startswith("sm_") and e.op in autotable.BENCH_OPS.values()
        assert e.dtype in ("float32", "float16", "bfloat16") and e.layout in ("NCHW", "NHWC")
        assert e.pass_ in autotable.PASSES and min(e.cin, e.cout, e.hw) > 0 and e.eager_ms > 0
        assert set(e.speedup) <= {"cuda", "triton"} and all(s > 0 for s in e.speedup.values())


def test_info_reports_the_table(capsys):
    assert cli.main(["info"]) == 0
    assert "auto table:" in capsys.readouterr().out


def test_bench_refuses_auto_table_for_a_cpu_run(tmp_path, capsys):
    assert cli.main(["bench", "--device", "cpu", "--no-models", "--auto-table", str(tmp_path / "t.json")]) == 2
    assert "CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


class CudaInput:
    """What auto_choice reads of a CUDA input, for machines without a GPU: bfloat16, channels_last."""
    device = torch.device("cuda", 0)
    dtype = torch.bfloat16
    shape = (32, 728, 19, 19)

    def dim(self):
        return 4

    def is_contiguous(self, memory_format=torch.contiguous_format):
        return memory_format == torch.channels_last


@requires_ext
def test_cached_auto_choices_follow_the_table_the_backends_and_the_override(table_file, tmp_path, monkeypatch):
    from xception_ops import _library
    monkeypatch.setitem(backend._ARCHS, 0, "sm_90")
    monkeypatch.setattr(backend, "_cuda_problem", lambda op, device: None)
    monkeypatch.setattr(backend, "_triton_problem",
                        lambda op, device: None if _library.TRITON is not None else "not loaded")
    monkeypatch.setattr(_library, "TRITON", object())  # as if triton had loaded
    monkeypatch.delenv("XCEPTION_OPS_BACKEND", raising=False)
    op, x = "xception_ops.separable_conv2d", CudaInput()

    def table(path, **speedup):
        autotable.save([autotable.Entry("sm_90", "separable_conv2d", "bfloat16", "NHWC", "training", 728, 728, 19,
                                        1.0, speedup, source="Test GPU")], path)

    def choice():
        return backend.auto_choice(op, x, 728, training=True).backend

    table(table_file, cuda=2.0, triton=1.5)
    assert choice() == "cuda" and choice() == "cuda"  # the second from the cache
    assert backend.auto_choice(op, x, 728, training=False).backend == "torch"  # another pass: not measured
    table(table_file, cuda=2.0, triton=3.0)
    autotable.clear_cache()  # a table re-read
    assert choice() == "triton"
    monkeypatch.setattr(_library, "TRITON", None)  # triton gone: the next fastest that can run
    assert choice() == "cuda"
    other = tmp_path / "other.json"
    table(other, cuda=0.5)
    monkeypatch.setenv(autotable.TABLE_ENV, str(other))  # another table file
    assert choice() == "torch"
    monkeypatch.setenv("XCEPTION_OPS_BACKEND", "cuda")  # the override is read on every call, past the cache
    assert backend.resolve("auto", op, x, 728) == "cuda"
    monkeypatch.setenv("XCEPTION_OPS_BACKEND", "auto")
    with torch.enable_grad():
        assert backend.resolve("auto", op, x, 728) == "torch"
