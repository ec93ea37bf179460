// The ops the CUDA backend has kernels for, by their Python names. Kept light (no torch headers) because the
// Python module init reads it too.
#pragma once

#include <array>

namespace xception_ops::cuda {
inline constexpr std::array<const char*, 13> kImplementedOps = {
    "xception_ops.depthwise_conv2d",
    "xception_ops.depthwise_conv2d_backward_input",
    "xception_ops.depthwise_conv2d_backward_weight",
    "xception_ops.separable_conv2d",
    "xception_ops.separable_conv2d_backward",
    "xception_ops.batch_norm_finalize",
    "xception_ops.batch_norm_finalize_backward",
    "xception_ops.batch_norm_update_stats",
    "xception_ops.scale_shift",
    "xception_ops.scale_shift_backward",
    "xception_ops.max_pool2d",
    "xception_ops.max_pool2d_backward",
    "xception_ops.max_pool2d_scale_shift_backward",
};
// The subset that backend "auto" takes on CUDA tensors: kernels that beat the reference path wherever measured
// (benchmarks/RESULTS.md). The depthwise kernels do not yet: PyTorch's forward is faster on the H200.
inline constexpr std::array<const char*, 0> kAutoOps = {};
}  // namespace xception_ops::cuda
