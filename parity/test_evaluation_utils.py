"""df_mlx.evaluation_utils against df.evaluation_utils: every metric class, the three evaluation
loops (with a twin DFN3 for the enhancing ones), the CSV files and the helpers.

df.evaluation_utils imports torchaudio (a `Resample` transform and `highpass_biquad`), which has
no build for the pinned torch. The `torchaudio_shim` fixture stands in for it with df-mlx's port
of torchaudio's sinc resampler (checked against soxr in tests/test_io.py), and both sides load
files with the same loader, so these tests compare the evaluation logic and the metrics; our
`highpass_biquad` is checked against its analytic response in tests/test_evaluation.py.
"""

import csv
import sys
import types

import numpy as np
import pytest
import soundfile as sf
import torch

import df_mlx.evaluation_utils as ours
from df_mlx.io import get_resample_params, load_audio, resample
from parity.dsp import signals_for
from parity.models import VARIANTS, twin_models
from parity.reference import import_ref
from parity.report import Report, Tolerance, compare

# pystoi, pesq and df.sepm run on both sides on identical float32 inputs: equal up to the
# float rounding of inputs produced by torch vs numpy ops (none for the dir-only loop).
SAME = Tolerance(1e-6, 1e-6, "the same metric code on the same float32 samples")
# The enhancing loop runs twin DFN3s; the enhanced audio differs by ~1e-6 (model parity) and
# PESQ/composite are not smooth in their input: a stated bound, measured worst ~1e-3.
ENHANCED = Tolerance(5e-3, 1e-3, "metrics of twin-model outputs agreeing to ~1e-6 (PESQ is not smooth)")
METRICS = ["stoi", "sisdr", "composite", "pesq", "pesq-nb"]


@pytest.fixture
def ref(monkeypatch):
    """df.evaluation_utils with torchaudio and (when absent) pandas stood in for."""
    ta, taf, tat = (types.ModuleType(n) for n in ("torchaudio", "torchaudio.functional", "torchaudio.transforms"))

    class Resample(torch.nn.Module):
        def __init__(self, orig_freq, new_freq, **_params):
            super().__init__()
            self.orig, self.new = orig_freq, new_freq

        def forward(self, x):
            return torch.from_numpy(resample(x.numpy(), self.orig, self.new))

    def highpass_biquad(*_args, **_kwargs):
        raise AssertionError("not used by the compared code")

    tat.Resample, taf.highpass_biquad = Resample, highpass_biquad
    ta.functional, ta.transforms = taf, tat
    for name, mod in (("torchaudio", ta), ("torchaudio.functional", taf), ("torchaudio.transforms", tat)):
        monkeypatch.setitem(sys.modules, name, mod)
    try:
        import pandas  # noqa: F401
    except ImportError:
        pandas = types.ModuleType("pandas")
        pandas.DataFrame = type("DataFrame", (), {})  # named in an annotation only
        monkeypatch.setitem(sys.modules, "pandas", pandas)
    for name in ("df.evaluation_utils", "df.scripts.dnsmos_dns5"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    mod = import_ref("evaluation_utils")

    def ref_load_audio(file, sr=None, **kwargs):
        audio, info = load_audio(file, sr, **kwargs)
        return torch.from_numpy(np.array(audio)), info

    def ref_resample(x, orig, new, method="sinc_fast"):
        return torch.from_numpy(resample(x.numpy(), orig, new, method))

    def scalar_tolerant(add):
        """df's callbacks hang on numpy-scalar values (see df_mlx's `_append_values`)."""
        return lambda self, values, fn=None: add(self, np.atleast_1d(np.asarray(values)), fn)

    for attr in ("_add_values_enh", "_add_values_noisy"):
        monkeypatch.setattr(mod.Metric, attr, scalar_tolerant(getattr(mod.Metric, attr)))
    monkeypatch.setattr(mod, "load_audio", ref_load_audio)
    monkeypatch.setattr(mod, "resample", ref_resample)
    monkeypatch.setattr(mod, "get_resample_params", get_resample_params)
    return mod


def _signals(sr: int, seconds: float = 3.0):
    """clean speech, a mildly enhanced estimate, and the noisy mix, float32 [T]."""
    noisy, noise = signals_for(sr, seconds)[1][1]
    clean = noisy - noise
    return clean, clean + 0.3 * noise, noisy


def _report(title, mine: dict, theirs: dict, tol: Tolerance) -> Report:
    report = Report(title, "df.evaluation_utils")
    assert list(mine) == list(theirs), (list(mine), list(theirs))
    for k in theirs:
        report.add(compare(k.strip(), np.asarray(mine[k], np.float64), np.asarray(theirs[k], np.float64), tol))
    print(report.table())
    return report


@pytest.mark.parametrize("sr", [48000, 16000])
def test_metric_classes(ref, sr):
    from multiprocessing.dummy import Pool

    clean, enh, noisy = _signals(sr)
    report = Report(f"metric classes at {sr} Hz", "df.evaluation_utils")
    for name in METRICS:
        with Pool(1) as p_ref, Pool(1) as p_ours:
            m_ref, m_ours = ref.get_metrics(sr)[name](pool=p_ref), ours.get_metrics(sr)[name](pool=p_ours)
            for i in range(2):
                m_ref.add(clean=clean, enhanced=enh, noisy=noisy, fn=f"f{i}.wav")
                m_ours.add(clean=clean, enhanced=enh, noisy=noisy, fn=f"f{i}.wav")
            for noisy_side in (False, True):
                a, b = m_ours.flattend(noisy_side), m_ref.flattend(noisy_side)
                assert list(a) == list(b)
                for fn in b:
                    for k in b[fn]:
                        report.add(compare(f"{name} {fn} {k} noisy={noisy_side}", np.float64(a[fn][k]),
                                           np.float64(b[fn][k]), SAME))
            assert list(m_ours.mean()) == list(m_ref.mean())
    print(report.table())
    assert report.passed, report.summary()


def test_helpers(ref):
    clean, enh, _ = _signals(16000, 2.0)
    mine = {"si_sdr": ours.si_sdr_speechmetrics(clean, enh), "stoi": ours.stoi(clean, enh, 16000),
            "estoi": ours.stoi(clean, enh, 16000, extended=True), "pesq_": ours.pesq_(clean, enh, 16000),
            "composite": ours.composite(clean, enh, 16000)}
    c, e = torch.from_numpy(clean), torch.from_numpy(enh)
    theirs = {"si_sdr": ref.si_sdr_speechmetrics(clean, enh), "stoi": ref.stoi(clean, enh, 16000),
              "estoi": ref.stoi(clean, enh, 16000, extended=True), "pesq_": ref.pesq_(c, e, 16000),
              "composite": ref.composite(c, e, 16000)}
    assert _report("helpers", mine, theirs, SAME).passed


def _write_set(tmp_path, sr: int, n: int = 2):
    dirs = {k: tmp_path / k for k in ("clean", "enh", "noisy")}
    for d in dirs.values():
        d.mkdir()
    files = {k: [] for k in dirs}
    for i in range(n):
        clean, enh, noisy = _signals(sr, 2.0 + i)
        for k, x in zip(dirs, (clean, enh, noisy)):
            path = str(dirs[k] / f"s{i}.wav")
            sf.write(path, x, sr, subtype="FLOAT")
            files[k].append(path)
    return files


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _same_csv(a, b, tol: Tolerance, title: str) -> Report:
    ra, rb = _read_csv(a), _read_csv(b)
    assert ra[0] == rb[0] and [r[0] for r in ra] == [r[0] for r in rb]
    report = Report(title, "df.evaluation_utils")
    for row_a, row_b in zip(ra[1:], rb[1:]):
        for name, x, y in zip(ra[0][1:], row_a[1:], row_b[1:]):
            report.add(compare(f"{row_a[0]} {name}", np.float64(x), np.float64(y), tol))
    return report


def test_evaluation_loop_dir_only(ref, tmp_path):
    files = _write_set(tmp_path, 48000)
    kw = dict(metrics=["stoi", "sisdr", "composite"], n_workers=0, log_percent=50)
    theirs = ref.evaluation_loop_dir_only(files["clean"], files["enh"], files["noisy"], **kw,
                                          csv_path_enh=str(tmp_path / "ref_enh.csv"),
                                          csv_path_noisy=str(tmp_path / "ref_noisy.csv"))
    mine = ours.evaluation_loop_dir_only(files["clean"], files["enh"], files["noisy"], **kw,
                                         csv_path_enh=str(tmp_path / "enh.csv"),
                                         csv_path_noisy=str(tmp_path / "noisy.csv"))
    report = _report("evaluation_loop_dir_only", mine, theirs, SAME)
    for which in ("enh", "noisy"):
        r = _same_csv(tmp_path / f"{which}.csv", tmp_path / f"ref_{which}.csv", SAME, f"csv {which}")
        print(r.table())
        assert r.passed, r.summary()
    assert report.passed, report.summary()


def test_evaluation_loop_with_model(ref, tmp_path):
    import libdf

    from df_mlx.libdf import DF

    ref_model, mlx_model, p = twin_models("deepfilternet3", VARIANTS["deepfilternet3"][0])
    files = _write_set(tmp_path, p.sr)
    saved = {}
    kw = dict(metrics=["stoi", "sisdr", "composite"], n_workers=0, log_percent=50, noisy_metric=True)
    theirs = ref.evaluation_loop(libdf.DF(sr=p.sr, fft_size=p.fft_size, hop_size=p.hop_size, nb_bands=p.nb_erb),
                                 ref_model, files["clean"], files["noisy"], **kw,
                                 save_audio_callback=lambda fn, x: saved.__setitem__(("ref", fn), x.numpy()))
    mine = ours.evaluation_loop(DF(sr=p.sr, fft_size=p.fft_size, hop_size=p.hop_size, nb_bands=p.nb_erb),
                                mlx_model, files["clean"], files["noisy"], **kw,
                                save_audio_callback=lambda fn, x: saved.__setitem__(("ours", fn), x))
    report = _report("evaluation_loop (twin DFN3)", mine, theirs, ENHANCED)
    for fn in files["clean"]:
        report.add(compare(f"enhanced {fn[-6:]}", saved[("ours", fn)], saved[("ref", fn)],
                           Tolerance(1e-5, 0.0, "twin DFN3 outputs after the ISTFT")))
    print(report.table())
    assert report.passed, report.summary()


def test_metric_check_fails_on_a_changed_metric(ref, monkeypatch):
    """The comparison is sensitive: SI-SDR without the scaling factor is caught."""
    from multiprocessing.dummy import Pool

    monkeypatch.setattr(ours, "si_sdr_speechmetrics",
                        lambda reference, estimate: 10 * np.log10(np.sum(reference**2) / np.sum((estimate - reference)**2)))
    clean, enh, _ = _signals(16000, 2.0)
    with Pool(1) as p1, Pool(1) as p2:
        a, b = ours.SiSDRMetric(pool=p1), ref.SiSDRMetric(pool=p2)
        a.add(clean=clean, enhanced=0.5 * enh)
        b.add(clean=clean, enhanced=0.5 * enh)
        assert not compare("SISDR", np.float64(a.mean()["Enhanced SISDR"]), np.float64(b.mean()["Enhanced SISDR"]),
                           SAME).passed
