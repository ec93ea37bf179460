// The reference path: every op written with ATen ops (cuDNN / oneDNN underneath). It is the "torch" backend,
// the CPU implementation, and the yardstick the CUDA and Triton kernels are checked against.
#include <ATen/ATen.h>

#include "ops.h"

namespace xception_ops {
namespace reference {
namespace {

// Per-channel math (affines, reductions) runs in float32, or float64 for float64 inputs.
at::ScalarType compute_type(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

Tensor per_channel(const Tensor& v, at::ScalarType type) { return v.to(type).view({1, -1, 1, 1}); }

Tensor channel_sum(const Tensor& t, at::ScalarType type) { return t.to(type).sum({0, 2, 3}); }

Tensor empty_vector(const Tensor& x, at::ScalarType type) { return at::empty({0}, x.options().dtype(type)); }

// x * scale + shift, per channel, computed in float32 and returned in x's dtype.
Tensor channel_affine(const Tensor& x, const OptTensor& scale, const OptTensor& shift) {
  if (!scale.has_value() && !shift.has_value()) return x;
  const auto type = compute_type(x);
  Tensor r = x.to(type);
  if (scale.has_value()) r = r * per_channel(*scale, type);
  if (shift.has_value()) r = r + per_channel(*shift, type);
  return r.to(x.scalar_type());
}

// ATen convolutions pad symmetrically; asymmetric ("same" at stride 2) padding is applied explicitly.
Tensor pad_input(const Tensor& x, const Conv2dGeometry& g) {
  if (g.symmetric_padding()) return x;
  return at::constant_pad_nd(x, {g.pad_left, g.pad_right, g.pad_top, g.pad_bottom}, 0);
}

std::vector<int64_t> conv_padding(const Conv2dGeometry& g) {
  if (g.symmetric_padding()) return {g.pad_top, g.pad_left};
  return {0, 0};
}

Tensor pointwise(const Tensor& m, const Tensor& pw_weight) {
  return at::convolution(m, pw_weight, c10::nullopt, {1, 1}, {0, 0}, {1, 1}, false, {0, 0}, 1);
}

// The intermediate results of the fused forward; the backward recomputes them rather than storing them.
struct ForwardPieces {
  Tensor affine;  // x * in_scale + in_shift (x itself without a prologue)
  Tensor input;   // what the depthwise stage reads: relu(affine) or affine
  Tensor dw;      // depthwise result
  Tensor pre;     // dw * mid_scale + mid_shift, rounded (dw itself without them)
  Tensor mid;     // activation(pre)
  Tensor y;       // pointwise result, before the epilogue
};

ForwardPieces forward_pieces(const Tensor& x, const Tensor& dw_weight, const Tensor& pw_weight,
                             const SeparableOptions& opt, const Conv2dGeometry& g) {
  ForwardPieces f;
  f.affine = channel_affine(x, opt.in_scale, opt.in_shift);
  f.input = opt.in_relu ? at::relu(f.affine) : f.affine;
  f.dw = depthwise_conv2d(f.input, dw_weight, c10::nullopt, g);
  f.pre = channel_affine(f.dw, opt.mid_scale, opt.mid_shift);
  switch (opt.mid) {
    case MidActivation::None: f.mid = f.pre; break;
    case MidActivation::Relu: f.mid = at::relu(f.pre); break;
    case MidActivation::Relu6: f.mid = at::clamp(f.pre, 0, 6); break;
    case MidActivation::Elu: f.mid = at::elu(f.pre); break;
    case MidActivation::Hardswish: f.mid = at::hardswish(f.pre); break;
  }
  f.y = pointwise(f.mid, pw_weight);
  return f;
}

}  // namespace

Tensor depthwise_conv2d(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Conv2dGeometry& g) {
  return at::convolution(pad_input(x, g), weight, bias, {g.stride_h, g.stride_w}, conv_padding(g),
                         {g.dilation_h, g.dilation_w}, false, {0, 0}, g.in_channels)
      .contiguous(output_memory_format(x));
}

Tensor depthwise_conv2d_backward_input(const Tensor& grad_out, const Tensor& weight, const Conv2dGeometry& g,
                                       at::MemoryFormat fmt) {
  // A transposed convolution rebuilds the gradient of the padded input; output_padding restores the rows and
  // columns the strided forward never read. Then the padding is cut away.
  const int64_t extra_h = g.padded_h() - ((g.out_h - 1) * g.stride_h + g.span_h());
  const int64_t extra_w = g.padded_w() - ((g.out_w - 1) * g.stride_w + g.span_w());
  Tensor grad_padded = at::convolution(grad_out, weight, c10::nullopt, {g.stride_h, g.stride_w}, {0, 0},
                                       {g.dilation_h, g.dilation_w}, true, {extra_h, extra_w}, g.in_channels);
  return grad_padded.slice(2, g.pad_top, g.pad_top + g.in_h)
      .slice(3, g.pad_left, g.pad_left + g.in_w)
      .contiguous(fmt);
}

Tensor depthwise_conv2d_backward_weight(const Tensor& grad_out, const Tensor& x, const Conv2dGeometry& g) {
  // convolution_backward takes the weight for its shape only when just the weight gradient is asked for.
  Tensor weight_shape = at::empty({g.dw_channels(), 1, g.kernel_h, g.kernel_w}, x.options());
  auto grads = at::convolution_backward(grad_out, pad_input(x, g), weight_shape, c10::nullopt,
                                        {g.stride_h, g.stride_w}, conv_padding(g), {g.dilation_h, g.dilation_w},
                                        false, {0, 0}, g.in_channels, {false, true, false});
  return std::get<1>(grads).contiguous();
}

std::tuple<Tensor, Tensor, Tensor> separable_conv2d(const Tensor& x, const Tensor& dw_weight,
                                                    const Tensor& pw_weight, const SeparableOptions& opt,
                                                    const Conv2dGeometry& g) {
  const ForwardPieces f = forward_pieces(x, dw_weight, pw_weight, opt, g);
  Tensor z = channel_affine(f.y, opt.out_scale, opt.out_shift);
  if (opt.residual.has_value()) z = z + *opt.residual;
  if (opt.out_relu) z = at::relu(z);
  const auto stat_type = compute_type(x);
  Tensor sum = empty_vector(x, stat_type), sumsq = empty_vector(x, stat_type);
  if (opt.compute_stats) {
    const Tensor yf = f.y.to(stat_type);
    sum = yf.sum({0, 2, 3});
    sumsq = (yf * yf).sum({0, 2, 3});
  }
  return {z.contiguous(output_memory_format(x)), sum, sumsq};
}

SeparableGrads separable_conv2d_backward(
    const Tensor& grad_out, const OptTensor& grad_sum, const OptTensor& grad_sumsq, const OptTensor& out,
    const Tensor& x, const Tensor& dw_weight, const Tensor& pw_weight, const SeparableOptions& opt,
    const Conv2dGeometry& g) {
  const ForwardPieces f = forward_pieces(x, dw_weight, pw_weight, opt, g);
  const auto type = compute_type(x);
  const auto dtype = x.scalar_type();
  const auto fmt = output_memory_format(x);

  // Epilogue: out = relu(y * out_scale + out_shift + residual).
  Tensor grad_z = opt.out_relu ? at::where(*out > 0, grad_out, at::zeros({}, grad_out.options())) : grad_out;
  Tensor grad_out_scale, grad_out_shift;
  if (opt.out_scale.has_value()) {
    grad_out_scale = channel_sum(grad_z.to(type) * f.y.to(type), type).to(opt.out_scale->scalar_type());
  }
  if (opt.out_shift.has_value()) grad_out_shift = channel_sum(grad_z, type).to(opt.out_shift->scalar_type());
  Tensor grad_y = grad_z;
  const bool stats_grad = grad_sum.has_value() || grad_sumsq.has_value();
  if (opt.out_scale.has_value() || stats_grad) {
    Tensor gy = grad_z.to(type);
    if (opt.out_scale.has_value()) gy = gy * per_channel(*opt.out_scale, type);
    if (grad_sum.has_value()) gy = gy + per_channel(*grad_sum, type);
    if (grad_sumsq.has_value()) gy = gy + 2 * f.y.to(type) * per_channel(*grad_sumsq, type);
    grad_y = gy.to(dtype);
  }

  // Pointwise: grad_mid = W^T grad_y, grad_W = sum over pixels of grad_y x mid^T.
  const int64_t dw_channels = g.dw_channels();
  Tensor grad_mid = pointwise(grad_y, pw_weight.transpose(0, 1));
  Tensor grad_pw = at::mm(grad_y.permute({1, 0, 2, 3}).reshape({g.out_channels, -1}),
                          f.mid.permute({0, 2, 3, 1}).reshape({-1, dw_channels}))
                       .view({g.out_channels, dw_channels, 1, 1});

  // Mid: mid = act(pre), pre = dw * mid_scale + mid_shift.
  Tensor grad_pre;
  const Tensor zero = at::zeros({}, grad_mid.options());
  switch (opt.mid) {
    case MidActivation::None: grad_pre = grad_mid; break;
    case MidActivation::Relu: grad_pre = at::where(f.pre > 0, grad_mid, zero); break;
    case MidActivation::Relu6: grad_pre = at::where((f.pre > 0).logical_and(f.pre < 6), grad_mid, zero); break;
    case MidActivation::Elu: grad_pre = at::where(f.pre > 0, grad_mid, grad_mid * (f.mid + 1)); break;
    case MidActivation::Hardswish: grad_pre = at::hardswish_backward(grad_mid, f.pre); break;
  }
  Tensor grad_mid_scale, grad_mid_shift;
  if (opt.mid_scale.has_value()) {
    grad_mid_scale = channel_sum(grad_pre.to(type) * f.dw.to(type), type).to(opt.mid_scale->scalar_type());
  }
  if (opt.mid_shift.has_value()) grad_mid_shift = channel_sum(grad_pre, type).to(opt.mid_shift->scalar_type());
  Tensor grad_dw_out = grad_pre;
  if (opt.mid_scale.has_value()) grad_dw_out = (grad_pre.to(type) * per_channel(*opt.mid_scale, type)).to(dtype);

  Tensor grad_dw = depthwise_conv2d_backward_weight(grad_dw_out, f.input, g);
  Tensor grad_input = depthwise_conv2d_backward_input(grad_dw_out, dw_weight, g, fmt);

  // Prologue: input = relu(x * in_scale + in_shift).
  if (opt.in_relu) grad_input = at::where(f.affine > 0, grad_input, zero);
  Tensor grad_in_scale, grad_in_shift;
  if (opt.in_scale.has_value()) {
    grad_in_scale = channel_sum(grad_input.to(type) * x.to(type), type).to(opt.in_scale->scalar_type());
  }
  if (opt.in_shift.has_value()) grad_in_shift = channel_sum(grad_input, type).to(opt.in_shift->scalar_type());
  Tensor grad_x = grad_input;
  if (opt.in_scale.has_value()) grad_x = (grad_input.to(type) * per_channel(*opt.in_scale, type)).to(dtype);

  auto or_empty = [&](const Tensor& t) { return t.defined() ? t : empty_vector(x, type); };
  return {grad_x.contiguous(fmt),     grad_dw.contiguous(),       grad_pw.contiguous(),
          or_empty(grad_in_scale),    or_empty(grad_in_shift),    or_empty(grad_mid_scale),
          or_empty(grad_mid_shift),   or_empty(grad_out_scale),   or_empty(grad_out_shift)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_finalize(const Tensor& sum, const Tensor& sumsq,
                                                               int64_t count, const OptTensor& weight,
                                                               const OptTensor& bias, double eps,
                                                               const RunningStatsUpdate& update) {
  const auto type = sum.scalar_type();
  const double n = static_cast<double>(count);
  Tensor mean = sum / n;
  Tensor var = (sumsq / n - mean * mean).clamp_min(0);
  Tensor invstd = (var + eps).rsqrt();
  Tensor scale = weight.has_value() ? weight->to(type) * invstd : invstd;
  Tensor shift = -mean * scale;
  if (bias.has_value()) shift = shift + bias->to(type);
  if (update.running_mean.has_value()) {
    batch_norm_update_stats(*update.running_mean, *update.running_var, mean, var, update.pre_bias, count,
                            update.momentum);
  }
  if (update.num_batches_tracked.has_value()) update.num_batches_tracked->add_(1);
  return {scale, shift, mean, var};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_finalize_backward(
    const Tensor& sum, const Tensor& sumsq, int64_t count, const OptTensor& weight, double eps,
    const OptTensor& grad_scale, const OptTensor& grad_shift, const OptTensor& grad_mean, const OptTensor& grad_var) {
  const auto type = sum.scalar_type();
  const double n = static_cast<double>(count);
  auto or_zero = [&](const OptTensor& t) { return t.has_value() ? t->to(type) : at::zeros_like(sum); };
  const Tensor g_scale = or_zero(grad_scale), g_shift = or_zero(grad_shift), g_mean = or_zero(grad_mean),
               g_var = or_zero(grad_var);
  const Tensor w = weight.has_value() ? weight->to(type) : at::ones_like(sum);
  const Tensor m = sum / n;
  const Tensor raw_var = sumsq / n - m * m;
  const Tensor r = (raw_var.clamp_min(0) + eps).rsqrt();
  const Tensor g_affine = g_scale - g_shift * m;
  const Tensor g_r = g_affine * w;
  const Tensor g_v = (g_var - 0.5 * g_r * r * r * r) * (raw_var >= 0).to(type);
  const Tensor g_m = g_mean - g_shift * w * r - 2 * m * g_v;
  const auto param_type = batch_norm_param_type(sum, weight, c10::nullopt);  // as the cuda kernel writes them
  return {g_m / n, g_v / n, (g_affine * r).to(param_type), g_shift.to(param_type, false, /*copy=*/true)};
}

Tensor scale_shift(const Tensor& y, const Tensor& scale, const Tensor& shift, bool relu, const OptTensor& residual) {
  const auto type = scale.scalar_type();
  Tensor z = (y.to(type) * per_channel(scale, type) + per_channel(shift, type)).to(y.scalar_type());
  if (residual.has_value()) z = z + *residual;
  if (relu) z = z.clamp_min(0);
  return z.contiguous(output_memory_format(y));
}

std::tuple<Tensor, Tensor, Tensor> scale_shift_backward(const Tensor& grad, const Tensor& y, const Tensor& scale,
                                                        const Tensor& shift, bool relu) {
  const auto type = scale.scalar_type();
  const Tensor yf = y.to(type);
  Tensor g = grad.to(type);
  if (relu) {
    const Tensor z = (yf * per_channel(scale, type) + per_channel(shift, type)).to(y.scalar_type());
    g = at::where(z > 0, g, at::zeros({}, g.options()));
  }
  const Tensor grad_y = (g * per_channel(scale, type)).to(y.scalar_type()).contiguous(output_memory_format(y));
  return {grad_y, (g * yf).sum({0, 2, 3}), g.sum({0, 2, 3})};
}

void batch_norm_update_stats(const Tensor& running_mean, const Tensor& running_var, const Tensor& mean,
                             const Tensor& var, const OptTensor& pre_bias, int64_t count, double momentum) {
  const auto type = mean.scalar_type();
  const Tensor batch_mean = pre_bias.has_value() ? mean + pre_bias->to(type) : mean;
  const Tensor unbiased = var * (static_cast<double>(count) / static_cast<double>(count - 1));
  running_mean.copy_(running_mean.to(type) * (1 - momentum) + batch_mean * momentum);
  running_var.copy_(running_var.to(type) * (1 - momentum) + unbiased * momentum);
}

namespace {

// The origins of the output windows, oh * stride - pad and ow * stride - pad, as int64 [out_h, 1] and [1, out_w].
std::pair<Tensor, Tensor> window_origins(const Pool2dGeometry& g, const at::TensorOptions& options) {
  const auto opts = options.dtype(at::kLong);
  return {(at::arange(g.out_h, opts) * g.stride_h - g.pad_h).view({g.out_h, 1}),
          (at::arange(g.out_w, opts) * g.stride_w - g.pad_w).view({1, g.out_w})};
}

}  // namespace

// PyTorch's pooling, its flat argmax ih * W + iw turned into the window's tap index and back.
// With scale and shift, scale_shift's values pooled; with residual, the pooled values plus residual.
std::tuple<Tensor, Tensor> max_pool2d(const Tensor& x, const Pool2dGeometry& g, bool save_argmax,
                                      const OptTensor& scale, const OptTensor& shift, const OptTensor& residual) {
  const auto fmt = output_memory_format(x);
  const Tensor z = scale.has_value() ? scale_shift(x, *scale, *shift, false) : x;
  auto [out, index] = at::max_pool2d_with_indices(z, {g.kernel_h, g.kernel_w}, {g.stride_h, g.stride_w},
                                                  {g.pad_h, g.pad_w}, {1, 1}, g.ceil_mode);
  if (residual.has_value()) out = out + *residual;
  out = out.contiguous(fmt);
  if (!save_argmax) return {out, at::empty({0}, x.options().dtype(at::kByte))};
  const auto [rows, cols] = window_origins(g, index.options());
  const Tensor code = (index.div(g.in_w, "floor") - rows) * g.kernel_w + (index.remainder(g.in_w) - cols);
  return {out, code.to(at::kByte).contiguous(fmt)};
}

std::tuple<Tensor, Tensor, Tensor> max_pool2d_scale_shift_backward(const Tensor& grad_out, const Tensor& argmax,
                                                                   const Tensor& x, const Tensor& scale,
                                                                   const Tensor& shift, const Pool2dGeometry& g) {
  const Tensor grad_z = max_pool2d_backward(grad_out, argmax, g, output_memory_format(x));
  return scale_shift_backward(grad_z, x, scale, shift, false);
}

Tensor max_pool2d_backward(const Tensor& grad_out, const Tensor& argmax, const Pool2dGeometry& g,
                           at::MemoryFormat fmt) {
  const auto [rows, cols] = window_origins(g, argmax.options());
  const Tensor code = argmax.to(at::kLong);
  const Tensor ih = rows + code.div(g.kernel_w, "floor"), iw = cols + code.remainder(g.kernel_w);
  // A code that names no tap inside the image (not from a forward) adds nothing, as the kernels' gather finds no
  // input it names; ATen's backward scatters, so it gets a zero at index 0 instead of an index out of bounds.
  const Tensor valid = (code < g.kernel_h * g.kernel_w) & (ih >= 0) & (ih < g.in_h) & (iw >= 0) & (iw < g.in_w);
  const Tensor index = at::where(valid, ih * g.in_w + iw, 0);
  const Tensor grad = at::where(valid, grad_out, 0);
  // ATen's backward takes the input for its shape and layout only.
  const Tensor input_like = at::empty({g.batch, g.channels, g.in_h, g.in_w}, grad_out.options().memory_format(fmt));
  return at::max_pool2d_with_indices_backward(grad, input_like, {g.kernel_h, g.kernel_w}, {g.stride_h, g.stride_w},
                                              {g.pad_h, g.pad_w}, {1, 1}, g.ceil_mode, index)
      .contiguous(fmt);
}

}  // namespace reference
}  // namespace xception_ops
