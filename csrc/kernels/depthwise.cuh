// Depthwise conv2d kernel bodies: forward, input gradient and weight gradient.
//
// Torch-free: they take a DepthwiseParams (kernels/depthwise_params.h) and compile with nvcc or clang for any
// GPU from sm_37 on. Semantics: output channel oc reads input channel oc / M (M = depth multiplier), padding
// may differ at the two ends of each axis, any stride and dilation, optional bias. Every tensor is read or
// written through its own element strides.
//
// Template parameters shared by the kernels:
//   T      element type: float, __half or __nv_bfloat16; the math is float32 throughout.
//   idx_t  int32_t when depthwise_fits_int32() holds, else int64_t (tensors over 2^31 elements).
//   kCL    thread order: true puts the channel fastest across threads (coalesced in NHWC), false the width.
//   KH, KW kernel size known at compile time (taps unrolled, weights in registers); 0 = read at run time.
//   SH, SW stride known at compile time; 0 = read at run time.
//
// Every pass is deterministic: each output element is summed by one thread in a fixed order, and the weight
// gradient reduces fixed slices through a fixed tree and a second kernel (no atomics).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "depthwise_params.h"
#include "mid_stage.cuh"

namespace xception_ops {
namespace kernels {

// ---- element loads and stores, float32 in registers ----

template <typename U>
__device__ __forceinline__ U load_readonly(const U* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 350
  return __ldg(p);
#else
  return *p;
#endif
}

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  __device__ __forceinline__ static float load(const float* p) { return load_readonly(p); }
  __device__ __forceinline__ static void store(float* p, float v) { *p = v; }
};

// Halves go through their 16-bit pattern: __ldg on unsigned short and the fp16 conversions exist on every
// architecture (sm_53+ converts natively, older ones with the cvt instruction the header picks).
template <>
struct Elem<__half> {
  __device__ __forceinline__ static float load(const __half* p) {
    return __half2float(__ushort_as_half(load_readonly(reinterpret_cast<const unsigned short*>(p))));
  }
  __device__ __forceinline__ static void store(__half* p, float v) { *p = __float2half_rn(v); }
};

// bfloat16 is the top half of a float32: converted with integer ops, so no sm_80 instruction is needed.
template <>
struct Elem<__nv_bfloat16> {
  __device__ __forceinline__ static float load(const __nv_bfloat16* p) {
    const unsigned int bits = load_readonly(reinterpret_cast<const unsigned short*>(p));
    return __uint_as_float(bits << 16);
  }
  __device__ __forceinline__ static void store(__nv_bfloat16* p, float v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    *p = __float2bfloat16_rn(v);
#else
    const unsigned int u = __float_as_uint(v);
    unsigned short bits;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = static_cast<unsigned short>((u >> 16) | 0x0040u);  // NaN stays a (quiet) NaN
    } else {
      bits = static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // round to nearest even
    }
    *reinterpret_cast<unsigned short*>(p) = bits;
#endif
  }
};

// Unsigned compare: 0 <= i < n in one test (i may be negative).
template <typename idx_t>
__device__ __forceinline__ bool in_range(idx_t i, idx_t n) {
  using U = typename std::make_unsigned<idx_t>::type;
  return static_cast<U>(i) < static_cast<U>(n);
}

// Splits a flat index i = ((d3 * s2 + d2) * s1 + d1) * s0 + d0 into its digits. Unsigned division: every
// value is non-negative, and the unsigned 64-bit division routine is the cheaper one.
template <typename idx_t>
__device__ __forceinline__ void unflatten(idx_t i, idx_t s0, idx_t s1, idx_t s2, idx_t& d0, idx_t& d1, idx_t& d2,
                                          idx_t& d3) {
  using U = typename std::make_unsigned<idx_t>::type;
  U r = static_cast<U>(i);
  U q = r / static_cast<U>(s0);
  d0 = static_cast<idx_t>(r - q * static_cast<U>(s0));
  r = q;
  q = r / static_cast<U>(s1);
  d1 = static_cast<idx_t>(r - q * static_cast<U>(s1));
  r = q;
  q = r / static_cast<U>(s2);
  d2 = static_cast<idx_t>(r - q * static_cast<U>(s2));
  d3 = static_cast<idx_t>(q);
}

// What a depthwise stage with a prologue reads (DepthwisePrologue, and the fused forward's): relu?(x * scale +
// shift), rounded to the dtype as the reference rounds it.
template <typename T>
__device__ __forceinline__ float prologue_value(float v, float scale, float shift, bool relu) {
  v = round_to<T>(fmaf(v, scale, shift));
  return relu ? kernels::relu(v) : v;
}

// ---- V consecutive channels at a time (the vector paths of these kernels and of separable.cuh) ----
// The 16-bit pattern of a value already rounded to the dtype (round_to), so the conversion is exact.
template <typename T>
__device__ __forceinline__ unsigned int bits16(float rounded);
template <>
__device__ __forceinline__ unsigned int bits16<__half>(float rounded) {
  return __half_as_ushort(__float2half_rn(rounded));
}
template <>
__device__ __forceinline__ unsigned int bits16<__nv_bfloat16>(float rounded) {
  const unsigned int u = __float_as_uint(rounded);
  return (u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : u >> 16;  // NaN stays a NaN
}
template <typename T>
__device__ __forceinline__ float from_bits16(unsigned int bits);
template <>
__device__ __forceinline__ float from_bits16<__half>(unsigned int bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}
template <>
__device__ __forceinline__ float from_bits16<__nv_bfloat16>(unsigned int bits) { return __uint_as_float(bits << 16); }

// Two values rounded to a 16-bit dtype (nearest even) and packed, the first in the low half: one conversion
// instruction for both on sm_80+ (cvt.rn.bf16x2.f32 / .f16x2), where rounding each (round_to) and packing its bits
// (bits16, with its NaN test) took ~13 instructions per pair in the strip kernels' stores (sm_90, nvcc 13). A NaN
// stays a NaN (its bits may differ from bits16's).
template <typename T>
__device__ __forceinline__ unsigned int pack2_rn(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const unsigned int*>(&h);
  } else {
    const __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<const unsigned int*>(&h);
  }
#else
  return bits16<T>(round_to<T>(a)) | (bits16<T>(round_to<T>(b)) << 16);
#endif
}

// V consecutive channels (4: 8 bytes of fp16 / bf16, 16 of float32; 2: half that) in one access. Loads take a
// predicate and give zeros where it is false, without reading (a predicated load, no branch); load_raw_if keeps
// the bits (Raw) so that a caller can issue several loads before decoding any. encode / store take values already
// rounded to the dtype; encode_rn / store_rn round them (nearest even), the same bits for rounded values.
template <typename T, int V = 4>
struct VecIO;
template <typename T>
struct VecIO<T, 4> {
  using Raw = uint2;
  __device__ __forceinline__ static Raw load_raw_if(bool ok, const T* p) {
    Raw u = make_uint2(0u, 0u);
    if (ok) u = load_readonly(reinterpret_cast<const uint2*>(p));
    return u;
  }
  __device__ __forceinline__ static void decode(const Raw& u, float (&v)[4]) {
    v[0] = from_bits16<T>(u.x & 0xffffu), v[1] = from_bits16<T>(u.x >> 16);
    v[2] = from_bits16<T>(u.y & 0xffffu), v[3] = from_bits16<T>(u.y >> 16);
  }
  __device__ __forceinline__ static Raw encode(const float (&v)[4]) {
    return make_uint2(bits16<T>(v[0]) | (bits16<T>(v[1]) << 16), bits16<T>(v[2]) | (bits16<T>(v[3]) << 16));
  }
  __device__ __forceinline__ static void load(const T* p, float (&v)[4]) { load_if(true, p, v); }
  __device__ __forceinline__ static void load_if(bool ok, const T* p, float (&v)[4]) { decode(load_raw_if(ok, p), v); }
  __device__ __forceinline__ static void store(T* p, const float (&v)[4]) { *reinterpret_cast<uint2*>(p) = encode(v); }
  __device__ __forceinline__ static Raw encode_rn(const float (&v)[4]) {
    return make_uint2(pack2_rn<T>(v[0], v[1]), pack2_rn<T>(v[2], v[3]));
  }
  __device__ __forceinline__ static void store_rn(T* p, const float (&v)[4]) {
    *reinterpret_cast<uint2*>(p) = encode_rn(v);
  }
};
template <typename T>
struct VecIO<T, 2> {
  using Raw = unsigned int;
  __device__ __forceinline__ static Raw load_raw_if(bool ok, const T* p) {
    Raw u = 0u;
    if (ok) u = load_readonly(reinterpret_cast<const unsigned int*>(p));
    return u;
  }
  __device__ __forceinline__ static void decode(const Raw& u, float (&v)[2]) {
    v[0] = from_bits16<T>(u & 0xffffu), v[1] = from_bits16<T>(u >> 16);
  }
  __device__ __forceinline__ static Raw encode(const float (&v)[2]) {
    return bits16<T>(v[0]) | (bits16<T>(v[1]) << 16);
  }
  __device__ __forceinline__ static void load_if(bool ok, const T* p, float (&v)[2]) { decode(load_raw_if(ok, p), v); }
  __device__ __forceinline__ static void store(T* p, const float (&v)[2]) {
    *reinterpret_cast<unsigned int*>(p) = encode(v);
  }
  __device__ __forceinline__ static Raw encode_rn(const float (&v)[2]) { return pack2_rn<T>(v[0], v[1]); }
  __device__ __forceinline__ static void store_rn(T* p, const float (&v)[2]) {
    *reinterpret_cast<unsigned int*>(p) = encode_rn(v);
  }
};
// One element (the strip kernels' NCHW form: one channel per thread).
template <typename T>
struct VecIO<T, 1> {
  using Raw = unsigned short;
  __device__ __forceinline__ static Raw load_raw_if(bool ok, const T* p) {
    Raw u = 0;
    if (ok) u = load_readonly(reinterpret_cast<const unsigned short*>(p));
    return u;
  }
  __device__ __forceinline__ static void decode(const Raw& u, float (&v)[1]) { v[0] = from_bits16<T>(u); }
  __device__ __forceinline__ static Raw encode(const float (&v)[1]) { return static_cast<Raw>(bits16<T>(v[0])); }
  __device__ __forceinline__ static void store(T* p, const float (&v)[1]) { *reinterpret_cast<Raw*>(p) = encode(v); }
  __device__ __forceinline__ static Raw encode_rn(const float (&v)[1]) {
    return static_cast<Raw>(bits16<T>(round_to<T>(v[0])));
  }
  __device__ __forceinline__ static void store_rn(T* p, const float (&v)[1]) {
    *reinterpret_cast<Raw*>(p) = encode_rn(v);
  }
};
template <>
struct VecIO<float, 1> {
  using Raw = float;
  __device__ __forceinline__ static Raw load_raw_if(bool ok, const float* p) { return ok ? load_readonly(p) : 0.f; }
  __device__ __forceinline__ static void decode(const Raw& u, float (&v)[1]) { v[0] = u; }
  __device__ __forceinline__ static Raw encode(const float (&v)[1]) { return v[0]; }
  __device__ __forceinline__ static void store(float* p, const float (&v)[1]) { *p = v[0]; }
  __device__ __forceinline__ static Raw encode_rn(const float (&v)[1]) { return v[0]; }
  __device__ __forceinline__ static void store_rn(float* p, const float (&v)[1]) { *p = v[0]; }
};
template <>
struct VecIO<float, 4> {
  using Raw = float4;
  __device__ __forceinline__ static Raw load_raw_if(bool ok, const float* p) {
    Raw u = make_float4(0.f, 0.f, 0.f, 0.f);
    if (ok) u = load_readonly(reinterpret_cast<const float4*>(p));
    return u;
  }
  __device__ __forceinline__ static void decode(const Raw& u, float (&v)[4]) { v[0] = u.x, v[1] = u.y, v[2] = u.z, v[3] = u.w; }
  __device__ __forceinline__ static Raw encode(const float (&v)[4]) { return make_float4(v[0], v[1], v[2], v[3]); }
  __device__ __forceinline__ static void load(const float* p, float (&v)[4]) { load_if(true, p, v); }
  __device__ __forceinline__ static void load_if(bool ok, const float* p, float (&v)[4]) {
    decode(load_raw_if(ok, p), v);
  }
  __device__ __forceinline__ static void store(float* p, const float (&v)[4]) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  }
  __device__ __forceinline__ static Raw encode_rn(const float (&v)[4]) { return encode(v); }
  __device__ __forceinline__ static void store_rn(float* p, const float (&v)[4]) { store(p, v); }
};
template <>
struct VecIO<float, 2> {
  using Raw = float2;
  __device__ __forceinline__ static Raw load_raw_if(bool ok, const float* p) {
    Raw u = make_float2(0.f, 0.f);
    if (ok) u = load_readonly(reinterpret_cast<const float2*>(p));
    return u;
  }
  __device__ __forceinline__ static void decode(const Raw& u, float (&v)[2]) { v[0] = u.x, v[1] = u.y; }
  __device__ __forceinline__ static Raw encode(const float (&v)[2]) { return make_float2(v[0], v[1]); }
  __device__ __forceinline__ static void load_if(bool ok, const float* p, float (&v)[2]) {
    decode(load_raw_if(ok, p), v);
  }
  __device__ __forceinline__ static void store(float* p, const float (&v)[2]) {
    *reinterpret_cast<float2*>(p) = make_float2(v[0], v[1]);
  }
  __device__ __forceinline__ static Raw encode_rn(const float (&v)[2]) { return encode(v); }
  __device__ __forceinline__ static void store_rn(float* p, const float (&v)[2]) { store(p, v); }
};

// ---- forward: one thread per output element ----
template <typename T, typename idx_t, bool kCL, int KH, int KW, int SH, int SW>
__global__ void __launch_bounds__(kDepthwiseThreads) depthwise_forward_kernel(const DepthwiseParams p) {
  const Conv2dGeometry& g = p.g;
  const idx_t N = g.batch, H = g.in_h, W = g.in_w, M = g.depth_multiplier;
  const idx_t OC = g.dw_channels(), OH = g.out_h, OW = g.out_w;
  const int kh_n = KH > 0 ? KH : static_cast<int>(g.kernel_h);
  const int kw_n = KW > 0 ? KW : static_cast<int>(g.kernel_w);
  const idx_t sh = SH > 0 ? SH : static_cast<idx_t>(g.stride_h);
  const idx_t sw = SW > 0 ? SW : static_cast<idx_t>(g.stride_w);
  const idx_t dh = g.dilation_h, dw = g.dilation_w, pt = g.pad_top, pl = g.pad_left;

  const T* __restrict__ x = static_cast<const T*>(p.input.data);
  const T* __restrict__ w = static_cast<const T*>(p.weight.data);
  const T* __restrict__ bias = static_cast<const T*>(p.bias);
  T* __restrict__ y = static_cast<T*>(p.output.data);
  const idx_t xs_n = p.input.stride[0], xs_c = p.input.stride[1], xs_h = p.input.stride[2],
              xs_w = p.input.stride[3];
  const idx_t ys_n = p.output.stride[0], ys_c = p.output.stride[1], ys_h = p.output.stride[2],
              ys_w = p.output.stride[3];
  const idx_t ws_o = p.weight.stride[0], ws_h = p.weight.stride[2], ws_w = p.weight.stride[3];
  const idx_t bs = p.bias_stride;
  // The mid stage (DepthwiseParams::mid): a runtime branch here, its values read per element like the bias (each
  // element of the grid-stride loop is another channel). No spills; registers the same or fewer (nvcc 13, sm_90a),
  // at most one more (sm_80: 31 -> 32, float32 channels-last 3x3).
  const bool mid = p.mid_active(), mid_affine = p.mid_affine();

  const idx_t total = N * OC * OH * OW;
  const idx_t step = static_cast<idx_t>(gridDim.x) * kDepthwiseThreads;
  for (idx_t i = static_cast<idx_t>(blockIdx.x) * kDepthwiseThreads + threadIdx.x; i < total; i += step) {
    idx_t n, oc, oh, ow;
    if (kCL) {
      unflatten(i, OC, OW, OH, oc, ow, oh, n);
    } else {
      unflatten(i, OW, OH, OC, ow, oh, oc, n);
    }
    const T* xp = x + n * xs_n + (oc / M) * xs_c;
    const T* wp = w + oc * ws_o;
    const idx_t ih0 = oh * sh - pt, iw0 = ow * sw - pl;
    float acc = 0.f;
#pragma unroll
    for (int kh = 0; kh < kh_n; ++kh) {
      const idx_t ih = ih0 + kh * dh;
      if (!in_range(ih, H)) continue;
#pragma unroll
      for (int kw = 0; kw < kw_n; ++kw) {
        const idx_t iw = iw0 + kw * dw;
        if (in_range(iw, W)) {
          acc = fmaf(Elem<T>::load(xp + ih * xs_h + iw * xs_w), Elem<T>::load(wp + kh * ws_h + kw * ws_w), acc);
        }
      }
    }
    if (bias != nullptr) acc += Elem<T>::load(bias + oc * bs);
    if (mid) {
      const float scale = p.mid_scale != nullptr ? p.mid_scale[oc] : 1.f;
      const float shift = p.mid_shift != nullptr ? p.mid_shift[oc] : 0.f;
      acc = mid_value<T>(acc, p.mid, mid_affine, scale, shift);  // rounded: the store below is exact
    }
    Elem<T>::store(y + n * ys_n + oc * ys_c + oh * ys_h + ow * ys_w, acc);
  }
}

// ---- per-channel values of the vector, run and strip kernels (3x3, V consecutive channels from c) ----
// The 9 x V weights, float32 by [tap][channel], through the weight's strides.
template <typename T, int V, typename idx_t>
__device__ __forceinline__ void load_weights_3x3(const DepthwiseParams& p, idx_t c, float (&wv)[9][V]) {
  const T* w = static_cast<const T*>(p.weight.data);
  const idx_t ws_o = p.weight.stride[0], ws_h = p.weight.stride[2], ws_w = p.weight.stride[3];
#pragma unroll
  for (int v = 0; v < V; ++v)
#pragma unroll
    for (int t = 0; t < 9; ++t) wv[t][v] = Elem<T>::load(w + (c + v) * ws_o + (t / 3) * ws_h + (t % 3) * ws_w);
}
// The forward's other per-channel values: the bias (0 where `bias` is null) and, where `prologue`, the prologue's
// scale and shift (1 and 0 otherwise).
template <typename T, int V, typename idx_t>
__device__ __forceinline__ void load_forward_terms(const DepthwiseParams& p, const T* bias, idx_t c, bool prologue,
                                                   float (&bv)[V], float (&scale)[V], float (&shift)[V]) {
#pragma unroll
  for (int v = 0; v < V; ++v) {
    // Without a bias, -0: adding it is the identity for every value, -0 included (x + 0 would turn -0 into +0), so
    // a kernel may add bv unconditionally.
    bv[v] = bias != nullptr ? Elem<T>::load(bias + (c + v) * p.bias_stride) : -0.f;
    scale[v] = prologue && p.prologue.scale != nullptr ? p.prologue.scale[c + v] : 1.f;
    shift[v] = prologue && p.prologue.shift != nullptr ? p.prologue.shift[c + v] : 0.f;
  }
}
// The mid stage's scale and shift of channels c .. c + V - 1 (1 and 0 where absent): the kernels' channels lie
// below dw_channels, so nothing past the vectors is read. The vector kernels load them where their stores need
// them, once per run: held through the accumulation they cost 2V registers, and spills (nvcc 13, sm_90a, fp16,
// the tap-by-tap build: 152 bytes of spill loads, 8 when loaded per run); the strip kernels hold them (loaded per
// row, they spilled more: the ring of input rows is live at the stores).
template <int V, typename idx_t>
__device__ __forceinline__ void load_mid_terms(const DepthwiseParams& p, idx_t c, float (&scale)[V],
                                               float (&shift)[V]) {
#pragma unroll
  for (int v = 0; v < V; ++v) {
    scale[v] = p.mid_scale != nullptr ? p.mid_scale[c + v] : 1.f;
    shift[v] = p.mid_shift != nullptr ? p.mid_shift[c + v] : 0.f;
  }
}
// The mid stage on V values v = acc + bias, in place: rounded (mid_value rounds first), so that the store after it
// is exact.
template <typename T, int V>
__device__ __forceinline__ void apply_mid(const DepthwiseParams& p, bool affine, const float (&scale)[V],
                                          const float (&shift)[V], float (&acc)[V]) {
#pragma unroll
  for (int v = 0; v < V; ++v) acc[v] = mid_value<T>(acc[v], p.mid, affine, scale[v], shift[v]);
}

// ---- runs of kDepthwiseRun pixels (the forward's and input gradient's vector kernels) ----
// Kernel rows of a run loaded together: all three where their raw vectors fit ~40 registers, else one at a time.
template <typename Raw>
XO_HOST_DEVICE constexpr int run_rows_ahead(int cols) {
  return 3 * cols * static_cast<int>(sizeof(Raw)) / 4 <= 40 ? 3 : 1;
}
// The raw vectors of kRows kernel rows from kh0 by kCols columns of a run: each loaded where ok(kh, col), from
// at(kh, col), nothing read elsewhere; all issued before any is used.
template <typename T, int V, int kRows, int kCols, typename Ok, typename At>
__device__ __forceinline__ void load_run_rows(typename VecIO<T, V>::Raw (&raw)[kRows][kCols], int kh0, const Ok& ok,
                                              const At& at) {
#pragma unroll
  for (int b = 0; b < kRows; ++b)
#pragma unroll
    for (int col = 0; col < kCols; ++col) raw[b][col] = VecIO<T, V>::load_raw_if(ok(kh0 + b, col), at(kh0 + b, col));
}

// ---- forward, vector form (depthwise_forward_vectors: 3x3, no depth multiplier, x and y with channels fastest
// in whole aligned vectors, any stride) ----
// A thread takes V consecutive channels, with their 9 x V weights (and bias) in registers, and walks runs of
// kDepthwiseRun consecutive output pixels of one row; `lanes` threads cover a pixel's channels
// (depthwise_vector_lanes). A run's taps share input columns: at compile-time stride kSW (1 or 2, no horizontal
// dilation) a kernel row is (kDepthwiseRun - 1) kSW + 3 vector loads for kDepthwiseRun outputs, and the rows'
// loads are issued before any is used where their registers allow (kSW = 0: any stride and dilation, each tap
// loaded for itself, the run's loads still issued together). One pixel per thread at a time waited one memory
// latency per pixel (session 5: 0.19 ms at 64 ch @147^2, ~3x the byte floor). The taps are summed in the scalar
// form's order, the bias added last: the same bits. kMid: the mid stage on the stored values (DepthwiseParams::mid),
// a separate instantiation, so that the kernel without it keeps its registers: the mid stage's 2 x V values are live
// across the runs, and the kMid builds spill more (nvcc 13: up to 144 more bytes of spill loads, sm_90a fp16 tap by
// tap; 0 at stride 1 in 16 bits). Not yet timed on a GPU; it replaces two or three passes over the result.
template <typename T, typename idx_t, int V, int kSW, bool kMid = false>
__global__ void __launch_bounds__(kDepthwiseThreads, 2) depthwise_forward_vector_kernel(const DepthwiseParams p) {
  constexpr int R = kDepthwiseRun;
  constexpr int kCols = kSW > 0 ? (R - 1) * kSW + 3 : 3 * R;  // input columns of one kernel row
  using Raw = typename VecIO<T, V>::Raw;
  constexpr int kRowsAhead = run_rows_ahead<Raw>(kCols);
  const Conv2dGeometry& g = p.g;
  const idx_t H = g.in_h, W = g.in_w, OH = g.out_h, OW = g.out_w;
  const idx_t sh = g.stride_h, sw = g.stride_w, dh = g.dilation_h, dw = g.dilation_w;
  const idx_t pt = g.pad_top, pl = g.pad_left;
  const T* __restrict__ x = static_cast<const T*>(p.input.data);
  const T* __restrict__ bias = static_cast<const T*>(p.bias);
  T* __restrict__ y = static_cast<T*>(p.output.data);
  const idx_t xs_n = p.input.stride[0], xs_h = p.input.stride[2], xs_w = p.input.stride[3];
  const idx_t ys_n = p.output.stride[0], ys_h = p.output.stride[2], ys_w = p.output.stride[3];
  const idx_t groups = static_cast<idx_t>(g.dw_channels() / V);
  const idx_t runs_w = (OW + R - 1) / R, runs = static_cast<idx_t>(g.batch) * OH * runs_w;
  const int lanes = depthwise_vector_lanes(g.dw_channels() / V), rows = kDepthwiseThreads / lanes;
  const int lane = static_cast<int>(threadIdx.x) % lanes, row = static_cast<int>(threadIdx.x) / lanes;
  // Column c of a run's kernel row: its offset from the run's first input column, and the pixel and tap it
  // feeds (kSW = 0: one column per tap).
  auto col_offset = [&](int c) -> idx_t { return kSW > 0 ? static_cast<idx_t>(c) : (c / 3) * sw + (c % 3) * dw; };
  const bool prologue = p.prologue.active();  // x read through relu?(x * scale + shift)
  const bool mid_affine = p.mid_affine();
  for (idx_t cg = lane; cg < groups; cg += lanes) {
    const idx_t c = cg * V;
    float wv[9][V], bv[V], scale[V], shift[V];
    load_weights_3x3<T>(p, c, wv);
    load_forward_terms<T>(p, bias, c, prologue, bv, scale, shift);
    for (idx_t run = static_cast<idx_t>(blockIdx.x) * rows + row; run < runs;
         run += static_cast<idx_t>(gridDim.x) * rows) {
      const idx_t r = run / runs_w, ow0 = (run - r * runs_w) * R, oh = r % OH, n = r / OH;
      const T* xp = x + n * xs_n + c;
      const idx_t ih0 = oh * sh - pt, iw0 = ow0 * sw - pl;
      auto ok = [&](int kh, int col) {
        return in_range<idx_t>(ih0 + kh * dh, H) && in_range<idx_t>(iw0 + col_offset(col), W);
      };
      auto at = [&](int kh, int col) { return xp + (ih0 + kh * dh) * xs_h + (iw0 + col_offset(col)) * xs_w; };
      float acc[R][V];
#pragma unroll
      for (int q = 0; q < R; ++q)
#pragma unroll
        for (int v = 0; v < V; ++v) acc[q][v] = 0.f;
#pragma unroll
      for (int kh0 = 0; kh0 < 3; kh0 += kRowsAhead) {
        Raw raw[kRowsAhead][kCols];
        load_run_rows<T, V>(raw, kh0, ok, at);
#pragma unroll
        for (int b = 0; b < kRowsAhead; ++b) {
          const int kh = kh0 + b;
#pragma unroll
          for (int col = 0; col < kCols; ++col) {
            float xv[V];
            VecIO<T, V>::decode(raw[b][col], xv);
            if (prologue) {
#pragma unroll
              for (int v = 0; v < V; ++v) xv[v] = prologue_value<T>(xv[v], scale[v], shift[v], p.prologue.relu);
            }
            const bool tap_ok = ok(kh, col);
            // The (pixel, tap) pairs this column feeds, in each pixel's tap order (kh, then kw).
#pragma unroll
            for (int q = 0; q < R; ++q)
#pragma unroll
              for (int kw = 0; kw < 3; ++kw) {
                if ((kSW > 0 ? q * kSW + kw : q * 3 + kw) != col) continue;  // resolved at compile time
#pragma unroll
                for (int v = 0; v < V; ++v) {
                  acc[q][v] = tap_ok ? fmaf(xv[v], wv[kh * 3 + kw][v], acc[q][v]) : acc[q][v];
                }
              }
          }
        }
      }
      float mid_scale[V], mid_shift[V];
      if constexpr (kMid) load_mid_terms(p, c, mid_scale, mid_shift);
#pragma unroll
      for (int q = 0; q < R; ++q) {
        if (ow0 + q >= OW) break;
#pragma unroll
        for (int v = 0; v < V; ++v) acc[q][v] = round_to<T>(acc[q][v] + bv[v]);  // -0 without a bias
        if constexpr (kMid) apply_mid<T>(p, mid_affine, mid_scale, mid_shift, acc[q]);
        VecIO<T, V>::store(y + n * ys_n + c + oh * ys_h + (ow0 + q) * ys_w, acc[q]);
      }
    }
  }
}

// ---- input gradient, gather form: one thread per input element ----
// grad_x[n, c, ih, iw] = sum over m < M, taps (kh, kw) with ih + pad_top - kh*dh = oh*sh (0 <= oh < OH) and
// likewise for w, of grad_y[n, c*M + m, oh, ow] * w[c*M + m, kh, kw]; summed in the order m, kh, kw.
template <typename T, typename idx_t, bool kCL, int KH, int KW, int SH, int SW>
__global__ void __launch_bounds__(kDepthwiseThreads) depthwise_backward_input_kernel(const DepthwiseParams p) {
  const Conv2dGeometry& g = p.g;
  const idx_t N = g.batch, C = g.in_channels, H = g.in_h, W = g.in_w, M = g.depth_multiplier;
  const idx_t OH = g.out_h, OW = g.out_w;
  const int kh_n = KH > 0 ? KH : static_cast<int>(g.kernel_h);
  const int kw_n = KW > 0 ? KW : static_cast<int>(g.kernel_w);
  const idx_t sh = SH > 0 ? SH : static_cast<idx_t>(g.stride_h);
  const idx_t sw = SW > 0 ? SW : static_cast<idx_t>(g.stride_w);
  const idx_t dh = g.dilation_h, dw = g.dilation_w, pt = g.pad_top, pl = g.pad_left;

  T* __restrict__ gx = static_cast<T*>(p.input.data);
  const T* __restrict__ gy = static_cast<const T*>(p.output.data);
  const T* __restrict__ w = static_cast<const T*>(p.weight.data);
  const idx_t xs_n = p.input.stride[0], xs_c = p.input.stride[1], xs_h = p.input.stride[2],
              xs_w = p.input.stride[3];
  const idx_t ys_n = p.output.stride[0], ys_c = p.output.stride[1], ys_h = p.output.stride[2],
              ys_w = p.output.stride[3];
  const idx_t ws_o = p.weight.stride[0], ws_h = p.weight.stride[2], ws_w = p.weight.stride[3];

  const idx_t dqh = dh / sh, drh = dh - dqh * sh, dqw = dw / sw, drw = dw - dqw * sw;

  const idx_t total = N * C * H * W;
  const idx_t step = static_cast<idx_t>(gridDim.x) * kDepthwiseThreads;
  for (idx_t i = static_cast<idx_t>(blockIdx.x) * kDepthwiseThreads + threadIdx.x; i < total; i += step) {
    idx_t n, c, ih, iw;
    if (kCL) {
      unflatten(i, C, W, H, c, iw, ih, n);
    } else {
      unflatten(i, W, H, C, iw, ih, c, n);
    }
    // Tap kh reaches ih from output row oh when ih + pad_top - kh * dh = oh * sh. Write the left side as
    // qh * sh + rh (0 <= rh < sh): the tap counts when rh == 0 and 0 <= qh < OH, and each step of kh moves
    // (qh, rh) down by (dh / sh, dh % sh) with a borrow, so no division runs inside the tap loops.
    const idx_t bh = ih + pt, bw = iw + pl;  // position in the padded input
    using U = typename std::make_unsigned<idx_t>::type;  // bh, bw >= 0: the cheaper unsigned division
    const idx_t qh0 = static_cast<idx_t>(static_cast<U>(bh) / static_cast<U>(sh)), rh0 = bh - qh0 * sh;
    const idx_t qw0 = static_cast<idx_t>(static_cast<U>(bw) / static_cast<U>(sw)), rw0 = bw - qw0 * sw;
    float acc = 0.f;
    for (idx_t m = 0; m < M; ++m) {
      const idx_t oc = c * M + m;
      const T* gp = gy + n * ys_n + oc * ys_c;
      const T* wp = w + oc * ws_o;
      idx_t qh = qh0, rh = rh0;
#pragma unroll
      for (int kh = 0; kh < kh_n; ++kh) {
        if (rh == 0 && in_range(qh, OH)) {
          idx_t qw = qw0, rw = rw0;
#pragma unroll
          for (int kw = 0; kw < kw_n; ++kw) {
            if (rw == 0 && in_range(qw, OW)) {
              acc = fmaf(Elem<T>::load(gp + qh * ys_h + qw * ys_w), Elem<T>::load(wp + kh * ws_h + kw * ws_w), acc);
            }
            qw -= dqw;
            rw -= drw;
            if (rw < 0) { rw += sw; --qw; }
          }
        }
        qh -= dqh;
        rh -= drh;
        if (rh < 0) { rh += sh; --qh; }
      }
    }
    Elem<T>::store(gx + n * xs_n + c * xs_c + ih * xs_h + iw * xs_w, acc);
  }
}

// ---- input gradient, vector form (depthwise_dgrad_vectors: 3x3 at stride 1, no depth multiplier, grad_x and
// grad_y with channels fastest in whole aligned vectors) ----
// A thread takes V consecutive channels, with their 9 x V weights in registers, and walks runs of kDepthwiseRun
// consecutive input pixels of one row, where the gather form above spends a thread, its index arithmetic and 18
// scalar loads per element. Without horizontal dilation (kDW1) a run's taps share grad_y's columns: a kernel row is
// kDepthwiseRun + 2 vector loads for kDepthwiseRun outputs (otherwise one load per tap); the rows' loads are issued
// before any is used where their registers allow. `lanes` threads cover a pixel's channels
// (depthwise_vector_lanes). The taps are summed in the gather form's order: the results are the same bits.
template <typename T, typename idx_t, int V, bool kDW1>
__global__ void __launch_bounds__(kDepthwiseThreads) depthwise_backward_input_vector_kernel(const DepthwiseParams p) {
  constexpr int R = kDepthwiseRun;
  constexpr int kCols = kDW1 ? R + 2 : 3 * R;  // grad_y columns of one kernel row
  using Raw = typename VecIO<T, V>::Raw;
  constexpr int kRowsAhead = run_rows_ahead<Raw>(kCols);
  const Conv2dGeometry& g = p.g;
  const idx_t H = g.in_h, W = g.in_w, OH = g.out_h, OW = g.out_w;
  const idx_t dh = g.dilation_h, dw = g.dilation_w, pt = g.pad_top, pl = g.pad_left;
  T* __restrict__ gx = static_cast<T*>(p.input.data);
  const T* __restrict__ gy = static_cast<const T*>(p.output.data);
  const idx_t xs_n = p.input.stride[0], xs_h = p.input.stride[2], xs_w = p.input.stride[3];
  const idx_t ys_n = p.output.stride[0], ys_h = p.output.stride[2], ys_w = p.output.stride[3];
  const idx_t groups = static_cast<idx_t>(g.in_channels / V);
  const idx_t runs_w = (W + R - 1) / R, runs = static_cast<idx_t>(g.batch) * H * runs_w;
  const int lanes = depthwise_vector_lanes(g.in_channels / V), rows = kDepthwiseThreads / lanes;
  const int lane = static_cast<int>(threadIdx.x) % lanes, row = static_cast<int>(threadIdx.x) / lanes;
  // Column `col` of a kernel row: grad_y's column, relative to iw0 + pad_left. Tap kw of pixel q reads output
  // column iw0 + q + pad_left - kw * dw (stride 1): with dw = 1, column q - kw + 2 of kCols; else column 3 q + kw.
  auto col_offset = [&](int col) -> idx_t { return kDW1 ? static_cast<idx_t>(col - 2) : (col / 3) - (col % 3) * dw; };
  for (idx_t cg = lane; cg < groups; cg += lanes) {
    const idx_t c = cg * V;
    float wv[9][V];
    load_weights_3x3<T>(p, c, wv);
    for (idx_t run = static_cast<idx_t>(blockIdx.x) * rows + row; run < runs;
         run += static_cast<idx_t>(gridDim.x) * rows) {
      const idx_t r = run / runs_w, iw0 = (run - r * runs_w) * R, ih = r % H, n = r / H;
      const T* gp = gy + n * ys_n + c;
      const idx_t ow_base = iw0 + pl;
      auto ok = [&](int kh, int col) {
        return in_range<idx_t>(ih + pt - kh * dh, OH) && in_range<idx_t>(ow_base + col_offset(col), OW);
      };
      auto at = [&](int kh, int col) { return gp + (ih + pt - kh * dh) * ys_h + (ow_base + col_offset(col)) * ys_w; };
      float acc[R][V];
#pragma unroll
      for (int q = 0; q < R; ++q)
#pragma unroll
        for (int v = 0; v < V; ++v) acc[q][v] = 0.f;
#pragma unroll
      for (int kh0 = 0; kh0 < 3; kh0 += kRowsAhead) {
        Raw raw[kRowsAhead][kCols];
        load_run_rows<T, V>(raw, kh0, ok, at);
#pragma unroll
        for (int b = 0; b < kRowsAhead; ++b) {
          const int kh = kh0 + b;
          // Pixel q's taps in the gather form's order (kh, then kw): kw ascending is column descending with kDW1.
#pragma unroll
          for (int q = 0; q < R; ++q)
#pragma unroll
            for (int kw = 0; kw < 3; ++kw) {
              const int col = kDW1 ? q - kw + 2 : 3 * q + kw;
              float gv[V];
              VecIO<T, V>::decode(raw[b][col], gv);
              const bool tap_ok = ok(kh, col);
#pragma unroll
              for (int v = 0; v < V; ++v) {
                acc[q][v] = tap_ok ? fmaf(gv[v], wv[kh * 3 + kw][v], acc[q][v]) : acc[q][v];  // (inf weights)
              }
            }
        }
      }
#pragma unroll
      for (int q = 0; q < R; ++q) {
        if (iw0 + q >= W) break;
#pragma unroll
        for (int v = 0; v < V; ++v) acc[q][v] = round_to<T>(acc[q][v]);
        VecIO<T, V>::store(gx + n * xs_n + c + ih * xs_h + (iw0 + q) * xs_w, acc[q]);
      }
    }
  }
}

// ---- strips (depthwise_strips: 3x3 at stride 1 without dilation, no depth multiplier, channels fastest in whole
// aligned vectors) ----
// The run kernels above load each source row once per kernel row that reads it (3x, mostly from L2) and wait for
// a run's loads before its taps: session 6 measured them at 2.2x cuDNN's depthwise forward (0.194 against 0.087
// ms at 64 ch @147^2, bf16, H100). A strip thread keeps the window of three source rows in registers as raw
// vectors and slides it down `strip_rows` rows: one new row per output row, requested before the current row's
// taps are summed.
//
// Window row r, column col of the run at (row o, first column o_w0) is the source element
// (o + row_off + r, o_w0 + col_off + col). Forward: source x, row_off = -pad_top, tap (kh, kw) of pixel q at
// (kh, q + kw). Input gradient: source grad_y, row_off = pad_top - 2, tap (kh, kw) at (2 - kh, q + 2 - kw) (a
// correlation with the flipped kernel). Each pixel sums its taps in the scalar forms' order (kh, then kw) and
// adds the bias last: the same bits as they give.

// One source row of a window: the in-range columns' vectors, zeros elsewhere, all requested before any is used.
template <typename T, int V, int kCols, typename idx_t>
__device__ __forceinline__ void strip_load_row(typename VecIO<T, V>::Raw (&raw)[kCols], bool row_ok,
                                               const bool (&col_ok)[kCols], const T* row, idx_t col_stride) {
#pragma unroll
  for (int col = 0; col < kCols; ++col) {
    raw[col] = VecIO<T, V>::load_raw_if(row_ok && col_ok[col], row + col * col_stride);
  }
}
// A loaded row read through the prologue, re-encoded in place (encode_rn rounds to the dtype, as prologue_value
// does), and zero outside the source: padding is 0 after the prologue, as in the reference. kInside: the caller knows the
// whole row lies inside the source (no selects).
template <typename T, int V, int kCols, bool kInside = false>
__device__ __forceinline__ void strip_prologue_row(typename VecIO<T, V>::Raw (&raw)[kCols], bool row_ok,
                                                   const bool (&col_ok)[kCols], const float (&scale)[V],
                                                   const float (&shift)[V], bool relu) {
#pragma unroll
  for (int col = 0; col < kCols; ++col) {
    // Computed everywhere, then selected: `ok ? prologue_value(..) : 0` compiled to a branch and a convergence
    // barrier per element (sm_90, nvcc 13), twice the instructions of the kernel without a prologue.
    const bool ok = kInside || (row_ok && col_ok[col]);
    float v[V];
    VecIO<T, V>::decode(raw[col], v);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      // prologue_value's relu(round(x * scale + shift)), with the rounding left to encode_rn: rounding is monotonic
      // and keeps 0, so it commutes with the ReLU (NaN included: both keep it).
      float y = fmaf(v[i], scale[i], shift[i]);
      y = relu ? kernels::relu(y) : y;
      v[i] = ok ? y : 0.f;
    }
    raw[col] = VecIO<T, V>::encode_rn(v);
  }
}

// The window of a strip thread: three consecutive source rows of its run as raw vectors (zero outside the
// source, through the prologue where there is one) and whether each row lies inside the source. The rows sit in a
// ring of kSlots: with 3 they move down one slot per output row (slide, the fused separable forward's run tiles);
// with more, the slots past the window take the loads of the rows ahead and the window's top row is slot
// kTop = (output row - first) % kSlots, so a caller that unrolls its row loop by kSlots addresses every slot at
// compile time and moves no register (the forward and input gradient, 4 slots: the 3 slides per row were 18 of its
// 226 instructions, sm_90; the weight gradient, 6: two rows in flight).
template <typename T, int V, int kCols, int kSlots = 3>
struct StripWindow {
  static_assert(kSlots >= 3, "the window's rows");
  using Raw = typename VecIO<T, V>::Raw;
  Raw row[kSlots][kCols];
  bool row_ok[kSlots];
  // The slot of window row r (0..2; 3 and on: the rows ahead) when the window's top row is in slot kTop.
  template <int kTop>
  XO_HOST_DEVICE static constexpr int slot(int r) { return (kTop + r) % kSlots; }
  // Source rows first .. first + 2 of `src_h` into slots 0..2; `run` points at the run's window column 0 in source
  // row 0.
  template <typename idx_t>
  __device__ __forceinline__ void fill(const T* run, idx_t first, idx_t src_h, idx_t row_stride, idx_t col_stride,
                                       const bool (&col_ok)[kCols], bool prologue, const float (&scale)[V],
                                       const float (&shift)[V], bool relu) {
#pragma unroll
    for (int r = 0; r < 3; ++r) {
      row_ok[r] = in_range<idx_t>(first + r, src_h);
      strip_load_row<T, V>(row[r], row_ok[r], col_ok, run + (first + r) * row_stride, col_stride);
    }
    if (prologue) {
#pragma unroll
      for (int r = 0; r < 3; ++r) strip_prologue_row<T, V>(row[r], row_ok[r], col_ok, scale, shift, relu);
    }
  }
  // The source row kAhead rows past the window's last (`src` at its window column 0, loaded where ok) into its
  // slot, as loaded: the caller applies the prologue with prologue_last<kTop + kAhead>() after issuing the loads of
  // the rows after it.
  template <int kTop, int kAhead = 1, typename idx_t>
  __device__ __forceinline__ void load_next(const T* src, bool ok, const bool (&col_ok)[kCols], idx_t col_stride) {
    static_assert(kSlots >= 3 + kAhead, "a free slot");
    constexpr int s = slot<kTop>(2 + kAhead);
    row_ok[s] = ok;
    strip_load_row<T, V>(row[s], ok, col_ok, src, col_stride);
  }
  // kSlots = 3: one row down: `next` (loaded where next_ok, by strip_load_row) becomes the last row, as loaded: the
  // caller applies the prologue to it with prologue_last() after issuing its next loads. Applying it here, at the end
  // of a row, waited for `next` before the next row's loads were issued: one load in flight per thread instead of
  // two, and the strip kernels with a prologue took twice as long as those without (H100 and H200, session 10).
  __device__ __forceinline__ void slide(const Raw (&next)[kCols], bool next_ok) {
    static_assert(kSlots == 3, "a longer ring does not move its rows");
#pragma unroll
    for (int col = 0; col < kCols; ++col) {
      row[0][col] = row[1][col], row[1][col] = row[2][col], row[2][col] = next[col];
    }
    row_ok[0] = row_ok[1], row_ok[1] = row_ok[2], row_ok[2] = next_ok;
  }
  // The prologue on the window's last row (the one slide() or load_next() brought in); cols_in: every column of the
  // run is inside the source, so that a row inside it takes the form without selects.
  template <int kTop = 0>
  __device__ __forceinline__ void prologue_last(const bool (&col_ok)[kCols], bool cols_in, const float (&scale)[V],
                                                const float (&shift)[V], bool relu) {
    constexpr int s = slot<kTop>(2);
    if (cols_in && row_ok[s]) {
      strip_prologue_row<T, V, kCols, true>(row[s], true, col_ok, scale, shift, relu);
    } else {
      strip_prologue_row<T, V, kCols>(row[s], row_ok[s], col_ok, scale, shift, relu);
    }
  }
  // Whether all three rows and (cols_in) all columns lie inside the source: then accumulate<.., true> applies. (The
  // rows are consecutive: the first and the last inside, the middle one is.)
  template <int kTop = 0>
  __device__ __forceinline__ bool inside(bool cols_in) const {
    return cols_in && row_ok[slot<kTop>(0)] && row_ok[slot<kTop>(2)];
  }
  // The taps of the run's R = kCols - 2 outputs, added to acc: acc[q] += row(kh, q + kw) * w[kh][kw], or with kFlip
  // (the input gradient's flipped kernel) the rows and columns taken in reverse. Each output's taps come in the order
  // kernel row, then column; a tap outside the source adds nothing (inf weights). kInside: the same sums without a
  // predicate per tap, where every tap lies inside the source (inside()) or where a tap outside adds exactly
  // nothing anyway (exact_padding()). The kernels are bound by instruction issue (H100, session 12: 0.80 warps issued
  // per scheduler and cycle at 728 @19^2), and the predicated form also decoded each element once per predicate
  // region it fell in: 339 instructions per row for 72 multiply-adds.
  template <bool kFlip, bool kInside = false, int kTop = 0, int R>
  __device__ __forceinline__ void accumulate(const bool (&col_ok)[kCols], const float (&wv)[9][V],
                                             float (&acc)[R][V]) const {
    static_assert(R + 2 == kCols, "a run and its two halo columns");
#pragma unroll
    for (int kh = 0; kh < 3; ++kh) {
      const int r = slot<kTop>(kFlip ? 2 - kh : kh);
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        const int col = kFlip ? kCols - 1 - j : j;
        float xv[V];
        VecIO<T, V>::decode(row[r][col], xv);
        const bool tap_ok = kInside || (row_ok[r] && col_ok[col]);
#pragma unroll
        for (int q = 0; q < R; ++q)
#pragma unroll
          for (int kw = 0; kw < 3; ++kw) {
            if ((kFlip ? q + 2 - kw : q + kw) != col) continue;  // resolved at compile time
#pragma unroll
            for (int v = 0; v < V; ++v) acc[q][v] = tap_ok ? fmaf(xv[v], wv[kh * 3 + kw][v], acc[q][v]) : acc[q][v];
          }
      }
    }
  }
};

// Whether every value of a 3x3 kernel's taps (weights, or the weight gradient's sums) is finite.
template <int V>
__device__ __forceinline__ bool all_finite(const float (&taps)[9][V]) {
  bool finite = true;
#pragma unroll
  for (int t = 0; t < 9; ++t)
#pragma unroll
    for (int v = 0; v < V; ++v) finite = finite && fabsf(taps[t][v]) <= 3.402823466e38f;  // FLT_MAX; false for NaN
  return finite;
}

// Whether a tap outside the source adds exactly nothing to a strip kernel's sums, so that accumulate<.., true>
// gives the predicated form's bits everywhere: every weight finite. Outside the source the window holds +0
// (loads of zeros; the prologue's selects), and 0 * w is a zero for a finite w; the sums start at +0 and a sum of
// two values is -0 only when both are, so they never hold -0, and adding a zero leaves them as they are. With an
// inf or NaN weight 0 * w is NaN, where PyTorch's own kernels disagree (float64 gives NaN at the border on the
// CPU, float32 does not): the predicated form keeps the scalar kernels' answer, a tap outside adds nothing.
// At 728 @19^2 half the rows of a strip kernel touch the border (runs of 4 over 19 columns).
template <int V>
__device__ __forceinline__ bool exact_padding(const float (&wv)[9][V]) {
  return all_finite<V>(wv);
}

// Calls row(std::integral_constant<int, k>{}, o) for o = o0 .. o_end - 1 (o0 < o_end), k = (o - o0) % kSlots known
// at compile time: the row loop of a strip kernel whose window is a StripWindow ring of kSlots rows, unrolled by the
// ring so that every slot is a register.
template <int... kPhase, typename idx_t, typename Row>
__device__ __forceinline__ void walk_ring_rows(std::integer_sequence<int, kPhase...>, idx_t o0, idx_t o_end,
                                               const Row& row) {
  for (idx_t o = o0;;) {
    // One row per phase, in order, leaving the loop after the strip's last one.
    if (((row(std::integral_constant<int, kPhase>{}, o), ++o >= o_end) || ...)) break;
  }
}
template <int kSlots, typename idx_t, typename Row>
__device__ __forceinline__ void walk_ring_rows(idx_t o0, idx_t o_end, const Row& row) {
  walk_ring_rows(std::make_integer_sequence<int, kSlots>{}, o0, o_end, row);
}

// Forward (kGrad = false; kPrologue: x read through p.prologue) and input gradient (kGrad = true; kPrologue: the
// result leaves through the prologue's backward, DepthwisePrologue::x). An item is one run of R pixels of one strip
// of one image. kCL: threads are (item, channel vector) pairs with the vector fastest (channels-last tensors); else
// (NCHW, V = 1) (run, strip, channel, image) with the run fastest, so that a warp reads consecutive columns of one
// row. Blocks of kDepthwiseStripThreads, five per SM at least (96 registers; 20 warps): the loads in flight per SM
// are what this kernel's speed depends on, and the 4-slot ring's walks (below) keep each new row decoded in
// registers (sm_90: 136-148 instructions per row inside the image, against 226 for the one walk with a 3-row window
// that slid). Four for the input gradient through the prologue's backward (128 registers): it has the x run's
// loads in flight too. kMid (the forward only): the mid stage on the stored values (DepthwiseParams::mid), a separate
// instantiation like the vector kernel's. Its builds spill more than the plain ones (nvcc 13, sm_90a: channels-last
// 16-bit with a prologue, 32-bit indices, 0-20 -> 168 bytes of spill loads; 64-bit indices up to 896); not yet timed.
template <typename T, typename idx_t, int V, int R, bool kGrad, bool kPrologue, bool kCL, bool kMid = false>
__global__ void __launch_bounds__(kDepthwiseStripThreads, kGrad && kPrologue ? 4 : 5)
    depthwise_strip_kernel(const DepthwiseParams p, int strip_rows) {
  static_assert(kCL || V == 1, "NCHW strips take one channel per thread");
  static_assert(!(kGrad && kMid), "the mid stage is the forward's");
  constexpr int kCols = R + 2;
  constexpr bool kReadPrologue = kPrologue && !kGrad;  // the forward's taps read x through it
  constexpr bool kPrologueGrad = kPrologue && kGrad;   // the input gradient is written through its backward
  using Raw = typename VecIO<T, V>::Raw;
  const Conv2dGeometry& g = p.g;
  const DepthwiseTensor& src_t = kGrad ? p.output : p.input;  // what the taps read
  const DepthwiseTensor& dst_t = kGrad ? p.input : p.output;  // what is written
  const idx_t src_h = kGrad ? g.out_h : g.in_h, src_w = kGrad ? g.out_w : g.in_w;
  const idx_t dst_h = kGrad ? g.in_h : g.out_h, dst_w = kGrad ? g.in_w : g.out_w;
  const idx_t row_off = kGrad ? g.pad_top - 2 : -g.pad_top, col_off = kGrad ? g.pad_left - 2 : -g.pad_left;
  const T* __restrict__ src = static_cast<const T*>(src_t.data);
  T* __restrict__ dst = static_cast<T*>(dst_t.data);
  const T* __restrict__ bias = kGrad ? nullptr : static_cast<const T*>(p.bias);
  const idx_t ss_n = src_t.stride[0], ss_c = src_t.stride[1], ss_h = src_t.stride[2], ss_w = src_t.stride[3];
  const idx_t ds_n = dst_t.stride[0], ds_c = dst_t.stride[1], ds_h = dst_t.stride[2], ds_w = dst_t.stride[3];
  const idx_t groups = static_cast<idx_t>(g.in_channels / V);
  const idx_t runs_w = (dst_w + R - 1) / R, strips = (dst_h + strip_rows - 1) / strip_rows;
  const idx_t t = static_cast<idx_t>(blockIdx.x) * kDepthwiseStripThreads + static_cast<idx_t>(threadIdx.x);
  // kCL: t = ((n * strips + strip) * runs_w + run) * groups + group;
  // NCHW: t = ((n * C + c) * strips + strip) * runs_w + run.
  const idx_t run = kCL ? (t / groups) % runs_w : t % runs_w;
  const idx_t rest = kCL ? t / groups / runs_w : t / runs_w;
  const idx_t strip = rest % strips;
  const idx_t c = kCL ? (t % groups) * V : (rest / strips) % groups;
  const idx_t n = kCL ? rest / strips : rest / strips / groups;
  if (n >= static_cast<idx_t>(g.batch)) return;
  const idx_t ow0 = run * R, o0 = strip * strip_rows;
  const idx_t o_end = o0 + strip_rows < dst_h ? o0 + strip_rows : dst_h;

  float wv[9][V], bv[V], scale[V], shift[V], mid_scale[V], mid_shift[V];
  load_weights_3x3<T>(p, c, wv);
  load_forward_terms<T>(p, bias, c, kPrologue, bv, scale, shift);
  if constexpr (kMid) load_mid_terms(p, c, mid_scale, mid_shift);
  const bool mid_affine = p.mid_affine();
  bool col_ok[kCols], q_ok[R];
#pragma unroll
  for (int col = 0; col < kCols; ++col) col_ok[col] = in_range<idx_t>(ow0 + col_off + col, src_w);
  // The run's window inside the source's columns (most runs): the predicate-free taps. Two comparisons, not one per
  // column: the compiler recomputes it in the loop, short of predicate registers.
  const bool cols_in = ow0 + col_off >= 0 && ow0 + col_off + kCols <= src_w;
#pragma unroll
  for (int q = 0; q < R; ++q) q_ok[q] = ow0 + q < dst_w;
  const T* src_run = src + n * ss_n + c * ss_c + (ow0 + col_off) * ss_w;  // the window's column 0 in row 0
  StripWindow<T, V, kCols, 4> win;
  win.fill(src_run, o0 + row_off, src_h, ss_h, ss_w, col_ok, kReadPrologue, scale, shift, p.prologue.relu);
  T* dst_run = dst + n * ds_n + c * ds_c + ow0 * ds_w;
  // kPrologueGrad: x at the written run, and this thread's sums of g * x and g over its pixels.
  const DepthwiseTensor& xt = p.prologue.x;
  const T* x_run = kPrologueGrad ? static_cast<const T*>(xt.data) + n * xt.stride[0] + c * xt.stride[1] +
                                       ow0 * xt.stride[3]
                                 : nullptr;
  float sum_gx[V], sum_g[V];
#pragma unroll
  for (int v = 0; v < V; ++v) sum_gx[v] = 0.f, sum_g[v] = 0.f;
  // kPrologueGrad: x at a row's run is requested one row ahead, like the source rows, so that no row waits for it;
  // two buffers, row parity picks one.
  Raw x_raw[2][R];
  if constexpr (kPrologueGrad) {
    strip_load_row<T, V>(x_raw[0], true, q_ok, x_run + o0 * static_cast<idx_t>(xt.stride[2]),
                         static_cast<idx_t>(xt.stride[3]));
  }
  // Every window column inside the source and every written pixel inside the destination (most runs).
  const bool run_in = cols_in && ow0 + R <= dst_w;
  bool all_cols[kCols], all_q[R];  // what col_ok and q_ok are then
#pragma unroll
  for (int col = 0; col < kCols; ++col) all_cols[col] = true;
#pragma unroll
  for (int q = 0; q < R; ++q) all_q[q] = true;
  // Output row o, the window's top row in slot kTop (= (o - o0) % 4), in one of three walks:
  //   kExact: taps outside the source add exactly nothing (exact_padding), so every row sums its taps without
  //           predicates, the border's rows too; else the rows whose window crosses the border take predicated taps.
  //   kIn:    (with kExact) the run lies inside (run_in): loads and stores without a predicate per column.
  // A walk keeps no predicate per loaded element past its load. The one walk with every form (sm_90, nvcc 13) kept
  // them in a register of flags, and its 6 loads per row took 70 instructions.
  auto output_row = [&](auto top, auto exact, auto inside_run, idx_t o) {
    constexpr int kTop = decltype(top)::value;
    constexpr bool kExact = decltype(exact)::value, kIn = decltype(inside_run)::value;
    static_assert(kExact || !kIn, "the run's walk inside takes the exact taps");
    const bool(&cols)[kCols] = kIn ? all_cols : col_ok;
    const bool(&qs)[R] = kIn ? all_q : q_ok;
    // The next output row's new source row (and x at the next row's run), requested before this row's taps.
    const idx_t next_row = o + 1 + row_off + 2;
    const bool more = o + 1 < o_end;
    win.template load_next<kTop>(src_run + next_row * ss_h, more && in_range<idx_t>(next_row, src_h), cols, ss_w);
    if constexpr (kPrologueGrad) {
      strip_load_row<T, V>(x_raw[(kTop + 1) % 2], more, qs, x_run + (o + 1) * static_cast<idx_t>(xt.stride[2]),
                           static_cast<idx_t>(xt.stride[3]));
    }
    if (kReadPrologue && (kTop > 0 || o > o0)) {
      win.template prologue_last<kTop>(cols, kIn || cols_in, scale, shift, p.prologue.relu);
    }
    float acc[R][V];
#pragma unroll
    for (int q = 0; q < R; ++q)
#pragma unroll
      for (int v = 0; v < V; ++v) acc[q][v] = 0.f;
    if (kExact || win.template inside<kTop>(cols_in)) {
      win.template accumulate<kGrad, true, kTop>(cols, wv, acc);
    } else {
      win.template accumulate<kGrad, false, kTop>(cols, wv, acc);
    }
#pragma unroll
    for (int q = 0; q < R; ++q) {
      if (!qs[q]) break;
#pragma unroll
      for (int v = 0; v < V; ++v) acc[q][v] += bv[v];  // -0 without a bias (load_forward_terms)
      if constexpr (kMid) apply_mid<T>(p, mid_affine, mid_scale, mid_shift, acc[q]);
      if constexpr (!kPrologueGrad) {
        VecIO<T, V>::store_rn(dst_run + o * ds_h + q * ds_w, acc[q]);  // rounded as it is packed
      } else {  // as separable_channel_pass_kernel's prologue pass, from the rounded gradient
#pragma unroll
        for (int v = 0; v < V; ++v) acc[q][v] = round_to<T>(acc[q][v]);
        float xv[V];
        VecIO<T, V>::decode(x_raw[kTop % 2][q], xv);
#pragma unroll
        for (int v = 0; v < V; ++v) {
          float gv = acc[q][v];
          if (p.prologue.relu && !(round_to<T>(fmaf(xv[v], scale[v], shift[v])) > 0.f)) gv = 0.f;
          sum_gx[v] = fmaf(gv, xv[v], sum_gx[v]);
          sum_g[v] += gv;
          acc[q][v] = p.prologue.scale != nullptr ? gv * scale[v] : gv;
        }
        VecIO<T, V>::store_rn(dst_run + o * ds_h + q * ds_w, acc[q]);  // gv * scale rounded as it is packed
      }
    }
  };
  // The strip's rows (o0 < o_end: a strip has a row).
  auto walk = [&](auto exact, auto inside_run) {
    walk_ring_rows<4>(o0, o_end, [&](auto top, idx_t o) { output_row(top, exact, inside_run, o); });
  };
  if (!exact_padding<V>(wv)) {
    walk(std::false_type{}, std::false_type{});
  } else if (run_in) {
    walk(std::true_type{}, std::true_type{});
  } else {
    walk(std::true_type{}, std::false_type{});
  }
  if constexpr (kPrologueGrad) {
    if (p.prologue.partial != nullptr) {  // row (image, strip, run); every (row, channel) has one writer
      const idx_t channels = static_cast<idx_t>(g.in_channels);
      float* row = p.prologue.partial + ((n * strips + strip) * runs_w + run) * 2 * channels + c;
#pragma unroll
      for (int v = 0; v < V; ++v) row[v] = sum_gx[v], row[channels + v] = sum_g[v];
    }
  }
}

// ---- weight gradient, pass 1: per-slice partial sums into the float32 workspace ----
// grid.x = channel block + chan_blocks * tap block, grid.y = slice. See depthwise_params.h for the split.
// Threads: lane `lane` walks the slice's positions with step `kLanes`; `cl` picks the block's channel.
// channels_last: tid = lane * 32 + cl (a warp reads 32 adjacent channels of one position);
// NCHW: tid = cl * 64 + lane (a warp reads 32 adjacent positions of one channel).
// KH, KW > 0: all taps in registers, one tap block. KH = KW = 0: one tap per tap block, read at run time.
template <typename T, typename idx_t, bool kCL, int KH, int KW>
__global__ void __launch_bounds__(kDepthwiseThreads)
    depthwise_backward_weight_partial_kernel(const DepthwiseParams p, float* __restrict__ workspace,
                                             int64_t slices) {
  constexpr int kChannels = kCL ? 32 : 4;
  constexpr int kLanes = kDepthwiseThreads / kChannels;
  constexpr int kTaps = KH > 0 ? KH * KW : 1;
  static_assert(kChannels * kLanes == kDepthwiseThreads, "block shape");
  __shared__ float red[kTaps][kDepthwiseThreads];

  const Conv2dGeometry& g = p.g;
  const idx_t H = g.in_h, W = g.in_w, M = g.depth_multiplier;
  const idx_t OC = g.dw_channels(), OH = g.out_h, OW = g.out_w;
  const idx_t sh = g.stride_h, sw = g.stride_w, dh = g.dilation_h, dw = g.dilation_w;
  const idx_t pt = g.pad_top, pl_ = g.pad_left;
  const int taps_total = static_cast<int>(g.kernel_h * g.kernel_w);

  const T* __restrict__ x = static_cast<const T*>(p.input.data);
  const T* __restrict__ gy = static_cast<const T*>(p.output.data);
  const idx_t xs_n = p.input.stride[0], xs_c = p.input.stride[1], xs_h = p.input.stride[2],
              xs_w = p.input.stride[3];
  const idx_t ys_n = p.output.stride[0], ys_c = p.output.stride[1], ys_h = p.output.stride[2],
              ys_w = p.output.stride[3];

  const int tid = threadIdx.x;
  const int cl = kCL ? tid % kChannels : tid / kLanes;
  const int lane = kCL ? tid / kChannels : tid % kLanes;
  const int64_t chan_blocks = (static_cast<int64_t>(OC) + kChannels - 1) / kChannels;
  const int64_t chan_block = static_cast<int64_t>(blockIdx.x) % chan_blocks;
  const int tap0 = KH > 0 ? 0 : static_cast<int>(static_cast<int64_t>(blockIdx.x) / chan_blocks);
  const int tap_kh = KH > 0 ? 0 : tap0 / static_cast<int>(g.kernel_w);
  const int tap_kw = KH > 0 ? 0 : tap0 % static_cast<int>(g.kernel_w);
  const idx_t oc = static_cast<idx_t>(chan_block * kChannels + cl);
  const bool valid = oc < OC;

  float acc[kTaps];
#pragma unroll
  for (int t = 0; t < kTaps; ++t) acc[t] = 0.f;

  if (valid) {
    const idx_t positions = static_cast<idx_t>(g.batch) * OH * OW;
    const idx_t chunk = static_cast<idx_t>((static_cast<int64_t>(positions) + slices - 1) / slices);
    const idx_t begin = static_cast<idx_t>(blockIdx.y) * chunk;
    const idx_t end = begin + chunk < positions ? begin + chunk : positions;
    const idx_t c = oc / M;
    const T* gp = gy + oc * ys_c;
    const T* xc = x + c * xs_c;
    for (idx_t q = begin + lane; q < end; q += kLanes) {
      const idx_t ow = q % OW;
      const idx_t r = q / OW;
      const idx_t oh = r % OH;
      const idx_t n = r / OH;
      const float go = Elem<T>::load(gp + n * ys_n + oh * ys_h + ow * ys_w);
      const T* xp = xc + n * xs_n;
      const idx_t ih0 = oh * sh - pt, iw0 = ow * sw - pl_;
      if (KH > 0) {
#pragma unroll
        for (int kh = 0; kh < (KH > 0 ? KH : 1); ++kh) {
          const idx_t ih = ih0 + kh * dh;
          if (!in_range(ih, H)) continue;
#pragma unroll
          for (int kw = 0; kw < (KW > 0 ? KW : 1); ++kw) {
            const idx_t iw = iw0 + kw * dw;
            if (in_range(iw, W)) acc[kh * KW + kw] = fmaf(go, Elem<T>::load(xp + ih * xs_h + iw * xs_w), acc[kh * KW + kw]);
          }
        }
      } else {
        const idx_t ih = ih0 + tap_kh * dh, iw = iw0 + tap_kw * dw;
        if (in_range(ih, H) && in_range(iw, W)) acc[0] = fmaf(go, Elem<T>::load(xp + ih * xs_h + iw * xs_w), acc[0]);
      }
    }
  }

  // Fixed-shape tree over the lanes of each channel.
#pragma unroll
  for (int t = 0; t < kTaps; ++t) red[t][tid] = acc[t];
  __syncthreads();
  const int stride_lane = kCL ? kChannels : 1;  // distance in tid between neighbouring lanes
  for (int s = kLanes / 2; s > 0; s >>= 1) {
    if (lane < s) {
#pragma unroll
      for (int t = 0; t < kTaps; ++t) red[t][tid] += red[t][tid + s * stride_lane];
    }
    __syncthreads();
  }
  if (lane == 0 && valid) {
    float* out = workspace + (static_cast<int64_t>(blockIdx.y) * OC + oc) * taps_total + tap0;
#pragma unroll
    for (int t = 0; t < kTaps; ++t) out[t] = red[t][tid];
  }
}

// A thread of the weight gradient's vector and strip forms (pass 1): blocks of `groups` vectors of V channels
// (depthwise_wgrad_vector_groups) x `lanes` lanes (thread = lane * groups + group), this thread's first channel c
// (valid: within the layer; V divides it), and the prologue's scale and shift for its channels. NCHW (!kCL, V = 1):
// one channel per block, every thread a lane.
template <typename idx_t, int V, bool kCL>
struct WgradVectorThread {
  int groups, lanes, lane;
  idx_t c;
  bool valid;
  float scale[V], shift[V];
  __device__ __forceinline__ explicit WgradVectorThread(const DepthwiseParams& p) {
    groups = kCL ? depthwise_wgrad_vector_groups(p.g.dw_channels() / V) : 1, lanes = kDepthwiseThreads / groups;
    const int tid = threadIdx.x;
    lane = tid / groups;
    c = (static_cast<idx_t>(blockIdx.x) * groups + tid % groups) * V;
    valid = c < static_cast<idx_t>(p.g.dw_channels());
#pragma unroll
    for (int v = 0; v < V; ++v) {
      scale[v] = valid && p.prologue.scale != nullptr ? p.prologue.scale[c + v] : 1.f;
      shift[v] = valid && p.prologue.shift != nullptr ? p.prologue.shift[c + v] : 0.f;
    }
  }
};

// The vector and strip forms' end of pass 1: a fixed-shape tree over the `lanes` threads of each vector of channels
// (thread tid = lane * groups + group), then lane 0 writes its V channels' 9 partials to `out` ([channel][tap]).
template <int V>
__device__ __forceinline__ void wgrad_vector_partials(const float (&acc)[9][V], float (&red)[9 * V][kDepthwiseThreads],
                                                      int groups, int lanes, bool valid, float* out) {
  const int tid = threadIdx.x, lane = tid / groups;
#pragma unroll
  for (int t = 0; t < 9; ++t)
#pragma unroll
    for (int v = 0; v < V; ++v) red[t * V + v][tid] = acc[t][v];
  __syncthreads();
  for (int s = lanes / 2; s > 0; s >>= 1) {
    if (lane < s) {
#pragma unroll
      for (int e = 0; e < 9 * V; ++e) red[e][tid] += red[e][tid + s * groups];
    }
    __syncthreads();
  }
  if (lane == 0 && valid) {
#pragma unroll
    for (int v = 0; v < V; ++v)
#pragma unroll
      for (int t = 0; t < 9; ++t) out[v * 9 + t] = red[t * V + v][tid];
  }
}

// ---- weight gradient, pass 1, vector form (depthwise_wgrad_vectors: 3x3, no depth multiplier, x and grad_y with
// channels fastest in whole aligned vectors) ----
// The channels_last form above with V channels per thread: `groups` vectors of channels (depthwise_wgrad_vector_groups:
// 32, or fewer for narrow layers, so that their blocks are not mostly idle) x 256 / groups position lanes per block.
// Per position one vector load of grad_y and 9 predicated ones of x, all issued before any is used (a tap outside
// the input adds nothing, as in the scalar form). With 32 groups the lanes, per-lane order and tree are the scalar
// form's: the same partials, bit for bit; with fewer, the same sums in another fixed order.
template <typename T, typename idx_t, int V>
__global__ void __launch_bounds__(kDepthwiseThreads)
    depthwise_backward_weight_partial_vector_kernel(const DepthwiseParams p, float* __restrict__ workspace,
                                                    int64_t slices) {
  constexpr int kTaps = 9;
  __shared__ float red[kTaps * V][kDepthwiseThreads];
  const Conv2dGeometry& g = p.g;
  const idx_t H = g.in_h, W = g.in_w, OC = g.dw_channels(), OH = g.out_h, OW = g.out_w;
  const idx_t sh = g.stride_h, sw = g.stride_w, dh = g.dilation_h, dw = g.dilation_w;
  const idx_t pt = g.pad_top, pl_ = g.pad_left;
  const T* __restrict__ x = static_cast<const T*>(p.input.data);
  const T* __restrict__ gy = static_cast<const T*>(p.output.data);
  const idx_t xs_n = p.input.stride[0], xs_h = p.input.stride[2], xs_w = p.input.stride[3];
  const idx_t ys_n = p.output.stride[0], ys_h = p.output.stride[2], ys_w = p.output.stride[3];
  const WgradVectorThread<idx_t, V, true> th(p);
  const bool prologue = p.prologue.active();  // x read through relu?(x * scale + shift)

  float acc[kTaps][V];
#pragma unroll
  for (int t = 0; t < kTaps; ++t)
#pragma unroll
    for (int v = 0; v < V; ++v) acc[t][v] = 0.f;
  if (th.valid) {
    const idx_t positions = static_cast<idx_t>(g.batch) * OH * OW;
    const idx_t chunk = static_cast<idx_t>((static_cast<int64_t>(positions) + slices - 1) / slices);
    const idx_t begin = static_cast<idx_t>(blockIdx.y) * chunk;
    const idx_t end = begin + chunk < positions ? begin + chunk : positions;
    for (idx_t q = begin + th.lane; q < end; q += th.lanes) {
      const idx_t ow = q % OW, r = q / OW, oh = r % OH, n = r / OH;
      const T* xp = x + n * xs_n + th.c;
      const idx_t ih0 = oh * sh - pt, iw0 = ow * sw - pl_;
      bool ok[kTaps];
      using Raw = typename VecIO<T, V>::Raw;
      Raw raw[kTaps];
      const Raw raw_go = VecIO<T, V>::load_raw_if(true, gy + n * ys_n + oh * ys_h + ow * ys_w + th.c);
#pragma unroll
      for (int t = 0; t < kTaps; ++t) {
        const idx_t ih = ih0 + (t / 3) * dh, iw = iw0 + (t % 3) * dw;
        ok[t] = in_range(ih, H) && in_range(iw, W);
        raw[t] = VecIO<T, V>::load_raw_if(ok[t], xp + ih * xs_h + iw * xs_w);
      }
      float go[V];
      VecIO<T, V>::decode(raw_go, go);
#pragma unroll
      for (int t = 0; t < kTaps; ++t) {
        float xv[V];
        VecIO<T, V>::decode(raw[t], xv);
        if (prologue) {
#pragma unroll
          for (int v = 0; v < V; ++v) xv[v] = prologue_value<T>(xv[v], th.scale[v], th.shift[v], p.prologue.relu);
        }
#pragma unroll
        for (int v = 0; v < V; ++v) acc[t][v] = ok[t] ? fmaf(go[v], xv[v], acc[t][v]) : acc[t][v];
      }
    }
  }

  // A fixed-shape tree over the lanes of each channel (the scalar form's when groups == 32).
  wgrad_vector_partials<V>(acc, red, th.groups, th.lanes, th.valid,
                           workspace + (static_cast<int64_t>(blockIdx.y) * OC + th.c) * kTaps);
}

// One output row's products of the weight gradient's strip kernel: acc[kh * 3 + kw] += go[q] * x(kh, q + kw), in
// the order kernel row, window column; a product with a tap outside x or an output outside grad_y adds nothing.
// kInside: the window and the run inside both (StripWindow::inside), or the kernel's exact walk (every product
// outside is a zero), no predicates. The window's top row is in slot kTop.
template <typename T, int V, int kCols, int kSlots, int R, bool kInside, int kTop>
__device__ __forceinline__ void wgrad_strip_products(const StripWindow<T, V, kCols, kSlots>& win,
                                                     const bool (&col_ok)[kCols], const bool (&q_ok)[R],
                                                     const float (&go)[R][V], float (&acc)[9][V]) {
#pragma unroll
  for (int kh = 0; kh < 3; ++kh)
#pragma unroll
    for (int col = 0; col < kCols; ++col) {
      const int r = win.template slot<kTop>(kh);
      float xv[V];
      VecIO<T, V>::decode(win.row[r][col], xv);
#pragma unroll
      for (int q = 0; q < R; ++q)
#pragma unroll
        for (int kw = 0; kw < 3; ++kw) {
          if (q + kw != col) continue;  // resolved at compile time
          const bool ok = kInside || (win.row_ok[r] && col_ok[col] && q_ok[q]);
#pragma unroll
          for (int v = 0; v < V; ++v) {
            acc[kh * 3 + kw][v] = ok ? fmaf(go[q][v], xv[v], acc[kh * 3 + kw][v]) : acc[kh * 3 + kw][v];
          }
        }
    }
}

// ---- weight gradient, pass 1, strip form (depthwise_wgrad_strips: the vector form's conditions at stride 1
// without dilation) ----
// The vector form's block shape (groups vectors of channels x lanes) and tree, but a lane takes items (a run of R
// pixels of one strip of grad_y's rows, as depthwise_strip_kernel's) instead of positions: per output row one
// vector of grad_y per pixel and one new row of x (R + 2 vectors, read through the prologue once each) where the
// vector form loads 9 x vectors per position and applies the prologue to each. The slices divide the items
// (depthwise_wgrad_strip_plan); each tap's products are summed in a fixed order. sm_90, bf16 with the prologue: ~200
// instructions per row of a run inside the image (the exact walk inside), against 334 for the one predicated walk
// with a sliding window it replaced; 128 registers, spills only between items.
template <typename T, typename idx_t, int V, int R, bool kCL>
__global__ void __launch_bounds__(kDepthwiseThreads, 2)
    depthwise_backward_weight_strip_kernel(const DepthwiseParams p, float* __restrict__ workspace, int64_t slices,
                                           int strip_rows) {
  constexpr int kTaps = 9, kCols = R + 2;
  using Raw = typename VecIO<T, V>::Raw;
  __shared__ float red[kTaps * V][kDepthwiseThreads];
  const Conv2dGeometry& g = p.g;
  const idx_t H = g.in_h, W = g.in_w, OC = g.dw_channels(), OH = g.out_h, OW = g.out_w;
  const idx_t pt = g.pad_top, pl_ = g.pad_left;
  const T* __restrict__ x = static_cast<const T*>(p.input.data);
  const T* __restrict__ gy = static_cast<const T*>(p.output.data);
  const idx_t xs_n = p.input.stride[0], xs_c = p.input.stride[1], xs_h = p.input.stride[2];
  const idx_t ys_n = p.output.stride[0], ys_c = p.output.stride[1], ys_h = p.output.stride[2];
  const idx_t xs_w = p.input.stride[3], ys_w = p.output.stride[3];
  const WgradVectorThread<idx_t, V, kCL> th(p);
  const bool prologue = p.prologue.active();  // x read through relu?(x * scale + shift)
  float acc[kTaps][V];
  const idx_t runs_w = (OW + R - 1) / R, strips = (OH + strip_rows - 1) / strip_rows;
  const idx_t items = static_cast<idx_t>(g.batch) * strips * runs_w;
  const idx_t chunk = static_cast<idx_t>((static_cast<int64_t>(items) + slices - 1) / slices);
  const idx_t begin = static_cast<idx_t>(blockIdx.y) * chunk;
  const idx_t end = begin + chunk < items ? begin + chunk : items;
  // One item's products added to acc, in one of three walks down its rows (as depthwise_strip_kernel's):
  //   kExact: without a predicate per product, a product outside x or grad_y being a zero (the loads there are
  //           zeros); exact when every value it multiplies by such a zero is finite, which the caller checks after;
  //   kIn:    (with kExact) the run inside both: loads without a predicate per column;
  //   neither: predicated products outside the image's interior.
  // x's rows sit in a 6-slot ring (the window, and two rows in flight), grad_y's runs in a 3-slot one: the walk is
  // unrolled by 6 and moves no register. Output row o's products wait on the loads of row o + 1's x row and grad_y
  // run, requested one row earlier, and row o + 2's are requested before them: two rows in flight per thread. A
  // lane walks only a few rows (~4 per strip at 19^2), so with one in flight each row waited a full memory latency
  // (53 us against cuDNN's 23 at 728 @19^2 on the H100, session 10).
  auto walk_item = [&](idx_t item, auto exact, auto inside_run) {
    constexpr bool kExact = decltype(exact)::value, kIn = decltype(inside_run)::value;
    static_assert(kExact || !kIn, "the run's walk inside takes the exact products");
    const idx_t rest = item / runs_w, ow0 = (item - rest * runs_w) * R, strip = rest % strips, n = rest / strips;
    const idx_t o0 = strip * strip_rows, o_end = o0 + strip_rows < OH ? o0 + strip_rows : OH;
    bool col_ok[kCols], q_ok[R];
#pragma unroll
    for (int col = 0; col < kCols; ++col) col_ok[col] = kIn || in_range<idx_t>(ow0 - pl_ + col, W);
#pragma unroll
    for (int q = 0; q < R; ++q) q_ok[q] = kIn || ow0 + q < OW;
    // Every window column inside x and every output column inside grad_y.
    const bool cols_in = kIn || (ow0 - pl_ >= 0 && ow0 - pl_ + kCols <= W && ow0 + R <= OW);
    const T* x_run = x + n * xs_n + th.c * xs_c + (ow0 - pl_) * xs_w;
    const T* gy_run = gy + n * ys_n + th.c * ys_c + ow0 * ys_w;
    StripWindow<T, V, kCols, 6> win;
    Raw go_raw[3][R];
    strip_load_row<T, V>(go_raw[0], true, q_ok, gy_run + o0 * ys_h, ys_w);
    {
      const idx_t ih = o0 + 1 - pt + 2;
      win.template load_next<0>(x_run + ih * xs_h, o0 + 1 < o_end && in_range<idx_t>(ih, H), col_ok, xs_w);
      strip_load_row<T, V>(go_raw[1], o0 + 1 < o_end, q_ok, gy_run + (o0 + 1) * ys_h, ys_w);
    }
    win.fill(x_run, o0 - pt, H, xs_h, xs_w, col_ok, prologue, th.scale, th.shift, p.prologue.relu);
    // Output row o with the window's top row in slot kTop = (o - o0) % 6 and its grad_y run in slot kTop % 3.
    auto output_row = [&](auto top, idx_t o) {
      constexpr int kTop = decltype(top)::value;
      const bool more2 = o + 2 < o_end;
      const idx_t ih2 = o + 2 - pt + 2;
      win.template load_next<kTop, 2>(x_run + ih2 * xs_h, more2 && in_range<idx_t>(ih2, H), col_ok, xs_w);
      strip_load_row<T, V>(go_raw[(kTop + 2) % 3], more2, q_ok, gy_run + (o + 2) * ys_h, ys_w);
      if (prologue && (kTop > 0 || o > o0)) {
        win.template prologue_last<kTop>(col_ok, cols_in, th.scale, th.shift, p.prologue.relu);
      }
      float go[R][V];
#pragma unroll
      for (int q = 0; q < R; ++q) VecIO<T, V>::decode(go_raw[kTop % 3][q], go[q]);
      if (kExact || win.template inside<kTop>(cols_in)) {
        wgrad_strip_products<T, V, kCols, 6, R, true, kTop>(win, col_ok, q_ok, go, acc);
      } else {
        wgrad_strip_products<T, V, kCols, 6, R, false, kTop>(win, col_ok, q_ok, go, acc);
      }
    };
    walk_ring_rows<6>(o0, o_end, output_row);  // o0 < o_end: a strip has a row
  };
  auto zero_acc = [&]() {
#pragma unroll
    for (int t = 0; t < kTaps; ++t)
#pragma unroll
      for (int v = 0; v < V; ++v) acc[t][v] = 0.f;
  };
  zero_acc();
  if (th.valid) {
    for (idx_t item = begin + th.lane; item < end; item += th.lanes) {
      // walk_item's cols_in. (Through one shared lambda, ptxas laid out the border walk ~25% longer per row.)
      const idx_t ow0 = (item % runs_w) * R;
      if (ow0 - pl_ >= 0 && ow0 - pl_ + kCols <= W && ow0 + R <= OW) {
        walk_item(item, std::true_type{}, std::true_type{});
      } else {
        walk_item(item, std::true_type{}, std::false_type{});
      }
    }
    // The exact walks' sums are the predicated ones' bits when every value multiplied by a zero outside was finite
    // (0 * v is then a zero, and adding a zero leaves a sum, which is never -0, as it is). A non-finite one, an inf
    // or NaN in x or grad_y, makes a non-finite sum (0 * inf is NaN), and the predicated walks redo the thread's
    // items: the scalar form's answer, where a product outside adds nothing.
    if (!all_finite<V>(acc)) {
      zero_acc();
      for (idx_t item = begin + th.lane; item < end; item += th.lanes) {
        walk_item(item, std::false_type{}, std::false_type{});
      }
    }
  }

  wgrad_vector_partials<V>(acc, red, th.groups, th.lanes, th.valid,
                           workspace + (static_cast<int64_t>(blockIdx.y) * OC + th.c) * kTaps);
}

// ---- weight gradient, pass 2: sum the slices of each (channel, tap) in a fixed order ----
// 32 outputs per block on threadIdx % 32; 8 lanes each sum the slices s = lane, lane + 8, ... in order, then
// a fixed tree over the 8 lanes.
template <typename T>
__global__ void __launch_bounds__(kDepthwiseThreads)
    depthwise_backward_weight_reduce_kernel(const DepthwiseParams p, const float* __restrict__ workspace,
                                            int64_t slices) {
  constexpr int kOutputs = 32;
  constexpr int kLanes = kDepthwiseThreads / kOutputs;
  __shared__ float red[kLanes][kOutputs];
  const Conv2dGeometry& g = p.g;
  const int64_t taps = g.kernel_h * g.kernel_w;
  const int64_t total = g.dw_channels() * taps;
  const int o = threadIdx.x % kOutputs;
  const int lane = threadIdx.x / kOutputs;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kOutputs + o;
  float acc = 0.f;
  if (i < total) {
    for (int64_t s = lane; s < slices; s += kLanes) acc += workspace[s * total + i];
  }
  red[lane][o] = acc;
  __syncthreads();
  for (int s = kLanes / 2; s > 0; s >>= 1) {
    if (lane < s) red[lane][o] += red[lane + s][o];
    __syncthreads();
  }
  if (lane == 0 && i < total) {
    const int64_t oc = i / taps, tap = i % taps;
    const int64_t kh = tap / g.kernel_w, kw = tap % g.kernel_w;
    T* gw = static_cast<T*>(p.weight.data);
    Elem<T>::store(gw + oc * p.weight.stride[0] + kh * p.weight.stride[2] + kw * p.weight.stride[3], red[0][o]);
  }
}

}  // namespace kernels
}  // namespace xception_ops
