// The "cuda" backend's max pooling: allocation, the params struct and the launches (kernels/pool.cuh). The routers
// in registration.cpp have already run the argument checks.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/backend_common.h"
#include "cuda_backend.h"
#include "kernels/pool_params.h"
#include "kernels/separable_params.h"  // launch_reduce_rows, current_device_caps

namespace xception_ops::cuda {
namespace {

constexpr const char* kForward = "xception_ops.max_pool2d";
constexpr const char* kBackward = "xception_ops.max_pool2d_backward";
constexpr const char* kBnBackward = "xception_ops.max_pool2d_scale_shift_backward";

}  // namespace

std::tuple<Tensor, Tensor> max_pool2d(const Tensor& x, const Pool2dGeometry& g, bool save_argmax,
                                      const OptTensor& scale, const OptTensor& shift, const OptTensor& residual) {
  if (x.scalar_type() == at::kDouble) return reference::max_pool2d(x, g, save_argmax, scale, shift, residual);
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
  Tensor keep[2];  // float32 copies of the per-channel vectors
  p.scale = float_vector(scale, keep[0]);
  p.shift = float_vector(shift, keep[1]);
  if (residual.has_value()) p.residual = view_of(*residual);
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

// Channels-last: one pass (max_pool2d_backward_bn_kernel), then the fixed-order reduction of its partial sums.
// Other layouts: the two ops' kernels (the fused kernel puts channels across threads, which NCHW does not coalesce).
std::tuple<Tensor, Tensor, Tensor> max_pool2d_scale_shift_backward(const Tensor& grad_out, const Tensor& argmax,
                                                                   const Tensor& x, const Tensor& scale,
                                                                   const Tensor& shift, const Pool2dGeometry& g) {
  if (x.scalar_type() == at::kDouble || x.numel() == 0) {
    return reference::max_pool2d_scale_shift_backward(grad_out, argmax, x, scale, shift, g);
  }
  XO_CHECK_VALUE(x.is_cuda(), kBnBackward, ": backend 'cuda' needs CUDA tensors, but x is on ", x.device());
  const DType dtype = kernel_dtype(kBnBackward, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = output_memory_format(x);
  if (fmt != at::MemoryFormat::ChannelsLast) {
    return scale_shift_backward(max_pool2d_backward(grad_out, argmax, g, fmt), x, scale, shift, false);
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Tensor grad_x = at::empty(x.sizes(), x.options().memory_format(fmt));
  Tensor keep;
  MaxPoolParams p;
  p.g = g;
  p.input = view_of(grad_x);
  p.output = view_of(grad_out);
  p.argmax = view_of(argmax);
  p.bn_input = view_of(x);
  p.scale = float_vector(scale, keep);
  p.channels_last = true;
  DeviceCaps caps;
  check_launch(kBnBackward, current_device_caps(&caps));
  p.tile_positions = max_pool_bn_tile_positions(g.batch * g.in_h * g.in_w, caps.sms);
  const int64_t tiles = max_pool_bn_tiles(p), C = g.channels;
  Tensor workspace = at::empty({reduce_rows_workspace(tiles, 2 * C)}, x.options().dtype(at::kFloat));
  p.partial = workspace.data_ptr<float>();
  check_launch(kBnBackward, launch_max_pool2d_backward_bn(p, dtype, stream));
  const auto sums_options = x.options().dtype(at::kFloat);
  Tensor sum_gx = at::empty({C}, sums_options), sum_g = at::empty({C}, sums_options);
  check_launch(kBnBackward,
               launch_reduce_rows(p.partial, tiles, 2 * C, C, sum_gx.data_ptr<float>(), sum_g.data_ptr<float>(), stream));
  return {grad_x, in_type(sum_gx, scale.scalar_type()), in_type(sum_g, shift.scalar_type())};
}

}  // namespace xception_ops::cuda
