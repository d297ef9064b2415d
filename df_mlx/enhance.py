"""Speech enhancement with a DeepFilterNet model, as `df.enhance`.

`init_df` loads a converted model directory (or converts an upstream model directory on the
fly, torch-free; with no argument, the embedded pretrained DeepFilterNet3), and
`enhance` runs the whole offline pipeline: STFT, features, model, attenuation limit, ISTFT.
"""

import os
import tempfile
from pathlib import Path
from typing import Optional, Tuple, Union

import mlx.core as mx
import numpy as np
from loguru import logger

from df_mlx.checkpoint import EXTENSION, is_model_dir, load_model, load_model_dir
from df_mlx.config import config
from df_mlx.libdf import DF
from df_mlx.libdfdata import noisy_features
from df_mlx.logger import init_logger
from df_mlx.model import ModelParams
from df_mlx.streaming import StreamingEnhancer, why_not_streamable
from df_mlx.utils import get_device, get_norm_alpha

PRETRAINED_MODELS = ("DeepFilterNet3",)
DEFAULT_MODEL = "DeepFilterNet3"
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"


def get_model_basedir(m: Optional[str]) -> str:
    """A pretrained model's name -> its embedded directory; anything else is a path."""
    m = m or DEFAULT_MODEL
    if m in PRETRAINED_MODELS:
        path = PRETRAINED_DIR / m
        if not is_model_dir(path):
            raise FileNotFoundError(f"the embedded {m} model is missing from {PRETRAINED_DIR}")
        return str(path)
    return m


def _maybe_post_filter(post_filter: bool):
    if post_filter:
        config.set("mask_pf", True, bool, ModelParams().section)
        logger.info("Running with post-filter")


def is_training_dir(model_base_dir: str) -> bool:
    """A `dfmlx train` base directory: config.ini and safetensors checkpoints/model_*."""
    import glob

    return os.path.isfile(os.path.join(model_base_dir, "config.ini")) and bool(
        glob.glob(os.path.join(model_base_dir, "checkpoints", f"model_*.{EXTENSION}*")))


def load_training_dir(model_base_dir: str, epoch: Union[str, int, None] = "best", post_filter: bool = False,
                      mask_only: bool = False, config_allow_defaults: bool = True):
    """The model of a training directory at `epoch` (best, latest or a number; best falls back
    to latest), as df's init_df loads its own model directories; its config becomes global."""
    config.load(os.path.join(model_base_dir, "config.ini"), config_must_exist=True,
                allow_defaults=config_allow_defaults, allow_reload=True)
    _maybe_post_filter(post_filter)
    p = ModelParams()
    df_state = DF(sr=p.sr, fft_size=p.fft_size, hop_size=p.hop_size, nb_bands=p.nb_erb,
                  min_nb_erb_freqs=p.min_nb_freqs)
    mask_only = mask_only or config("mask_only", cast=bool, section="train", default=False, save=False)
    model, found = load_model(os.path.join(model_base_dir, "checkpoints"), df_state, mask_only=mask_only,
                              epoch="best" if epoch is None else epoch)
    logger.info(f"Loaded checkpoint of epoch {found} from {model_base_dir}")
    model.eval()
    return model


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
    convert(model_base_dir, out, epoch="best" if epoch is None else epoch)
    return out, tmp


def _load_model_dir(model_base_dir: str, epoch, post_filter: bool, mask_only: bool, config_allow_defaults: bool):
    """The model of a converted (or, converted on the fly, an upstream) model directory."""
    model_dir, tmp = _converted_dir(model_base_dir, epoch)
    try:
        config.load(os.path.join(model_dir, "config.ini"), config_must_exist=True,
                    allow_defaults=config_allow_defaults, allow_reload=True)
        _maybe_post_filter(post_filter)
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
    model directory's name (+ "_pf" with the post-filter), for naming enhanced files."""
    use_default_model = model_base_dir is None or model_base_dir in PRETRAINED_MODELS
    model_base_dir = get_model_basedir(model_base_dir or default_model)
    if not os.path.isdir(model_base_dir):
        raise NotADirectoryError(f"Base directory not found at {model_base_dir}")
    writable = not use_default_model and os.access(model_base_dir, os.W_OK)
    log_file = os.path.join(model_base_dir, log_file) if log_file is not None and writable else None
    init_logger(file=log_file, level=log_level, model=model_base_dir)
    if use_default_model:
        logger.info(f"Using {default_model} model at {model_base_dir}")
    if is_training_dir(model_base_dir):
        model = load_training_dir(model_base_dir, epoch, post_filter, mask_only, config_allow_defaults)
    else:
        model = _load_model_dir(model_base_dir, epoch, post_filter, mask_only, config_allow_defaults)
    p = ModelParams()
    df_state = DF(sr=p.sr, fft_size=p.fft_size, hop_size=p.hop_size, nb_bands=p.nb_erb,
                  min_nb_erb_freqs=p.min_nb_freqs)
    suffix = os.path.basename(os.path.abspath(model_base_dir)) + ("_pf" if post_filter else "")
    logger.info(f"Running on device {get_device()}")
    logger.info("Model loaded")
    return model, df_state, suffix


# Longer inputs run through StreamingEnhancer in blocks of this length, which gives the
# whole-signal result within float32 rounding (tests/test_streaming.py) in bounded memory;
# whole, a minute's feature maps are 150 MB each, and MLX's CPU build, which keeps only 32 MB
# of freed buffers for reuse, takes fresh pages from the OS for every op (25 % slower per frame).
BLOCK_SECONDS = 10.0


def _enhance_in_blocks(model, df_state: DF, audio: np.ndarray, atten_lim_db: Optional[float]) -> np.ndarray:
    """enhance(pad=True) of audio [C, T] through a StreamingEnhancer, block by block."""
    stream = StreamingEnhancer(model, df_state, atten_lim_db, compile_hops=False)
    block = int(BLOCK_SECONDS * df_state.sr())
    parts = [stream.process(audio[:, i : i + block]) for i in range(0, audio.shape[1], block)]
    out = np.concatenate(parts + [stream.flush()], axis=1)
    delay = df_state.fft_size() - df_state.hop_size()
    return out[:, delay : delay + audio.shape[1]]


def df_features(audio, df: DF, nb_df: int, device=None) -> Tuple[mx.array, mx.array, mx.array]:
    """Audio [C, T] -> spec [C, 1, T', F, 2], ERB features [C, 1, T', E], normalised complex
    features [C, 1, T', nb_df, 2], exactly as df computes them with libdf."""
    spec = df.analysis(np.asarray(audio, dtype=np.float32))
    erb_feat, spec_feat = noisy_features(spec, df.erb_widths(), nb_df, get_norm_alpha(False))
    return mx.array(_as_real(spec)[:, None]), mx.array(erb_feat[:, None]), mx.array(_as_real(spec_feat)[:, None])


def _as_real(x: np.ndarray) -> np.ndarray:
    return np.stack([x.real, x.imag], axis=-1).astype(np.float32)


def enhance(model, df_state: DF, audio, pad=True, atten_lim_db: Optional[float] = None) -> mx.array:
    """Enhance audio [C, T] at the model's rate. With `pad` the output is aligned with the
    input and has its length (the STFT delay fft_size - hop_size is compensated); an
    attenuation limit (dB) mixes the noisy spectrum back in. Inputs longer than BLOCK_SECONDS
    run in blocks (see there) when the model streams."""
    model.eval()
    audio = np.asarray(audio, dtype=np.float32)
    orig_len = audio.shape[-1]
    n_fft, hop = df_state.fft_size(), df_state.hop_size()
    if pad and audio.ndim == 2 and orig_len > BLOCK_SECONDS * df_state.sr() and why_not_streamable(model) is None:
        return mx.array(_enhance_in_blocks(model, df_state, audio, atten_lim_db))
    if pad:
        audio = np.pad(audio, ((0, 0), (0, n_fft)))
    nb_df = getattr(model, "nb_df", getattr(model, "df_bins", ModelParams().nb_df))
    spec, erb_feat, spec_feat = df_features(audio, df_state, nb_df)
    enhanced = np.array(model(spec, erb_feat, spec_feat)[0])[:, 0]
    enhanced = enhanced[..., 0] + 1j * enhanced[..., 1]
    if atten_lim_db is not None and abs(atten_lim_db) > 0:
        lim = 10 ** (-abs(atten_lim_db) / 20)
        noisy = np.array(spec)[:, 0]
        enhanced = (noisy[..., 0] + 1j * noisy[..., 1]) * lim + enhanced * (1 - lim)
    out = df_state.synthesis(enhanced.astype(np.complex64))
    if pad:
        if n_fft % hop != 0:
            raise ValueError(f"delay compensation needs fft_size % hop_size == 0, got {n_fft}, {hop}")
        d = n_fft - hop
        out = out[:, d : orig_len + d]
    return mx.array(out)
