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

// Allocates the outputs, then queues the kernel that make_kernel() returns (it captures the
// inputs' and the now allocated outputs' data pointers by value) on the stream's CPU worker,
// as MLX's own CPU ops do.
template <class MakeKernel>
void queue_cpu_task(mx::Stream stream, const std::vector<mx::array>& inputs,
                    std::vector<mx::array>& outputs, MakeKernel&& make_kernel) {
  for (auto& o : outputs) {
    o.set_data(mx::allocator::malloc(o.nbytes()));
  }
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (const auto& a : inputs) {
    encoder.set_input_array(a);
  }
  for (auto& o : outputs) {
    encoder.set_output_array(o);
  }
  encoder.dispatch(make_kernel());
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

// The inputs as row-contiguous arrays on `stream` (the kernels index them densely).
inline std::vector<mx::array> dense_inputs(const std::vector<mx::array>& arrays, mx::Stream stream) {
  std::vector<mx::array> out;
  for (const auto& a : arrays) {
    out.push_back(mx::contiguous(a, false, stream));
  }
  return out;
}

}  // namespace dfmlx
