// x * scale + shift per channel (the last axis), optionally with a ReLU, as one MLX primitive
// (CPU): an eval-mode BatchNorm2d and the ReLU after it in one pass over x.
#pragma once

#include <vector>

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace dfmlx {

namespace mx = mlx::core;

// x [..., C] * scale [C] + shift [C], then max(., 0) with `relu` (NaN stays NaN, as torch's
// relu); float32 on a CPU stream; the AVX variants round a * b + c once (FMA). MLX's compiled
// x * scale + shift then maximum ran about 15x slower where x's buffer was donated to the
// output (the in-place loop does not vectorise): a [96000, 64] matmul and BatchNorm + ReLU took
// 42 ms as one graph, 12 ms with an eval between them.
mx::array channel_affine(const mx::array& x, const mx::array& scale, const mx::array& shift, bool relu);

class ChannelAffine : public mx::Primitive {
 public:
  ChannelAffine(mx::Stream stream, bool relu) : mx::Primitive(stream), relu_(relu) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return relu_ ? "ChannelAffineReLU" : "ChannelAffine"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  bool relu_;
};

}  // namespace dfmlx
