// A depthwise 2-D convolution (channels last) as one MLX primitive (CPU).
#pragma once

#include <array>
#include <vector>

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace dfmlx {

namespace mx = mlx::core;

// y[b, p, q, c] = sum over taps (i, j), in order, of X[b, p sh + i dh, q sw + j dw, c] w[c, i, j, 0]
// for x [B, H, W, C] and the torch-layout weight w [C, kh, kw, 1] (with `flip`, w[c, kh-1-i, kw-1-j, 0]),
// where X is x with uh - 1 (uw - 1) zeros between neighbouring rows (columns) and padded with
// zeros (top, bottom, left, right): df_mlx.layers' depthwise conv2d, and with u > 1 and `flip`
// its depthwise transposed conv. The weight is read where it is (no reshaped, transposed or
// flipped copy in the graph: a streaming hop has a dozen of these convs). Returns
// y [B, Ho, Wo, C]; float32 on a CPU stream.
// geometry = {kh, kw, sh, sw, dh, dw, uh, uw, top, bottom, left, right}.
mx::array depthwise_conv2d(const mx::array& x, const mx::array& w, std::array<int, 12> geometry, bool flip);

class DepthwiseConv2d : public mx::Primitive {
 public:
  DepthwiseConv2d(mx::Stream stream, std::array<int, 12> geometry, bool flip)
      : mx::Primitive(stream), geometry_(geometry), flip_(flip) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return "DepthwiseConv2d"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  std::array<int, 12> geometry_;
  bool flip_;
};

}  // namespace dfmlx
