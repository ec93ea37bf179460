// The depthwise launchers' kernel choices (kernels/depthwise.cuh): the specialization, the index type and the
// thread order for one pass and dtype, launched on the given stream; cudaGetLastError() after every launch.
// Included only by the instantiation files in instances/ (one per pass and dtype). No torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/depthwise_plan.h"
#include "cuda/instance_entries.h"
#include "kernels/depthwise.cuh"

namespace xception_ops {
namespace depthwise_launch {

using kernels::depthwise_backward_input_kernel;
using kernels::depthwise_backward_weight_partial_kernel;
using kernels::depthwise_backward_weight_reduce_kernel;
using kernels::depthwise_forward_kernel;

template <typename T, typename idx_t, bool kGrad, bool kCL>
cudaError_t launch_strips(const DepthwiseParams& p, int64_t rows, int64_t w, cudaStream_t stream) {
  constexpr int R = depthwise_strip_run(static_cast<int>(sizeof(T)), kCL);
  constexpr int V = kCL ? kDepthwiseStripVec : 1;
  const StripPlan plan = strip_plan(p, rows, w, static_cast<int>(sizeof(T)), kCL);
  const int64_t strip_rows = plan.strip_rows, threads = plan.items * plan.groups;
  const dim3 grid(static_cast<unsigned int>((threads + kDepthwiseStripThreads - 1) / kDepthwiseStripThreads));
  if constexpr (!kGrad) {  // the forward's mid stage on its stores: the kMid instantiations
    if (p.mid_active()) {
      if (p.prologue.active()) {
        kernels::depthwise_strip_kernel<T, idx_t, V, R, false, true, kCL, true>
            <<<grid, dim3(kDepthwiseStripThreads), 0, stream>>>(p, static_cast<int>(strip_rows));
      } else {
        kernels::depthwise_strip_kernel<T, idx_t, V, R, false, false, kCL, true>
            <<<grid, dim3(kDepthwiseStripThreads), 0, stream>>>(p, static_cast<int>(strip_rows));
      }
      return cudaGetLastError();
    }
  }
  // The forward with a prologue on x's loads; the input gradient with the prologue's backward on its stores.
  if (kGrad ? p.prologue.backward() : p.prologue.active()) {
    kernels::depthwise_strip_kernel<T, idx_t, V, R, kGrad, true, kCL>
        <<<grid, dim3(kDepthwiseStripThreads), 0, stream>>>(p, static_cast<int>(strip_rows));
    return cudaGetLastError();
  }
  kernels::depthwise_strip_kernel<T, idx_t, V, R, kGrad, false, kCL>
      <<<grid, dim3(kDepthwiseStripThreads), 0, stream>>>(p, static_cast<int>(strip_rows));
  return cudaGetLastError();
}

template <typename T, typename idx_t, bool kCL>
cudaError_t forward_for_layout(const DepthwiseParams& p, cudaStream_t stream) {
  const Conv2dGeometry& g = p.g;
  const dim3 block(kDepthwiseThreads);
  const bool vectors = kCL && depthwise_forward_vectors(p, static_cast<int>(sizeof(T)));
  if (take_strips<kCL>(p, static_cast<int>(sizeof(T)))) {
    return launch_strips<T, idx_t, false, kCL>(p, g.out_h, g.out_w, stream);
  }
  if (p.prologue.active() && !vectors) return cudaErrorInvalidValue;  // only the vector and strip kernels apply one
  if (vectors) {
    // A run's shared input columns at compile-time stride 1 or 2 without horizontal dilation; any other, tap by tap.
    const dim3 grid(vector_blocks(g.batch * g.out_h, g.out_w, g.dw_channels()));
    if (p.mid_active()) {  // the mid stage on the stores: its own instantiations
      if (g.dilation_w == 1 && g.stride_w == 1) {
        kernels::depthwise_forward_vector_kernel<T, idx_t, kDepthwiseVec, 1, true><<<grid, block, 0, stream>>>(p);
      } else if (g.dilation_w == 1 && g.stride_w == 2) {
        kernels::depthwise_forward_vector_kernel<T, idx_t, kDepthwiseVec, 2, true><<<grid, block, 0, stream>>>(p);
      } else {
        kernels::depthwise_forward_vector_kernel<T, idx_t, kDepthwiseVec, 0, true><<<grid, block, 0, stream>>>(p);
      }
    } else if (g.dilation_w == 1 && g.stride_w == 1) {
      kernels::depthwise_forward_vector_kernel<T, idx_t, kDepthwiseVec, 1><<<grid, block, 0, stream>>>(p);
    } else if (g.dilation_w == 1 && g.stride_w == 2) {
      kernels::depthwise_forward_vector_kernel<T, idx_t, kDepthwiseVec, 2><<<grid, block, 0, stream>>>(p);
    } else {
      kernels::depthwise_forward_vector_kernel<T, idx_t, kDepthwiseVec, 0><<<grid, block, 0, stream>>>(p);
    }
    return cudaGetLastError();
  }
  // The scalar kernels apply the mid stage (if any) behind a runtime branch.
  const dim3 grid(elementwise_blocks(g.batch * g.dw_channels() * g.out_h * g.out_w));
  if (is_3x3(g) && has_stride(g, 1)) {
    depthwise_forward_kernel<T, idx_t, kCL, 3, 3, 1, 1><<<grid, block, 0, stream>>>(p);
  } else if (is_3x3(g) && has_stride(g, 2)) {
    depthwise_forward_kernel<T, idx_t, kCL, 3, 3, 2, 2><<<grid, block, 0, stream>>>(p);
  } else if (is_3x3(g)) {
    depthwise_forward_kernel<T, idx_t, kCL, 3, 3, 0, 0><<<grid, block, 0, stream>>>(p);
  } else {
    depthwise_forward_kernel<T, idx_t, kCL, 0, 0, 0, 0><<<grid, block, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T, typename idx_t, bool kCL>
cudaError_t backward_input_for_layout(const DepthwiseParams& p, cudaStream_t stream) {
  const Conv2dGeometry& g = p.g;
  const dim3 block(kDepthwiseThreads);
  if (p.prologue.backward() || p.prologue.active()) {  // only the strip kernel applies the prologue's backward
    if (!p.prologue.backward() || !dgrad_prologue_strips<kCL>(p, static_cast<int>(sizeof(T)))) {
      return cudaErrorInvalidValue;
    }
    return launch_strips<T, idx_t, true, kCL>(p, g.in_h, g.in_w, stream);
  }
  if (take_strips<kCL>(p, static_cast<int>(sizeof(T)))) {
    return launch_strips<T, idx_t, true, kCL>(p, g.in_h, g.in_w, stream);
  }
  if (kCL && depthwise_dgrad_vectors(p, static_cast<int>(sizeof(T)))) {
    const dim3 grid(vector_blocks(g.batch * g.in_h, g.in_w, g.in_channels));
    if (g.dilation_w == 1) {
      kernels::depthwise_backward_input_vector_kernel<T, idx_t, kDepthwiseVec, true><<<grid, block, 0, stream>>>(p);
    } else {
      kernels::depthwise_backward_input_vector_kernel<T, idx_t, kDepthwiseVec, false><<<grid, block, 0, stream>>>(p);
    }
    return cudaGetLastError();
  }
  const dim3 grid(elementwise_blocks(g.batch * g.in_channels * g.in_h * g.in_w));
  if (is_3x3(g) && has_stride(g, 1)) {
    depthwise_backward_input_kernel<T, idx_t, kCL, 3, 3, 1, 1><<<grid, block, 0, stream>>>(p);
  } else if (is_3x3(g) && has_stride(g, 2)) {
    depthwise_backward_input_kernel<T, idx_t, kCL, 3, 3, 2, 2><<<grid, block, 0, stream>>>(p);
  } else if (is_3x3(g)) {
    depthwise_backward_input_kernel<T, idx_t, kCL, 3, 3, 0, 0><<<grid, block, 0, stream>>>(p);
  } else {
    depthwise_backward_input_kernel<T, idx_t, kCL, 0, 0, 0, 0><<<grid, block, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

// Weight gradient: pass 1 with all taps in registers for 3x3 and 1x1 (depthwise_wgrad_all_taps), one tap per
// block otherwise; then pass 2.
template <typename T, typename idx_t, bool kCL>
cudaError_t backward_weight_for_layout(const DepthwiseParams& p, float* workspace, cudaStream_t stream) {
  const Conv2dGeometry& g = p.g;
  const int64_t slices = depthwise_wgrad_slices(p, static_cast<int>(sizeof(T)));
  const int64_t chan_blocks = (g.dw_channels() + depthwise_wgrad_channels_per_block(kCL) - 1) /
                              depthwise_wgrad_channels_per_block(kCL);
  const int64_t taps = g.kernel_h * g.kernel_w;
  const bool all_taps = depthwise_wgrad_all_taps(g);
  const dim3 grid1(static_cast<unsigned int>(chan_blocks * (all_taps ? 1 : taps)), static_cast<unsigned int>(slices));
  const dim3 block(kDepthwiseThreads);
  const bool vectors = kCL && depthwise_wgrad_vectors(p, static_cast<int>(sizeof(T)));
  const bool strips = take_strips<kCL>(p, static_cast<int>(sizeof(T)));
  if (p.prologue.active() && !vectors && !strips) return cudaErrorInvalidValue;  // only these kernels apply one
  if (strips) {
    // Any slice count is right for any strip height: the workspace was sized for the plan's. Channels-last: blocks
    // of depthwise_wgrad_vector_groups vectors; NCHW: one channel per block.
    constexpr int V = kCL ? kDepthwiseStripVec : 1;
    const int64_t strip_rows =
        strip_rows_or(depthwise_wgrad_strip_plan(p, static_cast<int>(sizeof(T))).rows_per_strip);
    const int64_t groups = g.dw_channels() / V, per_block = kCL ? depthwise_wgrad_vector_groups(groups) : 1;
    const dim3 grid_strips(static_cast<unsigned int>((groups + per_block - 1) / per_block),
                           static_cast<unsigned int>(slices));
    kernels::depthwise_backward_weight_strip_kernel<T, idx_t, V, depthwise_strip_run(sizeof(T), kCL), kCL>
        <<<grid_strips, block, 0, stream>>>(p, workspace, slices, static_cast<int>(strip_rows));
  } else if (vectors) {
    const int64_t groups = g.dw_channels() / kDepthwiseVec, per_block = depthwise_wgrad_vector_groups(groups);
    const dim3 grid_vec(static_cast<unsigned int>((groups + per_block - 1) / per_block),
                        static_cast<unsigned int>(slices));
    kernels::depthwise_backward_weight_partial_vector_kernel<T, idx_t, kDepthwiseVec>
        <<<grid_vec, block, 0, stream>>>(p, workspace, slices);
  } else if (is_3x3(g)) {
    depthwise_backward_weight_partial_kernel<T, idx_t, kCL, 3, 3><<<grid1, block, 0, stream>>>(p, workspace, slices);
  } else if (g.kernel_h == 1 && g.kernel_w == 1) {
    depthwise_backward_weight_partial_kernel<T, idx_t, kCL, 1, 1><<<grid1, block, 0, stream>>>(p, workspace, slices);
  } else {
    depthwise_backward_weight_partial_kernel<T, idx_t, kCL, 0, 0><<<grid1, block, 0, stream>>>(p, workspace, slices);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t outputs = g.dw_channels() * taps;
  const dim3 grid2(static_cast<unsigned int>((outputs + 31) / 32));
  depthwise_backward_weight_reduce_kernel<T><<<grid2, block, 0, stream>>>(p, workspace, slices);
  return cudaGetLastError();
}

// Index type and thread order.
template <typename T>
cudaError_t forward_typed(const DepthwiseParams& p, cudaStream_t stream) {
  if (p.use_int32) {
    return p.channels_last ? forward_for_layout<T, int32_t, true>(p, stream)
                           : forward_for_layout<T, int32_t, false>(p, stream);
  }
  return p.channels_last ? forward_for_layout<T, int64_t, true>(p, stream)
                         : forward_for_layout<T, int64_t, false>(p, stream);
}

template <typename T>
cudaError_t backward_input_typed(const DepthwiseParams& p, cudaStream_t stream) {
  if (p.use_int32) {
    return p.channels_last ? backward_input_for_layout<T, int32_t, true>(p, stream)
                           : backward_input_for_layout<T, int32_t, false>(p, stream);
  }
  return p.channels_last ? backward_input_for_layout<T, int64_t, true>(p, stream)
                         : backward_input_for_layout<T, int64_t, false>(p, stream);
}

template <typename T>
cudaError_t backward_weight_typed(const DepthwiseParams& p, float* workspace, cudaStream_t stream) {
  if (p.use_int32) {
    return p.channels_last ? backward_weight_for_layout<T, int32_t, true>(p, workspace, stream)
                           : backward_weight_for_layout<T, int32_t, false>(p, workspace, stream);
  }
  return p.channels_last ? backward_weight_for_layout<T, int64_t, true>(p, workspace, stream)
                         : backward_weight_for_layout<T, int64_t, false>(p, workspace, stream);
}

template <typename T>
cudaError_t forward_dtype(const DepthwiseParams& p, cudaStream_t stream) {
  return forward_typed<T>(p, stream);
}
template <typename T>
cudaError_t backward_input_dtype(const DepthwiseParams& p, cudaStream_t stream) {
  return backward_input_typed<T>(p, stream);
}
template <typename T>
cudaError_t backward_weight_dtype(const DepthwiseParams& p, float* workspace, cudaStream_t stream) {
  return backward_weight_typed<T>(p, workspace, stream);
}

}  // namespace depthwise_launch
}  // namespace xception_ops
