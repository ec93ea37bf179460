// Max pooling, forward and backward (contract in kernels/pool_params.h).
//
// Torch-free: compiles with nvcc or clang for any GPU from sm_37 on, and on the host for the emulated tests.
// Both kernels are element-wise over their output with grid-stride loops: one thread per output position and V
// consecutive channels (V > 1 only channels-last, one 16-byte access per tap).
//   forward : the window's taps inside the image, in (ky, kx) order, compared in float32 (exact for every dtype);
//             the maximum is stored as the input's own bits, and the tap's index as the argmax code.
//   backward: an input position (ih, iw) lies in the windows oh in [ceil((ih + pad - k + 1) / s), (ih + pad) / s]
//             (and likewise ow): at most 4 for Xception's 3x3 windows at stride 2. Their codes are read, in (oh, ow)
//             order, and the gradient of each window whose code names this position is added in float32, then
//             rounded once: PyTorch's order and precision, so the same bits.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "pool_params.h"

namespace xception_ops::kernels {

// An element as raw bits, its value in float32, and a float32 rounded to it.
template <typename T>
struct PoolElem;
template <>
struct PoolElem<float> {
  using Bits = uint32_t;
  static constexpr Bits kNegInf = 0xff800000u;
  __device__ static float value(Bits b) { return __uint_as_float(b); }
  __device__ static Bits round(float v) { return __float_as_uint(v); }
};
template <>
struct PoolElem<__half> {
  using Bits = uint16_t;
  static constexpr Bits kNegInf = 0xfc00u;
  __device__ static float value(Bits b) { return __half2float(__ushort_as_half(b)); }
  __device__ static Bits round(float v) { return __half_as_ushort(__float2half_rn(v)); }
};
template <>
struct PoolElem<__nv_bfloat16> {
  using Bits = uint16_t;
  static constexpr Bits kNegInf = 0xff80u;
  __device__ static float value(Bits b) { return __uint_as_float(static_cast<uint32_t>(b) << 16); }
  // Round to nearest even on the bits (the bf16 intrinsics that return bits need sm_80 in CUDA 11); NaN stays NaN.
  __device__ static Bits round(float v) {
    const uint32_t u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
    return static_cast<Bits>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
};

// V consecutive elements (or argmax codes), loaded and stored in one access.
template <typename E, int V>
struct alignas(sizeof(E) * V) PoolVec {
  E v[V];
};

// Flat item i of a pass over (batch, channels, h, w) positions: channels fastest (by groups of V) or width fastest.
template <typename I>
struct PoolPosition {
  I n, c, h, w;
};
template <typename I, int V>
__device__ __forceinline__ PoolPosition<I> pool_position(I i, bool channels_last, I channels, I h, I w) {
  PoolPosition<I> pos;
  if (channels_last) {
    const I groups = channels / V;
    pos.c = (i % groups) * V;
    i /= groups;
    pos.w = i % w;
    i /= w;
    pos.h = i % h;
    pos.n = i / h;
  } else {
    pos.w = i % w;
    i /= w;
    pos.h = i % h;
    i /= h;
    pos.c = i % channels;
    pos.n = i / channels;
  }
  return pos;
}

// The geometry's sizes in the index type, and the grid-stride loop's start and step.
template <typename I>
struct PoolSizes {
  I channels, in_h, in_w, out_h, out_w;
  __device__ explicit PoolSizes(const Pool2dGeometry& g)
      : channels(static_cast<I>(g.channels)), in_h(static_cast<I>(g.in_h)), in_w(static_cast<I>(g.in_w)),
        out_h(static_cast<I>(g.out_h)), out_w(static_cast<I>(g.out_w)) {}
};
template <typename I>
__device__ __forceinline__ I first_item() {
  return static_cast<I>(blockIdx.x) * static_cast<I>(blockDim.x) + static_cast<I>(threadIdx.x);
}
template <typename I>
__device__ __forceinline__ I item_step() {
  return static_cast<I>(gridDim.x) * static_cast<I>(blockDim.x);
}

template <typename I>
__device__ __forceinline__ I pool_offset(const DepthwiseTensor& t, I n, I c, I h, I w) {
  return n * static_cast<I>(t.stride[0]) + c * static_cast<I>(t.stride[1]) + h * static_cast<I>(t.stride[2]) +
         w * static_cast<I>(t.stride[3]);
}

template <typename T, typename I, int V>
__global__ void __launch_bounds__(kMaxPoolThreads) max_pool2d_forward_kernel(MaxPoolParams p) {
  using E = PoolElem<T>;
  using Bits = typename E::Bits;
  const Pool2dGeometry& g = p.g;
  const PoolSizes<I> s(g);
  const int kh = static_cast<int>(g.kernel_h), kw = static_cast<int>(g.kernel_w);
  const I items = static_cast<I>(g.batch) * (s.channels / V) * s.out_h * s.out_w;
  const Bits* x = static_cast<const Bits*>(p.input.data);
  Bits* out = static_cast<Bits*>(p.output.data);
  uint8_t* codes = static_cast<uint8_t*>(p.argmax.data);
  for (I i = first_item<I>(); i < items; i += item_step<I>()) {
    const PoolPosition<I> o = pool_position<I, V>(i, p.channels_last, s.channels, s.out_h, s.out_w);
    const I h0 = o.h * static_cast<I>(g.stride_h) - static_cast<I>(g.pad_h);
    const I w0 = o.w * static_cast<I>(g.stride_w) - static_cast<I>(g.pad_w);
    // The taps inside the image: [ky0, ky1) x [kx0, kx1); at least one (the checks bound the padding).
    const int ky0 = h0 < 0 ? static_cast<int>(-h0) : 0, kx0 = w0 < 0 ? static_cast<int>(-w0) : 0;
    const int ky1 = s.in_h - h0 < kh ? static_cast<int>(s.in_h - h0) : kh;
    const int kx1 = s.in_w - w0 < kw ? static_cast<int>(s.in_w - w0) : kw;
    float best[V];
    PoolVec<Bits, V> kept;
    PoolVec<uint8_t, V> code;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      best[j] = E::value(E::kNegInf);
      kept.v[j] = E::kNegInf;
      code.v[j] = static_cast<uint8_t>(ky0 * kw + kx0);
    }
    const Bits* plane = x + pool_offset<I>(p.input, o.n, o.c, I(0), I(0));
    for (int ky = ky0; ky < ky1; ++ky) {
      const Bits* row = plane + (h0 + ky) * static_cast<I>(p.input.stride[2]);
      for (int kx = kx0; kx < kx1; ++kx) {
        const PoolVec<Bits, V> v =
            *reinterpret_cast<const PoolVec<Bits, V>*>(row + (w0 + kx) * static_cast<I>(p.input.stride[3]));
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float f = E::value(v.v[j]);
          if (f > best[j] || f != f) {  // the first maximum, or the last NaN
            best[j] = f;
            kept.v[j] = v.v[j];
            code.v[j] = static_cast<uint8_t>(ky * kw + kx);
          }
        }
      }
    }
    *reinterpret_cast<PoolVec<Bits, V>*>(out + pool_offset<I>(p.output, o.n, o.c, o.h, o.w)) = kept;
    if (codes != nullptr) {
      *reinterpret_cast<PoolVec<uint8_t, V>*>(codes + pool_offset<I>(p.argmax, o.n, o.c, o.h, o.w)) = code;
    }
  }
}

template <typename T, typename I, int V>
__global__ void __launch_bounds__(kMaxPoolThreads) max_pool2d_backward_kernel(MaxPoolParams p) {
  using E = PoolElem<T>;
  using Bits = typename E::Bits;
  const Pool2dGeometry& g = p.g;
  const PoolSizes<I> s(g);
  const I sh = static_cast<I>(g.stride_h), sw = static_cast<I>(g.stride_w);
  const I ph = static_cast<I>(g.pad_h), pw = static_cast<I>(g.pad_w);
  const I kh = static_cast<I>(g.kernel_h), kw = static_cast<I>(g.kernel_w);
  const I items = static_cast<I>(g.batch) * (s.channels / V) * s.in_h * s.in_w;
  Bits* grad_x = static_cast<Bits*>(p.input.data);
  const Bits* grad_out = static_cast<const Bits*>(p.output.data);
  const uint8_t* codes = static_cast<const uint8_t*>(p.argmax.data);
  for (I i = first_item<I>(); i < items; i += item_step<I>()) {
    const PoolPosition<I> in = pool_position<I, V>(i, p.channels_last, s.channels, s.in_h, s.in_w);
    // The windows that contain (in.h, in.w): oh * sh - ph <= in.h <= oh * sh - ph + kh - 1.
    const I lo_h = in.h + ph - kh + 1, lo_w = in.w + pw - kw + 1;
    const I oh0 = lo_h <= 0 ? I(0) : (lo_h + sh - 1) / sh, ow0 = lo_w <= 0 ? I(0) : (lo_w + sw - 1) / sw;
    const I oh_end = (in.h + ph) / sh + 1 < s.out_h ? (in.h + ph) / sh + 1 : s.out_h;
    const I ow_end = (in.w + pw) / sw + 1 < s.out_w ? (in.w + pw) / sw + 1 : s.out_w;
    float acc[V];
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = 0.f;
    for (I oh = oh0; oh < oh_end; ++oh) {
      const I ky = in.h - (oh * sh - ph);
      for (I ow = ow0; ow < ow_end; ++ow) {
        const uint8_t tap = static_cast<uint8_t>(ky * kw + in.w - (ow * sw - pw));
        const PoolVec<uint8_t, V> code =
            *reinterpret_cast<const PoolVec<uint8_t, V>*>(codes + pool_offset<I>(p.argmax, in.n, in.c, oh, ow));
        bool any = false;
#pragma unroll
        for (int j = 0; j < V; ++j) any |= code.v[j] == tap;
        if (!any) continue;
        const PoolVec<Bits, V> go =
            *reinterpret_cast<const PoolVec<Bits, V>*>(grad_out + pool_offset<I>(p.output, in.n, in.c, oh, ow));
#pragma unroll
        for (int j = 0; j < V; ++j) {
          if (code.v[j] == tap) acc[j] += E::value(go.v[j]);
        }
      }
    }
    PoolVec<Bits, V> result;
#pragma unroll
    for (int j = 0; j < V; ++j) result.v[j] = E::round(acc[j]);
    *reinterpret_cast<PoolVec<Bits, V>*>(grad_x + pool_offset<I>(p.input, in.n, in.c, in.h, in.w)) = result;
  }
}

}  // namespace xception_ops::kernels
