"""Helpers of `df.utils` for MLX arrays: complex views, robust angle, norm alpha, git/host info."""

import collections.abc
import math
import os
import random
import subprocess
from socket import gethostname
from typing import Any, Optional, Set

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from loguru import logger
from mlx.utils import tree_flatten

from df_mlx.config import DfParams, config
from df_mlx.model import ModelParams  # noqa: F401  (df.utils re-exports it)


def get_device() -> mx.Device:
    """`[train] DEVICE` (cpu/gpu) if set, else the GPU when MLX has one, else the CPU."""
    s = config("DEVICE", default="", section="train")
    if s == "":
        return mx.Device(mx.gpu) if mx.is_available(mx.gpu) else mx.Device(mx.cpu)
    return mlx_device(s, "in [train] DEVICE")


def mlx_device(name: str, where: str = "") -> mx.Device:
    """A torch device name (cpu, cuda, cuda:0, mps) or an MLX one (cpu, gpu, metal) as the
    MLX device: every accelerator is MLX's GPU."""
    kind = name.split(":")[0].lower()
    if kind in ("cuda", "mps", "metal"):
        kind = "gpu"
    if kind not in ("cpu", "gpu"):
        raise ValueError(f"Unknown device '{name}'{' ' + where if where else ''} (use cpu or gpu)")
    return mx.Device(getattr(mx, kind))


def as_complex(x: mx.array) -> mx.array:
    """[..., 2] real/imag pairs -> complex64 [...] (complex input is returned as is)."""
    if mx.issubdtype(x.dtype, mx.complexfloating):
        return x
    if x.shape[-1] != 2:
        raise ValueError(f"Last dimension need to be of length 2 (re + im), but got {x.shape}")
    return x[..., 0] + 1j * x[..., 1]


def as_real(x: mx.array) -> mx.array:
    """complex [...] -> [..., 2] real/imag pairs (real input is returned as is)."""
    if mx.issubdtype(x.dtype, mx.complexfloating):
        return mx.stack([mx.real(x), mx.imag(x)], axis=-1)
    return x


def _robust_angle_grads(re, im, grad):
    grad_inv = grad / mx.maximum(re * re + im * im, 1e-10)
    return -im * grad_inv, re * grad_inv


@mx.custom_function
def _angle_re_im(re: mx.array, im: mx.array) -> mx.array:
    return mx.arctan2(im, re)


@_angle_re_im.vjp
def _angle_re_im_vjp(primals, cotangent, output):
    return _robust_angle_grads(*primals, cotangent)


@mx.custom_function
def _angle(x: mx.array) -> mx.array:
    return mx.arctan2(mx.imag(x), mx.real(x))


@_angle.vjp
def _angle_vjp(x, cotangent, output):  # a single primal arrives as the array itself
    g_re, g_im = _robust_angle_grads(mx.real(x), mx.imag(x), cotangent)
    return (g_re + 1j * g_im,)


class angle_re_im:
    """atan2(im, re) whose gradient stays finite at zero magnitude; call as `.apply(re, im)`."""

    apply = staticmethod(_angle_re_im)


class angle:
    """Angle of a complex array with a gradient that stays finite at zero magnitude."""

    apply = staticmethod(_angle)


def check_finite_module(obj, name="Module", _raise=True) -> Set[str]:
    """Names of non-finite parameters of an MLX module (raises if any and `_raise`)."""
    out: Set[str] = set()
    if isinstance(obj, nn.Module):
        for pname, p in tree_flatten(obj.parameters()):
            if not bool(mx.all(mx.isfinite(p)).item()):
                out.add(pname)
    elif isinstance(obj, mx.array) and not bool(mx.all(mx.isfinite(obj)).item()):
        out.add(name)
    if _raise and len(out) > 0:
        raise ValueError(f"{name} not finite during checkpoint writing including: {out}")
    return out


def make_np(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if np.isscalar(x):
        return np.array([x])
    if isinstance(x, mx.array):
        return np.array(x)
    raise TypeError(f"Got {type(x)}, but numpy array, scalar, or mlx array are expected.")


def _calculate_norm_alpha(sr: int, hop_size: int, tau: float) -> float:
    """Exponential decay factor alpha for a given tau (decay window size [s])."""
    return math.exp(-(hop_size / sr) / tau)


def get_norm_alpha(log: bool = True) -> float:
    """Alpha of the feature normalisation from `[df]`, rounded to 3 decimals as upstream.

    Only `[df]` keys are read, so the `[df]` parameters are enough (no model family needed).
    """
    p = DfParams()
    a_ = _calculate_norm_alpha(sr=p.sr, hop_size=p.hop_size, tau=p.norm_tau)
    precision = 3
    a = 1.0
    while a >= 1.0:
        a = round(a_, precision)
        precision += 1
    if log:
        logger.info(f"Running with normalization window alpha = '{a}'")
    return a


def check_manual_seed(seed: Optional[int] = None) -> int:
    """Seed numpy, random and MLX; draw (and return) a seed when none is given."""
    seed = seed or random.randint(1, 10000)
    np.random.seed(seed)
    random.seed(seed)
    mx.random.seed(seed)
    return seed


def _git(*args: str) -> Optional[str]:
    try:
        return subprocess.check_output(
            ["git", "-C", os.path.dirname(os.path.abspath(__file__)), *args],
            stderr=subprocess.DEVNULL,
        ).strip().decode()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None


def get_git_root() -> Optional[str]:
    """Top-level git directory, or None outside a git checkout."""
    return _git("rev-parse", "--show-toplevel")


def get_commit_hash() -> Optional[str]:
    return _git("rev-parse", "--short", "--verify", "HEAD")


def get_branch_name() -> Optional[str]:
    return _git("rev-parse", "--abbrev-ref", "HEAD")


def get_host() -> str:
    return gethostname()


def apply_to_tensor(input_, func):
    """Apply `func` to every array in a (nested) module, mapping or sequence."""
    if isinstance(input_, nn.Module):
        return [apply_to_tensor(c, func) for c in input_.children().values()]
    if isinstance(input_, mx.array):
        return func(input_)
    if isinstance(input_, (str, bytes)) or input_ is None:
        return input_
    if isinstance(input_, collections.abc.Mapping):
        return {k: apply_to_tensor(v, func) for k, v in input_.items()}
    if isinstance(input_, collections.abc.Iterable):
        return [apply_to_tensor(v, func) for v in input_]
    return input_


def detach_hidden(hidden: Any) -> Any:
    """Cut the gradient graph through recurrent hidden states."""
    return apply_to_tensor(hidden, mx.stop_gradient)


class DownloadUnavailable(OSError):
    """df would download this file; df-mlx runs offline. The message says where to put it."""


def download_file(url: str, download_dir: str, extract: bool = False) -> str:
    """df's `download_file` without the network: `download_dir/<name>` as df writes it. A local
    path or file:// URL is copied there; a file already there (downloaded before, by df or by
    hand) is used as it is; anything else raises DownloadUnavailable. `extract` unpacks a zip
    into `download_dir` (removing the archive only when this call copied it, as df removes
    its download)."""
    import shutil
    import zipfile
    from urllib.parse import unquote, urlparse

    local_filename = os.path.join(download_dir, unquote(url.rstrip("/").split("/")[-1]))
    parsed = urlparse(url)
    source = unquote(parsed.path) if parsed.scheme == "file" else (url if parsed.scheme == "" else None)
    copied = False
    if source is not None and os.path.isfile(source):
        if not (os.path.exists(local_filename) and os.path.samefile(source, local_filename)):
            os.makedirs(download_dir, exist_ok=True)
            shutil.copyfile(source, local_filename)
            copied = True
    elif not os.path.isfile(local_filename):
        raise DownloadUnavailable(f"df-mlx does not download: fetch {url} yourself and save it as {local_filename}")
    if extract:
        if os.path.splitext(local_filename)[1] != ".zip":
            raise ValueError(f"cannot extract {local_filename}: only .zip files are supported")
        with zipfile.ZipFile(local_filename) as zf:
            zf.extractall(download_dir)
        if copied:
            os.remove(local_filename)
    return local_filename


def get_cache_dir() -> str:
    """df's cache folder for downloaded models and samples (where df keeps `DeepFilterNet2`
    etc.): appdirs' user cache dir, as df; platformdirs' (the same folder) when only that is
    installed; else ~/.cache/DeepFilterNet/ (Linux) or ~/Library/Caches/DeepFilterNet (macOS)."""
    import sys

    for module in ("appdirs", "platformdirs"):
        try:
            return __import__(module).user_cache_dir("DeepFilterNet")
        except ImportError:
            pass
    if sys.platform == "darwin":
        return os.path.expanduser("~/Library/Caches/DeepFilterNet")
    return os.path.expanduser("~/.cache/DeepFilterNet/")
