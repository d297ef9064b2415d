"""DeepFilterNet (version 1) in MLX, mirroring `df.deepfilternet`.

Feature maps are channels-last inside; where df flattens [B, C, T, F] maps into time-major
embeddings (channel-major order, GRUs with batch_first=False), the same order is kept.
"""

from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from loguru import logger

from df_mlx.config import DfParams, config  # noqa: F401  (re-exported, as df.deepfilternet)
from df_mlx.interop import TorchModuleCalls
from df_mlx.libdf import DF
from df_mlx.model import read_model_keys
from df_mlx.layers import Sigmoid, Tanh
from df_mlx.modules import DfOp, GroupedGRU, GroupedLinear, Mask, Sequential, convkxf, erb_filterbanks
from df_mlx.modules import erb_fb, get_device  # noqa: F401  (re-exported, as df.deepfilternet)


class ModelParams(DfParams):
    section = "deepfilternet"
    keys = ("conv_lookahead", "conv_k_enc", "conv_k_dec", "conv_ch", "conv_width_f", "conv_dec_mode",
            "conv_depthwise", "convt_depthwise", "emb_hidden_dim", "emb_num_layers", "df_hidden_dim",
            "df_num_layers", "gru_groups", "lin_groups", "group_shuffle", "dfop_method", "mask_pf")

    def __init__(self):
        super().__init__()
        read_model_keys(self, self.section, self.keys, emb_num_layers=1)


def init_model(df_state: Optional[DF] = None, run_df: bool = True, train_mask: bool = True):
    return DfNet(erb_filterbanks(ModelParams(), df_state)[1], run_df, train_mask)


def _time_major(x: mx.array) -> mx.array:
    """Channels-last map [B, T, F, C] -> [T, B, C*F] in df's channel-major order."""
    b, t, f, c = x.shape
    return x.transpose(1, 0, 3, 2).reshape(t, b, c * f)


def _grouped_gru(p, input_size: int, hidden_size: int, num_layers: int) -> GroupedGRU:
    return GroupedGRU(input_size, hidden_size, num_layers=num_layers, batch_first=False, groups=p.gru_groups,
                      shuffle=p.group_shuffle, add_outputs=True)


class Encoder(nn.Module):
    trace_layout = "NHWC"

    def __init__(self):
        super().__init__()
        p = ModelParams()
        if p.nb_erb % 4 != 0:
            raise ValueError("erb_bins should be divisible by 4")
        width, wf, k = p.conv_ch, p.conv_width_f, p.conv_k_enc
        kwargs = {"batch_norm": True, "depthwise": p.conv_depthwise}
        k0 = 1 if k == 1 and p.conv_lookahead == 0 else max(2, k)
        self.erb_conv0 = convkxf(1, width, k=k0, fstride=1, lookahead=1 if p.conv_lookahead > 0 else 0, **kwargs)
        self.erb_conv1 = convkxf(width, width * wf, k=k, lookahead=1 if p.conv_lookahead > 1 else 0, **kwargs)
        self.erb_conv2 = convkxf(width * wf, width * wf**2, k=k, lookahead=1 if p.conv_lookahead > 2 else 0, **kwargs)
        self.erb_conv3 = convkxf(width * wf**2, width * wf**2, k=k, fstride=1, **kwargs)
        self.df_conv0 = convkxf(2, width, fstride=1, k=k0, lookahead=p.conv_lookahead, **kwargs)
        self.df_conv1 = convkxf(width, width * wf, k=k, **kwargs)
        self.erb_bins = p.nb_erb
        self.emb_dim = width * p.nb_erb // 4 * wf**2
        self.df_fc_emb = GroupedLinear(width * p.nb_df // 2, self.emb_dim, groups=p.lin_groups)
        self.emb_out_dim = p.emb_hidden_dim
        self.emb_n_layers = p.emb_num_layers
        self.gru_groups = p.gru_groups
        self.emb_gru = _grouped_gru(p, self.emb_dim, self.emb_out_dim, p.emb_num_layers)
        self.lsnr_fc = Sequential(nn.Linear(self.emb_out_dim, 1), Sigmoid())
        self.lsnr_scale = p.lsnr_max - p.lsnr_min
        self.lsnr_offset = p.lsnr_min

    def __call__(self, feat_erb: mx.array, feat_spec: mx.array) -> Tuple[mx.array, ...]:
        e0 = self.erb_conv0(feat_erb)
        e1 = self.erb_conv1(e0)
        e2 = self.erb_conv2(e1)
        e3 = self.erb_conv3(e2)
        c0 = self.df_conv0(feat_spec)
        c1 = self.df_conv1(c0)
        emb = _time_major(e3) + self.df_fc_emb(_time_major(c1))
        emb, _ = self.emb_gru(emb)
        emb = emb.swapaxes(0, 1)
        lsnr = self.lsnr_fc(emb) * self.lsnr_scale + self.lsnr_offset
        return e0, e1, e2, e3, emb, c0, lsnr


class ErbDecoder(nn.Module):
    trace_layout = "NHWC"

    def __init__(self):
        super().__init__()
        p = ModelParams()
        if p.nb_erb % 8 != 0:
            raise ValueError("erb_bins should be divisible by 8")
        width, wf, k = p.conv_ch, p.conv_width_f, p.conv_k_dec
        self.emb_width = width * wf**2
        self.emb_dim = self.emb_width * (p.nb_erb // 4)
        fc = GroupedLinear(p.emb_hidden_dim, self.emb_dim, groups=p.lin_groups, shuffle=p.group_shuffle)
        self.fc_emb = Sequential(fc, nn.ReLU())
        kwargs = {"k": k, "batch_norm": True, "depthwise": p.conv_depthwise}
        tkwargs = {"k": k, "batch_norm": True, "depthwise": p.convt_depthwise, "mode": p.conv_dec_mode}
        pkwargs = {"k": 1, "f": 1, "batch_norm": True}
        self.conv3p = convkxf(width * wf**2, self.emb_width, **pkwargs)
        self.convt3 = convkxf(self.emb_width, width * wf**2, fstride=1, **kwargs)
        self.conv2p = convkxf(width * wf**2, width * wf**2, **pkwargs)
        self.convt2 = convkxf(width * wf**2, width * wf, **tkwargs)
        self.conv1p = convkxf(width * wf, width * wf, **pkwargs)
        self.convt1 = convkxf(width * wf, width, **tkwargs)
        self.conv0p = convkxf(width, width, **pkwargs)
        self.conv0_out = convkxf(width, 1, fstride=1, k=k, act=Sigmoid())

    def __call__(self, emb, e3, e2, e1, e0) -> mx.array:
        b, t, f8, _ = e3.shape
        emb = self.fc_emb(emb).reshape(b, t, -1, f8).swapaxes(2, 3)
        e3 = self.convt3(self.conv3p(e3) + emb)
        e2 = self.convt2(self.conv2p(e2) + e3)
        e1 = self.convt1(self.conv1p(e1) + e2)
        return self.conv0_out(self.conv0p(e0) + e1)


class DfDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        p = ModelParams()
        self.emb_dim = p.emb_hidden_dim
        self.df_n_hidden = p.df_hidden_dim
        self.df_n_layers = p.df_num_layers
        self.df_order = p.df_order
        self.df_bins = p.nb_df
        self.df_lookahead = p.df_lookahead
        self.gru_groups = p.gru_groups
        self.df_convp = convkxf(p.conv_ch, self.df_order * 2, k=1, f=1, complex_in=True, batch_norm=True)
        self.df_gru = _grouped_gru(p, p.emb_hidden_dim, self.df_n_hidden, self.df_n_layers)
        self.df_fc_out = Sequential(nn.Linear(self.df_n_hidden, self.df_bins * self.df_order * 2), Tanh())
        self.df_fc_a = Sequential(nn.Linear(self.df_n_hidden, 1), Sigmoid())

    def __call__(self, emb: mx.array, c0: mx.array) -> Tuple[mx.array, mx.array]:
        b, t, _ = emb.shape
        c, _ = self.df_gru(emb.swapaxes(0, 1))
        c0 = self.df_convp(c0).swapaxes(2, 3)  # [B, T, O*2, F]
        c = c.swapaxes(0, 1)
        alpha = self.df_fc_a(c)
        c = self.df_fc_out(c).reshape(b, t, self.df_order * 2, self.df_bins) + c0
        return c.reshape(b, t, self.df_order, 2, self.df_bins).swapaxes(3, 4), alpha


class DfNet(TorchModuleCalls, nn.Module):
    def __init__(self, erb_inv_fb: mx.array, run_df: bool = True, train_mask: bool = True):
        super().__init__()
        p = ModelParams()
        if p.nb_erb % 8 != 0:
            raise ValueError("erb_bins should be divisible by 8")
        self.freq_bins = p.fft_size // 2 + 1
        self.emb_dim = p.conv_ch * p.nb_erb
        self.erb_bins = p.nb_erb
        self.enc = Encoder()
        self.erb_dec = ErbDecoder()
        self.mask = Mask(erb_inv_fb, post_filter=p.mask_pf)
        self.df_order = p.df_order
        self.df_bins = p.nb_df
        self.df_lookahead = p.df_lookahead
        self.df_dec = DfDecoder()
        self.df_op = DfOp(p.nb_df, p.df_order, p.df_lookahead, freq_bins=self.freq_bins, method=p.dfop_method)
        self.run_df = run_df
        if not run_df:
            logger.warning("Running without DF")
        self.train_mask = train_mask

    def __call__(self, spec: mx.array, feat_erb: mx.array, feat_spec: mx.array,
                 atten_lim: Optional[mx.array] = None) -> Tuple[mx.array, ...]:
        """spec [B, 1, T, F, 2], feat_erb [B, 1, T, E], feat_spec [B, 1, T, F', 2] ->
        enhanced spec, ERB mask [B, 1, T, E], lsnr [B, T, 1], DF alpha [B, T, 1]."""
        e0, e1, e2, e3, emb, c0, lsnr = self.enc(feat_erb.transpose(0, 2, 3, 1), feat_spec[:, 0])
        m = self.erb_dec(emb, e3, e2, e1, e0).transpose(0, 3, 1, 2)
        spec = self.mask(spec, m, atten_lim)
        if self.run_df:
            df_coefs, df_alpha = self.df_dec(emb, c0)
            spec = self.df_op(spec, df_coefs, df_alpha)
        else:
            df_alpha = mx.zeros((spec.shape[0], spec.shape[2], 1))
        return spec, m, lsnr, df_alpha
