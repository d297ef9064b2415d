"""Checkpoints of df_mlx models, mirroring `df.checkpoint`, over the converted-model format.

A converted model is a directory with `config.ini` (the `df` config: same sections and keys)
and `model.safetensors` (MLX-layout weights under the torch `state_dict` names) whose metadata
records where the weights came from. Directories are written atomically: into a temporary
sibling first, renamed into place only when complete.
"""

import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Tuple

import mlx.core as mx
from loguru import logger
from mlx.utils import tree_flatten

from df_mlx.config import config
from df_mlx.version import version

CONFIG_FILE = "config.ini"
MODEL_FILE = "model.safetensors"
FORMAT = "df-mlx-converted-1"


class ModelDirError(ValueError):
    """A converted-model directory that is missing, incomplete or does not fit its config."""


def is_model_dir(path) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / MODEL_FILE).is_file()


def write_model_dir(model, out_dir, metadata: Dict[str, str], overwrite: bool = False) -> Path:
    """Write the global config and the model's weights to `out_dir`, atomically."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ModelDirError(f"output directory already exists: {out_dir}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        with open(tmp / CONFIG_FILE, "w") as f:  # config.save skips unmodified configs
            config.parser.write(f)
        meta = {"format": FORMAT, "df_mlx_version": str(version), **{k: str(v) for k, v in metadata.items()}}
        weights = dict(tree_flatten(model.parameters()))
        mx.save_safetensors(str(tmp / MODEL_FILE), weights, metadata=meta)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_metadata(model_dir) -> Dict[str, str]:
    _, meta = mx.load(str(Path(model_dir) / MODEL_FILE), return_metadata=True)
    return meta


def load_model_dir(model_dir, df_state=None, run_df: bool = True, train_mask: bool = True,
                   load_config: bool = True) -> Tuple[object, Dict[str, str]]:
    """Load a converted-model directory: its config becomes the global config (unless the
    caller loaded and adjusted it: `load_config=False`), then the model family it names is
    built and its weights loaded strictly."""
    from df_mlx.model import init_model

    model_dir = Path(model_dir)
    if not is_model_dir(model_dir):
        raise ModelDirError(f"{model_dir} is not a converted model (needs {CONFIG_FILE} and {MODEL_FILE})")
    try:
        weights, meta = mx.load(str(model_dir / MODEL_FILE), return_metadata=True)
    except Exception as e:  # mlx raises plain exceptions for corrupt files
        raise ModelDirError(f"{model_dir / MODEL_FILE} is not a readable safetensors file: {e}") from None
    if meta.get("format") != FORMAT:
        raise ModelDirError(f"{model_dir / MODEL_FILE} is not a df-mlx converted model (format {meta.get('format')!r})")
    if load_config:
        config.load(str(model_dir / CONFIG_FILE), config_must_exist=True, allow_defaults=True, allow_reload=True)
    model = init_model(df_state, run_df=run_df, train_mask=train_mask)
    own = dict(tree_flatten(model.parameters()))
    missing, extra = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    bad_shape = [k for k in own if k in weights and weights[k].shape != own[k].shape]
    if missing or extra or bad_shape:
        raise ModelDirError(
            f"{model_dir}: weights do not fit its config ({meta.get('family', '?')}): "
            + "; ".join(f"{what} {', '.join(keys[:5])}" for what, keys in
                        (("missing", missing), ("unexpected", extra), ("mis-shaped", bad_shape)) if keys))
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    model.eval()
    logger.info(f"Loaded {meta.get('family', 'model')} from {model_dir}")
    return model, meta


def get_epoch(cp) -> int:
    return int(os.path.basename(cp).split(".")[0].split("_")[-1])
