// Launchers of Hopper's wgmma kernels: the pointwise GEMM (kernels/pointwise_gemm.cuh; the builds of
// kPointwiseConfigs, one block per (pixel tile, output-channel tile)) and the fused separable forward
// (kernels/separable_wgmma.cuh; four builds by K and N, a persistent block per SM); the pointwise weight's gradient
// (pointwise_wgrad_kernel, split over the pixels). 16-bit dtypes. No torch headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/shared_memory_opt_in.h"
#include "kernels/pointwise_gemm.cuh"
#include "kernels/pointwise_gemm_params.h"
#include "kernels/separable_wgmma.cuh"

namespace xception_ops {
namespace {

template <typename T, int kConfig>
cudaError_t launch_config(const PointwiseGemmParams& p, cudaStream_t stream) {
  constexpr PointwiseGemmConfig c = kPointwiseConfigs[kConfig];
  constexpr int kBytes = pointwise_smem_bytes(c);
  auto kernel = kernels::pointwise_wgmma_kernel<T, c.n, c.stages, c.in_flight, pointwise_min_blocks(c)>;
  if (const cudaError_t err = opt_in_shared_memory(kernel, kBytes); err != cudaSuccess) return err;
  const int64_t blocks = pointwise_m_tiles(p) * pointwise_n_tiles(p, c.n);
  kernel<<<static_cast<unsigned int>(blocks), kPwThreads, kBytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const PointwiseGemmParams& p, PointwiseGemmConfig config, cudaStream_t stream) {
  static_assert(kPointwiseConfigCount == 7, "one case per configuration");
  auto is = [&](int i) {
    const PointwiseGemmConfig& c = kPointwiseConfigs[i];
    return c.n == config.n && c.stages == config.stages && c.in_flight == config.in_flight;
  };
  if (is(0)) return launch_config<T, 0>(p, stream);
  if (is(1)) return launch_config<T, 1>(p, stream);
  if (is(2)) return launch_config<T, 2>(p, stream);
  if (is(3)) return launch_config<T, 3>(p, stream);
  if (is(4)) return launch_config<T, 4>(p, stream);
  if (is(5)) return launch_config<T, 5>(p, stream);
  if (is(6)) return launch_config<T, 6>(p, stream);
  return cudaErrorInvalidValue;
}

template <typename T, int kN, int kK>
cudaError_t launch_fused(const SeparableWgmmaParams& p, int sms, cudaStream_t stream) {
  constexpr int kBytes = separable_wgmma_smem_bytes(kN, kK);
  auto kernel = kernels::separable_wgmma_kernel<T, kN, kK>;
  if (const cudaError_t err = opt_in_shared_memory(kernel, kBytes); err != cudaSuccess) return err;
  const int64_t tiles = pointwise_m_tiles(p.pw);
  const int64_t blocks = tiles < sms ? tiles : sms;  // persistent: one per SM, walking the tiles
  kernel<<<static_cast<unsigned int>(blocks), kPwThreads, kBytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_fused_typed(const SeparableWgmmaParams& p, int sms, cudaStream_t stream) {
  const bool narrow = p.pw.n <= 128, shallow = p.pw.k <= 64;
  if (narrow) return shallow ? launch_fused<T, 128, 64>(p, sms, stream) : launch_fused<T, 128, 128>(p, sms, stream);
  return shallow ? launch_fused<T, 256, 64>(p, sms, stream) : launch_fused<T, 256, 128>(p, sms, stream);
}

template <typename T>
cudaError_t launch_wgrad(const PointwiseWgradParams& p, int64_t blocks, cudaStream_t stream) {
  const cudaError_t err = opt_in_shared_memory(kernels::pointwise_wgrad_kernel<T>, pointwise_wgrad_smem_bytes());
  if (err != cudaSuccess) return err;
  kernels::pointwise_wgrad_kernel<T>
      <<<static_cast<unsigned int>(blocks), kPwThreads, pointwise_wgrad_smem_bytes(), stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_separable_wgmma(const SeparableWgmmaParams& p, DType dtype, int sms, cudaStream_t stream) {
  if (!separable_wgmma_ok(p) || sms <= 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::Float16: return launch_fused_typed<__half>(p, sms, stream);
    case DType::BFloat16: return launch_fused_typed<__nv_bfloat16>(p, sms, stream);
    case DType::Float32: break;
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_pointwise_wgrad(const PointwiseWgradParams& p, DType dtype, cudaStream_t stream) {
  if (!pointwise_wgrad_ok(p) || dtype == DType::Float32) return cudaErrorInvalidValue;
  const int64_t blocks = ((p.rows + kWgradTile - 1) / kWgradTile) * ((p.cols + kWgradTile - 1) / kWgradTile) * p.splits;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  return dtype == DType::BFloat16 ? launch_wgrad<__nv_bfloat16>(p, blocks, stream)
                                  : launch_wgrad<__half>(p, blocks, stream);
}

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
