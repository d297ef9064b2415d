"""df_mlx's native MLX primitives (df_mlx/native/), when they are built and can run here.

`pip install` builds the extension `df_mlx._kernels` (setup.py): C++ `mlx::core::Primitive`s
that run a whole GRU recurrence or selective scan in one op on MLX's CPU stream, instead of one
compiled MLX call per time step (about 10x faster per GRU step), and depthwise convolutions and
softmax faster than MLX's CPU ops. Their matrix products call the
BLAS bound here, whatever MLX itself links and whatever was imported first: the scipy-openblas32
wheel's OpenBLAS (a dependency on Linux), else the library `DFMLX_BLAS` or df_mlx._blas loaded,
else MLX's bundled one. Where the extension is missing, was built for another mlx, runs on a GPU
stream or is switched off with DFMLX_NATIVE=0, the callers run their pure-MLX code, which also
gives the native ops' gradients, and df_mlx says once why.
"""

import contextlib
import contextvars
import functools
import os
import sys
from typing import Optional

import mlx.core as mx
from loguru import logger

from df_mlx import _blas
from df_mlx._blas import pip_openblas


def _load():
    """(the extension, None) or (None, why it is not used)."""
    if os.environ.get("DFMLX_NATIVE", "1") == "0":
        return None, "DFMLX_NATIVE=0"
    try:
        import df_mlx._kernels as ext  # the compiled extension (df_mlx/native/), below every .py module
    except ImportError as err:
        return None, f"the native extension is not built ({err}); reinstall df-mlx with a C++ compiler"
    if ext.mlx_version != mx.__version__:
        return None, (f"the native extension was built for mlx {ext.mlx_version} but mlx "
                      f"{mx.__version__} runs; reinstall df-mlx")
    return ext, None


def _bind_blas(ext) -> None:
    """Bind the pip OpenBLAS unless DFMLX_BLAS chose a library (which df_mlx._blas loaded
    globally before the extension, so its unprefixed cblas_* already bind to it)."""
    if os.environ.get("DFMLX_BLAS"):
        return
    path = pip_openblas()
    if path is not None:
        error = ext.bind_blas(path, "scipy_")
        if error:
            logger.warning(f"df_mlx native ops: cannot use {path} ({error})")


module, reason = _load()
if module is not None:
    _bind_blas(module)
_said_why = False
# Whether df_mlx.layers.matmul runs the models' dense products on the native op (the BLAS bound
# above): where MLX's own matmuls are left on the Linux wheel's reference BLAS (mlx.core was
# imported before df_mlx, or no BLAS could be loaded), about 4x slower per DFN3 forward.
products = module is not None and sys.platform == "linux" and _blas.loaded is None


def blas_library() -> Optional[str]:
    """The library file the native ops' matrix products come from (None without them)."""
    return None if module is None else module.blas_library()


def describe() -> str:
    """Which BLAS and which recurrence path df_mlx runs, in one line."""
    mlx_blas = _blas.loaded or "MLX's bundled reference BLAS"
    if module is None:
        return f"MLX matmuls: {mlx_blas}; recurrences: pure-MLX steps ({reason})"
    models = f"; the models' dense products: native on {blas_library()}" if products else ""
    return f"MLX matmuls: {mlx_blas}; recurrences: native primitives on {blas_library()}{models}"


def usable(*arrays: mx.array) -> bool:
    """Whether the native ops run these arrays: float32 on the CPU. Says once why not."""
    global _said_why
    if module is not None and mx.default_device() == mx.cpu and all(a.dtype == mx.float32 for a in arrays):
        return True
    if not _said_why:
        _said_why = True
        why = reason or ("not float32" if mx.default_device() == mx.cpu else "a GPU stream")
        say = logger.warning if module is None and reason != "DFMLX_NATIVE=0" else logger.info
        say(f"df_mlx runs its recurrences as pure-MLX steps (slower on the CPU): {why}")
    return False


_without_gradients = contextvars.ContextVar("df_mlx_native_without_gradients", default=False)


@contextlib.contextmanager
def without_gradients():
    """Native ops called inside run bare, without their mx.custom_function: its
    CustomTransforms node is one more op of fixed cost per native call (22 of a DFN3 streaming
    hop's ~260), and only gradients need it. No gradient through them can be taken then (MLX
    raises). StreamingEnhancer traces its compiled, inference-only graphs inside this."""
    token = _without_gradients.set(True)
    try:
        yield
    finally:
        _without_gradients.reset(token)


class differentiable:
    """`mx.custom_function` for a function that calls a native op: `.vjp` gives its gradient;
    inside `without_gradients()` the function runs bare."""

    def __init__(self, fn):
        self.fn = fn
        self.custom = mx.custom_function(fn)
        functools.update_wrapper(self, fn)

    def vjp(self, vjp_fn):
        self.custom.vjp(vjp_fn)
        return vjp_fn

    def __call__(self, *args):
        return (self.fn if _without_gradients.get() else self.custom)(*args)
