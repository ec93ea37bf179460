// One dtype and GEMM mode of the fused separable forward (cuda/separable_launch.cuh), in a file of its own for a
// parallel build.
#include "cuda/separable_launch.cuh"

namespace xception_ops::separable_launch {
template cudaError_t forward_math<__half, PointwiseMath::TensorCore>(const SeparableParams&, int, cudaStream_t);
}  // namespace xception_ops::separable_launch
