"""DeepFilterNet3 in MLX, mirroring `df.deepfilternet3`.

Same config keys and defaults, same sub-module names (flattened parameter names equal the torch
`state_dict` keys) and the same outputs. Inside, feature maps are channels-last [B, T, F, C];
`DfNet.__call__` takes and returns df's layouts.
"""

from functools import partial
from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from loguru import logger

import df_mlx.multiframe as MF
from df_mlx.config import Csv, DfParams, config  # noqa: F401  (re-exported, as df.deepfilternet3)
from df_mlx.interop import TorchModuleCalls
from df_mlx.libdf import DF
from df_mlx.model import read_model_keys
from df_mlx.layers import Sigmoid, Tanh
from df_mlx.modules import as_complex, erb_fb, get_device  # noqa: F401  (re-exported, as df.deepfilternet3)
from df_mlx.modules import (
    ConstantPad2d,
    Conv2dNormAct,
    ConvTranspose2dNormAct,
    GroupedLinearEinsum,
    Identity,
    Mask,
    Sequential,
    SqueezedGRU_S,
    erb_filterbanks,
)

PI = 3.1415926535897932384626433


class ModelParams(DfParams):
    section = "deepfilternet"
    keys = ("conv_lookahead", "conv_ch", "conv_depthwise", "convt_depthwise", "conv_kernel", "convt_kernel",
            "conv_kernel_inp", "emb_hidden_dim", "emb_num_layers", "emb_gru_skip_enc", "emb_gru_skip",
            "df_hidden_dim", "df_gru_skip", "df_pathway_kernel_size_t", "enc_concat", "df_num_layers",
            "df_n_iter", "lin_groups", "enc_lin_groups", "mask_pf", "pf_beta", "lsnr_dropout")

    def __init__(self):
        super().__init__()
        read_model_keys(self, self.section, self.keys)


def init_model(df_state: Optional[DF] = None, run_df: bool = True, train_mask: bool = True):
    return DfNet(*erb_filterbanks(ModelParams(), df_state), run_df, train_mask)


def feature_pad(p, check_df_lookahead: bool = True) -> nn.Module:
    """Shifts the features CONV_LOOKAHEAD frames ahead (drops the first, appends zeros), on
    channels-last maps; an identity without lookahead."""
    if p.conv_lookahead > 0:
        if check_df_lookahead and p.conv_lookahead < p.df_lookahead:
            raise ValueError("CONV_LOOKAHEAD must be >= DF_LOOKAHEAD")
        return ConstantPad2d((0, 0, -p.conv_lookahead, p.conv_lookahead), 0.0)
    pad = Identity()
    pad.trace_layout = "NHWC"
    return pad


class Add(nn.Module):
    def __call__(self, a, b):
        return a + b


class Concat(nn.Module):
    def __call__(self, a, b):
        return mx.concatenate((a, b), axis=-1)


def gru_skip(kind: str, input_size: int, output_size: int, groups: int):
    """The skip connection around a SqueezedGRU_S selected by a `*_GRU_SKIP*` config value."""
    if kind == "none":
        return None
    if kind == "identity":
        if input_size != output_size:
            raise ValueError(f"identity GRU skip needs equal dimensions, got {input_size} and {output_size}")
        return Identity
    if kind == "groupedlinear":
        return partial(GroupedLinearEinsum, input_size=input_size, hidden_size=output_size, groups=groups)
    raise ValueError(f"Unknown GRU skip `{kind}` (none, identity or groupedlinear)")


def conv_stacks(enc: nn.Module, feat_erb: mx.array, feat_spec: mx.array) -> Tuple[mx.array, ...]:
    """The convolutional part of DFN3's encoder, for any encoder with its layer names (DFNet4's
    too): e0..e3, the flattened e3 [B, T, C*E/4], the projected spectrum map and c0."""
    e0 = enc.erb_conv0(feat_erb)
    e1 = enc.erb_conv1(e0)
    e2 = enc.erb_conv2(e1)
    e3 = enc.erb_conv3(e2)
    c0 = enc.df_conv0(feat_spec)
    c1 = enc.df_conv1(c0)
    b, t = c1.shape[:2]
    return e0, e1, e2, e3, e3.reshape(b, t, -1), enc.df_fc_emb(c1.reshape(b, t, -1)), c0


class Encoder(nn.Module):
    """ERB and complex-feature conv stacks, their fused embedding through a GRU, and the local
    SNR head. DeepFilterNet2 reuses the stacks with its own embedding (`_build_embedding`)."""

    trace_layout = "NHWC"

    def __init__(self):
        super().__init__()
        p = self.params()
        if p.nb_erb % 4 != 0:
            raise ValueError("erb_bins should be divisible by 4")
        self.erb_conv0 = Conv2dNormAct(1, p.conv_ch, kernel_size=p.conv_kernel_inp, bias=False, separable=True)
        conv_layer = partial(Conv2dNormAct, in_ch=p.conv_ch, out_ch=p.conv_ch, kernel_size=p.conv_kernel,
                             bias=False, separable=True)
        self.erb_conv1 = conv_layer(fstride=2)
        self.erb_conv2 = conv_layer(fstride=2)
        self.erb_conv3 = conv_layer(fstride=1)
        self.df_conv0 = Conv2dNormAct(2, p.conv_ch, kernel_size=p.conv_kernel_inp, bias=False, separable=True)
        self.df_conv1 = conv_layer(fstride=2)
        self.erb_bins = p.nb_erb
        self.emb_in_dim = p.conv_ch * p.nb_erb // 4
        self._build_embedding(p)
        if p.enc_concat:
            self.emb_in_dim *= 2
            self.combine = Concat()
        else:
            self.combine = Add()
        self.emb_n_layers = p.emb_num_layers
        self.emb_gru = self._build_gru(p)
        self.lsnr_fc = Sequential(nn.Linear(self.emb_out_dim, 1), Sigmoid())
        self.lsnr_scale = p.lsnr_max - p.lsnr_min
        self.lsnr_offset = p.lsnr_min

    @staticmethod
    def params():
        return ModelParams()

    def _build_embedding(self, p):
        self.emb_dim = p.emb_hidden_dim
        self.emb_out_dim = p.conv_ch * p.nb_erb // 4
        df_fc_emb = GroupedLinearEinsum(p.conv_ch * p.nb_df // 2, self.emb_in_dim, groups=p.enc_lin_groups)
        self.df_fc_emb = Sequential(df_fc_emb, nn.ReLU())

    def _build_gru(self, p):
        return SqueezedGRU_S(
            self.emb_in_dim,
            self.emb_dim,
            output_size=self.emb_out_dim,
            num_layers=1,
            batch_first=True,
            gru_skip_op=gru_skip(p.emb_gru_skip_enc, self.emb_out_dim, self.emb_out_dim, p.lin_groups),
            linear_groups=p.lin_groups,
            linear_act_layer=nn.ReLU,
        )

    def __call__(self, feat_erb: mx.array, feat_spec: mx.array) -> Tuple[mx.array, ...]:
        """feat_erb [B, T, E, 1], feat_spec [B, T, F', 2] -> e0..e3, emb [B, T, D], c0, lsnr."""
        e0, e1, e2, e3, erb_emb, cemb, c0 = conv_stacks(self, feat_erb, feat_spec)
        emb = self.combine(erb_emb, cemb)
        emb, _ = self.emb_gru(emb)
        lsnr = self.lsnr_fc(emb) * self.lsnr_scale + self.lsnr_offset
        return e0, e1, e2, e3, emb, c0, lsnr


class ErbDecoder(nn.Module):
    """GRU over the embedding, then pathway convs and transposed convs up to the ERB mask.
    DeepFilterNet2 reuses the conv path with its own GRU block (`_build_gru`)."""

    trace_layout = "NHWC"

    def __init__(self):
        super().__init__()
        p = self.params()
        if p.nb_erb % 8 != 0:
            raise ValueError("erb_bins should be divisible by 8")
        self._build_gru(p)
        tconv_layer = partial(ConvTranspose2dNormAct, kernel_size=self._tconv_kernel(p), bias=False, separable=True)
        conv_layer = partial(Conv2dNormAct, bias=False, separable=True)
        self.conv3p = conv_layer(p.conv_ch, p.conv_ch, kernel_size=1)
        self.convt3 = conv_layer(p.conv_ch, p.conv_ch, kernel_size=p.conv_kernel)
        self.conv2p = conv_layer(p.conv_ch, p.conv_ch, kernel_size=1)
        self.convt2 = tconv_layer(p.conv_ch, p.conv_ch, fstride=2)
        self.conv1p = conv_layer(p.conv_ch, p.conv_ch, kernel_size=1)
        self.convt1 = tconv_layer(p.conv_ch, p.conv_ch, fstride=2)
        self.conv0p = conv_layer(p.conv_ch, p.conv_ch, kernel_size=1)
        self.conv0_out = conv_layer(p.conv_ch, 1, kernel_size=p.conv_kernel, activation_layer=Sigmoid)

    @staticmethod
    def params():
        return ModelParams()

    @staticmethod
    def _tconv_kernel(p):
        return p.convt_kernel

    def _build_gru(self, p):
        self.emb_in_dim = p.conv_ch * p.nb_erb // 4
        self.emb_dim = p.emb_hidden_dim
        self.emb_out_dim = p.conv_ch * p.nb_erb // 4
        self.emb_gru = SqueezedGRU_S(
            self.emb_in_dim,
            self.emb_dim,
            output_size=self.emb_out_dim,
            num_layers=p.emb_num_layers - 1,
            batch_first=True,
            gru_skip_op=gru_skip(p.emb_gru_skip, self.emb_in_dim, self.emb_out_dim, p.lin_groups),
            linear_groups=p.lin_groups,
            linear_act_layer=nn.ReLU,
        )

    def __call__(self, emb, e3, e2, e1, e0) -> mx.array:
        """ERB mask [B, T, E, 1] from the embedding and the encoder maps (channels-last)."""
        emb, _ = self.emb_gru(emb)
        return self.decode(emb, e3, e2, e1, e0)

    def decode(self, emb, e3, e2, e1, e0) -> mx.array:
        b, t, f8, _ = e3.shape
        emb = emb.reshape(b, t, f8, -1)
        e3 = self.convt3(self.conv3p(e3) + emb)
        e2 = self.convt2(self.conv2p(e2) + e3)
        e1 = self.convt1(self.conv1p(e1) + e2)
        return self.conv0_out(self.conv0p(e0) + e1)


class DfOutputReshapeMF(nn.Module):
    """Coefficients [B, T, F, O*2] -> [B, O, T, F, 2] for the multi-frame filter."""

    def __init__(self, df_order: int, df_bins: int):
        super().__init__()
        self.df_order = df_order
        self.df_bins = df_bins

    def __call__(self, coefs: mx.array) -> mx.array:
        coefs = coefs.reshape(*coefs.shape[:-1], -1, 2)
        return coefs.transpose(0, 3, 1, 2, 4)


class DfDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        p = ModelParams()
        layer_width = p.conv_ch
        self.emb_in_dim = p.conv_ch * p.nb_erb // 4
        self.emb_dim = p.df_hidden_dim
        self.df_n_hidden = p.df_hidden_dim
        self.df_n_layers = p.df_num_layers
        self.df_order = p.df_order
        self.df_bins = p.nb_df
        self.df_out_ch = p.df_order * 2
        kt = p.df_pathway_kernel_size_t
        self.df_convp = Conv2dNormAct(layer_width, self.df_out_ch, fstride=1, kernel_size=(kt, 1),
                                      separable=True, bias=False)
        self.df_gru = SqueezedGRU_S(
            self.emb_in_dim,
            self.emb_dim,
            num_layers=self.df_n_layers,
            batch_first=True,
            gru_skip_op=None,
            linear_act_layer=nn.ReLU,
        )
        skip = p.df_gru_skip.lower()
        if skip == "identity" and p.emb_hidden_dim != p.df_hidden_dim:
            raise ValueError("identity DF GRU skip needs EMB_HIDDEN_DIM == DF_HIDDEN_DIM")
        make_skip = gru_skip(skip, self.emb_in_dim, self.emb_dim, p.lin_groups)
        if make_skip is not None:
            self.df_skip = make_skip()
        out_dim = self.df_bins * self.df_out_ch
        self.df_out = Sequential(GroupedLinearEinsum(self.df_n_hidden, out_dim, groups=p.lin_groups), Tanh())
        self.df_fc_a = Sequential(nn.Linear(self.df_n_hidden, 1), Sigmoid())

    def __call__(self, emb: mx.array, c0: mx.array) -> mx.array:
        """DF coefficients [B, T, F, O*2] from the embedding and the channels-last c0."""
        b, t, _ = emb.shape
        c, _ = self.df_gru(emb)
        if "df_skip" in self:
            c = c + self.df_skip(emb)
        c0 = self.df_convp(c0)
        c = self.df_out(c)
        return c.reshape(b, t, self.df_bins, self.df_out_ch) + c0


class DfNet(TorchModuleCalls, nn.Module):
    def __init__(self, erb_fb: mx.array, erb_inv_fb: mx.array, run_df: bool = True, train_mask: bool = True):
        super().__init__()
        p = ModelParams()
        if p.nb_erb % 8 != 0:
            raise ValueError("erb_bins should be divisible by 8")
        if p.df_n_iter != 1:
            raise ValueError("DeepFilterNet3 supports DF_N_ITER = 1 only")
        self.df_lookahead = p.df_lookahead
        self.conv_lookahead = p.conv_lookahead
        self.nb_df = p.nb_df
        self.freq_bins: int = p.fft_size // 2 + 1
        self.emb_dim: int = p.conv_ch * p.nb_erb
        self.erb_bins: int = p.nb_erb
        self.pad_feat = feature_pad(p)
        self.erb_fb = erb_fb
        self.freeze(keys=["erb_fb"], recurse=False)
        self.enc = Encoder()
        self.erb_dec = ErbDecoder()
        self.mask = Mask(erb_inv_fb)
        self.post_filter = p.mask_pf
        self.post_filter_beta = p.pf_beta
        self.df_order = p.df_order
        self.df_op = MF.DF(num_freqs=p.nb_df, frame_size=p.df_order, lookahead=self.df_lookahead)
        self.df_dec = DfDecoder()
        self.df_out_transform = DfOutputReshapeMF(self.df_order, p.nb_df)
        set_stages(self, p.nb_df, run_df, train_mask)
        self.lsnr_droput = p.lsnr_dropout

    def __call__(self, spec: mx.array, feat_erb: mx.array, feat_spec: mx.array) -> Tuple[mx.array, ...]:
        """spec [B, 1, T, F, 2], feat_erb [B, 1, T, E], feat_spec [B, 1, T, F', 2] ->
        enhanced spec [B, 1, T, F, 2], ERB mask [B, 1, T, E], lsnr [B, T, 1],
        DF coefficients [B, O, T, F', 2]."""
        feat_erb = self.pad_feat(feat_erb.transpose(0, 2, 3, 1))
        feat_spec = self.pad_feat(feat_spec[:, 0])
        m, lsnr, df_coefs = self.estimate(feat_erb, feat_spec, spec.shape[2])
        return self.apply_stages(spec, m, df_coefs), m, lsnr, df_coefs

    def estimate(self, feat_erb: mx.array, feat_spec: mx.array, frames: int) -> Tuple[mx.array, ...]:
        """The causal network: channels-last features [B, T, E, 1], [B, T, F', 2] (already
        shifted by the conv lookahead) -> ERB mask [B, 1, T, E], lsnr, DF coefficients."""
        e0, e1, e2, e3, emb, c0, lsnr = self.enc(feat_erb, feat_spec)
        keep = None
        if self.lsnr_droput:
            keep = _frames_above(lsnr, -10.0)
            emb, e0, e1, e2, e3, c0 = (x[:, keep] for x in (emb, e0, e1, e2, e3, c0))
        m = df_coefs = mx.zeros(())
        if self.run_erb:
            m = self.erb_dec(emb, e3, e2, e1, e0).transpose(0, 3, 1, 2)
            if keep is not None:
                m = _scatter_frames(m, keep, frames, axis=2)
        if self.run_df:
            df_coefs = self.df_dec(emb, c0)
            if keep is not None:
                df_coefs = _scatter_frames(df_coefs, keep, frames, axis=1)
            df_coefs = self.df_out_transform(df_coefs)
        return m, lsnr, df_coefs

    def apply_stages(self, spec: mx.array, m: mx.array, df_coefs: mx.array) -> mx.array:
        """ERB mask on all bins, deep filter on the lowest nb_df, then the post-filter."""
        spec_m = self.mask(spec, m) if self.run_erb else mx.zeros_like(spec)
        if self.run_df:
            spec_e = self.df_op(spec, df_coefs)
            spec_e = mx.concatenate([spec_e[..., : self.nb_df, :], spec_m[..., self.nb_df :, :]], axis=-2)
        else:
            spec_e = spec_m
        if self.post_filter:
            spec_e = spec_e * post_filter_gain(spec_e, spec, self.post_filter_beta)[..., None]
        return spec_e


def set_stages(model: nn.Module, nb_df: int, run_df: bool, train_mask: bool):
    """run_erb (off when DF covers every bin), run_df and train_mask, with df's warnings."""
    model.run_erb = nb_df + 1 < model.freq_bins
    if not model.run_erb:
        logger.warning("Running without ERB stage")
    model.run_df = run_df
    if not run_df:
        logger.warning("Running without DF stage")
    model.train_mask = train_mask


def post_filter_gain(spec_e: mx.array, spec: mx.array, beta: float, eps: float = 1e-12) -> mx.array:
    """DFN3's output post-filter gain per bin, from the enhanced/noisy magnitude ratio."""
    mag = lambda x: mx.sqrt(mx.sum(mx.square(x), axis=-1))  # noqa: E731
    mask = mx.clip(mag(spec_e) / (mag(spec) + eps), eps, 1)
    mask_sin = mask * mx.maximum(mx.sin(PI * mask / 2), eps)
    return (1 + beta) / (1 + beta * mx.square(mask / mask_sin))


def _frames_above(lsnr: mx.array, threshold: float) -> mx.array:
    """Frame indices whose lsnr exceeds `threshold` (df's lsnr dropout; batch size 1, as df)."""
    above = np.array(lsnr).squeeze() > threshold
    if above.ndim != 1:
        raise ValueError("LSNR_DROPOUT works with batch size 1 only (as in df)")
    return mx.array(np.nonzero(above)[0])


def _scatter_frames(x: mx.array, keep: mx.array, t: int, axis: int) -> mx.array:
    """Zeros of `t` frames along `axis` with the kept frames filled from `x`."""
    shape = list(x.shape)
    shape[axis] = t
    out = mx.zeros(shape, dtype=x.dtype)
    index = (slice(None),) * axis + (keep,)
    out[index] = x
    return out
