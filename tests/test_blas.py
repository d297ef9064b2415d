"""df_mlx loads an optimised BLAS for MLX on Linux when one is installed (see df_mlx/_blas.py)."""

import subprocess
import sys

import pytest


def _loaded(env_value=None):
    import os

    env = dict(os.environ)
    env.pop("DFMLX_BLAS", None)
    if env_value is not None:
        env["DFMLX_BLAS"] = env_value
    code = "import df_mlx, df_mlx._blas as b; print(b.loaded)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout.strip()


@pytest.mark.skipif(sys.platform != "linux", reason="Linux wheels only")
def test_reference_blas_can_be_kept():
    assert _loaded("reference") == "None"


@pytest.mark.skipif(sys.platform != "linux", reason="Linux wheels only")
def test_the_first_installed_fast_blas_is_used():
    import ctypes.util

    from df_mlx._blas import CANDIDATES

    installed = [name for name in CANDIDATES if ctypes.util.find_library(name)]
    if not installed:
        pytest.skip("no system BLIS or OpenBLAS (apt install libblis4-pthread)")
    assert installed[0] in _loaded()


@pytest.mark.skipif(sys.platform != "linux", reason="Linux wheels only")
def test_a_named_library_is_used():
    import ctypes.util

    path = ctypes.util.find_library("openblas")
    if path is None:
        pytest.skip("no system OpenBLAS (apt install libopenblas0)")
    assert _loaded(path) == path


@pytest.mark.skipif(sys.platform != "linux", reason="Linux wheels only")
def test_mlx_matmuls_bind_to_the_loaded_blas():
    """The dynamic linker binds libmlx's cblas_sgemm to the library df_mlx loaded (LD_DEBUG
    prints each binding), not to MLX's bundled reference BLAS."""
    import os

    code = ("import df_mlx, df_mlx._blas as b, mlx.core as mx, sys\n"
            "mx.eval(mx.ones((4, 4)) @ mx.ones((4, 4)))\n"
            "print(b.loaded, file=sys.stderr)")
    env = dict(os.environ, LD_DEBUG="bindings")
    env.pop("DFMLX_BLAS", None)
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stderr
    loaded = err.strip().splitlines()[-1]
    if loaded == "None":
        pytest.skip("no system BLIS or OpenBLAS")
    bindings = [line for line in err.splitlines() if "libmlx" in line and "`cblas_sgemm'" in line]
    assert bindings and all(os.path.basename(loaded).split(".so")[0] in line for line in bindings), bindings


@pytest.mark.skipif(sys.platform != "linux", reason="Linux wheels only")
def test_pip_only_mlx_matmuls_bind_to_the_pip_openblas():
    """Without a system BLAS (find_library finds none), libmlx's cblas_sgemm binds to df_mlx's
    shim over the scipy-openblas32 wheel (df_mlx/native/cblas_shim.c)."""
    import os

    code = ("import ctypes.util; ctypes.util.find_library = lambda name: None\n"
            "import df_mlx, df_mlx._blas as b, mlx.core as mx, sys\n"
            "mx.eval(mx.ones((4, 4)) @ mx.ones((4, 4)))\n"
            "print(b.loaded)")
    env = dict(os.environ, LD_DEBUG="bindings")
    env.pop("DFMLX_BLAS", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "scipy_openblas" in done.stdout
    err = done.stderr
    bindings = [line for line in err.splitlines() if "libmlx" in line and "`cblas_sgemm'" in line]
    assert bindings and all("df_mlx/_cblas" in line for line in bindings), bindings


def test_no_effect_after_mlx_is_imported_and_a_warning():
    code = "import mlx.core, df_mlx._blas as b; print(b.use_fast_blas())"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.strip() == "None"
    import ctypes.util

    if sys.platform == "linux" and any(ctypes.util.find_library(n) for n in ("blis", "openblas")):
        assert "import df_mlx first" in res.stderr
