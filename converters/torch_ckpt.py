"""Read PyTorch checkpoints safely: `torch.load(weights_only=True)`, never arbitrary pickles."""

import pickle
import re
import zipfile
from pathlib import Path
from typing import Dict

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit; the message is one line for users."""


def _tensor_to_numpy(name: str, value) -> np.ndarray:
    import torch

    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"entry `{name}` is a {type(value).__name__}, not a tensor")
    return value.detach().cpu().numpy()


def read_state_dict(path: Path) -> Dict[str, np.ndarray]:
    """A torch state dict (upstream `df` checkpoint: a plain `state_dict()`, or one under a
    "model"/"state_dict" key) as numpy arrays, with upstream's legacy `clc` -> `df` renaming."""
    try:
        import torch
    except ImportError:
        raise CheckpointError("reading PyTorch checkpoints needs torch (pip install 'df-mlx[reference]')") from None
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = re.search(r"unsupported GLOBAL (\S+)", str(e))
        if blocked:
            raise CheckpointError(f"refusing to load {path.name}: it would import `{blocked.group(1)}` "
                                  "(only plain weights are loaded)") from None
        raise CheckpointError(f"{path.name} is not a readable PyTorch checkpoint: not plain weights "
                              "(pickled objects or corrupt data)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path.name} is not a readable PyTorch checkpoint: {first}") from None
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path.name} holds no state dict (got {type(obj).__name__})")
    return {str(k).replace("clc", "df"): _tensor_to_numpy(str(k), v) for k, v in obj.items()}


def write_state_dict(state_dict: Dict[str, np.ndarray], path: Path):
    """Save numpy arrays as a torch state dict that `torch.load(weights_only=True)` reads."""
    import torch

    torch.save({k: torch.from_numpy(np.array(v, order="C")) for k, v in state_dict.items()}, path)  # keeps 0-d
