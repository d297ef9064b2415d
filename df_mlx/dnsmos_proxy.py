"""The DFNet4 fork's differentiable DNSMOS proxy (`df.dnsmos_proxy`, sealad886/DeepFilterNet4)
in MLX: a log-mel CNN that predicts SIG/BAK/OVL scores as a perceptual training loss.

Parameter and buffer names are the fork's state_dict keys (`mel_extractor.mel_fb`,
`encoder.0.conv.weight`, `sig_head.0.weight`, ...), so fork weights load as they are;
convolutions run channels-last. The fork ships no trained proxy weights: `DNSMOSLoss` loads
them from `proxy_path` (a safetensors file, or a torch state dict read with
weights_only=True).
"""

from typing import Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from df_mlx.layers import BatchNorm2d, Conv2d
from df_mlx.loss import Stft
from df_mlx.modules import Sequential, _hann_window

SCORES = ("sig", "bak", "ovl")


def _linspace_f32(start: np.float32, end: np.float32, steps: int) -> np.ndarray:
    """torch.linspace in float32: the first half counts up from start, the rest down from end."""
    step = (end - start) / np.float32(steps - 1)
    i = np.arange(steps, dtype=np.float32)
    return np.where(i < steps // 2, start + step * i, end - step * (np.float32(steps - 1) - i)).astype(np.float32)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """The fork's triangular mel filterbank [n_mels, n_fft // 2 + 1] (HTK mel scale, bins
    floor((n_fft + 1) * hz / sr), float32 as torch computes it)."""
    hz_to_mel = lambda hz: np.float32(2595) * np.log10(np.float32(1) + hz / np.float32(700))  # noqa: E731
    mel = _linspace_f32(hz_to_mel(np.float32(f_min)), hz_to_mel(np.float32(f_max)), n_mels + 2)
    hz = np.float32(700) * (np.power(np.float32(10), mel / np.float32(2595)) - np.float32(1))
    bins = np.floor(np.float32(n_fft + 1) * hz / np.float32(sample_rate)).astype(np.int64)
    n_freqs = n_fft // 2 + 1
    fb = np.zeros((n_mels, n_freqs), np.float32)
    for i in range(n_mels):
        left, center, right = (int(b) for b in bins[i : i + 3])
        for j in range(left, min(center, n_freqs)):
            fb[i, j] = (j - left) / max(center - left, 1)
        for j in range(center, min(right, n_freqs)):
            fb[i, j] = (right - j) / max(right - center, 1)
    return fb


class MelSpectrogram(nn.Module):
    """Log mel power spectrogram [B, n_mels, frames] of [B, T] or [B, 1, T] audio:
    torch.stft (centred, reflect-padded, Hann, not normalised), |X|^2, filterbank,
    log(max(., 1e-10))."""

    def __init__(self, sample_rate: int = 16000, n_fft: int = 512, hop_length: int = 256, n_mels: int = 64,
                 f_min: float = 0.0, f_max: Optional[float] = None):
        super().__init__()
        self.sample_rate, self.n_fft, self.hop_length, self.n_mels = sample_rate, n_fft, hop_length, n_mels
        self.f_max = f_max or sample_rate / 2
        self.f_min = f_min
        self.mel_fb = mx.array(mel_filterbank(sample_rate, n_fft, n_mels, f_min, self.f_max))
        self.window = _hann_window(n_fft)
        self.freeze(keys=["mel_fb", "window"], recurse=False)

    def __call__(self, audio: mx.array) -> mx.array:
        if audio.ndim == 3:
            audio = audio.squeeze(1)
        spec = Stft(self.n_fft, self.hop_length, self.window, normalized=False)(audio)
        power = mx.real(spec) ** 2 + mx.imag(spec) ** 2  # [B, F, T]
        return mx.log(mx.maximum(self.mel_fb @ power, 1e-10))


class ConvBlock(nn.Module):
    """Conv2d -> BatchNorm2d -> ReLU, channels-last."""

    trace_layout = "NHWC"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = Conv2d(in_channels, out_channels, kernel_size, stride, padding)
        self.bn = BatchNorm2d(out_channels)
        self.act = nn.ReLU()

    def __call__(self, x: mx.array) -> mx.array:
        return self.act(self.bn(self.conv(x)))


class GlobalAvgPool2d(nn.Module):
    """`nn.AdaptiveAvgPool2d((1, 1))` on channels-last input: [B, 1, 1, C]."""

    trace_layout = "NHWC"

    def __call__(self, x: mx.array) -> mx.array:
        return x.mean(axis=(1, 2), keepdims=True)


def _head(in_dim: int, fc_dim: int) -> Sequential:
    """Linear -> ReLU -> Dropout(0.2) -> Linear(1)."""
    return Sequential(nn.Linear(in_dim, fc_dim), nn.ReLU(), nn.Dropout(0.2), nn.Linear(fc_dim, 1))


def _channels_last(encoder: Sequential) -> Sequential:
    encoder.trace_layout = "NHWC"
    return encoder


def _encode(mel: mx.array, encoder: Sequential, pool: GlobalAvgPool2d) -> mx.array:
    """[B, n_mels, T] log-mel -> pooled features [B, C]."""
    x = encoder(mel[..., None])  # [B, n_mels, T, 1]: NHWC of torch's [B, 1, n_mels, T]
    return pool(x).reshape(x.shape[0], -1)


class DNSMOSProxy(nn.Module):
    """Log-mel -> four strided ConvBlocks -> global average -> one MLP head per score; scores
    clamped to [1, 5]. Returns {"sig", "bak", "ovl"} of shape [B]."""

    def __init__(self, sample_rate: int = 16000, n_fft: int = 512, hop_length: int = 256, n_mels: int = 64,
                 hidden_dim: int = 64, fc_dim: int = 256):
        super().__init__()
        self.mel_extractor = MelSpectrogram(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels)
        h = hidden_dim
        self.encoder = _channels_last(Sequential(ConvBlock(1, h, 3, 2, 1), ConvBlock(h, 2 * h, 3, 2, 1),
                                                 ConvBlock(2 * h, 4 * h, 3, 2, 1), ConvBlock(4 * h, 4 * h, 3, 2, 1)))
        self.pool = GlobalAvgPool2d()
        self.sig_head = _head(4 * h, fc_dim)
        self.bak_head = _head(4 * h, fc_dim)
        self.ovl_head = _head(4 * h, fc_dim)

    def __call__(self, audio: mx.array) -> Dict[str, mx.array]:
        features = _encode(self.mel_extractor(audio), self.encoder, self.pool)
        heads = (self.sig_head, self.bak_head, self.ovl_head)
        return {name: mx.clip(head(features).squeeze(-1), 1.0, 5.0) for name, head in zip(SCORES, heads)}

    def compute_loss(self, enhanced_audio: mx.array, target_sig: Optional[mx.array] = None,
                     target_bak: Optional[mx.array] = None, target_ovl: Optional[mx.array] = None) -> mx.array:
        """MSE to the given target scores (OVL, plus SIG/BAK when given); without targets,
        -(0.5 OVL + 0.3 SIG + 0.2 BAK) averaged over the batch."""
        scores = self(enhanced_audio)
        if target_ovl is None:
            return -(0.5 * scores["ovl"] + 0.3 * scores["sig"] + 0.2 * scores["bak"]).mean()
        loss = _mse(scores["ovl"], target_ovl)
        if target_sig is not None:
            loss = loss + _mse(scores["sig"], target_sig)
        if target_bak is not None:
            loss = loss + _mse(scores["bak"], target_bak)
        return loss


def _mse(a: mx.array, b: mx.array) -> mx.array:
    return ((a - b) ** 2).mean()


class DNSMOSLoss(nn.Module):
    """Perceptual loss from a (frozen) default DNSMOSProxy: with clean audio, MSE of the
    enhanced scores to the clean ones (OVL + 0.5 SIG + 0.5 BAK, no gradient through the clean
    side); without, relu(target_ovl - OVL) averaged. Returns (loss_weight * loss, scores)."""

    def __init__(self, proxy_path: Optional[str] = None, freeze_proxy: bool = True, target_ovl: float = 4.5,
                 loss_weight: float = 1.0):
        super().__init__()
        self.proxy = DNSMOSProxy()
        self.target_ovl, self.loss_weight = target_ovl, loss_weight
        if proxy_path is not None:
            load_proxy_weights(self.proxy, proxy_path)
        if freeze_proxy:
            self.proxy.freeze()

    def __call__(self, enhanced_audio: mx.array,
                 clean_audio: Optional[mx.array] = None) -> Tuple[mx.array, Dict[str, mx.array]]:
        scores = self.proxy(enhanced_audio)
        if clean_audio is not None:
            clean = {k: mx.stop_gradient(v) for k, v in self.proxy(clean_audio).items()}
            loss = (_mse(scores["ovl"], clean["ovl"]) + 0.5 * _mse(scores["sig"], clean["sig"])
                    + 0.5 * _mse(scores["bak"], clean["bak"]))
        else:
            loss = mx.maximum(self.target_ovl - scores["ovl"], 0).mean()
        return self.loss_weight * loss, scores


class LightweightDNSMOSProxy(nn.Module):
    """The fork's smaller proxy: log-mel (n_fft 400, hop 160) -> three (3x3 strided conv,
    1x1 conv, BatchNorm, ReLU) stages -> global average -> one MLP for [SIG, BAK, OVL]."""

    def __init__(self, sample_rate: int = 16000, n_mels: int = 40, hidden_dim: int = 32):
        super().__init__()
        self.mel_extractor = MelSpectrogram(sample_rate=sample_rate, n_fft=400, hop_length=160, n_mels=n_mels)
        h = hidden_dim
        self.encoder = _channels_last(Sequential(
            Conv2d(1, 1, 3, stride=2, padding=1), Conv2d(1, h, 1), BatchNorm2d(h), nn.ReLU(),
            Conv2d(h, h, 3, stride=2, padding=1, groups=h), Conv2d(h, 2 * h, 1), BatchNorm2d(2 * h), nn.ReLU(),
            Conv2d(2 * h, 2 * h, 3, stride=2, padding=1, groups=2 * h), Conv2d(2 * h, 4 * h, 1), BatchNorm2d(4 * h),
            nn.ReLU()))
        self.pool = GlobalAvgPool2d()
        self.head = Sequential(nn.Linear(4 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, 3))

    def __call__(self, audio: mx.array) -> Dict[str, mx.array]:
        scores = self.head(_encode(self.mel_extractor(audio), self.encoder, self.pool))
        return {name: mx.clip(scores[:, i], 1.0, 5.0) for i, name in enumerate(SCORES)}


def load_proxy_weights(proxy: nn.Module, path: str):
    """Fork proxy weights (safetensors, or a torch state dict read with weights_only=True)
    into `proxy`, strictly by name."""
    from converters.layout import load_torch_state_dict

    if str(path).endswith(".safetensors"):
        state = {k: np.array(v) for k, v in mx.load(str(path)).items()}
    else:
        from pathlib import Path

        from converters.torch_ckpt import read_state_dict

        state = read_state_dict(Path(path))
    load_torch_state_dict(proxy, state)
