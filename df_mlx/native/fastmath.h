// Branch-free float32 exp, sigmoid and tanh that the compiler vectorises (Cephes' algorithms).
//
// exp: Cody-Waite reduction by ln 2 in two parts and a degree-6 polynomial, the same constants
// and operation order as df_mlx.mamba._exp (within 1 ulp of torch's exp). Outside
// [-86.64, 88.72] it returns the value at the nearer end, as mamba._exp does.
// sigmoid = 1 / (1 + exp(-x)): relative error <= 3 ulp (exp's 1 ulp, the sum and the division).
// tanh: Cephes tanhf, x + x^3 P(x^2) for |x| < 0.625, else sign(x) (1 - 2 / (exp(2|x|) + 1)):
// relative error <= 2 ulp. tests/test_native.py measures both bounds against float64 (2.5 and
// 1.25 ulp measured on [-20, 20]). FMA contraction in the AVX variants changes the last bit only.
#pragma once

#include <cstdint>
#include <cstring>

namespace dfmlx {

#define DFMLX_INLINE inline __attribute__((always_inline))

// DFMLX_SIMD_VARIANTS(ret, name, params, args) defines `name` over the force-inlined
// `name##_body`, compiled three times (AVX-512, AVX2 with FMA, the baseline) and picked once by
// the CPU's features. Not GCC's target_clones("arch=haswell"): that dispatches on the CPU
// model, which virtual machines often report as none it knows, and then the SSE2 baseline runs
// (measured: one GRU(256) step's gates took 4.05 us that way, 0.32 us on the AVX-512 variant).
// Each variant does the same operations per element (the AVX variants contract a * b + c into
// FMAs), so the AVX-512 and AVX2 results are identical.
#if defined(__x86_64__) && defined(__GNUC__)
enum class SimdLevel { kAvx512, kAvx2, kBaseline };

// The widest instruction set this CPU has of those the variants are built for.
inline SimdLevel simd_level() {
  if (__builtin_cpu_supports("avx512f")) return SimdLevel::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return SimdLevel::kAvx2;
  return SimdLevel::kBaseline;
}

#define DFMLX_SIMD_VARIANTS(ret, name, params, args)                                              \
  __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,prefer-vector-width=512")))  \
  static ret name##_avx512 params { return name##_body args; }                                    \
  __attribute__((target("avx2,fma"))) static ret name##_avx2 params { return name##_body args; } \
  static ret name##_baseline params { return name##_body args; }                                  \
  ret name params {                                                                              \
    static ret(*const variant) params = simd_level() == SimdLevel::kAvx512 ? name##_avx512        \
                                        : simd_level() == SimdLevel::kAvx2 ? name##_avx2          \
                                                                           : name##_baseline;    \
    return variant args;                                                                         \
  }
#else
#define DFMLX_SIMD_VARIANTS(ret, name, params, args) \
  ret name params { return name##_body args; }
#endif

DFMLX_INLINE float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

DFMLX_INLINE int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

DFMLX_INLINE float exp_f32(float x) {
  constexpr float round = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  constexpr int32_t round_bits = 0x4B400000;
  x = x < -86.64f ? -86.64f : x;
  x = x > 88.72283f ? 88.72283f : x;
  float shifted = x * 1.44269504088896341f + round;
  float n = shifted - round;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float half_two_n = bits_to_float((float_to_bits(shifted) - round_bits + 126) << 23);
  return (p * r * r + r + 1.0f) * half_two_n * 2.0f;
}

DFMLX_INLINE float sigmoid_f32(float x) {
  return 1.0f / (1.0f + exp_f32(-x));
}

DFMLX_INLINE float tanh_f32(float x) {
  float a = x < 0 ? -x : x;
  float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  float small = x + x * z * p;
  float large = 1.0f - 2.0f / (exp_f32(2.0f * a) + 1.0f);
  large = x < 0 ? -large : large;
  return a < 0.625f ? small : large;
}

}  // namespace dfmlx
