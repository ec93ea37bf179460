// Geometry of the depthwise and separable convolutions: sizes, padding and output shape.
//
// Torch-free on purpose: the CUDA kernels include this header and are compiled for old GPUs
// (sm_37 with clang + CUDA 11.8) where no torch headers exist. Everything here works on host and device.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define XO_HOST_DEVICE __host__ __device__
#else
#define XO_HOST_DEVICE
#endif

namespace xception_ops {

// Output length of a convolution along one axis. Padding may differ at the two ends, which is how
// TensorFlow's "same" padding comes out at stride 2 (one more row at the bottom than at the top).
XO_HOST_DEVICE inline int64_t conv_out_size(int64_t in, int64_t pad_begin, int64_t pad_end, int64_t kernel,
                                            int64_t stride, int64_t dilation) {
  const int64_t span = dilation * (kernel - 1) + 1;  // receptive field of one output
  const int64_t padded = in + pad_begin + pad_end;
  return padded < span ? 0 : (padded - span) / stride + 1;
}

struct PadPair {
  int64_t begin;
  int64_t end;
};

// TensorFlow / Keras "same": out = ceil(in / stride), the padding split with the extra row at the end.
XO_HOST_DEVICE inline PadPair same_padding(int64_t in, int64_t kernel, int64_t stride, int64_t dilation) {
  const int64_t out = (in + stride - 1) / stride;
  int64_t total = (out - 1) * stride + dilation * (kernel - 1) + 1 - in;
  if (total < 0) total = 0;
  return PadPair{total / 2, total - total / 2};
}

// Everything a depthwise or fused separable kernel needs to know about the shapes.
// Channel counts: the depthwise stage maps `in_channels` to `in_channels * depth_multiplier` channels,
// the pointwise stage maps those to `out_channels` (equal to the depthwise channels for a plain depthwise op).
struct Conv2dGeometry {
  int64_t batch = 0;
  int64_t in_channels = 0;
  int64_t in_h = 0, in_w = 0;
  int64_t depth_multiplier = 1;
  int64_t out_channels = 0;
  int64_t kernel_h = 1, kernel_w = 1;
  int64_t stride_h = 1, stride_w = 1;
  int64_t pad_top = 0, pad_bottom = 0, pad_left = 0, pad_right = 0;
  int64_t dilation_h = 1, dilation_w = 1;
  int64_t out_h = 0, out_w = 0;

  XO_HOST_DEVICE int64_t dw_channels() const { return in_channels * depth_multiplier; }
  XO_HOST_DEVICE bool symmetric_padding() const { return pad_top == pad_bottom && pad_left == pad_right; }
  XO_HOST_DEVICE int64_t span_h() const { return dilation_h * (kernel_h - 1) + 1; }
  XO_HOST_DEVICE int64_t span_w() const { return dilation_w * (kernel_w - 1) + 1; }
  XO_HOST_DEVICE int64_t padded_h() const { return in_h + pad_top + pad_bottom; }
  XO_HOST_DEVICE int64_t padded_w() const { return in_w + pad_left + pad_right; }

  // Fills out_h / out_w from the rest.
  XO_HOST_DEVICE void compute_output_size() {
    out_h = conv_out_size(in_h, pad_top, pad_bottom, kernel_h, stride_h, dilation_h);
    out_w = conv_out_size(in_w, pad_left, pad_right, kernel_w, stride_w, dilation_w);
  }
};

}  // namespace xception_ops
