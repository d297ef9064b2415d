"""df-mlx: DeepFilterNet in MLX, mirroring the PyTorch package `df` module for module."""

from df_mlx.config import config
from df_mlx.version import version

__all__ = ["config", "version"]
__version__ = version
