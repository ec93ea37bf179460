// What the depthwise CUDA kernels are told: the geometry, raw pointers and element strides, filled once on the
// host by the torch layer (csrc/cuda/depthwise_backend.cpp) and passed by value to every kernel.
//
// Torch-free on purpose, like conv_geometry.h: the kernels (kernels/depthwise.cuh) and their launchers
// (cuda/depthwise_launch.cu) are compiled without torch headers, also for old GPUs with clang. The launchers'
// declarations at the end need the CUDA runtime's types (cudaError_t, cudaStream_t), nothing else.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "conv_geometry.h"

namespace xception_ops {

// The element types the kernels are built for. Accumulation is always float32.
enum class DType : int32_t { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// One 4-D tensor as the kernels see it: a pointer and element strides (not bytes) in (N, C, H, W) order, so
// contiguous, channels_last and strided views are all read and written in place. For the weight the order is
// (C * M, 1, kH, kW) and stride[1] is never used.
struct DepthwiseTensor {
  void* data = nullptr;
  int64_t stride[4] = {0, 0, 0, 0};
};

// A prologue applied to the input as it is read: relu?(round(x * scale + shift)) per input channel, float32
// vectors (nullptr: 1 and 0), padding still 0 after it. The separable backward recomputes its depthwise stage
// and its weight gradient from x with the fused forward's prologue this way instead of writing the prologued
// input out first. Only the vector and strip kernels of the forward and the weight gradient take one
// (depthwise_prologue_ok); their launchers refuse it elsewhere.
//
// The input gradient takes the prologue's backward instead, as it writes (only its strip kernels, where
// depthwise_dgrad_prologue_rows > 0): with `x` set, the gradient g of the prologue's output at each written
// position is masked where relu and round(x * scale + shift) <= 0, the result is round(g * scale) (g without a
// scale): the gradient of x itself; and with `partial` set each thread adds up g * x and g over its pixels, for
// the gradients of scale and shift, into its row of `partial` ([rows][2 * in_channels]: the g * x sums in the
// first half, the g sums in the second). The separable backward read the depthwise input gradient back in a pass
// of its own for this (separable_channel_pass_kernel, twice the tensor's bytes).
struct DepthwisePrologue {
  const float* scale = nullptr;
  const float* shift = nullptr;
  bool relu = false;
  DepthwiseTensor x;         // the input gradient only: the prologue's input, (N, C, H, W) strides
  float* partial = nullptr;  // the input gradient only, optional: per-thread sums
  XO_HOST_DEVICE bool active() const { return scale != nullptr || shift != nullptr || relu; }
  XO_HOST_DEVICE bool backward() const { return x.data != nullptr; }
};

// The three passes share one struct; the roles of the tensors:
//   forward        : input = x (read),         output = y (written),        weight = w (read), bias optional
//   backward_input : input = grad_x (written), output = grad_y (read),      weight = w (read)
//   backward_weight: input = x (read),         output = grad_y (read),      weight = grad_w (written)
// Shapes come from the geometry: input (batch, in_channels, in_h, in_w), output (batch, dw_channels, out_h,
// out_w), weight (dw_channels, 1, kernel_h, kernel_w), bias (dw_channels).
struct DepthwiseParams {
  Conv2dGeometry g;
  DepthwiseTensor input;
  DepthwiseTensor output;
  DepthwiseTensor weight;
  const void* bias = nullptr;  // forward only; nullptr for none
  int64_t bias_stride = 1;
  // Thread order. true: channel fastest across threads (coalesced for NHWC, i.e. channels_last tensors);
  // false: width fastest (NCHW). The torch layer picks it from the layout of the tensor the pass writes
  // (forward, backward_input) or of grad_y (backward_weight).
  bool channels_last = false;
  // 32-bit index math; set it with depthwise_fits_int32() (the launchers use int64 when it is false).
  bool use_int32 = false;
  DepthwisePrologue prologue;  // forward and backward_weight: applied to x as it is read; backward_input: its backward
  // The forward only: the separable op's mid stage applied to each value as it is stored (kernels::mid_value, so
  // that the staged separable forward writes mid in one pass): v = round(acc + bias), then with a scale or a shift
  // round(fmaf(v, scale, shift)), then the activation `mid` (0 none, 1 relu, 2 elu, 3 relu6, 4 hardswish:
  // MidActivation's values). The vectors are float32 per output channel (dw_channels entries; nullptr: 1 and 0). The separable
  // stage sets no bias with it. The gradient launchers refuse it (cudaErrorInvalidValue): it has no backward here.
  int32_t mid = 0;
  const float* mid_scale = nullptr;
  const float* mid_shift = nullptr;
  XO_HOST_DEVICE bool mid_active() const { return mid != 0 || mid_scale != nullptr || mid_shift != nullptr; }
  XO_HOST_DEVICE bool mid_affine() const { return mid_scale != nullptr || mid_shift != nullptr; }
};

// ---- host-side helpers (pure arithmetic, usable without a GPU) ----

// Threads per block of every depthwise kernel, and the most blocks an elementwise kernel is launched with
// (grid-stride loops cover the rest).
constexpr int kDepthwiseThreads = 256;
constexpr int64_t kDepthwiseMaxBlocks = 65536;
// Threads per block of the forward and input gradient's strip kernels: 128, so that 5 blocks of up to 96 registers
// share an SM (4 of 128 through the prologue's backward): 20 warps, about the 3 blocks of 256 at 72 registers that
// the kernels held before their 4-slot ring, which needs the registers (sm_90: 80 spilled) and saves a third of
// the instructions per row.
constexpr int kDepthwiseStripThreads = 128;

// One past the largest element offset a tensor of these sizes and strides reaches; 0 when it is empty.
inline int64_t depthwise_extent(const int64_t (&sizes)[4], const int64_t (&strides)[4]) {
  int64_t extent = 1;
  for (int d = 0; d < 4; ++d) {
    if (sizes[d] == 0) return 0;
    const int64_t s = strides[d] < 0 ? -strides[d] : strides[d];
    extent += (sizes[d] - 1) * s;
  }
  return extent;
}

// Whether every index the kernels form fits in int32: each tensor's extent, each loop's trip count, and the
// padded spatial sizes, with room for one grid-stride step past the end (a loop index never wraps).
inline bool depthwise_fits_int32(const DepthwiseParams& p) {
  const Conv2dGeometry& g = p.g;
  const int64_t limit = INT32_MAX - kDepthwiseMaxBlocks * kDepthwiseThreads;
  const int64_t oc = g.dw_channels();
  const int64_t in_sizes[4] = {g.batch, g.in_channels, g.in_h, g.in_w};
  const int64_t out_sizes[4] = {g.batch, oc, g.out_h, g.out_w};
  const int64_t w_sizes[4] = {oc, 1, g.kernel_h, g.kernel_w};
  const int64_t values[] = {
      depthwise_extent(in_sizes, p.input.stride),
      depthwise_extent(out_sizes, p.output.stride),
      depthwise_extent(w_sizes, p.weight.stride),
      p.prologue.x.data != nullptr ? depthwise_extent(in_sizes, p.prologue.x.stride) : 0,
      oc * (p.bias_stride < 0 ? -p.bias_stride : p.bias_stride) + 1,
      g.batch * g.in_channels * g.in_h * g.in_w,  // backward_input threads
      g.batch * oc * g.out_h * g.out_w,           // forward threads
      g.padded_h() + g.stride_h * g.out_h + g.span_h(),
      g.padded_w() + g.stride_w * g.out_w + g.span_w(),
      g.kernel_h * g.kernel_w * (oc + 1),
  };
  for (int64_t v : values) {
    if (v < 0 || v > limit) return false;
  }
  return true;
}

// ---- the vector paths ----
// Whether a tensor with channels fastest can be read or written `vec` channels at a time: its data aligned to a
// vector and every stride but the channels' a whole number of vectors.
XO_HOST_DEVICE inline bool channels_vectorizable(const DepthwiseTensor& t, int64_t channels, int dtype_bytes, int vec) {
  return t.data != nullptr && reinterpret_cast<uintptr_t>(t.data) % (static_cast<uintptr_t>(vec) * dtype_bytes) == 0 &&
         t.stride[1] == 1 && channels % vec == 0 && t.stride[0] % vec == 0 && t.stride[2] % vec == 0 &&
         t.stride[3] % vec == 0;
}
// Channels per access of the depthwise vector kernels, and the consecutive pixels of one row a thread of the
// forward and input-gradient vector kernels takes at a time (their taps share input columns).
constexpr int kDepthwiseVec = 4;
constexpr int kDepthwiseRun = 4;
// `groups` rounded up to a power of two, at most `cap` (a power of two): how many threads of a block, one per
// group of channels, cover a row of channels together, the block's other threads taking other rows (the depthwise
// and separable vector paths, the backward's element-wise passes).
XO_HOST_DEVICE inline int power_of_two_cover(int64_t groups, int cap) {
  int n = cap;
  while (n > 1 && n / 2 >= groups) n /= 2;
  return n;
}
// Threads of a block that share one pixel (one vector of channels each): at most the block; the block's other
// threads take other pixels.
XO_HOST_DEVICE inline int depthwise_vector_lanes(int64_t groups) {
  return power_of_two_cover(groups, kDepthwiseThreads);
}
// 3x3 without a depth multiplier: the shape every depthwise vector kernel takes.
XO_HOST_DEVICE inline bool depthwise_vector_shape(const Conv2dGeometry& g) {
  return g.kernel_h == 3 && g.kernel_w == 3 && g.depth_multiplier == 1;
}
// The forward's and the weight gradient's (pass 1) vector kernels: that shape at any stride, both tensors
// channels-last in whole aligned vectors (forward: x and y; weight gradient: x and grad_y).
XO_HOST_DEVICE inline bool depthwise_vectors(const DepthwiseParams& p, int dtype_bytes) {
  const Conv2dGeometry& g = p.g;
  return p.channels_last && depthwise_vector_shape(g) &&
         channels_vectorizable(p.input, g.in_channels, dtype_bytes, kDepthwiseVec) &&
         channels_vectorizable(p.output, g.dw_channels(), dtype_bytes, kDepthwiseVec);
}
XO_HOST_DEVICE inline bool depthwise_forward_vectors(const DepthwiseParams& p, int dtype_bytes) {
  return depthwise_vectors(p, dtype_bytes);
}
// The input gradient's vector kernel: the same at stride 1 (grad_x and grad_y).
XO_HOST_DEVICE inline bool depthwise_dgrad_vectors(const DepthwiseParams& p, int dtype_bytes) {
  return p.g.stride_h == 1 && p.g.stride_w == 1 && depthwise_vectors(p, dtype_bytes);
}

// The weight gradient's vector kernel (pass 1), under depthwise_vectors: its blocks take
// depthwise_wgrad_vector_groups vectors of channels.
XO_HOST_DEVICE inline bool depthwise_wgrad_vectors(const DepthwiseParams& p, int dtype_bytes) {
  return depthwise_vectors(p, dtype_bytes);
}

// ---- strips: the vector kernels' form at stride 1 without dilation (session 6) ----
// A strip thread takes one vector of channels of a run of depthwise_strip_run consecutive pixels of a row and walks
// depthwise_strip_rows rows down, keeping the three source rows its taps read in registers: a source row is loaded
// once per strip (run + 2 vectors) where the run kernels load it once per kernel row, 3x, from L2.
// Channels per thread: 2 (4-byte loads of 16-bit dtypes, 8 of float32), not kDepthwiseVec: with 4, the window, the
// weights and the accumulators took 150-200 registers (sm_90, nvcc 13), one block of 256 threads per SM.
constexpr int kDepthwiseStripVec = 2;
// Pixels per run: 4, but 2 for float32 channels-last (its 8-byte vectors would double the window's registers).
XO_HOST_DEVICE constexpr int depthwise_strip_run(int dtype_bytes, bool channels_last) {
  return channels_last && dtype_bytes == 4 ? 2 : 4;
}
XO_HOST_DEVICE inline bool depthwise_strip_shape(const Conv2dGeometry& g) {
  return depthwise_vector_shape(g) && g.stride_h == 1 && g.stride_w == 1 && g.dilation_h == 1 && g.dilation_w == 1;
}
// Forward and input gradient: the vector kernels' conditions and that shape.
XO_HOST_DEVICE inline bool depthwise_strips(const DepthwiseParams& p, int dtype_bytes) {
  return depthwise_vectors(p, dtype_bytes) && depthwise_strip_shape(p.g);
}
// The NCHW form (one channel per thread, a warp along a row): that shape, the NCHW thread order, and both tensors
// with their columns contiguous (so that a warp's loads of a row coalesce).
XO_HOST_DEVICE inline bool depthwise_nchw_strips(const DepthwiseParams& p) {
  return !p.channels_last && depthwise_strip_shape(p.g) && p.input.stride[3] == 1 && p.output.stride[3] == 1;
}
// Channels per strip thread: a vector of them channels-last, one in NCHW.
XO_HOST_DEVICE inline int depthwise_strip_vec(const DepthwiseParams& p) {
  return p.channels_last ? kDepthwiseStripVec : 1;
}

// Whether a prologue can be applied on load (DepthwisePrologue) for the forward and weight gradient of this x:
// both take their vector or strip kernels, given outputs and gradients allocated by the caller in x's layout
// (channels-last: whole vectors of channels, aligned; NCHW: contiguous, for the NCHW strips at 3x3 stride 1).
XO_HOST_DEVICE inline bool depthwise_prologue_ok(const DepthwiseTensor& x, const Conv2dGeometry& g, bool channels_last,
                                                 int dtype_bytes) {
  if (!channels_last) return depthwise_strip_shape(g) && x.stride[3] == 1;
  return depthwise_vector_shape(g) && channels_vectorizable(x, g.in_channels, dtype_bytes, kDepthwiseVec);
}

// Rows per strip over `rows` rows of `items_per_row` (runs x channel vectors, times the batch) threads each: as many
// as keep about 2^18 threads in all (an H100 holds 132 x 2048), so a thread's first loads are amortized over
// several rows, at most 32 and at least 1; then evened out over the strips that takes, so that the last strip is
// not a short remainder (37 rows: 13 + 13 + 11, not 16 + 16 + 5). The weight gradient's lanes each walk several
// strips and its blocks wait for their slowest lane: with 16 + 16 + 5 they idled ~23% of the time.
inline int64_t depthwise_strip_rows(int64_t items_per_row, int64_t rows) {
  constexpr int64_t kThreads = int64_t{1} << 18;
  int64_t s = items_per_row > 0 ? items_per_row * rows / kThreads : 1;
  if (s > 32) s = 32;
  if (s > rows) s = rows;
  if (s < 1) return 1;
  const int64_t strips = (rows + s - 1) / s;
  return (rows + strips - 1) / strips;
}

// ---- backward_weight work split (shared by the launcher and the torch layer's workspace size) ----
//
// Pass 1 splits the reduction over the N * out_h * out_w output positions into `slices` contiguous ranges;
// a block of 256 threads covers (channels per block) output channels of one range, keeps all kH*kW taps of a
// channel in registers (3x3) or one tap per block (other sizes), reduces its threads in a fixed tree and
// writes float32 partials to the workspace, laid out [slice][dw_channel][kH*kW]. Pass 2 sums the slices of
// each tap in a fixed order and writes grad_w. No atomics: the result depends only on the geometry and the
// layout, so it is bitwise reproducible, and the same on every GPU.

// Channels and position lanes per block: channels_last puts 32 channels on a warp; NCHW puts 64 positions.
inline int64_t depthwise_wgrad_channels_per_block(bool channels_last) { return channels_last ? 32 : 4; }
inline int64_t depthwise_wgrad_lanes_per_block(bool channels_last) { return channels_last ? 8 : 64; }
// Kernel sizes whose weight-gradient kernel holds every tap in registers (one block covers all taps).
inline bool depthwise_wgrad_all_taps(const Conv2dGeometry& g) {
  return (g.kernel_h == 3 && g.kernel_w == 3) || (g.kernel_h == 1 && g.kernel_w == 1);
}

// Vector groups (kDepthwiseVec channels each) per block of the weight gradient's vector kernel: the layer's groups
// rounded up to a power of two, at most 32, so that few channels do not leave most of a block idle; the block's
// other threads are position lanes (kDepthwiseThreads / this many).
XO_HOST_DEVICE inline int depthwise_wgrad_vector_groups(int64_t groups) { return power_of_two_cover(groups, 32); }

// The weight gradient's strip kernel (pass 1): 3x3 at stride 1 without dilation, channels-last in whole aligned
// vectors of x and grad_y, or NCHW (depthwise_nchw_strips). Its slices divide the strips' items (batch x strips x
// runs), not the positions.
XO_HOST_DEVICE inline bool depthwise_wgrad_strips(const DepthwiseParams& p, int dtype_bytes) {
  return depthwise_strips(p, dtype_bytes) || depthwise_nchw_strips(p);
}
// The strip kernel's geometry over grad_y: rows per strip and items (one per strip and run of each image).
struct DepthwiseStrips {
  int64_t rows_per_strip, strips, runs_w, items;
};
inline DepthwiseStrips depthwise_wgrad_strip_plan(const DepthwiseParams& p, int dtype_bytes) {
  const Conv2dGeometry& g = p.g;
  const int64_t run = depthwise_strip_run(dtype_bytes, p.channels_last);
  DepthwiseStrips s;
  s.runs_w = (g.out_w + run - 1) / run;
  s.rows_per_strip = depthwise_strip_rows(g.batch * s.runs_w * (g.dw_channels() / depthwise_strip_vec(p)), g.out_h);
  s.strips = (g.out_h + s.rows_per_strip - 1) / s.rows_per_strip;
  s.items = g.batch * s.strips * s.runs_w;
  return s;
}

// Slices of pass 1 (grid.y): of the positions, or of the strips' items where the strip kernel runs. Sized for the
// vector kernel's block shape where a layer can take it (channels-last 3x3 in whole vectors; any slice count is
// correct for any form).
inline int64_t depthwise_wgrad_slices(const DepthwiseParams& p, int dtype_bytes) {
  const Conv2dGeometry& g = p.g;
  const int64_t positions = g.batch * g.out_h * g.out_w;
  if (positions <= 0) return 1;
  if (depthwise_wgrad_strips(p, dtype_bytes)) {
    // Two items per position lane: the blocks' first loads and their tree are amortized over 2 strips.
    const int64_t lanes =
        p.channels_last ? kDepthwiseThreads / depthwise_wgrad_vector_groups(g.dw_channels() / kDepthwiseStripVec)
                        : kDepthwiseThreads;
    const int64_t items = depthwise_wgrad_strip_plan(p, dtype_bytes).items;
    int64_t slices = (items + 2 * lanes - 1) / (2 * lanes);
    if (slices > 1024) slices = 1024;
    return slices < 1 ? 1 : slices;
  }
  int64_t chan_blocks = (g.dw_channels() + depthwise_wgrad_channels_per_block(p.channels_last) - 1) /
                        depthwise_wgrad_channels_per_block(p.channels_last);
  int64_t lanes = depthwise_wgrad_lanes_per_block(p.channels_last);
  if (p.channels_last && depthwise_vector_shape(g) && g.dw_channels() % kDepthwiseVec == 0) {
    const int64_t groups = g.dw_channels() / kDepthwiseVec;
    const int per_block = depthwise_wgrad_vector_groups(groups);
    chan_blocks = (groups + per_block - 1) / per_block;
    lanes = kDepthwiseThreads / per_block;
  }
  const int64_t tap_blocks = depthwise_wgrad_all_taps(g) ? 1 : g.kernel_h * g.kernel_w;
  const int64_t target_blocks = 1024;  // about 8 blocks per SM on a 132-SM GPU
  int64_t slices = (target_blocks + chan_blocks * tap_blocks - 1) / (chan_blocks * tap_blocks);
  // Keep at least 16 positions per thread lane so a slice is worth its partials.
  const int64_t by_work = (positions + 16 * lanes - 1) / (16 * lanes);
  if (slices > by_work) slices = by_work;
  if (slices > 1024) slices = 1024;
  if (slices < 1) slices = 1;
  return slices;
}

// Bytes of float32 workspace the backward_weight launcher needs: slices * dw_channels * kH * kW * 4.
inline size_t depthwise_wgrad_workspace_bytes(const DepthwiseParams& p, int dtype_bytes) {
  const Conv2dGeometry& g = p.g;
  return static_cast<size_t>(depthwise_wgrad_slices(p, dtype_bytes)) * static_cast<size_t>(g.dw_channels()) *
         static_cast<size_t>(g.kernel_h * g.kernel_w) * sizeof(float);
}

// ---- launchers (cuda/depthwise_launch.cu) ----
// Each launches on `stream` and returns cudaGetLastError() after its launches (cudaSuccess when there is
// nothing to do). The caller sets the device. The workspace must hold depthwise_wgrad_workspace_bytes(p)
// bytes, 4-byte aligned; backward_weight returns cudaErrorInvalidValue when it is smaller.
cudaError_t launch_depthwise_forward(const DepthwiseParams& p, DType dtype, cudaStream_t stream);
cudaError_t launch_depthwise_backward_input(const DepthwiseParams& p, DType dtype, cudaStream_t stream);
// Rows of the partial sums the input gradient's strip kernel writes when it applies the prologue's backward
// (DepthwisePrologue::x, ::partial): one per image, strip of rows and run of pixels. 0 when this pass does not take
// the strip kernels (its layout or alignment, or XCEPTION_OPS_DEPTHWISE_STRIPS=off): the caller then applies the
// prologue's backward itself, and must not set x.
int64_t depthwise_dgrad_prologue_rows(const DepthwiseParams& p, DType dtype);
cudaError_t launch_depthwise_backward_weight(const DepthwiseParams& p, DType dtype, void* workspace,
                                             size_t workspace_bytes, cudaStream_t stream);

}  // namespace xception_ops
