// Kernels of the separable conv backward (the "cuda" backend's, csrc/cuda/separable_backward_backend.cpp):
//   separable_channel_pass_kernel     the element-wise passes with per-channel sums: grad_y from grad_out, and
//                                     the prologue's backward;
//   prologue_apply_kernel             relu?(x * scale + shift), what the depthwise stage reads, for its gradients.
// The matrix products (grad_pw, grad_mid) run on cuBLAS; the depthwise ones in kernels/depthwise.cuh.
//
// Torch-free: takes a ChannelPassParams (kernels/separable_params.h); compiles with nvcc or clang for any GPU
// from sm_37 on.
#pragma once

#include "separable.cuh"

namespace xception_ops {
namespace kernels {

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
