"""Multi-frame filters of `df.multiframe`: deep filtering, MF Wiener and MF MVDR filtering over
`frame_size` STFT frames, in torch's layout.

Complex spectra are complex64 MLX arrays where df uses complex tensors; the `[..., 2]` real
views at the module boundaries are df's. df edits some inputs in place (the spectrum in eval
mode, the covariance constraints); MLX arrays are immutable, so the filters return new arrays
(`constrain` gives the covariance as df leaves it).

MLX has no complex solve/inverse/Cholesky and no VJP for `linalg.solve`/`inv`: complex systems
are solved through the real 2N x 2N embedding [[Re, -Im], [Im, Re]] with a solve whose VJP is
written out (`_solve`), so the solving filters are differentiable as in df.

df's oracle scripts (`compute_ideal_wf`, `compute_ideal_mvdr`, `compute_all_mf`) are left out:
they read assets from df's source tree and need icecream and torchaudio, so the reference
cannot run them here to check a port.
"""

import functools
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn

from df_mlx import _native
from df_mlx.layers import folds_layers, pad_axis
from df_mlx.utils import as_complex, as_real


def as_windowed(x: mx.array, window_length: int, step: int = 1, dim: int = 1) -> mx.array:
    """Overlapping windows of `x` along `dim`, as df's strided view: the window axis follows
    `dim` (precedes it for dim 0 and dim < -1), and there are N - window_length + 1 windows
    whatever `step` (df divides `step / step`). `step` multiplies the stride of the window
    count axis, or of the window axis for dim 0 and -1. A view reaching past the end of `x`
    raises, as torch's `as_strided` does (df assumes a contiguous `x`)."""
    if not -x.ndim <= dim < x.ndim:
        raise ValueError(f"as_windowed: dim {dim} out of range for a {x.ndim}-d input")
    axis = dim % x.ndim
    size = x.shape[axis]
    count = size - window_length + 1
    if count < 0:
        raise ValueError(f"as_windowed: window_length {window_length} exceeds the {size} entries of dim {dim}")
    count_stride, window_stride = (1, step) if dim in (0, -1) else (step, 1)
    if count > 0 and window_length > 0 and (count - 1) * count_stride + (window_length - 1) * window_stride >= size:
        raise ValueError(f"as_windowed: step {step} reads past the {size} entries of dim {dim}")
    idx = mx.arange(count)[:, None] * count_stride + mx.arange(window_length)[None] * window_stride
    return mx.take(x, idx.T if dim == 0 or dim < -1 else idx, axis=axis)


def _unfold(x: mx.array, axis: int, size: int) -> mx.array:
    """torch's `x.unfold(axis, size, 1)`: windows of `size` along `axis`, on a new last axis."""
    axis = axis % x.ndim
    count = x.shape[axis] - size + 1
    if count < 1:
        raise ValueError(f"cannot unfold {size} frames from an axis of {x.shape[axis]}")
    out = mx.take(x, mx.arange(count)[:, None] + mx.arange(size)[None], axis=axis)
    return mx.moveaxis(out, axis + 1, -1)


def _narrow(x: mx.array, axis: int, length: int, what: str) -> mx.array:
    """torch's `x.narrow(axis, 0, length)`, which raises where slicing would clamp."""
    if length > x.shape[axis]:
        raise ValueError(f"{what}: num_freqs {length} exceeds the {x.shape[axis]} entries of axis {axis} "
                         f"(shape {x.shape})")
    return mx.take(x, mx.arange(length), axis=axis)


def _unflatten(x: mx.array, sizes: Sequence[int], what: str) -> mx.array:
    """torch's `x.unflatten(3, sizes)`."""
    n = 1
    for s in sizes:
        n *= s
    if x.ndim < 4 or x.shape[3] != n:
        raise ValueError(f"{what}: expected [B, T, F, {n}, ...] (frame_size {sizes[0]}), got shape {x.shape}")
    return x.reshape(*x.shape[:3], *sizes, *x.shape[4:])


def _assign_low_bins(spec: mx.array, low: mx.array, num_freqs: int) -> mx.array:
    """df's `spec[..., :num_freqs, :] = low` (broadcasting `low` into the slice), out of place."""
    head = spec[..., :num_freqs, :]
    try:
        low = mx.broadcast_to(low, head.shape)
    except ValueError:
        raise ValueError(f"filtered bins of shape {low.shape} do not fit spec[..., :{num_freqs}, :] of shape "
                         f"{head.shape}") from None
    return mx.concatenate([low.astype(spec.dtype), spec[..., num_freqs:, :]], axis=-2)


def _split_frames(coefs: mx.array, frame_size: int) -> mx.array:
    """df's `coefs.view(B, -1, frame_size, *coefs.shape[2:])`: [B, C*N, ...] -> [B, C, N, ...]."""
    if coefs.ndim < 2 or coefs.shape[1] % frame_size:
        raise ValueError(f"coefs need [B, C*{frame_size}, ...] (a multiple of frame_size on axis 1), "
                         f"got shape {coefs.shape}")
    return coefs.reshape(coefs.shape[0], -1, frame_size, *coefs.shape[2:])


class _TimePad(nn.Module):
    """df's `ConstantPad2d((0, 0, before, after))` (complex [B, C, T, F]: axis -2) or
    `ConstantPad3d((0, 0, 0, 0, before, after))` ([B, C, T, F, 2]: axis -3); a negative
    `before` (lookahead >= frame_size) crops, as in torch."""

    def __init__(self, before: int, after: int, axis: int):
        super().__init__()
        self.before, self.after, self.axis = before, after, axis

    def __call__(self, x: mx.array) -> mx.array:
        return pad_axis(x, self.axis, self.before, self.after)


class MultiFrameModule(nn.Module):
    """Base of the multi-frame filters: pads `frame_size - 1 - lookahead` past and `lookahead`
    future frames and unfolds the spectrum over time. No extra padding for the lookahead."""

    def __init__(self, num_freqs: int, frame_size: int, lookahead: int = 0, real: bool = False):
        super().__init__()
        self.num_freqs = num_freqs
        self.frame_size = frame_size
        self.real = real
        self.pad = _TimePad(frame_size - 1 - lookahead, lookahead, -3 if real else -2)
        self.need_unfold = frame_size > 1
        self.lookahead = lookahead

    def spec_unfold_real(self, spec: mx.array) -> mx.array:
        """[B, C, T, F, 2] -> [B, C, N, T, F, 2]; for frame_size 1 df returns [B, C, T, F, 2, 1]."""
        if self.need_unfold:
            if spec.ndim != 5:
                raise ValueError(f"spec_unfold_real expects [B, C, T, F, 2], got shape {spec.shape}")
            return _unfold(self.pad(spec), -3, self.frame_size).transpose(0, 1, 5, 2, 3, 4)
        return spec[..., None]

    def spec_unfold(self, spec: mx.array) -> mx.array:
        """Pads and unfolds complex [B, C, T, F] -> [B, C, T, F, N]."""
        if self.need_unfold:
            return _unfold(self.pad(spec), 2, self.frame_size)
        return spec[..., None]

    @staticmethod
    def solve(Rxx: mx.array, rss: mx.array, diag_eps: float = 1e-8, eps: float = 1e-7) -> mx.array:
        """inverse(_tik_reg(Rxx, diag_eps, eps)) @ rss for complex [..., N, N] and [..., N]."""
        return mx.einsum("...nm,...m->...n", _complex_inv(_tik_reg(Rxx, diag_eps, eps)), rss)

    @staticmethod
    def apply_coefs(spec: mx.array, coefs: mx.array) -> mx.array:
        """sum_n spec[..., n] * coefs[..., n] (no conjugation, as df)."""
        return mx.einsum("...n,...n->...", spec, coefs)


def _outer_conj(xw: mx.array) -> mx.array:
    """df's `einsum("...n,...m->...mn", x, x.conj())`: R[m, n] = x[n] conj(x[m])."""
    return xw[..., None, :] * mx.conj(xw)[..., :, None]


def psd(x: mx.array, n: int) -> mx.array:
    """Correlation matrices X X^H over `n` frames: complex [B, C, T, F] -> [B, C, T, F, n, n]."""
    if x.ndim < 2:
        raise ValueError(f"psd expects a complex [..., T, F] spectrogram, got shape {x.shape}")
    return _outer_conj(_unfold(pad_axis(x, -2, n - 1, 0), -2, n))


def df(spec: mx.array, coefs: mx.array) -> mx.array:
    """Deep filter: complex spec [B, C, T, F, N] and coefs [B, C, N, T, F] -> [B, C, T, F]."""
    return mx.einsum("...tfn,...ntf->...tf", spec, coefs)


def df_real(spec: mx.array, coefs: mx.array) -> mx.array:
    """Deep filter on real views: spec and coefs [B, C, N, T, F, 2] -> [B, C, T, F, 2]. As df,
    the output shape comes from `spec` and the products broadcast into it."""
    if spec.ndim != 6:
        raise ValueError(f"df_real expects spec of shape [B, C, N, T, F, 2], got {spec.shape}")
    b, c, _, t, f, _ = spec.shape

    def part(i: int, j: int) -> mx.array:
        return (spec[..., i] * coefs[..., j]).sum(axis=2)

    try:
        re = mx.broadcast_to(part(0, 0) - part(1, 1), (b, c, t, f))
        im = mx.broadcast_to(part(0, 1) + part(1, 0), (b, c, t, f))
    except ValueError:
        raise ValueError(f"df_real: coefs of shape {coefs.shape} do not match spec of shape {spec.shape}") from None
    return mx.stack([re, im], axis=-1)


def _real_pairs(x: mx.array) -> bool:
    return not mx.issubdtype(x.dtype, mx.complexfloating) and x.ndim >= 2 and x.shape[-1] == 2


@mx.compile
def _deep_filter_pairs(spec: mx.array, coefs: mx.array, conj_sign: float) -> mx.array:
    """sum_n spec[..., n] * coefs[..., n] for complex numbers as (re, im) on axis -2: [..., 2, N]."""
    s_re, s_im = spec[..., 0, :], spec[..., 1, :]
    c_re, c_im = coefs[..., 0, :], coefs[..., 1, :] * conj_sign
    return mx.stack([(s_re * c_re - s_im * c_im).sum(-1), (s_re * c_im + s_im * c_re).sum(-1)], axis=-1)


class DF(MultiFrameModule):
    """Deep filtering of the lowest `num_freqs` bins: spec [B, C, T, F, 2], coefs
    [B, C*N, T, F', 2] -> spec with those bins filtered."""

    def __init__(self, num_freqs: int, frame_size: int, lookahead: int = 0, conj: bool = False):
        super().__init__(num_freqs, frame_size, lookahead)
        self.conj = conj

    def __call__(self, spec: mx.array, coefs: mx.array) -> mx.array:
        if _real_pairs(spec) and _real_pairs(coefs) and self.need_unfold:
            if folds_layers() and self._native_fits(spec, coefs):
                return _native_deep_filter(self.num_freqs, self.frame_size, self.pad.before, self.pad.after,
                                           self.conj)(spec, coefs)
            return _filter_real_pairs(spec, coefs, self.pad, self.num_freqs, self.frame_size, self.conj)
        spec_u = self.spec_unfold(as_complex(spec))
        coefs = _split_frames(as_complex(coefs), self.frame_size)
        spec_f = _narrow(spec_u, -2, self.num_freqs, "DF")
        if self.conj:
            coefs = mx.conj(coefs)
        return _assign_low_bins(spec, as_real(df(spec_f, coefs)), self.num_freqs)

    def _native_fits(self, spec: mx.array, coefs: mx.array) -> bool:
        """Whether the native deep filter computes this call: spec [B, C, T, F >= F', 2], coefs
        [B, C*N, T, F', 2] with F' = num_freqs, float32 on the CPU. Outside `layer_by_layer()`
        only, so that the parity tracer still sees the padding."""
        return (spec.ndim == coefs.ndim == 5 and coefs.shape[0] == spec.shape[0]
                and coefs.shape[1] == spec.shape[1] * self.frame_size and coefs.shape[2] == spec.shape[2]
                and coefs.shape[3] == self.num_freqs <= spec.shape[3] and spec.size > 0
                and _native.usable(spec, coefs))


def _filter_real_pairs(spec: mx.array, coefs: mx.array, pad, num_freqs: int, frame_size: int,
                       conj: bool) -> mx.array:
    """DF on [..., 2] pairs in MLX ops: only the filtered bins are unfolded and the complex
    products are written out in real arithmetic in one compiled kernel (MLX's CPU complex64 ops
    and gathers are slow); the products and their sum over the frames are the complex einsum's.
    The padding `pad` stays df's complex one (the parity tracer compares DF.pad's output)."""
    padded = as_real(_narrow(pad(as_complex(spec)), -1, num_freqs, "DF"))  # [B, C, T', F', 2]
    spec_u = _unfold(padded, -3, frame_size)
    coefs = mx.moveaxis(_split_frames(coefs, frame_size), 2, -1)  # [B, C, T, F', 2, N]
    return _assign_low_bins(spec, _deep_filter_pairs(spec_u, coefs, -1.0 if conj else 1.0), num_freqs)


@functools.lru_cache(maxsize=None)
def _native_deep_filter(num_freqs: int, frame_size: int, before: int, after: int, conj: bool):
    """The native deep filter (native/deep_filter.h) for one geometry, whose gradient is
    `_filter_real_pairs`'s."""

    pad = _TimePad(before, after, -2)

    def pure(spec, coefs):
        return _filter_real_pairs(spec, coefs, pad, num_freqs, frame_size, conj)

    @_native.differentiable
    def deep_filter(spec, coefs):
        return _native.module.deep_filter(spec, coefs, frame_size, before, conj)

    @deep_filter.vjp
    def deep_filter_vjp(primals, cotangent, _output):
        return tuple(mx.vjp(pure, list(primals), [cotangent])[1])

    return deep_filter


class DFreal(MultiFrameModule):
    """`DF` in real arithmetic only. `conj` has no effect: df conjugates a real tensor (a no-op).
    With frame_size 1 df's unfold leaves [B, C, T, F, 2, 1], which `df_real` reads as
    [B, C, N, T, F, 2]; this port keeps that, so it fails (or not) for the same shapes."""

    def __init__(self, num_freqs: int, frame_size: int, lookahead: int = 0, conj: bool = False):
        super().__init__(num_freqs, frame_size, lookahead, real=True)
        self.conj = conj

    def __call__(self, spec: mx.array, coefs: mx.array) -> mx.array:
        """spec [B, C, T, F, 2], coefs [B, C*N, T, F', 2]."""
        spec_f = _narrow(self.spec_unfold_real(spec), -2, self.num_freqs, "DFreal")
        coefs = _split_frames(coefs, self.frame_size)
        return _assign_low_bins(spec, df_real(spec_f, coefs), self.num_freqs)


class CRM(MultiFrameModule):
    """Complex ratio mask. Like df's, it defines `forward_impl` only and is not callable."""

    def __init__(self, num_freqs: int, frame_size: int = 1, lookahead: int = 0):
        if frame_size != 1 or lookahead != 0:
            raise ValueError(f"CRM needs frame_size 1 and lookahead 0, got {(frame_size, lookahead)}")
        super().__init__(num_freqs, 1)

    def forward_impl(self, spec: mx.array, coefs: mx.array) -> mx.array:
        return (spec.squeeze(-1) if spec.shape[-1] == 1 else spec) * coefs


class _MfFilter(MultiFrameModule):
    """Shared parts of `MfWf` and `MfMvdr`: the (inverse) covariance input in its four forms
    (plain or Cholesky factor, inverse or not), the constraints df enforces, the solve."""

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
        return self.r_factors[(bool(self.inverse), bool(self.cholesky_decomp))]

    def constrain(self, r: mx.array) -> mx.array:
        """The covariance input [B, T, F, N*N*2] as df's forward leaves the caller's tensor:
        a zero upper triangle for a Cholesky factor; a real diagonal and an upper triangle
        conjugate to the lower for a plain covariance (enforce_constraints only)."""
        if not self.enforce_constraints or (self.inverse and not self.cholesky_decomp):
            return r
        n = self.frame_size
        c = as_complex(_unflatten(r, (n, n, 2), type(self).__name__))
        rows, cols = mx.arange(n)[:, None], mx.arange(n)[None]
        low = c * (rows > cols)
        if self.cholesky_decomp:
            c = low + c * (rows == cols)
        else:
            c = low + mx.real(c) * (rows == cols) + _conj_t(low)
        return as_real(c).reshape(r.shape)

    def _covariance(self, r: mx.array) -> mx.array:
        """[B, T, F, N*N*2] -> complex [B, T, F, N, N], constrained, Cholesky factor expanded."""
        n = self.frame_size
        r = as_complex(_unflatten(self.constrain(r), (n, n, 2), type(self).__name__))
        return r @ _conj_t(r) if self.cholesky_decomp else r

    def _ifc(self, ifc: mx.array) -> mx.array:
        return as_complex(_unflatten(ifc, (self.frame_size, 2), type(self).__name__))

    def _r_inv_ifc(self, r: mx.array, ifc: mx.array) -> mx.array:
        """R^-1 ifc: solved after Tikhonov regularisation, or multiplied for an inverse input."""
        if not self.inverse:
            return _complex_solve(_tik_reg(r, self.dload, self.eps), ifc)
        return mx.einsum("...nm,...m->...n", r, ifc)

    def _filter(self, spec: mx.array, w: mx.array) -> mx.array:
        """Apply weights [B, T, F', N] to the unfolded spec [B, C, T, F, 2] (all channels)."""
        spec_f = _narrow(self.spec_unfold(as_complex(spec)), -2, self.num_freqs, type(self).__name__)
        return _assign_low_bins(spec, as_real(self.apply_coefs(spec_f, w[:, None])), self.num_freqs)


class MfWf(_MfFilter):
    """Multi-frame Wiener filter from the (inverse) noisy covariance and the speech IFC vector."""

    r_factors = {(True, True): 2e3, (True, False): 3e7, (False, True): 2e-4, (False, False): 5e-6}

    def __call__(self, spec: mx.array, ifc: mx.array, iRxx: mx.array) -> mx.array:
        """spec [B, C, T, F, 2]; ifc [B, T, F', N*2]; iRxx [B, T, F', N*N*2] -> spec."""
        return self._filter(spec, self._r_inv_ifc(self._covariance(iRxx), self._ifc(ifc)))


class MfMvdr(_MfFilter):
    """Multi-frame MVDR filter from the (inverse) noise covariance and the speech IFC vector."""

    r_factors = {(True, True): 2e4, (True, False): 3e8, (False, True): 5e-5, (False, False): 1e-6}

    def __call__(self, spec: mx.array, ifc: mx.array, iRnn: mx.array) -> mx.array:
        """spec [B, C, T, F, 2]; ifc [B, T, F', N*2]; iRnn [B, T, F', N*N*2] -> spec."""
        ifc = self._ifc(ifc)
        numerator = self._r_inv_ifc(self._covariance(iRnn), ifc)
        denominator = mx.einsum("...n,...n->...", mx.conj(ifc), numerator)
        scale = mx.conj(ifc[..., -1:])
        return self._filter(spec, numerator * scale / (mx.real(denominator)[..., None] + self.eps))


def _conj_t(a: mx.array) -> mx.array:
    return mx.conj(mx.swapaxes(a, -1, -2))


@mx.custom_function
def _solve(a: mx.array, b: mx.array) -> mx.array:
    """Real a^-1 b for [..., n, n] and [..., n, k] (MLX's solve has no VJP)."""
    return mx.linalg.solve(a, b, stream=mx.cpu)


@_solve.vjp
def _solve_vjp(primals, cotangent, output):
    grad_b = mx.linalg.solve(mx.swapaxes(primals[0], -1, -2), cotangent, stream=mx.cpu)
    return -(grad_b @ mx.swapaxes(output, -1, -2)), grad_b


def _real_embedding(a: mx.array) -> mx.array:
    """Complex [..., N, N] -> real [..., 2N, 2N] [[Re, -Im], [Im, Re]]."""
    re, im = mx.real(a), mx.imag(a)
    return mx.concatenate([mx.concatenate([re, -im], -1), mx.concatenate([im, re], -1)], -2)


def _complex_solve_mat(a: mx.array, b: mx.array) -> mx.array:
    """Complex a^-1 b for [..., N, N] and real-stacked b [..., 2N, K] -> complex [..., N, K]."""
    n = a.shape[-1]
    x = _solve(_real_embedding(a), b)
    return x[..., :n, :] + 1j * x[..., n:, :]


def _complex_solve(a: mx.array, b: mx.array) -> mx.array:
    """torch.linalg.solve(a, b) for complex [..., N, N] and [..., N]."""
    rhs = mx.concatenate([mx.real(b), mx.imag(b)], axis=-1)[..., None]
    return _complex_solve_mat(a, rhs)[..., 0]


def _complex_inv(a: mx.array) -> mx.array:
    """torch.inverse(a) for complex [..., N, N] (solving against the identity, as torch)."""
    n = a.shape[-1]
    eye = mx.concatenate([mx.eye(n), mx.zeros((n, n))], axis=0)
    return _complex_solve_mat(a, mx.broadcast_to(eye, (*a.shape[:-2], 2 * n, n)))


def _compute_mat_trace(input: mx.array, dim1: int = -2, dim2: int = -1) -> mx.array:
    """Trace over two equal-sized axes (df copies it from torchaudio)."""
    if input.ndim < 2:
        raise ValueError("The dimension of the tensor must be at least 2.")
    if input.shape[dim1] != input.shape[dim2]:
        raise ValueError(f"The size of ``dim1`` and ``dim2`` must be the same, got shape {input.shape}")
    return mx.sum(mx.diagonal(input, 0, dim1, dim2), axis=-1)


def _tik_reg(mat: mx.array, reg: float = 1e-7, eps: float = 1e-8) -> mx.array:
    """Tikhonov regularisation of [..., C, C]: adds Re(trace) * reg + eps on the diagonal."""
    epsilon = mx.real(_compute_mat_trace(mat))[..., None, None] * reg + eps
    return mat + epsilon * mx.eye(mat.shape[-1])


def compute_corr(X: mx.array, N: int) -> mx.array:
    """Correlation matrices over N frames of a complex [C, T, F] spectrogram -> [C, T, F, N, N]
    (df pads axis -2 and unfolds axis 1)."""
    return _outer_conj(_unfold(pad_axis(X, -2, N - 1, 0), 1, N))
