"""df_mlx.sepm against df.sepm on speech with noise at several SNRs, 16 and 8 kHz."""

import numpy as np
import pytest

import df_mlx.sepm as ours
from df_mlx.io import resample
from parity.dsp import signals_for
from parity.reference import import_ref
from parity.report import Report, Tolerance, compare

# Same float64 numpy/scipy operations, in a different order in places (vectorised filters).
EXACT64 = Tolerance(1e-9, 1e-9, "float64, same operations")


def _pair(sr: int, snr: float):
    x = signals_for(48000, seconds=3.0)[1][1]
    speech, noise = x[0] - x[1], x[1]
    noise = noise * np.sqrt(np.mean(speech**2) / np.mean(noise**2) / 10 ** (snr / 10))
    return (resample(speech, 48000, sr).astype(np.float64), resample(speech + noise, 48000, sr).astype(np.float64))


@pytest.mark.parametrize("sr", [16000, 8000])
@pytest.mark.parametrize("snr", [-5, 5, 20])
def test_measures(sr, snr):
    ref = import_ref("sepm")
    clean, noisy = _pair(sr, snr)
    report = Report(f"sepm {sr} Hz {snr} dB", "df.sepm")
    for name in ("SNRseg", "fwSNRseg", "llr", "wss"):
        report.add(compare(name, np.array(getattr(ours, name)(clean, noisy, sr)),
                           np.array(getattr(ref, name)(clean, noisy, sr)), EXACT64))
    if sr == 16000:
        for i, (a, b) in enumerate(zip(ours.composite(clean, noisy, sr), ref.composite(clean, noisy, sr))):
            report.add(compare(("pesq", "csig", "cbak", "covl", "ssnr")[i], np.array(a), np.array(b), EXACT64))
    frame = clean[1000:1480]
    for a, b, name in zip(ours.lpcoeff(frame, 16), ref.lpcoeff(frame, 16), ("lpc", "acorr")):
        report.add(compare(name, a, b, Tolerance(0, 0, "same float32 result")))
    print(report.table())
    assert report.passed, report.summary()


def test_bad_input():
    with pytest.raises(ValueError, match="do not match"):
        ours.wss(np.zeros(1000), np.zeros(900), 16000)
    with pytest.raises(ValueError, match="16 kHz"):
        ours.composite(np.zeros(1000), np.zeros(1000), 8000)


def test_perturbed_bands_are_caught(monkeypatch):
    ref = import_ref("sepm")
    clean, noisy = _pair(16000, 5)
    monkeypatch.setattr(ours, "CENT_FREQ", ours.CENT_FREQ * 1.01)
    assert not compare("wss", np.array(ours.wss(clean, noisy, 16000)), np.array(ref.wss(clean, noisy, 16000)),
                       EXACT64).passed
