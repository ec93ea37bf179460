// Launchers of the element-wise passes (the separable backward's, the staged forward's epilogue) and of the
// fixed-order row reduction (kernels/separable_backward.cuh, kernels/separable.cuh). No torch headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>

#include "kernels/separable_backward.cuh"
#include "kernels/separable_params.h"

namespace xception_ops {
namespace {

template <typename T, ChannelPass kKind>
cudaError_t channel_pass(const ChannelPassParams& p, unsigned grid, cudaStream_t stream) {
  if constexpr (kKind != ChannelPass::GradY) {
    if (channel_pass_planes(p, kKind)) {
      kernels::separable_plane_pass_kernel<T, kKind><<<grid, 256, 0, stream>>>(p);
      return cudaGetLastError();
    }
  }
  if (channel_pass_vectors(p, static_cast<int>(sizeof(T)))) {
    kernels::separable_channel_pass_kernel<T, kKind, kSepVec><<<grid, 256, 0, stream>>>(p);
  } else {
    kernels::separable_channel_pass_kernel<T, kKind, 1><<<grid, 256, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t channel_pass(const ChannelPassParams& p, ChannelPass kind, cudaStream_t stream) {
  const int64_t tiles = channel_pass_tiles(p);
  if (tiles > INT_MAX) return cudaErrorInvalidValue;
  const unsigned grid = static_cast<unsigned>(tiles);
  switch (kind) {
    case ChannelPass::GradY: return channel_pass<T, ChannelPass::GradY>(p, grid, stream);
    case ChannelPass::Prologue: return channel_pass<T, ChannelPass::Prologue>(p, grid, stream);
    case ChannelPass::Epilogue: return channel_pass<T, ChannelPass::Epilogue>(p, grid, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t prologue_apply(const DepthwiseTensor& x, const DepthwiseTensor& out, const Conv2dGeometry& g,
                           const float* scale, const float* shift, bool relu, cudaStream_t stream) {
  const int bytes = static_cast<int>(sizeof(T));
  const bool vectors = separable_vectorizable(x, g.in_channels, bytes) && separable_vectorizable(out, g.in_channels, bytes);
  const int64_t total = g.batch * g.in_channels * g.in_h * g.in_w / (vectors ? kSepVec : 1);
  const int64_t blocks = total / 256 + 1 < 8192 ? total / 256 + 1 : 8192;  // grid-stride beyond
  if (vectors) {
    kernels::prologue_apply_kernel<T, kSepVec><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
        x, out, g.batch, g.in_channels, g.in_h, g.in_w, scale, shift, relu);
  } else {
    kernels::prologue_apply_kernel<T, 1><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
        x, out, g.batch, g.in_channels, g.in_h, g.in_w, scale, shift, relu);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t plan_channel_pass(ChannelPassParams& p) {
  DeviceCaps caps;
  const cudaError_t err = current_device_caps(&caps);
  if (err != cudaSuccess) return err;
  p.tile_pixels = channel_pass_tile_pixels(p.g.batch * p.h * p.w, caps.sms);
  return cudaSuccess;
}

cudaError_t launch_channel_pass(const ChannelPassParams& p, DType dtype, ChannelPass kind, cudaStream_t stream) {
  if (p.tile_pixels < 1 || p.tile_pixels > kChannelPassPixels) return cudaErrorInvalidValue;  // the shared arrays
  if (channel_pass_tiles(p) == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32: return channel_pass<float>(p, kind, stream);
    case DType::Float16: return channel_pass<__half>(p, kind, stream);
    case DType::BFloat16: return channel_pass<__nv_bfloat16>(p, kind, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_prologue_apply(const DepthwiseTensor& x, const DepthwiseTensor& out, const Conv2dGeometry& g,
                                  const float* scale, const float* shift, bool relu, DType dtype,
                                  cudaStream_t stream) {
  if (g.batch * g.in_channels * g.in_h * g.in_w == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32: return prologue_apply<float>(x, out, g, scale, shift, relu, stream);
    case DType::Float16: return prologue_apply<__half>(x, out, g, scale, shift, relu, stream);
    case DType::BFloat16: return prologue_apply<__nv_bfloat16>(x, out, g, scale, shift, relu, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_reduce_rows(float* partial, int64_t rows, int64_t cols, int64_t half, float* first, float* second,
                               cudaStream_t stream) {
  float* buffers[2] = {partial, partial + rows * cols};
  for (int level = 0;; ++level) {
    const int64_t groups = (rows + 63) / 64;
    if (groups > INT_MAX || (cols + 255) / 256 > 65535) return cudaErrorInvalidValue;
    const dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>((cols + 255) / 256));
    const bool last = groups == 1;
    kernels::separable_stats_reduce_kernel<<<grid, 256, 0, stream>>>(buffers[level % 2], rows, cols,
                                                                      last ? nullptr : buffers[(level + 1) % 2],
                                                                      last ? first : nullptr,
                                                                      last ? second : nullptr, half);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || last) return err;
    rows = groups;
  }
}

}  // namespace xception_ops
