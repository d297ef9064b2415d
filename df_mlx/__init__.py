"""df-mlx: DeepFilterNet in MLX, mirroring the PyTorch package `df` module for module."""

from df_mlx._blas import use_fast_blas

use_fast_blas()  # before anything imports mlx.core: see df_mlx/_blas.py

from df_mlx.config import config  # noqa: E402
from df_mlx.enhance import enhance, init_df  # noqa: E402
from df_mlx.version import version  # noqa: E402

__all__ = ["config", "version", "enhance", "init_df"]
__version__ = version
