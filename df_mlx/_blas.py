"""Use an optimised BLAS for MLX on Linux.

The Linux `mlx[cpu]` wheel links `cblas_sgemm` & co. from a bundled netlib *reference* BLAS
(about 6 GFLOP/s, 20x below an optimised one), which makes every matmul and the GRUs slow.
Loading a system BLAS with RTLD_GLOBAL before `mlx.core` is imported puts its symbols in
the process's global scope, where the dynamic linker finds them first when it resolves
libmlx's BLAS calls. BLIS comes first: its unpacked kernels for skinny products make a GRU
step's 1x256 @ 256x768 matmul 16 µs where OpenBLAS 0.3.21 (Debian 12) packs the weight on
every call and takes 55 µs, and DFN3 runs 1.5x faster with it. BLIS runs one thread unless
BLIS_NUM_THREADS says otherwise. `DFMLX_BLAS` names another library, or `reference` to keep
MLX's own.
"""

import ctypes
import ctypes.util
import os
import sys
import warnings
from typing import Optional

CANDIDATES = ("blis", "openblas", "mkl_rt")
loaded: Optional[str] = None


def _find() -> Optional[str]:
    choice = os.environ.get("DFMLX_BLAS", "")
    if choice:
        return None if choice == "reference" else choice
    for name in CANDIDATES:
        path = ctypes.util.find_library(name)
        if path:
            return path
    return None


def use_fast_blas() -> Optional[str]:
    """Load an optimised BLAS globally if MLX is not imported yet; returns what was loaded."""
    global loaded
    if loaded or sys.platform != "linux":
        return loaded
    path = _find()
    if path is None:
        return None
    if "mlx.core" in sys.modules:  # its BLAS symbols are bound already
        warnings.warn("mlx.core was imported before df_mlx, so MLX keeps its bundled reference BLAS "
                      "(matmuls ~10x slower on Linux): import df_mlx first", RuntimeWarning, stacklevel=3)
        return None
    try:
        ctypes.CDLL(path, mode=os.RTLD_GLOBAL | os.RTLD_NOW)
    except OSError:
        return None
    loaded = path
    return loaded
