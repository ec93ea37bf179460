// What Hopper's pointwise GEMM (kernels/pointwise_gemm.cuh) is told, and its launch plan. Torch-free: filled by
// the staged separable forward (cuda/separable_backend.cpp), launched by cuda/pointwise_launch.cu.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "depthwise_params.h"  // DType, XO_HOST_DEVICE

namespace xception_ops {

// out = epilogue(A W^T): A [m][k] (the staged forward's depthwise result, channels-last: one row per pixel),
// W [n][k] (the pointwise weight), out [m][n] (channels-last). The epilogue is the fused kernel's
// (kernels/separable.cuh, epilogue_tile): y = acc rounded to the dtype; z = y * scale + shift rounded, + residual
// rounded, ReLU; with statistics, per output channel float32 sums of y and y^2 over each tile's pixels.
struct PointwiseGemmParams {
  const void* a = nullptr;         // rows lda elements apart; 16-byte aligned
  const void* w = nullptr;         // contiguous [n][k]
  void* out = nullptr;             // contiguous [m][n]
  const void* residual = nullptr;  // contiguous [m][n], or nullptr
  const float* scale = nullptr;    // per output channel, float32; nullptr: 1
  const float* shift = nullptr;    // nullptr: 0
  bool relu = false;
  float* stats_partial = nullptr;  // [m tiles][2][n]: sums of y, then of y^2; nullptr: no statistics
  int64_t m = 0;
  int64_t lda = 0;
  int32_t n = 0;
  int32_t k = 0;
};

// The tile: 128 pixels (two warpgroups of 64) x 128 output channels, 64 input channels per pipeline stage.
constexpr int kPwThreads = 256;
constexpr int kPwTileM = 128;
constexpr int kPwTileN = 128;
constexpr int kPwTileK = 64;
constexpr int kPwStages = 3;
constexpr int kPwAPitch = kPwTileK + 8;  // elements per A row in shared memory: ldmatrix's 8 rows hit 8 bank groups
constexpr int kPwABytes = kPwTileM * kPwAPitch * 2;
constexpr int kPwBBytes = kPwTileN * kPwTileK * 2;  // core matrices, see pointwise_gemm.cuh
constexpr int kPwStageBytes = kPwABytes + kPwBBytes;
constexpr int kPwOutPitch = kPwTileN + 8;  // elements per row of the epilogue's output tile
constexpr int kPwSmemBytes = kPwStages * kPwStageBytes;
static_assert(kPwTileM * kPwOutPitch * 2 + 2 * 8 * kPwTileN * 4 <= kPwSmemBytes,
              "the epilogue's tiles fit in the pipeline's buffers");

XO_HOST_DEVICE inline int64_t pointwise_m_tiles(const PointwiseGemmParams& p) {
  return (p.m + kPwTileM - 1) / kPwTileM;
}
XO_HOST_DEVICE inline int64_t pointwise_n_tiles(const PointwiseGemmParams& p) {
  return (p.n + kPwTileN - 1) / kPwTileN;
}

// What the kernel relies on: whole 16-byte vectors of 8 channels everywhere (k, n and lda multiples of 8, every
// pointer 16-byte aligned), at least one row, and a grid of at most 2^31 - 1 blocks.
inline bool pointwise_gemm_ok(const PointwiseGemmParams& p) {
  auto aligned = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  return p.m > 0 && p.n > 0 && p.k > 0 && p.n % 8 == 0 && p.k % 8 == 0 && p.lda % 8 == 0 && p.lda >= p.k &&
         aligned(p.a) && aligned(p.w) && aligned(p.out) && aligned(p.residual) &&
         pointwise_m_tiles(p) * pointwise_n_tiles(p) <= INT32_MAX;
}

// Whether this build holds the kernel for this GPU: compiled for sm_90a (setup.py / CMake define
// XCEPTION_OPS_SM90A when TORCH_CUDA_ARCH_LIST has 9.0a), and the device is compute capability 9.0.
inline bool pointwise_wgmma_available(int cc_major, int cc_minor) {
#ifdef XCEPTION_OPS_SM90A
  return cc_major == 9 && cc_minor == 0;
#else
  (void)cc_major, (void)cc_minor;
  return false;
#endif
}

// Launches the kernel for 16-bit dtypes (cudaErrorInvalidValue for others, or where !pointwise_gemm_ok).
cudaError_t launch_pointwise_wgmma(const PointwiseGemmParams& p, DType dtype, cudaStream_t stream);

}  // namespace xception_ops
