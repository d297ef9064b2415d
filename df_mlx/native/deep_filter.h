// DeepFilterNet's deep filter on (re, im) pairs as one MLX primitive (CPU): the complex FIR over
// frames of the lowest bins, with the other bins passed through, in one pass.
#pragma once

#include <vector>

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace dfmlx {

namespace mx = mlx::core;

// spec [B, C, T, F, 2] and coefs [B, C*N, T, F', 2] (N = frame_size, F' <= F) ->
// out [B, C, T, F, 2]: for f < F', out[t, f] = sum_{n < N} spec[t + n - before, f] * w[n, t, f]
// (complex products, spec zero outside [0, T), summed in order n = 0, 1, ..., w = coefs or its
// conjugate); for f >= F', out = spec. df_mlx.multiframe.DF's padding, unfold and products
// (MLX gathers and strided elementwise kernels) took 12 ms of DFN3's 10 s forward.
mx::array deep_filter(const mx::array& spec, const mx::array& coefs, int frame_size, int before, bool conj);

class DeepFilter : public mx::Primitive {
 public:
  DeepFilter(mx::Stream stream, int frame_size, int before, bool conj)
      : mx::Primitive(stream), frame_size_(frame_size), before_(before), conj_(conj) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return "DeepFilter"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  int frame_size_;
  int before_;
  bool conj_;
};

}  // namespace dfmlx
