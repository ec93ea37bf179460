"""CPU time per call of the ops and modules (dispatch, the C++ autograd nodes, the modules' Python: argument
normalization, backend choice, BatchNorm bookkeeping), on tensors so small that the kernels cost next to nothing:
what a training step pays per op on top of its kernels.

    OMP_NUM_THREADS=1 python tools/op_overhead.py [--calls 2000] [--only NAME] [--device cuda [--backend cuda]]
    TRITON_INTERPRET=1 python tools/op_overhead.py --backend triton --stub-triton-launches

--stub-triton-launches replaces every Triton kernel launch with a no-op that counts it: what is left is the
package's own host cost around Triton's launcher (argument checks, plans, autotune keys, allocations), on the CPU
through the interpreter's device checks; the launches per call are printed with each case.

Prints microseconds per call, wall (perf_counter) and thread CPU time, each the best of 10 rounds. "fwd" runs with grad enabled (so it includes building
the autograd node), "fwd+bwd" adds `.backward()`; their difference is the backward's share. On a GPU
(--device cuda) the calls' kernels are tiny and queued behind the host: the times are the host's cost of issuing
them (each round ends with a synchronize), the part of a training step that CUDA graphs remove.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import xception_ops
from xception_ops import batchnorm
from xception_ops.bench import synchronize
from xception_ops.nn import SeparableConvBN

OPS = torch.ops.xception_ops


def timed(fn, calls: int, rounds: int = 10, device: torch.device = torch.device("cpu")) -> tuple[float, float]:
    """(wall, thread CPU) microseconds per call: the best of `rounds` rounds of calls / rounds calls each (the
    best, not the median: on a shared machine other processes only ever add time)."""
    for _ in range(max(calls // 10, 20)):
        fn()
    per_round = max(calls // rounds, 1)
    wall, cpu = [], []
    for _ in range(rounds):
        synchronize(device)
        start, start_cpu = time.perf_counter(), time.thread_time()
        for _ in range(per_round):
            fn()
        synchronize(device)
        cpu.append((time.thread_time() - start_cpu) / per_round * 1e6)
        wall.append((time.perf_counter() - start) / per_round * 1e6)
    return min(wall), min(cpu)


def cases(device: torch.device = torch.device("cpu"), backend: str = "torch"):
    on = dict(device=device)
    n, c, hw = 1, 8, 5
    x = torch.randn(n, c, hw, hw, requires_grad=True, **on)
    dw = torch.randn(c, 1, 3, 3, requires_grad=True, **on)
    pw = torch.randn(c, c, 1, 1, requires_grad=True, **on)
    in_scale = torch.rand(c, requires_grad=True, **on)
    in_shift = torch.randn(c, requires_grad=True, **on)
    conv = ([1, 1], [1, 1, 1, 1], [1, 1])

    def sep_op():
        return OPS.separable_conv2d(x, dw, pw, in_scale, in_shift, True, *conv, "none", None, None, None, None,
                                    False, None, True, backend)

    def sep_fwd():
        sep_op()

    def sep_fwd_bwd():
        out, total, total_sq = sep_op()
        out.sum().backward()

    def sep_nograd():
        with torch.no_grad():
            sep_op()

    class Plain(torch.autograd.Function):
        """The lightest wrapper: the op in forward, its backward op in backward."""

        @staticmethod
        def forward(ctx, x, dw, pw, in_scale, in_shift):
            out, total, total_sq = OPS.separable_conv2d(x, dw, pw, in_scale, in_shift, True, *conv, "none", None,
                                                        None, None, None, False, None, True, backend)
            ctx.save_for_backward(x, dw, pw, in_scale, in_shift)
            return out, total, total_sq

        @staticmethod
        def backward(ctx, grad_out, grad_sum, grad_sumsq):
            x, dw, pw, in_scale, in_shift = ctx.saved_tensors
            grads = OPS.separable_conv2d_backward(grad_out, grad_sum, grad_sumsq, None, x, dw, pw, in_scale,
                                                  in_shift, True, *conv, "none", None, None, None, None, False,
                                                  backend)
            return grads[:5]

    def plain_fwd():
        Plain.apply(x, dw, pw, in_scale, in_shift)

    def plain_fwd_bwd():
        out, _, _ = Plain.apply(x, dw, pw, in_scale, in_shift)
        out.sum().backward()

    y = torch.randn(n, c, hw, hw, requires_grad=True, **on)
    scale, shift = torch.rand(c, requires_grad=True, **on), torch.randn(c, requires_grad=True, **on)

    def ss_fwd():
        OPS.scale_shift(y, scale, shift, True, backend)

    def ss_fwd_bwd():
        OPS.scale_shift(y, scale, shift, True, backend).sum().backward()

    def ss_nograd():
        with torch.no_grad():
            OPS.scale_shift(y, scale, shift, True, backend)

    total = (torch.rand(c, **on) * 25).requires_grad_()
    total_sq = (total.detach() ** 2 / 25 + 25).requires_grad_()
    weight, bias = torch.rand(c, requires_grad=True, **on), torch.randn(c, requires_grad=True, **on)

    def fin_fwd():
        OPS.batch_norm_finalize(total, total_sq, 25, weight, bias, 1e-5, backend)

    def fin_fwd_bwd():
        s, t, _, _ = OPS.batch_norm_finalize(total, total_sq, 25, weight, bias, 1e-5, backend)
        (s.sum() + t.sum()).backward()

    def fin_nograd():
        with torch.no_grad():
            OPS.batch_norm_finalize(total, total_sq, 25, weight, bias, 1e-5, backend)

    rm, rv = torch.zeros(c, **on), torch.ones(c, **on)
    mean, var = torch.randn(c, **on), torch.rand(c, **on)

    def upd_op():
        OPS.batch_norm_update_stats(rm, rv, mean, var, None, 25, 0.1, backend)

    bn = torch.nn.BatchNorm2d(c).to(device)

    def upd_py():
        batchnorm.update_running_stats(bn, mean, var, 25, 0.1, backend=backend)

    def fin_py():
        batchnorm.finalize(total, total_sq, 25, weight, bias, 1e-5, backend)

    layer = SeparableConvBN(c, c, 3, pre_relu=True, backend=backend).to(device).train()
    prev = SeparableConvBN(c, c, 3, backend=backend).to(device).train()
    xin = torch.randn(n, c, hw, hw, **on)

    def module_step():
        layer(xin).sum().backward()

    def module_fwd():
        layer(xin)

    def two_layers_step():  # the second takes the first's BatchNorm in its prologue (PendingBatchNorm)
        layer(prev(xin, defer_bn=True)).sum().backward()

    def module_nograd():
        with torch.no_grad():
            layer(xin)

    plain_bn = torch.nn.BatchNorm2d(c).to(device).train()
    plain_dw = torch.nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False).to(device)
    plain_pw = torch.nn.Conv2d(c, c, 1, bias=False).to(device)

    def torch_layers_step():
        plain_bn(plain_pw(plain_dw(torch.relu(xin)))).sum().backward()

    return {
        "separable_conv2d op fwd": sep_fwd,
        "separable_conv2d op fwd+bwd": sep_fwd_bwd,
        "separable_conv2d op no_grad": sep_nograd,
        "separable plain autograd.Function fwd": plain_fwd,
        "separable plain autograd.Function fwd+bwd": plain_fwd_bwd,
        "scale_shift op fwd": ss_fwd,
        "scale_shift op fwd+bwd": ss_fwd_bwd,
        "scale_shift op no_grad": ss_nograd,
        "batch_norm_finalize op fwd": fin_fwd,
        "batch_norm_finalize op fwd+bwd": fin_fwd_bwd,
        "batch_norm_finalize op no_grad": fin_nograd,
        "batchnorm.finalize (auto) fwd": fin_py,
        "batch_norm_update_stats op": upd_op,
        "batchnorm.update_running_stats (auto)": upd_py,
        "SeparableConvBN train fwd": module_fwd,
        "SeparableConvBN train fwd+bwd": module_step,
        "SeparableConvBN x2 (pending BN) fwd+bwd": two_layers_step,
        "SeparableConvBN no_grad (batch stats)": module_nograd,
        "torch layers relu+dw+pw+bn fwd+bwd": torch_layers_step,
    }


class _StubLaunches:
    """Stands in for the Triton kernels (xception_ops/triton/kernels.py): `kernel[grid](...)` counts and returns."""

    def __init__(self):
        self.launches = 0

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs):
        self.launches += 1


def stub_triton_launches() -> _StubLaunches:
    from xception_ops.triton import launch
    kernels = launch._kernels()
    stub = _StubLaunches()
    for name in dir(kernels):
        if name.endswith("_kernel"):
            setattr(kernels, name, stub)
    launch._kernels = lambda: kernels  # (no re-import when TRITON_INTERPRET changes)
    return stub


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--only", default=None, help="substring of the case names to run")
    parser.add_argument("--device", default="cpu", help="where the tensors live (cuda: the host's cost of issuing)")
    parser.add_argument("--backend", default=None, help="the ops' backend (default: torch on the CPU, else cuda)")
    parser.add_argument("--stub-triton-launches", action="store_true",
                        help="Triton kernel launches become counted no-ops: the package's own host cost around them")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    backend = args.backend or ("torch" if device.type == "cpu" else "cuda")
    stub = stub_triton_launches() if args.stub_triton_launches else None
    print(f"torch {torch.__version__}, xception_ops from {xception_ops.__file__}, {device}, backend {backend}"
          + (", Triton launches stubbed" if stub else ""))
    for name, fn in cases(device, backend).items():
        if args.only and args.only not in name:
            continue
        launches = None
        if stub is not None:
            stub.launches = 0
        try:
            fn()
        except NotImplementedError as e:  # an op this backend has no kernel for (the modules run it elsewhere)
            print(f"{name:45s} n/a: {str(e).splitlines()[0]}", flush=True)
            continue
        if stub is not None:
            launches = stub.launches
        wall, cpu = timed(fn, args.calls, device=device)
        print(f"{name:45s} {wall:8.1f} us wall {cpu:8.1f} us cpu" +
              (f" {launches:3d} launches" if launches is not None else ""), flush=True)


if __name__ == "__main__":
    main()
