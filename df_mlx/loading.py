"""`init_df` and the model folders it loads (converted, upstream, `dfmlx train`, embedded or by
name), below both `df_mlx.enhance` (which exports it, as df's) and the command lines that run
it, so that `df_mlx.enhance`'s own command line (`main`, `run`) can use `dfmlx enhance`'s
per-file machinery without an import circle."""

import os
import tempfile
from pathlib import Path
from typing import Optional, Tuple, Union

from loguru import logger

from df_mlx.checkpoint import (is_model_dir, is_training_dir, load_model_dir, load_training_dir, maybe_post_filter,
                               no_checkpoint)
from df_mlx.config import config
from df_mlx.libdf import DF
from df_mlx.logger import init_logger
from df_mlx.model import ModelParams
from df_mlx.utils import get_cache_dir, get_device

PRETRAINED_MODELS = ("DeepFilterNet", "DeepFilterNet2", "DeepFilterNet3")  # the names df knows
EMBEDDED_MODELS = ("DeepFilterNet3",)  # the ones df-mlx carries (recovered from the ONNX release)
DEFAULT_MODEL = "DeepFilterNet3"
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"


class ModelNotFound(FileNotFoundError):
    """A pretrained model by name that is neither embedded nor in df's cache; df would download it."""


def maybe_download_model(name: str = DEFAULT_MODEL) -> str:
    """A pretrained model's directory, as df's: the embedded one (DeepFilterNet3), else df's
    cache folder `<get_cache_dir()>/<name>` when a model is there (what df downloaded: an
    upstream directory, converted on load). df-mlx never downloads; anything else is an error
    that says how to get the model."""
    name = name.removesuffix(".zip")
    if name in EMBEDDED_MODELS:
        path = PRETRAINED_DIR / name
        if not is_model_dir(path):
            raise FileNotFoundError(f"the embedded {name} model is missing from {PRETRAINED_DIR}")
        return str(path)
    cached = os.path.join(get_cache_dir(), name)
    if os.path.isfile(os.path.join(cached, "config.ini")) or os.path.isdir(os.path.join(cached, "checkpoints")):
        return cached
    raise ModelNotFound(
        f"{name} is not embedded in df-mlx (only {', '.join(EMBEDDED_MODELS)}) and df-mlx does not download "
        f"models: get upstream's models/{name}.zip from the DeepFilterNet repository, unpack it and pass its "
        f"folder (init_df('path/to/{name}') or -m), or convert it once with `dfmlx convert path/to/{name}`, "
        f"or unpack it into {cached}")


def get_model_basedir(m: Optional[str]) -> str:
    """A pretrained model's name -> its directory (see maybe_download_model); anything else is a path."""
    m = m or DEFAULT_MODEL
    return maybe_download_model(m) if m in PRETRAINED_MODELS else m


def _converted_dir(model_base_dir: str, epoch) -> Tuple[str, Optional[tempfile.TemporaryDirectory]]:
    """A converted-model directory for `model_base_dir`: itself, or an upstream model
    directory converted into a temporary one."""
    if is_model_dir(model_base_dir):
        return model_base_dir, None
    if not os.path.isfile(os.path.join(model_base_dir, "config.ini")):
        raise FileNotFoundError(f"no model at {model_base_dir} (needs config.ini and model.safetensors, "
                                "or an upstream config.ini + checkpoints/)")
    from converters.convert import convert

    tmp = tempfile.TemporaryDirectory(prefix="dfmlx-")
    out = os.path.join(tmp.name, "model")
    convert(model_base_dir, out, epoch=epoch)
    return out, tmp


def _load_model_dir(model_base_dir: str, epoch, post_filter: bool, mask_only: bool, config_allow_defaults: bool):
    """The model of a converted (or, converted on the fly, an upstream) model directory."""
    model_dir, tmp = _converted_dir(model_base_dir, epoch)
    try:
        config.load(os.path.join(model_dir, "config.ini"), config_must_exist=True,
                    allow_defaults=config_allow_defaults, allow_reload=True)
        maybe_post_filter(post_filter)
        mask_only = mask_only or config("mask_only", cast=bool, section="train", default=False, save=False)
        model, _ = load_model_dir(model_dir, run_df=not mask_only, load_config=False)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return model


def init_df(
    model_base_dir: Optional[str] = None,
    post_filter: bool = False,
    log_level: str = "INFO",
    log_file: Optional[str] = "enhance.log",
    config_allow_defaults: bool = True,
    epoch: Union[str, int, None] = "best",
    default_model: str = DEFAULT_MODEL,
    mask_only: bool = False,
):
    """Load config, model and DF state. Returns (model, df_state, suffix); the suffix is the
    model directory's name (+ "_pf" with the post-filter), for naming enhanced files. As df's,
    `epoch` None or "none" gives an untrained model, and the model comes back in train mode
    (torch modules start in it and df's init_df leaves it; `enhance` switches to eval)."""
    use_default_model = model_base_dir is None or model_base_dir in PRETRAINED_MODELS
    model_base_dir = get_model_basedir(model_base_dir or default_model)
    if not os.path.isdir(model_base_dir):
        raise NotADirectoryError(f"Base directory not found at {model_base_dir}")
    writable = not use_default_model and os.access(model_base_dir, os.W_OK)
    log_file = os.path.join(model_base_dir, log_file) if log_file is not None and writable else None
    init_logger(file=log_file, level=log_level, model=model_base_dir)
    if use_default_model:
        logger.info(f"Using {default_model} model at {model_base_dir}")
    if no_checkpoint(epoch) or is_training_dir(model_base_dir):
        model = load_training_dir(model_base_dir, epoch, post_filter, mask_only, config_allow_defaults)
    else:
        model = _load_model_dir(model_base_dir, epoch, post_filter, mask_only, config_allow_defaults)
    p = ModelParams()
    df_state = DF(sr=p.sr, fft_size=p.fft_size, hop_size=p.hop_size, nb_bands=p.nb_erb,
                  min_nb_erb_freqs=p.min_nb_freqs)
    model.train()
    suffix = os.path.basename(os.path.abspath(model_base_dir)) + ("_pf" if post_filter else "")
    logger.info(f"Running on device {get_device()}")
    logger.info("Model loaded")
    return model, df_state, suffix
