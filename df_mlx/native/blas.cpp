#include "blas.h"

#include <dlfcn.h>

extern "C" {
// Left undefined here: resolved when the module loads, like libmlx's own calls.
void cblas_sgemv(int, int, int, int, float, const float*, int, const float*, int, float, float*, int);
void cblas_sgemm(int, int, int, int, int, int, float, const float*, int, const float*, int, float,
                 float*, int);
}

namespace dfmlx {

namespace {
Blas bound{&cblas_sgemv, &cblas_sgemm};
}

const Blas& blas() {
  return bound;
}

std::string bind_blas(const std::string& path, const std::string& prefix) {
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char* err = dlerror();
    return err ? err : "dlopen failed";
  }
  auto sgemv = reinterpret_cast<Sgemv>(dlsym(lib, (prefix + "cblas_sgemv").c_str()));
  auto sgemm = reinterpret_cast<Sgemm>(dlsym(lib, (prefix + "cblas_sgemm").c_str()));
  if (sgemv == nullptr || sgemm == nullptr) {
    return "no " + prefix + "cblas_sgemv/sgemm in " + path;
  }
  bound = Blas{sgemv, sgemm};  // the library stays loaded for the process's lifetime
  return "";
}

std::string blas_library() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(bound.sgemv), &info) == 0 || info.dli_fname == nullptr) {
    return "unknown";
  }
  return info.dli_fname;
}

}  // namespace dfmlx
