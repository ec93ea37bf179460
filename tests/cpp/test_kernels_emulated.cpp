// The CUDA kernels run on the CPU through cuda_emulation.h, against float64 loops: the depthwise forward,
// input-gradient and weight-gradient kernels (csrc/kernels/depthwise.cuh), the BatchNorm finalize kernel
// (batchnorm.cuh) and, mostly, the fused separable forward (separable.cuh).
//
// For the fused forward This checks, without a GPU, everything but the tensor-core GEMM (compiled out on the
// host, where every mode takes the FFMA path): the launch plan, pixel tiles and their tails, the depthwise
// stage (prologue, padding, stride, dilation, depth multiplier, mid affine and activation, both thread orders), the
// chunked path for channels beyond shared memory, output-channel groups, the weight double-buffering, the
// epilogue (folded BN, residual, ReLU, strided NCHW / NHWC output) and the fixed-order statistics reduction.
// Outputs are poisoned with NaN before the launch.
#include "cuda_emulation.h"  // first: defines what the kernel headers expect from CUDA

#include <algorithm>
#include <limits>
#include <random>

#include "kernels/batchnorm.cuh"
#include "kernels/depthwise.cuh"
#include "kernels/separable.cuh"
#include "kernels/separable_backward.cuh"
#include "kernels/separable_params.h"
#include "test_harness.h"

namespace xception_ops::kernels {
alignas(128) unsigned char smem[256 * 1024];  // the kernels' `extern __shared__` array
}

namespace {

using namespace xception_ops;

struct Case {
  int64_t n, c, h, w, m, cout, kh, kw, sh, sw, pt, pb, pl, pr, dh, dw;
  bool in_affine, in_relu;
  int mid;  // 0 none, 1 relu, 2 elu, 3 relu6, 4 hardswish
  bool out_affine, out_relu, residual, stats;
  int mid_affine = 0;  // the mid affine's vectors given: 1 mid_scale, 2 mid_shift, 3 both
};

// c with the mid activation `mid` and the mid affine's vectors `mid_affine` (Case::mid_affine).
Case with_mid(Case c, int mid, int mid_affine) {
  c.mid = mid;
  c.mid_affine = mid_affine;
  return c;
}

Conv2dGeometry geometry(const Case& k) {
  Conv2dGeometry g;
  g.batch = k.n;
  g.in_channels = k.c;
  g.in_h = k.h;
  g.in_w = k.w;
  g.depth_multiplier = k.m;
  g.out_channels = k.cout;
  g.kernel_h = k.kh;
  g.kernel_w = k.kw;
  g.stride_h = k.sh;
  g.stride_w = k.sw;
  g.pad_top = k.pt;
  g.pad_bottom = k.pb;
  g.pad_left = k.pl;
  g.pad_right = k.pr;
  g.dilation_h = k.dh;
  g.dilation_w = k.dw;
  g.compute_output_size();
  return g;
}

// Element strides of an (N, C, H, W) tensor, channels fastest or width fastest.
void strides(int64_t c, int64_t h, int64_t w, bool channels_last, int64_t (&s)[4]) {
  if (channels_last) {
    s[1] = 1, s[3] = c, s[2] = c * w, s[0] = c * w * h;
  } else {
    s[3] = 1, s[2] = w, s[1] = w * h, s[0] = w * h * c;
  }
}

template <typename T>
T from_float(float v);
template <>
float from_float<float>(float v) { return v; }
template <>
__half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
double to_double(float v) { return v; }
double to_double(__half v) { return __half2float(v); }
double to_double(__nv_bfloat16 v) { return __bfloat162float(v); }

double relative_error(const std::vector<double>& got, const std::vector<double>& want) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) return std::numeric_limits<double>::infinity();
    diff += (got[i] - want[i]) * (got[i] - want[i]);
    norm += want[i] * want[i];
  }
  return norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

// The float64 depthwise result of channel kc at output pixel (n, oh, ow): the prologue, the taps (padding 0), the mid
// affine and activation. xat(n, c, h, w) reads x.
template <typename X, typename T>
double reference_mid(const Case& k, const X& xat, const std::vector<T>& dw, const std::vector<float>& in_scale,
                     const std::vector<float>& in_shift, const std::vector<float>& mid_scale,
                     const std::vector<float>& mid_shift, int64_t n, int64_t oh, int64_t ow, int64_t kc) {
  const int64_t ci = kc / k.m;
  double acc = 0;
  for (int64_t i = 0; i < k.kh; ++i) {
    for (int64_t j = 0; j < k.kw; ++j) {
      const int64_t ih = oh * k.sh - k.pt + i * k.dh, iw = ow * k.sw - k.pl + j * k.dw;
      if (ih < 0 || ih >= k.h || iw < 0 || iw >= k.w) continue;
      double v = xat(n, ci, ih, iw);
      if (k.in_affine) v = v * in_scale[ci] + in_shift[ci];
      if (k.in_relu) v = std::max(v, 0.0);
      acc += v * to_double(dw[kc * k.kh * k.kw + i * k.kw + j]);
    }
  }
  if (k.mid_affine & 1) acc *= mid_scale[kc];
  if (k.mid_affine & 2) acc += mid_shift[kc];
  if (k.mid == 1) acc = std::max(acc, 0.0);
  if (k.mid == 3) acc = std::min(std::max(acc, 0.0), 6.0);
  if (k.mid == 2 && acc <= 0) acc = std::expm1(acc);
  if (k.mid == 4) acc = acc * std::min(std::max(acc + 3.0, 0.0), 6.0) / 6.0;
  return acc;
}

// The plan of the last check_case, for tests that check which paths it chose.
SeparableParams last_plan;

// Runs one case through the kernel and compares out, sum and sumsq with the float64 loop.
// wide: the kernel build without the 128-register cap (kMinBlocks = 1), which the launcher takes for layers
// whose shared memory allows one block per SM; its vector depthwise path moves 4 channels, the capped one's 2.
template <typename T, PointwiseMath kMath>
// from_memory: the staged form's launch, the depthwise result (float64, rounded to T) given in p.a_source, pixel-major,
// and the prologue and mid activation left unset, as cuda/separable_backend.cpp launches it.
void check_case(const Case& k, bool x_cl, bool out_cl, size_t smem_limit, int sms, double tol, const char* what,
                bool allow_square = true, bool wide = false, bool runs = false, bool from_memory = false) {
  std::mt19937 rng(static_cast<unsigned>(k.c * 131 + k.cout * 7 + k.h));
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_real_distribution<float> uniform(0.5f, 1.5f);
  const Conv2dGeometry g = geometry(k);
  const int64_t K = g.dw_channels(), OH = g.out_h, OW = g.out_w;

  SeparableParams p;
  p.g = g;
  std::vector<T> x(k.n * k.c * k.h * k.w), dw(K * k.kh * k.kw), pw(k.cout * K);
  std::vector<T> res(k.n * k.cout * OH * OW), out(res.size(), from_float<T>(std::nanf("")));
  for (auto& v : x) v = from_float<T>(normal(rng));
  for (auto& v : dw) v = from_float<T>(normal(rng));
  for (auto& v : pw) v = from_float<T>(normal(rng) / std::sqrt(static_cast<float>(K)));
  for (auto& v : res) v = from_float<T>(normal(rng));
  std::vector<float> in_scale(k.c), in_shift(k.c), out_scale(k.cout), out_shift(k.cout);
  for (auto& v : in_scale) v = uniform(rng);
  for (auto& v : in_shift) v = 0.3f * normal(rng);
  for (auto& v : out_scale) v = uniform(rng);
  for (auto& v : out_shift) v = 0.3f * normal(rng);
  // The mid affine's K values, then NaN: a padding channel's read past K would reach the output through the GEMM.
  std::vector<float> mid_scale(K + kSepKStep, std::nanf("")), mid_shift(K + kSepKStep, std::nanf(""));
  for (int64_t i = 0; i < K; ++i) mid_scale[i] = 2.f * uniform(rng) - 0.5f, mid_shift[i] = normal(rng);

  strides(k.c, k.h, k.w, x_cl, p.x.stride);
  strides(k.cout, OH, OW, out_cl, p.out.stride);
  p.x.data = x.data();
  p.out.data = out.data();
  if (k.residual) {
    strides(k.cout, OH, OW, out_cl, p.residual.stride);
    p.residual.data = res.data();
  }
  p.dw_weight = dw.data();
  p.pw_weight = pw.data();
  p.in_scale = k.in_affine ? in_scale.data() : nullptr;
  p.in_shift = k.in_affine ? in_shift.data() : nullptr;
  p.in_relu = k.in_relu;
  p.mid = k.mid;
  p.mid_scale = k.mid_affine & 1 ? mid_scale.data() : nullptr;
  p.mid_shift = k.mid_affine & 2 ? mid_shift.data() : nullptr;
  p.out_scale = k.out_affine ? out_scale.data() : nullptr;
  p.out_shift = k.out_affine ? out_shift.data() : nullptr;
  p.out_relu = k.out_relu;
  p.x_channels_last = x_cl;
  p.out_channels_last = out_cl;
  p.square_tiles = allow_square && separable_spatial_tiles(g);
  EXPECT(separable_plan(p, kMath, static_cast<int>(sizeof(T)), smem_limit));
  // As the torch layer sets it under XCEPTION_OPS_SEPARABLE_TILES=runs.
  p.run_tiles = runs && separable_run_tiles_ok(p, kMath);
  last_plan = p;
  EXPECT(separable_smem(p, p.a_pitch, kMath, static_cast<int>(sizeof(T))).total <= sizeof(kernels::smem));
  const int64_t tiles = separable_pixel_tiles(p);
  std::vector<float> workspace(separable_stats_workspace_bytes(p) / sizeof(float), std::nanf(""));
  std::vector<float> sum(k.cout, std::nanf("")), sumsq(k.cout, std::nanf(""));
  if (k.stats) p.stats_partial = workspace.data();

  auto xat = [&](int64_t n, int64_t c, int64_t h, int64_t w) {
    return to_double(x[n * p.x.stride[0] + c * p.x.stride[1] + h * p.x.stride[2] + w * p.x.stride[3]]);
  };
  std::vector<T> a_rows;
  if (from_memory) {
    EXPECT(!p.square_tiles && !p.run_tiles);
    a_rows.resize(k.n * OH * OW * K);
    for (int64_t q = 0; q < k.n * OH * OW; ++q) {
      for (int64_t kc = 0; kc < K; ++kc) {
        const double v = reference_mid(k, xat, dw, in_scale, in_shift, mid_scale, mid_shift, q / OW / OH,
                                       q / OW % OH, q % OW, kc);
        a_rows[q * K + kc] = from_float<T>(static_cast<float>(v));
      }
    }
    p.a_source = a_rows.data();
    p.in_scale = p.in_shift = nullptr;
    p.in_relu = false;
    p.mid = 0;
    p.mid_scale = p.mid_shift = nullptr;
  }
  const int groups = separable_channel_groups(p, sms);
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(groups));
  // The launcher's rule (cuda/separable_launch.cu): a plan with a shallower ring or an unpadded accumulator tile
  // runs in the one-block-per-SM build.
  const bool one_block = wide || p.weight_stages != 0 || p.c_pitch != 0;
  if constexpr (kMath == PointwiseMath::TensorCore) {  // run tiles and the staged form: their own builds
    if (from_memory && one_block) {
      emulate_launch(kernels::separable_forward_kernel<T, kMath, 1, 1, 1>, grid, dim3(kSepThreads), p);
    } else if (from_memory) {
      emulate_launch(kernels::separable_forward_kernel<T, kMath, 1, 1>, grid, dim3(kSepThreads), p);
    } else if (p.run_tiles && one_block) {
      emulate_launch(kernels::separable_forward_kernel<T, kMath, 3, 3, 1, true>, grid, dim3(kSepThreads), p);
    } else if (p.run_tiles) {
      emulate_launch(kernels::separable_forward_kernel<T, kMath, 3, 3, 2, true>, grid, dim3(kSepThreads), p);
    }
  }
  if (p.run_tiles || from_memory) {
    EXPECT(kMath == PointwiseMath::TensorCore);  // launched above
  } else if (g.kernel_h == 3 && g.kernel_w == 3 && one_block) {
    emulate_launch(kernels::separable_forward_kernel<T, kMath, 3, 3, 1>, grid, dim3(kSepThreads), p);
  } else if (g.kernel_h == 3 && g.kernel_w == 3) {
    emulate_launch(kernels::separable_forward_kernel<T, kMath, 3, 3>, grid, dim3(kSepThreads), p);
  } else {
    emulate_launch(kernels::separable_forward_kernel<T, kMath, 0, 0>, grid, dim3(kSepThreads), p);
  }
  if (k.stats) {  // the launcher's reduction levels (cuda/separable_launch.cu)
    const int64_t cols = 2 * k.cout;
    int64_t rows = tiles;
    float* buffers[2] = {workspace.data(), workspace.data() + rows * cols};
    for (int level = 0;; ++level) {
      const int64_t row_groups = (rows + 63) / 64;
      const bool last = row_groups == 1;
      emulate_launch(kernels::separable_stats_reduce_kernel,
                     dim3(static_cast<unsigned>(row_groups), static_cast<unsigned>((cols + 255) / 256)), dim3(256),
                     static_cast<const float*>(buffers[level % 2]), rows, cols,
                     last ? static_cast<float*>(nullptr) : buffers[(level + 1) % 2], last ? sum.data() : nullptr,
                     last ? sumsq.data() : nullptr, k.cout);
      if (last) break;
      rows = row_groups;
    }
  }

  // float64 reference, same element order as the strides.
  std::vector<double> want(out.size()), got(out.size()), want_sum(k.cout, 0), want_sq(k.cout, 0);
  std::vector<double> mid(K);
  for (int64_t n = 0; n < k.n; ++n) {
    for (int64_t oh = 0; oh < OH; ++oh) {
      for (int64_t ow = 0; ow < OW; ++ow) {
        for (int64_t kc = 0; kc < K; ++kc) {
          mid[kc] = reference_mid(k, xat, dw, in_scale, in_shift, mid_scale, mid_shift, n, oh, ow, kc);
        }
        for (int64_t co = 0; co < k.cout; ++co) {
          double y = 0;
          for (int64_t kc = 0; kc < K; ++kc) y += mid[kc] * to_double(pw[co * K + kc]);
          want_sum[co] += y;
          want_sq[co] += y * y;
          double z = k.out_affine ? y * out_scale[co] + out_shift[co] : y;
          const int64_t off = n * p.out.stride[0] + co * p.out.stride[1] + oh * p.out.stride[2] + ow * p.out.stride[3];
          if (k.residual) z += to_double(res[off]);
          if (k.out_relu) z = std::max(z, 0.0);
          want[off] = z;
          got[off] = to_double(out[off]);
        }
      }
    }
  }
  const double err = relative_error(got, want);
  if (!(err <= tol)) std::printf("  %s: out relative error %.3g > %.3g\n", what, err, tol);
  EXPECT(err <= tol);
  if (k.stats) {
    std::vector<double> gs(sum.begin(), sum.end()), gq(sumsq.begin(), sumsq.end());
    const double es = relative_error(gs, want_sum), eq = relative_error(gq, want_sq);
    if (!(es <= tol && eq <= tol)) std::printf("  %s: sum error %.3g, sumsq error %.3g > %.3g\n", what, es, eq, tol);
    EXPECT(es <= tol && eq <= tol);
  }
}

//            n   c  h   w  m cout kh kw sh sw pt pb pl pr dh dw  in_aff relu mid out_aff relu  res   stats
const Case kPlain{2, 13, 11, 9, 1, 21, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, false, false, 0, false, false, false, false};
const Case kTrain{2, 13, 11, 9, 1, 21, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, true, true, 0, false, false, false, true};
const Case kInfer{1, 40, 17, 19, 1, 70, 3, 3, 2, 2, 0, 1, 0, 1, 1, 1, false, false, 1, true, true, true, false};
const Case kOdd{3, 4, 7, 10, 2, 9, 5, 3, 1, 2, 2, 1, 0, 1, 1, 2, true, false, 2, true, false, true, true};
const Case kWide{1, 96, 9, 9, 1, 130, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, true, true, 1, true, true, true, true};
const Case kGeneric{2, 6, 9, 8, 1, 10, 5, 5, 1, 1, 2, 2, 2, 2, 1, 1, false, false, 0, true, false, false, true};

constexpr size_t kBigSmem = 227 * 1024;

TEST_CASE(fp32_every_option_both_layouts) {
  for (const Case* c : {&kPlain, &kTrain, &kInfer, &kOdd, &kWide, &kGeneric}) {
    for (bool cl : {false, true}) {
      check_case<float, PointwiseMath::Ffma>(*c, cl, cl, kBigSmem, 132, 1e-5, cl ? "fp32 NHWC" : "fp32 NCHW");
    }
  }
  // Input and output in different layouts (the thread orders are chosen separately).
  check_case<float, PointwiseMath::Ffma>(kWide, true, false, kBigSmem, 132, 1e-5, "fp32 NHWC in, NCHW out");
}

TEST_CASE(fp32_channels_beyond_shared_memory_take_the_chunked_path) {
  // 96 depthwise channels, but room for 32 at a time: the tile is recomputed per output tile.
  SeparableParams plan;
  plan.g = geometry(kWide);
  plan.square_tiles = true;
  const size_t limit = separable_smem(plan, 32 + 4, PointwiseMath::Ffma, 4).total;
  EXPECT(separable_plan(plan, PointwiseMath::Ffma, 4, limit) && plan.k_chunk == 32);
  check_case<float, PointwiseMath::Ffma>(kWide, true, true, limit, 132, 1e-5, "fp32 chunked");
  check_case<float, PointwiseMath::Ffma>(kOdd, false, false, limit, 132, 1e-5, "fp32 chunked, odd");
}

TEST_CASE(statistics_over_more_than_64_tiles_reduce_in_two_levels) {
  // 3 images of 40 x 40 outputs: 75 square tiles (8 x 8), and 150 flattened ones for a 5x3 kernel.
  const Case square{3, 6, 40, 40, 1, 9, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, false, true, 0, false, false, false, true};
  const Case flat{3, 6, 40, 40, 1, 9, 5, 3, 1, 1, 2, 2, 1, 1, 1, 1, false, false, 0, true, false, false, true};
  EXPECT(separable_pixel_tiles(geometry(square), true) == 75 && separable_pixel_tiles(geometry(flat), false) == 75);
  check_case<float, PointwiseMath::Ffma>(square, true, true, kBigSmem, 132, 1e-5, "stats, square tiles");
  check_case<float, PointwiseMath::Ffma>(flat, false, false, kBigSmem, 132, 1e-5, "stats, flattened tiles");
}

TEST_CASE(three_by_three_kernels_on_flat_tiles_too) {
  // XCEPTION_OPS_SEPARABLE_TILES=flat: the direct depthwise path where square tiles would be used.
  for (const Case* c : {&kTrain, &kInfer, &kWide}) {
    check_case<float, PointwiseMath::Ffma>(*c, true, true, kBigSmem, 132, 1e-5, "fp32 flat NHWC", false);
    check_case<__nv_bfloat16, PointwiseMath::TensorCore>(*c, false, false, kBigSmem, 132, 3e-2, "bf16 flat NCHW",
                                                         false);
  }
}

TEST_CASE(vector_paths_every_dtype_and_option) {
  // Channels fastest, channel counts in whole vectors: the depthwise stage reads kSepVec channels per load and
  // the epilogue writes them per store. The 16-bit GEMM streams its weight tiles through the cp.async ring
  // (emulated: a copy lands only when the kernel waits for it).
  //                 n   c   h   w  m cout kh kw sh sw pt pb pl pr dh dw  in_aff relu mid out_aff relu res  stats
  const Case s1{2, 24, 11, 13, 1, 44, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, true, true, 1, true, true, true, true};
  const Case s2{1, 40, 17, 19, 1, 136, 3, 3, 2, 2, 0, 1, 0, 1, 1, 1, false, true, 0, true, false, true, true};
  const Case dilated{1, 16, 12, 12, 1, 20, 3, 3, 1, 1, 2, 2, 2, 2, 2, 2, true, false, 2, false, true, false, true};
  const Case ragged_k{1, 44, 9, 9, 1, 12, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, false, false, 0, true, false, false, false};
  // 64 channels and more: groups of four pixels share their input columns (rows of 13 and 11 split some).
  const Case quads{2, 64, 10, 13, 1, 36, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, true, true, 2, true, true, true, true};
  const Case quads_dh{1, 64, 12, 11, 1, 8, 3, 3, 1, 1, 2, 2, 1, 1, 2, 1, true, false, 1, false, false, false, true};
  for (const Case* c : {&s1, &s2, &dilated, &ragged_k, &quads, &quads_dh}) {
    for (bool wide : {false, true}) {
      check_case<float, PointwiseMath::Ffma>(*c, true, true, kBigSmem, 132, 1e-5, "fp32 vectors", false, wide);
      EXPECT(last_plan.x_vectors && last_plan.out_vectors);
      check_case<__half, PointwiseMath::TensorCore>(*c, true, true, kBigSmem, 132, 5e-3, "fp16 vectors", false, wide);
      EXPECT(last_plan.x_vectors && last_plan.out_vectors);
      check_case<__nv_bfloat16, PointwiseMath::TensorCore>(*c, true, true, kBigSmem, 132, 3e-2, "bf16 vectors", false,
                                                           wide);
      check_case<__nv_bfloat16, PointwiseMath::Ffma>(*c, true, true, kBigSmem, 132, 3e-2, "bf16 FFMA vectors", false,
                                                     wide);
    }
  }
  // One side vectorized, the other not.
  check_case<__nv_bfloat16, PointwiseMath::TensorCore>(s2, true, false, kBigSmem, 132, 3e-2, "bf16 NHWC in", false);
  EXPECT(last_plan.x_vectors && !last_plan.out_vectors);
  check_case<__nv_bfloat16, PointwiseMath::TensorCore>(s2, false, true, kBigSmem, 132, 3e-2, "bf16 NHWC out", false);
  EXPECT(!last_plan.x_vectors && last_plan.out_vectors);
  // Square tiles keep their own depthwise stage; the epilogue still writes vectors.
  check_case<__nv_bfloat16, PointwiseMath::TensorCore>(s1, true, true, kBigSmem, 132, 3e-2, "bf16 square", true);
  EXPECT(!last_plan.x_vectors && last_plan.out_vectors);
  // Channels beyond shared memory (even with the smallest ring and accumulator tile): the ring restarts for
  // every chunk of 32 channels.
  SeparableParams plan;
  plan.g = geometry(s2);
  plan.weight_stages = 3, plan.c_pitch = kSepTileN;
  const size_t limit = separable_smem(plan, 32 + 8, PointwiseMath::TensorCore, 2).total;
  plan.weight_stages = 0, plan.c_pitch = 0;
  EXPECT(separable_plan(plan, PointwiseMath::TensorCore, 2, limit) && plan.k_chunk == 32);
  check_case<__nv_bfloat16, PointwiseMath::TensorCore>(s2, true, true, limit, 132, 3e-2, "bf16 chunked", false);
  EXPECT(last_plan.k_chunk == 32 && last_plan.x_vectors);
  check_case<__nv_bfloat16, PointwiseMath::TensorCore>(s2, true, true, limit, 132, 3e-2, "bf16 chunked", false, true);
}

TEST_CASE(run_tiles_every_dtype_and_option) {
  // XCEPTION_OPS_SEPARABLE_TILES=runs: runs of 4 pixels walked down a column band. Rows of 41 and 11 (a last run of
  // 1 and 3 pixels), images of 5 to 14 rows (runs wrap to the next band and image inside a tile), 24 to 728
  // channels (1 to 16 slots per thread), the 16-bit tile and the float32 one, both kernel builds; with a chunked
  // depthwise tile too.
  //                      n   c   h   w  m cout kh kw sh sw pt pb pl pr dh dw  in_aff relu mid out_aff relu res  stats
  const Case narrow{2, 24, 5, 41, 1, 44, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, true, true, 1, true, true, true, true};
  const Case band{2, 64, 10, 11, 1, 36, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, true, true, 2, true, true, true, true};
  const Case valid{1, 128, 14, 13, 1, 20, 3, 3, 1, 1, 0, 0, 0, 0, 1, 1, false, true, 0, false, false, false, true};
  const Case wide_c{1, 728, 6, 11, 1, 16, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, true, false, 0, true, false, false, true};
  for (const Case* c : {&narrow, &band, &valid, &wide_c}) {
    for (bool wide : {false, true}) {
      check_case<__nv_bfloat16, PointwiseMath::TensorCore>(*c, true, true, kBigSmem, 132, 3e-2, "bf16 runs", false,
                                                           wide, true);
      EXPECT(last_plan.run_tiles);
      check_case<__half, PointwiseMath::TensorCore>(*c, true, false, kBigSmem, 132, 5e-3, "fp16 runs, NCHW out", false,
                                                    wide, true);
      EXPECT(last_plan.run_tiles);
    }
  }
  // Not where the width wastes more than 10% in runs (10 columns), nor at stride 2, nor on NCHW input, nor on the
  // GEMMs not built for them (float32).
  const Case ten{1, 16, 10, 10, 1, 8, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, false, false, 0, false, false, false, false};
  check_case<__half, PointwiseMath::TensorCore>(ten, true, true, kBigSmem, 132, 5e-3, "fp16 not runs", false, false,
                                                true);
  EXPECT(!last_plan.run_tiles);
  check_case<__half, PointwiseMath::TensorCore>(kInfer, true, true, kBigSmem, 132, 5e-3, "fp16 not runs", false, false,
                                                true);
  EXPECT(!last_plan.run_tiles);
  check_case<__half, PointwiseMath::TensorCore>(band, false, true, kBigSmem, 132, 5e-3, "fp16 not runs", false, false,
                                                true);
  EXPECT(!last_plan.run_tiles);
  check_case<float, PointwiseMath::Ffma>(band, true, true, kBigSmem, 132, 1e-5, "fp32 not runs", false, false, true);
  EXPECT(!last_plan.run_tiles && last_plan.x_vectors);
  // Channels beyond shared memory: the run tiles' depthwise stage per chunk of 32 channels.
  SeparableParams plan;
  plan.g = geometry(band);
  plan.weight_stages = 3, plan.c_pitch = kSepTileN;
  const size_t limit = separable_smem(plan, 32 + 8, PointwiseMath::TensorCore, 2).total;
  check_case<__nv_bfloat16, PointwiseMath::TensorCore>(band, true, true, limit, 132, 3e-2, "bf16 runs chunked", false,
                                                       false, true);
  EXPECT(last_plan.run_tiles && last_plan.k_chunk == 32);
}

TEST_CASE(staged_form_reads_the_depthwise_tile_from_memory) {
  // p.a_source set: the GEMM (mma.sync, the only one built for it) and epilogue of the fused kernel on a depthwise
  // result given pixel-major, with every epilogue option and the statistics, both builds. 16-byte rows (24, 40, 96
  // channels) and element by element (13 and 12 channels).
  for (const Case* c : {&kPlain, &kTrain, &kInfer, &kOdd, &kWide, &kGeneric}) {
    for (bool out_cl : {false, true}) {
      check_case<__nv_bfloat16, PointwiseMath::TensorCore>(*c, true, out_cl, kBigSmem, 132, 3e-2,
                                                           "bf16 from memory", false, false, false, true);
      check_case<__half, PointwiseMath::TensorCore>(*c, true, out_cl, kBigSmem, 132, 5e-3, "fp16 from memory",
                                                    false, true, false, true);
    }
  }
  //                       n   c   h   w  m cout kh kw sh sw pt pb pl pr dh dw  in_aff relu mid out_aff relu res  stats
  const Case vectors{2, 24, 9, 11, 1, 44, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, true, true, 1, true, true, true, true};
  check_case<__nv_bfloat16, PointwiseMath::TensorCore>(vectors, true, true, kBigSmem, 132, 3e-2,
                                                       "bf16 from memory, 24 channels", false, false, false, true);
  // Channels beyond shared memory: the tile read per chunk of 32 channels, again for each output-channel tile.
  SeparableParams plan;
  plan.g = geometry(kWide);
  plan.weight_stages = 3, plan.c_pitch = kSepTileN;
  const size_t limit = separable_smem(plan, 32 + 8, PointwiseMath::TensorCore, 2).total;
  check_case<__nv_bfloat16, PointwiseMath::TensorCore>(kWide, true, true, limit, 132, 3e-2,
                                                       "bf16 from memory, chunked", false, false, false, true);
  EXPECT(last_plan.k_chunk == 32);
}

TEST_CASE(resident_tiles_take_a_shallower_ring_or_an_unpadded_accumulator_tile_for_room) {
  // 1536->2048 @10^2 on an H100, scaled down: shared memory that holds every depthwise channel only with a ring of
  // 3 weight buffers, then only with an unpadded accumulator tile as well. The tile stays resident (computed once
  // per block) either way, and the results stay right; 300 output channels make three output tiles.
  //                 n   c  h   w  m cout kh kw sh sw pt pb pl pr dh dw  in_aff relu mid out_aff relu res  stats
  const Case c{2, 96, 9, 10, 1, 300, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, true, true, 0, true, true, true, true};
  SeparableParams plan;
  plan.g = geometry(c);
  const int64_t pitch = 96 + 8;
  plan.weight_stages = 3;
  const size_t three = separable_smem(plan, pitch, PointwiseMath::TensorCore, 2).total;
  plan.c_pitch = kSepTileN;
  const size_t unpadded = separable_smem(plan, pitch, PointwiseMath::TensorCore, 2).total;
  EXPECT(unpadded < three);
  // The one-block-per-SM build takes these plans (the launcher's rule; the capped one traps on them).
  check_case<__nv_bfloat16, PointwiseMath::TensorCore>(c, true, true, three, 132, 3e-2, "bf16, ring of 3", false,
                                                       true);
  EXPECT(last_plan.k_chunk == 96 && last_plan.a_pitch == pitch && last_plan.weight_stages == 3 &&
         separable_c_pitch(last_plan) == kSepCPitch);
  check_case<__half, PointwiseMath::TensorCore>(c, false, false, unpadded, 132, 5e-3, "fp16, unpadded c", false, true);
  EXPECT(last_plan.k_chunk == 96 && last_plan.a_pitch == pitch && last_plan.weight_stages == 3 &&
         separable_c_pitch(last_plan) == kSepTileN);
  // So does the generic-kernel-size build (there is no other for it): a 5x3 kernel, NCHW.
  const Case c53{2, 96, 9, 10, 1, 300, 5, 3, 1, 1, 2, 2, 1, 1, 1, 1, false, true, 1, true, false, false, true};
  check_case<__nv_bfloat16, PointwiseMath::TensorCore>(c53, false, true, unpadded, 132, 3e-2, "bf16 5x3, unpadded c",
                                                       false);
  EXPECT(last_plan.k_chunk == 96 && last_plan.weight_stages == 3 && separable_c_pitch(last_plan) == kSepTileN);
  // The other GEMMs keep their two buffers and padded tile, and go to the chunked path when those do not fit.
  check_case<float, PointwiseMath::Ffma>(c, true, true, three, 132, 1e-5, "fp32 FFMA, same room", false);
  EXPECT(separable_stages(last_plan, PointwiseMath::Ffma) == 2 && separable_c_pitch(last_plan) == kSepCPitch);
}

TEST_CASE(one_group_per_pixel_tile_and_many) {
  check_case<float, PointwiseMath::Ffma>(kWide, true, true, kBigSmem, 1, 1e-5, "fp32, 1 group");
  check_case<float, PointwiseMath::Ffma>(kWide, true, true, kBigSmem, 1000, 1e-5, "fp32, a group per tile");
}

TEST_CASE(half_and_bfloat16_with_the_tile_in_their_own_precision) {
  // TensorCore mode keeps the depthwise tile in the 16-bit dtype; on the host it runs the FFMA path.
  for (const Case* c : {&kTrain, &kInfer, &kOdd, &kWide}) {
    check_case<__half, PointwiseMath::TensorCore>(*c, true, true, kBigSmem, 132, 5e-3, "fp16 NHWC");
    check_case<__nv_bfloat16, PointwiseMath::TensorCore>(*c, false, false, kBigSmem, 132, 3e-2, "bf16 NCHW");
    check_case<__nv_bfloat16, PointwiseMath::Ffma>(*c, true, true, kBigSmem, 132, 3e-2, "bf16 FFMA NHWC");
  }
}

TEST_CASE(tf32_mode_compiles_to_the_same_ffma_path_on_the_host) {
  check_case<float, PointwiseMath::Tf32>(kTrain, true, true, kBigSmem, 132, 1e-5, "tf32 mode");
}

TEST_CASE(hardswish_division_is_ieees) {
  // kernels::div6_rn, hardswish's division by 6 without a division: bit for bit t / 6.f on a spread of every
  // exponent (each 251st bit pattern) and densely around its integer path's edge (2^-123) and the smallest
  // subnormals. (Every one of the 2^32 patterns was checked once, session 17.)
  int bad = 0;
  auto check = [&](uint32_t bits) {
    float t;
    std::memcpy(&t, &bits, 4);
    const float want = t / 6.f, got = kernels::div6_rn(t);
    if (std::memcmp(&want, &got, 4) != 0 && !(std::isnan(want) && std::isnan(got)) && bad++ < 3) {
      std::printf("  div6_rn(%a) = %a, want %a\n", t, got, want);
    }
  };
  for (uint64_t u = 0; u <= 0xffffffffull; u += 251) check(static_cast<uint32_t>(u));
  for (uint32_t sign : {0u, 0x80000000u}) {
    for (uint32_t b = 0; b < (1u << 20); ++b) check(sign | b);                          // the smallest subnormals
    for (uint32_t b = 0x02000000u - (1u << 20); b < 0x02000000u + (1u << 20); ++b) check(sign | b);  // 2^-123
    for (uint32_t b : {0x7f7fffffu, 0x7f800000u, 0x7fc00000u}) check(sign | b);         // max, inf, NaN
  }
  EXPECT(bad == 0);
}

TEST_CASE(relu_and_relu6_keep_nan_as_torch_does) {
  // kernels::relu / relu6 (every fused ReLU: prologue, mid stage, epilogues) on the host path, which the old GPUs
  // compile too (sm_80+ take max.NaN / min.NaN): NaN stays NaN, -0 and negatives give +0, relu6 clamps at 6.
  const float nan = std::nanf(""), inf = std::numeric_limits<float>::infinity();
  auto same = [](float a, float b) { return std::memcmp(&a, &b, 4) == 0; };
  EXPECT(std::isnan(kernels::relu(nan)) && std::isnan(kernels::relu(-nan)) && std::isnan(kernels::relu6(nan)));
  EXPECT(same(kernels::relu(-0.f), 0.f) && same(kernels::relu(-3.5f), 0.f) && same(kernels::relu(2.5f), 2.5f));
  EXPECT(same(kernels::relu(inf), inf) && same(kernels::relu(-inf), 0.f));
  EXPECT(same(kernels::relu6(7.f), 6.f) && same(kernels::relu6(inf), 6.f) && same(kernels::relu6(-1.f), 0.f) &&
         same(kernels::relu6(5.5f), 5.5f) && same(kernels::relu6(-0.f), 0.f));
  EXPECT(std::isnan(kernels::mid_value<float>(nan, 1, false, 1.f, 0.f)) &&
         std::isnan(kernels::mid_value<__nv_bfloat16>(nan, 3, true, 2.f, 1.f)));
}

TEST_CASE(mid_affine_and_relu6_on_every_depthwise_path) {
  // The mid stage (kernels::mid_value) on each depthwise path: d * mid_scale + mid_shift per depthwise channel (scale
  // only, shift only, both), then relu6, relu, elu, hardswish or none. Channel counts that leave padding columns in the tile
  // (13, 40, 8 = 4 x multiplier 2, 24), whose reads of the vectors past K would bring NaN into the output.
  struct Mid {
    int mid, affine;
  };
  const Mid mids[] = {{3, 3}, {1, 1}, {2, 2}, {0, 3}, {4, 3}};
  //                     n   c   h   w  m cout kh kw sh sw pt pb pl pr dh dw  in_aff relu mid out_aff relu res  stats
  const Case vec{2, 24, 9, 11, 1, 20, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, true, true, 0, true, true, true, true};
  const Case quads{1, 64, 6, 13, 1, 12, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, false, false, 0, true, false, false, true};
  const Case runs{2, 24, 5, 20, 1, 16, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, true, false, 0, false, false, true, true};
  const Case band{2, 64, 10, 11, 1, 36, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, true, true, 0, true, true, true, true};
  int i = 0;
  for (const Mid& m : mids) {
    const Mid other = mids[(++i) % 5];  // a second combination per round, on the other dtypes
    // Square tiles (stride 1 and 2) and, with them off, the direct path; the generic kernel size with a depth
    // multiplier (the vectors are per depthwise channel); both layouts.
    for (const Case* c : {&kTrain, &kInfer, &kOdd, &kGeneric}) {
      const Case a = with_mid(*c, m.mid, m.affine), b = with_mid(*c, other.mid, other.affine);
      check_case<float, PointwiseMath::Ffma>(a, false, false, kBigSmem, 132, 1e-5, "fp32 mid affine NCHW");
      check_case<float, PointwiseMath::Ffma>(a, true, true, kBigSmem, 132, 1e-5, "fp32 mid affine NHWC", false);
      check_case<__nv_bfloat16, PointwiseMath::TensorCore>(b, true, true, kBigSmem, 132, 3e-2, "bf16 mid affine");
      check_case<__half, PointwiseMath::TensorCore>(b, false, false, kBigSmem, 132, 5e-3, "fp16 mid affine flat",
                                                    false);
    }
    // The vector path (both builds: 2 and 4 channels per thread; groups of four pixels at 64 channels).
    for (const Case* c : {&vec, &quads}) {
      for (bool wide : {false, true}) {
        check_case<float, PointwiseMath::Ffma>(with_mid(*c, m.mid, m.affine), true, true, kBigSmem, 132, 1e-5,
                                               "fp32 mid affine vectors", false, wide);
        EXPECT(last_plan.x_vectors);
        check_case<__half, PointwiseMath::TensorCore>(with_mid(*c, other.mid, other.affine), true, true, kBigSmem,
                                                      132, 5e-3, "fp16 mid affine vectors", false, wide);
        EXPECT(last_plan.x_vectors);
      }
    }
    // Run tiles, both builds.
    for (bool wide : {false, true}) {
      check_case<__nv_bfloat16, PointwiseMath::TensorCore>(with_mid(runs, m.mid, m.affine), true, true, kBigSmem, 132,
                                                           3e-2, "bf16 mid affine runs", false, wide, true);
      EXPECT(last_plan.run_tiles);
    }
    // The staged form: the affine is in the depthwise result it reads (the kernel is given none).
    check_case<__nv_bfloat16, PointwiseMath::TensorCore>(with_mid(vec, m.mid, m.affine), true, true, kBigSmem, 132,
                                                         3e-2, "bf16 mid affine from memory", false, false, false,
                                                         true);
  }
  // Channels beyond shared memory: chunks of 32 channels from k0 = 32, 64 index the vectors from k0.
  SeparableParams plan;
  plan.g = geometry(kWide);
  plan.square_tiles = true;
  const size_t limit = separable_smem(plan, 32 + 4, PointwiseMath::Ffma, 4).total;
  check_case<float, PointwiseMath::Ffma>(with_mid(kWide, 3, 3), true, true, limit, 132, 1e-5, "fp32 chunked square");
  EXPECT(last_plan.k_chunk == 32 && last_plan.square_tiles);
  check_case<float, PointwiseMath::Ffma>(with_mid(kWide, 2, 3), false, false, limit, 132, 1e-5, "fp32 chunked flat",
                                         false);
  EXPECT(last_plan.k_chunk == 32);
  plan.square_tiles = false;
  plan.weight_stages = 3, plan.c_pitch = kSepTileN;
  const size_t limit16 = separable_smem(plan, 32 + 8, PointwiseMath::TensorCore, 2).total;
  check_case<__nv_bfloat16, PointwiseMath::TensorCore>(with_mid(kWide, 3, 1), true, true, limit16, 132, 3e-2,
                                                       "bf16 chunked vectors", false);
  EXPECT(last_plan.k_chunk == 32 && last_plan.x_vectors);
  check_case<__nv_bfloat16, PointwiseMath::TensorCore>(with_mid(band, 1, 2), true, true, limit16, 132, 3e-2,
                                                       "bf16 chunked runs", false, false, true);
  EXPECT(last_plan.k_chunk == 32 && last_plan.run_tiles);
}

// One launch of the pass as cuda/separable_backward_launch.cu makes it: a block per q.tile_pixels pixels;
// separable_plane_pass_kernel where every tensor is NCHW (channel_pass_planes), else separable_channel_pass_kernel
// with kSepVec channels per access where `vectors` (the launcher's channel_pass_vectors).
template <typename T, ChannelPass kKind>
void emulate_channel_pass(const ChannelPassParams& q, bool vectors) {
  const dim3 grid(static_cast<unsigned>(channel_pass_tiles(q)));
  if constexpr (kKind != ChannelPass::GradY) {
    if (channel_pass_planes(q, kKind)) {
      emulate_launch(kernels::separable_plane_pass_kernel<T, kKind>, grid, dim3(256), q);
      return;
    }
  }
  if (vectors) {
    emulate_launch(kernels::separable_channel_pass_kernel<T, kKind, kSepVec>, grid, dim3(256), q);
  } else {
    emulate_launch(kernels::separable_channel_pass_kernel<T, kKind, 1>, grid, dim3(256), q);
  }
}

// The backward's elementwise passes: grad_y (with out's ReLU mask, out_scale, grad_sum, grad_sumsq) and the
// prologue's backward (ReLU mask of round(x * scale + shift), grad_x, the sums), against float64 loops.
template <typename T>
void check_channel_pass(bool prologue, bool channels_last, bool relu, bool with_vectors, double tol, const char* what,
                        int64_t c = 37, bool y_same_layout = false, bool expect_vector_path = false,
                        int tile_pixels = kChannelPassPixels) {
  std::mt19937 rng(static_cast<unsigned>(prologue * 7 + channels_last * 3 + relu + with_vectors * 11 + c));
  std::normal_distribution<float> normal(0.f, 1.f);
  const int64_t n = 2, h = 9, w = 11, pixels = n * h * w;  // 198 pixels: 4 blocks, the last partial
  std::vector<T> grad(n * c * h * w), act(grad.size()), y(grad.size()), result(grad.size(), from_float<T>(std::nanf("")));
  std::vector<T> grad_y(grad.size(), from_float<T>(std::nanf("")));
  for (auto& v : grad) v = from_float<T>(normal(rng));
  // grad_y's act is a ReLU output (exact zeros, which the mask must drop); the prologue's is x.
  for (auto& v : act) v = from_float<T>(prologue ? normal(rng) : std::max(normal(rng), 0.f));
  for (auto& v : y) v = from_float<T>(normal(rng));
  std::vector<float> scale(c), va(c), vb(c);
  for (auto& v : scale) v = 0.5f + std::abs(normal(rng));
  for (auto& v : va) v = 0.3f * normal(rng);
  for (auto& v : vb) v = 0.1f * normal(rng);
  ChannelPassParams q;
  q.g.batch = n;
  q.channels = c, q.h = h, q.w = w;
  strides(c, h, w, channels_last, q.grad.stride);
  strides(c, h, w, channels_last, q.act.stride);
  strides(c, h, w, y_same_layout ? channels_last : !channels_last, q.y.stride);  // or each its own strides
  strides(c, h, w, channels_last, q.result.stride);
  q.grad.data = grad.data();
  q.act.data = (relu || prologue) ? act.data() : nullptr;
  q.y.data = prologue || !with_vectors ? nullptr : y.data();
  q.result.data = result.data();
  q.grad_y = grad_y.data();
  q.scale = with_vectors ? scale.data() : nullptr;
  q.vec_a = with_vectors ? va.data() : nullptr;
  q.vec_b = with_vectors && !prologue ? vb.data() : nullptr;
  q.relu = relu;
  q.tile_pixels = tile_pixels;
  const int64_t tiles = channel_pass_tiles(q);
  std::vector<float> partial(reduce_rows_workspace(tiles, 2 * c), std::nanf(""));
  q.partial = partial.data();
  // The launcher's choice (cuda/separable_backward_launch.cu), which the case expects.
  const bool vectors = channel_pass_vectors(q, static_cast<int>(sizeof(T)));
  EXPECT(vectors == expect_vector_path);
  if (prologue) {
    emulate_channel_pass<T, ChannelPass::Prologue>(q, vectors);
  } else {
    emulate_channel_pass<T, ChannelPass::GradY>(q, vectors);
  }
  std::vector<double> got_first(c, 0), got_second(c, 0), want_first(c, 0), want_second(c, 0);
  for (int64_t t = 0; t < tiles; ++t) {
    for (int64_t k = 0; k < c; ++k) got_first[k] += partial[t * 2 * c + k], got_second[k] += partial[t * 2 * c + c + k];
  }
  std::vector<double> got_out, want_out;
  for (int64_t pix = 0; pix < pixels; ++pix) {
    const int64_t iw = pix % w, ih = pix / w % h, in = pix / w / h;
    for (int64_t k = 0; k < c; ++k) {
      auto at = [&](const std::vector<T>& v, const int64_t (&st)[4]) {
        return to_double(v[in * st[0] + k * st[1] + ih * st[2] + iw * st[3]]);
      };
      double g = at(grad, q.grad.stride);
      const double sc = with_vectors ? scale[k] : 1.0, a = with_vectors ? va[k] : 0.0;
      if (prologue) {
        const double xv = at(act, q.act.stride);
        const double affine = to_double(from_float<T>(static_cast<float>(xv * sc + a)));
        if (relu && !(affine > 0)) g = 0;
        want_first[k] += g * xv, want_second[k] += g;
        want_out.push_back(with_vectors ? g * sc : g);
        got_out.push_back(at(result, q.result.stride));
      } else {
        if (relu && !(at(act, q.act.stride) > 0)) g = 0;
        const double yv = q.y.data != nullptr ? at(y, q.y.stride) : 0.0;
        want_first[k] += g * yv, want_second[k] += g;
        want_out.push_back(g * sc + a + (with_vectors ? 2 * yv * vb[k] : 0.0));
        got_out.push_back(to_double(grad_y[pix * c + k]));
      }
    }
  }
  const double e_out = relative_error(got_out, want_out);
  const double e_first = q.y.data != nullptr || prologue ? relative_error(got_first, want_first) : 0.0;
  const double e_second = relative_error(got_second, want_second);
  if (!(e_out <= tol && e_first <= tol && e_second <= tol)) {
    std::printf("  %s: out %.3g, first sums %.3g, second sums %.3g > %.3g\n", what, e_out, e_first, e_second, tol);
  }
  EXPECT(e_out <= tol && e_first <= tol && e_second <= tol);
}

// prologue_apply_kernel<__half, V> against float64 on a (2, c, 4, 3) tensor; a 4-block grid-stride launch.
template <int V>
void check_prologue_apply(int64_t c, bool x_cl, bool out_cl) {
  std::mt19937 rng(static_cast<unsigned>(5 + c));
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<__half> x(2 * c * 4 * 3), out(x.size(), from_float<__half>(std::nanf("")));
  for (auto& v : x) v = from_float<__half>(normal(rng));
  std::vector<float> sc(c), sh(c);
  for (auto& v : sc) v = normal(rng);
  for (auto& v : sh) v = 0.5f * normal(rng);
  DepthwiseTensor xt, ot;
  strides(c, 4, 3, x_cl, xt.stride);
  strides(c, 4, 3, out_cl, ot.stride);
  xt.data = x.data(), ot.data = out.data();
  EXPECT((V > 1) == (separable_vectorizable(xt, c, 2) && separable_vectorizable(ot, c, 2)));
  emulate_launch(kernels::prologue_apply_kernel<__half, V>, dim3(4), dim3(256), static_cast<const DepthwiseTensor>(xt),
                 static_cast<const DepthwiseTensor>(ot), int64_t{2}, c, int64_t{4}, int64_t{3},
                 static_cast<const float*>(sc.data()), static_cast<const float*>(sh.data()), true);
  double worst = 0;
  for (int64_t n = 0; n < 2; ++n)
    for (int64_t k = 0; k < c; ++k)
      for (int64_t h = 0; h < 4; ++h)
        for (int64_t w = 0; w < 3; ++w) {
          const double xv = to_double(x[n * xt.stride[0] + k * xt.stride[1] + h * xt.stride[2] + w * xt.stride[3]]);
          const double want = std::max(to_double(from_float<__half>(static_cast<float>(xv * sc[k] + sh[k]))), 0.0);
          const double got = to_double(out[n * ot.stride[0] + k * ot.stride[1] + h * ot.stride[2] + w * ot.stride[3]]);
          worst = std::max(worst, std::abs(got - want));  // a NaN (an element never written) fails below
          if (std::isnan(got)) worst = 1e9;
        }
  EXPECT(worst == 0.0);
}

TEST_CASE(backward_elementwise_passes) {
  for (bool prologue : {false, true}) {
    for (bool cl : {false, true}) {
      for (bool relu : {false, true}) {
        for (bool vectors : {false, true}) {
          check_channel_pass<float>(prologue, cl, relu, vectors, 1e-6, prologue ? "fp32 prologue" : "fp32 grad_y");
          check_channel_pass<__nv_bfloat16>(prologue, cl, relu, vectors, 8e-3, prologue ? "bf16 prologue" : "bf16 grad_y");
        }
      }
    }
    // Channels a multiple of the vector, every tensor channels-last: 4 channels per access. 8 channels (2 vector
    // groups: 128 row groups, more than the block's 64 pixels), 132 (33 groups: 4 row groups of 16 pixels), 1040
    // (260 groups: a thread takes two); and the same counts in NCHW, one channel per access.
    for (int64_t c : {8, 132, 1040}) {
      for (bool cl : {false, true}) {
        for (bool relu : {false, true}) {
          check_channel_pass<float>(prologue, cl, relu, true, 1e-6, "fp32 vector pass", c, true, cl);
          check_channel_pass<__nv_bfloat16>(prologue, cl, relu, true, 8e-3, "bf16 vector pass", c, true, cl);
          check_channel_pass<__half>(prologue, cl, !relu, false, 2e-3, "fp16 vector pass", c, true, cl);
        }
      }
    }
    // Smaller tiles (channel_pass_tile_pixels, for layers of few pixels): 8 pixels (25 blocks, the last of 6
    // pixels; at 8 channels 128 row groups of which 8 have a pixel) and 16, in both layouts.
    for (int tile : {8, 16}) {
      for (bool cl : {false, true}) {
        check_channel_pass<__nv_bfloat16>(prologue, cl, true, true, 8e-3, "bf16 small tiles", 8, true, cl, tile);
        check_channel_pass<float>(prologue, cl, false, true, 1e-6, "fp32 small tiles", 1040, true, cl, tile);
        check_channel_pass<__half>(prologue, cl, true, true, 2e-3, "fp16 small tiles, scalar", 37, false, false,
                                   tile);
      }
    }
  }
  // relu?(round(x * scale + shift)) elementwise: strides of its own on each side (one channel per access), and
  // both channels-last (4 per access, as the launcher picks when both are vectorizable).
  check_prologue_apply<1>(5, false, true);
  check_prologue_apply<kSepVec>(8, true, true);
  check_prologue_apply<1>(8, true, false);
}

// The staged forward's epilogue pass (ChannelPass::Epilogue) against float64: out = relu?(round(round(y * scale +
// shift) + residual)) with the roundings where the fused kernel's epilogue has them, and the per-channel sums of y
// and y^2. y and out in the layout `cl`, the residual in its own (`res_cl`); out written over y where `in_place`.
struct EpilogueCase {
  int64_t c;
  bool cl, res_cl, affine, residual, relu, in_place, stats, store;
  bool expect_vectors;
  int tile_pixels = kChannelPassPixels;
  bool res_padded = false;  // the residual NCHW with rows 3 elements longer than its width (a slice's strides)
};

template <typename T>
void check_epilogue_pass(const EpilogueCase& k, double tol, const char* what) {
  std::mt19937 rng(static_cast<unsigned>(k.c * 5 + k.cl + 2 * k.affine + 4 * k.residual + 8 * k.relu + 16 * k.in_place));
  std::normal_distribution<float> normal(0.f, 1.f);
  const int64_t n = 2, h = 9, w = 11, c = k.c, pixels = n * h * w;  // 198 pixels: 4 blocks, the last partial
  std::vector<T> y(n * c * h * w), res(n * c * h * (w + 3)), out(y.size(), from_float<T>(std::nanf("")));
  for (auto& v : y) v = from_float<T>(normal(rng));
  for (auto& v : res) v = from_float<T>(normal(rng));
  const std::vector<T> y_before = y;
  std::vector<float> scale(c), shift(c);
  for (auto& v : scale) v = 0.5f + std::abs(normal(rng));
  for (auto& v : shift) v = 0.3f * normal(rng);
  ChannelPassParams q;
  q.g.batch = n;
  q.channels = c, q.h = h, q.w = w;
  strides(c, h, w, k.cl, q.y.stride);
  strides(c, h, w, k.cl, q.result.stride);
  strides(c, h, w, k.res_cl, q.act.stride);
  if (k.res_padded) {
    const int64_t padded[4] = {c * h * (w + 3), h * (w + 3), w + 3, 1};
    std::copy(padded, padded + 4, q.act.stride);
  }
  q.y.data = y.data();
  q.act.data = k.residual ? res.data() : nullptr;
  q.result.data = !k.store ? nullptr : k.in_place ? static_cast<void*>(y.data()) : out.data();
  q.scale = k.affine ? scale.data() : nullptr;
  q.vec_a = k.affine ? shift.data() : nullptr;
  q.relu = k.relu;
  q.tile_pixels = k.tile_pixels;
  const int64_t tiles = channel_pass_tiles(q);
  std::vector<float> partial(reduce_rows_workspace(tiles, 2 * c), std::nanf(""));
  q.partial = k.stats ? partial.data() : nullptr;
  const bool vectors = channel_pass_vectors(q, static_cast<int>(sizeof(T)));
  EXPECT(vectors == k.expect_vectors);
  emulate_channel_pass<T, ChannelPass::Epilogue>(q, vectors);

  auto round_t = [](double v) { return to_double(from_float<T>(static_cast<float>(v))); };
  std::vector<double> got_out, want_out, got_first(c, 0), got_second(c, 0), want_first(c, 0), want_second(c, 0);
  const std::vector<T>& written = k.in_place ? y : out;
  for (int64_t pix = 0; pix < pixels; ++pix) {
    const int64_t iw = pix % w, ih = pix / w % h, in = pix / w / h;
    for (int64_t kc = 0; kc < c; ++kc) {
      auto at = [&](const std::vector<T>& v, const int64_t (&st)[4]) {
        return to_double(v[in * st[0] + kc * st[1] + ih * st[2] + iw * st[3]]);
      };
      const double yv = at(y_before, q.y.stride);
      want_first[kc] += yv, want_second[kc] += yv * yv;
      double z = k.affine ? round_t(yv * scale[kc] + shift[kc]) : yv;
      if (k.residual) z = round_t(z + at(res, q.act.stride));
      if (k.relu) z = std::max(z, 0.0);
      want_out.push_back(k.store ? z : yv);  // no store: y (and out) untouched
      got_out.push_back(at(k.store ? written : y, q.result.stride));
    }
  }
  double e_first = 0, e_second = 0;
  if (k.stats) {
    for (int64_t t = 0; t < tiles; ++t) {
      for (int64_t kc = 0; kc < c; ++kc) {
        got_first[kc] += partial[t * 2 * c + kc], got_second[kc] += partial[t * 2 * c + c + kc];
      }
    }
    e_first = relative_error(got_first, want_first), e_second = relative_error(got_second, want_second);
  } else {
    EXPECT(std::all_of(partial.begin(), partial.end(), [](float v) { return std::isnan(v); }));
  }
  const double e_out = relative_error(got_out, want_out);
  if (!(e_out <= tol && e_first <= 1e-6 && e_second <= 1e-6)) {
    std::printf("  %s (c %lld): out %.3g, sums %.3g, %.3g\n", what, static_cast<long long>(c), e_out, e_first,
                e_second);
  }
  EXPECT(e_out <= tol && e_first <= 1e-6 && e_second <= 1e-6);
}

TEST_CASE(staged_forward_epilogue_pass) {
  // Every option, both layouts, one channel per access (37 channels) and four (132 channels-last); the residual in
  // the other layout takes the scalar path.
  for (bool cl : {false, true}) {
    for (int64_t c : {37, 132}) {
      for (int opts = 0; opts < 16; ++opts) {
        const bool affine = opts & 1, residual = opts & 2, relu = opts & 4, in_place = opts & 8;
        const bool vectors = cl && c % kSepVec == 0;
        EpilogueCase k{c, cl, cl, affine, residual, relu, in_place, true, true, vectors};
        check_epilogue_pass<float>(k, 1e-7, "fp32 epilogue");
        check_epilogue_pass<__nv_bfloat16>(k, 1e-7, "bf16 epilogue");
        check_epilogue_pass<__half>(k, 1e-7, "fp16 epilogue");
      }
    }
  }
  // 8 channels (128 row groups) and 1040 (a thread takes two vector groups); a residual in the other layout; no
  // statistics (inference); statistics only, out being y (training without an epilogue).
  check_epilogue_pass<__nv_bfloat16>({8, true, true, true, true, true, false, true, true, true}, 1e-7, "8 ch");
  check_epilogue_pass<__nv_bfloat16>({1040, true, true, true, true, false, true, true, true, true}, 1e-7, "1040 ch");
  check_epilogue_pass<__nv_bfloat16>({1040, false, false, true, false, true, false, true, true, false}, 1e-7, "1040 nchw");
  check_epilogue_pass<float>({132, true, false, true, true, true, false, true, true, false}, 1e-7, "residual nchw");
  check_epilogue_pass<__half>({132, true, true, true, true, true, true, false, true, true}, 1e-7, "no statistics");
  check_epilogue_pass<float>({37, false, false, false, false, false, false, true, false, false}, 1e-7, "sums only");
  check_epilogue_pass<__nv_bfloat16>({132, true, true, false, false, false, false, true, false, true}, 1e-7,
                                     "sums only, vectors");
  // Tiles of 8 and 16 pixels (channel_pass_tile_pixels): in place with statistics, vectors and not.
  for (int tile : {8, 16}) {
    check_epilogue_pass<__nv_bfloat16>({132, true, true, true, true, false, true, true, true, true, tile}, 1e-7,
                                       "small tiles, vectors");
    check_epilogue_pass<float>({37, false, false, true, false, true, true, true, true, false, tile}, 1e-7,
                               "small tiles, nchw");
  }
  // A residual with strides of its own, NCHW like y (the pixel-fastest pass): 40 channels, two steps of 32.
  check_epilogue_pass<__nv_bfloat16>({40, false, false, true, true, true, false, true, true, false, 16, true}, 1e-7,
                                     "padded residual");
}

TEST_CASE(plane_pass_choice) {
  // The prologue and epilogue passes run pixel-fastest where every tensor they touch is NCHW; grad_y never.
  ChannelPassParams q;
  q.g.batch = 2;
  q.channels = 16, q.h = 3, q.w = 5;
  float buffer[1];
  for (DepthwiseTensor* t : {&q.y, &q.result, &q.act}) {
    t->data = buffer;
    strides(16, 3, 5, false, t->stride);
  }
  EXPECT(channel_pass_planes(q, ChannelPass::Epilogue));
  EXPECT(!channel_pass_planes(q, ChannelPass::GradY));
  strides(16, 3, 5, true, q.act.stride);  // a channels-last residual
  EXPECT(!channel_pass_planes(q, ChannelPass::Epilogue));
  q.act.data = nullptr;  // no residual
  EXPECT(channel_pass_planes(q, ChannelPass::Epilogue));
}

TEST_CASE(channel_pass_tile_choice) {
  // 64 pixels while that gives 4 blocks per multiprocessor, then halved, never under 8.
  EXPECT(channel_pass_tile_pixels(32 * 147 * 147, 132) == 64);
  EXPECT(channel_pass_tile_pixels(32 * 19 * 19, 132) == 16);  // 180 blocks of 64; 722 of 16
  EXPECT(channel_pass_tile_pixels(32 * 10 * 10, 132) == 8);   // 400 blocks of 8
  EXPECT(channel_pass_tile_pixels(1, 132) == 8);
  EXPECT(channel_pass_tile_pixels(64 * 4 * 132, 132) == 64);
  EXPECT(channel_pass_tile_pixels(64 * 4 * 132 - 64, 132) == 32);
}

// ---- the depthwise kernels: the launchers' plans (cuda/depthwise_launch.cu), emulated ----

unsigned int elementwise_blocks(int64_t total) {
  return static_cast<unsigned int>(std::min<int64_t>((total + kDepthwiseThreads - 1) / kDepthwiseThreads,
                                                     kDepthwiseMaxBlocks));
}

template <typename T, bool kCL>
void check_depthwise(const Case& k, double tol, const char* what) {
  std::mt19937 rng(static_cast<unsigned>(k.c * 17 + k.h));
  std::normal_distribution<float> normal(0.f, 1.f);
  const Conv2dGeometry g = [&] {
    Conv2dGeometry d = geometry(k);
    d.out_channels = d.dw_channels();
    return d;
  }();
  const int64_t K = g.dw_channels(), OH = g.out_h, OW = g.out_w, taps = k.kh * k.kw;
  std::vector<T> x(k.n * k.c * k.h * k.w), w(K * taps), gy(k.n * K * OH * OW);
  for (auto& v : x) v = from_float<T>(normal(rng));
  for (auto& v : w) v = from_float<T>(normal(rng));
  for (auto& v : gy) v = from_float<T>(normal(rng));
  std::vector<T> y(gy.size(), from_float<T>(std::nanf(""))), gx(x.size(), from_float<T>(std::nanf("")));
  std::vector<T> gw(w.size(), from_float<T>(std::nanf("")));
  DepthwiseParams p;
  p.g = g;
  p.channels_last = kCL;
  p.use_int32 = true;
  int64_t xs[4], ys[4];
  strides(k.c, k.h, k.w, kCL, xs);
  strides(K, OH, OW, kCL, ys);
  std::copy(xs, xs + 4, p.input.stride);
  std::copy(ys, ys + 4, p.output.stride);
  p.weight.stride[0] = taps, p.weight.stride[1] = taps, p.weight.stride[2] = k.kw, p.weight.stride[3] = 1;

  // forward: input = x, output = y
  p.input.data = x.data(), p.output.data = y.data(), p.weight.data = w.data();
  emulate_launch(kernels::depthwise_forward_kernel<T, int32_t, kCL, 0, 0, 0, 0>,
                 dim3(elementwise_blocks(k.n * K * OH * OW)), dim3(kDepthwiseThreads), p);
  // input gradient: input = grad_x (written), output = grad_y
  p.input.data = gx.data(), p.output.data = gy.data();
  emulate_launch(kernels::depthwise_backward_input_kernel<T, int32_t, kCL, 0, 0, 0, 0>,
                 dim3(elementwise_blocks(k.n * k.c * k.h * k.w)), dim3(kDepthwiseThreads), p);
  // weight gradient: input = x, output = grad_y, weight = grad_w (written)
  p.input.data = x.data(), p.weight.data = gw.data();
  const int64_t slices = depthwise_wgrad_slices(p, static_cast<int>(sizeof(T)));
  std::vector<float> workspace(depthwise_wgrad_workspace_bytes(p, static_cast<int>(sizeof(T))) / sizeof(float),
                               std::nanf(""));
  const int64_t chan_blocks = (K + depthwise_wgrad_channels_per_block(kCL) - 1) / depthwise_wgrad_channels_per_block(kCL);
  emulate_launch(kernels::depthwise_backward_weight_partial_kernel<T, int32_t, kCL, 0, 0>,
                 dim3(static_cast<unsigned>(chan_blocks * taps), static_cast<unsigned>(slices)),
                 dim3(kDepthwiseThreads), p, workspace.data(), slices);
  emulate_launch(kernels::depthwise_backward_weight_reduce_kernel<T>, dim3(static_cast<unsigned>((K * taps + 31) / 32)),
                 dim3(kDepthwiseThreads), p, static_cast<const float*>(workspace.data()), slices);

  std::vector<double> want_y(y.size(), 0), want_gx(x.size(), 0), want_gw(w.size(), 0);
  for (int64_t n = 0; n < k.n; ++n)
    for (int64_t kc = 0; kc < K; ++kc)
      for (int64_t oh = 0; oh < OH; ++oh)
        for (int64_t ow = 0; ow < OW; ++ow) {
          const int64_t yo = n * ys[0] + kc * ys[1] + oh * ys[2] + ow * ys[3];
          for (int64_t i = 0; i < k.kh; ++i)
            for (int64_t j = 0; j < k.kw; ++j) {
              const int64_t ih = oh * k.sh - k.pt + i * k.dh, iw = ow * k.sw - k.pl + j * k.dw;
              if (ih < 0 || ih >= k.h || iw < 0 || iw >= k.w) continue;
              const int64_t xo = n * xs[0] + (kc / k.m) * xs[1] + ih * xs[2] + iw * xs[3];
              want_y[yo] += to_double(x[xo]) * to_double(w[kc * taps + i * k.kw + j]);
              want_gx[xo] += to_double(gy[yo]) * to_double(w[kc * taps + i * k.kw + j]);
              want_gw[kc * taps + i * k.kw + j] += to_double(gy[yo]) * to_double(x[xo]);
            }
        }
  auto as_double = [](const std::vector<T>& v) {
    std::vector<double> d(v.size());
    for (size_t i = 0; i < v.size(); ++i) d[i] = to_double(v[i]);
    return d;
  };
  const double ey = relative_error(as_double(y), want_y), ex = relative_error(as_double(gx), want_gx);
  const double ew = relative_error(as_double(gw), want_gw);
  if (!(ey <= tol && ex <= tol && ew <= tol)) {
    std::printf("  %s: forward %.3g, input grad %.3g, weight grad %.3g > %.3g\n", what, ey, ex, ew, tol);
  }
  EXPECT(ey <= tol && ex <= tol && ew <= tol);
}

TEST_CASE(depthwise_forward_and_gradients) {
  for (const Case* c : {&kPlain, &kInfer, &kOdd, &kGeneric}) {
    check_depthwise<float, false>(*c, 1e-5, "depthwise fp32 NCHW");
    check_depthwise<float, true>(*c, 1e-5, "depthwise fp32 NHWC");
    check_depthwise<__nv_bfloat16, true>(*c, 1e-2, "depthwise bf16 NHWC");
  }
}

// The vector kernels (launcher: depthwise_forward_vectors, depthwise_dgrad_vectors, depthwise_wgrad_vectors) give
// the scalar forms' bits: 3x3 at stride 1, NHWC, channel counts of one vector group (every other thread row a pixel), 33
// groups (a partial power of two) and 300 groups (two per thread), padding and dilation (rows, columns) both ways,
// rows of 9 and 7 pixels (runs of kDepthwiseRun cut short); the forward and input gradient in each of their
// column-sharing forms and the tap-by-tap one; the weight gradient's partials compared slice by slice. Without
// dilation the strip kernels as well, at several strip heights: the forward and input gradient bit for bit, the
// weight gradient's slices summed.
// The strip kernels at a given strip height (the launcher picks one for the GPU's size): forward or input gradient
// over the written tensor's rows x w, and the weight gradient's pass 1 into `slices` slices; channels-last (kCL)
// or NCHW.
template <typename T, bool kGrad, bool kCL = true>
void emulate_strips(const DepthwiseParams& p, int64_t rows, int64_t w, int strip_rows) {
  constexpr int R = depthwise_strip_run(static_cast<int>(sizeof(T)), kCL), V = kCL ? kDepthwiseStripVec : 1;
  const int64_t threads =
      p.g.batch * ((rows + strip_rows - 1) / strip_rows) * ((w + R - 1) / R) * (p.g.in_channels / V);
  const dim3 grid(static_cast<unsigned>((threads + kDepthwiseStripThreads - 1) / kDepthwiseStripThreads));
  const dim3 block(kDepthwiseStripThreads);
  if constexpr (!kGrad) {  // the forward's mid stage: its own instantiations, as the launcher picks them
    if (p.mid_active()) {
      if (p.prologue.active()) {
        emulate_launch(kernels::depthwise_strip_kernel<T, int32_t, V, R, false, true, kCL, true>, grid, block, p,
                       strip_rows);
      } else {
        emulate_launch(kernels::depthwise_strip_kernel<T, int32_t, V, R, false, false, kCL, true>, grid, block, p,
                       strip_rows);
      }
      return;
    }
  }
  if (kGrad ? p.prologue.backward() : p.prologue.active()) {  // as the launcher picks the prologue's forms
    emulate_launch(kernels::depthwise_strip_kernel<T, int32_t, V, R, kGrad, true, kCL>, grid, block, p, strip_rows);
  } else {
    emulate_launch(kernels::depthwise_strip_kernel<T, int32_t, V, R, kGrad, false, kCL>, grid, block, p, strip_rows);
  }
}
template <typename T, bool kCL = true>
void emulate_wgrad_strips(const DepthwiseParams& p, float* workspace, int64_t slices, int strip_rows) {
  constexpr int V = kCL ? kDepthwiseStripVec : 1;
  const int64_t groups = p.g.dw_channels() / V, per_block = kCL ? depthwise_wgrad_vector_groups(groups) : 1;
  constexpr int R = depthwise_strip_run(static_cast<int>(sizeof(T)), kCL);
  emulate_launch(kernels::depthwise_backward_weight_strip_kernel<T, int32_t, V, R, kCL>,
                 dim3(static_cast<unsigned>((groups + per_block - 1) / per_block), static_cast<unsigned>(slices)),
                 dim3(kDepthwiseThreads), p, workspace, slices, strip_rows);
}

// The strip kernels' test layer: a 3x3 kernel at stride 1 over 2 images of c channels, 7 x w_in, `pad` on every side,
// and its params in either layout (32-bit indices, a contiguous weight at `w`; no tensor data yet).
DepthwiseParams strip_layer(int64_t c, int64_t w_in, int64_t pad, bool channels_last, const void* w) {
  Conv2dGeometry g;
  g.batch = 2, g.in_channels = c, g.out_channels = c, g.depth_multiplier = 1, g.in_h = 7, g.in_w = w_in;
  g.kernel_h = g.kernel_w = 3, g.stride_h = g.stride_w = 1, g.dilation_h = g.dilation_w = 1;
  g.pad_top = g.pad_left = g.pad_bottom = g.pad_right = pad;
  g.compute_output_size();
  DepthwiseParams p;
  p.g = g;
  p.channels_last = channels_last;
  p.use_int32 = true;
  strides(c, 7, w_in, channels_last, p.input.stride);
  strides(c, g.out_h, g.out_w, channels_last, p.output.stride);
  p.weight.stride[0] = 9, p.weight.stride[1] = 9, p.weight.stride[2] = 3, p.weight.stride[3] = 1;
  p.weight.data = const_cast<void*>(w);
  return p;
}

// The forward (f: x and any bias set) and the input gradient (d: grad_y set) of a strip_layer by the scalar kernels
// ([0]) and by the strip kernels at `rows` rows per strip ([1]), each output poisoned with NaN first.
template <typename T, bool kCL>
void scalar_and_strip_passes(DepthwiseParams f, DepthwiseParams d, int rows, std::vector<T> (&y)[2],
                             std::vector<T> (&gx)[2]) {
  const Conv2dGeometry& g = f.g;
  const int64_t out_n = g.batch * g.in_channels * g.out_h * g.out_w, in_n = g.batch * g.in_channels * g.in_h * g.in_w;
  const T nan = from_float<T>(std::nanf(""));
  for (auto& v : y) v.assign(out_n, nan);
  for (auto& v : gx) v.assign(in_n, nan);
  f.output.data = y[0].data();
  emulate_launch(kernels::depthwise_forward_kernel<T, int32_t, kCL, 3, 3, 1, 1>, dim3(elementwise_blocks(out_n)),
                 dim3(kDepthwiseThreads), f);
  f.output.data = y[1].data();
  emulate_strips<T, false, kCL>(f, g.out_h, g.out_w, rows);
  d.input.data = gx[0].data();
  emulate_launch(kernels::depthwise_backward_input_kernel<T, int32_t, kCL, 3, 3, 1, 1>,
                 dim3(elementwise_blocks(in_n)), dim3(kDepthwiseThreads), d);
  d.input.data = gx[1].data();
  emulate_strips<T, true, kCL>(d, g.in_h, g.in_w, rows);
}

// The NCHW strips give the scalar NCHW kernels' bits (forward with a bias, input gradient) and their weight
// gradient's sums: rows of 9 and 13 pixels (runs of 4 cut short), padding 0 to 2, strips of 1, 3 and all rows;
// with a prologue, the bits of the same kernels on the prologued input.
template <typename T>
void check_nchw_strips(int64_t c, int64_t w_in, int64_t pad) {
  std::mt19937 rng(static_cast<unsigned>(c * 31 + w_in + pad));
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<T> w(c * 9);
  DepthwiseParams p = strip_layer(c, w_in, pad, false, w.data());
  const Conv2dGeometry& g = p.g;
  const int64_t in_n = 2 * c * 7 * w_in, out_n = 2 * c * g.out_h * g.out_w;
  std::vector<T> x(in_n), bias(c), gy(out_n);
  for (auto* v : {&x, &w, &bias, &gy})
    for (auto& e : *v) e = from_float<T>(normal(rng));
  EXPECT(depthwise_nchw_strips(p) && depthwise_wgrad_strips(p, static_cast<int>(sizeof(T))));
  const T nan = from_float<T>(std::nanf(""));
  for (int rows : {1, 3, 7}) {
    // Forward (input = x, output = y), with a bias; input gradient (input = grad_x, written; output = grad_y).
    DepthwiseParams f = p, d = p;
    f.input.data = x.data(), f.bias = bias.data(), f.bias_stride = 1;
    d.output.data = gy.data();
    std::vector<T> y[2], gx[2];
    scalar_and_strip_passes<T, false>(f, d, rows, y, gx);
    EXPECT(std::memcmp(y[0].data(), y[1].data(), out_n * sizeof(T)) == 0);
    EXPECT(std::memcmp(gx[0].data(), gx[1].data(), in_n * sizeof(T)) == 0);
    // Weight gradient, pass 1 (input = x, output = grad_y): the slices' sums.
    DepthwiseParams b = p;
    b.input.data = x.data(), b.output.data = gy.data();
    const int64_t slices = 3;
    std::vector<float> scalar_ws(slices * c * 9, std::nanf("")), strip_ws = scalar_ws;
    emulate_launch(kernels::depthwise_backward_weight_partial_kernel<T, int32_t, false, 3, 3>,
                   dim3(static_cast<unsigned>((c + 3) / 4), static_cast<unsigned>(slices)), dim3(kDepthwiseThreads), b,
                   scalar_ws.data(), slices);
    emulate_wgrad_strips<T, false>(b, strip_ws.data(), slices, rows);
    std::vector<double> scalar_sum(c * 9, 0.0), strip_sum(c * 9, 0.0);
    for (int64_t sl = 0; sl < slices; ++sl)
      for (int64_t i = 0; i < c * 9; ++i) {
        scalar_sum[i] += scalar_ws[sl * c * 9 + i], strip_sum[i] += strip_ws[sl * c * 9 + i];
      }
    EXPECT(relative_error(strip_sum, scalar_sum) <= 1e-6);

    // A prologue applied on load (the separable backward's recompute and weight gradient in NCHW) gives the bits
    // of the same kernels reading the prologued input written out.
    EXPECT(depthwise_prologue_ok(p.input, g, false, static_cast<int>(sizeof(T))));
    std::vector<float> scale(c), shift(c);
    for (int64_t i = 0; i < c; ++i) scale[i] = 0.5f + std::abs(normal(rng)), shift[i] = 0.5f * normal(rng);
    std::vector<T> prologued(in_n, nan);
    DepthwiseTensor x_view = p.input, out_view = p.input;
    x_view.data = x.data(), out_view.data = prologued.data();
    emulate_launch(kernels::prologue_apply_kernel<T, 1>, dim3(4), dim3(256), x_view, out_view, int64_t{2}, c,
                   int64_t{7}, w_in, static_cast<const float*>(scale.data()), static_cast<const float*>(shift.data()),
                   true);
    DepthwiseParams fp = f, fr = f;
    fp.prologue.scale = scale.data(), fp.prologue.shift = shift.data(), fp.prologue.relu = true;
    fr.input.data = prologued.data();
    std::vector<T> y_fused(out_n, nan), y_plain(out_n, nan);
    fp.output.data = y_fused.data(), fr.output.data = y_plain.data();
    emulate_strips<T, false, false>(fp, g.out_h, g.out_w, rows);
    emulate_strips<T, false, false>(fr, g.out_h, g.out_w, rows);
    EXPECT(std::memcmp(y_fused.data(), y_plain.data(), out_n * sizeof(T)) == 0);
    DepthwiseParams bp = b, br = b;
    bp.prologue = fp.prologue;
    br.input.data = prologued.data();
    std::vector<float> ws_fused(slices * c * 9, std::nanf("")), ws_plain = ws_fused;
    emulate_wgrad_strips<T, false>(bp, ws_fused.data(), slices, rows);
    emulate_wgrad_strips<T, false>(br, ws_plain.data(), slices, rows);
    EXPECT(std::memcmp(ws_fused.data(), ws_plain.data(), ws_plain.size() * sizeof(float)) == 0);
  }
}

// Bit for bit, except that any NaN matches any NaN (its sign and payload depend on the order of the operands).
template <typename T>
bool same_bits_or_nan(const std::vector<T>& a, const std::vector<T>& b) {
  for (size_t i = 0; i < a.size(); ++i) {
    const bool both_nan = std::isnan(to_double(a[i])) && std::isnan(to_double(b[i]));
    if (!both_nan && std::memcmp(&a[i], &b[i], sizeof(T)) != 0) return false;
  }
  return a.size() == b.size();
}

// A strip_layer with padding 1 and random normal x, weights and grad_y (p.weight.data points at w).
template <typename T>
struct RandomStripLayer {
  std::vector<T> x, w, gy;
  DepthwiseParams p;
  RandomStripLayer(int64_t c, int64_t w_in, bool channels_last, unsigned seed) : w(c * 9) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.f, 1.f);
    p = strip_layer(c, w_in, 1, channels_last, w.data());
    x.resize(2 * c * 7 * w_in), gy.resize(2 * c * p.g.out_h * p.g.out_w);
    for (auto* v : {&x, &w, &gy})
      for (auto& e : *v) e = from_float<T>(normal(rng));
  }
};

// With an inf or NaN weight the strip kernels keep the scalar forms' answer at the border, a tap outside the source
// adding nothing (0 * inf would be NaN): their walk with predicated taps (exact_padding), both layouts, strips of 1,
// 3, 4 and 7 rows (every slot of the 4-slot ring first). One channel has an inf, one a NaN, the others finite weights.
template <typename T, bool kCL>
void check_strips_with_non_finite_weights(int64_t c, int64_t w_in) {
  RandomStripLayer<T> layer(c, w_in, kCL, static_cast<unsigned>(c * 7 + w_in + (kCL ? 100 : 0)));
  const Conv2dGeometry& g = layer.p.g;
  layer.w[0] = from_float<T>(INFINITY);        // channel 0, tap (0, 0): outside along the top and left edges
  layer.w[9 + 8] = from_float<T>(std::nanf(""));  // channel 1, tap (2, 2)
  for (int rows : {1, 3, 4, 7}) {
    DepthwiseParams f = layer.p, d = layer.p;
    f.input.data = layer.x.data();
    d.output.data = layer.gy.data();
    std::vector<T> y[2], gx[2];
    scalar_and_strip_passes<T, kCL>(f, d, rows, y, gx);
    EXPECT(same_bits_or_nan(y[0], y[1]));
    EXPECT(same_bits_or_nan(gx[0], gx[1]));
    // Channel 0's top-left pixel, whose inf tap lies outside, is finite.
    for (int64_t n = 0; n < 2; ++n) {
      const int64_t corner = kCL ? n * g.out_h * g.out_w * c : n * c * g.out_h * g.out_w;
      EXPECT(std::isfinite(to_double(y[1][corner])));
    }
  }
}

// With an inf in x or grad_y the weight gradient's strip kernel keeps the scalar form's answer: an inf where it gives
// one, NaN where it does, finite elsewhere (its exact walks would multiply the inf by a zero outside the image,
// NaN, and the thread redoes its items with predicated products). Slices summed per (channel, tap).
template <typename T, bool kCL>
void check_wgrad_strips_with_non_finite_inputs(int64_t c, int64_t w_in) {
  RandomStripLayer<T> layer(c, w_in, kCL, static_cast<unsigned>(c * 5 + w_in + (kCL ? 10 : 0)));
  DepthwiseParams& p = layer.p;
  const Conv2dGeometry& g = p.g;
  std::vector<T>& x = layer.x;
  std::vector<T>& gy = layer.gy;
  const int64_t corner = 6 * w_in + w_in - 1;  // image 0, bottom-right pixel: outputs past the right edge read it
  x[kCL ? corner * c : corner] = from_float<T>(INFINITY);  // channel 0
  const int64_t top_right = g.out_w - 1;                  // channel 1 (c >= 2), image 0, top row's last pixel
  gy[kCL ? top_right * c + 1 : g.out_h * g.out_w + top_right] = from_float<T>(-INFINITY);
  p.input.data = x.data(), p.output.data = gy.data();
  const int64_t slices = 3, per_block = depthwise_wgrad_channels_per_block(kCL);
  std::vector<float> scalar_ws(slices * c * 9, std::nanf(""));
  emulate_launch(kernels::depthwise_backward_weight_partial_kernel<T, int32_t, kCL, 3, 3>,
                 dim3(static_cast<unsigned>((c + per_block - 1) / per_block), static_cast<unsigned>(slices)),
                 dim3(kDepthwiseThreads), p, scalar_ws.data(), slices);
  auto totals = [&](const std::vector<float>& ws) {
    std::vector<double> sum(c * 9, 0.0);
    for (int64_t sl = 0; sl < slices; ++sl)
      for (int64_t i = 0; i < c * 9; ++i) sum[i] += ws[sl * c * 9 + i];
    return sum;
  };
  const std::vector<double> want = totals(scalar_ws);
  int non_finite = 0;
  for (double v : want) non_finite += !std::isfinite(v);
  EXPECT(non_finite > 0 && non_finite < c * 9);  // the case tests something
  for (int rows : {1, 3, 7}) {
    std::vector<float> strip_ws(slices * c * 9, std::nanf(""));
    emulate_wgrad_strips<T, kCL>(p, strip_ws.data(), slices, rows);
    const std::vector<double> got = totals(strip_ws);
    bool same = true;
    for (int64_t i = 0; i < c * 9; ++i) {
      if (std::isfinite(want[i])) {
        same &= std::abs(got[i] - want[i]) <= 1e-5 * (1.0 + std::abs(want[i]));
      } else {
        same &= std::isnan(want[i]) ? std::isnan(got[i]) : got[i] == want[i];
      }
    }
    EXPECT(same);
  }
}

TEST_CASE(strips_with_non_finite_values_skip_the_taps_outside) {
  check_strips_with_non_finite_weights<__nv_bfloat16, true>(8, 9);
  check_strips_with_non_finite_weights<float, true>(4, 13);
  check_strips_with_non_finite_weights<__half, false>(3, 13);
  check_strips_with_non_finite_weights<float, false>(2, 9);
  check_wgrad_strips_with_non_finite_inputs<__nv_bfloat16, true>(8, 9);
  check_wgrad_strips_with_non_finite_inputs<float, true>(4, 13);
  check_wgrad_strips_with_non_finite_inputs<__half, false>(3, 13);
  check_wgrad_strips_with_non_finite_inputs<float, false>(2, 9);
}

TEST_CASE(nchw_strip_kernels_match_the_scalar_forms) {
  for (int64_t pad : {0, 1, 2}) {
    check_nchw_strips<float>(3, 9, pad);
    check_nchw_strips<__nv_bfloat16>(5, 13, pad);
    check_nchw_strips<__half>(2, 9, pad);
  }
}

template <typename T>
void check_dgrad_vectors(int64_t c, int64_t pad, int64_t dil, int64_t dil_w) {
  std::mt19937 rng(static_cast<unsigned>(c + pad * 7 + dil + dil_w * 3));
  std::normal_distribution<float> normal(0.f, 1.f);
  Conv2dGeometry g;
  g.batch = 2, g.in_channels = c, g.out_channels = c, g.depth_multiplier = 1, g.in_h = 7, g.in_w = 9;
  g.kernel_h = g.kernel_w = 3, g.stride_h = g.stride_w = 1, g.dilation_h = dil, g.dilation_w = dil_w;
  g.pad_top = g.pad_left = pad, g.pad_bottom = g.pad_right = pad;
  g.out_h = g.in_h + 2 * pad - 2 * dil, g.out_w = g.in_w + 2 * pad - 2 * dil_w;
  std::vector<T> w(c * 9), gy(2 * c * g.out_h * g.out_w);
  for (auto& v : w) v = from_float<T>(normal(rng));
  for (auto& v : gy) v = from_float<T>(normal(rng));
  std::vector<T> gather(2 * c * 7 * 9, from_float<T>(std::nanf(""))), vec = gather;
  DepthwiseParams p;
  p.g = g;
  p.channels_last = true;
  p.use_int32 = true;
  strides(c, 7, 9, true, p.input.stride);
  strides(c, g.out_h, g.out_w, true, p.output.stride);
  p.weight.stride[0] = 9, p.weight.stride[1] = 9, p.weight.stride[2] = 3, p.weight.stride[3] = 1;
  p.output.data = gy.data(), p.weight.data = w.data();
  p.input.data = gather.data();
  emulate_launch(kernels::depthwise_backward_input_kernel<T, int32_t, true, 3, 3, 1, 1>,
                 dim3(elementwise_blocks(2 * c * 7 * 9)), dim3(kDepthwiseThreads), p);
  p.input.data = vec.data();
  EXPECT(depthwise_dgrad_vectors(p, static_cast<int>(sizeof(T))));
  const int rows = kDepthwiseThreads / depthwise_vector_lanes(c / kDepthwiseVec);
  const dim3 dgrad_grid(static_cast<unsigned>(std::min<int64_t>((2 * 7 * 3 + rows - 1) / rows, 3)));
  if (dil_w == 1) {  // the column-sharing form, which the launcher takes here
    emulate_launch(kernels::depthwise_backward_input_vector_kernel<T, int32_t, kDepthwiseVec, true>, dgrad_grid,
                   dim3(kDepthwiseThreads), p);
    EXPECT(std::memcmp(gather.data(), vec.data(), vec.size() * sizeof(T)) == 0);
    std::fill(vec.begin(), vec.end(), from_float<T>(std::nanf("")));
  }
  emulate_launch(kernels::depthwise_backward_input_vector_kernel<T, int32_t, kDepthwiseVec, false>, dgrad_grid,
                 dim3(kDepthwiseThreads), p);
  EXPECT(std::memcmp(gather.data(), vec.data(), vec.size() * sizeof(T)) == 0);
  const bool strips = depthwise_strips(p, static_cast<int>(sizeof(T)));
  EXPECT(strips == (dil == 1 && dil_w == 1));
  if (strips) {  // strips of 1, 3 (a short last strip) and all 7 rows
    for (int rows : {1, 3, 7}) {
      std::fill(vec.begin(), vec.end(), from_float<T>(std::nanf("")));
      emulate_strips<T, true>(p, 7, 9, rows);
      EXPECT(std::memcmp(gather.data(), vec.data(), vec.size() * sizeof(T)) == 0);
    }
  }

  // Weight gradient, pass 1: input = x, output = grad_y; the same slices for both forms.
  std::vector<T> x(2 * c * 7 * 9);
  for (auto& v : x) v = from_float<T>(normal(rng));
  p.input.data = x.data();

  // Forward (input = x, output = y), with a bias and at stride 2 as well (the vector kernel takes any stride).
  std::vector<T> bias(c);
  for (auto& v : bias) v = from_float<T>(normal(rng));
  for (int64_t s : {1, 2}) {
    DepthwiseParams f = p;
    f.g.stride_h = f.g.stride_w = s;
    f.g.out_h = (7 + 2 * pad - 2 * dil - 1) / s + 1, f.g.out_w = (9 + 2 * pad - 2 * dil_w - 1) / s + 1;
    strides(c, f.g.out_h, f.g.out_w, true, f.output.stride);
    f.bias = bias.data();
    f.bias_stride = 1;
    const int64_t outs = 2 * c * f.g.out_h * f.g.out_w;
    std::vector<T> y_scalar(outs, from_float<T>(std::nanf(""))), y_vector = y_scalar;
    f.output.data = y_scalar.data();
    emulate_launch(kernels::depthwise_forward_kernel<T, int32_t, true, 3, 3, 0, 0>, dim3(elementwise_blocks(outs)),
                   dim3(kDepthwiseThreads), f);
    f.output.data = y_vector.data();
    EXPECT(depthwise_forward_vectors(f, static_cast<int>(sizeof(T))));
    if (dil_w == 1) {  // the column-sharing form of this stride, which the launcher takes here
      if (s == 1) {
        emulate_launch(kernels::depthwise_forward_vector_kernel<T, int32_t, kDepthwiseVec, 1>, dim3(2),
                       dim3(kDepthwiseThreads), f);
      } else {
        emulate_launch(kernels::depthwise_forward_vector_kernel<T, int32_t, kDepthwiseVec, 2>, dim3(2),
                       dim3(kDepthwiseThreads), f);
      }
      EXPECT(std::memcmp(y_scalar.data(), y_vector.data(), y_vector.size() * sizeof(T)) == 0);
      std::fill(y_vector.begin(), y_vector.end(), from_float<T>(std::nanf("")));
    }
    emulate_launch(kernels::depthwise_forward_vector_kernel<T, int32_t, kDepthwiseVec, 0>, dim3(2),
                   dim3(kDepthwiseThreads), f);
    EXPECT(std::memcmp(y_scalar.data(), y_vector.data(), y_vector.size() * sizeof(T)) == 0);
    if (depthwise_strips(f, static_cast<int>(sizeof(T)))) {
      for (int rows : {2, 32}) {
        std::fill(y_vector.begin(), y_vector.end(), from_float<T>(std::nanf("")));
        emulate_strips<T, false>(f, f.g.out_h, f.g.out_w, rows);
        EXPECT(std::memcmp(y_scalar.data(), y_vector.data(), y_vector.size() * sizeof(T)) == 0);
      }
    }
  }
  EXPECT(depthwise_wgrad_vectors(p, static_cast<int>(sizeof(T))));
  const int64_t slices = 3;
  std::vector<float> scalar_ws(slices * c * 9, std::nanf("")), vector_ws = scalar_ws;
  emulate_launch(kernels::depthwise_backward_weight_partial_kernel<T, int32_t, true, 3, 3>,
                 dim3(static_cast<unsigned>((c + 31) / 32), static_cast<unsigned>(slices)), dim3(kDepthwiseThreads),
                 p, scalar_ws.data(), slices);
  const int64_t groups = c / kDepthwiseVec, per_block = depthwise_wgrad_vector_groups(groups);
  emulate_launch(kernels::depthwise_backward_weight_partial_vector_kernel<T, int32_t, kDepthwiseVec>,
                 dim3(static_cast<unsigned>((groups + per_block - 1) / per_block), static_cast<unsigned>(slices)),
                 dim3(kDepthwiseThreads), p, vector_ws.data(), slices);
  if (per_block == 32) {  // the scalar form's block shape: the same partials, bit for bit
    EXPECT(std::memcmp(scalar_ws.data(), vector_ws.data(), vector_ws.size() * sizeof(float)) == 0);
  } else {  // a narrow layer's blocks: other lanes, so the same sums in another order
    std::vector<double> scalar_sum(c * 9, 0.0), vector_sum(c * 9, 0.0);
    for (int64_t s = 0; s < slices; ++s)
      for (int64_t i = 0; i < c * 9; ++i) scalar_sum[i] += scalar_ws[s * c * 9 + i], vector_sum[i] += vector_ws[s * c * 9 + i];
    EXPECT(relative_error(vector_sum, scalar_sum) <= 1e-6);
  }
  if (strips) {  // the strip form's slices sum to the same totals
    EXPECT(depthwise_wgrad_strips(p, static_cast<int>(sizeof(T))));
    std::vector<double> scalar_sum(c * 9, 0.0);
    for (int64_t s = 0; s < slices; ++s)
      for (int64_t i = 0; i < c * 9; ++i) scalar_sum[i] += scalar_ws[s * c * 9 + i];
    for (int rows : {1, 3, 7}) {
      std::vector<float> strip_ws(slices * c * 9, std::nanf(""));
      emulate_wgrad_strips<T>(p, strip_ws.data(), slices, rows);
      std::vector<double> strip_sum(c * 9, 0.0);
      for (int64_t s = 0; s < slices; ++s)
        for (int64_t i = 0; i < c * 9; ++i) strip_sum[i] += strip_ws[s * c * 9 + i];
      EXPECT(relative_error(strip_sum, scalar_sum) <= 1e-6);
    }
  }

  // A prologue applied on load (DepthwisePrologue: the separable backward's recompute) gives the bits of the same
  // kernels reading the prologued input written out (by the backward's own prologue_apply kernel); with and
  // without the ReLU, and without a scale.
  EXPECT(depthwise_prologue_ok(p.input, p.g, true, static_cast<int>(sizeof(T))));
  std::vector<float> scale(c), shift(c);
  for (int64_t i = 0; i < c; ++i) scale[i] = 0.5f + std::abs(normal(rng)), shift[i] = 0.5f * normal(rng);
  for (int variant = 0; variant < 3; ++variant) {
    DepthwisePrologue pro;
    pro.scale = variant == 2 ? nullptr : scale.data();
    pro.shift = shift.data();
    pro.relu = variant != 1;
    std::vector<T> prologued(x.size(), from_float<T>(std::nanf("")));
    DepthwiseTensor out_view = p.input;
    out_view.data = prologued.data();
    emulate_launch(kernels::prologue_apply_kernel<T, 1>, dim3(4), dim3(256), p.input, out_view, int64_t{2}, c,
                   int64_t{7}, int64_t{9}, pro.scale, pro.shift, pro.relu);
    DepthwiseParams f = p, r = p;  // forward: output = y; r reads the prologued input
    std::vector<T> y_fused(2 * c * g.out_h * g.out_w, from_float<T>(std::nanf(""))), y_plain = y_fused;
    f.output.data = y_fused.data(), r.output.data = y_plain.data();
    f.prologue = pro;
    r.input.data = prologued.data();
    emulate_launch(kernels::depthwise_forward_vector_kernel<T, int32_t, kDepthwiseVec, 0>, dim3(2),
                   dim3(kDepthwiseThreads), f);
    emulate_launch(kernels::depthwise_forward_vector_kernel<T, int32_t, kDepthwiseVec, 0>, dim3(2),
                   dim3(kDepthwiseThreads), r);
    EXPECT(std::memcmp(y_fused.data(), y_plain.data(), y_plain.size() * sizeof(T)) == 0);
    DepthwiseParams wf = p, wr = p;  // weight gradient: output = grad_y (gy)
    wf.prologue = pro;
    wr.input.data = prologued.data();
    std::vector<float> ws_fused(slices * c * 9, std::nanf("")), ws_plain = ws_fused;
    const dim3 wgrid(static_cast<unsigned>((groups + per_block - 1) / per_block), static_cast<unsigned>(slices));
    emulate_launch(kernels::depthwise_backward_weight_partial_vector_kernel<T, int32_t, kDepthwiseVec>, wgrid,
                   dim3(kDepthwiseThreads), wf, ws_fused.data(), slices);
    emulate_launch(kernels::depthwise_backward_weight_partial_vector_kernel<T, int32_t, kDepthwiseVec>, wgrid,
                   dim3(kDepthwiseThreads), wr, ws_plain.data(), slices);
    EXPECT(std::memcmp(ws_fused.data(), ws_plain.data(), ws_plain.size() * sizeof(float)) == 0);
    if (strips) {  // the strip forms, likewise
      std::fill(y_fused.begin(), y_fused.end(), from_float<T>(std::nanf("")));
      std::fill(y_plain.begin(), y_plain.end(), from_float<T>(std::nanf("")));
      emulate_strips<T, false>(f, g.out_h, g.out_w, 3);
      emulate_strips<T, false>(r, g.out_h, g.out_w, 3);
      EXPECT(std::memcmp(y_fused.data(), y_plain.data(), y_plain.size() * sizeof(T)) == 0);
      std::fill(ws_fused.begin(), ws_fused.end(), std::nanf(""));
      std::fill(ws_plain.begin(), ws_plain.end(), std::nanf(""));
      emulate_wgrad_strips<T>(wf, ws_fused.data(), slices, 2);
      emulate_wgrad_strips<T>(wr, ws_plain.data(), slices, 2);
      EXPECT(std::memcmp(ws_fused.data(), ws_plain.data(), ws_plain.size() * sizeof(float)) == 0);
    }
  }
}

// ---- the depthwise forward with the mid stage on its stores (DepthwiseParams::mid: the staged separable forward) ----

// The mid stage in float64 at kernels::mid_value's rounding points, on d as the same kernel writes it without the
// stage (rounded to T): d * scale + shift (exact in float64), rounded to float32 as fmaf rounds and then to T; relu,
// relu6 (exact); elu through expm1f, and hardswish in float32 as PyTorch orders it, each rounded to T.
template <typename T>
T reference_mid_stage(T d, int mid, bool affine, float scale, float shift) {
  double v = to_double(d);
  if (affine) v = to_double(from_float<T>(static_cast<float>(v * scale + shift)));
  if (mid == 1) v = v > 0 ? v : 0.0;
  if (mid == 3) v = v > 6 ? 6.0 : v > 0 ? v : 0.0;
  if (mid == 2 && !(v > 0)) v = to_double(from_float<T>(expm1f(static_cast<float>(v))));
  if (mid == 4) {
    const float f = static_cast<float>(v);
    v = to_double(from_float<T>(f * std::fmin(std::fmax(f + 3.f, 0.f), 6.f) / 6.f));
  }
  return from_float<T>(static_cast<float>(v));
}

// Runs `launch` (one forward path) on f without the mid stage and then with each of its 19 forms (relu, elu, relu6,
// hardswish, none; scale only, shift only, both, neither), and compares every output element's bits with reference_mid_stage
// of the first run's. The vectors hold their K values and then NaN, so that a read past K shows.
template <typename T, typename Launch>
void check_forward_mid(DepthwiseParams f, const Launch& launch, const char* what) {
  const Conv2dGeometry& g = f.g;
  const int64_t K = g.dw_channels(), outs = g.batch * K * g.out_h * g.out_w;
  std::mt19937 rng(static_cast<unsigned>(K * 7 + g.out_w));
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_real_distribution<float> uniform(-1.f, 3.f);  // negative scales, and values past relu6's 6
  std::vector<float> scale(K + 8, std::nanf("")), shift(K + 8, std::nanf(""));
  for (int64_t i = 0; i < K; ++i) scale[i] = uniform(rng), shift[i] = 2.f * normal(rng);
  const T nan = from_float<T>(std::nanf(""));
  std::vector<T> plain(outs, nan), got(outs, nan);
  f.output.data = plain.data();
  launch(f);
  int bad = 0;
  for (int mid = 0; mid < 5; ++mid) {
    for (int affine = 0; affine < 4; ++affine) {
      if (mid == 0 && affine == 0) continue;  // the plain run
      DepthwiseParams m = f;
      m.mid = mid;
      m.mid_scale = affine & 1 ? scale.data() : nullptr;
      m.mid_shift = affine & 2 ? shift.data() : nullptr;
      std::fill(got.begin(), got.end(), nan);
      m.output.data = got.data();
      launch(m);
      for (int64_t n = 0; n < g.batch; ++n)
        for (int64_t c = 0; c < K; ++c)
          for (int64_t h = 0; h < g.out_h; ++h)
            for (int64_t w = 0; w < g.out_w; ++w) {
              const int64_t o = n * f.output.stride[0] + c * f.output.stride[1] + h * f.output.stride[2] +
                                w * f.output.stride[3];
              const T want = reference_mid_stage<T>(plain[o], mid, affine != 0, affine & 1 ? scale[c] : 1.f,
                                                    affine & 2 ? shift[c] : 0.f);
              if (std::memcmp(&want, &got[o], sizeof(T)) != 0 && bad++ == 0) {
                std::printf("  %s: mid %d affine %d, (%lld, %lld, %lld, %lld): %g, want %g (d %g)\n", what, mid,
                            affine, static_cast<long long>(n), static_cast<long long>(c), static_cast<long long>(h),
                            static_cast<long long>(w), to_double(got[o]), to_double(want), to_double(plain[o]));
              }
            }
    }
  }
  EXPECT(bad == 0);
}

// A layer of Case k (its geometry, depthwise only) in either layout with contiguous x and y, and random x and weights
// (held in x, w).
template <typename T>
DepthwiseParams mid_layer(const Case& k, bool channels_last, std::vector<T>& x, std::vector<T>& w) {
  std::mt19937 rng(static_cast<unsigned>(k.c * 13 + k.w + (channels_last ? 1 : 0)));
  std::normal_distribution<float> normal(0.f, 1.f);
  DepthwiseParams p;
  p.g = geometry(k);
  p.g.out_channels = p.g.dw_channels();
  p.channels_last = channels_last;
  p.use_int32 = true;
  x.resize(k.n * k.c * k.h * k.w);
  w.resize(p.g.dw_channels() * k.kh * k.kw);
  for (auto& v : x) v = from_float<T>(normal(rng));
  for (auto& v : w) v = from_float<T>(normal(rng));
  strides(k.c, k.h, k.w, channels_last, p.input.stride);
  strides(p.g.dw_channels(), p.g.out_h, p.g.out_w, channels_last, p.output.stride);
  const int64_t taps = k.kh * k.kw;
  p.weight.stride[0] = taps, p.weight.stride[1] = taps, p.weight.stride[2] = k.kw, p.weight.stride[3] = 1;
  p.input.data = x.data(), p.weight.data = w.data();
  return p;
}

// Every forward path with the mid stage, as the launcher picks its instantiation: the scalar kernels (any kernel
// size with a depth multiplier, stride and dilation; 3x3 at stride 2), both layouts; the vector kernels at stride 1,
// 2 and the tap-by-tap form (dilation 2); the channels-last and NCHW strip kernels; with and without a prologue on
// load.
template <typename T>
void check_forward_mid_paths() {
  //                     n   c   h   w  m cout kh kw sh sw pt pb pl pr dh dw  in_aff relu mid out_aff relu res stats
  const Case odd{3, 4, 7, 10, 2, 8, 5, 3, 1, 2, 2, 1, 0, 1, 1, 2, false, false, 0, false, false, false, false};
  const Case s2{1, 40, 17, 19, 1, 40, 3, 3, 2, 2, 0, 1, 0, 1, 1, 1, false, false, 0, false, false, false, false};
  const Case s1{2, 12, 7, 9, 1, 12, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, false, false, 0, false, false, false, false};
  const Case dil{2, 132, 7, 9, 1, 132, 3, 3, 1, 1, 2, 2, 2, 2, 2, 2, false, false, 0, false, false, false, false};
  const Case nchw{2, 5, 7, 13, 1, 5, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, false, false, 0, false, false, false, false};
  std::vector<T> x, w;
  auto scalar = [](const DepthwiseParams& q, auto kernel) {
    const Conv2dGeometry& g = q.g;
    emulate_launch(kernel, dim3(elementwise_blocks(g.batch * g.dw_channels() * g.out_h * g.out_w)),
                   dim3(kDepthwiseThreads), q);
  };
  for (bool cl : {false, true}) {
    const DepthwiseParams a = mid_layer<T>(odd, cl, x, w);
    if (cl) {
      check_forward_mid<T>(a, [&](const DepthwiseParams& q) {
        scalar(q, kernels::depthwise_forward_kernel<T, int32_t, true, 0, 0, 0, 0>);
      }, "scalar generic NHWC");
    } else {
      check_forward_mid<T>(a, [&](const DepthwiseParams& q) {
        scalar(q, kernels::depthwise_forward_kernel<T, int32_t, false, 0, 0, 0, 0>);
      }, "scalar generic NCHW");
    }
  }
  {
    const DepthwiseParams a = mid_layer<T>(s2, false, x, w);
    check_forward_mid<T>(a, [&](const DepthwiseParams& q) {
      scalar(q, kernels::depthwise_forward_kernel<T, int32_t, false, 3, 3, 2, 2>);
    }, "scalar 3x3 stride 2 NCHW");
  }
  // The vector kernels (channels-last), as forward_for_layout launches them.
  auto vector = [](auto sw) {
    constexpr int kSW = decltype(sw)::value;
    return [](const DepthwiseParams& q) {
      EXPECT(depthwise_forward_vectors(q, static_cast<int>(sizeof(T))));
      if (q.mid_active()) {
        emulate_launch(kernels::depthwise_forward_vector_kernel<T, int32_t, kDepthwiseVec, kSW, true>, dim3(2),
                       dim3(kDepthwiseThreads), q);
      } else {
        emulate_launch(kernels::depthwise_forward_vector_kernel<T, int32_t, kDepthwiseVec, kSW>, dim3(2),
                       dim3(kDepthwiseThreads), q);
      }
    };
  };
  std::vector<float> pscale(132), pshift(132);
  {
    std::mt19937 rng(5);
    std::normal_distribution<float> normal(0.f, 1.f);
    for (size_t i = 0; i < pscale.size(); ++i) pscale[i] = 0.5f + std::abs(normal(rng)), pshift[i] = 0.5f * normal(rng);
  }
  for (bool prologue : {false, true}) {
    auto with_prologue = [&](DepthwiseParams q) {
      if (prologue) q.prologue.scale = pscale.data(), q.prologue.shift = pshift.data(), q.prologue.relu = true;
      return q;
    };
    check_forward_mid<T>(with_prologue(mid_layer<T>(s1, true, x, w)), vector(std::integral_constant<int, 1>{}),
                         prologue ? "vectors stride 1, prologue" : "vectors stride 1");
    check_forward_mid<T>(with_prologue(mid_layer<T>(s2, true, x, w)), vector(std::integral_constant<int, 2>{}),
                         prologue ? "vectors stride 2, prologue" : "vectors stride 2");
    check_forward_mid<T>(with_prologue(mid_layer<T>(dil, true, x, w)), vector(std::integral_constant<int, 0>{}),
                         prologue ? "vectors dilated, prologue" : "vectors dilated");
    // The strip kernels: channels-last (vectors of 2 channels, 12 and 132 channels) and NCHW, 3 rows per strip.
    for (const Case* c : {&s1, &dil}) {
      Case k = *c;
      k.pt = k.pb = k.pl = k.pr = 1, k.dh = k.dw = 1;
      const DepthwiseParams a = with_prologue(mid_layer<T>(k, true, x, w));
      check_forward_mid<T>(a, [](const DepthwiseParams& q) {
        EXPECT(depthwise_strips(q, static_cast<int>(sizeof(T))));  // (with its output set)
        emulate_strips<T, false>(q, q.g.out_h, q.g.out_w, 3);
      }, prologue ? "strips NHWC, prologue" : "strips NHWC");
    }
    const DepthwiseParams a = with_prologue(mid_layer<T>(nchw, false, x, w));
    EXPECT(depthwise_nchw_strips(a));
    check_forward_mid<T>(a, [](const DepthwiseParams& q) { emulate_strips<T, false, false>(q, q.g.out_h, q.g.out_w, 3); },
                         prologue ? "strips NCHW, prologue" : "strips NCHW");
  }
}

TEST_CASE(depthwise_forward_applies_the_mid_stage_as_it_stores) {
  check_forward_mid_paths<float>();
  check_forward_mid_paths<__half>();
  check_forward_mid_paths<__nv_bfloat16>();
}

TEST_CASE(depthwise_vector_kernels_match_the_scalar_forms) {
  for (int64_t c : {4, 132, 1040}) {
    check_dgrad_vectors<float>(c, 1, 1, 1);
    check_dgrad_vectors<__nv_bfloat16>(c, 2, 2, 2);
    check_dgrad_vectors<__half>(c, 0, 1, 1);
    check_dgrad_vectors<__nv_bfloat16>(c, 1, 2, 1);  // rows dilated, columns not: the column-sharing forms
    check_dgrad_vectors<__nv_bfloat16>(c, 3, 1, 1);  // strips with padding beyond the kernel's reach
  }
}

// The input gradient's strip kernel through the prologue's backward (DepthwisePrologue::x, the separable backward)
// writes the bits that the plain strip kernel followed by the backward's own prologue pass
// (separable_channel_pass_kernel) write, and its per-thread partial rows sum to that pass's per-channel sums:
// channels-last and NCHW, rows of 9 and 13 (runs cut short), padding 0 to 2, strips of 1, 3 and all 7 rows; with
// and without the ReLU and the scale; without the sums.
template <typename T, bool kCL>
void check_dgrad_through_prologue(int64_t c, int64_t w_in, int64_t pad) {
  std::mt19937 rng(static_cast<unsigned>(c * 17 + w_in * 3 + pad + (kCL ? 1000 : 0)));
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<T> w(c * 9);
  DepthwiseParams p = strip_layer(c, w_in, pad, kCL, w.data());
  const Conv2dGeometry& g = p.g;
  const int64_t in_n = 2 * c * 7 * w_in, out_n = 2 * c * g.out_h * g.out_w;
  std::vector<T> x(in_n), gy(out_n);
  for (auto* v : {&x, &w, &gy})
    for (auto& e : *v) e = from_float<T>(normal(rng));
  std::vector<float> scale(c), shift(c);
  for (int64_t i = 0; i < c; ++i) scale[i] = normal(rng), shift[i] = 0.5f * normal(rng);  // some scales negative
  p.output.data = gy.data();
  constexpr int R = depthwise_strip_run(static_cast<int>(sizeof(T)), kCL);
  const T nan = from_float<T>(std::nanf(""));
  for (int variant = 0; variant < 3; ++variant) {
    DepthwisePrologue pro;
    pro.scale = variant == 2 ? nullptr : scale.data();
    pro.shift = shift.data();
    pro.relu = variant != 1;
    for (int rows : {1, 3, 7}) {
      // The two passes: the plain input gradient, then the prologue's backward over it.
      std::vector<T> grad_in(in_n, nan), gx_two(in_n, nan), gx_one(in_n, nan);
      DepthwiseParams d = p;
      d.input.data = grad_in.data();
      EXPECT(kCL ? depthwise_strips(d, static_cast<int>(sizeof(T))) : depthwise_nchw_strips(d));
      emulate_strips<T, true, kCL>(d, 7, w_in, rows);
      ChannelPassParams r;
      r.g = g;
      r.channels = c, r.h = 7, r.w = w_in;
      r.grad = p.input, r.act = p.input, r.result = p.input;
      r.grad.data = grad_in.data(), r.act.data = x.data(), r.result.data = gx_two.data();
      r.scale = pro.scale, r.vec_a = pro.shift, r.relu = pro.relu;
      const int64_t tiles = channel_pass_tiles(r);
      std::vector<float> tile_sums(tiles * 2 * c, std::nanf(""));
      r.partial = tile_sums.data();
      emulate_channel_pass<T, ChannelPass::Prologue>(r, false);
      // One pass.
      DepthwiseParams f = p;
      f.input.data = gx_one.data();
      f.prologue = pro;
      f.prologue.x = p.input;
      f.prologue.x.data = x.data();
      const int64_t items = 2 * ((7 + rows - 1) / rows) * ((w_in + R - 1) / R);
      std::vector<float> item_sums(items * 2 * c, std::nanf(""));
      f.prologue.partial = variant == 2 && rows == 3 ? nullptr : item_sums.data();
      emulate_strips<T, true, kCL>(f, 7, w_in, rows);
      EXPECT(std::memcmp(gx_two.data(), gx_one.data(), in_n * sizeof(T)) == 0);
      if (f.prologue.partial == nullptr) continue;
      std::vector<double> two(2 * c, 0.0), one(2 * c, 0.0);
      for (int64_t t = 0; t < tiles; ++t)
        for (int64_t i = 0; i < 2 * c; ++i) two[i] += tile_sums[t * 2 * c + i];
      for (int64_t t = 0; t < items; ++t)
        for (int64_t i = 0; i < 2 * c; ++i) one[i] += item_sums[t * 2 * c + i];
      EXPECT(relative_error(one, two) <= 1e-6);
    }
  }
}

TEST_CASE(input_gradient_strips_apply_the_prologues_backward) {
  for (int64_t pad : {0, 1, 2}) {
    check_dgrad_through_prologue<__nv_bfloat16, true>(8, 9, pad);
    check_dgrad_through_prologue<float, true>(4, 13, pad);
    check_dgrad_through_prologue<__half, true>(132, 9, pad);
    check_dgrad_through_prologue<__nv_bfloat16, false>(3, 13, pad);
    check_dgrad_through_prologue<float, false>(2, 9, pad);
  }
}

TEST_CASE(strip_heights_are_even_across_a_layers_strips) {
  // Xception's 728-channel layer at 37^2, bf16 channels-last, batch 32: ~2^18 threads' worth is 16 rows, three
  // strips, evened out to 13 + 13 + 11.
  EXPECT(depthwise_strip_rows(32 * 10 * 364, 37) == 13);
  for (int64_t rows = 1; rows <= 300; ++rows) {
    for (int64_t items : {int64_t{1}, int64_t{5000}, int64_t{37888}, int64_t{116480}, int64_t{1} << 22}) {
      const int64_t s = depthwise_strip_rows(items, rows);
      const int64_t strips = (rows + s - 1) / s;
      int64_t wanted = items * rows / (int64_t{1} << 18);  // the uneven choice: at most 32 rows, at least 1
      wanted = wanted > 32 ? 32 : (wanted > rows ? rows : (wanted < 1 ? 1 : wanted));
      EXPECT(s >= 1 && s <= wanted);
      EXPECT(strips == (rows + wanted - 1) / wanted);  // as many strips (threads) as before
      EXPECT(rows - (strips - 1) * s >= s - strips + 1 && rows - (strips - 1) * s <= s);  // last strip: nearly full
    }
  }
}

TEST_CASE(batch_norm_finalize_its_backward_and_running_statistics_kernels) {
  const int64_t C = 300, count = 50;
  std::vector<float> sum(C), sumsq(C), weight(C), bias(C), out[4];
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (int64_t c = 0; c < C; ++c) {
    const float mean = normal(rng), sd = 0.5f + std::abs(normal(rng));
    sum[c] = mean * count;
    sumsq[c] = (sd * sd + mean * mean) * count;
    weight[c] = 1.f + 0.1f * normal(rng);
    bias[c] = normal(rng);
  }
  sumsq[7] = sum[7] * sum[7] / count - 1.f;  // a negative variance from rounding: clamped to 0
  for (auto& o : out) o.assign(C, std::nanf(""));
  BatchNormFinalizeParams<float> p;
  p.sum = sum.data(), p.sumsq = sumsq.data(), p.weight = weight.data(), p.bias = bias.data();
  p.scale = out[0].data(), p.shift = out[1].data(), p.mean = out[2].data(), p.var = out[3].data();
  p.channels = C, p.count = count, p.eps = 1e-5;
  emulate_launch(kernels::batch_norm_finalize_kernel<float, float>, dim3((C + 255) / 256), dim3(256), p);
  for (int64_t c = 0; c < C; ++c) {
    const double mean = double(sum[c]) / count;
    const double var = std::max(double(sumsq[c]) / count - mean * mean, 0.0);
    const double scale = weight[c] / std::sqrt(var + 1e-5);
    EXPECT_NEAR(out[2][c], mean, 1e-5);
    EXPECT_NEAR(out[3][c], var, 1e-4 * (1 + var));
    EXPECT_NEAR(out[0][c], scale, 1e-4 * std::abs(scale));
    EXPECT_NEAR(out[1][c], bias[c] - mean * scale, 1e-3);
  }
  EXPECT(out[3][7] == 0.f);

  // The backward of the finalize step, against the formulas in float64 (kernels/batchnorm_params.h); channel 7's
  // clamped variance passes no gradient to sumsq.
  std::vector<float> grads[4], back[4];
  for (auto& gv : grads) {
    gv.resize(C);
    for (auto& v : gv) v = normal(rng);
  }
  for (auto& b : back) b.assign(C, std::nanf(""));
  BatchNormFinalizeBackwardParams<float> bp;
  bp.sum = sum.data(), bp.sumsq = sumsq.data(), bp.weight = weight.data();
  bp.grad_scale = grads[0].data(), bp.grad_shift = grads[1].data(), bp.grad_mean = grads[2].data();
  bp.grad_var = grads[3].data();
  bp.grad_sum = back[0].data(), bp.grad_sumsq = back[1].data(), bp.grad_weight = back[2].data();
  bp.grad_bias = back[3].data();
  bp.channels = C, bp.count = count, bp.eps = 1e-5;
  emulate_launch(kernels::batch_norm_finalize_backward_kernel<float, float>, dim3((C + 255) / 256), dim3(256), bp);
  for (int64_t c = 0; c < C; ++c) {
    const double n = count, m = double(sum[c]) / n, raw = double(sumsq[c]) / n - m * m;
    const double r = 1.0 / std::sqrt(std::max(raw, 0.0) + 1e-5), w = weight[c];
    const double ga = grads[0][c] - grads[1][c] * m, gr = ga * w;
    const double gv = raw >= 0 ? grads[3][c] - 0.5 * gr * r * r * r : 0.0;
    const double gm = grads[2][c] - grads[1][c] * w * r - 2 * m * gv;
    const double want[4] = {gm / n, gv / n, ga * r, double(grads[1][c])};
    for (int i = 0; i < 4; ++i) EXPECT_NEAR(back[i][c], want[i], 2e-4 * (1 + std::abs(want[i])));
  }
  EXPECT(back[1][7] == 0.f);

  // 16-bit weight and bias (a model cast to bf16 / fp16), read as they are: the same bits as float32 parameters
  // holding the same values, forward and backward.
  auto check_16bit_params = [&](auto zero) {
    using P = decltype(zero);
    std::vector<P> w16(C), b16(C);
    std::vector<float> w32(C), b32(C), want[4], got[4], want_back[4], got_back[4];
    for (int64_t c = 0; c < C; ++c) {
      w16[c] = from_float<P>(weight[c]), b16[c] = from_float<P>(bias[c]);
      w32[c] = static_cast<float>(to_double(w16[c])), b32[c] = static_cast<float>(to_double(b16[c]));
    }
    for (auto* v : {want, got, want_back, got_back}) {
      for (int i = 0; i < 4; ++i) v[i].assign(C, std::nanf(""));
    }
    BatchNormFinalizeParams<float> f32 = p;
    f32.weight = w32.data(), f32.bias = b32.data();
    f32.scale = want[0].data(), f32.shift = want[1].data(), f32.mean = want[2].data(), f32.var = want[3].data();
    emulate_launch(kernels::batch_norm_finalize_kernel<float, float>, dim3((C + 255) / 256), dim3(256), f32);
    BatchNormFinalizeParams<float, P> f16;
    f16.sum = sum.data(), f16.sumsq = sumsq.data(), f16.weight = w16.data(), f16.bias = b16.data();
    f16.scale = got[0].data(), f16.shift = got[1].data(), f16.mean = got[2].data(), f16.var = got[3].data();
    f16.channels = C, f16.count = count, f16.eps = 1e-5;
    emulate_launch(kernels::batch_norm_finalize_kernel<float, P>, dim3((C + 255) / 256), dim3(256), f16);
    BatchNormFinalizeBackwardParams<float> b32p = bp;
    b32p.weight = w32.data();
    b32p.grad_sum = want_back[0].data(), b32p.grad_sumsq = want_back[1].data();
    b32p.grad_weight = want_back[2].data(), b32p.grad_bias = want_back[3].data();
    emulate_launch(kernels::batch_norm_finalize_backward_kernel<float, float>, dim3((C + 255) / 256), dim3(256),
                   b32p);
    BatchNormFinalizeBackwardParams<float, P> b16p;
    b16p.sum = sum.data(), b16p.sumsq = sumsq.data(), b16p.weight = w16.data();
    b16p.grad_scale = grads[0].data(), b16p.grad_shift = grads[1].data(), b16p.grad_mean = grads[2].data();
    b16p.grad_var = grads[3].data();
    // The parameters' gradients come in P: the float32 ones rounded once.
    std::vector<P> grad_w16(C, from_float<P>(std::nanf(""))), grad_b16(C, from_float<P>(std::nanf("")));
    b16p.grad_sum = got_back[0].data(), b16p.grad_sumsq = got_back[1].data();
    b16p.grad_weight = grad_w16.data(), b16p.grad_bias = grad_b16.data();
    b16p.channels = C, b16p.count = count, b16p.eps = 1e-5;
    emulate_launch(kernels::batch_norm_finalize_backward_kernel<float, P>, dim3((C + 255) / 256), dim3(256), b16p);
    for (int i = 0; i < 4; ++i) EXPECT(std::memcmp(want[i].data(), got[i].data(), C * sizeof(float)) == 0);
    for (int i = 0; i < 2; ++i) {
      EXPECT(std::memcmp(want_back[i].data(), got_back[i].data(), C * sizeof(float)) == 0);
    }
    for (int64_t c = 0; c < C; ++c) {
      EXPECT(to_double(grad_w16[c]) == to_double(from_float<P>(want_back[2][c])));
      EXPECT(to_double(grad_b16[c]) == to_double(from_float<P>(want_back[3][c])));
    }
    EXPECT(w32[3] != weight[3] || b32[3] != bias[3]);  // the 16-bit values differ from the float32 ones
  };
  check_16bit_params(__nv_bfloat16{});
  check_16bit_params(__half{});

  // Then the running statistics from that mean and variance, in place, with a pre-bias, momentum 0.1.
  std::vector<float> running_mean(C), running_var(C), pre_bias(C);
  for (int64_t c = 0; c < C; ++c) {
    running_mean[c] = normal(rng), running_var[c] = 0.5f + std::abs(normal(rng)), pre_bias[c] = normal(rng);
  }
  const std::vector<float> mean0 = running_mean, var0 = running_var;
  BatchNormUpdateParams<float> u;
  u.running_mean = running_mean.data(), u.running_var = running_var.data();
  u.mean = out[2].data(), u.var = out[3].data(), u.pre_bias = pre_bias.data();
  u.channels = C, u.count = count, u.momentum = 0.1;
  emulate_launch(kernels::batch_norm_update_stats_kernel<float, float>, dim3((C + 255) / 256), dim3(256), u);
  for (int64_t c = 0; c < C; ++c) {
    const double want_mean = 0.9 * mean0[c] + 0.1 * (double(out[2][c]) + pre_bias[c]);
    const double want_var = 0.9 * var0[c] + 0.1 * double(out[3][c]) * count / (count - 1);
    EXPECT_NEAR(running_mean[c], want_mean, 1e-5 * (1 + std::abs(want_mean)));
    EXPECT_NEAR(running_var[c], want_var, 1e-5 * (1 + want_var));
  }

  // The finalize kernel with the update folded in: the same outputs and the same buffers, bit for bit, and
  // num_batches_tracked advanced once, whatever the grid; with no channels, the count alone.
  {
    std::vector<float> fused_out[4], rm = mean0, rv = var0;
    for (auto& o : fused_out) o.assign(C, std::nanf(""));
    int64_t tracked = 41;
    BatchNormFinalizeParams<float> q = p;
    q.scale = fused_out[0].data(), q.shift = fused_out[1].data(), q.mean = fused_out[2].data();
    q.var = fused_out[3].data();
    q.running_mean = rm.data(), q.running_var = rv.data(), q.pre_bias = pre_bias.data(), q.momentum = 0.1;
    q.num_batches_tracked = &tracked;
    emulate_launch(kernels::batch_norm_finalize_kernel<float, float>, dim3((C + 127) / 128), dim3(128), q);
    for (int i = 0; i < 4; ++i) EXPECT(std::memcmp(fused_out[i].data(), out[i].data(), C * sizeof(float)) == 0);
    EXPECT(std::memcmp(rm.data(), running_mean.data(), C * sizeof(float)) == 0);
    EXPECT(std::memcmp(rv.data(), running_var.data(), C * sizeof(float)) == 0);
    EXPECT(tracked == 42);
    q.channels = 0;
    emulate_launch(kernels::batch_norm_finalize_kernel<float, float>, dim3(1), dim3(1), q);
    EXPECT(tracked == 43);
  }
  // A model cast to 16 bits: its parameters and buffers in P; the fused update's buffers are the update kernel's,
  // bit for bit.
  auto check_16bit_update = [&](auto zero) {
    using P = decltype(zero);
    std::vector<P> w16(C), b16(C), rm_fused(C), rv_fused(C), rm_alone(C), rv_alone(C);
    for (int64_t c = 0; c < C; ++c) {
      w16[c] = from_float<P>(weight[c]), b16[c] = from_float<P>(bias[c]);
      rm_fused[c] = rm_alone[c] = from_float<P>(mean0[c]);
      rv_fused[c] = rv_alone[c] = from_float<P>(var0[c]);
    }
    std::vector<float> outs[4];
    for (auto& o : outs) o.assign(C, std::nanf(""));
    BatchNormFinalizeParams<float, P> f;
    f.sum = sum.data(), f.sumsq = sumsq.data(), f.weight = w16.data(), f.bias = b16.data();
    f.scale = outs[0].data(), f.shift = outs[1].data(), f.mean = outs[2].data(), f.var = outs[3].data();
    f.channels = C, f.count = count, f.eps = 1e-5;
    f.running_mean = rm_fused.data(), f.running_var = rv_fused.data(), f.pre_bias = pre_bias.data(), f.momentum = 0.1;
    emulate_launch(kernels::batch_norm_finalize_kernel<float, P>, dim3((C + 255) / 256), dim3(256), f);
    BatchNormUpdateParams<float, P> alone;
    alone.running_mean = rm_alone.data(), alone.running_var = rv_alone.data();
    alone.mean = outs[2].data(), alone.var = outs[3].data(), alone.pre_bias = pre_bias.data();
    alone.channels = C, alone.count = count, alone.momentum = 0.1;
    emulate_launch(kernels::batch_norm_update_stats_kernel<float, P>, dim3((C + 255) / 256), dim3(256), alone);
    EXPECT(std::memcmp(rm_fused.data(), rm_alone.data(), C * sizeof(P)) == 0);
    EXPECT(std::memcmp(rv_fused.data(), rv_alone.data(), C * sizeof(P)) == 0);
    EXPECT(std::memcmp(rm_fused.data(), std::vector<P>(C, from_float<P>(0.f)).data(), C * sizeof(P)) != 0);
  };
  check_16bit_update(__nv_bfloat16{});
  check_16bit_update(__half{});

  // bf16 / fp16 buffers (a model cast to 16 bits) beside float32 statistics: the float result rounded once to the
  // buffer's type, so within half an ulp of the exact value, plus the float32 arithmetic's error.
  auto check_16bit_buffers = [&](auto zero, double ulp) {
    using R = decltype(zero);
    std::vector<R> rm(C), rv(C);
    for (int64_t c = 0; c < C; ++c) rm[c] = from_float<R>(mean0[c]), rv[c] = from_float<R>(var0[c]);
    BatchNormUpdateParams<float, R> h;
    h.running_mean = rm.data(), h.running_var = rv.data();
    h.mean = out[2].data(), h.var = out[3].data(), h.pre_bias = pre_bias.data();
    h.channels = C, h.count = count, h.momentum = 0.1;
    emulate_launch(kernels::batch_norm_update_stats_kernel<float, R>, dim3((C + 255) / 256), dim3(256), h);
    for (int64_t c = 0; c < C; ++c) {
      const double start_mean = to_double(from_float<R>(mean0[c])), start_var = to_double(from_float<R>(var0[c]));
      const double want_mean = 0.9 * start_mean + 0.1 * (double(out[2][c]) + pre_bias[c]);
      const double want_var = 0.9 * start_var + 0.1 * double(out[3][c]) * count / (count - 1);
      EXPECT_NEAR(to_double(rm[c]), want_mean, 0.5 * ulp * std::abs(want_mean) + 1e-5 * (1 + std::abs(want_mean)));
      EXPECT_NEAR(to_double(rv[c]), want_var, 0.5 * ulp * want_var + 1e-5 * (1 + want_var));
    }
  };
  check_16bit_buffers(__nv_bfloat16{}, 1.0 / 128);
  check_16bit_buffers(__half{}, 1.0 / 1024);
}

}  // namespace

int main(int argc, char** argv) { return xo_test::run_all(argc > 1 ? argv[1] : nullptr); }
