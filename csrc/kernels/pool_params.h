// What the max-pooling CUDA kernels (kernels/pool.cuh) are told, and their launchers (cuda/pool_launch.cu).
//
// The forward writes the maximum of each window and, for the backward, the window's argmax as one byte: the
// index ky * kernel_w + kx of the tap it came from (PyTorch keeps an int64 flat index: 8 bytes per output, 4x the
// pooled bf16 tensor). The backward gathers: each input position adds up, in a fixed order, the gradients of the
// windows whose argmax it is. It writes every element, so it needs no zero fill, and has no atomics.
//
// The forward can also apply a pending BatchNorm to x as it reads it and add a shortcut to what it pools (the
// strided blocks of Xception's entry and exit flows: BatchNorm -> max pool -> + shortcut, in one pass where three
// ran): out = max over the window of round(x * scale + shift) (fmaf, rounded once to x's dtype, as the separable
// op's epilogue and scale_shift round it), then round(out + residual) in x's dtype, as PyTorch's add does. The
// argmax and the ties follow the normalized values, so the backward is the plain one's, followed by scale_shift's.
//
// Which tap is the argmax follows PyTorch's kernels: the first maximum in (ky, kx) order, or the last NaN when the
// window has one; a window whose values are all -inf keeps its first tap inside the image.
//
// Torch-free and device-code-free, so that the torch layer (cuda/pool_backend.cpp) can include it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "depthwise_params.h"
#include "pool_geometry.h"

namespace xception_ops {

// The roles of the tensors (element strides in (N, C, H, W) order, like the depthwise kernels'):
//   forward : input = x (read),         output = out (written),     argmax = codes (written; data nullptr: none)
//   backward: input = grad_x (written), output = grad_out (read),   argmax = codes (read)
struct MaxPoolParams {
  Pool2dGeometry g;
  DepthwiseTensor input;
  DepthwiseTensor output;
  DepthwiseTensor argmax;  // uint8
  // The forward only: the pending BatchNorm (float32 per channel; both nullptr: none) and the shortcut added to the
  // output (data nullptr: none; the output's shape).
  const float* scale = nullptr;
  const float* shift = nullptr;
  DepthwiseTensor residual;
  // The backward through a pending BatchNorm only (max_pool2d_backward_bn_kernel): the forward's x (read), scale
  // above, and [tiles][2 channels] float32 partial sums (of g * x, then of g) for launch_reduce_rows, one row per
  // tile of tile_positions input positions (n, h, w flattened).
  DepthwiseTensor bn_input;
  float* partial = nullptr;
  int tile_positions = 256;
  // Thread order. true: channel fastest across threads (coalesced for channels_last); false: width fastest.
  bool channels_last = false;
};

// Threads per block of both kernels; grid-stride loops cover what the grid's blocks do not.
constexpr int kMaxPoolThreads = 256;
constexpr int64_t kMaxPoolMaxBlocks = int64_t{1} << 20;

// ---- host-side helpers (pure arithmetic, usable without a GPU) ----

// How many consecutive channels one thread takes: 16 bytes of the dtype (8 for 16-bit types, 4 for float32) where
// the pass is channels-last, every tensor it touches has unit channel stride, its other strides and the channel
// count are multiples of that width and its pointers are aligned to the width's bytes (16; the argmax codes: the
// width); else 1.
inline int max_pool_vector_width(const MaxPoolParams& p, DType dtype) {
  const int width = dtype == DType::Float32 ? 4 : 8;
  const int elem_bytes = dtype == DType::Float32 ? 4 : 2;
  if (!p.channels_last || p.g.channels % width != 0) return 1;
  auto fits = [&](const DepthwiseTensor& t, int bytes) {
    if (t.data == nullptr) return true;  // the forward without codes
    if (reinterpret_cast<uintptr_t>(t.data) % (static_cast<uintptr_t>(width) * bytes) != 0) return false;
    if (t.stride[1] != 1) return false;
    return t.stride[0] % width == 0 && t.stride[2] % width == 0 && t.stride[3] % width == 0;
  };
  return fits(p.input, elem_bytes) && fits(p.output, elem_bytes) && fits(p.argmax, 1) &&
                 fits(p.residual, elem_bytes) && fits(p.bn_input, elem_bytes)
             ? width
             : 1;
}

// Whether every offset, and the grid-stride index past the last item, fit in 32 bits (the launchers take 64-bit
// math otherwise).
inline bool max_pool_fits_int32(const MaxPoolParams& p) {
  constexpr int64_t kLimit = int64_t{1} << 31;
  auto extent = [](const DepthwiseTensor& t, int64_t n, int64_t c, int64_t h, int64_t w) {
    if (t.data == nullptr) return int64_t{0};
    return (n - 1) * t.stride[0] + (c - 1) * t.stride[1] + (h - 1) * t.stride[2] + (w - 1) * t.stride[3] + 1;
  };
  const Pool2dGeometry& g = p.g;
  const int64_t items = g.batch * g.channels * (g.in_h * g.in_w > g.out_h * g.out_w ? g.in_h * g.in_w
                                                                                     : g.out_h * g.out_w);
  const int64_t threads = kMaxPoolMaxBlocks * kMaxPoolThreads;
  return items + threads < kLimit && extent(p.input, g.batch, g.channels, g.in_h, g.in_w) < kLimit &&
         extent(p.output, g.batch, g.channels, g.out_h, g.out_w) < kLimit &&
         extent(p.argmax, g.batch, g.channels, g.out_h, g.out_w) < kLimit &&
         extent(p.residual, g.batch, g.channels, g.out_h, g.out_w) < kLimit &&
         extent(p.bn_input, g.batch, g.channels, g.in_h, g.in_w) < kLimit;
}

// The backward through a pending BatchNorm: input positions per block, 256 halved (down to 8) while that leaves
// fewer than 4 blocks per multiprocessor (few partial rows at 147^2, enough blocks at 19^2).
inline int max_pool_bn_tile_positions(int64_t positions, int sms) {
  int t = 256;
  while (t > 8 && (positions + t - 1) / t < 4 * static_cast<int64_t>(sms)) t /= 2;
  return t;
}
inline int64_t max_pool_bn_tiles(const MaxPoolParams& p) {
  return (p.g.batch * p.g.in_h * p.g.in_w + p.tile_positions - 1) / p.tile_positions;
}

// Return cudaGetLastError() after the launch (cudaSuccess when there is nothing to do).
cudaError_t launch_max_pool2d_forward(const MaxPoolParams& p, DType dtype, cudaStream_t stream);
cudaError_t launch_max_pool2d_backward(const MaxPoolParams& p, DType dtype, cudaStream_t stream);
// grad_x = round(g * scale) into p.input, g the pool's gradient as launch_max_pool2d_backward rounds it, and the
// partial sums of g * x and g into p.partial (max_pool_bn_tiles(p) rows of 2 * channels): scale_shift_backward's
// formulas (without a ReLU) after the pool's backward, in one pass. p.tile_positions must be set.
cudaError_t launch_max_pool2d_backward_bn(const MaxPoolParams& p, DType dtype, cudaStream_t stream);

}  // namespace xception_ops
