#include "depthwise_conv.h"

#include <string>

#include "cpu_task.h"
#include "fastmath.h"

namespace dfmlx {

namespace {

// Kernel, stride, dilation, input dilation (a transposed conv's zeros between inputs) and the
// padding before and after, by axis.
struct Geometry {
  int kh, kw, sh, sw, dh, dw, uh, uw, top, bottom, left, right;
  static int out_size(int in, int k, int s, int d, int u, int before, int after) {
    return ((in - 1) * u + 1 + before + after - d * (k - 1) - 1) / s + 1;
  }
  int out_h(int in) const { return out_size(in, kh, sh, dh, uh, top, bottom); }
  int out_w(int in) const { return out_size(in, kw, sw, dw, uw, left, right); }
};

Geometry unpack(const std::array<int, 12>& g) {
  return {g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], g[10], g[11]};
}

// One output row y[b, p, :, :] from the input image x[b] [H, W, C]: zeros, then each tap in
// order added over the output columns it reaches, a vectorised multiply-add over the channels
// (DFMLX_SIMD_VARIANTS). Starting from zeros gives the same values as starting from the first
// tap (0 + a == a). Positions between dilated inputs read zeros and are skipped.
DFMLX_INLINE void depthwise_row_body(const float* __restrict x, const float* __restrict w,
                                     float* __restrict y, int p, int height, int width, int channels,
                                     int out_width, const Geometry* g) {
  for (size_t o = 0; o < static_cast<size_t>(out_width) * channels; ++o) y[o] = 0.0f;
  const int dilated_width = (width - 1) * g->uw + 1;
  for (int i = 0; i < g->kh; ++i) {
    const int row = p * g->sh + i * g->dh - g->top;
    if (row < 0 || row > (height - 1) * g->uh || row % g->uh) continue;
    const float* __restrict x_row = x + static_cast<size_t>(row / g->uh) * width * channels;
    for (int j = 0; j < g->kw; ++j) {
      const float* __restrict wt = w + static_cast<size_t>(i * g->kw + j) * channels;
      const int offset = j * g->dw - g->left;  // column q reads q sw + offset of the dilated row
      int q0 = 0;
      while (q0 < out_width && q0 * g->sw + offset < 0) ++q0;
      int q1 = out_width;
      while (q1 > q0 && (q1 - 1) * g->sw + offset >= dilated_width) --q1;
      for (int q = q0; q < q1; ++q) {
        const int col = q * g->sw + offset;
        if (col % g->uw) continue;
        const float* __restrict xt = x_row + static_cast<size_t>(col / g->uw) * channels;
        float* __restrict yq = y + static_cast<size_t>(q) * channels;
        for (int c = 0; c < channels; ++c) yq[c] = yq[c] + xt[c] * wt[c];
      }
    }
  }
}

DFMLX_SIMD_VARIANTS(void, depthwise_row,
                    (const float* __restrict x, const float* __restrict w, float* __restrict y, int p,
                     int height, int width, int channels, int out_width, const Geometry* g),
                    (x, w, y, p, height, width, channels, out_width, g))

void check(bool ok, const std::string& what) {
  require(ok, "depthwise_conv2d", what);
}

}  // namespace

mx::array depthwise_conv2d(const mx::array& x, const mx::array& w, std::array<int, 12> geometry, bool flip) {
  const Geometry g = unpack(geometry);
  check(x.ndim() == 4 && w.ndim() == 4, "expects x [B, H, W, C] and w [C, kh, kw, 1]");
  check(g.kh > 0 && g.kw > 0 && g.sh > 0 && g.sw > 0 && g.dh > 0 && g.dw > 0 && g.uh > 0 && g.uw > 0 &&
            g.top >= 0 && g.bottom >= 0 && g.left >= 0 && g.right >= 0,
        "bad kernel geometry");
  const int channels = x.shape(3);
  check(channels > 0 && w.shape(0) == channels && w.shape(1) == g.kh && w.shape(2) == g.kw && w.shape(3) == 1,
        "weight shape does not match");
  const int out_h = g.out_h(x.shape(1)), out_w = g.out_w(x.shape(2));
  check(x.shape(0) > 0 && x.shape(1) > 0 && x.shape(2) > 0 && out_h > 0 && out_w > 0,
        "empty input or output");
  auto stream = cpu_stream("depthwise_conv2d", {x, w});
  return mx::array({x.shape(0), out_h, out_w, channels}, mx::float32,
                   std::make_shared<DepthwiseConv2d>(stream, geometry, flip), {x, w});
}

void DepthwiseConv2d::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const auto& x = inputs[0];
  const auto& y = outputs[0];
  const int batch = x.shape(0), height = x.shape(1), width = x.shape(2), channels = x.shape(3);
  const int out_h = y.shape(1), out_w = y.shape(2);
  queue_cpu_task(stream(), inputs, outputs, [&](const std::vector<const float*>& in) {
    return [x = in[0], w = in[1], y = outputs[0].data<float>(), batch, height, width, channels, out_h,
            out_w, g = unpack(geometry_), flip = flip_]() {
      // the rows read taps-major weights [kh kw, C]: a few hundred floats, laid out per call
      const int n_taps = g.kh * g.kw;
      std::vector<float> taps(static_cast<size_t>(n_taps) * channels);
      for (int c = 0; c < channels; ++c) {
        for (int t = 0; t < n_taps; ++t) {
          taps[static_cast<size_t>(t) * channels + c] = w[static_cast<size_t>(c) * n_taps + (flip ? n_taps - 1 - t : t)];
        }
      }
      const size_t in_image = static_cast<size_t>(height) * width * channels;
      const size_t out_row = static_cast<size_t>(out_w) * channels;
      for (int b = 0; b < batch; ++b) {
        for (int p = 0; p < out_h; ++p) {
          depthwise_row(x + b * in_image, taps.data(), y + (static_cast<size_t>(b) * out_h + p) * out_row, p,
                        height, width, channels, out_w, &g);
        }
      }
    };
  });
}

void DepthwiseConv2d::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("DepthwiseConv2d has no GPU kernel (df_mlx runs MLX ops on GPUs)");
}

bool DepthwiseConv2d::is_equivalent(const mx::Primitive& other) const {
  const auto* o = dynamic_cast<const DepthwiseConv2d*>(&other);
  return o != nullptr && o->geometry_ == geometry_ && o->flip_ == flip_;
}

std::vector<mx::Shape> DepthwiseConv2d::output_shapes(const std::vector<mx::array>& inputs) {
  const Geometry g = unpack(geometry_);
  const auto& x = inputs[0];
  return {{x.shape(0), g.out_h(x.shape(1)), g.out_w(x.shape(2)), x.shape(3)}};
}

}  // namespace dfmlx
