"""df_mlx.dnsmos_proxy against the DFNet4 fork's `df.dnsmos_proxy`, layer by layer with
gradients, from the committed fixtures and live when $DFMLX_FORK_DIR names a checkout; the
filterbank and window df_mlx computes against the fork's buffers; DNSMOSLoss's two modes."""

import mlx.core as mx
import numpy as np
import pytest

from df_mlx import dnsmos_proxy
from parity.fork_recorder import (CASES, FIXTURE_DIR, assert_fixture_current, fixture_report, live,
                                  load_fixture, mlx_twin, record_in_subprocess)
from parity.report import Tolerance

# float32 STFT (MLX vs pocketfft), log of mel energies, four convs with BatchNorm: the log-mel
# of quiet bands is the least accurate (a 1e-6 relative power error is 1e-6 absolute in log).
LAYER = Tolerance(1e-5, 1e-6, "float32 STFT, log-mel and convolutions")
# Gradients sum over every frame, band and channel (and through log 1/x at quiet bands).
GRAD = Tolerance(1e-5, 1e-5, "float32 gradient sums through convs, mel and STFT")

PROXY_CASES = [n for n, c in CASES.items() if c.module.startswith("dnsmos_proxy.")]
COMMITTED = [n for n in PROXY_CASES if CASES[n].committed]


def check(fixture):
    report = fixture_report(fixture, mlx_twin(fixture), LAYER, grad_tol=GRAD)
    print(report.table())
    return report


@pytest.mark.parametrize("name", COMMITTED)
def test_fixture(name):
    report = check(load_fixture(name))
    assert report.passed, report.summary()
    assert any(r.name.startswith("grad.") for r in report.layers)


@pytest.mark.parametrize("name", COMMITTED)
def test_fixture_is_small(name):
    assert (FIXTURE_DIR / f"{name}.safetensors").stat().st_size < 300_000


@pytest.mark.parametrize("name", COMMITTED)
def test_buffers_as_the_fork_computes_them(name):
    """The mel filterbank and Hann window df_mlx builds equal the fork's recorded buffers."""
    fixture = load_fixture(name)
    ours = mlx_twin(fixture)
    mel = ours if isinstance(ours, dnsmos_proxy.MelSpectrogram) else ours.mel_extractor
    prefix = "" if mel is ours else "mel_extractor."
    np.testing.assert_array_equal(np.array(mel.mel_fb), fixture.state_dict[prefix + "mel_fb"])
    # torch evaluates the window's cosine in float32, df_mlx in float64: one float32 ulp apart.
    np.testing.assert_allclose(np.array(mel.window), fixture.state_dict[prefix + "window"], atol=2.4e-7)


def test_loss_modes_follow_the_scores():
    """DNSMOSLoss: relu(target - OVL) without clean audio; the weighted MSE to the clean
    scores with it, and no gradient through the clean side."""
    rng = np.random.default_rng(0)
    enh, clean = (mx.array(rng.standard_normal((2, 4000)).astype(np.float32) * 0.1) for _ in range(2))
    loss = dnsmos_proxy.DNSMOSLoss(target_ovl=4.5, loss_weight=0.5)
    value, scores = loss(enh)
    assert abs(value.item() - 0.5 * float(np.maximum(4.5 - np.array(scores["ovl"]), 0).mean())) < 1e-6
    value, scores = loss(enh, clean)
    ref = loss.proxy(clean)
    mse = {k: float(((np.array(scores[k]) - np.array(ref[k])) ** 2).mean()) for k in scores}
    assert abs(value.item() - 0.5 * (mse["ovl"] + 0.5 * mse["sig"] + 0.5 * mse["bak"])) < 1e-6
    assert not loss.proxy.trainable_parameters()["sig_head"]["0"]  # frozen by default
    grad = mx.grad(lambda c: loss(enh, c)[0])(clean)
    assert float(mx.abs(grad).max()) == 0.0


def test_proxy_weights_load_strictly(tmp_path):
    from safetensors.numpy import save_file

    fixture = load_fixture("dnsmos_proxy_small")
    path = tmp_path / "proxy.safetensors"
    save_file(dict(fixture.state_dict), str(path))
    proxy = mlx_twin(fixture)
    dnsmos_proxy.load_proxy_weights(proxy, str(path))
    proxy.eval()
    out = proxy(mx.array(fixture.inputs[0]))
    np.testing.assert_allclose(np.array(out["ovl"]), fixture.outputs[2], atol=1e-5)
    from converters.layout import LayoutError

    with pytest.raises(LayoutError):
        dnsmos_proxy.load_proxy_weights(dnsmos_proxy.DNSMOSProxy(hidden_dim=8), str(path))


@pytest.fixture(scope="module")
def live_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fork_dnsmos_proxy")
    record_in_subprocess(PROXY_CASES, out)
    return out


@live
@pytest.mark.parametrize("name", PROXY_CASES)
def test_live(name, live_dir):
    report = check(load_fixture(name, live_dir))
    assert report.passed, report.summary()


@live
@pytest.mark.parametrize("name", COMMITTED)
def test_committed_fixture_is_current(name, live_dir):
    assert_fixture_current(name, live_dir)
