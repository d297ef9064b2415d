"""df's names that would download, done offline: download_file, get_cache_dir,
maybe_download_model / init_df by name, get_test_sample; and df's small helpers of
df.enhance (parse_epoch_type, AudioDataset), types in and out, dtypes of save_audio."""

import argparse
import os
import zipfile

import numpy as np
import pytest
import soundfile as sf

from df_mlx import interop  # before mlx.core: df_mlx picks MLX's BLAS (df_mlx/_blas.py)
import mlx.core as mx  # noqa: E402,I001
from df_mlx.enhance import (AudioDataset, ModelNotFound, enhance, init_df, maybe_download_model,
                            parse_epoch_type, save_audio)
from df_mlx.io import get_test_sample, resample
from df_mlx.utils import DownloadUnavailable, download_file, get_cache_dir

DATA = os.path.join(os.path.dirname(__file__), "data")
WHOLE_VS_CLI_ATOL = 1e-6  # the same whole-signal computation, resampled 48k -> 48k (identity): float32 rounding


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """df's cache folder, redirected (get_cache_dir follows XDG_CACHE_HOME through platformdirs
    or appdirs; with neither, ~/.cache, so HOME moves too)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = get_cache_dir()
    assert str(tmp_path) in path and os.path.basename(path.rstrip("/")) == "DeepFilterNet"
    return path


def test_download_file_offline(tmp_path):
    src = tmp_path / "src" / "noisy.wav"
    src.parent.mkdir()
    src.write_bytes(b"RIFF....")
    out = tmp_path / "dl"
    assert download_file(str(src), str(out)) == str(out / "noisy.wav")  # a local path is copied
    assert (out / "noisy.wav").read_bytes() == b"RIFF...."
    assert download_file(src.as_uri(), str(tmp_path / "dl2")) == str(tmp_path / "dl2" / "noisy.wav")
    url = "https://example.org/models/noisy.wav"
    assert download_file(url, str(out)) == str(out / "noisy.wav")  # already there: used as it is
    with pytest.raises(DownloadUnavailable, match="does not download.*absent.wav"):
        download_file("https://example.org/absent.wav", str(out))
    archive = tmp_path / "src" / "M.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("M/config.ini", "[train]\n")
    download_file(str(archive), str(out), extract=True)
    assert (out / "M" / "config.ini").is_file() and not (out / "M.zip").exists() and archive.is_file()
    kept = out / "K.zip"
    kept.write_bytes(archive.read_bytes())
    download_file("https://example.org/K.zip", str(out), extract=True)
    assert kept.is_file()  # a file df-mlx did not write is never removed
    with pytest.raises(ValueError, match="only .zip"):
        download_file(str(src), str(out), extract=True)


def test_models_by_name(cache, tmp_path):
    embedded = maybe_download_model("DeepFilterNet3")
    assert os.path.isfile(os.path.join(embedded, "model.safetensors"))
    assert maybe_download_model("DeepFilterNet3.zip") == embedded
    for name in ("DeepFilterNet", "DeepFilterNet2"):
        with pytest.raises(ModelNotFound, match=f"dfmlx convert path/to/{name}"):
            init_df(name, log_file=None)
    cached = os.path.join(cache, "DeepFilterNet2")
    os.makedirs(os.path.join(cached, "checkpoints"))
    assert maybe_download_model("DeepFilterNet2") == cached  # what df downloaded there


def test_get_test_sample(cache, monkeypatch):
    monkeypatch.setattr("df_mlx.io.get_git_root", lambda: None)
    with pytest.raises(DownloadUnavailable, match="clean_freesound_33711.wav"):
        get_test_sample()
    os.makedirs(cache, exist_ok=True)
    audio, sr = sf.read(os.path.join(DATA, "speech_espeak_48k.wav"), dtype="float32")
    sf.write(os.path.join(cache, "clean_freesound_33711.wav"), audio[:4800], sr)
    sample = get_test_sample(16000)
    assert isinstance(sample, mx.array) and sample.shape == (1, 1600)


def test_parse_epoch_type_and_dataset():
    assert parse_epoch_type("7") == 7 and parse_epoch_type("latest") == "latest"
    with pytest.raises(argparse.ArgumentTypeError):
        parse_epoch_type("worst")
    ds = AudioDataset([os.path.join(DATA, "speech_espeak_48k.wav")], 16000)
    fn, audio, sr = ds[0]
    assert len(ds) == 1 and fn.endswith("speech_espeak_48k.wav") and sr == 48000 and audio.shape[0] == 1


def test_types_in_types_out(tmp_path):
    torch = pytest.importorskip("torch")
    model, df_state, _ = init_df(log_file=None, log_level="ERROR")
    audio = np.random.default_rng(0).standard_normal((1, 9600)).astype(np.float32) * 0.1
    out_np = enhance(model, df_state, audio)
    out_mx = enhance(model, df_state, mx.array(audio))
    out_t = enhance(model, df_state, torch.from_numpy(audio))
    assert isinstance(out_np, np.ndarray) and isinstance(out_mx, mx.array) and isinstance(out_t, torch.Tensor)
    np.testing.assert_array_equal(np.array(out_mx), out_np)
    np.testing.assert_array_equal(out_t.numpy(), out_np)
    assert isinstance(resample(out_mx, 48000, 16000), mx.array)
    assert isinstance(resample(out_np, 48000, 16000), np.ndarray)
    for dtype, subtype in ((torch.int16, "PCM_16"), (mx.int16, "PCM_16"), (np.int16, "PCM_16"),
                           (torch.float32, "FLOAT"), (mx.float32, "FLOAT"), ("float32", "FLOAT")):
        path = save_audio(str(tmp_path / "x.wav"), out_t, 48000, dtype=dtype)
        assert sf.info(path).subtype == subtype, dtype
    assert interop.kind_of([1.0]) == interop.NUMPY


def test_pcm16_truncates_like_df(tmp_path):
    """df writes (x * 2^15).to(int16): truncation toward zero, not rounding."""
    x = np.array([[0.99999, -0.99999, 0.5 / 32768 * 1.9, -1.9 / 32768, 0.0]], np.float32)
    path = save_audio(str(tmp_path / "t.wav"), x, 48000)
    got = sf.read(path, dtype="int16", always_2d=True)[0].T
    np.testing.assert_array_equal(got, [[32767, -32767, 0, -1, 0]])


def test_models_that_cannot_stream_enhance_whole(tmp_path):
    """A model without streaming support (DeepFilterNet2) enhances files whole, with
    `enhance()`'s result; delay compensation on and off."""
    from click.testing import CliRunner

    from converters.layout import mlx_state_dict
    from df_mlx.config import config
    from df_mlx.deepfilternet2 import init_model
    from df_mlx.streaming import why_not_streamable
    from converters.torch_ckpt import write_state_dict
    from df_mlx.cli import main

    pytest.importorskip("torch")
    config.use_defaults(allow_reload=True)
    src = tmp_path / "DFN2"
    (src / "checkpoints").mkdir(parents=True)
    (src / "config.ini").write_text("[train]\nmodel = deepfilternet2\n")
    write_state_dict(mlx_state_dict(init_model()), src / "checkpoints" / "model_1.ckpt")
    rng = np.random.default_rng(0)
    noisy = (rng.standard_normal((1, 24000)) * 0.05).astype(np.float32)
    sf.write(tmp_path / "n.wav", noisy.T, 48000, subtype="FLOAT")
    model, df_state, _ = init_df(str(src), log_file=None, log_level="ERROR")
    assert why_not_streamable(model) is not None
    for flag, pad in (("--compensate-delay", True), ("--no-compensate-delay", False)):
        out = tmp_path / f"out_{pad}"
        result = CliRunner().invoke(main, ["enhance", str(tmp_path / "n.wav"), "-m", str(src), "-o", str(out), flag])
        assert result.exit_code == 0, result.output
        got = sf.read(out / "n_DFN2.wav", dtype="float32", always_2d=True)[0].T  # float in, float out
        want = np.array(enhance(model, df_state, noisy, pad=pad))
        assert got.shape == want.shape and np.abs(got - want).max() <= WHOLE_VS_CLI_ATOL


def test_console_script_is_dfs_cli():
    """`deepFilter-mlx` (named apart from upstream's `deepFilter`, which may be installed too)
    runs df_mlx.enhance.run, df's command line."""
    import importlib
    import tomllib

    with open(os.path.join(os.path.dirname(DATA), "..", "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts["deepFilter-mlx"] == "df_mlx.enhance:run" and "deepFilter" not in scripts
    module, name = scripts["deepFilter-mlx"].split(":")
    assert callable(getattr(importlib.import_module(module), name))
