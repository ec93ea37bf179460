// Launchers of the BatchNorm finalize (forward, backward) and running-statistics kernels (kernels/batchnorm.cuh).
// No torch headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/batchnorm.cuh"

namespace xception_ops {

namespace {

// One thread per channel: every BatchNorm kernel's grid, from the params' channel count.
template <typename Params>
cudaError_t launch_per_channel(void (*kernel)(Params), const Params& p, cudaStream_t stream) {
  if (p.channels == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const dim3 grid(static_cast<unsigned int>((p.channels + kThreads - 1) / kThreads));
  kernel<<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

template <typename T, typename P>
cudaError_t launch_batch_norm_finalize(const BatchNormFinalizeParams<T, P>& p, cudaStream_t stream) {
  if (p.channels == 0 && p.num_batches_tracked != nullptr) {  // no channels, still a batch to count
    kernels::batch_norm_finalize_kernel<T, P><<<1, 1, 0, stream>>>(p);
    return cudaGetLastError();
  }
  return launch_per_channel(kernels::batch_norm_finalize_kernel<T, P>, p, stream);
}

template <typename T, typename P>
cudaError_t launch_batch_norm_finalize_backward(const BatchNormFinalizeBackwardParams<T, P>& p,
                                                cudaStream_t stream) {
  return launch_per_channel(kernels::batch_norm_finalize_backward_kernel<T, P>, p, stream);
}

template <typename T, typename R>
cudaError_t launch_batch_norm_update_stats(const BatchNormUpdateParams<T, R>& p, cudaStream_t stream) {
  return launch_per_channel(kernels::batch_norm_update_stats_kernel<T, R>, p, stream);
}

template cudaError_t launch_batch_norm_finalize(const BatchNormFinalizeParams<float>&, cudaStream_t);
template cudaError_t launch_batch_norm_finalize(const BatchNormFinalizeParams<double>&, cudaStream_t);
template cudaError_t launch_batch_norm_finalize(const BatchNormFinalizeParams<float, __half>&, cudaStream_t);
template cudaError_t launch_batch_norm_finalize(const BatchNormFinalizeParams<float, __nv_bfloat16>&, cudaStream_t);
template cudaError_t launch_batch_norm_finalize_backward(const BatchNormFinalizeBackwardParams<float>&, cudaStream_t);
template cudaError_t launch_batch_norm_finalize_backward(const BatchNormFinalizeBackwardParams<double>&, cudaStream_t);
template cudaError_t launch_batch_norm_finalize_backward(const BatchNormFinalizeBackwardParams<float, __half>&,
                                                         cudaStream_t);
template cudaError_t launch_batch_norm_finalize_backward(
    const BatchNormFinalizeBackwardParams<float, __nv_bfloat16>&, cudaStream_t);
template cudaError_t launch_batch_norm_update_stats<float, float>(const BatchNormUpdateParams<float>&, cudaStream_t);
template cudaError_t launch_batch_norm_update_stats<double, double>(const BatchNormUpdateParams<double>&,
                                                                   cudaStream_t);
template cudaError_t launch_batch_norm_update_stats<float, __half>(const BatchNormUpdateParams<float, __half>&,
                                                                   cudaStream_t);
template cudaError_t launch_batch_norm_update_stats<float, __nv_bfloat16>(
    const BatchNormUpdateParams<float, __nv_bfloat16>&, cudaStream_t);

}  // namespace xception_ops
