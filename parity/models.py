"""Whole-model parity: the same config and random weights in the reference and in df_mlx,
every traced layer and the four outputs compared, for each family and config variant."""

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import numpy as np

from parity.pairs import pair_report, randomize_norm_stats, twin
from parity.reference import import_ref, load_configs, load_reference
from parity.report import Report, Tolerance

# float32 layers of a random-weight model at T=100: convs, grouped linears and GRU steps each
# round at ~1e-7 relative; recurrent accumulation over 100 steps stays near 1e-6 absolute.
LAYER = Tolerance(1e-5, 0.0, "float32 rounding through convs, linears and 100 GRU steps")
# The multi-frame filters multiply O(10) covariance entries (random weights): float32 products
# are exact to ~1e-6 relative of that scale (measured worst 2e-6).
MF_LAYER = Tolerance(1e-5, 1e-5, "float32 products of O(10) covariances in the MF filter")
# Output tolerance per family where it differs from LAYER.
FAMILY_TOL = {"deepfilternetmf": MF_LAYER}
# Gradients of sum(out * w) sum over B*T*F positions and many layers.
LAYER_GRAD = Tolerance(1e-4, 1e-5, "float32 gradient sums over every output position and layer")


@dataclass(frozen=True)
class Variant:
    name: str
    ini: str  # sections/keys on top of [train] model = <family>
    run_df: bool = True
    batch: int = 2


def _ini(family: str, body: str) -> str:
    return f"[train]\nmodel = {family}\n\n{body}"


VARIANTS: Dict[str, List[Variant]] = {
    "deepfilternet3": [
        Variant("default", ""),
        Variant("lookahead_skips_groups_pf", """[df]
df_lookahead = 2
[deepfilternet]
conv_lookahead = 2
emb_gru_skip_enc = groupedlinear
emb_gru_skip = groupedlinear
df_gru_skip = groupedlinear
linear_groups = 8
mask_pf = true
pf_beta = 0.03
"""),
        Variant("concat_identity_kernels_small", """[df]
nb_erb = 24
nb_df = 64
df_order = 3
[deepfilternet]
conv_ch = 8
conv_kernel = 2,3
convt_kernel = 1,3
conv_kernel_inp = 2,3
enc_concat = true
emb_gru_skip = identity
df_gru_skip = identity
df_pathway_kernel_size_t = 2
df_num_layers = 2
emb_num_layers = 3
enc_linear_groups = 8
emb_hidden_dim = 48
df_hidden_dim = 48
"""),
        Variant("sr16k_no_df", """[df]
sr = 16000
fft_size = 320
hop_size = 160
nb_erb = 16
nb_df = 48
lsnr_max = 30
lsnr_min = -10
[deepfilternet]
emb_hidden_dim = 128
df_hidden_dim = 128
""", run_df=False),
        Variant("lsnr_dropout_batch1", """[deepfilternet]
lsnr_dropout = true
""", batch=1),
    ],
    "deepfilternet": [
        Variant("default", ""),
        Variant("lookahead3_wide_upsample_groups", """[df]
df_order = 3
df_lookahead = 1
[deepfilternet]
conv_lookahead = 3
conv_k_enc = 3
conv_k_dec = 2
conv_width_factor = 2
conv_dec_mode = upsample
gru_groups = 4
group_shuffle = true
linear_groups = 8
emb_num_layers = 2
df_num_layers = 2
dfop_method = real_strided
mask_pf = true
"""),
        Variant("dense_noshuffle_loop", """[df]
nb_erb = 24
nb_df = 64
[deepfilternet]
conv_lookahead = 1
conv_k_enc = 1
conv_depthwise = false
convt_depthwise = false
gru_groups = 2
group_shuffle = false
emb_hidden_dim = 64
df_hidden_dim = 64
dfop_method = real_loop
"""),
        Variant("sr16k_no_df_complex", """[df]
sr = 16000
fft_size = 320
hop_size = 160
nb_erb = 16
nb_df = 48
[deepfilternet]
conv_lookahead = 2
dfop_method = complex_strided
""", run_df=False),
    ],
    "deepfilternetmf": [
        Variant("default_wf_inverse", ""),
        Variant("mvdr_cholesky_lookahead_skips", """[df]
df_lookahead = 2
df_order = 3
[deepfilternet]
mfop_method = mvdr
mf_use_cholesky_decomp = true
conv_lookahead = 2
emb_gru_skip = groupedlinear
df_gru_skip = groupedlinear
linear_groups = 8
mask_pf = true
"""),
        Variant("wf_cholesky_concat_kernels_small", """[df]
nb_erb = 24
nb_df = 64
[deepfilternet]
mf_use_cholesky_decomp = true
conv_ch = 8
conv_kernel = 2,3
conv_kernel_inp = 2,3
enc_concat = true
emb_gru_skip = identity
df_gru_skip = identity
df_pathway_kernel_size_t = 2
df_num_layers = 2
emb_num_layers = 3
enc_linear_groups = 8
emb_hidden_dim = 48
df_hidden_dim = 48
"""),
        Variant("sr16k_no_mf", """[df]
sr = 16000
fft_size = 320
hop_size = 160
nb_erb = 16
nb_df = 48
[deepfilternet]
emb_hidden_dim = 128
df_hidden_dim = 128
""", run_df=False),
    ],
    "deepfilternet2": [
        # The default DF_OUTPUT_LAYER=linear fails in the reference's own forward (0.5.6:
        # DfOutputReshapeOld views the transposed DfDecoderLinear output); that decoder is
        # compared on its own in parity/test_deepfilternet2.py.
        Variant("default_groupedlinear_output", """[deepfilternet]
df_output_layer = groupedlinear
"""),
        Variant("squeeze_mf_lookahead_skip_pf", """[df]
df_lookahead = 2
[deepfilternet]
gru_type = squeeze
df_output_layer = groupedlinear
dfop_method = df
df_gru_skip = groupedlinear
linear_groups = 8
conv_lookahead = 2
df_n_iter = 1
mask_pf = true
"""),
        Variant("groups_noshuffle_identity_kernels", """[df]
nb_erb = 24
nb_df = 64
df_order = 3
[deepfilternet]
conv_ch = 8
gru_groups = 4
group_shuffle = false
emb_num_layers = 3
df_num_layers = 2
df_output_layer = groupedlinear
dfop_method = df
df_gru_skip = identity
enc_concat = true
conv_kernel = 2,3
conv_kernel_inp = 2,3
df_pathway_kernel_size_t = 2
emb_hidden_dim = 64
df_hidden_dim = 64
"""),
        Variant("sr16k_no_df", """[df]
sr = 16000
fft_size = 320
hop_size = 160
nb_erb = 16
nb_df = 48
[deepfilternet]
emb_hidden_dim = 128
df_hidden_dim = 128
df_output_layer = groupedlinear
""", run_df=False),
    ],
}


def model_inputs(p, batch: int, frames: int, seed: int = 0):
    """Random spec [B,1,T,F,2], feat_erb [B,1,T,E], feat_spec [B,1,T,F',2] of unit scale."""
    rng = np.random.default_rng(seed)
    f = p.fft_size // 2 + 1
    spec = rng.standard_normal((batch, 1, frames, f, 2)).astype(np.float32)
    feat_erb = rng.standard_normal((batch, 1, frames, p.nb_erb)).astype(np.float32)
    feat_spec = rng.standard_normal((batch, 1, frames, p.nb_df, 2)).astype(np.float32)
    return [spec, feat_erb, feat_spec]


def twin_models(family: str, variant: Variant, seed: int = 0):
    """The family at the variant's config on both sides (configs loaded into both), random
    torch weights (BatchNorm statistics included) copied into df_mlx strictly; eval mode."""
    import importlib

    import libdf
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        load_configs(_ini(family, variant.ini), Path(tmp))
    ref_family = import_ref(family)
    mlx_family = importlib.import_module(f"df_mlx.{family}")
    p = mlx_family.ModelParams()
    torch.manual_seed(seed)
    ref_state = libdf.DF(sr=p.sr, fft_size=p.fft_size, hop_size=p.hop_size, nb_bands=p.nb_erb)
    ref_model = randomize_norm_stats(ref_family.init_model(ref_state, run_df=variant.run_df), seed)
    mlx_model = mlx_family.init_model(run_df=variant.run_df)
    twin(ref_model, mlx_model)
    return ref_model, mlx_model, p


def model_report(family: str, variant: Variant, frames: int = 100, grads: bool = True,
                 tol: Tolerance = LAYER, seed: int = 0, grad_inputs=None, train: bool = False) -> Report:
    """Compare the twin models layer by layer on random inputs (outputs, every traced layer
    and, with `grads`, the gradients w.r.t. inputs and parameters). `train` puts both in
    training mode except their BatchNorms, which keep their running statistics."""
    import torch

    from df_mlx.layers import BatchNorm2d

    ref_model, mlx_model, p = twin_models(family, variant, seed)
    ref_model.train(train)
    mlx_model.train(train)
    for m in ref_model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    for _, m in mlx_model.named_modules():
        if isinstance(m, BatchNorm2d):
            m.eval()
    inputs = model_inputs(p, variant.batch, frames, seed)
    title = f"{family} {variant.name} T={frames} B={variant.batch}" + (" train" if train else "")
    return pair_report(title, ref_model, mlx_model, inputs, tol, grads=grads,
                       reference=load_reference().describe(), grad_tol=LAYER_GRAD, grad_inputs=grad_inputs)


def family_reports(family: str, grads: bool = False, frames: int = 100) -> List[Report]:
    return [model_report(family, v, frames=frames, grads=grads) for v in VARIANTS[family]]
