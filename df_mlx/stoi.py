"""STOI as `df.stoi` computes it, in MLX (differentiable w.r.t. both signals, for losses).

Which frames count as silent is a data-dependent decision taken on the values (as in df);
everything else, the resampling to 10 kHz included, is MLX arithmetic, so gradients flow as
they do through df's torch code (df resamples with torchaudio, which is differentiable too).
df notes that pystoi should be used for reported results; df-mlx's tests compare both.

Bad input (documented, tested in parity/test_stoi.py): shapes that differ or are not
[batch, samples] and sampling rates that are not positive integers raise ValueError (df
asserts); NaN/inf raise ValueError (df would return garbage). A signal left with fewer than
512 samples after silence removal gets NaN and a warning (df warns and leaves that entry of
`torch.empty` uninitialised). An all-silent target keeps no information: the score is 0,
as df's arithmetic gives.
"""

import math
from typing import List, Tuple

import mlx.core as mx
import numpy as np
from loguru import logger

from df_mlx.io import Resampler
from df_mlx.io import resample  # noqa: F401  (re-exported, as df.stoi)

EPS = np.finfo("float").eps

# STOI's constants (df.stoi.stoi's locals): analysis rate, silence range [dB], frame, FFT,
# 1/3-octave bands from 150 Hz, segment length [frames], clipping bound [dB].
_FS, _DYN_RANGE, _N_FRAME, _N_FFT, _N_BANDS, _MIN_FREQ, _N_SEG, _BETA = 10_000, 40, 256, 512, 15, 150, 30, -15.0


def as_windowed(x: mx.array, window_length: int, step: int = 1) -> mx.array:
    """Windows over the first axis: [N, ...] -> [(N - window_length + step) // step, window_length, ...]
    (df takes a strided view; MLX gathers)."""
    n = (x.shape[0] - window_length + step) // step
    if n < 0:
        raise ValueError(f"as_windowed: window_length {window_length} > {x.shape[0]} samples")
    idx = mx.arange(n)[:, None] * step + mx.arange(window_length)[None]
    return x[idx]


def _hann_inner(n: int) -> np.ndarray:
    """torch.hann_window(n + 2, periodic=False)[1:-1]: a Hann window without its zero ends."""
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n + 2) / (n + 1)))[1:-1].astype(np.float32)


def _overlap_add(frames: mx.array, hop: int) -> mx.array:
    """[N_w, L] frames -> the signal they tile with hop `hop` (df: conv_transpose1d with an identity)."""
    n_w, length = frames.shape
    idx = (mx.arange(n_w)[:, None] * hop + mx.arange(length)[None]).reshape(-1)
    return mx.zeros(((n_w - 1) * hop + length,), dtype=frames.dtype).at[idx].add(frames.reshape(-1))


def remove_silent_frames(x: mx.array, y: mx.array, dyn_range: int, framelen: int, hop: int,
                         eps: float = EPS) -> Tuple[List[mx.array], List[mx.array]]:
    """Drop the frames of x [B, T] (and the same of y) more than `dyn_range` dB below x's
    loudest frame, then overlap-add the rest back; one signal per batch item (lengths differ)."""
    pad = framelen - x.shape[1] % framelen
    pad_front, mod = divmod(pad, 2)
    pad_end = pad_front + mod
    x = mx.pad(x, [(0, 0), (pad_front, pad_end)]).T  # [N, B]
    y = mx.pad(y, [(0, 0), (pad_front, pad_end)]).T
    w = mx.array(_hann_inner(framelen))[:, None]
    x_w = as_windowed(x, framelen, hop) * w  # [N_w, L, B]
    y_w = as_windowed(y, framelen, hop) * w
    x_energies = 20 * mx.log10(mx.sqrt(mx.sum(mx.square(x_w), axis=1)) / np.sqrt(framelen) + eps)  # [N_w, B]
    keep = np.array((mx.max(x_energies, axis=0) - dyn_range - x_energies) < 0)  # [N_w, B]
    x_out, y_out = [], []
    for i in range(x.shape[1]):
        idx = mx.array(np.nonzero(keep[:, i])[0])
        norm = _overlap_add(mx.broadcast_to(w[:, 0], (idx.shape[0], framelen)), hop)
        xs = _overlap_add(x_w[idx, :, i], hop) / norm
        ys = _overlap_add(y_w[idx, :, i], hop) / norm
        start = pad_front if keep[0, i] else 0
        stop = xs.shape[0] - pad_end if keep[-1, i] else xs.shape[0]
        x_out.append(xs[start:stop])
        y_out.append(ys[start:stop])
    return x_out, y_out


def thirdoct(fs, nfft, num_bands, min_freq):
    """1/3-octave band matrix [num_bands, nfft/2 + 1] and the bands' centre frequencies (numpy)."""
    f = np.linspace(0, fs, nfft + 1)[: int(nfft / 2) + 1]
    k = np.arange(num_bands).astype(float)
    cf = np.power(2.0 ** (1.0 / 3), k) * min_freq
    freq_low = min_freq * np.power(2.0, (2 * k - 1) / 6)
    freq_high = min_freq * np.power(2.0, (2 * k + 1) / 6)
    obm = np.zeros((num_bands, len(f)))
    for i in range(num_bands):
        lo = int(np.argmin(np.square(f - freq_low[i])))
        hi = int(np.argmin(np.square(f - freq_high[i])))
        obm[i, lo:hi] = 1
    return obm, cf


def _stft(x: mx.array, win_size: int, fft_size: int, hop_size: int, normalized=True, window=None) -> mx.array:
    """torch.stft(center=False) of [..., T] zero-padded by (fft_size - win_size) / 2 per side:
    [..., F, frames, 2] (real and imaginary parts, as torch's return_complex=False)."""
    window = mx.array(_hann_inner(win_size)) if window is None else mx.array(window)
    missing = fft_size - win_size
    x = mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(missing // 2, missing // 2)])
    frames = (x.shape[-1] - fft_size) // hop_size + 1
    idx = mx.arange(frames)[:, None] * hop_size + mx.arange(fft_size)[None]
    win = mx.pad(window, [(missing // 2, missing - missing // 2)])  # torch centres the window
    spec = mx.swapaxes(mx.fft.rfft(mx.take(x, idx, axis=-1) * win, axis=-1), -1, -2)
    out = mx.stack([mx.real(spec), mx.imag(spec)], axis=-1)
    return out / mx.sqrt(mx.square(mx.sum(window))) if normalized else out


def _resample(x: mx.array, orig_sr: int, new_sr: int) -> mx.array:
    """df.io.resample of [B, T] (torchaudio's sinc_fast polyphase filter, df_mlx.io's port of its
    kernel) as an MLX strided convolution, so gradients pass through it as in df."""
    r = Resampler(orig_sr, new_sr)
    if r.identity:
        return x
    length = x.shape[-1]
    xp = mx.pad(x, [(0, 0), (r.width, r.width + r.orig)])[..., None]  # [B, T', 1]
    out = mx.conv1d(xp, mx.array(r.kernel)[..., None], stride=r.orig)  # [B, frames, new]
    return out.reshape(x.shape[0], -1)[:, : math.ceil(r.new * length / r.orig)]


def _as_f32(a) -> mx.array:
    return a.astype(mx.float32) if isinstance(a, mx.array) else mx.array(np.asarray(a, dtype=np.float32))


def _check_rate(fs) -> int:
    if isinstance(fs, bool) or not float(fs).is_integer() or fs <= 0:
        raise ValueError(f"sampling rate must be a positive integer [Hz], got {fs!r}")
    return int(fs)


def _norm(a: mx.array) -> mx.array:
    """L2 norm over a segment's frames (axis 1), kept for broadcasting."""
    return mx.sqrt(mx.sum(mx.square(a), axis=1, keepdims=True))


def _band_envelopes(x: mx.array, obm: mx.array) -> mx.array:
    """1/3-octave band magnitudes [N_bands, frames] of a 1-D signal at 10 kHz."""
    power = mx.sum(mx.square(_stft(x, win_size=_N_FRAME, fft_size=_N_FFT, hop_size=_N_FRAME // 2)), axis=-1)
    return mx.sqrt(obm @ power)


def _segments(e: mx.array) -> mx.array:
    """[N_bands, L] -> [L', N, N_bands] sliding segments of N frames (one when L <= N, as df)."""
    if e.shape[-1] <= _N_SEG:
        return e.T[None]
    idx = mx.arange(e.shape[-1] - _N_SEG + 1)[:, None] + mx.arange(_N_SEG)[None]
    return e[:, idx].transpose(1, 2, 0)


def stoi(x, y, fs_source) -> mx.array:
    """STOI per signal of target x and degraded y [batch, samples] at `fs_source` Hz (resampled
    to 10 kHz): float32 [batch]. NaN (with a warning) for a signal with too few non-silent frames."""
    x, y = _as_f32(x), _as_f32(y)
    if x.shape != y.shape:
        raise ValueError(f"Inputs must have the same shape, got {x.shape} and {y.shape}")
    if x.ndim != 2:
        raise ValueError(f"Expected input shape of [batch_size, samples], but got {x.shape}")
    fs_source = _check_rate(fs_source)
    if not (np.isfinite(np.array(x)).all() and np.isfinite(np.array(y)).all()):
        raise ValueError("stoi: inputs contain NaN or inf")
    obm = mx.array(thirdoct(_FS, _N_FFT, _N_BANDS, _MIN_FREQ)[0].astype(np.float32))
    x, y = _resample(x, fs_source, _FS), _resample(y, fs_source, _FS)
    x_, y_ = remove_silent_frames(x, y, _DYN_RANGE, _N_FRAME, _N_FRAME // 2)
    out = []
    for xi, yi in zip(x_, y_):
        if xi.size < _N_FFT:
            logger.warning("Could not calculate STOI (not enough frames left). Skipping.")
            out.append(mx.array(float("nan")))
            continue
        xs, ys = _segments(_band_envelopes(xi, obm)), _segments(_band_envelopes(yi, obm))
        ys = ys * (_norm(xs) / (_norm(ys) + EPS))  # normalise each segment's energy to x's
        ys = mx.minimum(ys, xs * (1 + 10 ** (-_BETA / 20)))  # clip at -Beta dB SDR
        ys = ys - ys.mean(axis=1, keepdims=True)
        xs = xs - xs.mean(axis=1, keepdims=True)
        xs, ys = xs / (_norm(xs) + EPS), ys / (_norm(ys) + EPS)
        corr = mx.sum(xs * ys, axis=1)  # [L', N_bands]; reduce in stages: a flat float32 sum over
        out.append(mx.sum(mx.sum(corr, axis=0)) / (_N_BANDS * xs.shape[0]))  # all drifts by ~1e-5
    return mx.stack(out)
