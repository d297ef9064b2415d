"""df_mlx.io: the resampler (an independent check: soxr), streaming resampling, file I/O."""

import numpy as np
import pytest
import soundfile as sf

from df_mlx.io import AudioError, Resampler, load_audio, resample, save_audio

# A width-16 windowed-sinc filter ripples by ~2e-4 in its passband (tones up to 0.78 x Nyquist).
SINE_ATOL = 5e-4
RATES = [(44100, 48000), (16000, 48000), (48000, 16000), (8000, 48000), (22050, 48000), (48000, 44100)]


@pytest.mark.parametrize("orig, new", RATES)
def test_resample_agrees_with_soxr_and_keeps_sines(orig, new):
    soxr = pytest.importorskip("soxr")
    t = np.arange(2 * orig) / orig
    x = (0.5 * np.sin(2 * np.pi * 1000 * t) + 0.2 * np.sin(2 * np.pi * 3100 * t)).astype(np.float32)
    y = resample(x[None], orig, new)[0]
    assert y.shape[-1] == int(np.ceil(len(x) * new / orig))
    mid = slice(new // 10, -new // 10)  # away from the edges, where the filters' zero padding differs
    tt = np.arange(len(y)) / new
    ref = 0.5 * np.sin(2 * np.pi * 1000 * tt) + 0.2 * np.sin(2 * np.pi * 3100 * tt)
    assert np.abs(y[mid] - ref[mid]).max() < SINE_ATOL
    assert np.abs(y[mid] - soxr.resample(x, orig, new)[mid]).max() < SINE_ATOL


@pytest.mark.parametrize("orig, new", RATES)
@pytest.mark.parametrize("block", [1, 999, 48000])
def test_streaming_resampler_equals_whole(orig, new, block):
    x = np.random.default_rng(0).standard_normal((2, orig // 2 + 17)).astype(np.float32)
    r = Resampler(orig, new)
    parts = [r.process(x[:, i : i + block]) for i in range(0, x.shape[1], block)]
    y = np.concatenate(parts + [r.flush()], axis=1)
    np.testing.assert_allclose(y, resample(x, orig, new), atol=2e-6)


def test_resample_rejects_bad_rates_and_methods():
    with pytest.raises(ValueError):
        resample(np.zeros(10), 0, 48000)
    with pytest.raises(ValueError, match="method"):
        resample(np.zeros(10), 16000, 48000, method="linear")


def test_save_and_load_round_trip(tmp_path):
    x = (np.random.default_rng(0).standard_normal((2, 4800)) * 0.1).astype(np.float32)
    path = save_audio(str(tmp_path / "a.wav"), x, 48000, suffix="x")
    assert path.endswith("a_x.wav")
    y, meta = load_audio(path)
    assert meta.sample_rate == 48000 and meta.num_channels == 2 and meta.num_frames == 4800
    np.testing.assert_allclose(np.array(y), x, atol=1 / (1 << 15))
    y16, _ = load_audio(path, sr=16000)
    assert y16.shape == (2, 1600)


def test_load_errors(tmp_path):
    with pytest.raises(AudioError, match="not found"):
        load_audio(str(tmp_path / "missing.wav"))
    (tmp_path / "bad.wav").write_text("nope")
    with pytest.raises(AudioError, match="not a readable audio file"):
        load_audio(str(tmp_path / "bad.wav"))


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sf, "write", broken)
    with pytest.raises(RuntimeError):
        save_audio(str(tmp_path / "a.wav"), np.zeros((1, 10), np.float32), 48000)
    assert list(tmp_path.iterdir()) == []
