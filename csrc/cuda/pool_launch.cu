// Launchers of the max-pooling kernels (kernels/pool.cuh): pick the element type, index type and vector width,
// launch on the given stream, and return cudaGetLastError(). No torch headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/pool.cuh"
#include "kernels/pool_params.h"

namespace xception_ops {
namespace {

// Blocks for a grid-stride loop over `total` items.
unsigned int pool_blocks(int64_t total) {
  int64_t blocks = (total + kMaxPoolThreads - 1) / kMaxPoolThreads;
  if (blocks > kMaxPoolMaxBlocks) blocks = kMaxPoolMaxBlocks;
  return static_cast<unsigned int>(blocks);
}

// Pick<T, I, V>::kernel is the build; kTiled: its grid is one block per tile of positions
// (max_pool2d_backward_bn_kernel), else a grid-stride loop over the items.
template <typename T, template <typename, typename, int> class Pick, bool kTiled>
cudaError_t launch_typed(const MaxPoolParams& p, DType dtype, int64_t positions, cudaStream_t stream) {
  constexpr int kVec = sizeof(T) == 4 ? 4 : 8;
  const int width = max_pool_vector_width(p, dtype);
  const bool narrow = max_pool_fits_int32(p);
  void (*kernel)(MaxPoolParams) = nullptr;
  if (width == kVec) {
    kernel = narrow ? Pick<T, int32_t, kVec>::kernel : Pick<T, int64_t, kVec>::kernel;
  } else {
    kernel = narrow ? Pick<T, int32_t, 1>::kernel : Pick<T, int64_t, 1>::kernel;
  }
  unsigned int blocks = 0;
  if constexpr (kTiled) {
    const int64_t tiles = max_pool_bn_tiles(p);
    if (tiles > INT32_MAX) return cudaErrorInvalidConfiguration;
    blocks = static_cast<unsigned int>(tiles);
  } else {
    blocks = pool_blocks(p.g.batch * (p.g.channels / width) * positions);
  }
  kernel<<<blocks, kMaxPoolThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, typename I, int V>
struct ForwardKernel {
  static constexpr void (*kernel)(MaxPoolParams) = kernels::max_pool2d_forward_kernel<T, I, V, false>;
};
template <typename T, typename I, int V>
struct ForwardExtrasKernel {
  static constexpr void (*kernel)(MaxPoolParams) = kernels::max_pool2d_forward_kernel<T, I, V, true>;
};
template <typename T, typename I, int V>
struct BackwardKernel {
  static constexpr void (*kernel)(MaxPoolParams) = kernels::max_pool2d_backward_kernel<T, I, V>;
};
template <typename T, typename I, int V>
struct BackwardBnKernel {
  static constexpr void (*kernel)(MaxPoolParams) = kernels::max_pool2d_backward_bn_kernel<T, I, V>;
};

template <template <typename, typename, int> class Pick, bool kTiled = false>
cudaError_t launch_pass(const MaxPoolParams& p, DType dtype, int64_t positions, cudaStream_t stream) {
  if (p.g.batch * p.g.channels * positions == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32: return launch_typed<float, Pick, kTiled>(p, dtype, positions, stream);
    case DType::Float16: return launch_typed<__half, Pick, kTiled>(p, dtype, positions, stream);
    case DType::BFloat16: return launch_typed<__nv_bfloat16, Pick, kTiled>(p, dtype, positions, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_max_pool2d_forward(const MaxPoolParams& p, DType dtype, cudaStream_t stream) {
  if (p.scale != nullptr || p.residual.data != nullptr) {
    return launch_pass<ForwardExtrasKernel>(p, dtype, p.g.out_h * p.g.out_w, stream);
  }
  return launch_pass<ForwardKernel>(p, dtype, p.g.out_h * p.g.out_w, stream);
}

cudaError_t launch_max_pool2d_backward(const MaxPoolParams& p, DType dtype, cudaStream_t stream) {
  return launch_pass<BackwardKernel>(p, dtype, p.g.in_h * p.g.in_w, stream);
}

cudaError_t launch_max_pool2d_backward_bn(const MaxPoolParams& p, DType dtype, cudaStream_t stream) {
  return launch_pass<BackwardBnKernel, true>(p, dtype, p.g.in_h * p.g.in_w, stream);
}

}  // namespace xception_ops
