"""DeepFilterNet4 of the community fork sealad886/DeepFilterNet4 (`df.deepfilternet4`) in MLX.

Same `[deepfilternet4]` config keys and defaults, same classes and constructor arguments, same
sub-module names (flattened parameter names equal the fork's torch `state_dict` keys) and the
same outputs. As in df_mlx's DeepFilterNet3, feature maps are channels-last inside and
`DfNet4.__call__` takes and returns df's layouts.

What the fork's code does, as opposed to its README (mirrored here, not "fixed"):
- The default model is the phase-branch `HybridEncoder` with full multi-head cross-domain
  attention over all frames (so it is not causal: a frame's embedding depends on later
  frames), Mamba layers and multi-resolution deep filtering. FUSION_TYPE, CONV_KERNEL,
  CONVT_KERNEL, CONV_KERNEL_INP, CONV_DEPTHWISE, CONVT_DEPTHWISE, EMB_GRU_SKIP_ENC,
  EMB_GRU_SKIP, DF_GRU_SKIP, DF_N_ITER and MAMBA_EXPAND are read but have no effect; the
  hybrid encoder's Mamba layers ignore MAMBA_D_STATE/MAMBA_D_CONV too.
- `MultiResolutionDF` mixes the resolutions by softmax weights; bins a resolution does not
  filter keep the unfiltered input spectrum in its share of the mix.
- `SingleResDfDecoder.df_convp` and `HybridEncoder.phase_fallback_proj` (with the phase
  branch) hold parameters that the forward pass never uses.
"""

from functools import partial
from typing import List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

import df_mlx.deepfilternet3 as dfn3
import df_mlx.multiframe as MF
from df_mlx.config import DfParams, config
from df_mlx.interop import TorchModuleCalls
from df_mlx.hybrid_encoder import HybridEncoder, MagnitudeEncoder
from df_mlx.layers import Sigmoid, Tanh, pad_axis, softmax
from df_mlx.libdf import DF
from df_mlx.mamba import SqueezedMamba
from df_mlx.model import read_model_keys
from df_mlx.modules import (
    Conv2dNormAct,
    ConvTranspose2dNormAct,
    GroupedLinearEinsum,
    Mask,
    Sequential,
    SqueezedGRU_S,
    erb_filterbanks,
)

PI = 3.1415926535897932384626433

# [deepfilternet4] keys beyond the DeepFilterNet3 ones, in the fork's reading order:
# attribute -> (key, cast, default).
DFNET4_KEYS = {
    "df_order": ("DF_ORDER", int, 5),
    "backbone": ("BACKBONE", str, "mamba"),
    "mamba_d_state": ("MAMBA_D_STATE", int, 16),
    "mamba_d_conv": ("MAMBA_D_CONV", int, 4),
    "mamba_expand": ("MAMBA_EXPAND", int, 2),
    "use_time_branch": ("USE_TIME_BRANCH", bool, False),
    "use_phase_branch": ("USE_PHASE_BRANCH", bool, True),
    "fusion_type": ("FUSION_TYPE", str, "simple"),
    "use_multi_res_df": ("USE_MULTI_RES_DF", bool, True),
    "df_resolutions": ("DF_RESOLUTIONS", str, "96,5;48,3;24,2"),
    "adaptive_order": ("ADAPTIVE_ORDER", bool, False),
    "max_df_order": ("MAX_DF_ORDER", int, 7),
    "min_df_order": ("MIN_DF_ORDER", int, 2),
    "model_variant": ("MODEL_VARIANT", str, "full"),
}


class ModelParams4(DfParams):
    """`[df]` plus the `[deepfilternet4]` section (DFNet3-compatible keys, then DFNet4's)."""

    section = "deepfilternet4"
    keys = dfn3.ModelParams.keys

    def __init__(self):
        super().__init__()
        read_model_keys(self, self.section, self.keys)
        for attr, (key, cast, default) in DFNET4_KEYS.items():
            setattr(self, attr, config(key, cast=cast, default=default, section=self.section))

    def get_df_resolutions(self) -> List[Tuple[int, int]]:
        """DF_RESOLUTIONS "num_freqs,frame_size;..." as pairs (malformed entries skipped, as
        the fork); (NB_DF, DF_ORDER) when none parses."""
        resolutions = []
        for res in self.df_resolutions.split(";"):
            parts = res.strip().split(",")
            if len(parts) == 2:
                resolutions.append((int(parts[0]), int(parts[1])))
        return resolutions or [(self.nb_df, self.df_order)]


ModelParams = ModelParams4


def _erb_stage(model: nn.Module, spec: mx.array, dec_inputs: tuple, keep: Optional[mx.array], frames: int):
    """ERB mask [B, 1, T, E] (frames dropped by the lsnr dropout put back as zeros) and the masked
    spectrum; zeros without the ERB stage."""
    if not model.run_erb:
        return mx.zeros(()), mx.zeros_like(spec)
    m = model.erb_dec(*dec_inputs).transpose(0, 3, 1, 2)
    if keep is not None:
        m = dfn3._scatter_frames(m, keep, frames, axis=2)
    return m, model.mask(spec, m)


def init_model(df_state: Optional[DF] = None, run_df: bool = True, train_mask: bool = True):
    p = ModelParams4()
    erb, erb_inverse = erb_filterbanks(p, df_state)
    if p.model_variant == "lite":
        return DfNet4Lite(erb, erb_inverse, run_df, train_mask)
    return DfNet4(erb, erb_inverse, run_df, train_mask)


def _sequence_model(use_mamba: bool, input_size: int, hidden_size: int, output_size: Optional[int] = None,
                    num_layers: int = 1, lin_groups: Optional[int] = None, d_state: int = 16, d_conv: int = 4):
    """SqueezedMamba, or SqueezedGRU_S with ReLU linears (its default 8 linear groups unless
    `lin_groups` is given), as the fork builds its sequence models."""
    if use_mamba:
        return SqueezedMamba(input_size, hidden_size, output_size=output_size, num_layers=num_layers,
                             d_state=d_state, d_conv=d_conv)
    groups = {} if lin_groups is None else {"linear_groups": lin_groups}
    return SqueezedGRU_S(input_size, hidden_size, output_size=output_size, num_layers=num_layers, batch_first=True,
                         gru_skip_op=None, linear_act_layer=nn.ReLU, **groups)


class DfOutputReshape(dfn3.DfOutputReshapeMF):
    """Coefficients [B, T, F, O*2] -> [B, O, T, F, 2] (the fork's name for DFN3's reshape)."""


class MultiResolutionDF(nn.Module):
    """Deep filtering at several (num_freqs, frame_size) resolutions, mixed by the softmax of
    `resolution_weights`; each resolution's output keeps the input above its num_freqs.
    spec [B, C, T, F, 2], one coefficient tensor [B, O, T, F_res, 2] per resolution."""

    def __init__(self, resolutions: List[Tuple[int, int]] = [(96, 5), (48, 3), (24, 2)], lookahead: int = 0,
                 learnable_weights: bool = True, use_real: bool = False):
        super().__init__()
        self.resolutions = [tuple(r) for r in resolutions]
        self.use_real = use_real
        df_class = MF.DFreal if use_real else MF.DF
        self.df_ops = [df_class(num_freqs=nf, frame_size=fs, lookahead=lookahead) for nf, fs in self.resolutions]
        self.resolution_weights = mx.ones((len(self.resolutions),)) / len(self.resolutions)
        if not learnable_weights:  # a buffer in the fork: in the state dict, not trained
            self.freeze(keys=["resolution_weights"], recurse=False)

    def __call__(self, spec: mx.array, coefs_list: List[mx.array]) -> mx.array:
        if len(coefs_list) != len(self.resolutions):
            raise ValueError(f"Expected {len(self.resolutions)} coefficient tensors, got {len(coefs_list)}")
        weights = self.get_resolution_weights()
        full_freqs = spec.shape[-2]
        result = mx.zeros_like(spec)
        for i, (df_op, coefs, (nf, _)) in enumerate(zip(self.df_ops, coefs_list, self.resolutions)):
            out = df_op(spec[..., :nf, :], coefs)
            if nf < full_freqs:
                out = mx.concatenate([out[..., :nf, :], spec[..., nf:, :]], axis=-2)
            result = result + weights[i] * out
        return result

    def get_resolution_weights(self) -> mx.array:
        return mx.softmax(self.resolution_weights, axis=0)


class AdaptiveOrderPredictor(nn.Module):
    """Per-frame choice of the deep-filter order from the embedding: Gumbel-softmax weights in
    training, one-hot of the argmax otherwise. Returns (weights [..., orders], order [...])."""

    def __init__(self, emb_dim: int, max_order: int = 7, min_order: int = 2, hidden_dim: int = 64,
                 dropout: float = 0.1):
        super().__init__()
        self.max_order, self.min_order = max_order, min_order
        self.num_orders = max_order - min_order + 1
        if self.num_orders <= 0:
            raise ValueError(f"max_order ({max_order}) must be >= min_order ({min_order})")
        self.predictor = Sequential(nn.Linear(emb_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
                                    nn.Linear(hidden_dim, self.num_orders))

    def __call__(self, emb: mx.array, temperature: float = 1.0) -> Tuple[mx.array, mx.array]:
        logits = self.predictor(emb)
        idx = mx.argmax(logits, axis=-1)
        if self.training:
            weights = softmax((logits + mx.random.gumbel(logits.shape)) / temperature, axis=-1)
        else:
            weights = (idx[..., None] == mx.arange(self.num_orders)).astype(mx.float32)
        return weights, idx + self.min_order

    def get_order_distribution(self, emb: mx.array) -> mx.array:
        return softmax(self.predictor(emb), axis=-1)


class MultiResDfDecoder(nn.Module):
    """Shared sequence model over the embedding, one tanh output head per resolution:
    a list of coefficient tensors [B, O_r, T, F_r, 2]."""

    def __init__(self, emb_dim: int = 256, hidden_dim: int = 256, num_layers: int = 3,
                 resolutions: List[Tuple[int, int]] = [(96, 5), (48, 3), (24, 2)], use_mamba: bool = True,
                 lin_groups: int = 1, mamba_d_state: int = 16, mamba_d_conv: int = 4, conv_ch: int = 16,
                 nb_erb: int = 32):
        super().__init__()
        self.resolutions = [tuple(r) for r in resolutions]
        self.emb_dim, self.hidden_dim = emb_dim, hidden_dim
        self.emb_in_dim = conv_ch * nb_erb // 4
        self.backbone = _sequence_model(use_mamba, self.emb_in_dim, hidden_dim, num_layers=num_layers,
                                        d_state=mamba_d_state, d_conv=mamba_d_conv)
        self.output_heads = [Sequential(GroupedLinearEinsum(hidden_dim, nf * fs * 2, groups=lin_groups), Tanh())
                             for nf, fs in self.resolutions]
        self.reshape_ops = [DfOutputReshape(fs, nf) for nf, fs in self.resolutions]

    def __call__(self, emb: mx.array, c0: mx.array) -> List[mx.array]:
        """`c0` is unused, as in the fork."""
        b, t, _ = emb.shape
        hidden, _ = self.backbone(emb)
        return [reshape(head(hidden).reshape(b, t, nf, fs * 2))
                for head, reshape, (nf, fs) in zip(self.output_heads, self.reshape_ops, self.resolutions)]


class SingleResDfDecoder(nn.Module):
    """DFNet3-style decoder: sequence model and one tanh head, coefficients [B, O, T, F, 2].
    `df_convp` exists (its parameters are in the state dict) but, as in the fork, is unused."""

    trace_layout = "NHWC"

    def __init__(self, emb_dim: int = 256, hidden_dim: int = 256, num_layers: int = 3, df_order: int = 5,
                 df_bins: int = 96, use_mamba: bool = True, lin_groups: int = 1, mamba_d_state: int = 16,
                 mamba_d_conv: int = 4, conv_ch: int = 16, nb_erb: int = 32, df_pathway_kernel_size_t: int = 1):
        super().__init__()
        self.df_order, self.df_bins, self.df_out_ch = df_order, df_bins, df_order * 2
        self.emb_in_dim = conv_ch * nb_erb // 4
        self.df_convp = Conv2dNormAct(conv_ch, self.df_out_ch, fstride=1, kernel_size=(df_pathway_kernel_size_t, 1),
                                      separable=True, bias=False)
        self.backbone = _sequence_model(use_mamba, self.emb_in_dim, hidden_dim, num_layers=num_layers,
                                        d_state=mamba_d_state, d_conv=mamba_d_conv)
        self.df_out = Sequential(GroupedLinearEinsum(hidden_dim, df_bins * self.df_out_ch, groups=lin_groups),
                                 Tanh())
        self.reshape = DfOutputReshape(df_order, df_bins)

    def __call__(self, emb: mx.array, c0: mx.array) -> mx.array:
        b, t, _ = emb.shape
        hidden, _ = self.backbone(emb)
        return self.reshape(self.df_out(hidden).reshape(b, t, self.df_bins, self.df_out_ch))


class AdaptiveDfDecoder(nn.Module):
    """One head per order in [min_order, max_order], zero-padded to max_order and mixed by the
    order predictor's weights: (coefficients [B, max_order, T, F, 2], weights, order)."""

    def __init__(self, emb_dim: int = 256, hidden_dim: int = 256, num_layers: int = 3, df_bins: int = 96,
                 max_order: int = 7, min_order: int = 2, use_mamba: bool = True, lin_groups: int = 1,
                 mamba_d_state: int = 16, mamba_d_conv: int = 4, conv_ch: int = 16, nb_erb: int = 32):
        super().__init__()
        self.df_bins, self.max_order, self.min_order = df_bins, max_order, min_order
        self.num_orders = max_order - min_order + 1
        self.emb_in_dim = conv_ch * nb_erb // 4
        self.order_predictor = AdaptiveOrderPredictor(emb_dim=hidden_dim, max_order=max_order, min_order=min_order)
        self.backbone = _sequence_model(use_mamba, self.emb_in_dim, hidden_dim, num_layers=num_layers,
                                        d_state=mamba_d_state, d_conv=mamba_d_conv)
        orders = range(min_order, max_order + 1)
        self.output_heads = [Sequential(GroupedLinearEinsum(hidden_dim, df_bins * o * 2, groups=lin_groups), Tanh())
                             for o in orders]
        self.reshape_ops = [DfOutputReshape(o, df_bins) for o in orders]

    def __call__(self, emb: mx.array, c0: mx.array, temperature: float = 1.0) -> Tuple[mx.array, ...]:
        b, t, _ = emb.shape
        hidden, _ = self.backbone(emb)
        order_weights, predicted_order = self.order_predictor(hidden, temperature)
        combined = mx.zeros((b, self.max_order, t, self.df_bins, 2))
        for i, (head, reshape) in enumerate(zip(self.output_heads, self.reshape_ops)):
            order = self.min_order + i
            coefs = reshape(head(hidden).reshape(b, t, self.df_bins, order * 2))
            coefs = pad_axis(coefs, 1, 0, self.max_order - order)
            combined = combined + order_weights[:, :, i][:, None, :, None, None] * coefs
        return combined, order_weights, predicted_order


class ErbDecoder4(nn.Module):
    """Sequence model over the embedding (max(1, emb_num_layers - 1) layers), then DFNet3's
    pathway and transposed convolutions (fixed (1, 3) kernels) up to the ERB mask [B, T, E, 1]."""

    trace_layout = "NHWC"
    decode = dfn3.ErbDecoder.decode  # the conv path is DeepFilterNet3's

    def __init__(self, conv_ch: int = 16, nb_erb: int = 32, emb_hidden_dim: int = 256, emb_num_layers: int = 2,
                 use_mamba: bool = True, lin_groups: int = 1, mamba_d_state: int = 16, mamba_d_conv: int = 4):
        super().__init__()
        if nb_erb % 8 != 0:
            raise ValueError("nb_erb should be divisible by 8")
        self.emb_in_dim = self.emb_out_dim = conv_ch * nb_erb // 4
        self.emb_dim, self.nb_erb = emb_hidden_dim, nb_erb
        self.emb_seq = _sequence_model(use_mamba, self.emb_in_dim, self.emb_dim, output_size=self.emb_out_dim,
                                       num_layers=self._seq_layers(emb_num_layers), lin_groups=lin_groups,
                                       d_state=mamba_d_state, d_conv=mamba_d_conv)
        tconv_layer = partial(ConvTranspose2dNormAct, kernel_size=(1, 3), bias=False, separable=True)
        conv_layer = partial(Conv2dNormAct, bias=False, separable=True)
        self.conv3p = conv_layer(conv_ch, conv_ch, kernel_size=1)
        self.convt3 = conv_layer(conv_ch, conv_ch, kernel_size=(1, 3))
        self.conv2p = conv_layer(conv_ch, conv_ch, kernel_size=1)
        self.convt2 = tconv_layer(conv_ch, conv_ch, fstride=2)
        self.conv1p = conv_layer(conv_ch, conv_ch, kernel_size=1)
        self.convt1 = tconv_layer(conv_ch, conv_ch, fstride=2)
        self.conv0p = conv_layer(conv_ch, conv_ch, kernel_size=1)
        self.conv0_out = conv_layer(conv_ch, 1, kernel_size=(1, 3), activation_layer=Sigmoid)

    @staticmethod
    def _seq_layers(emb_num_layers: int) -> int:
        return max(1, emb_num_layers - 1)

    def __call__(self, emb: mx.array, e3: mx.array, e2: mx.array, e1: mx.array, e0: mx.array) -> mx.array:
        emb, _ = self.emb_seq(emb)
        return self.decode(emb, e3, e2, e1, e0)


class ErbDecoder4Lite(ErbDecoder4):
    """ErbDecoder4 with `emb_num_layers` sequence layers and the Lite defaults."""

    def __init__(self, conv_ch: int = 8, nb_erb: int = 32, emb_hidden_dim: int = 128, emb_num_layers: int = 1,
                 use_mamba: bool = True, lin_groups: int = 1, mamba_d_state: int = 8, mamba_d_conv: int = 4):
        super().__init__(conv_ch, nb_erb, emb_hidden_dim, emb_num_layers, use_mamba, lin_groups, mamba_d_state,
                         mamba_d_conv)

    @staticmethod
    def _seq_layers(emb_num_layers: int) -> int:
        return emb_num_layers


class Encoder4(MagnitudeEncoder):
    """The DFNet3 encoder with a Mamba (or GRU) embedding model: conv stacks, spectrum
    embedding added to (or concatenated with) the ERB embedding, sequence model, local SNR.
    feat_erb [B, T, E, 1], feat_spec [B, T, F', 2] -> e0..e3, emb, c0 (channels-last), lsnr."""

    def __init__(self, conv_ch: int = 16, nb_erb: int = 32, nb_df: int = 96, emb_hidden_dim: int = 256,
                 enc_lin_groups: int = 16, use_mamba: bool = True, mamba_d_state: int = 16, mamba_d_conv: int = 4,
                 enc_concat: bool = False, lin_groups: int = 1, lsnr_min: float = -15.0, lsnr_max: float = 40.0,
                 conv_kernel_inp: Tuple[int, int] = (3, 3), conv_kernel: Tuple[int, int] = (1, 3)):
        super().__init__(conv_ch, nb_erb, nb_df, emb_hidden_dim, enc_lin_groups, conv_kernel_inp, conv_kernel)
        self.erb_bins = nb_erb
        self.emb_dim = emb_hidden_dim
        self.emb_out_dim = conv_ch * nb_erb // 4
        self.combine = dfn3.Concat() if enc_concat else dfn3.Add()
        self.emb_gru = _sequence_model(use_mamba, self.emb_in_dim * (2 if enc_concat else 1), self.emb_dim,
                                       output_size=self.emb_out_dim, num_layers=1, lin_groups=lin_groups,
                                       d_state=mamba_d_state, d_conv=mamba_d_conv)
        self.lsnr_fc = Sequential(nn.Linear(self.emb_out_dim, 1), Sigmoid())
        self.lsnr_scale = lsnr_max - lsnr_min
        self.lsnr_offset = lsnr_min

    def __call__(self, feat_erb: mx.array, feat_spec: mx.array) -> Tuple[mx.array, ...]:
        e0, e1, e2, e3, emb, cemb, c0 = dfn3.conv_stacks(self, feat_erb, feat_spec)
        emb, _ = self.emb_gru(self.combine(emb, cemb))
        lsnr = self.lsnr_fc(emb) * self.lsnr_scale + self.lsnr_offset
        return e0, e1, e2, e3, emb, c0, lsnr


class Encoder4Lite(Encoder4):
    """Encoder4 with the Lite defaults (8 channels, 128 hidden, state size 8)."""

    def __init__(self, conv_ch: int = 8, nb_erb: int = 32, nb_df: int = 96, emb_hidden_dim: int = 128,
                 enc_lin_groups: int = 16, use_mamba: bool = True, mamba_d_state: int = 8, mamba_d_conv: int = 4,
                 enc_concat: bool = False, lin_groups: int = 1, lsnr_min: float = -15.0, lsnr_max: float = 40.0,
                 conv_kernel_inp: Tuple[int, int] = (3, 3), conv_kernel: Tuple[int, int] = (1, 3)):
        super().__init__(conv_ch, nb_erb, nb_df, emb_hidden_dim, enc_lin_groups, use_mamba, mamba_d_state,
                         mamba_d_conv, enc_concat, lin_groups, lsnr_min, lsnr_max, conv_kernel_inp, conv_kernel)


def _post_filter(spec_e: mx.array, spec: mx.array, beta: float) -> mx.array:
    return spec_e * dfn3.post_filter_gain(spec_e, spec, beta)[..., None]


class DfNet4(TorchModuleCalls, nn.Module):
    """The full DFNet4: hybrid (or DFNet3-style) encoder, ERB mask decoder, multi-resolution /
    adaptive-order / single deep-filter decoder, optional post-filter."""

    def __init__(self, erb_fb: mx.array, erb_inv_fb: mx.array, run_df: bool = True, train_mask: bool = True):
        super().__init__()
        p = ModelParams4()
        self.df_lookahead = p.df_lookahead
        self.nb_df = p.nb_df
        self.freq_bins: int = p.fft_size // 2 + 1
        self.erb_bins: int = p.nb_erb
        self.conv_ch = p.conv_ch
        self.use_mamba = p.backbone.lower() == "mamba"
        self.use_hybrid_encoder = p.use_time_branch or p.use_phase_branch
        self.use_multi_res_df = p.use_multi_res_df
        self.adaptive_order = p.adaptive_order
        self.pad_feat = dfn3.feature_pad(p)
        self.erb_fb = erb_fb
        self.freeze(keys=["erb_fb"], recurse=False)
        if self.use_hybrid_encoder:
            self.enc = HybridEncoder(conv_ch=p.conv_ch, nb_erb=p.nb_erb, nb_df=p.nb_df, fft_size=p.fft_size,
                                     emb_hidden_dim=p.emb_hidden_dim, emb_num_layers=p.emb_num_layers,
                                     enc_lin_groups=p.enc_lin_groups, use_time_branch=p.use_time_branch,
                                     use_phase_branch=p.use_phase_branch, use_mamba=self.use_mamba,
                                     lsnr_min=p.lsnr_min, lsnr_max=p.lsnr_max, linear_groups=p.lin_groups)
        else:
            self.enc = Encoder4(conv_ch=p.conv_ch, nb_erb=p.nb_erb, nb_df=p.nb_df, emb_hidden_dim=p.emb_hidden_dim,
                                enc_lin_groups=p.enc_lin_groups, use_mamba=self.use_mamba,
                                mamba_d_state=p.mamba_d_state, mamba_d_conv=p.mamba_d_conv, enc_concat=p.enc_concat,
                                lin_groups=p.lin_groups, lsnr_min=p.lsnr_min, lsnr_max=p.lsnr_max)
        self.erb_dec = ErbDecoder4(conv_ch=p.conv_ch, nb_erb=p.nb_erb, emb_hidden_dim=p.emb_hidden_dim,
                                   emb_num_layers=p.emb_num_layers, use_mamba=self.use_mamba, lin_groups=p.lin_groups,
                                   mamba_d_state=p.mamba_d_state, mamba_d_conv=p.mamba_d_conv)
        self.mask = Mask(erb_inv_fb)
        self.post_filter = p.mask_pf
        self.post_filter_beta = p.pf_beta
        common = dict(hidden_dim=p.df_hidden_dim, num_layers=p.df_num_layers, use_mamba=self.use_mamba,
                      lin_groups=p.lin_groups, mamba_d_state=p.mamba_d_state, mamba_d_conv=p.mamba_d_conv,
                      conv_ch=p.conv_ch, nb_erb=p.nb_erb, emb_dim=p.emb_hidden_dim)
        if self.use_multi_res_df:
            resolutions = p.get_df_resolutions()
            self.df_dec = MultiResDfDecoder(resolutions=resolutions, **common)
            self.df_op = MultiResolutionDF(resolutions=resolutions, lookahead=self.df_lookahead)
            self.df_order = max(fs for _, fs in resolutions)
        elif self.adaptive_order:
            self.df_dec = AdaptiveDfDecoder(df_bins=p.nb_df, max_order=p.max_df_order, min_order=p.min_df_order,
                                            **common)
            self.df_op = MF.DF(num_freqs=p.nb_df, frame_size=p.max_df_order, lookahead=self.df_lookahead)
            self.df_order = p.max_df_order
        else:
            self.df_dec = SingleResDfDecoder(df_order=p.df_order, df_bins=p.nb_df,
                                             df_pathway_kernel_size_t=p.df_pathway_kernel_size_t, **common)
            self.df_op = MF.DF(num_freqs=p.nb_df, frame_size=p.df_order, lookahead=self.df_lookahead)
            self.df_order = p.df_order
        dfn3.set_stages(self, p.nb_df, run_df, train_mask)
        self.lsnr_dropout = p.lsnr_dropout

    def __call__(self, spec: mx.array, feat_erb: mx.array, feat_spec: mx.array,
                 waveform: Optional[mx.array] = None) -> Tuple[mx.array, ...]:
        """spec [B, 1, T, F, 2], feat_erb [B, 1, T, E], feat_spec [B, 1, T, F', 2], waveform
        [B, N] (time branch only) -> enhanced spec [B, 1, T, F, 2], ERB mask [B, 1, T, E],
        lsnr [B, T, 1], DF coefficients (the first resolution's with multi-resolution DF)."""
        frames = spec.shape[2]
        feat_erb = self.pad_feat(feat_erb.transpose(0, 2, 3, 1))
        feat_spec = self.pad_feat(feat_spec[:, 0])
        if self.use_hybrid_encoder:
            e0, e1, e2, e3, emb, c0, lsnr = self.enc(feat_erb, feat_spec, waveform)
        else:
            e0, e1, e2, e3, emb, c0, lsnr = self.enc(feat_erb, feat_spec)
        keep = None
        if self.lsnr_dropout and self.training:
            keep = dfn3._frames_above(lsnr, -10.0)
            emb, e0, e1, e2, e3, c0 = (x[:, keep] for x in (emb, e0, e1, e2, e3, c0))
        m, spec_m = _erb_stage(self, spec, (emb, e3, e2, e1, e0), keep, frames)
        if not self.run_df:
            df_coefs, spec_e = mx.zeros(()), spec_m
        else:
            full = (lambda c: dfn3._scatter_frames(c, keep, frames, axis=2)) if keep is not None else (lambda c: c)
            if self.use_multi_res_df:
                coefs_list = self.df_dec(emb, c0)
                spec_e = self.df_op(spec, [full(c) for c in coefs_list])
                df_coefs = coefs_list[0]
            elif self.adaptive_order:
                df_coefs = full(self.df_dec(emb, c0)[0])
                spec_e = self.df_op(spec, df_coefs)
            else:
                df_coefs = full(self.df_dec(emb, c0))
                spec_e = self.df_op(spec, df_coefs)
            spec_e = mx.concatenate([spec_e[..., : self.nb_df, :], spec_m[..., self.nb_df :, :]], axis=-2)
        if self.post_filter:
            spec_e = _post_filter(spec_e, spec, self.post_filter_beta)
        return spec_e, m, lsnr, df_coefs


class DfNet4Lite(TorchModuleCalls, nn.Module):
    """DFNet4 at half width: Encoder4Lite, ErbDecoder4Lite, single-resolution DF, both
    filterbanks as buffers. As the fork, feat_spec is [B, 2, T, F'] here (the fork's forward
    rejects df's [B, 1, T, F', 2]), and `train_mask=False` drops the ERB stage."""

    def __init__(self, erb_fb: mx.array, erb_inv_fb: mx.array, run_df: bool = True, train_mask: bool = True):
        super().__init__()
        p = ModelParams4()
        conv_ch = max(8, p.conv_ch // 2)
        emb_hidden_dim = max(128, p.emb_hidden_dim // 2)
        df_hidden_dim = max(128, p.df_hidden_dim // 2)
        emb_num_layers = max(1, p.emb_num_layers - 1)
        df_num_layers = max(2, p.df_num_layers - 1)
        d_state = max(8, p.mamba_d_state // 2)
        use_mamba = p.backbone.lower() == "mamba"
        self.p = p
        self.nb_df, self.df_order = p.nb_df, p.df_order
        self.run_df, self.run_erb = run_df, train_mask
        self.lsnr_dropout = p.lsnr_dropout and train_mask
        self.lsnr_droput_thresh = 30.0
        self.post_filter, self.post_filter_beta = p.mask_pf, p.pf_beta
        self.erb_fb, self.erb_inv_fb = erb_fb, erb_inv_fb
        self.freeze(keys=["erb_fb", "erb_inv_fb"], recurse=False)
        self.enc = Encoder4Lite(conv_ch=conv_ch, nb_erb=p.nb_erb, nb_df=p.nb_df, emb_hidden_dim=emb_hidden_dim,
                                enc_lin_groups=p.enc_lin_groups, use_mamba=use_mamba, mamba_d_state=d_state,
                                mamba_d_conv=p.mamba_d_conv, enc_concat=p.enc_concat, lin_groups=p.lin_groups,
                                lsnr_min=p.lsnr_min, lsnr_max=p.lsnr_max)
        if self.run_erb:
            self.erb_dec = ErbDecoder4Lite(conv_ch=conv_ch, nb_erb=p.nb_erb, emb_hidden_dim=emb_hidden_dim,
                                           emb_num_layers=emb_num_layers, use_mamba=use_mamba, lin_groups=p.lin_groups,
                                           mamba_d_state=d_state, mamba_d_conv=p.mamba_d_conv)
            self.mask = Mask(erb_inv_fb, post_filter=False)
        if self.run_df:
            self.df_dec = SingleResDfDecoder(emb_dim=emb_hidden_dim, hidden_dim=df_hidden_dim, num_layers=df_num_layers,
                                             df_bins=p.nb_df, df_order=p.df_order, use_mamba=use_mamba,
                                             lin_groups=p.lin_groups, mamba_d_state=d_state,
                                             mamba_d_conv=p.mamba_d_conv, conv_ch=conv_ch, nb_erb=p.nb_erb)
            self.df_op = MF.DF(num_freqs=p.nb_df, frame_size=p.df_order, lookahead=p.df_lookahead)

    def __call__(self, spec: mx.array, feat_erb: mx.array, feat_spec: mx.array) -> Tuple[mx.array, ...]:
        """spec [B, 1, T, F, 2], feat_erb [B, 1, T, E], feat_spec [B, 2, T, F'] -> as DfNet4."""
        frames = spec.shape[2]
        e0, e1, e2, e3, emb, c0, lsnr = self.enc(feat_erb.transpose(0, 2, 3, 1), feat_spec.transpose(0, 2, 3, 1))
        keep = None
        if self.lsnr_dropout and self.training:
            above = (lsnr[..., 0] > self.lsnr_droput_thresh).any(axis=0)
            if above.any().item():
                keep = mx.array([i for i, a in enumerate(above.tolist()) if a])
                emb, e0, e1, e2, e3, c0 = (x[:, keep] for x in (emb, e0, e1, e2, e3, c0))
        m, spec_m = _erb_stage(self, spec, (emb, e3, e2, e1, e0), keep, frames)
        if self.run_df:
            df_coefs = self.df_dec(emb, c0)
            if keep is not None:
                df_coefs = dfn3._scatter_frames(df_coefs, keep, frames, axis=2)
            spec_e = self.df_op(spec, df_coefs)
            spec_e = mx.concatenate([spec_e[..., : self.nb_df, :], spec_m[..., self.nb_df :, :]], axis=-2)
        else:
            df_coefs, spec_e = mx.zeros(()), spec_m
        if self.post_filter:
            spec_e = _post_filter(spec_e, spec, self.post_filter_beta)
        return spec_e, m, lsnr, df_coefs
