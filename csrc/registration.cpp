// The operators, defined once. Schemas, the backend router, and the CPU / CUDA registrations.
//
// Every op takes `backend` last: "auto", "torch" (the ATen reference), "cuda" (csrc/cuda) or "triton"
// (Python: xception_ops/triton, reached through the dispatcher). The Autograd kernels are in autograd.cpp; the
// fake (meta) kernels are registered from Python in xception_ops/_library.py.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "ops.h"
#ifdef XCEPTION_OPS_WITH_CUDA
#include "cuda_backend.h"
#endif

namespace xception_ops {

#ifdef XCEPTION_OPS_WITH_CUDA
bool cuda_built() { return true; }
bool cuda_implements(c10::string_view op) { return cuda::implements(op); }
bool cuda_preferred(c10::string_view op) { return cuda::preferred(op); }
#define XO_IF_CUDA(statement) statement
#else
bool cuda_built() { return false; }
bool cuda_implements(c10::string_view) { return false; }
bool cuda_preferred(c10::string_view) { return false; }
// Without CUDA, resolve_backend raises before a router could take the CUDA branch.
#define XO_IF_CUDA(statement)
#endif

Backend resolve_backend(c10::string_view name, const char* op, const Tensor& x) {
  if (name == "torch") return Backend::Torch;
  if (name == "auto") {  // the CUDA kernels take float32, float16 and bfloat16; float64 stays on the reference
    const bool kernel_dtype = x.scalar_type() != at::kDouble;
    return x.is_cuda() && kernel_dtype && cuda_preferred(op) ? Backend::Cuda : Backend::Torch;
  }
  if (name == "cuda") {
    XO_CHECK_NOT_IMPLEMENTED(cuda_built(), op,
                                ": backend 'cuda' is not built: this copy of xception_ops was compiled without "
                                "CUDA (no CUDA toolkit, or a CPU-only torch, at build time). `xception-ops info` "
                                "says which backends are usable.");
    XO_CHECK_VALUE(x.is_cuda(), op, ": backend 'cuda' needs CUDA tensors, but x is on ", x.device());
    XO_CHECK_NOT_IMPLEMENTED(cuda_implements(op), op, ": backend 'cuda' has no kernel for this op yet");
    return Backend::Cuda;
  }
  if (name == "triton") return Backend::Triton;  // the Python side checks the device (see call_triton)
  XO_CHECK_VALUE(false, op, ": unknown backend '", std::string(name),
                    "'; expected 'auto', 'torch', 'cuda' or 'triton'");
}

namespace {

// The Triton kernels live in Python (xception_ops/triton): importing xception_ops with triton installed registers
// private ops "xception_ops::triton_<op>", each with its public op's schema less `backend`. The routers call
// them through the dispatcher like any other operator.
template <typename Signature, typename... Args>
decltype(auto) call_triton(const char* op, const char* triton_op, Args&&... args) {
  const auto handle = c10::Dispatcher::singleton().findSchema({triton_op, ""});
  XO_CHECK_NOT_IMPLEMENTED(handle.has_value(), op, ": backend 'triton' has no kernel for this op: ", triton_op,
                              " is not registered (it is, for the ops the triton backend implements, once "
                              "xception_ops is imported in Python with triton installed)");
  return handle->typed<Signature>().call(std::forward<Args>(args)...);
}

// Names as they appear in error messages: the Python spelling of the op.
constexpr const char* kDepthwise = "xception_ops.depthwise_conv2d";
constexpr const char* kDepthwiseBwdInput = "xception_ops.depthwise_conv2d_backward_input";
constexpr const char* kDepthwiseBwdWeight = "xception_ops.depthwise_conv2d_backward_weight";
constexpr const char* kSeparable = "xception_ops.separable_conv2d";
constexpr const char* kSeparableBwd = "xception_ops.separable_conv2d_backward";

std::vector<int64_t> output_shape(const Conv2dGeometry& g) { return {g.batch, g.out_channels, g.out_h, g.out_w}; }

SeparableOptions separable_options(const OptTensor& in_scale, const OptTensor& in_shift, bool in_relu,
                                   c10::string_view mid_activation, const OptTensor& mid_scale,
                                   const OptTensor& mid_shift, const OptTensor& out_scale,
                                   const OptTensor& out_shift, bool out_relu, const OptTensor& residual,
                                   bool compute_stats) {
  SeparableOptions opt;
  opt.in_scale = in_scale;
  opt.in_shift = in_shift;
  opt.in_relu = in_relu;
  opt.mid = parse_mid_activation(mid_activation);
  opt.mid_scale = mid_scale;
  opt.mid_shift = mid_shift;
  opt.out_scale = out_scale;
  opt.out_shift = out_shift;
  opt.out_relu = out_relu;
  opt.residual = residual;
  opt.compute_stats = compute_stats;
  return opt;
}

Tensor depthwise_conv2d(const Tensor& x, const Tensor& weight, const OptTensor& bias, IntArrayRef stride,
                        IntArrayRef padding, IntArrayRef dilation, c10::string_view backend) {
  const Conv2dGeometry g = check_depthwise(kDepthwise, x, weight, bias, stride, padding, dilation);
  const Backend chosen = resolve_backend(backend, kDepthwise, x);
  if (chosen == Backend::Cuda) {
    XO_IF_CUDA(return cuda::depthwise_conv2d(x, weight, bias, g));
  }
  if (chosen == Backend::Triton) {
    return call_triton<Tensor(const Tensor&, const Tensor&, const OptTensor&, IntArrayRef, IntArrayRef,
                              IntArrayRef)>(kDepthwise, "xception_ops::triton_depthwise_conv2d", x, weight, bias,
                                            stride, padding, dilation);
  }
  return reference::depthwise_conv2d(x, weight, bias, g);
}

Tensor depthwise_conv2d_backward_input(const Tensor& grad_out, const Tensor& weight, c10::SymIntArrayRef input_size,
                                       IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
                                       c10::string_view backend) {
  const auto x_sizes = C10_AS_INTARRAYREF_SLOW(input_size);
  const Conv2dGeometry g = make_geometry(kDepthwiseBwdInput, x_sizes, weight.sizes(), stride, padding, dilation);
  check_float_tensor(kDepthwiseBwdInput, "weight", weight);
  check_like(kDepthwiseBwdInput, "grad_out", grad_out, output_shape(g), weight);
  const auto fmt = output_memory_format(grad_out);
  const Backend chosen = resolve_backend(backend, kDepthwiseBwdInput, grad_out);
  if (chosen == Backend::Cuda) {
    XO_IF_CUDA(return cuda::depthwise_conv2d_backward_input(grad_out, weight, g, fmt));
  }
  if (chosen == Backend::Triton) {
    return call_triton<Tensor(const Tensor&, const Tensor&, c10::SymIntArrayRef, IntArrayRef, IntArrayRef,
                              IntArrayRef)>(kDepthwiseBwdInput, "xception_ops::triton_depthwise_conv2d_backward_input",
                                            grad_out, weight, input_size, stride, padding, dilation);
  }
  return reference::depthwise_conv2d_backward_input(grad_out, weight, g, fmt);
}

Tensor depthwise_conv2d_backward_weight(const Tensor& grad_out, const Tensor& x, c10::SymIntArrayRef weight_size,
                                        IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
                                        c10::string_view backend) {
  const auto w_sizes = C10_AS_INTARRAYREF_SLOW(weight_size);
  const Conv2dGeometry g = make_geometry(kDepthwiseBwdWeight, x.sizes(), w_sizes, stride, padding, dilation);
  check_float_tensor(kDepthwiseBwdWeight, "x", x);
  check_like(kDepthwiseBwdWeight, "grad_out", grad_out, output_shape(g), x);
  const Backend chosen = resolve_backend(backend, kDepthwiseBwdWeight, x);
  if (chosen == Backend::Cuda) {
    XO_IF_CUDA(return cuda::depthwise_conv2d_backward_weight(grad_out, x, g));
  }
  if (chosen == Backend::Triton) {
    return call_triton<Tensor(const Tensor&, const Tensor&, c10::SymIntArrayRef, IntArrayRef, IntArrayRef,
                              IntArrayRef)>(kDepthwiseBwdWeight, "xception_ops::triton_depthwise_conv2d_backward_weight",
                                            grad_out, x, weight_size, stride, padding, dilation);
  }
  return reference::depthwise_conv2d_backward_weight(grad_out, x, g);
}

using SeparableOut = std::tuple<Tensor, Tensor, Tensor>;

SeparableOut separable_conv2d(const Tensor& x, const Tensor& dw_weight, const Tensor& pw_weight,
                                                    const OptTensor& in_scale, const OptTensor& in_shift, bool in_relu,
                                                    IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
                                                    c10::string_view mid_activation, const OptTensor& mid_scale,
                                                    const OptTensor& mid_shift, const OptTensor& out_scale,
                                                    const OptTensor& out_shift, bool out_relu,
                                                    const OptTensor& residual, bool compute_stats,
                                                    c10::string_view backend) {
  const SeparableOptions opt = separable_options(in_scale, in_shift, in_relu, mid_activation, mid_scale, mid_shift,
                                                 out_scale, out_shift, out_relu, residual, compute_stats);
  const Conv2dGeometry g = check_separable(kSeparable, x, dw_weight, pw_weight, opt, stride, padding, dilation);
  const Backend chosen = resolve_backend(backend, kSeparable, x);
  if (chosen == Backend::Cuda) {
    XO_IF_CUDA(return cuda::separable_conv2d(x, dw_weight, pw_weight, opt, g));
  }
  if (chosen == Backend::Triton) {
    return call_triton<SeparableOut(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                                    bool, IntArrayRef, IntArrayRef, IntArrayRef, c10::string_view, const OptTensor&,
                                    const OptTensor&, const OptTensor&, const OptTensor&, bool, const OptTensor&,
                                    bool)>(
        kSeparable, "xception_ops::triton_separable_conv2d", x, dw_weight, pw_weight, in_scale, in_shift, in_relu,
        stride, padding, dilation, mid_activation, mid_scale, mid_shift, out_scale, out_shift, out_relu, residual,
        compute_stats);
  }
  return reference::separable_conv2d(x, dw_weight, pw_weight, opt, g);
}

SeparableGrads separable_conv2d_backward(
    const Tensor& grad_out, const OptTensor& grad_sum, const OptTensor& grad_sumsq, const OptTensor& out,
    const Tensor& x, const Tensor& dw_weight, const Tensor& pw_weight, const OptTensor& in_scale,
    const OptTensor& in_shift, bool in_relu, IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
    c10::string_view mid_activation, const OptTensor& mid_scale, const OptTensor& mid_shift,
    const OptTensor& out_scale, const OptTensor& out_shift, bool out_relu, c10::string_view backend) {
  const SeparableOptions opt = separable_options(in_scale, in_shift, in_relu, mid_activation, mid_scale, mid_shift,
                                                 out_scale, out_shift, out_relu, c10::nullopt, false);
  const Conv2dGeometry g = check_separable(kSeparableBwd, x, dw_weight, pw_weight, opt, stride, padding, dilation);
  const auto shape = output_shape(g);
  check_like(kSeparableBwd, "grad_out", grad_out, shape, x);
  XO_CHECK_VALUE(!out_relu || out.has_value(), kSeparableBwd, ": out (the forward's output) is required when out_relu is set");
  if (out.has_value()) check_like(kSeparableBwd, "out", *out, shape, x);
  check_channel_vector(kSeparableBwd, "grad_sum", grad_sum, g.out_channels, x);
  check_channel_vector(kSeparableBwd, "grad_sumsq", grad_sumsq, g.out_channels, x);
  const Backend chosen = resolve_backend(backend, kSeparableBwd, x);
  if (chosen == Backend::Cuda) {
    XO_IF_CUDA(return cuda::separable_conv2d_backward(grad_out, grad_sum, grad_sumsq, out, x, dw_weight, pw_weight,
                                                      opt, g));
  }
  if (chosen == Backend::Triton) {
    return call_triton<SeparableGrads(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                      const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                                      bool, IntArrayRef, IntArrayRef, IntArrayRef, c10::string_view, const OptTensor&,
                                      const OptTensor&, const OptTensor&, const OptTensor&, bool)>(
        kSeparableBwd, "xception_ops::triton_separable_conv2d_backward", grad_out, grad_sum, grad_sumsq, out, x,
        dw_weight, pw_weight, in_scale, in_shift, in_relu, stride, padding, dilation, mid_activation, mid_scale,
        mid_shift, out_scale, out_shift, out_relu);
  }
  return reference::separable_conv2d_backward(grad_out, grad_sum, grad_sumsq, out, x, dw_weight, pw_weight, opt, g);
}

constexpr const char* kFinalize = "xception_ops.batch_norm_finalize";

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_finalize(
    const Tensor& sum, const Tensor& sumsq, int64_t count, const OptTensor& weight, const OptTensor& bias, double eps,
    c10::string_view backend, const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& num_batches_tracked, const OptTensor& pre_bias, double momentum) {
  const RunningStatsUpdate update{running_mean, running_var, num_batches_tracked, pre_bias, momentum};
  check_batch_norm_finalize(kFinalize, sum, sumsq, count, weight, bias, eps, &update);
  const Backend chosen = resolve_backend(backend, kFinalize, sum);
  if (chosen == Backend::Cuda) {
    XO_IF_CUDA(return cuda::batch_norm_finalize(sum, sumsq, count, weight, bias, eps, update));
  }
  XO_CHECK_NOT_IMPLEMENTED(chosen != Backend::Triton, kFinalize,
                           ": backend 'triton' has no kernel for this op (it works on C-element vectors; the "
                           "fused modules run it on 'torch' or 'cuda')");
  return reference::batch_norm_finalize(sum, sumsq, count, weight, bias, eps, update);
}

constexpr const char* kFinalizeBwd = "xception_ops.batch_norm_finalize_backward";

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_finalize_backward(
    const Tensor& sum, const Tensor& sumsq, int64_t count, const OptTensor& weight, double eps,
    const OptTensor& grad_scale, const OptTensor& grad_shift, const OptTensor& grad_mean, const OptTensor& grad_var,
    c10::string_view backend) {
  check_batch_norm_finalize_backward(kFinalizeBwd, sum, sumsq, count, weight, eps, grad_scale, grad_shift, grad_mean,
                                     grad_var);
  const Backend chosen = resolve_backend(backend, kFinalizeBwd, sum);
  if (chosen == Backend::Cuda) {
    XO_IF_CUDA(return cuda::batch_norm_finalize_backward(sum, sumsq, count, weight, eps, grad_scale, grad_shift,
                                                         grad_mean, grad_var));
  }
  XO_CHECK_NOT_IMPLEMENTED(chosen != Backend::Triton, kFinalizeBwd,
                           ": backend 'triton' has no kernel for this op (it works on C-element vectors; the "
                           "fused modules run it on 'torch' or 'cuda')");
  return reference::batch_norm_finalize_backward(sum, sumsq, count, weight, eps, grad_scale, grad_shift, grad_mean,
                                                 grad_var);
}

constexpr const char* kScaleShiftOp = "xception_ops.scale_shift";
constexpr const char* kScaleShiftBwdOp = "xception_ops.scale_shift_backward";

Tensor scale_shift(const Tensor& y, const Tensor& scale, const Tensor& shift, bool relu, c10::string_view backend,
                   const OptTensor& residual) {
  check_scale_shift(kScaleShiftOp, y, scale, shift, nullptr, residual);
  const Backend chosen = resolve_backend(backend, kScaleShiftOp, y);
  if (chosen == Backend::Cuda) {
    XO_IF_CUDA(return cuda::scale_shift(y, scale, shift, relu, residual));
  }
  XO_CHECK_NOT_IMPLEMENTED(chosen != Backend::Triton, kScaleShiftOp,
                           ": backend 'triton' has no kernel for this op (the fused modules run it on 'torch' or "
                           "'cuda')");
  return reference::scale_shift(y, scale, shift, relu, residual);
}

std::tuple<Tensor, Tensor, Tensor> scale_shift_backward(const Tensor& grad, const Tensor& y, const Tensor& scale,
                                                        const Tensor& shift, bool relu, c10::string_view backend) {
  check_scale_shift(kScaleShiftBwdOp, y, scale, shift, &grad);
  const Backend chosen = resolve_backend(backend, kScaleShiftBwdOp, y);
  if (chosen == Backend::Cuda) {
    XO_IF_CUDA(return cuda::scale_shift_backward(grad, y, scale, shift, relu));
  }
  XO_CHECK_NOT_IMPLEMENTED(chosen != Backend::Triton, kScaleShiftBwdOp,
                           ": backend 'triton' has no kernel for this op (the fused modules run it on 'torch' or "
                           "'cuda')");
  return reference::scale_shift_backward(grad, y, scale, shift, relu);
}

constexpr const char* kUpdateStats = "xception_ops.batch_norm_update_stats";

void batch_norm_update_stats(const Tensor& running_mean, const Tensor& running_var, const Tensor& mean,
                             const Tensor& var, const OptTensor& pre_bias, int64_t count, double momentum,
                             c10::string_view backend) {
  check_batch_norm_update_stats(kUpdateStats, running_mean, running_var, mean, var, pre_bias, count, momentum);
  const Backend chosen = resolve_backend(backend, kUpdateStats, mean);
  if (chosen == Backend::Cuda) {
    XO_IF_CUDA(return cuda::batch_norm_update_stats(running_mean, running_var, mean, var, pre_bias, count,
                                                    momentum));
  }
  XO_CHECK_NOT_IMPLEMENTED(chosen != Backend::Triton, kUpdateStats,
                           ": backend 'triton' has no kernel for this op (it works on C-element vectors; the "
                           "fused modules run it on 'torch' or 'cuda')");
  reference::batch_norm_update_stats(running_mean, running_var, mean, var, pre_bias, count, momentum);
}

constexpr const char* kMaxPool = "xception_ops.max_pool2d";
constexpr const char* kMaxPoolBwd = "xception_ops.max_pool2d_backward";

std::tuple<Tensor, Tensor> max_pool2d(const Tensor& x, IntArrayRef kernel_size, IntArrayRef stride,
                                      IntArrayRef padding, bool ceil_mode, bool save_argmax, c10::string_view backend,
                                      const OptTensor& scale, const OptTensor& shift, const OptTensor& residual) {
  const Pool2dGeometry g = check_max_pool2d(kMaxPool, x, "x", x.sizes(), kernel_size, stride, padding, ceil_mode);
  check_max_pool2d_extras(kMaxPool, x, scale, shift, residual, {g.batch, g.channels, g.out_h, g.out_w});
  const Backend chosen = resolve_backend(backend, kMaxPool, x);
  if (chosen == Backend::Cuda) {
    XO_IF_CUDA(return cuda::max_pool2d(x, g, save_argmax, scale, shift, residual));
  }
  if (chosen == Backend::Triton) {
    return call_triton<std::tuple<Tensor, Tensor>(const Tensor&, IntArrayRef, IntArrayRef, IntArrayRef, bool, bool,
                                                  const OptTensor&, const OptTensor&, const OptTensor&)>(
        kMaxPool, "xception_ops::triton_max_pool2d", x, kernel_size, stride, padding, ceil_mode, save_argmax, scale,
        shift, residual);
  }
  return reference::max_pool2d(x, g, save_argmax, scale, shift, residual);
}

// grad_out and argmax of the pooled shape of x_sizes, argmax uint8 on grad_out's device.
void check_pool_gradient(const char* op, const Tensor& grad_out, const Tensor& argmax, IntArrayRef x_sizes,
                         const Pool2dGeometry& g) {
  const std::vector<int64_t> out_shape = {g.batch, g.channels, g.out_h, g.out_w};
  XO_CHECK_VALUE(grad_out.sizes() == IntArrayRef(out_shape), op, ": grad_out must have shape ", dims(out_shape),
                 " (the pooled shape of input_size ", dims(x_sizes), "), got ", dims(grad_out.sizes()));
  XO_CHECK_VALUE(argmax.sizes() == IntArrayRef(out_shape), op, ": argmax must have shape ", dims(out_shape),
                 " (the forward's, saved with save_argmax=True), got ", dims(argmax.sizes()));
  XO_CHECK_TYPE(argmax.scalar_type() == at::kByte, op, ": argmax must be uint8 (the forward's), got ",
                argmax.scalar_type());
  XO_CHECK_VALUE(argmax.device() == grad_out.device(), op, ": argmax is on ", argmax.device(),
                 " but grad_out is on ", grad_out.device(), "; move both to the same device");
}

// grad_x comes in the layout of argmax, which is the forward's (x's).
Tensor max_pool2d_backward(const Tensor& grad_out, const Tensor& argmax, c10::SymIntArrayRef input_size,
                           IntArrayRef kernel_size, IntArrayRef stride, IntArrayRef padding, bool ceil_mode,
                           c10::string_view backend) {
  const auto x_sizes = C10_AS_INTARRAYREF_SLOW(input_size);
  const Pool2dGeometry g =
      check_max_pool2d(kMaxPoolBwd, grad_out, "grad_out", x_sizes, kernel_size, stride, padding, ceil_mode);
  check_pool_gradient(kMaxPoolBwd, grad_out, argmax, x_sizes, g);
  const auto fmt = output_memory_format(argmax);
  const Backend chosen = resolve_backend(backend, kMaxPoolBwd, grad_out);
  if (chosen == Backend::Cuda) {
    XO_IF_CUDA(return cuda::max_pool2d_backward(grad_out, argmax, g, fmt));
  }
  if (chosen == Backend::Triton) {
    return call_triton<Tensor(const Tensor&, const Tensor&, c10::SymIntArrayRef, IntArrayRef, IntArrayRef,
                              IntArrayRef, bool)>(kMaxPoolBwd, "xception_ops::triton_max_pool2d_backward", grad_out,
                                                  argmax, input_size, kernel_size, stride, padding, ceil_mode);
  }
  return reference::max_pool2d_backward(grad_out, argmax, g, fmt);
}

constexpr const char* kMaxPoolBnBwd = "xception_ops.max_pool2d_scale_shift_backward";

std::tuple<Tensor, Tensor, Tensor> max_pool2d_scale_shift_backward(const Tensor& grad_out, const Tensor& argmax,
                                                                   const Tensor& x, const Tensor& scale,
                                                                   const Tensor& shift, IntArrayRef kernel_size,
                                                                   IntArrayRef stride, IntArrayRef padding,
                                                                   bool ceil_mode, c10::string_view backend) {
  const Pool2dGeometry g =
      check_max_pool2d(kMaxPoolBnBwd, x, "x", x.sizes(), kernel_size, stride, padding, ceil_mode);
  check_pool_gradient(kMaxPoolBnBwd, grad_out, argmax, x.sizes(), g);
  check_same_device(kMaxPoolBnBwd, "grad_out", grad_out, x);
  check_same_dtype(kMaxPoolBnBwd, "grad_out", grad_out, x);
  check_max_pool2d_extras(kMaxPoolBnBwd, x, scale, shift, c10::nullopt, {});
  const Backend chosen = resolve_backend(backend, kMaxPoolBnBwd, x);
  if (chosen == Backend::Cuda) {
    XO_IF_CUDA(return cuda::max_pool2d_scale_shift_backward(grad_out, argmax, x, scale, shift, g));
  }
  if (chosen == Backend::Triton) {
    return call_triton<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                          const Tensor&, IntArrayRef, IntArrayRef, IntArrayRef, bool)>(
        kMaxPoolBnBwd, "xception_ops::triton_max_pool2d_scale_shift_backward", grad_out, argmax, x, scale, shift,
        kernel_size, stride, padding, ceil_mode);
  }
  return reference::max_pool2d_scale_shift_backward(grad_out, argmax, x, scale, shift, g);
}

}  // namespace

TORCH_LIBRARY(xception_ops, m) {
  m.def(
      "depthwise_conv2d(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[4] padding, int[2] dilation, "
      "str backend) -> Tensor");
  m.def(
      "depthwise_conv2d_backward_input(Tensor grad_out, Tensor weight, SymInt[4] input_size, int[2] stride, "
      "int[4] padding, int[2] dilation, str backend) -> Tensor");
  m.def(
      "depthwise_conv2d_backward_weight(Tensor grad_out, Tensor x, SymInt[4] weight_size, int[2] stride, "
      "int[4] padding, int[2] dilation, str backend) -> Tensor");
  m.def(
      "separable_conv2d(Tensor x, Tensor dw_weight, Tensor pw_weight, Tensor? in_scale, Tensor? in_shift, "
      "bool in_relu, int[2] stride, int[4] padding, int[2] dilation, str mid_activation, Tensor? mid_scale, "
      "Tensor? mid_shift, Tensor? out_scale, Tensor? out_shift, bool out_relu, Tensor? residual, bool compute_stats, "
      "str backend) -> (Tensor out, Tensor sum, Tensor sumsq)");
  // separable_conv2d_backward's `out`: the forward's output, required with out_relu (its mask); given when the
  // forward had no epilogue at all (no out_scale, out_shift, out_relu or residual), it is y, which a backend may use
  // instead of recomputing it. Pass it in no other case.
  m.def(
      "separable_conv2d_backward(Tensor grad_out, Tensor? grad_sum, Tensor? grad_sumsq, Tensor? out, Tensor x, "
      "Tensor dw_weight, Tensor pw_weight, Tensor? in_scale, Tensor? in_shift, bool in_relu, int[2] stride, "
      "int[4] padding, int[2] dilation, str mid_activation, Tensor? mid_scale, Tensor? mid_shift, Tensor? out_scale, "
      "Tensor? out_shift, bool out_relu, str backend) -> (Tensor grad_x, Tensor grad_dw_weight, "
      "Tensor grad_pw_weight, Tensor grad_in_scale, Tensor grad_in_shift, Tensor grad_mid_scale, "
      "Tensor grad_mid_shift, Tensor grad_out_scale, Tensor grad_out_shift)");
  // With the keyword-only arguments it also does a training step's running-statistics update in the same kernel
  // (batch_norm_update_stats' formulas: running_mean and running_var both or neither) and advances
  // num_batches_tracked by one: one launch per BatchNorm and step where three ran.
  m.def(
      "batch_norm_finalize(Tensor sum, Tensor sumsq, int count, Tensor? weight, Tensor? bias, float eps, "
      "str backend, *, Tensor(a!)? running_mean=None, Tensor(b!)? running_var=None, "
      "Tensor(c!)? num_batches_tracked=None, Tensor? pre_bias=None, float momentum=0.) "
      "-> (Tensor scale, Tensor shift, Tensor mean, Tensor var)");
  // The gradients of (sum, sumsq, weight, bias) from those of (scale, shift, mean, var): batch_norm_finalize's
  // first-order backward in one kernel (its autograd formula takes it unless a graph of the backward is asked for).
  m.def(
      "batch_norm_finalize_backward(Tensor sum, Tensor sumsq, int count, Tensor? weight, float eps, "
      "Tensor? grad_scale, Tensor? grad_shift, Tensor? grad_mean, Tensor? grad_var, str backend) "
      "-> (Tensor grad_sum, Tensor grad_sumsq, Tensor grad_weight, Tensor grad_bias)");
  // The normalization applied: relu?(round(y * scale + shift)) per channel, and its gradients; with residual,
  // relu?(round(y * scale + shift) + residual) in one pass (the add rounded in y's dtype, as PyTorch's).
  m.def(
      "scale_shift(Tensor y, Tensor scale, Tensor shift, bool relu, str backend, *, Tensor? residual=None) "
      "-> Tensor");
  m.def(
      "scale_shift_backward(Tensor grad, Tensor y, Tensor scale, Tensor shift, bool relu, str backend) "
      "-> (Tensor grad_y, Tensor grad_scale, Tensor grad_shift)");
  // Max pooling with PyTorch's rules (implicit padding, floor or ceil mode, no dilation), its argmax kept as one
  // byte per output (the tap's index ky * kernel_w + kx) when save_argmax; an empty uint8 tensor otherwise. With
  // scale and shift it pools scale_shift(x, scale, shift) (a pending BatchNorm, applied as x is read), and adds
  // residual to its output (a shortcut): BatchNorm, pool and add in one pass.
  m.def(
      "max_pool2d(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, bool ceil_mode, bool save_argmax, "
      "str backend, *, Tensor? scale=None, Tensor? shift=None, Tensor? residual=None) -> (Tensor out, Tensor argmax)");
  m.def(
      "max_pool2d_backward(Tensor grad_out, Tensor argmax, SymInt[4] input_size, int[2] kernel_size, "
      "int[2] stride, int[2] padding, bool ceil_mode, str backend) -> Tensor");
  // The backward of max_pool2d with scale and shift (x the forward's input): max_pool2d_backward's gradient of the
  // normalized values, then scale_shift_backward's (no ReLU): one pass on "cuda" (channels-last) and "triton".
  m.def(
      "max_pool2d_scale_shift_backward(Tensor grad_out, Tensor argmax, Tensor x, Tensor scale, Tensor shift, "
      "int[2] kernel_size, int[2] stride, int[2] padding, bool ceil_mode, str backend) "
      "-> (Tensor grad_x, Tensor grad_scale, Tensor grad_shift)");
  // In place, under no_grad: the running statistics after a training step's finalize.
  m.def(
      "batch_norm_update_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, "
      "Tensor? pre_bias, int count, float momentum, str backend) -> ()");
}

// One router per op serves both devices: it checks, picks the backend and calls it.
#define XO_REGISTER_ROUTERS(m)                                                             \
  m.impl("depthwise_conv2d", &depthwise_conv2d);                                           \
  m.impl("depthwise_conv2d_backward_input", &depthwise_conv2d_backward_input);             \
  m.impl("depthwise_conv2d_backward_weight", &depthwise_conv2d_backward_weight);           \
  m.impl("separable_conv2d", &separable_conv2d);                                           \
  m.impl("separable_conv2d_backward", &separable_conv2d_backward);                         \
  m.impl("batch_norm_finalize", &batch_norm_finalize);                                     \
  m.impl("batch_norm_finalize_backward", &batch_norm_finalize_backward);                   \
  m.impl("batch_norm_update_stats", &batch_norm_update_stats);                             \
  m.impl("scale_shift", &scale_shift);                                                     \
  m.impl("scale_shift_backward", &scale_shift_backward);                                   \
  m.impl("max_pool2d", &max_pool2d);                                                       \
  m.impl("max_pool2d_backward", &max_pool2d_backward);                                     \
  m.impl("max_pool2d_scale_shift_backward", &max_pool2d_scale_shift_backward)

TORCH_LIBRARY_IMPL(xception_ops, CPU, m) { XO_REGISTER_ROUTERS(m); }
TORCH_LIBRARY_IMPL(xception_ops, CUDA, m) { XO_REGISTER_ROUTERS(m); }

}  // namespace xception_ops
