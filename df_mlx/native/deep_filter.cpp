#include "deep_filter.h"

#include <algorithm>
#include <cstring>

#include "cpu_task.h"

namespace dfmlx {

namespace {

struct Geometry {
  size_t series, frames, bins, filtered;  // series = B * C
  int frame_size, before;
  float conj_sign;
};

void filter(const float* spec, const float* coefs, float* out, const Geometry& g) {
  const size_t row = 2 * g.bins, coef_row = 2 * g.filtered;
  for (size_t s = 0; s < g.series; ++s) {
    const float* x = spec + s * g.frames * row;
    const float* w = coefs + s * g.frame_size * g.frames * coef_row;  // [N, T, F', 2] of this series
    float* y = out + s * g.frames * row;
    for (size_t t = 0; t < g.frames; ++t) {
      float* yt = y + t * row;
      std::memcpy(yt + coef_row, x + t * row + coef_row, (row - coef_row) * sizeof(float));
      std::fill(yt, yt + coef_row, 0.0f);
      for (int n = 0; n < g.frame_size; ++n) {
        const long long source = static_cast<long long>(t) + n - g.before;
        if (source < 0 || source >= static_cast<long long>(g.frames)) continue;
        const float* xs = x + source * row;
        const float* wn = w + (n * g.frames + t) * coef_row;
        for (size_t f = 0; f < g.filtered; ++f) {
          const float s_re = xs[2 * f], s_im = xs[2 * f + 1];
          const float c_re = wn[2 * f], c_im = wn[2 * f + 1] * g.conj_sign;
          yt[2 * f] += s_re * c_re - s_im * c_im;
          yt[2 * f + 1] += s_re * c_im + s_im * c_re;
        }
      }
    }
  }
}

}  // namespace

mx::array deep_filter(const mx::array& spec, const mx::array& coefs, int frame_size, int before, bool conj) {
  require(spec.ndim() == 5 && spec.shape(-1) == 2, "deep_filter", "spec is [B, C, T, F, 2]");
  require(frame_size >= 1, "deep_filter", "frame_size >= 1");
  require(coefs.ndim() == 5 && coefs.shape(-1) == 2 && coefs.shape(0) == spec.shape(0) &&
              coefs.shape(1) == spec.shape(1) * frame_size && coefs.shape(2) == spec.shape(2) &&
              coefs.shape(3) <= spec.shape(3),
          "deep_filter", "coefs are [B, C * frame_size, T, F' <= F, 2] for spec [B, C, T, F, 2]");
  auto stream = cpu_stream("deep_filter", {spec, coefs});
  return mx::array(spec.shape(), mx::float32, std::make_shared<DeepFilter>(stream, frame_size, before, conj),
                   {spec, coefs});
}

void DeepFilter::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  queue_cpu_task(stream(), inputs, outputs, [&](const std::vector<const float*>& in) {
    const auto& spec = inputs[0];
    Geometry g{static_cast<size_t>(spec.shape(0) * spec.shape(1)), static_cast<size_t>(spec.shape(2)),
               static_cast<size_t>(spec.shape(3)), static_cast<size_t>(inputs[1].shape(3)), frame_size_, before_,
               conj_ ? -1.0f : 1.0f};
    return [spec = in[0], coefs = in[1], out = outputs[0].data<float>(), g]() { filter(spec, coefs, out, g); };
  });
}

void DeepFilter::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("DeepFilter has no GPU kernel (df_mlx uses MLX ops on GPUs)");
}

bool DeepFilter::is_equivalent(const mx::Primitive& other) const {
  const auto* o = dynamic_cast<const DeepFilter*>(&other);
  return o != nullptr && o->frame_size_ == frame_size_ && o->before_ == before_ && o->conj_ == conj_;
}

std::vector<mx::Shape> DeepFilter::output_shapes(const std::vector<mx::array>& inputs) {
  return {inputs[0].shape()};
}

}  // namespace dfmlx
