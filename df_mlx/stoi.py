"""STOI as `df.stoi` computes it, in MLX (differentiable w.r.t. the signals, for losses).

Which frames count as silent is a data-dependent decision taken on the values (as in df);
everything after it is MLX arithmetic. df notes that pystoi should be used for reported
results; df-mlx's tests compare both.
"""

from typing import List, Tuple

import mlx.core as mx
import numpy as np
from loguru import logger

from df_mlx.io import resample

EPS = np.finfo("float").eps


def as_windowed(x: mx.array, window_length: int, step: int = 1) -> mx.array:
    """Windows over the first axis: [N, ...] -> [(N - window_length + step) // step, window_length, ...]."""
    n = (x.shape[0] - window_length + step) // step
    idx = mx.arange(n)[:, None] * step + mx.arange(window_length)[None]
    return x[idx]


def _hann_symmetric_inner(n: int) -> np.ndarray:
    """torch.hann_window(n + 2, periodic=False)[1:-1]."""
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n + 2) / (n + 1)))[1:-1].astype(np.float32)


def _overlap_add(frames: mx.array, hop: int) -> mx.array:
    """[N_w, L] frames -> the signal they tile with hop `hop` (conv_transpose1d with an identity)."""
    n_w, length = frames.shape
    idx = (mx.arange(n_w)[:, None] * hop + mx.arange(length)[None]).reshape(-1)
    return mx.zeros(((n_w - 1) * hop + length,), dtype=frames.dtype).at[idx].add(frames.reshape(-1))


def remove_silent_frames(x: mx.array, y: mx.array, dyn_range: int, framelen: int, hop: int,
                         eps: float = EPS) -> Tuple[List[mx.array], List[mx.array]]:
    """Drop the frames of x (and the same of y) more than `dyn_range` dB below x's loudest
    frame, then overlap-add the rest back; one signal per batch item (their lengths differ)."""
    pad = framelen - x.shape[1] % framelen
    pad_front, mod = divmod(pad, 2)
    pad_end = pad_front + mod
    x = mx.pad(x, [(0, 0), (pad_front, pad_end)]).T
    y = mx.pad(y, [(0, 0), (pad_front, pad_end)]).T
    w = mx.array(_hann_symmetric_inner(framelen))[:, None]
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
    """1/3-octave band matrix [num_bands, nfft/2 + 1] and the bands' centre frequencies."""
    f = np.linspace(0, fs, nfft + 1)[: int(nfft / 2) + 1]
    k = np.arange(num_bands).astype(float)
    cf = np.power(2.0 ** (1.0 / 3), k) * min_freq
    freq_low = min_freq * np.power(2.0, (2 * k - 1) / 6)
    freq_high = min_freq * np.power(2.0, (2 * k + 1) / 6)
    obm = np.zeros((num_bands, len(f)))
    for i in range(len(cf)):
        lo = int(np.argmin(np.square(f - freq_low[i])))
        hi = int(np.argmin(np.square(f - freq_high[i])))
        obm[i, lo:hi] = 1
    return obm, cf


def _stft(x: mx.array, win_size: int, fft_size: int, hop_size: int, normalized=True, window=None) -> mx.array:
    """torch.stft(center=False) of a zero-padded 1-D signal: [F, frames, 2] real view."""
    window = mx.array(_hann_symmetric_inner(win_size)) if window is None else window
    missing = fft_size - win_size
    x = mx.pad(x, [(missing // 2, missing // 2)])
    frames = (x.shape[0] - fft_size) // hop_size + 1
    idx = mx.arange(frames)[:, None] * hop_size + mx.arange(fft_size)[None]
    win = mx.pad(window, [(missing // 2, missing - missing // 2)])  # torch centres the window
    spec = mx.fft.rfft(x[idx] * win, axis=-1).T
    out = mx.stack([mx.real(spec), mx.imag(spec)], axis=-1)
    return out / mx.sqrt(mx.square(mx.sum(window))) if normalized else out


def stoi(x, y, fs_source) -> mx.array:
    """STOI per signal of target x and degraded y [batch, samples] at `fs_source` (resampled
    to 10 kHz). A signal with too few non-silent frames gets NaN (df leaves it undefined)."""
    x, y = mx.array(x), mx.array(y)
    if x.shape != y.shape:
        raise ValueError(f"Inputs must have the same shape, got {x.shape} and {y.shape}")
    if x.ndim != 2:
        raise ValueError(f"Expected input shape of [batch_size, samples], but got {x.shape}")
    fs, dyn_range, n_frame, n_fft, n_bands, min_freq, n_seg, beta = 10_000, 40, 256, 512, 15, 150, 30, -15.0
    obm = mx.array(thirdoct(fs, n_fft, n_bands, min_freq)[0].astype(np.float32))
    if fs_source != fs:
        x, y = mx.array(resample(np.array(x), fs_source, fs)), mx.array(resample(np.array(y), fs_source, fs))
    x_, y_ = remove_silent_frames(x, y, dyn_range, n_frame, n_frame // 2)
    out = []
    for xi, yi in zip(x_, y_):
        if xi.size < n_fft:
            logger.warning("Could not calculate STOI (not enough frames left). Skipping.")
            out.append(mx.array(float("nan")))
            continue
        xs = mx.sqrt(obm @ mx.sum(mx.square(_stft(xi, n_frame, n_fft, n_frame // 2)), axis=-1))  # [bands, L]
        ys = mx.sqrt(obm @ mx.sum(mx.square(_stft(yi, n_frame, n_fft, n_frame // 2)), axis=-1))
        if xs.shape[-1] > n_seg:
            idx = mx.arange(xs.shape[-1] - n_seg + 1)[:, None] + mx.arange(n_seg)[None]
            xs, ys = xs[:, idx].transpose(1, 2, 0), ys[:, idx].transpose(1, 2, 0)  # [L', N, bands]
        else:
            xs, ys = xs.T[None], ys.T[None]
        norm = lambda a: mx.sqrt(mx.sum(mx.square(a), axis=1, keepdims=True))  # noqa: E731
        ys = ys * (norm(xs) / (norm(ys) + EPS))
        ys = mx.minimum(ys, xs * (1 + 10 ** (-beta / 20)))
        ys = ys - ys.mean(axis=1, keepdims=True)
        xs = xs - xs.mean(axis=1, keepdims=True)
        xs, ys = xs / (norm(xs) + EPS), ys / (norm(ys) + EPS)
        out.append(mx.sum(xs * ys) / (n_bands * xs.shape[0]))
    return mx.stack(out)
