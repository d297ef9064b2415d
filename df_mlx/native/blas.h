// The BLAS the native ops call, bound at run time (see df_mlx/_native.py for the choice).
#pragma once

#include <string>

namespace dfmlx {

// CBLAS's enum values (the same in every CBLAS, scipy-openblas's prefixed one included).
constexpr int kRowMajor = 101;
constexpr int kNoTrans = 111;
constexpr int kTrans = 112;

using Sgemv = void (*)(int order, int trans, int m, int n, float alpha, const float* a, int lda,
                       const float* x, int incx, float beta, float* y, int incy);
using Sgemm = void (*)(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                       const float* a, int lda, const float* b, int ldb, float beta, float* c,
                       int ldc);

struct Blas {
  Sgemv sgemv;
  Sgemm sgemm;
};

// The bound functions: until bind_blas succeeds, the cblas_* that the dynamic linker found
// for this module (a library loaded with RTLD_GLOBAL, else the one libmlx links).
const Blas& blas();

// Binds {prefix}cblas_sgemv/sgemm from the shared library at `path`; returns "" or why not.
std::string bind_blas(const std::string& path, const std::string& prefix);

// The file the bound sgemv lives in.
std::string blas_library();

}  // namespace dfmlx
