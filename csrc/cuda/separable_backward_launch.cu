// Launcher of the fused backward's pointwise weight gradient (kernels/separable_backward.cuh). No torch headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>

#include "kernels/separable_backward.cuh"
#include "kernels/separable_params.h"

namespace xception_ops {
namespace {

template <typename T, PointwiseMath kMath, int KH, int KW>
cudaError_t launch_grad(const PointwiseGradParams& q, int64_t slices, cudaStream_t stream) {
  const Conv2dGeometry& g = q.fwd.g;
  const dim3 grid(static_cast<unsigned>((g.dw_channels() + kSepTileN - 1) / kSepTileN),
                  static_cast<unsigned>((g.out_channels + kernels::kPwgRows - 1) / kernels::kPwgRows),
                  static_cast<unsigned>(slices));
  const size_t smem = kernels::pointwise_grad_smem(kMath, static_cast<int>(sizeof(T))).total;
  kernels::separable_pointwise_grad_kernel<T, kMath, KH, KW><<<grid, kSepThreads, smem, stream>>>(q);
  return cudaGetLastError();
}

template <typename T, PointwiseMath kMath>
cudaError_t grad_for_math(const PointwiseGradParams& q, int64_t slices, cudaStream_t stream) {
  if (q.fwd.g.kernel_h == 3 && q.fwd.g.kernel_w == 3) return launch_grad<T, kMath, 3, 3>(q, slices, stream);
  return launch_grad<T, kMath, 0, 0>(q, slices, stream);
}

}  // namespace

cudaError_t launch_separable_pointwise_grad(const PointwiseGradParams& q, DType dtype, PointwiseMath math,
                                            int64_t slices, cudaStream_t stream) {
  const Conv2dGeometry& g = q.fwd.g;
  if (slices < 1 || slices > 65535 || g.dw_channels() > INT_MAX ||
      (g.out_channels + kernels::kPwgRows - 1) / kernels::kPwgRows > 65535) {
    return cudaErrorInvalidValue;
  }
  // 16-bit operands on tensor cores where the forward would use them; FFMA otherwise (float32 exact).
  const bool tc = separable_16bit_tensor_cores(math);
  switch (dtype) {
    case DType::Float32: return grad_for_math<float, PointwiseMath::Ffma>(q, slices, stream);
    case DType::Float16:
      return tc ? grad_for_math<__half, PointwiseMath::TensorCore>(q, slices, stream)
                : grad_for_math<__half, PointwiseMath::Ffma>(q, slices, stream);
    case DType::BFloat16:
      return tc ? grad_for_math<__nv_bfloat16, PointwiseMath::TensorCore>(q, slices, stream)
                : grad_for_math<__nv_bfloat16, PointwiseMath::Ffma>(q, slices, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace xception_ops
