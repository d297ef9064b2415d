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
def test_openblas_is_used_when_installed():
    import ctypes.util

    if ctypes.util.find_library("openblas") is None:
        pytest.skip("no system OpenBLAS (apt install libopenblas0)")
    assert "openblas" in _loaded()


def test_no_effect_after_mlx_is_imported_and_a_warning():
    code = "import mlx.core, df_mlx._blas as b; print(b.use_fast_blas())"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.strip() == "None"
    import ctypes.util

    if sys.platform == "linux" and ctypes.util.find_library("openblas") is not None:
        assert "import df_mlx first" in res.stderr
