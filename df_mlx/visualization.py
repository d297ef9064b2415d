"""Spectrogram plots, as df.visualization: `spec_figure` and `specshow` with df's arguments,
dB scaling, axes and colour limits, for MLX arrays (numpy arrays are accepted too).

The spectrogram maths runs in MLX (STFT of `from_audio`, 20*log10(|X| + 1e-12)); the plotting
is matplotlib's, called as df calls it.
"""

import matplotlib.pyplot as plt
import mlx.core as mx
import numpy as np
from matplotlib.collections import QuadMesh
from matplotlib.figure import Figure

from df_mlx.loss import Stft
from df_mlx.modules import _hann_window
from df_mlx.utils import as_complex


class SpectrogramShapeError(ValueError):
    """A spectrogram that is not [F, T] (complex or [F, T, 2]) after squeezing."""


def _as_array(x) -> mx.array:
    return x if isinstance(x, mx.array) else mx.array(np.asarray(x))


def _db(spec: mx.array) -> mx.array:
    """20 * log10(|X| + 1e-12) of a complex or [..., 2] spectrum."""
    return mx.log10(mx.abs(as_complex(spec)) + 1e-12) * 20


def _is_complex(x: mx.array) -> bool:
    return mx.issubdtype(x.dtype, mx.complexfloating)


def _stft_power_normalised(audio: mx.array, n_fft: int, hop: int) -> mx.array:
    """`torch.stft(audio, n_fft, hop, window=hann)` (centred, reflect-padded, not normalised)
    divided by sqrt(sum(window^2)), as df's `spec_figure(from_audio=True)`: complex [..., F, T]."""
    if audio.shape[-1] <= n_fft // 2:
        raise ValueError(f"audio of {audio.shape[-1]} samples is too short for n_fft={n_fft}")
    w = _hann_window(n_fft)
    return Stft(n_fft, hop, w, normalized=False)(audio.astype(mx.float32)) / mx.sqrt(mx.sum(w * w))


def spec_figure(
    spec,
    sr: int,
    figsize=(15, 5),
    colorbar=False,
    colorbar_format=None,
    from_audio=False,
    figure=None,
    return_im=False,
    labels=False,
    xlabels=False,
    ylabels=False,
    **kwargs,
) -> Figure | QuadMesh:
    """A figure (or, with `return_im`, the mesh) of a spectrogram in dB; `from_audio` takes a
    waveform and computes its STFT (`n_fft`=1024, `hop`=256 unless given)."""
    spec = _as_array(spec)
    if labels or xlabels:
        kwargs.setdefault("xlabel", "Time [s]")
    if labels or ylabels:
        kwargs.setdefault("ylabel", "Frequency [kHz]" if kwargs.get("kHz", False) else "Frequency [Hz]")
    if from_audio:
        n_fft = kwargs.setdefault("n_fft", 1024)
        hop = kwargs.setdefault("hop", 256)
        spec = _stft_power_normalised(spec, n_fft, hop)
    if _is_complex(spec) or spec.shape[-1] == 2:
        spec = _db(spec)
    spec_max = spec.max().item()
    if kwargs.get("vmax", None) is not None and kwargs["vmax"] <= 0 and spec_max > 0:
        kwargs["vmax"] = spec_max
    kwargs.setdefault("vmax", max(0.0, spec_max))

    if figure is None:
        figure = plt.figure(figsize=figsize)
        figure.set_layout_engine("tight")
    if spec.ndim > 2:
        spec = spec.squeeze(0)
    im = specshow(spec, sr, **kwargs)
    if colorbar:
        ckwargs = {}
        if "ax" in kwargs:
            if colorbar_format is None and (kwargs.get("vmin") is not None or kwargs.get("vmax") is not None):
                colorbar_format = "%+2.0f dB"
            ckwargs = {"ax": kwargs["ax"]}
        plt.colorbar(im, format=colorbar_format, **ckwargs)
    if return_im:
        return im
    return figure


def specshow(
    spec,
    sr,
    ax=None,
    title=None,
    xlabel=None,
    ylabel=None,
    n_fft=None,
    hop=None,
    t=None,
    f=None,
    vmin=-100,
    vmax=0,
    raw_in=False,
    xlim=None,
    ylim=None,
    kHz=False,
    ticks=False,
    cmap="inferno",
) -> QuadMesh:
    """Plot a spectrogram [F, T] (in dB, or complex / [F, T, 2] with `raw_in`) on `ax` (or the
    current axes): time in seconds from `hop`/`sr`, frequency in Hz (kHz) from `n_fft`."""
    spec = _as_array(spec)
    if raw_in or spec.shape[-1] == 2:
        spec = _db(spec)
    if spec.ndim > 2:
        spec = spec.squeeze()
    if spec.ndim != 2:
        raise SpectrogramShapeError(f"expected a spectrogram [F, T], got shape {tuple(spec.shape)}")
    spec = np.array(spec)

    if ax is not None:
        set_title, set_xlabel, set_ylabel = ax.set_title, ax.set_xlabel, ax.set_ylabel
        set_xlim, set_ylim = ax.set_xlim, ax.set_ylim
    else:
        ax = plt
        set_title, set_xlabel, set_ylabel = plt.title, plt.xlabel, plt.ylabel
        set_xlim, set_ylim = plt.xlim, plt.ylim
    n_fft = n_fft or (spec.shape[0] - 1) * 2
    hop = hop or n_fft // 4
    if t is None:
        t = np.arange(0, spec.shape[-1]) * hop / sr
    if f is None:
        f = np.arange(0, spec.shape[0]) * sr // 2 / (n_fft // 2)
        if kHz:
            f /= 1000
    im = ax.pcolormesh(t, f, spec, rasterized=True, shading="auto", vmin=vmin, vmax=vmax, cmap=cmap)
    if ticks is False:
        ax.axis("off")
    if title is not None:
        set_title(title)
    if xlabel is not None:
        set_xlabel(xlabel)
    if ylabel is not None:
        set_ylabel(ylabel)
    if xlim is not None:
        set_xlim(xlim)
    if ylim is not None:
        set_ylim(ylim)
    return im
