"""df_mlx.stoi against df.stoi (values and gradients) and against pystoi (independent)."""

import mlx.core as mx
import numpy as np
import pytest
import torch

import df_mlx.stoi as ours
from df_mlx.io import resample
from parity.dsp import signals_for
from parity.reference import import_ref
from parity.report import Report, Tolerance, compare

# df.stoi runs in float32; STOI is a mean of correlations (|values| <= 1).
VALUE = Tolerance(1e-5, 0.0, "float32 correlations averaged into a score in [-1, 1]")
GRAD = Tolerance(1e-7, 1e-4, "float32 gradients through normalisations of short segments")
# pystoi resamples with its own filter and works in float64: scores differ by ~1e-3.
PYSTOI = Tolerance(5e-3, 0.0, "pystoi's own resampler (float64) vs torchaudio's sinc resampler")


@pytest.fixture
def ref(monkeypatch):
    """df.stoi with df.io.resample (torchaudio, absent here) replaced by df_mlx's port of it."""
    mod = import_ref("stoi")
    monkeypatch.setattr(mod, "resample", lambda x, a, b: torch.from_numpy(resample(x.detach().numpy(), a, b))
                        if a != b else x)
    return mod


def _pairs(sr: int):
    """[B, T] clean and degraded signals: speech with noise at -5, 0, 5 and 10 dB."""
    x = signals_for(48000, seconds=3.0)[1][1]
    speech, noise = x[0] - x[1], x[1] / np.sqrt(np.mean(x[1] ** 2))
    p = np.mean(speech**2)
    clean = np.stack([speech] * 4)
    noisy = np.stack([speech + noise * np.sqrt(p / 10 ** (snr / 10)) for snr in (-5, 0, 5, 10)])
    if sr != 48000:
        clean, noisy = resample(clean, 48000, sr), resample(noisy, 48000, sr)
    return clean.astype(np.float32), noisy.astype(np.float32)


@pytest.mark.parametrize("sr", [10000, 16000, 48000])
def test_stoi_values_and_gradient(ref, sr):
    clean, noisy = _pairs(sr)
    t_noisy = torch.from_numpy(noisy).requires_grad_(sr == 10000)  # other rates resample in numpy
    t_val = ref.stoi(torch.from_numpy(clean), t_noisy, sr)
    m_grad = None
    if sr == 10000:
        t_val.sum().backward()
        m_grad = mx.grad(lambda y: ours.stoi(mx.array(clean), y, 10000).sum())(mx.array(noisy))
    report = Report(f"STOI {sr} Hz", "df.stoi")
    report.add(compare("stoi", ours.stoi(clean, noisy, sr), t_val, VALUE))
    if m_grad is not None:
        report.add(compare("grad.degraded", m_grad, t_noisy.grad, GRAD))
    from pystoi import stoi as pystoi

    report.add(compare("vs pystoi", ours.stoi(clean, noisy, sr),
                       np.array([pystoi(c, n, sr) for c, n in zip(clean, noisy)]), PYSTOI))
    print(report.table())
    assert report.passed, report.summary()


def test_helpers(ref):
    report = Report("STOI helpers", "df.stoi")
    obm, cf = ours.thirdoct(10000, 512, 15, 150)
    robm, rcf = ref.thirdoct(10000, 512, 15, 150)
    report.add(compare("thirdoct.obm", obm, robm, Tolerance(0, 0, "exact")))
    report.add(compare("thirdoct.cf", cf, rcf, Tolerance(0, 0, "exact")))
    clean, noisy = _pairs(10000)
    xs, ys = ours.remove_silent_frames(mx.array(clean), mx.array(noisy), 40, 256, 128)
    rx, ry = ref.remove_silent_frames(torch.from_numpy(clean), torch.from_numpy(noisy), 40, 256, 128)
    for i, (a, b) in enumerate(zip(xs, rx)):
        report.add(compare(f"remove_silent_frames.x{i}", a, b, VALUE))
    for i, (a, b) in enumerate(zip(ys, ry)):
        report.add(compare(f"remove_silent_frames.y{i}", a, b, VALUE))
    report.add(compare("_stft", ours._stft(mx.array(clean[0, :5000]), 256, 512, 128),
                       ref._stft(torch.from_numpy(clean[0, :5000]), 256, 512, 128), VALUE))
    print(report.table())
    assert report.passed, report.summary()


def test_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        ours.stoi(np.zeros((1, 100)), np.zeros((1, 90)), 10000)
    with pytest.raises(ValueError, match="batch_size"):
        ours.stoi(np.zeros(100), np.zeros(100), 10000)
    with pytest.raises(ValueError, match="NaN or inf"):
        ours.stoi(np.full((1, 20000), np.nan), np.zeros((1, 20000)), 10000)
    for fs in (0, -16000, 16000.5, True):
        with pytest.raises(ValueError, match="sampling rate"):
            ours.stoi(np.zeros((1, 20000)), np.zeros((1, 20000)), fs)


def test_degenerate_signals(ref):
    """Too short after silence removal: NaN and a warning (df leaves the entry uninitialised).
    An all-silent target: 0, as df's arithmetic gives."""
    rng = np.random.default_rng(0)
    short = rng.standard_normal((1, 300)).astype(np.float32)
    assert np.isnan(np.array(ours.stoi(short, short, 10000))).all()
    silent, noise = np.zeros((1, 20000), np.float32), rng.standard_normal((1, 20000)).astype(np.float32)
    expected = ref.stoi(torch.from_numpy(silent), torch.from_numpy(noise), 10000).numpy()
    got = np.array(ours.stoi(silent, noise, 10000))
    np.testing.assert_allclose(got, expected, atol=VALUE.atol)
    assert got[0] == 0
