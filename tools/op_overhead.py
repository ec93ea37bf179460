"""CPU time per call of the ops and modules (dispatch, the C++ autograd nodes, the modules' Python: argument
normalization, backend choice, BatchNorm bookkeeping), on tensors so small that the kernels cost next to nothing:
what a training step pays per op on top of its kernels.

    OMP_NUM_THREADS=1 python tools/op_overhead.py [--calls 2000] [--only NAME]

Prints microseconds per call, wall (perf_counter) and thread CPU time, each the best of 10 rounds. "fwd" runs with grad enabled (so it includes building
the autograd node), "fwd+bwd" adds `.backward()`; their difference is the backward's share.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import xception_ops
from xception_ops import batchnorm
from xception_ops.nn import SeparableConvBN

OPS = torch.ops.xception_ops


def timed(fn, calls: int, rounds: int = 10) -> tuple[float, float]:
    """(wall, thread CPU) microseconds per call: the best of `rounds` rounds of calls / rounds calls each (the
    best, not the median: on a shared machine other processes only ever add time)."""
    for _ in range(max(calls // 10, 20)):
        fn()
    per_round = max(calls // rounds, 1)
    wall, cpu = [], []
    for _ in range(rounds):
        start, start_cpu = time.perf_counter(), time.thread_time()
        for _ in range(per_round):
            fn()
        cpu.append((time.thread_time() - start_cpu) / per_round * 1e6)
        wall.append((time.perf_counter() - start) / per_round * 1e6)
    return min(wall), min(cpu)


def cases():
    n, c, hw = 1, 8, 5
    x = torch.randn(n, c, hw, hw, requires_grad=True)
    dw = torch.randn(c, 1, 3, 3, requires_grad=True)
    pw = torch.randn(c, c, 1, 1, requires_grad=True)
    in_scale = torch.rand(c, requires_grad=True)
    in_shift = torch.randn(c, requires_grad=True)
    conv = ([1, 1], [1, 1, 1, 1], [1, 1])

    def sep_op():
        return OPS.separable_conv2d(x, dw, pw, in_scale, in_shift, True, *conv, "none", None, None, False, None,
                                    True, "torch")

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
                                                        None, False, None, True, "torch")
            ctx.save_for_backward(x, dw, pw, in_scale, in_shift)
            return out, total, total_sq

        @staticmethod
        def backward(ctx, grad_out, grad_sum, grad_sumsq):
            x, dw, pw, in_scale, in_shift = ctx.saved_tensors
            grads = OPS.separable_conv2d_backward(grad_out, grad_sum, grad_sumsq, None, x, dw, pw, in_scale,
                                                  in_shift, True, *conv, "none", None, None, False, "torch")
            return grads[:5]

    def plain_fwd():
        Plain.apply(x, dw, pw, in_scale, in_shift)

    def plain_fwd_bwd():
        out, _, _ = Plain.apply(x, dw, pw, in_scale, in_shift)
        out.sum().backward()

    y = torch.randn(n, c, hw, hw, requires_grad=True)
    scale, shift = torch.rand(c, requires_grad=True), torch.randn(c, requires_grad=True)

    def ss_fwd():
        OPS.scale_shift(y, scale, shift, True, "torch")

    def ss_fwd_bwd():
        OPS.scale_shift(y, scale, shift, True, "torch").sum().backward()

    def ss_nograd():
        with torch.no_grad():
            OPS.scale_shift(y, scale, shift, True, "torch")

    total = (torch.rand(c) * 25).requires_grad_()
    total_sq = (total.detach() ** 2 / 25 + 25).requires_grad_()
    weight, bias = torch.rand(c, requires_grad=True), torch.randn(c, requires_grad=True)

    def fin_fwd():
        OPS.batch_norm_finalize(total, total_sq, 25, weight, bias, 1e-5, "torch")

    def fin_fwd_bwd():
        s, t, _, _ = OPS.batch_norm_finalize(total, total_sq, 25, weight, bias, 1e-5, "torch")
        (s.sum() + t.sum()).backward()

    def fin_nograd():
        with torch.no_grad():
            OPS.batch_norm_finalize(total, total_sq, 25, weight, bias, 1e-5, "torch")

    rm, rv = torch.zeros(c), torch.ones(c)
    mean, var = torch.randn(c), torch.rand(c)

    def upd_op():
        OPS.batch_norm_update_stats(rm, rv, mean, var, None, 25, 0.1, "torch")

    bn = torch.nn.BatchNorm2d(c)

    def upd_py():
        batchnorm.update_running_stats(bn, mean, var, 25, 0.1)

    def fin_py():
        batchnorm.finalize(total, total_sq, 25, weight, bias, 1e-5)

    layer = SeparableConvBN(c, c, 3, pre_relu=True, backend="torch").train()
    prev = SeparableConvBN(c, c, 3, backend="torch").train()
    xin = torch.randn(n, c, hw, hw)

    def module_step():
        layer(xin).sum().backward()

    def module_fwd():
        layer(xin)

    def two_layers_step():  # the second takes the first's BatchNorm in its prologue (PendingBatchNorm)
        layer(prev(xin, defer_bn=True)).sum().backward()

    def module_nograd():
        with torch.no_grad():
            layer(xin)

    plain_bn = torch.nn.BatchNorm2d(c).train()
    plain_dw = torch.nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
    plain_pw = torch.nn.Conv2d(c, c, 1, bias=False)

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--only", default=None, help="substring of the case names to run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, xception_ops from {xception_ops.__file__}")
    for name, fn in cases().items():
        if args.only and args.only not in name:
            continue
        wall, cpu = timed(fn, args.calls)
        print(f"{name:45s} {wall:8.1f} us wall {cpu:8.1f} us cpu", flush=True)


if __name__ == "__main__":
    main()
