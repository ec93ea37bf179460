// The "cuda" backend's depthwise ops: checks, device guard, output allocation and the params struct; the
// kernels and their launchers are torch-free (kernels/depthwise.cuh, cuda/depthwise_launch.cu).
//
// The routers in registration.cpp have already checked shapes, dtypes and devices (check_depthwise,
// check_like); the checks here repeat the ones a launch depends on, so these functions are safe on their own.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/backend_common.h"
#include "cuda_backend.h"
#include "kernels/depthwise_params.h"
#include "kernels/separable_params.h"

namespace xception_ops::cuda {
namespace {

constexpr const char* kForward = "xception_ops.depthwise_conv2d";
constexpr const char* kBackwardInput = "xception_ops.depthwise_conv2d_backward_input";
constexpr const char* kBackwardWeight = "xception_ops.depthwise_conv2d_backward_weight";

bool is_channels_last(at::MemoryFormat fmt) { return fmt == at::MemoryFormat::ChannelsLast; }

std::vector<int64_t> input_shape(const Conv2dGeometry& g) { return {g.batch, g.in_channels, g.in_h, g.in_w}; }
std::vector<int64_t> output_shape(const Conv2dGeometry& g) { return {g.batch, g.dw_channels(), g.out_h, g.out_w}; }
std::vector<int64_t> weight_shape(const Conv2dGeometry& g) { return {g.dw_channels(), 1, g.kernel_h, g.kernel_w}; }

// The input gradient's params (use_int32 left to the caller, after any prologue).
DepthwiseParams backward_input_params(const Tensor& grad_x, const Tensor& grad_out, const Tensor& weight,
                                      const Conv2dGeometry& g, at::MemoryFormat fmt) {
  DepthwiseParams p;
  p.g = g;
  p.input = view_of(grad_x);
  p.output = view_of(grad_out);
  p.weight = view_of(weight);
  // The thread order follows the tensor written; a channels_last request on a tensor that is also plainly
  // contiguous (C == 1 or H == W == 1) is the same memory either way.
  p.channels_last = is_channels_last(fmt) && !grad_x.is_contiguous();
  return p;
}

}  // namespace

Tensor depthwise_conv2d(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Conv2dGeometry& g,
                        const float* in_scale, const float* in_shift, bool in_relu, const DepthwiseMid& mid) {
  XO_CHECK_VALUE(x.is_cuda(), kForward, ": backend 'cuda' needs CUDA tensors, but x is on ", x.device());
  const DType dtype = kernel_dtype(kForward, x);
  check_operand(kForward, "dw_weight", weight, x, "x");
  check_shape(kForward, "x", x, input_shape(g));
  check_shape(kForward, "dw_weight", weight, weight_shape(g));
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_operand(kForward, "bias", *bias, x, "x");
    XO_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == g.dw_channels(), kForward, ": bias must have shape [",
                      g.dw_channels(), "], got ", dims(bias->sizes()));
  }

  const c10::cuda::CUDAGuard guard(x.device());
  const at::MemoryFormat fmt = output_memory_format(x);
  Tensor y = at::empty(output_shape(g), x.options().memory_format(fmt));
  if (y.numel() == 0) return y;

  DepthwiseParams p;
  p.g = g;
  p.input = view_of(x);
  p.output = view_of(y);
  p.weight = view_of(weight);
  if (has_bias) {
    p.bias = bias->data_ptr();
    p.bias_stride = bias->stride(0);
  }
  p.channels_last = is_channels_last(fmt);
  p.use_int32 = depthwise_fits_int32(p);
  p.prologue.scale = in_scale, p.prologue.shift = in_shift, p.prologue.relu = in_relu;
  p.mid = static_cast<int32_t>(mid.mid);  // MidActivation's values are the kernels' codes
  p.mid_scale = mid.scale, p.mid_shift = mid.shift;
  check_launch(kForward, launch_depthwise_forward(p, dtype, c10::cuda::getCurrentCUDAStream()));
  return y;
}

Tensor depthwise_conv2d_backward_input(const Tensor& grad_out, const Tensor& weight, const Conv2dGeometry& g,
                                       at::MemoryFormat fmt) {
  XO_CHECK_VALUE(grad_out.is_cuda(), kBackwardInput, ": backend 'cuda' needs CUDA tensors, but grad_out is on ",
                    grad_out.device());
  const DType dtype = kernel_dtype(kBackwardInput, grad_out);
  check_operand(kBackwardInput, "dw_weight", weight, grad_out, "grad_out");
  check_shape(kBackwardInput, "grad_out", grad_out, output_shape(g));
  check_shape(kBackwardInput, "dw_weight", weight, weight_shape(g));

  const c10::cuda::CUDAGuard guard(grad_out.device());
  Tensor grad_x = at::empty(input_shape(g), grad_out.options().memory_format(fmt));
  if (grad_x.numel() == 0) return grad_x;
  DepthwiseParams p = backward_input_params(grad_x, grad_out, weight, g, fmt);
  p.use_int32 = depthwise_fits_int32(p);
  check_launch(kBackwardInput, launch_depthwise_backward_input(p, dtype, c10::cuda::getCurrentCUDAStream()));
  return grad_x;
}

Tensor depthwise_conv2d_backward_input_through_prologue(const Tensor& grad_out, const Tensor& weight,
                                                        const Conv2dGeometry& g, at::MemoryFormat fmt,
                                                        const Tensor& x, const float* in_scale,
                                                        const float* in_shift, bool in_relu, float* sum_gx,
                                                        float* sum_g) {
  const DType dtype = kernel_dtype(kBackwardInput, grad_out);
  check_operand(kBackwardInput, "dw_weight", weight, grad_out, "grad_out");
  check_operand(kBackwardInput, "x", x, grad_out, "grad_out");
  check_shape(kBackwardInput, "grad_out", grad_out, output_shape(g));
  check_shape(kBackwardInput, "dw_weight", weight, weight_shape(g));
  check_shape(kBackwardInput, "x", x, input_shape(g));
  const c10::cuda::CUDAGuard guard(grad_out.device());
  Tensor grad_x = at::empty(input_shape(g), grad_out.options().memory_format(fmt));
  if (grad_x.numel() == 0) return Tensor();
  DepthwiseParams p = backward_input_params(grad_x, grad_out, weight, g, fmt);
  p.prologue.scale = in_scale;
  p.prologue.shift = in_shift;
  p.prologue.relu = in_relu;
  p.prologue.x = view_of(x);
  p.use_int32 = depthwise_fits_int32(p);
  const int64_t rows = depthwise_dgrad_prologue_rows(p, dtype);
  if (rows == 0) return Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Tensor partial;
  const bool sums = sum_gx != nullptr;
  if (sums) {
    partial = at::empty({reduce_rows_workspace(rows, 2 * g.in_channels)}, x.options().dtype(at::kFloat));
    p.prologue.partial = partial.data_ptr<float>();
  }
  check_launch(kBackwardInput, launch_depthwise_backward_input(p, dtype, stream));
  if (sums) {
    check_launch(kBackwardInput, launch_reduce_rows(p.prologue.partial, rows, 2 * g.in_channels, g.in_channels,
                                                    sum_gx, sum_g, stream));
  }
  return grad_x;
}

Tensor depthwise_conv2d_backward_weight(const Tensor& grad_out, const Tensor& x, const Conv2dGeometry& g,
                                        const float* in_scale, const float* in_shift, bool in_relu) {
  XO_CHECK_VALUE(x.is_cuda(), kBackwardWeight, ": backend 'cuda' needs CUDA tensors, but x is on ", x.device());
  const DType dtype = kernel_dtype(kBackwardWeight, x);
  check_operand(kBackwardWeight, "grad_out", grad_out, x, "x");
  check_shape(kBackwardWeight, "x", x, input_shape(g));
  check_shape(kBackwardWeight, "grad_out", grad_out, output_shape(g));

  const c10::cuda::CUDAGuard guard(x.device());
  // Contiguous, like the reference path's result.
  Tensor grad_w = at::empty(weight_shape(g), x.options());
  if (g.batch == 0) return grad_w.zero_();  // an empty sum; no kernel of ours runs

  DepthwiseParams p;
  p.g = g;
  p.input = view_of(x);
  p.output = view_of(grad_out);
  p.weight = view_of(grad_w);
  // The work split follows grad_out, the tensor read at every position.
  p.channels_last = output_memory_format(grad_out) == at::MemoryFormat::ChannelsLast;
  p.use_int32 = depthwise_fits_int32(p);
  p.prologue.scale = in_scale, p.prologue.shift = in_shift, p.prologue.relu = in_relu;
  const size_t ws_bytes = depthwise_wgrad_workspace_bytes(p, static_cast<int>(x.element_size()));
  // Through torch's caching allocator, on the current stream.
  Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
  check_launch(kBackwardWeight, launch_depthwise_backward_weight(p, dtype, workspace.data_ptr(), ws_bytes,
                                                                  c10::cuda::getCurrentCUDAStream()));
  return grad_w;
}

}  // namespace xception_ops::cuda
