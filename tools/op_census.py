"""What a model's training step asks of the host, counted without a GPU: the operators its forward dispatches and
the nodes of its backward graph, for a model on a backend, on fake CUDA tensors (torch's FakeTensorMode: shapes
and dtypes only, nothing runs, so a CPU-only machine can count the CUDA backend's step).

    python tools/op_census.py [--model xception:cuda] [--dtype bfloat16] [--layout NHWC] [--batch 32] [--image 299]
                              [--pass training|inference]

Each dispatched operator and each backward node costs the host microseconds whatever its size (session 12's
profile on an H100 host: ~8 us per launch, 10-40 us per operator), which is what bounds an eager training step
that the GPU finishes sooner. What an operator of this package does inside (its kernels, cuBLAS calls and
allocations) is not seen: its fake kernel stands in for it.
"""

from __future__ import annotations

import argparse
import collections
import sys
import warnings

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode

import xception_ops.nn
from xception_ops.bench import DTYPES, make_model


class _Count(TorchDispatchMode):
    """Counts the operators dispatched below autograd, by name (prim::, the fake tensors' own queries, left out)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if not name.startswith("prim::"):
            self.counts[name.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def backward_nodes(root) -> collections.Counter[str]:
    """The nodes of the autograd graph reachable from `root`, by type."""
    nodes: collections.Counter[str] = collections.Counter()
    seen, stack = set(), [root]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        nodes[fn.name()] += 1
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return nodes


def census(model_name: str, dtype: torch.dtype, layout: str, batch: int, image: int, training: bool = True,
           frozen: bool = False) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """(forward operators, backward nodes) of one training step (forward and cross-entropy) of the model; with
    training=False, of one inference batch (eval mode, no_grad: no backward nodes); frozen: the model under
    xception_ops.nn.freeze (the folded BatchNorms kept across inference calls)."""
    fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
    with unset_fake_temporarily():
        model = make_model(model_name).to(dtype=dtype, memory_format=fmt).train(training)
        if frozen:
            xception_ops.nn.freeze(model)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, warnings.catch_warnings():
        # (The folded BatchNorm's cache reads data_ptr, which fake tensors warn about: the counts do not depend on it.)
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        # The parameters and buffers as fake CUDA tensors (nn.Module.to cannot swap real ones for fakes).
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    module._parameters[name] = nn.Parameter(mode.from_tensor(p.detach()).to("cuda"), p.requires_grad)
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = mode.from_tensor(b).to("cuda")
        x = torch.empty(batch, 3, image, image, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
        target = torch.zeros(batch, dtype=torch.long, device="cuda")
        with torch.set_grad_enabled(training):
            model(x)  # a first call: what eager calls compute once and reuse (inference's folded BatchNorms)
        counter = _Count()
        with counter, torch.set_grad_enabled(training):
            loss = nn.functional.cross_entropy(model(x), target)
        return counter.counts, backward_nodes(loss.grad_fn) if training else collections.Counter()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="xception:cuda", help="a bench model name (xception:cuda, "
                        "timm_legacy_xception, timm_legacy_xception:fused:cuda, ...)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--layout", choices=["NCHW", "NHWC"], default="NHWC")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image", type=int, default=299)
    parser.add_argument("--pass", dest="pass_", choices=["training", "inference"], default="training")
    parser.add_argument("--frozen", action="store_true", help="the model under xception_ops.nn.freeze")
    args = parser.parse_args(argv)
    training = args.pass_ == "training"
    ops, nodes = census(args.model, DTYPES[args.dtype], args.layout, args.batch, args.image, training,
                        args.frozen)
    what = "one training step's forward" if training else "one inference batch"
    print(f"{args.model} {args.dtype} {args.layout}, batch {args.batch} @{args.image}^2: {what}")
    print(f"  {sum(ops.values())} operators dispatched")
    for name, n in ops.most_common():
        print(f"  {n:6d}  {name}")
    if training:
        print(f"  {sum(nodes.values())} backward nodes")
        for name, n in nodes.most_common():
            print(f"  {n:6d}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
