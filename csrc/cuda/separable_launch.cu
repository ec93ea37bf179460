// The fused separable forward's entry point: check the plan, dispatch on the dtype and GEMM mode to the
// instantiations in instances/separable_forward_*.cu (kernel choices: separable_launch.cuh), then reduce the
// statistics; cudaGetLastError() is checked after every launch. No torch headers here.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <mutex>

#include "cuda/instance_entries.h"
#include "kernels/separable_params.h"

namespace xception_ops {
namespace {

// The GEMM modes each dtype is built with: FFMA always; for fp16 / bf16 tensor cores through mma.sync and
// through wmma; TF32 for float32.
template <typename T>
cudaError_t forward_typed(const SeparableParams& p, PointwiseMath math, int groups, cudaStream_t stream) {
  using separable_launch::forward_math;
  if (math == PointwiseMath::Ffma) return forward_math<T, PointwiseMath::Ffma>(p, groups, stream);
  if constexpr (sizeof(T) == 4) {
    if (math == PointwiseMath::Tf32) return forward_math<T, PointwiseMath::Tf32>(p, groups, stream);
  } else {
    if (math == PointwiseMath::TensorCore) return forward_math<T, PointwiseMath::TensorCore>(p, groups, stream);
    if (math == PointwiseMath::TensorCoreWmma) return forward_math<T, PointwiseMath::TensorCoreWmma>(p, groups, stream);
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
