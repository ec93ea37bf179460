// Kernels of the separable conv backward (the "cuda" backend's, csrc/cuda/separable_backward_backend.cpp):
//   separable_pointwise_grad_kernel   grad_pw[n][k] = sum over pixels p of grad_y[p][n] * mid[p][k], where
//                                     mid = act(dw(prologue(x))) is recomputed from x tile by tile, never stored;
//   separable_channel_pass_kernel     the element-wise passes with per-channel sums: grad_y from grad_out, and
//                                     the prologue's backward;
//   prologue_apply_kernel             relu?(x * scale + shift), what the depthwise weight gradient reads.
//
// Torch-free: takes a PointwiseGradParams (kernels/separable_params.h); compiles with nvcc or clang for any GPU
// from sm_37 on (16-bit operands on tensor cores through mma.sync from sm_80, FFMA elsewhere).
//
// The pointwise gradient: block (x, y, z) owns depthwise channels [64 x, 64 x + 64) x output channels [128 y, 128 y + 128) and the
// pixels of slice z: the recomputed operand is the narrow one, so each depthwise value is computed
// C_out / 128 times in all. Per step of 32 pixels:
//   1. the step's pixel offsets into shared memory;
//   2. A = mid^T [64 k][32 p], each thread computing depthwise outputs with the prologue applied as x is read and
//      the result rounded to the dtype (as the forward rounds it), and B = grad_y^T [128 n][32 p] from grad_y
//      (a warp reads consecutive n of one pixel);
//   3. one 32-deep step of the forward's GEMM (MmaGemm / FfmaGemm) into float32 accumulators, grad_pw^T.
// The block's 64 x 128 sums go, transposed, to row z of a float32 partial buffer [slices][C_out][K]; the caller
// sums the rows in a fixed order (bitwise reproducible, no atomics).
#pragma once

#include "separable.cuh"

namespace xception_ops {
namespace kernels {

// The depthwise output mid[pixel][k] of one pixel and channel, from x (prologue applied, padding 0 after it),
// rounded to T, then the mid activation.
template <typename T, int KH, int KW>
__device__ __forceinline__ float depthwise_value(const SeparableParams& p, int64_t x_base, int32_t ih0, int32_t iw0,
                                                 int32_t k) {
  const Conv2dGeometry& g = p.g;
  const int kh_n = KH > 0 ? KH : static_cast<int>(g.kernel_h);
  const int kw_n = KW > 0 ? KW : static_cast<int>(g.kernel_w);
  const int32_t M = static_cast<int32_t>(g.depth_multiplier);
  const int32_t ci = M == 1 ? k : k / M;
  const T* __restrict__ x = static_cast<const T*>(p.x.data);
  const T* __restrict__ wk = static_cast<const T*>(p.dw_weight) + static_cast<int64_t>(k) * kh_n * kw_n;
  const bool prologue = p.in_scale != nullptr || p.in_shift != nullptr || p.in_relu;
  const float scale = p.in_scale != nullptr ? p.in_scale[ci] : 1.f;
  const float shift = p.in_shift != nullptr ? p.in_shift[ci] : 0.f;
  const T* chan = x + x_base + ci * p.x.stride[1];
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < kh_n; ++i) {  // unrolled when the kernel size is a template argument
    const int64_t ih = ih0 + static_cast<int64_t>(i) * g.dilation_h;
    if (!in_range<int64_t>(ih, g.in_h)) continue;
#pragma unroll
    for (int j = 0; j < kw_n; ++j) {
      const int64_t iw = iw0 + static_cast<int64_t>(j) * g.dilation_w;
      if (!in_range<int64_t>(iw, g.in_w)) continue;
      float v = Elem<T>::load(chan + ih * p.x.stride[2] + iw * p.x.stride[3]);
      if (prologue) v = prologue_value<T>(v, scale, shift, p.in_relu);
      sum = fmaf(v, Elem<T>::load(wk + i * kw_n + j), sum);
    }
  }
  float v = round_to<T>(sum);
  if (p.mid == 1) v = fmaxf(v, 0.f);
  if (p.mid == 2 && v <= 0.f) v = round_to<T>(expm1f(v));
  return v;
}

constexpr int kPwgRows = 64;                // depthwise channels per block (the GEMM's rows)

// The depthwise values of a step for 3x3 kernels, kSepVec channels at a time: thread t takes channels
// k0 + 4 (t % 16) .. + 4 (the same for the whole block, so its weights and prologue load once) and pixels
// t / 16 and t / 16 + 16 of the step; per tap one predicated load of 4 channels. Values as depthwise_value.
template <typename T, typename S>
struct MidVectors {
  static constexpr int V = kSepVec, kTaps = 9;
  float wv[kTaps][V], scale[V], shift[V];
  bool k_ok = false;
  int32_t k = 0;

  __device__ __forceinline__ void init(const SeparableParams& p, int64_t k0, int64_t K) {
    k = static_cast<int32_t>(k0) + V * static_cast<int32_t>(threadIdx.x % 16);
    k_ok = k < K;  // K is a multiple of V
    const T* wdw = static_cast<const T*>(p.dw_weight);
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const T* wk = wdw + static_cast<int64_t>(k_ok ? k + v : 0) * kTaps;
#pragma unroll
      for (int t = 0; t < kTaps; ++t) wv[t][v] = Elem<T>::load(wk + t);
      scale[v] = p.in_scale != nullptr && k_ok ? p.in_scale[k + v] : 1.f;
      shift[v] = p.in_shift != nullptr && k_ok ? p.in_shift[k + v] : 0.f;
    }
  }

  __device__ __forceinline__ void fill(const SeparableParams& p, S* a, int lda, const int64_t* x_base,
                                       const int32_t* ih0, const int32_t* iw0, int64_t K) const {
    const Conv2dGeometry& g = p.g;
    const bool prologue = p.in_scale != nullptr || p.in_shift != nullptr || p.in_relu;
    const int kl = V * static_cast<int>(threadIdx.x % 16);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int pl = static_cast<int>(threadIdx.x / 16) + 16 * half;
      const int64_t base = x_base[pl];
      float acc[V] = {0.f, 0.f, 0.f, 0.f};
      if (k_ok && base >= 0) {
        const T* chan = static_cast<const T*>(p.x.data) + base + k;
#pragma unroll
        for (int i = 0; i < 3; ++i) {
          const int64_t ih = ih0[pl] + static_cast<int64_t>(i) * g.dilation_h;
          const bool row_ok = in_range<int64_t>(ih, g.in_h);
#pragma unroll
          for (int j = 0; j < 3; ++j) {
            const int64_t iw = iw0[pl] + static_cast<int64_t>(j) * g.dilation_w;
            const bool ok = row_ok && in_range<int64_t>(iw, g.in_w);
            const T* src = chan + (ok ? ih * p.x.stride[2] + iw * p.x.stride[3] : 0);
            float xv[V];
            if (prologue) {
              load_input<T, V, true>(ok, src, scale, shift, p.in_relu, xv);
            } else {
              load_input<T, V, false>(ok, src, scale, shift, p.in_relu, xv);
            }
#pragma unroll
            for (int v = 0; v < V; ++v) acc[v] = fmaf(xv[v], wv[i * 3 + j][v], acc[v]);
          }
        }
      }
#pragma unroll
      for (int v = 0; v < V; ++v) {
        float y = round_to<T>(acc[v]);
        if (p.mid == 1) y = fmaxf(y, 0.f);
        if (p.mid == 2 && y <= 0.f) y = round_to<T>(expm1f(y));
        TileElem<S>::store(a + (kl + v) * lda + pl, k_ok && base >= 0 ? y : 0.f);
      }
    }
  }
};
static_assert(kSepThreads == 16 * 16 && kPwgRows == 16 * kSepVec, "16 vectors of channels by 16 pixels a pass");
constexpr int kPwgPixels = kSepKStep;       // pixels per step (the GEMM's reduction)
static_assert(kPwgRows == kSepTileP && kSepTileN == 128, "the forward's 64 x 128 GEMM tile");

// Shared memory of the pointwise-gradient kernel (bytes, 128-aligned regions): pixel offsets, A, B, and the
// float32 accumulator tile after the loop (over A and B).
struct PointwiseGradSmem {
  size_t pixels, a, b, total;
};
XO_HOST_DEVICE inline PointwiseGradSmem pointwise_grad_smem(PointwiseMath math, int dtype_bytes) {
  PointwiseGradSmem s;
  const bool k16 = separable_16bit_tensor_cores(math);
  const size_t eb = k16 ? static_cast<size_t>(dtype_bytes) : sizeof(float);
  s.pixels = align128(static_cast<size_t>(kPwgPixels) * (sizeof(int64_t) + 2 * sizeof(int32_t)));
  s.a = align128(static_cast<size_t>(kPwgRows) * (kPwgPixels + (k16 ? 8 : 4)) * eb);
  s.b = align128(k16 ? static_cast<size_t>(kSepTileN) * kSepBPitch16 * eb
                     : static_cast<size_t>(kPwgPixels) * kSepBPitchKN * sizeof(float));
  const size_t c = static_cast<size_t>(kPwgRows) * kSepCPitch * sizeof(float);
  s.total = s.pixels + (s.a + s.b > c ? s.a + s.b : c);
  return s;
}

template <typename T, PointwiseMath kMath, int KH, int KW>
__global__ void __launch_bounds__(kSepThreads, 2) separable_pointwise_grad_kernel(const PointwiseGradParams q) {
  constexpr bool k16 = separable_16bit_tensor_cores(kMath);
  using S = typename std::conditional<k16, T, float>::type;  // element of the A and B tiles
#if defined(XO_SEPARABLE_MMA)
  using Gemm = typename std::conditional<k16, MmaGemm<T>, FfmaGemm>::type;
#else
  using Gemm = FfmaGemm;
#endif
  constexpr bool kMma = !std::is_same<Gemm, FfmaGemm>::value;
  constexpr int lda = kPwgPixels + (k16 ? 8 : 4);
  XO_EXTERN_SHARED __align__(128) unsigned char smem[];
  const PointwiseGradSmem layout = pointwise_grad_smem(kMath, static_cast<int>(sizeof(T)));
  int64_t* x_base = reinterpret_cast<int64_t*>(smem);
  int32_t* ih0 = reinterpret_cast<int32_t*>(x_base + kPwgPixels);
  int32_t* iw0 = ih0 + kPwgPixels;
  S* a = reinterpret_cast<S*>(smem + layout.pixels);
  using BType = typename std::conditional<kMma, T, float>::type;
  BType* b = reinterpret_cast<BType*>(smem + layout.pixels + layout.a);
  float* c = reinterpret_cast<float*>(smem + layout.pixels);

  const SeparableParams& p = q.fwd;
  const Conv2dGeometry& g = p.g;
  const int64_t n_total = g.out_channels, K = g.dw_channels();
  const int64_t npix = g.batch * g.out_h * g.out_w;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kPwgRows;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kSepTileN;
  const T* __restrict__ gy = static_cast<const T*>(q.grad_y);

  auto fill_scalar = [&]() {
    for (int e = threadIdx.x; e < kPwgRows * kPwgPixels; e += kSepThreads) {
      const int kl = e % kPwgRows, pl = e / kPwgRows;
      const int64_t k = k0 + kl;
      const int64_t base = x_base[pl];
      const float v = k < K && base >= 0 ? depthwise_value<T, KH, KW>(p, base, ih0[pl], iw0[pl], static_cast<int32_t>(k))
                                         : 0.f;
      TileElem<S>::store(a + kl * lda + pl, v);
    }
  };
  // With x_vectors: a thread keeps the weights and prologue of kSepVec channels for the whole block.
  MidVectors<T, S> vec;
  if constexpr (KH == 3 && KW == 3) {
    if (q.x_vectors) vec.init(p, k0, K);
  }

  Gemm gemm;
  gemm.zero();
  const int64_t first = static_cast<int64_t>(blockIdx.z) * q.steps_per_slice;
  for (int64_t step = first; step < first + q.steps_per_slice; ++step) {
    const int64_t p0 = step * kPwgPixels;
    if (p0 >= npix) break;  // uniform across the block
    if (threadIdx.x < kPwgPixels) {
      const int64_t pix = p0 + threadIdx.x;
      if (pix < npix) {
        const int64_t ow = pix % g.out_w, oh = pix / g.out_w % g.out_h, n = pix / g.out_w / g.out_h;
        x_base[threadIdx.x] = n * p.x.stride[0];
        ih0[threadIdx.x] = static_cast<int32_t>(oh * g.stride_h - g.pad_top);
        iw0[threadIdx.x] = static_cast<int32_t>(ow * g.stride_w - g.pad_left);
      } else {
        x_base[threadIdx.x] = -1;
      }
    }
    __syncthreads();  // the pixel offsets are in place; the previous step's GEMM is done with A and B
    // A[k][p] = mid of channel k0 + k at pixel p0 + p: consecutive threads take consecutive channels of a pixel.
    if constexpr (KH == 3 && KW == 3) {
      if (q.x_vectors) {
        vec.fill(p, a, lda, x_base, ih0, iw0, K);
      } else {
        fill_scalar();
      }
    } else {
      fill_scalar();
    }
    // B = grad_y^T: [n][p] for mma.sync (B column-major), [p][n] for FFMA; consecutive threads read consecutive n.
    for (int e = threadIdx.x; e < kSepTileN * kPwgPixels; e += kSepThreads) {
      const int nl = e % kSepTileN, pl = e / kSepTileN;
      const int64_t n = n0 + nl, pix = p0 + pl;
      const float v = n < n_total && pix < npix ? Elem<T>::load(gy + pix * n_total + n) : 0.f;
      if constexpr (kMma) {
        TileElem<T>::store(b + nl * kSepBPitch16 + pl, v);
      } else {
        b[pl * kSepBPitchKN + nl] = v;
      }
    }
    __syncthreads();
    gemm.step(a, lda, 0, b);
  }
  __syncthreads();  // every warp is done with A and B, which the accumulator tile overlays
  gemm.store(c);
  __syncthreads();
  float* out = q.partial + static_cast<int64_t>(blockIdx.z) * n_total * K;
  for (int e = threadIdx.x; e < kPwgRows * kSepTileN; e += kSepThreads) {
    const int row = e % kPwgRows, col = e / kPwgRows;  // a warp writes 32 consecutive k of one n
    const int64_t k = k0 + row, n = n0 + col;
    if (n < n_total && k < K) out[n * K + k] = c[row * kSepCPitch + col];
  }
}

// ---- the backward's elementwise passes (ChannelPassParams) ----
// Block b takes pixels [64 b, 64 b + 64) of the flattened (N, H, W) and every channel, a thread per channel at a
// time (consecutive channels across a warp: coalesced where channels are fastest); each thread sums its
// channel's 64 values in order and writes them to row b of the partials.
template <typename T, bool kPrologue>
__global__ void __launch_bounds__(256) separable_channel_pass_kernel(const ChannelPassParams q) {
  __shared__ int64_t offset[4][kChannelPassPixels];  // per pixel: its offset in grad, act, y and result
  const int64_t pixels = q.g.batch * q.h * q.w, tile = blockIdx.x;
  for (int e = threadIdx.x; e < 4 * kChannelPassPixels; e += blockDim.x) {
    const int which = e / kChannelPassPixels, r = e % kChannelPassPixels;
    const int64_t pix = tile * kChannelPassPixels + r;
    const int64_t w = pix % q.w, h = pix / q.w % q.h, n = pix / q.w / q.h;
    // (a switch, not an array of pointers to the params: that copied them to local memory)
    const int64_t* st = which == 0 ? q.grad.stride : which == 1 ? q.act.stride : which == 2 ? q.y.stride
                                                                                              : q.result.stride;
    offset[which][r] = pix < pixels ? n * st[0] + h * st[2] + w * st[3] : -1;
  }
  __syncthreads();
  const T* grad = static_cast<const T*>(q.grad.data);
  const T* act = static_cast<const T*>(q.act.data);
  const T* y = static_cast<const T*>(q.y.data);
  const int rows = static_cast<int>(pixels - tile * kChannelPassPixels < kChannelPassPixels
                                        ? pixels - tile * kChannelPassPixels
                                        : kChannelPassPixels);
  for (int64_t c = threadIdx.x; c < q.channels; c += blockDim.x) {
    const float scale = q.scale != nullptr ? q.scale[c] : 1.f;
    const float a = q.vec_a != nullptr ? q.vec_a[c] : 0.f;
    const float b = q.vec_b != nullptr ? q.vec_b[c] : 0.f;
    float first = 0.f, second = 0.f;
    for (int r = 0; r < rows; ++r) {
      float g = Elem<T>::load(grad + offset[0][r] + c * q.grad.stride[1]);
      if constexpr (kPrologue) {  // a = shift here
        const float xv = Elem<T>::load(act + offset[1][r] + c * q.act.stride[1]);
        if (q.relu && !(round_to<T>(fmaf(xv, scale, a)) > 0.f)) g = 0.f;
        first = fmaf(g, xv, first);
        second += g;
        T* out = static_cast<T*>(q.result.data) + offset[3][r] + c * q.result.stride[1];
        Elem<T>::store(out, q.scale != nullptr ? round_to<T>(g * scale) : g);
      } else {
        if (q.relu && !(Elem<T>::load(act + offset[1][r] + c * q.act.stride[1]) > 0.f)) g = 0.f;
        const float yv = y != nullptr ? Elem<T>::load(y + offset[2][r] + c * q.y.stride[1]) : 0.f;
        first = fmaf(g, yv, first);
        second += g;
        const float gy = fmaf(2.f * yv, b, fmaf(g, scale, a));
        Elem<T>::store(static_cast<T*>(q.grad_y) + (tile * kChannelPassPixels + r) * q.channels + c, gy);
      }
    }
    q.partial[tile * 2 * q.channels + c] = first;
    q.partial[tile * 2 * q.channels + q.channels + c] = second;
  }
}

// relu?(round(x * scale + shift)), elementwise over (N, C, H, W) in x's strides, written in out's.
template <typename T>
__global__ void __launch_bounds__(256) prologue_apply_kernel(const DepthwiseTensor x, const DepthwiseTensor out,
                                                             int64_t n_, int64_t c_, int64_t h_, int64_t w_,
                                                             const float* scale, const float* shift, bool relu) {
  const int64_t total = n_ * c_ * h_ * w_;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = i % c_, w = i / c_ % w_, h = i / c_ / w_ % h_, n = i / c_ / w_ / h_;  // channels fastest
    const float v = Elem<T>::load(static_cast<const T*>(x.data) + n * x.stride[0] + c * x.stride[1] +
                                  h * x.stride[2] + w * x.stride[3]);
    Elem<T>::store(static_cast<T*>(out.data) + n * out.stride[0] + c * out.stride[1] + h * out.stride[2] +
                       w * out.stride[3],
                   prologue_value<T>(v, scale != nullptr ? scale[c] : 1.f, shift != nullptr ? shift[c] : 0.f, relu));
  }
}

}  // namespace kernels
}  // namespace xception_ops
