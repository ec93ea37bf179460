// Launcher of Hopper's pointwise GEMM (kernels/pointwise_gemm.cuh): the 16-bit dtypes, its shared memory, one
// block per (pixel tile, output-channel tile). No torch headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/pointwise_gemm.cuh"
#include "kernels/pointwise_gemm_params.h"

namespace xception_ops {
namespace {

template <typename T>
cudaError_t launch_typed(const PointwiseGemmParams& p, cudaStream_t stream) {
  // More than 48 KB of dynamic shared memory needs the opt-in, once per kernel (per process: the attribute holds
  // for every device).
  static const cudaError_t opt_in = cudaFuncSetAttribute(kernels::pointwise_wgmma_kernel<T>,
                                                         cudaFuncAttributeMaxDynamicSharedMemorySize, kPwSmemBytes);
  if (opt_in != cudaSuccess) return opt_in;
  const int64_t blocks = pointwise_m_tiles(p) * pointwise_n_tiles(p);
  kernels::pointwise_wgmma_kernel<T><<<static_cast<unsigned int>(blocks), kPwThreads, kPwSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_pointwise_wgmma(const PointwiseGemmParams& p, DType dtype, cudaStream_t stream) {
  if (!pointwise_gemm_ok(p)) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::Float16: return launch_typed<__half>(p, stream);
    case DType::BFloat16: return launch_typed<__nv_bfloat16>(p, stream);
    case DType::Float32: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace xception_ops
