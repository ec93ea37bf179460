// The ops' Autograd kernels, in C++: separable_conv2d, depthwise_conv2d, scale_shift, batch_norm_finalize and
// max_pool2d (each forward calls the op below autograd, whichever backend its `backend` names, and records a node whose
// backward calls the matching *_backward op), and batch_norm_update_stats (in place, no gradient).
//
// Why C++: registered from Python (torch.library.register_autograd, or our lighter form of it), every call of a
// 16-argument op crossed into Python at the Autograd key and back out of it to redispatch: ~35 us of CPU per
// separable_conv2d call on this project's CI machine even when nothing needed a gradient (inference), and an
// autograd.Function in Python for the backward. Here a call that needs no gradient costs one guard and the call.
//
// A graph of the backward (create_graph=True, double backward) is built where it has a formula: the first-order
// backward of scale_shift and batch_norm_finalize then runs as the reference ops' ATen code (reference.cpp,
// differentiable) instead of the backend's one-kernel op. The separable and depthwise backward ops have no
// autograd of their own.
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "ops.h"

namespace xception_ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The op `name` as a typed handle, looked up once (after TORCH_LIBRARY has defined it).
template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Whether a call builds a graph node: grad mode on and some tensor argument requires grad. Otherwise the Autograd
// kernel goes straight to the op below autograd.
bool needs_node(std::initializer_list<const Tensor*> tensors, std::initializer_list<const OptTensor*> optional) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor* t : tensors)
    if (t->requires_grad()) return true;
  for (const OptTensor* t : optional)
    if (t->has_value() && (*t)->defined() && (*t)->requires_grad()) return true;
  return false;
}

std::vector<int64_t> to_vector(IntArrayRef v) { return v.vec(); }
Tensor defined_or_empty(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }
OptTensor optional_of(const Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); }

// ---- separable_conv2d ----
using SeparableSig = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, bool, IntArrayRef, IntArrayRef,
    IntArrayRef, c10::string_view, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, bool,
    const OptTensor&, bool, c10::string_view);
using SeparableBackwardSig = SeparableGrads(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                            const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                            const OptTensor&, bool, IntArrayRef, IntArrayRef, IntArrayRef,
                                            c10::string_view, const OptTensor&, const OptTensor&, const OptTensor&,
                                            const OptTensor&, bool, c10::string_view);

const c10::TypedOperatorHandle<SeparableSig>& separable_op() {
  static const auto op = op_handle<SeparableSig>("xception_ops::separable_conv2d");
  return op;
}

struct SeparableFunction : public torch::autograd::Function<SeparableFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& dw_weight,
                               const Tensor& pw_weight, const OptTensor& in_scale, const OptTensor& in_shift,
                               bool in_relu, IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
                               c10::string_view mid_activation, const OptTensor& mid_scale,
                               const OptTensor& mid_shift, const OptTensor& out_scale, const OptTensor& out_shift,
                               bool out_relu, const OptTensor& residual, bool compute_stats,
                               c10::string_view backend) {
    Tensor out, sum, sumsq;
    {
      const at::AutoDispatchBelowADInplaceOrView below;
      std::tie(out, sum, sumsq) =
          separable_op().call(x, dw_weight, pw_weight, in_scale, in_shift, in_relu, stride, padding, dilation,
                              mid_activation, mid_scale, mid_shift, out_scale, out_shift, out_relu, residual,
                              compute_stats, backend);
    }
    // The output goes to the backward for its ReLU mask, and when the forward had no epilogue at all, since it is
    // then y itself, which a backend can use instead of recomputing it (training: the next layer saves it anyway).
    const bool plain = !out_scale.has_value() && !out_shift.has_value() && !residual.has_value() && !out_relu;
    ctx->save_for_backward({x, dw_weight, pw_weight, defined_or_empty(in_scale), defined_or_empty(in_shift),
                            defined_or_empty(out_scale), defined_or_empty(out_shift),
                            out_relu || plain ? out : Tensor(), defined_or_empty(mid_scale),
                            defined_or_empty(mid_shift)});
    auto& data = ctx->saved_data;
    data["in_relu"] = in_relu;
    data["stride"] = to_vector(stride);
    data["padding"] = to_vector(padding);
    data["dilation"] = to_vector(dilation);
    data["mid"] = std::string(mid_activation);
    data["out_relu"] = out_relu;
    data["compute_stats"] = compute_stats;
    data["backend"] = std::string(backend);
    // residual's position among the tensor inputs (those present), for needs_input_grad
    int64_t residual_input = -1;
    if (residual.has_value()) {
      residual_input = 3;
      for (const OptTensor* t : {&in_scale, &in_shift, &mid_scale, &mid_shift, &out_scale, &out_shift}) {
        residual_input += t->has_value();
      }
    }
    data["residual_input"] = residual_input;
    if (!compute_stats) ctx->mark_non_differentiable({sum, sumsq});  // empty: no statistics asked for
    return {out, sum, sumsq};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = op_handle<SeparableBackwardSig>("xception_ops::separable_conv2d_backward");
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &dw_weight = saved[1], &pw_weight = saved[2], &out = saved[7];
    const OptTensor in_scale = optional_of(saved[3]), in_shift = optional_of(saved[4]);
    const OptTensor out_scale = optional_of(saved[5]), out_shift = optional_of(saved[6]);
    const OptTensor mid_scale = optional_of(saved[8]), mid_shift = optional_of(saved[9]);
    const auto& data = ctx->saved_data;
    const bool out_relu = data.at("out_relu").toBool();
    const bool compute_stats = data.at("compute_stats").toBool();
    const std::string& backend = data.at("backend").toStringRef();  // (cuda_ops_list.h: every backward has a kernel)
    const Tensor& grad_out = grads[0];
    // Without statistics, autograd hands in zero gradients for the two empty outputs: not passed on.
    const OptTensor grad_sum = compute_stats ? optional_of(grads[1]) : OptTensor();
    const OptTensor grad_sumsq = compute_stats ? optional_of(grads[2]) : OptTensor();
    const auto stride = data.at("stride").toIntVector(), padding = data.at("padding").toIntVector(),
               dilation = data.at("dilation").toIntVector();
    auto [grad_x, grad_dw, grad_pw, grad_in_scale, grad_in_shift, grad_mid_scale, grad_mid_shift, grad_out_scale,
          grad_out_shift] =
        backward_op.call(grad_out, grad_sum, grad_sumsq, optional_of(out), x, dw_weight, pw_weight, in_scale,
                         in_shift, data.at("in_relu").toBool(), stride, padding, dilation,
                         data.at("mid").toStringRef(), mid_scale, mid_shift, out_scale, out_shift, out_relu, backend);
    Tensor grad_residual;
    const int64_t residual_input = data.at("residual_input").toInt();
    if (residual_input >= 0 && ctx->needs_input_grad(static_cast<size_t>(residual_input))) {
      grad_residual = out_relu ? grad_out.masked_fill(out <= 0, 0) : grad_out;
    }
    const auto if_given = [](const OptTensor& input, const Tensor& grad) { return input ? grad : Tensor(); };
    return {grad_x,
            grad_dw,
            grad_pw,
            if_given(in_scale, grad_in_scale),
            if_given(in_shift, grad_in_shift),
            Tensor(),
            Tensor(),
            Tensor(),
            Tensor(),
            Tensor(),
            if_given(mid_scale, grad_mid_scale),
            if_given(mid_shift, grad_mid_shift),
            if_given(out_scale, grad_out_scale),
            if_given(out_shift, grad_out_shift),
            Tensor(),
            grad_residual,
            Tensor(),
            Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> separable_conv2d_autograd(
    const Tensor& x, const Tensor& dw_weight, const Tensor& pw_weight, const OptTensor& in_scale,
    const OptTensor& in_shift, bool in_relu, IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
    c10::string_view mid_activation, const OptTensor& mid_scale, const OptTensor& mid_shift,
    const OptTensor& out_scale, const OptTensor& out_shift, bool out_relu, const OptTensor& residual,
    bool compute_stats, c10::string_view backend) {
  if (!needs_node({&x, &dw_weight, &pw_weight},
                  {&in_scale, &in_shift, &mid_scale, &mid_shift, &out_scale, &out_shift, &residual})) {
    const at::AutoDispatchBelowADInplaceOrView below;
    return separable_op().call(x, dw_weight, pw_weight, in_scale, in_shift, in_relu, stride, padding, dilation,
                               mid_activation, mid_scale, mid_shift, out_scale, out_shift, out_relu, residual,
                               compute_stats, backend);
  }
  const variable_list r =
      SeparableFunction::apply(x, dw_weight, pw_weight, in_scale, in_shift, in_relu, stride, padding, dilation,
                               mid_activation, mid_scale, mid_shift, out_scale, out_shift, out_relu, residual,
                               compute_stats, backend);
  return {r[0], r[1], r[2]};
}

// ---- depthwise_conv2d ----
using DepthwiseSig = Tensor(const Tensor&, const Tensor&, const OptTensor&, IntArrayRef, IntArrayRef, IntArrayRef,
                            c10::string_view);
using DepthwiseBackwardSig = Tensor(const Tensor&, const Tensor&, c10::SymIntArrayRef, IntArrayRef, IntArrayRef,
                                    IntArrayRef, c10::string_view);

const c10::TypedOperatorHandle<DepthwiseSig>& depthwise_op() {
  static const auto op = op_handle<DepthwiseSig>("xception_ops::depthwise_conv2d");
  return op;
}

struct DepthwiseFunction : public torch::autograd::Function<DepthwiseFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                        IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation, c10::string_view backend) {
    Tensor out;
    {
      const at::AutoDispatchBelowADInplaceOrView below;
      out = depthwise_op().call(x, weight, bias, stride, padding, dilation, backend);
    }
    ctx->save_for_backward({x, weight});
    auto& data = ctx->saved_data;
    data["has_bias"] = bias.has_value();
    data["stride"] = to_vector(stride);
    data["padding"] = to_vector(padding);
    data["dilation"] = to_vector(dilation);
    data["backend"] = std::string(backend);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto input_op = op_handle<DepthwiseBackwardSig>("xception_ops::depthwise_conv2d_backward_input");
    static const auto weight_op = op_handle<DepthwiseBackwardSig>("xception_ops::depthwise_conv2d_backward_weight");
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &grad_out = grads[0];
    const auto& data = ctx->saved_data;
    const auto stride = data.at("stride").toIntVector(), padding = data.at("padding").toIntVector(),
               dilation = data.at("dilation").toIntVector();
    const std::string& backend = data.at("backend").toStringRef();
    Tensor grad_x, grad_w, grad_b;
    if (ctx->needs_input_grad(0))
      grad_x = input_op.call(grad_out, weight, x.sym_sizes(), stride, padding, dilation, backend);
    if (ctx->needs_input_grad(1))
      grad_w = weight_op.call(grad_out, x, weight.sym_sizes(), stride, padding, dilation, backend);
    if (data.at("has_bias").toBool() && ctx->needs_input_grad(2)) grad_b = grad_out.sum({0, 2, 3});
    return {grad_x, grad_w, grad_b, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor depthwise_conv2d_autograd(const Tensor& x, const Tensor& weight, const OptTensor& bias, IntArrayRef stride,
                                 IntArrayRef padding, IntArrayRef dilation, c10::string_view backend) {
  if (!needs_node({&x, &weight}, {&bias})) {
    const at::AutoDispatchBelowADInplaceOrView below;
    return depthwise_op().call(x, weight, bias, stride, padding, dilation, backend);
  }
  return DepthwiseFunction::apply(x, weight, bias, stride, padding, dilation, backend);
}

// ---- scale_shift ----
using ScaleShiftSig = Tensor(const Tensor&, const Tensor&, const Tensor&, bool, c10::string_view, const OptTensor&);
using ScaleShiftBackwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                 const Tensor&, bool, c10::string_view);

const c10::TypedOperatorHandle<ScaleShiftSig>& scale_shift_op() {
  static const auto op = op_handle<ScaleShiftSig>("xception_ops::scale_shift");
  return op;
}

// With a residual the ReLU (if any) comes after the add: its mask is the output's, saved for the backward, and the
// normalization's backward runs without one; the residual's gradient is the masked gradient itself.
struct ScaleShiftFunction : public torch::autograd::Function<ScaleShiftFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& y, const Tensor& scale, const Tensor& shift, bool relu,
                        c10::string_view backend, const OptTensor& residual) {
    Tensor out;
    {
      const at::AutoDispatchBelowADInplaceOrView below;
      out = scale_shift_op().call(y, scale, shift, relu, backend, residual);
    }
    const bool mask_from_out = relu && residual.has_value();
    ctx->save_for_backward({y, scale, shift, mask_from_out ? out : Tensor()});
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["residual"] = residual.has_value();
    ctx->saved_data["backend"] = std::string(backend);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = op_handle<ScaleShiftBackwardSig>("xception_ops::scale_shift_backward");
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &y = saved[0], &scale = saved[1], &shift = saved[2], &out = saved[3];
    const bool residual = ctx->saved_data.at("residual").toBool();
    // The gradient of round(y * scale + shift): through the ReLU's mask here when a residual came before it.
    Tensor grad = grads[0];
    bool relu = ctx->saved_data.at("relu").toBool();
    if (residual && relu) {
      grad = at::where(out > 0, grad, at::zeros({}, grad.options()));
      relu = false;
    }
    Tensor grad_y, grad_scale, grad_shift;
    if (at::GradMode::is_enabled()) {  // create_graph: the reference op's formulas, differentiable ATen ops
      std::tie(grad_y, grad_scale, grad_shift) = reference::scale_shift_backward(grad, y, scale, shift, relu);
    } else {
      const std::string& backend = ctx->saved_data.at("backend").toStringRef();
      std::tie(grad_y, grad_scale, grad_shift) = backward_op.call(grad, y, scale, shift, relu, backend);
    }
    return {grad_y, grad_scale, grad_shift, Tensor(), Tensor(), residual ? grad : Tensor()};
  }
};

Tensor scale_shift_autograd(const Tensor& y, const Tensor& scale, const Tensor& shift, bool relu,
                            c10::string_view backend, const OptTensor& residual) {
  if (!needs_node({&y, &scale, &shift}, {&residual})) {
    const at::AutoDispatchBelowADInplaceOrView below;
    return scale_shift_op().call(y, scale, shift, relu, backend, residual);
  }
  return ScaleShiftFunction::apply(y, scale, shift, relu, backend, residual);
}

// ---- batch_norm_finalize ----
using FinalizeSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, int64_t,
                                                               const OptTensor&, const OptTensor&, double,
                                                               c10::string_view, const OptTensor&, const OptTensor&,
                                                               const OptTensor&, const OptTensor&, double);
using FinalizeBackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, int64_t, const OptTensor&, double, const OptTensor&, const OptTensor&,
    const OptTensor&, const OptTensor&, c10::string_view);

const c10::TypedOperatorHandle<FinalizeSig>& finalize_op() {
  static const auto op = op_handle<FinalizeSig>("xception_ops::batch_norm_finalize");
  return op;
}

// Calls the op below autograd, then moves the version counters of the tensors it wrote in place as aten's in-place
// ops move them (the CUDA kernel writes through raw pointers, which the dispatcher does not count for a custom op;
// see batch_norm_update_stats_autograd).
std::tuple<Tensor, Tensor, Tensor, Tensor> finalize_below_autograd(const Tensor& sum, const Tensor& sumsq,
                                                                   int64_t count, const OptTensor& weight,
                                                                   const OptTensor& bias, double eps,
                                                                   c10::string_view backend,
                                                                   const RunningStatsUpdate& u) {
  std::tuple<Tensor, Tensor, Tensor, Tensor> out;
  {
    const at::AutoDispatchBelowADInplaceOrView below;
    out = finalize_op().call(sum, sumsq, count, weight, bias, eps, backend, u.running_mean, u.running_var,
                             u.num_batches_tracked, u.pre_bias, u.momentum);
  }
  for (const OptTensor* t : {&u.running_mean, &u.running_var, &u.num_batches_tracked}) {
    if (t->has_value()) torch::autograd::impl::bump_version(**t);
  }
  return out;
}

struct FinalizeFunction : public torch::autograd::Function<FinalizeFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& sum, const Tensor& sumsq, int64_t count,
                               const OptTensor& weight, const OptTensor& bias, double eps,
                               c10::string_view backend, const OptTensor& running_mean,
                               const OptTensor& running_var, const OptTensor& num_batches_tracked,
                               const OptTensor& pre_bias, double momentum) {
    // The mean and variance go to the running statistics alone: their gradients reach the backward as undefined
    // tensors, not as zeros autograd would allocate and fill (two launches per BatchNorm and step).
    ctx->set_materialize_grads(false);
    Tensor scale, shift, mean, var;
    std::tie(scale, shift, mean, var) =
        finalize_below_autograd(sum, sumsq, count, weight, bias, eps, backend,
                                {running_mean, running_var, num_batches_tracked, pre_bias, momentum});
    ctx->save_for_backward({sum, sumsq, defined_or_empty(weight)});
    auto& data = ctx->saved_data;
    data["count"] = count;
    data["eps"] = eps;
    data["backend"] = std::string(backend);
    // The parameters' gradients go back in the parameters' dtypes.
    data["weight_type"] = static_cast<int64_t>(weight ? weight->scalar_type() : at::ScalarType::Undefined);
    data["bias_type"] = static_cast<int64_t>(bias ? bias->scalar_type() : at::ScalarType::Undefined);
    return {scale, shift, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = op_handle<FinalizeBackwardSig>("xception_ops::batch_norm_finalize_backward");
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &sum = saved[0], &sumsq = saved[1], &weight = saved[2];
    const auto& data = ctx->saved_data;
    const int64_t count = data.at("count").toInt();
    const double eps = data.at("eps").toDouble();
    Tensor g_sum, g_sumsq, g_w, g_b;
    if (at::GradMode::is_enabled()) {
      // create_graph: the reference op's formulas, differentiable ATen ops; the weight taken in the statistics'
      // dtype, so that both parameters' gradients come out in it and are rounded once, below, to their own.
      const Tensor w = weight.defined() ? weight.to(sum.scalar_type()) : weight;
      std::tie(g_sum, g_sumsq, g_w, g_b) =
          reference::batch_norm_finalize_backward(sum, sumsq, count, optional_of(w), eps, optional_of(grads[0]),
                                                  optional_of(grads[1]), optional_of(grads[2]), optional_of(grads[3]));
    } else {  // one op (one kernel on "cuda"), instead of ~15 element-wise launches
      const std::string& backend = data.at("backend").toStringRef();
      std::tie(g_sum, g_sumsq, g_w, g_b) =
          backward_op.call(sum, sumsq, count, optional_of(weight), eps, optional_of(grads[0]),
                           optional_of(grads[1]), optional_of(grads[2]), optional_of(grads[3]), backend);
    }
    const auto weight_type = static_cast<at::ScalarType>(data.at("weight_type").toInt());
    const auto bias_type = static_cast<at::ScalarType>(data.at("bias_type").toInt());
    // (.to only where the dtype differs: a same-dtype .to is still a dispatched aten::to)
    if (weight_type == at::ScalarType::Undefined) {
      g_w = Tensor();
    } else if (g_w.scalar_type() != weight_type) {
      g_w = g_w.to(weight_type);
    }
    if (bias_type == at::ScalarType::Undefined) {
      g_b = Tensor();
    } else if (g_b.scalar_type() != bias_type) {
      g_b = g_b.to(bias_type);
    }
    // (The update's tensors get none: a side effect, as batch_norm_update_stats records no node.)
    return {g_sum, g_sumsq, Tensor(), g_w, g_b, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_finalize_autograd(
    const Tensor& sum, const Tensor& sumsq, int64_t count, const OptTensor& weight, const OptTensor& bias, double eps,
    c10::string_view backend, const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& num_batches_tracked, const OptTensor& pre_bias, double momentum) {
  if (!needs_node({&sum, &sumsq}, {&weight, &bias})) {
    return finalize_below_autograd(sum, sumsq, count, weight, bias, eps, backend,
                                   {running_mean, running_var, num_batches_tracked, pre_bias, momentum});
  }
  // pre_bias feeds only the running mean: detached, so that the node has no edge to it.
  const OptTensor plain_pre_bias = pre_bias.has_value() ? OptTensor(pre_bias->detach()) : OptTensor();
  const variable_list r = FinalizeFunction::apply(sum, sumsq, count, weight, bias, eps, backend, running_mean,
                                                  running_var, num_batches_tracked, plain_pre_bias, momentum);
  return {r[0], r[1], r[2], r[3]};
}

// ---- max_pool2d ----
using MaxPoolSig = std::tuple<Tensor, Tensor>(const Tensor&, IntArrayRef, IntArrayRef, IntArrayRef, bool, bool,
                                              c10::string_view, const OptTensor&, const OptTensor&,
                                              const OptTensor&);
using MaxPoolBackwardSig = Tensor(const Tensor&, const Tensor&, c10::SymIntArrayRef, IntArrayRef, IntArrayRef,
                                  IntArrayRef, bool, c10::string_view);
using MaxPoolBnBackwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                const Tensor&, const Tensor&, IntArrayRef,
                                                                IntArrayRef, IntArrayRef, bool, c10::string_view);

const c10::TypedOperatorHandle<MaxPoolSig>& max_pool_op() {
  static const auto op = op_handle<MaxPoolSig>("xception_ops::max_pool2d");
  return op;
}

// Saves the argmax codes (one byte per output) and x's sizes; x itself only with a pending BatchNorm (scale and
// shift), whose backward is scale_shift's after the pool's (max_pool2d_scale_shift_backward: one pass on "cuda" and
// "triton"), which needs x for the gradient of scale. The residual's gradient is grad_out itself.
struct MaxPoolFunction : public torch::autograd::Function<MaxPoolFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, IntArrayRef kernel_size, IntArrayRef stride,
                               IntArrayRef padding, bool ceil_mode, c10::string_view backend, const OptTensor& scale,
                               const OptTensor& shift, const OptTensor& residual) {
    Tensor out, argmax;
    {
      const at::AutoDispatchBelowADInplaceOrView below;
      std::tie(out, argmax) =
          max_pool_op().call(x, kernel_size, stride, padding, ceil_mode, true, backend, scale, shift, residual);
    }
    ctx->mark_non_differentiable({argmax});
    const bool affine = scale.has_value();
    ctx->save_for_backward({argmax, affine ? x : Tensor(), affine ? *scale : Tensor(), affine ? *shift : Tensor()});
    auto& data = ctx->saved_data;
    data["input_size"] = x.sym_sizes().vec();
    data["kernel_size"] = to_vector(kernel_size);
    data["stride"] = to_vector(stride);
    data["padding"] = to_vector(padding);
    data["ceil_mode"] = ceil_mode;
    data["backend"] = std::string(backend);
    data["affine"] = affine;
    data["residual"] = residual.has_value();
    return {out, argmax};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = op_handle<MaxPoolBackwardSig>("xception_ops::max_pool2d_backward");
    static const auto bn_backward_op =
        op_handle<MaxPoolBnBackwardSig>("xception_ops::max_pool2d_scale_shift_backward");
    const auto& data = ctx->saved_data;
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &argmax = saved[0], &x = saved[1], &scale = saved[2], &shift = saved[3];  // x.. with a BatchNorm
    const auto kernel_size = data.at("kernel_size").toIntVector(), stride = data.at("stride").toIntVector();
    const auto padding = data.at("padding").toIntVector();
    const bool ceil_mode = data.at("ceil_mode").toBool();
    const std::string& backend = data.at("backend").toStringRef();
    const bool affine = data.at("affine").toBool();
    Tensor grad_x, grad_scale, grad_shift;
    if (affine && !at::GradMode::is_enabled()) {  // the pool's backward and scale_shift's in one op
      std::tie(grad_x, grad_scale, grad_shift) = bn_backward_op.call(grads[0], argmax, x, scale, shift, kernel_size,
                                                                      stride, padding, ceil_mode, backend);
    } else {
      const auto input_size = data.at("input_size").toSymIntList().vec();
      grad_x = backward_op.call(grads[0], argmax, input_size, kernel_size, stride, padding, ceil_mode, backend);
      // create_graph with a BatchNorm: scale_shift's backward by the reference formulas, differentiable ATen ops.
      if (affine) {
        std::tie(grad_x, grad_scale, grad_shift) =
            reference::scale_shift_backward(grad_x, x, scale, shift, false);
      }
    }
    const Tensor grad_residual = data.at("residual").toBool() ? grads[0] : Tensor();
    return {grad_x, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), grad_scale, grad_shift, grad_residual};
  }
};

// A call that records a node saves the argmax whatever save_argmax says (its backward needs it) and returns it.
std::tuple<Tensor, Tensor> max_pool2d_autograd(const Tensor& x, IntArrayRef kernel_size, IntArrayRef stride,
                                               IntArrayRef padding, bool ceil_mode, bool save_argmax,
                                               c10::string_view backend, const OptTensor& scale,
                                               const OptTensor& shift, const OptTensor& residual) {
  if (!needs_node({&x}, {&scale, &shift, &residual})) {
    const at::AutoDispatchBelowADInplaceOrView below;
    return max_pool_op().call(x, kernel_size, stride, padding, ceil_mode, save_argmax, backend, scale, shift,
                              residual);
  }
  const variable_list r =
      MaxPoolFunction::apply(x, kernel_size, stride, padding, ceil_mode, backend, scale, shift, residual);
  return {r[0], r[1]};
}

// ---- batch_norm_update_stats: no gradient (a side effect on the running statistics) ----
using UpdateStatsSig = void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, int64_t,
                            double, c10::string_view);

// Never records a node, whatever requires grad (callers need neither detach nor no_grad). The buffers' version
// counters move as aten's in-place ops move them: the CUDA kernel writes through raw pointers, which the dispatcher
// does not count for a custom op, and a cache keyed on the versions (SeparableConvBN's folded BatchNorm in
// inference) would otherwise keep the statistics from before a training-mode pass (swa_utils.update_bn's).
void batch_norm_update_stats_autograd(const Tensor& running_mean, const Tensor& running_var, const Tensor& mean,
                                      const Tensor& var, const OptTensor& pre_bias, int64_t count, double momentum,
                                      c10::string_view backend) {
  static const auto op = op_handle<UpdateStatsSig>("xception_ops::batch_norm_update_stats");
  {
    const at::AutoDispatchBelowADInplaceOrView below;
    op.call(running_mean, running_var, mean, var, pre_bias, count, momentum, backend);
  }
  torch::autograd::impl::bump_version(running_mean);
  torch::autograd::impl::bump_version(running_var);
}

}  // namespace

TORCH_LIBRARY_IMPL(xception_ops, Autograd, m) {
  m.impl("batch_norm_update_stats", &batch_norm_update_stats_autograd);
  m.impl("separable_conv2d", &separable_conv2d_autograd);
  m.impl("depthwise_conv2d", &depthwise_conv2d_autograd);
  m.impl("scale_shift", &scale_shift_autograd);
  m.impl("batch_norm_finalize", &batch_norm_finalize_autograd);
  m.impl("max_pool2d", &max_pool2d_autograd);
}

}  // namespace xception_ops
