// The "cuda" backend's BatchNorm finalize and running-statistics update: checks, allocation, the params structs and
// the launches (kernels/batchnorm.cuh). The routers in registration.cpp have already run the argument checks.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "cuda/backend_common.h"
#include "cuda_backend.h"
#include "kernels/batchnorm_params.h"

namespace xception_ops::cuda {
namespace {

constexpr const char* kOp = "xception_ops.batch_norm_finalize";
constexpr const char* kUpdate = "xception_ops.batch_norm_update_stats";
constexpr const char* kBackward = "xception_ops.batch_norm_finalize_backward";

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor> finalize_typed(const Tensor& sum, const Tensor& sumsq, int64_t count,
                                                          const OptTensor& weight, const OptTensor& bias,
                                                          double eps) {
  const Tensor s = sum.contiguous(), q = sumsq.contiguous();
  // The affine parameters in the statistics' precision; kept alive until the launch is queued (the caching
  // allocator orders their reuse after it on this stream).
  const Tensor w = weight.has_value() ? weight->to(sum.scalar_type()).contiguous() : Tensor();
  const Tensor b = bias.has_value() ? bias->to(sum.scalar_type()).contiguous() : Tensor();
  Tensor scale = at::empty_like(s), shift = at::empty_like(s), mean = at::empty_like(s), var = at::empty_like(s);
  BatchNormFinalizeParams<T> p;
  p.sum = s.data_ptr<T>();
  p.sumsq = q.data_ptr<T>();
  p.weight = w.defined() ? w.data_ptr<T>() : nullptr;
  p.bias = b.defined() ? b.data_ptr<T>() : nullptr;
  p.scale = scale.data_ptr<T>();
  p.shift = shift.data_ptr<T>();
  p.mean = mean.data_ptr<T>();
  p.var = var.data_ptr<T>();
  p.channels = s.numel();
  p.count = static_cast<double>(count);
  p.eps = eps;
  check_launch(kOp, launch_batch_norm_finalize<T>(p, c10::cuda::getCurrentCUDAStream()));
  return {scale, shift, mean, var};
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor> finalize_backward_typed(const Tensor& sum, const Tensor& sumsq,
                                                                   int64_t count, const OptTensor& weight,
                                                                   double eps, const OptTensor (&grads)[4]) {
  const Tensor s = sum.contiguous(), q = sumsq.contiguous();
  // The inputs in the statistics' precision, kept alive until the launch is queued.
  auto vector = [&](const OptTensor& t) { return t.has_value() ? t->to(sum.scalar_type()).contiguous() : Tensor(); };
  const Tensor w = vector(weight);
  Tensor g[4];
  for (int i = 0; i < 4; ++i) g[i] = vector(grads[i]);
  Tensor grad_sum = at::empty_like(s), grad_sumsq = at::empty_like(s), grad_weight = at::empty_like(s),
         grad_bias = at::empty_like(s);
  auto ptr = [](const Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; };
  BatchNormFinalizeBackwardParams<T> p;
  p.sum = s.data_ptr<T>();
  p.sumsq = q.data_ptr<T>();
  p.weight = ptr(w);
  p.grad_scale = ptr(g[0]), p.grad_shift = ptr(g[1]), p.grad_mean = ptr(g[2]), p.grad_var = ptr(g[3]);
  p.grad_sum = grad_sum.data_ptr<T>();
  p.grad_sumsq = grad_sumsq.data_ptr<T>();
  p.grad_weight = grad_weight.data_ptr<T>();
  p.grad_bias = grad_bias.data_ptr<T>();
  p.channels = s.numel();
  p.count = static_cast<double>(count);
  p.eps = eps;
  check_launch(kBackward, launch_batch_norm_finalize_backward<T>(p, c10::cuda::getCurrentCUDAStream()));
  return {grad_sum, grad_sumsq, grad_weight, grad_bias};
}

template <typename T>
void update_typed(const Tensor& running_mean, const Tensor& running_var, const Tensor& mean, const Tensor& var,
                  const OptTensor& pre_bias, int64_t count, double momentum) {
  const Tensor m = mean.contiguous(), v = var.contiguous();
  const Tensor b = pre_bias.has_value() ? pre_bias->to(mean.scalar_type()).contiguous() : Tensor();
  BatchNormUpdateParams<T> p;
  p.running_mean = running_mean.data_ptr<T>();
  p.running_var = running_var.data_ptr<T>();
  p.mean = m.data_ptr<T>();
  p.var = v.data_ptr<T>();
  p.pre_bias = b.defined() ? b.data_ptr<T>() : nullptr;
  p.channels = m.numel();
  p.count = static_cast<double>(count);
  p.momentum = momentum;
  check_launch(kUpdate, launch_batch_norm_update_stats<T>(p, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_finalize_backward(
    const Tensor& sum, const Tensor& sumsq, int64_t count, const OptTensor& weight, double eps,
    const OptTensor& grad_scale, const OptTensor& grad_shift, const OptTensor& grad_mean, const OptTensor& grad_var) {
  XO_CHECK_VALUE(sum.is_cuda(), kBackward, ": backend 'cuda' needs CUDA tensors, but sum is on ", sum.device());
  const c10::cuda::CUDAGuard guard(sum.device());
  const OptTensor grads[4] = {grad_scale, grad_shift, grad_mean, grad_var};
  if (sum.scalar_type() == at::kDouble) return finalize_backward_typed<double>(sum, sumsq, count, weight, eps, grads);
  return finalize_backward_typed<float>(sum, sumsq, count, weight, eps, grads);
}

void batch_norm_update_stats(const Tensor& running_mean, const Tensor& running_var, const Tensor& mean,
                             const Tensor& var, const OptTensor& pre_bias, int64_t count, double momentum) {
  XO_CHECK_VALUE(mean.is_cuda(), kUpdate, ": backend 'cuda' needs CUDA tensors, but mean is on ", mean.device());
  const auto type = mean.scalar_type();
  if (running_mean.scalar_type() != type || running_var.scalar_type() != type || !running_mean.is_contiguous() ||
      !running_var.is_contiguous()) {
    // Buffers in another precision (a model cast to bf16) or strided: the reference's few ATen ops.
    reference::batch_norm_update_stats(running_mean, running_var, mean, var, pre_bias, count, momentum);
    return;
  }
  const c10::cuda::CUDAGuard guard(mean.device());
  if (type == at::kDouble) {
    update_typed<double>(running_mean, running_var, mean, var, pre_bias, count, momentum);
  } else {
    update_typed<float>(running_mean, running_var, mean, var, pre_bias, count, momentum);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_finalize(const Tensor& sum, const Tensor& sumsq,
                                                               int64_t count, const OptTensor& weight,
                                                               const OptTensor& bias, double eps) {
  XO_CHECK_VALUE(sum.is_cuda(), kOp, ": backend 'cuda' needs CUDA tensors, but sum is on ", sum.device());
  const c10::cuda::CUDAGuard guard(sum.device());
  if (sum.scalar_type() == at::kDouble) return finalize_typed<double>(sum, sumsq, count, weight, bias, eps);
  return finalize_typed<float>(sum, sumsq, count, weight, bias, eps);
}

}  // namespace xception_ops::cuda
