"""Audio I/O as `df.io`, on soundfile instead of torchaudio.

`resample` ports torchaudio's band-limited sinc resampler (`torchaudio.functional.resample`,
which `df.io.resample` calls) with df's method presets, in numpy. Files are written
atomically: a temporary file in the target directory, renamed into place when complete.
"""

import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import mlx.core as mx
import numpy as np
import soundfile as sf
from loguru import logger

from df_mlx.interop import kind_of, like, numpy_dtype, to_numpy
from df_mlx.logger import warn_once
from df_mlx.utils import download_file, get_cache_dir, get_git_root

TEST_SAMPLE = os.path.join("assets", "clean_freesound_33711.wav")
TEST_SAMPLE_URL = "https://github.com/Rikorose/DeepFilterNet/raw/main/" + TEST_SAMPLE.replace(os.sep, "/")


class AudioError(ValueError):
    """Audio that cannot be read, written or used; the message is one line for users."""


@dataclass(frozen=True)
class AudioMetaData:
    """What torchaudio's `AudioMetaData` tells df: the file's own rate, length and layout."""

    sample_rate: int
    num_frames: int
    num_channels: int
    bits_per_sample: int
    encoding: str


_BITS = {"PCM_16": 16, "PCM_24": 24, "PCM_32": 32, "PCM_U8": 8, "PCM_S8": 8, "FLOAT": 32, "DOUBLE": 64}


def _info(file: str) -> AudioMetaData:
    if not os.path.isfile(file):
        raise AudioError(f"audio file not found: {file}")
    try:
        i = sf.info(file)
    except (RuntimeError, sf.LibsndfileError) as e:
        raise AudioError(f"not a readable audio file: {file} ({str(e).splitlines()[0]})") from None
    return AudioMetaData(i.samplerate, i.frames, i.channels, _BITS.get(i.subtype, 0), i.subtype)


def load_audio(file: str, sr: Optional[int] = None, verbose=True, **kwargs) -> Tuple[mx.array, AudioMetaData]:
    """Audio [C, T] float32 in [-1, 1] (resampled to `sr` if given) and the file's metadata.
    `frame_offset`/`num_frames` select a part (in the file's rate; `num_frames` is scaled to
    `sr` as df does); `method` picks the resampler preset."""
    method = kwargs.pop("method", "sinc_fast")
    info = _info(file)
    start = int(kwargs.pop("frame_offset", 0))
    frames = int(kwargs.pop("num_frames", -1))
    if frames > 0 and sr is not None:
        frames *= info.sample_rate // sr
    if kwargs:
        raise TypeError(f"load_audio got unexpected arguments: {', '.join(kwargs)}")
    try:
        audio, orig_sr = sf.read(file, start=start, frames=frames, dtype="float32", always_2d=True)
    except (RuntimeError, sf.LibsndfileError) as e:
        raise AudioError(f"not a readable audio file: {file} ({str(e).splitlines()[0]})") from None
    audio = audio.T
    if sr is not None and orig_sr != sr:
        if verbose:
            warn_once(f"Audio sampling rate does not match model sampling rate ({orig_sr}, {sr}). Resampling...")
        audio = resample(audio, orig_sr, sr, method=method)
    return mx.array(np.ascontiguousarray(audio)), info


def output_path(file: str, output_dir: Optional[str] = None, suffix: Optional[str] = None) -> str:
    """Where `save_audio` writes: `<name>_<suffix><ext>`, in `output_dir` if given."""
    outpath = file
    if suffix is not None:
        base, ext = os.path.splitext(file)
        outpath = base + f"_{suffix}" + ext
    if output_dir is not None:
        outpath = os.path.join(output_dir, os.path.basename(outpath))
    return outpath


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    """Float audio -> int16 as df writes it: scaled by 2^15 and truncated toward zero (torch's
    float-to-int cast); beyond full scale it clips, where df's cast wraps around."""
    scaled = np.trunc(np.asarray(audio, dtype=np.float32) * np.float32(1 << 15))
    return np.clip(scaled, -(1 << 15), (1 << 15) - 1).astype(np.int16)


def save_audio(file: str, audio, sr: int, output_dir: Optional[str] = None, suffix: Optional[str] = None,
               log: bool = False, dtype=np.int16) -> str:
    """Write [C, T] (or [T]) audio (torch, MLX or numpy) as 16-bit PCM (df's default; float
    input is scaled by 2^15 and truncated, as df) or float32 (`dtype` a torch, MLX or numpy
    dtype); atomically. Returns the path written."""
    outpath = output_path(file, output_dir, suffix)
    if log:
        logger.info(f"Saving audio file '{outpath}'")
    audio = to_numpy(audio)
    dtype = numpy_dtype(dtype)
    if audio.ndim == 1:
        audio = audio[None]
    if np.dtype(dtype) == np.int16 and audio.dtype != np.int16:
        audio = to_pcm16(audio)
        subtype = "PCM_16"
    elif np.dtype(dtype) == np.float32:
        audio = audio.astype(np.float32) / (1 << 15) if audio.dtype == np.int16 else audio.astype(np.float32)
        subtype = "FLOAT"
    else:
        subtype = "PCM_16"
    from df_mlx.atomic import atomic_file

    try:
        with atomic_file(outpath, suffix=os.path.splitext(outpath)[1] or ".wav") as tmp:
            sf.write(tmp, audio.T, sr, subtype=subtype)
    except OSError as e:
        raise AudioError(f"cannot write {outpath}: {e.strerror}") from None
    return outpath


def get_resample_params(method: str) -> Dict[str, Any]:
    params = {
        "sinc_fast": {"resampling_method": "sinc_interpolation", "lowpass_filter_width": 16},
        "sinc_best": {"resampling_method": "sinc_interpolation", "lowpass_filter_width": 64},
        "kaiser_fast": {
            "resampling_method": "kaiser_window",
            "lowpass_filter_width": 16,
            "rolloff": 0.85,
            "beta": 8.555504641634386,
        },
        "kaiser_best": {
            "resampling_method": "kaiser_window",
            "lowpass_filter_width": 16,
            "rolloff": 0.9475937167399596,
            "beta": 14.769656459379492,
        },
    }
    if method not in params:
        raise ValueError(f"method must be one of {list(params.keys())}")
    return params[method]


def _sinc_kernel(orig: int, new: int, lowpass_filter_width: int, rolloff: float, resampling_method: str,
                 beta: Optional[float]) -> Tuple[np.ndarray, int]:
    """torchaudio's polyphase kernel [new, 2*width + orig] (computed in float64, used in float32)."""
    base = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / base)
    idx = np.arange(-width, width + orig, dtype=np.float64)[None] / orig
    t = (np.arange(0, -new, -1, dtype=np.float32)[:, None] / np.float32(new)).astype(np.float64) + idx
    t = np.clip(t * base, -lowpass_filter_width, lowpass_filter_width)
    if resampling_method == "sinc_interpolation":
        window = np.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    else:
        beta = 14.769656459379492 if beta is None else beta
        window = np.i0(beta * np.sqrt(1 - (t / lowpass_filter_width) ** 2)) / np.i0(beta)
    t = t * math.pi
    with np.errstate(invalid="ignore", divide="ignore"):
        kernels = np.where(t == 0, 1.0, np.sin(t) / t)
    return (kernels * window * (base / orig)).astype(np.float32), width


# The polyphase kernel has new/gcd rows of 2*width + orig/gcd taps: tiny for the usual rates
# (44.1 -> 48 kHz: 160 x 181), but rates with no common factor (a header claiming 44101 Hz)
# would need GBs (and its float64 construction several times that), so such ratios are refused
# before anything is allocated; the usual rates need at most 0.5 MB (11025 -> 48000 Hz).
MAX_KERNEL_BYTES = 16 << 20


class Resampler:
    """`resample` over a stream of [C, n] blocks: the same polyphase filter, carrying the input
    samples the next output frames still need. `flush()` ends the stream, cutting the total
    to ceil(T * new_sr / orig_sr) samples as `resample` does."""

    def __init__(self, orig_sr: int, new_sr: int, method="sinc_fast"):
        if orig_sr <= 0 or new_sr <= 0:
            raise ValueError(f"sample rates must be positive, got {orig_sr} -> {new_sr}")
        p = get_resample_params(method)
        gcd = math.gcd(int(orig_sr), int(new_sr))
        self.orig, self.new = int(orig_sr) // gcd, int(new_sr) // gcd
        taps = 2 * math.ceil(p["lowpass_filter_width"] * self.orig / (min(self.orig, self.new) * p.get("rolloff", 0.99)))
        if self.new * (taps + self.orig) * 4 > MAX_KERNEL_BYTES and self.orig != self.new:
            raise AudioError(f"cannot resample {orig_sr} Hz to {new_sr} Hz: the rates share too small a factor "
                             f"({self.orig}:{self.new}); convert the file to a common rate first")
        self.kernel, self.width = _sinc_kernel(self.orig, self.new, p["lowpass_filter_width"],
                                               p.get("rolloff", 0.99), p["resampling_method"], p.get("beta"))
        self.identity = self.orig == self.new
        self.buffer = None
        self.lead_shape = ()
        self.seen = self.emitted = 0

    def process(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        self.lead_shape = x.shape[:-1]
        if self.identity:
            return x
        if self.buffer is None:
            self.buffer = np.zeros(x.shape[:-1] + (self.width,), np.float32)
        self.seen += x.shape[-1]
        self.buffer = np.concatenate([self.buffer, x], axis=-1)
        return self._frames()

    def flush(self) -> np.ndarray:
        if self.identity or self.buffer is None:
            return np.zeros(self.lead_shape + (0,), np.float32)
        self.buffer = np.pad(self.buffer, [(0, 0)] * (self.buffer.ndim - 1) + [(0, self.width + self.orig)])
        out = self._frames()
        target = math.ceil(self.new * self.seen / self.orig)
        keep = max(0, target - (self.emitted - out.shape[-1]))
        return out[..., :keep]

    def _frames(self) -> np.ndarray:
        k = self.kernel.shape[1]
        n = (self.buffer.shape[-1] - k) // self.orig + 1 if self.buffer.shape[-1] >= k else 0
        shape = self.buffer.shape[:-1]
        flat = self.buffer.reshape(-1, self.buffer.shape[-1])
        out = np.empty((flat.shape[0], n, self.new), dtype=np.float32)
        block = max(1, (1 << 22) // k)
        for c in range(flat.shape[0]):
            windows = np.lib.stride_tricks.sliding_window_view(flat[c, : (n - 1) * self.orig + k], k)[:: self.orig] \
                if n else np.zeros((0, k), np.float32)
            for s in range(0, n, block):
                out[c, s : s + block] = windows[s : s + block] @ self.kernel.T
        self.buffer = self.buffer[..., n * self.orig :]
        self.emitted += n * self.new
        return out.reshape(*shape, -1)


def resample(audio, orig_sr: int, new_sr: int, method="sinc_fast"):
    """Band-limited resampling of [..., T] audio as `df.io.resample` (torchaudio's sinc
    resampler with df's presets); output length ceil(T * new_sr / orig_sr), of the input's
    kind (torch, MLX or numpy: df_mlx.interop)."""
    kind, audio = kind_of(audio), to_numpy(audio).astype(np.float32)
    r = Resampler(orig_sr, new_sr, method)
    if r.identity:
        return like(audio, kind)
    return like(np.concatenate([r.process(audio), r.flush()], axis=-1), kind)


def get_test_sample(sr: int = 48000) -> mx.array:
    """df's test sample (assets/clean_freesound_33711.wav) at `sr`: from the git checkout
    df-mlx runs in, else from df's cache folder, where df downloads it; df-mlx does not
    download (download_file says where to put it)."""
    root = get_git_root()
    path = os.path.join(root, TEST_SAMPLE) if root is not None else None
    if path is None or not os.path.isfile(path):
        path = download_file(TEST_SAMPLE_URL, get_cache_dir())
    sample, _ = load_audio(path, sr=sr)
    return sample
