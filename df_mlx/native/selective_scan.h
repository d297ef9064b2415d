// The Mamba selective scan as one MLX primitive (CPU).
#pragma once

#include <vector>

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace dfmlx {

namespace mx = mlx::core;

// y_t = <h_t, C_t> with h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t, in the op order of
// df_mlx.mamba._scan_step, over x, delta [B, L, D], A [D, N], B, C [B, L, N] from h0 [B, D, N].
// Returns {y [B, L, D], h_L [B, D, N]}. float32 on a CPU stream.
std::vector<mx::array> selective_scan(const mx::array& x, const mx::array& delta, const mx::array& a,
                                      const mx::array& b, const mx::array& c, const mx::array& h0);

class SelectiveScan : public mx::Primitive {
 public:
  explicit SelectiveScan(mx::Stream stream) : mx::Primitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return "SelectiveScan"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
};

}  // namespace dfmlx
