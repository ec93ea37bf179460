"""Launchers for the Triton kernels (kernels.py): plain functions on tensors, same results, dtypes and memory
formats as the reference path (csrc/reference.cpp). Arguments arrive validated and normalized: stride [sh, sw],
padding [top, bottom, left, right], dilation [dh, dw]. Registration and routing live elsewhere.

What each op launches:

* depthwise_conv2d: dw_fwd_kernel (tile of pixels x channels, taps unrolled up to 7x7).
* depthwise_conv2d_backward_input: dw_dgrad_kernel (gather form; deterministic).
* depthwise_conv2d_backward_weight: dw_wgrad_kernel (per-slice partials, summed in a fixed order by its last
  program, or by reduce_rows_kernel where they are many: see below).
* separable_conv2d: sep_fwd_kernel, the dw -> pw GEMM (tl.dot), with the prologue, the mid stage (affine
  mid_scale / mid_shift, then the mid activation), epilogue and per-tile statistics partials, summed by its
  last program (or reduce_rows_kernel, below). In one of two forms, both timed by the autotuner (the default without timing: staged where
  there are several output-channel tiles):
  fused, the depthwise tile computed in registers by every output-channel tile (the intermediate never leaves
  the chip, but at 728 output channels and BLOCK_K = 64 the depthwise work is done 12 times over); staged,
  sep_bwd_act_kernel writes act(dw) once into a transient buffer and every output-channel tile reads its tiles
  (_sep_y_from_act: the same tl.dot operand and accumulation, so the output is the fused form's bit for bit).
* separable_conv2d_backward, in up to five passes (the forward saves only x; what the backward needs of the
  depthwise stage it recomputes from x):
  0. sep_bwd_act_kernel: act(dw(prologue(x)) * mid_scale + mid_shift) once, rounded to x's dtype as the fused
     forward rounds its tl.dot operand, into a transient buffer (the size of the depthwise output, x's dtype):
     before pass 1 when that pass needs y, else before pass 2; read by both, freed before pass 3 allocates its
     own. (Passes 1 and 2 used to recompute the depthwise tile in each of their output-channel tiles: the
     depthwise work repeated cdiv(k_out, BLOCK_K) times in each, 57% of a layer's backward in the CUDA
     backend's equivalent grad_pw kernel on an H100.)
  1. sep_bwd_epilogue_kernel, only when out_scale / out_shift are given or grad_sumsq is: partial sums for
     their gradients, per pixel slice (the workspace, live with the buffer and grad_y, does not grow with the
     pixels); y where needed is tl.dot of the buffer and W over the forward's chunks of depthwise channels,
     the forward's y bit for bit under the forward's launch configuration. With grad_sumsq it materializes
     grad_y (output-sized, x's dtype, freed after pass 3), since grad_y then depends on y.
  2. grad_pw = grad_y^T @ act(dw): sep_bwd_pw_kernel, tl.dot of grad_y and the buffer per pixel slice, with
     grad_y's epilogue backward folded into its loads, and reduce_rows_kernel over the slices.
  3. sep_bwd_mid_kernel: grad of the depthwise output = act'(pre) * (grad_y @ W) (times mid_scale) as tl.dot,
     with the epilogue's backward (relu mask from `out`, out_scale, grad_sum) folded into the grad_out loads and
     the depthwise result recomputed once for act' when there is a mid activation or mid_scale (not read from
     pass 0's buffer: freed by then, and taken after the activation); stored (the size of the depthwise output,
     x's dtype) for passes 4 and 5. With the mid affine, per-tile partial sums for the gradients of mid_scale and
     mid_shift, reduced as pass 5's for in_scale / in_shift.
  4. dw_wgrad_kernel on the buffer of pass 3, the input going through the prologue on load -> grad_dw_weight.
  5. dw_dgrad_kernel on the same buffer, with the prologue's backward fused into its epilogue (relu mask,
     partial sums for in_scale / in_shift, times in_scale) -> grad_x.
  Every per-channel sum goes through a float32 workspace of partial rows summed in a fixed order: by the last
  program of the kernel that wrote them to finish (an arrival counter per column block, the only atomic), where
  they are few (_LAST_REDUCE_BYTES: every pass of Xception's middle flow), else by reduce_rows_kernel (one launch,
  two where there are more than 64 rows, for a pair of sums, a BatchNorm's, as for one). The peak of
  transient memory: grad_y (with grad_sumsq) and one depthwise-output-sized buffer (act(dw) in passes 1-2,
  its gradient in 3), plus the float32 workspace of pass 1 or 2 (per pixel slice); pass 5's grows with the
  pixels (per tile) but grad_y is freed by then; pass 3's, with the mid affine only, too (2 floats per pixel
  tile and depthwise channel, 1/16 of the gradient buffer in 16-bit at 64-pixel tiles) while grad_y is live.

* max_pool2d / max_pool2d_backward: max_pool_fwd_kernel (the argmax as one byte per output, as the cuda backend
  keeps it; with a pending BatchNorm and a residual) and max_pool_bwd_kernel (gathered from the codes; no zero
  fill, no atomics). max_pool2d_scale_shift_backward: max_pool_bwd_bn_kernel (the gather, then scale_shift's
  backward, per-tile sums) and reduce_rows_kernel.

CPU tensors run in Triton's interpreter and need TRITON_INTERPRET=1; the kernels follow the variable as it is
at each call (kernels.py is re-imported when it changed since the kernels were decorated).
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Sequence

import torch
import triton

from ..checks import output_memory_format, pool_out_size
from ..geometry import output_hw
from . import autotune, kernels
from .autotune import Config

IMPLEMENTED = frozenset({
    "depthwise_conv2d",
    "depthwise_conv2d_backward_input",
    "depthwise_conv2d_backward_weight",
    "separable_conv2d",
    "separable_conv2d_backward",
    "max_pool2d",
    "max_pool2d_backward",
    "max_pool2d_scale_shift_backward",
})

_MID = {None: kernels.MID_NONE, "none": kernels.MID_NONE, "relu": kernels.MID_RELU, "elu": kernels.MID_ELU,
        "relu6": kernels.MID_RELU6, "hardswish": kernels.MID_HARDSWISH}
_MAX_UNROLLED_TAPS = 49  # kernels up to 7x7 have their taps unrolled; larger ones loop
_INDEX_LIMIT = 2**30  # int32 indexing below this span; headroom for the offsets of masked (out-of-image) taps
_REDUCE_META = dict(BLOCK_COLS=128, num_warps=4)
_REDUCE_GROUP = 64    # rows per program where one level does
_REDUCE_GROUPS = 128  # the most row groups a first level leaves (the second sums them, one program a column block)
# A kernel's partial rows are summed by its own last program (kernels._sum_rows_if_last) where that program reads
# at most this many bytes of them: ~2-4 us at one SM's ~150 GB/s, against reduce_rows_kernel's one or two
# launches (~3 us each on the GPU, tens of microseconds each in Triton's launcher). Above it (the entry flow's
# 147^2 statistics: ~10^4 pixel tiles, 5.5 MB) those launches spread the sums over the GPU. At batch 32 every
# pass of the middle flow's 728 -> 728 @19^2 and the statistics of 256 -> 728 @37^2 (350 KB) sum in-kernel.
# XCEPTION_OPS_TRITON_LAST_REDUCES=0: the launches always.
_LAST_REDUCE_BYTES = 1 << 19
LAST_REDUCE_ENV = "XCEPTION_OPS_TRITON_LAST_REDUCES"
_ARRIVAL_COUNTERS: dict[tuple, torch.Tensor] = {}


# ------------------------------------------------------------------------------------------------ plumbing

def _kernels():
    """kernels.py, decorated for the interpreter exactly when TRITON_INTERPRET=1 now.

    @triton.jit reads TRITON_INTERPRET when the module is imported; a process that imported it before setting
    the variable (a test session, say) gets it re-imported here."""
    interpreted = type(kernels.reduce_rows_kernel).__name__ == "InterpretedFunction"
    if interpreted != autotune.interpreting():
        importlib.reload(kernels)
    return kernels


def _on_device(fn):
    """Runs fn with the device of its first tensor argument current: Triton launches on the current device and
    its current stream."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = next(a for a in args if isinstance(a, torch.Tensor))
        if t.device.type == "cuda":
            with torch.cuda.device(t.device):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)
    return wrapper


def _check_device(x: torch.Tensor) -> None:
    if x.device.type != "cuda" and not autotune.interpreting():
        raise RuntimeError(f"xception_ops triton backend: x is on {x.device}; the Triton kernels need CUDA "
                           "tensors, or TRITON_INTERPRET=1 to run in Triton's interpreter on the CPU")


# Host-side arithmetic in plain Python: triton.cdiv and triton.next_power_of_2 are constexpr functions in Triton 3.8,
# whose wrapper cost ~4 us a call here (25 calls per separable backward).
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _span(t: torch.Tensor | None) -> int:
    """How many elements the tensor reaches from its first one (its largest offset + 1)."""
    if t is None:
        return 0
    n = t.numel()
    if n == 0:
        return 0
    if t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
        return n  # dense: the offsets are 0 .. n - 1
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def _idx64(*tensors: torch.Tensor | None, extra: Sequence[int] = ()) -> bool:
    return max([_span(t) for t in tensors] + list(extra)) >= _INDEX_LIMIT


def _row_vector(tensors: Sequence[torch.Tensor | None], channels: Sequence[int]) -> int:
    """The kernels' VEC: the largest power of two, at most 16 bytes of elements, that divides every pixel stride
    (dimensions 0, 2 and 3, those of size 1 aside) of the tensors and every channel count. The kernels tell the
    compiler that pixels' offsets and channel counts are its multiples (kernels._rows, kernels._channel_mask), so
    that it vectorizes along channels where they are fastest: Triton itself only specializes values divisible by
    16, and 728 channels are not (the depthwise forward's loads were 2 bytes each at 728 channels, in PTX for
    sm_90; 16 at 64). NCHW tensors have a pixel stride of 1, hence VEC 1."""
    present = [t for t in tensors if t is not None]
    vec = 16 // present[0].element_size()
    for t in present:
        shape, strides = t.shape, t.stride()  # (one call each: ~0.5 us apiece, and this runs per launch)
        for d in (0, 2, 3):
            while vec > 1 and shape[d] > 1 and strides[d] % vec:
                vec //= 2
    for c in channels:
        while vec > 1 and c % vec:
            vec //= 2
    return vec


def _channels_last(t: torch.Tensor) -> bool:
    return t.stride(1) == 1 and t.shape[1] > 1


def _dot_precision(dtype: torch.dtype) -> str:
    """The kernels' DOT_PREC: TF32 where PyTorch's flag allows it on a GPU; "fp32" for bf16 in the interpreter
    (kernels._dot)."""
    interpreting = autotune.interpreting()
    if dtype == torch.float32 and not interpreting and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "fp32" if dtype == torch.bfloat16 and interpreting else "ieee"


def _unroll(kh: int, kw: int) -> bool:
    return kh * kw <= _MAX_UNROLLED_TAPS


def _slices(num_tiles: int, other_programs: int, device: torch.device) -> tuple[int, int]:
    """(number of slices, tiles per slice) to split num_tiles pixel tiles into, for the kernels that write one
    partial-sum row per slice: enough programs to fill the GPU, few rows to reduce."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4
    slices = max(1, min(num_tiles, target // max(other_programs, 1)))
    per_slice = _cdiv(num_tiles, slices)
    return _cdiv(num_tiles, per_slice), per_slice


def _reduce_rows(ws: torch.Tensor, out: torch.Tensor, second: torch.Tensor | None = None) -> None:
    """out (1-D, contiguous) = ws.sum(0) in a fixed order, ws a contiguous float32 [R, COLS]; with `second`, ws is
    [2, R, COLS] and second = ws[1].sum(0) too, in the same launches (a BatchNorm's pair of sums: the Triton
    launcher's host time, tens of microseconds a launch, is what bounds an eager training step). At most two
    levels: up to _REDUCE_GROUP rows a program in one; more, in groups of at least that many rows, then the
    groups' sums (at most _REDUCE_GROUPS of them)."""
    K = _kernels()
    planes = 1 if second is None else 2
    rows, cols = ws.shape[-2:]
    col_blocks = _cdiv(cols, _REDUCE_META["BLOCK_COLS"])
    if rows > _REDUCE_GROUP:
        per_group = max(_REDUCE_GROUP, _cdiv(rows, _REDUCE_GROUPS))
        groups = _cdiv(rows, per_group)
        partial = torch.empty((planes, groups, cols), dtype=torch.float32, device=ws.device)
        K.reduce_rows_kernel[(col_blocks, groups, planes)](ws, partial, partial, rows, cols, per_group,
                                                           BLOCK_R=32, **_REDUCE_META)
        ws, rows = partial, groups
    # (the weight gradients' workspaces have a few rows of many columns: 8-row blocks there)
    K.reduce_rows_kernel[(col_blocks, 1, planes)](ws, out, _or(second, out), rows, cols, max(rows, 1),
                                                  BLOCK_R=8 if rows <= 8 else 32, **_REDUCE_META)


def _sums_in_kernel(rows: int, block: int, planes: int) -> bool:
    """Whether a kernel whose programs write `rows` partial rows of `block` columns each, in `planes` planes,
    sums them itself (its LAST flag) instead of leaving them to _reduce_rows."""
    return rows * block * planes * 4 <= _LAST_REDUCE_BYTES and os.environ.get(LAST_REDUCE_ENV, "1") != "0"


def _last_rows(block: int) -> int:
    """The rows a last program sums at once (kernels._sum_rows_if_last's BLOCK_R): ~4K float32 values a step."""
    return max(1, min(32, 4096 // block))


def _last_program_sums(rows: int, block: int, planes: int, device: torch.device, groups: int,
                       placeholder: torch.Tensor) -> tuple[bool, torch.Tensor, dict]:
    """For a kernel whose programs write `rows` partial rows of `block` columns in `planes` planes (0: no sums) and
    share columns in `groups` groups: whether its last program sums them (then no _reduce_rows / _reduce_pair
    follows it), its counters argument (`placeholder` where it does not) and its LAST and BLOCK_R meta-parameters."""
    last = planes > 0 and _sums_in_kernel(rows, block, planes)
    counters = _arrival_counters(device, groups) if last else placeholder
    return last, counters, {"LAST": last, "BLOCK_R": _last_rows(block)}


def _arrival_counters(device: torch.device, slots: int) -> torch.Tensor:
    """Zeroed int32 counters for kernels that sum in their last program: one per group of programs sharing
    columns. Each such kernel leaves them at zero, so one buffer per stream serves every launch on it (kernels on
    one stream run one after another; another stream gets its own)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    counters = _ARRIVAL_COUNTERS.get(key)
    if counters is None or counters.numel() < slots:
        counters = torch.zeros(max(slots, 4096), dtype=torch.int32, device=device)
        _ARRIVAL_COUNTERS[key] = counters
    return counters


def _reduce_pair(ws: torch.Tensor, first: torch.Tensor | None, second: torch.Tensor | None) -> None:
    """first = ws[0].sum(0) and second = ws[1].sum(0), each where given (ws float32 [2, R, COLS])."""
    if first is not None and second is not None:
        _reduce_rows(ws, first, second)
    elif first is not None:
        _reduce_rows(ws[0], first)
    elif second is not None:
        _reduce_rows(ws[1], second)


def _empty_vector(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((0,), dtype=torch.float32)


def _dense(*vectors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The per-channel vectors (bias, scales, shifts) with unit stride: the kernels index them by channel alone, so
    a strided view (w[::2]) would be read as its base."""
    return [None if v is None else v.contiguous() for v in vectors]


def _weight_strides(w: torch.Tensor) -> tuple[int, int, int]:
    return w.stride(0), w.stride(2), w.stride(3)


def _geometry(x_shape, weight_shape, stride, padding, dilation):
    n, c, h, w = (int(v) for v in x_shape)
    cm, _, kh, kw = (int(v) for v in weight_shape)
    oh, ow = output_hw((h, w), (kh, kw), stride, padding, dilation)
    conv = (int(stride[0]), int(stride[1]), int(padding[0]), int(padding[2]), int(dilation[0]),
            int(dilation[1]))
    return n, c, h, w, cm, kh, kw, oh, ow, conv


def _key(*parts) -> tuple:
    """An autotune key: shapes, strides, dtypes and flags, all hashable."""
    out = []
    for p in parts:
        if isinstance(p, torch.Tensor):  # (torch.Size and stride() are tuples already; get_device: no device object)
            out.append((p.shape, p.stride(), p.dtype, p.get_device()))
        elif isinstance(p, (list, tuple)):
            out.append(tuple(p))
        else:
            out.append(p)
    return tuple(out)


# ------------------------------------------------------------------------------------------------ depthwise

DEPTHWISE_ENV = "XCEPTION_OPS_TRITON_DEPTHWISE"


def _depthwise_forms(x: torch.Tensor, kh: int, kw: int, conv: tuple) -> list[Config]:
    """The depthwise stage's launch configurations, the default first: the tap-gather form's (dw_fwd_kernel,
    sep_bwd_act_kernel), then, for 3x3 at stride 1 without dilation, the by-rows form's (dw_rows_kernel), which
    the autotuner times against them. XCEPTION_OPS_TRITON_DEPTHWISE=gather or =rows allows only that form (read
    at each call; rows where it applies)."""
    forced = os.environ.get(DEPTHWISE_ENV, "").strip().lower()
    if forced not in ("", "gather", "rows"):
        raise ValueError(f"{DEPTHWISE_ENV} must be 'gather' or 'rows', got {forced!r}")
    stride_h, stride_w, _, _, dil_h, dil_w = conv
    rows_apply = (kh, kw, stride_h, stride_w, dil_h, dil_w) == (3, 3, 1, 1, 1, 1)
    gather = list(autotune.depthwise_configs(_channels_last(x)))
    rows = list(autotune.depthwise_rows_configs(_channels_last(x))) if rows_apply else []
    if forced == "rows" and rows:
        return rows
    return gather if forced == "gather" else gather + rows


def _strip_rows(programs_per_row: int, rows: int, device: torch.device) -> int:
    """Output rows per program of the by-rows form: the longest strips (each reloads two halo rows) that still give
    enough programs to fill the GPU (8 per SM), at most 16 rows, evened out over the strips."""
    target = 8 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    strip = max(1, min(16, rows, rows * programs_per_row // target))
    strips = _cdiv(rows, strip)
    return _cdiv(rows, strips)


def _launch_rows(cfg: Config, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 in_scale: torch.Tensor | None, in_shift: torch.Tensor | None, in_relu: bool, mid: int,
                 mid_scale: torch.Tensor | None, mid_shift: torch.Tensor | None, y: torch.Tensor, conv: tuple,
                 idx64: bool) -> None:
    """dw_rows_kernel into y (the depthwise forward, or the separable's act buffer) with configuration cfg."""
    n, c, h, w = (int(v) for v in x.shape)
    cm, oh, ow = int(y.shape[1]), int(y.shape[2]), int(y.shape[3])
    num_w, num_c = _cdiv(ow, cfg.BLOCK_P), _cdiv(cm, cfg.BLOCK_C)
    strip = _strip_rows(n * num_w * num_c, oh, x.device)
    grid = (n * _cdiv(oh, strip) * num_w * num_c,)
    _kernels().dw_rows_kernel[grid](
        x, weight, _or(bias, weight), _or(in_scale, weight), _or(in_shift, weight), _or(mid_scale, weight),
        _or(mid_shift, weight), y,
        oh, ow, h, w, cm, cm // c, conv[2], conv[3], strip, *x.stride(), *_weight_strides(weight), *y.stride(),
        HAS_BIAS=bias is not None, HAS_SCALE=in_scale is not None, HAS_SHIFT=in_shift is not None,
        IN_RELU=bool(in_relu), MID=mid, HAS_MID_SCALE=mid_scale is not None, HAS_MID_SHIFT=mid_shift is not None,
        IDX64=idx64, BLOCK_W=cfg.BLOCK_P, BLOCK_C=cfg.BLOCK_C,
        VEC=_row_vector([x, y], [cm]), num_warps=cfg.num_warps, num_stages=cfg.num_stages)


@_on_device
def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    _check_device(x)
    (bias,) = _dense(bias)
    n, c, h, w, cm, kh, kw, oh, ow, conv = _geometry(x.shape, weight.shape, stride, padding, dilation)
    y = torch.empty((n, cm, oh, ow), dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))
    q = n * oh * ow
    if q == 0:
        return y
    K = _kernels()
    idx64 = _idx64(x, weight, y)

    def run(cfg: Config) -> None:
        if cfg.rows:
            _launch_rows(cfg, x, weight, bias, None, None, False, kernels.MID_NONE, None, None, y, conv, idx64)
            return
        grid = (_cdiv(q, cfg.BLOCK_P) * _cdiv(cm, cfg.BLOCK_C),)
        K.dw_fwd_kernel[grid](
            x, weight, bias if bias is not None else weight, y,
            q, oh * ow, ow, h, w, cm, cm // c, *conv, *x.stride(), *_weight_strides(weight), *y.stride(),
            KH=kh, KW=kw, UNROLL=_unroll(kh, kw), HAS_BIAS=bias is not None, IDX64=idx64,
            VEC=_row_vector([x, y], [cm]), **cfg.meta(False))

    key = _key(x, weight, bias is not None, conv, os.environ.get(DEPTHWISE_ENV, ""))
    run(autotune.choose("depthwise_conv2d", key, _depthwise_forms(x, kh, kw, conv), run))
    return y


def _dgrad(g: torch.Tensor, weight: torch.Tensor, grad_x: torch.Tensor, conv, x: torch.Tensor | None = None,
           in_scale: torch.Tensor | None = None, in_shift: torch.Tensor | None = None, in_relu: bool = False,
           grad_in_scale: torch.Tensor | None = None, grad_in_shift: torch.Tensor | None = None) -> None:
    """grad_x = the depthwise input gradient of g, with the separable prologue's backward when x is given."""
    n, c, h, w = grad_x.shape
    cm, _, kh, kw = weight.shape
    oh, ow = g.shape[2:]
    q_in = n * h * w
    prologue = x is not None and (in_scale is not None or in_shift is not None or in_relu)
    if q_in == 0:
        for t in (grad_in_scale, grad_in_shift):
            if t is not None:
                t.zero_()
        return
    K = _kernels()
    xs = x if prologue else grad_x
    idx64 = _idx64(g, weight, grad_x, xs, extra=[2 * q_in * c])
    has_scale, has_shift = prologue and in_scale is not None, prologue and in_shift is not None

    def run(cfg: Config) -> None:
        tiles, c_tiles = _cdiv(q_in, cfg.BLOCK_P), _cdiv(c, cfg.BLOCK_C)
        grid = (tiles * c_tiles,)
        sums = has_scale or has_shift
        ws = torch.empty((2, tiles, c), dtype=torch.float32, device=g.device) if sums else grad_x
        last, counters, last_meta = _last_program_sums(tiles, cfg.BLOCK_C, int(has_scale) + int(has_shift), g.device,
                                                       c_tiles, ws)
        out_scale, out_shift = _or(grad_in_scale, ws), _or(grad_in_shift, ws)
        K.dw_dgrad_kernel[grid](
            g, weight, grad_x, xs, in_scale if has_scale else weight, in_shift if has_shift else weight, ws,
            out_scale, out_shift, counters,
            q_in, h * w, w, c, oh, ow, cm // c, *conv, *g.stride(), *_weight_strides(weight), *xs.stride(),
            *grad_x.stride(),
            KH=kh, KW=kw, UNROLL=_unroll(kh, kw), HAS_SCALE=has_scale, HAS_SHIFT=has_shift,
            IN_RELU=prologue and in_relu, IDX64=idx64, VEC=_row_vector([g, grad_x, xs], [c, cm]), **last_meta,
            **cfg.meta(False))
        if sums and not last:
            _reduce_pair(ws, grad_in_scale if has_scale else None, grad_in_shift if has_shift else None)

    key = _key(g, weight, grad_x, xs, conv, has_scale, has_shift, in_relu)
    run(autotune.choose("dw_dgrad", key, autotune.depthwise_configs(_channels_last(g)), run))


def _wgrad(g: torch.Tensor, x: torch.Tensor, grad_w: torch.Tensor, conv, in_scale: torch.Tensor | None = None,
           in_shift: torch.Tensor | None = None, in_relu: bool = False) -> None:
    """grad_w (contiguous, (C*M, 1, kH, kW)) = the depthwise weight gradient for grad g of the output and input
    relu?(x * in_scale + in_shift); per-slice partials, then a fixed-order reduction."""
    n, c, h, w = x.shape
    cm, _, kh, kw = grad_w.shape
    oh, ow = g.shape[2:]
    q = n * oh * ow
    if q == 0:
        grad_w.zero_()
        return
    K = _kernels()
    taps = kh * kw
    group = taps if taps <= 32 else 16
    block_t = _next_pow2(group)
    idx64 = _idx64(g, x, extra=[q, grad_w.numel()])

    def run(cfg: Config) -> None:
        tiles = _cdiv(q, cfg.BLOCK_P)
        other = _cdiv(cm, cfg.BLOCK_C) * _cdiv(taps, group)
        slices, per_slice = _slices(tiles, other, g.device)
        ws = torch.empty((slices, cm * taps), dtype=torch.float32, device=g.device)
        last, counters, last_meta = _last_program_sums(slices, block_t * cfg.BLOCK_C, 1, g.device, other, ws)
        K.dw_wgrad_kernel[(slices * other,)](
            g, x, in_scale if in_scale is not None else x, in_shift if in_shift is not None else x, ws, grad_w,
            counters, q, oh * ow, ow, h, w, cm, cm // c, taps, per_slice, *conv, *g.stride(), *x.stride(),
            KW=kw, TAPS=group, BLOCK_T=block_t, HAS_SCALE=in_scale is not None, HAS_SHIFT=in_shift is not None,
            IN_RELU=in_relu, IDX64=idx64, VEC=_row_vector([g, x], [cm]), **last_meta, **cfg.meta(False))
        if not last:
            _reduce_rows(ws, grad_w.view(-1))

    key = _key(g, x, grad_w.shape, conv, in_scale is not None, in_shift is not None, in_relu)
    run(autotune.choose("dw_wgrad", key, autotune.depthwise_configs(_channels_last(x)), run))


@_on_device
def depthwise_conv2d_backward_input(grad_out: torch.Tensor, weight: torch.Tensor, input_size: Sequence[int],
                                    stride: Sequence[int], padding: Sequence[int],
                                    dilation: Sequence[int]) -> torch.Tensor:
    _check_device(grad_out)
    *_, conv = _geometry(input_size, weight.shape, stride, padding, dilation)
    grad_x = torch.empty(tuple(int(v) for v in input_size), dtype=grad_out.dtype, device=grad_out.device,
                         memory_format=output_memory_format(grad_out))
    _dgrad(grad_out, weight, grad_x, conv)
    return grad_x


@_on_device
def depthwise_conv2d_backward_weight(grad_out: torch.Tensor, x: torch.Tensor, weight_size: Sequence[int],
                                     stride: Sequence[int], padding: Sequence[int],
                                     dilation: Sequence[int]) -> torch.Tensor:
    _check_device(x)
    *_, conv = _geometry(x.shape, weight_size, stride, padding, dilation)
    grad_w = torch.empty(tuple(int(v) for v in weight_size), dtype=x.dtype, device=x.device)
    _wgrad(grad_out, x, grad_w, conv)
    return grad_w


# ------------------------------------------------------------------------------------------------ separable

FORWARD_ENV = "XCEPTION_OPS_TRITON_FORWARD"


def _forward_forms(k_out: int, cfg: Config) -> list[Config]:
    """The forms of the separable forward to try with launch configuration cfg, the default first: staged where
    the fused form would compute the depthwise tile more than once (several output-channel tiles), fused
    otherwise. XCEPTION_OPS_TRITON_FORWARD=fused or =staged allows only that one (read at each call)."""
    forced = os.environ.get(FORWARD_ENV, "").strip().lower()
    if forced in ("fused", "staged"):
        return [cfg._replace(staged=forced == "staged")]
    if forced:
        raise ValueError(f"{FORWARD_ENV} must be 'fused' or 'staged', got {forced!r}")
    staged_first = _cdiv(k_out, cfg.BLOCK_K) > 1
    return [cfg._replace(staged=staged_first), cfg._replace(staged=not staged_first)]


def _act_buffer(x: torch.Tensor, dw_weight: torch.Tensor, in_scale: torch.Tensor | None,
                in_shift: torch.Tensor | None, in_relu: bool, mid: int, mid_scale: torch.Tensor | None,
                mid_shift: torch.Tensor | None, conv: tuple, kh: int, kw: int, oh: int, ow: int,
                idx64: bool) -> torch.Tensor:
    """act(dw(prologue(x)) * mid_scale + mid_shift) in x's dtype and memory format (sep_bwd_act_kernel): the
    tl.dot operand of the fused forward bit for bit, whatever the launch configuration (each element is its own
    taps' sum, in tap order)."""
    K = _kernels()
    n, c = int(x.shape[0]), int(x.shape[1])
    cm = int(dw_weight.shape[0])
    h, w = int(x.shape[2]), int(x.shape[3])
    buf = torch.empty((n, cm, oh, ow), dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))
    q = n * oh * ow
    dummy = dw_weight

    def run_act(cfg: Config) -> None:
        if cfg.rows:
            _launch_rows(cfg, x, dw_weight, None, in_scale, in_shift, in_relu, mid, mid_scale, mid_shift, buf, conv,
                         idx64)
            return
        grid = (_cdiv(q, cfg.BLOCK_P) * _cdiv(cm, cfg.BLOCK_C),)
        K.sep_bwd_act_kernel[grid](
            x, dw_weight, _or(in_scale, dummy), _or(in_shift, dummy), _or(mid_scale, dummy), _or(mid_shift, dummy),
            buf,
            q, oh * ow, ow, h, w, cm, cm // c, *conv, *x.stride(), *_weight_strides(dw_weight), *buf.stride(),
            KH=kh, KW=kw, UNROLL=_unroll(kh, kw), HAS_SCALE=in_scale is not None, HAS_SHIFT=in_shift is not None,
            IN_RELU=bool(in_relu), MID=mid, HAS_MID_SCALE=mid_scale is not None,
            HAS_MID_SHIFT=mid_shift is not None, IDX64=idx64, VEC=_row_vector([x, buf], [cm]), **cfg.meta(False))

    key = _key(x, dw_weight, conv, in_scale is not None, in_shift is not None, in_relu, mid, mid_scale is not None,
               mid_shift is not None, os.environ.get(DEPTHWISE_ENV, ""))
    run_act(autotune.choose("sep_act", key, _depthwise_forms(x, kh, kw, conv), run_act))
    return buf


@_on_device
def separable_conv2d(x: torch.Tensor, dw_weight: torch.Tensor, pw_weight: torch.Tensor,
                     in_scale: torch.Tensor | None, in_shift: torch.Tensor | None, in_relu: bool,
                     stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], mid_activation: str,
                     mid_scale: torch.Tensor | None, mid_shift: torch.Tensor | None,
                     out_scale: torch.Tensor | None, out_shift: torch.Tensor | None, out_relu: bool,
                     residual: torch.Tensor | None, compute_stats: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_device(x)
    in_scale, in_shift, mid_scale, mid_shift, out_scale, out_shift = _dense(
        in_scale, in_shift, mid_scale, mid_shift, out_scale, out_shift)
    n, c, h, w, cm, kh, kw, oh, ow, conv = _geometry(x.shape, dw_weight.shape, stride, padding, dilation)
    k_out = int(pw_weight.shape[0])
    out = torch.empty((n, k_out, oh, ow), dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))
    if compute_stats:
        total = torch.empty((k_out,), dtype=torch.float32, device=x.device)
        total_sq = torch.empty((k_out,), dtype=torch.float32, device=x.device)
    else:
        total = total_sq = _empty_vector(x)
    q = n * oh * ow
    if q == 0:
        if compute_stats:
            total.zero_()
            total_sq.zero_()
        return out, total, total_sq
    K = _kernels()
    idx64 = _idx64(x, dw_weight, pw_weight, out, residual, extra=[2 * q * k_out, q * cm])  # (q * cm: the act buffer)
    mid = _MID[mid_activation]
    dummy = dw_weight
    res_strides = residual.stride() if residual is not None else (0, 0, 0, 0)

    def run(cfg: Config) -> None:
        tiles, k_tiles = _cdiv(q, cfg.BLOCK_P), _cdiv(k_out, cfg.BLOCK_K)
        grid = (tiles * k_tiles,)
        ws = torch.empty((2, tiles, k_out), dtype=torch.float32, device=x.device) if compute_stats else dummy
        last, counters, last_meta = _last_program_sums(tiles, cfg.BLOCK_K, 2 if compute_stats else 0, x.device,
                                                       k_tiles, total)
        # Staged: the depthwise stage once, into a transient buffer freed when this returns.
        act = _act_buffer(x, dw_weight, in_scale, in_shift, in_relu, mid, mid_scale, mid_shift, conv, kh, kw, oh, ow,
                          idx64) if cfg.staged else None
        K.sep_fwd_kernel[grid](
            x, dw_weight, pw_weight, _or(in_scale, dummy), _or(in_shift, dummy), _or(mid_scale, dummy),
            _or(mid_shift, dummy), _or(out_scale, dummy), _or(out_shift, dummy), _or(residual, dummy), out, ws,
            _or(act, dummy), total, total_sq, counters,
            q, oh * ow, ow, h, w, cm, k_out, cm // c, *conv,
            *x.stride(), *_weight_strides(dw_weight), pw_weight.stride(0), pw_weight.stride(1), *res_strides,
            *out.stride(), *(act.stride() if act is not None else (0, 0, 0, 0)),
            KH=kh, KW=kw, UNROLL=_unroll(kh, kw), HAS_SCALE=in_scale is not None, HAS_SHIFT=in_shift is not None,
            IN_RELU=bool(in_relu), MID=mid, HAS_MID_SCALE=mid_scale is not None,
            HAS_MID_SHIFT=mid_shift is not None, HAS_OSCALE=out_scale is not None, HAS_OSHIFT=out_shift is not None,
            HAS_RES=residual is not None, OUT_RELU=bool(out_relu), STATS=bool(compute_stats),
            FROM_ACT=cfg.staged, DOT_PREC=_dot_precision(x.dtype), IDX64=idx64,
            VEC=_row_vector([x, out, residual, act, pw_weight], [cm, k_out]), **last_meta, **cfg.meta(True))
        if compute_stats and not last:
            _reduce_rows(ws, total, total_sq)

    key = _key(x, dw_weight, pw_weight, residual, conv, in_scale is not None, in_shift is not None, in_relu, mid,
               mid_scale is not None, mid_shift is not None, out_scale is not None, out_shift is not None, out_relu,
               compute_stats, _dot_precision(x.dtype), os.environ.get(FORWARD_ENV, ""))
    # Each launch configuration in both forms: the autotuner times them all, and without timing (interpreter,
    # XCEPTION_OPS_TRITON_AUTOTUNE=0) the first configuration runs in its default form.
    candidates = [form for cfg in autotune.gemm_configs(x.dtype) for form in _forward_forms(k_out, cfg)]
    run(autotune.choose("separable_conv2d", key, candidates, run))
    return out, total, total_sq


def _or(t: torch.Tensor | None, default: torch.Tensor) -> torch.Tensor:
    return t if t is not None else default


@_on_device
def separable_conv2d_backward(grad_out: torch.Tensor, grad_sum: torch.Tensor | None,
                              grad_sumsq: torch.Tensor | None, out: torch.Tensor | None, x: torch.Tensor,
                              dw_weight: torch.Tensor, pw_weight: torch.Tensor, in_scale: torch.Tensor | None,
                              in_shift: torch.Tensor | None, in_relu: bool, stride: Sequence[int],
                              padding: Sequence[int], dilation: Sequence[int], mid_activation: str,
                              mid_scale: torch.Tensor | None, mid_shift: torch.Tensor | None,
                              out_scale: torch.Tensor | None, out_shift: torch.Tensor | None, out_relu: bool):
    """The 9 gradients: (x, dw_weight, pw_weight, in_scale, in_shift, mid_scale, mid_shift, out_scale, out_shift),
    each vector's in its dtype, an empty float32 tensor where that vector is absent."""
    _check_device(x)
    in_scale, in_shift, mid_scale, mid_shift, out_scale, out_shift, grad_sum, grad_sumsq = _dense(
        in_scale, in_shift, mid_scale, mid_shift, out_scale, out_shift, grad_sum, grad_sumsq)
    n, c, h, w, cm, kh, kw, oh, ow, conv = _geometry(x.shape, dw_weight.shape, stride, padding, dilation)
    k_out = int(pw_weight.shape[0])
    dev = x.device
    fmt = output_memory_format(x)
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=dev, memory_format=fmt)
    grad_dw = torch.empty(dw_weight.shape, dtype=dw_weight.dtype, device=dev)
    grad_pw = torch.empty(pw_weight.shape, dtype=pw_weight.dtype, device=dev)

    def vector_grad(p):
        return _empty_vector(x) if p is None else torch.empty(p.shape, dtype=p.dtype, device=dev)

    g_in_scale, g_in_shift = vector_grad(in_scale), vector_grad(in_shift)
    g_mid_scale, g_mid_shift = vector_grad(mid_scale), vector_grad(mid_shift)
    g_out_scale, g_out_shift = vector_grad(out_scale), vector_grad(out_shift)
    result = (grad_x, grad_dw, grad_pw, g_in_scale, g_in_shift, g_mid_scale, g_mid_shift, g_out_scale, g_out_shift)
    q = n * oh * ow
    if q == 0:
        for t in result[1:]:
            t.zero_()
        grad_x.zero_()
        return result
    if out_relu and out is None:
        raise ValueError("xception_ops triton backend: separable_conv2d_backward needs the forward's output when "
                         "out_relu is set")

    K = _kernels()
    dtype = x.dtype
    mid = _MID[mid_activation]
    prec = _dot_precision(dtype)
    dummy = dw_weight
    idx64 = _idx64(x, dw_weight, pw_weight, grad_out, out, extra=[2 * q * max(k_out, cm), k_out * cm])
    unroll = _unroll(kh, kw)
    flags_in = dict(KH=kh, KW=kw, UNROLL=unroll, HAS_SCALE=in_scale is not None, HAS_SHIFT=in_shift is not None,
                    IN_RELU=bool(in_relu), MID=mid, DOT_PREC=prec, IDX64=idx64)
    geo = (q, oh * ow, ow, h, w, cm, k_out, cm // c, *conv)
    x_args = (*x.stride(), *_weight_strides(dw_weight), pw_weight.stride(0), pw_weight.stride(1))
    out_strides = out.stride() if out is not None else (0, 0, 0, 0)
    base_key = _key(x, dw_weight, pw_weight, grad_out, conv, in_scale is not None, in_shift is not None, in_relu,
                    mid, mid_scale is not None, mid_shift is not None, out_relu, prec)

    # The depthwise stage's activated result act(dw(prologue(x)) * mid_scale + mid_shift), x's dtype, laid out as
    # grad_x will be: the tl.dot operand of the fused forward, computed once into a transient buffer and read by
    # pass 1 (to form y) and pass 2 (grad_pw) instead of being recomputed in every output-channel tile of theirs.
    def act_buffer() -> torch.Tensor:
        return _act_buffer(x, dw_weight, in_scale, in_shift, in_relu, mid, mid_scale, mid_shift, conv, kh, kw, oh, ow,
                           idx64)

    # 1. Epilogue: gradients of out_scale / out_shift, and grad_y itself when it depends on y (grad_sumsq). y is
    # formed from the act buffer, so the buffer comes first: it and grad_y are then live together, as they are
    # in pass 2 anyway.
    write_gy = grad_sumsq is not None
    need_y = out_scale is not None or write_gy
    mid_buf = act_buffer() if need_y else None
    gy_buf = torch.empty((n, k_out, oh, ow), dtype=dtype, device=dev, memory_format=fmt) if write_gy else None
    if out_scale is not None or out_shift is not None or write_gy:
        partials = out_scale is not None or out_shift is not None

        def run_epilogue(cfg: Config) -> None:
            # (locals here, not in the enclosing function, so that the dels below free the buffers)
            gy_target = gy_buf if write_gy else grad_out
            y_src = mid_buf if need_y else dummy
            y_strides = mid_buf.stride() if need_y else (0, 0, 0, 0)
            k_tiles = _cdiv(k_out, cfg.BLOCK_K)
            slices, per_slice = _slices(_cdiv(q, cfg.BLOCK_P), k_tiles, dev)
            ws = torch.empty((2, slices, k_out), dtype=torch.float32, device=dev) if partials else dummy
            planes = int(out_scale is not None) + int(out_shift is not None)
            last, counters, last_meta = _last_program_sums(slices, cfg.BLOCK_K, planes, dev, k_tiles, dummy)
            K.sep_bwd_epilogue_kernel[(slices * k_tiles,)](
                grad_out, _or(out, grad_out), _or(out_scale, dummy), _or(grad_sum, dummy), _or(grad_sumsq, dummy),
                y_src, pw_weight, ws, gy_target, g_out_scale, g_out_shift, counters,
                q, oh * ow, ow, cm, k_out, per_slice, *y_strides, pw_weight.stride(0), pw_weight.stride(1),
                *grad_out.stride(), *out_strides, *gy_target.stride(),
                NEED_Y=need_y, OUT_RELU=bool(out_relu), HAS_OSCALE=out_scale is not None,
                HAS_OSHIFT=out_shift is not None, HAS_GSUM=grad_sum is not None, WRITE_GY=write_gy,
                DOT_PREC=prec, IDX64=idx64,
                VEC=_row_vector([grad_out, out, gy_buf, mid_buf, pw_weight if need_y else None], [cm, k_out]),
                **last_meta, **cfg.meta(True))
            if partials and not last:
                _reduce_pair(ws, g_out_scale if out_scale is not None else None,
                             g_out_shift if out_shift is not None else None)

        key = base_key + (out_scale is not None, out_shift is not None, grad_sum is not None, write_gy)
        run_epilogue(autotune.choose("sep_bwd_epilogue", key, autotune.gemm_configs(dtype), run_epilogue))

    # Where passes 2 and 3 read grad_y from: the buffer of pass 1, or grad_out with the epilogue's backward
    # folded into the load.
    if write_gy:
        gy_src = (gy_buf, gy_buf, dummy, dummy, *gy_buf.stride(), 0, 0, 0, 0)
        gy_flags = dict(OUT_RELU=False, HAS_OSCALE=False, HAS_GSUM=False)
    else:
        gy_src = (grad_out, _or(out, grad_out), _or(out_scale, dummy), _or(grad_sum, dummy), *grad_out.stride(),
                  *out_strides)
        gy_flags = dict(OUT_RELU=bool(out_relu), HAS_OSCALE=out_scale is not None, HAS_GSUM=grad_sum is not None)
    src_key = base_key + tuple(gy_flags.values()) + (write_gy,)

    # 2. grad_pw: per-slice partial GEMMs grad_y^T @ the act buffer (computed here unless pass 1 did), then a
    # fixed-order reduction.
    if mid_buf is None:
        mid_buf = act_buffer()

    def run_pw(cfg: Config) -> None:
        tiles = _cdiv(q, cfg.BLOCK_P)
        other = _cdiv(k_out, cfg.BLOCK_K) * _cdiv(cm, cfg.BLOCK_C)
        slices, per_slice = _slices(tiles, other, dev)
        ws = torch.empty((slices, k_out * cm), dtype=torch.float32, device=dev)
        last, counters, last_meta = _last_program_sums(slices, cfg.BLOCK_K * cfg.BLOCK_C, 1, dev, other, ws)
        K.sep_bwd_pw_kernel[(slices * other,)](
            *gy_src[:4], mid_buf, ws, grad_pw, counters,
            q, oh * ow, ow, cm, k_out, per_slice, *mid_buf.stride(), *gy_src[4:],
            **gy_flags, DOT_PREC=prec, IDX64=idx64, VEC=_row_vector([*gy_src[:2], mid_buf], [cm, k_out]),
            **last_meta, **cfg.meta(True))
        if not last:
            _reduce_rows(ws, grad_pw.view(-1))

    run_pw(autotune.choose("sep_bwd_pw", src_key, autotune.gemm_configs(dtype), run_pw))
    del mid_buf  # freed before the next pass allocates its buffer of the same size

    # 3. grad of the depthwise output (materialized, x's dtype).
    g_dw_out = torch.empty((n, cm, oh, ow), dtype=dtype, device=dev, memory_format=fmt)

    mid_affine = mid_scale is not None or mid_shift is not None

    def run_mid(cfg: Config) -> None:
        tiles, c_tiles = _cdiv(q, cfg.BLOCK_P), _cdiv(cm, cfg.BLOCK_C)
        grid = (tiles * c_tiles,)
        # Per-tile partial sums for mid_scale / mid_shift's gradients (planes 0 and 1), reduced in a fixed order.
        ws = torch.empty((2, tiles, cm), dtype=torch.float32, device=dev) if mid_affine else dummy
        planes = int(mid_scale is not None) + int(mid_shift is not None)
        last, counters, last_meta = _last_program_sums(tiles, cfg.BLOCK_C, planes, dev, c_tiles, dummy)
        K.sep_bwd_mid_kernel[grid](
            *gy_src[:4], x, dw_weight, pw_weight, _or(in_scale, dummy), _or(in_shift, dummy), _or(mid_scale, dummy),
            _or(mid_shift, dummy), g_dw_out, ws, g_mid_scale, g_mid_shift,
            counters, *geo, *x_args, *gy_src[4:], *g_dw_out.stride(),
            **gy_flags, **flags_in, HAS_MID_SCALE=mid_scale is not None, HAS_MID_SHIFT=mid_shift is not None,
            VEC=_row_vector([x, g_dw_out, *gy_src[:2], pw_weight], [cm, k_out]), **last_meta, **cfg.meta(True))
        if mid_affine and not last:
            _reduce_pair(ws, g_mid_scale if mid_scale is not None else None,
                         g_mid_shift if mid_shift is not None else None)

    run_mid(autotune.choose("sep_bwd_mid", src_key, autotune.gemm_configs(dtype), run_mid))
    del gy_src, gy_buf  # grad_y is no longer needed: freed before passes 4 and 5 allocate their workspaces

    # 4. grad_dw_weight, the input through the prologue on load.
    _wgrad(g_dw_out, x, grad_dw, conv, in_scale, in_shift, bool(in_relu))

    # 5. grad_x, with the prologue's backward fused.
    _dgrad(g_dw_out, dw_weight, grad_x, conv, x, in_scale, in_shift, bool(in_relu), g_in_scale, g_in_shift)
    return result


# ------------------------------------------------------------------------------------------------ max pooling

def _pool_tile(t: torch.Tensor) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C): along channels where they are the fastest dimension, along pixels otherwise."""
    return (16, 128) if _channels_last(t) else (128, 8)


def _pool_acc(dtype: torch.dtype):
    return triton.language.float64 if dtype == torch.float64 else triton.language.float32


@_on_device
def max_pool2d(x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
               ceil_mode: bool, save_argmax: bool, *, scale: torch.Tensor | None = None,
               shift: torch.Tensor | None = None,
               residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """max_pool_fwd_kernel: the pooled values in x's layout and, with save_argmax, the argmax codes (uint8); with
    scale and shift, of fma(x, scale, shift) in their dtype (float32 or float64) rounded to x's, plus residual when
    given."""
    _check_device(x)
    n, c, h, w = (int(v) for v in x.shape)
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    oh, ow = pool_out_size(h, kh, sh, ph, ceil_mode), pool_out_size(w, kw, sw, pw, ceil_mode)
    fmt = output_memory_format(x)
    out = torch.empty((n, c, oh, ow), dtype=x.dtype, device=x.device, memory_format=fmt)
    codes = (torch.empty((n, c, oh, ow), dtype=torch.uint8, device=x.device, memory_format=fmt) if save_argmax
             else x.new_empty((0,), dtype=torch.uint8))
    q = n * oh * ow
    if q == 0 or c == 0:
        return out, codes
    block_p, block_c = _pool_tile(x)
    code_arg = codes if save_argmax else out
    res_arg = out if residual is None else residual
    affine = scale is not None
    if affine:
        scale, shift = scale.contiguous(), shift.contiguous()
    grid = (_cdiv(q, block_p) * _cdiv(c, block_c),)
    _kernels().max_pool_fwd_kernel[grid](
        x, out, code_arg, scale if affine else out, shift if affine else out, res_arg, q, oh * ow, ow, h, w, c,
        *x.stride(), *out.stride(), *code_arg.stride(), *res_arg.stride(),
        KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, SAVE=save_argmax, AFFINE=affine, RESIDUAL=residual is not None,
        ACC=_pool_acc(x.dtype), IDX64=_idx64(x, out, res_arg), BLOCK_P=block_p, BLOCK_C=block_c,
        VEC=_row_vector([x, out, code_arg, res_arg], [c]), num_warps=4)
    return out, codes


@_on_device
def max_pool2d_backward(grad_out: torch.Tensor, argmax: torch.Tensor, input_size: Sequence[int],
                        kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                        ceil_mode: bool) -> torch.Tensor:
    """max_pool_bwd_kernel: the gradient of x in argmax's layout (the forward's)."""
    _check_device(grad_out)
    n, c, h, w = (int(v) for v in input_size)
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    oh, ow = int(grad_out.shape[2]), int(grad_out.shape[3])
    grad_x = torch.empty((n, c, h, w), dtype=grad_out.dtype, device=grad_out.device,
                         memory_format=output_memory_format(argmax))
    q = n * h * w
    if q == 0 or c == 0:
        return grad_x
    block_p, block_c = _pool_tile(grad_x)
    grid = (_cdiv(q, block_p) * _cdiv(c, block_c),)
    _kernels().max_pool_bwd_kernel[grid](
        grad_out, argmax, grad_x, q, h * w, w, oh, ow, c, *grad_out.stride(), *argmax.stride(), *grad_x.stride(),
        KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, WIN_H=_cdiv(kh, sh), WIN_W=_cdiv(kw, sw),
        ACC=_pool_acc(grad_out.dtype), IDX64=_idx64(grad_out, argmax, grad_x), BLOCK_P=block_p, BLOCK_C=block_c,
        VEC=_row_vector([grad_x, grad_out, argmax], [c]), num_warps=4)
    return grad_x


@_on_device
def max_pool2d_scale_shift_backward(grad_out: torch.Tensor, argmax: torch.Tensor, x: torch.Tensor,
                                    scale: torch.Tensor, shift: torch.Tensor, kernel_size: Sequence[int],
                                    stride: Sequence[int], padding: Sequence[int],
                                    ceil_mode: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """max_pool_bwd_bn_kernel: (grad_x in x's layout, sum of g x, sum of g), the sums in scale's dtype. float64
    (x or the vectors) takes the pool's backward and the reference scale_shift_backward: the sums' workspace and
    reduce_rows_kernel are float32."""
    _check_device(x)
    if x.dtype == torch.float64 or scale.dtype == torch.float64:
        grad_z = max_pool2d_backward(grad_out, argmax, x.shape, kernel_size, stride, padding, ceil_mode)
        return torch.ops.xception_ops.scale_shift_backward(grad_z, x, scale, shift, False, "torch")
    n, c, h, w = (int(v) for v in x.shape)
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    oh, ow = int(grad_out.shape[2]), int(grad_out.shape[3])
    grad_x = torch.empty((n, c, h, w), dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))
    grad_scale = torch.empty((c,), dtype=torch.float32, device=x.device)
    grad_shift = torch.empty((c,), dtype=torch.float32, device=x.device)
    q = n * h * w
    if q == 0 or c == 0:
        return grad_x, grad_scale.zero_(), grad_shift.zero_()
    block_p, block_c = _pool_tile(grad_x)
    tiles = _cdiv(q, block_p)
    ws = torch.empty((2, tiles, c), dtype=torch.float32, device=x.device)
    scale = scale.contiguous()
    _kernels().max_pool_bwd_bn_kernel[(tiles * _cdiv(c, block_c),)](
        grad_out, argmax, x, scale, grad_x, ws, q, h * w, w, oh, ow, c, *grad_out.stride(), *argmax.stride(),
        *x.stride(), *grad_x.stride(), KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, WIN_H=_cdiv(kh, sh),
        WIN_W=_cdiv(kw, sw), IDX64=_idx64(grad_out, argmax, x, grad_x, extra=[2 * tiles * c]), BLOCK_P=block_p,
        BLOCK_C=block_c, VEC=_row_vector([grad_x, grad_out, argmax, x], [c]), num_warps=4)
    _reduce_rows(ws, grad_scale, grad_shift)
    return grad_x, grad_scale, grad_shift
