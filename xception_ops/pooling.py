"""Max pooling on the package's kernels: `max_pool2d`, with torch.nn.functional.max_pool2d's arguments (no dilation,
no return_indices).

On backends "cuda" (csrc/kernels/pool.cuh) and "triton" (xception_ops/triton/kernels.py) the forward keeps each
window's argmax as one byte, the index of its tap, where PyTorch keeps an int64 flat index (4x the bytes of a bf16
output), and writes none when no gradient is recorded; the backward gathers each input's gradient from the windows
that picked it, with no zero fill and no atomics. Values, argmax (ties, NaN, -inf) and gradients are PyTorch's, bit
for bit. Backend "torch" is F.max_pool2d itself, on the inputs the kernels take (4-D float x with channels).
`MaxPool2d` is nn.MaxPool2d on them (fuse() swaps it in).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import backend as backends, batchnorm, checks
from .checks import MAX_POOL_MAX_TAPS as MAX_TAPS
from .geometry import pair
from .nn import PendingBatchNorm
from .ops import check_tensor_args

OP = "xception_ops.max_pool2d"


def max_pool2d(x: torch.Tensor, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] | None = None,
               padding: int | tuple[int, int] = 0, ceil_mode: bool = False, *, backend: str = "auto",
               scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
               residual: torch.Tensor | None = None) -> torch.Tensor:
    """`F.max_pool2d(x, kernel_size, stride, padding, ceil_mode=ceil_mode)` on the chosen backend ("auto": the
    CUDA kernel where the compiled library's auto list or the measured table says so, else PyTorch's).

    With `scale` and `shift` (per channel), the pool of `batchnorm.apply_scale_shift(x, scale, shift)`: a training
    BatchNorm's output not yet written (PendingBatchNorm), normalized here as x is read. With `residual` (the
    pooled shape), the pooled values plus it: a shortcut. On "cuda" and "triton" the three are one pass (Xception's
    strided blocks: BatchNorm, pool and add read and wrote their tensor three times over); on "torch" they are the
    separate ops."""
    check_tensor_args(OP, {"x": x}, {"scale": scale, "shift": shift, "residual": residual})
    kernel = pair(kernel_size, "kernel_size")
    step = kernel if stride is None else pair(stride, "stride")
    pad = pair(padding, "padding")
    chosen = backends.resolve(backend, OP, x)
    if chosen == "torch":  # the op's checks of x and the extras (a residual must not broadcast), then PyTorch's ops
        # x as the kernel backends take it (a 3-D x would take scale and shift along H; MaxPool2d runs PyTorch's
        # pooling for the rest); the window is left to F.max_pool2d's checks (the tap limit is the kernels' own)
        checks.check_pool_input(OP, x, "x", x.shape)
        checks.check_max_pool2d_extras(OP, x, scale, shift, None, ())
        if scale is not None:
            x = batchnorm.apply_scale_shift(x, scale, shift)
        out = F.max_pool2d(x, kernel, step, pad, ceil_mode=ceil_mode)
        if residual is None:
            return out
        checks.check_like(OP, "residual", residual, out.shape, x)
        return out + residual
    # The codes are written only where autograd will need them (the op's Autograd kernel saves them either way).
    save_argmax = torch.is_grad_enabled() and x.requires_grad
    extras = {k: v for k, v in (("scale", scale), ("shift", shift), ("residual", residual)) if v is not None}
    out, _ = torch.ops.xception_ops.max_pool2d(x, list(kernel), list(step), list(pad), ceil_mode, save_argmax, chosen,
                                               **extras)
    return out


class MaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d on the package's pooling kernels (`max_pool2d`), for `backend`; what the kernels do not take
    (dilation, return_indices, windows of more than 256 taps) runs PyTorch's. Same arguments and state as
    nn.MaxPool2d, which fuse() swaps for it."""

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backends.checked_name(backend)
        for name in ("kernel_size", "stride", "padding", "dilation"):  # (a float fails here, not at the first call)
            pair(getattr(self, name), name)

    @classmethod
    def from_module(cls, pool: nn.MaxPool2d, backend: str = "auto") -> MaxPool2d:
        new = cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.return_indices, pool.ceil_mode,
                  backend=backend)
        return new.train(pool.training)

    def _ours(self) -> bool:
        kernel = pair(self.kernel_size, "kernel_size")
        return (pair(self.dilation, "dilation") == (1, 1) and not self.return_indices
                and kernel[0] * kernel[1] <= MAX_TAPS)

    def takes_batch_norm(self) -> bool:
        """Whether a PendingBatchNorm given to forward costs nothing: a kernel backend is named and the kernels take
        this window, so the pool applies it as it reads (else it is a pass of its own, before PyTorch's pooling)."""
        return self.backend in ("cuda", "triton") and self._ours()

    def forward(self, x: torch.Tensor | PendingBatchNorm):
        """x may be a PendingBatchNorm (fuse() hands a chain's BatchNorm to the pool that its output feeds alone)."""
        pending = x if isinstance(x, PendingBatchNorm) else None
        y = x if pending is None else pending.y
        if not self._ours() or y.dim() != 4 or y.dtype not in checks.SUPPORTED_DTYPES:  # (nn.MaxPool2d's inputs)
            return super().forward(y if pending is None else pending.apply())
        extras = {} if pending is None else {"scale": pending.scale, "shift": pending.shift}
        return max_pool2d(y, self.kernel_size, self.stride, self.padding, self.ceil_mode, backend=self.backend,
                          **extras)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"
