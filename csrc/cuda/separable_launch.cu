// Launchers of the fused separable forward (kernels/separable.cuh): pick the specialization, size the shared
// memory, launch on the given stream and reduce the statistics; cudaGetLastError() is checked after every
// launch. No torch headers here, so this file compiles quickly and also outside a torch build.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <mutex>

#include "kernels/separable.cuh"
#include "kernels/separable_params.h"

namespace xception_ops {
namespace {

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
  if (smem.total > 48 * 1024) {  // above the default limit, a kernel must opt in
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem.total));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned int>(separable_pixel_tiles(p)),
                  static_cast<unsigned int>(groups));
  kernel<<<grid, kSepThreads, smem.total, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, PointwiseMath kMath>
cudaError_t forward_for_math(const SeparableParams& p, int groups, cudaStream_t stream) {
  if (p.a_source != nullptr) {
    // The staged form (the depthwise tile read from memory; the mma.sync GEMM only): builds whose depthwise
    // stage, never run here, is 1x1, so that it does not raise their registers.
    if constexpr (kMath == PointwiseMath::TensorCore) return launch_forward_kernel<T, kMath, 1, 1>(p, groups, stream);
    return cudaErrorInvalidValue;
  }
  if (p.g.kernel_h == 3 && p.g.kernel_w == 3) return launch_forward_kernel<T, kMath, 3, 3>(p, groups, stream);
  return launch_forward_kernel<T, kMath, 0, 0>(p, groups, stream);
}

// The GEMM modes each dtype is built with: FFMA always; for fp16 / bf16 tensor cores through mma.sync and
// through wmma; TF32 for float32.
template <typename T>
cudaError_t forward_typed(const SeparableParams& p, PointwiseMath math, int groups, cudaStream_t stream) {
  if (math == PointwiseMath::Ffma) return forward_for_math<T, PointwiseMath::Ffma>(p, groups, stream);
  if constexpr (sizeof(T) == 4) {
    if (math == PointwiseMath::Tf32) return forward_for_math<T, PointwiseMath::Tf32>(p, groups, stream);
  } else {
    if (math == PointwiseMath::TensorCore) return forward_for_math<T, PointwiseMath::TensorCore>(p, groups, stream);
    if (math == PointwiseMath::TensorCoreWmma) {
      return forward_for_math<T, PointwiseMath::TensorCoreWmma>(p, groups, stream);
    }
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_separable_forward(const SeparableParams& p, DType dtype, PointwiseMath math, int channel_groups,
                                     float* sum, float* sumsq, cudaStream_t stream) {
  const Conv2dGeometry& g = p.g;
  const int64_t tiles = separable_pixel_tiles(p);
  if (tiles == 0 || g.out_channels == 0) {  // nothing to write but empty sums
    if (sum != nullptr && sumsq != nullptr && g.out_channels > 0) {
      cudaError_t err = cudaMemsetAsync(sum, 0, g.out_channels * sizeof(float), stream);
      if (err == cudaSuccess) err = cudaMemsetAsync(sumsq, 0, g.out_channels * sizeof(float), stream);
      return err;
    }
    return cudaSuccess;
  }
  if (tiles > INT_MAX || p.k_chunk < kSepKStep || p.k_chunk % kSepKStep != 0 || p.a_pitch < p.k_chunk ||
      channel_groups < 1 || channel_groups > 65535 || g.dw_channels() > INT_MAX) {
    return cudaErrorInvalidValue;
  }
  cudaError_t err = cudaErrorInvalidValue;
  switch (dtype) {
    case DType::Float32: err = forward_typed<float>(p, math, channel_groups, stream); break;
    case DType::Float16: err = forward_typed<__half>(p, math, channel_groups, stream); break;
    case DType::BFloat16: err = forward_typed<__nv_bfloat16>(p, math, channel_groups, stream); break;
  }
  if (err != cudaSuccess || p.stats_partial == nullptr) return err;
  // The per-tile rows of sums of y, then of y^2, summed in a fixed order (the workspace holds the scratch rows).
  return launch_reduce_rows(p.stats_partial, separable_pixel_tiles(p), 2 * g.out_channels,
                            g.out_channels, sum, sumsq, stream);
}

cudaError_t current_device_caps(DeviceCaps* caps) {
  // The attributes never change for a device: queried once per device (the op calls this on every launch).
  constexpr int kMaxDevices = 64;
  static std::once_flag once[kMaxDevices];
  static DeviceCaps cached[kMaxDevices];
  static cudaError_t status[kMaxDevices];
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < 0 || device >= kMaxDevices) return cudaErrorInvalidDevice;
  std::call_once(once[device], [device] {
    DeviceCaps& c = cached[device];
    int smem = 0;
    cudaError_t e = cudaDeviceGetAttribute(&c.major, cudaDevAttrComputeCapabilityMajor, device);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&c.minor, cudaDevAttrComputeCapabilityMinor, device);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&c.sms, cudaDevAttrMultiProcessorCount, device);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    c.smem_optin = static_cast<size_t>(smem);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
    c.smem_per_sm = static_cast<size_t>(smem);
    status[device] = e;
  });
  *caps = cached[device];
  return status[device];
}

}  // namespace xception_ops
