"""df_mlx.deepfilternet4 (with df_mlx.hybrid_encoder and df_mlx.mamba) against the DFNet4 fork's
`df.deepfilternet4` (sealad886/DeepFilterNet4): every traced layer, the four outputs and the
gradients, from the committed fixtures (parity/fixtures/fork) and, when $DFMLX_FORK_DIR names
a checkout, live, including the fork's default 5.1M-parameter model and DfNet4Lite."""

import tempfile
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

import df_mlx.deepfilternet4 as dfn4
from df_mlx.config import config
from parity.fork_recorder import (CASES, FIXTURE_DIR, assert_fixture_current, fixture_report, live,
                                  load_fixture, mlx_twin, record_in_subprocess)
from parity.report import Tolerance

# float32 through convs, attention (softmax over <= 10 frames), LayerNorms and Mamba scans of a
# random-weight model; the lsnr head scales a sigmoid by 40-55 dB, so it rounds at ~55 * 6e-8:
# measured worst 3.8e-6 absolute (enc.6 = lsnr of dfnet4_single, scale 12).
LAYER = Tolerance(1e-5, 0.0, "float32 rounding through convs, attention, Mamba scans; lsnr scaled by 40-55")
# Gradients of sum(out * w) over every position and layer: measured worst 7.6e-6 absolute
# (grad of enc.lsnr_fc.0.bias, scale 87); the live Lite model 3.1e-5 at scale 84.
GRAD = Tolerance(2e-5, 1e-5, "float32 gradient sums over all positions, heads and scan steps")
# The live default model (5.1M parameters, 256-wide attention and Mamba, T=20): measured worst
# 9.5e-6 absolute on the lsnr output (scale 9.6), about 10 float32 ulps.
DEFAULT_LAYER = Tolerance(1e-5, 1e-6, "256-wide layers and 5 Mamba stacks: plus 1e-6 of the layer's scale")

FAMILY_CASES = [name for name, case in CASES.items() if case.module == "deepfilternet4" and case.group == "layers"]
COMMITTED = [name for name in FAMILY_CASES if CASES[name].committed]


twin = mlx_twin


def check(fixture, tol=LAYER, **kwargs):
    report = fixture_report(fixture, twin(fixture), tol, grad_tol=GRAD, **kwargs)
    print(report.table())
    return report


@pytest.mark.parametrize("name", COMMITTED)
@pytest.mark.usefixtures("recurrence_path")
def test_fixture(name):
    fixture = load_fixture(name)
    report = check(fixture)
    assert report.passed, report.summary()
    assert len(report.layers) > 100, "too few layers traced"
    assert CASES[name].grads == any(r.name.startswith("grad.") for r in report.layers)


@pytest.mark.parametrize("name", COMMITTED)
def test_fixture_is_small(name):
    assert (FIXTURE_DIR / f"{name}.safetensors").stat().st_size < 1_000_000


def _scale(module_path: str, factor: float):
    def prepare(model):
        *parents, leaf = module_path.split(".")
        module = model
        for part in parents:
            module = module[int(part)] if isinstance(module, list) else module[part]
        module[leaf] = module[leaf] * factor
    return prepare


@pytest.mark.parametrize("weight, first", [
    ("erb_dec.convt2.1.weight", "erb_dec"),  # the ERB decoder: the encoder must stay within tolerance
    ("enc.phase_encoder.conv_layers.1.1.weight", "enc.phase_encoder.conv_layers.1"),
    ("enc.fusion.mag_phase_attn.in_proj_weight", "enc.fusion.mag_phase_attn"),
    ("df_op.resolution_weights", "df_op"),
])
def test_perturbed_weight_is_named_first(weight, first):
    """A 0.1% error in one weight must be the first divergence, at its own module."""
    report = check(load_fixture("dfnet4_small"), prepare=_scale(weight, 1.001), grads=False)
    assert not report.passed
    assert report.first_failure.name.startswith(first), report.summary()
    index = report.layers.index(report.first_failure)
    assert all(r.passed for r in report.layers[:index])


def test_perturbed_mamba_state_matrix_fails_the_single_variant():
    """Encoder4's Mamba: a 1% error in A shows up in enc.emb_gru first."""
    def prepare(model):
        block = model.enc.emb_gru.mamba_layers[0].mamba
        block.A_log = block.A_log + 0.01

    report = check(load_fixture("dfnet4_single"), prepare=prepare, grads=False)
    assert not report.passed
    assert report.first_failure.name.startswith("enc.emb_gru.mamba_layers.0"), report.summary()


def test_config_keys_and_defaults():
    """The [deepfilternet4] keys are read with the fork's code defaults, and the resolutions
    string parses as in the fork (malformed entries fall back to (NB_DF, DF_ORDER))."""
    config.use_defaults(allow_reload=True)
    p = dfn4.ModelParams4()
    assert (p.backbone, p.mamba_d_state, p.mamba_d_conv, p.mamba_expand) == ("mamba", 16, 4, 2)
    assert (p.use_time_branch, p.use_phase_branch, p.use_multi_res_df, p.adaptive_order) == (False, True, True, False)
    assert p.get_df_resolutions() == [(96, 5), (48, 3), (24, 2)]
    assert (p.df_order, p.max_df_order, p.min_df_order, p.model_variant) == (5, 7, 2, "full")
    p.df_resolutions = "bad;;"
    assert p.get_df_resolutions() == [(p.nb_df, p.df_order)]


def test_default_model_parameter_count():
    """The fork's default DfNet4 has 5,142,310 parameters (measured in the fork; its docs say ~2.6M)."""
    config.use_defaults(allow_reload=True)
    model = dfn4.init_model()
    n = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    assert n == 5_142_310


@pytest.fixture(scope="module")
def live_dir(tmp_path_factory):
    """All DFNet4 cases (the committed ones and the live-only default/Lite) recorded now."""
    out = tmp_path_factory.mktemp("fork_dfnet4")
    record_in_subprocess(FAMILY_CASES, out)
    return out


@live
@pytest.mark.parametrize("name", FAMILY_CASES)
@pytest.mark.usefixtures("recurrence_path")
def test_live(name, live_dir):
    fixture = load_fixture(name, live_dir)
    report = check(fixture, tol=LAYER if CASES[name].committed else DEFAULT_LAYER)
    assert report.passed, report.summary()


@live
@pytest.mark.parametrize("name", COMMITTED)
def test_committed_fixture_is_current(name, live_dir):
    assert_fixture_current(name, live_dir)


def test_lite_rejects_df_feature_layout():
    """DfNet4Lite takes feat_spec as [B, 2, T, F'] (like the fork, whose forward fails on df's
    [B, 1, T, F', 2]); the wrong layout is an error, not a silent misread."""
    fixture_ini = CASES["dfnet4_lite"].ini
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.ini"
        path.write_text(fixture_ini)
        config.load(str(path), allow_reload=True)
    model = dfn4.init_model()
    assert isinstance(model, dfn4.DfNet4Lite)
    spec = mx.zeros((1, 1, 4, 481, 2))
    feat_erb = mx.zeros((1, 1, 4, 32))
    with pytest.raises(ValueError):
        model(spec, feat_erb, mx.zeros((1, 1, 4, 96, 2)))
    out = model(spec, feat_erb, mx.zeros((1, 2, 4, 96)))
    assert out[0].shape == spec.shape and out[3].shape == (1, 5, 4, 96, 2)
