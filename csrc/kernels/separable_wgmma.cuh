// The fused separable forward on Hopper's wgmma (SeparableWgmmaParams, kernels/pointwise_gemm_params.h), for few
// depthwise channels: the depthwise result of a tile of 128 pixels is computed straight into shared memory and
// multiplied there, so it never reaches global memory. At Xception's 147^2 and 74^2 entry layers (K = 64 or 128)
// the staged form writes and reads back a depthwise result as large as x, ~40% of its bytes. Torch-free; the
// kernel body exists for sm_90a (and in the CPU emulation of the tests).
//
// A persistent block (one per SM) keeps the pointwise weight [kN][kK] in shared memory as core matrices (as
// kernels/pointwise_gemm.cuh's B) and walks pixel tiles gridDim.x apart. Per tile:
//   depthwise: item i of the tile (8 channels of one pixel; i = 8 (px / 8) kG + 8 cg + px % 8 for channel group cg
//     of kG = kK / 8, so that item i's 16 bytes go to byte 16 i of the A tile: A in core matrices, conflict-free)
//     sums its 9 taps of x, 16-byte loads with the prologue applied and rounded as they are read (padding reads 0),
//     in float32 with the weights from shared memory; then the mid stage (mid_value: rounded, the mid affine,
//     the activation);
//   product: the two warpgroups issue kK / 16 wgmma each (64 pixels x kN, A and B through descriptors), which run
//     while the block computes the next tile's depthwise result into the other A buffer;
//   epilogue: wgmma_tile_epilogue (folded BN, residual, ReLU, the statistics), after waiting for the products.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "pointwise_gemm.cuh"
#include "pointwise_gemm_params.h"

namespace xception_ops {
namespace kernels {

template <typename T, int kN, int kK>
__global__ void __launch_bounds__(kPwThreads, 1) separable_wgmma_kernel(const SeparableWgmmaParams p) {
#if defined(XO_POINTWISE_WGMMA)
  static_assert(sizeof(T) == 2, "16-bit operands");
  static_assert(kK % 16 == 0 && kK <= 128 && (kN == 128 || kN == 256), "a build the launcher holds");
  constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
  constexpr int kGroups = kK / 8;                  // 16-byte channel groups of a row
  constexpr uint32_t kStride = kGroups * 128;      // bytes between 8-row groups of A and of B (K-major)
  constexpr int kABytes = kPwTileM * kK * 2;
  XO_EXTERN_SHARED __align__(128) unsigned char smem[];
  T* b_tile = reinterpret_cast<T*>(smem);
  // A buffer b, by arithmetic (an indexed array of pointers would make its accesses generic loads and stores).
  auto a_tile = [&](int b) { return reinterpret_cast<T*>(smem + kN * kK * 2 + b * kABytes); };
  float* weights = reinterpret_cast<float*>(smem + kN * kK * 2 + 2 * kABytes);  // [kK][9]
  float* in_scale = weights + kK * 9;
  float* in_shift = in_scale + kK;
  float* mid_scale = in_shift + kK;
  float* mid_shift = mid_scale + kK;
  unsigned char* scratch = reinterpret_cast<unsigned char*>(mid_shift + kK);

  const PointwiseGemmParams& pw = p.pw;
  const int tid = threadIdx.x, warp = tid / 32, group = warp / 4;
  const int32_t K = pw.k;
  const int64_t m_tiles = pointwise_m_tiles(pw);

  // Once per block: the pointwise weight (chunk c at byte 16 c: output channel 8 (c / (8 kG)) + c % 8, input
  // channels 8 ((c / 8) % kG) ..), the depthwise weights, the prologue and the mid affine in float32 (1 and 0 where
  // absent and past K).
  {
    const T* w = static_cast<const T*>(pw.w);
    for (int c = tid; c < kN * kGroups; c += kPwThreads) {
      const int32_t ch = 8 * (c / (8 * kGroups)) + c % 8, k0 = 8 * ((c / 8) % kGroups);
      stage_chunk(b_tile + 8 * c, w + static_cast<int64_t>(ch < pw.n ? ch : 0) * K + k0, ch < pw.n && k0 < K);
    }
    cp_async_commit();
    const T* dw = static_cast<const T*>(p.dw_weight);
    for (int i = tid; i < kK * 9; i += kPwThreads) weights[i] = i / 9 < K ? Elem<T>::load(dw + i) : 0.f;
    for (int c = tid; c < kK; c += kPwThreads) {
      in_scale[c] = p.in_scale != nullptr && c < K ? p.in_scale[c] : 1.f;
      in_shift[c] = p.in_shift != nullptr && c < K ? p.in_shift[c] : 0.f;
      mid_scale[c] = p.mid_scale != nullptr && c < K ? p.mid_scale[c] : 1.f;
      mid_shift[c] = p.mid_shift != nullptr && c < K ? p.mid_shift[c] : 0.f;
    }
    cp_async_wait<0>();
    __syncthreads();  // the weights and the prologue, for every thread's depthwise work
  }
  const bool prologue = p.in_scale != nullptr || p.in_shift != nullptr || p.in_relu;
  const bool mid_affine = p.mid_scale != nullptr || p.mid_shift != nullptr;

  // The depthwise result of pixel tile `tile` into `a` (core matrices; zeros past the last pixel and past K).
  const T* __restrict__ x = static_cast<const T*>(p.x);
  auto depthwise = [&](int64_t tile, T* a) {
    for (int i = tid; i < kPwTileM * kGroups; i += kPwThreads) {
      const int px = 8 * (i / (8 * kGroups)) + i % 8, c0 = 8 * ((i / 8) % kGroups);
      const int64_t q = tile * kPwTileM + px;
      float sum[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) sum[j] = 0.f;
      if (q < pw.m && c0 < K) {
        const int64_t ow = q % p.out_w, oh = q / p.out_w % p.out_h, n = q / p.out_w / p.out_h;
#pragma unroll
        for (int ky = 0; ky < 3; ++ky) {
          const int64_t ih = oh - p.pad_top + ky;
          if (ih < 0 || ih >= p.in_h) continue;
#pragma unroll
          for (int kx = 0; kx < 3; ++kx) {
            const int64_t iw = ow - p.pad_left + kx;
            if (iw < 0 || iw >= p.in_w) continue;
            const uint4 raw =
                load_readonly(reinterpret_cast<const uint4*>(x + ((n * p.in_h + ih) * p.in_w + iw) * K + c0));
            const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
            for (int j = 0; j < 8; ++j) {
              float v = from_bits16<T>(j % 2 == 0 ? words[j / 2] & 0xffffu : words[j / 2] >> 16);
              if (prologue) {
                v = fmaf(v, in_scale[c0 + j], in_shift[c0 + j]);
                if (p.in_relu) v = kernels::relu(v);
                v = round_to<T>(v);
              }
              sum[j] = fmaf(v, weights[(c0 + j) * 9 + 3 * ky + kx], sum[j]);
            }
          }
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          sum[j] = mid_value<T>(sum[j], p.mid, mid_affine, mid_scale[c0 + j], mid_shift[c0 + j]);
        }
      }
      *reinterpret_cast<uint4*>(a + 8 * i) =
          make_uint4(bits16<T>(sum[0]) | (bits16<T>(sum[1]) << 16), bits16<T>(sum[2]) | (bits16<T>(sum[3]) << 16),
                     bits16<T>(sum[4]) | (bits16<T>(sum[5]) << 16), bits16<T>(sum[6]) | (bits16<T>(sum[7]) << 16));
    }
  };

  float acc[kN / 2];
  const uint32_t b_base = smem_address(b_tile);
  // The products of the tile in `a`: each warpgroup its 64 rows, kK / 16 steps of 16 input channels (core
  // matrices 128 bytes apart along K, row groups kStride apart), one group of wgmma.
  auto issue = [&](const T* a) {
    zero_accumulators(acc);
    wgmma_fence();
    const uint32_t a_base = smem_address(a) + 64 / 8 * kStride * group;
#pragma unroll
    for (int ks = 0; ks < kK / 16; ++ks) {
      wgmma_ss<kN, kBf16>(acc, wgmma_desc(a_base + 256 * ks, 128, kStride),
                          wgmma_desc(b_base + 256 * ks, 128, kStride));
    }
    wgmma_commit();
  };

  int64_t tile = blockIdx.x;
  int buf = 0;
  if (tile < m_tiles) {
    depthwise(tile, a_tile(0));
    fence_proxy_async();  // the weight's copies (waited above) and the depthwise stores, for wgmma's reads
    __syncthreads();
    issue(a_tile(0));
  }
  for (; tile < m_tiles; tile += gridDim.x, buf ^= 1) {
    const int64_t next = tile + gridDim.x;
    if (next < m_tiles) depthwise(next, a_tile(buf ^ 1));  // while this tile's products run
    wgmma_wait<0>();
    wgmma_fence_operands(acc);
    wgmma_tile_epilogue<T, kN>(pw, acc, scratch, tile, 0);  // ends with a barrier
    if (next < m_tiles) {
      fence_proxy_async();
      __syncthreads();  // every thread's part of the next A tile is in place
      issue(a_tile(buf ^ 1));
    }
  }
  wgmma_wait<0>();
#elif defined(__CUDA_ARCH__)
  __trap();  // not built for sm_90a: the launcher never runs it (pointwise_wgmma_available)
#endif
}

}  // namespace kernels
}  // namespace xception_ops
