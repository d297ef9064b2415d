"""DeepFilterNet2: every traced layer, the four outputs and all gradients against
df.deepfilternet2, at the default and at non-default configs that switch every option."""

import pytest

from parity.models import VARIANTS, model_report

FAMILY = "deepfilternet2"


@pytest.mark.parametrize("variant", VARIANTS[FAMILY], ids=[v.name for v in VARIANTS[FAMILY]])
@pytest.mark.usefixtures("recurrence_path")
def test_layers_outputs_and_gradients(variant):
    report = model_report(FAMILY, variant, grads=True)
    print(report.table())
    assert report.passed, report.summary()


@pytest.mark.parametrize("gru_groups", [1, 4])
@pytest.mark.usefixtures("recurrence_path")
def test_linear_df_decoder(gru_groups):
    """The default (deprecated) linear DF decoder, module by module: the reference's DfNet
    cannot run it (see parity/models.py), its decoder alone can."""
    import numpy as np

    from parity.models import LAYER, LAYER_GRAD, Variant, twin_models
    from parity.pairs import nchw_to_nhwc, pair_report

    variant = Variant("linear", f"[deepfilternet]\ngru_groups = {gru_groups}\n")
    ref_model, mlx_model, p = twin_models(FAMILY, variant)
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((2, 30, p.emb_hidden_dim)).astype(np.float32)
    c0 = rng.standard_normal((2, p.conv_ch, 30, p.nb_df)).astype(np.float32)
    report = pair_report("DfDecoderLinear", ref_model.df_dec, mlx_model.df_dec, [emb, c0], LAYER,
                         [None, nchw_to_nhwc], grad_tol=LAYER_GRAD)
    print(report.table())
    assert report.passed, report.summary()
