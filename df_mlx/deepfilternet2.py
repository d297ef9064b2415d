"""DeepFilterNet2 in MLX, mirroring `df.deepfilternet2`.

It shares DeepFilterNet3's conv stacks (subclassing its Encoder and ErbDecoder) and differs in
its recurrent blocks (grouped or squeezed GRUs), its DF decoders (with the alpha head), the
deep-filter operator (`DfOp` or `multiframe.DF`) and its iterations.
"""

from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from loguru import logger

import df_mlx.deepfilternet3 as dfn3
import df_mlx.multiframe as MF
from df_mlx.config import Csv, DfParams, config  # noqa: F401  (re-exported, as df.deepfilternet2)
from df_mlx.interop import TorchModuleCalls
from df_mlx.libdf import DF
from df_mlx.model import read_model_keys
from df_mlx.logger import log_deprecated
from df_mlx.layers import Sigmoid, Tanh
from df_mlx.modules import ConvTranspose2dNormAct, erb_fb, get_device  # noqa: F401  (re-exported, as df.deepfilternet2)
from df_mlx.modules import (
    Conv2dNormAct,
    DfOp,
    GroupedGRU,
    GroupedLinear,
    GroupedLinearEinsum,
    Identity,
    Mask,
    Sequential,
    SqueezedGRU,
    erb_filterbanks,
)


class ModelParams(DfParams):
    section = "deepfilternet"
    keys = ("conv_lookahead", "conv_ch", "conv_depthwise", "convt_depthwise", "conv_kernel", "conv_kernel_inp",
            "emb_hidden_dim", "emb_num_layers", "df_hidden_dim", "df_gru_skip", "df_output_layer",
            "df_pathway_kernel_size_t", "enc_concat", "df_num_layers", "df_n_iter", "gru_type", "gru_groups",
            "lin_groups", "group_shuffle", "dfop_method", "mask_pf")

    def __init__(self):
        super().__init__()
        read_model_keys(self, self.section, self.keys, df_n_iter=2)


def init_model(df_state: Optional[DF] = None, run_df: bool = True, train_mask: bool = True):
    return DfNet(*erb_filterbanks(ModelParams(), df_state), run_df, train_mask)


Add, Concat = dfn3.Add, dfn3.Concat


def _check_gru_type(p):
    if p.gru_type not in ("grouped", "squeeze"):
        raise ValueError(f"GRU_TYPE must be grouped or squeeze, but got {p.gru_type}")


def _gru(p, input_size: int, hidden_size: int, num_layers: int, **squeezed):
    """GroupedGRU for GRU_TYPE=grouped, else SqueezedGRU with the given extra arguments."""
    if p.gru_type == "grouped":
        return GroupedGRU(input_size, hidden_size, num_layers=num_layers, batch_first=True, groups=p.gru_groups,
                          shuffle=p.group_shuffle, add_outputs=True)
    return SqueezedGRU(input_size, hidden_size, num_layers=num_layers, batch_first=True,
                       linear_act_layer=nn.ReLU, **squeezed)


class Encoder(dfn3.Encoder):
    @staticmethod
    def params():
        return ModelParams()

    def _build_embedding(self, p):
        _check_gru_type(p)
        self.emb_out_dim = p.emb_hidden_dim
        if p.gru_type == "grouped":
            self.df_fc_emb = GroupedLinear(p.conv_ch * p.nb_df // 2, self.emb_in_dim, groups=p.lin_groups)
        else:
            df_fc_emb = GroupedLinearEinsum(p.conv_ch * p.nb_df // 2, self.emb_in_dim, groups=p.lin_groups)
            self.df_fc_emb = Sequential(df_fc_emb, nn.ReLU())

    def _build_gru(self, p):
        return _gru(p, self.emb_in_dim, self.emb_out_dim, 1, linear_groups=p.lin_groups)


class ErbDecoder(dfn3.ErbDecoder):
    @staticmethod
    def params():
        return ModelParams()

    @staticmethod
    def _tconv_kernel(p):
        return p.conv_kernel

    def _build_gru(self, p):
        _check_gru_type(p)
        self.emb_out_dim = p.emb_hidden_dim
        emb_width = p.conv_ch * p.nb_erb // 4
        if p.gru_type == "grouped":
            self.emb_gru = _gru(p, emb_width, self.emb_out_dim, p.emb_num_layers - 1)
            fc_emb = GroupedLinear(p.emb_hidden_dim, emb_width, groups=p.lin_groups, shuffle=p.group_shuffle)
            self.fc_emb = Sequential(fc_emb, nn.ReLU())
        else:
            self.emb_gru = _gru(p, self.emb_out_dim, self.emb_out_dim, p.emb_num_layers - 1, output_size=emb_width,
                                gru_skip_op=Identity, linear_groups=p.lin_groups)
            self.fc_emb = Identity()

    def __call__(self, emb, e3, e2, e1, e0) -> mx.array:
        emb, _ = self.emb_gru(emb)
        return self.decode(self.fc_emb(emb), e3, e2, e1, e0)


class DfOutputReshapeOld(dfn3.DfOutputReshapeMF):
    """Coefficients [B, T, O*2*F] layout of `DfOp` -> [B, T, O, F, 2] (same fields as the
    multi-frame reshape, other layout)."""

    def __call__(self, coefs: mx.array) -> mx.array:
        b, t = coefs.shape[:2]
        return coefs.reshape(b, t, self.df_order, 2, self.df_bins).swapaxes(3, 4)


DfOutputReshapeMF = dfn3.DfOutputReshapeMF


class _DfPathway(nn.Module):
    """The parts both DF decoders share: the pathway conv from c0, the GRU over the embedding
    and the alpha head."""

    def _build(self, p):
        self.emb_dim = p.emb_hidden_dim
        self.df_n_hidden = p.df_hidden_dim
        self.df_n_layers = p.df_num_layers
        self.df_order = p.df_order
        self.df_bins = p.nb_df
        self.df_lookahead = p.df_lookahead
        self.gru_groups = p.gru_groups
        self.df_convp = Conv2dNormAct(p.conv_ch, p.df_order * 2, fstride=1, kernel_size=(p.df_pathway_kernel_size_t, 1),
                                      separable=True, bias=False)
        self.df_fc_a = Sequential(nn.Linear(p.df_hidden_dim, 1), Sigmoid())


class DfDecoder(_DfPathway):
    """GRU + skip + (grouped) linear output: coefficients [B, T, F, O*2] and alpha [B, T, 1]."""

    def __init__(self):
        super().__init__()
        p = ModelParams()
        self._build(p)
        self.df_out_ch = p.df_order * 2
        self.df_gru = _gru(p, p.emb_hidden_dim, p.df_hidden_dim, self.df_n_layers, gru_skip_op=Identity)
        skip = p.df_gru_skip.lower()
        if skip not in ("none", "identity", "groupedlinear"):
            raise ValueError(f"DF_GRU_SKIP must be none, identity or groupedlinear, got {skip}")
        if skip == "identity":
            if p.emb_hidden_dim != p.df_hidden_dim:
                raise ValueError("identity DF GRU skip needs EMB_HIDDEN_DIM == DF_HIDDEN_DIM")
            self.df_skip = Identity()
        elif skip == "groupedlinear":
            self.df_skip = GroupedLinearEinsum(p.emb_hidden_dim, p.df_hidden_dim, groups=p.lin_groups)
        out_dim = self.df_bins * self.df_out_ch
        if p.df_output_layer == "linear":
            df_out = nn.Linear(self.df_n_hidden, out_dim)
        elif p.df_output_layer == "groupedlinear":
            df_out = GroupedLinearEinsum(self.df_n_hidden, out_dim, groups=p.lin_groups)
        else:
            raise ValueError(f"DF_OUTPUT_LAYER must be linear or groupedlinear, got {p.df_output_layer}")
        self.df_out = Sequential(df_out, Tanh())

    def __call__(self, emb: mx.array, c0: mx.array) -> Tuple[mx.array, mx.array]:
        b, t, _ = emb.shape
        c, _ = self.df_gru(emb)
        if "df_skip" in self:
            c = c + self.df_skip(emb)
        c0 = self.df_convp(c0)
        alpha = self.df_fc_a(c)
        c = self.df_out(c)
        return c.reshape(b, t, self.df_bins, self.df_out_ch) + c0, alpha


class DfDecoderLinear(_DfPathway):
    """The deprecated linear DF decoder (DF_OUTPUT_LAYER=linear): coefficients
    [B, T, O, F, 2] and alpha [B, T, 1]."""

    def __init__(self):
        super().__init__()
        log_deprecated("Use of `linear` for `df_ouput_layer` is marked as deprecated.")
        p = ModelParams()
        self._build(p)
        self.df_gru = GroupedGRU(p.emb_hidden_dim, self.df_n_hidden, num_layers=self.df_n_layers, batch_first=True,
                                 groups=p.gru_groups, shuffle=p.group_shuffle, add_outputs=True)
        self.df_fc_out = Sequential(nn.Linear(self.df_n_hidden, self.df_bins * self.df_order * 2), Tanh())

    def __call__(self, emb: mx.array, c0: mx.array) -> Tuple[mx.array, mx.array]:
        b, t, _ = emb.shape
        c, _ = self.df_gru(emb)
        c0 = self.df_convp(c0).swapaxes(2, 3)  # [B, T, O*2, F]
        alpha = self.df_fc_a(c)
        c = self.df_fc_out(c).reshape(b, t, self.df_order * 2, self.df_bins) + c0
        return c.reshape(b, t, self.df_order, 2, self.df_bins).swapaxes(3, 4), alpha


class DfNet(TorchModuleCalls, nn.Module):
    def __init__(self, erb_fb: mx.array, erb_inv_fb: mx.array, run_df: bool = True, train_mask: bool = True):
        super().__init__()
        p = ModelParams()
        if p.nb_erb % 8 != 0:
            raise ValueError("erb_bins should be divisible by 8")
        self.lookahead: int = p.conv_lookahead
        self.freq_bins: int = p.fft_size // 2 + 1
        self.emb_dim: int = p.conv_ch * p.nb_erb
        self.erb_bins: int = p.nb_erb
        self.pad = dfn3.feature_pad(p, check_df_lookahead=False)
        self.erb_fb = erb_fb
        self.freeze(keys=["erb_fb"], recurse=False)
        self.enc = Encoder()
        self.erb_dec = ErbDecoder()
        self.mask = Mask(erb_inv_fb, post_filter=p.mask_pf)
        self.df_order = p.df_order
        self.df_bins = p.nb_df
        self.df_lookahead = p.df_lookahead
        if p.dfop_method == "real_unfold":
            self.df_op = DfOp(p.nb_df, p.df_order, p.df_lookahead, freq_bins=self.freq_bins, method=p.dfop_method)
            self.use_alpha = True
        else:
            if p.df_output_layer == "linear":
                raise ValueError("DFOP_METHOD other than real_unfold must be used with DF_OUTPUT_LAYER=groupedlinear")
            self.df_op = MF.DF(num_freqs=p.nb_df, frame_size=p.df_order, lookahead=p.df_lookahead)
            self.use_alpha = False
        self.df_dec = DfDecoderLinear() if p.df_output_layer == "linear" else DfDecoder()
        self.run_df = run_df
        if not run_df:
            logger.warning("Running without DF")
        self.train_mask = train_mask
        self.df_iter = p.df_n_iter
        reshape = DfOutputReshapeOld if p.dfop_method == "real_unfold" else DfOutputReshapeMF
        self.df_out_transform = reshape(self.df_order, self.df_bins)

    def __call__(self, spec: mx.array, feat_erb: mx.array, feat_spec: mx.array) -> Tuple[mx.array, ...]:
        """spec [B, 1, T, F, 2], feat_erb [B, 1, T, E], feat_spec [B, 1, T, F', 2] ->
        enhanced spec, ERB mask [B, 1, T, E], lsnr [B, T, 1], DF alpha [B, T, 1]."""
        feat_erb = self.pad(feat_erb.transpose(0, 2, 3, 1))
        feat_spec = self.pad(feat_spec[:, 0])
        e0, e1, e2, e3, emb, c0, lsnr = self.enc(feat_erb, feat_spec)
        m = self.erb_dec(emb, e3, e2, e1, e0).transpose(0, 3, 1, 2)
        spec = self.mask(spec, m)
        df_coefs, df_alpha = self.df_dec(emb, c0)
        df_coefs = self.df_out_transform(df_coefs)
        if self.run_df:
            for _ in range(self.df_iter):
                spec = self.df_op(spec, df_coefs, df_alpha) if self.use_alpha else self.df_op(spec, df_coefs)
        return spec, m, lsnr, df_alpha
