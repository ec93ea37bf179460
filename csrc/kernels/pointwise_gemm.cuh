// Hopper's pointwise GEMM with the separable epilogue (PointwiseGemmParams, kernels/pointwise_gemm_params.h): the
// staged forward's product of its depthwise result and the pointwise weight on wgmma, with the folded BatchNorm,
// residual, ReLU and the BatchNorm statistics in the same kernel, where cuBLAS's product needed a pass over y
// after it for them. Torch-free; the kernel body exists for sm_90a (and in the CPU emulation of the tests).
//
// A block owns 128 pixels x kN output channels: two warpgroups of 64 pixels each, one wgmma.m64nNk16 chain per
// warpgroup (kN / 2 float32 accumulators per thread). kN, the ring's depth and the groups left in flight are the
// build's PointwiseGemmConfig (kernels/pointwise_gemm_params.h).
//   Pipeline: a ring of kStages stages of 64 input channels, filled by cp.async from every thread (zeros stored
//   past the ends), stages - 1 - in_flight ahead. Per stage, each warpgroup issues four wgmma reading B through
//   descriptors, and A either from registers (in_flight = 0: each warp takes its four 16 x 16 fragments with
//   ldmatrix, A's rows padded to kPwAPitch as in the mma.sync GEMM) or, with in_flight = 1, from shared memory
//   through descriptors too (A stored in core matrices like B): ptxas serializes register-A products when the next
//   fragments are loaded while a group runs, so only the shared-memory form keeps one group in flight.
//   B's stage holds W [kN][64] as core matrices, 8 output channels x 8 input channels each (128 contiguous bytes),
//   the 8 K-neighbours of a core matrix 128 bytes apart and N-neighbours 1024: 16-byte chunk c of the stage is
//   output channel 8 (c / 64) + c % 8, input channels 8 ((c / 8) % 8) .. + 8, so the copies are linear in c. A in
//   core matrices is the same with pixels for output channels.
//   Epilogue: from the accumulators (d[4 j + e] = row g + 8 (e / 2), column 8 j + 2 t + e % 2): y rounded, the
//   statistics summed across the 8 rows of a warp's lanes by shuffles and across the 8 warps in order through
//   shared memory (one partial row per pixel tile, reduced by launch_reduce_rows: bitwise reproducible); the
//   affine result rounded into a shared tile; then 16-byte rows of 8 channels, + residual, ReLU, to memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "pointwise_gemm_params.h"
#include "separable.cuh"  // ldmatrix_x4, cp_async_*, round_to, from_bits16, bits16, pack2_rn
#include "wgmma.cuh"

namespace xception_ops {
namespace kernels {

#if defined(XO_WGMMA) || defined(XO_EMULATED_WGMMA)
#define XO_POINTWISE_WGMMA 1
#endif

#if defined(XO_POINTWISE_WGMMA)
// The sum over the 8 lanes of a warp that share lane % 4 (the 8 rows g of one column pair), in a fixed order.
__device__ __forceinline__ float sum_over_rows(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 4);
  v += __shfl_xor_sync(0xffffffffu, v, 8);
  v += __shfl_xor_sync(0xffffffffu, v, 16);
  return v;
}

// One 16-byte chunk of a stage: copied by cp.async where it exists, zeros stored where it does not.
template <typename T>
__device__ __forceinline__ void stage_chunk(T* dst, const T* src, bool exists) {
  if (exists) {
    cp_async_16(dst, src);
  } else {
    *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
  }
}

// Zeroed accumulators, fenced so that the first wgmma sees the zeros.
template <int kCount>
__device__ __forceinline__ void zero_accumulators(float (&acc)[kCount]) {
#pragma unroll
  for (int i = 0; i < kCount; ++i) acc[i] = 0.f;
  wgmma_fence_operands(acc);
}

// The epilogue of a 128 x kN tile from a warpgroup pair's accumulators (d[4 j + e] = row g + 8 (e / 2), column
// 8 j + 2 t + e % 2 of the warp's 16 rows): y rounded, the statistics of y (shuffles within a warp, warp order
// across the block: one partial row per pixel tile), the affine result rounded into the shared tile, then 16-byte
// rows of 8 channels + residual, ReLU, to memory. `scratch`: pointwise_epilogue_bytes(kN) of shared memory, free
// for it; it is free again when this returns. Every thread of the block calls it.
template <typename T, int kN>
__device__ __forceinline__ void wgmma_tile_epilogue(const PointwiseGemmParams& p, const float (&acc)[kN / 2],
                                                    unsigned char* scratch, int64_t m_tile, int32_t n0) {
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, group = warp / 4;
  const int64_t m0 = m_tile * kPwTileM;
  constexpr int kOutPitch = pointwise_out_pitch(kN);
  T* tile = reinterpret_cast<T*>(scratch);                                          // [kPwTileM][kOutPitch]
  float* warp_sums = reinterpret_cast<float*>(scratch + kPwTileM * kOutPitch * 2);  // [2][8 warps][kN]
  const int g = lane / 4, t = lane % 4;
  const int row0 = 64 * group + 16 * (warp % 4) + g;  // and row0 + 8
  const bool ok0 = m0 + row0 < p.m, ok1 = m0 + row0 + 8 < p.m;
  const bool stats = p.stats_partial != nullptr;
  const bool affine = p.scale != nullptr || p.shift != nullptr;
#pragma unroll
  for (int j = 0; j < kN / 8; ++j) {
    const int col = 8 * j + 2 * t;
    const bool col_ok = n0 + col < p.n;  // n is a multiple of 8: both columns of the pair or neither
    float y[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) y[e] = col_ok && (e < 2 ? ok0 : ok1) ? round_to<T>(acc[4 * j + e]) : 0.f;
    if (stats) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float s = sum_over_rows(y[e] + y[e + 2]);
        const float ss = sum_over_rows(fmaf(y[e + 2], y[e + 2], y[e] * y[e]));
        if (g == 0) {
          warp_sums[warp * kN + col + e] = s;
          warp_sums[(8 + warp) * kN + col + e] = ss;
        }
      }
    }
    if (affine && col_ok) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float scale = p.scale != nullptr ? p.scale[n0 + col + e] : 1.f;
        const float shift = p.shift != nullptr ? p.shift[n0 + col + e] : 0.f;
        y[e] = round_to<T>(fmaf(y[e], scale, shift));
        y[e + 2] = round_to<T>(fmaf(y[e + 2], scale, shift));
      }
    }
    *reinterpret_cast<unsigned*>(tile + row0 * kOutPitch + col) = bits16<T>(y[0]) | (bits16<T>(y[1]) << 16);
    *reinterpret_cast<unsigned*>(tile + (row0 + 8) * kOutPitch + col) = bits16<T>(y[2]) | (bits16<T>(y[3]) << 16);
  }
  __syncthreads();

  if (stats && tid < kN && n0 + tid < p.n) {  // the 8 warps' sums in order: rows 0-15, 16-31, ...
    float s = 0.f, ss = 0.f;
#pragma unroll
    for (int v = 0; v < 8; ++v) {
      s += warp_sums[v * kN + tid];
      ss += warp_sums[(8 + v) * kN + tid];
    }
    float* partial = p.stats_partial + m_tile * 2 * static_cast<int64_t>(p.n);
    partial[n0 + tid] = s;
    partial[p.n + n0 + tid] = ss;
  }

  // 16-byte rows of 8 channels: chunk q = tid + 256 i is row q / (kN / 8), channels 8 (q % (kN / 8)) ..
  T* __restrict__ out = static_cast<T*>(p.out);
  const T* __restrict__ res = static_cast<const T*>(p.residual);
#pragma unroll 2
  for (int q = tid; q < kPwTileM * kN / 8; q += kPwThreads) {
    const int row = q / (kN / 8), col = 8 * (q % (kN / 8));
    if (m0 + row >= p.m || n0 + col >= p.n) continue;
    const int64_t offset = (m0 + row) * p.n + n0 + col;
    const uint4 packed = *reinterpret_cast<const uint4*>(tile + row * kOutPitch + col);
    const unsigned words[4] = {packed.x, packed.y, packed.z, packed.w};
    float z[8];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      z[2 * i] = from_bits16<T>(words[i] & 0xffffu);
      z[2 * i + 1] = from_bits16<T>(words[i] >> 16);
    }
    if (res != nullptr) {
      const uint4 r = load_readonly(reinterpret_cast<const uint4*>(res + offset));
      const unsigned rw[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        z[2 * i] = round_to<T>(z[2 * i] + from_bits16<T>(rw[i] & 0xffffu));
        z[2 * i + 1] = round_to<T>(z[2 * i + 1] + from_bits16<T>(rw[i] >> 16));
      }
    }
    if (p.relu) {
#pragma unroll
      for (int i = 0; i < 8; ++i) z[i] = kernels::relu(z[i]);
    }
    *reinterpret_cast<uint4*>(out + offset) =
        make_uint4(bits16<T>(z[0]) | (bits16<T>(z[1]) << 16), bits16<T>(z[2]) | (bits16<T>(z[3]) << 16),
                   bits16<T>(z[4]) | (bits16<T>(z[5]) << 16), bits16<T>(z[6]) | (bits16<T>(z[7]) << 16));
  }
  __syncthreads();  // the tile is read: scratch is free
}
#endif

// kMinBlocks: the blocks per SM the registers must allow (2 where the ring leaves room for two: 128 registers).
template <typename T, int kN, int kStages, int kInFlight, int kMinBlocks>
__global__ void __launch_bounds__(kPwThreads, kMinBlocks) pointwise_wgmma_kernel(const PointwiseGemmParams p) {
#if defined(XO_POINTWISE_WGMMA)
  static_assert(sizeof(T) == 2, "16-bit operands");
  static_assert(pointwise_config_ok(PointwiseGemmConfig{kN, kStages, kInFlight}), "a configuration the plan allows");
  constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
  constexpr int kStageBytes = kPwABytes + pointwise_b_bytes(kN);
  constexpr int kAhead = kStages - 1 - kInFlight;  // stages requested ahead of the one in use
  XO_EXTERN_SHARED __align__(128) unsigned char smem[];

  const int64_t n_tiles = (p.n + kN - 1) / kN;
  const int64_t m_tile = blockIdx.x / n_tiles;
  const int64_t m0 = m_tile * kPwTileM;
  const int32_t n0 = static_cast<int32_t>(blockIdx.x % n_tiles) * kN;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, group = warp / 4;
  const T* __restrict__ a = static_cast<const T*>(p.a);
  const T* __restrict__ w = static_cast<const T*>(p.w);
  const int32_t k_tiles = (p.k + kPwTileK - 1) / kPwTileK;

  auto stage_a = [&](int s) { return reinterpret_cast<T*>(smem + s * kStageBytes); };
  auto stage_b = [&](int s) { return reinterpret_cast<T*>(smem + s * kStageBytes + kPwABytes); };

  // This thread's 16-byte chunks of every stage, c = tid + 256 r: of B, output channel 8 (c / 64) + c % 8, input
  // channels 8 ((c / 8) % 8) .., at byte 16 c of the stage; of A in core matrices (kSmemA) likewise with pixels,
  // else row c / 8, input channels 8 (c % 8) .. of the padded rows. Their sources advance by kPwTileK elements per
  // stage; which rows and channels exist is fixed.
  constexpr bool kSmemA = kInFlight > 0;
  constexpr int kAChunks = kPwTileM * kPwTileK / 8 / kPwThreads;
  constexpr int kBChunks = kN * kPwTileK / 8 / kPwThreads;
  const T* a_src[kAChunks];
  const T* b_src[kBChunks];
  bool a_row_ok[kAChunks], b_row_ok[kBChunks];
#pragma unroll
  for (int r = 0; r < kAChunks; ++r) {
    const int c = tid + kPwThreads * r;
    const int64_t row = m0 + (kSmemA ? 8 * (c / 64) + c % 8 : c / 8);
    a_row_ok[r] = row < p.m;
    a_src[r] = a + (a_row_ok[r] ? row : 0) * p.lda + 8 * (kSmemA ? (c / 8) % 8 : c % 8);
  }
#pragma unroll
  for (int r = 0; r < kBChunks; ++r) {
    const int c = tid + kPwThreads * r;
    const int32_t ch = n0 + 8 * (c / 64) + c % 8;
    b_row_ok[r] = ch < p.n;
    b_src[r] = w + static_cast<int64_t>(b_row_ok[r] ? ch : 0) * p.k + 8 * ((c / 8) % 8);
  }
  auto load_stage = [&](int32_t kt, int s) {
    T* as = stage_a(s);
    T* bs = stage_b(s);
    const int32_t k0 = kt * kPwTileK;
#pragma unroll
    for (int r = 0; r < kAChunks; ++r) {
      const int c = tid + kPwThreads * r;
      T* dst = kSmemA ? as + 8 * c : as + (c / 8) * kPwAPitch + 8 * (c % 8);
      stage_chunk(dst, a_src[r] + k0, a_row_ok[r] && k0 + 8 * (kSmemA ? (c / 8) % 8 : c % 8) < p.k);
    }
#pragma unroll
    for (int r = 0; r < kBChunks; ++r) {
      const int c = tid + kPwThreads * r;
      stage_chunk(bs + 8 * c, b_src[r] + k0, b_row_ok[r] && k0 + 8 * ((c / 8) % 8) < p.k);
    }
  };

  // The first kAhead stages, one cp.async group each (empty past the last).
#pragma unroll
  for (int s = 0; s < kAhead; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();
  }

  float acc[kN / 2];
  zero_accumulators(acc);

  // ldmatrix.x4's row addresses: lane l gives row l % 16, input channels 8 (l / 16) .. of its warp's 16 rows.
  const int a_row = 64 * group + 16 * (warp % 4) + lane % 16, a_col = 8 * (lane / 16);
  // Stage kt: wait for it, publish it, request stage kt + kAhead into the buffer of a stage whose products every
  // warpgroup has finished (kt - 1 - kInFlight), issue the products (A from registers taken into `af`, or from
  // shared memory), and leave kInFlight groups running.
  auto step = [&](int32_t kt, unsigned (&af)[kPwTileK / 16][4]) {
    cp_async_wait<kAhead - 1>();  // this thread's chunks of stage kt have landed
    fence_proxy_async();          // ... and are visible to wgmma's reads
    __syncthreads();              // everyone's have; every warpgroup is done with stage kt - 1 - kInFlight
    {
      const int32_t next = kt + kAhead;
      if (next < k_tiles) load_stage(next, next % kStages);
      cp_async_commit();
    }
    const int s = kt % kStages;
    const uint32_t b_base = smem_address(stage_b(s));
    // K step ks: core matrices 2 ks and 2 ks + 1 along K (128 bytes apart), N (M) groups 1024 bytes apart.
    constexpr uint32_t kLead = 128, kStride = kPwTileK / 8 * 128;
    if constexpr (kSmemA) {
      const uint32_t a_base = smem_address(stage_a(s)) + 64 / 8 * kStride * group;  // the warpgroup's 64 rows
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kPwTileK / 16; ++ks) {
        wgmma_ss<kN, kBf16>(acc, wgmma_desc(a_base + 256 * ks, kLead, kStride),
                            wgmma_desc(b_base + 256 * ks, kLead, kStride));
      }
    } else {
      const T* as = stage_a(s);
#pragma unroll
      for (int ks = 0; ks < kPwTileK / 16; ++ks) ldmatrix_x4(af[ks], as + a_row * kPwAPitch + 16 * ks + a_col);
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kPwTileK / 16; ++ks) {
        wgmma_rs<kN, kBf16>(acc, af[ks], wgmma_desc(b_base + 256 * ks, kLead, kStride));
      }
    }
    wgmma_commit();
    wgmma_wait<kInFlight>();
  };
  unsigned af[kPwTileK / 16][4];  // unused with A in shared memory
  for (int32_t kt = 0; kt < k_tiles; ++kt) step(kt, af);
  wgmma_wait<0>();
  wgmma_fence_operands(acc);
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the ring: the epilogue's tiles overlay it

  wgmma_tile_epilogue<T, kN>(p, acc, smem, m_tile, n0);
#elif defined(__CUDA_ARCH__)
  __trap();  // not built for sm_90a: the launcher never runs it (pointwise_wgmma_available)
#endif
}

// ---- the pointwise weight's gradient (PointwiseWgradParams) ----
// Block (column tile, row tile, split): a 128 x 128 tile of g^T a over the split's pixels, two warpgroups of 64
// rows, both operands "MN-major" (the pixels are the product's K, and both tensors are pixel-major): each stage
// holds 64 pixels x 128 channels of g and of a in core matrices of 8 pixels x 8 channels (a pixel's 8 channels are
// one 16-byte row), chunk i (channels 8 ((i / 8) % 16) .., pixel 8 (i / 128) + i % 8) at byte 16 i: core matrices
// 128 bytes apart along M / N (the stride offset) and 2048 along K (the leading offset). A ring of kWgradStages
// stages, one group of products in flight; the float32 tile goes to partial[split] unrounded.
template <typename T>
__global__ void __launch_bounds__(kPwThreads, 2) pointwise_wgrad_kernel(const PointwiseWgradParams p) {
#if defined(XO_POINTWISE_WGMMA)
  static_assert(sizeof(T) == 2, "16-bit operands");
  constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
  constexpr int kN = kWgradTile;
  constexpr int kTileBytes = kPwTileK * kWgradTile * 2;
  constexpr int kStageBytes = 2 * kTileBytes;
  constexpr int kAhead = kWgradStages - 2;  // stages requested ahead: one group of products stays in flight
  constexpr int kChunks = kPwTileK * kWgradTile / 8 / kPwThreads;
  constexpr uint32_t kLead = 2048, kStride = 128;
  XO_EXTERN_SHARED __align__(128) unsigned char smem[];

  const int64_t col_tiles = (p.cols + kN - 1) / kN, row_tiles = (p.rows + kN - 1) / kN;
  const int64_t block = blockIdx.x;
  const int32_t col0 = static_cast<int32_t>(block % col_tiles) * kN;
  const int32_t row0 = static_cast<int32_t>(block / col_tiles % row_tiles) * kN;
  const int64_t split = block / col_tiles / row_tiles;
  const int64_t p0 = split * p.split_pixels;
  const int64_t p_end = p0 + p.split_pixels < p.pixels ? p0 + p.split_pixels : p.pixels;
  const int32_t stages = static_cast<int32_t>((p_end - p0 + kPwTileK - 1) / kPwTileK);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, group = warp / 4;
  const T* __restrict__ g = static_cast<const T*>(p.g);
  const T* __restrict__ a = static_cast<const T*>(p.a);

  const T* g_src[kChunks];
  const T* a_src[kChunks];
  bool g_ok[kChunks], a_ok[kChunks];
#pragma unroll
  for (int r = 0; r < kChunks; ++r) {
    const int c = tid + kPwThreads * r, px = 8 * (c / 128) + c % 8, ch = 8 * ((c / 8) % 16);
    g_ok[r] = row0 + ch < p.rows;
    a_ok[r] = col0 + ch < p.cols;
    g_src[r] = g + (p0 + px) * p.ldg + (g_ok[r] ? row0 + ch : 0);
    a_src[r] = a + (p0 + px) * p.lda + (a_ok[r] ? col0 + ch : 0);
  }
  auto load_stage = [&](int32_t s, int buf) {
    T* gs = reinterpret_cast<T*>(smem + buf * kStageBytes);
    T* as = reinterpret_cast<T*>(smem + buf * kStageBytes + kTileBytes);
#pragma unroll
    for (int r = 0; r < kChunks; ++r) {
      const int c = tid + kPwThreads * r;
      const bool pixel_ok = p0 + static_cast<int64_t>(s) * kPwTileK + 8 * (c / 128) + c % 8 < p_end;
      stage_chunk(gs + 8 * c, g_src[r] + static_cast<int64_t>(s) * kPwTileK * p.ldg, pixel_ok && g_ok[r]);
      stage_chunk(as + 8 * c, a_src[r] + static_cast<int64_t>(s) * kPwTileK * p.lda, pixel_ok && a_ok[r]);
    }
  };
#pragma unroll
  for (int s = 0; s < kAhead; ++s) {
    if (s < stages) load_stage(s, s);
    cp_async_commit();
  }
  float acc[kN / 2];
  zero_accumulators(acc);
  for (int32_t s = 0; s < stages; ++s) {
    cp_async_wait<kAhead - 1>();
    fence_proxy_async();
    __syncthreads();  // stage s is in place; every warpgroup is done with stage s - 2
    if (s + kAhead < stages) load_stage(s + kAhead, (s + kAhead) % kWgradStages);
    cp_async_commit();
    const uint32_t base = smem_address(smem + (s % kWgradStages) * kStageBytes);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kPwTileK / 16; ++ks) {
      // K step ks: pixels 16 ks .. (two leading offsets); the warpgroup's 64 rows of g (eight stride offsets).
      wgmma_ss_mn<kN, kBf16>(acc, wgmma_desc(base + 8 * kStride * group + 2 * kLead * ks, kLead, kStride),
                             wgmma_desc(base + kTileBytes + 2 * kLead * ks, kLead, kStride));
    }
    wgmma_commit();
    wgmma_wait<1>();
  }
  wgmma_wait<0>();
  wgmma_fence_operands(acc);
  cp_async_wait<0>();

  float* out = p.partial + split * static_cast<int64_t>(p.rows) * p.cols;
  const int row = row0 + 64 * group + 16 * (warp % 4) + lane / 4;
#pragma unroll
  for (int j = 0; j < kN / 8; ++j) {
    const int32_t col = col0 + 8 * j + 2 * (lane % 4);
    if (col >= p.cols) continue;  // cols is a multiple of 8: both of the pair or neither
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (row + 8 * h < p.rows) {
        *reinterpret_cast<float2*>(out + static_cast<int64_t>(row + 8 * h) * p.cols + col) =
            make_float2(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
      }
    }
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // not built for sm_90a: the launcher never runs it (pointwise_wgmma_available)
#endif
}

}  // namespace kernels
}  // namespace xception_ops
