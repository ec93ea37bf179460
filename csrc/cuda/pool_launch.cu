// Launchers of the max-pooling kernels (kernels/pool.cuh): pick the element type, index type and vector width,
// launch on the given stream, and return cudaGetLastError(). No torch headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

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

template <typename T, template <typename, typename, int> class Pick>
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
  const int64_t items = p.g.batch * (p.g.channels / width) * positions;
  kernel<<<pool_blocks(items), kMaxPoolThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, typename I, int V>
struct ForwardKernel {
  static constexpr void (*kernel)(MaxPoolParams) = kernels::max_pool2d_forward_kernel<T, I, V>;
};
template <typename T, typename I, int V>
struct BackwardKernel {
  static constexpr void (*kernel)(MaxPoolParams) = kernels::max_pool2d_backward_kernel<T, I, V>;
};

template <template <typename, typename, int> class Pick>
cudaError_t launch_pass(const MaxPoolParams& p, DType dtype, int64_t positions, cudaStream_t stream) {
  if (p.g.batch * p.g.channels * positions == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32: return launch_typed<float, Pick>(p, dtype, positions, stream);
    case DType::Float16: return launch_typed<__half, Pick>(p, dtype, positions, stream);
    case DType::BFloat16: return launch_typed<__nv_bfloat16, Pick>(p, dtype, positions, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_max_pool2d_forward(const MaxPoolParams& p, DType dtype, cudaStream_t stream) {
  return launch_pass<ForwardKernel>(p, dtype, p.g.out_h * p.g.out_w, stream);
}

cudaError_t launch_max_pool2d_backward(const MaxPoolParams& p, DType dtype, cudaStream_t stream) {
  return launch_pass<BackwardKernel>(p, dtype, p.g.in_h * p.g.in_w, stream);
}

}  // namespace xception_ops
