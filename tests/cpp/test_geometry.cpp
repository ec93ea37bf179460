// The torch-free geometry header that the kernels share: output sizes and TensorFlow "same" padding.
#include <cmath>

#include "kernels/conv_geometry.h"
#include "test_harness.h"

using xception_ops::conv_out_size;
using xception_ops::Conv2dGeometry;
using xception_ops::same_padding;

TEST_CASE(output_size_matches_the_convolution_formula) {
  EXPECT(conv_out_size(299, 0, 0, 3, 2, 1) == 149);  // Xception's first conv
  EXPECT(conv_out_size(149, 0, 0, 3, 1, 1) == 147);
  EXPECT(conv_out_size(147, 1, 1, 3, 1, 1) == 147);
  EXPECT(conv_out_size(10, 2, 2, 3, 1, 2) == 10);     // dilation 2, padding 2
  EXPECT(conv_out_size(2, 0, 0, 3, 1, 1) == 0);       // kernel larger than the input
  EXPECT(conv_out_size(7, 0, 1, 3, 2, 1) == 3);
}

TEST_CASE(same_padding_is_tensorflows) {
  // out = ceil(in / stride); the odd row of padding goes at the end.
  for (int64_t in = 1; in <= 40; ++in) {
    for (int64_t stride = 1; stride <= 3; ++stride) {
      for (int64_t dilation = 1; dilation <= 2; ++dilation) {
        const auto p = same_padding(in, 3, stride, dilation);
        EXPECT(p.end - p.begin == 0 || p.end - p.begin == 1);
        EXPECT(conv_out_size(in, p.begin, p.end, 3, stride, dilation) == (in + stride - 1) / stride);
      }
    }
  }
  const auto p74 = same_padding(74, 3, 2, 1);  // Xception's block2 pool input: TF pads (0, 1)
  EXPECT(p74.begin == 0 && p74.end == 1);
  const auto p147 = same_padding(147, 3, 2, 1);
  EXPECT(p147.begin == 1 && p147.end == 1);
}

TEST_CASE(geometry_struct_fills_output_size) {
  Conv2dGeometry g;
  g.in_h = 74;
  g.in_w = 37;
  g.kernel_h = g.kernel_w = 3;
  g.stride_h = g.stride_w = 2;
  g.pad_top = 0;
  g.pad_bottom = 1;
  g.pad_left = g.pad_right = 1;
  g.compute_output_size();
  EXPECT(g.out_h == 37 && g.out_w == 19);
  EXPECT(!g.symmetric_padding());
  EXPECT(g.span_h() == 3 && g.padded_h() == 75);
}

int main() { return xo_test::run_all(); }
