// The "cuda" backend's separable forward: checks, device guard, allocation, and one of two algorithms
// (cuda_backend.h): the fused kernel (its GEMM mode and launch plan; the kernel and its launcher are torch-free:
// kernels/separable.cuh, cuda/separable_launch.cu), or the staged form (the depthwise kernels, cuBLAS, and the
// epilogue pass of kernels/separable_backward.cuh); on Hopper, opt-in, the wgmma kernels (kernels/pointwise_gemm.cuh,
// kernels/separable_wgmma.cuh). Also the depthwise stage the backward shares.
//
// The router in registration.cpp has already checked shapes, dtypes and devices (check_separable); the checks
// here repeat the ones a launch depends on, so this function is safe on its own.
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/clamp.h>
#include <ATen/ops/elu.h>
#include <ATen/ops/hardswish.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/relu.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cuda/backend_common.h"
#include "cuda_backend.h"
#include "kernels/pointwise_gemm_params.h"
#include "kernels/separable_params.h"

namespace xception_ops::cuda {
namespace {

constexpr const char* kForward = "xception_ops.separable_conv2d";

// PyTorch's cuDNN TF32 flag, which its convolutions follow (torch.backends.cudnn.allow_tf32). Asked without an
// operator's name, PyTorch (>= 2.9) raises where the per-operator flags (torch.backends.cudnn.conv / .rnn
// .fp32_precision) differ, and the name is spelled differently across its versions (a string, then an enum): then
// no TF32, the exact product, rather than an error from a convolution.
bool cudnn_allows_tf32() {
  try {
    return at::globalContext().allowTF32CuDNN();
  } catch (const c10::Error&) {
    return false;
  }
}

// Implementation choices for comparing kernel versions on one build (benchmarks/RESULTS.md), read once:
// XCEPTION_OPS_SEPARABLE_GEMM=wmma runs the fp16 / bf16 GEMM through wmma instead of ldmatrix + mma.sync;
// XCEPTION_OPS_SEPARABLE_TILES=square takes 8 x 8 pixel tiles with a staged input window where they apply,
// instead of 64 consecutive pixels (slower on the H100 in session 3: 24.7 against 20.0 ms over Xception's layers);
// =runs takes run tiles where they apply (separable_run_tiles_ok: a window of input rows slid down runs of 4
// pixels; written in session 7 without a GPU, not yet measured, hence not the default).
bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}
const bool kWmma16 = env_is("XCEPTION_OPS_SEPARABLE_GEMM", "wmma");
const bool kSquareTiles = env_is("XCEPTION_OPS_SEPARABLE_TILES", "square");
const bool kRunTiles = env_is("XCEPTION_OPS_SEPARABLE_TILES", "runs");
// XCEPTION_OPS_SEPARABLE_FORWARD=fused takes the fused kernel instead of the staged form (cuda_backend.h). The
// staged form is the default since session 8: on the H100 (session 6) the fused kernel took 0.21-0.24 ms at
// 728 -> 728 @19^2 where its parts, timed on their own, take ~0.02 (depthwise), ~0.03 (cuBLAS) and ~0.02 (one
// pass): its depthwise stage waits on memory with 8 warps per SM.
const bool kFusedForward = env_is("XCEPTION_OPS_SEPARABLE_FORWARD", "fused");
// The staged form's product: by default by separable_staged_fused_gemm (kernels/separable_params.h); with
// XCEPTION_OPS_SEPARABLE_STAGED_GEMM=cublas on cuBLAS followed by the epilogue pass everywhere, with =fused on
// the fused kernel's GEMM and epilogue reading the depthwise result wherever that applies.
const bool kStagedCublas = env_is("XCEPTION_OPS_SEPARABLE_STAGED_GEMM", "cublas");
const bool kStagedFused = env_is("XCEPTION_OPS_SEPARABLE_STAGED_GEMM", "fused");

// The fused kernel's launch into `out` (allocated in `fmt`), the statistics into sum / sumsq. With `a_source` (the
// staged form's depthwise result, mid(dw(prologue(x))), channels-last) the kernel reads its depthwise tiles from
// there instead of computing them: the prologue, the mid affine and the mid activation are in it already. Returns
// false, having launched nothing, where the plan does not fit this GPU's shared memory.
bool fused_launch(const Tensor& x, const Tensor& dw_weight, const Tensor& pw_weight, const SeparableOptions& opt,
                  const Conv2dGeometry& g, at::MemoryFormat fmt, DType dtype, PointwiseMath math,
                  const DeviceCaps& caps, const Tensor& out, const Tensor* a_source, Tensor& sum, Tensor& sumsq) {
  SeparableParams p;
  p.g = g;
  p.x = view_of(x);
  p.out = view_of(out);
  if (opt.residual.has_value()) p.residual = view_of(*opt.residual);
  const Tensor dw = dw_weight.contiguous(), pw = pw_weight.contiguous();
  p.dw_weight = dw.data_ptr();
  p.pw_weight = pw.data_ptr();
  Tensor keep[6];
  if (a_source != nullptr) {
    p.a_source = a_source->data_ptr();
  } else {
    p.in_scale = float_vector(opt.in_scale, keep[0]);
    p.in_shift = float_vector(opt.in_shift, keep[1]);
    p.in_relu = opt.in_relu;
    p.mid = static_cast<int32_t>(opt.mid);
    p.mid_scale = float_vector(opt.mid_scale, keep[4]);
    p.mid_shift = float_vector(opt.mid_shift, keep[5]);
  }
  p.out_scale = float_vector(opt.out_scale, keep[2]);
  p.out_shift = float_vector(opt.out_shift, keep[3]);
  p.out_relu = opt.out_relu;
  // A tensor whose channels are fastest in memory is read / written channel-fastest across threads.
  p.x_channels_last = x.size(1) > 1 && x.stride(1) == 1;
  p.out_channels_last = fmt == at::MemoryFormat::ChannelsLast;
  p.square_tiles = a_source == nullptr && separable_spatial_tiles(g) && kSquareTiles;
  if (!separable_plan(p, math, static_cast<int>(x.element_size()), caps.smem_optin)) return false;
  p.run_tiles = a_source == nullptr && kRunTiles && separable_run_tiles_ok(p, math);

  Tensor workspace;
  if (opt.compute_stats) {
    workspace = at::empty({static_cast<int64_t>(separable_stats_workspace_bytes(p) / sizeof(float))},
                          x.options().dtype(at::kFloat));
    p.stats_partial = workspace.data_ptr<float>();
  }
  const int groups = separable_channel_groups(p, caps.sms);
  check_launch(kForward, launch_separable_forward(p, dtype, math, groups,
                                                  opt.compute_stats ? sum.data_ptr<float>() : nullptr,
                                                  opt.compute_stats ? sumsq.data_ptr<float>() : nullptr,
                                                  c10::cuda::getCurrentCUDAStream()));
  return true;
}

// The product's side of the wgmma kernels' params from the op's options: out (channels-last), the epilogue (the
// float32 vectors kept alive by `keep`) and the sizes. False where the residual is not channels-last contiguous or
// the channels do not fit 32 bits: the kernels read it as [pixels][C].
bool set_pointwise_epilogue(PointwiseGemmParams& p, const SeparableOptions& opt, const Conv2dGeometry& g,
                            const Tensor& out, Tensor (&keep)[2]) {
  if (g.out_channels > INT32_MAX || g.dw_channels() > INT32_MAX) return false;
  if (opt.residual.has_value() && !opt.residual->is_contiguous(at::MemoryFormat::ChannelsLast)) return false;
  p.out = out.data_ptr();
  if (opt.residual.has_value()) p.residual = opt.residual->data_ptr();
  p.scale = float_vector(opt.out_scale, keep[0]);
  p.shift = float_vector(opt.out_shift, keep[1]);
  p.relu = opt.out_relu;
  p.m = g.batch * g.out_h * g.out_w;
  p.n = static_cast<int32_t>(g.out_channels);
  p.k = static_cast<int32_t>(g.dw_channels());
  return true;
}

// Runs `launch` (a wgmma kernel writing p.stats_partial where it is set), with a workspace of one partial row per
// pixel tile where opt.compute_stats, then their fixed-order reduction into sum / sumsq.
template <typename Launch>
void launch_with_statistics(PointwiseGemmParams& p, const SeparableOptions& opt, const at::TensorOptions& like,
                            Tensor& sum, Tensor& sumsq, Launch launch) {
  const int64_t tiles = pointwise_m_tiles(p), C = p.n;
  Tensor workspace;
  if (opt.compute_stats) {
    workspace = at::empty({reduce_rows_workspace(tiles, 2 * C)}, like.dtype(at::kFloat));
    p.stats_partial = workspace.data_ptr<float>();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_launch(kForward, launch(stream));
  if (opt.compute_stats) {
    check_launch(kForward, launch_reduce_rows(p.stats_partial, tiles, 2 * C, C, sum.data_ptr<float>(),
                                              sumsq.data_ptr<float>(), stream));
  }
}

// Hopper's GEMM for the staged form: out (allocated channels-last) = epilogue(mid W^T), the statistics into sum /
// sumsq. Returns false, having launched nothing, where its conditions do not hold (pointwise_gemm_ok).
bool wgmma_launch(const Tensor& mid, const Tensor& pw_weight, const SeparableOptions& opt, const Conv2dGeometry& g,
                  DType dtype, const Tensor& out, Tensor& sum, Tensor& sumsq) {
  PointwiseGemmParams p;
  Tensor keep[2];
  if (!set_pointwise_epilogue(p, opt, g, out, keep)) return false;
  const Tensor pw = pw_weight.contiguous();
  p.a = mid.data_ptr();
  p.lda = p.k;
  p.w = pw.data_ptr();
  if (!pointwise_gemm_ok(p)) return false;
  launch_with_statistics(p, opt, mid.options(), sum, sumsq, [&](cudaStream_t stream) {
    return launch_pointwise_wgmma(p, dtype, wgmma_gemm_config(kForward, p.m, p.n), stream);
  });
  return true;
}

// XCEPTION_OPS_SEPARABLE_FORWARD=wgmma (read at each call): the fused forward on Hopper's wgmma
// (kernels/separable_wgmma.cuh) where it applies: 16-bit channels-last x (contiguous), 3x3 at stride 1, dilation
// 1, depth multiplier 1, at most 128 depthwise and 256 output channels, multiples of 8. Opt-in until timed on a GPU.
bool fused_wgmma_requested() { return env_is("XCEPTION_OPS_SEPARABLE_FORWARD", "wgmma"); }

// Launches it into a new channels-last output, the statistics into sum / sumsq; an undefined tensor, having
// launched nothing, where it does not apply.
Tensor fused_wgmma_forward(const Tensor& x, const Tensor& dw_weight, const Tensor& pw_weight,
                           const SeparableOptions& opt, const Conv2dGeometry& g, DType dtype, const DeviceCaps& caps,
                           Tensor& sum, Tensor& sumsq) {
  const bool shape_ok = g.kernel_h == 3 && g.kernel_w == 3 && g.stride_h == 1 && g.stride_w == 1 &&
                        g.dilation_h == 1 && g.dilation_w == 1 && g.depth_multiplier == 1;
  if (!shape_ok || dtype == DType::Float32 || !x.is_contiguous(at::MemoryFormat::ChannelsLast) ||
      !pointwise_wgmma_available(caps.major, caps.minor) || g.out_channels > 256 || g.in_channels > 128) {
    return Tensor();
  }
  Tensor out = at::empty({g.batch, g.out_channels, g.out_h, g.out_w},
                         x.options().memory_format(at::MemoryFormat::ChannelsLast));
  SeparableWgmmaParams p;
  Tensor keep_out[2], keep_in[2], keep_mid[2];
  if (!set_pointwise_epilogue(p.pw, opt, g, out, keep_out)) return Tensor();
  const Tensor dw = dw_weight.contiguous(), pw = pw_weight.contiguous();
  p.pw.w = pw.data_ptr();
  p.x = x.data_ptr();
  p.dw_weight = dw.data_ptr();
  p.in_scale = float_vector(opt.in_scale, keep_in[0]);
  p.in_shift = float_vector(opt.in_shift, keep_in[1]);
  p.in_relu = opt.in_relu;
  p.mid = static_cast<int32_t>(opt.mid);
  p.mid_scale = float_vector(opt.mid_scale, keep_mid[0]);
  p.mid_shift = float_vector(opt.mid_shift, keep_mid[1]);
  p.in_h = g.in_h, p.in_w = g.in_w, p.out_h = g.out_h, p.out_w = g.out_w;
  p.pad_top = static_cast<int32_t>(g.pad_top), p.pad_left = static_cast<int32_t>(g.pad_left);
  if (!separable_wgmma_ok(p)) return Tensor();
  launch_with_statistics(p.pw, opt, x.options(), sum, sumsq,
                         [&](cudaStream_t stream) { return launch_separable_wgmma(p, dtype, caps.sms, stream); });
  return out;
}

// The staged forward: the depthwise kernels write mid(dw(prologue(x))), then either
//   - with XCEPTION_OPS_SEPARABLE_STAGED_GEMM=wgmma on Hopper, one wgmma GEMM with the epilogue and the statistics
//     (wgmma_launch); or
//   - the fused kernel reads its depthwise tiles from there (a_source) and runs its GEMM (mma.sync) and epilogue,
//     statistics included: fp16 / bf16 on sm_80+, channels-last, up to 128 depthwise channels
//     (separable_staged_fused_gemm); or
//   - one cuBLAS product (float32 accumulation, rounded to the dtype once, as the fused kernel rounds y), then the
//     epilogue and the statistics in one pass over y, written over y itself.
// Checks done by the caller.
std::tuple<Tensor, Tensor, Tensor> staged_forward(const Tensor& x, const Tensor& dw_weight, const Tensor& pw_weight,
                                                  const SeparableOptions& opt, const Conv2dGeometry& g,
                                                  at::MemoryFormat fmt, DType dtype, Tensor sum, Tensor sumsq) {
  const int64_t pixels = g.batch * g.out_h * g.out_w, K = g.dw_channels(), C = g.out_channels;
  DeviceCaps caps;
  check_launch(kForward, current_device_caps(&caps));
  const PointwiseMath math = separable_math(dtype, caps.major, cudnn_allows_tf32());
  Tensor y;
  {
    // mid only (no d): the depthwise kernels apply the mid stage as they store it.
    const DepthwiseStage stage = depthwise_stage(x, dw_weight, opt, g, fmt, /*need_d=*/false);
    if (wgmma_gemm_requested() && pointwise_wgmma_available(caps.major, caps.minor) &&
        math == PointwiseMath::TensorCore && fmt == at::MemoryFormat::ChannelsLast &&
        stage.mid.is_contiguous(at::MemoryFormat::ChannelsLast) && pixels > 0) {
      Tensor out = at::empty({g.batch, C, g.out_h, g.out_w}, x.options().memory_format(fmt));
      if (wgmma_launch(stage.mid, pw_weight, opt, g, dtype, out, sum, sumsq)) return {out, sum, sumsq};
    }
    const bool fused_gemm = kStagedFused || (!kStagedCublas && separable_staged_fused_gemm(g));
    if (fused_gemm && math == PointwiseMath::TensorCore && fmt == at::MemoryFormat::ChannelsLast &&
        stage.mid.is_contiguous(at::MemoryFormat::ChannelsLast) && pixels > 0) {
      Tensor out = at::empty({g.batch, C, g.out_h, g.out_w}, x.options().memory_format(fmt));
      if (fused_launch(x, dw_weight, pw_weight, opt, g, fmt, dtype, math, caps, out, &stage.mid, sum, sumsq)) {
        return {out, sum, sumsq};
      }
    }
    const Tensor pw2 = pw_weight.contiguous().view({C, K});
    if (fmt == at::MemoryFormat::ChannelsLast) {  // [pixels, K] x [K, C]: y comes out channels-last
      const Tensor mid2 = stage.mid.permute({0, 2, 3, 1}).reshape({pixels, K});  // a view
      y = at::mm(mid2, pw2.t()).view({g.batch, g.out_h, g.out_w, C}).permute({0, 3, 1, 2});
    } else {  // per image [C, K] x [K, OH * OW]: y comes out NCHW
      const Tensor mid3 = stage.mid.reshape({g.batch, K, g.out_h * g.out_w});
      y = at::bmm(pw2.unsqueeze(0).expand({g.batch, C, K}), mid3).view({g.batch, C, g.out_h, g.out_w});
    }
  }  // the depthwise result is released here
  const bool epilogue = opt.out_scale.has_value() || opt.out_shift.has_value() || opt.residual.has_value() ||
                        opt.out_relu;
  if (!epilogue && !opt.compute_stats) return {y, sum, sumsq};
  ChannelPassParams e;
  e.g = g;
  e.channels = C, e.h = g.out_h, e.w = g.out_w;
  e.y = view_of(y);
  if (epilogue) e.result = view_of(y);  // in place: each element read, then written, by one thread
  if (opt.residual.has_value()) e.act = view_of(*opt.residual);
  Tensor keep[2];
  e.scale = float_vector(opt.out_scale, keep[0]);
  e.vec_a = float_vector(opt.out_shift, keep[1]);
  e.relu = opt.out_relu;
  check_launch(kForward, plan_channel_pass(e));
  const int64_t tiles = channel_pass_tiles(e);
  Tensor workspace;
  if (opt.compute_stats && tiles > 0) {
    workspace = at::empty({reduce_rows_workspace(tiles, 2 * C)}, x.options().dtype(at::kFloat));
    e.partial = workspace.data_ptr<float>();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_launch(kForward, launch_channel_pass(e, dtype, ChannelPass::Epilogue, stream));
  if (opt.compute_stats && tiles > 0) {
    check_launch(kForward, launch_reduce_rows(e.partial, tiles, 2 * C, C, sum.data_ptr<float>(),
                                              sumsq.data_ptr<float>(), stream));
  } else if (opt.compute_stats) {  // no pixels: the sums are zeros
    sum.zero_();
    sumsq.zero_();
  }
  return {y, sum, sumsq};
}

}  // namespace

// XCEPTION_OPS_SEPARABLE_STAGED_GEMM=wgmma: the staged forward's product (and the backward's grad_mid) on Hopper's
// wgmma GEMM, the epilogue and the statistics in its kernel (kernels/pointwise_gemm.cuh), where it applies
// (pointwise_wgmma_available, 16-bit channels-last, channels in multiples of 8). Read at every call, so that a test
// can switch it; opt-in until a GPU has timed it against cuBLAS and the channel pass.
bool wgmma_gemm_requested() { return env_is("XCEPTION_OPS_SEPARABLE_STAGED_GEMM", "wgmma"); }

// XCEPTION_OPS_WGMMA_CONFIG=NxSTAGESxIN_FLIGHT picks one of its builds (kPointwiseConfigs; tools/wgmma_sweep.py
// times them), =auto one per shape (pick_pointwise_config, for an m x n product), also read at each call.
PointwiseGemmConfig wgmma_gemm_config(const char* op, int64_t m, int32_t n) {
  PointwiseGemmConfig config = kPointwiseConfigs[0];
  const char* name = std::getenv("XCEPTION_OPS_WGMMA_CONFIG");
  if (name != nullptr && std::strcmp(name, "auto") == 0) {
    DeviceCaps caps;
    check_launch(op, current_device_caps(&caps));
    return pick_pointwise_config(m, n, caps.sms);
  }
  if (name != nullptr && *name != '\0' && !parse_pointwise_config(name, &config)) {
    std::string builds;
    char buf[32];
    for (const PointwiseGemmConfig& c : kPointwiseConfigs) {
      builds += (builds.empty() ? "" : ", ") + std::string(pointwise_config_name(c, buf));
    }
    XO_CHECK_VALUE(false, op, ": XCEPTION_OPS_WGMMA_CONFIG=", name, " names none of the builds of Hopper's ",
                   "GEMM (NxSTAGESxIN_FLIGHT: ", builds, "; or auto)");
  }
  return config;
}

DepthwiseStage depthwise_stage(const Tensor& x, const Tensor& dw_weight, const SeparableOptions& opt,
                               const Conv2dGeometry& g, at::MemoryFormat fmt, bool need_d) {
  DepthwiseStage s;
  Conv2dGeometry gd = g;
  gd.out_channels = g.dw_channels();
  const bool prologue = opt.in_scale.has_value() || opt.in_shift.has_value() || opt.in_relu;
  s.in_scale = float_vector(opt.in_scale, s.keep[0]);
  s.in_shift = float_vector(opt.in_shift, s.keep[1]);
  // Where the depthwise kernels take their vector or strip forms (depthwise_prologue_ok: channels-last 3x3 in
  // whole vectors of channels, or NCHW 3x3 at stride 1), they apply the prologue as they read x; otherwise it is
  // written out once for them (an x-sized buffer and a pass: 0.13 ms at 64 ch @147^2 on the H100, session 5).
  const bool on_load = prologue && depthwise_prologue_ok(view_of(x), gd, fmt == at::MemoryFormat::ChannelsLast,
                                                         static_cast<int>(x.element_size()));
  s.input = x;
  if (prologue && !on_load) {
    s.input = at::empty(x.sizes(), x.options().memory_format(fmt));
    check_launch(kForward, launch_prologue_apply(view_of(x), view_of(s.input), g, s.in_scale, s.in_shift,
                                                 opt.in_relu, kernel_dtype(kForward, x),
                                                 c10::cuda::getCurrentCUDAStream()));
  }
  if (on_load) {
    s.load_scale = s.in_scale;
    s.load_shift = s.in_shift;
    s.load_relu = opt.in_relu;
  }
  if (!need_d) {
    // The mid stage applied by the depthwise kernels as they store (DepthwiseParams::mid: kernels::mid_value), so
    // mid is written in one pass where d, the affine's pass and the activation's took three. The float32 copies in
    // keep_mid may go after the launch: the stream orders their reuse after the kernel.
    Tensor keep_mid[2];
    DepthwiseMid m;
    m.mid = opt.mid;
    m.scale = float_vector(opt.mid_scale, keep_mid[0]);
    m.shift = float_vector(opt.mid_shift, keep_mid[1]);
    s.mid = depthwise_conv2d(s.input, dw_weight, c10::nullopt, gd, s.load_scale, s.load_shift, s.load_relu, m);
    return s;
  }
  s.d = depthwise_conv2d(s.input, dw_weight, c10::nullopt, gd, s.load_scale, s.load_shift, s.load_relu);
  // The mid stage, as the kernels compute it (kernels::mid_value); a ReLU goes in the affine's pass.
  const bool affine = opt.mid_scale.has_value() || opt.mid_shift.has_value();
  const bool relu_in_pass = affine && opt.mid == MidActivation::Relu;
  const Tensor pre = mid_affine(kForward, s.d, opt.mid_scale, opt.mid_shift, relu_in_pass, g, fmt);
  s.mid = relu_in_pass ? pre : mid_activation(pre, opt.mid);
  return s;
}

Tensor mid_affine(const char* op, const Tensor& d, const OptTensor& scale, const OptTensor& shift, bool relu,
                  const Conv2dGeometry& g, at::MemoryFormat fmt) {
  if (!scale.has_value() && !shift.has_value()) return relu ? at::relu(d) : d;
  // The prologue's elementwise kernel over the (N, K, OH, OW) result: relu?(round(fmaf(d, scale, shift))), the
  // float32 arithmetic and roundings of kernels::mid_value (ATen's mul and add would round the product first).
  Conv2dGeometry planes;
  planes.batch = g.batch;
  planes.in_channels = g.dw_channels();
  planes.in_h = g.out_h;
  planes.in_w = g.out_w;
  Tensor keep[2];
  Tensor pre = at::empty(d.sizes(), d.options().memory_format(fmt));
  check_launch(op, launch_prologue_apply(view_of(d), view_of(pre), planes, float_vector(scale, keep[0]),
                                         float_vector(shift, keep[1]), relu, kernel_dtype(op, d),
                                         c10::cuda::getCurrentCUDAStream()));
  return pre;  // (the float32 copies in `keep` may go: the stream orders their reuse after the kernel)
}

Tensor mid_activation(const Tensor& pre, MidActivation mid) {
  switch (mid) {
    case MidActivation::None: return pre;
    case MidActivation::Relu: return at::relu(pre);
    case MidActivation::Relu6: return at::clamp(pre, 0, 6);  // exact in the dtype
    case MidActivation::Elu: return at::elu(pre);            // expm1 in float32, rounded: the kernels' elu
    case MidActivation::Hardswish: return at::hardswish(pre);  // v * clamp(v + 3, 0, 6) / 6 in float32, rounded
  }
  return pre;
}

std::tuple<Tensor, Tensor, Tensor> separable_conv2d(const Tensor& x, const Tensor& dw_weight,
                                                    const Tensor& pw_weight, const SeparableOptions& opt,
                                                    const Conv2dGeometry& g) {
  XO_CHECK_VALUE(x.is_cuda(), kForward, ": backend 'cuda' needs CUDA tensors, but x is on ", x.device());
  const DType dtype = kernel_dtype(kForward, x);
  check_operand(kForward, "dw_weight", dw_weight, x, "x");
  check_operand(kForward, "pw_weight", pw_weight, x, "x");
  check_shape(kForward, "x", x, {g.batch, g.in_channels, g.in_h, g.in_w});
  check_shape(kForward, "dw_weight", dw_weight, {g.dw_channels(), 1, g.kernel_h, g.kernel_w});
  check_shape(kForward, "pw_weight", pw_weight, {g.out_channels, g.dw_channels(), 1, 1});
  const std::vector<int64_t> out_shape = {g.batch, g.out_channels, g.out_h, g.out_w};
  const char* vector_names[] = {"in_scale", "in_shift", "mid_scale", "mid_shift", "out_scale", "out_shift"};
  const OptTensor* vectors[] = {&opt.in_scale, &opt.in_shift, &opt.mid_scale, &opt.mid_shift, &opt.out_scale,
                                &opt.out_shift};
  for (int i = 0; i < 6; ++i) {
    if (!vectors[i]->has_value()) continue;
    const Tensor& v = **vectors[i];
    const int64_t length = i < 2 ? g.in_channels : i < 4 ? g.dw_channels() : g.out_channels;
    XO_CHECK_VALUE(v.is_cuda() && v.device() == x.device(), kForward, ": ", vector_names[i], " is on ",
                      v.device(), " but x is on ", x.device());
    XO_CHECK_VALUE(v.dim() == 1 && v.size(0) == length, kForward, ": ", vector_names[i], " must have shape [",
                   length, "], got ", dims(v.sizes()));
  }
  if (opt.residual.has_value()) {
    check_operand(kForward, "residual", *opt.residual, x, "x");
    check_shape(kForward, "residual", *opt.residual, out_shape);
  }

  XO_CHECK_VALUE(g.dw_channels() < (int64_t{1} << 31), kForward, ": more than 2^31 - 1 depthwise channels");

  const c10::cuda::CUDAGuard guard(x.device());
  const at::MemoryFormat fmt = output_memory_format(x);
  const auto stats_options = x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous);
  Tensor sum = at::empty({opt.compute_stats ? g.out_channels : 0}, stats_options);
  Tensor sumsq = at::empty({opt.compute_stats ? g.out_channels : 0}, stats_options);
  if (fused_wgmma_requested() && fmt == at::MemoryFormat::ChannelsLast && g.batch * g.out_h * g.out_w > 0) {
    DeviceCaps caps;
    check_launch(kForward, current_device_caps(&caps));
    Tensor out = fused_wgmma_forward(x, dw_weight, pw_weight, opt, g, dtype, caps, sum, sumsq);
    if (out.defined()) return {out, sum, sumsq};
  }
  // (cuBLAS takes 32-bit dimensions: more pixels than that go to the fused kernel, which indexes in 64 bits.)
  if (!kFusedForward && g.batch * g.out_h * g.out_w <= INT32_MAX) {
    return staged_forward(x, dw_weight, pw_weight, opt, g, fmt, dtype, sum, sumsq);
  }
  Tensor out = at::empty(out_shape, x.options().memory_format(fmt));
  DeviceCaps caps;
  check_launch(kForward, current_device_caps(&caps));
  // PyTorch's own convolutions follow the cuDNN TF32 flag (torch.backends.cudnn.allow_tf32): so do we.
  const PointwiseMath math = separable_math(dtype, caps.major, cudnn_allows_tf32(), kWmma16);
  XO_CHECK(fused_launch(x, dw_weight, pw_weight, opt, g, fmt, dtype, math, caps, out, nullptr, sum, sumsq),
           kForward, ": this GPU's shared memory (", caps.smem_optin, " bytes per block) is too small for the fused "
           "kernel");
  return {out, sum, sumsq};
}

}  // namespace xception_ops::cuda
