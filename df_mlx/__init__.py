"""df-mlx: DeepFilterNet in MLX, mirroring the PyTorch package `df` module for module."""

from df_mlx._blas import use_fast_blas
from df_mlx._malloc import keep_freed_memory

use_fast_blas()  # before anything imports mlx.core: see df_mlx/_blas.py
keep_freed_memory()  # MLX's CPU buffers stay in the heap: see df_mlx/_malloc.py

import warnings  # noqa: E402

# `python -m df_mlx.enhance` runs df's command line after this package imported the module (as
# df/__init__ imports df.enhance); runpy's warning about exactly that is expected here.
warnings.filterwarnings("ignore", message="'df_mlx.enhance' found in sys.modules", category=RuntimeWarning)

from df_mlx.config import config  # noqa: E402
from df_mlx.enhance import enhance, init_df  # noqa: E402
from df_mlx.version import version  # noqa: E402

__all__ = ["config", "version", "enhance", "init_df"]
__version__ = version
