// The launchers' entry points that are compiled one instantiation per file (instances/*.cu), so that a
// many-core build compiles the kernels side by side instead of a few large files one after another: each is
// defined in its launcher's .cuh and instantiated by its file in instances/; the dispatchers (depthwise_launch.cu,
// separable_launch.cu) see only these declarations. No torch headers.
#pragma once

#include <cuda_runtime.h>

#include "kernels/depthwise_params.h"
#include "kernels/separable_params.h"

namespace xception_ops {
namespace depthwise_launch {

template <typename T>
cudaError_t forward_dtype(const DepthwiseParams& p, cudaStream_t stream);
template <typename T>
cudaError_t backward_input_dtype(const DepthwiseParams& p, cudaStream_t stream);
template <typename T>
cudaError_t backward_weight_dtype(const DepthwiseParams& p, float* workspace, cudaStream_t stream);

}  // namespace depthwise_launch

namespace separable_launch {

// The fused forward for one dtype and GEMM mode.
template <typename T, PointwiseMath kMath>
cudaError_t forward_math(const SeparableParams& p, int groups, cudaStream_t stream);

}  // namespace separable_launch
}  // namespace xception_ops
