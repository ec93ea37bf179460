// The max-pooling kernels (csrc/kernels/pool.cuh) run on the CPU through cuda_emulation.h, against scalar loops
// with PyTorch's rules: the first maximum of a window in (ky, kx) order, the last NaN where there is one, the
// first tap inside the image when every value is -inf; the backward adds a window's gradient to its argmax in
// float32, windows in (oh, ow) order, rounded once.
//
// The inputs take few distinct values (ties in most windows), with NaN and -inf sprinkled in; outputs and codes are
// poisoned before each launch. Every dtype, both thread orders, the vector and scalar widths, both index types, and
// geometries with padding, ceil mode, unequal kernels and strides.
#include "cuda_emulation.h"  // first: defines what the kernel headers expect from CUDA

#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "kernels/pool.cuh"
#include "kernels/pool_params.h"
#include "test_harness.h"

namespace {

using namespace xception_ops;

template <typename T>
using Bits = typename kernels::PoolElem<T>::Bits;

template <typename T>
float value(Bits<T> b) {
  return kernels::PoolElem<T>::value(b);
}
// v rounded to T by the CUDA headers' own conversions (not the kernel's), as raw bits.
template <typename T>
Bits<T> bits_of(float v) {
  Bits<T> b;
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(&b, &v, sizeof b);
  } else if constexpr (std::is_same_v<T, __half>) {
    const __half h = __float2half_rn(v);
    std::memcpy(&b, &h, sizeof b);
  } else {
    const __nv_bfloat16 h = __float2bfloat16_rn(v);
    std::memcpy(&b, &h, sizeof b);
  }
  return b;
}

template <typename T>
constexpr DType dtype_of() {
  return sizeof(T) == 4 ? DType::Float32 : (std::is_same_v<T, __half> ? DType::Float16 : DType::BFloat16);
}

struct Geometry {
  int64_t n, c, h, w, kh, kw, sh, sw, ph, pw;
  bool ceil_mode;
};

Pool2dGeometry make(const Geometry& k) {
  Pool2dGeometry g;
  g.batch = k.n, g.channels = k.c, g.in_h = k.h, g.in_w = k.w;
  g.kernel_h = k.kh, g.kernel_w = k.kw, g.stride_h = k.sh, g.stride_w = k.sw, g.pad_h = k.ph, g.pad_w = k.pw;
  g.ceil_mode = k.ceil_mode;
  g.out_h = pool_out_size(k.h, k.kh, k.sh, k.ph, k.ceil_mode);
  g.out_w = pool_out_size(k.w, k.kw, k.sw, k.pw, k.ceil_mode);
  return g;
}

// Element strides of a dense (n, c, h, w) tensor in either layout, in (N, C, H, W) order.
DepthwiseTensor dense(void* data, int64_t c, int64_t h, int64_t w, bool channels_last) {
  DepthwiseTensor t;
  t.data = data;
  if (channels_last) {
    t.stride[0] = h * w * c, t.stride[1] = 1, t.stride[2] = w * c, t.stride[3] = c;
  } else {
    t.stride[0] = c * h * w, t.stride[1] = h * w, t.stride[2] = w, t.stride[3] = 1;
  }
  return t;
}

int64_t at(const DepthwiseTensor& t, int64_t n, int64_t c, int64_t h, int64_t w) {
  return n * t.stride[0] + c * t.stride[1] + h * t.stride[2] + w * t.stride[3];
}

template <typename T, typename I, int V>
void launch_forward(const MaxPoolParams& p, unsigned blocks) {  // the launcher's choice of build
  if (p.scale != nullptr || p.residual.data != nullptr) {
    emulate_launch(kernels::max_pool2d_forward_kernel<T, I, V, true>, dim3(blocks), dim3(64), p);
  } else {
    emulate_launch(kernels::max_pool2d_forward_kernel<T, I, V, false>, dim3(blocks), dim3(64), p);
  }
}
template <typename T, typename I, int V>
void launch_backward(const MaxPoolParams& p, unsigned blocks) {
  emulate_launch(kernels::max_pool2d_backward_kernel<T, I, V>, dim3(blocks), dim3(64), p);
}
template <typename T, typename I, int V>
void launch_backward_bn(const MaxPoolParams& p) {  // one block per tile, the launcher's block size
  emulate_launch(kernels::max_pool2d_backward_bn_kernel<T, I, V>, dim3(static_cast<unsigned>(max_pool_bn_tiles(p))),
                 dim3(kMaxPoolThreads), p);
}

// One geometry, dtype, layout, width and index type: forward (with and without codes) and backward against the
// scalar loops, bit for bit. Returns the number of mismatches (and prints the first).
template <typename T, typename I, int V>
// extras: bit 1 a pending BatchNorm (scale and shift per channel, some scales negative), bit 2 a residual added to
// the output.
int check(const Geometry& k, bool channels_last, std::mt19937& rng, bool all_minus_inf = false, int extras = 0) {
  const bool affine = extras & 1, add = extras & 2;
  const Pool2dGeometry g = make(k);
  const int64_t in_numel = g.batch * g.channels * g.in_h * g.in_w;
  const int64_t out_numel = g.batch * g.channels * g.out_h * g.out_w;
  std::vector<Bits<T>> x(in_numel), out(out_numel), grad_out(out_numel), grad_x(in_numel);
  std::vector<uint8_t> codes(out_numel);
  // Few distinct values: ties in most windows. Then some NaN and -inf.
  std::uniform_int_distribution<int> small(-3, 3), pick(0, 99);
  std::normal_distribution<float> normal;
  const float inf = std::numeric_limits<float>::infinity();
  for (auto& v : x) {
    const int r = pick(rng);
    v = bits_of<T>(r < 2 ? std::numeric_limits<float>::quiet_NaN() : r < 6 ? -inf : static_cast<float>(small(rng)));
    if (all_minus_inf) v = bits_of<T>(-inf);  // every window keeps its first tap inside the image
  }
  for (auto& v : grad_out) v = bits_of<T>(normal(rng));
  std::vector<float> scale(g.channels), shift(g.channels);
  std::vector<Bits<T>> residual(out_numel);
  for (int64_t c = 0; c < g.channels; ++c) {
    scale[c] = (pick(rng) < 30 ? -1.f : 1.f) * (0.25f + std::fabs(normal(rng)));
    shift[c] = normal(rng);
  }
  for (auto& v : residual) v = bits_of<T>(normal(rng));

  MaxPoolParams p;
  p.g = g;
  p.channels_last = channels_last;
  p.input = dense(x.data(), g.channels, g.in_h, g.in_w, channels_last);
  p.output = dense(out.data(), g.channels, g.out_h, g.out_w, channels_last);
  p.argmax = dense(codes.data(), g.channels, g.out_h, g.out_w, channels_last);
  if (affine) {
    p.scale = scale.data();
    p.shift = shift.data();
  }
  if (add) p.residual = dense(residual.data(), g.channels, g.out_h, g.out_w, channels_last);
  const int width = max_pool_vector_width(p, dtype_of<T>());
  if (width != V) {
    std::printf("  the launcher would take width %d here, the case asks for %d\n", width, V);
    return 1;
  }
  const unsigned blocks = 3;  // fewer threads than items: the grid-stride loops wrap

  int bad = 0;
  auto mismatch = [&](const char* what, int64_t i, double got, double want) {
    if (bad++ == 0) std::printf("  %s[%lld]: got %g, want %g\n", what, static_cast<long long>(i), got, want);
  };

  // The scalar forward: maximum bits and code per output.
  std::vector<Bits<T>> want_out(out_numel);
  std::vector<uint8_t> want_code(out_numel);
  for (int64_t n = 0; n < g.batch; ++n)
    for (int64_t c = 0; c < g.channels; ++c)
      for (int64_t oh = 0; oh < g.out_h; ++oh)
        for (int64_t ow = 0; ow < g.out_w; ++ow) {
          const int64_t h0 = oh * g.stride_h - g.pad_h, w0 = ow * g.stride_w - g.pad_w;
          float best = -inf;
          Bits<T> kept = kernels::PoolElem<T>::kNegInf;
          int code = -1;
          for (int64_t ky = 0; ky < g.kernel_h; ++ky)
            for (int64_t kx = 0; kx < g.kernel_w; ++kx) {
              const int64_t ih = h0 + ky, iw = w0 + kx;
              if (ih < 0 || ih >= g.in_h || iw < 0 || iw >= g.in_w) continue;
              if (code < 0) code = static_cast<int>(ky * g.kernel_w + kx);
              Bits<T> b = x[at(p.input, n, c, ih, iw)];
              if (affine) b = bits_of<T>(std::fma(value<T>(b), scale[c], shift[c]));  // scale_shift's rounding
              const float f = value<T>(b);
              if (f > best || std::isnan(f)) best = f, kept = b, code = static_cast<int>(ky * g.kernel_w + kx);
            }
          const int64_t o = at(p.output, n, c, oh, ow);
          want_out[o] = add ? bits_of<T>(value<T>(kept) + value<T>(residual[o])) : kept;
          want_code[o] = static_cast<uint8_t>(code);
        }

  for (const bool with_codes : {false, true}) {
    std::fill(out.begin(), out.end(), bits_of<T>(std::numeric_limits<float>::quiet_NaN()));
    std::fill(codes.begin(), codes.end(), uint8_t{0xee});
    MaxPoolParams q = p;
    if (!with_codes) q.argmax.data = nullptr;
    launch_forward<T, I, V>(q, blocks);
    for (int64_t i = 0; i < out_numel; ++i) {
      const bool both_nan = std::isnan(value<T>(out[i])) && std::isnan(value<T>(want_out[i]));  // (payloads)
      if (out[i] != want_out[i] && !both_nan) mismatch("out", i, value<T>(out[i]), value<T>(want_out[i]));
      if (with_codes ? codes[i] != want_code[i] : codes[i] != 0xee) mismatch("code", i, codes[i], want_code[i]);
    }
  }

  // The scalar backward: scatter in (oh, ow) order, float32, rounded once.
  std::vector<float> acc(in_numel, 0.f);
  for (int64_t n = 0; n < g.batch; ++n)
    for (int64_t c = 0; c < g.channels; ++c)
      for (int64_t oh = 0; oh < g.out_h; ++oh)
        for (int64_t ow = 0; ow < g.out_w; ++ow) {
          const int64_t o = at(p.output, n, c, oh, ow);
          const int64_t ih = oh * g.stride_h - g.pad_h + want_code[o] / g.kernel_w;
          const int64_t iw = ow * g.stride_w - g.pad_w + want_code[o] % g.kernel_w;
          acc[at(p.input, n, c, ih, iw)] += value<T>(grad_out[o]);
        }
  std::fill(grad_x.begin(), grad_x.end(), bits_of<T>(std::numeric_limits<float>::quiet_NaN()));
  MaxPoolParams b = p;
  b.input.data = grad_x.data();
  b.output.data = grad_out.data();
  launch_backward<T, I, V>(b, blocks);
  for (int64_t i = 0; i < in_numel; ++i) {
    if (grad_x[i] != bits_of<T>(acc[i])) mismatch("grad_x", i, value<T>(grad_x[i]), acc[i]);
  }

  // Through the pending BatchNorm: the pool's gradient g as stored above, then scale_shift's backward: grad_x =
  // round(g * scale) bit for bit, and the per-channel sums of g * x and g (float32 in the kernel's fixed order,
  // here in float64) from the partial rows. x finite here (the sums of a NaN are NaN either way). Tiles of 8
  // positions (many tiles, row groups of one row) and of 64.
  if (affine) {
    std::vector<Bits<T>> x2(in_numel), grad_xb(in_numel);
    for (auto& v : x2) v = bits_of<T>(normal(rng));
    std::vector<double> want_gx_sum(g.channels, 0.0), want_g_sum(g.channels, 0.0);
    MaxPoolParams bb = b;
    bb.bn_input = dense(x2.data(), g.channels, g.in_h, g.in_w, channels_last);
    bb.scale = scale.data();
    bb.input.data = grad_xb.data();
    for (int64_t n = 0; n < g.batch; ++n)
      for (int64_t c = 0; c < g.channels; ++c)
        for (int64_t h = 0; h < g.in_h; ++h)
          for (int64_t w = 0; w < g.in_w; ++w) {
            const int64_t i = at(p.input, n, c, h, w);
            const float gv = value<T>(bits_of<T>(acc[i]));
            want_gx_sum[c] += static_cast<double>(gv) * value<T>(x2[i]);
            want_g_sum[c] += gv;
          }
    for (const int tile : {8, 64}) {
      bb.tile_positions = tile;
      const int64_t tiles = max_pool_bn_tiles(bb);
      std::vector<float> partial(tiles * 2 * g.channels, std::numeric_limits<float>::quiet_NaN());
      bb.partial = partial.data();
      std::fill(grad_xb.begin(), grad_xb.end(), bits_of<T>(std::numeric_limits<float>::quiet_NaN()));
      launch_backward_bn<T, I, V>(bb);
      for (int64_t n = 0; n < g.batch; ++n)
        for (int64_t c = 0; c < g.channels; ++c)
          for (int64_t h = 0; h < g.in_h; ++h)
            for (int64_t w = 0; w < g.in_w; ++w) {
              const int64_t i = at(p.input, n, c, h, w);
              const Bits<T> want = bits_of<T>(value<T>(bits_of<T>(acc[i])) * scale[c]);
              if (grad_xb[i] != want) mismatch("grad_x through the BatchNorm", i, value<T>(grad_xb[i]), value<T>(want));
            }
      for (int64_t c = 0; c < g.channels; ++c) {
        double sum_gx = 0, sum_g = 0;
        for (int64_t t = 0; t < tiles; ++t) {
          sum_gx += partial[t * 2 * g.channels + c];
          sum_g += partial[t * 2 * g.channels + g.channels + c];
        }
        const double tol_gx = 1e-5 * (1 + std::fabs(want_gx_sum[c])), tol_g = 1e-5 * (1 + std::fabs(want_g_sum[c]));
        if (!(std::fabs(sum_gx - want_gx_sum[c]) <= tol_gx)) mismatch("sum of g x", c, sum_gx, want_gx_sum[c]);
        if (!(std::fabs(sum_g - want_g_sum[c]) <= tol_g)) mismatch("sum of g", c, sum_g, want_g_sum[c]);
      }
    }
  }
  return bad;
}

// Geometries: Xception's 3x3 / 2 with "same" padding (symmetric at odd sizes, ceil mode at even ones), and
// others PyTorch allows.
const Geometry kGeometries[] = {
    {2, 8, 7, 9, 3, 3, 2, 2, 1, 1, false},  // "same" at odd sizes
    {1, 8, 8, 6, 3, 3, 2, 2, 0, 0, true},   // "same" at even sizes: the extra row as ceil mode's last window
    {2, 16, 5, 5, 2, 2, 2, 2, 0, 0, false},
    {1, 8, 6, 7, 3, 3, 1, 1, 1, 1, false},
    {1, 8, 9, 8, 5, 3, 3, 2, 2, 1, true},
    {1, 8, 4, 4, 1, 1, 1, 1, 0, 0, false},
    {2, 8, 3, 11, 3, 2, 2, 1, 1, 1, true},
    {1, 8, 2, 5, 3, 3, 2, 2, 0, 0, true},   // ceil mode: a 2-row input, one window of 3 rows starting inside it
};

template <typename T>
void every_geometry(int vec_width) {
  std::mt19937 rng(1234);
  int bad = 0;
  for (const Geometry& k : kGeometries) {
    for (const bool channels_last : {false, true}) {
      bad += check<T, int32_t, 1>(Geometry{k.n, k.c + 1, k.h, k.w, k.kh, k.kw, k.sh, k.sw, k.ph, k.pw, k.ceil_mode},
                                  channels_last, rng);  // odd channels: scalar either way
      bad += check<T, int32_t, 1>(Geometry{k.n, k.c + 1, k.h, k.w, k.kh, k.kw, k.sh, k.sw, k.ph, k.pw, k.ceil_mode},
                                  channels_last, rng, false, 1 + (channels_last ? 2 : 0));
      if (!channels_last) {
        bad += check<T, int64_t, 1>(k, false, rng);
        bad += check<T, int32_t, 1>(k, false, rng, true);
        bad += check<T, int32_t, 1>(k, false, rng, false, 1);
        bad += check<T, int64_t, 1>(k, false, rng, false, 2);
        continue;
      }
      if (vec_width == 8) {
        bad += check<T, int32_t, 8>(k, true, rng, true);
        bad += check<T, int32_t, 8>(k, true, rng);
        bad += check<T, int64_t, 8>(k, true, rng);
        bad += check<T, int32_t, 8>(k, true, rng, false, 1);
        bad += check<T, int32_t, 8>(k, true, rng, false, 2);
        bad += check<T, int64_t, 8>(k, true, rng, false, 3);
      } else {
        bad += check<T, int32_t, 4>(k, true, rng, true);
        bad += check<T, int32_t, 4>(k, true, rng);
        bad += check<T, int64_t, 4>(k, true, rng);
        bad += check<T, int32_t, 4>(k, true, rng, false, 1);
        bad += check<T, int32_t, 4>(k, true, rng, false, 2);
        bad += check<T, int64_t, 4>(k, true, rng, false, 3);
      }
    }
  }
  EXPECT(bad == 0);
}

// Many channels, odd: one thread per channel and a block's 256 lanes across them, so that each thread's sums are its
// block's (no row groups), with more channels than lanes in the float32 vector case.
template <typename T>
void many_channels(int vec_width) {
  std::mt19937 rng(99);
  int bad = 0;
  bad += check<T, int32_t, 1>(Geometry{1, 261, 7, 6, 3, 3, 2, 2, 1, 1, false}, true, rng, false, 3);
  bad += check<T, int32_t, 1>(Geometry{1, 261, 7, 6, 3, 3, 2, 2, 1, 1, false}, false, rng, false, 1);
  if (vec_width == 8) bad += check<T, int32_t, 8>(Geometry{1, 2064, 5, 5, 3, 3, 2, 2, 0, 0, true}, true, rng, false, 1);
  if (vec_width == 4) bad += check<T, int32_t, 4>(Geometry{1, 1032, 5, 5, 3, 3, 2, 2, 0, 0, true}, true, rng, false, 1);
  EXPECT(bad == 0);
}

TEST_CASE(max_pool_float32) { every_geometry<float>(4); }
TEST_CASE(max_pool_many_channels_float32) { many_channels<float>(4); }
TEST_CASE(max_pool_many_channels_bfloat16) { many_channels<__nv_bfloat16>(8); }
TEST_CASE(max_pool_float16) { every_geometry<__half>(8); }
TEST_CASE(max_pool_bfloat16) { every_geometry<__nv_bfloat16>(8); }

TEST_CASE(max_pool_output_sizes_follow_pytorch) {
  // torch.nn.functional.max_pool2d's sizes (checked there): floor and ceil mode, the ceil-mode window that would
  // start in the padding dropped.
  EXPECT(pool_out_size(147, 3, 2, 1, false) == 74);
  EXPECT(pool_out_size(148, 3, 2, 0, true) == 74);
  EXPECT(pool_out_size(148, 3, 2, 0, false) == 73);
  EXPECT(pool_out_size(5, 2, 2, 0, true) == 3);
  EXPECT(pool_out_size(5, 2, 2, 1, true) == 3);  // (5 + 2 - 2 + 1) / 2 + 1 = 4, whose window starts at 6 >= 5 + 1
  EXPECT(pool_out_size(2, 3, 1, 0, false) == 0);
  EXPECT(pool_out_size(1, 3, 2, 1, true) == 1);
  // ceil mode, an input shorter than the window that starts inside it: PyTorch's division rounds toward -infinity
  EXPECT(pool_out_size(2, 3, 2, 0, true) == 1);
  EXPECT(pool_out_size(2, 3, 1, 0, true) == 0);
  EXPECT(pool_out_size(2, 3, 2, 0, false) == 0);
  EXPECT(pool_out_size(1, 4, 3, 0, true) == 0);  // (1 - 4 + 2) / 3 rounds to -1
}

TEST_CASE(max_pool_vector_width_needs_aligned_unit_channel_strides) {
  alignas(16) static uint16_t buffer[64];
  MaxPoolParams p;
  p.g = make(Geometry{1, 16, 2, 2, 2, 2, 2, 2, 0, 0, false});
  p.channels_last = true;
  p.input = dense(buffer, 16, 2, 2, true);
  p.output = dense(buffer, 16, 1, 1, true);
  p.argmax = dense(buffer, 16, 1, 1, true);
  EXPECT(max_pool_vector_width(p, DType::BFloat16) == 8);
  EXPECT(max_pool_vector_width(p, DType::Float32) == 4);
  MaxPoolParams q = p;
  q.output.data = buffer + 1;  // 2 bytes off
  EXPECT(max_pool_vector_width(q, DType::BFloat16) == 1);
  q = p;
  q.argmax.data = reinterpret_cast<uint8_t*>(buffer) + 4;  // codes only need their width's alignment
  EXPECT(max_pool_vector_width(q, DType::Float32) == 4);
  EXPECT(max_pool_vector_width(q, DType::BFloat16) == 1);
  q = p;
  q.residual = dense(buffer + 1, 16, 1, 1, true);  // the residual is read by vectors too
  EXPECT(max_pool_vector_width(q, DType::BFloat16) == 1);
  q.residual.data = buffer + 8;
  EXPECT(max_pool_vector_width(q, DType::BFloat16) == 8);
  q = p;
  q.channels_last = false;
  EXPECT(max_pool_vector_width(q, DType::BFloat16) == 1);
  q = p;
  q.g.channels = 12;
  EXPECT(max_pool_vector_width(q, DType::BFloat16) == 1);
  EXPECT(max_pool_vector_width(q, DType::Float32) == 4);
  q = p;
  q.input.stride[1] = 2;
  EXPECT(max_pool_vector_width(q, DType::Float32) == 1);
  EXPECT(max_pool_fits_int32(p));
  q = p;
  q.g.batch = int64_t{1} << 28;
  q.input.stride[0] = int64_t{1} << 20;
  EXPECT(!max_pool_fits_int32(q));
}

}  // namespace

int main(int argc, char** argv) { return xo_test::run_all(argc > 1 ? argv[1] : nullptr); }
