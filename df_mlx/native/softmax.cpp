#include "softmax.h"

#include "cpu_task.h"
#include "fastmath.h"

namespace dfmlx {

namespace {

constexpr int kLanes = 16;  // the sum's partial sums: the same order in every SIMD variant

// One row: the max, exp(x - max) (exp_f32, within 1 ulp of torch's exp), their sum in kLanes
// interleaved partial sums added in order, then each divided by it (DFMLX_SIMD_VARIANTS).
DFMLX_INLINE void softmax_row_body(const float* __restrict x, float* __restrict y, int n) {
  float m = x[0];
  for (int i = 1; i < n; ++i) m = x[i] > m ? x[i] : m;
  float partial[kLanes] = {};
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      y[i + l] = exp_f32(x[i + l] - m);
      partial[l] += y[i + l];
    }
  }
  for (; i < n; ++i) {
    y[i] = exp_f32(x[i] - m);
    partial[0] += y[i];
  }
  float sum = 0.0f;
  for (int l = 0; l < kLanes; ++l) sum += partial[l];
  for (int k = 0; k < n; ++k) y[k] = y[k] / sum;
}

DFMLX_SIMD_VARIANTS(void, softmax_row, (const float* __restrict x, float* __restrict y, int n), (x, y, n))

}  // namespace

mx::array softmax(const mx::array& x) {
  require(x.ndim() >= 1 && x.size() > 0, "softmax", "expects a non-empty array");
  auto stream = cpu_stream("softmax", {x});
  return mx::array(x.shape(), mx::float32, std::make_shared<Softmax>(stream), {x});
}

void Softmax::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const int n = inputs[0].shape(-1);
  const size_t rows = inputs[0].size() / n;
  queue_cpu_task(stream(), inputs, outputs, [&](const std::vector<const float*>& in) {
    return [x = in[0], y = outputs[0].data<float>(), n, rows]() {
      for (size_t r = 0; r < rows; ++r) softmax_row(x + r * n, y + r * n, n);
    };
  });
}

void Softmax::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("Softmax has no GPU kernel (df_mlx uses mx.softmax on GPUs)");
}

bool Softmax::is_equivalent(const mx::Primitive& other) const {
  return dynamic_cast<const Softmax*>(&other) != nullptr;
}

std::vector<mx::Shape> Softmax::output_shapes(const std::vector<mx::array>& inputs) {
  return {inputs[0].shape()};
}

}  // namespace dfmlx
