// The "cuda" backend's max pooling: allocation, the params struct and the launches (kernels/pool.cuh). The routers
// in registration.cpp have already run the argument checks.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/backend_common.h"
#include "cuda_backend.h"
#include "kernels/pool_params.h"

namespace xception_ops::cuda {
namespace {

constexpr const char* kForward = "xception_ops.max_pool2d";
constexpr const char* kBackward = "xception_ops.max_pool2d_backward";

}  // namespace

std::tuple<Tensor, Tensor> max_pool2d(const Tensor& x, const Pool2dGeometry& g, bool save_argmax) {
  if (x.scalar_type() == at::kDouble) return reference::max_pool2d(x, g, save_argmax);
  XO_CHECK_VALUE(x.is_cuda(), kForward, ": backend 'cuda' needs CUDA tensors, but x is on ", x.device());
  const DType dtype = kernel_dtype(kForward, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = output_memory_format(x);
  const auto options = x.options().memory_format(fmt);
  Tensor out = at::empty({g.batch, g.channels, g.out_h, g.out_w}, options);
  Tensor argmax = save_argmax ? at::empty({g.batch, g.channels, g.out_h, g.out_w}, options.dtype(at::kByte))
                              : at::empty({0}, x.options().dtype(at::kByte));
  MaxPoolParams p;
  p.g = g;
  p.input = view_of(x);
  p.output = view_of(out);
  if (save_argmax) p.argmax = view_of(argmax);
  p.channels_last = fmt == at::MemoryFormat::ChannelsLast;
  check_launch(kForward, launch_max_pool2d_forward(p, dtype, c10::cuda::getCurrentCUDAStream()));
  return {out, argmax};
}

Tensor max_pool2d_backward(const Tensor& grad_out, const Tensor& argmax, const Pool2dGeometry& g,
                           at::MemoryFormat fmt) {
  if (grad_out.scalar_type() == at::kDouble) return reference::max_pool2d_backward(grad_out, argmax, g, fmt);
  XO_CHECK_VALUE(grad_out.is_cuda(), kBackward, ": backend 'cuda' needs CUDA tensors, but grad_out is on ",
                 grad_out.device());
  const DType dtype = kernel_dtype(kBackward, grad_out);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  Tensor grad_x = at::empty({g.batch, g.channels, g.in_h, g.in_w}, grad_out.options().memory_format(fmt));
  MaxPoolParams p;
  p.g = g;
  p.input = view_of(grad_x);
  p.output = view_of(grad_out);
  p.argmax = view_of(argmax);
  p.channels_last = fmt == at::MemoryFormat::ChannelsLast;
  check_launch(kBackward, launch_max_pool2d_backward(p, dtype, c10::cuda::getCurrentCUDAStream()));
  return grad_x;
}

}  // namespace xception_ops::cuda
