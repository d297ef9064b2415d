"""df_mlx.scripts.dnsmos against df.scripts.dnsmos (local P.835 path), same ONNX models."""

import importlib.util
import sys

import numpy as np
import pytest
import torch

from df_mlx.io import resample
from df_mlx.scripts import dnsmos as ours
from parity.dsp import signals_for
from parity.reference import import_ref
from parity.report import Report, Tolerance, compare

pytest.importorskip("onnxruntime")
# Features differ by FFT rounding (numpy float64 vs torch float32); through the networks this
# moves scores by far less than df's own isclose tolerance (1e-4 + 1e-4 x score).
MOS = Tolerance(1e-4, 1e-4, "FFT rounding of the features through the networks; df's isclose")
# log10 power: bins ~100 dB below their frame's peak carry the float32 FFT's absolute rounding
# (~1e-7 of the peak), which is up to ~1e-2 in log10 there (measured worst 1.2e-2).
FEATURES = Tolerance(5e-2, 0.0, "log10 of float32 power at near-silent bins (FFT rounding)")


@pytest.fixture(scope="module")
def models():
    try:
        return ours.local_onnx_models()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def _audio(seconds: float, noise_gain: float) -> np.ndarray:
    x = signals_for(48000, seconds=seconds)[1][1]
    mix = x[0] - x[1] + noise_gain * x[1]  # speech plus the noise at a chosen level
    return resample(mix, 48000, 16000).astype(np.float32)


@pytest.fixture(params=["librosa", "no_librosa"])
def stft_path(request, monkeypatch):
    """df takes librosa's STFT (zero-padded ends) when librosa imports, torch's (reflected
    ends) otherwise; both sides see the same environment."""
    if request.param == "no_librosa":
        monkeypatch.setitem(sys.modules, "librosa", None)  # `import librosa` raises ImportError
    elif importlib.util.find_spec("librosa") is None:
        pytest.skip("librosa not installed")
    ours._librosa_importable.cache_clear()
    yield request.param
    ours._librosa_importable.cache_clear()


@pytest.mark.parametrize("seconds, noise_gain", [(4.0, 1.0), (11.5, 0.3), (10.0, 3.0)])
def test_dnsmos_local(models, seconds, noise_gain, stft_path):
    ref = import_ref("scripts.dnsmos")
    audio = _audio(seconds, noise_gain)
    report = Report(f"DNSMOS {seconds}s noise x{noise_gain} ({stft_path})", "df.scripts.dnsmos")
    report.add(compare("logpowspec", ours.audio_logpowspec(audio[:16000]),
                       ref.audio_logpowspec(torch.from_numpy(audio[:16000])), FEATURES))
    theirs = ref.dnsmos_local(torch.from_numpy(audio).numpy(), *models)
    mine = ours.dnsmos_local(audio, *models)
    for name, a, b in zip(ours.NAMES, mine, theirs):
        report.add(compare(name, np.array(a), np.array(b, dtype=np.float64), MOS))
    print(report.table())
    assert report.passed, report.summary()


def test_bad_audio(models):
    for bad, match in ((np.zeros((2, 100)), "mono"), (np.zeros(0), "empty"), (np.full(100, np.nan), "NaN")):
        with pytest.raises(ValueError, match=match):
            ours.dnsmos_local(bad, *models)
