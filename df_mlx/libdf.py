"""What the Rust `libdf` (DeepFilterLib 0.5.6) gives `df`, in numpy.

STFT analysis/synthesis with libdf's Vorbis window, framing and `2*hop/N^2` scaling, its ERB
band widths, ERB energies and the exponential mean/unit normalisations. The recursions and
band sums run in float32 in libdf's own order of operations, so they agree with libdf to
float32 rounding; only the FFT itself differs (numpy's vs RustFFT's rounding).

Differences from libdf, all deliberate: inputs are never modified in place (libdf's
`synthesis` and `erb_norm` overwrite their argument), any real float dtype is accepted
(libdf rejects float64), and `erb_norm`/`unit_norm` can return their final state
(`return_state=True`) so that streaming callers can continue a signal chunk by chunk.
"""

import functools
from typing import Optional, Sequence, Tuple, Union

import numpy as np

MEAN_NORM_INIT = (-60.0, -90.0)
UNIT_NORM_INIT = (0.001, 0.0001)

_f32 = np.float32


def freq2erb(freq_hz):
    return _f32(9.265) * np.log1p(_f32(freq_hz) / _f32(24.7 * 9.265))


def erb2freq(n_erb):
    return _f32(24.7 * 9.265) * (np.exp(_f32(n_erb) / _f32(9.265)) - _f32(1.0))


def _round_half_away(x) -> int:
    """Rust's `f32::round` (half away from zero); numpy rounds half to even."""
    t = np.trunc(x)
    return int(t + np.sign(x)) if abs(x - t) >= 0.5 else int(t)


def erb_band_widths(sr: int, fft_size: int, nb_bands: int, min_nb_freqs: int) -> np.ndarray:
    """Frequency bins per ERB band (libdf's `erb_fb`): equal ERB spacing, at least
    `min_nb_freqs` bins per band with the excess carried into the next band."""
    freq_width = _f32(sr) / _f32(fft_size)
    erb_low = freq2erb(0.0)
    erb_high = freq2erb(sr // 2)
    step = (erb_high - erb_low) / _f32(nb_bands)
    widths = np.zeros(nb_bands, dtype=np.int64)
    prev_freq = 0
    freq_over = 0
    for i in range(1, nb_bands + 1):
        f = erb2freq(erb_low + _f32(i) * step)
        fb = _round_half_away(f / freq_width)
        nb_freqs = fb - prev_freq - freq_over
        if nb_freqs < min_nb_freqs:
            freq_over = min_nb_freqs - nb_freqs
            nb_freqs = min_nb_freqs
        else:
            freq_over = 0
        widths[i - 1] = nb_freqs
        prev_freq = fb
    widths[-1] += 1  # the Nyquist bin
    too_large = int(widths.sum()) - (fft_size // 2 + 1)
    if too_large > 0:
        widths[-1] -= too_large
    return widths.astype(np.uint64)


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """ndarray's `Array1::linspace` in float32: start + i * ((end - start) / (n - 1))."""
    if n == 1:
        return np.array([start], dtype=_f32)
    step = (_f32(end) - _f32(start)) / _f32(n - 1)
    return (_f32(start) + np.arange(n, dtype=_f32) * step).astype(_f32)


def vorbis_window(fft_size: int) -> np.ndarray:
    """libdf's window sin(pi/2 sin^2(pi (n + 0.5) / N)), computed in float64, stored float32."""
    n = np.arange(fft_size, dtype=np.float64)
    s = np.sin(0.5 * np.pi * (n + 0.5) / (fft_size // 2))
    return np.sin(0.5 * np.pi * s * s).astype(_f32)


def _as_f32_2d(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} expects a 2-D [C, T] array, got shape {x.shape}")
    if np.iscomplexobj(x):
        raise TypeError(f"{name} expects real samples, got {x.dtype}")
    return np.ascontiguousarray(x, dtype=_f32)


class DF:
    """STFT state of libdf: analysis/synthesis memories continue across calls with `reset=False`.

    As in libdf, one state serves all channels: `reset=True` (default) clears it before every
    channel, so multi-channel input is processed channel-independently.
    """

    def __init__(
        self,
        sr: int,
        fft_size: int,
        hop_size: int,
        nb_bands: Optional[int] = 32,
        min_nb_erb_freqs: Optional[int] = 1,
    ):
        nb_bands = 32 if nb_bands is None else int(nb_bands)
        min_nb_erb_freqs = 1 if min_nb_erb_freqs is None else int(min_nb_erb_freqs)
        if not (0 < 2 * hop_size <= fft_size):
            raise ValueError(f"Need 0 < 2*hop_size <= fft_size, got {hop_size=} {fft_size=}")
        self._sr = int(sr)
        self._fft_size = int(fft_size)
        self._hop_size = int(hop_size)
        self._freq_size = fft_size // 2 + 1
        self._erb = erb_band_widths(sr, fft_size, nb_bands, min_nb_erb_freqs)
        self._window = vorbis_window(fft_size)
        wsum = np.cumsum(self._window * self._window, dtype=_f32)[-1]
        self._wnorm = _f32(_f32(1.0) / wsum * _f32(hop_size) / _f32(fft_size))
        self.reset()

    def reset(self) -> None:
        """Zero the analysis and synthesis memories (the previous `fft_size - hop_size` samples)."""
        self._analysis_mem = np.zeros(self._fft_size - self._hop_size, dtype=_f32)
        self._synthesis_mem = np.zeros(self._fft_size - self._hop_size, dtype=_f32)

    def analysis(self, input, reset: Optional[bool] = True) -> np.ndarray:
        """[C, T] samples -> complex64 [C, T // hop, fft_size // 2 + 1]; a trailing partial hop
        is dropped. Frame t ends at sample (t + 1) * hop."""
        x = _as_f32_2d(input, "analysis")
        hop, n = self._hop_size, self._fft_size
        frames = x.shape[1] // hop
        out = np.empty((x.shape[0], frames, self._freq_size), dtype=np.complex64)
        for c in range(x.shape[0]):
            if reset is None or reset:
                self.reset()
            padded = np.concatenate([self._analysis_mem, x[c, : frames * hop]])
            if frames == 0:
                continue
            windows = np.lib.stride_tricks.sliding_window_view(padded, n)[::hop][:frames]
            spec = np.fft.rfft((windows * self._window).astype(np.float64), axis=-1)
            out[c] = (spec * float(self._wnorm)).astype(np.complex64)
            self._analysis_mem = padded[padded.shape[0] - (n - hop) :].copy()
        return out

    def synthesis(self, input, reset: Optional[bool] = True) -> np.ndarray:
        """complex [C, T, F] -> float32 [C, T * hop]: unnormalised inverse FFT, window,
        overlap-add. Analysis followed by synthesis delays the signal by fft_size - hop."""
        spec = np.asarray(input)
        if spec.ndim != 3 or spec.shape[-1] != self._freq_size:
            raise ValueError(
                f"synthesis expects complex [C, T, {self._freq_size}], got shape {spec.shape}"
            )
        hop, n = self._hop_size, self._fft_size
        frames = spec.shape[1]
        out = np.empty((spec.shape[0], frames * hop), dtype=_f32)
        for c in range(spec.shape[0]):
            if reset is None or reset:
                self.reset()
            time = np.fft.irfft(spec[c].astype(np.complex128), n=n, axis=-1) * n
            time = (time.astype(_f32) * self._window).astype(_f32)
            acc = np.zeros(frames * hop + n - hop, dtype=_f32)
            acc[: n - hop] += self._synthesis_mem
            for t in range(frames):
                acc[t * hop : t * hop + n] += time[t]
            out[c] = acc[: frames * hop]
            self._synthesis_mem = acc[frames * hop :].copy()
        return out

    def erb_widths(self) -> np.ndarray:
        return self._erb.copy()

    def fft_window(self) -> np.ndarray:
        return self._window.copy()

    def sr(self) -> int:
        return self._sr

    def fft_size(self) -> int:
        return self._fft_size

    def hop_size(self) -> int:
        return self._hop_size

    def nb_erb(self) -> int:
        return len(self._erb)


def _widths(erb_fb: Union[np.ndarray, Sequence[int]]) -> np.ndarray:
    w = np.asarray(erb_fb)
    if w.ndim != 1 or not np.issubdtype(w.dtype, np.integer) or (w < 1).any():
        raise TypeError("erb_fb must be a 1-D array of positive band widths (e.g. DF.erb_widths())")
    return w.astype(np.int64)


# Up to this many frames the band sums take one gather and a running sum (a streaming hop's
# frame: 0.033 ms, where a step per term took 0.26); past it a step per term (10 s: 2 against 11 ms).
GATHERED_BAND_SUM_FRAMES = 32


@functools.lru_cache(maxsize=8)
def _band_bins(widths: Tuple[int, ...]) -> Tuple[np.ndarray, np.ndarray]:
    """The bins of each ERB band as an [E, max width] index into the spectrum with one zero
    bin appended (index F pads the narrower bands), and each band's 1/width in float32."""
    w = np.array(widths)
    starts = np.concatenate([[0], np.cumsum(w)[:-1]])
    j = np.arange(w.max())
    bins = np.where(j < w[:, None], starts[:, None] + j, w.sum())
    return bins, (_f32(1.0) / w.astype(_f32)).astype(_f32)


@functools.lru_cache(maxsize=8)
def _band_terms(widths: Tuple[int, ...]) -> Tuple[Tuple[np.ndarray, np.ndarray], ...]:
    """For each k below the widest band's width: the bands at least k + 1 bins wide, and the
    k-th bin of each of them."""
    w = np.array(widths)
    starts = np.concatenate([[0], np.cumsum(w)[:-1]])
    return tuple((np.nonzero(w > k)[0], starts[w > k] + k) for k in range(int(w.max())))


def _band_means(power: np.ndarray, widths: Tuple[int, ...]) -> np.ndarray:
    """Each band's terms power * (1 / width) summed left to right in float32, as libdf does:
    [..., F] -> [..., E]."""
    bins, scale = _band_bins(widths)
    if power.size <= GATHERED_BAND_SUM_FRAMES * power.shape[-1]:
        # the terms zero-padded to the widest band, then a running sum (np.cumsum is sequential;
        # adding the zeros is exact)
        terms = np.concatenate([power, np.zeros(power.shape[:-1] + (1,), _f32)], axis=-1)[..., bins] * scale[:, None]
        return np.cumsum(terms, axis=-1, dtype=_f32)[..., -1]
    # bins first, so that each step gathers whole rows; step k adds every band's k-th term
    rows = np.moveaxis(power, -1, 0)
    scale = scale.reshape((-1,) + (1,) * (rows.ndim - 1))
    out = np.zeros((len(widths),) + rows.shape[1:], _f32)
    for bands, k_bins in _band_terms(widths):
        out[bands] += rows[k_bins] * scale[bands]
    return np.ascontiguousarray(np.moveaxis(out, 0, -1))


def erb(input, erb_fb, db: bool = True) -> np.ndarray:
    """Mean power per ERB band of a complex spectrum [..., F] -> float32 [..., E]
    (10*log10(x + 1e-10) with `db`)."""
    spec = np.asarray(input)
    if spec.ndim not in (2, 3, 4):
        raise ValueError(f"Dimension not supported for erb: {spec.ndim}")
    w = _widths(erb_fb)
    if int(w.sum()) != spec.shape[-1]:
        raise ValueError(f"ERB widths sum to {int(w.sum())} but the spectrum has {spec.shape[-1]} bins")
    spec = spec.astype(np.complex64, copy=False)
    power = (spec.real * spec.real + spec.imag * spec.imag).astype(_f32)
    out = _band_means(power, tuple(int(x) for x in w))
    if db:
        out = (np.log10(out + _f32(1e-10)) * _f32(10.0)).astype(_f32)
    return out


def erb_inv(input, erb_fb) -> np.ndarray:
    """Repeat each band value over the band's bins: [..., E] -> float32 [..., F]."""
    x = np.asarray(input, dtype=_f32)
    w = _widths(erb_fb)
    if x.shape[-1] != len(w):
        raise ValueError(
            f"Number of erb bands do not match with input: {x.shape[-1]}, {len(w)}"
        )
    return np.repeat(x, w, axis=-1)


def _initial_state(init: Tuple[float, float], channels: int, n: int, state) -> np.ndarray:
    if state is None:
        return np.tile(_linspace_f32(init[0], init[1], n), (channels, 1))
    state = np.array(state, dtype=_f32)  # a copy: the caller's state is never modified
    if state.shape != (channels, n):
        raise ValueError(f"state must have shape {(channels, n)}, got {state.shape}")
    return state


def erb_norm(erb, alpha: float, state=None, *, return_state: bool = False):
    """Exponential mean normalisation of ERB features [C, T, E]: s = x(1-a) + s a;
    out = (x - s) / 40, s starting at linspace(-60, -90, E)."""
    x = np.asarray(erb, dtype=_f32)
    if x.ndim != 3:
        raise TypeError(f"erb_norm expects a 3-D [C, T, E] array, got shape {x.shape}")
    a = _f32(alpha)
    one_minus_a = _f32(1.0) - a
    means, last = _ema(x, one_minus_a, a, _initial_state(MEAN_NORM_INIT, x.shape[0], x.shape[2], state))
    out = (x - means) / _f32(40.0)
    return (out, last) if return_state else out


def _ema(x: np.ndarray, one_minus_a, a, s: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The states s_t = x_t (1 - a) + s_{t-1} a of x [C, T, N] over t, in float32 as libdf
    computes them, and the last one (s itself for no frames); only the recursion runs frame by
    frame (in place), the rest whole."""
    states = np.empty(x.shape, dtype=_f32)
    scaled = (x * one_minus_a).astype(_f32)
    s = np.array(s, dtype=_f32)  # [C, N]
    for t in range(x.shape[1]):
        np.multiply(s, a, out=s)
        np.add(scaled[:, t], s, out=s)
        states[:, t] = s
    return states, s


def unit_norm(spec, alpha: float, state=None, *, return_state: bool = False):
    """Exponential unit normalisation of a complex spectrum [C, T, F]: s = |X|(1-a) + s a;
    out = X / sqrt(s), s starting at linspace(0.001, 0.0001, F)."""
    x = np.asarray(spec)
    if x.ndim != 3:
        raise TypeError(f"unit_norm expects a 3-D [C, T, F] array, got shape {x.shape}")
    x = x.astype(np.complex64, copy=False)
    re, im = x.real.astype(_f32), x.imag.astype(_f32)
    mag = np.hypot(re, im).astype(_f32)
    a = _f32(alpha)
    one_minus_a = _f32(1.0) - a
    states, last = _ema(mag, one_minus_a, a, _initial_state(UNIT_NORM_INIT, x.shape[0], x.shape[2], state))
    root = np.sqrt(states)
    out = np.empty_like(x)
    out.real = re / root
    out.imag = im / root
    return (out, last) if return_state else out


def unit_norm_init(num_freq_bins: int) -> np.ndarray:
    """Initial unit-norm state: float32 [1, F] linspace(0.001, 0.0001)."""
    return _linspace_f32(UNIT_NORM_INIT[0], UNIT_NORM_INIT[1], num_freq_bins)[None]
