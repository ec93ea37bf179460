// The fused separable forward's kernel choices (kernels/separable.cuh) for one dtype and GEMM mode: the
// specialization and its shared memory, launched on the given stream; cudaGetLastError() after every launch.
// Included only by the instantiation files in instances/ (one per dtype and mode). No torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/instance_entries.h"
#include "cuda/shared_memory_opt_in.h"
#include "kernels/separable.cuh"
#include "kernels/separable_params.h"

namespace xception_ops {
namespace separable_launch {

using kernels::separable_forward_kernel;

template <typename T, PointwiseMath kMath, int KH, int KW>
cudaError_t launch_forward_kernel(const SeparableParams& p, int groups, cudaStream_t stream) {
  const SeparableSmem smem = separable_smem(p, p.a_pitch, kMath, static_cast<int>(sizeof(T)));
  auto* kernel = &separable_forward_kernel<T, kMath, KH, KW>;
  if constexpr (kMath == PointwiseMath::TensorCore && KH == KW && (KH == 3 || KH == 1)) {
    // Shared memory for one block per SM only: the build without the 128-register cap (no spills), which is
    // also the one that takes a plan's shallower ring or unpadded accumulator tile. Run tiles: their builds.
    DeviceCaps caps;
    const cudaError_t err = current_device_caps(&caps);
    if (err != cudaSuccess) return err;
    const bool one_block = 2 * smem.total > caps.smem_per_sm || p.weight_stages != 0 || p.c_pitch != 0;
    if constexpr (KH == 3) {
      if (p.run_tiles) {
        kernel = one_block ? &separable_forward_kernel<T, kMath, KH, KW, 1, true>
                           : &separable_forward_kernel<T, kMath, KH, KW, 2, true>;
      }
    } else if (p.run_tiles) {
      return cudaErrorInvalidValue;
    }
    if (one_block && !p.run_tiles) kernel = &separable_forward_kernel<T, kMath, KH, KW, 1>;
  } else {
    if (p.run_tiles) return cudaErrorInvalidValue;  // only the mma.sync path is built for run tiles
  }
  if (const cudaError_t err = opt_in_shared_memory(kernel, static_cast<int>(smem.total)); err != cudaSuccess) {
    return err;
  }
  const dim3 grid(static_cast<unsigned int>(separable_pixel_tiles(p)),
                  static_cast<unsigned int>(groups));
  kernel<<<grid, kSepThreads, smem.total, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, PointwiseMath kMath>
cudaError_t forward_math(const SeparableParams& p, int groups, cudaStream_t stream) {
  if (p.a_source != nullptr) {
    // The staged form (the depthwise tile read from memory; the mma.sync GEMM only): builds whose depthwise
    // stage, never run here, is 1x1, so that it does not raise their registers.
    if constexpr (kMath == PointwiseMath::TensorCore) return launch_forward_kernel<T, kMath, 1, 1>(p, groups, stream);
    return cudaErrorInvalidValue;
  }
  if (p.g.kernel_h == 3 && p.g.kernel_w == 3) return launch_forward_kernel<T, kMath, 3, 3>(p, groups, stream);
  return launch_forward_kernel<T, kMath, 0, 0>(p, groups, stream);
}

}  // namespace separable_launch
}  // namespace xception_ops
