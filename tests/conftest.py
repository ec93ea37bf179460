"""Shared test helpers. GPU tests carry the `gpu` marker and are skipped (only) where no CUDA GPU is visible."""

import atexit
import contextlib
import os
import random
import shutil
import tempfile
import zlib

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. Triton reads the variable when a
# kernel is defined, so it is set before any test module imports xception_ops.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The Triton autotuner's choices go to a file of this test process, not the user's cache (autotune.cache_path).
if "XCEPTION_OPS_TRITON_AUTOTUNE_CACHE" not in os.environ:
    _autotune_dir = tempfile.mkdtemp(prefix="xo-autotune-")
    atexit.register(shutil.rmtree, _autotune_dir, ignore_errors=True)
    os.environ["XCEPTION_OPS_TRITON_AUTOTUNE_CACHE"] = os.path.join(_autotune_dir, "triton-autotune.json")

from xception_ops import _library  # noqa: E402  (after TRITON_INTERPRET is set)

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_MARKS = [pytest.mark.gpu, requires_gpu]  # a GPU test module's pytestmark
# Tests of the compiled operators themselves (torch.ops.xception_ops): skipped under XCEPTION_OPS_SKIP_EXT=1.
requires_ext = pytest.mark.skipif(_library.EXTENSION is None, reason="the compiled library is not loaded")


def require_cuda_kernel(op: str):
    """For a module that tests the CUDA kernel of xception_ops.<op>: the compiled library, or skip the module."""
    try:
        import xception_ops._C as ext  # importing runs the op registrations
    except Exception as e:  # noqa: BLE001  (any failure to load means there is nothing to test)
        pytest.skip(f"xception_ops._C does not import: {e!r}", allow_module_level=True)
    if not getattr(ext, "WITH_CUDA", 0) or f"xception_ops.{op}" not in ext.CUDA_OPS:
        pytest.skip(f"xception_ops._C was built without the CUDA kernel of {op}", allow_module_level=True)
    return ext


def poison(shape, dtype, device="cuda"):
    """Leaves a freed NaN block of this size in the caching allocator: the next allocation of it gets NaNs, so an
    element a kernel forgets to write shows up."""
    t = torch.full(shape, float("nan"), device=device, dtype=dtype)
    del t


@contextlib.contextmanager
def record_op_calls(name: str):
    """Records the arguments of every call of torch.ops.xception_ops.<name> made inside the block, from Python or
    from C++ (the autograd kernels' backward calls): a dispatch mode sees each call below autograd. Yields the list
    the calls go to."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls: list[tuple] = []
    wanted = f"xception_ops::{name}"

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name == wanted:
                calls.append(tuple(args) + tuple((kwargs or {}).values()))
            return func(*args, **(kwargs or {}))

    with Recorder():
        yield calls


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on a CPU")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64; NaN anywhere gives NaN (which fails every `<=` check)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("nan")
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff / denom if denom > 0 else diff


# Fresh random inputs on every run; XO_TEST_SEED=<n> replays a run (the seed is printed in the header).
BASE_SEED = int(os.environ.get("XO_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"xception_ops test seed: XO_TEST_SEED={BASE_SEED}"


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    seed = (BASE_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31
    torch.manual_seed(seed)
    random.seed(seed)


def check_compiled_matches_eager(model, x, tol):
    """torch.compile(fullgraph=True) of `model` (aot_eager: graph capture and autograd, no code generation) runs
    without graph breaks and matches eager, in training (with its backward) and in inference."""
    import copy

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for training in (True, False):
        model.train(training)
        eager = copy.deepcopy(model)  # before the compiled call updates the running statistics
        out = compiled(x)
        assert relative_error(out, eager(x)) <= tol
        if training:
            out.sum().backward()
            assert model.conv3.pointwise.weight.grad is not None
