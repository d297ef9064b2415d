// The eval_cpu pattern every primitive here shares.
#pragma once

#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"

namespace dfmlx {

namespace mx = mlx::core;

// Copies a strided view (a transposed or sliced input) into a dense row-major buffer.
struct DenseCopy {
  const float* src;
  float* dst;
  mx::Shape shape;
  mx::Strides strides;

  // Merges each axis into the next where the pair is one strided run, and adds unit axes in
  // front up to two, so that run() walks the last two axes in plain loops: a permuted view
  // with a short last axis ([B, O, T, F, 2] of [B, T, F, O, 2]) costs one index update per
  // F * 2 elements instead of per 2.
  void simplify() {
    mx::Shape s;
    mx::Strides st;
    for (size_t d = 0; d < shape.size(); ++d) {
      if (shape[d] == 1) continue;
      if (!s.empty() && st.back() == strides[d] * shape[d]) {
        s.back() *= shape[d];
        st.back() = strides[d];
      } else {
        s.push_back(shape[d]);
        st.push_back(strides[d]);
      }
    }
    while (s.size() < 2) {
      s.insert(s.begin(), 1);
      st.insert(st.begin(), 0);
    }
    shape = std::move(s);
    strides = std::move(st);
  }

  void run() {
    simplify();
    const int nd = static_cast<int>(shape.size());
    const int64_t rows = shape[nd - 2], row_stride = strides[nd - 2];
    const int64_t inner = shape[nd - 1], inner_stride = strides[nd - 1];
    size_t outer = 1;
    for (int d = 0; d + 2 < nd; ++d) outer *= static_cast<size_t>(shape[d]);
    std::vector<int> index(nd, 0);
    float* out = dst;
    for (size_t o = 0; o < outer; ++o) {
      int64_t offset = 0;
      for (int d = 0; d + 2 < nd; ++d) offset += index[d] * strides[d];
      for (int64_t r = 0; r < rows; ++r, out += inner) {
        const float* in = src + offset + r * row_stride;
        for (int64_t j = 0; j < inner; ++j) out[j] = in[j * inner_stride];
      }
      for (int d = nd - 3; d >= 0 && ++index[d] == shape[d]; --d) index[d] = 0;
    }
  }
};

// Allocates the outputs, then queues the kernel that make_kernel(in) returns on the stream's
// CPU worker, as MLX's own CPU ops do. `in` holds each input's data as dense row-major
// floats: a row-contiguous input is read where it is, any other is copied by the task itself
// first, into a temporary that the encoder keeps until the task has run. (A Contiguous op per
// input in the graph instead would cost a streaming hop, ~300 small ops, one dispatch each.)
// Inputs marked in `as_is` are passed where they are, whatever their layout (the kernel reads
// their strides itself). make_kernel captures the pointers and sizes by value.
template <class MakeKernel>
void queue_cpu_task(mx::Stream stream, const std::vector<mx::array>& inputs,
                    std::vector<mx::array>& outputs, MakeKernel&& make_kernel,
                    const std::vector<bool>& as_is = {}) {
  for (auto& o : outputs) {
    o.set_data(mx::allocator::malloc(o.nbytes()));
  }
  auto& encoder = mx::cpu::get_command_encoder(stream);
  std::vector<const float*> dense;
  std::vector<DenseCopy> copies;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const auto& a = inputs[i];
    encoder.set_input_array(a);
    if (a.flags().row_contiguous || (i < as_is.size() && as_is[i])) {
      dense.push_back(a.data<float>());
      continue;
    }
    mx::array copy(a.shape(), a.dtype(), nullptr, {});
    copy.set_data(mx::allocator::malloc(copy.nbytes()));
    copies.push_back({a.data<float>(), copy.data<float>(), a.shape(), a.strides()});
    dense.push_back(copy.data<float>());
    encoder.add_temporary(std::move(copy));
  }
  for (auto& o : outputs) {
    encoder.set_output_array(o);
  }
  auto kernel = make_kernel(dense);
  if (copies.empty()) {
    encoder.dispatch(std::move(kernel));
  } else {
    encoder.dispatch([copies = std::move(copies), kernel = std::move(kernel)]() mutable {
      for (auto& c : copies) c.run();
      kernel();
    });
  }
}

// Throws std::invalid_argument("op: what") unless ok (a ValueError in Python).
inline void require(bool ok, const char* op, const std::string& what) {
  if (!ok) {
    throw std::invalid_argument(std::string(op) + ": " + what);
  }
}

// The default stream, which must be a CPU one, for float32 inputs.
inline mx::Stream cpu_stream(const char* op, const std::vector<mx::array>& arrays) {
  for (const auto& a : arrays) {
    require(a.dtype() == mx::float32, op, "float32 only");
  }
  auto stream = mx::to_stream({});
  require(stream.device == mx::Device::cpu, op, "CPU streams only");
  return stream;
}

}  // namespace dfmlx
