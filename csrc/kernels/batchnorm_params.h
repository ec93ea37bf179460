// What the BatchNorm finalize and running-statistics kernels (kernels/batchnorm.cuh) are told, and their
// launchers (cuda/batchnorm_launch.cu).
//
//   mean  = sum / count              var   = max(sumsq / count - mean^2, 0)
//   scale = weight / sqrt(var + eps) shift = bias - mean * scale          (weight 1 and bias 0 when absent)
//
// Torch-free and device-code-free, so that the torch layer (cuda/batchnorm_backend.cpp) can include it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace xception_ops {

template <typename T>
struct BatchNormFinalizeParams {
  const T* sum = nullptr;
  const T* sumsq = nullptr;
  const T* weight = nullptr;  // nullptr: 1
  const T* bias = nullptr;    // nullptr: 0
  T* scale = nullptr;
  T* shift = nullptr;
  T* mean = nullptr;
  T* var = nullptr;
  int64_t channels = 0;
  double count = 1;
  double eps = 0;
};

// T is float or double. Returns cudaGetLastError() after the launch (cudaSuccess with no channels).
template <typename T>
cudaError_t launch_batch_norm_finalize(const BatchNormFinalizeParams<T>& p, cudaStream_t stream);

// The running statistics' update that follows the finalize step, in place, as PyTorch's BatchNorm does it (the
// running variance takes the unbiased batch variance):
//   running_mean = (1 - momentum) running_mean + momentum (mean + pre_bias)
//   running_var  = (1 - momentum) running_var  + momentum var count / (count - 1)
// pre_bias: a bias the fused op left out of y (it cancels in the normalization but moves the mean).
template <typename T>
struct BatchNormUpdateParams {
  T* running_mean = nullptr;
  T* running_var = nullptr;
  const T* mean = nullptr;
  const T* var = nullptr;
  const T* pre_bias = nullptr;  // nullptr: 0
  int64_t channels = 0;
  double count = 2;
  double momentum = 0;
};

template <typename T>
cudaError_t launch_batch_norm_update_stats(const BatchNormUpdateParams<T>& p, cudaStream_t stream);

}  // namespace xception_ops
