"""df_mlx.evaluation_utils pieces without a torch counterpart here, and `dfmlx eval`.

`highpass_biquad` stands in for torchaudio's (no build for the pinned torch), so it is checked
against the analytic response of the RBJ high-pass it implements; the metric loops themselves
are compared with df in parity/test_evaluation_utils.py.
"""

import os
import shutil

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from df_mlx import evaluation_utils as eu
from df_mlx.cli import main
from df_mlx.evaluation_cli import match_files

SAMPLES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "df_mlx", "data")
SR = 16000
# A steady sine through the filter after its transient: gain within 1e-3 of |H(f)| (float32 output).
GAIN_TOL = 1e-3


def _sine_gain(freq: float, cutoff: float, sr: int = SR) -> float:
    """Measured gain: RMS over whole periods of the filtered sine, after the transient."""
    t = np.arange(2 * sr) / sr
    x = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    y = eu.highpass_biquad(x, sr, cutoff)[sr:].astype(np.float64)
    return float(np.sqrt(2 * np.mean(y**2)) / 0.5)


def _analytic_gain(freq: float, cutoff: float, q: float = 0.707, sr: int = SR) -> float:
    """|H| of the RBJ high-pass: the analog s^2 / (s^2 + s/Q + 1) at the bilinear-warped frequency."""
    w = np.tan(np.pi * freq / sr) / np.tan(np.pi * cutoff / sr)
    return float(w**2 / np.sqrt((1 - w**2) ** 2 + (w / q) ** 2))


@pytest.mark.parametrize("freq", [20.0, 100.0, 200.0, 400.0, 1000.0, 4000.0])
def test_highpass_biquad_response(freq):
    cutoff = 200.0
    assert abs(_sine_gain(freq, cutoff) - _analytic_gain(freq, cutoff)) < GAIN_TOL


def test_highpass_biquad_shape():
    assert abs(_analytic_gain(200.0, 200.0) - 10 ** (-3 / 20)) < 5e-3  # -3 dB at the cutoff (Q = 0.707)
    assert _analytic_gain(20.0, 200.0) < 0.011  # 12 dB/octave below the cutoff
    dc = eu.highpass_biquad(np.full(SR, 0.5, np.float32), SR, 200.0)
    assert abs(dc[-100:]).max() < 1e-4  # DC removed


def test_highpass_biquad_clamps_output():
    loud = np.sign(np.sin(2 * np.pi * 1000 * np.arange(SR) / SR)).astype(np.float32)  # overshoots
    y = eu.highpass_biquad(loud, SR, 100.0)
    assert y.dtype == np.float32 and y.max() <= 1.0 and y.min() >= -1.0


def test_metric_values_accept_numpy_scalars():
    """SI-SDR of float32 audio is a numpy float32: df's callback rejects it (and its pool join
    then waits forever); ours stores it."""
    from multiprocessing.dummy import Pool

    rng = np.random.default_rng(0)
    clean = rng.standard_normal(SR).astype(np.float32)
    with Pool(1) as pool:
        m = eu.SiSDRMetric(pool=pool)
        m.add(clean=clean, enhanced=clean + 0.1 * rng.standard_normal(SR).astype(np.float32), fn="a.wav")
        value = m.flattend()["a.wav"]["SISDR"]
    assert isinstance(value, np.float32) and 19 < value < 21  # 20 dB SNR


@pytest.fixture
def dirs(tmp_path):
    """clean/, enhanced/ (named as `dfmlx enhance` names them) and noisy/ for the bundled sample."""
    out = {k: tmp_path / k for k in ("clean", "enh", "noisy")}
    for d in out.values():
        d.mkdir()
    shutil.copy(os.path.join(SAMPLES, "clean_sample.wav"), out["clean"] / "s.wav")
    shutil.copy(os.path.join(SAMPLES, "noisy_sample.wav"), out["noisy"] / "s.wav")
    clean, sr = sf.read(os.path.join(SAMPLES, "clean_sample.wav"), dtype="float32")
    noisy, _ = sf.read(os.path.join(SAMPLES, "noisy_sample.wav"), dtype="float32")
    sf.write(out["enh"] / "s_DeepFilterNet3.wav", 0.5 * (clean + noisy), sr, subtype="FLOAT")
    return out


def test_eval_dir_only_matches_the_library(dirs, tmp_path):
    csv_enh, csv_noisy = tmp_path / "enh.csv", tmp_path / "noisy.csv"
    r = CliRunner().invoke(main, ["eval", str(dirs["clean"]), str(dirs["enh"]), "-n", str(dirs["noisy"]),
                                  "--metrics", "sisdr,stoi", "--csv-enh", str(csv_enh), "--csv-noisy", str(csv_noisy)])
    assert r.exit_code == 0, r.output
    expected = eu.evaluation_loop_dir_only([str(dirs["clean"] / "s.wav")], [str(dirs["enh"] / "s_DeepFilterNet3.wav")],
                                           [str(dirs["noisy"] / "s.wav")], metrics=["sisdr", "stoi"], n_workers=0)
    for name, value in expected.items():
        line = next(x for x in r.stdout.splitlines() if x.startswith(name))
        assert float(line.split()[-1]) == pytest.approx(value, abs=1e-4)
    assert expected["Enhanced SISDR"] > expected["Noisy    SISDR"]  # half the noise is gone
    assert csv_enh.read_text().splitlines()[0] == "filename,SISDR,STOI"
    assert csv_noisy.read_text().splitlines()[1].startswith("s.wav,")


@pytest.mark.slow
def test_eval_enhances_with_the_default_model(dirs):
    r = CliRunner().invoke(main, ["eval", str(dirs["clean"]), "-n", str(dirs["noisy"]), "--metrics", "sisdr"])
    assert r.exit_code == 0, r.output
    scores = {line.rsplit(maxsplit=1)[0]: float(line.split()[-1]) for line in r.stdout.splitlines()}
    assert scores["Enhanced SISDR"] > scores["Noisy    SISDR"] + 3  # DFN3 removes most of the noise


def test_match_files_by_suffix_and_errors(tmp_path):
    for name in ("a.wav", "b.wav"):
        (tmp_path / name).write_bytes(b"")
    other = tmp_path / "o"
    other.mkdir()
    for name in ("a_X.wav", "b.wav", "b_Y.wav"):
        (other / name).write_bytes(b"")
    clean = [str(tmp_path / "a.wav"), str(tmp_path / "b.wav")]
    assert [os.path.basename(p) for p in match_files(clean, str(other), "enhanced")] == ["a_X.wav", "b.wav"]
    (other / "a_Z.wav").write_bytes(b"")
    with pytest.raises(Exception, match=r"no enhanced file in .* for a.wav \(ambiguous\)"):
        match_files(clean, str(other), "enhanced")


@pytest.mark.parametrize("args, message", [
    (["{clean}"], "give ENHANCED_DIR, or --noisy-dir"),
    (["{clean}", "{enh}", "--metrics", "stoi,mos"], "unknown metric(s) mos"),
    (["{clean}", "{empty}"], "no enhanced file in"),
    (["{clean}", "{enh}", "-m", "x"], "--model enhances the noisy files"),
])
def test_eval_usage_errors(dirs, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    paths = {k: str(v) for k, v in dirs.items()} | {"empty": str(tmp_path / "empty")}
    r = CliRunner().invoke(main, ["eval"] + [a.format(**paths) for a in args])
    assert r.exit_code != 0 and message in r.output, r.output


@pytest.mark.parametrize("bad", ["corrupt", "shorter", "nan", "silent"])
def test_eval_bad_audio_fails_cleanly(dirs, tmp_path, bad):
    enh = dirs["enh"] / "s_DeepFilterNet3.wav"
    if bad == "corrupt":
        enh.write_bytes(b"RIFF\x00\x00not audio")
    elif bad == "shorter":
        sf.write(enh, np.zeros(1000, np.float32), 48000)
    elif bad == "nan":
        x, sr = sf.read(enh, dtype="float32")
        x[100] = np.nan
        sf.write(enh, x, sr, subtype="FLOAT")
    else:  # silent clean and enhanced: PESQ finds no utterance
        for path in (enh, dirs["clean"] / "s.wav"):
            sf.write(path, np.zeros(48000, np.float32), 48000)
    csv_path = tmp_path / "out.csv"
    r = CliRunner().invoke(main, ["eval", str(dirs["clean"]), str(dirs["enh"]), "--csv-enh", str(csv_path),
                                  "--metrics", "pesq" if bad == "silent" else "sisdr"])
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error")]
    assert r.exit_code == 1 and len(errors) == 1 and not r.stdout, r.output
    assert not csv_path.exists()
