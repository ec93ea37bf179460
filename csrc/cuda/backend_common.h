// Helpers shared by the "cuda" backend's torch layers (csrc/cuda/*_backend.cpp): dtype mapping, operand checks
// that raise Python errors naming the argument, tensor views for the kernels' params structs, launch checks.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime_api.h>

#include "kernels/depthwise_params.h"
#include "ops.h"

namespace xception_ops::cuda {

inline DType kernel_dtype(const char* op, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    case at::kDouble:
      XO_CHECK_TYPE(false, op, ": the cuda backend does not support float64; use backend=\"torch\" for "
                       "float64 tensors (or cast to float32, float16 or bfloat16)");
    default:
      XO_CHECK_TYPE(false, op, ": the cuda backend supports float32, float16 and bfloat16, got ",
                       t.scalar_type());
  }
  return DType::Float32;  // not reached
}

// Every tensor the kernels touch: a CUDA tensor on `ref`'s device, with `ref`'s dtype.
inline void check_operand(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                          const char* ref_name) {
  XO_CHECK_VALUE(t.is_cuda(), op, ": backend 'cuda' needs CUDA tensors, but ", name, " is on ", t.device());
  XO_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
                    " is on ", ref.device(), "; move both to the same device");
  XO_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
                   ref_name, " has dtype ", ref.scalar_type());
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape) {
  XO_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", dims(shape), ", got ", dims(t.sizes()));
}

// A 4-D tensor as the kernels see it: pointer and element strides in (N, C, H, W) order.
inline DepthwiseTensor view_of(const at::Tensor& t) {
  DepthwiseTensor v;
  v.data = t.data_ptr();
  for (int d = 0; d < 4; ++d) v.stride[d] = t.stride(d);
  return v;
}

// A per-channel vector as the kernels take it: contiguous float32 (nullptr when absent). `keep` holds the converted
// copy for as long as the kernel may read it. One that is already that is taken as it is, without the dispatched
// aten::to (a few of these per op and call, on the host).
inline const float* float_vector(const c10::optional<at::Tensor>& v, at::Tensor& keep) {
  if (!v.has_value()) return nullptr;
  keep = v->scalar_type() == at::kFloat ? v->contiguous() : v->to(at::kFloat).contiguous();
  return keep.data_ptr<float>();
}

// t in `type`: itself when it is already (a same-dtype .to is still a dispatched aten::to).
inline at::Tensor in_type(const at::Tensor& t, at::ScalarType type) { return t.scalar_type() == type ? t : t.to(type); }

inline void check_launch(const char* op, cudaError_t err) {
  XO_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorName(err), " (",
              cudaGetErrorString(err), ")");
}

}  // namespace xception_ops::cuda
