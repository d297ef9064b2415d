"""Map parameters between an MLX df_mlx model and a torch `state_dict`, by name.

df_mlx models use the torch names, so the only work is each layer kind's layout
(`TORCH_LAYOUT` of the layer modules). The key sets must match exactly: a missing, extra or
mis-shaped tensor is an error naming it, never skipped.
"""

from typing import Dict, List, Tuple

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from df_mlx.layers import TORCH_LAYOUT


class LayoutError(ValueError):
    """A state dict does not fit the model: names or shapes differ."""


def _transforms(model) -> Dict[str, Tuple[object, object, object]]:
    """{parameter name: (module, mlx->torch, torch->mlx)} for parameters with their own layout."""
    out = {}
    for prefix, module in model.named_modules():
        for pname, (to_torch, from_torch) in TORCH_LAYOUT.get(type(module), {}).items():
            out[f"{prefix}.{pname}" if prefix else pname] = (module, to_torch, from_torch)
    return out


def _check_names(expected, given, what: str):
    missing, extra = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    if missing or extra:
        parts = ([f"missing {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"] if missing else []) + (
            [f"unexpected {', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}"] if extra else [])
        raise LayoutError(f"{what}: {'; '.join(parts)}")


def mlx_state_dict(model) -> Dict[str, np.ndarray]:
    """The model's parameters and buffers as a torch-layout state dict of numpy arrays."""
    transforms = _transforms(model)
    out = {}
    for name, value in tree_flatten(model.parameters()):
        if name in transforms:
            module, to_torch, _ = transforms[name]
            value = to_torch(value, module)
        out[name] = np.array(value)
    return out


def torch_to_mlx(model, state_dict: Dict[str, np.ndarray]) -> List[Tuple[str, mx.array]]:
    """Torch-layout tensors -> (name, mx.array) pairs for `model.load_weights`, checked."""
    transforms = _transforms(model)
    own = dict(tree_flatten(model.parameters()))
    _check_names(own, state_dict, "state dict does not match the model")
    pairs = []
    for name, value in state_dict.items():
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.floating) != mx.issubdtype(own[name].dtype, mx.floating):
            raise LayoutError(f"{name}: a {value.dtype} tensor where the model has {own[name].dtype} "
                              "(weights are never cast between integers and floats)")
        array = mx.array(value)
        if name in transforms:
            module, _, from_torch = transforms[name]
            array = from_torch(array, module)
        if array.shape != own[name].shape:
            raise LayoutError(f"{name}: shape {tuple(np.shape(value))} does not fit the model "
                              f"(expects {tuple(own[name].shape)} in MLX layout)")
        pairs.append((name, array.astype(own[name].dtype)))
    return pairs


def load_torch_state_dict(model, state_dict: Dict[str, np.ndarray]):
    """Load a torch-layout state dict (numpy arrays) into an MLX model, strictly."""
    model.load_weights(torch_to_mlx(model, state_dict), strict=True)
    mx.eval(model.parameters())
    return model
