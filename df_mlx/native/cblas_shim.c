/* df_mlx._cblas (libdfmlx_cblas.so in the build): cblas_sgemm for libmlx from a BLAS whose
 * symbols carry a prefix (the scipy-openblas32 wheel's scipy_cblas_sgemm), so that pip alone
 * gives MLX a fast BLAS.
 * df_mlx._blas loads it with RTLD_GLOBAL before mlx.core and binds it first; libmlx's
 * cblas_sgemm then resolves here. Nothing else in it: libmlx's other BLAS and LAPACK calls keep
 * their bundled library. */
#include <dlfcn.h>
#include <stddef.h>
#include <string.h>

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float*, int, const float*, int,
                         float, float*, int);

static sgemm_fn bound_sgemm = NULL;

/* Binds {prefix}cblas_sgemm from the library at path; returns 0 on success. */
int dfmlx_cblas_bind(const char* path, const char* prefix) {
  char name[256];
  void* lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (lib == NULL || strlen(prefix) > sizeof name - sizeof "cblas_sgemm") {
    return 1;
  }
  strcpy(name, prefix);
  strcat(name, "cblas_sgemm");
  bound_sgemm = (sgemm_fn)dlsym(lib, name);
  return bound_sgemm == NULL;
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float* a, int lda, const float* b, int ldb, float beta, float* c, int ldc) {
  bound_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
