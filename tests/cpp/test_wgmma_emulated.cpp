// Hopper's wgmma kernels on the CPU through cuda_emulation.h, whose wgmma follows the PTX ISA's fragment layouts
// and descriptor fields: the pointwise GEMM (csrc/kernels/pointwise_gemm.cuh) and the fused separable forward
// (csrc/kernels/separable_wgmma.cuh), against a float64 product rounded as their epilogue rounds (y to the dtype,
// then the affine, the residual, the ReLU); the fused one's depthwise result computed as the staged form computes it.
//
// Shapes with partial tiles in every dimension (pixels past a 128-row tile, output channels past a 128-channel
// tile, input channels past a 64-channel stage) and more stages than the ring holds; every epilogue option; both
// 16-bit dtypes; the output poisoned before each launch; the statistics against float64 sums of y, and bitwise
// equal across two launches. Also the descriptor's bit fields, and what the launcher checks.
#include "cuda_emulation.h"  // first: defines what the kernel headers expect from CUDA

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <utility>
#include <vector>

#include "kernels/pointwise_gemm.cuh"
#include "kernels/pointwise_gemm_params.h"
#include "kernels/separable_wgmma.cuh"
#include "test_harness.h"

namespace xception_ops::kernels {
alignas(128) unsigned char smem[256 * 1024];  // the kernel's `extern __shared__` array
}

namespace {

using namespace xception_ops;

template <typename T>
unsigned short bits_of(float v) {
  unsigned short b;
  if constexpr (std::is_same_v<T, __half>) {
    const __half h = __float2half_rn(v);
    std::memcpy(&b, &h, 2);
  } else {
    const __nv_bfloat16 h = __float2bfloat16_rn(v);
    std::memcpy(&b, &h, 2);
  }
  return b;
}
template <typename T>
float value_of(unsigned short b) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(__ushort_as_half(b));
  } else {
    return __uint_as_float(static_cast<unsigned>(b) << 16);
  }
}
template <typename T>
float round_as(float v) {
  return value_of<T>(bits_of<T>(v));
}

struct Case {
  int64_t m;
  int32_t n, k;
  int64_t lda;  // >= k
  bool scale, shift, residual, relu, stats;
};

// 16-byte aligned storage of 16-bit values.
struct Buffer {
  std::vector<uint4> storage;
  explicit Buffer(size_t elements) : storage((elements + 7) / 8 + 1) {}
  unsigned short* data() { return reinterpret_cast<unsigned short*>(storage.data()); }
};

// The statistics' partial rows (row r: the sums of y, then of y^2, over pixel tile r) against float64 sums of the
// reference's y: within one unit in y's last place per term. Returns the channels out of tolerance.
int check_statistics(const std::vector<float>& partial, int64_t tiles, int32_t n, const std::vector<double>& sum,
                     const std::vector<double>& sumsq, const std::vector<double>& abs_sum, double ulp) {
  int bad = 0;
  for (int32_t j = 0; j < n; ++j) {
    double s = 0.0, ss = 0.0;
    for (int64_t r = 0; r < tiles; ++r) s += partial[r * 2 * n + j], ss += partial[r * 2 * n + n + j];
    const bool ok =
        std::fabs(s - sum[j]) <= ulp * abs_sum[j] + 1e-4 && std::fabs(ss - sumsq[j]) <= 2 * ulp * sumsq[j] + 1e-4;
    if (!ok && bad++ < 5) std::printf("  channel %d: sums %g %g, want %g %g\n", j, s, ss, sum[j], sumsq[j]);
  }
  return bad;
}

template <typename T, int kConfig>
void run_case(const Case& c, uint32_t seed) {
  constexpr PointwiseGemmConfig config = kPointwiseConfigs[kConfig];
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> uni(-1.f, 1.f);
  Buffer a(c.m * c.lda), w(static_cast<size_t>(c.n) * c.k), res(c.m * c.n), out(c.m * c.n);
  for (int64_t i = 0; i < c.m * c.lda; ++i) a.data()[i] = bits_of<T>(uni(rng));
  for (int64_t i = 0; i < int64_t{c.n} * c.k; ++i) w.data()[i] = bits_of<T>(uni(rng) * 0.5f);
  for (int64_t i = 0; i < c.m * c.n; ++i) res.data()[i] = bits_of<T>(uni(rng));
  std::vector<float> scale(c.n), shift(c.n);
  for (int32_t i = 0; i < c.n; ++i) scale[i] = 0.5f + uni(rng), shift[i] = uni(rng);

  PointwiseGemmParams p;
  p.a = a.data(), p.w = w.data(), p.out = out.data();
  p.residual = c.residual ? res.data() : nullptr;
  p.scale = c.scale ? scale.data() : nullptr;
  p.shift = c.shift ? shift.data() : nullptr;
  p.relu = c.relu;
  p.m = c.m, p.lda = c.lda, p.n = c.n, p.k = c.k;
  const int64_t m_tiles = pointwise_m_tiles(p), n_tiles = pointwise_n_tiles(p, config.n);
  std::vector<float> partial(c.stats ? m_tiles * 2 * c.n : 0);
  p.stats_partial = c.stats ? partial.data() : nullptr;
  EXPECT(pointwise_gemm_ok(p));

  auto launch = [&] {
    std::fill(out.data(), out.data() + c.m * c.n, static_cast<unsigned short>(0x7fc1));  // NaN poison
    std::fill(partial.begin(), partial.end(), std::nanf(""));
    kernels::xo_emulated_smem_base = kernels::smem;
    emulate_launch(kernels::pointwise_wgmma_kernel<T, config.n, config.stages, config.in_flight,
                                                   pointwise_min_blocks(config)>,
                   dim3(static_cast<unsigned>(m_tiles * n_tiles)), dim3(kPwThreads), p);
    EXPECT(kernels::emulated_wgmma_races.exchange(0) == 0);  // no operand written while a product reads it
  };
  launch();

  // The reference: y = the float64 product rounded to T; then the epilogue's steps, each rounded to T.
  int bad = 0;
  std::vector<double> sum(c.n, 0.0), sumsq(c.n, 0.0), abs_sum(c.n, 0.0);
  for (int64_t i = 0; i < c.m; ++i) {
    for (int32_t j = 0; j < c.n; ++j) {
      double acc = 0.0;
      for (int32_t q = 0; q < c.k; ++q) {
        acc += double(value_of<T>(a.data()[i * c.lda + q])) * value_of<T>(w.data()[int64_t{j} * c.k + q]);
      }
      const float y = round_as<T>(static_cast<float>(acc));
      sum[j] += y, sumsq[j] += double(y) * y, abs_sum[j] += std::fabs(y);
      float z = y;
      const float scale_j = c.scale ? scale[j] : 1.f;
      if (c.scale || c.shift) z = round_as<T>(std::fma(z, scale_j, c.shift ? shift[j] : 0.f));
      const float affine = z;
      if (c.residual) z = round_as<T>(z + value_of<T>(res.data()[i * c.n + j]));
      if (c.relu) z = std::fmax(z, 0.f);
      const float got = value_of<T>(out.data()[i * c.n + j]);
      // The kernel's float32 sum may round y to the neighbouring value: one unit in y's last place, scaled, which
      // may move each later rounding by one unit in the last place of its own result (the affine result can be far
      // larger than z, which the residual then cancels).
      const float ulp = std::is_same_v<T, __half> ? 1.f / 1024 : 1.f / 128;
      const float tol = ulp * (std::fabs(y * scale_j) + std::fabs(affine) + std::fabs(z) + 1e-3f) + 1e-6f;
      if (!(std::fabs(got - z) <= tol)) {
        if (bad++ < 5) {
          std::printf("  config %dx%dx%d: out[%lld][%d] = %g, want %g (y %g)\n", config.n, config.stages,
                      config.in_flight, (long long)i, j, got, z, y);
        }
      }
    }
  }
  EXPECT(bad == 0);

  if (c.stats) {
    const double ulp = std::is_same_v<T, __half> ? 1.0 / 1024 : 1.0 / 128;
    EXPECT(check_statistics(partial, m_tiles, c.n, sum, sumsq, abs_sum, ulp) == 0);
    // Bitwise reproducible: a second launch gives the same partials and output.
    const std::vector<float> first = partial;
    std::vector<unsigned short> first_out(out.data(), out.data() + c.m * c.n);
    launch();
    EXPECT(std::memcmp(first.data(), partial.data(), first.size() * sizeof(float)) == 0);
    EXPECT(std::memcmp(first_out.data(), out.data(), first_out.size() * 2) == 0);
  }
}

// Pixels past one tile (300 = 2 x 128 + 44); output channels past one tile (136 = 128 + 8 for the 128-channel
// builds; 264 past 256); input channels past one stage (72 = 64 + 8) and past the ring (200 and 328: four and six
// stages in rings of three and four).
const Case kCases[] = {
    {300, 136, 72, 72, false, false, false, false, false},
    {300, 136, 72, 80, true, true, true, true, true},
    {130, 8, 200, 200, false, true, false, true, true},
    {140, 264, 328, 328, true, true, true, true, true},
    {64, 256, 16, 16, true, false, true, false, true},
    {1, 128, 8, 8, true, true, false, false, true},
};

// Every case through every build of kPointwiseConfigs.
template <typename T, int... kConfigs>
void run_all_configs(uint32_t seed, std::integer_sequence<int, kConfigs...>) {
  for (const Case& c : kCases) {
    (run_case<T, kConfigs>(c, seed), ...);
    ++seed;
  }
}

TEST_CASE(pointwise_wgmma_bf16) {
  run_all_configs<__nv_bfloat16>(1, std::make_integer_sequence<int, kPointwiseConfigCount>{});
}

TEST_CASE(pointwise_wgmma_fp16) {
  run_all_configs<__half>(100, std::make_integer_sequence<int, kPointwiseConfigCount>{});
}

TEST_CASE(pointwise_configs_parse_and_fit) {
  PointwiseGemmConfig c;
  EXPECT(parse_pointwise_config("128x3x0", &c) && c.n == 128 && c.stages == 3 && c.in_flight == 0);
  EXPECT(parse_pointwise_config("256x4x1", &c) && c.n == 256 && c.stages == 4 && c.in_flight == 1);
  for (const char* bad :
       {"", "128", "128x3", "128x3x0x1", "128x3x2", "x3x0", "128xx0", "96x3x0", "128x3x0 ", "-1x3x0", "0128x3x0"}) {
    EXPECT(!parse_pointwise_config(bad, &c));
  }
  EXPECT(!parse_pointwise_config(nullptr, &c));
  char buf[32];
  for (const PointwiseGemmConfig& k : kPointwiseConfigs) {  // every build's name names it
    EXPECT(parse_pointwise_config(pointwise_config_name(k, buf), &c) && c.n == k.n && c.stages == k.stages &&
           c.in_flight == k.in_flight);
  }
  for (const PointwiseGemmConfig& k : kPointwiseConfigs) {
    EXPECT(pointwise_config_ok(k));
    EXPECT(pointwise_smem_bytes(k) + 1024 <= 228 * 1024);  // Hopper's shared memory per block
  }
  EXPECT(pointwise_min_blocks(kPointwiseConfigs[0]) == 2);  // the default: two blocks per SM
  for (const PointwiseGemmConfig& a : kPointwiseAutoCandidates) {  // "auto" picks only builds the launcher holds
    EXPECT(parse_pointwise_config(pointwise_config_name(a, buf), &c));
  }
}

// XCEPTION_OPS_WGMMA_CONFIG=auto on Xception's products (batch 32, 132 SMs: benchmarks/RESULTS.md, session 19).
TEST_CASE(pointwise_auto_config_follows_the_busiest_sm) {
  auto width = [](int64_t m, int32_t n, int sms) { return pick_pointwise_config(m, n, sms).n; };
  EXPECT(width(32 * 19 * 19, 728, 132) == 192);    // 3 tiles of 192 on the busiest SM, against 5 of 128, 3 of 256
  EXPECT(width(32 * 10 * 10, 1536, 132) == 128);   // 3 of 128 and 2 of 192 tie: the default
  EXPECT(width(32 * 19 * 19, 1024, 132) == 128);   // 192 wide would put 5 tiles on an SM
  EXPECT(width(32 * 37 * 37, 728, 132) == 128);    // 16 of 128 and 8 of 256 tie
  EXPECT(width(32 * 147 * 147, 128, 132) == 128);  // wider tiles would be half empty
  EXPECT(width(32 * 10 * 10, 2048, 132) == 128);
  EXPECT(width(1, 8, 132) == 128);                 // one tile: the narrowest
  EXPECT(width(32 * 19 * 19, 728, 0) == 128);      // no SM count (never from a device): every width ties on one SM
  EXPECT(width(32 * 19 * 19, 728, 128) == 192);
  EXPECT(width(32 * 19 * 19, 728, 300) == 128);    // 2 of 128 (256 channels) against 2 of 192 (384)
}

// ---- the fused forward (kernels/separable_wgmma.cuh) ----

struct FusedCase {
  int64_t n, h, w;
  int32_t k, c_out, pad_top, pad_bottom, pad_left, pad_right;
  int32_t mid;  // 0 none, 1 relu, 2 elu, 3 relu6, 4 hardswish
  bool prologue, scale, residual, relu, stats;
  int blocks;  // the persistent grid (fewer than the tiles: each block walks several)
  int mid_affine = 0;  // the mid affine's vectors given: 1 mid_scale, 2 mid_shift, 3 both
};

template <typename T, int kN, int kK>
void run_fused_case(const FusedCase& c, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> uni(-1.f, 1.f);
  const int64_t oh = c.h + c.pad_top + c.pad_bottom - 2, ow = c.w + c.pad_left + c.pad_right - 2;
  const int64_t pixels = c.n * oh * ow;
  Buffer x(c.n * c.h * c.w * c.k), dw(int64_t{c.k} * 9), pw(int64_t{c.c_out} * c.k), res(pixels * c.c_out),
      out(pixels * c.c_out);
  for (int64_t i = 0; i < c.n * c.h * c.w * c.k; ++i) x.data()[i] = bits_of<T>(uni(rng));
  for (int64_t i = 0; i < int64_t{c.k} * 9; ++i) dw.data()[i] = bits_of<T>(uni(rng) * 0.5f);
  for (int64_t i = 0; i < int64_t{c.c_out} * c.k; ++i) pw.data()[i] = bits_of<T>(uni(rng) * 0.5f);
  for (int64_t i = 0; i < pixels * c.c_out; ++i) res.data()[i] = bits_of<T>(uni(rng));
  std::vector<float> in_scale(c.k), in_shift(c.k), scale(c.c_out), shift(c.c_out);
  for (int32_t i = 0; i < c.k; ++i) in_scale[i] = 0.5f + uni(rng), in_shift[i] = 0.3f * uni(rng);
  for (int32_t i = 0; i < c.c_out; ++i) scale[i] = 0.5f + uni(rng), shift[i] = uni(rng);
  // The mid affine's K values, then NaN: a read past K would reach the output.
  std::vector<float> mid_scale(c.k + 8, std::nanf("")), mid_shift(c.k + 8, std::nanf(""));
  for (int32_t i = 0; i < c.k; ++i) mid_scale[i] = 1.5f + uni(rng), mid_shift[i] = 2.f * uni(rng);

  SeparableWgmmaParams p;
  p.x = x.data(), p.dw_weight = dw.data();
  p.in_scale = c.prologue ? in_scale.data() : nullptr;
  p.in_shift = c.prologue ? in_shift.data() : nullptr;
  p.in_relu = c.prologue;
  p.mid = c.mid;
  p.mid_scale = c.mid_affine & 1 ? mid_scale.data() : nullptr;
  p.mid_shift = c.mid_affine & 2 ? mid_shift.data() : nullptr;
  p.in_h = c.h, p.in_w = c.w, p.out_h = oh, p.out_w = ow, p.pad_top = c.pad_top, p.pad_left = c.pad_left;
  p.pw.w = pw.data(), p.pw.out = out.data();
  p.pw.residual = c.residual ? res.data() : nullptr;
  p.pw.scale = c.scale ? scale.data() : nullptr;
  p.pw.shift = c.scale ? shift.data() : nullptr;
  p.pw.relu = c.relu;
  p.pw.m = pixels, p.pw.n = c.c_out, p.pw.k = c.k;
  const int64_t tiles = pointwise_m_tiles(p.pw);
  std::vector<float> partial(c.stats ? tiles * 2 * c.c_out : 0);
  p.pw.stats_partial = c.stats ? partial.data() : nullptr;
  EXPECT(separable_wgmma_ok(p));
  std::fill(out.data(), out.data() + pixels * c.c_out, static_cast<unsigned short>(0x7fc1));
  std::fill(partial.begin(), partial.end(), std::nanf(""));
  kernels::xo_emulated_smem_base = kernels::smem;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(tiles, c.blocks));
  emulate_launch(kernels::separable_wgmma_kernel<T, kN, kK>, dim3(blocks), dim3(kPwThreads), p);
  EXPECT(kernels::emulated_wgmma_races.exchange(0) == 0);

  // The depthwise result as the staged form computes it: the prologue rounded, the taps in (ky, kx) order in
  // float32, rounded; the mid affine (fmaf, rounded) and activation, rounded. Then the product in float64 and the
  // epilogue's roundings.
  std::vector<float> mid(pixels * c.k);
  for (int64_t q = 0; q < pixels; ++q) {
    const int64_t b = q / (oh * ow), r = q / ow % oh, col = q % ow;
    for (int32_t ch = 0; ch < c.k; ++ch) {
      float sum = 0.f;
      for (int ky = 0; ky < 3; ++ky) {
        for (int kx = 0; kx < 3; ++kx) {
          const int64_t ih = r - c.pad_top + ky, iw = col - c.pad_left + kx;
          if (ih < 0 || ih >= c.h || iw < 0 || iw >= c.w) continue;
          float v = value_of<T>(x.data()[((b * c.h + ih) * c.w + iw) * c.k + ch]);
          if (c.prologue) v = round_as<T>(std::fmax(std::fma(v, in_scale[ch], in_shift[ch]), 0.f));
          sum = std::fma(v, value_of<T>(dw.data()[ch * 9 + 3 * ky + kx]), sum);
        }
      }
      float d = round_as<T>(sum);
      if (c.mid_affine != 0) {
        d = round_as<T>(std::fma(d, c.mid_affine & 1 ? mid_scale[ch] : 1.f, c.mid_affine & 2 ? mid_shift[ch] : 0.f));
      }
      if (c.mid == 1) d = std::fmax(d, 0.f);
      if (c.mid == 3) d = std::fmin(std::fmax(d, 0.f), 6.f);
      if (c.mid == 2 && !(d > 0.f)) d = round_as<T>(std::expm1(d));
      if (c.mid == 4) d = round_as<T>(d * std::fmin(std::fmax(d + 3.f, 0.f), 6.f) / 6.f);
      mid[q * c.k + ch] = d;
    }
  }
  int bad = 0;
  std::vector<double> sum(c.c_out, 0.0), sumsq(c.c_out, 0.0), abs_sum(c.c_out, 0.0);
  const float ulp = std::is_same_v<T, __half> ? 1.f / 1024 : 1.f / 128;
  for (int64_t q = 0; q < pixels; ++q) {
    for (int32_t j = 0; j < c.c_out; ++j) {
      double acc = 0.0;
      for (int32_t ch = 0; ch < c.k; ++ch) acc += double(mid[q * c.k + ch]) * value_of<T>(pw.data()[j * c.k + ch]);
      const float y = round_as<T>(static_cast<float>(acc));
      sum[j] += y, sumsq[j] += double(y) * y, abs_sum[j] += std::fabs(y);
      const float scale_j = c.scale ? scale[j] : 1.f;
      float z = c.scale ? round_as<T>(std::fma(y, scale_j, shift[j])) : y;
      const float affine = z;
      if (c.residual) z = round_as<T>(z + value_of<T>(res.data()[q * c.c_out + j]));
      if (c.relu) z = std::fmax(z, 0.f);
      const float got = value_of<T>(out.data()[q * c.c_out + j]);
      const float tol = ulp * (std::fabs(y * scale_j) + std::fabs(affine) + std::fabs(z) + 1e-3f) + 1e-6f;
      if (!(std::fabs(got - z) <= tol) && bad++ < 5) {
        std::printf("  fused %dx%d: out[%lld][%d] = %g, want %g\n", kN, kK, (long long)q, j, got, z);
      }
    }
  }
  EXPECT(bad == 0);
  if (c.stats) EXPECT(check_statistics(partial, tiles, c.c_out, sum, sumsq, abs_sum, ulp) == 0);
}

// One partial tile (70 pixels); several tiles per block of a 2-block grid (143 and 243 pixels); padding on one side
// only; K below a stage (24) and past 64 (72); output channels past 128 (136); every option; the mid affine (scale
// only, shift only, both: K of 24 and 72 leave channels past K in the build's tile) with relu6, relu, elu and
// hardswish.
const FusedCase kFusedCases[] = {
    {2, 5, 7, 24, 40, 1, 1, 1, 1, 0, false, false, false, false, false, 2},
    {1, 13, 11, 64, 128, 1, 1, 1, 1, 1, true, true, true, true, true, 1},
    {3, 9, 9, 72, 136, 0, 1, 1, 0, 2, true, false, true, false, true, 2},
    {1, 15, 17, 128, 256, 1, 1, 1, 1, 0, false, true, false, true, true, 2},
    {2, 5, 7, 24, 40, 1, 1, 1, 1, 3, true, true, false, false, true, 2, 3},
    {3, 9, 9, 72, 136, 0, 1, 1, 0, 1, false, false, true, true, true, 2, 2},
    {1, 13, 11, 64, 128, 1, 1, 1, 1, 2, true, true, true, true, false, 1, 1},
    {2, 6, 9, 16, 24, 1, 1, 1, 1, 3, false, false, false, false, false, 1, 0},
    {2, 5, 7, 24, 40, 1, 1, 1, 1, 4, true, false, false, false, true, 2, 3},
};

template <typename T>
void run_fused_cases(uint32_t seed) {
  for (const FusedCase& c : kFusedCases) {
    // The launcher's build: K up to 64 or 128, N up to 128 or 256.
    if (c.c_out <= 128) {
      c.k <= 64 ? run_fused_case<T, 128, 64>(c, seed) : run_fused_case<T, 128, 128>(c, seed);
    } else {
      c.k <= 64 ? run_fused_case<T, 256, 64>(c, seed) : run_fused_case<T, 256, 128>(c, seed);
    }
    ++seed;
  }
}

TEST_CASE(separable_wgmma_bf16) { run_fused_cases<__nv_bfloat16>(7); }

TEST_CASE(separable_wgmma_fp16) { run_fused_cases<__half>(70); }

TEST_CASE(separable_wgmma_builds_fit_hoppers_shared_memory) {
  // The largest build (its four per-channel vectors included) within the 227 KB a block may opt in to on Hopper.
  for (int n : {128, 256}) {
    for (int k : {64, 128}) EXPECT(separable_wgmma_smem_bytes(n, k) <= 227 * 1024);
  }
}

// ---- the pointwise weight's gradient (pointwise_wgrad_kernel) ----

struct WgradCase {
  int64_t pixels, ldg, lda;
  int32_t rows, cols;
  int sms;  // the plan's multiprocessors: few, so that the pixels split
};

template <typename T>
void run_wgrad_case(const WgradCase& c, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> uni(-1.f, 1.f);
  Buffer g(c.pixels * c.ldg), a(c.pixels * c.lda);
  for (int64_t i = 0; i < c.pixels * c.ldg; ++i) g.data()[i] = bits_of<T>(uni(rng));
  for (int64_t i = 0; i < c.pixels * c.lda; ++i) a.data()[i] = bits_of<T>(uni(rng));
  PointwiseWgradParams p;
  p.g = g.data(), p.a = a.data(), p.pixels = c.pixels, p.ldg = c.ldg, p.lda = c.lda, p.rows = c.rows, p.cols = c.cols;
  pointwise_wgrad_plan(p, c.sms);
  std::vector<float> partial(static_cast<size_t>(p.splits) * c.rows * c.cols);
  p.partial = partial.data();
  EXPECT(pointwise_wgrad_ok(p));
  const int64_t blocks = ((c.rows + kWgradTile - 1) / kWgradTile) * ((c.cols + kWgradTile - 1) / kWgradTile) * p.splits;
  auto launch = [&] {
    std::fill(partial.begin(), partial.end(), std::nanf(""));
    kernels::xo_emulated_smem_base = kernels::smem;
    emulate_launch(kernels::pointwise_wgrad_kernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(kPwThreads), p);
    EXPECT(kernels::emulated_wgmma_races.exchange(0) == 0);
  };
  launch();
  int bad = 0;
  for (int32_t r = 0; r < c.rows; ++r) {
    for (int32_t k = 0; k < c.cols; ++k) {
      double want = 0.0, scale = 0.0;
      for (int64_t q = 0; q < c.pixels; ++q) {
        const double v = double(value_of<T>(g.data()[q * c.ldg + r])) * value_of<T>(a.data()[q * c.lda + k]);
        want += v, scale += std::fabs(v);
      }
      float got = 0.f;
      for (int32_t s = 0; s < p.splits; ++s) got += partial[(static_cast<int64_t>(s) * c.rows + r) * c.cols + k];
      if (!(std::fabs(got - want) <= 1e-5 * scale + 1e-6) && bad++ < 5) {
        std::printf("  wgrad [%d][%d] = %g, want %g (splits %d)\n", r, k, got, want, p.splits);
      }
    }
  }
  EXPECT(bad == 0);
  const std::vector<float> first = partial;
  launch();
  EXPECT(std::memcmp(first.data(), partial.data(), first.size() * sizeof(float)) == 0);
}

// Pixels not a multiple of a stage, split across blocks; rows and columns past one tile; row strides wider
// than the rows; the smallest product.
const WgradCase kWgradCases[] = {
    {300, 136, 80, 136, 72, 3},
    {1000, 128, 256, 128, 256, 2},
    {65, 8, 8, 8, 8, 1},
    {2000, 64, 64, 64, 64, 8},  // eight splits, the last one partial
    {17920, 8, 8, 8, 8, 70},    // one tile on 70 SMs: 70 splits, past the 64 of one reduction level
};

// The plan's splits (session 19): about two blocks per SM, the count below or above that whose busiest SM sums the
// fewest stages; a block per SM at least where 64 splits would leave SMs idle.
TEST_CASE(pointwise_wgrad_plan_fills_the_sms) {
  auto splits = [](int64_t pixels, int32_t rows, int32_t cols, int sms) {
    PointwiseWgradParams p;
    p.pixels = pixels, p.rows = rows, p.cols = cols;
    pointwise_wgrad_plan(p, sms);
    EXPECT(p.split_pixels % kPwTileK == 0 && p.split_pixels * p.splits >= p.pixels &&
           p.split_pixels * (p.splits - 1) < p.pixels);  // every split holds pixels
    return p.splits;
  };
  EXPECT(splits(32 * 19 * 19, 728, 728, 132) == 7);     // 36 tiles: 252 blocks for 264 places (8 made 288)
  EXPECT(splits(32 * 19 * 19, 1024, 728, 132) == 5);    // 48 tiles: 240 blocks (6 made 288)
  EXPECT(splits(32 * 147 * 147, 128, 64, 132) == 132);  // one tile: a block per SM (64 left 68 SMs idle)
  EXPECT(splits(32 * 74 * 74, 256, 128, 132) == 66);    // two tiles: 132 blocks
  EXPECT(splits(32 * 10 * 10, 2048, 1536, 132) == 2);   // 192 tiles: 3 blocks of 25 stages beat 2 of 50
  EXPECT(splits(32 * 10 * 10, 1536, 1024, 132) == 2);   // 96 tiles: 2 blocks of 25 stages, 3 of 17 (51) with 3
  EXPECT(splits(2 * 19 * 19, 728, 728, 132) == 3);      // 12 stages: at least 4 per split
  EXPECT(splits(64, 8, 8, 0) == 1);                     // no SM count (never from a device)
}

TEST_CASE(pointwise_wgrad) {
  uint32_t seed = 11;
  for (const WgradCase& c : kWgradCases) {
    run_wgrad_case<__nv_bfloat16>(c, seed++);
    run_wgrad_case<__half>(c, seed++);
  }
}

TEST_CASE(wgmma_descriptor_fields) {
  // Start address, leading and stride byte offsets in 16-byte units at bits 0, 16 and 32; swizzle 0.
  const uint64_t d = kernels::wgmma_desc(0x12340, 128, 1024);
  EXPECT((d & 0x3FFF) == 0x1234);
  EXPECT(((d >> 16) & 0x3FFF) == 8);
  EXPECT(((d >> 32) & 0x3FFF) == 64);
  EXPECT((d >> 46) == 0);
  EXPECT(kernels::wgmma_desc(0x3FFF0, 16, 16) == (0x3FFFull | (1ull << 16) | (1ull << 32)));
}

TEST_CASE(pointwise_gemm_checks) {
  alignas(16) static unsigned short buf[64];
  PointwiseGemmParams p;
  p.a = buf, p.w = buf, p.out = buf;
  p.m = 4, p.n = 8, p.k = 8, p.lda = 8;
  EXPECT(pointwise_gemm_ok(p));
  PointwiseGemmParams q = p;
  q.n = 12;  // not whole vectors of 8 channels
  EXPECT(!pointwise_gemm_ok(q));
  q = p, q.k = 4;
  EXPECT(!pointwise_gemm_ok(q));
  q = p, q.lda = 12;
  EXPECT(!pointwise_gemm_ok(q));
  q = p, q.lda = 0;
  EXPECT(!pointwise_gemm_ok(q));
  q = p, q.out = buf + 1;  // not 16-byte aligned
  EXPECT(!pointwise_gemm_ok(q));
  q = p, q.residual = buf + 4;
  EXPECT(!pointwise_gemm_ok(q));
  q = p, q.m = 0;
  EXPECT(!pointwise_gemm_ok(q));
}

}  // namespace

int main(int argc, char** argv) { return xo_test::run_all(argc > 1 ? argv[1] : nullptr); }
