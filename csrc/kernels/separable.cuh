// The fused separable conv forward: depthwise -> pointwise GEMM -> epilogue in one kernel, and the fixed-order
// reduction of its BatchNorm statistics.
//
// Torch-free: takes a SeparableParams (kernels/separable_params.h); compiles with nvcc or clang for any GPU from
// sm_37 on. Tensor-core code sits behind __CUDA_ARCH__ >= 800; below that every kernel takes its FFMA path.
//
// The staged form (cuda/separable_backend.cpp) runs this kernel with p.a_source set: step 1 then reads the
// depthwise result its depthwise kernels wrote instead of computing it (load_a_tile); steps 2 and 3 are the same.
//
// One block owns kSepTileP output pixels (by default consecutive in the flattened (N, OH, OW), so odd image sizes
// cost nothing; optionally 8 x 8 squares, or runs of 4 pixels down a column band: p.square_tiles, p.run_tiles)
// and every output channel:
//   1. the depthwise result for its pixels and a chunk of depthwise channels is computed into shared memory,
//      with the prologue applied as x is read and the mid stage (affine, activation: mid_value) on the result.
//      It never reaches global memory. When every channel fits (k_chunk covers them) this runs once per block.
//   2. for each tile of kSepTileN output channels, the pointwise GEMM [pixels x K] x [K x N] runs from shared
//      memory, the weight tiles double-buffered: wmma fragments on tensor cores (fp16 / bf16, or TF32), or
//      FFMA with an 8 x 4 register tile per thread; float32 accumulation either way. With few pixel tiles,
//      several blocks share one and split the output-channel tiles (grid.y), each computing the depthwise tile.
//   3. the accumulators go through shared memory to the epilogue: y rounded to the dtype (as PyTorch's
//      unfused layers round it), folded BN / bias, residual, ReLU, stored in the output's layout; with
//      statistics, the block's per-channel sums of y and y^2 go to a per-tile row of float32 partials.
// separable_stats_reduce_kernel then sums the partial rows in a fixed order (groups of 64 rows per level): the
// statistics are bitwise reproducible, with no atomics.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "depthwise.cuh"
#include "mid_stage.cuh"  // round_to, mid_value: the mid stage, shared with the depthwise forward kernels
#include "separable_params.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#include <mma.h>
#define XO_SEPARABLE_WMMA 1
#endif

// mma.sync + ldmatrix for the 16-bit GEMM: on sm_80+ devices, and on the CPU where tests/cpp/cuda_emulation.h
// provides warp-collective versions of ldmatrix_x4 and mma_16816 (and defines XO_EMULATED_WARP_MMA).
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(XO_EMULATED_WARP_MMA)
#define XO_SEPARABLE_MMA 1
#endif

// Dynamic shared memory; tests/cpp/cuda_emulation.h, which runs kernels on the CPU, redefines it.
#ifndef XO_EXTERN_SHARED
#define XO_EXTERN_SHARED extern __shared__
#endif

namespace xception_ops {
namespace kernels {

// The depthwise tile holds the dtype itself on the 16-bit tensor-core path, float32 otherwise. Values written
// are already rounded to the dtype, so the 16-bit store is exact.
template <typename S>
struct TileElem;
template <>
struct TileElem<float> {
  __device__ __forceinline__ static void store(float* p, float v) { *p = v; }
  __device__ __forceinline__ static float load(const float* p) { return *p; }
};
template <>
struct TileElem<__half> {
  __device__ __forceinline__ static void store(__half* p, float v) { *p = __float2half_rn(v); }
  __device__ __forceinline__ static float load(const __half* p) { return __half2float(*p); }
};
template <>
struct TileElem<__nv_bfloat16> {
  __device__ __forceinline__ static void store(__nv_bfloat16* p, float v) {
    *reinterpret_cast<unsigned short*>(p) = static_cast<unsigned short>(__float_as_uint(v) >> 16);
  }
  __device__ __forceinline__ static float load(const __nv_bfloat16* p) {
    return __uint_as_float(static_cast<unsigned int>(*reinterpret_cast<const unsigned short*>(p)) << 16);
  }
};

// Per-pixel facts of a block's tile, in shared memory. base < 0 marks a pixel past the end.
struct PixelInfo {
  int64_t* x_base;    // n * x.stride[0]
  int64_t* out_base;  // n * out.stride[0] + oh * out.stride[2] + ow * out.stride[3]
  int64_t* res_base;  // the same for the residual
  int32_t* ih0;       // oh * stride_h - pad_top
  int32_t* iw0;       // ow * stride_w - pad_left
};

// ---- the GEMM of one output-channel tile ----
// The implementations (FfmaGemm, MmaGemm, WmmaGemm) share one interface:
//   step(a, lda, kk, bs)     multiplies the depthwise tile's columns [kk, kk + kSepKStep) by a weight buffer
//   store(c, pitch)          writes the float32 accumulators to the [kSepTileP][pitch] tile
// and fill the weight buffers one of two ways. FfmaGemm and WmmaGemm double-buffer through registers:
//   Regs                     one thread's share of a weight tile (kSepTileN x kSepKStep / kSepThreads values)
//   fetch(regs, w, n0, k0)   loads the weight tile W[n0 .., k0 ..] from global memory into registers (zeros
//                            past the ends), so that the next tile is in flight while the current one is used
//   stash(bs, regs)          stores them into a shared-memory weight buffer
// MmaGemm copies them with cp.async into a ring (WeightStream).
// Element e = threadIdx.x + kSepThreads * r of a weight tile is (n, k) = (e / kSepKStep, e % kSepKStep): a warp
// reads consecutive k of one row of W, which is contiguous (C_out, K).
constexpr int kSepBRegs = kSepTileN * kSepKStep / kSepThreads;

template <typename T, typename R>
__device__ __forceinline__ void fetch_weight_tile(R (&regs)[kSepBRegs], const T* w, int64_t n0, int64_t k0,
                                                  int64_t n_total, int64_t k_total) {
  // Element e = tid + kSepThreads * r is (n, k) = (tid / 32 + 8 r, tid % 32): one column per thread, rows 8
  // apart, so the address advances by a constant; the bounds are one compare per element.
  static_assert(kSepKStep == 32 && kSepThreads % kSepKStep == 0, "a warp reads one row of the tile");
  constexpr int kRowsApart = kSepThreads / kSepKStep;
  const int64_t n = n0 + threadIdx.x / kSepKStep, k = k0 + threadIdx.x % kSepKStep;
  const bool k_ok = k < k_total;
  const T* src = w + n * k_total + k;
  const int64_t stride = kRowsApart * k_total;
#pragma unroll
  for (int r = 0; r < kSepBRegs; ++r, src += stride) {
    const bool ok = k_ok && n + r * kRowsApart < n_total;
    if constexpr (sizeof(R) == 2) {  // raw 16-bit patterns
      regs[r] = ok ? load_readonly(reinterpret_cast<const unsigned short*>(src)) : static_cast<unsigned short>(0);
    } else {
      regs[r] = ok ? Elem<T>::load(src) : 0.f;
    }
  }
}

// FFMA: thread (ty, tx) = (tid / 32, tid % 32) owns rows 8 * ty + i and columns tx + 32 * j of the 64 x 128
// tile. The weight buffer is float32 [k][n]: a warp reads 32 consecutive columns, conflict free; the depthwise
// values of a row are broadcast.
struct FfmaGemm {
  using Regs = float[kSepBRegs];
  float acc[8][4];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  }

  template <typename T>
  __device__ __forceinline__ static void fetch(Regs& regs, const T* w, int64_t n0, int64_t k0, int64_t n_total,
                                               int64_t k_total) {
    fetch_weight_tile<T, float>(regs, w, n0, k0, n_total, k_total);
  }

  __device__ __forceinline__ static void stash(float* bs, const Regs& regs) {
#pragma unroll
    for (int r = 0; r < kSepBRegs; ++r) {
      const int e = threadIdx.x + kSepThreads * r;
      bs[(e % kSepKStep) * kSepBPitchKN + e / kSepKStep] = regs[r];
    }
  }

  template <typename S>
  __device__ __forceinline__ void step(const S* a, int lda, int kk, const float* bs) {
    const int ty = threadIdx.x / 32, tx = threadIdx.x % 32;
#pragma unroll 4
    for (int k = 0; k < kSepKStep; ++k) {
      float av[8], bv[4];
#pragma unroll
      for (int i = 0; i < 8; ++i) av[i] = TileElem<S>::load(a + (8 * ty + i) * lda + kk + k);
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = bs[k * kSepBPitchKN + tx + 32 * j];
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ void store(float* c, int pitch) const {
    const int ty = threadIdx.x / 32, tx = threadIdx.x % 32;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) c[(8 * ty + i) * pitch + tx + 32 * j] = acc[i][j];
  }
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
// Four 8x8 16-bit matrices from shared memory: lane l gives the address of row l % 8 of matrix l / 8 and
// receives, in r[j], elements (row l / 4, columns 2 (l % 4) and + 1) of matrix j.
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* smem_row) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// 16 bytes from global to shared memory without passing through registers (cp.async, sm_80+), in groups:
// cp_async_wait<n>() returns when at most the n most recently committed groups are still in flight.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(addr), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kGroups>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kGroups));
}

#elif !defined(XO_EMULATED_WARP_MMA)
// Where cp.async does not exist (host pass, GPUs below sm_80) no kernel takes the cp.async path; these keep its
// code well-formed there, copying at once.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  *static_cast<uint4*>(smem) = *static_cast<const uint4*>(gmem);
}
__device__ __forceinline__ void cp_async_commit() {}
template <int kGroups>
__device__ __forceinline__ void cp_async_wait() {}
#endif

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
// d += a b for a 16x16 (row-major fragments a0..a3) by 16x8 (column-major b0, b1) tile, float32 accumulators.
template <bool kBf16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}
#endif

#ifdef XO_SEPARABLE_MMA
// ---- the 16-bit GEMM on tensor cores: ldmatrix + mma.sync.m16n8k16 (sm_80+) ----
// Warp w owns rows 32 * (w % 2) .. +32 and columns 32 * (w / 2) .. +32 of the 64 x 128 tile: 2 x 4 tiles of
// 16 x 8, 32 float32 accumulators per thread. Per 16-deep slice: two ldmatrix.x4 for A (a 16 x 16 tile each),
// two for B (two 8-column tiles each, from the [n][k] weight buffer), eight MMAs. Fragment layouts (PTX ISA,
// "Matrix fragments for mma.m16n8k16"): g = lane / 4, t = lane % 4; a0: (g, 2t..2t+1), a1: (g + 8, 2t..),
// a2: (g, 2t + 8..), a3: (g + 8, 2t + 8..); b0: (k 2t..2t+1, n g), b1: (k 2t + 8.., n g); d0, d1: (g, 2t..),
// d2, d3: (g + 8, 2t..).
template <typename T>
struct MmaGemm {
  static_assert(sizeof(T) == 2, "16-bit operands");
  static constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
  float acc[2][4][4];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
  }

  static_assert(kSepTileN * kSepKStep == 2 * 8 * kSepThreads, "two 8-element vectors per thread");

  // This thread's two 16-byte vectors of every weight tile of one output-channel tile, W[n0 .., k0 + 32 s ..]
  // straight into a shared-memory buffer (vector v = tid + 256 r: row n = v / 4, k = 8 (v % 4) .. +8 of the
  // 128 x 32 tile, rows kSepBPitch16 apart), instead of the other GEMMs' fetch + stash: the addresses are set up once per
  // output-channel tile and advance by a constant per step (computing them per step cost ~50 of a step's ~110
  // instructions). cp.async where `vectors` (K a multiple of 8, W 16-byte aligned) and the vector exists; zeros
  // or element copies otherwise, stored at once. The caller commits the group.
  struct WeightStream {
    const T* src[2];
    int dst[2];
    int32_t k[2];  // K < 2^31 (the launcher checks)
    bool row_ok[2];

    __device__ __forceinline__ WeightStream(const T* w, int64_t n0, int64_t k0, int64_t n_total, int64_t k_total) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int v = threadIdx.x + kSepThreads * r;
        const int64_t n = n0 + v / 4;
        row_ok[r] = n < n_total;
        k[r] = static_cast<int32_t>(k0 + 8 * (v % 4));
        src[r] = w + (row_ok[r] ? n : 0) * k_total + k[r];
        dst[r] = (v / 4) * kSepBPitch16 + 8 * (v % 4);
      }
    }

    __device__ __forceinline__ void copy(T* bs, int step, int32_t k_total, bool vectors) const {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int32_t kk = k[r] + step * kSepKStep;
        const T* from = src[r] + step * kSepKStep;
        if (vectors && row_ok[r] && kk < k_total) {
          cp_async_16(bs + dst[r], from);
          continue;
        }
        unsigned short e[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          e[i] = row_ok[r] && kk + i < k_total ? load_readonly(reinterpret_cast<const unsigned short*>(from) + i)
                                                : static_cast<unsigned short>(0);
        }
        *reinterpret_cast<uint4*>(bs + dst[r]) = make_uint4(e[0] | (unsigned(e[1]) << 16), e[2] | (unsigned(e[3]) << 16),
                                                            e[4] | (unsigned(e[5]) << 16), e[6] | (unsigned(e[7]) << 16));
      }
    }
  };

  __device__ __forceinline__ void step(const T* a, int lda, int kk, const T* bs) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wr = warp % 2, wc = warp / 2;
    // Row addresses each lane gives ldmatrix: A, row (lane % 8) of 8x8 matrix lane / 8, the matrices ordered
    // (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15) = a0..a3;
    // B (stored [n][k]), (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15) = b0, b1 of two
    // 8-column tiles.
    const int a_row = 32 * wr + lane % 8 + 8 * ((lane / 8) % 2), a_col = 8 * (lane / 16);
    const int b_row = 32 * wc + lane % 8 + 8 * (lane / 16), b_col = 8 * ((lane / 8) % 2);
#pragma unroll
    for (int ks = 0; ks < kSepKStep; ks += 16) {
      unsigned af[2][4], bf[2][4];
#pragma unroll
      for (int i = 0; i < 2; ++i) ldmatrix_x4(af[i], a + (a_row + 16 * i) * lda + kk + ks + a_col);
#pragma unroll
      for (int j = 0; j < 2; ++j) ldmatrix_x4(bf[j], bs + (b_row + 16 * j) * kSepBPitch16 + ks + b_col);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) mma_16816<kBf16>(acc[i][j], af[i], bf[j / 2][2 * (j % 2)], bf[j / 2][2 * (j % 2) + 1]);
    }
  }

  __device__ __forceinline__ void store(float* c, int pitch) const {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wr = warp % 2, wc = warp / 2;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int row = 32 * wr + 16 * i + lane / 4, col = 32 * wc + 8 * j + 2 * (lane % 4);
        c[row * pitch + col] = acc[i][j][0];
        c[row * pitch + col + 1] = acc[i][j][1];
        c[(row + 8) * pitch + col] = acc[i][j][2];
        c[(row + 8) * pitch + col + 1] = acc[i][j][3];
      }
  }
};
#endif  // XO_SEPARABLE_MMA

#ifdef XO_SEPARABLE_WMMA
// ---- the TF32 GEMM on tensor cores (sm_80+), through wmma ----
// Warp w owns rows 32 * (w % 2) .. +32 and columns 32 * (w / 2) .. +32 of the 64 x 128 tile: 2 x 2 accumulator
// fragments of 16 x 16. 16-bit operands: m16n16k16; float32: TF32 m16n16k8, rounded to TF32 as loaded. The
// weight buffer is [n][k] (B column-major).
template <typename T>
struct WmmaGemm {
  static constexpr bool kTf32 = sizeof(T) == 4;
  static constexpr int kK = kTf32 ? 8 : 16;
  static constexpr int kBPitch = kTf32 ? kSepBPitch32 : kSepBPitch16;
  using AType = typename std::conditional<kTf32, nvcuda::wmma::precision::tf32, T>::type;
  using Reg = typename std::conditional<kTf32, float, unsigned short>::type;
  using Regs = Reg[kSepBRegs];
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, kK, float> acc[2][2];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.f);
  }

  __device__ __forceinline__ static void fetch(Regs& regs, const T* w, int64_t n0, int64_t k0, int64_t n_total,
                                               int64_t k_total) {
    fetch_weight_tile<T, Reg>(regs, w, n0, k0, n_total, k_total);
  }

  __device__ __forceinline__ static void stash(T* bs, const Regs& regs) {
    Reg* dst = reinterpret_cast<Reg*>(bs);
#pragma unroll
    for (int r = 0; r < kSepBRegs; ++r) {
      const int e = threadIdx.x + kSepThreads * r;
      dst[(e / kSepKStep) * kBPitch + e % kSepKStep] = regs[r];
    }
  }

  __device__ __forceinline__ void step(const T* a, int lda, int kk, const T* bs) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32, wr = warp % 2, wc = warp / 2;
#pragma unroll
    for (int ks = 0; ks < kSepKStep; ks += kK) {
      wmma::fragment<wmma::matrix_a, 16, 16, kK, AType, wmma::row_major> af[2];
      wmma::fragment<wmma::matrix_b, 16, 16, kK, AType, wmma::col_major> bf[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(af[i], a + (32 * wr + 16 * i) * lda + kk + ks, lda);
        wmma::load_matrix_sync(bf[i], bs + (32 * wc + 16 * i) * kBPitch + ks, kBPitch);
        if constexpr (kTf32) {
#pragma unroll
          for (int t = 0; t < af[i].num_elements; ++t) af[i].x[t] = wmma::__float_to_tf32(af[i].x[t]);
#pragma unroll
          for (int t = 0; t < bf[i].num_elements; ++t) bf[i].x[t] = wmma::__float_to_tf32(bf[i].x[t]);
        }
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], af[i], bf[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ void store(float* c, int pitch) const {
    const int warp = threadIdx.x / 32, wr = warp % 2, wc = warp / 2;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        nvcuda::wmma::store_matrix_sync(c + (32 * wr + 16 * i) * pitch + 32 * wc + 16 * j, acc[i][j],
                                        static_cast<unsigned>(pitch), nvcuda::wmma::mem_row_major);
      }
  }
};
#endif  // XO_SEPARABLE_WMMA

// ---- stage 1: the depthwise tile for channels [k0, k0 + cols) into shared memory ----

// V channels of the depthwise stage's input: `raw` as loaded by VecIO::load_raw_if(ok, ..) (zeros where !ok:
// padding, nothing read), decoded, and with kPrologue relu?(x * scale + shift) rounded to T, padding still 0
// after it: multiplied by 0, since a select here compiled to a branch per element.
template <typename T, int V, bool kPrologue>
__device__ __forceinline__ void decode_input(bool ok, const typename VecIO<T, V>::Raw& raw, const float (&scale)[V],
                                             const float (&shift)[V], bool relu, float (&xv)[V]) {
  VecIO<T, V>::decode(raw, xv);
  if constexpr (kPrologue) {
    const float keep = ok ? 1.f : 0.f;
#pragma unroll
    for (int v = 0; v < V; ++v) xv[v] = prologue_value<T>(xv[v], scale[v], shift[v], relu) * keep;
  }
}

__device__ __forceinline__ bool has_mid_affine(const SeparableParams& p) {
  return p.mid_scale != nullptr || p.mid_shift != nullptr;
}
// What the depthwise paths store into the tile for a sum: its mid stage without an affine; with one, d alone
// (rounded, p.store_mid = 0), which mid_affine_tile then takes through the rest of the mid stage. (Applied as the
// paths store, the affine's per-channel values cost the capped builds' vector path 64 more bytes of spills: sm_90,
// bf16.)
template <typename T>
__device__ __forceinline__ float depthwise_result(const SeparableParams& p, float sum) {
  return mid_value<T>(sum, p.store_mid, false, 1.f, 0.f);
}

// The mid affine and activation over the depthwise tile's columns [0, cols) (channels k0 ..), which hold d where
// there is an affine (depthwise_result): a pass after the depthwise stage, one element per thread at a time along
// the rows, its channel's scale and shift read per element. Padding channels (k >= K) take 1 and 0, so their zeros
// stay zeros, and nothing past K is read. The caller's barrier after the stage orders this pass's stores before the
// GEMM. (Kept this lean for the capped builds, whose accumulators are live across it: walking columns with their
// scale and shift in registers cost up to 56 more bytes of spill loads, unrolled up to 32 more stores.)
template <typename T, typename S>
__device__ __forceinline__ void mid_affine_tile(const SeparableParams& p, S* a, int lda, int32_t k0, int cols) {
  const int32_t K = static_cast<int32_t>(p.g.dw_channels());
  __syncthreads();  // every thread's part of the tile is in place
#pragma unroll 1
  for (int e = threadIdx.x; e < kSepTileP * cols; e += kSepThreads) {
    const int col = e % cols, row = e / cols;
    const int32_t k = k0 + col;
    const float scale = p.mid_scale != nullptr && k < K ? p.mid_scale[k] : 1.f;
    const float shift = p.mid_shift != nullptr && k < K ? p.mid_shift[k] : 0.f;
    S* v = a + row * lda + col;
    TileElem<S>::store(v, mid_value<T>(TileElem<S>::load(v), p.mid, true, scale, shift));
  }
}

// V channels of one pixel of the depthwise result into the tile (depthwise_result), in the tile's precision.
template <typename T, typename S, int V>
__device__ __forceinline__ void store_depthwise_result(const SeparableParams& p, float (&acc)[V], S* dst) {
#pragma unroll
  for (int v = 0; v < V; ++v) acc[v] = depthwise_result<T>(p, acc[v]);
  if constexpr (std::is_same<S, T>::value) {
    VecIO<T, V>::store(dst, acc);  // the 16-bit tile: one store
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v) TileElem<S>::store(dst + v, acc[v]);
  }
}

// A thread keeps one channel's taps (weights, prologue scale and shift) in registers and walks its pixels. Every
// tap is loaded unconditionally (a masked tap reads a valid element instead and contributes 0), so the loads
// of all taps are issued before the first multiply-add: with branches around them (version 1), each tap paid
// a full memory latency in turn. The tap offsets are computed once and the prologue is compiled in only when
// there is one: version 3 spent ~37 instructions per tap (64-bit index math, an unconditional prologue).
//   kCL: a warp takes 32 consecutive channels of 8 pixels (coalesced when channels are fastest in x);
//   otherwise 64 consecutive pixels of one channel.
template <typename T, typename S, int KH, int KW, bool kCL, bool kPrologue>
__device__ __forceinline__ void depthwise_tile_mapped(const SeparableParams& p, const PixelInfo& px, S* a, int lda,
                                                      int32_t k0, int cols) {
  constexpr int kRows = kCL ? kSepTileP / (kSepThreads / 32) : 1;  // pixels per thread and channel
  constexpr int kRowStep = kCL ? kSepThreads / 32 : kSepTileP;
  constexpr int kColStep = kCL ? 32 : kSepThreads / kSepTileP;
  constexpr int kTaps = KH * KW;  // 0: kernel size known at run time only
  const Conv2dGeometry& g = p.g;
  const int kh_n = KH > 0 ? KH : static_cast<int>(g.kernel_h);
  const int kw_n = KW > 0 ? KW : static_cast<int>(g.kernel_w);
  const int32_t K = static_cast<int32_t>(g.dw_channels()), M = static_cast<int32_t>(g.depth_multiplier);
  const int64_t H = g.in_h, W = g.in_w;
  const int64_t dh = g.dilation_h, dwl = g.dilation_w;
  const T* __restrict__ x = static_cast<const T*>(p.x.data);
  const T* __restrict__ wdw = static_cast<const T*>(p.dw_weight);
  const int64_t xs1 = p.x.stride[1], xs2 = p.x.stride[2], xs3 = p.x.stride[3];
  const int row0 = kCL ? threadIdx.x / 32 : threadIdx.x % kSepTileP;
  // Tap offsets from a pixel's input origin, computed once (compile-time kernel sizes).
  int64_t off_h[KH > 0 ? KH : 1], off_w[KW > 0 ? KW : 1];
#pragma unroll
  for (int i = 0; i < KH; ++i) off_h[i] = i * dh * xs2;
#pragma unroll
  for (int j = 0; j < KW; ++j) off_w[j] = j * dwl * xs3;

  // The prologue (compiled in only when there is one): relu?(x * scale + shift) rounded to the dtype.
  auto prologue = [&](float v, float scale, float shift) {
    if constexpr (kPrologue) v = prologue_value<T>(v, scale, shift, p.in_relu);
    return v;
  };

#pragma unroll 1
  for (int col = kCL ? threadIdx.x % 32 : threadIdx.x / kSepTileP; col < cols; col += kColStep) {
    const int32_t k_raw = k0 + col;
    const bool k_ok = k_raw < K;
    const int32_t k = k_ok ? k_raw : K - 1;  // padding columns read a real channel and are zeroed
    const int32_t ci = M == 1 ? k : k / M;
    const float scale = kPrologue && p.in_scale != nullptr ? p.in_scale[ci] : 1.f;
    const float shift = kPrologue && p.in_shift != nullptr ? p.in_shift[ci] : 0.f;
    const T* wk = wdw + static_cast<int64_t>(k) * kh_n * kw_n;
    float wv[kTaps > 0 ? kTaps : 1];
#pragma unroll
    for (int t = 0; t < kTaps; ++t) wv[t] = Elem<T>::load(wk + t);
    const T* chan = x + ci * xs1;  // a valid address for every masked tap

    // Per tap: an add, a predicate, a select, the load, a select and an FMA; nothing stands between the loads
    // of consecutive taps and pixels.
#pragma unroll 2
    for (int r = 0; r < kRows; ++r) {  // two pixels in flight per thread: more spilled registers than it gains
      const int row = row0 + r * kRowStep;
      const int64_t base = px.x_base[row];
      const bool pix_ok = k_ok && base >= 0;
      const int64_t ih0 = px.ih0[row], iw0 = px.iw0[row];
      const int64_t origin = pix_ok ? base + ih0 * xs2 + iw0 * xs3 : 0;  // may lie outside: used only when valid
      float sum = 0.f;
      if constexpr (kTaps > 0) {
        bool ok_h[KH], ok_w[KW];
#pragma unroll
        for (int i = 0; i < KH; ++i) ok_h[i] = pix_ok && in_range<int64_t>(ih0 + i * dh, H);
#pragma unroll
        for (int j = 0; j < KW; ++j) ok_w[j] = in_range<int64_t>(iw0 + j * dwl, W);
        float raw[kTaps];
#pragma unroll
        for (int i = 0; i < KH; ++i)
#pragma unroll
          for (int j = 0; j < KW; ++j) {
            raw[i * KW + j] = Elem<T>::load(ok_h[i] && ok_w[j] ? chan + (origin + off_h[i] + off_w[j]) : chan);
          }
#pragma unroll
        for (int i = 0; i < KH; ++i)
#pragma unroll
          for (int j = 0; j < KW; ++j) {
            const float v = prologue(raw[i * KW + j], scale, shift);
            sum = fmaf(ok_h[i] && ok_w[j] ? v : 0.f, wv[i * KW + j], sum);
          }
      } else {
        for (int i = 0; i < kh_n; ++i) {
          const bool ok_h = pix_ok && in_range<int64_t>(ih0 + i * dh, H);
          for (int j = 0; j < kw_n; ++j) {
            const bool ok = ok_h && in_range<int64_t>(iw0 + j * dwl, W);
            const float v = Elem<T>::load(ok ? chan + (origin + i * dh * xs2 + j * dwl * xs3) : chan);
            sum = fmaf(ok ? prologue(v, scale, shift) : 0.f, Elem<T>::load(wk + i * kw_n + j), sum);
          }
        }
      }
      TileElem<S>::store(a + row * lda + col, depthwise_result<T>(p, sum));
    }
  }
}

// The depthwise stage's per-channel values for V channels from k (of the vector and run-tile paths, no depth
// multiplier): the taps' weights and, with kPrologue, the prologue's scale and shift (1 and 0 otherwise, and for
// padding channels, !k_ok, which read channel 0's weights).
template <typename T, bool kPrologue, int kTaps, int V>
__device__ __forceinline__ void load_channel_terms(const SeparableParams& p, int32_t k, bool k_ok,
                                                   float (&wv)[kTaps][V], float (&scale)[V], float (&shift)[V]) {
  const T* __restrict__ wdw = static_cast<const T*>(p.dw_weight);
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const T* wk = wdw + static_cast<int64_t>(k_ok ? k + v : 0) * kTaps;
#pragma unroll
    for (int t = 0; t < kTaps; ++t) wv[t][v] = Elem<T>::load(wk + t);
    scale[v] = kPrologue && p.in_scale != nullptr && k_ok ? p.in_scale[k + v] : 1.f;
    shift[v] = kPrologue && p.in_shift != nullptr && k_ok ? p.in_shift[k + v] : 0.f;
  }
}

// The vector path (p.x_vectors: channels fastest in x, aligned, no depth multiplier, flat tiles, 3x3): a thread
// takes V consecutive channels; `lanes` threads (the channel groups rounded up to a power of two, at most a
// warp) cover a pixel's channels, and each thread walks its share of the tile's pixels with the weights and
// prologue of its channels in registers. Per tap: one predicated load of V channels at a 32-bit offset from the
// pixel's origin (separable_plan checks that the offsets fit).
//   Four consecutive pixels of one output row (kQuad, at stride 1 or 2 without horizontal dilation) share their
//   input columns: per kernel row, 3 s + 3 columns are loaded, converted and prologued once and feed 4 x 3 taps,
//   about 19 instructions per output against 64 pixel by pixel (measured form of the latter, v7b: 255
//   instructions per pixel and 4 channels). A group of four that crosses a row, or the tile's end, goes pixel by
//   pixel. V is 4 in the kernel build without the 128-register cap (one block per SM) and 2 in the capped build,
//   where the 4-channel window would not fit (it spilled 320 bytes).
// The stage is latency-bound (8 warps per SM on the wide layers): loads are issued in batches before their
// values are used, and the tap conditions recomputed where used rather than kept in registers (kept, they
// raised the capped build's spills from 140 to 236 bytes, in its output-tile loop: the 74^2 layers lost 20%).
template <typename T, typename S, int KH, int KW, bool kPrologue, int V>
__device__ __forceinline__ void depthwise_tile_vectors(const SeparableParams& p, const PixelInfo& px, S* a, int lda,
                                                       int32_t k0, int cols) {
  constexpr int kTaps = KH * KW, kQuad = 4;
  static_assert(kSepVec % V == 0, "whole vectors of separable_plan's vector width");
  static_assert(kTaps > 0, "compile-time kernel size");
  static_assert(kSepTileP % kQuad == 0, "whole groups of four pixels");
  const Conv2dGeometry& g = p.g;
  const int32_t K = static_cast<int32_t>(g.dw_channels());
  const uint32_t H = static_cast<uint32_t>(g.in_h), W = static_cast<uint32_t>(g.in_w);
  const int32_t dh = static_cast<int32_t>(g.dilation_h), dwl = static_cast<int32_t>(g.dilation_w);
  const int32_t sw = static_cast<int32_t>(g.stride_w);
  const T* __restrict__ x = static_cast<const T*>(p.x.data);
  const int64_t xs2 = p.x.stride[2], xs3 = p.x.stride[3];
  const int32_t xs2i = static_cast<int32_t>(xs2), xs3i = static_cast<int32_t>(xs3);  // fit: separable_plan
  const bool in_relu = p.in_relu;
  const int groups = cols / V;
  const int lanes = power_of_two_cover(groups, 32);  // at most a warp
  // Groups of four when they keep every thread busy (16 groups per tile) and the window is shared.
  const bool quads = lanes >= kSepThreads / (kSepTileP / kQuad) && dwl == 1 && (sw == 1 || sw == 2);
  const int unit = quads ? kQuad : 1;  // pixels per work item
  const int item0 = threadIdx.x / lanes, item_step = kSepThreads / lanes;

  auto finish = [&](float (&acc)[V], int row, int col) {
    store_depthwise_result<T, S, V>(p, acc, a + row * lda + col);
  };

#pragma unroll 1
  for (int grp = threadIdx.x % lanes; grp < groups; grp += lanes) {
    const int col = grp * V;
    const int32_t k = k0 + col;
    const bool k_ok = k < K;  // K is a multiple of V: a vector is all channels or all padding
    float wv[kTaps][V], scale[V], shift[V];
    load_channel_terms<T, kPrologue>(p, k, k_ok, wv, scale, shift);
    const T* chan = x + (k_ok ? k : 0);
    using Raw = typename VecIO<T, V>::Raw;
    // One input vector, loaded (VecIO::load_raw_if) where ok: decoded, the prologue applied, padding 0 after it.
    auto input = [&](bool ok, const Raw& raw, float (&xv)[V]) {
      decode_input<T, V, kPrologue>(ok, raw, scale, shift, in_relu, xv);
    };
    // One pixel: nine taps, all loaded before the first is used in the wide build (V = 4); in the capped one
    // each as it is used (loading them ahead spilled ~100 more bytes there).
    constexpr bool kTapsAhead = V == 4;
    auto one_pixel = [&](int row) {
      const int64_t base = px.x_base[row];
      const bool pix_ok = k_ok && base >= 0;
      const int32_t ih0 = px.ih0[row], iw0 = px.iw0[row];
      // The origin may lie outside x (padding): only the taps inside the image are read.
      const T* origin = chan + (pix_ok ? base + ih0 * xs2 + iw0 * xs3 : 0);
      auto ok = [&](int i, int j) {  // tap (i, j) inside the image (recomputed where used: cheaper than registers)
        return pix_ok && static_cast<uint32_t>(ih0 + i * dh) < H && static_cast<uint32_t>(iw0 + j * dwl) < W;
      };
      auto tap = [&](int i, int j) { return VecIO<T, V>::load_raw_if(ok(i, j), origin + (i * dh * xs2i + j * dwl * xs3i)); };
      Raw raw[KH][KW];
      if constexpr (kTapsAhead) {
#pragma unroll
        for (int i = 0; i < KH; ++i)
#pragma unroll
          for (int j = 0; j < KW; ++j) raw[i][j] = tap(i, j);
      }
      float acc[V];
#pragma unroll
      for (int v = 0; v < V; ++v) acc[v] = 0.f;
#pragma unroll
      for (int i = 0; i < KH; ++i)
#pragma unroll
        for (int j = 0; j < KW; ++j) {
          if constexpr (!kTapsAhead) raw[i][j] = tap(i, j);
          float xv[V];
          input(ok(i, j), raw[i][j], xv);
#pragma unroll
          for (int v = 0; v < V; ++v) acc[v] = fmaf(xv[v], wv[i * KW + j][v], acc[v]);
        }
      finish(acc, row, col);
    };

#pragma unroll 1
    for (int item = item0; item * unit < kSepTileP; item += item_step) {
      if (!quads) {
        one_pixel(item);
        continue;
      }
      const int r0 = item * kQuad;
      // Four pixels of one output row: same image and input row, input columns sw apart.
      const int64_t base = px.x_base[r0];
      const int32_t ih0 = px.ih0[r0], iw0 = px.iw0[r0];
      bool same_row = base >= 0;
#pragma unroll
      for (int q = 1; q < kQuad; ++q) {
        same_row = same_row && px.x_base[r0 + q] == base && px.ih0[r0 + q] == ih0 && px.iw0[r0 + q] == iw0 + q * sw;
      }
      if (!same_row) {
#pragma unroll 1
        for (int q = 0; q < kQuad; ++q) one_pixel(r0 + q);
        continue;
      }
      const T* origin = chan + (k_ok ? base + ih0 * xs2 + iw0 * xs3 : 0);
      float acc[kQuad][V];
#pragma unroll
      for (int q = 0; q < kQuad; ++q)
#pragma unroll
        for (int v = 0; v < V; ++v) acc[q][v] = 0.f;
      // The four pixels' window at compile-time stride kSW: KH rows of (kQuad - 1) kSW + KW input columns. The
      // rows' loads are all issued before the first is used where their bits fit the register budget (else one
      // row at a time): v7e waited a full memory latency per kernel row, three per group of four (SASS).
      auto window = [&](auto stride) {
        constexpr int kSW = decltype(stride)::value, kCols = (kQuad - 1) * kSW + KW;
        constexpr int kRawRegs = KH * kCols * static_cast<int>(sizeof(Raw)) / 4;
        constexpr int kBatch = kRawRegs <= (V == 4 ? 64 : 18) ? KH : 1;  // rows loaded together
        auto ok = [&](int i, int c) {
          return k_ok && static_cast<uint32_t>(ih0 + i * dh) < H && static_cast<uint32_t>(iw0 + c) < W;
        };
#pragma unroll
        for (int i0 = 0; i0 < KH; i0 += kBatch) {
          Raw raw[kBatch][kCols];
#pragma unroll
          for (int b = 0; b < kBatch; ++b)
#pragma unroll
            for (int c = 0; c < kCols; ++c) {
              raw[b][c] = VecIO<T, V>::load_raw_if(ok(i0 + b, c), origin + ((i0 + b) * dh * xs2i + c * xs3i));
            }
#pragma unroll
          for (int b = 0; b < kBatch; ++b) {
            const int i = i0 + b;
            float xv[kCols][V];
#pragma unroll
            for (int c = 0; c < kCols; ++c) input(ok(i, c), raw[b][c], xv[c]);
#pragma unroll
            for (int q = 0; q < kQuad; ++q)
#pragma unroll
              for (int j = 0; j < KW; ++j)
#pragma unroll
                for (int v = 0; v < V; ++v) acc[q][v] = fmaf(xv[kSW * q + j][v], wv[i * KW + j][v], acc[q][v]);
          }
        }
      };
      if (sw == 1) {
        window(std::integral_constant<int, 1>{});
      } else {
        window(std::integral_constant<int, 2>{});
      }
#pragma unroll
      for (int q = 0; q < kQuad; ++q) finish(acc[q], r0 + q, col);
    }
  }
}

// Run tiles (p.run_tiles, separable_run_tiles_ok: the vector path's layers at 3x3, stride 1, no dilation): a tile's
// 64 pixels are kSepRunSlots slots of kSepRun consecutive pixels of one row, the slots ordered (image, run of
// columns, row), so that a slot is mostly the one before it one row down. A thread takes one vector of V channels
// and a part of the tile's slots, and keeps the three input rows its taps read in registers (StripWindow, as the
// depthwise strip kernels do): per slot it loads one new row of kSepRun + 2 vectors, requested before the slot's
// taps, and decodes and prologues each input vector once. The quads of flat tiles load and prologue all three rows
// per four pixels. A slot that does not continue the one before (the next run, image, or the tile's end) fills the
// window again. The parts: as many as give the shortest chain of waits per thread, rounds x (slots per part + 1
// for the fill, whose three rows are in flight together), since the stage waits on memory (session 4): narrow
// layers then keep every thread busy (64 channels: 8 parts of 2 slots), and 728 channels take 4 parts (3 rounds of
// 5 waits) rather than 1 (17 waits on 184 of the 256 threads). Taps are summed in the order of the other paths
// (kernel row, then column).
template <typename T, typename S, bool kPrologue, int V>
__device__ __forceinline__ void depthwise_tile_runs(const SeparableParams& p, const PixelInfo& px, S* a, int lda,
                                                    int32_t k0, int cols) {
  constexpr int kRun = kSepRun, kCols = kRun + 2;
  using Raw = typename VecIO<T, V>::Raw;
  static_assert(kSepVec % V == 0, "whole vectors of separable_plan's vector width");
  const Conv2dGeometry& g = p.g;
  const int32_t K = static_cast<int32_t>(g.dw_channels());
  const int64_t H = g.in_h, W = g.in_w, xs2 = p.x.stride[2], xs3 = p.x.stride[3];
  const T* __restrict__ x = static_cast<const T*>(p.x.data);
  const int groups = cols / V;
  int parts = 1, best = 1 << 30;
  for (int q = 1; q <= kSepRunSlots; q *= 2) {
    const int cost = (groups * q + kSepThreads - 1) / kSepThreads * (kSepRunSlots / q + 1);
    if (cost < best) best = cost, parts = q;
  }
  const int slots = kSepRunSlots / parts;

#pragma unroll 1
  for (int item = threadIdx.x; item < groups * parts; item += kSepThreads) {
    const int col = item % groups * V, part = item / groups;
    const int32_t k = k0 + col;
    const bool k_ok = k < K;  // K is a multiple of V: a vector is all channels or all padding
    float wv[9][V], scale[V], shift[V];
    load_channel_terms<T, kPrologue>(p, k, k_ok, wv, scale, shift);
    const T* chan = x + (k_ok ? k : 0);
    StripWindow<T, V, kCols> win;
    bool col_ok[kCols];
    const T* run = chan;  // the window's column 0 in input row 0 of the slot's image
    bool filled = false;  // the window holds the current slot's three input rows
    const int s_end = (part + 1) * slots;
#pragma unroll 1
    for (int s = part * slots; s < s_end; ++s) {
      const int r0 = s * kRun;
      const int64_t base = px.x_base[r0];
      const int32_t ih0 = px.ih0[r0], iw0 = px.iw0[r0];
      const bool valid = k_ok && base >= 0;
      if (valid && !filled) {
#pragma unroll
        for (int c = 0; c < kCols; ++c) col_ok[c] = in_range<int64_t>(iw0 + c, W);
        run = chan + base + iw0 * xs3;
        win.fill(run, static_cast<int64_t>(ih0), H, xs2, xs3, col_ok, kPrologue, scale, shift, p.in_relu);
      }
      // The next slot continues this one one row down: its new input row, requested before this slot's taps.
      bool more = false;
      if (valid && s + 1 < s_end) {
        const int r1 = r0 + kRun;
        more = px.x_base[r1] == base && px.iw0[r1] == iw0 && px.ih0[r1] == ih0 + 1;
      }
      const bool next_ok = more && in_range<int64_t>(ih0 + 3, H);
      Raw next[kCols];
      strip_load_row<T, V>(next, next_ok, col_ok, run + (ih0 + 3) * xs2, xs3);
      float acc[kRun][V];
#pragma unroll
      for (int q = 0; q < kRun; ++q)
#pragma unroll
        for (int v = 0; v < V; ++v) acc[q][v] = 0.f;
      if (valid) win.template accumulate<false>(col_ok, wv, acc);
#pragma unroll
      for (int q = 0; q < kRun; ++q) {
        if (px.x_base[r0 + q] < 0) {  // past the row's end (the last run of a row) or the tile's: 0
#pragma unroll
          for (int v = 0; v < V; ++v) acc[q][v] = 0.f;
        }
        store_depthwise_result<T, S, V>(p, acc[q], a + (r0 + q) * lda + col);
      }
      if (more) {
        win.slide(next, next_ok);
        if (kPrologue) win.prologue_last(col_ok, false, scale, shift, p.in_relu);
      }
      filled = more;
    }
  }
}

// Square tiles (p.square_tiles, allowed by separable_spatial_tiles: 3x3, stride 1 or 2, no dilation). For each 32 channels: the tile's
// input window goes to shared memory (prologue applied, zeros outside the image), then thread (channel
// tid % 32, tile row tid / 32) computes its 8 pixels from one window row at a time held in registers: per output
// about 4 shared-memory loads and 9 FMAs, against 9 global loads with their index math on the direct path.
// The taps are summed in the same order as there. `window` is kSide^2 * 32 elements of T (SeparableSmem).
template <typename T, typename S, int kStride, bool kCL, bool kPrologue>
__device__ __forceinline__ void depthwise_tile_square(const SeparableParams& p, S* a, int lda, int32_t k0, int cols,
                                                      T* window) {
  constexpr int kSide = (kSepSquare - 1) * kStride + 3;
  constexpr int kCh = kSepHaloChannels;
  static_assert(kSepThreads == kCh * kSepSquare && kSepTileP == kSepSquare * kSepSquare, "thread <-> (row, channel)");
  const Conv2dGeometry& g = p.g;
  const int32_t K = static_cast<int32_t>(g.dw_channels()), M = static_cast<int32_t>(g.depth_multiplier);
  const int64_t H = g.in_h, W = g.in_w;
  const int64_t xs1 = p.x.stride[1], xs2 = p.x.stride[2], xs3 = p.x.stride[3];
  const int64_t tiles_w = (g.out_w + kSepSquare - 1) / kSepSquare, tiles_h = (g.out_h + kSepSquare - 1) / kSepSquare;
  const int64_t tile = blockIdx.x, tw = tile % tiles_w, th = (tile / tiles_w) % tiles_h, n = tile / tiles_w / tiles_h;
  const int64_t ih0 = th * kSepSquare * kStride - g.pad_top, iw0 = tw * kSepSquare * kStride - g.pad_left;
  const T* __restrict__ xn = static_cast<const T*>(p.x.data) + n * p.x.stride[0];
  const T* __restrict__ wdw = static_cast<const T*>(p.dw_weight);
  const int ch = threadIdx.x % kCh, row = threadIdx.x / kCh;

  for (int c0 = 0; c0 < cols; c0 += kCh) {
    // Stage the window: channels fastest across threads when they are fastest in x, window columns otherwise.
#pragma unroll 1
    for (int e = threadIdx.x; e < kSide * kSide * kCh; e += kSepThreads) {
      const int c = kCL ? e % kCh : e / (kSide * kSide);
      const int pos = kCL ? e / kCh : e % (kSide * kSide);
      const int32_t k = k0 + c0 + c;
      const int64_t ih = ih0 + pos / kSide, iw = iw0 + pos % kSide;
      float v = 0.f;
      if (k < K && in_range<int64_t>(ih, H) && in_range<int64_t>(iw, W)) {
        const int32_t ci = M == 1 ? k : k / M;
        v = Elem<T>::load(xn + ci * xs1 + ih * xs2 + iw * xs3);
        if constexpr (kPrologue) {
          v = prologue_value<T>(v, p.in_scale != nullptr ? p.in_scale[ci] : 1.f,
                                p.in_shift != nullptr ? p.in_shift[ci] : 0.f, p.in_relu);
        }
      }
      TileElem<T>::store(window + pos * kCh + c, v);
    }
    __syncthreads();
    const int col = c0 + ch;  // the A-tile column; cols is a multiple of 32
    const int32_t k_raw = k0 + col;
    const int32_t k = k_raw < K ? k_raw : K - 1;  // padding columns compute on a real channel and are zeroed
    const T* wk = wdw + static_cast<int64_t>(k) * 9;
    float acc[kSepSquare];
#pragma unroll
    for (int q = 0; q < kSepSquare; ++q) acc[q] = 0.f;
#pragma unroll
    for (int i = 0; i < 3; ++i) {
      const float wv[3] = {Elem<T>::load(wk + 3 * i), Elem<T>::load(wk + 3 * i + 1), Elem<T>::load(wk + 3 * i + 2)};
      float line[(kSepSquare - 1) * kStride + 3];
      const T* src = window + ((row * kStride + i) * kSide) * kCh + ch;
#pragma unroll
      for (int c = 0; c < (kSepSquare - 1) * kStride + 3; ++c) line[c] = TileElem<T>::load(src + c * kCh);
#pragma unroll
      for (int q = 0; q < kSepSquare; ++q)
#pragma unroll
        for (int j = 0; j < 3; ++j) acc[q] = fmaf(line[q * kStride + j], wv[j], acc[q]);
    }
#pragma unroll
    for (int q = 0; q < kSepSquare; ++q) {
      TileElem<S>::store(a + (row * kSepSquare + q) * lda + col, k_raw < K ? depthwise_result<T>(p, acc[q]) : 0.f);
    }
    __syncthreads();  // the next chunk (or the first weight tile, which shares the region) overwrites the window
  }
}

template <typename T, typename S, int kStride>
__device__ __forceinline__ void depthwise_tile_square_dispatch(const SeparableParams& p, S* a, int lda, int32_t k0,
                                                               int cols, T* window, bool prologue) {
  if (p.x_channels_last) {
    if (prologue) {
      depthwise_tile_square<T, S, kStride, true, true>(p, a, lda, k0, cols, window);
    } else {
      depthwise_tile_square<T, S, kStride, true, false>(p, a, lda, k0, cols, window);
    }
  } else if (prologue) {
    depthwise_tile_square<T, S, kStride, false, true>(p, a, lda, k0, cols, window);
  } else {
    depthwise_tile_square<T, S, kStride, false, false>(p, a, lda, k0, cols, window);
  }
}

// kWide: the build without the 128-register cap; its vector path moves 4 channels per access, the capped build's
// 2 (the four-pixel window of 4 channels needs more than 128 registers).
// kRuns: the run tiles' build (p.run_tiles), a kernel of its own so that the other builds' registers are unchanged.
template <typename T, typename S, int KH, int KW, bool kWide, bool kRuns>
__device__ __forceinline__ void depthwise_tile_paths(const SeparableParams& p, const PixelInfo& px, S* a, int lda,
                                                     int32_t k0, int cols, unsigned char* window) {
  const bool prologue = p.in_scale != nullptr || p.in_shift != nullptr || p.in_relu;
  if constexpr (KH == 3 && KW == 3) {
    if (p.square_tiles) {
      T* w = reinterpret_cast<T*>(window);
      if (p.g.stride_h == 1) {
        depthwise_tile_square_dispatch<T, S, 1>(p, a, lda, k0, cols, w, prologue);
      } else {
        depthwise_tile_square_dispatch<T, S, 2>(p, a, lda, k0, cols, w, prologue);
      }
      return;
    }
  }
  if constexpr (kRuns) {
    static_assert(KH == 3 && KW == 3, "run tiles are 3x3");
    if (prologue) {
      depthwise_tile_runs<T, S, true, kWide ? 4 : 2>(p, px, a, lda, k0, cols);
    } else {
      depthwise_tile_runs<T, S, false, kWide ? 4 : 2>(p, px, a, lda, k0, cols);
    }
    return;
  }
  if constexpr (KH > 0 && KW > 0) {
    if (p.x_vectors) {
      if (prologue) {
        depthwise_tile_vectors<T, S, KH, KW, true, kWide ? 4 : 2>(p, px, a, lda, k0, cols);
      } else {
        depthwise_tile_vectors<T, S, KH, KW, false, kWide ? 4 : 2>(p, px, a, lda, k0, cols);
      }
      return;
    }
  }
  if (p.x_channels_last) {
    if (prologue) {
      depthwise_tile_mapped<T, S, KH, KW, true, true>(p, px, a, lda, k0, cols);
    } else {
      depthwise_tile_mapped<T, S, KH, KW, true, false>(p, px, a, lda, k0, cols);
    }
  } else if (prologue) {
    depthwise_tile_mapped<T, S, KH, KW, false, true>(p, px, a, lda, k0, cols);
  } else {
    depthwise_tile_mapped<T, S, KH, KW, false, false>(p, px, a, lda, k0, cols);
  }
}

// The depthwise stage of a tile: one of the paths above, then, with a mid affine, its pass over the tile.
template <typename T, typename S, int KH, int KW, bool kWide, bool kRuns>
__device__ __forceinline__ void depthwise_tile(const SeparableParams& p, const PixelInfo& px, S* a, int lda,
                                               int32_t k0, int cols, unsigned char* window) {
  depthwise_tile_paths<T, S, KH, KW, kWide, kRuns>(p, px, a, lda, k0, cols, window);
  if (has_mid_affine(p)) mid_affine_tile<T, S>(p, a, lda, k0, cols);
}

// ---- stage 1 of the staged form: the depthwise tile read from memory ----
// p.a_source holds act(dw(prologue(x))) already, written by the staged forward's depthwise kernels (rounded to the
// dtype, as the depthwise stages round it), pixel-major [pixels][K]: a flat tile's 64 pixels are 64 consecutive
// rows. Zeros past the last pixel and channel, as the depthwise stages write them. 16-byte vectors where the rows
// allow them and the tile holds the dtype; each thread issues kBatch loads before it stores any, so that several
// are in flight.
template <typename T, typename S>
__device__ __forceinline__ void load_a_tile(const SeparableParams& p, const PixelInfo& px, S* a, int lda, int32_t k0,
                                            int cols) {
  const int64_t K = p.g.dw_channels();
  const T* src = static_cast<const T*>(p.a_source) + static_cast<int64_t>(blockIdx.x) * kSepTileP * K;
  constexpr int V = 16 / sizeof(T);  // elements per 16-byte vector: cols (a multiple of 32) is whole vectors
  constexpr int kBatch = 4;
  const int row_vectors = cols / V, total = kSepTileP * row_vectors;
  if constexpr (std::is_same<S, T>::value) {
    if (K % V == 0 && reinterpret_cast<uintptr_t>(p.a_source) % 16 == 0 && lda % V == 0) {
      for (int e0 = threadIdx.x; e0 < total; e0 += kBatch * kSepThreads) {
        uint4 v[kBatch];
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
          const int e = e0 + b * kSepThreads, r = e / row_vectors;
          const int64_t k = k0 + static_cast<int64_t>(e % row_vectors) * V;
          v[b] = make_uint4(0u, 0u, 0u, 0u);
          if (e < total && px.out_base[r] >= 0 && k < K) v[b] = *reinterpret_cast<const uint4*>(src + r * K + k);
        }
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
          const int e = e0 + b * kSepThreads;
          if (e < total) *reinterpret_cast<uint4*>(a + (e / row_vectors) * lda + (e % row_vectors) * V) = v[b];
        }
      }
      return;
    }
  }
  for (int e = threadIdx.x; e < kSepTileP * cols; e += kSepThreads) {  // one element at a time, a warp along a row
    const int r = e / cols, kk = e % cols;
    const int64_t k = k0 + kk;
    const float v = px.out_base[r] >= 0 && k < K ? Elem<T>::load(src + r * K + k) : 0.f;
    TileElem<S>::store(a + r * lda + kk, v);
  }
}

// ---- stage 3: the epilogue of one output-channel tile, from the float32 accumulators in `c` ----
template <typename T>
__device__ __forceinline__ void epilogue_tile(const SeparableParams& p, const PixelInfo& px, float* c, int pitch,
                                              int64_t n0, int64_t tile) {
  const int64_t n_total = p.g.out_channels;
  T* __restrict__ out = static_cast<T*>(p.out.data);
  const T* __restrict__ res = static_cast<const T*>(p.residual.data);
  const bool affine = p.out_scale != nullptr || p.out_shift != nullptr;
  const bool stats = p.stats_partial != nullptr;

  // Per channel: its scale, shift and offsets; per pixel: its offsets. Each thread keeps one of the two fixed
  // across its loop (the channel with channels fastest, the pixel otherwise), so it is loaded once.
  struct Channel {
    bool ok;
    float scale, shift;
    int64_t out_off, res_off;
  };
  auto channel = [&](int col) {
    const int64_t n = n0 + col;
    Channel ch;
    ch.ok = n < n_total;
    ch.scale = ch.ok && p.out_scale != nullptr ? p.out_scale[n] : 1.f;
    ch.shift = ch.ok && p.out_shift != nullptr ? p.out_shift[n] : 0.f;
    ch.out_off = n * p.out.stride[1];
    ch.res_off = n * p.residual.stride[1];
    return ch;
  };
  auto finish = [&](int row, int col, const Channel& ch) {
    float* cv = c + row * pitch + col;
    const int64_t out_base = px.out_base[row];
    if (!ch.ok || out_base < 0) {
      *cv = 0.f;  // no contribution to the statistics
      return;
    }
    const float y = round_to<T>(*cv);
    *cv = y;
    float z = y;
    if (affine) z = round_to<T>(fmaf(z, ch.scale, ch.shift));
    if (res != nullptr) z = round_to<T>(z + Elem<T>::load(res + px.res_base[row] + ch.res_off));
    if (p.out_relu) z = kernels::relu(z);
    Elem<T>::store(out + out_base + ch.out_off, z);
  };

  if (p.out_vectors) {  // kSepVec channels per thread and access: a warp writes 128 channels of one pixel
    constexpr int kGroups = kSepTileN / kSepVec;
    static_assert(kSepThreads % kGroups == 0, "a thread keeps its channels across its pixels");
    const int col = threadIdx.x % kGroups * kSepVec;
    const int64_t n = n0 + col;
    const bool ok = n < n_total;  // out_channels is a multiple of kSepVec: all or none of the vector
    float scale[kSepVec], shift[kSepVec];
#pragma unroll
    for (int v = 0; v < kSepVec; ++v) {
      scale[v] = ok && p.out_scale != nullptr ? p.out_scale[n + v] : 1.f;
      shift[v] = ok && p.out_shift != nullptr ? p.out_shift[n + v] : 0.f;
    }
#pragma unroll 1
    for (int row = threadIdx.x / kGroups; row < kSepTileP; row += kSepThreads / kGroups) {
      float* cv = c + row * pitch + col;
      const int64_t out_base = px.out_base[row];
      float y[kSepVec], z[kSepVec];
      const bool write = ok && out_base >= 0;
#pragma unroll
      for (int v = 0; v < kSepVec; ++v) y[v] = write ? round_to<T>(cv[v]) : 0.f;  // 0: no contribution to the stats
#pragma unroll
      for (int v = 0; v < kSepVec; ++v) cv[v] = y[v];
      if (!write) continue;
      if (res != nullptr) VecIO<T>::load(res + px.res_base[row] + n, z);
#pragma unroll
      for (int v = 0; v < kSepVec; ++v) {
        float o = y[v];
        if (affine) o = round_to<T>(fmaf(o, scale[v], shift[v]));
        if (res != nullptr) o = round_to<T>(o + z[v]);
        if (p.out_relu) o = kernels::relu(o);
        z[v] = o;
      }
      VecIO<T>::store(out + out_base + n, z);
    }
  } else if (p.out_channels_last) {  // a warp writes 32 consecutive channels of one pixel; a thread keeps its channel
    const int col = threadIdx.x % kSepTileN;
    const Channel ch = channel(col);
    for (int row = threadIdx.x / kSepTileN; row < kSepTileP; row += kSepThreads / kSepTileN) finish(row, col, ch);
  } else {  // 64 consecutive pixels of one channel
    for (int col = threadIdx.x / kSepTileP; col < kSepTileN; col += kSepThreads / kSepTileP) {
      finish(threadIdx.x % kSepTileP, col, channel(col));
    }
  }
  if (!stats) return;
  __syncthreads();
  if (threadIdx.x < kSepTileN && n0 + threadIdx.x < n_total) {  // one thread per channel, rows in order
    float s = 0.f, ss = 0.f;
    for (int row = 0; row < kSepTileP; ++row) {
      const float y = c[row * pitch + threadIdx.x];
      s += y;
      ss = fmaf(y, y, ss);
    }
    float* partial = p.stats_partial + tile * 2 * n_total;
    partial[n0 + threadIdx.x] = s;
    partial[n_total + n0 + threadIdx.x] = ss;
  }
}

// Gemm::WeightStream, named through a template so that kernels whose GEMM has none (FFMA, wmma) compile.
template <typename Gemm, typename T>
__device__ __forceinline__ typename Gemm::WeightStream make_weight_stream(const T* w, int64_t n0, int64_t k0,
                                                                          int64_t n_total, int64_t k_total) {
  return typename Gemm::WeightStream(w, n0, k0, n_total, k_total);
}

// ---- the fused forward ----
// T: element type. kMath: the GEMM mode the launcher chose; on GPUs below sm_80 every mode compiles to FFMA
// (the launcher never asks them for tensor cores). KH, KW: kernel size known at compile time, 0 = run time.
// kMinBlocks: blocks per SM the registers must allow. 2 caps a thread at 128 registers, which spilled
// accumulators inside the 16-bit GEMM loop; where shared memory allows one block per SM anyway (the 728-channel
// layers), the launcher takes the kMinBlocks = 1 build, which does not spill. kRuns: the build for run tiles
// (p.run_tiles; 3x3, the mma.sync path), whose depthwise stage is depthwise_tile_runs.
template <typename T, PointwiseMath kMath, int KH, int KW, int kMinBlocks = 2, bool kRuns = false>
__global__ void __launch_bounds__(kSepThreads, kMinBlocks) separable_forward_kernel(const SeparableParams p) {
  constexpr bool k16 = separable_16bit_tensor_cores(kMath);
  using S = typename std::conditional<k16, T, float>::type;  // tile element
  XO_EXTERN_SHARED __align__(128) unsigned char smem[];
  const Conv2dGeometry& g = p.g;
  const SeparableSmem layout = separable_smem(p, p.a_pitch, kMath, static_cast<int>(sizeof(T)));
  PixelInfo px;
  px.x_base = reinterpret_cast<int64_t*>(smem);
  px.out_base = px.x_base + kSepTileP;
  px.res_base = px.out_base + kSepTileP;
  px.ih0 = reinterpret_cast<int32_t*>(px.res_base + kSepTileP);
  px.iw0 = px.ih0 + kSepTileP;
  S* a = reinterpret_cast<S*>(smem + layout.pixel_info);
  unsigned char* bc = smem + layout.pixel_info + layout.a_tile;  // weight buffers, then the accumulators
  float* c = reinterpret_cast<float*>(bc);
  const int lda = p.a_pitch;

  const int64_t tile = blockIdx.x;
  const int64_t npix = g.batch * g.out_h * g.out_w;
  if (threadIdx.x < kSepTileP) {
    int64_t n, oh, ow;
    bool inside;
    if (p.square_tiles) {  // an 8 x 8 square of one image
      const int64_t tiles_w = (g.out_w + kSepSquare - 1) / kSepSquare;
      const int64_t tiles_h = (g.out_h + kSepSquare - 1) / kSepSquare;
      oh = (tile / tiles_w) % tiles_h * kSepSquare + threadIdx.x / kSepSquare;
      ow = tile % tiles_w * kSepSquare + threadIdx.x % kSepSquare;
      n = tile / tiles_w / tiles_h;
      inside = oh < g.out_h && ow < g.out_w;
    } else if (p.run_tiles) {  // kSepRunSlots runs of kSepRun pixels, the runs ordered (image, run of columns, row)
      const int64_t runs_w = (g.out_w + kSepRun - 1) / kSepRun;
      const int64_t slot = tile * kSepRunSlots + threadIdx.x / kSepRun;
      oh = slot % g.out_h;
      n = slot / g.out_h / runs_w;
      ow = slot / g.out_h % runs_w * kSepRun + threadIdx.x % kSepRun;
      inside = n < g.batch && ow < g.out_w;
    } else {  // 64 consecutive pixels of the flattened index
      const int64_t q = tile * kSepTileP + threadIdx.x;
      ow = q % g.out_w, oh = q / g.out_w % g.out_h, n = q / g.out_w / g.out_h;
      inside = q < npix;
    }
    if (inside) {
      px.x_base[threadIdx.x] = n * p.x.stride[0];
      px.out_base[threadIdx.x] = n * p.out.stride[0] + oh * p.out.stride[2] + ow * p.out.stride[3];
      px.res_base[threadIdx.x] = p.residual.data != nullptr
                                     ? n * p.residual.stride[0] + oh * p.residual.stride[2] + ow * p.residual.stride[3]
                                     : 0;
      px.ih0[threadIdx.x] = static_cast<int32_t>(oh * g.stride_h - g.pad_top);
      px.iw0[threadIdx.x] = static_cast<int32_t>(ow * g.stride_w - g.pad_left);
    } else {
      px.x_base[threadIdx.x] = -1;
      px.out_base[threadIdx.x] = -1;
      px.res_base[threadIdx.x] = 0;
      px.ih0[threadIdx.x] = 0;
      px.iw0[threadIdx.x] = 0;
    }
  }
  __syncthreads();

  const int32_t K = static_cast<int32_t>(g.dw_channels());
  const int64_t n_total = g.out_channels;
  const T* w = static_cast<const T*>(p.pw_weight);
  const bool resident = p.k_chunk >= K;
  if (p.run_tiles != kRuns) __trap();  // the pixel mapping and the depthwise stage must agree (the launcher's pick)
  // The staged form's builds: the mma.sync GEMM on flat tiles (the torch layer's only use); compiled out of the
  // others, whose registers it would change (the one-block run-tile build spilled 36 bytes with it).
  constexpr bool kFromMemory = kMath == PointwiseMath::TensorCore && !kRuns;
  if (p.a_source != nullptr && (!kFromMemory || p.square_tiles)) __trap();
  if (p.a_source == nullptr && p.store_mid != (has_mid_affine(p) ? 0 : p.mid)) __trap();  // separable_plan's

#if defined(XO_SEPARABLE_WMMA)  // a device of sm_80+: 16-bit operands through mma.sync (or wmma), TF32 through wmma
  using TensorGemm = typename std::conditional<kMath == PointwiseMath::TensorCore, MmaGemm<T>, WmmaGemm<T>>::type;
  using Gemm = typename std::conditional<kMath == PointwiseMath::Ffma, FfmaGemm, TensorGemm>::type;
  using BType = typename std::conditional<kMath == PointwiseMath::Ffma, float, T>::type;
#elif defined(XO_SEPARABLE_MMA)  // the CPU emulation: mma.sync emulated, wmma and TF32 on the FFMA path
  using Gemm = typename std::conditional<kMath == PointwiseMath::TensorCore, MmaGemm<T>, FfmaGemm>::type;
  using BType = typename std::conditional<kMath == PointwiseMath::TensorCore, T, float>::type;
#else
  using Gemm = FfmaGemm;
  using BType = float;
#endif
#if defined(XO_SEPARABLE_MMA)
  constexpr bool kAsync = kMath == PointwiseMath::TensorCore;  // cp.async weight ring (MmaGemm::WeightStream)
#else
  constexpr bool kAsync = false;
  // The mma.sync path's shared-memory plan has no room for the FFMA tiles this build would use in its place: the
  // launcher asks for that path on sm_80+ only (separable_math), and anything else stops here, loudly.
  if constexpr (kMath == PointwiseMath::TensorCore) __trap();
#endif
  // The plan's ring depth (2 for register double-buffering, else 4 or 3) and accumulator pitch. Only the mma.sync
  // path's plan departs from the defaults, and only for a depthwise tile that fills the shared memory, which the
  // launcher runs in the one-block-per-SM build: the capped 3x3 build keeps them compile-time constants (read
  // from the params they cost it 24 more bytes of spills) and stops loudly if asked otherwise.
  constexpr bool kPlanned = kMath == PointwiseMath::TensorCore && (kMinBlocks == 1 || KH == 0);
  if (!kPlanned && (p.weight_stages != 0 || p.c_pitch != 0)) __trap();
  const int stages = kPlanned ? separable_stages(p, kMath) : separable_weight_stages(kMath);
  const int c_pitch = kPlanned ? separable_c_pitch(p) : kSepCPitch;
  // The weight buffer of step s: chosen by arithmetic, not from an array of pointers, so that the compiler keeps
  // knowing it is shared memory (an indexed pointer array made every access a generic LD / ST).
  auto buffer = [&](int s) { return reinterpret_cast<BType*>(bc + (s % stages) * layout.stage); };

  // Block (x, y) covers pixel tile x and every gridDim.y-th output-channel tile from y.
  bool first = true;
  for (int64_t n0 = static_cast<int64_t>(blockIdx.y) * kSepTileN; n0 < n_total;
       n0 += static_cast<int64_t>(gridDim.y) * kSepTileN) {
    Gemm gemm;
    // The capped run tiles' build zeroes the accumulators after the depthwise stage instead: not live across it,
    // they leave the window more registers (spills 280 -> 188 bytes, sm_90, bf16; the uncapped build has none).
    constexpr bool kZeroLate = kRuns && kMinBlocks > 1;
    if constexpr (!kZeroLate) gemm.zero();
    for (int32_t k0 = 0; k0 < K; k0 += p.k_chunk) {
      const int cols = static_cast<int>(round_up(K - k0 < p.k_chunk ? K - k0 : p.k_chunk, kSepKStep));
      const int steps = cols / kSepKStep;
      [[maybe_unused]] const bool weight_vectors = K % 8 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0;
      // The ring's first stages - 1 weight tiles (3 or 2), one cp.async group each (empty past the last step).
      // Requested before the depthwise stage where it leaves their buffers alone (flat tiles: square tiles stage
      // their input window there), so that their latency overlaps it; they waited after it before.
      [[maybe_unused]] auto request_first_tiles = [&](const auto& weights) {
#pragma unroll
        for (int s = 0; s < 3; ++s) {
          if (s == stages - 1) break;
          if (s < steps) weights.copy(buffer(s), s, K, weight_vectors);
          cp_async_commit();
        }
      };
      const bool weights_early = !p.square_tiles;
      if constexpr (kAsync) {
        // (A stream made here and again below, not one kept across the depthwise stage: kept, its registers
        // raised the capped build's spills from 144 to 160 bytes.)
        if (weights_early) request_first_tiles(make_weight_stream<Gemm>(w, n0, k0, n_total, K));
      }
      if (!resident || first) {
        if (kFromMemory && p.a_source != nullptr) {  // the staged form: computed already
          load_a_tile<T, S>(p, px, a, lda, k0, cols);
        } else {
          depthwise_tile<T, S, KH, KW, kMinBlocks == 1, kRuns>(p, px, a, lda, k0, cols, bc);
        }
      }
      if constexpr (kZeroLate) {
        if (k0 == 0) gemm.zero();
      }
      if constexpr (kAsync) {
        // A ring of `stages` buffers: the tiles of the next stages - 1 steps are in flight while one is used;
        // one barrier per step, after which the buffer of the step before is free for the next copy.
        const auto weights = make_weight_stream<Gemm>(w, n0, k0, n_total, K);
        if (!weights_early) request_first_tiles(weights);
        for (int s = 0; s < steps; ++s) {
          if (stages == 4) {  // at most stages - 2 groups may still be in flight
            cp_async_wait<2>();
          } else {
            cp_async_wait<1>();
          }
          __syncthreads();  // step s's tile (and at s = 0 the depthwise tile) is in place for every thread
          const int next = s + stages - 1;
          if (next < steps) weights.copy(buffer(next), next, K, weight_vectors);
          cp_async_commit();
          gemm.step(a, lda, s * kSepKStep, buffer(s));
        }
        __syncthreads();  // every warp is done with the buffers and the depthwise tile
      } else {
        // Weight tiles double-buffered: the next one is fetched into registers before the current one is
        // used, and stored into the other buffer after; one barrier per step.
        typename Gemm::Regs regs;
        Gemm::fetch(regs, w, n0, k0, n_total, K);
        Gemm::stash(buffer(0), regs);
        __syncthreads();  // the depthwise tile and the first weight tile are in place
        for (int s = 0; s < steps; ++s) {
          const bool more = s + 1 < steps;
          if (more) Gemm::fetch(regs, w, n0, k0 + (s + 1) * kSepKStep, n_total, K);
          gemm.step(a, lda, s * kSepKStep, buffer(s));
          if (more) Gemm::stash(buffer(s + 1), regs);
          __syncthreads();
        }
      }
    }
    first = false;
    gemm.store(c, c_pitch);  // over the weight buffers: every step is done (the barrier above)
    __syncthreads();
    epilogue_tile<T>(p, px, c, c_pitch, n0, tile);
    __syncthreads();  // c and the weight buffers are reused by the next tile
  }
}

// ---- fixed-order reduction of the statistics partials (static: the header is in several translation units) ----
// in: [rows][cols] float32. Block (x, y) sums rows [64 x, 64 x + 64) of columns [256 y, 256 y + 256) in order
// (row groups on x: grid.y is limited to 65535). With sum / sumsq set (the last level, one row group) column
// c < half goes to sum[c], the rest to sumsq[c - half]; otherwise the result is row x of `out`.
static __global__ void __launch_bounds__(256) separable_stats_reduce_kernel(const float* in, int64_t rows, int64_t cols,
                                                                    float* out, float* sum, float* sumsq,
                                                                    int64_t half) {
  const int64_t col = static_cast<int64_t>(blockIdx.y) * 256 + threadIdx.x;
  if (col >= cols) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * 64;
  const int64_t r1 = r0 + 64 < rows ? r0 + 64 : rows;
  float s = 0.f;
  for (int64_t r = r0; r < r1; ++r) s += in[r * cols + col];
  if (sum != nullptr) {
    if (col < half) {
      sum[col] = s;
    } else {
      sumsq[col - half] = s;
    }
  } else {
    out[static_cast<int64_t>(blockIdx.x) * cols + col] = s;
  }
}

}  // namespace kernels
}  // namespace xception_ops
