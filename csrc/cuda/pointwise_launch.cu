// Launcher of Hopper's pointwise GEMM (kernels/pointwise_gemm.cuh): the 16-bit dtypes and the builds of
// kPointwiseConfigs, their shared memory, one block per (pixel tile, output-channel tile). No torch headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/pointwise_gemm.cuh"
#include "kernels/pointwise_gemm_params.h"

namespace xception_ops {
namespace {

template <typename T, int kConfig>
cudaError_t launch_config(const PointwiseGemmParams& p, cudaStream_t stream) {
  constexpr PointwiseGemmConfig c = kPointwiseConfigs[kConfig];
  constexpr int kBytes = pointwise_smem_bytes(c);
  auto kernel = kernels::pointwise_wgmma_kernel<T, c.n, c.stages, c.in_flight, pointwise_min_blocks(c)>;
  // More than 48 KB of dynamic shared memory needs the opt-in, once per kernel (per process: the attribute holds
  // for every device).
  static const cudaError_t opt_in =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
  if (opt_in != cudaSuccess) return opt_in;
  const int64_t blocks = pointwise_m_tiles(p) * pointwise_n_tiles(p, c.n);
  kernel<<<static_cast<unsigned int>(blocks), kPwThreads, kBytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const PointwiseGemmParams& p, PointwiseGemmConfig config, cudaStream_t stream) {
  static_assert(kPointwiseConfigCount == 5, "one case per configuration");
  auto is = [&](int i) {
    const PointwiseGemmConfig& c = kPointwiseConfigs[i];
    return c.n == config.n && c.stages == config.stages && c.in_flight == config.in_flight;
  };
  if (is(0)) return launch_config<T, 0>(p, stream);
  if (is(1)) return launch_config<T, 1>(p, stream);
  if (is(2)) return launch_config<T, 2>(p, stream);
  if (is(3)) return launch_config<T, 3>(p, stream);
  if (is(4)) return launch_config<T, 4>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_pointwise_wgmma(const PointwiseGemmParams& p, DType dtype, PointwiseGemmConfig config,
                                   cudaStream_t stream) {
  if (!pointwise_gemm_ok(p)) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::Float16: return launch_typed<__half>(p, config, stream);
    case DType::BFloat16: return launch_typed<__nv_bfloat16>(p, config, stream);
    case DType::Float32: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace xception_ops
