"""The Triton autotuner's choices: timed once per shape, kept in memory and in a file that other processes read
(autotune.cache_path()). Pure Python: the timing is replaced by given numbers, so no GPU or Triton launch runs."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
from xception_ops.triton import autotune  # noqa: E402
from xception_ops.triton.autotune import Config  # noqa: E402

from .conftest import requires_gpu  # noqa: E402

CONFIGS = (Config(32, 64), Config(16, 64), Config(64, 32))
KEY = ((torch.Size([2, 8, 9, 9]), (648, 1, 72, 8), torch.bfloat16, 0), (1, 1), True, None)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tuner(monkeypatch, tmp_path):
    """The autotuner as on a GPU, its cache file in tmp_path, timings from `times` (config -> ms), each timing
    recorded in `timed`."""
    monkeypatch.setattr(autotune, "interpreting", lambda: False)
    monkeypatch.delenv("XCEPTION_OPS_TRITON_AUTOTUNE", raising=False)
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "cache" / "tune.json"))
    monkeypatch.setattr(autotune, "_context", lambda index: f"Fake GPU {index}|triton x|sources y")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    state = {"times": {CONFIGS[0]: 3.0, CONFIGS[1]: 1.0, CONFIGS[2]: 2.0}, "timed": []}

    def fake_time(run, cfg):
        state["timed"].append(cfg)
        return state["times"][cfg]

    monkeypatch.setattr(autotune, "_time", fake_time)
    autotune.cache_clear()
    yield state
    autotune.cache_clear()


def entries(path) -> dict:
    return json.loads(Path(path).read_text())["entries"]


def test_a_choice_is_timed_once_and_read_back_by_another_process(tuner, tmp_path):
    assert autotune.choose("op", KEY, CONFIGS, run=None) == CONFIGS[1]
    assert tuner["timed"] == list(CONFIGS)
    assert autotune.choose("op", KEY, CONFIGS, run=None) == CONFIGS[1]  # from memory
    assert len(tuner["timed"]) == 3
    (name, fields), = entries(autotune.cache_path()).items()
    assert name.startswith("Fake GPU 0|") and "|op|" in name and Config(**fields) == CONFIGS[1]

    # A new process with the same setting reads the choice instead of timing (its timing raises).
    script = textwrap.dedent(f"""
        import torch
        from xception_ops.triton import autotune
        from xception_ops.triton.autotune import Config
        autotune.interpreting = lambda: False
        autotune._context = lambda index: "Fake GPU " + str(index) + "|triton x|sources y"
        torch.cuda.current_device = lambda: 0
        def no_timing(run, cfg):
            raise AssertionError("timed")
        autotune._time = no_timing
        print(autotune.choose("op", {KEY!r}, {CONFIGS!r}, run=None))
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XCEPTION_OPS_TRITON_AUTOTUNE", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == repr(CONFIGS[1])


def test_entries_of_another_setting_or_config_list_are_timed_again(tuner, monkeypatch):
    autotune.choose("op", KEY, CONFIGS, run=None)
    path = autotune.cache_path()
    # Another GPU model / versions / sources: timed anew, both entries kept.
    autotune.cache_clear()
    monkeypatch.setattr(autotune, "_context", lambda index: "Other GPU|triton x|sources y")
    tuner["times"][CONFIGS[2]] = 0.5
    assert autotune.choose("op", KEY, CONFIGS, run=None) == CONFIGS[2]
    assert len(tuner["timed"]) == 6 and len(entries(path)) == 2
    # A cached config no longer in the op's list (the lists changed, or a form is forced): timed anew.
    autotune.cache_clear()
    assert autotune.choose("op", KEY, CONFIGS[:2], run=None) == CONFIGS[1]
    assert len(tuner["timed"]) == 8
    # Another op or key: timed.
    autotune.cache_clear()
    autotune.choose("other op", KEY, CONFIGS, run=None)
    autotune.choose("op", KEY[:-1], CONFIGS, run=None)
    assert len(tuner["timed"]) == 14 and len(entries(path)) == 4


@pytest.mark.parametrize("content", ["{not json", "[]", '{"format": 0, "entries": {}}', '{"format": 1}'])
def test_an_unreadable_cache_file_is_replaced(tuner, content):
    path = autotune.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(content)
    assert autotune.choose("op", KEY, CONFIGS, run=None) == CONFIGS[1]
    assert len(tuner["timed"]) == 3 and len(entries(path)) == 1
    assert not [p for p in path.parent.iterdir() if p != path]  # no temporary file left


def test_an_entry_with_unknown_fields_is_timed_again(tuner):
    autotune.choose("op", KEY, CONFIGS, run=None)
    path = autotune.cache_path()
    data = json.loads(path.read_text())
    (name, fields), = data["entries"].items()
    data["entries"][name] = dict(fields, BLOCK_Q=4)
    path.write_text(json.dumps(data))
    autotune.cache_clear()
    assert autotune.choose("op", KEY, CONFIGS, run=None) == CONFIGS[1]
    assert len(tuner["timed"]) == 6


def test_processes_writing_at_once_keep_each_others_entries(tuner):
    """Each write reads the file, adds its entry and replaces the file in one rename: a process that loaded the
    file before another wrote does not drop the other's entry."""
    autotune.choose("op", KEY, CONFIGS, run=None)  # this process has read the file (one entry)
    other = autotune._read(autotune.cache_path())
    other["written by another process"] = CONFIGS[0]._asdict()
    Path(autotune.cache_path()).write_text(json.dumps({"format": 1, "entries": other}))
    autotune.choose("op 2", KEY, CONFIGS, run=None)
    assert set(entries(autotune.cache_path())) >= {"written by another process"} and \
        len(entries(autotune.cache_path())) == 3


@pytest.mark.parametrize("value", ["0", "off", ""])
def test_the_file_can_be_turned_off(tuner, monkeypatch, tmp_path, value):
    monkeypatch.setenv(autotune.CACHE_ENV, value)
    assert autotune.cache_path() is None
    assert autotune.choose("op", KEY, CONFIGS, run=None) == CONFIGS[1]
    assert autotune.choose("op", KEY, CONFIGS, run=None) == CONFIGS[1]
    assert len(tuner["timed"]) == 3
    assert not any(tmp_path.rglob("*.json"))


def test_the_default_file_is_under_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(autotune.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert autotune.cache_path() == tmp_path / "xception_ops" / "triton-autotune.json"
    monkeypatch.setenv(autotune.CACHE_ENV, "~/elsewhere.json")
    assert autotune.cache_path() == Path.home() / "elsewhere.json"


def test_an_unwritable_cache_warns_and_the_choice_stands(tuner, monkeypatch, tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv(autotune.CACHE_ENV, str(blocker / "tune.json"))  # its parent is a file
    with pytest.warns(RuntimeWarning, match="cannot write the Triton autotune cache"):
        assert autotune.choose("op", KEY, CONFIGS, run=None) == CONFIGS[1]
    assert autotune.choose("op", KEY, CONFIGS, run=None) == CONFIGS[1]
    assert len(tuner["timed"]) == 3


def test_nothing_is_timed_while_a_cuda_graph_is_captured(tuner, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert autotune.choose("op", KEY, CONFIGS, run=None) == CONFIGS[0]  # the default, not remembered
    assert tuner["timed"] == [] and not autotune.cache_path().exists()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert autotune.choose("op", KEY, CONFIGS, run=None) == CONFIGS[1]  # timed at the next call outside
    assert len(tuner["timed"]) == 3
    # A choice already made (in memory or in the file) is taken during a capture.
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert autotune.choose("op", KEY, CONFIGS, run=None) == CONFIGS[1]
    autotune.cache_clear()
    assert autotune.choose("op", KEY, CONFIGS, run=None) == CONFIGS[1]
    assert len(tuner["timed"]) == 3


def test_without_timing_the_first_config_and_no_file(tuner, monkeypatch, tmp_path):
    monkeypatch.setenv("XCEPTION_OPS_TRITON_AUTOTUNE", "0")
    assert autotune.choose("op", KEY, CONFIGS, run=None) == CONFIGS[0]
    assert tuner["timed"] == [] and not any(tmp_path.rglob("*.json"))


def test_the_sources_digest_changes_with_the_kernels(monkeypatch):
    digest = autotune._sources_digest()
    assert len(digest) == 16
    read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes",
                        lambda self: read_bytes(self) + (b"#" if self.name == "kernels.py" else b""))
    autotune._sources_digest.cache_clear()
    try:
        assert autotune._sources_digest() != digest
    finally:
        monkeypatch.undo()
        autotune._sources_digest.cache_clear()
    assert autotune._sources_digest() == digest


@pytest.mark.gpu
@requires_gpu
def test_the_context_names_the_gpu_and_the_versions():
    import triton
    context = autotune._context(torch.cuda.current_device())
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    assert context.startswith(f"{props.name}|sm_{props.major}{props.minor}|")
    assert f"triton {triton.__version__}" in context and f"torch {torch.__version__}" in context
    assert context.endswith(autotune._sources_digest())
