// The "cuda" backend's fused separable forward: checks, device guard, allocation, the GEMM mode and the launch
// plan; the kernels and their launcher are torch-free (kernels/separable.cuh, cuda/separable_launch.cu).
//
// The router in registration.cpp has already checked shapes, dtypes and devices (check_separable); the checks
// here repeat the ones a launch depends on, so this function is safe on its own.
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <cstring>

#include "cuda/backend_common.h"
#include "cuda_backend.h"
#include "kernels/separable_params.h"

namespace xception_ops::cuda {
namespace {

constexpr const char* kForward = "xception_ops.separable_conv2d";

// Implementation choices for comparing kernel versions on one build (benchmarks/RESULTS.md), read once:
// XCEPTION_OPS_SEPARABLE_GEMM=wmma runs the fp16 / bf16 GEMM through wmma instead of ldmatrix + mma.sync;
// XCEPTION_OPS_SEPARABLE_TILES=square takes 8 x 8 pixel tiles with a staged input window where they apply,
// instead of 64 consecutive pixels (slower on the H100 in session 3: 24.7 against 20.0 ms over Xception's layers);
// =runs takes run tiles where they apply (separable_run_tiles_ok: a window of input rows slid down runs of 4
// pixels; written in session 7 without a GPU, not yet measured, hence not the default).
bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}
const bool kWmma16 = env_is("XCEPTION_OPS_SEPARABLE_GEMM", "wmma");
const bool kSquareTiles = env_is("XCEPTION_OPS_SEPARABLE_TILES", "square");
const bool kRunTiles = env_is("XCEPTION_OPS_SEPARABLE_TILES", "runs");

}  // namespace

std::tuple<Tensor, Tensor, Tensor> separable_conv2d(const Tensor& x, const Tensor& dw_weight,
                                                    const Tensor& pw_weight, const SeparableOptions& opt,
                                                    const Conv2dGeometry& g) {
  XO_CHECK_VALUE(x.is_cuda(), kForward, ": backend 'cuda' needs CUDA tensors, but x is on ", x.device());
  const DType dtype = kernel_dtype(kForward, x);
  check_operand(kForward, "dw_weight", dw_weight, x, "x");
  check_operand(kForward, "pw_weight", pw_weight, x, "x");
  check_shape(kForward, "x", x, {g.batch, g.in_channels, g.in_h, g.in_w});
  check_shape(kForward, "dw_weight", dw_weight, {g.dw_channels(), 1, g.kernel_h, g.kernel_w});
  check_shape(kForward, "pw_weight", pw_weight, {g.out_channels, g.dw_channels(), 1, 1});
  const std::vector<int64_t> out_shape = {g.batch, g.out_channels, g.out_h, g.out_w};
  const char* vector_names[] = {"in_scale", "in_shift", "out_scale", "out_shift"};
  const OptTensor* vectors[] = {&opt.in_scale, &opt.in_shift, &opt.out_scale, &opt.out_shift};
  for (int i = 0; i < 4; ++i) {
    if (!vectors[i]->has_value()) continue;
    const Tensor& v = **vectors[i];
    XO_CHECK_VALUE(v.is_cuda() && v.device() == x.device(), kForward, ": ", vector_names[i], " is on ",
                      v.device(), " but x is on ", x.device());
    XO_CHECK_VALUE(v.dim() == 1 && v.size(0) == (i < 2 ? g.in_channels : g.out_channels), kForward, ": ",
                      vector_names[i], " must have shape [", i < 2 ? g.in_channels : g.out_channels, "], got ",
                      dims(v.sizes()));
  }
  if (opt.residual.has_value()) {
    check_operand(kForward, "residual", *opt.residual, x, "x");
    check_shape(kForward, "residual", *opt.residual, out_shape);
  }

  const c10::cuda::CUDAGuard guard(x.device());
  const at::MemoryFormat fmt = output_memory_format(x);
  Tensor out = at::empty(out_shape, x.options().memory_format(fmt));
  const auto stats_options = x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous);
  Tensor sum = at::empty({opt.compute_stats ? g.out_channels : 0}, stats_options);
  Tensor sumsq = at::empty({opt.compute_stats ? g.out_channels : 0}, stats_options);

  DeviceCaps caps;
  check_launch(kForward, current_device_caps(&caps));
  // PyTorch's own convolutions follow the cuDNN TF32 flag (torch.backends.cudnn.allow_tf32): so do we.
  const PointwiseMath math = separable_math(dtype, caps.major, at::globalContext().allowTF32CuDNN(), kWmma16);
  const int dtype_bytes = static_cast<int>(x.element_size());

  SeparableParams p;
  p.g = g;
  p.x = view_of(x);
  p.out = view_of(out);
  if (opt.residual.has_value()) p.residual = view_of(*opt.residual);
  const Tensor dw = dw_weight.contiguous(), pw = pw_weight.contiguous();
  p.dw_weight = dw.data_ptr();
  p.pw_weight = pw.data_ptr();
  Tensor keep[4];
  p.in_scale = float_vector(opt.in_scale, keep[0]);
  p.in_shift = float_vector(opt.in_shift, keep[1]);
  p.out_scale = float_vector(opt.out_scale, keep[2]);
  p.out_shift = float_vector(opt.out_shift, keep[3]);
  p.in_relu = opt.in_relu;
  p.mid = static_cast<int32_t>(opt.mid);
  p.out_relu = opt.out_relu;
  // A tensor whose channels are fastest in memory is read / written channel-fastest across threads.
  p.x_channels_last = x.size(1) > 1 && x.stride(1) == 1;
  p.out_channels_last = fmt == at::MemoryFormat::ChannelsLast;
  p.square_tiles = separable_spatial_tiles(g) && kSquareTiles;
  XO_CHECK(separable_plan(p, math, dtype_bytes, caps.smem_optin), kForward, ": this GPU's shared memory (",
              caps.smem_optin, " bytes per block) is too small for the fused kernel");
  p.run_tiles = kRunTiles && separable_run_tiles_ok(p, math);
  XO_CHECK_VALUE(g.dw_channels() < (int64_t{1} << 31), kForward, ": more than 2^31 - 1 depthwise channels");

  Tensor workspace;
  if (opt.compute_stats) {
    workspace = at::empty({static_cast<int64_t>(separable_stats_workspace_bytes(p) / sizeof(float))}, stats_options);
    p.stats_partial = workspace.data_ptr<float>();
  }
  const int groups = separable_channel_groups(p, caps.sms);
  check_launch(kForward, launch_separable_forward(p, dtype, math, groups,
                                                  opt.compute_stats ? sum.data_ptr<float>() : nullptr,
                                                  opt.compute_stats ? sumsq.data_ptr<float>() : nullptr,
                                                  c10::cuda::getCurrentCUDAStream()));
  return {out, sum, sumsq};
}

}  // namespace xception_ops::cuda
