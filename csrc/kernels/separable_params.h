// What the fused separable-conv CUDA kernels are told: the geometry, raw pointers and element strides, the
// prologue / epilogue options, and the launch plan. Filled once on the host by the torch layer
// (csrc/cuda/separable_backend.cpp) and passed by value to every kernel.
//
// Torch-free on purpose, like depthwise_params.h: the kernels (kernels/separable.cuh) and their launchers
// (cuda/separable_launch.cu) compile without torch headers, also for old GPUs with clang.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "depthwise_params.h"

namespace xception_ops {

// How the pointwise GEMM runs. The launcher picks it from the dtype, the GPU's compute capability and
// PyTorch's TF32 flag; every mode has the same semantics and the same float32 accumulation.
enum class PointwiseMath : int32_t {
  Ffma = 0,            // CUDA cores, float32 multiply-add: any dtype, any GPU
  TensorCore = 1,      // fp16 / bf16 operands on tensor cores through ldmatrix + mma.sync (sm_80 and newer)
  Tf32 = 2,            // float32 operands rounded to TF32 on tensor cores, through wmma (sm_80+, PyTorch allowing)
  TensorCoreWmma = 3,  // fp16 / bf16 through wmma: the previous implementation, kept for comparison
};
XO_HOST_DEVICE constexpr bool separable_16bit_tensor_cores(PointwiseMath m) {
  return m == PointwiseMath::TensorCore || m == PointwiseMath::TensorCoreWmma;
}

// The fused forward: out = act(relu?(y * out_scale + out_shift + residual)), y = pw(mid(dw(prologue(x)))).
//   prologue(x) = relu?(x * in_scale + in_shift), per input channel; padding reads as 0 after the prologue.
//   mid         = none, relu, elu, relu6 or hardswish on the depthwise result d, after its affine
//                 d * mid_scale + mid_shift per depthwise channel where there is one (kernels::mid_value).
// With compute_stats, per-channel float32 sums of y and y^2 (the pre-BN output) go to `stats_partial`.
struct SeparableParams {
  Conv2dGeometry g;        // dw stage: in_channels -> dw_channels(); pw stage: dw_channels() -> out_channels
  DepthwiseTensor x;       // read, (N, C, H, W) strides
  DepthwiseTensor out;     // written, (N, C_out, OH, OW)
  DepthwiseTensor residual;  // read when residual.data != nullptr
  const void* dw_weight = nullptr;  // contiguous (dw_channels, 1, kH, kW), x's dtype
  const void* pw_weight = nullptr;  // contiguous (C_out, dw_channels), x's dtype
  const float* in_scale = nullptr;  // per input channel, float32; nullptr: 1
  const float* in_shift = nullptr;  // nullptr: 0
  bool in_relu = false;
  int32_t mid = 0;                   // 0 none, 1 relu, 2 elu, 3 relu6, 4 hardswish (MidActivation)
  // The mid affine, per depthwise channel, float32: nullptr 1 and 0; both nullptr: none (d unchanged, bit for bit).
  const float* mid_scale = nullptr;
  const float* mid_shift = nullptr;
  // Set by separable_plan from the three above: the activation the depthwise stage applies as it stores, `mid`
  // without a mid affine, 0 with one (a pass over the tile then applies the affine and `mid`: mid_affine_tile).
  // A field, not worked out in the kernel: that cost the capped builds up to 36 bytes more spills.
  int32_t store_mid = 0;
  const float* out_scale = nullptr;  // per output channel, float32; nullptr: 1
  const float* out_shift = nullptr;  // nullptr: 0
  bool out_relu = false;
  // Per pixel tile, the float32 sums of y then of y^2 over the tile's pixels: [tiles][2][out_channels]. nullptr
  // when the statistics are not asked for.
  float* stats_partial = nullptr;
  // Thread orders: channel fastest across threads where the tensor has channels fastest in memory.
  bool x_channels_last = false;
  bool out_channels_last = false;
  // The launch plan (separable_plan): the depthwise channels resident in shared memory at once (a multiple of
  // kSepKStep, or all of them rounded up) and the row pitch of that tile. When k_chunk covers every channel the
  // depthwise tile is computed once per block; otherwise once per (block, output-channel tile).
  int32_t k_chunk = 0;
  int32_t a_pitch = 0;
  // Also the plan's: the depth of the mma.sync path's ring of weight buffers (4, or 3 where a resident depthwise
  // tile needs the room; 0 means the default, separable_weight_stages) and the row pitch of the float32
  // accumulator tile (kSepCPitch, or kSepTileN where even 3 buffers do not fit; 0 means kSepCPitch).
  int32_t weight_stages = 0;
  int32_t c_pitch = 0;
  // Square 8 x 8 pixel tiles with a staged input window (only where separable_spatial_tiles() allows them);
  // otherwise 64 consecutive pixels.
  bool square_tiles = false;
  // Run tiles (only where separable_run_tiles_ok() allows them, after separable_plan): 16 runs of kSepRun pixels of
  // one row, ordered (image, run of columns, row), so that a tile's runs are mostly one column band walked down,
  // and the depthwise stage slides a window of input rows down them (depthwise_tile_runs).
  bool run_tiles = false;
  // The staged form: mid(dw(prologue(x))) computed already, pixel-major [pixels][dw_channels] in the dtype
  // (a channels-last (N, K, OH, OW) tensor). The kernel reads its tiles from here instead of computing them, and
  // ignores x, the depthwise weight, the prologue, the mid affine and activation (the caller leaves those unset).
  // Flat tiles only.
  const void* a_source = nullptr;
  // Vector paths (separable_plan sets them): the depthwise stage reads x kSepVec channels of a pixel at a time,
  // and the epilogue writes `out` (and reads the residual) likewise. Only where the tensors have channels
  // fastest, aligned rows and whole vectors of channels.
  bool x_vectors = false;
  bool out_vectors = false;
};

// ---- the launch plan (host side, pure arithmetic) ----
constexpr int kSepThreads = 256;  // 8 warps
constexpr int kSepTileP = 64;     // output pixels per block (flattened over N, OH, OW)
constexpr int kSepTileN = 128;    // output channels per GEMM tile
constexpr int kSepKStep = 32;     // depthwise channels per shared-memory weight tile
// Weight tiles in flight: the 16-bit tensor-core GEMM copies them with cp.async into a ring of 4 buffers (three
// ahead of the one in use); the other GEMMs double-buffer them through registers.
XO_HOST_DEVICE constexpr int separable_weight_stages(PointwiseMath m) { return m == PointwiseMath::TensorCore ? 4 : 2; }

// A block's pixels: an 8 x 8 square of one image for 3x3 depthwise kernels at stride 1 or 2 without dilation
// (Xception's layers), whose input window (10 x 10, or 17 x 17) is staged in shared memory 32 channels at a
// time; otherwise 64 consecutive pixels of the flattened (N, OH, OW) index, each tap read from global memory.
constexpr int kSepSquare = 8;
constexpr int kSepHaloChannels = 32;
XO_HOST_DEVICE inline bool separable_spatial_tiles(const Conv2dGeometry& g) {
  return g.kernel_h == 3 && g.kernel_w == 3 && g.dilation_h == 1 && g.dilation_w == 1 && g.stride_h == g.stride_w &&
         (g.stride_h == 1 || g.stride_h == 2);
}
XO_HOST_DEVICE inline int64_t separable_pixel_tiles(const Conv2dGeometry& g, bool square_tiles) {
  if (square_tiles) {
    return g.batch * ((g.out_h + kSepSquare - 1) / kSepSquare) * ((g.out_w + kSepSquare - 1) / kSepSquare);
  }
  return (g.batch * g.out_h * g.out_w + kSepTileP - 1) / kSepTileP;
}
// Run tiles: kSepRun pixels of a row per run, kSepTileP / kSepRun runs (slots) per tile.
constexpr int kSepRun = 4;
constexpr int kSepRunSlots = kSepTileP / kSepRun;
XO_HOST_DEVICE inline int64_t separable_run_slots(const Conv2dGeometry& g) {
  return g.batch * ((g.out_w + kSepRun - 1) / kSepRun) * g.out_h;
}
// A block's pixel tiles under p's tiling (square, runs or flat).
XO_HOST_DEVICE inline int64_t separable_pixel_tiles(const SeparableParams& p) {
  if (p.run_tiles) return (separable_run_slots(p.g) + kSepRunSlots - 1) / kSepRunSlots;
  return separable_pixel_tiles(p.g, p.square_tiles);
}
// Side of the staged input window of a square tile: 7 strides and a 3-wide kernel.
XO_HOST_DEVICE inline int separable_halo_side(const Conv2dGeometry& g) {
  return static_cast<int>((kSepSquare - 1) * g.stride_h + 3);
}
XO_HOST_DEVICE inline int64_t separable_channel_tiles(const Conv2dGeometry& g) {
  return (g.out_channels + kSepTileN - 1) / kSepTileN;
}

XO_HOST_DEVICE inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
XO_HOST_DEVICE inline size_t align128(size_t v) { return (v + 127) / 128 * 128; }

// Bytes of one element of the on-chip depthwise tile: the dtype's own size on the 16-bit tensor-core path
// (the depthwise result is rounded to the dtype, as PyTorch's unfused layers do), float32 otherwise.
XO_HOST_DEVICE inline int separable_tile_elem_bytes(PointwiseMath math, int dtype_bytes) {
  return separable_16bit_tensor_cores(math) ? dtype_bytes : 4;
}

// Weight-tile and accumulator-tile pitches (elements). Fragment loads need multiples of 8 (16-bit) or 4
// (float32) elements; the padding puts consecutive rows in different banks.
constexpr int kSepBPitch16 = kSepKStep + 8;  // 16-bit weight tile [n][k] (col-major B of the fragments)
constexpr int kSepBPitch32 = kSepKStep + 4;  // float32 weight tile [n][k] (TF32 fragments)
constexpr int kSepBPitchKN = kSepTileN + 4;  // float32 weight tile [k][n] (FFMA)
constexpr int kSepCPitch = kSepTileN + 4;    // float32 accumulator tile [p][n]

// The plan's ring depth (mma.sync path) and accumulator pitch, defaults filled in.
XO_HOST_DEVICE inline int separable_stages(const SeparableParams& p, PointwiseMath math) {
  return math == PointwiseMath::TensorCore && p.weight_stages > 0 ? p.weight_stages : separable_weight_stages(math);
}
XO_HOST_DEVICE inline int separable_c_pitch(const SeparableParams& p) { return p.c_pitch > 0 ? p.c_pitch : kSepCPitch; }

// Shared memory layout of a block, in bytes. Every region starts 128-byte aligned. The accumulator tile
// shares a region with the weight-tile buffers (separable_stages of them, `stage` bytes apart) and with the
// staged input window of square tiles: each is live in a different phase. Except on the mma.sync path, whose
// kernels run only on sm_80+ (they trap elsewhere), the buffers are also big enough for the FFMA [k][n] tiles
// that every kernel uses on GPUs below sm_80.
struct SeparableSmem {
  size_t pixel_info;  // per pixel: offsets of its image in x, out and residual, and its input origin
  size_t a_tile;      // depthwise tile [kSepTileP][a_pitch]
  size_t bc_region;   // the weight buffers, the accumulators, or the input window
  size_t stage;       // bytes from one weight buffer to the next
  size_t total;
};

XO_HOST_DEVICE inline SeparableSmem separable_smem(const SeparableParams& p, int64_t a_pitch, PointwiseMath math,
                                                   int dtype_bytes) {
  const Conv2dGeometry& g = p.g;
  const int eb = separable_tile_elem_bytes(math, dtype_bytes);
  SeparableSmem s;
  s.pixel_info = align128(static_cast<size_t>(kSepTileP) * (3 * sizeof(int64_t) + 2 * sizeof(int32_t)));
  s.a_tile = align128(static_cast<size_t>(kSepTileP) * static_cast<size_t>(a_pitch) * eb);
  size_t buffer = math == PointwiseMath::TensorCore
                      ? 0
                      : static_cast<size_t>(kSepKStep) * kSepBPitchKN * sizeof(float);  // FFMA [k][n]
  const size_t nk = separable_16bit_tensor_cores(math)
                        ? static_cast<size_t>(kSepTileN) * kSepBPitch16 * dtype_bytes
                        : static_cast<size_t>(kSepTileN) * kSepBPitch32 * sizeof(float);
  if (nk > buffer) buffer = nk;
  s.stage = align128(buffer);
  size_t c = static_cast<size_t>(kSepTileP) * separable_c_pitch(p) * sizeof(float);
  if (p.square_tiles) {  // the staged input window, in the dtype, during the depthwise stage only
    const size_t side = static_cast<size_t>(separable_halo_side(g));
    const size_t halo = side * side * kSepHaloChannels * static_cast<size_t>(dtype_bytes);
    if (halo > c) c = halo;
  }
  const size_t buffers = separable_stages(p, math) * s.stage;
  s.bc_region = align128(buffers > c ? buffers : c);
  s.total = s.pixel_info + s.a_tile + s.bc_region;
  return s;
}

// Channels per vector of the vector paths: 8 bytes of fp16 / bf16, 16 of float32. Four channels per thread keep
// a 3x3 depthwise stage's weights (36 floats) in registers next to its loads.
constexpr int kSepVec = 4;

// Whether a tensor with channels fastest can be read or written kSepVec channels at a time: its data aligned
// to a vector and every stride but the channels' a whole number of vectors.
XO_HOST_DEVICE inline bool separable_vectorizable(const DepthwiseTensor& t, int64_t channels, int dtype_bytes) {
  return channels_vectorizable(t, channels, dtype_bytes, kSepVec);
}

// Fills p.k_chunk and p.a_pitch: every depthwise channel on chip when it fits in `smem_limit` bytes (with the
// padded pitch, else unpadded), otherwise the largest multiple of kSepKStep that does. Returns false when not
// even one step fits. Also sets the vector paths (x_vectors: flat tiles, 3x3 kernels whose tap offsets fit in
// 32 bits, no depth multiplier; out_vectors), from the pointers and strides already in p.
inline bool separable_plan(SeparableParams& p, PointwiseMath math, int dtype_bytes, size_t smem_limit) {
  // Tap offsets from a pixel's origin as 32-bit ints, up to 3 s + 2 columns wide (groups of four pixels).
  const int64_t tap_span = 2 * p.g.dilation_h * p.x.stride[2] +
                           (3 * p.g.stride_w + 2 * p.g.dilation_w) * p.x.stride[3] + p.x.stride[2] + p.x.stride[3];
  p.x_vectors = !p.square_tiles && p.x_channels_last && p.g.depth_multiplier == 1 && p.g.kernel_h == 3 &&
                p.g.kernel_w == 3 && separable_vectorizable(p.x, p.g.in_channels, dtype_bytes) &&
                tap_span < (int64_t{1} << 31) && p.g.in_h < (int64_t{1} << 31) && p.g.in_w < (int64_t{1} << 31);
  p.out_vectors = p.out_channels_last && separable_vectorizable(p.out, p.g.out_channels, dtype_bytes) &&
                  (p.residual.data == nullptr || separable_vectorizable(p.residual, p.g.out_channels, dtype_bytes));
  p.store_mid = p.mid_scale != nullptr || p.mid_shift != nullptr ? 0 : p.mid;
  const int eb = separable_tile_elem_bytes(math, dtype_bytes);
  const int pad = eb == 2 ? 8 : 4;
  const int64_t all = round_up(p.g.dw_channels(), kSepKStep);
  // In order of preference: every channel resident with the padded pitch (conflict-free ldmatrix rows), then
  // unpadded, then the largest chunk of channels that fits; each with the full ring first and, on the mma.sync
  // path, a ring of 3, then an unpadded accumulator tile as well (each costs less than a depthwise tile recomputed
  // per output tile: 1536->2048 @10^2 took 0.63 ms so on an H100, cuDNN 0.10).
  const bool ring = math == PointwiseMath::TensorCore;
  struct Room {
    int32_t stages, c_pitch;
  };
  const Room rooms[] = {{0, 0}, {ring ? 3 : 0, 0}, {ring ? 3 : 0, ring ? kSepTileN : 0}};
  auto fits = [&](int64_t k_chunk, int64_t pitch) {
    for (const Room& room : rooms) {
      p.weight_stages = room.stages, p.c_pitch = room.c_pitch;
      if (separable_smem(p, pitch, math, dtype_bytes).total <= smem_limit) {
        p.k_chunk = static_cast<int32_t>(k_chunk);
        p.a_pitch = static_cast<int32_t>(pitch);
        return true;
      }
    }
    p.weight_stages = 0, p.c_pitch = 0;
    return false;
  };
  if (fits(all, all + pad) || fits(all, all)) return true;
  for (int64_t k = all - kSepKStep; k >= kSepKStep; k -= kSepKStep) {
    if (fits(k, k + pad)) return true;
  }
  return false;
}

// Whether run tiles apply (set p.run_tiles after separable_plan): the mma.sync GEMM (fp16 / bf16 on sm_80+, the
// only one built for them) and the vector depthwise path's layers (x channels fastest in whole vectors, 3x3) at
// stride 1 without dilation, on flat tiling, where rounding the width up to whole runs wastes at most 10% of the
// pixels (19 columns: 20, 5%; 10 columns: 12, 20%, refused).
XO_HOST_DEVICE inline bool separable_run_tiles_ok(const SeparableParams& p, PointwiseMath math) {
  const Conv2dGeometry& g = p.g;
  return math == PointwiseMath::TensorCore && p.x_vectors && !p.square_tiles && g.kernel_h == 3 && g.kernel_w == 3 &&
         g.stride_h == 1 &&
         g.stride_w == 1 && g.dilation_h == 1 && g.dilation_w == 1 && g.out_w > 0 &&
         round_up(g.out_w, kSepRun) * 10 <= g.out_w * 11;
}

// The staged forward's product (cuda/separable_backend.cpp): the fused kernel's GEMM and epilogue reading the
// depthwise result (p.a_source) saves the epilogue pass over y that follows a cuBLAS product (and y's buffer), but
// its mma.sync GEMM is slower than cuBLAS's. Measured on the H100 (session 10, bf16 channels-last inference, batch
// 32, fused against cuBLAS): 64 -> 128 @147^2 0.358 / 0.364 ms, 128 -> 128 @147^2 0.486 / 0.476, 128 -> 256 @74^2
// 0.201 / 0.197 (even, within the runs' ~3% noise; the fused form peaks ~25% lower), 256 -> 256 @74^2 0.301 / 0.257
// (cuBLAS). So the fused product up to 128 channels. XCEPTION_OPS_SEPARABLE_STAGED_GEMM=fused / =cublas takes one
// everywhere.
constexpr int64_t kSepStagedFusedMaxChannels = 128;
XO_HOST_DEVICE inline bool separable_staged_fused_gemm(const Conv2dGeometry& g) {
  return g.dw_channels() <= kSepStagedFusedMaxChannels;
}

// How many blocks share one pixel tile, each taking every n_groups-th output-channel tile: enough blocks for
// two waves on `sms` multiprocessors when there are few pixel tiles (the 10x10 layers have 50 at batch 32).
// Each extra group recomputes the depthwise tile once more.
inline int separable_channel_groups(const SeparableParams& p, int sms) {
  const Conv2dGeometry& g = p.g;
  const int64_t tiles = separable_pixel_tiles(p), n_tiles = separable_channel_tiles(g);
  if (tiles <= 0) return 1;
  int64_t groups = (2 * static_cast<int64_t>(sms) + tiles - 1) / tiles;
  if (groups > n_tiles) groups = n_tiles;
  if (groups > 65535) groups = 65535;
  return groups < 1 ? 1 : static_cast<int>(groups);
}

// The GEMM mode for a dtype on a GPU of compute capability `cc_major`.x: tensor cores from sm_80 (fp16 / bf16
// always, float32 as TF32 only when PyTorch allows TF32 for convolutions), FFMA elsewhere.
inline PointwiseMath separable_math(DType dtype, int cc_major, bool allow_tf32, bool wmma_16bit = false) {
  if (cc_major < 8) return PointwiseMath::Ffma;
  if (dtype == DType::Float32) return allow_tf32 ? PointwiseMath::Tf32 : PointwiseMath::Ffma;
  return wmma_16bit ? PointwiseMath::TensorCoreWmma : PointwiseMath::TensorCore;
}

// Bytes of the statistics workspace: the per-tile partials plus the scratch of the fixed-order reduction.
// Floats of workspace for launch_reduce_rows: the partial rows and the scratch of the fixed-order reduction.
XO_HOST_DEVICE inline int64_t reduce_rows_workspace(int64_t rows, int64_t cols) {
  return (rows + (rows + 63) / 64) * cols;
}

inline size_t separable_stats_workspace_bytes(const SeparableParams& p) {
  const int64_t tiles = separable_pixel_tiles(p);
  return static_cast<size_t>(reduce_rows_workspace(tiles, 2 * p.g.out_channels)) * sizeof(float);
}

// The element-wise passes over an (N, C, H, W) tensor, 64 pixels (flattened over N, H, W) per block and channels
// across threads, each block writing one row of per-channel float32 partial sums that launch_reduce_rows adds up
// in a fixed order. Three kinds, one kernel (kernels/separable_backward.cuh):
//   GradY:    gz = relu'(out) grad_out; grad_y = gz * scale + vec_a + 2 y vec_b (absent terms dropped), stored
//             pixel-major [pixels][C] in the dtype; sums of gz * y and of gz.
//   Prologue: g = relu'(round(x * scale + shift)) grad; grad_x = round(g * scale) (g without a scale); sums of
//             g * x and of g.
//   Epilogue: the staged forward's epilogue (cuda/separable_backend.cpp) on the pointwise product y, rounded as the
//             fused kernel's epilogue rounds: out = relu?(round(round(y * scale + shift) + residual)); sums of y
//             and of y^2 (the BatchNorm statistics). `result` may be y itself (each element is read, then
//             written, by one thread); no `result` skips the store, no `partial` the sums.
enum class ChannelPass : int32_t { GradY = 0, Prologue = 1, Epilogue = 2 };
struct ChannelPassParams {
  Conv2dGeometry g;        // batch, channels (in_channels for the prologue, out_channels otherwise), h, w
  int64_t channels = 0, h = 0, w = 0;
  DepthwiseTensor grad;    // grad_out, or the gradient of the depthwise stage's input (unused by the epilogue)
  DepthwiseTensor act;     // out (its ReLU mask; data null without one), x, or the epilogue's residual (or null)
  DepthwiseTensor y;       // the pre-epilogue output (data null when no term of grad_y needs it)
  DepthwiseTensor result;  // the prologue pass's grad_x, the epilogue's out (unused by grad_y)
  void* grad_y = nullptr;  // the grad_y pass's [pixels][channels] output
  const float* scale = nullptr;  // out_scale / in_scale
  const float* vec_a = nullptr;  // grad_sum / in_shift / out_shift
  const float* vec_b = nullptr;  // grad_sumsq
  bool relu = false;
  float* partial = nullptr;      // [tiles][2 channels]
  int tile_pixels = 64;          // pixels per block, at most kChannelPassPixels (channel_pass_tile_pixels)
};
constexpr int kChannelPassPixels = 64;
// Rows (pixels) whose loads separable_channel_pass_kernel issues together, before it uses any of them.
constexpr int kChannelPassRowsInFlight = 4;
// Pixels per block of the passes: 64, halved (down to 8) while that leaves fewer than 4 blocks per multiprocessor.
// At 19^2 and 10^2 (batch 32) 64-pixel tiles gave 180 and 50 blocks for 132 SMs, each thread walking 32-64
// pixels one load after another: the pass waited on memory latency with most of the GPU idle.
XO_HOST_DEVICE inline int channel_pass_tile_pixels(int64_t pixels, int sms) {
  int t = kChannelPassPixels;
  while (t > 8 && (pixels + t - 1) / t < 4 * static_cast<int64_t>(sms)) t /= 2;
  return t;
}
// Whether the passes can move kSepVec channels per access: every tensor they touch has channels fastest and whole
// aligned vectors (grad_y, pixel-major with `channels` per row, needs only its alignment).
XO_HOST_DEVICE inline bool channel_pass_vectors(const ChannelPassParams& p, int dtype_bytes) {
  auto ok = [&](const DepthwiseTensor& t) {
    return t.data == nullptr || separable_vectorizable(t, p.channels, dtype_bytes);
  };
  return p.channels % kSepVec == 0 && ok(p.grad) && ok(p.act) && ok(p.y) && ok(p.result) &&
         reinterpret_cast<uintptr_t>(p.grad_y) % (kSepVec * dtype_bytes) == 0;
}
// Whether a prologue or epilogue pass runs pixel-fastest (separable_plane_pass_kernel): every tensor it touches has
// its pixels fastest and its channels not (NCHW). grad_y's pass writes channel-fastest rows: never.
XO_HOST_DEVICE inline bool channel_pass_planes(const ChannelPassParams& p, ChannelPass kind) {
  auto planar = [&](const DepthwiseTensor& t) {
    return t.data == nullptr || (t.stride[3] == 1 && (p.channels == 1 || t.stride[1] != 1));
  };
  return kind != ChannelPass::GradY && planar(p.grad) && planar(p.act) && planar(p.y) && planar(p.result);
}
XO_HOST_DEVICE inline int64_t channel_pass_tiles(const ChannelPassParams& p) {
  return (p.g.batch * p.h * p.w + p.tile_pixels - 1) / p.tile_pixels;
}

// ---- launchers (cuda/separable_launch.cu, cuda/separable_backward_launch.cu) ----
// Fused forward. `p.k_chunk` / `p.a_pitch` must come from separable_plan() with the same math and the device's
// opt-in shared-memory limit; `channel_groups` from separable_channel_groups(). With p.stats_partial set, `sum`
// and `sumsq` (float32, out_channels each) receive the reduced statistics; the workspace behind p.stats_partial
// must hold separable_stats_workspace_bytes(p). Returns cudaGetLastError() after its launches.
cudaError_t launch_separable_forward(const SeparableParams& p, DType dtype, PointwiseMath math, int channel_groups,
                                     float* sum, float* sumsq, cudaStream_t stream);


// Sets p.tile_pixels for the current device (channel_pass_tile_pixels); p.g, p.h and p.w must be set. Callers
// size the statistics' workspace by channel_pass_tiles(p) after it.
cudaError_t plan_channel_pass(ChannelPassParams& p);
// The element-wise passes (ChannelPassParams) of the given kind.
cudaError_t launch_channel_pass(const ChannelPassParams& p, DType dtype, ChannelPass kind, cudaStream_t stream);
// relu?(round(x * scale + shift)) into `out` (any strides), elementwise.
cudaError_t launch_prologue_apply(const DepthwiseTensor& x, const DepthwiseTensor& out, const Conv2dGeometry& g,
                                  const float* scale, const float* shift, bool relu, DType dtype,
                                  cudaStream_t stream);
// Sums the rows of `partial` [rows][cols] in a fixed order (groups of 64 per level, through the scratch rows after
// them, reduce_rows_workspace floats in all): columns [0, half) go to `first`, the rest to `second`.
cudaError_t launch_reduce_rows(float* partial, int64_t rows, int64_t cols, int64_t half, float* first, float* second,
                               cudaStream_t stream);

// The current device's compute capability, multiprocessor count and shared memory (queried once per device).
struct DeviceCaps {
  int major = 0, minor = 0, sms = 0;
  size_t smem_optin = 0;   // per block
  size_t smem_per_sm = 0;  // per multiprocessor
};
cudaError_t current_device_caps(DeviceCaps* caps);

}  // namespace xception_ops
