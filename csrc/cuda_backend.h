// The "cuda" backend's torch layer: fills the kernels' params structs from tensors and launches them on the
// current stream. Declared here, defined in csrc/cuda/*.cpp.
#pragma once

#include "cuda_ops_list.h"
#include "kernels/pointwise_gemm_params.h"
#include "ops.h"

namespace xception_ops::cuda {

// Depthwise conv2d (csrc/cuda/depthwise_backend.cpp). Same contract as the reference:: functions in ops.h:
// `g` is already validated; the tensors must be CUDA tensors on one device with dtype float32, float16 or
// bfloat16 (float64 raises a TypeError that points to backend="torch"). Outputs follow output_memory_format
// (backward_input: `fmt`; backward_weight: contiguous).
// The forward and the weight gradient can read x through a prologue, relu?(x * in_scale + in_shift) rounded to
// the dtype (float32 CUDA vectors, nullptr for none): the separable backward's recompute, only where
// depthwise_prologue_ok (kernels/depthwise_params.h) holds, else the launch fails.
// The forward can also apply the separable op's mid stage as it stores (DepthwiseParams::mid; kernels::mid_value):
// y = act(round(fmaf(d, scale, shift))) with d rounded (act(d) without either vector), scale and shift float32 CUDA
// vectors of dw_channels (nullptr: none), on every forward kernel. Only the separable stage (depthwise_stage) sets it; the public op never does.
struct DepthwiseMid {
  MidActivation mid = MidActivation::None;
  const float* scale = nullptr;
  const float* shift = nullptr;
};
Tensor depthwise_conv2d(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Conv2dGeometry& g,
                        const float* in_scale = nullptr, const float* in_shift = nullptr, bool in_relu = false,
                        const DepthwiseMid& mid = DepthwiseMid());
Tensor depthwise_conv2d_backward_input(const Tensor& grad_out, const Tensor& weight, const Conv2dGeometry& g,
                                       at::MemoryFormat fmt);
// The input gradient of a depthwise stage that read relu?(x * in_scale + in_shift) (rounded to the dtype), taken
// through that prologue's backward in the same pass: the gradient of x; and where `sum_gx` is not null (it and
// `sum_g`: float32, in_channels each, on the device) the per-channel sums of g * x and g (g: the gradient of the
// prologue's output through its ReLU mask), the gradients of in_scale and in_shift, in a fixed order. Undefined
// where the input gradient's strip kernels do not take this shape and layout (depthwise_dgrad_prologue_rows): the
// caller then applies the prologue's backward to depthwise_conv2d_backward_input's result itself.
Tensor depthwise_conv2d_backward_input_through_prologue(const Tensor& grad_out, const Tensor& weight,
                                                        const Conv2dGeometry& g, at::MemoryFormat fmt,
                                                        const Tensor& x, const float* in_scale,
                                                        const float* in_shift, bool in_relu, float* sum_gx,
                                                        float* sum_g);
Tensor depthwise_conv2d_backward_weight(const Tensor& grad_out, const Tensor& x, const Conv2dGeometry& g,
                                        const float* in_scale = nullptr, const float* in_shift = nullptr,
                                        bool in_relu = false);

// The separable forward (csrc/cuda/separable_backend.cpp), with the contract of reference::separable_conv2d:
// returns (out, sum, sumsq), the statistics float32 [out_channels] with opt.compute_stats and empty otherwise. Two
// algorithms (XCEPTION_OPS_SEPARABLE_FORWARD=fused picks the first; the default is the second):
//   fused   one kernel (kernels/separable.cuh): the depthwise result for a tile of pixels lives in shared memory
//           only, the pointwise GEMM runs from there, the epilogue on its accumulators;
//   staged  the depthwise kernels (prologue on load) into a transient buffer, then the fused kernel's GEMM and
//           epilogue reading it, or a cuBLAS product and one pass for the epilogue and the statistics
//           (separable_channel_pass_kernel). Nothing is stored for the backward, which recomputes it either way.
// On Hopper, opt-in (read at each call): XCEPTION_OPS_SEPARABLE_STAGED_GEMM=wgmma takes the staged form's product
// on the wgmma GEMM with the epilogue in it (kernels/pointwise_gemm.cuh); XCEPTION_OPS_SEPARABLE_FORWARD=wgmma the
// fused wgmma forward for up to 128 depthwise channels (kernels/separable_wgmma.cuh).
std::tuple<Tensor, Tensor, Tensor> separable_conv2d(const Tensor& x, const Tensor& dw_weight,
                                                    const Tensor& pw_weight, const SeparableOptions& opt,
                                                    const Conv2dGeometry& g);

// The depthwise stage of a separable conv, mid(dw(prologue(x))), in the dtype and x's memory format `fmt`, as the
// staged forward and the backward compute it: the depthwise kernels apply the prologue as they read x where they
// can (depthwise_prologue_ok), else it is written out once for them first. With `need_d` (the backward: the masks
// and mid_scale's gradient read d) the depthwise kernels write d and the mid stage follows in passes of its own
// (mid_affine, mid_activation); without it (the staged forward) they apply the mid stage as they store and write
// mid alone, in one pass, and d is left undefined.
struct DepthwiseStage {
  Tensor input;                       // what the depthwise kernels read: x, or the prologue written out
  const float* load_scale = nullptr;  // the prologue they apply on load (none: nullptr, nullptr, false)
  const float* load_shift = nullptr;
  bool load_relu = false;
  const float* in_scale = nullptr;    // the prologue's float32 vectors (nullptr where absent), kept alive by `keep`
  const float* in_shift = nullptr;
  Tensor keep[2];
  Tensor d;    // the depthwise result, rounded to the dtype (undefined without need_d)
  Tensor mid;  // the mid stage on d: its affine, then its activation, rounded (d itself without either)
};
DepthwiseStage depthwise_stage(const Tensor& x, const Tensor& dw_weight, const SeparableOptions& opt,
                               const Conv2dGeometry& g, at::MemoryFormat fmt, bool need_d);
// The mid stage's two halves, as the kernels compute them (kernels::mid_value), on an (N, dw_channels, OH, OW)
// tensor d in the dtype (geometry g): mid_affine, relu?(round(fmaf(d, scale, shift))) per channel in float32 (an
// absent vector 1 or 0), in `fmt`, on one elementwise kernel (errors name `op`); d itself, or relu(d), without
// either vector. mid_activation: the activation on pre, rounded (relu, relu6, elu; none: pre).
Tensor mid_affine(const char* op, const Tensor& d, const OptTensor& scale, const OptTensor& shift, bool relu,
                  const Conv2dGeometry& g, at::MemoryFormat fmt);
Tensor mid_activation(const Tensor& pre, MidActivation mid);

// Whether XCEPTION_OPS_SEPARABLE_STAGED_GEMM=wgmma asks for Hopper's wgmma GEMM (kernels/pointwise_gemm.cuh) in the
// staged forward's product and the backward's grad_mid, and the build XCEPTION_OPS_WGMMA_CONFIG names for an
// m x n product ("auto": pick_pointwise_config's; an error naming `op` where it names none); both read at each call
// (csrc/cuda/separable_backend.cpp).
bool wgmma_gemm_requested();
PointwiseGemmConfig wgmma_gemm_config(const char* op, int64_t m, int32_t n);

// Its backward (csrc/cuda/separable_backward_backend.cpp), with the contract of
// reference::separable_conv2d_backward: the gradients of (x, dw_weight, pw_weight, in_scale, in_shift, mid_scale,
// mid_shift, out_scale, out_shift).
SeparableGrads separable_conv2d_backward(
    const Tensor& grad_out, const OptTensor& grad_sum, const OptTensor& grad_sumsq, const OptTensor& out,
    const Tensor& x, const Tensor& dw_weight, const Tensor& pw_weight, const SeparableOptions& opt,
    const Conv2dGeometry& g);

// BatchNorm finalize (csrc/cuda/batchnorm_backend.cpp), with the contract of reference::batch_norm_finalize: one
// kernel, the update's included where its buffers are contiguous in the parameters' dtype and the counter a
// contiguous int64 (else the parts that are not run after it, as batch_norm_update_stats and add_(1)).
std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_finalize(const Tensor& sum, const Tensor& sumsq,
                                                               int64_t count, const OptTensor& weight,
                                                               const OptTensor& bias, double eps,
                                                               const RunningStatsUpdate& update);
// The finalize step's backward, with the contract of reference::batch_norm_finalize_backward: one kernel.
std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_finalize_backward(
    const Tensor& sum, const Tensor& sumsq, int64_t count, const OptTensor& weight, double eps,
    const OptTensor& grad_scale, const OptTensor& grad_shift, const OptTensor& grad_mean, const OptTensor& grad_var);
// The BatchNorm applied, relu?(round(y * scale + shift)), and its gradients, with the contracts of
// reference::scale_shift / scale_shift_backward: one element-wise kernel each way (plus the fixed-order reduction
// of the sums); float64 takes the reference.
Tensor scale_shift(const Tensor& y, const Tensor& scale, const Tensor& shift, bool relu, const OptTensor& residual);
std::tuple<Tensor, Tensor, Tensor> scale_shift_backward(const Tensor& grad, const Tensor& y, const Tensor& scale,
                                                        const Tensor& shift, bool relu);
// The running statistics' update, with the contract of reference::batch_norm_update_stats: one kernel where the
// buffers are contiguous and in the statistics' dtype, the reference's ATen ops otherwise.
void batch_norm_update_stats(const Tensor& running_mean, const Tensor& running_var, const Tensor& mean,
                             const Tensor& var, const OptTensor& pre_bias, int64_t count, double momentum);

// Max pooling (csrc/cuda/pool_backend.cpp), with the contracts of reference::max_pool2d / max_pool2d_backward: one
// kernel each way (kernels/pool.cuh); float64 takes the reference.
std::tuple<Tensor, Tensor> max_pool2d(const Tensor& x, const Pool2dGeometry& g, bool save_argmax,
                                      const OptTensor& scale, const OptTensor& shift, const OptTensor& residual);
std::tuple<Tensor, Tensor, Tensor> max_pool2d_scale_shift_backward(const Tensor& grad_out, const Tensor& argmax,
                                                                   const Tensor& x, const Tensor& scale,
                                                                   const Tensor& shift, const Pool2dGeometry& g);
Tensor max_pool2d_backward(const Tensor& grad_out, const Tensor& argmax, const Pool2dGeometry& g,
                           at::MemoryFormat fmt);

template <size_t N>
bool listed(const std::array<const char*, N>& names, c10::string_view op) {
  for (const char* name : names) {
    if (op == name) return true;
  }
  return false;
}
inline bool implements(c10::string_view op) { return listed(kImplementedOps, op); }
inline bool preferred(c10::string_view op) { return listed(kAutoOps, op); }

}  // namespace xception_ops::cuda
