// Kernels of the separable conv backward (the "cuda" backend's, csrc/cuda/separable_backward_backend.cpp):
//   separable_channel_pass_kernel     the element-wise passes with per-channel sums: grad_y from grad_out, and
//                                     the prologue's backward (also the staged forward's epilogue, with the
//                                     BatchNorm statistics: csrc/cuda/separable_backend.cpp);
//   separable_plane_pass_kernel       the prologue and epilogue passes again, over NCHW tensors: coalesced there;
//   prologue_apply_kernel             relu?(x * scale + shift), what the depthwise stage reads, for its gradients.
// The matrix products (grad_pw, grad_mid) run on cuBLAS; the depthwise ones in kernels/depthwise.cuh.
//
// Torch-free: takes a ChannelPassParams (kernels/separable_params.h); compiles with nvcc or clang for any GPU
// from sm_37 on.
#pragma once

#include "separable.cuh"

namespace xception_ops {
namespace kernels {

// ---- the element-wise passes (ChannelPassParams, ChannelPass) ----
// Block b takes pixels [t b, t b + t) of the flattened (N, H, W) and every channel (t = q.tile_pixels <= 64). A
// thread takes V consecutive channels (V = kSepVec where every tensor has channels fastest and whole aligned
// vectors, channel_pass_vectors; else 1): consecutive channel groups across a warp, coalesced where channels are
// fastest.
// With fewer channel groups than threads, the threads left over split the pixels: `lanes` threads (a power of
// two) cover the channels and 256 / lanes row groups the 64 pixels (a 128-channel pass ran half its threads idle,
// each walking 64 pixels one 2-byte load at a time: 1 TB/s at 147^2, session 4). Each row group sums its rows in
// order; the row groups' sums are then added in order through shared memory: the partial row of the block is
// the same on every run.
template <typename T, int V>
struct ChannelVec {  // V channels of one pixel, as float32
  __device__ __forceinline__ static void load(const T* p, float (&v)[V]) { load_if(true, p, v); }
  // Zeros where !ok, without reading p.
  __device__ __forceinline__ static void load_if(bool ok, const T* p, float (&v)[V]) {
    if constexpr (V == 1) {
      v[0] = ok ? Elem<T>::load(p) : 0.f;
    } else {
      VecIO<T, V>::load_if(ok, p, v);
    }
  }
  __device__ __forceinline__ static void store(T* p, const float (&v)[V]) {  // rounds to T
    if constexpr (V == 1) {
      Elem<T>::store(p, v[0]);
    } else {
      VecIO<T, V>::store_rn(p, v);  // one conversion per pair on sm_80+ (pack2_rn)
    }
  }
};

// One element of the prologue's backward: the gradient g of round(x * scale + shift) through its ReLU mask; adds
// g x and g to the sums and returns g * scale (g without a scale vector).
template <typename T>
__device__ __forceinline__ float prologue_grad(float g, float xv, float scale, float shift, bool relu,
                                               bool has_scale, float& first, float& second) {
  if (relu && !(round_to<T>(fmaf(xv, scale, shift)) > 0.f)) g = 0.f;
  first = fmaf(g, xv, first);
  second += g;
  return has_scale ? g * scale : g;
}
// One element of the epilogue: relu?(round(round(y * scale + shift) + residual)), rounded where the fused kernel
// rounds (y itself where there is no scale or shift); adds y and y^2 to the sums.
template <typename T>
__device__ __forceinline__ float epilogue_value(float yv, float scale, float shift, bool residual, float res,
                                                bool relu, float& first, float& second) {
  first += yv;
  second = fmaf(yv, yv, second);
  float z = round_to<T>(fmaf(yv, scale, shift));
  if (residual) z = round_to<T>(z + res);
  return relu ? kernels::relu(z) : z;
}

// Both pass kernels' start: the offsets of block blockIdx.x's pixels in grad, act, y and result (-1 past the last
// pixel) into `offset`, then a barrier. Returns how many of the tile's q.tile_pixels pixels exist.
__device__ __forceinline__ int channel_pass_tile_offsets(const ChannelPassParams& q,
                                                         int64_t (&offset)[4][kChannelPassPixels]) {
  const int64_t pixels = q.g.batch * q.h * q.w, tile = blockIdx.x;
  const int tp = q.tile_pixels;
  for (int e = threadIdx.x; e < 4 * tp; e += blockDim.x) {
    const int which = e / tp, r = e % tp;
    const int64_t pix = tile * tp + r;
    const int64_t w = pix % q.w, h = pix / q.w % q.h, n = pix / q.w / q.h;
    // (a switch, not an array of pointers to the params: that copied them to local memory)
    const int64_t* st = which == 0 ? q.grad.stride : which == 1 ? q.act.stride : which == 2 ? q.y.stride
                                                                                              : q.result.stride;
    offset[which][r] = pix < pixels ? n * st[0] + h * st[2] + w * st[3] : -1;
  }
  __syncthreads();
  return static_cast<int>(pixels - tile * tp < tp ? pixels - tile * tp : tp);
}

template <typename T, ChannelPass kKind, int V>
__global__ void __launch_bounds__(256) separable_channel_pass_kernel(const ChannelPassParams q) {
  constexpr int kThreads = 256;
  __shared__ int64_t offset[4][kChannelPassPixels];  // per pixel: its offset in grad, act, y and result
  __shared__ float row_sums[2][kThreads * V];        // [first / second][row group * lanes + lane][V]
  const int64_t tile = blockIdx.x;
  const int tp = q.tile_pixels;
  const int rows = channel_pass_tile_offsets(q, offset);
  const T* grad = static_cast<const T*>(q.grad.data);
  const T* act = static_cast<const T*>(q.act.data);
  const T* y = static_cast<const T*>(q.y.data);
  const int64_t groups = (q.channels + V - 1) / V;  // V divides the channels on the vector path
  const int lanes = power_of_two_cover(groups, kThreads);
  const int row_groups = kThreads / lanes, rows_per_group = (tp + row_groups - 1) / row_groups;
  const int lane = threadIdx.x % lanes, rg = threadIdx.x / lanes;
  const int r_begin = rg * rows_per_group, r_end = rows < r_begin + rows_per_group ? rows : r_begin + rows_per_group;
  for (int64_t cg = lane; cg < groups; cg += lanes) {
    const int64_t c = cg * V;
    float scale[V], a[V], b[V], first[V], second[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      scale[i] = q.scale != nullptr ? q.scale[c + i] : 1.f;
      a[i] = q.vec_a != nullptr ? q.vec_a[c + i] : 0.f;
      b[i] = q.vec_b != nullptr ? q.vec_b[c + i] : 0.f;
      first[i] = 0.f, second[i] = 0.f;
    }
    // kChannelPassRowsInFlight rows at a time: every load of the rows first, then each row's values and stores
    // in row order (the sums' order unchanged). Row by row, the compiler kept each row's loads below the previous
    // row's stores (they could alias: the epilogue writes in place over y), one row's loads in flight per thread:
    // these passes ran at ~40% of the copy bandwidth (H100 profile, session 10).
#pragma unroll 1
    for (int r0 = r_begin; r0 < r_end; r0 += kChannelPassRowsInFlight) {
      // What each row reads: GradY grad, its ReLU mask (out) and y; Prologue grad and x; Epilogue y and residual.
      float g[kChannelPassRowsInFlight][V], u[kChannelPassRowsInFlight][V], w[kChannelPassRowsInFlight][V];
#pragma unroll
      for (int k = 0; k < kChannelPassRowsInFlight; ++k) {
        const int r = r0 + k;
        const bool ok = r < r_end;
        const int ro = ok ? r : r_begin;  // a row whose offsets exist (nothing is read where !ok)
        if constexpr (kKind == ChannelPass::GradY) {
          ChannelVec<T, V>::load_if(ok, grad + offset[0][ro] + c * q.grad.stride[1], g[k]);
          ChannelVec<T, V>::load_if(ok && q.relu, act + offset[1][ro] + c * q.act.stride[1], u[k]);
          ChannelVec<T, V>::load_if(ok && y != nullptr, y + offset[2][ro] + c * q.y.stride[1], w[k]);
        } else if constexpr (kKind == ChannelPass::Prologue) {
          ChannelVec<T, V>::load_if(ok, grad + offset[0][ro] + c * q.grad.stride[1], g[k]);
          ChannelVec<T, V>::load_if(ok, act + offset[1][ro] + c * q.act.stride[1], u[k]);
        } else {
          ChannelVec<T, V>::load_if(ok, y + offset[2][ro] + c * q.y.stride[1], u[k]);
          ChannelVec<T, V>::load_if(ok && act != nullptr, act + offset[1][ro] + c * q.act.stride[1], w[k]);
        }
      }
#pragma unroll
      for (int k = 0; k < kChannelPassRowsInFlight; ++k) {
        const int r = r0 + k;
        if (r >= r_end) break;
        if constexpr (kKind == ChannelPass::Prologue) {  // a = shift here
#pragma unroll
          for (int i = 0; i < V; ++i) {
            g[k][i] = prologue_grad<T>(g[k][i], u[k][i], scale[i], a[i], q.relu, q.scale != nullptr, first[i],
                                       second[i]);
          }
          ChannelVec<T, V>::store(static_cast<T*>(q.result.data) + offset[3][r] + c * q.result.stride[1], g[k]);
        } else if constexpr (kKind == ChannelPass::Epilogue) {  // a = out_shift; the sums of y and y^2
#pragma unroll
          for (int i = 0; i < V; ++i) {
            g[k][i] = epilogue_value<T>(u[k][i], scale[i], a[i], act != nullptr, w[k][i], q.relu, first[i],
                                        second[i]);
          }
          if (q.result.data != nullptr) {
            ChannelVec<T, V>::store(static_cast<T*>(q.result.data) + offset[3][r] + c * q.result.stride[1], g[k]);
          }
        } else {  // u: the mask (0 without a ReLU), w: y (0 without one)
          float gy[V];
#pragma unroll
          for (int i = 0; i < V; ++i) {
            float gv = g[k][i];
            if (q.relu && !(u[k][i] > 0.f)) gv = 0.f;
            first[i] = fmaf(gv, w[k][i], first[i]);
            second[i] += gv;
            gy[i] = fmaf(2.f * w[k][i], b[i], fmaf(gv, scale[i], a[i]));
          }
          ChannelVec<T, V>::store(static_cast<T*>(q.grad_y) + (tile * tp + r) * q.channels + c, gy);
        }
      }
    }
    if (q.partial == nullptr) continue;  // no sums asked for (the epilogue without statistics)
    if (row_groups == 1) {  // this thread's sums are the block's
#pragma unroll
      for (int i = 0; i < V; ++i) {
        q.partial[tile * 2 * q.channels + c + i] = first[i];
        q.partial[tile * 2 * q.channels + q.channels + c + i] = second[i];
      }
    } else {  // one channel group per thread (groups <= lanes): sums of the row groups, added in order below
#pragma unroll
      for (int i = 0; i < V; ++i) {
        row_sums[0][threadIdx.x * V + i] = first[i];
        row_sums[1][threadIdx.x * V + i] = second[i];
      }
    }
  }
  if (row_groups == 1 || q.partial == nullptr) return;  // uniform across the block
  __syncthreads();
  for (int e = threadIdx.x; e < 2 * lanes * V; e += kThreads) {
    const int which = e / (lanes * V), j = e % (lanes * V), cg = j / V, i = j % V;
    const int64_t c = static_cast<int64_t>(cg) * V + i;
    if (cg >= groups || c >= q.channels) continue;
    float sum = 0.f;
    for (int g2 = 0; g2 < row_groups; ++g2) sum += row_sums[which][(g2 * lanes + cg) * V + i];
    q.partial[tile * 2 * q.channels + which * q.channels + c] = sum;
  }
}

// The prologue and epilogue passes over tensors whose pixels are fastest (NCHW; channel_pass_planes), the same
// elements and results as separable_channel_pass_kernel, mapped the other way: a warp's lanes take consecutive
// pixels of one channel, so that its accesses are coalesced (the channel-fastest mapping has a warp read 32
// channels a plane apart). Block b takes the same pixels [t b, t b + t); thread i pixel i % 64 and, of each step
// of kPlaneChunk channels, every 4th from i / 64. The per-channel sums go through shared memory transposed: each
// of 8 row groups adds its 8 pixels in order, then the row groups are added in order, so the partial row of the
// block is the same on every run (not the other kernel's bits: another order).
constexpr int kPlaneChunk = 32;
template <typename T, ChannelPass kKind>
__global__ void __launch_bounds__(256) separable_plane_pass_kernel(const ChannelPassParams q) {
  static_assert(kKind != ChannelPass::GradY, "grad_y is written channel-fastest: separable_channel_pass_kernel");
  constexpr int kThreads = 256, kSlots = kThreads / kChannelPassPixels, kRowGroups = kThreads / kPlaneChunk;
  constexpr int kGroupRows = kChannelPassPixels / kRowGroups;
  __shared__ int64_t offset[4][kChannelPassPixels];
  __shared__ float stat[2][kPlaneChunk][kChannelPassPixels + 1];  // [sum][channel][pixel], padded: no conflicts
  __shared__ float row_sums[2][kRowGroups][kPlaneChunk];
  const int64_t tile = blockIdx.x;
  const int rows = channel_pass_tile_offsets(q, offset);
  const T* grad = static_cast<const T*>(q.grad.data);
  const T* act = static_cast<const T*>(q.act.data);
  const T* y = static_cast<const T*>(q.y.data);
  T* result = static_cast<T*>(q.result.data);
  const int r = threadIdx.x % kChannelPassPixels, slot = threadIdx.x / kChannelPassPixels;
  for (int64_t c0 = 0; c0 < q.channels; c0 += kPlaneChunk) {
#pragma unroll 4  // several channels' loads in flight per thread
    for (int cl = slot; cl < kPlaneChunk; cl += kSlots) {
      const int64_t c = c0 + cl;
      float first = 0.f, second = 0.f;
      if (r < rows && c < q.channels) {
        const float scale = q.scale != nullptr ? q.scale[c] : 1.f, a = q.vec_a != nullptr ? q.vec_a[c] : 0.f;
        if constexpr (kKind == ChannelPass::Prologue) {  // a = in_shift
          const float g = Elem<T>::load(grad + offset[0][r] + c * q.grad.stride[1]);
          const float xv = Elem<T>::load(act + offset[1][r] + c * q.act.stride[1]);
          Elem<T>::store(result + offset[3][r] + c * q.result.stride[1],
                         prologue_grad<T>(g, xv, scale, a, q.relu, q.scale != nullptr, first, second));
        } else {  // a = out_shift; the sums of y and y^2
          const float yv = Elem<T>::load(y + offset[2][r] + c * q.y.stride[1]);
          const float res = act != nullptr ? Elem<T>::load(act + offset[1][r] + c * q.act.stride[1]) : 0.f;
          const float z = epilogue_value<T>(yv, scale, a, act != nullptr, res, q.relu, first, second);
          if (result != nullptr) Elem<T>::store(result + offset[3][r] + c * q.result.stride[1], z);
        }
      }
      if (q.partial != nullptr) {
        stat[0][cl][r] = first;  // zeros past the last pixel or channel
        stat[1][cl][r] = second;
      }
    }
    if (q.partial == nullptr) continue;  // uniform across the block
    __syncthreads();
    {
      const int cl = threadIdx.x % kPlaneChunk, rg = threadIdx.x / kPlaneChunk;
      float s0 = 0.f, s1 = 0.f;
      for (int i = rg * kGroupRows; i < rg * kGroupRows + kGroupRows; ++i) {
        s0 += stat[0][cl][i];
        s1 += stat[1][cl][i];
      }
      row_sums[0][rg][cl] = s0;
      row_sums[1][rg][cl] = s1;
    }
    __syncthreads();
    if (threadIdx.x < 2 * kPlaneChunk) {
      const int which = threadIdx.x / kPlaneChunk, cl = threadIdx.x % kPlaneChunk;
      float sum = 0.f;
      for (int rg = 0; rg < kRowGroups; ++rg) sum += row_sums[which][rg][cl];
      if (c0 + cl < q.channels) q.partial[tile * 2 * q.channels + which * q.channels + c0 + cl] = sum;
    }
    __syncthreads();  // stat and row_sums are rewritten by the next step
  }
}

// relu?(round(x * scale + shift)), elementwise over (N, C, H, W) in x's strides, written in out's. A thread takes
// V consecutive channels of one pixel (V = kSepVec where both have channels fastest and whole aligned vectors:
// one access each way and one index computation per V elements; else 1).
template <typename T, int V>
__global__ void __launch_bounds__(256) prologue_apply_kernel(const DepthwiseTensor x, const DepthwiseTensor out,
                                                             int64_t n_, int64_t c_, int64_t h_, int64_t w_,
                                                             const float* scale, const float* shift, bool relu) {
  const int64_t groups = c_ / V, total = n_ * groups * h_ * w_;  // V divides c_ on the vector path
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = i % groups * V, pix = i / groups;  // channels fastest
    const int64_t w = pix % w_, h = pix / w_ % h_, n = pix / w_ / h_;
    float v[V];
    ChannelVec<T, V>::load(static_cast<const T*>(x.data) + n * x.stride[0] + c * x.stride[1] + h * x.stride[2] +
                               w * x.stride[3],
                           v);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      v[k] = prologue_value<T>(v[k], scale != nullptr ? scale[c + k] : 1.f, shift != nullptr ? shift[c + k] : 0.f,
                               relu);
    }
    ChannelVec<T, V>::store(static_cast<T*>(out.data) + n * out.stride[0] + c * out.stride[1] + h * out.stride[2] +
                                w * out.stride[3],
                            v);
  }
}

}  // namespace kernels
}  // namespace xception_ops
