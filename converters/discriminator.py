"""The DFNet4 fork's discriminator checkpoints (`checkpoints/disc_<epoch>.ckpt`, written next to
`model_<epoch>.ckpt` by its GAN training) <-> `discriminator.safetensors` in a converted-model
directory, and back to a state dict the fork loads with `load_state_dict(strict=True)`.

The discriminator is the one the model's config describes (`[train] discriminator_type`,
`mpd_periods`, `msd_scales`, `discriminator_spectral_norm`, as df_mlx.train_gan builds it);
every tensor must land on it (weight_norm's `weight_g`/`weight_v`, spectral_norm's
`weight_orig` and its `weight_u`/`weight_v` buffers), or the conversion fails naming them.
"""

import re
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from converters.layout import LayoutError, load_torch_state_dict, mlx_state_dict
from converters.torch_ckpt import CheckpointError, read_state_dict

DISC_FILE = "discriminator.safetensors"


def disc_checkpoint_for(model_checkpoint: Path) -> Optional[Path]:
    """The fork's discriminator checkpoint of the same epoch as `model_<epoch>.ckpt[.best]`."""
    m = re.fullmatch(r"model_(\d+)\.ckpt(\.best)?", model_checkpoint.name)
    if m is None:
        return None
    path = model_checkpoint.parent / f"disc_{m.group(1)}.ckpt"
    return path if path.is_file() else None


def convert_discriminator(checkpoint: Path):
    """The discriminator the global config describes, with the weights of a torch checkpoint."""
    from df_mlx.train_gan import build_discriminator

    disc = build_discriminator()
    try:
        load_torch_state_dict(disc, read_state_dict(checkpoint))
    except LayoutError as e:
        raise CheckpointError(f"{checkpoint.name} does not fit the configured discriminator: {e}") from None
    mx.eval(disc.parameters())
    return disc


def discriminator_weights(disc) -> Dict[str, mx.array]:
    """What `discriminator.safetensors` holds: every parameter and buffer under torch's names."""
    return dict(tree_flatten(disc.parameters()))


def load_discriminator(model_dir):
    """The converted discriminator of `model_dir` (its config must be the global config)."""
    from df_mlx.train_gan import build_discriminator

    disc = build_discriminator()
    disc.load_weights(str(Path(model_dir) / DISC_FILE), strict=True)
    return disc


def export_state_dict(model_dir) -> Dict[str, np.ndarray]:
    """The converted discriminator as the fork's state dict."""
    return mlx_state_dict(load_discriminator(model_dir))
