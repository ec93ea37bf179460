// The registered operators, called from C++ through the dispatcher as a libtorch user would, on the CPU.
// Forward results against naive float64 loops; backward ops against the adjoint identity
// <A x, g> = <x, A^T g> (exact for these linear maps) and against central finite differences.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string>
#include <tuple>

#include "test_harness.h"

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

namespace {

at::TensorOptions f64() { return at::TensorOptions().dtype(at::kDouble); }

auto depthwise_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("xception_ops::depthwise_conv2d", "")
      .typed<Tensor(const Tensor&, const Tensor&, const OptTensor&, at::IntArrayRef, at::IntArrayRef,
                    at::IntArrayRef, c10::string_view)>();
}

auto depthwise_bwd_input_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("xception_ops::depthwise_conv2d_backward_input", "")
      .typed<Tensor(const Tensor&, const Tensor&, c10::SymIntArrayRef, at::IntArrayRef, at::IntArrayRef,
                    at::IntArrayRef, c10::string_view)>();
}

auto depthwise_bwd_weight_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("xception_ops::depthwise_conv2d_backward_weight", "")
      .typed<Tensor(const Tensor&, const Tensor&, c10::SymIntArrayRef, at::IntArrayRef, at::IntArrayRef,
                    at::IntArrayRef, c10::string_view)>();
}

using SepOut = std::tuple<Tensor, Tensor, Tensor>;
auto separable_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("xception_ops::separable_conv2d", "")
      .typed<SepOut(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, bool,
                    at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, c10::string_view, const OptTensor&,
                    const OptTensor&, const OptTensor&, const OptTensor&, bool, const OptTensor&, bool,
                    c10::string_view)>();
}

using SepGrads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
auto separable_bwd_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("xception_ops::separable_conv2d_backward", "")
      .typed<SepGrads(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&,
                      const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, bool, at::IntArrayRef,
                      at::IntArrayRef, at::IntArrayRef, c10::string_view, const OptTensor&, const OptTensor&,
                      const OptTensor&, const OptTensor&, bool, c10::string_view)>();
}

// Depthwise convolution by its definition, in float64 loops. padding = (top, bottom, left, right).
Tensor naive_depthwise(const Tensor& x, const Tensor& w, std::vector<int64_t> stride, std::vector<int64_t> pad,
                       std::vector<int64_t> dil) {
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), wd = x.size(3);
  const int64_t co = w.size(0), mult = co / c, kh = w.size(2), kw = w.size(3);
  const int64_t ho = (h + pad[0] + pad[1] - dil[0] * (kh - 1) - 1) / stride[0] + 1;
  const int64_t wo = (wd + pad[2] + pad[3] - dil[1] * (kw - 1) - 1) / stride[1] + 1;
  Tensor out = at::zeros({n, co, ho, wo}, f64());
  auto X = x.accessor<double, 4>();
  auto W = w.accessor<double, 4>();
  auto O = out.accessor<double, 4>();
  for (int64_t b = 0; b < n; ++b)
    for (int64_t oc = 0; oc < co; ++oc)
      for (int64_t i = 0; i < ho; ++i)
        for (int64_t j = 0; j < wo; ++j) {
          double acc = 0;
          for (int64_t p = 0; p < kh; ++p)
            for (int64_t q = 0; q < kw; ++q) {
              const int64_t y = i * stride[0] - pad[0] + p * dil[0];
              const int64_t xx = j * stride[1] - pad[2] + q * dil[1];
              if (y >= 0 && y < h && xx >= 0 && xx < wd) acc += X[b][oc / mult][y][xx] * W[oc][0][p][q];
            }
          O[b][oc][i][j] = acc;
        }
  return out;
}

double inner_product(const Tensor& a, const Tensor& b) { return (a * b).sum().item<double>(); }

double max_abs_diff(const Tensor& a, const Tensor& b) { return (a - b).abs().max().item<double>(); }

template <typename Fn>
void expect_value_error(Fn fn, const std::string& needle) {
  try {
    fn();
    std::printf("  expected a ValueError containing '%s', got none\n", needle.c_str());
    ++xo_test::failures();
  } catch (const c10::ValueError& e) {
    if (std::string(e.what()).find(needle) == std::string::npos) {
      std::printf("  ValueError without '%s': %s\n", needle.c_str(), e.what());
      ++xo_test::failures();
    }
  }
}

}  // namespace

TEST_CASE(depthwise_forward_matches_definition) {
  struct Case {
    std::vector<int64_t> x_shape;
    int64_t mult, kh, kw;
    std::vector<int64_t> stride, pad, dil;
  };
  const Case cases[] = {
      {{2, 3, 9, 8}, 1, 3, 3, {1, 1}, {1, 1, 1, 1}, {1, 1}},
      {{1, 4, 10, 9}, 2, 3, 3, {2, 2}, {0, 1, 1, 1}, {1, 1}},  // asymmetric "same" at stride 2
      {{2, 2, 11, 7}, 1, 5, 3, {1, 2}, {2, 2, 0, 2}, {2, 1}},
  };
  for (const auto& c : cases) {
    Tensor x = at::randn(c.x_shape, f64());
    Tensor w = at::randn({c.x_shape[1] * c.mult, 1, c.kh, c.kw}, f64());
    Tensor out = depthwise_op().call(x, w, c10::nullopt, c.stride, c.pad, c.dil, "torch");
    Tensor want = naive_depthwise(x, w, c.stride, c.pad, c.dil);
    EXPECT(out.sizes() == want.sizes());
    EXPECT_NEAR(max_abs_diff(out, want), 0.0, 1e-12);
    // channels_last in, channels_last out, same values
    Tensor out_cl = depthwise_op().call(x.contiguous(at::MemoryFormat::ChannelsLast), w, c10::nullopt, c.stride,
                                        c.pad, c.dil, "torch");
    EXPECT(out_cl.is_contiguous(at::MemoryFormat::ChannelsLast));
    EXPECT_NEAR(max_abs_diff(out_cl, want), 0.0, 1e-12);
  }
}

TEST_CASE(depthwise_backward_ops_are_adjoints) {
  const std::vector<int64_t> stride{2, 1}, pad{0, 1, 2, 1}, dil{1, 2};
  Tensor x = at::randn({2, 3, 10, 9}, f64());
  Tensor w = at::randn({6, 1, 3, 3}, f64());
  Tensor y = depthwise_op().call(x, w, c10::nullopt, stride, pad, dil, "torch");
  Tensor g = at::randn(y.sizes(), f64());
  std::vector<c10::SymInt> x_size(x.sizes().begin(), x.sizes().end());
  std::vector<c10::SymInt> w_size(w.sizes().begin(), w.sizes().end());
  Tensor gx = depthwise_bwd_input_op().call(g, w, x_size, stride, pad, dil, "torch");
  Tensor gw = depthwise_bwd_weight_op().call(g, x, w_size, stride, pad, dil, "torch");
  const double lhs = inner_product(y, g);
  EXPECT_NEAR(inner_product(x, gx), lhs, 1e-9 * std::abs(lhs) + 1e-9);  // <conv(x), g> = <x, conv^T(g)>
  EXPECT_NEAR(inner_product(w, gw), lhs, 1e-9 * std::abs(lhs) + 1e-9);  // linear in w as well
}

TEST_CASE(separable_forward_matches_composition) {
  Tensor x = at::randn({2, 4, 7, 8}, f64());
  Tensor dw = at::randn({4, 1, 3, 3}, f64());
  Tensor pw = at::randn({5, 4, 1, 1}, f64());
  Tensor in_scale = at::rand({4}, f64()) + 0.5, in_shift = at::randn({4}, f64());
  Tensor out_scale = at::rand({5}, f64()) + 0.5, out_shift = at::randn({5}, f64());
  Tensor residual = at::randn({2, 5, 7, 8}, f64());
  const std::vector<int64_t> one{1, 1}, pad{1, 1, 1, 1};
  auto [out, sum, sumsq] = separable_op().call(x, dw, pw, in_scale, in_shift, true, one, pad, one, "elu",
                                               c10::nullopt, c10::nullopt, out_scale, out_shift, true, residual, true,
                                               "torch");
  Tensor a = at::relu(x * in_scale.view({1, -1, 1, 1}) + in_shift.view({1, -1, 1, 1}));
  Tensor d = at::elu(naive_depthwise(a, dw, one, pad, one));
  Tensor y = at::einsum("nchw,kc->nkhw", {d, pw.view({5, 4})});
  Tensor want = at::relu(y * out_scale.view({1, -1, 1, 1}) + out_shift.view({1, -1, 1, 1}) + residual);
  EXPECT_NEAR(max_abs_diff(out, want), 0.0, 1e-10);
  EXPECT_NEAR(max_abs_diff(sum, y.sum({0, 2, 3})), 0.0, 1e-9);
  EXPECT_NEAR(max_abs_diff(sumsq, (y * y).sum({0, 2, 3})), 0.0, 1e-9);
}

// L = <out, g> + <sum, gs> + <sumsq, gq>; each gradient against a central difference along a random direction, with
// the mid activation `act` (its kinks are off every sample: a measure-zero set).
void check_separable_backward_by_finite_differences(const char* act) {
  const std::vector<int64_t> stride{2, 2}, pad{0, 1, 0, 1}, dil{1, 1};
  Tensor x = at::randn({2, 3, 8, 7}, f64());
  Tensor dw = at::randn({6, 1, 3, 3}, f64());
  Tensor pw = at::randn({4, 6, 1, 1}, f64());
  Tensor in_scale = at::rand({3}, f64()) + 0.5, in_shift = at::randn({3}, f64()) * 0.3;
  Tensor mid_scale = at::rand({6}, f64()) + 0.5, mid_shift = at::randn({6}, f64()) * 0.3;
  auto forward = [&](const Tensor& x_, const Tensor& dw_, const Tensor& pw_, const Tensor& s_, const Tensor& b_,
                     const Tensor& ms_, const Tensor& mb_) {
    return separable_op().call(x_, dw_, pw_, s_, b_, true, stride, pad, dil, act, ms_, mb_, c10::nullopt,
                               c10::nullopt, false, c10::nullopt, true, "torch");
  };
  auto [out, sum, sumsq] = forward(x, dw, pw, in_scale, in_shift, mid_scale, mid_shift);
  Tensor g = at::randn(out.sizes(), f64()), gs = at::randn({4}, f64()), gq = at::randn({4}, f64()) * 0.1;
  auto loss = [&](const SepOut& r) {
    return inner_product(std::get<0>(r), g) + inner_product(std::get<1>(r), gs) + inner_product(std::get<2>(r), gq);
  };
  auto grads = separable_bwd_op().call(g, gs, gq, c10::nullopt, x, dw, pw, in_scale, in_shift, true, stride, pad,
                                       dil, act, mid_scale, mid_shift, c10::nullopt, c10::nullopt, false, "torch");
  const Tensor* params[] = {&x, &dw, &pw, &in_scale, &in_shift, &mid_scale, &mid_shift};
  const Tensor grad_list[] = {std::get<0>(grads), std::get<1>(grads), std::get<2>(grads), std::get<3>(grads),
                              std::get<4>(grads), std::get<5>(grads), std::get<6>(grads)};
  const double eps = 1e-6;
  for (int i = 0; i < 7; ++i) {
    Tensor v = at::randn(params[i]->sizes(), f64());
    Tensor p[7] = {x, dw, pw, in_scale, in_shift, mid_scale, mid_shift};
    p[i] = *params[i] + eps * v;
    const double plus = loss(forward(p[0], p[1], p[2], p[3], p[4], p[5], p[6]));
    p[i] = *params[i] - eps * v;
    const double minus = loss(forward(p[0], p[1], p[2], p[3], p[4], p[5], p[6]));
    const double numeric = (plus - minus) / (2 * eps);
    const double analytic = inner_product(grad_list[i], v);
    EXPECT_NEAR(analytic, numeric, 1e-5 * (std::abs(numeric) + 1));
  }
  EXPECT(std::get<7>(grads).numel() == 0 && std::get<8>(grads).numel() == 0);  // no out_scale / out_shift given
}

TEST_CASE(separable_backward_matches_finite_differences) {
  check_separable_backward_by_finite_differences("relu");
  check_separable_backward_by_finite_differences("hardswish");  // (MobileNet V3's)
}

TEST_CASE(separable_op_is_differentiable_from_cpp) {
  // Autograd from libtorch (csrc/autograd.cpp): the gradients that backward() accumulates are the backward op's.
  const std::vector<int64_t> one{1, 1}, pad{1, 1, 1, 1};
  Tensor x = at::randn({2, 3, 6, 5}, f64()).requires_grad_();
  Tensor dw = at::randn({3, 1, 3, 3}, f64()).requires_grad_();
  Tensor pw = at::randn({4, 3, 1, 1}, f64()).requires_grad_();
  Tensor in_scale = (at::rand({3}, f64()) + 0.5).requires_grad_();
  Tensor residual = at::randn({2, 4, 6, 5}, f64()).requires_grad_();
  auto [out, sum, sumsq] = separable_op().call(x, dw, pw, in_scale, c10::nullopt, true, one, pad, one, "none",
                                               c10::nullopt, c10::nullopt, c10::nullopt, c10::nullopt, true, residual,
                                               true, "torch");
  EXPECT(out.requires_grad() && sum.requires_grad());
  Tensor g = at::randn(out.sizes(), f64()), gs = at::randn({4}, f64());
  ((out * g).sum() + (sum * gs).sum()).backward();
  auto want = separable_bwd_op().call(g, gs, at::zeros({4}, f64()), out.detach(), x.detach(), dw.detach(),
                                      pw.detach(), in_scale.detach(), c10::nullopt, true, one, pad, one, "none",
                                      c10::nullopt, c10::nullopt, c10::nullopt, c10::nullopt, true, "torch");
  EXPECT_NEAR(max_abs_diff(x.grad(), std::get<0>(want)), 0.0, 1e-12);
  EXPECT_NEAR(max_abs_diff(dw.grad(), std::get<1>(want)), 0.0, 1e-12);
  EXPECT_NEAR(max_abs_diff(pw.grad(), std::get<2>(want)), 0.0, 1e-12);
  EXPECT_NEAR(max_abs_diff(in_scale.grad(), std::get<3>(want)), 0.0, 1e-12);
  EXPECT_NEAR(max_abs_diff(residual.grad(), g.masked_fill(out.detach() <= 0, 0)), 0.0, 1e-12);
}

TEST_CASE(bad_arguments_raise_value_errors_naming_them) {
  Tensor x = at::randn({2, 4, 6, 6});
  Tensor dw = at::randn({4, 1, 3, 3});
  Tensor pw = at::randn({5, 4, 1, 1});
  const std::vector<int64_t> one{1, 1}, pad{1, 1, 1, 1}, nopad{0, 0, 0, 0};
  auto sep = [&](const Tensor& x_, const Tensor& dw_, const Tensor& pw_, std::vector<int64_t> p,
                 const char* backend) {
    separable_op().call(x_, dw_, pw_, c10::nullopt, c10::nullopt, false, one, p, one, "none", c10::nullopt,
                        c10::nullopt, c10::nullopt, c10::nullopt, false, c10::nullopt, false, backend);
  };
  expect_value_error([&] { sep(x[0], dw, pw, pad, "torch"); }, "x must be a 4-D tensor");
  expect_value_error([&] { sep(x, dw.slice(0, 0, 3), pw, pad, "torch"); }, "dw_weight has 3 output channels");
  expect_value_error([&] { sep(x, dw, pw.slice(1, 0, 3), pad, "torch"); }, "pw_weight has 3 input channels");
  expect_value_error([&] { sep(x.slice(2, 0, 2).slice(3, 0, 2), dw, pw, nopad, "torch"); },
                     "larger than the padded input 2x2");
  expect_value_error([&] { sep(x, dw, pw, pad, "cudnn"); }, "unknown backend 'cudnn'");
  expect_value_error([&] { sep(x, dw, pw, {1, 1, 1}, "torch"); }, "padding must have 4 values");
  bool type_error = false;
  try {
    sep(x.to(at::kInt), dw.to(at::kInt), pw.to(at::kInt), pad, "torch");
  } catch (const c10::TypeError& e) {
    type_error = std::string(e.what()).find("x has dtype Int") != std::string::npos;
  }
  EXPECT(type_error);
  bool not_built_or_wrong_device = false;
  try {
    sep(x, dw, pw, pad, "cuda");
  } catch (const c10::Error& e) {  // NotImplementedError (not built) or ValueError (CPU tensors)
    not_built_or_wrong_device = std::string(e.what()).find("backend 'cuda'") != std::string::npos;
  }
  EXPECT(not_built_or_wrong_device);
}

TEST_CASE(zero_batch_gives_empty_output) {
  Tensor x = at::randn({0, 3, 5, 5});
  Tensor dw = at::randn({3, 1, 3, 3});
  Tensor pw = at::randn({2, 3, 1, 1});
  const std::vector<int64_t> one{1, 1}, pad{1, 1, 1, 1};
  auto [out, sum, sumsq] = separable_op().call(x, dw, pw, c10::nullopt, c10::nullopt, false, one, pad, one, "none",
                                               c10::nullopt, c10::nullopt, c10::nullopt, c10::nullopt, false,
                                               c10::nullopt, true, "torch");
  EXPECT(out.sizes() == at::IntArrayRef({0, 2, 5, 5}));
  EXPECT(sum.numel() == 2 && sum.abs().max().item<float>() == 0.0f);
}

int main() { return xo_test::run_all(); }
