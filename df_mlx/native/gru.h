// torch's GRU recurrence as one MLX primitive (CPU).
#pragma once

#include <vector>

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace dfmlx {

namespace mx = mlx::core;

// Every step of h = GRUCell(xp[t], h) over axis 0 of the input projection xp [T, B, 3H]
// (biases of the input side included) from h0 [B, H], with w_hh [3H, H] and b_hh [3H] in torch's
// layout and gate order r, z, n. Returns {outputs [T, B, H], last state [B, H]}; `reverse`
// runs from the last step. float32 on a CPU stream.
std::vector<mx::array> gru_scan(const mx::array& xp, const mx::array& h0, const mx::array& w_hh,
                                const mx::array& b_hh, bool reverse);

class GRUScan : public mx::Primitive {
 public:
  GRUScan(mx::Stream stream, bool reverse) : mx::Primitive(stream), reverse_(reverse) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return "GRUScan"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  bool reverse_;
};

}  // namespace dfmlx
