"""df_mlx.scripts.dnsmos_dns5 against df.scripts.dnsmos_dns5 (P.835 + P.808, the file path and the
array path) and against speechmos's own DNSMOS, with the same ONNX models."""

import sys
import types

import numpy as np
import pytest
import soundfile as sf
import torch

from df_mlx.io import resample
from df_mlx.scripts import dnsmos_dns5 as ours
from parity.dsp import signals_for
from parity.reference import import_ref
from parity.report import Report, Tolerance, compare

pytest.importorskip("onnxruntime")
pytest.importorskip("librosa")
# Same features through the same networks: only float rounding of the FFTs differs.
MOS = Tolerance(1e-4, 1e-4, "FFT rounding of the features through the networks; df's isclose")
# dB mel features of the array path: numpy float64 FFT vs torch float32 (then / 40).
MEL = Tolerance(1e-4, 0.0, "float32 vs float64 FFT of the power spectrum, in dB / 40")


@pytest.fixture(scope="module")
def models():
    try:
        return ours.local_onnx_models()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture
def ref(monkeypatch):
    """The reference module; it imports pandas at module level for its CSV helpers only (not
    compared), so a bare module stands in where pandas is not installed."""
    try:
        import pandas  # noqa: F401
    except ImportError:
        pandas = types.ModuleType("pandas")
        pandas.DataFrame = type("DataFrame", (), {})  # named in an annotation
        monkeypatch.setitem(sys.modules, "pandas", pandas)
    monkeypatch.delitem(sys.modules, "df.scripts.dnsmos_dns5", raising=False)
    return import_ref("scripts.dnsmos_dns5")


def _audio(seconds: float, noise_gain: float) -> np.ndarray:
    x = signals_for(48000, seconds=seconds)[1][1]
    mix = x[0] - x[1] + noise_gain * x[1]
    return np.clip(resample(mix, 48000, 16000), -1, 1).astype(np.float32)


@pytest.mark.parametrize("seconds, noise_gain", [(4.0, 1.0), (10.5, 0.3)])
def test_dns5_scores(models, ref, tmp_path, seconds, noise_gain):
    audio = _audio(seconds, noise_gain)
    path = str(tmp_path / "x.wav")
    sf.write(path, audio, 16000, subtype="FLOAT")
    theirs, mine = ref.ComputeScore(*models, cpu=True), ours.ComputeScore(*models, cpu=True)
    report = Report(f"DNSMOS DNS5 {seconds}s noise x{noise_gain}", "df.scripts.dnsmos_dns5")
    seg = audio[:16000]
    report.add(compare("audio_melspec_torch", mine.audio_melspec_torch(seg), theirs.audio_melspec_torch(seg), MEL))
    report.add(compare("audio_melspec", mine.audio_melspec(seg), theirs.audio_melspec(seg), Tolerance(0, 0, "librosa")))
    for source, a, b in (("file", mine(path, 16000), theirs(path, 16000)),
                         ("array", mine(audio, 16000, fname="x"), theirs(torch.from_numpy(audio), 16000, fname="x"))):
        assert a["num_hops"] == b["num_hops"] and a["len_in_sec"] == b["len_in_sec"]
        for name in ("SIG_raw", "BAK_raw", "OVRL_raw", *ours.NAMES):
            report.add(compare(f"{source}.{name}", np.array(a[name], np.float64), np.array(b[name], np.float64), MOS))
    print(report.table())
    assert report.passed, report.summary()


@pytest.mark.parametrize("personalized", [False, True])
def test_against_speechmos(personalized, tmp_path):
    """speechmos is an independent implementation over the same models. It takes librosa's mel
    features (zero-padded frames), as df's file path does; df's array path pads by reflection,
    which moves P808_MOS by ~0.1 (measured), so the file path is compared."""
    speechmos = pytest.importorskip("speechmos.dnsmos")
    audio = _audio(10.5, 0.5)
    path = str(tmp_path / "x.wav")
    sf.write(path, audio, 16000, subtype="FLOAT")
    mine = ours.ComputeScore(*ours.local_onnx_models(personalized), cpu=True)
    scores = mine(path, 16000, personalized)
    theirs = speechmos.run(audio, 16000, model_type="dnsmos_personalized" if personalized else "dnsmos")
    report = Report(f"DNSMOS vs speechmos (personalized={personalized})", "speechmos")
    for name, key in (("SIG", "sig_mos"), ("BAK", "bak_mos"), ("OVRL", "ovrl_mos"), ("P808_MOS", "p808_mos")):
        report.add(compare(name, np.array(scores[name], np.float64), np.array(theirs[key], np.float64), MOS))
    print(report.table())
    assert report.passed, report.summary()


def test_eval_sample_and_bad_input(models, tmp_path):
    path = str(tmp_path / "x.wav")
    sf.write(path, _audio(3.0, 1.0), 16000)
    compute = ours.ComputeScore(*models, cpu=True)
    scores = ours.eval_sample_dnsmos(path, log=False, compute_score=compute)
    assert list(scores) == ours.NAMES and all(1.0 < v < 5.0 for v in scores.values())
    ours.eval_sample_dnsmos(path, list(scores.values()), log=False, compute_score=compute)
    with pytest.raises(ValueError, match="differs from the target"):
        ours.eval_sample_dnsmos(path, [v + 0.1 for v in scores.values()], log=False, compute_score=compute)
    for bad, match in ((np.zeros((2, 100)), "mono"), (np.zeros(0), "mono"), (np.full(100, np.nan), "NaN")):
        with pytest.raises(ValueError, match=match):
            compute(bad, 16000)
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    with pytest.raises(ValueError, match="not a readable audio file"):
        compute(str(tmp_path / "bad.wav"), 16000)
