#include "grouped_conv.h"

#include <cstring>
#include <string>

#include "cpu_task.h"
#include "fastmath.h"

namespace dfmlx {

namespace {

// Lanes of the dot-product form: one fixed width in every SIMD variant, so all give equal sums.
constexpr int kLanes = 16;
constexpr int kMaxTaps = 16;
// Outputs of a group that the dot-product form computes together from one load of the input:
// their accumulators stay in registers (6 x 16 lanes: 6 zmm, or 12 of AVX2's 16 ymm).
constexpr int kOutputBlock = 6;

// kLanes floats as one GCC vector: AVX-512 holds it in one register, AVX2 in two, the baseline
// in four, and the compiler keeps a few of them in registers (a float[N][kLanes] array went to
// the stack: every multiply-add waited on a store and a load).
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));
typedef float Lanes8 __attribute__((vector_size(8 * sizeof(float))));
typedef float Lanes4 __attribute__((vector_size(4 * sizeof(float))));
typedef float Lanes2 __attribute__((vector_size(2 * sizeof(float))));

// The sum of a's lanes, added pairwise: lane l + lane l + 8, then + 4, + 2, + 1 (vector halves).
DFMLX_INLINE float lane_sum(const Lanes& a) {
  const Lanes8 b = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) +
                   __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
  const Lanes4 c = __builtin_shufflevector(b, b, 0, 1, 2, 3) + __builtin_shufflevector(b, b, 4, 5, 6, 7);
  const Lanes2 d = __builtin_shufflevector(c, c, 0, 1) + __builtin_shufflevector(c, c, 2, 3);
  return d[0] + d[1];
}

// The dot-product form needs whole lanes of input channels per group.
bool dot_form(int in_per_group) { return in_per_group % kLanes == 0; }

struct Geometry {
  int kh, kw, sh, sw, dh, dw, top, bottom, left, right;
  static int out_size(int in, int k, int s, int d, int before, int after) {
    return (in + before + after - d * (k - 1) - 1) / s + 1;
  }
  int out_h(int in) const { return out_size(in, kh, sh, dh, top, bottom); }
  int out_w(int in) const { return out_size(in, kw, sw, dw, left, right); }
};

Geometry unpack(const std::array<int, 10>& g) {
  return {g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9]};
}

struct Shape {
  int height, width, channels, out_width, out_ch, groups;
  int in_per_group() const { return channels / groups; }
  int out_per_group() const { return out_ch / groups; }
};

// The input pixel that tap (i, j) of output (p, q) reads, or nullptr where it is padding.
DFMLX_INLINE const float* tap_pixel(const float* x, int p, int q, int i, int j, const Shape& s,
                                    const Geometry& g) {
  const int row = p * g.sh + i * g.dh - g.top, col = q * g.sw + j * g.dw - g.left;
  if (row < 0 || row >= s.height || col < 0 || col >= s.width) return nullptr;
  return x + (static_cast<size_t>(row) * s.width + col) * s.channels;
}

// Outputs o .. o + N - 1 of one pixel: dot products of the taps' channel runs of its group
// (pixels[t] + offset) with w[o, t, :], summed in kLanes lanes each, lanes added pairwise.
template <int N>
DFMLX_INLINE void dot_outputs(const float* const* pixels, int offset, const float* __restrict w, int o,
                              int taps, int ipg, float* __restrict y) {
  Lanes acc[N];
#pragma GCC unroll 8
  for (int n = 0; n < N; ++n) acc[n] = Lanes{};
  for (int t = 0; t < taps; ++t) {
    if (pixels[t] == nullptr) continue;
    const float* __restrict xt = pixels[t] + offset;
    for (int c = 0; c < ipg; c += kLanes) {
      Lanes xv, wv;
      std::memcpy(&xv, xt + c, sizeof xv);
#pragma GCC unroll 8
      for (int n = 0; n < N; ++n) {
        std::memcpy(&wv, w + (static_cast<size_t>(o + n) * taps + t) * ipg + c, sizeof wv);
        acc[n] = acc[n] + xv * wv;
      }
    }
  }
#pragma GCC unroll 8
  for (int n = 0; n < N; ++n) y[o + n] = lane_sum(acc[n]);
}

// Many input channels per group (a multiple of kLanes): each output a dot product over its
// taps' channel runs, kOutputBlock outputs at a time.
DFMLX_INLINE void dot_row_body(const float* __restrict x, const float* __restrict w,
                               float* __restrict y, int p, const Shape* s, const Geometry* g) {
  const int ipg = s->in_per_group(), opg = s->out_per_group(), taps = g->kh * g->kw;
  const float* pixels[kMaxTaps];
  for (int q = 0; q < s->out_width; ++q) {
    for (int i = 0, t = 0; i < g->kh; ++i) {
      for (int j = 0; j < g->kw; ++j, ++t) pixels[t] = tap_pixel(x, p, q, i, j, *s, *g);
    }
    float* __restrict yq = y + static_cast<size_t>(q) * s->out_ch;
    for (int group = 0; group < s->groups; ++group) {
      int o = group * opg;
      const int end = o + opg;
      for (; o + kOutputBlock <= end; o += kOutputBlock) {
        dot_outputs<kOutputBlock>(pixels, group * ipg, w, o, taps, ipg, yq);
      }
      switch (end - o) {  // the rest of the group's outputs together, not one by one
        case 1: dot_outputs<1>(pixels, group * ipg, w, o, taps, ipg, yq); break;
        case 2: dot_outputs<2>(pixels, group * ipg, w, o, taps, ipg, yq); break;
        case 3: dot_outputs<3>(pixels, group * ipg, w, o, taps, ipg, yq); break;
        case 4: dot_outputs<4>(pixels, group * ipg, w, o, taps, ipg, yq); break;
        case 5: dot_outputs<5>(pixels, group * ipg, w, o, taps, ipg, yq); break;
        default: break;
      }
    }
  }
}

// The output columns [q0, q1) whose tap at column offset `offset` reads inside the row.
DFMLX_INLINE void valid_columns(int offset, const Shape& s, const Geometry& g, int& q0, int& q1) {
  q0 = 0;
  while (q0 < s.out_width && q0 * g.sw + offset < 0) ++q0;
  q1 = s.out_width;
  while (q1 > q0 && (q1 - 1) * g.sw + offset >= s.width) --q1;
}

// Output vectors v0 .. v0 + N - 1 (kLanes outputs each, of one group each) of pixel (p, q),
// for whole vectors of outputs per group: accumulated in registers over the taps and the
// group's channels, in the order outer_row_body adds them.
template <int N>
DFMLX_INLINE void outer_vectors(const float* __restrict x, const float* __restrict wt, float* __restrict yq, int p,
                                int q, int v0, const Shape& s, const Geometry& g) {
  const int ipg = s.in_per_group(), opg = s.out_per_group();
  Lanes acc[N];
  int first_channel[N];  // of each vector's group
#pragma GCC unroll 4
  for (int n = 0; n < N; ++n) {
    acc[n] = Lanes{};
    first_channel[n] = (v0 + n) * kLanes / opg * ipg;
  }
  for (int i = 0, t = 0; i < g.kh; ++i) {
    for (int j = 0; j < g.kw; ++j, ++t) {
      const float* px = tap_pixel(x, p, q, i, j, s, g);
      if (px == nullptr) continue;
      for (int c = 0; c < ipg; ++c) {
        const float* __restrict wc = wt + (static_cast<size_t>(t) * ipg + c) * s.out_ch;
#pragma GCC unroll 4
        for (int n = 0; n < N; ++n) {
          Lanes wv;
          std::memcpy(&wv, wc + (v0 + n) * kLanes, sizeof wv);
          acc[n] = acc[n] + px[first_channel[n] + c] * wv;
        }
      }
    }
  }
  for (int n = 0; n < N; ++n) std::memcpy(yq + (v0 + n) * kLanes, &acc[n], sizeof(Lanes));
}

// outer_row_body where each group has whole vectors of outputs: pixel by pixel, 4 vectors at a
// time in registers, instead of adding into the output row once per tap and channel.
DFMLX_INLINE void outer_pixels(const float* __restrict x, const float* __restrict wt, float* __restrict y, int p,
                               const Shape& s, const Geometry& g) {
  constexpr int kBlock = 4;
  const int vectors = s.out_ch / kLanes;
  for (int q = 0; q < s.out_width; ++q) {
    float* __restrict yq = y + static_cast<size_t>(q) * s.out_ch;
    int v = 0;
    for (; v + kBlock <= vectors; v += kBlock) outer_vectors<kBlock>(x, wt, yq, p, q, v, s, g);
    switch (vectors - v) {
      case 1: outer_vectors<1>(x, wt, yq, p, q, v, s, g); break;
      case 2: outer_vectors<2>(x, wt, yq, p, q, v, s, g); break;
      case 3: outer_vectors<3>(x, wt, yq, p, q, v, s, g); break;
      default: break;
    }
  }
}

// Few input channels per group: tap by tap and channel by channel over the output row (which
// stays in L1), each input value times the tap's weights of its group's outputs, added over
// the outputs (vectorised); taps and channels in order. wt is the weight taps-major:
// [kh kw, C/groups, O].
DFMLX_INLINE void outer_row_body(const float* __restrict x, const float* __restrict wt,
                                 float* __restrict y, int p, const Shape* s, const Geometry* g) {
  const int ipg = s->in_per_group(), opg = s->out_per_group(), out_ch = s->out_ch;
  if (opg % kLanes == 0) {
    outer_pixels(x, wt, y, p, *s, *g);
    return;
  }
  for (size_t k = 0; k < static_cast<size_t>(s->out_width) * out_ch; ++k) y[k] = 0.0f;
  const size_t x_step = static_cast<size_t>(g->sw) * s->channels;
  for (int i = 0; i < g->kh; ++i) {
    const int row = p * g->sh + i * g->dh - g->top;
    if (row < 0 || row >= s->height) continue;
    const float* __restrict x_row = x + static_cast<size_t>(row) * s->width * s->channels;
    for (int j = 0; j < g->kw; ++j) {
      const int offset = j * g->dw - g->left, t = i * g->kw + j;
      int q0, q1;
      valid_columns(offset, *s, *g, q0, q1);
      for (int k = 0; k < s->channels; ++k) {  // input channel k = group * ipg + c
        const int group = k / ipg, c = k % ipg;
        const float* __restrict wc = wt + (static_cast<size_t>(t) * ipg + c) * out_ch + group * opg;
        const float* __restrict xq = x_row + static_cast<size_t>(q0 * g->sw + offset) * s->channels + k;
        float* __restrict yq = y + static_cast<size_t>(q0) * out_ch + group * opg;
        for (int q = q0; q < q1; ++q, xq += x_step, yq += out_ch) {
          const float v = *xq;
          for (int o = 0; o < opg; ++o) yq[o] = yq[o] + v * wc[o];
        }
      }
    }
  }
}

DFMLX_SIMD_VARIANTS(void, dot_row,
                    (const float* __restrict x, const float* __restrict w, float* __restrict y, int p,
                     const Shape* s, const Geometry* g),
                    (x, w, y, p, s, g))
DFMLX_SIMD_VARIANTS(void, outer_row,
                    (const float* __restrict x, const float* __restrict wt, float* __restrict y, int p,
                     const Shape* s, const Geometry* g),
                    (x, wt, y, p, s, g))

void check(bool ok, const std::string& what) {
  require(ok, "grouped_conv2d", what);
}

}  // namespace

mx::array grouped_conv2d(const mx::array& x, const mx::array& w, std::array<int, 10> geometry, int groups) {
  const Geometry g = unpack(geometry);
  check(x.ndim() == 4 && w.ndim() == 4, "expects x [B, H, W, C] and w [O, kh, kw, C/groups]");
  check(g.kh > 0 && g.kw > 0 && g.kh * g.kw <= kMaxTaps && g.sh > 0 && g.sw > 0 && g.dh > 0 && g.dw > 0 && g.top >= 0 &&
            g.bottom >= 0 && g.left >= 0 && g.right >= 0,
        "bad kernel geometry (at most 16 taps)");
  const int channels = x.shape(3), out_ch = w.shape(0);
  check(groups > 0 && channels % groups == 0 && out_ch % groups == 0, "channels do not divide into groups");
  check(w.shape(1) == g.kh && w.shape(2) == g.kw && w.shape(3) == channels / groups,
        "weight shape does not match");
  const int out_h = g.out_h(x.shape(1)), out_w = g.out_w(x.shape(2));
  check(x.shape(0) > 0 && out_h > 0 && out_w > 0 && out_ch > 0, "empty input or output");
  auto stream = cpu_stream("grouped_conv2d", {x, w});
  // the outer form reads the weight taps-major: [kh kw, C/groups, O]
  const bool dot = dot_form(channels / groups);
  auto weight = dot ? w : mx::transpose(mx::reshape(w, {out_ch, g.kh * g.kw, channels / groups}, stream),
                                        {1, 2, 0}, stream);
  return mx::array({x.shape(0), out_h, out_w, out_ch}, mx::float32,
                   std::make_shared<GroupedConv2d>(stream, geometry, groups), {x, weight});
}

void GroupedConv2d::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const auto& x = inputs[0];
  const auto& y = outputs[0];
  const Shape s{x.shape(1), x.shape(2), x.shape(3), y.shape(2), y.shape(3), groups_};
  const int batch = x.shape(0), out_h = y.shape(1);
  const bool dot = dot_form(s.in_per_group());
  queue_cpu_task(stream(), inputs, outputs, [&](const std::vector<const float*>& in) {
    return [x = in[0], w = in[1], y = outputs[0].data<float>(), batch, out_h,
            s, dot, g = unpack(geometry_)]() {
      const size_t in_image = static_cast<size_t>(s.height) * s.width * s.channels;
      const size_t out_row = static_cast<size_t>(s.out_width) * s.out_ch;
      for (int b = 0; b < batch; ++b) {
        for (int p = 0; p < out_h; ++p) {
          float* yp = y + (static_cast<size_t>(b) * out_h + p) * out_row;
          if (dot) {
            dot_row(x + b * in_image, w, yp, p, &s, &g);
          } else {
            outer_row(x + b * in_image, w, yp, p, &s, &g);
          }
        }
      }
    };
  });
}

void GroupedConv2d::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("GroupedConv2d has no GPU kernel (df_mlx runs MLX ops on GPUs)");
}

bool GroupedConv2d::is_equivalent(const mx::Primitive& other) const {
  const auto* o = dynamic_cast<const GroupedConv2d*>(&other);
  return o != nullptr && o->geometry_ == geometry_ && o->groups_ == groups_;
}

std::vector<mx::Shape> GroupedConv2d::output_shapes(const std::vector<mx::array>& inputs) {
  const Geometry g = unpack(geometry_);
  const auto& x = inputs[0];
  const int out_ch = dot_form(x.shape(3) / groups_) ? inputs[1].shape(0) : inputs[1].shape(2);
  return {{x.shape(0), g.out_h(x.shape(1)), g.out_w(x.shape(2)), out_ch}};
}

}  // namespace dfmlx
