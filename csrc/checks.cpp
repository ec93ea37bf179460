// Argument checks for every op, run before any backend sees the tensors.
// XO_CHECK_VALUE raises ValueError in Python and XO_CHECK_TYPE raises TypeError (ops.h); each message names
// the op and the argument at fault.
#include <c10/util/Exception.h>

#include "ops.h"

namespace xception_ops {
namespace {

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

constexpr int64_t kMaxGeometryValue = 2147483647;  // stride, padding, dilation, kernel_size: 2^31 - 1

void check_int_list(const char* op, const char* name, IntArrayRef v, size_t len, int64_t min_value) {
  XO_CHECK_VALUE(v.size() == len, op, ": ", name, " must have ", len, " values, got ", v.size());
  for (int64_t e : v) {
    XO_CHECK_VALUE(e >= min_value, op, ": every value of ", name, " must be >= ", min_value, ", got ", dims(v));
    // (bounded, so that the geometry's spans, padded sizes and tap counts cannot overflow 64 bits)
    XO_CHECK_VALUE(e <= kMaxGeometryValue, op, ": every value of ", name, " must be <= ", kMaxGeometryValue,
                   ", got ", dims(v));
  }
}

}  // namespace

void check_float_tensor(const char* op, const char* name, const Tensor& t) {
  XO_CHECK_TYPE(is_supported_dtype(t.scalar_type()), op, ": ", name, " has dtype ", t.scalar_type(),
                   "; supported dtypes are float32, float16, bfloat16 and float64");
}

// A per-channel vector (BatchNorm scale/shift, bias): 1-D of `channels` floats on x's device, any float dtype.
void check_channel_vector(const char* op, const char* name, const OptTensor& t, int64_t channels,
                          const Tensor& x) {
  if (!t.has_value()) return;
  XO_CHECK_VALUE(t->dim() == 1 && t->size(0) == channels, op, ": ", name, " must have shape [", channels,
                    "], got ", dims(t->sizes()));
  check_float_tensor(op, name, *t);
  check_same_device(op, name, *t, x);
}

void check_same_device(const char* op, const char* name, const Tensor& t, const Tensor& x) {
  XO_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device(),
                    "; move both to the same device");
}

void check_same_dtype(const char* op, const char* name, const Tensor& t, const Tensor& x) {
  XO_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
                   " but x has dtype ", x.scalar_type(), "; cast them to one dtype (or use autocast)");
}

std::string dims(IntArrayRef v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

MidActivation parse_mid_activation(c10::string_view name) {
  if (name == "none") return MidActivation::None;
  if (name == "relu") return MidActivation::Relu;
  if (name == "elu") return MidActivation::Elu;
  if (name == "relu6") return MidActivation::Relu6;
  if (name == "hardswish") return MidActivation::Hardswish;
  XO_CHECK_VALUE(false, "xception_ops: mid_activation must be 'none', 'relu', 'relu6', 'hardswish' or 'elu', got '",
                    std::string(name), "'");
}

at::MemoryFormat output_memory_format(const Tensor& x) {
  // Plain contiguous wins ties (C == 1 or H == W == 1 are both), so the rule is the same everywhere.
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

at::ScalarType batch_norm_param_type(const Tensor& sum, const OptTensor& weight, const OptTensor& bias) {
  const at::ScalarType stats = sum.scalar_type();
  const OptTensor* given = weight.has_value() ? &weight : bias.has_value() ? &bias : nullptr;
  if (stats != at::kFloat || given == nullptr) return stats;
  const at::ScalarType own = (*given)->scalar_type();
  const bool same = (!weight.has_value() || weight->scalar_type() == own) &&
                    (!bias.has_value() || bias->scalar_type() == own);
  return same && (own == at::kBFloat16 || own == at::kHalf) ? own : stats;
}

Conv2dGeometry make_geometry(const char* op, IntArrayRef x_sizes, IntArrayRef weight_sizes, IntArrayRef stride,
                             IntArrayRef padding, IntArrayRef dilation) {
  XO_CHECK_VALUE(x_sizes.size() == 4, op, ": x must be a 4-D tensor (N, C, H, W), got ", x_sizes.size(),
                    "-D with shape ", x_sizes);
  XO_CHECK_VALUE(weight_sizes.size() == 4 && weight_sizes[1] == 1, op,
                    ": dw_weight must have shape (C * depth_multiplier, 1, kH, kW), got ", weight_sizes);
  const int64_t channels = x_sizes[1];
  XO_CHECK_VALUE(channels > 0, op, ": x has 0 channels");
  XO_CHECK_VALUE(weight_sizes[0] > 0 && weight_sizes[0] % channels == 0, op, ": dw_weight has ",
                    weight_sizes[0], " output channels, which is not a positive multiple of x's ", channels,
                    " channels");
  XO_CHECK_VALUE(weight_sizes[2] > 0 && weight_sizes[3] > 0, op, ": dw_weight has an empty kernel ",
                    weight_sizes);
  check_int_list(op, "stride", stride, 2, 1);
  check_int_list(op, "padding", padding, 4, 0);
  check_int_list(op, "dilation", dilation, 2, 1);

  Conv2dGeometry g;
  g.batch = x_sizes[0];
  g.in_channels = channels;
  g.in_h = x_sizes[2];
  g.in_w = x_sizes[3];
  g.depth_multiplier = weight_sizes[0] / channels;
  g.out_channels = weight_sizes[0];
  g.kernel_h = weight_sizes[2];
  g.kernel_w = weight_sizes[3];
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_top = padding[0];
  g.pad_bottom = padding[1];
  g.pad_left = padding[2];
  g.pad_right = padding[3];
  g.dilation_h = dilation[0];
  g.dilation_w = dilation[1];
  XO_CHECK_VALUE(g.span_h() <= g.padded_h() && g.span_w() <= g.padded_w(), op, ": the kernel ", g.kernel_h,
                    "x", g.kernel_w, " with dilation ", dims(dilation), " spans ", g.span_h(), "x", g.span_w(),
                    ", larger than the padded input ", g.padded_h(), "x", g.padded_w(), " (x is ", g.in_h, "x",
                    g.in_w, ", padding (top, bottom, left, right) = ", dims(padding), ")");
  g.compute_output_size();
  return g;
}

Conv2dGeometry check_depthwise(const char* op, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                               IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation) {
  Conv2dGeometry g = make_geometry(op, x.sizes(), weight.sizes(), stride, padding, dilation);
  check_float_tensor(op, "x", x);
  check_same_device(op, "dw_weight", weight, x);
  check_same_dtype(op, "dw_weight", weight, x);
  check_channel_vector(op, "bias", bias, g.dw_channels(), x);
  if (bias.has_value()) check_same_dtype(op, "bias", *bias, x);
  return g;
}

Conv2dGeometry check_separable(const char* op, const Tensor& x, const Tensor& dw_weight, const Tensor& pw_weight,
                               const SeparableOptions& opt, IntArrayRef stride, IntArrayRef padding,
                               IntArrayRef dilation) {
  Conv2dGeometry g = check_depthwise(op, x, dw_weight, c10::nullopt, stride, padding, dilation);
  XO_CHECK_VALUE(pw_weight.dim() == 4 && pw_weight.size(2) == 1 && pw_weight.size(3) == 1, op,
                    ": pw_weight must have shape (C_out, C * depth_multiplier, 1, 1), got ", pw_weight.sizes());
  XO_CHECK_VALUE(pw_weight.size(1) == g.dw_channels(), op, ": pw_weight has ", pw_weight.size(1),
                    " input channels but the depthwise stage gives ", g.dw_channels(),
                    " (channel mismatch between dw_weight and pw_weight)");
  XO_CHECK_VALUE(pw_weight.size(0) > 0, op, ": pw_weight has 0 output channels");
  check_same_device(op, "pw_weight", pw_weight, x);
  check_same_dtype(op, "pw_weight", pw_weight, x);
  g.out_channels = pw_weight.size(0);
  check_channel_vector(op, "in_scale", opt.in_scale, g.in_channels, x);
  check_channel_vector(op, "in_shift", opt.in_shift, g.in_channels, x);
  check_channel_vector(op, "mid_scale", opt.mid_scale, g.dw_channels(), x);
  check_channel_vector(op, "mid_shift", opt.mid_shift, g.dw_channels(), x);
  check_channel_vector(op, "out_scale", opt.out_scale, g.out_channels, x);
  check_channel_vector(op, "out_shift", opt.out_shift, g.out_channels, x);
  if (opt.residual.has_value()) {
    const Tensor& r = *opt.residual;
    XO_CHECK_VALUE(r.dim() == 4 && r.size(0) == g.batch && r.size(1) == g.out_channels &&
                          r.size(2) == g.out_h && r.size(3) == g.out_w,
                      op, ": residual must have the output's shape [", g.batch, ", ", g.out_channels, ", ",
                      g.out_h, ", ", g.out_w, "], got ", dims(r.sizes()));
    check_same_device(op, "residual", r, x);
    check_same_dtype(op, "residual", r, x);
  }
  return g;
}

void check_batch_norm_finalize(const char* op, const Tensor& sum, const Tensor& sumsq, int64_t count,
                               const OptTensor& weight, const OptTensor& bias, double eps,
                               const RunningStatsUpdate* update) {
  XO_CHECK_VALUE(sum.dim() == 1, op, ": sum must be 1-D (one value per channel), got shape ", sum.sizes());
  XO_CHECK_TYPE(sum.scalar_type() == at::kFloat || sum.scalar_type() == at::kDouble, op,
                ": sum must be float32 or float64 (the fused ops' statistics), got ", sum.scalar_type());
  XO_CHECK_VALUE(sumsq.sizes() == sum.sizes(), op, ": sumsq must have sum's shape ", sum.sizes(), ", got ",
                 sumsq.sizes());
  XO_CHECK_TYPE(sumsq.scalar_type() == sum.scalar_type(), op, ": sumsq has dtype ", sumsq.scalar_type(),
                " but sum has dtype ", sum.scalar_type());
  XO_CHECK_VALUE(count >= 1, op, ": count must be at least 1, got ", count);
  XO_CHECK_VALUE(eps >= 0, op, ": eps must be >= 0");
  const char* names[] = {"sumsq", "weight", "bias"};
  const Tensor* others[] = {&sumsq, weight.has_value() ? &*weight : nullptr, bias.has_value() ? &*bias : nullptr};
  for (int i = 0; i < 3; ++i) {
    XO_CHECK_VALUE(others[i] == nullptr || others[i]->device() == sum.device(), op, ": ", names[i], " is on ",
                   others[i] != nullptr ? others[i]->device() : sum.device(), " but sum is on ", sum.device(),
                   "; move both to the same device");
  }
  check_channel_vector(op, "weight", weight, sum.size(0), sum);
  check_channel_vector(op, "bias", bias, sum.size(0), sum);
  if (update == nullptr) return;
  XO_CHECK_VALUE(update->running_mean.has_value() == update->running_var.has_value(), op,
                 ": running_mean and running_var go together: give both or neither");
  if (update->running_mean.has_value()) {  // the batch mean and variance will have sum's shape, dtype and device
    check_batch_norm_update_stats(op, *update->running_mean, *update->running_var, sum, sumsq, update->pre_bias,
                                  count, update->momentum);
  }
  const OptTensor& tracked = update->num_batches_tracked;
  if (tracked.has_value()) {
    XO_CHECK_TYPE(tracked->scalar_type() == at::kLong && tracked->numel() == 1, op,
                  ": num_batches_tracked must be one int64 (nn.BatchNorm2d's), got ", tracked->scalar_type(),
                  " of shape ", dims(tracked->sizes()));
    XO_CHECK_VALUE(tracked->device() == sum.device(), op, ": num_batches_tracked is on ", tracked->device(),
                   " but sum is on ", sum.device(), "; move both to the same device");
  }
}

void check_batch_norm_finalize_backward(const char* op, const Tensor& sum, const Tensor& sumsq, int64_t count,
                                        const OptTensor& weight, double eps, const OptTensor& grad_scale,
                                        const OptTensor& grad_shift, const OptTensor& grad_mean,
                                        const OptTensor& grad_var) {
  check_batch_norm_finalize(op, sum, sumsq, count, weight, c10::nullopt, eps);
  check_channel_vector(op, "grad_scale", grad_scale, sum.size(0), sum);
  check_channel_vector(op, "grad_shift", grad_shift, sum.size(0), sum);
  check_channel_vector(op, "grad_mean", grad_mean, sum.size(0), sum);
  check_channel_vector(op, "grad_var", grad_var, sum.size(0), sum);
}

void check_batch_norm_update_stats(const char* op, const Tensor& running_mean, const Tensor& running_var,
                                   const Tensor& mean, const Tensor& var, const OptTensor& pre_bias, int64_t count,
                                   double momentum) {
  XO_CHECK_VALUE(mean.dim() == 1, op, ": mean must be 1-D (one value per channel), got shape ", mean.sizes());
  XO_CHECK_TYPE(mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble, op,
                ": mean must be float32 or float64 (the finalize step's output), got ", mean.scalar_type());
  const char* names[] = {"var", "running_mean", "running_var"};
  const Tensor* vectors[] = {&var, &running_mean, &running_var};
  for (int i = 0; i < 3; ++i) {
    XO_CHECK_VALUE(vectors[i]->sizes() == mean.sizes(), op, ": ", names[i], " must have mean's shape ",
                   mean.sizes(), ", got ", vectors[i]->sizes());
    XO_CHECK_VALUE(vectors[i]->device() == mean.device(), op, ": ", names[i], " is on ", vectors[i]->device(),
                   " but mean is on ", mean.device(), "; move both to the same device");
  }
  XO_CHECK_TYPE(var.scalar_type() == mean.scalar_type(), op, ": var has dtype ", var.scalar_type(),
                " but mean has dtype ", mean.scalar_type());
  XO_CHECK_TYPE(at::isFloatingType(running_mean.scalar_type()) && at::isFloatingType(running_var.scalar_type()),
                op, ": running_mean and running_var must be floating point, got ", running_mean.scalar_type(), " and ",
                running_var.scalar_type());
  XO_CHECK_VALUE(count >= 2, op, ": count must be at least 2 (the unbiased variance divides by count - 1), got ",
                 count);
  XO_CHECK_VALUE(momentum >= 0 && momentum <= 1, op, ": momentum must be in [0, 1], got ", momentum);
  check_channel_vector(op, "pre_bias", pre_bias, mean.size(0), mean);
}

namespace {

// scale and shift: float32 or float64 vectors of y's channels, on its device, of one dtype.
void check_scale_shift_vectors(const char* op, const Tensor& y, const char* y_name, const Tensor& scale,
                               const Tensor& shift) {
  const char* names[] = {"scale", "shift"};
  const Tensor* vectors[] = {&scale, &shift};
  for (int i = 0; i < 2; ++i) {
    XO_CHECK_VALUE(vectors[i]->dim() == 1 && vectors[i]->size(0) == y.size(1), op, ": ", names[i],
                   " must have shape [", y.size(1), "] (", y_name, "'s channels), got ", dims(vectors[i]->sizes()));
    XO_CHECK_TYPE(vectors[i]->scalar_type() == at::kFloat || vectors[i]->scalar_type() == at::kDouble, op, ": ",
                  names[i], " must be float32 or float64 (per-channel math), got ", vectors[i]->scalar_type());
    check_same_device(op, names[i], *vectors[i], y);
  }
  XO_CHECK_TYPE(shift.scalar_type() == scale.scalar_type(), op, ": shift has dtype ", shift.scalar_type(),
                " but scale has dtype ", scale.scalar_type());
}

}  // namespace

void check_scale_shift(const char* op, const Tensor& y, const Tensor& scale, const Tensor& shift, const Tensor* grad,
                       const OptTensor& residual) {
  XO_CHECK_VALUE(y.dim() == 4, op, ": y must be a 4-D tensor (N, C, H, W), got shape ", dims(y.sizes()));
  check_float_tensor(op, "y", y);
  check_scale_shift_vectors(op, y, "y", scale, shift);
  if (grad != nullptr) check_like(op, "grad", *grad, y.sizes(), y);
  if (residual.has_value()) check_like(op, "residual", *residual, y.sizes(), y);
}

Pool2dGeometry check_max_pool2d(const char* op, const Tensor& values, const char* values_name, IntArrayRef x_sizes,
                                IntArrayRef kernel_size, IntArrayRef stride, IntArrayRef padding, bool ceil_mode) {
  XO_CHECK_VALUE(x_sizes.size() == 4, op, ": x must be a 4-D tensor (N, C, H, W), got shape ", dims(x_sizes));
  XO_CHECK_VALUE(x_sizes[1] > 0, op, ": x has 0 channels");
  check_float_tensor(op, values_name, values);
  check_int_list(op, "kernel_size", kernel_size, 2, 1);
  check_int_list(op, "stride", stride, 2, 1);
  check_int_list(op, "padding", padding, 2, 0);
  XO_CHECK_VALUE(kernel_size[0] * kernel_size[1] <= kMaxPoolMaxTaps, op, ": kernel_size ", dims(kernel_size),
                 " has more than ", kMaxPoolMaxTaps, " taps (the argmax is kept as one byte per output)");
  for (int d = 0; d < 2; ++d) {
    XO_CHECK_VALUE(2 * padding[d] <= kernel_size[d], op, ": padding must be at most half of kernel_size, got padding ",
                   dims(padding), " and kernel_size ", dims(kernel_size));
  }
  Pool2dGeometry g;
  g.batch = x_sizes[0], g.channels = x_sizes[1], g.in_h = x_sizes[2], g.in_w = x_sizes[3];
  g.kernel_h = kernel_size[0], g.kernel_w = kernel_size[1];
  g.stride_h = stride[0], g.stride_w = stride[1];
  g.pad_h = padding[0], g.pad_w = padding[1];
  g.ceil_mode = ceil_mode;
  g.out_h = pool_out_size(g.in_h, g.kernel_h, g.stride_h, g.pad_h, ceil_mode);
  g.out_w = pool_out_size(g.in_w, g.kernel_w, g.stride_w, g.pad_w, ceil_mode);
  XO_CHECK_VALUE(g.out_h >= 1 && g.out_w >= 1, op, ": the output would be empty: x's size ", dims(x_sizes.slice(2)),
                 " is smaller than kernel_size ", dims(kernel_size), " with padding ", dims(padding));
  return g;
}

void check_max_pool2d_extras(const char* op, const Tensor& x, const OptTensor& scale, const OptTensor& shift,
                             const OptTensor& residual, IntArrayRef out_shape) {
  XO_CHECK_VALUE(scale.has_value() == shift.has_value(), op, ": scale and shift come together (the BatchNorm "
                 "applied to x), got ", scale.has_value() ? "scale" : "shift", " alone");
  if (scale.has_value()) check_scale_shift_vectors(op, x, "x", *scale, *shift);
  if (residual.has_value()) check_like(op, "residual", *residual, out_shape, x);
}

void check_like(const char* op, const char* name, const Tensor& t, IntArrayRef shape, const Tensor& x) {
  XO_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", dims(shape), ", got ", dims(t.sizes()));
  check_same_device(op, name, t, x);
  check_same_dtype(op, name, t, x);
}

}  // namespace xception_ops
