"""DeepFilterNet with multi-frame filtering (MF) in MLX, mirroring `df.deepfilternetmf`.

DeepFilterNet3's encoder and ERB decoder (without the encoder GRU skip), and a DF decoder
that predicts a speech inter-frame correlation vector and an (inverse) covariance matrix per
bin for a multi-frame Wiener or MVDR filter.
"""

from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from loguru import logger

import df_mlx.deepfilternet3 as dfn3
import df_mlx.multiframe as MF
from df_mlx.config import Csv, DfParams, config  # noqa: F401  (re-exported, as df.deepfilternetmf)
from df_mlx.interop import TorchModuleCalls
from df_mlx.libdf import DF
from df_mlx.model import read_model_keys
from df_mlx.modules import Conv2dNormAct, GroupedLinearEinsum, Identity, Mask, SqueezedGRU_S, erb_filterbanks
from df_mlx.modules import ConvTranspose2dNormAct, erb_fb, get_device  # noqa: F401  (re-exported, as df.deepfilternetmf)


class ModelParams(DfParams):
    section = "deepfilternet"
    keys = ("conv_lookahead", "conv_ch", "conv_depthwise", "convt_depthwise", "conv_kernel", "conv_kernel_inp",
            "emb_hidden_dim", "emb_num_layers", "emb_gru_skip", "df_hidden_dim", "df_gru_skip",
            "df_pathway_kernel_size_t", "enc_concat", "df_num_layers", "df_n_iter", "lin_groups", "enc_lin_groups",
            "mfop_method", "mf_est_inverse", "mf_use_cholesky_decomp", "mask_pf")

    def __init__(self):
        super().__init__()
        read_model_keys(self, self.section, self.keys)
        self.mfop_method = self.mfop_method.upper()


def init_model(df_state: Optional[DF] = None, run_df: bool = True, train_mask: bool = True):
    return DfNet(*erb_filterbanks(ModelParams(), df_state), run_df, train_mask)


Add, Concat = dfn3.Add, dfn3.Concat


class Encoder(dfn3.Encoder):
    @staticmethod
    def params():
        return ModelParams()

    def _build_gru(self, p):
        return SqueezedGRU_S(self.emb_in_dim, self.emb_dim, output_size=self.emb_out_dim, num_layers=1,
                             batch_first=True, gru_skip_op=None, linear_groups=p.lin_groups,
                             linear_act_layer=nn.ReLU)


class ErbDecoder(dfn3.ErbDecoder):
    @staticmethod
    def params():
        return ModelParams()

    @staticmethod
    def _tconv_kernel(p):
        return p.conv_kernel


class DfDecoder(nn.Module):
    """Speech IFC vector [B, T, F, N*2] and (inverse) covariance [B, T, F, N*N*2] per bin."""

    def __init__(self):
        super().__init__()
        p = ModelParams()
        self.emb_in_dim = p.conv_ch * p.nb_erb // 4
        self.emb_dim = p.df_hidden_dim
        self.df_n_hidden = p.df_hidden_dim
        self.df_n_layers = p.df_num_layers
        self.df_order = p.df_order
        self.df_bins = p.nb_df
        kt = p.df_pathway_kernel_size_t
        conv = dict(fstride=1, kernel_size=(kt, 1), separable=True, bias=False)
        self.cov_convp = Conv2dNormAct(p.conv_ch, p.df_order**2 * 2, **conv)
        self.ifc_convp = Conv2dNormAct(p.conv_ch, p.df_order * 2, **conv)
        self.df_gru = SqueezedGRU_S(self.emb_in_dim, self.emb_dim, num_layers=self.df_n_layers, batch_first=True,
                                    gru_skip_op=None, linear_act_layer=nn.ReLU)
        skip = p.df_gru_skip.lower()
        if skip not in ("none", "identity", "groupedlinear"):
            raise ValueError(f"DF_GRU_SKIP must be none, identity or groupedlinear, got {skip}")
        if skip == "identity":
            if p.emb_hidden_dim != p.df_hidden_dim:
                raise ValueError("identity DF GRU skip needs EMB_HIDDEN_DIM == DF_HIDDEN_DIM")
            self.df_skip = Identity()
        elif skip == "groupedlinear":
            self.df_skip = GroupedLinearEinsum(self.emb_in_dim, self.emb_dim, groups=p.lin_groups)
        self.cov_out = GroupedLinearEinsum(self.df_n_hidden, self.df_bins * p.df_order**2 * 2, groups=p.lin_groups)
        self.ifc_out = GroupedLinearEinsum(self.df_n_hidden, self.df_bins * p.df_order * 2, groups=p.lin_groups)

    def __call__(self, emb: mx.array, c0: mx.array) -> Tuple[mx.array, mx.array]:
        b, t, _ = emb.shape
        c, _ = self.df_gru(emb)
        if "df_skip" in self:
            c = c + self.df_skip(emb)
        ifc = self.ifc_out(c).reshape(b, t, self.df_bins, self.df_order * 2) + self.ifc_convp(c0)
        cov = self.cov_out(c).reshape(b, t, self.df_bins, self.df_order**2 * 2) + self.cov_convp(c0)
        return ifc, cov


class DfNet(TorchModuleCalls, nn.Module):
    def __init__(self, erb_fb: mx.array, erb_inv_fb: mx.array, run_df: bool = True, train_mask: bool = True):
        super().__init__()
        p = ModelParams()
        if p.nb_erb % 8 != 0:
            raise ValueError("erb_bins should be divisible by 8")
        if p.mfop_method not in ("WF", "MVDR"):
            raise ValueError(f"MFOP_METHOD must be WF or MVDR, got {p.mfop_method}")
        if p.df_n_iter != 1:
            raise ValueError("DeepFilterNetMF supports DF_N_ITER = 1 only")
        self.df_lookahead = p.df_lookahead
        self.nb_df = p.nb_df
        self.freq_bins: int = p.fft_size // 2 + 1
        self.emb_dim: int = p.conv_ch * p.nb_erb
        self.erb_bins: int = p.nb_erb
        self.pad_feat = dfn3.feature_pad(p)
        self.erb_fb = erb_fb
        self.freeze(keys=["erb_fb"], recurse=False)
        self.enc = Encoder()
        self.erb_dec = ErbDecoder()
        self.mask = Mask(erb_inv_fb, post_filter=p.mask_pf)
        self.df_order = p.df_order
        mf = MF.MfWf if p.mfop_method == "WF" else MF.MfMvdr
        self.mf_op = mf(num_freqs=p.nb_df, frame_size=p.df_order, lookahead=self.df_lookahead,
                        cholesky_decomp=p.mf_use_cholesky_decomp, inverse=p.mf_est_inverse)
        self.df_dec = DfDecoder()
        self.run_mff = run_df
        if not run_df:
            logger.warning("Running without multi-frame filtering")
        self.train_mask = train_mask

    def __call__(self, spec: mx.array, feat_erb: mx.array, feat_spec: mx.array) -> Tuple[mx.array, ...]:
        """spec [B, 1, T, F, 2], feat_erb [B, 1, T, E], feat_spec [B, 1, T, F', 2] ->
        enhanced spec, ERB mask [B, 1, T, E], lsnr [B, T, 1], (ifc, covariance) coefficients."""
        feat_erb = self.pad_feat(feat_erb.transpose(0, 2, 3, 1))
        feat_spec = self.pad_feat(feat_spec[:, 0])
        e0, e1, e2, e3, emb, c0, lsnr = self.enc(feat_erb, feat_spec)
        m = self.erb_dec(emb, e3, e2, e1, e0).transpose(0, 3, 1, 2)
        spec_m = self.mask(spec, m)
        if self.run_mff:
            ifc, cov = self.df_dec(emb, c0)
            spec = self.mf_op(spec, ifc, cov)
            spec = mx.concatenate([spec[..., : self.nb_df, :], spec_m[..., self.nb_df :, :]], axis=-2)
            coefs = mx.concatenate([ifc, self.mf_op.constrain(cov)], axis=-1)  # df's in-place edit
        else:
            coefs = mx.zeros(())
            spec = spec_m
        return spec, m, lsnr, coefs
