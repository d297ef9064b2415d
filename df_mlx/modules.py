"""Building blocks of the DeepFilterNet models, mirroring `df.modules`.

Convolution blocks compute channels-last: they take and return [B, T, F, C] (df: [B, C, T, F])
and declare `trace_layout = "NHWC"`, so the parity tracer compares them in torch's layout.
Everything else keeps df's shapes.
"""

import math
from collections import OrderedDict
from typing import Callable, Iterable, List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from df_mlx import _native
from df_mlx.layers import GRU, BatchNorm2d, ConstantPad2d, Conv2d, ConvTranspose2d, folds_layers, matmul, pad_axis
from df_mlx.libdf import unit_norm_init
from df_mlx.model import ModelParams
from df_mlx.utils import as_complex, as_real, get_device, get_norm_alpha  # noqa: F401  (re-exported, as df.modules)


def erb_fb(widths: np.ndarray, sr: int, normalized: bool = True, inverse: bool = False) -> mx.array:
    """ERB filter matrix from band widths: [F, E] averaging bins into bands (1/width entries
    when `normalized`), or with `inverse` [E, F] repeating bands over bins (ones)."""
    widths = np.asarray(widths).astype(np.int64)
    n_freqs = int(widths.sum())
    starts = np.concatenate([[0], np.cumsum(widths)[:-1]])
    fb = np.zeros((n_freqs, len(widths)), dtype=np.float32)
    for i, (b, w) in enumerate(zip(starts, widths)):
        fb[b : b + w, i] = 1
    if inverse:
        fb = fb.T
        if not normalized:
            fb = fb / fb.sum(axis=1, keepdims=True)
    elif normalized:
        fb = fb / fb.sum(axis=0)
    # Row-major like the copy a checkpoint restores: BLAS results depend on operand layout.
    return mx.array(np.ascontiguousarray(fb, dtype=np.float32))


def erb_filterbanks(p, df_state=None):
    """(erb_fb, inverse erb_fb) for the model parameters `p`, from `df_state` or, as df's
    `init_model`s do, a DF state built from p (libdf's default min_nb_erb_freqs)."""
    from df_mlx.libdf import DF

    if df_state is None:
        df_state = DF(sr=p.sr, fft_size=p.fft_size, hop_size=p.hop_size, nb_bands=p.nb_erb)
    widths = df_state.erb_widths()
    return erb_fb(widths, p.sr, inverse=False), erb_fb(widths, p.sr, inverse=True)


class Sequential(nn.Module):
    """`torch.nn.Sequential` with torch's child names ("0", "1", ... or the names of an
    OrderedDict): the flattened parameter names then equal the torch `state_dict` keys (MLX's
    own Sequential says `layers.0`)."""

    def __init__(self, *modules):
        super().__init__()
        named = modules[0].items() if len(modules) == 1 and isinstance(modules[0], OrderedDict) else (
            (str(i), m) for i, m in enumerate(modules))
        self._order = []
        for name, module in named:
            self[name] = module
            self._order.append(name)

    def __len__(self) -> int:
        return len(self._order)

    def __getitem__(self, key):
        return super().__getitem__(self._order[key] if isinstance(key, int) else key)

    def __call__(self, x):
        return self.run_from(0, x)

    def run_from(self, start: int, x):
        """Children start.. in order; outside `layer_by_layer()` an eval-mode BatchNorm2d runs
        with the ReLU after it in one pass over x."""
        names = self._order[start:]
        i = 0
        while i < len(names):
            layer = self[names[i]]
            if (i + 1 < len(names) and isinstance(layer, BatchNorm2d) and not layer.training
                    and isinstance(self[names[i + 1]], nn.ReLU) and folds_layers()):
                x, i = layer(x, relu=True), i + 2
            else:
                x, i = layer(x), i + 1
        return x


class Identity(nn.Module):
    """`torch.nn.Identity`; keeps a parameter-free slot where torch has one."""

    def __call__(self, x, *args):
        return x


def _norm_act(layers: list, out_ch: int, norm_layer, activation_layer) -> list:
    if norm_layer is not None:
        layers.append(norm_layer(out_ch))
    if activation_layer is not None:
        layers.append(activation_layer())
    return layers


def _time_pad(kernel_t: int) -> list:
    """Causal padding of kernel_t - 1 past frames (lookahead is applied to the features)."""
    return [ConstantPad2d((0, 0, kernel_t - 1, 0), 0.0)] if kernel_t > 1 else []


class Conv2dNormAct(Sequential):
    """Causal Conv2d (+ pointwise conv when separable) + norm + activation, input [B, T, F, C]."""

    trace_layout = "NHWC"

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: Union[int, Iterable[int]],
        fstride: int = 1,
        dilation: int = 1,
        fpad: bool = True,
        bias: bool = True,
        separable: bool = False,
        norm_layer: Optional[Callable[..., nn.Module]] = BatchNorm2d,
        activation_layer: Optional[Callable[..., nn.Module]] = nn.ReLU,
    ):
        kernel_size = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        fpad_ = kernel_size[1] // 2 + dilation - 1 if fpad else 0
        groups = math.gcd(in_ch, out_ch) if separable else 1
        separable = groups > 1 and max(kernel_size) > 1
        layers = _time_pad(kernel_size[0])
        layers.append(Conv2d(in_ch, out_ch, kernel_size, padding=(0, fpad_), stride=(1, fstride),
                             dilation=(1, dilation), groups=groups, bias=bias))
        if separable:
            layers.append(Conv2d(out_ch, out_ch, kernel_size=1, bias=False))
        super().__init__(*_norm_act(layers, out_ch, norm_layer, activation_layer))

    def __call__(self, x):
        """The causal time pad is folded into the conv where it can be (no padded copy of x)."""
        first = self[0]
        time_pad = first.foldable_time_pad() if isinstance(first, ConstantPad2d) else None
        if time_pad is None:
            return super().__call__(x)
        return self.run_from(2, self[1](x, time_pad=time_pad))


class ConvTranspose2dNormAct(Sequential):
    """Causal ConvTranspose2d (frequency upsampling by `fstride`) + norm + activation,
    input [B, T, F, C]."""

    trace_layout = "NHWC"

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: Union[int, Tuple[int, int]],
        fstride: int = 1,
        dilation: int = 1,
        fpad: bool = True,
        bias: bool = True,
        separable: bool = False,
        norm_layer: Optional[Callable[..., nn.Module]] = BatchNorm2d,
        activation_layer: Optional[Callable[..., nn.Module]] = nn.ReLU,
    ):
        kernel_size = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        fpad_ = kernel_size[1] // 2 if fpad else 0
        groups = math.gcd(in_ch, out_ch) if separable else 1
        separable = groups > 1
        layers = _time_pad(kernel_size[0])
        layers.append(ConvTranspose2d(
            in_ch, out_ch, kernel_size, padding=(kernel_size[0] - 1, fpad_ + dilation - 1),
            output_padding=(0, fpad_), stride=(1, fstride), dilation=(1, dilation), groups=groups,
            bias=bias))
        if separable:
            layers.append(Conv2d(out_ch, out_ch, kernel_size=1, bias=False))
        super().__init__(*_norm_act(layers, out_ch, norm_layer, activation_layer))


class FreqUpsample(nn.Module):
    """Nearest-neighbour upsampling of the frequency axis by an integer factor, [B, T, F, C]."""

    trace_layout = "NHWC"

    def __init__(self, factor: int, mode="nearest"):
        super().__init__()
        if mode != "nearest" or float(factor) != int(factor):
            raise ValueError(f"FreqUpsample supports integer nearest upsampling, got {factor=} {mode=}")
        self.f = float(factor)
        self.mode = mode

    def __call__(self, x: mx.array) -> mx.array:
        return mx.repeat(x, int(self.f), axis=2)


def convkxf(
    in_ch: int,
    out_ch: Optional[int] = None,
    k: int = 1,
    f: int = 3,
    fstride: int = 2,
    lookahead: int = 0,
    batch_norm: bool = False,
    act: nn.Module = nn.ReLU(),
    mode="normal",  # must be "normal", "transposed" or "upsample"
    depthwise: bool = True,
    complex_in: bool = False,
) -> Sequential:
    """The DFNet1 conv block, [B, T, F, C]; children named as df's OrderedDict."""
    if f % 2 != 1:
        raise ValueError(f"convkxf needs an odd frequency kernel, got f={f}")
    if mode not in ("normal", "transposed", "upsample"):
        raise ValueError(f"convkxf mode must be normal, transposed or upsample, got {mode!r}")
    bias = batch_norm is False
    stride = 1 if f == 1 else (1, fstride)
    if out_ch is None:
        out_ch = in_ch * 2 if mode == "normal" else in_ch // 2
    fpad = (f - 1) // 2
    modules = []
    pad = (0, 0, k - 1 - lookahead, lookahead)
    if any(p > 0 for p in pad):
        modules.append(("pad", ConstantPad2d(pad, 0.0)))
    groups = min(in_ch, out_ch) if depthwise else 1
    if in_ch % groups != 0 or out_ch % groups != 0:
        groups = 1
    if complex_in and groups % 2 == 0:
        groups //= 2
    conv = dict(in_channels=in_ch, out_channels=out_ch, kernel_size=(k, f), stride=stride,
                groups=groups, bias=bias)
    if mode == "normal":
        modules.append(("sconv", Conv2d(padding=(0, fpad), **conv)))
    elif mode == "transposed":
        modules.append(("sconvt", ConvTranspose2d(padding=(k - 1, fpad), output_padding=(0, fpad), **conv)))
    else:
        modules.append(("upsample", FreqUpsample(fstride)))
        conv["stride"] = 1
        modules.append(("sconv", Conv2d(padding=(0, fpad), **conv)))
    if groups > 1:
        modules.append(("1x1conv", Conv2d(out_ch, out_ch, 1, bias=False)))
    if batch_norm:
        modules.append(("norm", BatchNorm2d(out_ch)))
    modules.append(("act", act))
    seq = Sequential(OrderedDict(modules))
    seq.trace_layout = "NHWC"
    return seq


class Mask(nn.Module):
    """Applies an ERB-band gain mask (optionally post-filtered, lower-bounded by an attenuation
    limit) to a spectrum [B, 1, T, F, 2] (or complex [B, 1, T, F])."""

    def __init__(self, erb_inv_fb: mx.array, post_filter: bool = False, eps: float = 1e-12):
        super().__init__()
        self.erb_inv_fb = erb_inv_fb
        self.freeze(keys=["erb_inv_fb"], recurse=False)
        self.post_filter = post_filter
        self.eps = eps

    def pf(self, mask: mx.array, beta: float = 0.02) -> mx.array:
        """Post-filter of Valin et al., "A Perceptually-Motivated Approach for Low-Complexity,
        Real-Time Enhancement of Fullband Speech"."""
        mask_sin = mask * mx.sin(np.pi * mask / 2)
        return (1 + beta) * mask / (1 + beta * mx.square(mask / mx.maximum(mask_sin, self.eps)))

    def __call__(self, spec: mx.array, mask: mx.array, atten_lim: Optional[mx.array] = None) -> mx.array:
        if not self.training and self.post_filter:
            mask = self.pf(mask)
        if atten_lim is not None:
            atten_lim = 10 ** (-atten_lim / 20)
            mask = mx.maximum(mask, atten_lim.reshape(-1, 1, 1, 1))
        mask = matmul(mask, self.erb_inv_fb)  # [B, 1, T, F]
        if not mx.issubdtype(spec.dtype, mx.complexfloating):
            mask = mask[..., None]
        return spec * mask


class ExponentialUnitNorm(nn.Module):
    """Unit norm of a spectrum [B, C, T, F, 2] by an exponential mean of its magnitude, as
    libdf's `unit_norm` (differentiable, for training)."""

    def __init__(self, alpha: float, num_freq_bins: int, eps: float = 1e-14):
        super().__init__()
        self.alpha = alpha
        self.eps = eps
        self.init_state = mx.array(unit_norm_init(num_freq_bins)).reshape(1, 1, num_freq_bins, 1)
        self.freeze(keys=["init_state"], recurse=False)

    def __call__(self, x: mx.array) -> mx.array:
        b, c, t, f, _ = x.shape
        x_abs = mx.sqrt(mx.maximum(mx.sum(mx.square(x), axis=-1, keepdims=True), self.eps))
        state = mx.broadcast_to(self.init_state, (b, c, f, 1))
        out_states: List[mx.array] = []
        for i in range(t):
            state = x_abs[:, :, i] * (1 - self.alpha) + state * self.alpha
            out_states.append(state)
        return x / mx.sqrt(mx.stack(out_states, 2))


class _Buffers:
    """Holds non-persistent state outside the parameter tree (torch's persistent=False)."""


class DfOp(nn.Module):
    """Deep filtering of the lowest `df_bins` bins: a complex FIR filter of `df_order` frames
    over time. All `method`s compute the same sum in different op orders, as in df."""

    def __init__(
        self,
        df_bins: int,
        df_order: int = 5,
        df_lookahead: int = 0,
        method: str = "complex_strided",
        freq_bins: int = 0,
    ):
        super().__init__()
        self.df_order = df_order
        self.df_bins = df_bins
        self.df_lookahead = df_lookahead
        self.freq_bins = freq_bins
        self.set_forward(method)

    def set_forward(self, method: str):
        forward_methods = {
            "real_loop": self.forward_real_loop,
            "real_strided": self.forward_real_strided,
            "real_unfold": self.forward_real_unfold,
            "complex_strided": self.forward_complex_strided,
            "real_one_step": self.forward_real_no_pad_one_step,
            "real_hidden_state_loop": self.forward_real_hidden_state_loop,
        }
        if method not in forward_methods:
            raise ValueError(f"`method` must be one of {list(forward_methods)}, but got '{method}'")
        if method == "real_hidden_state_loop":
            if self.freq_bins < self.df_bins:
                raise ValueError(f"freq_bins ({self.freq_bins}) must be >= df_bins ({self.df_bins})")
            self._buffers = _Buffers()
            self._buffers.spec_buf = mx.zeros((1, 1, self.df_order, self.freq_bins, 2))
        self.method = method
        self._forward = forward_methods[method]

    @property
    def spec_buf(self) -> mx.array:
        return self._buffers.spec_buf

    def __call__(self, spec: mx.array, coefs: mx.array, alpha: Optional[mx.array] = None) -> mx.array:
        return self._forward(spec, coefs, alpha)

    def _padded(self, spec: mx.array) -> mx.array:
        return spec_pad(spec[..., : self.df_bins, :].squeeze(1), self.df_order, self.df_lookahead, dim=-3)

    def forward_real_loop(self, spec: mx.array, coefs: mx.array, alpha: Optional[mx.array] = None) -> mx.array:
        t = spec.shape[2]
        padded = self._padded(spec)
        re = im = 0.0
        for i in range(self.df_order):
            p, c = padded[:, i : i + t], coefs[:, :, i]
            re = re + p[..., 0] * c[..., 0]
            re = re - p[..., 1] * c[..., 1]
            im = im + p[..., 1] * c[..., 0]
            im = im + p[..., 0] * c[..., 1]
        return assign_df(spec, mx.stack([re, im], -1)[:, None], self.df_bins, alpha)

    def _real_windowed(self, spec, windows, coefs, alpha):
        re = windows[..., 0] * coefs[..., 0] - windows[..., 1] * coefs[..., 1]
        im = windows[..., 1] * coefs[..., 0] + windows[..., 0] * coefs[..., 1]
        spec_f = mx.stack((re, im), -1).sum(2)
        return assign_df(spec, spec_f[:, None], self.df_bins, alpha)

    def forward_real_strided(self, spec: mx.array, coefs: mx.array, alpha: Optional[mx.array] = None) -> mx.array:
        windows = as_strided(spec[..., : self.df_bins, :].squeeze(1), self.df_order, self.df_lookahead, dim=-3)
        return self._real_windowed(spec, windows, coefs, alpha)

    def forward_real_unfold(self, spec: mx.array, coefs: mx.array, alpha: Optional[mx.array] = None) -> mx.array:
        return self.forward_real_strided(spec, coefs, alpha)

    def forward_complex_strided(self, spec: mx.array, coefs: mx.array, alpha: Optional[mx.array] = None) -> mx.array:
        windows = as_strided(spec[..., : self.df_bins, :].squeeze(1), self.df_order, self.df_lookahead, dim=-3)
        spec_f = mx.sum(as_complex(windows) * as_complex(coefs), axis=2)
        return assign_df(spec, as_real(spec_f)[:, None], self.df_bins, alpha)

    def _one_step(self, spec_buf: mx.array, coefs: mx.array) -> mx.array:
        sre, sim = spec_buf[..., : self.df_bins, 0:1], spec_buf[..., : self.df_bins, 1:2]
        cre, cim = coefs[..., 0:1], coefs[..., 1:2]
        outr = mx.sum(sre * cre - sim * cim, axis=2).squeeze(-1)
        outi = mx.sum(sre * cim + sim * cre, axis=2).squeeze(-1)
        return mx.stack((outr, outi), axis=-1)

    def forward_real_no_pad_one_step(self, spec: mx.array, coefs: mx.array, alpha: Optional[mx.array] = None) -> mx.array:
        """One frame from a `df_order`-frame buffer [B, 1, O, F', 2]; coefs [B, 1, O, F, 2]."""
        if spec.shape[2] != self.df_order:
            raise ValueError("This forward method needs spectrogram buffer with `df_order` time steps as input")
        if coefs.shape[1] != 1:
            raise ValueError("This forward method is only valid for 1 time step")
        current = spec[:, :, self.df_order - self.df_lookahead - 1]
        return assign_df(current, self._one_step(spec, coefs)[:, None], self.df_bins, alpha)

    def forward_real_hidden_state_loop(self, spec: mx.array, coefs: mx.array, alpha: mx.array) -> mx.array:
        """Frame by frame with an internal ring buffer of `df_order` frames (batch size 1)."""
        out = []
        buf = self._buffers.spec_buf
        for t in range(spec.shape[2]):
            buf = mx.concatenate([buf[:, :, 1:], spec[:, :, t : t + 1]], axis=2)
            spec_f = self._one_step(buf, coefs[:, t : t + 1])
            current = buf[:, :, self.df_order - self.df_lookahead - 1][:, :, None]
            out.append(assign_df(current, spec_f[:, None], self.df_bins, alpha[:, t]).squeeze(2))
        self._buffers.spec_buf = buf
        return mx.stack(out, axis=2)


def assign_df(spec: mx.array, spec_f: mx.array, df_bins: int, alpha: Optional[mx.array]) -> mx.array:
    """`spec` with its lowest `df_bins` bins replaced by `spec_f` (blended by `alpha`)."""
    low = spec[..., :df_bins, :]
    if alpha is not None:
        alpha = alpha.reshape(spec.shape[0], 1, -1, 1, 1)
        low = spec_f * alpha + low * (1 - alpha)
    else:
        extra = spec_f.ndim - low.ndim  # torch's slice assignment drops leading singleton dims
        low = mx.broadcast_to(spec_f.reshape(spec_f.shape[extra:]) if extra > 0 else spec_f, low.shape)
    return mx.concatenate([low, spec[..., df_bins:, :]], axis=-2)


def spec_pad(x: mx.array, window_size: int, lookahead: int, dim: int = 0) -> mx.array:
    """Pad `dim` with window_size - lookahead - 1 frames before and `lookahead` after."""
    return pad_axis(x, dim, window_size - lookahead - 1, lookahead)


def as_strided(x: mx.array, window_size: int, lookahead: int, step: int = 1, dim: int = 0) -> mx.array:
    """Windows of `window_size` frames along `dim` of the padded input, inserted at `dim + 1`.
    Like df (a torch.fx workaround there), `step` is always 1."""
    n = x.shape[dim]
    axis = dim % x.ndim
    padded = spec_pad(x, window_size, lookahead, dim=dim)
    index = (slice(None),) * axis
    return mx.stack([padded[index + (slice(i, i + n),)] for i in range(window_size)], axis=axis + 1)


class LocalSnrTarget(nn.Module):
    """Local SNR training target in dB from clean speech and noise spectra."""

    def __init__(self, ws: int = 20, db: bool = True, ws_ns: Optional[int] = None, target_snr_range=None):
        super().__init__()
        self.ws = self.calc_ws(ws)
        self.ws_ns = self.ws * 2 if ws_ns is None else self.calc_ws(ws_ns)
        self.db = db
        self.range = target_snr_range

    def calc_ws(self, ws_ms: int) -> int:
        """Window size in STFT frames for a window in ms."""
        p = ModelParams()
        ws = ws_ms - p.fft_size / p.sr * 1000
        ws = 1 + ws / (p.hop_size / p.sr * 1000)
        return max(int(round(ws)), 1)

    def __call__(self, clean: mx.array, noise: mx.array, max_bin: Optional[int] = None) -> mx.array:
        if max_bin is not None:
            clean = as_complex(clean[..., :max_bin])
            noise = as_complex(noise[..., :max_bin])
        snr = local_snr(clean, noise, window_size=self.ws, db=self.db, window_size_ns=self.ws_ns)[0]
        return mx.clip(snr, self.range[0], self.range[1]).squeeze(1)


def _hann_window(n: int) -> mx.array:
    """torch.hann_window(n) (periodic; a single 1 for n == 1, as torch)."""
    if n == 1:
        return mx.ones((1,))
    return mx.array((0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)).astype(np.float32))


def _local_energy(x: mx.array, ws: int, device=None) -> mx.array:
    if (ws % 2) == 0:
        ws += 1
    ws_half = ws // 2
    x = pad_axis(mx.square(x).sum(-1).sum(-1), -1, ws_half, ws_half)
    t = x.shape[-1] - ws + 1
    windows = mx.stack([x[..., i : i + t] for i in range(ws)], axis=-1) * _hann_window(ws)
    return mx.sum(windows, axis=-1) / ws


def local_snr(
    clean: mx.array,
    noise: mx.array,
    window_size: int,
    db: bool = False,
    window_size_ns: Optional[int] = None,
    eps: float = 1e-12,
) -> Tuple[mx.array, mx.array, mx.array]:
    """Local SNR of [B, C, T, F] complex spectra over a Hann window of frames."""
    clean = as_real(clean)
    noise = as_real(noise)
    if clean.ndim != 5:
        raise ValueError(f"local_snr expects [B, C, T, F] complex or [B, C, T, F, 2] spectra, got {clean.shape}")
    e_speech = _local_energy(clean, window_size)
    window_size_ns = window_size if window_size_ns is None else window_size_ns
    e_noise = _local_energy(noise, window_size_ns)
    snr = e_speech / mx.maximum(e_noise, eps)
    if db:
        snr = mx.log10(mx.maximum(snr, eps)) * 10
    return snr, e_speech, e_noise


def _check_divisible(what: str, size: int, groups: int):
    if size % groups != 0:
        raise ValueError(f"{what} {size} is not divisible by groups={groups}")


class GroupedGRULayer(nn.Module):
    """`groups` independent GRUs, each on its slice of the features. Input [B, T, I] (or
    [T, B, I] when not `batch_first`), state [G*D, B, H/G]; the state is not differentiated
    through (df detaches it)."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        groups: int,
        batch_first: bool = True,
        bias: bool = True,
        dropout: float = 0,
        bidirectional: bool = False,
    ):
        super().__init__()
        _check_divisible("input_size", input_size, groups)
        _check_divisible("hidden_size", hidden_size, groups)
        self.input_size = input_size // groups
        self.hidden_size = hidden_size // groups
        self.out_size = hidden_size
        self.bidirectional = bidirectional
        self.num_directions = 2 if bidirectional else 1
        self.groups = groups
        self.batch_first = batch_first
        # df asserts this too: the per-group hidden size must again be divisible by groups
        _check_divisible("hidden_size per group", self.hidden_size, groups)
        self.layers = [
            GRU(self.input_size, self.hidden_size, bias=bias, batch_first=batch_first, dropout=dropout,
                bidirectional=bidirectional)
            for _ in range(groups)
        ]

    def get_h0(self, batch_size: int = 1, device=None) -> mx.array:
        """Zero state [G*D, B, H/G]; `device` is accepted for df's signature (MLX memory is
        unified)."""
        return mx.zeros((self.groups * self.num_directions, batch_size, self.hidden_size))

    def __call__(self, input: mx.array, h0: Optional[mx.array] = None) -> Tuple[mx.array, mx.array]:
        if h0 is None:
            dim0, dim1 = input.shape[:2]
            h0 = self.get_h0(dim0 if self.batch_first else dim1)
        h0 = mx.stop_gradient(h0)
        outputs: List[mx.array] = []
        outstates: List[mx.array] = []
        d, size = self.num_directions, self.input_size
        for i, layer in enumerate(self.layers):
            o, s = layer(input[..., i * size : (i + 1) * size], h0[i * d : (i + 1) * d])
            outputs.append(o)
            outstates.append(s)
        return mx.concatenate(outputs, axis=-1), mx.concatenate(outstates, axis=0)


class GroupedGRU(nn.Module):
    """Stacked GroupedGRULayers, the features shuffled across groups between layers (unless
    groups == 1); with `add_outputs` the layer outputs are summed. State [L*G*D, B, H/G]."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        groups: int = 4,
        bias: bool = True,
        batch_first: bool = True,
        dropout: float = 0,
        bidirectional: bool = False,
        shuffle: bool = True,
        add_outputs: bool = False,
    ):
        super().__init__()
        kwargs = {"groups": groups, "bias": bias, "batch_first": batch_first, "dropout": dropout,
                  "bidirectional": bidirectional}
        _check_divisible("input_size", input_size, groups)
        _check_divisible("hidden_size", hidden_size, groups)
        if num_layers <= 0:
            raise ValueError(f"num_layers must be positive, got {num_layers}")
        self.input_size = input_size
        self.groups = groups
        self.num_layers = num_layers
        self.batch_first = batch_first
        self.hidden_size = hidden_size // groups
        self.bidirectional = bidirectional
        self.num_directions = 2 if bidirectional else 1
        self.shuffle = shuffle and groups > 1  # fully connected when groups == 1
        self.add_outputs = add_outputs
        self.grus = [GroupedGRULayer(input_size, hidden_size, **kwargs)]
        self.grus += [GroupedGRULayer(hidden_size, hidden_size, **kwargs) for _ in range(1, num_layers)]

    def get_h0(self, batch_size: int, device=None) -> mx.array:
        """Zero state [L*G*D, B, H/G]; `device` is accepted for df's signature."""
        return mx.zeros((self.num_layers * self.groups * self.num_directions, batch_size, self.hidden_size))

    def __call__(self, input: mx.array, state: Optional[mx.array] = None) -> Tuple[mx.array, mx.array]:
        dim0, dim1, _ = input.shape
        if state is None:
            state = self.get_h0(dim0 if self.batch_first else dim1)
        output = None
        outstates = []
        h = self.groups * self.num_directions
        for i, gru in enumerate(self.grus):
            input, s = gru(input, state[i * h : (i + 1) * h])
            outstates.append(s)
            if self.shuffle and i < self.num_layers - 1:
                input = input.reshape(dim0, dim1, -1, self.groups).swapaxes(2, 3).reshape(dim0, dim1, -1)
            # df accumulates into zeros; 0 + x is exact, so the first output starts the sum
            output = output + input if self.add_outputs and output is not None else input
        return output, mx.concatenate(outstates, axis=0)


def _linear_act(input_size: int, output_size: int, groups: int, act_layer: Callable[..., nn.Module]):
    return Sequential(GroupedLinearEinsum(input_size, output_size, groups), act_layer())


class _SqueezedGRUBase(nn.Module):
    """Shared construction of SqueezedGRU and SqueezedGRU_S: grouped linear (+ act) in, GRU,
    optional skip op, grouped linear (+ act) out or identity."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        output_size: Optional[int] = None,
        num_layers: int = 1,
        linear_groups: int = 8,
        batch_first: bool = True,
        gru_skip_op: Optional[Callable[..., nn.Module]] = None,
        linear_act_layer: Callable[..., nn.Module] = Identity,
    ):
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.linear_in = _linear_act(input_size, hidden_size, linear_groups, linear_act_layer)
        self.gru = GRU(hidden_size, hidden_size, num_layers=num_layers, batch_first=batch_first)
        self.gru_skip = gru_skip_op() if gru_skip_op is not None else None
        if output_size is not None:
            self.linear_out = _linear_act(hidden_size, output_size, linear_groups, linear_act_layer)
        else:
            self.linear_out = Identity()


class SqueezedGRU(_SqueezedGRUBase):
    """Grouped linear -> GRU (+ skip of the squeezed input) -> grouped linear; [B, T, I]."""

    def __call__(self, input: mx.array, h: Optional[mx.array] = None) -> Tuple[mx.array, mx.array]:
        input = self.linear_in(input)
        x, h = self.gru(input, h)
        if self.gru_skip is not None:
            x = x + self.gru_skip(input)
        x = self.linear_out(x)
        return x, h


class SqueezedGRU_S(_SqueezedGRUBase):
    """As SqueezedGRU, but the skip op takes the block input and is added after linear_out."""

    def __call__(self, input: mx.array, h: Optional[mx.array] = None) -> Tuple[mx.array, mx.array]:
        x = self.linear_in(input)
        x, h = self.gru(x, h)
        x = self.linear_out(x)
        if self.gru_skip is not None:
            x = x + self.gru_skip(input)
        return x, h


class GroupedLinearEinsum(nn.Module):
    """Block-diagonal linear layer without bias: weight [G, I/G, H/G]; input [B, T, I]."""

    def __init__(self, input_size: int, hidden_size: int, groups: int = 1):
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.groups = groups
        _check_divisible("Input size", input_size, groups)
        _check_divisible("Hidden size", hidden_size, groups)
        self.ws = input_size // groups
        # torch's kaiming_uniform_(a=sqrt(5)) bound 1/sqrt(fan_in), fan_in = (I/G) * (H/G) for 3-D
        bound = 1 / math.sqrt(self.ws * (hidden_size // groups))
        self.weight = mx.random.uniform(-bound, bound, (groups, self.ws, hidden_size // groups))

    def __call__(self, x: mx.array) -> mx.array:
        b, t, _ = x.shape
        if _native.products:  # MLX's einsum would run on the wheel's reference BLAS: 4x slower
            x = x.reshape(b * t, self.groups, self.ws).swapaxes(0, 1)  # [G, B T, I/G]
            return matmul(x, self.weight).swapaxes(0, 1).reshape(b, t, -1)
        x = x.reshape(b, t, self.groups, self.ws)
        x = mx.einsum("btgi,gih->btgh", x, self.weight)  # [B, T, G, H/G]
        return x.reshape(b, t, -1)


class GroupedLinear(nn.Module):
    """`groups` nn.Linear layers on feature slices, outputs concatenated and (unless
    groups == 1) shuffled as df does (view [-1, H/G, G], transpose)."""

    def __init__(self, input_size: int, hidden_size: int, groups: int = 1, shuffle: bool = True):
        super().__init__()
        _check_divisible("input_size", input_size, groups)
        _check_divisible("hidden_size", hidden_size, groups)
        self.groups = groups
        self.input_size = input_size // groups
        self.hidden_size = hidden_size // groups
        self.shuffle = shuffle and groups > 1
        self.layers = [nn.Linear(self.input_size, self.hidden_size) for _ in range(groups)]

    def __call__(self, x: mx.array) -> mx.array:
        size = self.input_size
        output = mx.concatenate(
            [layer(x[..., i * size : (i + 1) * size]) for i, layer in enumerate(self.layers)], axis=-1)
        if self.shuffle:
            shape = output.shape
            output = output.reshape(-1, self.hidden_size, self.groups).swapaxes(-1, -2).reshape(shape)
        return output
