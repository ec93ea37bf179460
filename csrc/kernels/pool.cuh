// Max pooling, forward and backward (contract in kernels/pool_params.h).
//
// Torch-free: compiles with nvcc or clang for any GPU from sm_37 on, and on the host for the emulated tests.
// Both kernels are element-wise over their output with grid-stride loops: one thread per output position and V
// consecutive channels (V > 1 only channels-last, one 16-byte access per tap).
//   forward : the window's taps inside the image, in (ky, kx) order, compared in float32 (exact for every dtype);
//             the maximum is stored as the input's own bits, and the tap's index as the argmax code. With a pending
//             BatchNorm each tap is normalized first (round(fmaf(x, scale, shift))), and with a residual the
//             maximum is added to it and rounded once.
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

// kExtras: built for the pending BatchNorm and the residual (either or both, read from p); the plain build keeps the
// registers of a pool alone (sm_90, 16-bit vector builds with 32-bit indices: 59-60 registers, 63-72 with extras).
template <typename T, typename I, int V, bool kExtras>
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
  const Bits* residual = kExtras ? static_cast<const Bits*>(p.residual.data) : nullptr;
  const bool affine = kExtras && p.scale != nullptr;
  for (I i = first_item<I>(); i < items; i += item_step<I>()) {
    const PoolPosition<I> o = pool_position<I, V>(i, p.channels_last, s.channels, s.out_h, s.out_w);
    const I h0 = o.h * static_cast<I>(g.stride_h) - static_cast<I>(g.pad_h);
    const I w0 = o.w * static_cast<I>(g.stride_w) - static_cast<I>(g.pad_w);
    // The taps inside the image: [ky0, ky1) x [kx0, kx1); at least one (the checks bound the padding).
    const int ky0 = h0 < 0 ? static_cast<int>(-h0) : 0, kx0 = w0 < 0 ? static_cast<int>(-w0) : 0;
    const int ky1 = s.in_h - h0 < kh ? static_cast<int>(s.in_h - h0) : kh;
    const int kx1 = s.in_w - w0 < kw ? static_cast<int>(s.in_w - w0) : kw;
    float best[V], scale[V], shift[V];
    PoolVec<Bits, V> kept;
    PoolVec<uint8_t, V> code;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      best[j] = E::value(E::kNegInf);
      kept.v[j] = E::kNegInf;
      code.v[j] = static_cast<uint8_t>(ky0 * kw + kx0);
      scale[j] = affine ? p.scale[o.c + j] : 1.f;
      shift[j] = affine ? p.shift[o.c + j] : 0.f;
    }
    const Bits* plane = x + pool_offset<I>(p.input, o.n, o.c, I(0), I(0));
    for (int ky = ky0; ky < ky1; ++ky) {
      const Bits* row = plane + (h0 + ky) * static_cast<I>(p.input.stride[2]);
      for (int kx = kx0; kx < kx1; ++kx) {
        const PoolVec<Bits, V> v =
            *reinterpret_cast<const PoolVec<Bits, V>*>(row + (w0 + kx) * static_cast<I>(p.input.stride[3]));
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const Bits b = affine ? E::round(fmaf(E::value(v.v[j]), scale[j], shift[j])) : v.v[j];
          const float f = E::value(b);
          if (f > best[j] || f != f) {  // the first maximum, or the last NaN
            best[j] = f;
            kept.v[j] = b;
            code.v[j] = static_cast<uint8_t>(ky * kw + kx);
          }
        }
      }
    }
    if (residual != nullptr) {
      const PoolVec<Bits, V> r =
          *reinterpret_cast<const PoolVec<Bits, V>*>(residual + pool_offset<I>(p.residual, o.n, o.c, o.h, o.w));
#pragma unroll
      for (int j = 0; j < V; ++j) kept.v[j] = E::round(best[j] + E::value(r.v[j]));
    }
    *reinterpret_cast<PoolVec<Bits, V>*>(out + pool_offset<I>(p.output, o.n, o.c, o.h, o.w)) = kept;
    if (codes != nullptr) {
      *reinterpret_cast<PoolVec<uint8_t, V>*>(codes + pool_offset<I>(p.argmax, o.n, o.c, o.h, o.w)) = code;
    }
  }
}

// The gradient that reaches an input position (V channels from in.c): the gradients of the windows that contain it
// and whose code names it, added in float32 in (oh, ow) order, not yet rounded. Built once per thread, outside the
// kernels' loops (its geometry and pointers then stay in registers across positions).
template <typename T, typename I, int V>
struct WindowGather {
  using Bits = typename PoolElem<T>::Bits;
  const MaxPoolParams& p;
  PoolSizes<I> s;
  I sh, sw, ph, pw, kh, kw;
  const Bits* grad_out;
  const uint8_t* codes;

  __device__ explicit WindowGather(const MaxPoolParams& params)
      : p(params), s(params.g), sh(static_cast<I>(params.g.stride_h)), sw(static_cast<I>(params.g.stride_w)),
        ph(static_cast<I>(params.g.pad_h)), pw(static_cast<I>(params.g.pad_w)),
        kh(static_cast<I>(params.g.kernel_h)), kw(static_cast<I>(params.g.kernel_w)),
        grad_out(static_cast<const Bits*>(params.output.data)),
        codes(static_cast<const uint8_t*>(params.argmax.data)) {}

  __device__ __forceinline__ void operator()(const PoolPosition<I>& in, float (&acc)[V]) const {
    // The windows that contain (in.h, in.w): oh * sh - ph <= in.h <= oh * sh - ph + kh - 1.
    const I lo_h = in.h + ph - kh + 1, lo_w = in.w + pw - kw + 1;
    const I oh0 = lo_h <= 0 ? I(0) : (lo_h + sh - 1) / sh, ow0 = lo_w <= 0 ? I(0) : (lo_w + sw - 1) / sw;
    const I oh_end = (in.h + ph) / sh + 1 < s.out_h ? (in.h + ph) / sh + 1 : s.out_h;
    const I ow_end = (in.w + pw) / sw + 1 < s.out_w ? (in.w + pw) / sw + 1 : s.out_w;
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
          if (code.v[j] == tap) acc[j] += PoolElem<T>::value(go.v[j]);
        }
      }
    }
  }
};

template <typename T, typename I, int V>
__global__ void __launch_bounds__(kMaxPoolThreads) max_pool2d_backward_kernel(MaxPoolParams p) {
  using E = PoolElem<T>;
  using Bits = typename E::Bits;
  const Pool2dGeometry& g = p.g;
  const PoolSizes<I> s(g);
  const I items = static_cast<I>(g.batch) * (s.channels / V) * s.in_h * s.in_w;
  Bits* grad_x = static_cast<Bits*>(p.input.data);
  const WindowGather<T, I, V> gather(p);
  for (I i = first_item<I>(); i < items; i += item_step<I>()) {
    const PoolPosition<I> in = pool_position<I, V>(i, p.channels_last, s.channels, s.in_h, s.in_w);
    float acc[V];
    gather(in, acc);
    PoolVec<Bits, V> result;
#pragma unroll
    for (int j = 0; j < V; ++j) result.v[j] = E::round(acc[j]);
    *reinterpret_cast<PoolVec<Bits, V>*>(grad_x + pool_offset<I>(p.input, in.n, in.c, in.h, in.w)) = result;
  }
}

// The backward through a pending BatchNorm (the forward had scale and shift): per input position the pool's
// gradient g, rounded to T as max_pool2d_backward_kernel stores it, then scale_shift's backward without a ReLU
// (prologue_grad in separable_backward.cuh): grad_x = round(g * scale), and the per-channel sums of g * x (fmaf) and
// of g. A block owns a tile of p.tile_positions positions (n, h, w flattened); a thread owns V channels (lanes across
// the channel groups) and a run of the tile's rows, added in row order; the block adds its row groups' sums in
// order into partial[tile][2C] for launch_reduce_rows: deterministic, no atomics. Two passes' worth of bytes
// (grad_out and the codes in, x in, grad_x out) where the pool's backward and scale_shift_backward moved four.
template <typename T, typename I, int V>
__global__ void __launch_bounds__(kMaxPoolThreads) max_pool2d_backward_bn_kernel(MaxPoolParams p) {
  using E = PoolElem<T>;
  using Bits = typename E::Bits;
  __shared__ float row_sums[2][kMaxPoolThreads * V];
  const Pool2dGeometry& g = p.g;
  const PoolSizes<I> s(g);
  const I positions = static_cast<I>(g.batch) * s.in_h * s.in_w;
  const int tp = p.tile_positions;
  const I row0 = static_cast<I>(blockIdx.x) * static_cast<I>(tp);
  const int rows = positions - row0 < static_cast<I>(tp) ? static_cast<int>(positions - row0) : tp;
  const int64_t groups = g.channels / V;
  const int lanes = power_of_two_cover(groups, kMaxPoolThreads);
  const int row_groups = kMaxPoolThreads / lanes, per_group = (tp + row_groups - 1) / row_groups;
  const int lane = static_cast<int>(threadIdx.x) % lanes, rg = static_cast<int>(threadIdx.x) / lanes;
  const int r_begin = rg * per_group, r_end = rows < r_begin + per_group ? rows : r_begin + per_group;
  const Bits* x = static_cast<const Bits*>(p.bn_input.data);
  Bits* grad_x = static_cast<Bits*>(p.input.data);
  float* partial = p.partial + static_cast<int64_t>(blockIdx.x) * 2 * g.channels;
  const WindowGather<T, I, V> gather(p);
  for (int64_t cg = lane; cg < groups; cg += lanes) {
    PoolPosition<I> in;
    in.c = static_cast<I>(cg * V);
    float scale[V], first[V], second[V];
#pragma unroll
    for (int j = 0; j < V; ++j) scale[j] = p.scale[in.c + j], first[j] = 0.f, second[j] = 0.f;
    for (int r = r_begin; r < r_end; ++r) {
      I i = row0 + r;
      in.w = i % s.in_w;
      i /= s.in_w;
      in.h = i % s.in_h;
      in.n = i / s.in_h;
      float acc[V];
      gather(in, acc);
      const PoolVec<Bits, V> xv =
          *reinterpret_cast<const PoolVec<Bits, V>*>(x + pool_offset<I>(p.bn_input, in.n, in.c, in.h, in.w));
      PoolVec<Bits, V> result;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float gv = E::value(E::round(acc[j]));  // the pool's gradient as its own kernel would store it
        first[j] = fmaf(gv, E::value(xv.v[j]), first[j]);
        second[j] += gv;
        result.v[j] = E::round(gv * scale[j]);
      }
      *reinterpret_cast<PoolVec<Bits, V>*>(grad_x + pool_offset<I>(p.input, in.n, in.c, in.h, in.w)) = result;
    }
    if (row_groups == 1) {  // this thread's sums are the block's
#pragma unroll
      for (int j = 0; j < V; ++j) {
        partial[in.c + j] = first[j];
        partial[g.channels + in.c + j] = second[j];
      }
    } else {  // one channel group per thread (groups <= lanes): the row groups' sums, added in order below
#pragma unroll
      for (int j = 0; j < V; ++j) {
        row_sums[0][threadIdx.x * V + j] = first[j];
        row_sums[1][threadIdx.x * V + j] = second[j];
      }
    }
  }
  if (row_groups == 1) return;  // uniform across the block
  __syncthreads();
  for (int e = threadIdx.x; e < 2 * lanes * V; e += kMaxPoolThreads) {
    const int which = e / (lanes * V), k = e % (lanes * V), cg = k / V, j = k % V;
    if (cg >= groups) continue;
    float sum = 0.f;
    for (int g2 = 0; g2 < row_groups; ++g2) sum += row_sums[which][(g2 * lanes + cg) * V + j];
    partial[which * g.channels + static_cast<int64_t>(cg) * V + j] = sum;
  }
}

}  // namespace xception_ops::kernels
