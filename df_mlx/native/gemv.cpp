#include "gemv.h"

#include "fastmath.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define DFMLX_AVX512 __attribute__((target("avx512f,avx2,fma")))
#define DFMLX_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace dfmlx {

namespace {

constexpr int kLanes = 16;

#if defined(__x86_64__) && defined(__GNUC__)

// The 16 partial sums of a row, split in lanes 0-7 and 8-15, added in a fixed order: lane
// l + (l + 8), then l + (l + 4), l + (l + 2), l + (l + 1).
#define DFMLX_SUM_16_LANES(out, low, high)                                                       \
  do {                                                                                           \
    const __m256 s8 = _mm256_add_ps(low, high);                                                  \
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));      \
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));                                     \
    out = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));                              \
  } while (0)

DFMLX_AVX512 void gemv_avx512(const float* w, const float* h, float* y, int rows, int n) {
  for (int i = 0; i < rows; i += 4) {
    const float* w0 = w + static_cast<size_t>(i) * n;
    __m512 acc[4];
    for (auto& a : acc) a = _mm512_setzero_ps();
    for (int k = 0; k < n; k += kLanes) {
      const __m512 hk = _mm512_loadu_ps(h + k);
      for (int r = 0; r < 4; ++r) {
        acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + static_cast<size_t>(r) * n + k), hk, acc[r]);
      }
    }
    for (int r = 0; r < 4; ++r) {
      const __m256 low = _mm512_castps512_ps256(acc[r]);
      const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[r]), 1));
      DFMLX_SUM_16_LANES(y[i + r], low, high);
    }
  }
}

// The same sums with each row's 16 lanes in two 8-lane registers.
DFMLX_AVX2 void gemv_avx2(const float* w, const float* h, float* y, int rows, int n) {
  for (int i = 0; i < rows; i += 4) {
    const float* w0 = w + static_cast<size_t>(i) * n;
    __m256 acc[4][2];
    for (auto& row : acc) row[0] = row[1] = _mm256_setzero_ps();
    for (int k = 0; k < n; k += kLanes) {
      const __m256 low = _mm256_loadu_ps(h + k), high = _mm256_loadu_ps(h + k + 8);
      for (int r = 0; r < 4; ++r) {
        const float* wr = w0 + static_cast<size_t>(r) * n + k;
        acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(wr), low, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(wr + 8), high, acc[r][1]);
      }
    }
    for (int r = 0; r < 4; ++r) DFMLX_SUM_16_LANES(y[i + r], acc[r][0], acc[r][1]);
  }
}

using Kernel = void (*)(const float*, const float*, float*, int, int);

const Kernel kernel = simd_level() == SimdLevel::kAvx512 ? gemv_avx512
                      : simd_level() == SimdLevel::kAvx2  ? gemv_avx2
                                                          : nullptr;

#else

const void* const kernel = nullptr;

#endif

}  // namespace

bool gemv_supported(int rows, int n) {
  return kernel != nullptr && rows % 4 == 0 && n % kLanes == 0 && n > 0;
}

void gemv(const float* w, const float* h, float* y, int rows, int n) {
#if defined(__x86_64__) && defined(__GNUC__)
  kernel(w, h, y, rows, n);
#endif
}

}  // namespace dfmlx
