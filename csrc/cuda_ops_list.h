// The ops the CUDA backend has kernels for, by their Python names. Kept light (no torch headers) because the
// Python module init reads it too. An op not listed here falls back to the reference path under "auto".
#pragma once

#include <array>

namespace xception_ops::cuda {
inline constexpr std::array<const char*, 3> kImplementedOps = {
    "xception_ops.depthwise_conv2d",
    "xception_ops.depthwise_conv2d_backward_input",
    "xception_ops.depthwise_conv2d_backward_weight",
};
}  // namespace xception_ops::cuda
