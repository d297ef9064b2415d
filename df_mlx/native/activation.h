// tanh and sigmoid as one MLX primitive (CPU), on fastmath.h's vectorised functions.
#pragma once

#include <vector>

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace dfmlx {

namespace mx = mlx::core;

enum class ActivationKind { kTanh = 0, kSigmoid = 1 };

// tanh(x) or sigmoid(x) elementwise, within fastmath.h's stated bounds (2 and 3 ulp); float32
// on a CPU stream. MLX's CPU tanh and exp are scalar (about 13 ns an element here): DFN3's
// DF-coefficient tanh took 7 ms of a 10 s forward.
mx::array activation(const mx::array& x, int kind);

class Activation : public mx::Primitive {
 public:
  Activation(mx::Stream stream, ActivationKind kind) : mx::Primitive(stream), kind_(kind) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return kind_ == ActivationKind::kTanh ? "Tanh" : "Sigmoid"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  ActivationKind kind_;
};

}  // namespace dfmlx
