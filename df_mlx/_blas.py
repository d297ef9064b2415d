"""Use an optimised BLAS for MLX on Linux.

The Linux `mlx[cpu]` wheel links `cblas_sgemm` & co. from a bundled netlib *reference* BLAS
(about 6 GFLOP/s, 20x below an optimised one), which makes every matmul and the GRUs slow.
Loading a system BLAS with RTLD_GLOBAL before `mlx.core` is imported puts its symbols in
the process's global scope, where the dynamic linker finds them first when it resolves
libmlx's BLAS calls. BLIS comes first: its unpacked kernels for skinny products make a GRU
step's 1x256 @ 256x768 matmul 16 µs where OpenBLAS 0.3.21 (Debian 12) packs the weight on
every call and takes 55 µs, and DFN3 runs 1.5x faster with it. BLIS runs one thread unless
BLIS_NUM_THREADS says otherwise. Without a system BLAS, pip's own: the scipy-openblas32 wheel
(a dependency), whose symbols carry a `scipy_` prefix, reaches libmlx's `cblas_sgemm` through
df_mlx's `cblas_sgemm` shim (df_mlx/native/cblas_shim.c, built with the native extension).
`DFMLX_BLAS` names another library, or `reference` to keep MLX's own.
"""

import ctypes
import ctypes.util
import os
import sys
import sysconfig
import warnings
from typing import Optional

CANDIDATES = ("blis", "openblas", "mkl_rt")
loaded: Optional[str] = None


# df_mlx/native/cblas_shim.c, which setup.py installs as an extension file (no Python module)
CBLAS_SHIM = os.path.join(os.path.dirname(__file__), "_cblas" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))


def _find() -> Optional[str]:
    choice = os.environ.get("DFMLX_BLAS", "")
    if choice:
        return None if choice == "reference" else choice
    for name in CANDIDATES:
        path = ctypes.util.find_library(name)
        if path:
            return path
    return None


def pip_openblas() -> Optional[str]:
    """The scipy-openblas32 wheel's library (scipy_-prefixed symbols), if installed."""
    try:
        import scipy_openblas32
    except ImportError:
        return None
    path = os.path.join(scipy_openblas32.get_lib_dir(), f"lib{scipy_openblas32.get_library()}.so")
    return path if os.path.exists(path) else None


def _load_pip_openblas() -> Optional[str]:
    """libmlx's cblas_sgemm from the pip OpenBLAS through the shim; returns the OpenBLAS."""
    path = pip_openblas()
    if path is None or not os.path.exists(CBLAS_SHIM):
        return None
    shim = ctypes.CDLL(CBLAS_SHIM, mode=os.RTLD_LOCAL | os.RTLD_NOW)
    if shim.dfmlx_cblas_bind(path.encode(), b"scipy_") != 0:
        return None
    ctypes.CDLL(CBLAS_SHIM, mode=os.RTLD_GLOBAL | os.RTLD_NOLOAD)  # global once it is bound
    return path


def use_fast_blas() -> Optional[str]:
    """Load an optimised BLAS globally if MLX is not imported yet; returns what was loaded."""
    global loaded
    if loaded or sys.platform != "linux":
        return loaded
    path = _find()
    pip_fallback = path is None and os.environ.get("DFMLX_BLAS") != "reference"
    if path is None and not pip_fallback:
        return None
    if "mlx.core" in sys.modules:  # its BLAS symbols are bound already
        warnings.warn("mlx.core was imported before df_mlx, so MLX's own matmuls keep its bundled reference "
                      "BLAS (~10x slower on Linux); df_mlx's models run their products on its native ops' BLAS "
                      "where they are built (df_mlx._native.products): import df_mlx first for the rest",
                      RuntimeWarning, stacklevel=3)
        return None
    try:
        if pip_fallback:
            path = _load_pip_openblas()
        else:
            ctypes.CDLL(path, mode=os.RTLD_GLOBAL | os.RTLD_NOW)
    except OSError:
        return None
    loaded = path
    return loaded
