"""Multi-frame filters of `df.multiframe`: deep filtering over `frame_size` STFT frames.

Complex spectra are complex64 MLX arrays where df uses complex tensors; the `[..., 2]`
real views at the module boundaries are the same as df's.
"""

import mlx.core as mx
import mlx.nn as nn

from df_mlx.layers import pad_axis
from df_mlx.utils import as_complex, as_real


class _TimePad(nn.Module):
    """`nn.ConstantPad2d((0, 0, before, after))` / `ConstantPad3d((0, 0, 0, 0, before, after))`
    of df: zero frames before/after along the time axis (axis 2 of [B, C, T, F(, 2)])."""

    def __init__(self, before: int, after: int):
        super().__init__()
        self.before, self.after = before, after

    def __call__(self, x: mx.array) -> mx.array:
        return pad_axis(x, 2, self.before, self.after)


def _unfold_time(x: mx.array, size: int) -> mx.array:
    """Windows of `size` frames along axis 2, stacked on a new last axis: [B, C, T, F, size]."""
    t = x.shape[2] - size + 1
    return mx.stack([x[:, :, i : i + t] for i in range(size)], axis=-1)


class MultiFrameModule(nn.Module):
    """Base of the multi-frame filters: pads (frame_size - 1 - lookahead past, lookahead
    future frames) and unfolds the spectrum over time."""

    def __init__(self, num_freqs: int, frame_size: int, lookahead: int = 0, real: bool = False):
        super().__init__()
        self.num_freqs = num_freqs
        self.frame_size = frame_size
        self.real = real
        self.pad = _TimePad(frame_size - 1 - lookahead, lookahead)
        self.need_unfold = frame_size > 1
        self.lookahead = lookahead

    def spec_unfold_real(self, spec: mx.array) -> mx.array:
        """[B, C, T, F, 2] -> [B, C, N, T, F, 2]."""
        if self.need_unfold:
            padded = self.pad(spec)
            t = padded.shape[2] - self.frame_size + 1
            return mx.stack([padded[:, :, i : i + t] for i in range(self.frame_size)], axis=2)
        return spec[..., None]

    def spec_unfold(self, spec: mx.array) -> mx.array:
        """Complex [B, C, T, F] -> [B, C, T, F, N]."""
        if self.need_unfold:
            return _unfold_time(self.pad(spec), self.frame_size)
        return spec[..., None]


def df(spec: mx.array, coefs: mx.array) -> mx.array:
    """Deep filter: complex spec [B, C, T, F, N] and coefs [B, C, N, T, F] -> [B, C, T, F]."""
    return mx.sum(spec * mx.moveaxis(coefs, -3, -1), axis=-1)


def df_real(spec: mx.array, coefs: mx.array) -> mx.array:
    """Deep filter on real views: spec and coefs [B, C, N, T, F, 2] -> [B, C, T, F, 2]."""
    re = (spec[..., 0] * coefs[..., 0]).sum(axis=2) - (spec[..., 1] * coefs[..., 1]).sum(axis=2)
    im = (spec[..., 0] * coefs[..., 1]).sum(axis=2) + (spec[..., 1] * coefs[..., 0]).sum(axis=2)
    return mx.stack([re, im], axis=-1)


def _replace_low_bins(spec: mx.array, low: mx.array, num_freqs: int) -> mx.array:
    return mx.concatenate([low, spec[..., num_freqs:, :]], axis=-2)


class DF(MultiFrameModule):
    """Deep filtering of the lowest `num_freqs` bins; spec [B, C, T, F, 2], coefs
    [B, N, T, F', 2] -> spec with those bins filtered."""

    def __init__(self, num_freqs: int, frame_size: int, lookahead: int = 0, conj: bool = False):
        super().__init__(num_freqs, frame_size, lookahead)
        self.conj = conj

    def __call__(self, spec: mx.array, coefs: mx.array) -> mx.array:
        spec_u = self.spec_unfold(as_complex(spec))[..., : self.num_freqs, :]
        coefs = as_complex(coefs)
        coefs = coefs.reshape(coefs.shape[0], -1, self.frame_size, *coefs.shape[2:])
        if self.conj:
            coefs = mx.conj(coefs)
        return _replace_low_bins(spec, as_real(df(spec_u, coefs)), self.num_freqs)


class DFreal(MultiFrameModule):
    """`DF` in real arithmetic only (df's ONNX-friendly variant)."""

    def __init__(self, num_freqs: int, frame_size: int, lookahead: int = 0, conj: bool = False):
        super().__init__(num_freqs, frame_size, lookahead, real=True)
        self.conj = conj

    def __call__(self, spec: mx.array, coefs: mx.array) -> mx.array:
        spec_f = self.spec_unfold_real(spec)[..., : self.num_freqs, :]
        coefs = coefs.reshape(coefs.shape[0], -1, self.frame_size, *coefs.shape[2:])
        return _replace_low_bins(spec, df_real(spec_f, coefs), self.num_freqs)
