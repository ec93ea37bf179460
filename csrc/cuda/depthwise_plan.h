// The depthwise launchers' plans: which kernel takes a pass and how its grid is cut. Host code only, shared by the
// dtype dispatch (depthwise_launch.cu) and the kernel choices (depthwise_launch.cuh). No torch headers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>

#include "kernels/depthwise_params.h"

namespace xception_ops {
namespace depthwise_launch {

// Blocks for a grid-stride loop over `total` items.
inline unsigned int elementwise_blocks(int64_t total) {
  int64_t blocks = (total + kDepthwiseThreads - 1) / kDepthwiseThreads;
  if (blocks > kDepthwiseMaxBlocks) blocks = kDepthwiseMaxBlocks;
  return static_cast<unsigned int>(blocks);
}

inline bool is_3x3(const Conv2dGeometry& g) { return g.kernel_h == 3 && g.kernel_w == 3; }
inline bool has_stride(const Conv2dGeometry& g, int64_t s) { return g.stride_h == s && g.stride_w == s; }

// Specializations, forward and input gradient alike: 3x3 at stride 1, 3x3 at stride 2, 3x3 at any stride,
// and any kernel size at any stride.
// Blocks for the forward and input-gradient vector kernels, whose blocks take kDepthwiseThreads / lanes runs of
// kDepthwiseRun pixels at a time over the (batch, rows, w) pixels: enough for each thread to walk about
// kVectorRunsPerThread runs, since a thread loads its 9 x 4 weights (scalar loads, 4x the sectors of a pixel's 9
// vector loads) once for all of them; but at least kVectorMinBlocks while there are runs for them, to fill a
// large GPU.
constexpr int64_t kVectorRunsPerThread = 4, kVectorMinBlocks = 1024;
inline unsigned int vector_blocks(int64_t batch_rows, int64_t w, int64_t channels) {
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
inline int strip_setting() {
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
inline int64_t strip_rows_or(int64_t chosen) { return strip_setting() > 0 ? strip_setting() : chosen; }

// The strip kernels (forward, input gradient): one thread per run of a strip and vector of channels (kCL: the
// vector fastest; NCHW: one channel, the run fastest); `rows`, `w` the written tensor's.
// Their plan over a written tensor of rows x w: rows per strip, and items (image, strip, run), each taken by
// `groups` threads (vectors of channels, or channels in NCHW).
struct StripPlan {
  int64_t strip_rows, items, groups;
};
inline StripPlan strip_plan(const DepthwiseParams& p, int64_t rows, int64_t w, int dtype_bytes, bool channels_last) {
  const int64_t run = depthwise_strip_run(dtype_bytes, channels_last), runs_w = (w + run - 1) / run;
  StripPlan plan;
  plan.groups = p.g.in_channels / (channels_last ? kDepthwiseStripVec : 1);
  plan.strip_rows = strip_rows_or(depthwise_strip_rows(p.g.batch * runs_w * plan.groups, rows));
  plan.items = p.g.batch * ((rows + plan.strip_rows - 1) / plan.strip_rows) * runs_w;
  return plan;
}

// Whether the input gradient's strip kernel takes this pass with the prologue's backward (x read as vectors too).
template <bool kCL>
bool dgrad_prologue_strips(const DepthwiseParams& p, int dtype_bytes) {
  return take_strips<kCL>(p, dtype_bytes) &&
         (!kCL || channels_vectorizable(p.prologue.x, p.g.in_channels, dtype_bytes, kDepthwiseVec));
}

}  // namespace depthwise_launch
}  // namespace xception_ops
