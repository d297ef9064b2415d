"""df_mlx.discriminator and the GAN losses of df_mlx.loss against the DFNet4 fork's
`df.discriminator` / `df.loss` (sealad886/DeepFilterNet4): every conv output, every feature
map, the scores, spectral_norm's power-iteration buffers in training mode, and the gradients
with respect to the waveform and every parameter (weight_g / weight_v / weight_orig / bias).
From the committed fixtures (parity/fixtures/fork, recorded by parity/fork_recorder.py), and
live against the fork when $DFMLX_FORK_DIR names a checkout."""

import mlx.core as mx
import numpy as np
import pytest

import df_mlx.discriminator as disc
import df_mlx.loss as loss
from parity.fork_recorder import (CASES, FIXTURE_DIR, assert_fixture_current, fixture_report, live,
                                  load_fixture, mlx_call, mlx_kwargs, record_in_subprocess)
from parity.report import Tolerance

# float32 convolutions of <= 41 taps (up to 1024 channels in the live cases) on O(1) inputs,
# weights renormalised per output channel (weight_norm) or divided by sigma (spectral_norm):
# measured worst 2.3e-6 absolute (combined_disc msd.discriminators.0.convs.1, scale 1.6).
LAYER = Tolerance(1e-5, 1e-6, "float32 rounding through <= 8 normalised convolutions and the loss means")
# Gradients of sum(out * w) over every position and feature map, through 1/|v| or 1/sigma:
# measured worst 9.2e-5 absolute on a scale of 110 (scale_disc_spectral_train convs.0.weight_orig).
GRAD = Tolerance(3e-5, 1e-5, "float32 gradient sums over all positions and feature maps")

GAN_CASES = [name for name, case in CASES.items() if case.module.split(".")[0] in ("discriminator", "loss")]
COMMITTED = [name for name in GAN_CASES if CASES[name].committed]


def twin(fixture):
    """The df_mlx counterpart of the case's fork class or function."""
    mod_name, name = fixture.case["module"].split(".", 1)
    obj = getattr({"discriminator": disc, "loss": loss}[mod_name], name)
    return obj(**mlx_kwargs(fixture)) if isinstance(obj, type) else mlx_call(obj)


def check(fixture, **kwargs):
    report = fixture_report(fixture, twin(fixture), LAYER, grad_tol=GRAD, **kwargs)
    print(report.table())
    return report


@pytest.mark.parametrize("name", COMMITTED)
def test_fixture(name):
    """Every traced layer, the feature maps, scores and all gradients within tolerance."""
    fixture = load_fixture(name)
    report = check(fixture)
    assert report.passed, report.summary()
    assert any(r.name.startswith("grad.") for r in report.layers), "the fixture carries no gradients"


@pytest.mark.parametrize("name", COMMITTED)
def test_fixture_is_small(name):
    assert (FIXTURE_DIR / f"{name}.safetensors").stat().st_size < 300_000


@pytest.mark.parametrize("name", ["period_disc_spectral_train", "scale_disc_spectral_train"])
def test_power_iteration_is_checked(name):
    """Training mode moves spectral_norm's u and v, and the report compares them."""
    fixture = load_fixture(name)
    assert fixture.state_after and all(k.endswith(("weight_u", "weight_v")) for k in fixture.state_after)
    report = check(fixture, grads=False)
    assert sum(r.name.startswith("state_after.") for r in report.layers) == len(fixture.state_after)


def test_eval_mode_replay_misses_power_iteration():
    """The training-mode recording differs from an eval-mode pass (sigma from the stale u, v):
    the power iteration is what the fixture measures."""
    fixture = load_fixture("period_disc_spectral_train")
    fixture.meta["case"] = dict(fixture.case, train=False)
    report = check(fixture, grads=False)
    assert not report.passed


def test_weight_norm_g_is_checked():
    """A 1% error in one conv's weight_g is named first, everything before it within tolerance."""
    fixture = load_fixture("period_disc")

    def perturb(module):
        module.convs[2].weight_g = module.convs[2].weight_g * 1.01

    report = check(fixture, prepare=perturb, grads=False)
    assert not report.passed
    assert report.first_failure.name == "convs.2", report.summary()
    first = [r.name for r in report.layers].index(report.first_failure.name)
    assert all(r.passed for r in report.layers[:first])


def test_feature_matching_detaches_real_maps():
    """No gradient reaches the real feature maps (the fork detaches them)."""
    fixture = load_fixture("gan_feature_matching_loss")
    n = len(fixture.inputs) // 2
    assert all(not g.any() for g in fixture.grad_inputs[:n]) and all(g.any() for g in fixture.grad_inputs[n:])


def test_unknown_loss_type_is_rejected():
    with pytest.raises(ValueError, match="Unknown loss type: wgan"):
        loss.GeneratorLoss("wgan")


def test_short_waveform_is_rejected():
    with pytest.raises(ValueError, match="too short"):
        disc.PeriodDiscriminator(7, channels=[2])(mx.zeros((1, 3)))


def test_multi_period_is_its_sub_discriminators():
    """MPD runs each period discriminator on the same waveform (an MLX-only check of the
    composition, at the fork's widths that only the live cases record)."""
    mpd = disc.MultiPeriodDiscriminator(periods=[2, 3])
    x = mx.random.normal((1, 1, 300), key=mx.random.key(0))
    scores, fmaps = mpd(x)
    for d, s, f in zip(mpd.discriminators, scores, fmaps):
        s_ref, f_ref = d(x)
        np.testing.assert_array_equal(np.array(s), np.array(s_ref))
        assert len(f) == len(f_ref) == 6


@pytest.fixture(scope="module")
def live_dir(tmp_path_factory):
    """All discriminator and GAN loss cases recorded from the fork checkout now, in one subprocess."""
    out = tmp_path_factory.mktemp("fork_gan")
    record_in_subprocess(GAN_CASES, out, timeout=900)
    return out


@live
@pytest.mark.parametrize("name", GAN_CASES)
def test_live(name, live_dir):
    """The case recorded from the fork checkout now, compared."""
    report = check(load_fixture(name, live_dir))
    assert report.passed, report.summary()


@live
@pytest.mark.parametrize("name", COMMITTED)
def test_committed_fixture_is_current(name, live_dir):
    """The committed fixture is what the checkout records (same weights, inputs, outputs)."""
    assert_fixture_current(name, live_dir)
