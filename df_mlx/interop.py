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


class TorchModuleCalls:
    """The torch.nn.Module calls df users' code makes on a model, on an MLX model (mixed into
    every model family). `eval`/`train` are MLX's own (same meaning, both return the model).
    Differences: `parameters()` stays MLX's nested dict (optimizers need it): iterate
    `named_parameters()` as torch's `parameters()`; `state_dict()` gives numpy arrays in torch
    layout; `to` moves nothing (MLX memory is shared) but picks MLX's default device."""

    def to(self, *args, **kwargs):
        """`to(device)` (cpu; cuda, mps and gpu are MLX's GPU) sets MLX's default device;
        `to(dtype)` accepts float32 only (df-mlx models compute in float32)."""
        import mlx.core as mx

        from df_mlx.utils import mlx_device

        for value in list(args) + [kwargs.get("device"), kwargs.get("dtype")]:
            if value is None:
                continue
            if "float" in str(value) or "int" in str(value):
                if numpy_dtype(value) != np.float32:
                    raise TypeError(f"df-mlx models compute in float32, not {value} "
                                    "(smaller models: df_mlx.quantization.quantize_dynamic)")
            else:
                mx.set_default_device(value if isinstance(value, mx.Device) else mlx_device(str(value)))
        return self

    def cpu(self):
        return self.to("cpu")

    def named_parameters(self):
        """(name, array) of what torch's `parameters()` holds: the trainable parameters, by
        their torch names (BatchNorm statistics are MLX parameters but torch buffers)."""
        from mlx.utils import tree_flatten

        return iter(tree_flatten(self.trainable_parameters()))

    def state_dict(self):
        """torch's state_dict: parameters and buffers by name, in torch's layout, as numpy
        arrays (torch.from_numpy each to save them with torch)."""
        from converters.layout import mlx_state_dict

        return mlx_state_dict(self)

    def load_state_dict(self, state_dict, strict: bool = True):
        """Load a torch state dict (torch tensors or arrays, torch names and layout), strictly
        (every name must fit, as torch's default; strict=False is not supported)."""
        from converters.layout import load_torch_state_dict

        if not strict:
            raise ValueError("load_state_dict(strict=False) is not supported: pass a complete state dict")
        load_torch_state_dict(self, {k: to_numpy(v) for k, v in state_dict.items()})
        return self
