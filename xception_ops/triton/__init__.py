"""The "triton" backend: Triton kernels (kernels.py, launched by launch.py) registered as private operators.

For each op the backend implements, `xception_ops::triton_<op>` is defined with the public op's schema less its
`backend` argument (derived from the registered schema, so the two cannot drift). The public op's router in
csrc/registration.cpp calls it through the dispatcher for backend="triton"; autograd and the fake kernels stay
those of the public op.

Triton runs on CUDA GPUs of compute capability 8.0 and newer, and on CPU tensors through its interpreter
(TRITON_INTERPRET=1), which is how the tests run it without a GPU.
"""

from __future__ import annotations

import re

import torch

from .. import _library
from . import autotune, launch

IMPLEMENTED: frozenset[str] = frozenset(launch.IMPLEMENTED)
# The ops whose Triton kernels compute float64 in float64 (the pools: comparisons, and the BatchNorm's sums in
# scale's dtype); the others refuse it, as the cuda backend does.
FLOAT64_OPS: frozenset[str] = frozenset({"max_pool2d", "max_pool2d_backward", "max_pool2d_scale_shift_backward"})
MIN_CAPABILITY = (8, 0)

_lib = torch.library.Library("xception_ops", "FRAGMENT")


def device_problem(device: torch.device) -> str | None:
    """Why Triton kernels cannot run on `device`, or None when they can."""
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            return (f"Triton needs a GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer; "
                    f"{torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}")
        return None
    if device.type == "cpu":
        return None if autotune.interpreting() else ("it needs CUDA tensors (or TRITON_INTERPRET=1, which runs Triton's "
                                              "interpreter on the CPU)")
    return f"it cannot run on {device}"


def _private_schema(name: str) -> str:
    """The public op's schema, renamed triton_<name> and without `backend`."""
    schema = str(getattr(torch.ops.xception_ops, name).default._schema)
    schema = schema.split("::", 1)[1]  # drop the namespace
    # `str backend` ends the positional arguments: before `)` or before the keyword-only ones (`, *, ...`).
    without_backend = re.sub(r",\s*str backend(?=\)|,\s*\*)", "", schema, count=1)
    if without_backend == schema:
        raise RuntimeError(f"xception_ops.{name}: schema has no trailing `str backend` argument: {schema}")
    return "triton_" + without_backend


def _register(name: str) -> None:
    fn = getattr(launch, name)
    op = f"xception_ops.{name}"

    def kernel(*args, **kwargs):
        first = next(a for a in args if isinstance(a, torch.Tensor))
        problem = device_problem(first.device)
        if problem is not None:
            raise NotImplementedError(f"{op}: backend 'triton' cannot run: {problem}")
        if first.dtype == torch.float64 and name not in FLOAT64_OPS:
            raise TypeError(f"{op}: the triton backend does not support float64 (its kernels compute in float32); "
                            "use backend=\"torch\" for float64 tensors (or cast to float32, float16 or bfloat16)")
        return fn(*args, **kwargs)

    def fake(*args, **kwargs):
        return _library.FAKES[name](*args, "triton", **kwargs)

    _lib.define(_private_schema(name))
    _lib.impl(f"triton_{name}", kernel, "CPU")
    _lib.impl(f"triton_{name}", kernel, "CUDA")
    torch.library.register_fake(f"xception_ops::triton_{name}", fake, lib=_lib)


for _name in sorted(IMPLEMENTED):
    _register(_name)
