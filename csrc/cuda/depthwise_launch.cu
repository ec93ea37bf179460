// Launchers of the depthwise kernels (kernels/depthwise.cuh): pick the specialization, the index type and the
// thread order, launch on the given stream, and return cudaGetLastError() after every launch.
// No torch headers here, so this file compiles quickly and also outside a torch build.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdlib>

#include "kernels/depthwise.cuh"
#include "kernels/depthwise_params.h"

namespace xception_ops {
namespace {

using kernels::depthwise_backward_input_kernel;
using kernels::depthwise_backward_weight_partial_kernel;
using kernels::depthwise_backward_weight_reduce_kernel;
using kernels::depthwise_forward_kernel;

// Blocks for a grid-stride loop over `total` items.
unsigned int elementwise_blocks(int64_t total) {
  int64_t blocks = (total + kDepthwiseThreads - 1) / kDepthwiseThreads;
  if (blocks > kDepthwiseMaxBlocks) blocks = kDepthwiseMaxBlocks;
  return static_cast<unsigned int>(blocks);
}

bool is_3x3(const Conv2dGeometry& g) { return g.kernel_h == 3 && g.kernel_w == 3; }
bool has_stride(const Conv2dGeometry& g, int64_t s) { return g.stride_h == s && g.stride_w == s; }

// Specializations, forward and input gradient alike: 3x3 at stride 1, 3x3 at stride 2, 3x3 at any stride,
// and any kernel size at any stride.
// Blocks for the forward and input-gradient vector kernels, whose blocks take kDepthwiseThreads / lanes runs of
// kDepthwiseRun pixels at a time over the (batch, rows, w) pixels: enough for each thread to walk about
// kVectorRunsPerThread runs, since a thread loads its 9 x 4 weights (scalar loads, 4x the sectors of a pixel's 9
// vector loads) once for all of them; but at least kVectorMinBlocks while there are runs for them, to fill a
// large GPU.
constexpr int64_t kVectorRunsPerThread = 4, kVectorMinBlocks = 1024;
unsigned int vector_blocks(int64_t batch_rows, int64_t w, int64_t channels) {
  const int rows = kDepthwiseThreads / depthwise_vector_lanes(channels / kDepthwiseVec);
  const int64_t runs = batch_rows * ((w + kDepthwiseRun - 1) / kDepthwiseRun);
  const int64_t one_each = (runs + rows - 1) / rows;
  int64_t blocks = (one_each + kVectorRunsPerThread - 1) / kVectorRunsPerThread;
  if (blocks < kVectorMinBlocks) blocks = one_each < kVectorMinBlocks ? one_each : kVectorMinBlocks;
  if (blocks > kDepthwiseMaxBlocks) blocks = kDepthwiseMaxBlocks;
  return static_cast<unsigned int>(blocks);
}

// Choices for comparing kernel versions on one build (benchmarks/RESULTS.md, tools/depthwise_sweep.py), read once:
// XCEPTION_OPS_DEPTHWISE_STRIPS=off takes the run kernels where the strip kernels apply; =N (1..64) fixes the rows
// per strip instead of depthwise_strip_rows' choice.
int strip_setting() {
  static const int setting = [] {
    const char* v = std::getenv("XCEPTION_OPS_DEPTHWISE_STRIPS");
    if (v == nullptr) return 0;
    if (v[0] == 'o' && v[1] == 'f' && v[2] == 'f' && v[3] == 0) return -1;
    const int n = std::atoi(v);
    return n >= 1 && n <= 64 ? n : 0;
  }();
  return setting;
}
// Whether a pass takes the strip kernels: their conditions (channels-last: depthwise_strips; NCHW:
// depthwise_nchw_strips), unless switched off, except that in NCHW a prologue has no other kernel.
template <bool kCL>
bool take_strips(const DepthwiseParams& p, int dtype_bytes) {
  const bool fits = kCL ? depthwise_strips(p, dtype_bytes) : depthwise_nchw_strips(p);
  return fits && (strip_setting() >= 0 || (!kCL && p.prologue.active()));
}
// Rows per strip: the fixed setting, else `chosen` (depthwise_strip_rows).
int64_t strip_rows_or(int64_t chosen) { return strip_setting() > 0 ? strip_setting() : chosen; }

// The strip kernels (forward, input gradient): one thread per run of a strip and vector of channels (kCL: the
// vector fastest; NCHW: one channel, the run fastest); `rows`, `w` the written tensor's.
// Their plan over a written tensor of rows x w: rows per strip, and items (image, strip, run), each taken by
// `groups` threads (vectors of channels, or channels in NCHW).
struct StripPlan {
  int64_t strip_rows, items, groups;
};
StripPlan strip_plan(const DepthwiseParams& p, int64_t rows, int64_t w, int dtype_bytes, bool channels_last) {
  const int64_t run = depthwise_strip_run(dtype_bytes, channels_last), runs_w = (w + run - 1) / run;
  StripPlan plan;
  plan.groups = p.g.in_channels / (channels_last ? kDepthwiseStripVec : 1);
  plan.strip_rows = strip_rows_or(depthwise_strip_rows(p.g.batch * runs_w * plan.groups, rows));
  plan.items = p.g.batch * ((rows + plan.strip_rows - 1) / plan.strip_rows) * runs_w;
  return plan;
}

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

// Whether the input gradient's strip kernel takes this pass with the prologue's backward (x read as vectors too).
template <bool kCL>
bool dgrad_prologue_strips(const DepthwiseParams& p, int dtype_bytes) {
  return take_strips<kCL>(p, dtype_bytes) &&
         (!kCL || channels_vectorizable(p.prologue.x, p.g.in_channels, dtype_bytes, kDepthwiseVec));
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

}  // namespace

// The per-dtype entry points, instantiated once each here.
template <typename T>
cudaError_t depthwise_forward_dtype(const DepthwiseParams& p, cudaStream_t stream) {
  return forward_typed<T>(p, stream);
}
template <typename T>
cudaError_t depthwise_backward_input_dtype(const DepthwiseParams& p, cudaStream_t stream) {
  return backward_input_typed<T>(p, stream);
}
template <typename T>
cudaError_t depthwise_backward_weight_dtype(const DepthwiseParams& p, float* workspace, cudaStream_t stream) {
  return backward_weight_typed<T>(p, workspace, stream);
}

template cudaError_t depthwise_forward_dtype<float>(const DepthwiseParams&, cudaStream_t);
template cudaError_t depthwise_forward_dtype<__half>(const DepthwiseParams&, cudaStream_t);
template cudaError_t depthwise_forward_dtype<__nv_bfloat16>(const DepthwiseParams&, cudaStream_t);
template cudaError_t depthwise_backward_input_dtype<float>(const DepthwiseParams&, cudaStream_t);
template cudaError_t depthwise_backward_input_dtype<__half>(const DepthwiseParams&, cudaStream_t);
template cudaError_t depthwise_backward_input_dtype<__nv_bfloat16>(const DepthwiseParams&, cudaStream_t);
template cudaError_t depthwise_backward_weight_dtype<float>(const DepthwiseParams&, float*, cudaStream_t);
template cudaError_t depthwise_backward_weight_dtype<__half>(const DepthwiseParams&, float*, cudaStream_t);
template cudaError_t depthwise_backward_weight_dtype<__nv_bfloat16>(const DepthwiseParams&, float*, cudaStream_t);

cudaError_t launch_depthwise_forward(const DepthwiseParams& p, DType dtype, cudaStream_t stream) {
  const Conv2dGeometry& g = p.g;
  if (g.batch * g.dw_channels() * g.out_h * g.out_w == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32: return depthwise_forward_dtype<float>(p, stream);
    case DType::Float16: return depthwise_forward_dtype<__half>(p, stream);
    case DType::BFloat16: return depthwise_forward_dtype<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_depthwise_backward_input(const DepthwiseParams& p, DType dtype, cudaStream_t stream) {
  const Conv2dGeometry& g = p.g;
  if (p.mid_active()) return cudaErrorInvalidValue;  // the mid stage is the forward's; no gradient kernel applies it
  if (g.batch * g.in_channels * g.in_h * g.in_w == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32: return depthwise_backward_input_dtype<float>(p, stream);
    case DType::Float16: return depthwise_backward_input_dtype<__half>(p, stream);
    case DType::BFloat16: return depthwise_backward_input_dtype<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

int64_t depthwise_dgrad_prologue_rows(const DepthwiseParams& p, DType dtype) {
  const int bytes = dtype == DType::Float32 ? 4 : 2;
  const bool strips = p.channels_last ? dgrad_prologue_strips<true>(p, bytes) : dgrad_prologue_strips<false>(p, bytes);
  return strips ? strip_plan(p, p.g.in_h, p.g.in_w, bytes, p.channels_last).items : 0;
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
    case DType::Float32: return depthwise_backward_weight_dtype<float>(p, ws, stream);
    case DType::Float16: return depthwise_backward_weight_dtype<__half>(p, ws, stream);
    case DType::BFloat16: return depthwise_backward_weight_dtype<__nv_bfloat16>(p, ws, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace xception_ops
