"""The DFNet4 fork's hybrid time-frequency encoder (`df.hybrid_encoder` of sealad886/DeepFilterNet4)
in MLX: magnitude (ERB + complex spectrum) convolutions, a phase encoder, an optional waveform
encoder, cross-domain attention fusion and a Mamba (or GRU) sequence model.

Same classes, constructor arguments and parameter names as the fork (flattened names equal its
torch `state_dict` keys). Feature maps are channels-last inside ([B, T, F, C]; the fork's
[B, C, T, F]), so `HybridEncoder` takes feat_erb [B, T, E, 1] and feat_spec [B, T, F', 2] and
returns channels-last e0..e3 and c0, like df_mlx's DeepFilterNet3 `Encoder`. Sequences stay
[B, T, D]; waveforms and 1-D convolutions keep torch's [B, C, L].

Not ported: `SimpleCrossAttention` and `LightweightHybridEncoder`, which no fork model builds
(DfNet4 reads FUSION_TYPE but always uses `CrossDomainAttention`).
"""

import math
from functools import partial
from typing import List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from df_mlx import deepfilternet3 as dfn3
from df_mlx.layers import BatchNorm2d, Sigmoid, linear, softmax
from df_mlx.mamba import Conv1d, Mamba
from df_mlx.modules import Conv2dNormAct, GroupedLinearEinsum, Sequential, SqueezedGRU_S


class BatchNorm1d(BatchNorm2d):
    """`torch.nn.BatchNorm1d` on torch's [B, C, L] (or [B, C]) layout, same parameters."""

    def __call__(self, x: mx.array) -> mx.array:
        if x.ndim == 2:
            return super().__call__(x)
        return super().__call__(x.swapaxes(1, 2)).swapaxes(1, 2)


class MultiheadAttention(nn.Module):
    """`torch.nn.MultiheadAttention` with packed q/k/v projections (`in_proj_weight` [3E, E],
    `in_proj_bias` [3E]) and `out_proj`, as torch computes it when weights are requested:
    q scaled by 1/sqrt(head_dim) before q k^T, softmax, dropout (training), weighted values.
    Returns (output, attention weights averaged over heads or None)."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout, self.batch_first = dropout, batch_first
        bound = math.sqrt(6 / (embed_dim + 3 * embed_dim))  # torch's xavier_uniform_ of [3E, E]
        self.in_proj_weight = mx.random.uniform(-bound, bound, (3 * embed_dim, embed_dim))
        if bias:
            self.in_proj_bias = mx.zeros((3 * embed_dim,))
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        if bias:
            self.out_proj.bias = mx.zeros((embed_dim,))

    def __call__(self, query: mx.array, key: mx.array, value: mx.array, need_weights: bool = True,
                 average_attn_weights: bool = True) -> Tuple[mx.array, Optional[mx.array]]:
        if not self.batch_first:
            query, key, value = (x.swapaxes(0, 1) for x in (query, key, value))
        e, h, d = self.embed_dim, self.num_heads, self.head_dim
        w, b = self.in_proj_weight, self.get("in_proj_bias")
        q, k, v = (linear(x, w[i * e : (i + 1) * e], None if b is None else b[i * e : (i + 1) * e])
                   for i, x in enumerate((query, key, value)))
        bsz, tgt = q.shape[:2]
        q, k, v = (x.reshape(bsz, x.shape[1], h, d).transpose(0, 2, 1, 3) for x in (q, k, v))
        weights = softmax((q * math.sqrt(1.0 / d)) @ k.swapaxes(-1, -2), axis=-1)  # [B, h, L, S]
        if self.training and self.dropout > 0:
            keep = mx.random.bernoulli(1 - self.dropout, weights.shape)
            weights = mx.where(keep, weights / (1 - self.dropout), 0)
        out = (weights @ v).transpose(0, 2, 1, 3).reshape(bsz, tgt, e)
        # out_proj is applied as a function: torch's MultiheadAttention does not call the module.
        out = linear(out, self.out_proj.weight, self.out_proj.get("bias"))
        if not self.batch_first:
            out = out.swapaxes(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(axis=1) if average_attn_weights else weights


def interpolate_linear(x: mx.array, size: int) -> mx.array:
    """torch's `F.interpolate(x, size, mode="linear", align_corners=False)` on [B, C, L]."""
    n = x.shape[-1]
    scale = n / size
    src = mx.maximum((mx.arange(size, dtype=mx.float32) + 0.5) * scale - 0.5, 0.0)
    i0 = mx.minimum(mx.floor(src).astype(mx.int32), n - 1)
    i1 = mx.minimum(i0 + 1, n - 1)
    lam = src - i0.astype(mx.float32)
    return mx.take(x, i0, axis=-1) * (1 - lam) + mx.take(x, i1, axis=-1) * lam


class WaveformEncoder(nn.Module):
    """Strided Conv1d + BatchNorm1d + GELU stack over the waveform [B, 1, N] (or [B, N]),
    projected to [B, frames, out_dim]."""

    def __init__(self, in_channels: int = 1, base_channels: int = 32, num_layers: int = 4,
                 kernel_sizes: Optional[List[int]] = None, strides: Optional[List[int]] = None, out_dim: int = 256):
        super().__init__()
        kernel_sizes = [7, 5, 5, 3] if kernel_sizes is None else list(kernel_sizes)
        strides = [4, 2, 2, 2] if strides is None else list(strides)
        if len(kernel_sizes) != num_layers or len(strides) != num_layers:
            raise ValueError(f"need {num_layers} kernel sizes and strides, got {kernel_sizes} and {strides}")
        self.in_channels, self.out_dim = in_channels, out_dim
        layers, ch = [], in_channels
        for i in range(num_layers):
            out_ch = base_channels * 2**i
            layers.append(Sequential(Conv1d(ch, out_ch, kernel_sizes[i], strides[i], padding=kernel_sizes[i] // 2),
                                     BatchNorm1d(out_ch), nn.GELU()))
            ch = out_ch
        self.encoder = Sequential(*layers)
        self.proj = nn.Linear(ch, out_dim)
        self.total_stride = math.prod(strides)

    def __call__(self, waveform: mx.array) -> mx.array:
        if waveform.ndim == 2:
            waveform = waveform[:, None]
        return self.proj(self.encoder(waveform).swapaxes(1, 2))


class PhaseEncoder(nn.Module):
    """cos/sin of the phase through separable convs (frequency stride 2 while more than 16
    bins remain, channels doubling up to 4x), flattened per frame and projected: [B, T, out_dim]."""

    trace_layout = "NHWC"

    def __init__(self, n_freqs: int, conv_ch: int = 32, out_dim: int = 256, num_layers: int = 3):
        super().__init__()
        self.n_freqs, self.out_dim = n_freqs, out_dim
        layers = [Conv2dNormAct(2, conv_ch, kernel_size=(3, 3), bias=False, separable=True)]
        ch, freqs = conv_ch, n_freqs
        for _ in range(num_layers - 1):
            fstride = 2 if freqs > 16 else 1
            out_ch = min(ch * 2, conv_ch * 4)
            layers.append(Conv2dNormAct(ch, out_ch, kernel_size=(1, 3), fstride=fstride, bias=False, separable=True))
            ch = out_ch
            if fstride > 1:
                freqs = (freqs + 1) // 2
        self.conv_layers = Sequential(*layers)
        self.final_ch, self.final_freqs = ch, freqs
        self.out_proj = nn.Linear(ch * freqs, out_dim)

    def __call__(self, phase: mx.array) -> mx.array:
        """phase: angles [B, T, F] or [B, 1, T, F], or a spectrum [B, 1, T, F, 2]."""
        if phase.ndim == 5:
            angle = mx.arctan2(phase[..., 1], phase[..., 0])[:, 0]
        elif phase.ndim == 4:
            angle = phase[:, 0]
        else:
            angle = phase
        x = self.conv_layers(mx.stack([mx.cos(angle), mx.sin(angle)], axis=-1))  # [B, T, F', C]
        b, t = x.shape[:2]
        return self.out_proj(x.transpose(0, 1, 3, 2).reshape(b, t, -1))  # channel-major, as the fork


class CrossDomainAttention(nn.Module):
    """Time attends to magnitude, magnitude to phase (each + residual + LayerNorm), then an MLP
    over the three concatenated streams and a final LayerNorm: [B, T, out_dim]."""

    def __init__(self, time_dim: int, mag_dim: int, phase_dim: int, out_dim: int, num_heads: int = 8,
                 dropout: float = 0.1):
        super().__init__()
        self.out_dim = out_dim
        self.time_proj = nn.Linear(time_dim, out_dim)
        self.mag_proj = nn.Linear(mag_dim, out_dim)
        self.phase_proj = nn.Linear(phase_dim, out_dim)
        self.time_mag_attn = MultiheadAttention(out_dim, num_heads, dropout=dropout, batch_first=True)
        self.mag_phase_attn = MultiheadAttention(out_dim, num_heads, dropout=dropout, batch_first=True)
        self.norm_tm = nn.LayerNorm(out_dim)
        self.norm_mp = nn.LayerNorm(out_dim)
        self.fusion = Sequential(nn.Linear(out_dim * 3, out_dim * 2), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(out_dim * 2, out_dim))
        self.norm_out = nn.LayerNorm(out_dim)

    def __call__(self, time_feat: mx.array, mag_feat: mx.array, phase_feat: mx.array) -> mx.array:
        t, m, p = self.time_proj(time_feat), self.mag_proj(mag_feat), self.phase_proj(phase_feat)
        t_m, _ = self.time_mag_attn(t, m, m)
        t = self.norm_tm(t + t_m)
        m_p, _ = self.mag_phase_attn(m, p, p)
        m = self.norm_mp(m + m_p)
        return self.norm_out(self.fusion(mx.concatenate([t, m, p], axis=-1)))


class MagnitudeEncoder(nn.Module):
    """DeepFilterNet3's ERB and complex-spectrum conv stacks; the embedding is the flattened
    last ERB map plus the projected spectrum map. feat_erb [B, T, E, 1], feat_spec [B, T, F', 2]
    -> e0, e1, e2, e3, emb [B, T, C*E/4], c0 (maps channels-last)."""

    trace_layout = "NHWC"

    def __init__(self, conv_ch: int = 16, nb_erb: int = 32, nb_df: int = 96, emb_hidden_dim: int = 256,
                 enc_lin_groups: int = 16, conv_kernel_inp: Tuple[int, int] = (3, 3),
                 conv_kernel: Tuple[int, int] = (1, 3)):
        super().__init__()
        if nb_erb % 4 != 0:
            raise ValueError("nb_erb should be divisible by 4")
        self.nb_erb, self.nb_df = nb_erb, nb_df
        self.erb_conv0 = Conv2dNormAct(1, conv_ch, kernel_size=conv_kernel_inp, bias=False, separable=True)
        conv_layer = partial(Conv2dNormAct, in_ch=conv_ch, out_ch=conv_ch, kernel_size=conv_kernel, bias=False,
                             separable=True)
        self.erb_conv1 = conv_layer(fstride=2)
        self.erb_conv2 = conv_layer(fstride=2)
        self.erb_conv3 = conv_layer(fstride=1)
        self.df_conv0 = Conv2dNormAct(2, conv_ch, kernel_size=conv_kernel_inp, bias=False, separable=True)
        self.df_conv1 = conv_layer(fstride=2)
        self.emb_in_dim = conv_ch * nb_erb // 4
        self.emb_out_dim = emb_hidden_dim
        self.df_fc_emb = Sequential(GroupedLinearEinsum(conv_ch * nb_df // 2, self.emb_in_dim, groups=enc_lin_groups),
                                    nn.ReLU())

    def __call__(self, feat_erb: mx.array, feat_spec: mx.array) -> Tuple[mx.array, ...]:
        e0, e1, e2, e3, emb, cemb, c0 = dfn3.conv_stacks(self, feat_erb, feat_spec)
        return e0, e1, e2, e3, emb + cemb, c0


def _align_frames(feat: mx.array, frames: int) -> mx.array:
    """Linear interpolation of [B, T', D] to T frames when they differ, as the fork."""
    if feat.shape[1] == frames:
        return feat
    return interpolate_linear(feat.swapaxes(1, 2), frames).swapaxes(1, 2)


class HybridEncoder(nn.Module):
    """Magnitude encoder + optional waveform and phase encoders (each replaced by a projection
    of the magnitude embedding when absent), cross-domain attention fusion, `emb_num_layers`
    Mamba layers (or SqueezedGRU_S), an output projection and the local-SNR head."""

    trace_layout = "NHWC"

    def __init__(self, conv_ch: int = 16, nb_erb: int = 32, nb_df: int = 96, fft_size: int = 960,
                 emb_hidden_dim: int = 256, emb_num_layers: int = 2, enc_lin_groups: int = 16,
                 use_time_branch: bool = True, use_phase_branch: bool = True, use_mamba: bool = True,
                 lsnr_min: float = -15.0, lsnr_max: float = 40.0, linear_groups: int = 1):
        super().__init__()
        self.use_time_branch, self.use_phase_branch, self.use_mamba = use_time_branch, use_phase_branch, use_mamba
        self.mag_encoder = MagnitudeEncoder(conv_ch=conv_ch, nb_erb=nb_erb, nb_df=nb_df,
                                            emb_hidden_dim=emb_hidden_dim, enc_lin_groups=enc_lin_groups)
        self.time_encoder = WaveformEncoder(out_dim=emb_hidden_dim) if use_time_branch else None
        self.phase_encoder = PhaseEncoder(n_freqs=nb_df, out_dim=emb_hidden_dim) if use_phase_branch else None
        mag_emb_dim = conv_ch * nb_erb // 4
        self.mag_emb_dim, self.emb_hidden_dim = mag_emb_dim, emb_hidden_dim
        self.time_fallback_proj = nn.Linear(mag_emb_dim, emb_hidden_dim) if use_time_branch else None
        self.phase_fallback_proj = nn.Linear(mag_emb_dim, emb_hidden_dim) if use_phase_branch else None
        self.fusion = CrossDomainAttention(
            time_dim=emb_hidden_dim if use_time_branch else mag_emb_dim,
            mag_dim=mag_emb_dim,
            phase_dim=emb_hidden_dim if use_phase_branch else mag_emb_dim,
            out_dim=emb_hidden_dim,
        )
        if use_mamba:
            self.seq_layers = [Mamba(emb_hidden_dim) for _ in range(emb_num_layers)]
        else:
            self.seq_layers = [SqueezedGRU_S(emb_hidden_dim, emb_hidden_dim, num_layers=1, linear_groups=linear_groups)
                               for _ in range(emb_num_layers)]
        self.out_proj = nn.Linear(emb_hidden_dim, mag_emb_dim)
        self.lsnr_fc = Sequential(nn.Linear(mag_emb_dim, 1), Sigmoid())
        self.lsnr_scale = lsnr_max - lsnr_min
        self.lsnr_offset = lsnr_min

    def __call__(self, feat_erb: mx.array, feat_spec: mx.array,
                 waveform: Optional[mx.array] = None) -> Tuple[mx.array, ...]:
        """feat_erb [B, T, E, 1], feat_spec [B, T, F', 2] (channels-last), waveform [B, N] or
        [B, 1, N] -> e0..e3, emb [B, T, C*E/4], c0, lsnr [B, T, 1]."""
        e0, e1, e2, e3, mag_emb, c0 = self.mag_encoder(feat_erb, feat_spec)
        frames = mag_emb.shape[1]
        if self.time_encoder is not None and waveform is not None:
            time_feat = _align_frames(self.time_encoder(waveform), frames)
        elif self.time_fallback_proj is not None:
            time_feat = self.time_fallback_proj(mag_emb)
        else:
            time_feat = mag_emb
        if self.phase_encoder is not None:
            phase_feat = _align_frames(self.phase_encoder(mx.arctan2(feat_spec[..., 1], feat_spec[..., 0])), frames)
        elif self.phase_fallback_proj is not None:
            phase_feat = self.phase_fallback_proj(mag_emb)
        else:
            phase_feat = mag_emb
        emb = self.fusion(time_feat, mag_emb, phase_feat)
        for layer in self.seq_layers:
            emb = layer(emb) if self.use_mamba else layer(emb)[0]
        emb = self.out_proj(emb)
        lsnr = self.lsnr_fc(emb) * self.lsnr_scale + self.lsnr_offset
        return e0, e1, e2, e3, emb, c0, lsnr
