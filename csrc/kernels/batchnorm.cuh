// BatchNorm finalize: per-channel sums of y and y^2 (the fused forward's statistics) -> the scale and shift
// that apply the batch normalization, the batch mean and the (biased) batch variance; then the running
// statistics' update from that mean and variance (formulas in batchnorm_params.h). Torch-free; one thread per
// channel, in the statistics' own precision (float32, or float64 for float64 models).
#pragma once

#include <cstdint>

#include "batchnorm_params.h"

namespace xception_ops {
namespace kernels {

__device__ __forceinline__ float reciprocal_sqrt(float v) { return rsqrtf(v); }
__device__ __forceinline__ double reciprocal_sqrt(double v) { return rsqrt(v); }

template <typename T>
__global__ void batch_norm_finalize_kernel(const BatchNormFinalizeParams<T> p) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= p.channels) return;
  const T n = static_cast<T>(p.count);
  const T mean = p.sum[c] / n;
  T var = p.sumsq[c] / n - mean * mean;
  var = var > T(0) ? var : T(0);
  const T invstd = reciprocal_sqrt(var + static_cast<T>(p.eps));
  const T scale = p.weight != nullptr ? p.weight[c] * invstd : invstd;
  p.scale[c] = scale;
  p.shift[c] = (p.bias != nullptr ? p.bias[c] : T(0)) - mean * scale;
  p.mean[c] = mean;
  p.var[c] = var;
}

template <typename T>
__global__ void batch_norm_update_stats_kernel(const BatchNormUpdateParams<T> p) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= p.channels) return;
  const T f = static_cast<T>(p.momentum), keep = T(1) - static_cast<T>(p.momentum);
  const T mean = p.pre_bias != nullptr ? p.mean[c] + p.pre_bias[c] : p.mean[c];
  const T unbiased = p.var[c] * static_cast<T>(p.count / (p.count - 1));
  p.running_mean[c] = keep * p.running_mean[c] + f * mean;
  p.running_var[c] = keep * p.running_var[c] + f * unbiased;
}

}  // namespace kernels
}  // namespace xception_ops
