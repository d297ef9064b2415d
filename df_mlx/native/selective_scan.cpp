#include "selective_scan.h"

#include <algorithm>
#include <string>

#include "cpu_task.h"
#include "fastmath.h"

namespace dfmlx {

namespace {

// One step of one channel d: h[n] = exp(dt a[n]) h[n] + (dt b[n]) x; returns sum_n h[n] c[n].
// The exp loop vectorises (DFMLX_SIMD_VARIANTS).
DFMLX_INLINE float scan_channel_body(
    float* __restrict h, const float* __restrict a, const float* __restrict b,
    const float* __restrict c, float dt, float x, int states) {
  for (int n = 0; n < states; ++n) {
    h[n] = exp_f32(dt * a[n]) * h[n] + (dt * b[n]) * x;
  }
  float y = 0.0f;
  for (int n = 0; n < states; ++n) {
    y += h[n] * c[n];
  }
  return y;
}

DFMLX_SIMD_VARIANTS(float, scan_channel,
                    (float* __restrict h, const float* __restrict a, const float* __restrict b,
                     const float* __restrict c, float dt, float x, int states),
                    (h, a, b, c, dt, x, states))

void run_scan(const float* x, const float* delta, const float* a, const float* b, const float* c,
              const float* h0, float* y, float* h, int batch, int length, int channels, int states) {
  const size_t state_size = static_cast<size_t>(channels) * states;
  std::copy(h0, h0 + batch * state_size, h);
  for (int i = 0; i < batch; ++i) {
    float* h_i = h + i * state_size;
    for (int t = 0; t < length; ++t) {
      const size_t row = static_cast<size_t>(i) * length + t;
      const float* b_t = b + row * states;
      const float* c_t = c + row * states;
      for (int d = 0; d < channels; ++d) {
        const size_t at = row * channels + d;
        y[at] = scan_channel(h_i + static_cast<size_t>(d) * states, a + static_cast<size_t>(d) * states,
                             b_t, c_t, delta[at], x[at], states);
      }
    }
  }
}

void check(bool ok, const std::string& what) {
  require(ok, "selective_scan", what);
}

}  // namespace

std::vector<mx::array> selective_scan(const mx::array& x, const mx::array& delta, const mx::array& a,
                                      const mx::array& b, const mx::array& c, const mx::array& h0) {
  check(x.ndim() == 3 && delta.ndim() == 3 && a.ndim() == 2 && b.ndim() == 3 && c.ndim() == 3 &&
            h0.ndim() == 3,
        "expects x, delta [B, L, D], A [D, N], B, C [B, L, N], h0 [B, D, N]");
  const int batch = x.shape(0), length = x.shape(1), channels = x.shape(2), states = a.shape(1);
  check(length > 0, "no time steps");
  check(delta.shape() == x.shape() && a.shape(0) == channels &&
            b.shape() == mx::Shape{batch, length, states} && c.shape() == b.shape() &&
            h0.shape() == mx::Shape{batch, channels, states},
        "shapes do not match");
  auto stream = cpu_stream("selective_scan", {x, delta, a, b, c, h0});
  return mx::array::make_arrays({x.shape(), h0.shape()}, {mx::float32, mx::float32},
                                std::make_shared<SelectiveScan>(stream),
                                {x, delta, a, b, c, h0});
}

void SelectiveScan::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const auto& x = inputs[0];
  const int batch = x.shape(0), length = x.shape(1), channels = x.shape(2);
  const int states = inputs[2].shape(1);
  queue_cpu_task(stream(), inputs, outputs, [&](const std::vector<const float*>& in) {
    return [x = in[0], delta = in[1], a = in[2],
            b = in[3], c = in[4], h0 = in[5],
            y = outputs[0].data<float>(), h = outputs[1].data<float>(), batch, length, channels,
            states]() { run_scan(x, delta, a, b, c, h0, y, h, batch, length, channels, states); };
  });
}

void SelectiveScan::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("SelectiveScan has no GPU kernel (df_mlx runs the pure-MLX scan on GPUs)");
}

bool SelectiveScan::is_equivalent(const mx::Primitive& other) const {
  return dynamic_cast<const SelectiveScan*>(&other) != nullptr;
}

std::vector<mx::Shape> SelectiveScan::output_shapes(const std::vector<mx::array>& inputs) {
  return {inputs[0].shape(), inputs[5].shape()};
}

}  // namespace dfmlx
