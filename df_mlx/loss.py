"""Training losses of `df.loss` in MLX (differentiable with `mx.grad`).

Spectra are `[..., 2]` real views or complex64 arrays as in df; magnitudes are computed as
sqrt(re^2 + im^2) so gradients stay real-valued. `Stft`/`Istft` reproduce `torch.stft` /
`torch.istft` with df's arguments (centred frames, reflect padding, `normalized=True`).
"""

import warnings
from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from df_mlx.config import Csv, config
from df_mlx.model import ModelParams
from df_mlx.modules import LocalSnrTarget, Mask, _hann_window, erb_fb
from df_mlx.utils import angle, as_complex
from df_mlx.io import resample  # noqa: F401  (re-exported, as df.loss)
from df_mlx.libdf import DF  # noqa: F401  (re-exported, as df.loss)
from df_mlx.stoi import stoi  # noqa: F401  (re-exported, as df.loss)
from df_mlx.utils import get_device  # noqa: F401  (re-exported, as df.loss)


def _abs(x: mx.array) -> mx.array:
    return mx.abs(as_complex(x))


def wg(S: mx.array, X: mx.array, eps: float = 1e-10) -> mx.array:
    """Wiener gain |S|^2 / (|S|^2 + |X - S|^2)."""
    ss, nn_ = mx.square(_abs(S)), mx.square(_abs(X - S))
    return mx.clip(ss / (ss + nn_ + eps), 0, 1)


def irm(S: mx.array, X: mx.array, eps: float = 1e-10) -> mx.array:
    """Ideal ratio mask |S| / (|S| + |X - S|)."""
    s, n = _abs(S), _abs(X - S)
    return mx.clip(s / (s + n + eps), 0, 1)


def iam(S: mx.array, X: mx.array, eps: float = 1e-10) -> mx.array:
    """Ideal amplitude mask |S| / |X|."""
    return mx.clip(_abs(S) / (_abs(X) + eps), 0, 1)


def _mean(x: mx.array) -> mx.array:
    """Mean with a two-level sum: MLX's CPU reduction accumulates in one float32 running sum,
    which loses up to ~1e-4 relative on large losses; blocks of 1024 keep it near torch's."""
    flat = x.reshape(-1)
    n = flat.shape[0]
    block = 1024
    pad = (-n) % block
    if pad:
        flat = mx.concatenate([flat, mx.zeros((pad,), dtype=flat.dtype)])
    return flat.reshape(-1, block).sum(axis=1).sum() / n


def _mse(a: mx.array, b: mx.array) -> mx.array:
    return _mean(mx.square(a - b))


def _view_as_real(x: mx.array) -> mx.array:
    return mx.stack([mx.real(x), mx.imag(x)], axis=-1)


class Stft(nn.Module):
    """`torch.stft(x, n_fft, hop, window, center=True, pad_mode="reflect", normalized=True,
    return_complex=True)` on [..., T] -> complex [..., F, frames] (`normalized=False`: without
    the 1/sqrt(n_fft))."""

    def __init__(self, n_fft: int, hop: Optional[int] = None, window: Optional[mx.array] = None,
                 normalized: bool = True):
        super().__init__()
        self.n_fft = n_fft
        self.scale = 1 / np.sqrt(n_fft) if normalized else 1.0
        self.hop = hop or n_fft // 4
        if window is not None and window.shape[0] != n_fft:
            raise ValueError(f"window has {window.shape[0]} samples, expected n_fft={n_fft}")
        self.w = window if window is not None else _hann_window(n_fft)
        self.freeze(keys=["w"], recurse=False)

    def __call__(self, input: mx.array) -> mx.array:
        t = input.shape[-1]
        sh = input.shape[:-1]
        x = input.reshape(-1, t)
        half = self.n_fft // 2
        left = x[:, 1 : half + 1][:, ::-1]
        right = x[:, t - half - 1 : t - 1][:, ::-1]
        x = mx.concatenate([left, x, right], axis=1)
        frames = (x.shape[1] - self.n_fft) // self.hop + 1
        idx = mx.arange(frames)[:, None] * self.hop + mx.arange(self.n_fft)[None]
        spec = mx.fft.rfft(x[:, idx] * self.w, axis=-1)
        spec = spec * self.scale if self.scale != 1.0 else spec
        return spec.swapaxes(-1, -2).reshape(*sh, self.n_fft // 2 + 1, frames)


class Istft(nn.Module):
    """Inverse of df's `Istft`: `torch.istft(normalized=True)` of [..., T, F(, 2)] spectra
    with one zero frame appended, as df does, to recover the signal's length."""

    def __init__(self, n_fft_inv: int, hop_inv: int, window_inv: mx.array):
        super().__init__()
        if window_inv.shape[0] != n_fft_inv:
            raise ValueError(f"window has {window_inv.shape[0]} samples, expected n_fft_inv={n_fft_inv}")
        self.n_fft_inv = n_fft_inv
        self.hop_inv = hop_inv
        self.w_inv = window_inv
        self.freeze(keys=["w_inv"], recurse=False)

    def __call__(self, input: mx.array) -> mx.array:
        input = as_complex(input)
        t, f = input.shape[-2:]
        sh = input.shape[:-2]
        spec = mx.concatenate([input.reshape(-1, t, f), mx.zeros((int(np.prod(sh)) if sh else 1, 1, f),
                                                                   dtype=input.dtype)], axis=1)
        n, hop, w = self.n_fft_inv, self.hop_inv, self.w_inv
        frames = mx.fft.irfft(spec * np.sqrt(n), n=n, axis=-1) * w  # [B, T+1, n]
        count = spec.shape[1]
        length = n + hop * (count - 1)
        idx = (mx.arange(count)[:, None] * hop + mx.arange(n)[None]).reshape(-1)
        out = mx.zeros((frames.shape[0], length), dtype=frames.dtype).at[:, idx].add(frames.reshape(frames.shape[0], -1))
        env = mx.zeros((length,), dtype=w.dtype).at[idx].add(mx.tile(mx.square(w), (count,)))
        half = n // 2
        out = out[:, half : length - half] / env[half : length - half]
        return out.reshape(*sh, -1) if input.ndim > 2 else out


class MultiResSpecLoss(nn.Module):
    """Magnitude (and optionally complex) MSE over several STFT resolutions."""

    def __init__(self, n_ffts: Iterable[int], gamma: float = 1, factor: float = 1,
                 f_complex: Optional[Union[float, Iterable[float]]] = None):
        super().__init__()
        self.gamma = gamma
        self.f = factor
        self.stfts = {str(n_fft): Stft(n_fft) for n_fft in n_ffts}
        if f_complex is None or f_complex == 0:
            self.f_complex = None
        elif isinstance(f_complex, Iterable):
            self.f_complex = list(f_complex)
        else:
            self.f_complex = [f_complex] * len(self.stfts)

    def __call__(self, input: mx.array, target: mx.array) -> mx.array:
        loss = mx.zeros(())
        for i, stft in enumerate(self.stfts.values()):
            y, s = stft(input), stft(target)
            y_abs, s_abs = _abs(y), _abs(s)
            if self.gamma != 1:
                y_abs = mx.power(mx.maximum(y_abs, 1e-12), self.gamma)
                s_abs = mx.power(mx.maximum(s_abs, 1e-12), self.gamma)
            loss = loss + _mse(y_abs, s_abs) * self.f
            if self.f_complex is not None:
                if self.gamma != 1:
                    y = y_abs * mx.exp(1j * angle.apply(y))
                    s = s_abs * mx.exp(1j * angle.apply(s))
                loss = loss + _mse(_view_as_real(y), _view_as_real(s)) * self.f_complex[i]
        return loss


class SpectralLoss(nn.Module):
    """Compressed-magnitude MSE (+ complex MSE), with extra weight on under-estimation."""

    def __init__(self, gamma: float = 1, factor_magnitude: float = 1, factor_complex: float = 1,
                 factor_under: float = 1):
        super().__init__()
        self.gamma = gamma
        self.f_m = factor_magnitude
        self.f_c = factor_complex
        self.f_u = factor_under

    def __call__(self, input: mx.array, target: mx.array) -> mx.array:
        input, target = as_complex(input), as_complex(target)
        input_abs, target_abs = _abs(input), _abs(target)
        if self.gamma != 1:
            input_abs = mx.power(mx.maximum(input_abs, 1e-12), self.gamma)
            target_abs = mx.power(mx.maximum(target_abs, 1e-12), self.gamma)
        tmp = mx.square(input_abs - target_abs)
        if self.f_u != 1:
            tmp = tmp * mx.where(input_abs < target_abs, self.f_u, 1.0)
        loss = _mean(tmp) * self.f_m
        if self.f_c > 0:
            if self.gamma != 1:
                input = input_abs * mx.exp(1j * angle.apply(input))
                target = target_abs * mx.exp(1j * angle.apply(target))
            loss = loss + _mse(_view_as_real(input), _view_as_real(target)) * self.f_c
        return loss


class MaskLoss(nn.Module):
    """Compressed ERB-band mask MSE against an ideal mask (wg, irm, iam) or the clean spectrum."""

    def __init__(self, df_state, mask: str = "iam", gamma: float = 0.6, powers: List[int] = [2],
                 factors: List[float] = [1], f_under: float = 1, eps=1e-12, factor: float = 1.0,
                 gamma_pred: Optional[float] = None, f_max_idx: Optional[int] = None):
        super().__init__()
        masks = {"wg": wg, "irm": irm, "iam": iam, "spec": None}
        if mask not in masks:
            raise ValueError(f"Unsupported mask function: {mask}.")
        self.mask_fn = masks[mask]
        self.gamma = gamma
        self.gamma_pred = gamma if gamma_pred is None else gamma_pred
        self.powers = powers
        self.factors = factors
        self.f_under = f_under
        self.eps = eps
        self.factor = factor
        self.f_max_idx = f_max_idx
        sr = ModelParams().sr
        self.erb_fb = erb_fb(df_state.erb_widths(), sr)
        self.erb_inv_fb = erb_fb(df_state.erb_widths(), sr, inverse=True)
        self.freeze(keys=["erb_fb", "erb_inv_fb"], recurse=False)

    def erb_mask_compr(self, clean: mx.array, noisy: mx.array, compressed: bool = True) -> mx.array:
        mask = self.erb((self.mask_fn or iam)(clean, noisy))
        return mx.power(mask, self.gamma) if compressed else mask

    def erb(self, x: mx.array, clamp_min: Optional[float] = None) -> mx.array:
        x = x @ self.erb_fb
        return x if clamp_min is None else mx.maximum(x, clamp_min)

    def erb_inv(self, x: mx.array) -> mx.array:
        return x @ self.erb_inv_fb

    def __call__(self, input: mx.array, clean: mx.array, noisy: mx.array, max_bin=None) -> mx.array:
        b, _, _, f = input.shape
        if not bool(mx.all(mx.isfinite(input)).item()):
            raise ValueError("Input is NaN")
        if bool((input.min() < 0).item()):
            raise ValueError("MaskLoss expects a non-negative mask")
        if self.mask_fn is not None:
            g_t = self.erb_mask_compr(clean, noisy, compressed=True)
            g_p = mx.power(mx.maximum(input, self.eps), self.gamma_pred)
        else:
            g_t = mx.power(self.erb(_abs(clean)), self.gamma)
            g_p = mx.power(self.erb(_abs(noisy)) * input, self.gamma_pred)
        if self.f_max_idx is not None:
            g_t, g_p = g_t[..., : self.f_max_idx], g_p[..., : self.f_max_idx]
        tmp = mx.square(g_t - g_p)
        if self.f_under != 1:
            tmp = tmp * mx.where(g_p < g_t, self.f_under, 1.0)
        if max_bin is not None:
            keep = mx.arange(f)[None] < mx.array(np.asarray(max_bin)).reshape(-1, 1)
            tmp = tmp * keep.reshape(b, 1, 1, f)
        loss = mx.zeros(())
        for power, factor in zip(self.powers, self.factors):
            loss = loss + _mean(mx.power(mx.maximum(tmp, 1e-13), power // 2)) * factor * self.factor
        return loss


class MaskSpecLoss(nn.Module):
    """SpectralLoss of the noisy spectrum masked by the predicted ERB mask."""

    def __init__(self, df_state, factor=1.0, gamma: float = 0.6, f_max_idx: Optional[int] = None):
        super().__init__()
        self.f_max_idx = f_max_idx
        self.apply_mask = Mask(erb_fb(df_state.erb_widths(), ModelParams().sr, inverse=True))
        self.loss = SpectralLoss(factor_magnitude=factor, gamma=gamma)

    def __call__(self, input: mx.array, clean: mx.array, noisy: mx.array) -> mx.array:
        enh = self.apply_mask(noisy, input)
        if self.f_max_idx is not None:
            enh, clean = enh[..., : self.f_max_idx], clean[..., : self.f_max_idx]
        return self.loss(enh, clean)


class DfAlphaLoss(nn.Module):
    """Penalises using deep filtering in very noisy frames and not using it in clean ones."""

    def __init__(self, factor: float = 1, lsnr_thresh: float = -7.5, lsnr_min: float = -10.0):
        super().__init__()
        self.factor = factor
        self.lsnr_thresh = lsnr_thresh
        self.lsnr_min = lsnr_min

    def __call__(self, pred_alpha: mx.array, target_lsnr: mx.array) -> mx.array:
        w = self.lsnr_mapping(target_lsnr, self.lsnr_thresh, self.lsnr_min).reshape(pred_alpha.shape)
        l_off = _mean(mx.square(pred_alpha * w))
        w = self.lsnr_mapping(target_lsnr, self.lsnr_thresh + 2.5, 0.0).reshape(pred_alpha.shape)
        l_on = 0.1 * _mean(mx.abs((1 - pred_alpha) * w))
        return l_off + l_on

    def lsnr_mapping(self, lsnr: mx.array, lsnr_thresh: float, lsnr_min: Optional[float] = None) -> mx.array:
        """Map lsnr_min to 1 and lsnr_thresh to 0, linearly, clipped."""
        lsnr_min = float(self.lsnr_min) if lsnr_min is None else lsnr_min
        a_ = 1 / (lsnr_thresh - lsnr_min)
        b_ = -a_ * lsnr_min
        return 1 - mx.clip(a_ * lsnr + b_, 0.0, 1.0)


class SiSdr(nn.Module):
    """Scale-invariant SDR in dB per signal of [B, T] (or [..., T]) input."""

    def __call__(self, input: mx.array, target: mx.array) -> mx.array:
        eps = float(np.finfo(np.float32).eps)
        t = input.shape[-1]
        target, input = target.reshape(-1, t), input.reshape(-1, t)
        rss = mx.sum(target * target, axis=-1, keepdims=True)
        a = (mx.sum(target * input, axis=-1, keepdims=True) + eps) / (rss + eps)
        e_true = a * target
        e_res = input - e_true
        sss, snn = mx.sum(mx.square(e_true), axis=-1), mx.sum(mx.square(e_res), axis=-1)
        return 10 * mx.log10((sss + eps) / (snn + eps))


class SdrLoss(nn.Module):
    def __init__(self, factor=0.2):
        super().__init__()
        self.factor = factor
        self.sdr = SiSdr()

    def __call__(self, input: mx.array, target: mx.array) -> mx.array:
        if self.factor == 0:
            return mx.zeros(())
        return -self.sdr(input, target).mean() * self.factor


def _unfold(x: mx.array, size: int, step: int) -> mx.array:
    """torch's `x.unfold(-1, size, step)`: [..., n, size]."""
    n = (x.shape[-1] - size) // step + 1
    idx = mx.arange(n)[:, None] * step + mx.arange(size)[None]
    return x[..., idx]


class SegSdrLoss(nn.Module):
    """Negative SI-SDR averaged over segments of each window size."""

    def __init__(self, window_sizes: List[int], factor: float = 0.2, overlap: float = 0):
        super().__init__()
        self.window_sizes = window_sizes
        self.factor = factor
        self.hop = 1 - overlap
        self.sdr = SiSdr()

    def __call__(self, input: mx.array, target: mx.array) -> mx.array:
        if self.factor == 0:
            return mx.zeros(())
        loss = mx.zeros(())
        for ws in self.window_sizes:
            if ws > input.shape[-1]:
                warnings.warn(f"Input size {input.shape[-1]} smaller than window size. Adjusting window size.")
                ws = input.shape[1]
            step = int(self.hop * ws)
            loss = loss + self.sdr(_unfold(input, ws, step).reshape(-1, ws), _unfold(target, ws, step).reshape(-1, ws)).mean()
        return -loss * self.factor


class LocalSnrLoss(nn.Module):
    def __init__(self, factor: float = 1):
        super().__init__()
        self.factor = factor

    def __call__(self, input: mx.array, target_lsnr: mx.array) -> mx.array:
        return _mse(input.squeeze(-1), target_lsnr) * self.factor


GAN_LOSS_TYPES = ("lsgan", "vanilla", "hinge")


def _check_gan_type(loss_type: str) -> str:
    if loss_type not in GAN_LOSS_TYPES:
        raise ValueError(f"Unknown loss type: {loss_type} (known: {', '.join(GAN_LOSS_TYPES)})")
    return loss_type


def _log_sigmoid(x: mx.array) -> mx.array:
    """log(sigmoid(x) + 1e-10) as the fork writes its vanilla GAN terms (floored, not log-sigmoid)."""
    return mx.log(mx.sigmoid(x) + 1e-10)


class FeatureMatchingLoss(nn.Module):
    """DFNet4 fork: factor * sum of L1 distances between discriminator feature maps of real and
    generated audio (no gradient into the real ones), for stable generator gradients."""

    def __init__(self, factor: float = 2.0):
        super().__init__()
        self.factor = factor

    def __call__(self, real_fmaps: List[List[mx.array]], fake_fmaps: List[List[mx.array]]) -> mx.array:
        loss = mx.zeros(())
        for real_list, fake_list in zip(real_fmaps, fake_fmaps):
            for real, fake in zip(real_list, fake_list):
                loss = loss + _mean(mx.abs(fake - mx.stop_gradient(real)))
        return self.factor * loss


class GeneratorLoss(nn.Module):
    """DFNet4 fork: adversarial loss of the generator (lsgan, vanilla or hinge) summed over
    the discriminators' scores for generated audio."""

    def __init__(self, loss_type: str = "lsgan", factor: float = 1.0):
        super().__init__()
        self.loss_type = _check_gan_type(loss_type)
        self.factor = factor

    def __call__(self, fake_scores: List[mx.array]) -> mx.array:
        loss = mx.zeros(())
        for fake in fake_scores:
            if self.loss_type == "lsgan":
                loss = loss + _mean(mx.square(1 - fake))
            elif self.loss_type == "vanilla":
                loss = loss - _mean(_log_sigmoid(fake))
            else:
                loss = loss - _mean(fake)
        return self.factor * loss


class DiscriminatorLoss(nn.Module):
    """DFNet4 fork: adversarial loss of the discriminator; returns (factor * total, real part)."""

    def __init__(self, loss_type: str = "lsgan", factor: float = 1.0):
        super().__init__()
        self.loss_type = _check_gan_type(loss_type)
        self.factor = factor

    def __call__(self, real_scores: List[mx.array], fake_scores: List[mx.array]):
        d_loss, d_real_loss = mx.zeros(()), mx.zeros(())
        for real, fake in zip(real_scores, fake_scores):
            if self.loss_type == "lsgan":
                r_loss, f_loss = _mean(mx.square(1 - real)), _mean(mx.square(fake))
            elif self.loss_type == "vanilla":
                r_loss = -_mean(_log_sigmoid(real))
                f_loss = -_mean(mx.log(1 - mx.sigmoid(fake) + 1e-10))
            else:
                r_loss, f_loss = _mean(mx.maximum(1 - real, 0)), _mean(mx.maximum(1 + fake, 0))
            d_loss = d_loss + r_loss + f_loss
            d_real_loss = d_real_loss + r_loss
        return self.factor * d_loss, d_real_loss


class SpeakerContrastiveLoss(nn.Module):
    """DFNet4 fork: factor * (negative_weight * mean cos(enh, noisy) - mean cos(enh, clean))
    over speaker embeddings ([B, T] audio, resemblyzer's VoiceEncoder, df_mlx.speaker_encoder).
    As in the fork, every embedding is computed from a detached copy of the audio, so the loss
    passes no gradient to the model. Without resemblyzer's weights it warns once and is zero,
    as the fork's is without resemblyzer."""

    def __init__(self, factor: float = 0.1, negative_weight: float = 0.1):
        super().__init__()
        self.factor = factor
        self.negative_weight = negative_weight
        self._encoder = None
        self._encoder_loaded = False

    def _embeddings(self, audio: mx.array) -> mx.array:
        batch = np.array(audio, dtype=np.float32)
        return mx.array(np.stack([self._encoder.embed_utterance(wav) for wav in batch]))

    def __call__(self, enhanced: mx.array, clean: mx.array, noisy: Optional[mx.array] = None) -> mx.array:
        if not self._encoder_loaded:
            from df_mlx.speaker_encoder import SpeakerEncoderError, VoiceEncoder

            self._encoder_loaded = True
            try:
                self._encoder = VoiceEncoder()
            except SpeakerEncoderError as e:
                warnings.warn(f"{e}. SpeakerContrastiveLoss will be disabled.")
        if self._encoder is None:
            return mx.zeros(())
        enhanced_emb = self._embeddings(enhanced)
        loss = -_cosine_similarity(enhanced_emb, self._embeddings(clean)).mean()
        if noisy is not None and self.negative_weight > 0:
            loss = loss + self.negative_weight * _cosine_similarity(enhanced_emb, self._embeddings(noisy)).mean()
        return self.factor * loss


def _cosine_similarity(a: mx.array, b: mx.array, eps: float = 1e-8) -> mx.array:
    """torch's F.cosine_similarity over the last axis."""
    norms = mx.maximum(mx.linalg.norm(a, axis=-1) * mx.linalg.norm(b, axis=-1), eps)
    return (a * b).sum(-1) / norms


class Loss(nn.Module):
    """The config-driven sum of df's losses (sections MaskLoss, SpectralLoss,
    MultiResSpecLoss, SdrLoss, LocalSnrLoss, ASRLoss with df's keys and defaults).

    With `store_losses`, `store_summaries` collects the non-zero loss values and the SI-SDR and
    STOI of each signal per input SNR, as df does."""

    def __init__(self, state, istft: Optional[Istft] = None):
        super().__init__()
        p = ModelParams()
        self.lsnr = LocalSnrTarget(ws=20, target_snr_range=[p.lsnr_min - 1, p.lsnr_max + 1])
        self.istft = istft
        self.sr, self.fft_size, self.nb_df = p.sr, p.fft_size, p.nb_df
        self.store_losses = False
        self.summaries: Dict[str, List[mx.array]] = self.reset_summaries()
        self.ml_f = config("factor", 0, float, section="MaskLoss")
        self.ml_mask = config("mask", "iam", str, section="MaskLoss")
        self.ml_gamma = config("gamma", 0.6, float, section="MaskLoss")
        self.ml_gamma_pred = config("gamma_pred", 0.6, float, section="MaskLoss")
        self.ml_f_under = config("f_under", 2, float, section="MaskLoss")
        ml_max_freq = config("max_freq", 0, float, section="MaskLoss")
        self.ml_f_max_idx = None if ml_max_freq == 0 else int(ml_max_freq / (p.sr / p.fft_size))
        if self.ml_mask == "spec":
            self.ml = MaskSpecLoss(state, self.ml_f, self.ml_gamma, f_max_idx=self.ml_f_max_idx)
        else:
            self.ml = MaskLoss(state, mask=self.ml_mask, factor=self.ml_f, f_under=self.ml_f_under,
                               gamma=self.ml_gamma, gamma_pred=self.ml_gamma_pred, factors=[1, 10], powers=[2, 4],
                               f_max_idx=self.ml_f_max_idx)
        self.sl_fm = config("factor_magnitude", 0, float, section="SpectralLoss")
        self.sl_fc = config("factor_complex", 0, float, section="SpectralLoss")
        self.sl_fu = config("factor_under", 1, float, section="SpectralLoss")
        self.sl_gamma = config("gamma", 1, float, section="SpectralLoss")
        self.sl_f = self.sl_fm + self.sl_fc
        self.sl = SpectralLoss(factor_magnitude=self.sl_fm, factor_complex=self.sl_fc, factor_under=self.sl_fu,
                               gamma=self.sl_gamma) if self.sl_f > 0 else None
        self.mrsl_f = config("factor", 0, float, section="MultiResSpecLoss")
        self.mrsl_fc = config("factor_complex", 0, float, section="MultiResSpecLoss")
        self.mrsl_gamma = config("gamma", 1, float, section="MultiResSpecLoss")
        self.mrsl_ffts: List[int] = config("fft_sizes", [512, 1024, 2048], Csv(int), section="MultiResSpecLoss")
        self.mrsl = None
        if self.mrsl_f > 0:
            if istft is None:
                raise ValueError("MultiResSpecLoss needs an Istft")
            self.mrsl = MultiResSpecLoss(self.mrsl_ffts, self.mrsl_gamma, self.mrsl_f, self.mrsl_fc)
        self.sdrl_f = config("factor", 0, float, section="SdrLoss")
        self.sdrl = None
        if self.sdrl_f > 0:
            ws = config("segmental_ws", [], Csv(int), section="SdrLoss")
            self.sdrl = SegSdrLoss(ws, factor=self.sdrl_f) if any(w > 0 for w in ws) else SdrLoss(self.sdrl_f)
        self.lsnr_f = config("factor", 0.0005, float, section="LocalSnrLoss")
        self.lsnrl = LocalSnrLoss(self.lsnr_f) if self.lsnr_f > 0 else None
        self.asrl_f = config("factor", 0, float, section="ASRLoss")
        self.asrl_f_lm = config("factor_lm", 0, float, section="ASRLoss")
        self.asrl_loss_lm = config("loss_lm", "CrossEntropy", str, section="ASRLoss")
        self.asrl_m = config("model", "base.en", str, section="ASRLoss")
        if self.asrl_f > 0 or self.asrl_f_lm > 0:
            raise ValueError("ASRLoss needs a Whisper model, which df-mlx does not ship (set [ASRLoss] factor = 0)")

    def __call__(self, clean: mx.array, noisy: mx.array, enhanced: mx.array, mask: mx.array, lsnr: mx.array,
                 snrs: mx.array, max_freq=None) -> mx.array:
        """Spectra [B, C, T, F] complex (or [..., 2]); mask [B, C, T, E]; lsnr [B, T, 1]."""
        lsnr_gt = self.lsnr(clean, noise=noisy - clean)
        enhanced_td = clean_td = None
        if self.istft is not None and (self.store_losses or self.mrsl is not None or self.sdrl is not None):
            enhanced_td, clean_td = self.istft(enhanced), self.istft(clean)
        zero = mx.zeros(())
        ml = self.ml(input=mask, clean=clean, noisy=noisy) if self.ml_f != 0 else zero
        sl = self.sl(input=enhanced, target=clean) if self.sl is not None and self.sl_f != 0 else zero
        mrsl = self.mrsl(enhanced_td, clean_td) if self.mrsl is not None else zero
        lsnrl = self.lsnrl(input=lsnr, target_lsnr=lsnr_gt) if self.lsnr_f != 0 else zero
        sdrl = self.sdrl(enhanced_td, clean_td) if self.sdrl_f != 0 else zero
        if self.store_losses and enhanced_td is not None:
            self.store_summaries(enhanced_td, clean_td, snrs, ml, sl, mrsl, sdrl, zero, lsnrl, zero)
        return ml + sl + mrsl + sdrl + lsnrl

    def reset_summaries(self):
        self.summaries = defaultdict(list)
        return self.summaries

    def get_summaries(self):
        return self.summaries.items()

    def store_summaries(self, enh_td: mx.array, clean_td: mx.array, snrs: mx.array, ml: mx.array, sl: mx.array,
                        mrsl: mx.array, sdrl: mx.array, asrl: mx.array, lsnrl: mx.array, cal: mx.array):
        """Record the non-zero losses and, per input SNR, each signal's SI-SDR and STOI."""
        from df_mlx.stoi import stoi

        for name, value in (("MaskLoss", ml), ("SpectralLoss", sl), ("MultiResSpecLoss", mrsl), ("SdrLoss", sdrl),
                            ("DfAlphaLoss", cal), ("ASRLoss", asrl), ("LocalSnrLoss", lsnrl)):
            if float(value) != 0:
                self.summaries[name].append(mx.stop_gradient(value))
        enh_td = mx.stop_gradient(enh_td.squeeze(1))
        clean_td = mx.stop_gradient(clean_td.squeeze(1))
        sdr_vals = np.array(SiSdr()(enh_td, target=clean_td))
        stoi_vals = np.array(stoi(y=enh_td, x=clean_td, fs_source=self.sr))
        snrs = np.array(snrs)
        for snr in np.unique(snrs):
            self.summaries[f"sdr_snr_{snr.item()}"].extend(mx.array(v) for v in sdr_vals[snrs == snr])
            self.summaries[f"stoi_snr_{snr.item()}"].extend(mx.array(v) for v in stoi_vals[snrs == snr])
