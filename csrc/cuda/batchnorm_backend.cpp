// The "cuda" backend's BatchNorm ops: finalize (forward, backward), the running-statistics update, and the
// normalization applied (scale_shift, on the separable backward's element-wise kernels): checks, allocation, the
// params structs and the launches. The routers in registration.cpp have already run the argument checks.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "cuda/backend_common.h"
#include "cuda_backend.h"
#include "kernels/batchnorm_params.h"
#include "kernels/separable_params.h"

namespace xception_ops::cuda {
namespace {

constexpr const char* kOp = "xception_ops.batch_norm_finalize";
constexpr const char* kUpdate = "xception_ops.batch_norm_update_stats";
constexpr const char* kBackward = "xception_ops.batch_norm_finalize_backward";
constexpr const char* kScaleShift = "xception_ops.scale_shift";
constexpr const char* kScaleShiftBwd = "xception_ops.scale_shift_backward";

// y's (N, C, H, W) as the element-wise kernels take it.
Conv2dGeometry channels_geometry(const Tensor& y) {
  Conv2dGeometry g;
  g.batch = y.size(0), g.in_channels = y.size(1), g.in_h = y.size(2), g.in_w = y.size(3);
  return g;
}

template <typename P>
const P* param_ptr(const Tensor& t) {
  return t.defined() ? static_cast<const P*>(t.data_ptr()) : nullptr;
}

// Whether the finalize kernel can do the update's part on these tensors: running buffers contiguous in the
// parameters' dtype, the counter a contiguous int64.
bool kernel_buffers(const OptTensor& running_mean, const OptTensor& running_var, at::ScalarType param_type) {
  return running_mean.has_value() && running_mean->scalar_type() == param_type && running_mean->is_contiguous() &&
         running_var->scalar_type() == param_type && running_var->is_contiguous();
}
bool kernel_counter(const OptTensor& tracked) { return tracked.has_value() && tracked->is_contiguous(); }

template <typename T, typename P = T>
std::tuple<Tensor, Tensor, Tensor, Tensor> finalize_typed(const Tensor& sum, const Tensor& sumsq, int64_t count,
                                                          const OptTensor& weight, const OptTensor& bias,
                                                          double eps, at::ScalarType param_type,
                                                          const RunningStatsUpdate& update) {
  const Tensor s = sum.contiguous(), q = sumsq.contiguous();
  // The affine parameters in param_type (P); kept alive until the launch is queued (the caching allocator orders
  // their reuse after it on this stream).
  const Tensor w = weight.has_value() ? in_type(*weight, param_type).contiguous() : Tensor();
  const Tensor b = bias.has_value() ? in_type(*bias, param_type).contiguous() : Tensor();
  Tensor scale = at::empty_like(s), shift = at::empty_like(s), mean = at::empty_like(s), var = at::empty_like(s);
  BatchNormFinalizeParams<T, P> p;
  p.sum = s.data_ptr<T>();
  p.sumsq = q.data_ptr<T>();
  p.weight = param_ptr<P>(w);
  p.bias = param_ptr<P>(b);
  p.scale = scale.data_ptr<T>();
  p.shift = shift.data_ptr<T>();
  p.mean = mean.data_ptr<T>();
  p.var = var.data_ptr<T>();
  p.channels = s.numel();
  p.count = static_cast<double>(count);
  p.eps = eps;
  // The update in the same kernel where it can; the rest after it, as batch_norm_update_stats and add_(1) do it.
  Tensor pre_bias;
  const bool buffers = kernel_buffers(update.running_mean, update.running_var, param_type);
  if (buffers) {
    p.running_mean = static_cast<P*>(update.running_mean->data_ptr());
    p.running_var = static_cast<P*>(update.running_var->data_ptr());
    pre_bias = update.pre_bias.has_value() ? in_type(*update.pre_bias, s.scalar_type()).contiguous() : Tensor();
    p.pre_bias = pre_bias.defined() ? pre_bias.data_ptr<T>() : nullptr;
    p.momentum = update.momentum;
  }
  const bool counter = kernel_counter(update.num_batches_tracked);
  if (counter) p.num_batches_tracked = update.num_batches_tracked->data_ptr<int64_t>();
  check_launch(kOp, launch_batch_norm_finalize<T>(p, c10::cuda::getCurrentCUDAStream()));
  if (update.running_mean.has_value() && !buffers) {
    batch_norm_update_stats(*update.running_mean, *update.running_var, mean, var, update.pre_bias, count,
                            update.momentum);
  }
  if (update.num_batches_tracked.has_value() && !counter) update.num_batches_tracked->add_(1);
  return {scale, shift, mean, var};
}

template <typename T, typename P = T>
std::tuple<Tensor, Tensor, Tensor, Tensor> finalize_backward_typed(const Tensor& sum, const Tensor& sumsq,
                                                                   int64_t count, const OptTensor& weight,
                                                                   double eps, const OptTensor (&grads)[4],
                                                                   at::ScalarType param_type) {
  const Tensor s = sum.contiguous(), q = sumsq.contiguous();
  // The gradients in the statistics' precision and the weight in param_type (P), kept alive until the launch is
  // queued.
  auto vector = [&](const OptTensor& t) {
    return t.has_value() ? in_type(*t, sum.scalar_type()).contiguous() : Tensor();
  };
  const Tensor w = weight.has_value() ? in_type(*weight, param_type).contiguous() : Tensor();
  Tensor g[4];
  for (int i = 0; i < 4; ++i) g[i] = vector(grads[i]);
  // The parameters' gradients in param_type (P): the dtype the parameters are read in (batch_norm_param_type).
  Tensor grad_sum = at::empty_like(s), grad_sumsq = at::empty_like(s),
         grad_weight = at::empty_like(s, s.options().dtype(param_type)),
         grad_bias = at::empty_like(s, s.options().dtype(param_type));
  auto ptr = [](const Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; };
  BatchNormFinalizeBackwardParams<T, P> p;
  p.sum = s.data_ptr<T>();
  p.sumsq = q.data_ptr<T>();
  p.weight = param_ptr<P>(w);
  p.grad_scale = ptr(g[0]), p.grad_shift = ptr(g[1]), p.grad_mean = ptr(g[2]), p.grad_var = ptr(g[3]);
  p.grad_sum = grad_sum.data_ptr<T>();
  p.grad_sumsq = grad_sumsq.data_ptr<T>();
  p.grad_weight = static_cast<P*>(grad_weight.data_ptr());
  p.grad_bias = static_cast<P*>(grad_bias.data_ptr());
  p.channels = s.numel();
  p.count = static_cast<double>(count);
  p.eps = eps;
  check_launch(kBackward, launch_batch_norm_finalize_backward<T>(p, c10::cuda::getCurrentCUDAStream()));
  return {grad_sum, grad_sumsq, grad_weight, grad_bias};
}

template <typename T, typename R = T>
void update_typed(const Tensor& running_mean, const Tensor& running_var, const Tensor& mean, const Tensor& var,
                  const OptTensor& pre_bias, int64_t count, double momentum) {
  const Tensor m = mean.contiguous(), v = var.contiguous();
  const Tensor b = pre_bias.has_value() ? in_type(*pre_bias, mean.scalar_type()).contiguous() : Tensor();
  BatchNormUpdateParams<T, R> p;
  p.running_mean = static_cast<R*>(running_mean.data_ptr());
  p.running_var = static_cast<R*>(running_var.data_ptr());
  p.mean = m.data_ptr<T>();
  p.var = v.data_ptr<T>();
  p.pre_bias = b.defined() ? b.data_ptr<T>() : nullptr;
  p.channels = m.numel();
  p.count = static_cast<double>(count);
  p.momentum = momentum;
  check_launch(kUpdate, launch_batch_norm_update_stats<T>(p, c10::cuda::getCurrentCUDAStream()));
}

// The channel pass over y of scale_shift and its backward: y's geometry, scale, shift (kept alive in keep) and the
// ReLU, its tile planned; the caller adds the tensors its pass reads and writes.
ChannelPassParams scale_shift_pass(const char* op, const Tensor& y, const Tensor& scale, const Tensor& shift,
                                   bool relu, Tensor (&keep)[2]) {
  ChannelPassParams p;
  p.g = channels_geometry(y);
  p.channels = y.size(1), p.h = y.size(2), p.w = y.size(3);
  p.scale = float_vector(scale, keep[0]);
  p.vec_a = float_vector(shift, keep[1]);
  p.relu = relu;
  check_launch(op, plan_channel_pass(p));
  return p;
}

}  // namespace

Tensor scale_shift(const Tensor& y, const Tensor& scale, const Tensor& shift, bool relu, const OptTensor& residual) {
  if (y.scalar_type() == at::kDouble || y.numel() == 0) {
    return reference::scale_shift(y, scale, shift, relu, residual);
  }
  XO_CHECK_VALUE(y.is_cuda(), kScaleShift, ": backend 'cuda' needs CUDA tensors, but y is on ", y.device());
  const DType dtype = kernel_dtype(kScaleShift, y);
  const c10::cuda::CUDAGuard guard(y.device());
  Tensor out = at::empty(y.sizes(), y.options().memory_format(output_memory_format(y)));
  Tensor keep[2];
  // The separable forward's epilogue pass without a residual or sums: the same relu?(round(y * scale + shift)),
  // by tiles of pixels with each thread's channels fixed (prologue_apply_kernel, a flat grid-stride loop, spent four
  // 64-bit divisions per vector on its index: 68 us at 256 -> 728 @37^2 against a ~43 us floor, H100 session 10).
  ChannelPassParams e = scale_shift_pass(kScaleShift, y, scale, shift, relu, keep);
  e.y = view_of(y);
  if (residual.has_value()) e.act = view_of(*residual);  // added after the rounding, rounded again, then the ReLU
  e.result = view_of(out);
  check_launch(kScaleShift, launch_channel_pass(e, dtype, ChannelPass::Epilogue, c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<Tensor, Tensor, Tensor> scale_shift_backward(const Tensor& grad, const Tensor& y, const Tensor& scale,
                                                        const Tensor& shift, bool relu) {
  if (y.scalar_type() == at::kDouble || y.numel() == 0) {
    return reference::scale_shift_backward(grad, y, scale, shift, relu);
  }
  XO_CHECK_VALUE(y.is_cuda(), kScaleShiftBwd, ": backend 'cuda' needs CUDA tensors, but y is on ", y.device());
  const DType dtype = kernel_dtype(kScaleShiftBwd, y);
  const c10::cuda::CUDAGuard guard(y.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t C = y.size(1);
  Tensor grad_y = at::empty(y.sizes(), y.options().memory_format(output_memory_format(y)));
  Tensor keep[2];
  // The prologue's backward pass of the separable backward: the ReLU mask, round(g * scale), sums of g y and g.
  ChannelPassParams r = scale_shift_pass(kScaleShiftBwd, y, scale, shift, relu, keep);
  r.grad = view_of(grad);
  r.act = view_of(y);
  r.result = view_of(grad_y);
  const int64_t tiles = channel_pass_tiles(r);
  Tensor workspace = at::empty({reduce_rows_workspace(tiles, 2 * C)}, y.options().dtype(at::kFloat));
  r.partial = workspace.data_ptr<float>();
  check_launch(kScaleShiftBwd, launch_channel_pass(r, dtype, ChannelPass::Prologue, stream));
  // Buffers of their own (an op's outputs must not alias one another), reduced into directly: no copies.
  const auto sums_options = y.options().dtype(at::kFloat);
  Tensor sum_gy = at::empty({C}, sums_options), sum_g = at::empty({C}, sums_options);
  check_launch(kScaleShiftBwd, launch_reduce_rows(r.partial, tiles, 2 * C, C, sum_gy.data_ptr<float>(),
                                                  sum_g.data_ptr<float>(), stream));
  return {grad_y, in_type(sum_gy, scale.scalar_type()), in_type(sum_g, shift.scalar_type())};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_finalize_backward(
    const Tensor& sum, const Tensor& sumsq, int64_t count, const OptTensor& weight, double eps,
    const OptTensor& grad_scale, const OptTensor& grad_shift, const OptTensor& grad_mean, const OptTensor& grad_var) {
  XO_CHECK_VALUE(sum.is_cuda(), kBackward, ": backend 'cuda' needs CUDA tensors, but sum is on ", sum.device());
  const c10::cuda::CUDAGuard guard(sum.device());
  const OptTensor grads[4] = {grad_scale, grad_shift, grad_mean, grad_var};
  const at::ScalarType params = batch_norm_param_type(sum, weight, c10::nullopt);
  switch (params) {
    case at::kDouble: return finalize_backward_typed<double>(sum, sumsq, count, weight, eps, grads, params);
    case at::kBFloat16:
      return finalize_backward_typed<float, __nv_bfloat16>(sum, sumsq, count, weight, eps, grads, params);
    case at::kHalf: return finalize_backward_typed<float, __half>(sum, sumsq, count, weight, eps, grads, params);
    default: return finalize_backward_typed<float>(sum, sumsq, count, weight, eps, grads, params);
  }
}

void batch_norm_update_stats(const Tensor& running_mean, const Tensor& running_var, const Tensor& mean,
                             const Tensor& var, const OptTensor& pre_bias, int64_t count, double momentum) {
  XO_CHECK_VALUE(mean.is_cuda(), kUpdate, ": backend 'cuda' needs CUDA tensors, but mean is on ", mean.device());
  const auto type = mean.scalar_type(), buffers = running_mean.scalar_type();
  // Buffers in the statistics' precision, or 16-bit ones beside float32 statistics (a model cast to bf16 / fp16).
  const bool kernel_buffers =
      buffers == type || (type == at::kFloat && (buffers == at::kBFloat16 || buffers == at::kHalf));
  if (!kernel_buffers || running_var.scalar_type() != buffers || !running_mean.is_contiguous() ||
      !running_var.is_contiguous()) {
    // Buffers in another precision, or strided: the reference's few ATen ops.
    reference::batch_norm_update_stats(running_mean, running_var, mean, var, pre_bias, count, momentum);
    return;
  }
  const c10::cuda::CUDAGuard guard(mean.device());
  if (type == at::kDouble) {
    update_typed<double>(running_mean, running_var, mean, var, pre_bias, count, momentum);
  } else if (buffers == at::kBFloat16) {
    update_typed<float, __nv_bfloat16>(running_mean, running_var, mean, var, pre_bias, count, momentum);
  } else if (buffers == at::kHalf) {
    update_typed<float, __half>(running_mean, running_var, mean, var, pre_bias, count, momentum);
  } else {
    update_typed<float>(running_mean, running_var, mean, var, pre_bias, count, momentum);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_finalize(const Tensor& sum, const Tensor& sumsq,
                                                               int64_t count, const OptTensor& weight,
                                                               const OptTensor& bias, double eps,
                                                               const RunningStatsUpdate& update) {
  XO_CHECK_VALUE(sum.is_cuda(), kOp, ": backend 'cuda' needs CUDA tensors, but sum is on ", sum.device());
  const c10::cuda::CUDAGuard guard(sum.device());
  const at::ScalarType params = batch_norm_param_type(sum, weight, bias);
  switch (params) {
    case at::kDouble: return finalize_typed<double>(sum, sumsq, count, weight, bias, eps, params, update);
    case at::kBFloat16:
      return finalize_typed<float, __nv_bfloat16>(sum, sumsq, count, weight, bias, eps, params, update);
    case at::kHalf: return finalize_typed<float, __half>(sum, sumsq, count, weight, bias, eps, params, update);
    default: return finalize_typed<float>(sum, sumsq, count, weight, bias, eps, params, update);
  }
}

}  // namespace xception_ops::cuda
