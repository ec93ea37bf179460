"""Triton kernel bodies for xception_ops (no torch, no launch logic: see launch.py).

Semantics are those of csrc/reference.cpp. Conventions shared by every kernel:

* Pixels are flattened: a forward-side pixel index q runs over N * OH * OW (input-side kernels over N * H * W)
  and is split into (n, oh, ow) in the kernel, so small images still fill a tile.
* Every tensor is read and written through its own element strides (NCHW, NHWC or any strided view).
* The math is float32. Values the reference holds in the input dtype (the prologue's affine, the depthwise
  result, the pointwise result y) are rounded to that dtype at the same points, so masks such as `affine > 0`
  and the statistics of y agree with the reference.
* IDX64 (set by the launcher when a tensor spans 2^31 elements or more) makes every index int64.
* Per-channel reductions (weight gradients, statistics, BN-parameter gradients) never use atomics on the results:
  each program writes its partial sums to its own row of a float32 workspace, and the rows are summed in a fixed
  order, both planes of a pair of sums (a BatchNorm's two) together: by `reduce_rows_kernel` launches, or, where
  the rows are few (the launcher's LAST), inside the kernel by the program that finishes last among those sharing
  the columns (`_sum_rows_if_last`: an arrival counter is the only atomic). Results are bitwise reproducible for a
  given launch configuration.
* Flags are tl.constexpr, so every option compiles away when off.
* The separable op's mid stage: the depthwise sum d rounded to x's dtype, then, with the mid affine
  (HAS_MID_SCALE / HAS_MID_SHIFT), pre = round(fma(d, mid_scale, mid_shift)), then the mid activation MID
  (_mid_pre, _mid_act). Every kernel that forms it does so through these two, so the fused forward, the act
  buffer (by taps or by rows) and the backward's recomputation agree bit for bit.
"""

import triton
import triton.language as tl

MID_NONE = 0
MID_RELU = 1
MID_ELU = 2
MID_RELU6 = 3
MID_HARDSWISH = 4


# ------------------------------------------------------------------------------------------------ helpers
# tl.sum, tl.cdiv and tl.zeros are themselves @triton.jit functions, decorated once when triton.language is
# imported: in a process that imports triton before setting TRITON_INTERPRET=1 they cannot run in the
# interpreter. The kernels use these equivalents, which follow kernels.py (re-imported by launch.py when the
# variable changes). _sum is tl.sum's own definition: tl.reduce (a builtin) with triton's add combiner, which
# the interpreter recognizes by identity and sums with numpy without calling it.

@triton.jit
def _sum(v, axis: tl.constexpr):
    return tl.reduce(v, axis, tl.standard._sum_combine)


@triton.jit
def _cdiv(a, b):
    return (a + b - 1) // b


@triton.jit
def _index(v, IDX64: tl.constexpr):
    if IDX64:
        return v.to(tl.int64)
    else:
        return v


@triton.jit
def _pixels(pid_p, total, HW, W, IDX64: tl.constexpr, BLOCK_P: tl.constexpr):
    """The tile's flattened pixel indices split into (n, h, w), and the in-range mask."""
    q = _index(pid_p, IDX64) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = q < total
    n = q // HW
    r = q - n * HW
    h = r // W
    w = r - h * W
    return n, h, w, mask


@triton.jit
def _channel_mask(c, C, VEC: tl.constexpr):
    """c < C, written so that the compiler sees it constant over groups of VEC channels (the launcher's VEC divides
    C): a masked load or store along channels is then vectorized (`c < C` alone is not, unless C is a multiple of
    16 that Triton specialized)."""
    if VEC > 1:
        return (c // VEC) < (C // VEC)
    else:
        return c < C


@triton.jit
def _rows(base, h, w, sh, sw, VEC: tl.constexpr):
    """Pixels' offsets base + h * sh + w * sw in a tensor, which the launcher found to be multiples of VEC elements
    (_row_vector), told to the compiler: Triton specializes strides divisible by 16 only, and 728 channels are not,
    so it could not vectorize along channels otherwise. (The sum is formed here, not passed in: a hint on a
    function's argument is lost.)"""
    v = base + h * sh + w * sw
    if VEC > 1:
        v = tl.multiple_of(v, VEC)
    return v


@triton.jit
def _program_tile(C, BLOCK: tl.constexpr, VEC: tl.constexpr):
    """The 1-D grid's program as (pixel tile, BLOCK of the C channels), channels fastest in the program id:
    (pixel-tile index, channel indices, channel mask, number of pixel tiles)."""
    pid = tl.program_id(0)
    num_c = _cdiv(C, BLOCK)
    pid_p = pid // num_c
    c = (pid - pid_p * num_c) * BLOCK + tl.arange(0, BLOCK)
    return pid_p, c, _channel_mask(c, C, VEC), tl.num_programs(0) // num_c


@triton.jit
def _unflatten3(index, inner, middle):
    """index = (outer * middle + m) * inner + i as (i, m, outer)."""
    rest = index // inner
    outer = rest // middle
    return index - rest * inner, rest - outer * middle, outer


@triton.jit
def _round(v, DTYPE: tl.constexpr):
    """v as the reference holds it in DTYPE (a no-op for float32)."""
    return v.to(DTYPE).to(tl.float32)


@triton.jit
def _prologue_params(in_scale_ptr, in_shift_ptr, ic, c_mask, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    """A per-channel scale and shift as float32 [BLOCK_C] (1 and 0 where absent): the prologue's, indexed by input
    channel, and the mid affine's, by depthwise channel."""
    if HAS_SCALE:
        scale = tl.load(in_scale_ptr + ic, mask=c_mask, other=1.0).to(tl.float32)
    else:
        scale = tl.full([BLOCK_C], 1.0, tl.float32)
    if HAS_SHIFT:
        shift = tl.load(in_shift_ptr + ic, mask=c_mask, other=0.0).to(tl.float32)
    else:
        shift = tl.full([BLOCK_C], 0.0, tl.float32)
    return scale, shift


@triton.jit
def _load_input(x_ptr, offs, mask, scale, shift, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                IN_RELU: tl.constexpr):
    """What the depthwise stage reads: relu?(x * scale + shift) in x's dtype; zero outside the image (the
    padding comes after the prologue)."""
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE or HAS_SHIFT:
        if HAS_SCALE:
            v = v * scale[None, :]
        if HAS_SHIFT:
            v = v + shift[None, :]
        v = _round(v, x_ptr.dtype.element_ty)
        if IN_RELU:
            v = _relu(v)
        v = tl.where(mask, v, 0.0)
    elif IN_RELU:
        v = _relu(v)
    return v


@triton.jit
def _dw_tap(acc, x_ptr, dw_ptr, x_row, x_col, w_col, ih0, iw0, p_mask, c_mask, scale, shift, kh, kw,
            H, W, sxh, sxw, swh, sww, dil_h, dil_w,
            HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, IN_RELU: tl.constexpr, VEC: tl.constexpr):
    ih = ih0 + kh * dil_h
    iw = iw0 + kw * dil_w
    ok = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    mask = ok[:, None] & c_mask[None, :]
    offs = _rows(x_row, ih, iw, sxh, sxw, VEC)[:, None] + x_col[None, :]
    v = _load_input(x_ptr, offs, mask, scale, shift, HAS_SCALE, HAS_SHIFT, IN_RELU)
    wv = tl.load(dw_ptr + w_col + kh * swh + kw * sww, mask=c_mask, other=0.0).to(tl.float32)
    return acc + v * wv[None, :]


@triton.jit
def _dw_tile(x_ptr, dw_ptr, in_scale_ptr, in_shift_ptr, n, oh, ow, p_mask, oc, c_mask,
             H, W, M, stride_h, stride_w, pad_t, pad_l, dil_h, dil_w,
             sxn, sxc, sxh, sxw, swo, swh, sww,
             KH: tl.constexpr, KW: tl.constexpr, UNROLL: tl.constexpr,
             HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, IN_RELU: tl.constexpr, IDX64: tl.constexpr,
             BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr):
    """The depthwise result for BLOCK_P output pixels x BLOCK_C depthwise channels, float32, in registers."""
    ic = oc // M
    scale, shift = _prologue_params(in_scale_ptr, in_shift_ptr, ic, c_mask, HAS_SCALE, HAS_SHIFT, BLOCK_C)
    x_row = n * sxn
    x_col = _index(ic, IDX64) * sxc
    w_col = _index(oc, IDX64) * swo
    ih0 = oh * stride_h - pad_t
    iw0 = ow * stride_w - pad_l
    acc = tl.full([BLOCK_P, BLOCK_C], 0.0, tl.float32)
    if UNROLL:
        for kh in tl.static_range(KH):
            for kw in tl.static_range(KW):
                acc = _dw_tap(acc, x_ptr, dw_ptr, x_row, x_col, w_col, ih0, iw0, p_mask, c_mask, scale, shift,
                              kh, kw, H, W, sxh, sxw, swh, sww, dil_h, dil_w, HAS_SCALE, HAS_SHIFT, IN_RELU, VEC)
    else:
        for kh in range(KH):
            for kw in range(KW):
                acc = _dw_tap(acc, x_ptr, dw_ptr, x_row, x_col, w_col, ih0, iw0, p_mask, c_mask, scale, shift,
                              kh, kw, H, W, sxh, sxw, swh, sww, dil_h, dil_w, HAS_SCALE, HAS_SHIFT, IN_RELU, VEC)
    return acc


@triton.jit
def _mid_pre(d, scale, shift, HAS_MID_SCALE: tl.constexpr, HAS_MID_SHIFT: tl.constexpr, DTYPE: tl.constexpr):
    """The mid activation's input from the depthwise sum d (float32): d rounded to DTYPE and, with the mid affine,
    round(fma(d, scale, shift)) (scale, shift: [BLOCK_C] float32 from _prologue_params). Without it, d rounded."""
    d = _round(d, DTYPE)
    if HAS_MID_SCALE and HAS_MID_SHIFT:
        d = _round(tl.fma(d, scale[None, :], shift[None, :]), DTYPE)  # one rounding, as the contract's fmaf
    elif HAS_MID_SCALE:
        d = _round(d * scale[None, :], DTYPE)
    elif HAS_MID_SHIFT:
        d = _round(d + shift[None, :], DTYPE)
    return d


@triton.jit
def _relu(v):
    """PyTorch's ReLU: NaN stays NaN (tl.maximum's default, NaN -> 0, would hide a diverged activation from the
    loss and from AMP's overflow check)."""
    return tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _mid_act(d, MID: tl.constexpr):
    if MID == 1:
        d = _relu(d)
    elif MID == 2:
        d = tl.where(d > 0, d, tl.exp(d) - 1.0)
    elif MID == 3:  # relu6, NaN kept as F.relu6 keeps it
        d = tl.minimum(_relu(d), 6.0, propagate_nan=tl.PropagateNan.ALL)
    elif MID == 4:  # hardswish, in PyTorch's order: d * clamp(d + 3, 0, 6) / 6, the division rounded as IEEE's
        d = tl.math.div_rn(d * tl.minimum(tl.maximum(d + 3.0, 0.0), 6.0), 6.0)
    return d


@triton.jit
def _dot(a, b, acc, DOT_PREC: tl.constexpr):
    """acc + a @ b. DOT_PREC "fp32" (the launcher's choice for bf16 in the interpreter only, which multiplies bf16
    operands' raw bits: triton-lang/triton#11584): the operands converted to float32 first, where a bf16 product
    is exact, so the sums are those of a GPU's bf16 products accumulated in float32."""
    if DOT_PREC == "fp32":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _pw_chunk(acc, mid, pw_ptr, oc, c_mask, pw_row, k_mask, spc, DOT_PREC: tl.constexpr, IDX64: tl.constexpr):
    """acc + mid @ pw[k, oc]^T with tl.dot: one chunk of depthwise channels of the pointwise GEMM. mid is the
    act(dw) tile in x's dtype (BLOCK_P x BLOCK_C), zero outside the tile."""
    pw = tl.load(pw_ptr + (_index(oc, IDX64) * spc)[:, None] + pw_row[None, :],
                 mask=c_mask[:, None] & k_mask[None, :], other=0.0)
    return _dot(mid, pw, acc, DOT_PREC)


@triton.jit
def _sep_y_tile(x_ptr, dw_ptr, pw_ptr, in_scale_ptr, in_shift_ptr, mid_scale_ptr, mid_shift_ptr,
                n, oh, ow, p_mask, k, k_mask, C_DW, H, W, M, stride_h, stride_w, pad_t, pad_l, dil_h, dil_w,
                sxn, sxc, sxh, sxw, swo, swh, sww, spk, spc,
                KH: tl.constexpr, KW: tl.constexpr, UNROLL: tl.constexpr,
                HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, IN_RELU: tl.constexpr, MID: tl.constexpr,
                HAS_MID_SCALE: tl.constexpr, HAS_MID_SHIFT: tl.constexpr, DOT_PREC: tl.constexpr, IDX64: tl.constexpr,
                BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr):
    """The pointwise result y for BLOCK_P pixels x BLOCK_K output channels: for each chunk of BLOCK_C depthwise
    channels, the depthwise tile is computed in registers and multiplied into the accumulator with tl.dot.
    The depthwise intermediate never leaves the chip."""
    acc = tl.full([BLOCK_P, BLOCK_K], 0.0, tl.float32)
    pw_row = _index(k, IDX64) * spk
    if VEC > 1:  # the weight's rows are whole vectors too (the launcher's VEC divides spk)
        pw_row = tl.multiple_of(pw_row, VEC)
    for c0 in range(0, C_DW, BLOCK_C):
        oc = c0 + tl.arange(0, BLOCK_C)
        c_mask = _channel_mask(oc, C_DW, VEC)
        d = _dw_tile(x_ptr, dw_ptr, in_scale_ptr, in_shift_ptr, n, oh, ow, p_mask, oc, c_mask,
                     H, W, M, stride_h, stride_w, pad_t, pad_l, dil_h, dil_w, sxn, sxc, sxh, sxw, swo, swh, sww,
                     KH, KW, UNROLL, HAS_SCALE, HAS_SHIFT, IN_RELU, IDX64, BLOCK_P, BLOCK_C, VEC)
        m_scale, m_shift = _prologue_params(mid_scale_ptr, mid_shift_ptr, oc, c_mask, HAS_MID_SCALE, HAS_MID_SHIFT,
                                            BLOCK_C)
        pre = _mid_pre(d, m_scale, m_shift, HAS_MID_SCALE, HAS_MID_SHIFT, x_ptr.dtype.element_ty)
        mid = _mid_act(pre, MID)
        if HAS_MID_SHIFT:  # pre is the shift past the last pixel: zero there, as the staged form's masked loads
            mid = tl.where(p_mask[:, None], mid, 0.0)
        acc = _pw_chunk(acc, mid.to(x_ptr.dtype.element_ty), pw_ptr, oc, c_mask, pw_row, k_mask, spc, DOT_PREC,
                        IDX64)
    return acc


@triton.jit
def _sep_y_from_act(mid_ptr, pw_ptr, n, oh, ow, p_mask, k, k_mask, C_DW, smn, smc, smh, smw, spk, spc,
                    DOT_PREC: tl.constexpr, IDX64: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr):
    """_sep_y_tile with the act(dw) tiles read from the buffer sep_bwd_act_kernel wrote instead of computed:
    the same operand bit for bit (zero outside the tile, as the computed one is), the same chunks of BLOCK_C
    depthwise channels in the same order into the same float32 accumulator, so with the forward's launch
    configuration y is the forward's y bit for bit."""
    acc = tl.full([BLOCK_P, BLOCK_K], 0.0, tl.float32)
    pw_row = _index(k, IDX64) * spk
    if VEC > 1:  # the weight's rows are whole vectors too (the launcher's VEC divides spk)
        pw_row = tl.multiple_of(pw_row, VEC)
    m_row = _rows(n * smn, oh, ow, smh, smw, VEC)
    for c0 in range(0, C_DW, BLOCK_C):
        oc = c0 + tl.arange(0, BLOCK_C)
        c_mask = _channel_mask(oc, C_DW, VEC)
        mid = tl.load(mid_ptr + m_row[:, None] + (_index(oc, IDX64) * smc)[None, :],
                      mask=p_mask[:, None] & c_mask[None, :], other=0.0)
        acc = _pw_chunk(acc, mid, pw_ptr, oc, c_mask, pw_row, k_mask, spc, DOT_PREC, IDX64)
    return acc


@triton.jit
def _grad_y_tile(go_ptr, out_ptr, out_scale_ptr, gsum_ptr, n, oh, ow, p_mask, k, k_mask,
                 sgn, sgk, sgh, sgw, son, sok, soh, sow,
                 OUT_RELU: tl.constexpr, HAS_OSCALE: tl.constexpr, HAS_GSUM: tl.constexpr, IDX64: tl.constexpr,
                 VEC: tl.constexpr):
    """The gradient of the pointwise result y, float32, zero outside the tile: the epilogue's backward folded
    into the load of grad_out (relu mask from the saved output, out_scale, the gradient of the sum statistic).
    With every flag off it is a plain load (of grad_out, or of a materialized grad_y)."""
    mask = p_mask[:, None] & k_mask[None, :]
    kk = _index(k, IDX64)
    g = tl.load(go_ptr + _rows(n * sgn, oh, ow, sgh, sgw, VEC)[:, None] + (kk * sgk)[None, :], mask=mask,
                other=0.0).to(tl.float32)
    if OUT_RELU:
        o = tl.load(out_ptr + _rows(n * son, oh, ow, soh, sow, VEC)[:, None] + (kk * sok)[None, :], mask=mask,
                    other=0.0)
        g = tl.where(o > 0, g, 0.0)
    if HAS_OSCALE:
        g = g * tl.load(out_scale_ptr + k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_GSUM:
        g = g + tl.load(gsum_ptr + k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
        g = tl.where(mask, g, 0.0)
    return g


# ------------------------------------------------------------------------------------------------ reduction

@triton.jit
def _arrives_last(counter_ptr, slot, ROWS):
    """Counts this program's arrival at `slot`, one of ROWS programs that store partial rows of the same columns,
    and says whether it is the last of them. Called once its partial stores are issued: the barrier orders every
    thread's stores before the arrival (the counter is an acquire-release atomic at GPU scope, one thread's), and
    the last program reads the partials through L2 (.cg). CUTLASS's split-K semaphore has the same shape."""
    tl.debug_barrier()
    return tl.atomic_add(counter_ptr + slot, 1, sem="acq_rel", scope="gpu") == ROWS - 1


@triton.jit
def _sum_rows_if_last(ws_ptr, out0_ptr, out1_ptr, counter_ptr, slot, ROWS, ROW, offs, mask,
                      TWO: tl.constexpr, BLOCK_R: tl.constexpr):
    """The in-kernel end of a reduction, called by every program once it has stored its partial row: ROWS
    programs share these columns (`slot`), each storing row r of the workspace (ws_ptr + r * ROW + offs, offs and
    mask 1-D over the program's columns; with TWO a second plane ROWS * ROW further on). The last of them to
    arrive (_arrives_last) sums the ROWS rows in row order, BLOCK_R at a time (the order reduce_rows_kernel's one
    level takes), stores plane 0's sums to out0_ptr + offs and plane 1's to out1_ptr + offs in those pointers'
    dtypes, and sets the slot's counter back to 0 for the next launch on the stream. One launch where the kernel
    and reduce_rows_kernel were two or three: Triton's launcher, tens of microseconds a launch, bounds an eager
    training step."""
    if _arrives_last(counter_ptr, slot, ROWS):
        acc0 = tl.full([BLOCK_R, offs.shape[0]], 0.0, tl.float32)
        acc1 = tl.full([BLOCK_R, offs.shape[0]], 0.0, tl.float32)
        for r0 in range(0, ROWS, BLOCK_R):
            rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
            m = (rows < ROWS)[:, None] & mask[None, :]
            acc0 += tl.load(ws_ptr + (rows * ROW)[:, None] + offs[None, :], mask=m, other=0.0, cache_modifier=".cg")
            if TWO:  # (plane 1's row r is row ROWS + r of the workspace)
                acc1 += tl.load(ws_ptr + ((rows + ROWS) * ROW)[:, None] + offs[None, :], mask=m, other=0.0,
                                cache_modifier=".cg")
        tl.store(out0_ptr + offs, _sum(acc0, axis=0).to(out0_ptr.dtype.element_ty), mask=mask)
        if TWO:
            tl.store(out1_ptr + offs, _sum(acc1, axis=0).to(out1_ptr.dtype.element_ty), mask=mask)
        tl.atomic_xchg(counter_ptr + slot, 0)


@triton.jit
def _sum_tiles_if_last(ws_ptr, out_ptr, counter_ptr, slot, ROWS, ROW, offs, mask, BLOCK_R: tl.constexpr):
    """_sum_rows_if_last for a weight gradient's 2-D tile of each row (offs and mask [A, B]): one plane."""
    if _arrives_last(counter_ptr, slot, ROWS):
        acc = tl.full([BLOCK_R, offs.shape[0], offs.shape[1]], 0.0, tl.float32)
        for r0 in range(0, ROWS, BLOCK_R):
            rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
            m = (rows < ROWS)[:, None, None] & mask[None, :, :]
            acc += tl.load(ws_ptr + (rows * ROW)[:, None, None] + offs[None, :, :], mask=m, other=0.0,
                           cache_modifier=".cg")
        tl.store(out_ptr + offs, _sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=mask)
        tl.atomic_xchg(counter_ptr + slot, 0)


@triton.jit
def _sum_plane_pair_if_last(ws_ptr, plane, out0_ptr, out1_ptr, counter_ptr, slot, ROWS, ROW, offs, mask,
                            HAS0: tl.constexpr, HAS1: tl.constexpr, BLOCK_R: tl.constexpr):
    """_sum_rows_if_last for a pair of sums either of which may be absent (plane: plane 1's offset in ws)."""
    if HAS0:
        _sum_rows_if_last(ws_ptr, out0_ptr, out1_ptr, counter_ptr, slot, ROWS, ROW, offs, mask, HAS1, BLOCK_R)
    else:
        _sum_rows_if_last(ws_ptr + plane, out1_ptr, out1_ptr, counter_ptr, slot, ROWS, ROW, offs, mask, False,
                          BLOCK_R)


@triton.jit
def reduce_rows_kernel(ws_ptr, out0_ptr, out1_ptr, R, COLS, ROWS_PER_PROGRAM,
                       BLOCK_R: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Sums of ws[plane, r, j] over the rows r of group g (ROWS_PER_PROGRAM rows from g * ROWS_PER_PROGRAM), ws
    float32 row-major [planes, R, COLS], always in the same order. Grid: (column blocks, row groups, planes).
    With one row group the sums are the result: plane 0's go to out0, plane 1's to out1, each in its pointer's
    dtype. With several, the level's partial sums go to out0 as [planes, groups, COLS] float32."""
    cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    c_mask = cols < COLS
    group = tl.program_id(1).to(tl.int64)
    plane = tl.program_id(2).to(tl.int64)
    plane_ptr = ws_ptr + plane * R * COLS
    first = group * ROWS_PER_PROGRAM
    acc = tl.full([BLOCK_R, BLOCK_COLS], 0.0, tl.float32)
    for r0 in range(0, ROWS_PER_PROGRAM, BLOCK_R):
        local = r0 + tl.arange(0, BLOCK_R)
        rows = first + local
        mask = ((local < ROWS_PER_PROGRAM) & (rows < R))[:, None] & c_mask[None, :]
        acc += tl.load(plane_ptr + rows[:, None] * COLS + cols[None, :], mask=mask, other=0.0)
    total = _sum(acc, axis=0)
    groups = tl.num_programs(1)
    to_out1 = (groups == 1) & (plane == 1)  # (there is a plane 1 only with two outputs)
    tl.store(out1_ptr + cols, total.to(out1_ptr.dtype.element_ty), mask=c_mask & to_out1)
    tl.store(out0_ptr + (plane * groups + group) * COLS + cols, total.to(out0_ptr.dtype.element_ty),
             mask=c_mask & ~to_out1)


# ------------------------------------------------------------------------------------------------ depthwise

@triton.jit
def dw_fwd_kernel(x_ptr, dw_ptr, bias_ptr, y_ptr,
                  Q, OHW, OW, H, W, C_DW, M, stride_h, stride_w, pad_t, pad_l, dil_h, dil_w,
                  sxn, sxc, sxh, sxw, swo, swh, sww, syn, syc, syh, syw,
                  KH: tl.constexpr, KW: tl.constexpr, UNROLL: tl.constexpr, HAS_BIAS: tl.constexpr,
                  IDX64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr):
    """Depthwise forward: one program per BLOCK_P output pixels x BLOCK_C output channels. VEC (the launcher's
    _row_vector of x and y, and of the channels): the pixels' offsets and the channel count are its multiples."""
    pid_p, oc, c_mask, num_p = _program_tile(C_DW, BLOCK_C, VEC)
    n, oh, ow, p_mask = _pixels(pid_p, Q, OHW, OW, IDX64, BLOCK_P)
    acc = _dw_tile(x_ptr, dw_ptr, x_ptr, x_ptr, n, oh, ow, p_mask, oc, c_mask,
                   H, W, M, stride_h, stride_w, pad_t, pad_l, dil_h, dil_w, sxn, sxc, sxh, sxw, swo, swh, sww,
                   KH, KW, UNROLL, False, False, False, IDX64, BLOCK_P, BLOCK_C, VEC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + oc, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    offs = _rows(n * syn, oh, ow, syh, syw, VEC)[:, None] + (_index(oc, IDX64) * syc)[None, :]
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=p_mask[:, None] & c_mask[None, :])


@triton.jit
def _row_tile(x_ptr, x_base, ih, iw, row_ok, w_mask, c_mask, x_col, W, sxh, sxw, scale, shift,
              HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, IN_RELU: tl.constexpr, VEC: tl.constexpr):
    """Input row ih at columns iw (one per output column of the tile) through the prologue: [BLOCK_W, BLOCK_C],
    float32, zero outside the image."""
    ok = row_ok & w_mask & (iw >= 0) & (iw < W)
    offs = _rows(x_base, ih, iw, sxh, sxw, VEC)[:, None] + x_col[None, :]
    return _load_input(x_ptr, offs, ok[:, None] & c_mask[None, :], scale, shift, HAS_SCALE, HAS_SHIFT, IN_RELU)


@triton.jit
def _row_taps(x_ptr, x_base, ih, H, iw0, w_mask, c_mask, x_col, W, sxh, sxw, scale, shift,
              HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, IN_RELU: tl.constexpr, VEC: tl.constexpr):
    """Input row ih as a 3-wide kernel row's three taps read it for the tile's output columns: the tiles at
    columns iw0, iw0 + 1 and iw0 + 2."""
    row_ok = (ih >= 0) & (ih < H)
    left = _row_tile(x_ptr, x_base, ih, iw0, row_ok, w_mask, c_mask, x_col, W, sxh, sxw, scale, shift,
                     HAS_SCALE, HAS_SHIFT, IN_RELU, VEC)
    middle = _row_tile(x_ptr, x_base, ih, iw0 + 1, row_ok, w_mask, c_mask, x_col, W, sxh, sxw, scale, shift,
                       HAS_SCALE, HAS_SHIFT, IN_RELU, VEC)
    right = _row_tile(x_ptr, x_base, ih, iw0 + 2, row_ok, w_mask, c_mask, x_col, W, sxh, sxw, scale, shift,
                      HAS_SCALE, HAS_SHIFT, IN_RELU, VEC)
    return left, middle, right


@triton.jit
def dw_rows_kernel(x_ptr, dw_ptr, bias_ptr, in_scale_ptr, in_shift_ptr, mid_scale_ptr, mid_shift_ptr, y_ptr,
                   OH, OW, H, W, C_DW, M, pad_t, pad_l, STRIP,
                   sxn, sxc, sxh, sxw, swo, swh, sww, syn, syc, syh, syw,
                   HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, IN_RELU: tl.constexpr,
                   MID: tl.constexpr, HAS_MID_SCALE: tl.constexpr, HAS_MID_SHIFT: tl.constexpr, IDX64: tl.constexpr,
                   BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr):
    """The depthwise stage, 3x3 at stride 1 without dilation, by rows: one program per (image, strip of STRIP output
    rows, BLOCK_W output columns, BLOCK_C depthwise channels) walks its rows down and keeps the three input rows its
    taps read, so that each input row is loaded once per strip as three column-shifted tiles: 3 loads per output
    row where dw_fwd_kernel's tap gathers make 9 (its depthwise forward ran at 2.3x cuDNN's time in bf16
    channels-last on the H200, session 9).

    Computes relu?(x * in_scale + in_shift) read as x is, the taps summed in dw_fwd_kernel's order (kernel row, then
    column), plus the bias; with MID or the mid affine, the mid stage applied (_mid_pre, _mid_act), as
    sep_bwd_act_kernel does. Stores the result in y's dtype: bit for bit the gather kernels' values."""
    pid = tl.program_id(0)
    num_c = _cdiv(C_DW, BLOCK_C)
    num_w = _cdiv(OW, BLOCK_W)
    num_s = _cdiv(OH, STRIP)
    pid_c, pid_w, rest = _unflatten3(pid, num_c, num_w)
    pid_s = rest % num_s
    n = rest // num_s
    oc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = _channel_mask(oc, C_DW, VEC)
    ic = oc // M
    ow = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    w_mask = ow < OW
    iw0 = ow - pad_l
    scale, shift = _prologue_params(in_scale_ptr, in_shift_ptr, ic, c_mask, HAS_SCALE, HAS_SHIFT, BLOCK_C)
    x_base = _index(n, IDX64) * sxn
    y_base = _index(n, IDX64) * syn
    x_col = _index(ic, IDX64) * sxc
    y_col = _index(oc, IDX64) * syc
    w_col = _index(oc, IDX64) * swo
    w00 = tl.load(dw_ptr + w_col, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    w01 = tl.load(dw_ptr + w_col + sww, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    w02 = tl.load(dw_ptr + w_col + 2 * sww, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    w10 = tl.load(dw_ptr + w_col + swh, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    w11 = tl.load(dw_ptr + w_col + swh + sww, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    w12 = tl.load(dw_ptr + w_col + swh + 2 * sww, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    w20 = tl.load(dw_ptr + w_col + 2 * swh, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    w21 = tl.load(dw_ptr + w_col + 2 * swh + sww, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    w22 = tl.load(dw_ptr + w_col + 2 * swh + 2 * sww, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + oc, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    m_scale, m_shift = _prologue_params(mid_scale_ptr, mid_shift_ptr, oc, c_mask, HAS_MID_SCALE, HAS_MID_SHIFT,
                                        BLOCK_C)
    o0 = pid_s * STRIP
    o_end = tl.minimum(o0 + STRIP, OH)
    ih0 = o0 - pad_t
    a0, a1, a2 = _row_taps(x_ptr, x_base, ih0, H, iw0, w_mask, c_mask, x_col, W, sxh, sxw, scale, shift,
                           HAS_SCALE, HAS_SHIFT, IN_RELU, VEC)
    b0, b1, b2 = _row_taps(x_ptr, x_base, ih0 + 1, H, iw0, w_mask, c_mask, x_col, W, sxh, sxw, scale, shift,
                           HAS_SCALE, HAS_SHIFT, IN_RELU, VEC)
    store_mask = w_mask[:, None] & c_mask[None, :]
    for o in range(o0, o_end):
        c0, c1, c2 = _row_taps(x_ptr, x_base, o - pad_t + 2, H, iw0, w_mask, c_mask, x_col, W, sxh, sxw, scale,
                               shift, HAS_SCALE, HAS_SHIFT, IN_RELU, VEC)
        acc = tl.full([BLOCK_W, BLOCK_C], 0.0, tl.float32)
        acc = acc + a0 * w00
        acc = acc + a1 * w01
        acc = acc + a2 * w02
        acc = acc + b0 * w10
        acc = acc + b1 * w11
        acc = acc + b2 * w12
        acc = acc + c0 * w20
        acc = acc + c1 * w21
        acc = acc + c2 * w22
        if HAS_BIAS:
            acc += bias
        if MID != 0 or HAS_MID_SCALE or HAS_MID_SHIFT:
            acc = _mid_act(_mid_pre(acc, m_scale, m_shift, HAS_MID_SCALE, HAS_MID_SHIFT, x_ptr.dtype.element_ty),
                           MID)
        offs = _rows(y_base, o, ow, syh, syw, VEC)[:, None] + y_col[None, :]
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=store_mask)
        a0, a1, a2 = b0, b1, b2
        b0, b1, b2 = c0, c1, c2


@triton.jit
def dw_dgrad_kernel(g_ptr, dw_ptr, gx_ptr, x_ptr, in_scale_ptr, in_shift_ptr, ws_ptr, gscale_ptr, gshift_ptr,
                    counter_ptr, Q_IN, HW, W, C, OH, OW, M, stride_h, stride_w, pad_t, pad_l, dil_h, dil_w,
                    sgn, sgc, sgh, sgw, swo, swh, sww, sxn, sxc, sxh, sxw, son, soc, soh, sow,
                    KH: tl.constexpr, KW: tl.constexpr, UNROLL: tl.constexpr,
                    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, IN_RELU: tl.constexpr, IDX64: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr, LAST: tl.constexpr = False,
                    BLOCK_R: tl.constexpr = 1):
    """Depthwise input gradient, gather form: one program per BLOCK_P input pixels x BLOCK_C input channels,
    summing over m < M and the taps that reach each pixel (deterministic, no atomics).

    With the separable prologue (x * in_scale + in_shift, relu) its backward is fused into the epilogue: the
    relu mask is recomputed from x, the per-channel partial sums of grad * x (for in_scale) and grad (for
    in_shift) go to rows pid_p of the workspace planes 0 and 1 ([2, num_pixel_tiles, C]), and grad_x = grad *
    in_scale is stored; with LAST the column block's last program sums them into gscale_ptr / gshift_ptr. VEC: as
    in dw_fwd_kernel, over the gradients, x and the channels."""
    pid_p, c, c_mask, num_p = _program_tile(C, BLOCK_C, VEC)
    n, ih, iw, p_mask = _pixels(pid_p, Q_IN, HW, W, IDX64, BLOCK_P)
    g_row = n * sgn
    th0 = ih + pad_t
    tw0 = iw + pad_l
    acc = tl.full([BLOCK_P, BLOCK_C], 0.0, tl.float32)
    for m in range(M):
        oc = _index(c * M + m, IDX64)
        g_col = oc * sgc
        w_col = oc * swo
        if UNROLL:
            for kh in tl.static_range(KH):
                for kw in tl.static_range(KW):
                    acc = _dgrad_tap(acc, g_ptr, dw_ptr, g_row, g_col, w_col, th0, tw0, p_mask, c_mask, kh, kw,
                                     OH, OW, stride_h, stride_w, dil_h, dil_w, sgh, sgw, swh, sww, VEC)
        else:
            for kh in range(KH):
                for kw in range(KW):
                    acc = _dgrad_tap(acc, g_ptr, dw_ptr, g_row, g_col, w_col, th0, tw0, p_mask, c_mask, kh, kw,
                                     OH, OW, stride_h, stride_w, dil_h, dil_w, sgh, sgw, swh, sww, VEC)
    mask = p_mask[:, None] & c_mask[None, :]
    cc = _index(c, IDX64)
    if HAS_SCALE or HAS_SHIFT or IN_RELU:
        xv = tl.load(x_ptr + _rows(n * sxn, ih, iw, sxh, sxw, VEC)[:, None] + (cc * sxc)[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        scale, shift = _prologue_params(in_scale_ptr, in_shift_ptr, c, c_mask, HAS_SCALE, HAS_SHIFT, BLOCK_C)
        if IN_RELU:
            a = xv
            if HAS_SCALE or HAS_SHIFT:
                a = _round(xv * scale[None, :] + shift[None, :], x_ptr.dtype.element_ty)
            acc = tl.where(a > 0, acc, 0.0)
        row = pid_p.to(tl.int64) * C
        plane = num_p.to(tl.int64) * C
        if HAS_SCALE:
            tl.store(ws_ptr + row + c, _sum(tl.where(mask, acc * xv, 0.0), axis=0), mask=c_mask)
            if HAS_SHIFT:
                tl.store(ws_ptr + plane + row + c, _sum(tl.where(mask, acc, 0.0), axis=0), mask=c_mask)
            acc = acc * scale[None, :]
        elif HAS_SHIFT:
            tl.store(ws_ptr + plane + row + c, _sum(tl.where(mask, acc, 0.0), axis=0), mask=c_mask)
        if LAST:
            _sum_plane_pair_if_last(ws_ptr, plane, gscale_ptr, gshift_ptr, counter_ptr,
                                    tl.program_id(0) - pid_p * _cdiv(C, BLOCK_C), num_p, C, c, c_mask,
                                    HAS_SCALE, HAS_SHIFT, BLOCK_R)
    offs = _rows(n * son, ih, iw, soh, sow, VEC)[:, None] + (cc * soc)[None, :]
    tl.store(gx_ptr + offs, acc.to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dgrad_tap(acc, g_ptr, dw_ptr, g_row, g_col, w_col, th0, tw0, p_mask, c_mask, kh, kw,
               OH, OW, stride_h, stride_w, dil_h, dil_w, sgh, sgw, swh, sww, VEC: tl.constexpr):
    # Tap (kh, kw) reaches input pixel (ih, iw) from output pixel (oh, ow) when ih + pad_t - kh * dil_h
    # = oh * stride_h, likewise for w.
    th = th0 - kh * dil_h
    tw = tw0 - kw * dil_w
    oh = tl.maximum(th, 0) // stride_h
    ow = tl.maximum(tw, 0) // stride_w
    ok = p_mask & (th >= 0) & (tw >= 0) & (oh * stride_h == th) & (ow * stride_w == tw) & (oh < OH) & (ow < OW)
    gv = tl.load(g_ptr + _rows(g_row, oh, ow, sgh, sgw, VEC)[:, None] + g_col[None, :],
                 mask=ok[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
    wv = tl.load(dw_ptr + w_col + kh * swh + kw * sww, mask=c_mask, other=0.0).to(tl.float32)
    return acc + gv * wv[None, :]


@triton.jit
def dw_wgrad_kernel(g_ptr, x_ptr, in_scale_ptr, in_shift_ptr, ws_ptr, gw_ptr, counter_ptr,
                    Q, OHW, OW, H, W, C_DW, M, T, TILES_PER_SLICE,
                    stride_h, stride_w, pad_t, pad_l, dil_h, dil_w,
                    sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw,
                    KW: tl.constexpr, TAPS: tl.constexpr, BLOCK_T: tl.constexpr,
                    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, IN_RELU: tl.constexpr, IDX64: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr, LAST: tl.constexpr = False,
                    BLOCK_R: tl.constexpr = 1):
    """Depthwise weight gradient, partial sums: one program per (pixel slice, BLOCK_C channels, group of TAPS
    taps). It walks its slice of TILES_PER_SLICE pixel tiles, reads each grad tile once, and keeps one float32
    partial per (tap, channel); the partials go to row `slice` of the workspace [num_slices, C_DW, T], which
    reduce_rows_kernel then sums in a fixed order (with LAST, the last program of the (taps, channels) block, into
    gw_ptr). The input goes through the separable prologue on load. VEC: as in dw_fwd_kernel, over the gradient, x
    and the channels."""
    pid_g, pid_c, s = _unflatten3(tl.program_id(0), _cdiv(T, TAPS), _cdiv(C_DW, BLOCK_C))
    oc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = _channel_mask(oc, C_DW, VEC)
    ic = oc // M
    scale, shift = _prologue_params(in_scale_ptr, in_shift_ptr, ic, c_mask, HAS_SCALE, HAS_SHIFT, BLOCK_C)
    g_col = _index(oc, IDX64) * sgc
    x_col = _index(ic, IDX64) * sxc
    t_ids = tl.arange(0, BLOCK_T)
    acc = tl.full([BLOCK_T, BLOCK_C], 0.0, tl.float32)
    for i in range(TILES_PER_SLICE):
        n, oh, ow, p_mask = _pixels(s * TILES_PER_SLICE + i, Q, OHW, OW, IDX64, BLOCK_P)
        gv = tl.load(g_ptr + _rows(n * sgn, oh, ow, sgh, sgw, VEC)[:, None] + g_col[None, :],
                     mask=p_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
        x_row = n * sxn
        ih0 = oh * stride_h - pad_t
        iw0 = ow * stride_w - pad_l
        for j in tl.static_range(TAPS):
            t = pid_g * TAPS + j
            kh = t // KW
            kw = t - kh * KW
            ih = ih0 + kh * dil_h
            iw = iw0 + kw * dil_w
            ok = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W) & (t < T)
            mask = ok[:, None] & c_mask[None, :]
            v = _load_input(x_ptr, _rows(x_row, ih, iw, sxh, sxw, VEC)[:, None] + x_col[None, :], mask, scale,
                            shift, HAS_SCALE, HAS_SHIFT, IN_RELU)
            part = _sum(gv * v, axis=0)
            acc = tl.where(t_ids[:, None] == j, acc + part[None, :], acc)
    t_glob = pid_g * TAPS + t_ids
    in_row = (_index(oc, IDX64) * T)[None, :] + t_glob[:, None]
    mask = ((t_ids < TAPS) & (t_glob < T))[:, None] & c_mask[None, :]
    tl.store(ws_ptr + s.to(tl.int64) * C_DW * T + in_row, acc, mask=mask)
    if LAST:
        num_g = _cdiv(T, TAPS)
        blocks = num_g * _cdiv(C_DW, BLOCK_C)
        _sum_tiles_if_last(ws_ptr, gw_ptr, counter_ptr, tl.program_id(0) - s * blocks, tl.num_programs(0) // blocks,
                           C_DW * T, in_row, mask, BLOCK_R)


# ------------------------------------------------------------------------------------------------ separable

@triton.jit
def sep_fwd_kernel(x_ptr, dw_ptr, pw_ptr, in_scale_ptr, in_shift_ptr, mid_scale_ptr, mid_shift_ptr, out_scale_ptr,
                   out_shift_ptr, res_ptr, out_ptr, ws_ptr, mid_ptr, sum_ptr, sumsq_ptr, counter_ptr,
                   Q, OHW, OW, H, W, C_DW, K, M, stride_h, stride_w, pad_t, pad_l, dil_h, dil_w,
                   sxn, sxc, sxh, sxw, swo, swh, sww, spk, spc, srn, srk, srh, srw, son, sok, soh, sow,
                   smn, smc, smh, smw,
                   KH: tl.constexpr, KW: tl.constexpr, UNROLL: tl.constexpr,
                   HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, IN_RELU: tl.constexpr, MID: tl.constexpr,
                   HAS_MID_SCALE: tl.constexpr, HAS_MID_SHIFT: tl.constexpr,
                   HAS_OSCALE: tl.constexpr, HAS_OSHIFT: tl.constexpr, HAS_RES: tl.constexpr,
                   OUT_RELU: tl.constexpr, STATS: tl.constexpr, FROM_ACT: tl.constexpr, DOT_PREC: tl.constexpr,
                   IDX64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                   VEC: tl.constexpr, LAST: tl.constexpr = False, BLOCK_R: tl.constexpr = 1):
    """Separable forward: one program per BLOCK_P output pixels x BLOCK_K output channels.

    y = pw(act(dw(relu?(x * in_scale + in_shift)) * mid_scale + mid_shift)), then the epilogue
    out = relu?(y * out_scale + out_shift + residual). Fused (FROM_ACT off): the depthwise tile is computed on
    chip (_sep_y_tile), once per output-channel tile. Staged (FROM_ACT): the act(dw) tiles are read from the
    buffer sep_bwd_act_kernel wrote (_sep_y_from_act: the same operand and accumulation, so y is the fused form's
    bit for bit). With STATS, the tile's per-channel partial sums of y and y^2 go to row pid_p of the workspace
    planes 0 and 1 ([2, num_pixel_tiles, K]); with LAST, the program that finishes a column block last sums them
    into sum_ptr and sumsq_ptr (_sum_rows_if_last). VEC: as in dw_fwd_kernel, over x, the act buffer, the residual
    and out, and both channel counts."""
    pid_p, k, k_mask, num_p = _program_tile(K, BLOCK_K, VEC)
    n, oh, ow, p_mask = _pixels(pid_p, Q, OHW, OW, IDX64, BLOCK_P)
    if FROM_ACT:
        acc = _sep_y_from_act(mid_ptr, pw_ptr, n, oh, ow, p_mask, k, k_mask, C_DW, smn, smc, smh, smw, spk, spc,
                              DOT_PREC, IDX64, BLOCK_P, BLOCK_C, BLOCK_K, VEC)
    else:
        acc = _sep_y_tile(x_ptr, dw_ptr, pw_ptr, in_scale_ptr, in_shift_ptr, mid_scale_ptr, mid_shift_ptr,
                          n, oh, ow, p_mask, k, k_mask, C_DW, H, W, M, stride_h, stride_w, pad_t, pad_l, dil_h, dil_w,
                          sxn, sxc, sxh, sxw, swo, swh, sww, spk, spc,
                          KH, KW, UNROLL, HAS_SCALE, HAS_SHIFT, IN_RELU, MID, HAS_MID_SCALE, HAS_MID_SHIFT,
                          DOT_PREC, IDX64, BLOCK_P, BLOCK_C, BLOCK_K, VEC)
    mask = p_mask[:, None] & k_mask[None, :]
    y = tl.where(mask, _round(acc, x_ptr.dtype.element_ty), 0.0)
    if STATS:
        row = pid_p.to(tl.int64) * K
        plane = num_p.to(tl.int64) * K
        tl.store(ws_ptr + row + k, _sum(y, axis=0), mask=k_mask)
        tl.store(ws_ptr + plane + row + k, _sum(y * y, axis=0), mask=k_mask)
        if LAST:
            _sum_rows_if_last(ws_ptr, sum_ptr, sumsq_ptr, counter_ptr, tl.program_id(0) - pid_p * _cdiv(K, BLOCK_K),
                              num_p, K, k, k_mask, True, BLOCK_R)
    z = y
    if HAS_OSCALE:
        z = z * tl.load(out_scale_ptr + k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_OSHIFT:
        z = z + tl.load(out_shift_ptr + k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
    kk = _index(k, IDX64)
    if HAS_RES:
        z = z + tl.load(res_ptr + _rows(n * srn, oh, ow, srh, srw, VEC)[:, None] + (kk * srk)[None, :],
                        mask=mask, other=0.0).to(tl.float32)
    if OUT_RELU:
        z = _relu(z)
    offs = _rows(n * son, oh, ow, soh, sow, VEC)[:, None] + (kk * sok)[None, :]
    tl.store(out_ptr + offs, z.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def sep_bwd_epilogue_kernel(go_ptr, out_ptr, out_scale_ptr, gsum_ptr, gsumsq_ptr, mid_ptr, pw_ptr, ws_ptr, gy_ptr,
                            goscale_ptr, goshift_ptr, counter_ptr,
                            Q, OHW, OW, C_DW, K, TILES_PER_SLICE, smn, smc, smh, smw, spk, spc,
                            sgn, sgk, sgh, sgw, son, sok, soh, sow, syn, syk, syh, syw,
                            NEED_Y: tl.constexpr, OUT_RELU: tl.constexpr,
                            HAS_OSCALE: tl.constexpr, HAS_OSHIFT: tl.constexpr, HAS_GSUM: tl.constexpr,
                            WRITE_GY: tl.constexpr, DOT_PREC: tl.constexpr, IDX64: tl.constexpr,
                            BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr,
                            LAST: tl.constexpr = False, BLOCK_R: tl.constexpr = 1):
    """Separable backward, epilogue part (runs only when out_scale / out_shift have gradients or grad_sumsq is
    given): one program per (pixel slice, BLOCK_K output channels) walks its slice's TILES_PER_SLICE pixel
    tiles. For each it forms y when needed (NEED_Y) as the GEMM of the act(dw) buffer (sep_bwd_act_kernel, x's
    dtype) and the pointwise weight (_sep_y_from_act: the forward's operand and accumulation), accumulates the
    partial sums of grad_z * y (for out_scale) and grad_z (for out_shift), and with WRITE_GY materializes
    grad_y = grad_z * out_scale + grad_sum + 2 * y * grad_sumsq in x's dtype. The sums go to row `slice` of
    the workspace planes 0 and 1 ([2, num_slices, K]): per slice rather than per tile, so that the workspace,
    live together with the act buffer and grad_y, does not grow with the number of pixels. With LAST the column
    block's last program sums them into goscale_ptr / goshift_ptr."""
    pid = tl.program_id(0)
    num_k = _cdiv(K, BLOCK_K)
    s = pid // num_k
    k = (pid - s * num_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = _channel_mask(k, K, VEC)
    if WRITE_GY:
        gy_scale = tl.full([BLOCK_K], 1.0, tl.float32)
        if HAS_OSCALE:
            gy_scale = tl.load(out_scale_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
        gy_shift = tl.full([BLOCK_K], 0.0, tl.float32)
        if HAS_GSUM:
            gy_shift = tl.load(gsum_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
        gsumsq = tl.load(gsumsq_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
    sum_gzy = tl.full([BLOCK_K], 0.0, tl.float32)
    sum_gz = tl.full([BLOCK_K], 0.0, tl.float32)
    for i in range(TILES_PER_SLICE):
        n, oh, ow, p_mask = _pixels(s * TILES_PER_SLICE + i, Q, OHW, OW, IDX64, BLOCK_P)
        mask = p_mask[:, None] & k_mask[None, :]
        gz = _grad_y_tile(go_ptr, out_ptr, out_scale_ptr, gsum_ptr, n, oh, ow, p_mask, k, k_mask,
                          sgn, sgk, sgh, sgw, son, sok, soh, sow, OUT_RELU, False, False, IDX64, VEC)
        if NEED_Y:
            acc = _sep_y_from_act(mid_ptr, pw_ptr, n, oh, ow, p_mask, k, k_mask, C_DW, smn, smc, smh, smw,
                                  spk, spc, DOT_PREC, IDX64, BLOCK_P, BLOCK_C, BLOCK_K, VEC)
            y = tl.where(mask, _round(acc, mid_ptr.dtype.element_ty), 0.0)
        if HAS_OSCALE:
            sum_gzy += _sum(gz * y, axis=0)
        if HAS_OSHIFT:
            sum_gz += _sum(gz, axis=0)
        if WRITE_GY:
            gy = gz
            if HAS_OSCALE:
                gy = gy * gy_scale[None, :]
            if HAS_GSUM:
                gy = gy + gy_shift[None, :]
            gy = gy + 2.0 * y * gsumsq[None, :]
            offs = _rows(n * syn, oh, ow, syh, syw, VEC)[:, None] + (_index(k, IDX64) * syk)[None, :]
            tl.store(gy_ptr + offs, gy.to(gy_ptr.dtype.element_ty), mask=mask)
    row = s.to(tl.int64) * K
    plane = (tl.num_programs(0) // num_k).to(tl.int64) * K
    if HAS_OSCALE:
        tl.store(ws_ptr + row + k, sum_gzy, mask=k_mask)
    if HAS_OSHIFT:
        tl.store(ws_ptr + plane + row + k, sum_gz, mask=k_mask)
    if LAST:
        _sum_plane_pair_if_last(ws_ptr, plane, goscale_ptr, goshift_ptr, counter_ptr, pid - s * num_k,
                                tl.num_programs(0) // num_k, K, k, k_mask, HAS_OSCALE, HAS_OSHIFT, BLOCK_R)


@triton.jit
def sep_bwd_mid_kernel(go_ptr, out_ptr, out_scale_ptr, gsum_ptr,
                       x_ptr, dw_ptr, pw_ptr, in_scale_ptr, in_shift_ptr, mid_scale_ptr, mid_shift_ptr, g_ptr, ws_ptr,
                       gmscale_ptr, gmshift_ptr, counter_ptr,
                       Q, OHW, OW, H, W, C_DW, K, M, stride_h, stride_w, pad_t, pad_l, dil_h, dil_w,
                       sxn, sxc, sxh, sxw, swo, swh, sww, spk, spc,
                       sgn, sgk, sgh, sgw, son, sok, soh, sow, sdn, sdc, sdh, sdw,
                       KH: tl.constexpr, KW: tl.constexpr, UNROLL: tl.constexpr,
                       HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, IN_RELU: tl.constexpr, MID: tl.constexpr,
                       HAS_MID_SCALE: tl.constexpr, HAS_MID_SHIFT: tl.constexpr,
                       OUT_RELU: tl.constexpr, HAS_OSCALE: tl.constexpr, HAS_GSUM: tl.constexpr,
                       DOT_PREC: tl.constexpr, IDX64: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr,
                       LAST: tl.constexpr = False, BLOCK_R: tl.constexpr = 1):
    """Separable backward, gradient of the depthwise output: one program per BLOCK_P pixels x BLOCK_C depthwise
    channels. grad_mid = grad_y @ W as tl.dot over chunks of BLOCK_K output channels (grad_y folded from
    grad_out, or read from its materialized buffer); the mid activation's backward uses its input pre
    (_mid_pre of the depthwise result, recomputed in registers). The result (grad of the depthwise output) is
    stored in x's dtype. VEC: as in dw_fwd_kernel, over x, the result, grad_y's source, out, the weight and both
    channel counts.

    With the mid affine, grad_pre (act' applied, rounded to x's dtype as the reference holds the gradient of
    pre) gives the stored grad_d = grad_pre * mid_scale, and the tile's per-channel partial sums of
    grad_pre * d (for mid_scale) and grad_pre (for mid_shift) go to row pid_p of the workspace planes 0 and 1
    ([2, num_pixel_tiles, C_DW]), as dw_dgrad_kernel does for in_scale / in_shift (and with LAST, into
    gmscale_ptr / gmshift_ptr)."""
    pid_p, oc, c_mask, num_p = _program_tile(C_DW, BLOCK_C, VEC)
    n, oh, ow, p_mask = _pixels(pid_p, Q, OHW, OW, IDX64, BLOCK_P)
    pw_col = _index(oc, IDX64) * spc
    gmid = tl.full([BLOCK_P, BLOCK_C], 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = _channel_mask(k, K, VEC)
        gy = _grad_y_tile(go_ptr, out_ptr, out_scale_ptr, gsum_ptr, n, oh, ow, p_mask, k, k_mask,
                          sgn, sgk, sgh, sgw, son, sok, soh, sow, OUT_RELU, HAS_OSCALE, HAS_GSUM, IDX64, VEC)
        w_row = _index(k, IDX64) * spk
        if VEC > 1:  # the weight's rows are whole vectors (the launcher's VEC divides spk)
            w_row = tl.multiple_of(w_row, VEC)
        w = tl.load(pw_ptr + w_row[:, None] + pw_col[None, :], mask=k_mask[:, None] & c_mask[None, :], other=0.0)
        gmid = _dot(gy.to(x_ptr.dtype.element_ty), w, gmid, DOT_PREC)
    # The depthwise result is needed for act' (of pre) and for mid_scale's gradient (of d itself).
    if MID != 0 or HAS_MID_SCALE:
        d = _dw_tile(x_ptr, dw_ptr, in_scale_ptr, in_shift_ptr, n, oh, ow, p_mask, oc, c_mask,
                     H, W, M, stride_h, stride_w, pad_t, pad_l, dil_h, dil_w, sxn, sxc, sxh, sxw, swo, swh, sww,
                     KH, KW, UNROLL, HAS_SCALE, HAS_SHIFT, IN_RELU, IDX64, BLOCK_P, BLOCK_C, VEC)
        d = _round(d, x_ptr.dtype.element_ty)  # (_mid_pre rounds it so first; mid_scale's gradient needs it so)
        m_scale, m_shift = _prologue_params(mid_scale_ptr, mid_shift_ptr, oc, c_mask, HAS_MID_SCALE, HAS_MID_SHIFT,
                                            BLOCK_C)
        pre = _mid_pre(d, m_scale, m_shift, HAS_MID_SCALE, HAS_MID_SHIFT, x_ptr.dtype.element_ty)
        if MID == 1:
            gmid = tl.where(pre > 0, gmid, 0.0)
        elif MID == 2:
            gmid = tl.where(pre > 0, gmid, gmid * tl.exp(tl.minimum(pre, 0.0)))
        elif MID == 3:  # relu6: PyTorch's hardtanh passes the gradient strictly inside (0, 6)
            gmid = tl.where((pre > 0) & (pre < 6.0), gmid, 0.0)
        elif MID == 4:  # hardswish, as PyTorch's backward: 0 up to -3, grad * (pre / 3 + 1/2) below 3, grad from 3
            gmid = tl.where(pre <= -3.0, 0.0, tl.where(pre < 3.0, gmid * (tl.math.div_rn(pre, 3.0) + 0.5), gmid))
    mask = p_mask[:, None] & c_mask[None, :]
    if HAS_MID_SCALE or HAS_MID_SHIFT:
        g_pre = tl.where(mask, _round(gmid, x_ptr.dtype.element_ty), 0.0)
        row = pid_p.to(tl.int64) * C_DW
        plane = num_p.to(tl.int64) * C_DW
        if HAS_MID_SCALE:
            tl.store(ws_ptr + row + oc, _sum(g_pre * d, axis=0), mask=c_mask)
            gmid = g_pre * m_scale[None, :]
        else:
            gmid = g_pre
        if HAS_MID_SHIFT:
            tl.store(ws_ptr + plane + row + oc, _sum(g_pre, axis=0), mask=c_mask)
        if LAST:
            _sum_plane_pair_if_last(ws_ptr, plane, gmscale_ptr, gmshift_ptr, counter_ptr,
                                    tl.program_id(0) - pid_p * _cdiv(C_DW, BLOCK_C), num_p, C_DW, oc, c_mask,
                                    HAS_MID_SCALE, HAS_MID_SHIFT, BLOCK_R)
    offs = _rows(n * sdn, oh, ow, sdh, sdw, VEC)[:, None] + (_index(oc, IDX64) * sdc)[None, :]
    tl.store(g_ptr + offs, gmid.to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def sep_bwd_act_kernel(x_ptr, dw_ptr, in_scale_ptr, in_shift_ptr, mid_scale_ptr, mid_shift_ptr, mid_ptr,
                       Q, OHW, OW, H, W, C_DW, M, stride_h, stride_w, pad_t, pad_l, dil_h, dil_w,
                       sxn, sxc, sxh, sxw, swo, swh, sww, smn, smc, smh, smw,
                       KH: tl.constexpr, KW: tl.constexpr, UNROLL: tl.constexpr,
                       HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, IN_RELU: tl.constexpr, MID: tl.constexpr,
                       HAS_MID_SCALE: tl.constexpr, HAS_MID_SHIFT: tl.constexpr, IDX64: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr):
    """The depthwise stage's activated result act(dw(relu?(x * in_scale + in_shift)) * mid_scale + mid_shift),
    computed once: for the staged forward (sep_fwd_kernel with FROM_ACT) and, in the backward, for y (the
    epilogue pass) and the pointwise weight gradient: one program per BLOCK_P pixels x BLOCK_C depthwise channels.
    The values stored (in x's dtype) are bit for bit the operand the fused forward gives tl.dot (_sep_y_tile):
    the depthwise sum rounded to x's dtype, the mid affine rounded again (_mid_pre), the mid activation in
    float32, rounded again. VEC: as in dw_fwd_kernel, over x, the buffer and the depthwise channels."""
    pid_p, oc, c_mask, num_p = _program_tile(C_DW, BLOCK_C, VEC)
    n, oh, ow, p_mask = _pixels(pid_p, Q, OHW, OW, IDX64, BLOCK_P)
    d = _dw_tile(x_ptr, dw_ptr, in_scale_ptr, in_shift_ptr, n, oh, ow, p_mask, oc, c_mask,
                 H, W, M, stride_h, stride_w, pad_t, pad_l, dil_h, dil_w, sxn, sxc, sxh, sxw, swo, swh, sww,
                 KH, KW, UNROLL, HAS_SCALE, HAS_SHIFT, IN_RELU, IDX64, BLOCK_P, BLOCK_C, VEC)
    m_scale, m_shift = _prologue_params(mid_scale_ptr, mid_shift_ptr, oc, c_mask, HAS_MID_SCALE, HAS_MID_SHIFT,
                                        BLOCK_C)
    pre = _mid_pre(d, m_scale, m_shift, HAS_MID_SCALE, HAS_MID_SHIFT, x_ptr.dtype.element_ty)
    mid = _mid_act(pre, MID).to(x_ptr.dtype.element_ty)
    offs = _rows(n * smn, oh, ow, smh, smw, VEC)[:, None] + (_index(oc, IDX64) * smc)[None, :]
    tl.store(mid_ptr + offs, mid.to(mid_ptr.dtype.element_ty), mask=p_mask[:, None] & c_mask[None, :])


@triton.jit
def sep_bwd_pw_kernel(go_ptr, out_ptr, out_scale_ptr, gsum_ptr, mid_ptr, ws_ptr, gpw_ptr, counter_ptr,
                      Q, OHW, OW, C_DW, K, TILES_PER_SLICE,
                      smn, smc, smh, smw, sgn, sgk, sgh, sgw, son, sok, soh, sow,
                      OUT_RELU: tl.constexpr, HAS_OSCALE: tl.constexpr, HAS_GSUM: tl.constexpr,
                      DOT_PREC: tl.constexpr, IDX64: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr,
                      LAST: tl.constexpr = False, BLOCK_R: tl.constexpr = 1):
    """Separable backward, pointwise weight gradient, partial sums: one program per (pixel slice, BLOCK_K output
    channels, BLOCK_C depthwise channels) accumulates grad_y^T @ act(dw) with tl.dot over its slice's pixel
    tiles, act(dw) read from the buffer sep_bwd_act_kernel wrote (in x's dtype, the forward's tl.dot operand),
    and writes row `slice` of the workspace [num_slices, K, C_DW]; reduce_rows_kernel sums the rows in a fixed
    order (with LAST, the block's last program, into gpw_ptr). VEC: as in dw_fwd_kernel, over the act buffer,
    grad_y's source, out and both channel counts."""
    pid_c, pid_k, s = _unflatten3(tl.program_id(0), _cdiv(C_DW, BLOCK_C), _cdiv(K, BLOCK_K))
    oc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = _channel_mask(oc, C_DW, VEC)
    m_col = _index(oc, IDX64) * smc
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = _channel_mask(k, K, VEC)
    acc = tl.full([BLOCK_K, BLOCK_C], 0.0, tl.float32)
    for i in range(TILES_PER_SLICE):
        n, oh, ow, p_mask = _pixels(s * TILES_PER_SLICE + i, Q, OHW, OW, IDX64, BLOCK_P)
        gy = _grad_y_tile(go_ptr, out_ptr, out_scale_ptr, gsum_ptr, n, oh, ow, p_mask, k, k_mask,
                          sgn, sgk, sgh, sgw, son, sok, soh, sow, OUT_RELU, HAS_OSCALE, HAS_GSUM, IDX64, VEC)
        mid = tl.load(mid_ptr + _rows(n * smn, oh, ow, smh, smw, VEC)[:, None] + m_col[None, :],
                      mask=p_mask[:, None] & c_mask[None, :], other=0.0)
        acc = _dot(tl.trans(gy.to(mid_ptr.dtype.element_ty)), mid, acc, DOT_PREC)
    in_row = (_index(k, IDX64) * C_DW)[:, None] + oc[None, :]
    mask = k_mask[:, None] & c_mask[None, :]
    tl.store(ws_ptr + s.to(tl.int64) * K * C_DW + in_row, acc, mask=mask)
    if LAST:
        blocks = _cdiv(C_DW, BLOCK_C) * _cdiv(K, BLOCK_K)
        _sum_tiles_if_last(ws_ptr, gpw_ptr, counter_ptr, tl.program_id(0) - s * blocks, tl.num_programs(0) // blocks,
                           K * C_DW, in_row, mask, BLOCK_R)


# ------------------------------------------------------------------------------------------------ max pooling

@triton.jit
def max_pool_fwd_kernel(x_ptr, out_ptr, code_ptr, scale_ptr, shift_ptr, res_ptr, Q, OHW, OW, H, W, C,
                        sxn, sxc, sxh, sxw, son, soc, soh, sow, scn, scc, sch, scw, srn, src, srh, srw,
                        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr,
                        PW: tl.constexpr, SAVE: tl.constexpr, AFFINE: tl.constexpr, RESIDUAL: tl.constexpr,
                        ACC: tl.constexpr, IDX64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                        VEC: tl.constexpr):
    """Max pooling (csrc/kernels/pool_params.h's rules): one program per (BLOCK_P output pixels, BLOCK_C channels)
    compares the window's taps inside the image in (ky, kx) order in ACC (float32; float64 for float64), keeping
    the first maximum or the last NaN, and stores it (exact: an input value) with, when SAVE, the tap's index
    ky * KW + kx as one byte. A window whose values are all -inf keeps its first tap inside the image.
    AFFINE: each tap normalized first, fma(x, scale, shift) in the vectors' dtype rounded to x's (a pending
    BatchNorm); RESIDUAL:
    the maximum plus the residual, rounded once (a shortcut added)."""
    pid_p, c, c_mask, _ = _program_tile(C, BLOCK_C, VEC)
    if AFFINE:
        scale = tl.load(scale_ptr + c, mask=c_mask, other=1.0)  # computed in their dtype, as scale_shift's
        shift = tl.load(shift_ptr + c, mask=c_mask, other=0.0)
    n, oh, ow, p_mask = _pixels(pid_p, Q, OHW, OW, IDX64, BLOCK_P)
    h0 = oh * SH - PH
    w0 = ow * SW - PW
    first = tl.maximum(-h0, 0) * KW + tl.maximum(-w0, 0)
    code = tl.full([BLOCK_P, BLOCK_C], 0, tl.int32) + first[:, None]
    best = tl.full([BLOCK_P, BLOCK_C], float("-inf"), ACC)
    x_row = n * sxn
    x_col = _index(c, IDX64) * sxc
    for ky in tl.static_range(KH):
        for kx in tl.static_range(KW):
            ih = h0 + ky
            iw = w0 + kx
            ok = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            mask = ok[:, None] & c_mask[None, :]
            offs = _rows(x_row, ih, iw, sxh, sxw, VEC)[:, None] + x_col[None, :]
            v = tl.load(x_ptr + offs, mask=mask, other=float("-inf")).to(ACC)
            if AFFINE:
                v = tl.fma(v.to(scale.dtype), scale[None, :], shift[None, :]).to(x_ptr.dtype.element_ty).to(ACC)
            take = mask & ((v > best) | (v != v))
            best = tl.where(take, v, best)
            code = tl.where(take, ky * KW + kx, code)
    keep = p_mask[:, None] & c_mask[None, :]
    if RESIDUAL:
        res_offs = _rows(n * srn, oh, ow, srh, srw, VEC)[:, None] + (_index(c, IDX64) * src)[None, :]
        best = best + tl.load(res_ptr + res_offs, mask=keep, other=0.0).to(ACC)
    out_offs = _rows(n * son, oh, ow, soh, sow, VEC)[:, None] + (_index(c, IDX64) * soc)[None, :]
    tl.store(out_ptr + out_offs, best.to(out_ptr.dtype.element_ty), mask=keep)
    if SAVE:
        code_offs = _rows(n * scn, oh, ow, sch, scw, VEC)[:, None] + (_index(c, IDX64) * scc)[None, :]
        tl.store(code_ptr + code_offs, code.to(tl.uint8), mask=keep)


@triton.jit
def _pool_window_grads(go_ptr, code_ptr, n, ih, iw, p_mask, c_off, c_mask, OH, OW, sgn, sgc, sgh, sgw,
                       scn, scc, sch, scw, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                       PH: tl.constexpr, PW: tl.constexpr, WIN_H: tl.constexpr, WIN_W: tl.constexpr,
                       ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr):
    """The gradient that reaches each input position of the tile, not yet rounded. An input position lies in at
    most WIN_H x WIN_W windows (oh from ceil((ih + PH - KH + 1) / SH) to (ih + PH) / SH); their codes are read in
    (oh, ow) order and the gradient of each window whose code names this position is added in ACC."""
    lo_h = ih + (PH - KH + 1)
    lo_w = iw + (PW - KW + 1)
    oh0 = (tl.where(lo_h > 0, lo_h, 0) + (SH - 1)) // SH
    ow0 = (tl.where(lo_w > 0, lo_w, 0) + (SW - 1)) // SW
    oh_end = tl.minimum((ih + PH) // SH + 1, OH)
    ow_end = tl.minimum((iw + PW) // SW + 1, OW)
    acc = tl.full([BLOCK_P, BLOCK_C], 0.0, ACC)
    for dy in tl.static_range(WIN_H):
        oh = oh0 + dy
        ky = ih - (oh * SH - PH)
        for dx in tl.static_range(WIN_W):
            ow = ow0 + dx
            tap = ky * KW + iw - (ow * SW - PW)
            ok = p_mask & (oh < oh_end) & (ow < ow_end)
            mask = ok[:, None] & c_mask[None, :]
            code = tl.load(code_ptr + _rows(n * scn, oh, ow, sch, scw, VEC)[:, None] + (c_off * scc)[None, :],
                           mask=mask, other=0).to(tl.int32)
            hit = mask & (code == tap[:, None])
            g = tl.load(go_ptr + _rows(n * sgn, oh, ow, sgh, sgw, VEC)[:, None] + (c_off * sgc)[None, :],
                        mask=hit, other=0.0).to(ACC)
            acc = acc + g  # + 0 where not hit: the sum is never -0, so that adds nothing
    return acc


@triton.jit
def max_pool_bwd_kernel(go_ptr, code_ptr, gx_ptr, Q, HW, W, OH, OW, C,
                        sgn, sgc, sgh, sgw, scn, scc, sch, scw, sxn, sxc, sxh, sxw,
                        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr,
                        PW: tl.constexpr, WIN_H: tl.constexpr, WIN_W: tl.constexpr, ACC: tl.constexpr,
                        IDX64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr):
    """Max pooling's gradient, gathered: one program per (BLOCK_P input pixels, BLOCK_C channels), each window's
    gradient added to its argmax in ACC (_pool_window_grads) and rounded once: PyTorch's order and precision. Every
    element is written (no zero fill), with no atomics."""
    pid_p, c, c_mask, _ = _program_tile(C, BLOCK_C, VEC)
    n, ih, iw, p_mask = _pixels(pid_p, Q, HW, W, IDX64, BLOCK_P)
    c_off = _index(c, IDX64)
    acc = _pool_window_grads(go_ptr, code_ptr, n, ih, iw, p_mask, c_off, c_mask, OH, OW, sgn, sgc, sgh, sgw,
                             scn, scc, sch, scw, KH, KW, SH, SW, PH, PW, WIN_H, WIN_W, ACC, BLOCK_P, BLOCK_C, VEC)
    offs = _rows(n * sxn, ih, iw, sxh, sxw, VEC)[:, None] + (c_off * sxc)[None, :]
    tl.store(gx_ptr + offs, acc.to(gx_ptr.dtype.element_ty), mask=p_mask[:, None] & c_mask[None, :])


@triton.jit
def max_pool_bwd_bn_kernel(go_ptr, code_ptr, x_ptr, scale_ptr, gx_ptr, ws_ptr, Q, HW, W, OH, OW, C,
                           sgn, sgc, sgh, sgw, scn, scc, sch, scw, sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw,
                           KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                           PH: tl.constexpr, PW: tl.constexpr, WIN_H: tl.constexpr, WIN_W: tl.constexpr,
                           IDX64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr):
    """The backward through a pending BatchNorm (csrc/kernels/pool_params.h's launch_max_pool2d_backward_bn): the
    pool's gradient g of each input position, rounded to x's dtype as max_pool_bwd_kernel stores it, then
    scale_shift's backward: grad_x = round(g * scale) (float32 scale), and the tile's per-channel sums of g * x and
    g into ws[0, tile, c] and ws[1, tile, c] (float32, [2, tiles, C]) for reduce_rows_kernel. x's strides: sx*;
    grad_x's: sd*."""
    pid_p, c, c_mask, num_p = _program_tile(C, BLOCK_C, VEC)
    n, ih, iw, p_mask = _pixels(pid_p, Q, HW, W, IDX64, BLOCK_P)
    c_off = _index(c, IDX64)
    acc = _pool_window_grads(go_ptr, code_ptr, n, ih, iw, p_mask, c_off, c_mask, OH, OW, sgn, sgc, sgh, sgw,
                             scn, scc, sch, scw, KH, KW, SH, SW, PH, PW, WIN_H, WIN_W, tl.float32, BLOCK_P, BLOCK_C,
                             VEC)
    keep = p_mask[:, None] & c_mask[None, :]
    g = tl.where(keep, acc.to(gx_ptr.dtype.element_ty).to(tl.float32), 0.0)
    xv = tl.load(x_ptr + _rows(n * sxn, ih, iw, sxh, sxw, VEC)[:, None] + (c_off * sxc)[None, :], mask=keep,
                 other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + c, mask=c_mask, other=0.0)
    offs = _rows(n * sdn, ih, iw, sdh, sdw, VEC)[:, None] + (c_off * sdc)[None, :]
    tl.store(gx_ptr + offs, (g * scale[None, :]).to(gx_ptr.dtype.element_ty), mask=keep)
    row = _index(pid_p, IDX64) * C
    tl.store(ws_ptr + row + c, _sum(g * xv, axis=0), mask=c_mask)
    tl.store(ws_ptr + _index(num_p, IDX64) * C + row + c, _sum(g, axis=0), mask=c_mask)
