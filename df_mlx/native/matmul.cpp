#include "matmul.h"

#include "blas.h"
#include "cpu_task.h"

namespace dfmlx {

mx::array matmul(const mx::array& a, const mx::array& b) {
  require(a.ndim() == 2 && b.ndim() == 2, "matmul", "expects a [M, K] and b [K, N]");
  require(a.shape(1) == b.shape(0), "matmul", "inner sizes do not match");
  require(a.size() > 0 && b.size() > 0, "matmul", "empty operands");
  auto stream = cpu_stream("matmul", {a, b});
  return mx::array({a.shape(0), b.shape(1)}, mx::float32, std::make_shared<Matmul>(stream),
                   dense_inputs({a, b}, stream));
}

void Matmul::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const int m = inputs[0].shape(0), k = inputs[0].shape(1), n = inputs[1].shape(1);
  queue_cpu_task(stream(), inputs, outputs, [&] {
    return [a = inputs[0].data<float>(), b = inputs[1].data<float>(), c = outputs[0].data<float>(), m,
            k, n]() { blas().sgemm(kRowMajor, kNoTrans, kNoTrans, m, n, k, 1.0f, a, k, b, n, 0.0f, c, n); };
  });
}

void Matmul::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("Matmul has no GPU kernel (df_mlx uses MLX's matmul on GPUs)");
}

bool Matmul::is_equivalent(const mx::Primitive& other) const {
  return dynamic_cast<const Matmul*>(&other) != nullptr;
}

std::vector<mx::Shape> Matmul::output_shapes(const std::vector<mx::array>& inputs) {
  return {{inputs[0].shape(0), inputs[1].shape(1)}};
}

}  // namespace dfmlx
