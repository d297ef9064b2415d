#include "channel_affine.h"

#include "cpu_task.h"
#include "fastmath.h"

namespace dfmlx {

namespace {

DFMLX_INLINE void affine_rows_body(const float* __restrict x, const float* __restrict scale,
                                   const float* __restrict shift, float* __restrict y, size_t rows,
                                   size_t channels, bool relu) {
  for (size_t r = 0; r < rows; ++r, x += channels, y += channels) {
    if (relu) {
      for (size_t c = 0; c < channels; ++c) {
        const float v = x[c] * scale[c] + shift[c];
        y[c] = v < 0.0f ? 0.0f : v;
      }
    } else {
      for (size_t c = 0; c < channels; ++c) y[c] = x[c] * scale[c] + shift[c];
    }
  }
}

DFMLX_SIMD_VARIANTS(void, affine_rows,
                    (const float* __restrict x, const float* __restrict scale, const float* __restrict shift,
                     float* __restrict y, size_t rows, size_t channels, bool relu),
                    (x, scale, shift, y, rows, channels, relu))

}  // namespace

mx::array channel_affine(const mx::array& x, const mx::array& scale, const mx::array& shift, bool relu) {
  require(x.ndim() >= 1, "channel_affine", "x has a channel axis");
  const int channels = x.shape(-1);
  for (const auto* a : {&scale, &shift}) {
    require(a->ndim() == 1 && a->shape(0) == channels, "channel_affine", "scale and shift are [C], x [..., C]");
  }
  auto stream = cpu_stream("channel_affine", {x, scale, shift});
  return mx::array(x.shape(), mx::float32, std::make_shared<ChannelAffine>(stream, relu), {x, scale, shift});
}

void ChannelAffine::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  queue_cpu_task(stream(), inputs, outputs, [&](const std::vector<const float*>& in) {
    const size_t channels = inputs[0].shape(-1);
    return [x = in[0], scale = in[1], shift = in[2], y = outputs[0].data<float>(), channels,
            rows = channels ? inputs[0].size() / channels : 0, relu = relu_]() {
      affine_rows(x, scale, shift, y, rows, channels, relu);
    };
  });
}

void ChannelAffine::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("ChannelAffine has no GPU kernel (df_mlx uses MLX ops on GPUs)");
}

bool ChannelAffine::is_equivalent(const mx::Primitive& other) const {
  const auto* o = dynamic_cast<const ChannelAffine*>(&other);
  return o != nullptr && o->relu_ == relu_;
}

std::vector<mx::Shape> ChannelAffine::output_shapes(const std::vector<mx::array>& inputs) {
  return {inputs[0].shape()};
}

}  // namespace dfmlx
