// The "cuda" backend's separable conv backward (the contract of reference::separable_conv2d_backward).
//
//   y          the forward's output when it had no epilogue, else recomputed by the forward (separable_conv2d)
//              with the epilogue off (only where out_scale or grad_sumsq need it)
//   grad_y     grad_out through the epilogue's ReLU, folded BatchNorm and the statistics' gradients, in one
//              pass that also sums the gradients of out_scale / out_shift (fixed-order reductions throughout)
//   mid        the depthwise result, recomputed from x (depthwise_stage, shared with the staged forward): the
//              forward saves only x, and this copy lives only until grad_pw is formed
//   grad_pw    grad_y^T mid, grad_mid = grad_y W: matrix products over the pixels (cuBLAS; on Hopper's wgmma
//              kernels with XCEPTION_OPS_SEPARABLE_STAGED_GEMM=wgmma)
//   mid stage  grad_pre = grad_mid through the mid activation's mask (or elu's slope), from pre recomputed from d;
//              the sums of grad_pre d and grad_pre for mid_scale / mid_shift (ATen reductions: a fixed order), and
//              grad_d = round(grad_pre mid_scale) on the prologue's elementwise kernel
//   grad_dw, grad of the depthwise input   the depthwise backward kernels (csrc/kernels/depthwise.cuh), from grad_d
//   prologue   its backward (ReLU mask, scale, the sums for in_scale / in_shift): applied by the depthwise input
//              gradient's strip kernel as it writes, or else in one pass of its own
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/elu.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/hardswish_backward.h>
#include <ATen/ops/logical_and.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/backend_common.h"
#include "cuda_backend.h"
#include "kernels/pointwise_gemm_params.h"
#include "kernels/separable_params.h"

namespace xception_ops::cuda {
namespace {

constexpr const char* kBackward = "xception_ops.separable_conv2d_backward";

}  // namespace

SeparableGrads separable_conv2d_backward(
    const Tensor& grad_out, const OptTensor& grad_sum, const OptTensor& grad_sumsq, const OptTensor& out,
    const Tensor& x, const Tensor& dw_weight, const Tensor& pw_weight, const SeparableOptions& opt,
    const Conv2dGeometry& g) {
  XO_CHECK_VALUE(x.is_cuda(), kBackward, ": backend 'cuda' needs CUDA tensors, but x is on ", x.device());
  const DType dtype = kernel_dtype(kBackward, x);
  check_operand(kBackward, "grad_out", grad_out, x, "x");
  check_operand(kBackward, "dw_weight", dw_weight, x, "x");
  check_operand(kBackward, "pw_weight", pw_weight, x, "x");
  if (out.has_value()) check_operand(kBackward, "out", *out, x, "x");
  for (const OptTensor* v : {&grad_sum, &grad_sumsq, &opt.in_scale, &opt.in_shift, &opt.mid_scale, &opt.mid_shift,
                             &opt.out_scale, &opt.out_shift}) {
    if (v->has_value()) {
      XO_CHECK_VALUE((*v)->is_cuda() && (*v)->device() == x.device(), kBackward,
                     ": the per-channel vectors must be on x's device ", x.device(), ", got ", (*v)->device());
    }
  }
  const int64_t pixels = g.batch * g.out_h * g.out_w, K = g.dw_channels(), C = g.out_channels;
  if (pixels == 0) {
    return reference::separable_conv2d_backward(grad_out, grad_sum, grad_sumsq, out, x, dw_weight, pw_weight, opt,
                                                g);
  }
  XO_CHECK_VALUE(K < (int64_t{1} << 31), kBackward, ": more than 2^31 - 1 depthwise channels");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::MemoryFormat fmt = output_memory_format(x);

  // The epilogue's backward: out = relu?(y * out_scale + out_shift (+ residual)). Without any epilogue, `out` (when
  // given) is y itself: callers pass it then, or with out_relu (see the schema in registration.cpp).
  const bool need_y = opt.out_scale.has_value() || grad_sumsq.has_value();
  const bool out_is_y = out.has_value() && !opt.out_relu && !opt.out_scale.has_value() && !opt.out_shift.has_value();
  Tensor y;
  if (need_y && out_is_y) {
    y = *out;
  } else if (need_y) {
    SeparableOptions plain;  // the prologue and the mid stage only
    plain.in_scale = opt.in_scale;
    plain.in_shift = opt.in_shift;
    plain.in_relu = opt.in_relu;
    plain.mid = opt.mid;
    plain.mid_scale = opt.mid_scale;
    plain.mid_shift = opt.mid_shift;
    y = std::get<0>(separable_conv2d(x, dw_weight, pw_weight, plain, g));
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Tensor keep[3];  // the float32 copies of the per-channel vectors
  // grad_y, pixel-major [pixels][C], and the epilogue's sums (of grad_z * y and grad_z) in one pass.
  const Tensor gy2 = at::empty({pixels, C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  ChannelPassParams e;
  e.g = g;
  e.channels = C, e.h = g.out_h, e.w = g.out_w;
  e.grad = view_of(grad_out);
  if (opt.out_relu) e.act = view_of(*out);
  if (need_y) e.y = view_of(y);
  e.grad_y = gy2.data_ptr();
  e.scale = float_vector(opt.out_scale, keep[0]);
  e.vec_a = float_vector(grad_sum, keep[1]);
  e.vec_b = float_vector(grad_sumsq, keep[2]);
  e.relu = opt.out_relu;
  check_launch(kBackward, plan_channel_pass(e));
  const int64_t out_tiles = channel_pass_tiles(e);
  Tensor workspace = at::empty({reduce_rows_workspace(out_tiles, 2 * C)}, x.options().dtype(at::kFloat));
  e.partial = workspace.data_ptr<float>();
  check_launch(kBackward, launch_channel_pass(e, dtype, ChannelPass::GradY, stream));
  const Tensor empty = at::empty({0}, x.options().dtype(at::kFloat));
  // The per-channel gradients in buffers of their own: an op's outputs must not alias one another.
  Tensor grad_out_scale = empty, grad_out_shift = empty;
  if (opt.out_scale.has_value() || opt.out_shift.has_value()) {
    const auto sums_options = x.options().dtype(at::kFloat);
    Tensor sum_gy = at::empty({C}, sums_options), sum_g = at::empty({C}, sums_options);
    check_launch(kBackward, launch_reduce_rows(e.partial, out_tiles, 2 * C, C, sum_gy.data_ptr<float>(),
                                               sum_g.data_ptr<float>(), stream));
    if (opt.out_scale.has_value()) grad_out_scale = in_type(sum_gy, opt.out_scale->scalar_type());
    if (opt.out_shift.has_value()) grad_out_shift = in_type(sum_g, opt.out_shift->scalar_type());
  }

  // The depthwise stage's result recomputed (the forward kept only x), the mid stage rounded as the forward rounds
  // it; its input (x, or the prologue written out where the depthwise kernels cannot apply it on load) is
  // what the weight gradient reads.
  Conv2dGeometry gd = g;
  gd.out_channels = K;
  const bool prologue = opt.in_scale.has_value() || opt.in_shift.has_value() || opt.in_relu;
  DepthwiseStage stage = depthwise_stage(x, dw_weight, opt, g, fmt, /*need_d=*/true);
  Tensor d = std::move(stage.d), mid = std::move(stage.mid);

  // grad_pw = grad_y^T mid over the pixels: one matrix product on cuBLAS, float32 accumulation and (16-bit
  // dtypes) a float32 result, rounded once. It replaced a kernel that recomputed the depthwise result per tile of
  // output channels: 1.16 ms against ~0.1 for this on 728->728 @19^2 (H100, session 4).
  // With XCEPTION_OPS_SEPARABLE_STAGED_GEMM=wgmma on Hopper, split over the pixels on the wgmma kernel instead
  // (pointwise_wgrad_kernel: float32 partial products, summed in split order, rounded once): the same contract.
  bool wgmma = wgmma_gemm_requested() && dtype != DType::Float32 && fmt == at::MemoryFormat::ChannelsLast &&
               C <= INT32_MAX && K <= INT32_MAX;
  DeviceCaps caps;
  if (wgmma) {
    check_launch(kBackward, current_device_caps(&caps));
    wgmma = pointwise_wgmma_available(caps.major, caps.minor);
  }
  Tensor grad_pw;
  if (wgmma && mid.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    PointwiseWgradParams w;
    w.g = gy2.data_ptr();
    w.ldg = C;
    w.a = mid.data_ptr();
    w.lda = K;
    w.pixels = pixels;
    w.rows = static_cast<int32_t>(C);
    w.cols = static_cast<int32_t>(K);
    pointwise_wgrad_plan(w, caps.sms);
    Tensor partial = at::empty({reduce_rows_workspace(w.splits, C * K)}, x.options().dtype(at::kFloat));
    w.partial = partial.data_ptr<float>();
    if (pointwise_wgrad_ok(w)) {
      check_launch(kBackward, launch_pointwise_wgrad(w, dtype, stream));
      Tensor sum = at::empty({C, K, 1, 1}, x.options().dtype(at::kFloat));
      check_launch(kBackward, launch_reduce_rows(w.partial, w.splits, C * K, C * K, sum.data_ptr<float>(), nullptr,
                                                 stream));
      grad_pw = sum.to(x.scalar_type());
    }
  }
  if (!grad_pw.defined()) {
    const Tensor mid2 = mid.permute({0, 2, 3, 1}).reshape({pixels, K});  // a view where mid is channels_last
    grad_pw = (x.scalar_type() == at::kFloat ? at::mm(gy2.t(), mid2)
                                             : at::mm(gy2.t(), mid2, at::kFloat).to(x.scalar_type()))
                  .view({C, K, 1, 1});
  }
  // mid is released before grad_mid is allocated; d too unless the mid stage's backward needs it (the mask's pre,
  // or mid_scale's gradient).
  mid = Tensor();
  if (opt.mid == MidActivation::None && !opt.mid_scale.has_value()) d = Tensor();

  // grad_mid = grad_y W: [pixels, K], channels fastest, seen as an (N, K, OH, OW) channels_last tensor. On cuBLAS,
  // or with XCEPTION_OPS_SEPARABLE_STAGED_GEMM=wgmma on Hopper's GEMM (the weight transposed to [K][C], K-major for
  // it: 2 bytes per weight, once per backward).
  const Tensor pw2 = pw_weight.contiguous().view({C, K});
  Tensor grad_mid;
  if (wgmma) {
    const Tensor wt = pw2.t().contiguous();
    Tensor result = at::empty({g.batch, K, g.out_h, g.out_w}, x.options().memory_format(fmt));
    PointwiseGemmParams p;
    p.a = gy2.data_ptr();
    p.lda = C;
    p.w = wt.data_ptr();
    p.out = result.data_ptr();
    p.m = pixels;
    p.n = static_cast<int32_t>(K);
    p.k = static_cast<int32_t>(C);
    if (pointwise_gemm_ok(p)) {
      check_launch(kBackward, launch_pointwise_wgmma(p, dtype, wgmma_gemm_config(kBackward, p.m, p.n), stream));
      grad_mid = result;
    }
  }
  if (!grad_mid.defined()) {
    grad_mid = at::mm(gy2, pw2).view({g.batch, g.out_h, g.out_w, K}).permute({0, 3, 1, 2}).contiguous(fmt);
  }
  // The mid stage's backward: mid = act(pre), pre = round(d * mid_scale + mid_shift) (d itself without them).
  Tensor grad_pre = grad_mid;
  if (opt.mid != MidActivation::None) {
    const Tensor pre = mid_affine(kBackward, d, opt.mid_scale, opt.mid_shift, false, g, fmt);  // as the forward's
    const Tensor zero = at::zeros({}, grad_mid.options());
    switch (opt.mid) {
      case MidActivation::Relu: grad_pre = at::where(pre > 0, grad_mid, zero); break;
      case MidActivation::Relu6: grad_pre = at::where(at::logical_and(pre > 0, pre < 6), grad_mid, zero); break;
      case MidActivation::Elu: grad_pre = at::where(pre > 0, grad_mid, grad_mid * (at::elu(pre) + 1)); break;
      case MidActivation::Hardswish: grad_pre = at::hardswish_backward(grad_mid, pre); break;
      case MidActivation::None: break;
    }
  }
  grad_mid = Tensor();
  // The affine's gradients: per-channel sums in float32 (where a product of two 16-bit values is exact).
  Tensor grad_mid_scale = empty, grad_mid_shift = empty;
  if (opt.mid_scale.has_value()) {
    const Tensor grad_pre_d = x.scalar_type() == at::kFloat ? grad_pre * d : grad_pre.to(at::kFloat).mul_(d);
    grad_mid_scale = in_type(grad_pre_d.sum({0, 2, 3}, false, at::kFloat), opt.mid_scale->scalar_type());
  }
  if (opt.mid_shift.has_value()) {
    grad_mid_shift = in_type(grad_pre.sum({0, 2, 3}, false, at::kFloat), opt.mid_shift->scalar_type());
  }
  d = Tensor();
  // grad_d = round(grad_pre * mid_scale): the depthwise stage's output gradient.
  Tensor grad_dw_out = opt.mid_scale.has_value()
                           ? mid_affine(kBackward, grad_pre, opt.mid_scale, c10::nullopt, false, g, fmt)
                           : grad_pre.contiguous(fmt);
  grad_pre = Tensor();
  const Tensor grad_dw = depthwise_conv2d_backward_weight(grad_dw_out, stage.input, gd, stage.load_scale,
                                                             stage.load_shift, stage.load_relu);
  // The depthwise input gradient and the prologue's backward (the ReLU mask, in_scale, and the sums for in_scale /
  // in_shift): in one pass where the input gradient's strip kernels take it, else in a pass of their own over it.
  const int64_t ci = g.in_channels;
  const bool in_sums = opt.in_scale.has_value() || opt.in_shift.has_value();
  Tensor sum_gx, sum_g;  // the gradients of in_scale and in_shift, in float32
  if (in_sums) {
    sum_gx = at::empty({ci}, x.options().dtype(at::kFloat));
    sum_g = at::empty({ci}, x.options().dtype(at::kFloat));
  }
  float* gx_ptr = in_sums ? sum_gx.data_ptr<float>() : nullptr;
  float* g_ptr = in_sums ? sum_g.data_ptr<float>() : nullptr;
  Tensor grad_x;
  if (prologue) {
    grad_x = depthwise_conv2d_backward_input_through_prologue(grad_dw_out, dw_weight, gd, fmt, x, stage.in_scale,
                                                              stage.in_shift, opt.in_relu, gx_ptr, g_ptr);
  }
  if (!grad_x.defined()) {
    const Tensor grad_input = depthwise_conv2d_backward_input(grad_dw_out, dw_weight, gd, fmt);
    grad_x = grad_input;
    if (prologue) {
      grad_x = at::empty(x.sizes(), x.options().memory_format(fmt));
      ChannelPassParams r;
      r.g = g;
      r.channels = ci, r.h = g.in_h, r.w = g.in_w;
      r.grad = view_of(grad_input);
      r.act = view_of(x);
      r.result = view_of(grad_x);
      r.scale = stage.in_scale;
      r.vec_a = stage.in_shift;
      r.relu = opt.in_relu;
      check_launch(kBackward, plan_channel_pass(r));
      const int64_t in_tiles = channel_pass_tiles(r);
      Tensor ws = at::empty({reduce_rows_workspace(in_tiles, 2 * ci)}, x.options().dtype(at::kFloat));
      r.partial = ws.data_ptr<float>();
      check_launch(kBackward, launch_channel_pass(r, dtype, ChannelPass::Prologue, stream));
      if (in_sums) {
        check_launch(kBackward, launch_reduce_rows(r.partial, in_tiles, 2 * ci, ci, gx_ptr, g_ptr, stream));
      }
    }
  }
  Tensor grad_in_scale = empty, grad_in_shift = empty;
  if (opt.in_scale.has_value()) grad_in_scale = in_type(sum_gx, opt.in_scale->scalar_type());
  if (opt.in_shift.has_value()) grad_in_shift = in_type(sum_g, opt.in_shift->scalar_type());
  return {grad_x.contiguous(fmt), grad_dw.contiguous(), grad_pw.contiguous(), grad_in_scale, grad_in_shift,
          grad_mid_scale, grad_mid_shift, grad_out_scale, grad_out_shift};
}

}  // namespace xception_ops::cuda
