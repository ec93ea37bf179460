// Geometry of 2-D max pooling with PyTorch's conventions: implicit padding that no window takes a value from,
// floor or ceil mode, no dilation.
//
// Torch-free and CUDA-free, like conv_geometry.h: the argument checks (checks.cpp), the kernels (kernels/pool.cuh)
// and the emulated tests all include it.
#pragma once

#include <cstdint>

#include "conv_geometry.h"

namespace xception_ops {

// The most taps a window may have: the window's argmax is kept as one byte per output, its tap's index.
constexpr int64_t kMaxPoolMaxTaps = 256;

// Output length along one axis, as torch.nn.functional.max_pool2d computes it: in ceil mode a last window that
// would start in the padding past the end is dropped. 0 when no window fits.
XO_HOST_DEVICE inline int64_t pool_out_size(int64_t in, int64_t kernel, int64_t stride, int64_t pad, bool ceil_mode) {
  // PyTorch's pooling_output_shape: the division rounds toward -infinity, so in ceil mode an input shorter than
  // the window still gives one output when the window starts inside it (size 2, kernel 3, stride 2: 1, not 0).
  const int64_t num = in + 2 * pad - kernel + (ceil_mode ? stride - 1 : 0);
  int64_t out = (num >= 0 ? num / stride : -((-num + stride - 1) / stride)) + 1;
  if (ceil_mode && (out - 1) * stride >= in + pad) --out;
  return out > 0 ? out : 0;
}

struct Pool2dGeometry {
  int64_t batch = 0, channels = 0;
  int64_t in_h = 0, in_w = 0;
  int64_t kernel_h = 1, kernel_w = 1;
  int64_t stride_h = 1, stride_w = 1;
  int64_t pad_h = 0, pad_w = 0;  // the same at both ends (the extra row of ceil mode is not padding)
  bool ceil_mode = false;
  int64_t out_h = 0, out_w = 0;
};

}  // namespace xception_ops
