"""df_mlx.enhance against df.enhance: features and whole enhancement on real audio."""

import importlib

import numpy as np
import pytest
import torch

from parity.dsp import signals_for
from parity.models import VARIANTS, twin_models
from parity.reference import import_ref
from parity.report import Report, Tolerance, compare

mlx_enhance = importlib.import_module("df_mlx.enhance")  # the attribute df_mlx.enhance is the function, as in df

# Features: the STFT's FFT rounding (parity/dsp.py FEATURES); audio: float32 model layers
# (1e-5 on a unit-scale spectrum) through the ISTFT's overlap-add.
FEATURES = Tolerance(1e-4, 0.0, "FFT rounding carried into dB features (see parity/dsp.py)")
AUDIO = Tolerance(1e-5, 0.0, "float32 model layers, then overlap-add")


@pytest.fixture(scope="module")
def real_audio():
    return signals_for(48000, seconds=3.0)[1][1]


def test_df_features(real_audio):
    import libdf

    ref_enh = import_ref("enhance")
    report = Report("df_features", "df.enhance")
    ref = ref_enh.df_features(torch.from_numpy(real_audio), libdf.DF(48000, 960, 480, 32, 2), 96)
    ours = mlx_enhance.df_features(real_audio, mlx_enhance.DF(48000, 960, 480, 32, 2), 96)
    for name, a, b in zip(("spec", "erb_feat", "spec_feat"), ours, ref):
        report.add(compare(name, a, b, FEATURES))
    print(report.table())
    assert report.passed, report.summary()


@pytest.mark.parametrize("pad, atten, block_seconds", [(True, None, None), (False, None, None), (True, 12.0, None),
                                                       (True, None, 1.0), (True, 12.0, 1.0)])
def test_enhance(real_audio, pad, atten, block_seconds, monkeypatch):
    """Whole-signal, and in blocks as df_mlx runs inputs longer than BLOCK_SECONDS."""
    import libdf

    if block_seconds is not None:
        monkeypatch.setattr("df_mlx.offline.BLOCK_SECONDS", block_seconds)

    ref_model, mlx_model, p = twin_models("deepfilternet3", VARIANTS["deepfilternet3"][0])
    ref_state = libdf.DF(p.sr, p.fft_size, p.hop_size, p.nb_erb, p.min_nb_freqs)
    our_state = mlx_enhance.DF(p.sr, p.fft_size, p.hop_size, p.nb_erb, p.min_nb_freqs)
    ref = import_ref("enhance").enhance(ref_model, ref_state, torch.from_numpy(real_audio), pad, atten)
    ours = mlx_enhance.enhance(mlx_model, our_state, real_audio, pad, atten)
    report = Report(f"enhance pad={pad} atten={atten} blocks={block_seconds}", "df.enhance")
    report.add(compare("audio", ours, ref, AUDIO))
    print(report.table())
    assert report.passed, report.summary()
    assert np.array(ours).shape[-1] == (real_audio.shape[-1] if pad else ref.shape[-1])
