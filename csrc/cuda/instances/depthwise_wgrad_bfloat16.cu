// One pass and dtype of the depthwise launchers (cuda/depthwise_launch.cuh), in a file of its own for a parallel build.
#include "cuda/depthwise_launch.cuh"

namespace xception_ops::depthwise_launch {
template cudaError_t backward_weight_dtype<__nv_bfloat16>(const DepthwiseParams&, float*, cudaStream_t);
}  // namespace xception_ops::depthwise_launch
