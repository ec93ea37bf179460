// One pass and dtype of the depthwise launchers (cuda/depthwise_launch.cuh), in a file of its own for a parallel build.
#include "cuda/depthwise_launch.cuh"

namespace xception_ops::depthwise_launch {
template cudaError_t forward_dtype<__half>(const DepthwiseParams&, cudaStream_t);
}  // namespace xception_ops::depthwise_launch
