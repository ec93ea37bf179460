// The torch layer of xception_ops: argument checks, the ATen reference implementations and the backend
// router. Kernel bodies live in torch-free headers under kernels/; nothing here launches a kernel directly.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <cstdio>
#include <string>
#include <tuple>
#include <type_traits>

#include "kernels/conv_geometry.h"
#include "kernels/pool_geometry.h"

namespace xception_ops {

using at::IntArrayRef;
using at::Tensor;
using OptTensor = c10::optional<Tensor>;

// What sits between the depthwise and the pointwise halves (paper section 4.7; relu6 for MobileNet V2, hardswish
// for MobileNet V3). The values are the kernels' ints.
enum class MidActivation { None, Relu, Elu, Relu6, Hardswish };
MidActivation parse_mid_activation(c10::string_view name);

// The fused op's options, with the tensors that come with them. Filled once from the op's arguments.
struct SeparableOptions {
  OptTensor in_scale, in_shift;  // prologue: x * in_scale + in_shift, per input channel
  bool in_relu = false;          // prologue: relu after the affine
  MidActivation mid = MidActivation::None;
  // mid: act(round(d * mid_scale + mid_shift)), per depthwise channel, d the depthwise result rounded to x's dtype:
  // a BatchNorm or a bias between the halves (MobileNet's dw -> BN -> ReLU -> pw). Absent: 1 and 0.
  OptTensor mid_scale, mid_shift;
  OptTensor out_scale, out_shift;  // epilogue: folded BatchNorm or bias, per output channel
  bool out_relu = false;           // epilogue: relu(z + residual)
  OptTensor residual;
  bool compute_stats = false;  // epilogue: per-channel fp32 sum and sum of squares of the pre-BN output
};

// The running statistics' update that batch_norm_finalize can do in the same step (its keyword-only arguments):
// running_mean and running_var updated in place from the batch mean and variance (batch_norm_update_stats'
// formulas), and num_batches_tracked advanced by one. Absent tensors: that part is not done.
struct RunningStatsUpdate {
  OptTensor running_mean, running_var, num_batches_tracked, pre_bias;
  double momentum = 0;
};

// ---- error messages ----
// Messages are assembled here with std::to_string and string appends, then handed to TORCH_CHECK_* as one
// string: no number goes through an iostream in this library. On the lent GPU machines (extension built with a
// newer g++ than the process's libstdc++), streaming an integer into c10::str's ostringstream crashed the
// process (SIGSEGV) exactly where a check failed; messages without numbers did not. XO_CHECK_* are the
// TORCH_CHECK_* macros with their message built by msg().
std::string dims(IntArrayRef v);  // "[1, 5, 5, 5]"

namespace detail {
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, c10::string_view v) { s.append(v.data(), v.size()); }
inline void append(std::string& s, IntArrayRef v) { s += dims(v); }
inline void append(std::string& s, at::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const c10::Device& v) { s += v.str(); }
template <typename I, std::enable_if_t<std::is_integral_v<I> && !std::is_same_v<I, bool>, int> = 0>
inline void append(std::string& s, I v) {
  s += std::to_string(v);
}
// (without it a double converted implicitly to a one-element IntArrayRef: momentum 1.5 printed as "[1]")
inline void append(std::string& s, double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  s += buf;
}
}  // namespace detail

template <typename... Args>
std::string msg(const Args&... args) {
  std::string s;
  (detail::append(s, args), ...);
  return s;
}

#define XO_CHECK(cond, ...) TORCH_CHECK(cond, ::xception_ops::msg(__VA_ARGS__))
#define XO_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, ::xception_ops::msg(__VA_ARGS__))
#define XO_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, ::xception_ops::msg(__VA_ARGS__))
#define XO_CHECK_NOT_IMPLEMENTED(cond, ...) TORCH_CHECK_NOT_IMPLEMENTED(cond, ::xception_ops::msg(__VA_ARGS__))

// ---- checks (checks.cpp): raise a Python ValueError / TypeError naming the offending argument ----
// Shape checks only; the backward ops know the input and weight by their sizes.
Conv2dGeometry make_geometry(const char* op, IntArrayRef x_sizes, IntArrayRef weight_sizes, IntArrayRef stride,
                             IntArrayRef padding, IntArrayRef dilation);
Conv2dGeometry check_depthwise(const char* op, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                               IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation);
Conv2dGeometry check_separable(const char* op, const Tensor& x, const Tensor& dw_weight, const Tensor& pw_weight,
                               const SeparableOptions& opt, IntArrayRef stride, IntArrayRef padding,
                               IntArrayRef dilation);
// The statistics (float32 or float64 vectors of one length on one device), count >= 1, the affine parameters
// (that length, same device, any float dtype), eps >= 0; with an update, its tensors as batch_norm_update_stats
// checks them (running_mean and running_var both or neither) and num_batches_tracked one int64 on sum's device.
void check_batch_norm_finalize(const char* op, const Tensor& sum, const Tensor& sumsq, int64_t count,
                               const OptTensor& weight, const OptTensor& bias, double eps,
                               const RunningStatsUpdate* update = nullptr);
// The finalize checks, and gradients of (scale, shift, mean, var) that are channel vectors on sum's device.
void check_batch_norm_finalize_backward(const char* op, const Tensor& sum, const Tensor& sumsq, int64_t count,
                                        const OptTensor& weight, double eps, const OptTensor& grad_scale,
                                        const OptTensor& grad_shift, const OptTensor& grad_mean,
                                        const OptTensor& grad_var);
// The batch statistics (float32 or float64 vectors of one length), the running buffers (that length, any float
// dtype, the same device), pre_bias (a channel vector), count >= 2, 0 <= momentum <= 1.
void check_batch_norm_update_stats(const char* op, const Tensor& running_mean, const Tensor& running_var,
                                   const Tensor& mean, const Tensor& var, const OptTensor& pre_bias, int64_t count,
                                   double momentum);
// y a 4-D float tensor; scale and shift float32 or float64 vectors of y's channels on its device (one dtype);
// grad and residual, when given, y's shape, dtype and device.
void check_scale_shift(const char* op, const Tensor& y, const Tensor& scale, const Tensor& shift, const Tensor* grad,
                       const OptTensor& residual = c10::nullopt);
// Max pooling: x's sizes 4-D; kernel_size, stride >= 1 and 0 <= padding <= kernel / 2 (PyTorch's rules), two values
// each; at most kMaxPoolMaxTaps taps per window; at least one output row and column. `values` (x, or grad_out for
// the backward, named `values_name`) a float tensor.
Pool2dGeometry check_max_pool2d(const char* op, const Tensor& values, const char* values_name, IntArrayRef x_sizes,
                                IntArrayRef kernel_size, IntArrayRef stride, IntArrayRef padding, bool ceil_mode);
// max_pool2d's keyword arguments: scale and shift both or neither, as scale_shift takes them for x; residual the
// pooled shape `out_shape` with x's dtype and device.
void check_max_pool2d_extras(const char* op, const Tensor& x, const OptTensor& scale, const OptTensor& shift,
                             const OptTensor& residual, IntArrayRef out_shape);
// t of a supported dtype: float32, float16, bfloat16 or float64.
void check_float_tensor(const char* op, const char* name, const Tensor& t);
// A per-channel vector (BatchNorm scale/shift, bias, their gradients): when given, 1-D of `channels` floats on x's
// device, any float dtype.
void check_channel_vector(const char* op, const char* name, const OptTensor& t, int64_t channels, const Tensor& x);
// t on x's device, and of x's dtype; the messages name t as `name`.
void check_same_device(const char* op, const char* name, const Tensor& t, const Tensor& x);
void check_same_dtype(const char* op, const char* name, const Tensor& t, const Tensor& x);
// Checks a tensor that must have `shape` and x's dtype and device (gradients, saved outputs).
void check_like(const char* op, const char* name, const Tensor& t, IntArrayRef shape, const Tensor& x);
// Output layout rule shared by every backend and the fake kernels: channels_last in, channels_last out.
at::MemoryFormat output_memory_format(const Tensor& x);
// The dtype the finalize ops take BatchNorm's affine parameters in: their own where every one given is 16-bit beside
// float32 statistics (a model cast to bf16 / fp16), else the statistics'. The finalize backward returns the
// parameters' gradients in it on every backend (the fake kernel in _library.py follows the same rule).
at::ScalarType batch_norm_param_type(const Tensor& sum, const OptTensor& weight, const OptTensor& bias);

// The separable backward's gradients: of (x, dw_weight, pw_weight, in_scale, in_shift, mid_scale, mid_shift,
// out_scale, out_shift).
using SeparableGrads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// ---- reference implementations through ATen ops (reference.cpp); these are the "torch" backend ----
namespace reference {
Tensor depthwise_conv2d(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Conv2dGeometry& g);
Tensor depthwise_conv2d_backward_input(const Tensor& grad_out, const Tensor& weight, const Conv2dGeometry& g,
                                       at::MemoryFormat fmt);
Tensor depthwise_conv2d_backward_weight(const Tensor& grad_out, const Tensor& x, const Conv2dGeometry& g);
std::tuple<Tensor, Tensor, Tensor> separable_conv2d(const Tensor& x, const Tensor& dw_weight,
                                                    const Tensor& pw_weight, const SeparableOptions& opt,
                                                    const Conv2dGeometry& g);
// Returns grads of (x, dw_weight, pw_weight, in_scale, in_shift, mid_scale, mid_shift, out_scale, out_shift); the
// grads of absent optional inputs are empty tensors.
SeparableGrads separable_conv2d_backward(
    const Tensor& grad_out, const OptTensor& grad_sum, const OptTensor& grad_sumsq, const OptTensor& out,
    const Tensor& x, const Tensor& dw_weight, const Tensor& pw_weight, const SeparableOptions& opt,
    const Conv2dGeometry& g);
// Returns (scale, shift, mean, var) in the statistics' dtype (kernels/batchnorm.cuh gives the formulas), then does
// `update`.
std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_finalize(const Tensor& sum, const Tensor& sumsq,
                                                               int64_t count, const OptTensor& weight,
                                                               const OptTensor& bias, double eps,
                                                               const RunningStatsUpdate& update = {});
// The gradients of (sum, sumsq, weight, bias) from those of (scale, shift, mean, var) (absent: zeros), in the
// statistics' dtype (formulas in kernels/batchnorm_params.h); those of weight and bias in weight's dtype where it is
// 16-bit beside float32 statistics (a model cast to bf16 / fp16: the dtype the parameters' gradients take).
std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_finalize_backward(
    const Tensor& sum, const Tensor& sumsq, int64_t count, const OptTensor& weight, double eps,
    const OptTensor& grad_scale, const OptTensor& grad_shift, const OptTensor& grad_mean, const OptTensor& grad_var);
// relu?(round(y * scale + shift) (+ residual, rounded)) per channel (the BatchNorm applied, and the shortcut added
// as PyTorch's add would in y's dtype), computed in scale's dtype, in y's layout.
Tensor scale_shift(const Tensor& y, const Tensor& scale, const Tensor& shift, bool relu,
                   const OptTensor& residual = c10::nullopt);
// Its gradients: g = grad [round(y * scale + shift) > 0 with relu]; (round(g * scale), sum g y, sum g), the sums
// per channel in scale's dtype.
std::tuple<Tensor, Tensor, Tensor> scale_shift_backward(const Tensor& grad, const Tensor& y, const Tensor& scale,
                                                        const Tensor& shift, bool relu);
// Max pooling with PyTorch's rules (kernels/pool_params.h): the maximum of each window and, with save_argmax, the
// window's argmax as a uint8 tap index ky * kernel_w + kx (otherwise an empty uint8 tensor); both in x's layout.
// With scale and shift, the windows of scale_shift(x, scale, shift) instead of x's; with residual, the output plus
// residual (rounded in x's dtype, as PyTorch's add).
std::tuple<Tensor, Tensor> max_pool2d(const Tensor& x, const Pool2dGeometry& g, bool save_argmax,
                                      const OptTensor& scale = c10::nullopt, const OptTensor& shift = c10::nullopt,
                                      const OptTensor& residual = c10::nullopt);
// Its gradient: each window's gradient added to its argmax, in grad_out's layout `fmt`.
Tensor max_pool2d_backward(const Tensor& grad_out, const Tensor& argmax, const Pool2dGeometry& g,
                           at::MemoryFormat fmt);
// The backward of max_pool2d with scale and shift: the pool's backward (of the normalized values), then
// scale_shift_backward's without a ReLU: (grad_x, sum g x, sum g), grad_x in x's layout.
std::tuple<Tensor, Tensor, Tensor> max_pool2d_scale_shift_backward(const Tensor& grad_out, const Tensor& argmax,
                                                                   const Tensor& x, const Tensor& scale,
                                                                   const Tensor& shift, const Pool2dGeometry& g);
// Updates running_mean / running_var in place (formulas in kernels/batchnorm_params.h), computed in the
// statistics' dtype and stored in the buffers' own.
void batch_norm_update_stats(const Tensor& running_mean, const Tensor& running_var, const Tensor& mean,
                             const Tensor& var, const OptTensor& pre_bias, int64_t count, double momentum);
}  // namespace reference

// ---- backends ----
enum class Backend { Torch, Cuda, Triton };
// Resolves a backend name for tensors on x's device; "auto" picks the fastest one built for this op.
// Raises a clear error when the backend is unknown, not built, or cannot run on that device.
Backend resolve_backend(c10::string_view name, const char* op, const Tensor& x);
bool cuda_built();                           // compiled with the CUDA kernels
bool cuda_implements(c10::string_view op);   // the CUDA backend has a kernel for this op (by schema name)
bool cuda_preferred(c10::string_view op);    // ... and "auto" takes it (it beat the reference where measured)

}  // namespace xception_ops
