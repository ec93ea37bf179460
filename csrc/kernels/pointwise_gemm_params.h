// What Hopper's pointwise GEMM (kernels/pointwise_gemm.cuh) is told, and its launch plan. Torch-free: filled by
// the staged separable forward (cuda/separable_backend.cpp), launched by cuda/pointwise_launch.cu.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <cstring>

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

// The tile: 128 pixels (two warpgroups of 64) x kN output channels, 64 input channels per pipeline stage; the
// launch configuration (PointwiseGemmConfig) picks kN, the ring's depth and the wgmma groups left in flight.
constexpr int kPwThreads = 256;
constexpr int kPwTileM = 128;
constexpr int kPwTileK = 64;
constexpr int kPwAPitch = kPwTileK + 8;  // elements per A row in shared memory: ldmatrix's 8 rows hit 8 bank groups
constexpr int kPwABytes = kPwTileM * kPwAPitch * 2;

// One build of the kernel: kN output channels per block (64, 128, 192 or 256), a ring of `stages` stages, and
// `in_flight` (0 or 1) groups of wgmma left running while the next stage's are issued. The prefetch distance is
// stages - 1 - in_flight: a stage is refilled only once every warpgroup's products that read it are done.
struct PointwiseGemmConfig {
  int n = 128;
  int stages = 3;
  int in_flight = 0;
};
XO_HOST_DEVICE constexpr int pointwise_b_bytes(int n) { return n * kPwTileK * 2; }  // core matrices
XO_HOST_DEVICE constexpr int pointwise_out_pitch(int n) { return n + 8; }  // elements per row of the output tile
XO_HOST_DEVICE constexpr int pointwise_smem_bytes(PointwiseGemmConfig c) {
  return c.stages * (kPwABytes + pointwise_b_bytes(c.n));
}
// The epilogue's output tile and its statistics scratch, over the ring.
XO_HOST_DEVICE constexpr int pointwise_epilogue_bytes(int n) {
  return kPwTileM * pointwise_out_pitch(n) * 2 + 2 * 8 * n * 4;
}
XO_HOST_DEVICE constexpr bool pointwise_config_ok(PointwiseGemmConfig c) {
  return (c.n == 64 || c.n == 128 || c.n == 192 || c.n == 256) && (c.in_flight == 0 || c.in_flight == 1) &&
         c.stages - 1 - c.in_flight >= 1 && c.stages <= 6 && pointwise_epilogue_bytes(c.n) <= pointwise_smem_bytes(c);
}
// Blocks per SM the shared memory allows (228 KB per SM on Hopper, 1 KB of it reserved per block), capped at 2:
// the registers of 256 threads allow no more at 128 each.
XO_HOST_DEVICE constexpr int pointwise_min_blocks(PointwiseGemmConfig c) {
  return 2 * (pointwise_smem_bytes(c) + 1024) <= 228 * 1024 ? 2 : 1;
}
// The builds the launcher holds (pointwise_launch.cu); the first is the default. Named "NxSTAGESxIN_FLIGHT"
// (XCEPTION_OPS_WGMMA_CONFIG=128x4x1), so that one GPU run can time them all.
// The 192-wide builds are for the tail of the last round of blocks (wave quantization): at Xception's 728 output
// channels and 11552 pixels (728 -> 728 @19^2, 25 of its 34 layers) 128-wide tiles make 546 blocks, 5 on some of
// the H100's 132 SMs (640 channels of work), 256-wide ones 273, 3 on some (768), and 192-wide ones 364, at most 3
// (576).
constexpr PointwiseGemmConfig kPointwiseConfigs[] = {{128, 3, 0}, {128, 4, 1}, {256, 4, 0}, {256, 4, 1}, {64, 4, 1},
                                                     {192, 4, 0}, {192, 4, 1}};
constexpr int kPointwiseConfigCount = sizeof(kPointwiseConfigs) / sizeof(kPointwiseConfigs[0]);

// XCEPTION_OPS_WGMMA_CONFIG=auto picks among these per shape (pick_pointwise_config): one build per tile width,
// with a group in flight where one block runs per SM (no second block to hide its waits).
constexpr PointwiseGemmConfig kPointwiseAutoCandidates[] = {{128, 3, 0}, {256, 4, 1}, {192, 4, 1}};

// The candidate that gives the busiest SM the least work: its tiles spread evenly, ceil(tiles / sms) of them on
// it, times the tile width (two blocks on one SM share its tensor cores, so their tiles count one after the other).
// Ties go to the earlier candidate (the default first). A model of tensor-core-bound blocks, to be checked
// against tools/wgmma_sweep.py's timings.
inline PointwiseGemmConfig pick_pointwise_config(int64_t m, int32_t n, int sms) {
  const int64_t m_tiles = (m + kPwTileM - 1) / kPwTileM;
  const int64_t spread = sms > 0 ? sms : 1;
  PointwiseGemmConfig best = kPointwiseAutoCandidates[0];
  int64_t best_cost = -1;
  for (const PointwiseGemmConfig& c : kPointwiseAutoCandidates) {
    const int64_t tiles = m_tiles * ((n + c.n - 1) / c.n);
    const int64_t cost = (tiles + spread - 1) / spread * c.n;
    if (best_cost < 0 || cost < best_cost) {
      best = c;
      best_cost = cost;
    }
  }
  return best;
}

// A build's name, "NxSTAGESxIN_FLIGHT" ("128x3x0"): written into `buf`, returned.
inline const char* pointwise_config_name(PointwiseGemmConfig c, char (&buf)[32]) {
  std::snprintf(buf, sizeof(buf), "%dx%dx%d", c.n, c.stages, c.in_flight);
  return buf;
}

// The configuration named `name`, if it is one of kPointwiseConfigs: its name, spelled exactly.
inline bool parse_pointwise_config(const char* name, PointwiseGemmConfig* out) {
  char buf[32];
  for (const PointwiseGemmConfig& c : kPointwiseConfigs) {
    if (name != nullptr && std::strcmp(pointwise_config_name(c, buf), name) == 0) {
      *out = c;
      return true;
    }
  }
  return false;
}

XO_HOST_DEVICE inline int64_t pointwise_m_tiles(const PointwiseGemmParams& p) {
  return (p.m + kPwTileM - 1) / kPwTileM;
}
XO_HOST_DEVICE inline int64_t pointwise_n_tiles(const PointwiseGemmParams& p, int n = 128) {
  return (p.n + n - 1) / n;
}

// What the kernel relies on: whole 16-byte vectors of 8 channels everywhere (k, n and lda multiples of 8, every
// pointer 16-byte aligned), at least one row, and a grid of at most 2^31 - 1 blocks.
inline bool pointwise_gemm_ok(const PointwiseGemmParams& p) {
  auto aligned = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  return p.m > 0 && p.n > 0 && p.k > 0 && p.n % 8 == 0 && p.k % 8 == 0 && p.lda % 8 == 0 && p.lda >= p.k &&
         aligned(p.a) && aligned(p.w) && aligned(p.out) && aligned(p.residual) &&
         pointwise_m_tiles(p) * pointwise_n_tiles(p, 64) <= INT32_MAX;
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

// ---- the fused separable forward on wgmma (kernels/separable_wgmma.cuh) ----
// For few depthwise channels (K <= 128: Xception's 147^2 and 74^2 entry layers), where the staged form's depthwise
// result costs as many bytes as x and y together: out = epilogue(mid(dw3x3(prologue(x))) W^T), the depthwise
// result computed straight into the A tile in shared memory and never written out. x channels-last contiguous,
// 3x3 at stride 1, dilation 1, depth multiplier 1; `pw` holds the product's side (m = pixels, n = out channels,
// k = K, w = the pointwise weight, out and the epilogue), its `a` unused.
struct SeparableWgmmaParams {
  PointwiseGemmParams pw;
  const void* x = nullptr;          // (batch, in_h, in_w, K) contiguous, 16-byte aligned
  const void* dw_weight = nullptr;  // (K, 1, 3, 3) contiguous
  const float* in_scale = nullptr;  // the prologue relu?(x * in_scale + in_shift), rounded; nullptr: 1, 0
  const float* in_shift = nullptr;
  bool in_relu = false;
  int32_t mid = 0;  // 0 none, 1 relu, 2 elu, 3 relu6, 4 hardswish (MidActivation)
  const float* mid_scale = nullptr;  // the mid affine before it, per channel (SeparableParams' fields)
  const float* mid_shift = nullptr;
  int64_t in_h = 0, in_w = 0, out_h = 0, out_w = 0;
  int32_t pad_top = 0, pad_left = 0;
};
// The builds: K up to 64 or 128 (zeros past K), N up to 128 or 256 output channels, one block per SM. Shared
// memory: the pointwise weight, two A tiles, the depthwise weights and the four per-channel vectors (prologue and
// mid affine) in float32, the epilogue's scratch.
XO_HOST_DEVICE constexpr int separable_wgmma_smem_bytes(int n, int k) {
  return n * k * 2 + 2 * kPwTileM * k * 2 + k * 9 * 4 + 4 * k * 4 + pointwise_epilogue_bytes(n);
}
inline bool separable_wgmma_ok(const SeparableWgmmaParams& p) {
  auto aligned = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  const PointwiseGemmParams& w = p.pw;
  return w.m > 0 && w.n > 0 && w.n <= 256 && w.n % 8 == 0 && w.k > 0 && w.k <= 128 && w.k % 8 == 0 &&
         aligned(p.x) && aligned(w.w) && aligned(w.out) && aligned(w.residual) && p.in_h > 0 && p.in_w > 0 &&
         w.m == w.m / (p.out_h * p.out_w) * p.out_h * p.out_w && pointwise_m_tiles(w) <= INT32_MAX;
}
// Launches it (cudaErrorInvalidValue where !separable_wgmma_ok or for float32); `sms`: the GPU's multiprocessors,
// the blocks of its persistent grid.
cudaError_t launch_separable_wgmma(const SeparableWgmmaParams& p, DType dtype, int sms, cudaStream_t stream);

// ---- the pointwise weight's gradient on wgmma (pointwise_wgrad_kernel, kernels/pointwise_gemm.cuh) ----
// partial[s] = g[pixels of split s]^T a[pixels of split s]: g [pixels][rows] (grad_y), a [pixels][cols] (the
// depthwise result), float32 [splits][rows][cols] partial products over contiguous ranges of pixels, which
// launch_reduce_rows then sums in split order (deterministic; no atomics).
struct PointwiseWgradParams {
  const void* g = nullptr;  // rows ldg elements apart, 16-byte aligned
  const void* a = nullptr;  // rows lda elements apart, 16-byte aligned
  float* partial = nullptr;
  int64_t pixels = 0, ldg = 0, lda = 0;
  int32_t rows = 0, cols = 0;  // output channels, depthwise channels
  int32_t splits = 1;
  int64_t split_pixels = 0;  // pixels per split, a multiple of kPwTileK
};
constexpr int kWgradTile = 128;   // a block's rows and columns of the product
constexpr int kWgradStages = 3;  // 96 KB of ring: two blocks per SM
XO_HOST_DEVICE constexpr int pointwise_wgrad_smem_bytes() { return kWgradStages * 2 * kPwTileK * kWgradTile * 2; }
// The splits for `sms` multiprocessors, about two blocks per SM over the output tiles: of the counts just below
// and just above that, the one whose busiest SM sums the fewest stages of pixels (its blocks x stages per split;
// ties to fewer splits, fewer partials to sum). 8 splits of the 36 tiles of Xception's 728 x 728 weight made 288
// blocks for the H100's 264 places, so 24 SMs ran three blocks of 23 stages (69) where 7 splits run two of 26 (52)
// on each. At most 64 splits (one level of launch_reduce_rows) unless the output has so few tiles that 64 would
// leave SMs idle (the entry flow's 128 x 64 weight is one tile: 64 blocks on 132 SMs), then a block per SM, whose
// partials are small; each split at least 4 stages of pixels.
inline void pointwise_wgrad_plan(PointwiseWgradParams& p, int sms) {
  const int64_t tiles = ((p.rows + kWgradTile - 1) / kWgradTile) * ((p.cols + kWgradTile - 1) / kWgradTile);
  const int64_t stages = (p.pixels + kPwTileK - 1) / kPwTileK;
  const int64_t multiprocessors = sms > 0 ? sms : 1;
  const int64_t cap = tiles * 64 < multiprocessors ? (multiprocessors + tiles - 1) / tiles : 64;
  auto clamp = [&](int64_t s) {
    if (s > cap) s = cap;
    if (s > stages / 4) s = stages / 4;
    return s < 1 ? int64_t{1} : s;
  };
  auto busiest = [&](int64_t s) {  // stages summed by the SM with the most blocks
    const int64_t per = (stages + s - 1) / s;
    const int64_t blocks = tiles * ((stages + per - 1) / per);
    return (blocks + multiprocessors - 1) / multiprocessors * per;
  };
  const int64_t below = clamp(2 * multiprocessors / tiles), above = clamp((2 * multiprocessors + tiles - 1) / tiles);
  const int64_t splits = busiest(above) < busiest(below) ? above : below;
  const int64_t per = (stages + splits - 1) / splits;
  p.split_pixels = per * kPwTileK;
  p.splits = static_cast<int32_t>((p.pixels + p.split_pixels - 1) / p.split_pixels);
}
inline bool pointwise_wgrad_ok(const PointwiseWgradParams& p) {
  auto aligned = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  return p.pixels > 0 && p.rows > 0 && p.cols > 0 && p.rows % 8 == 0 && p.cols % 8 == 0 && p.ldg % 8 == 0 &&
         p.lda % 8 == 0 && p.ldg >= p.rows && p.lda >= p.cols && aligned(p.g) && aligned(p.a) &&
         p.partial != nullptr && p.splits >= 1 && p.split_pixels % kPwTileK == 0 &&
         p.split_pixels * p.splits >= p.pixels;
}
cudaError_t launch_pointwise_wgrad(const PointwiseWgradParams& p, DType dtype, cudaStream_t stream);

// Launches the kernel for 16-bit dtypes in configuration `config` (one of kPointwiseConfigs), on the stream;
// cudaErrorInvalidValue for float32, another configuration, or where !pointwise_gemm_ok.
cudaError_t launch_pointwise_wgmma(const PointwiseGemmParams& p, DType dtype, PointwiseGemmConfig config,
                                   cudaStream_t stream);

}  // namespace xception_ops
