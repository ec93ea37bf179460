// The depthwise launchers' entry points: check the pass, then dispatch on the dtype to the instantiations in
// instances/depthwise_*.cu (kernel choices: depthwise_launch.cuh; plans: depthwise_plan.h). No torch headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/depthwise_plan.h"
#include "cuda/instance_entries.h"
#include "kernels/depthwise_params.h"

namespace xception_ops {

cudaError_t launch_depthwise_forward(const DepthwiseParams& p, DType dtype, cudaStream_t stream) {
  const Conv2dGeometry& g = p.g;
  if (g.batch * g.dw_channels() * g.out_h * g.out_w == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32: return depthwise_launch::forward_dtype<float>(p, stream);
    case DType::Float16: return depthwise_launch::forward_dtype<__half>(p, stream);
    case DType::BFloat16: return depthwise_launch::forward_dtype<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_depthwise_backward_input(const DepthwiseParams& p, DType dtype, cudaStream_t stream) {
  const Conv2dGeometry& g = p.g;
  if (p.mid_active()) return cudaErrorInvalidValue;  // the mid stage is the forward's; no gradient kernel applies it
  if (g.batch * g.in_channels * g.in_h * g.in_w == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32: return depthwise_launch::backward_input_dtype<float>(p, stream);
    case DType::Float16: return depthwise_launch::backward_input_dtype<__half>(p, stream);
    case DType::BFloat16: return depthwise_launch::backward_input_dtype<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

int64_t depthwise_dgrad_prologue_rows(const DepthwiseParams& p, DType dtype) {
  const int bytes = dtype == DType::Float32 ? 4 : 2;
  const bool strips = p.channels_last ? depthwise_launch::dgrad_prologue_strips<true>(p, bytes) : depthwise_launch::dgrad_prologue_strips<false>(p, bytes);
  if (!strips) return 0;
  return depthwise_launch::strip_plan(p, p.g.in_h, p.g.in_w, bytes, p.channels_last).items;
}

cudaError_t launch_depthwise_backward_weight(const DepthwiseParams& p, DType dtype, void* workspace,
                                             size_t workspace_bytes, cudaStream_t stream) {
  const Conv2dGeometry& g = p.g;
  if (p.mid_active()) return cudaErrorInvalidValue;  // the mid stage is the forward's; no gradient kernel applies it
  if (g.dw_channels() * g.kernel_h * g.kernel_w == 0) return cudaSuccess;
  // An empty reduction (no positions) still writes zeros: pass 1 leaves every partial at 0.
  const int dtype_bytes = dtype == DType::Float32 ? 4 : 2;
  if (workspace == nullptr || workspace_bytes < depthwise_wgrad_workspace_bytes(p, dtype_bytes) ||
      reinterpret_cast<uintptr_t>(workspace) % alignof(float) != 0) {
    return cudaErrorInvalidValue;
  }
  float* ws = static_cast<float*>(workspace);
  switch (dtype) {
    case DType::Float32: return depthwise_launch::backward_weight_dtype<float>(p, ws, stream);
    case DType::Float16: return depthwise_launch::backward_weight_dtype<__half>(p, ws, stream);
    case DType::BFloat16: return depthwise_launch::backward_weight_dtype<__nv_bfloat16>(p, ws, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace xception_ops
