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

// P: the affine parameters' element type: T, or (T = float) __half / __nv_bfloat16 for a model cast to 16 bits,
// read as they are (converting them first took two more launches per BatchNorm and step).
//
// Optionally the same kernel then updates the running statistics in place (BatchNormUpdateParams' formulas, below,
// with buffers of the parameters' type P) and advances num_batches_tracked by one: one launch per BatchNorm and
// training step where three ran (the finalize, the update, and nn.BatchNorm2d's `num_batches_tracked += 1`).
template <typename T, typename P = T>
struct BatchNormFinalizeParams {
  const T* sum = nullptr;
  const T* sumsq = nullptr;
  const P* weight = nullptr;  // nullptr: 1
  const P* bias = nullptr;    // nullptr: 0
  T* scale = nullptr;
  T* shift = nullptr;
  T* mean = nullptr;
  T* var = nullptr;
  int64_t channels = 0;
  double count = 1;
  double eps = 0;
  // The update (running_mean nullptr: none).
  P* running_mean = nullptr;
  P* running_var = nullptr;
  const T* pre_bias = nullptr;  // nullptr: 0
  double momentum = 0;
  int64_t* num_batches_tracked = nullptr;  // nullptr: none; advanced by the kernel's first thread
};

// T is float or double. Returns cudaGetLastError() after the launch (cudaSuccess with no channels and nothing to
// count).
template <typename T, typename P>
cudaError_t launch_batch_norm_finalize(const BatchNormFinalizeParams<T, P>& p, cudaStream_t stream);

// The finalize step's backward: from the gradients of (scale, shift, mean, var) (nullptr: zeros) to those of
// (sum, sumsq, weight, bias). With m = sum / n, v = max(sumsq / n - m^2, 0), r = (v + eps)^-1/2:
//   g_r = (g_scale - g_shift m) w          g_v = (g_var - g_r r^3 / 2) [sumsq / n - m^2 >= 0]
//   g_m = g_mean - g_shift w r - 2 m g_v   g_sum = g_m / n   g_sumsq = g_v / n
//   g_weight = (g_scale - g_shift m) r     g_bias = g_shift
// g_weight and g_bias are written in P, rounded once (as the parameters' gradients must be; converting them after
// took two more launches per BatchNorm and step in a model cast to 16 bits).
template <typename T, typename P = T>  // P as in BatchNormFinalizeParams
struct BatchNormFinalizeBackwardParams {
  const T* sum = nullptr;
  const T* sumsq = nullptr;
  const P* weight = nullptr;  // nullptr: 1
  const T* grad_scale = nullptr;
  const T* grad_shift = nullptr;
  const T* grad_mean = nullptr;
  const T* grad_var = nullptr;
  T* grad_sum = nullptr;
  T* grad_sumsq = nullptr;
  P* grad_weight = nullptr;
  P* grad_bias = nullptr;
  int64_t channels = 0;
  double count = 1;
  double eps = 0;
};

template <typename T, typename P>
cudaError_t launch_batch_norm_finalize_backward(const BatchNormFinalizeBackwardParams<T, P>& p, cudaStream_t stream);

// The running statistics' update that follows the finalize step, in place, as PyTorch's BatchNorm does it (the
// running variance takes the unbiased batch variance):
//   running_mean = (1 - momentum) running_mean + momentum (mean + pre_bias)
//   running_var  = (1 - momentum) running_var  + momentum var count / (count - 1)
// pre_bias: a bias the fused op left out of y (it cancels in the normalization but moves the mean).
// R: the running buffers' element type: T, or (T = float) __half / __nv_bfloat16 for a model cast to 16 bits, whose
// buffers are read into T and the result rounded once to R, as PyTorch's ops and copy_ would round it.
template <typename T, typename R = T>
struct BatchNormUpdateParams {
  R* running_mean = nullptr;
  R* running_var = nullptr;
  const T* mean = nullptr;
  const T* var = nullptr;
  const T* pre_bias = nullptr;  // nullptr: 0
  int64_t channels = 0;
  double count = 2;
  double momentum = 0;
};

template <typename T, typename R>
cudaError_t launch_batch_norm_update_stats(const BatchNormUpdateParams<T, R>& p, cudaStream_t stream);

}  // namespace xception_ops
