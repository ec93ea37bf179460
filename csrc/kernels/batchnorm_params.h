// What the BatchNorm finalize kernel (kernels/batchnorm.cuh) is told, and its launcher (cuda/batchnorm_launch.cu).
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

}  // namespace xception_ops
