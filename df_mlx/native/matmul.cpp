#include "matmul.h"

#include "blas.h"
#include "cpu_task.h"

namespace dfmlx {

mx::array matmul(const mx::array& a, const mx::array& b) {
  require((a.ndim() == 2 && b.ndim() == 2) || (a.ndim() == 3 && b.ndim() == 3 && a.shape(0) == b.shape(0)),
          "matmul", "expects a [M, K] and b [K, N], or a [G, M, K] and b [G, K, N]");
  require(a.shape(-1) == b.shape(-2), "matmul", "inner sizes do not match");
  require(a.size() > 0 && b.size() > 0, "matmul", "empty operands");
  auto stream = cpu_stream("matmul", {a, b});
  auto shape = a.shape();
  shape.back() = b.shape(-1);
  return mx::array(shape, mx::float32, std::make_shared<Matmul>(stream, false), {a, b});
}

mx::array linear(const mx::array& x, const mx::array& w) {
  require(x.ndim() >= 1 && w.ndim() >= 2, "linear", "expects x [..., K] and a weight [N, K] (or [N, ...] of K)");
  require(static_cast<size_t>(x.shape(-1)) * w.shape(0) == w.size(), "linear", "inner sizes do not match");
  require(x.size() > 0 && w.size() > 0, "linear", "empty operands");
  auto stream = cpu_stream("linear", {x, w});
  auto shape = x.shape();
  shape.back() = w.shape(0);
  return mx::array(shape, mx::float32, std::make_shared<Matmul>(stream, true), {x, w});
}

// b [.., K, N] laid out as the transpose of a dense [.., N, K] (a torch-layout weight's .T):
// BLAS reads it transposed where it is, without a copy.
static bool dense_transposed(const mx::array& b) {
  const int nd = b.ndim();
  const int64_t k = b.shape(-2), n = b.shape(-1);
  return (b.strides(-2) == 1 || k == 1) && (b.strides(-1) == k || n == 1) &&
         (nd == 2 || b.strides(0) == k * n) && !b.flags().row_contiguous;
}

void Matmul::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const auto& a_in = inputs[0];
  const int k = a_in.shape(-1);
  const int batch = !linear_ && a_in.ndim() == 3 ? a_in.shape(0) : 1;
  const int m = linear_ ? static_cast<int>(a_in.size() / k) : a_in.shape(-2);
  const int n = linear_ ? inputs[1].shape(0) : inputs[1].shape(-1);
  // linear's weight is read densely as [N, K]; matmul's b where it is if it is such a transpose
  const bool in_place = !linear_ && dense_transposed(inputs[1]);
  const bool b_trans = linear_ || in_place;
  queue_cpu_task(
      stream(), inputs, outputs,
      [&](const std::vector<const float*>& in) {
        return [a = in[0], b = in[1], c = outputs[0].data<float>(), batch, m, k, n, b_trans]() {
          for (int g = 0; g < batch; ++g) {
            blas().sgemm(kRowMajor, kNoTrans, b_trans ? kTrans : kNoTrans, m, n, k, 1.0f,
                         a + static_cast<size_t>(g) * m * k, k, b + static_cast<size_t>(g) * k * n, b_trans ? k : n,
                         0.0f, c + static_cast<size_t>(g) * m * n, n);
          }
        };
      },
      {false, in_place});
}

void Matmul::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("Matmul has no GPU kernel (df_mlx uses MLX's matmul on GPUs)");
}

bool Matmul::is_equivalent(const mx::Primitive& other) const {
  const auto* o = dynamic_cast<const Matmul*>(&other);
  return o != nullptr && o->linear_ == linear_;
}

std::vector<mx::Shape> Matmul::output_shapes(const std::vector<mx::array>& inputs) {
  auto shape = inputs[0].shape();
  shape.back() = linear_ ? inputs[1].shape(0) : inputs[1].shape(-1);
  return {shape};
}

}  // namespace dfmlx
