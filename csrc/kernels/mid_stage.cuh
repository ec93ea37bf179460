// Rounding to the dtype and the separable op's mid stage, shared by the depthwise kernels (kernels/depthwise.cuh,
// which apply the mid stage as their forward stores, DepthwiseParams::mid) and the fused separable forwards
// (kernels/separable.cuh, separable_wgmma.cuh): one definition of the arithmetic, so every path gives its bits.
//
// Torch-free, like the kernels that include it; compiles with nvcc or clang for any GPU from sm_37 on, and on the CPU
// through tests/cpp/cuda_emulation.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace xception_ops {
namespace kernels {

// ---- rounding to the dtype (float32 in registers) ----
template <typename T>
__device__ __forceinline__ float round_to(float v);
template <>
__device__ __forceinline__ float round_to<float>(float v) { return v; }
template <>
__device__ __forceinline__ float round_to<__half>(float v) { return __half2float(__float2half_rn(v)); }
// One conversion instruction each way on sm_80+; elsewhere integer ops, as in Elem<__nv_bfloat16>::store (depthwise.cuh).
template <>
__device__ __forceinline__ float round_to<__nv_bfloat16>(float v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __bfloat162float(__float2bfloat16_rn(v));
#else
  const unsigned int u = __float_as_uint(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return v;  // NaN
  return __uint_as_float((u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u);
#endif
}

// The mid stage on one depthwise sum, as every backend computes it (and every path of the fused forwards and the
// depthwise forward kernels): d = the sum rounded to the dtype; with the affine (`affine`: a scale or a shift
// given, the absent one passed as 1 or 0) pre = round(fmaf(d, scale, shift)) in float32, else pre = d untouched
// (fmaf(-0, 1, 0) would turn -0 into +0); then mid 1 relu, 3 relu6, 2 elu (rounded again), 0 none.
template <typename T>
__device__ __forceinline__ float mid_value(float sum, int32_t mid, bool affine, float scale, float shift) {
  float v = round_to<T>(sum);
  if (affine) v = round_to<T>(fmaf(v, scale, shift));
  if (mid == 1) v = fmaxf(v, 0.f);
  if (mid == 3) v = fminf(fmaxf(v, 0.f), 6.f);
  if (mid == 2 && !(v > 0.f)) v = round_to<T>(expm1f(v));
  return v;
}

}  // namespace kernels
}  // namespace xception_ops
