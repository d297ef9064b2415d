// A dense float32 matrix product on the BLAS the native ops bind (CPU), for MLX's matmuls where
// libmlx's own cblas_sgemm is the wheel's reference BLAS (mlx.core imported before df_mlx).
#pragma once

#include <vector>

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace dfmlx {

namespace mx = mlx::core;

// a [M, K] @ b [K, N] -> [M, N], or batched: a [G, M, K] @ b [G, K, N] -> [G, M, N]; float32 on a
// CPU stream.
mx::array matmul(const mx::array& a, const mx::array& b);

// torch's F.linear without bias: x [..., K] @ w.T for a weight [N, K] -> [..., N], with no
// transposed view or reshape in the graph (each one op more; a streaming hop's products). A
// weight [N, ...] is read as [N, K] (a conv weight [O, kH, kW, I] against its im2col columns).
mx::array linear(const mx::array& x, const mx::array& w);

class Matmul : public mx::Primitive {
 public:
  Matmul(mx::Stream stream, bool linear) : mx::Primitive(stream), linear_(linear) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return "Matmul"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  bool linear_;  // b is a weight [N, K] of linear(), a any [..., K]
};

}  // namespace dfmlx
