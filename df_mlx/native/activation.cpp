#include "activation.h"

#include "cpu_task.h"
#include "fastmath.h"

namespace dfmlx {

namespace {

DFMLX_INLINE void tanh_all_body(const float* __restrict x, float* __restrict y, size_t n) {
  for (size_t i = 0; i < n; ++i) y[i] = tanh_f32(x[i]);
}

DFMLX_INLINE void sigmoid_all_body(const float* __restrict x, float* __restrict y, size_t n) {
  for (size_t i = 0; i < n; ++i) y[i] = sigmoid_f32(x[i]);
}

DFMLX_SIMD_VARIANTS(void, tanh_all, (const float* __restrict x, float* __restrict y, size_t n), (x, y, n))
DFMLX_SIMD_VARIANTS(void, sigmoid_all, (const float* __restrict x, float* __restrict y, size_t n), (x, y, n))

}  // namespace

mx::array activation(const mx::array& x, int kind) {
  require(kind == 0 || kind == 1, "activation", "kind is 0 (tanh) or 1 (sigmoid)");
  auto stream = cpu_stream("activation", {x});
  return mx::array(x.shape(), mx::float32, std::make_shared<Activation>(stream, static_cast<ActivationKind>(kind)),
                   {x});
}

void Activation::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  queue_cpu_task(stream(), inputs, outputs, [&](const std::vector<const float*>& in) {
    return [x = in[0], y = outputs[0].data<float>(), n = inputs[0].size(), kind = kind_]() {
      if (kind == ActivationKind::kTanh) {
        tanh_all(x, y, n);
      } else {
        sigmoid_all(x, y, n);
      }
    };
  });
}

void Activation::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("Activation has no GPU kernel (df_mlx uses mx.tanh and mx.sigmoid on GPUs)");
}

bool Activation::is_equivalent(const mx::Primitive& other) const {
  const auto* o = dynamic_cast<const Activation*>(&other);
  return o != nullptr && o->kind_ == kind_;
}

std::vector<mx::Shape> Activation::output_shapes(const std::vector<mx::array>& inputs) {
  return {inputs[0].shape()};
}

}  // namespace dfmlx
