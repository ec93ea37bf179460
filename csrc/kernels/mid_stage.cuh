// Rounding to the dtype and the separable op's mid stage, shared by the depthwise kernels (kernels/depthwise.cuh,
// which apply the mid stage as their forward stores, DepthwiseParams::mid) and the fused separable forwards
// (kernels/separable.cuh, separable_wgmma.cuh): one definition of the arithmetic, so every path gives its bits.
//
// Torch-free, like the kernels that include it; compiles with nvcc or clang for any GPU from sm_37 on, and on the CPU
// through tests/cpp/cuda_emulation.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
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

// ---- ReLU and ReLU6 as PyTorch's: NaN stays NaN ----
// fmaxf(NaN, 0) is 0: a diverged activation would come out as zeros, hidden from the loss and from AMP's overflow
// check (torch.relu and F.relu6 keep the NaN). max.NaN / min.NaN (sm_80+) are one instruction each, as fmaxf is;
// elsewhere a compare that is true for NaN (v <= 0 is false for it) and a select. -0 gives +0 either way.
__device__ __forceinline__ float relu(float v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, 0f00000000;" : "=f"(r) : "f"(v));
  return r;
#else
  return !(v <= 0.f) ? v : 0.f;
#endif
}
__device__ __forceinline__ float relu6(float v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("min.NaN.f32 %0, %1, 0f40C00000;" : "=f"(r) : "f"(relu(v)));
  return r;
#else
  v = relu(v);
  return v > 6.f ? 6.f : v;
#endif
}

// t / 6 rounded to nearest, as IEEE's division gives it, without a division: the quotient's correctly rounded
// reciprocal product, corrected once by an exact FMA residual. That is RN(t / 6) for every quotient of a normal
// magnitude; below 2^-123 (subnormal quotients) it is computed in integers of 2^-149, half to even. Checked against
// t / 6.f on every one of the 2^32 float32 bit patterns (benchmarks/RESULTS.md, session 17). A division in its place
// made ptxas spill in the fused forward's 3x3 builds (0 -> 172 bytes): its slow path is a subroutine.
__host__ __device__ __forceinline__ float div6_rn(float t) {
  const float q = t * (1.f / 6.f);
  if (!(fabsf(t) <= 0x1.fffffep127f)) return q;  // inf and NaN
  if (fabsf(t) >= 0x1p-123f) return fmaf(fmaf(-q, 6.f, t), 1.f / 6.f, q);
  const int n = static_cast<int>(t * 0x1p100f * 0x1p49f);  // exact: t is a multiple of 2^-149, below 2^26 of them
  const int a = n < 0 ? -n : n;
  int qi = a / 6;
  const int r = a - 6 * qi;
  if (r > 3 || (r == 3 && (qi & 1))) ++qi;
  return copysignf(static_cast<float>(qi) * 0x1p-149f, t);
}

// The mid stage on one depthwise sum, as every backend computes it (and every path of the fused forwards and the
// depthwise forward kernels): d = the sum rounded to the dtype; with the affine (`affine`: a scale or a shift
// given, the absent one passed as 1 or 0) pre = round(fmaf(d, scale, shift)) in float32, else pre = d untouched
// (fmaf(-0, 1, 0) would turn -0 into +0); then mid 1 relu, 3 relu6, 2 elu and 4 hardswish (each rounded again:
// v * clamp(v + 3, 0, 6) / 6 in PyTorch's order of operations, the division's IEEE result: div6_rn), 0 none.
template <typename T>
__device__ __forceinline__ float mid_value(float sum, int32_t mid, bool affine, float scale, float shift) {
  float v = round_to<T>(sum);
  if (affine) v = round_to<T>(fmaf(v, scale, shift));
  if (mid == 1) v = relu(v);
  if (mid == 3) v = relu6(v);
  if (mid == 2 && !(v > 0.f)) v = round_to<T>(expm1f(v));
  if (mid == 4) v = round_to<T>(div6_rn(v * fminf(fmaxf(v + 3.f, 0.f), 6.f)));
  return v;
}

}  // namespace kernels
}  // namespace xception_ops
