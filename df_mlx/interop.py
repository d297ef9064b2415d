"""Types in, types out: df-mlx's array functions give back what they were given. torch
tensors come back as torch tensors (torch is imported only when one arrives), MLX arrays as
MLX arrays, and numpy arrays (or anything array-like) as numpy arrays."""

import sys

import numpy as np

TORCH, MLX, NUMPY = "torch", "mlx", "numpy"


def _is_torch(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def kind_of(x) -> str:
    """Which framework `x` belongs to: TORCH, MLX or NUMPY (the default for array-likes)."""
    if _is_torch(x):
        return TORCH
    if type(x).__module__.startswith("mlx"):
        return MLX
    return NUMPY


def to_numpy(x) -> np.ndarray:
    """`x` as a numpy array (a torch tensor detached and moved to the CPU first)."""
    if _is_torch(x):
        x = x.detach().cpu()
        return x.float().numpy() if str(x.dtype) == "torch.bfloat16" else x.numpy()
    return np.asarray(x)


def like(x: np.ndarray, kind: str):
    """A numpy result as `kind` (see kind_of)."""
    if kind == TORCH:
        import torch

        return torch.from_numpy(np.ascontiguousarray(x))
    if kind == MLX:
        import mlx.core as mx

        return mx.array(x)
    return x


def numpy_dtype(dtype) -> np.dtype:
    """A numpy, torch or MLX dtype (or its name: "int16", "float32") as the numpy dtype."""
    name = str(dtype)
    for prefix in ("torch.", "mlx.core."):
        name = name.removeprefix(prefix)
    try:
        return np.dtype(dtype if isinstance(dtype, (type, np.dtype)) else name)
    except TypeError:
        raise TypeError(f"not a dtype numpy knows: {dtype!r}") from None
