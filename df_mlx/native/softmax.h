// Softmax over the last axis as one MLX primitive (CPU), on fastmath.h's vectorised exp.
#pragma once

#include <vector>

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace dfmlx {

namespace mx = mlx::core;

// exp(x - max) / sum(exp(x - max)) over the last axis of x; float32 on a CPU stream. MLX's CPU
// exp is scalar (about 13 ns an element here), which made DFNet4's attention softmaxes a fifth
// of its forward.
mx::array softmax(const mx::array& x);

class Softmax : public mx::Primitive {
 public:
  explicit Softmax(mx::Stream stream) : mx::Primitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return "Softmax"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
};

}  // namespace dfmlx
