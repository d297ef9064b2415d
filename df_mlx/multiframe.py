"""Multi-frame filters of `df.multiframe`: deep filtering over `frame_size` STFT frames.

Complex spectra are complex64 MLX arrays where df uses complex tensors; the `[..., 2]`
real views at the module boundaries are the same as df's.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from df_mlx.layers import pad_axis
from df_mlx.utils import as_complex, as_real


def as_windowed(x: mx.array, window_length: int, step: int = 1, dim: int = 1) -> mx.array:
    """Overlapping windows of `window_length` along `dim` (df places the window axis after
    `dim`, or before it for dim < -1). Only step 1: df's strided view reads past the tensor
    for larger steps."""
    if step != 1:
        raise ValueError("as_windowed supports step=1 only (df's strided view is out of bounds otherwise)")
    axis = dim % x.ndim
    n = x.shape[axis] - window_length + 1
    idx = mx.arange(n)[:, None] + mx.arange(window_length)[None]
    out = mx.take(x, idx, axis=axis)  # window axis right after `dim`
    return mx.moveaxis(out, axis + 1, axis) if dim < -1 else out


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


    @staticmethod
    def solve(Rxx: mx.array, rss: mx.array, diag_eps: float = 1e-8, eps: float = 1e-7) -> mx.array:
        """inverse(regularised Rxx) @ rss for complex [..., N, N] and [..., N]."""
        return _matvec(_complex_inv(_tik_reg(Rxx, diag_eps, eps)), rss)

    @staticmethod
    def apply_coefs(spec: mx.array, coefs: mx.array) -> mx.array:
        """sum_n spec[..., n] * coefs[..., n] (no conjugation, as df)."""
        return mx.sum(spec * coefs, axis=-1)


def psd(x: mx.array, n: int) -> mx.array:
    """Correlation matrices X X^H over n frames: complex [B, C, T, F] -> [B, C, T, F, n, n]."""
    if x.ndim != 4:
        raise ValueError(f"psd expects a complex [B, C, T, F] spectrogram, got shape {x.shape}")
    xw = _unfold_time(pad_axis(x, 2, n - 1, 0), n)
    return xw[..., None, :] * mx.conj(xw)[..., :, None]


def compute_corr(X: mx.array, N: int) -> mx.array:
    """Correlation matrices over N frames of a complex [C, T, F] spectrogram -> [C, T, F, N, N]."""
    t = X.shape[1]
    xp = pad_axis(X, 1, N - 1, 0)
    xw = mx.stack([xp[:, i : i + t] for i in range(N)], axis=-1)
    return xw[..., None, :] * mx.conj(xw)[..., :, None]


def _matvec(a: mx.array, v: mx.array) -> mx.array:
    """Complex [..., N, M] @ [..., M] by broadcasting (MLX's CPU matmul is real-only)."""
    return mx.sum(a * v[..., None, :], axis=-1)


def _conj_t(a: mx.array) -> mx.array:
    return mx.conj(mx.swapaxes(a, -1, -2))


def _matmul(a: mx.array, b: mx.array) -> mx.array:
    """Complex batched matmul by broadcasting: [..., N, K] @ [..., K, M]."""
    return mx.sum(a[..., :, :, None] * b[..., None, :, :], axis=-2)


def _real_embedding(a: mx.array) -> mx.array:
    """Complex [..., N, N] -> real [..., 2N, 2N] [[Re, -Im], [Im, Re]], for real solvers."""
    re, im = mx.real(a), mx.imag(a)
    return mx.concatenate([mx.concatenate([re, -im], -1), mx.concatenate([im, re], -1)], -2)


def _complex_solve(a: mx.array, b: mx.array) -> mx.array:
    """Solve complex a x = b ([..., N, N], [..., N]) through the real 2N x 2N system."""
    n = a.shape[-1]
    rhs = mx.concatenate([mx.real(b), mx.imag(b)], axis=-1)[..., None]
    x = mx.linalg.solve(_real_embedding(a), rhs, stream=mx.cpu)[..., 0]
    return x[..., :n] + 1j * x[..., n:]


def _complex_inv(a: mx.array) -> mx.array:
    n = a.shape[-1]
    inv = mx.linalg.inv(_real_embedding(a), stream=mx.cpu)
    return inv[..., :n, :n] + 1j * inv[..., n:, :n]


def _compute_mat_trace(input: mx.array, dim1: int = -2, dim2: int = -1) -> mx.array:
    """Trace over two equal-sized axes."""
    if input.ndim < 2 or input.shape[dim1] != input.shape[dim2]:
        raise ValueError(f"trace needs two equal axes, got shape {input.shape} ({dim1}, {dim2})")
    return mx.sum(mx.diagonal(input, 0, dim1, dim2), axis=-1)


def _tik_reg(mat: mx.array, reg: float = 1e-7, eps: float = 1e-8) -> mx.array:
    """Tikhonov regularisation of [..., C, C]: add (Re(trace) * reg + eps) on the diagonal."""
    c = mat.shape[-1]
    epsilon = mx.real(_compute_mat_trace(mat))[..., None, None] * reg + eps
    return mat + epsilon * mx.eye(c)


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


class CRM(MultiFrameModule):
    """Complex ratio mask (a single-frame filter)."""

    def __init__(self, num_freqs: int, frame_size: int = 1, lookahead: int = 0):
        if frame_size != 1 or lookahead != 0:
            raise ValueError(f"CRM needs frame_size 1 and lookahead 0, got {(frame_size, lookahead)}")
        super().__init__(num_freqs, 1)

    def forward_impl(self, spec: mx.array, coefs: mx.array) -> mx.array:
        return spec.squeeze(-1) * coefs


class _MfFilter(MultiFrameModule):
    """Shared parts of the multi-frame Wiener and MVDR filters: the (inverse) covariance input
    in its four forms (plain/Cholesky factor, inverse or not) and the constraints df enforces."""

    r_factors = {}

    def __init__(self, num_freqs: int, frame_size: int, lookahead: int = 0, cholesky_decomp: bool = False,
                 inverse: bool = True, enforce_constraints: bool = True, eps=1e-8, dload=1e-7):
        super().__init__(num_freqs, frame_size, lookahead=lookahead)
        self.cholesky_decomp = cholesky_decomp
        self.inverse = inverse
        self.enforce_constraints = enforce_constraints
        self.eps = eps
        self.dload = dload

    def get_r_factor(self):
        """A factor f such that R/f lies in [-1, 1]."""
        return self.r_factors[(self.inverse, self.cholesky_decomp)]

    def constrain(self, r: mx.array) -> mx.array:
        """The covariance input [B, T, F, N*N*2] as df's filters leave it: they enforce the
        constraints in place on the caller's tensor (a zero upper triangle for a Cholesky
        factor; Hermitian symmetry and a real diagonal for a plain covariance)."""
        if not self.enforce_constraints or (self.inverse and not self.cholesky_decomp):
            return r
        n = self.frame_size
        c = as_complex(r.reshape(*r.shape[:3], n, n, 2))
        if self.cholesky_decomp:
            c = c * mx.array(np.tril(np.ones((n, n), np.float32)))
        else:
            low = c * mx.array(np.tril(np.ones((n, n), np.float32), -1))
            c = low + mx.real(mx.diagonal(c, 0, -2, -1))[..., None] * mx.eye(n) + _conj_t(low)
        return as_real(c).reshape(r.shape)

    def _covariance(self, r: mx.array) -> mx.array:
        """[B, T, F, N*N*2] -> complex [B, T, F, N, N], constrained, Cholesky factor expanded."""
        n = self.frame_size
        r = as_complex(self.constrain(r).reshape(*r.shape[:3], n, n, 2))
        return _matmul(r, _conj_t(r)) if self.cholesky_decomp else r

    def _weights(self, r: mx.array, ifc: mx.array) -> mx.array:
        """R^-1 ifc: solved (with regularisation) or, for an inverse input, multiplied."""
        if not self.inverse:
            return _complex_solve(_tik_reg(r, self.dload, self.eps), ifc)
        return _matvec(r, ifc)

    def _apply(self, spec: mx.array, w: mx.array) -> mx.array:
        spec_f = self.spec_unfold(as_complex(spec))[..., : self.num_freqs, :]
        return _replace_low_bins(spec, as_real(self.apply_coefs(spec_f, w[:, None])), self.num_freqs)


class MfWf(_MfFilter):
    """Multi-frame Wiener filter from the (inverse) noisy covariance and the speech IFC vector."""

    r_factors = {(True, True): 2e3, (True, False): 3e7, (False, True): 2e-4, (False, False): 5e-6}

    def __call__(self, spec: mx.array, ifc: mx.array, iRxx: mx.array) -> mx.array:
        """spec [B, 1, T, F, 2]; ifc [B, T, F', N*2]; iRxx [B, T, F', N*N*2]."""
        r = self._covariance(iRxx)
        ifc = as_complex(ifc.reshape(*ifc.shape[:3], self.frame_size, 2))
        return self._apply(spec, self._weights(r, ifc))


class MfMvdr(_MfFilter):
    """Multi-frame MVDR filter from the (inverse) noise covariance and the speech IFC vector."""

    r_factors = {(True, True): 2e4, (True, False): 3e8, (False, True): 5e-5, (False, False): 1e-6}

    def __call__(self, spec: mx.array, ifc: mx.array, iRnn: mx.array) -> mx.array:
        """spec [B, C, T, F, 2]; ifc [B, T, F', N*2]; iRnn [B, T, F', N*N*2]."""
        r = self._covariance(iRnn)
        ifc = as_complex(ifc.reshape(*ifc.shape[:3], self.frame_size, 2))
        numerator = self._weights(r, ifc)
        denominator = mx.sum(mx.conj(ifc) * numerator, axis=-1)
        scale = mx.conj(ifc[..., -1:])
        return self._apply(spec, numerator * scale / (mx.real(denominator)[..., None] + self.eps))
