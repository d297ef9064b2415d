"""HiFi-GAN style multi-period / multi-scale discriminators and LS-GAN losses of the DFNet4
fork's `df.discriminator` (sealad886/DeepFilterNet4), in MLX.

Every module takes and returns torch's layout ([B, 1, T] waveforms, [B, C, H, W] / [B, C, L]
feature maps) and keeps torch's parameter names, including the weight_norm / spectral_norm
parametrisations (`weight_g`, `weight_v` / `weight_orig` and the power-iteration buffers
`weight_u`, `weight_v`), so a fork state_dict loads as is and training updates the same
parameters as torch.
"""

from typing import List, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from df_mlx.layers import _uniform, conv2d
from df_mlx.loss import DiscriminatorLoss, FeatureMatchingLoss, GeneratorLoss

_SPECTRAL_EPS = 1e-12  # torch.nn.utils.spectral_norm's default eps


def _normalize(x: mx.array) -> mx.array:
    """`F.normalize(x, dim=0, eps=1e-12)` of a vector."""
    return x / mx.maximum(mx.sqrt(mx.sum(x * x)), _SPECTRAL_EPS)


def _norm_except_dim0(w: mx.array) -> mx.array:
    return mx.sqrt(mx.sum(w * w, axis=tuple(range(1, w.ndim)), keepdims=True))


def _tuple(x: Union[int, Sequence[int]], n: int) -> Tuple[int, ...]:
    return (x,) * n if isinstance(x, int) else tuple(x)


class NormConv(nn.Module):
    """`torch.nn.Conv1d` / `Conv2d` wrapped by `torch.nn.utils.weight_norm` (w = g v / |v|,
    per output channel) or `spectral_norm` (w = W / sigma, sigma = u^T W v; in training one
    power iteration refreshes the buffers u, v first, as torch does). Input and output and the
    weights are in torch's layout; `kernel_size` of length 1 makes a Conv1d."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Union[int, Sequence[int]],
                 stride: Union[int, Sequence[int]] = 1, padding: Union[int, Sequence[int]] = 0, groups: int = 1,
                 spectral: bool = False):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels {in_channels}->{out_channels} not divisible by groups={groups}")
        kernel = _tuple(kernel_size, 1) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.one_d = len(kernel) == 1
        n = len(kernel)
        # As 2-D arguments for layers.conv2d; a Conv1d is a Conv2d of width 1.
        self.stride = _tuple(stride, n) + (1,) * (2 - n)
        self.padding = _tuple(padding, n) + (0,) * (2 - n)
        self.groups = groups
        fan_in = in_channels // groups
        for k in kernel:
            fan_in *= k
        w = _uniform((out_channels, in_channels // groups, *kernel), fan_in)
        if spectral:
            self.weight_orig = w
            self.weight_u = _normalize(mx.random.normal((out_channels,)))
            self.weight_v = _normalize(mx.random.normal((w[0].size,)))
            self.freeze(keys=["weight_u", "weight_v"], recurse=False)
        else:
            self.weight_g = _norm_except_dim0(w)
            self.weight_v = w
        self.bias = _uniform((out_channels,), fan_in)

    @property
    def spectral(self) -> bool:
        return "weight_orig" in self

    def normalized_weight(self) -> mx.array:
        """The effective torch-layout weight (updates u, v in training under spectral norm)."""
        if not self.spectral:
            return self.weight_v * (self.weight_g / _norm_except_dim0(self.weight_v))
        mat = self.weight_orig.reshape(self.weight_orig.shape[0], -1)
        u, v = self.weight_u, self.weight_v
        if self.training:
            fixed = mx.stop_gradient(mat)
            v = _normalize(fixed.T @ u)
            u = _normalize(fixed @ v)
            self.weight_u, self.weight_v = u, v
        return self.weight_orig / mx.sum(u * (mat @ v))

    def __call__(self, x: mx.array) -> mx.array:
        w = self.normalized_weight()
        if self.one_d:  # [B, C, L] -> [B, L, 1, C]; weight [O, I, K] -> [O, K, 1, I]
            y = conv2d(x.swapaxes(1, 2)[:, :, None, :], w.swapaxes(1, 2)[:, :, None, :], self.stride,
                       self.padding, groups=self.groups)
            return (y + self.bias)[:, :, 0, :].swapaxes(1, 2)
        y = conv2d(x.transpose(0, 2, 3, 1), w.transpose(0, 2, 3, 1), self.stride, self.padding, groups=self.groups)
        return (y + self.bias).transpose(0, 3, 1, 2)


class AvgPool1d(nn.Module):
    """`torch.nn.AvgPool1d` (zero padding counted, floor mode) on [B, C, L]."""

    def __init__(self, kernel_size: int, stride: int, padding: int = 0):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def __call__(self, x: mx.array) -> mx.array:
        k, s, p = self.kernel_size, self.stride, self.padding
        if p:
            x = mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(p, p)])
        n = (x.shape[-1] - k) // s + 1
        return sum(x[..., i : i + (n - 1) * s + 1 : s] for i in range(k)) / k


def _as_waveform(x: mx.array) -> mx.array:
    if x.ndim == 2:
        return x[:, None]
    if x.ndim != 3:
        raise ValueError(f"discriminators take a waveform [B, T] or [B, 1, T], got shape {x.shape}")
    return x


class PeriodDiscriminator(nn.Module):
    """Folds the waveform into [T / period, period] (reflect-padded to a multiple) and applies
    strided (5, 1) convolutions along time, so each column sees one phase of the period."""

    def __init__(self, period: int, use_spectral_norm: bool = False,
                 channels: Sequence[int] = (32, 128, 512, 1024, 1024)):
        super().__init__()
        self.period = period
        self.convs = []
        in_ch = 1
        for i, out_ch in enumerate(channels):
            stride = (3, 1) if i < len(channels) - 1 else (1, 1)
            self.convs.append(NormConv(in_ch, out_ch, (5, 1), stride, (2, 0), spectral=use_spectral_norm))
            in_ch = out_ch
        self.conv_post = NormConv(channels[-1], 1, (3, 1), 1, (1, 0), spectral=use_spectral_norm)

    def __call__(self, x: mx.array) -> Tuple[mx.array, List[mx.array]]:
        x = _as_waveform(x)
        b, c, t = x.shape
        if t % self.period:
            n_pad = self.period - t % self.period
            if n_pad >= t:
                raise ValueError(f"waveform of {t} samples too short to reflect-pad by {n_pad}")
            x = mx.concatenate([x, x[..., mx.arange(t - 2, t - 2 - n_pad, -1)]], axis=-1)
            t += n_pad
        return _score(self.convs, self.conv_post, x.reshape(b, c, t // self.period, self.period))


def _score(convs, conv_post, x: mx.array) -> Tuple[mx.array, List[mx.array]]:
    """Convolutions with leaky ReLU(0.1), then the post conv: (flattened scores [B, -1], every
    layer's output as the feature maps)."""
    fmap = []
    for conv in convs:
        x = nn.leaky_relu(conv(x), 0.1)
        fmap.append(x)
    x = conv_post(x)
    fmap.append(x)
    return x.reshape(x.shape[0], -1), fmap


class ScaleDiscriminator(nn.Module):
    """Grouped, strided 1-D convolutions over the waveform (MelGAN's scale discriminator)."""

    def __init__(self, use_spectral_norm: bool = False,
                 channels: Sequence[int] = (128, 128, 256, 512, 1024, 1024, 1024)):
        super().__init__()
        ch = list(channels)
        # (in, out, kernel, stride, groups), padding kernel // 2, as the fork
        spec = [(1, ch[0], 15, 1, 1), (ch[0], ch[1], 41, 2, 4), (ch[1], ch[2], 41, 2, 16), (ch[2], ch[3], 41, 4, 16),
                (ch[3], ch[4], 41, 4, 16), (ch[4], ch[5], 41, 1, 16), (ch[5], ch[6], 5, 1, 1)]
        self.convs = [NormConv(i, o, k, s, k // 2, g, spectral=use_spectral_norm) for i, o, k, s, g in spec]
        self.conv_post = NormConv(ch[6], 1, 3, 1, 1, spectral=use_spectral_norm)

    def __call__(self, x: mx.array) -> Tuple[mx.array, List[mx.array]]:
        return _score(self.convs, self.conv_post, _as_waveform(x))


class MultiPeriodDiscriminator(nn.Module):
    """One PeriodDiscriminator (fork-default channels) per period."""

    def __init__(self, periods: Sequence[int] = (2, 3, 5, 7, 11), use_spectral_norm: bool = False):
        super().__init__()
        self.periods = list(periods)
        self.discriminators = [PeriodDiscriminator(p, use_spectral_norm=use_spectral_norm) for p in periods]

    def __call__(self, y: mx.array) -> Tuple[List[mx.array], List[List[mx.array]]]:
        y = _as_waveform(y)
        outs = [d(y) for d in self.discriminators]
        return [s for s, _ in outs], [f for _, f in outs]


class MultiScaleDiscriminator(nn.Module):
    """ScaleDiscriminators on the waveform average-pooled by 2 before each further scale."""

    def __init__(self, num_scales: int = 3, use_spectral_norm: bool = False):
        super().__init__()
        self.discriminators = [ScaleDiscriminator(use_spectral_norm=use_spectral_norm) for _ in range(num_scales)]
        self.pools = [AvgPool1d(4, 2, padding=2) for _ in range(num_scales - 1)]

    def __call__(self, y: mx.array) -> Tuple[List[mx.array], List[List[mx.array]]]:
        y = _as_waveform(y)
        scores, fmaps = [], []
        for i, d in enumerate(self.discriminators):
            if i > 0:
                y = self.pools[i - 1](y)
            score, fmap = d(y)
            scores.append(score)
            fmaps.append(fmap)
        return scores, fmaps


class CombinedDiscriminator(nn.Module):
    """MPD and MSD side by side: (mpd_scores, mpd_fmaps, msd_scores, msd_fmaps)."""

    def __init__(self, periods: Sequence[int] = (2, 3, 5, 7, 11), num_scales: int = 3,
                 use_spectral_norm: bool = False):
        super().__init__()
        self.mpd = MultiPeriodDiscriminator(periods=periods, use_spectral_norm=use_spectral_norm)
        self.msd = MultiScaleDiscriminator(num_scales=num_scales, use_spectral_norm=use_spectral_norm)

    def __call__(self, y: mx.array):
        mpd_scores, mpd_fmaps = self.mpd(y)
        msd_scores, msd_fmaps = self.msd(y)
        return mpd_scores, mpd_fmaps, msd_scores, msd_fmaps


def discriminator_loss(real_scores: List[mx.array], fake_scores: List[mx.array]) -> Tuple[mx.array, mx.array]:
    """LS-GAN discriminator loss sum(mean((1 - real)^2) + mean(fake^2)) and its real part."""
    return DiscriminatorLoss("lsgan")(real_scores, fake_scores)


def generator_loss(fake_scores: List[mx.array]) -> mx.array:
    """LS-GAN generator loss sum(mean((1 - fake)^2))."""
    return GeneratorLoss("lsgan")(fake_scores)


def feature_matching_loss(real_fmaps: List[List[mx.array]], fake_fmaps: List[List[mx.array]]) -> mx.array:
    """Sum of L1 distances between feature maps; no gradient flows into the real ones."""
    return FeatureMatchingLoss(factor=1.0)(real_fmaps, fake_fmaps)
