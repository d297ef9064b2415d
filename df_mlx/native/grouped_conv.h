// A grouped 2-D convolution (channels last) with few channels per group, as one MLX primitive
// (CPU): the shapes where a BLAS product is mostly overhead or zeros.
#pragma once

#include <array>
#include <vector>

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace dfmlx {

namespace mx = mlx::core;

// y[b, p, q, o] = sum over taps (i, j), in order, of the dot product of X[b, p sh + i dh,
// q sw + j dw, group(o) channels] and w[o, i, j, :], for x [B, H, W, C] and w [O, kh, kw, C/groups]
// (mx.conv2d's layout), where X is x padded with zeros (top, bottom, left, right). Returns
// y [B, Ho, Wo, O]; float32 on a CPU stream. geometry = {kh, kw, sh, sw, dh, dw, top, bottom,
// left, right}.
mx::array grouped_conv2d(const mx::array& x, const mx::array& w, std::array<int, 10> geometry, int groups);

class GroupedConv2d : public mx::Primitive {
 public:
  GroupedConv2d(mx::Stream stream, std::array<int, 10> geometry, int groups)
      : mx::Primitive(stream), geometry_(geometry), groups_(groups) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return "GroupedConv2d"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  std::array<int, 10> geometry_;
  int groups_;
};

}  // namespace dfmlx
