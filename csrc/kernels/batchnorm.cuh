// BatchNorm finalize: per-channel sums of y and y^2 (the fused forward's statistics) -> the scale and shift
// that apply the batch normalization, the batch mean and the (biased) batch variance, and optionally in the same
// kernel the running statistics' update; the update alone as a kernel of its own (formulas in batchnorm_params.h). Torch-free; one thread per
// channel, in the statistics' own precision (float32, or float64 for float64 models).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "batchnorm_params.h"

namespace xception_ops {
namespace kernels {

__device__ __forceinline__ float reciprocal_sqrt(float v) { return rsqrtf(v); }
__device__ __forceinline__ double reciprocal_sqrt(double v) { return rsqrt(v); }

// A 16-bit element (a parameter or a running buffer) in float32; float32 and float64 ones as they are.
__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

// A running buffer's element or a parameter's gradient back in its own precision (rounded to nearest even).
template <typename R, typename T>
__device__ __forceinline__ R narrow(T v);
template <>
__device__ __forceinline__ float narrow<float, float>(float v) { return v; }
template <>
__device__ __forceinline__ double narrow<double, double>(double v) { return v; }
template <>
__device__ __forceinline__ __half narrow<__half, float>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16, float>(float v) { return __float2bfloat16_rn(v); }

// The running statistics' update of one channel (BatchNormUpdateParams' formulas), the buffers in R.
template <typename T, typename R>
__device__ __forceinline__ void update_running(R* running_mean, R* running_var, T mean, T var, const T* pre_bias,
                                               int64_t c, double count, double momentum) {
  const T f = static_cast<T>(momentum), keep = T(1) - static_cast<T>(momentum);
  const T moved = pre_bias != nullptr ? mean + pre_bias[c] : mean;
  const T unbiased = var * static_cast<T>(count / (count - 1));
  running_mean[c] = narrow<R>(keep * widen(running_mean[c]) + f * moved);
  running_var[c] = narrow<R>(keep * widen(running_var[c]) + f * unbiased);
}

template <typename T, typename P>
__global__ void batch_norm_finalize_kernel(const BatchNormFinalizeParams<T, P> p) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c == 0 && p.num_batches_tracked != nullptr) *p.num_batches_tracked += 1;
  if (c >= p.channels) return;
  const T n = static_cast<T>(p.count);
  const T mean = p.sum[c] / n;
  T var = p.sumsq[c] / n - mean * mean;
  var = var > T(0) ? var : T(0);
  const T invstd = reciprocal_sqrt(var + static_cast<T>(p.eps));
  const T scale = p.weight != nullptr ? static_cast<T>(widen(p.weight[c])) * invstd : invstd;
  p.scale[c] = scale;
  p.shift[c] = (p.bias != nullptr ? static_cast<T>(widen(p.bias[c])) : T(0)) - mean * scale;
  p.mean[c] = mean;
  p.var[c] = var;
  if (p.running_mean != nullptr) {
    update_running(p.running_mean, p.running_var, mean, var, p.pre_bias, c, p.count, p.momentum);
  }
}

template <typename T, typename P>
__global__ void batch_norm_finalize_backward_kernel(const BatchNormFinalizeBackwardParams<T, P> p) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= p.channels) return;
  const T n = static_cast<T>(p.count);
  const T m = p.sum[c] / n;
  const T raw_var = p.sumsq[c] / n - m * m;
  const T r = reciprocal_sqrt((raw_var > T(0) ? raw_var : T(0)) + static_cast<T>(p.eps));
  const T w = p.weight != nullptr ? static_cast<T>(widen(p.weight[c])) : T(1);
  const T g_scale = p.grad_scale != nullptr ? p.grad_scale[c] : T(0);
  const T g_shift = p.grad_shift != nullptr ? p.grad_shift[c] : T(0);
  const T g_mean = p.grad_mean != nullptr ? p.grad_mean[c] : T(0);
  const T g_var = p.grad_var != nullptr ? p.grad_var[c] : T(0);
  const T g_affine = g_scale - g_shift * m;
  const T g_r = g_affine * w;
  const T g_v = raw_var >= T(0) ? g_var - T(0.5) * g_r * r * r * r : T(0);
  const T g_m = g_mean - g_shift * w * r - T(2) * m * g_v;
  p.grad_sum[c] = g_m / n;
  p.grad_sumsq[c] = g_v / n;
  p.grad_weight[c] = narrow<P, T>(g_affine * r);
  p.grad_bias[c] = narrow<P, T>(g_shift);
}

template <typename T, typename R>
__global__ void batch_norm_update_stats_kernel(const BatchNormUpdateParams<T, R> p) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= p.channels) return;
  update_running(p.running_mean, p.running_var, p.mean[c], p.var[c], p.pre_bias, c, p.count, p.momentum);
}

}  // namespace kernels
}  // namespace xception_ops
