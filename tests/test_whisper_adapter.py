"""df_mlx.whisper_adapter's errors: unknown or unavailable backends, models without a local copy
(never downloaded), bad mel shapes, a missing ffmpeg or mlx-whisper. Parity is in
parity/test_whisper_adapter.py."""

import sys

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("mlx_whisper")

import df_mlx.whisper_adapter as wa  # noqa: E402


@pytest.fixture(scope="module")
def backend():
    """A tiny in-memory model (zero weights: only shapes matter here)."""
    from mlx_whisper.whisper import ModelDimensions, Whisper

    dims = ModelDimensions(n_mels=80, n_audio_ctx=8, n_audio_state=8, n_audio_head=2, n_audio_layer=1,
                           n_vocab=51865, n_text_ctx=8, n_text_state=8, n_text_head=2, n_text_layer=1)
    return wa.get_whisper_backend(Whisper(dims, mx.float32))


def test_unknown_backend():
    with pytest.raises(wa.WhisperError, match="unknown Whisper backend 'onnx'"):
        wa.get_whisper_backend("tiny", backend="onnx")


def test_pytorch_backend_unavailable():
    with pytest.raises(wa.WhisperError, match="needs openai-whisper"):
        wa.load_whisper_model("tiny", backend="pytorch")


def test_missing_model_directory(tmp_path):
    with pytest.raises(wa.WhisperError, match="does not exist"):
        wa.load_whisper_model(str(tmp_path / "nowhere"))


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(wa.WhisperError, match="needs config.json and one of weights.safetensors"):
        wa.get_whisper_backend(str(tmp_path), backend="mlx")


def test_hub_name_without_local_copy_never_downloads(tmp_path, monkeypatch):
    """A name is looked up in the (here empty) cache with local_files_only, then refused."""
    import huggingface_hub

    calls = []
    real = huggingface_hub.snapshot_download

    def spy(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    with pytest.raises(wa.WhisperError, match=r"no local copy of Whisper model 'base' \(mlx-community/whisper-base\)"):
        wa.load_whisper_model("base", download_root=str(tmp_path))
    assert calls == [dict(repo_id="mlx-community/whisper-base", cache_dir=str(tmp_path), local_files_only=True)]


def test_missing_mlx_whisper(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlx_whisper", None)
    with pytest.raises(wa.WhisperError, match=r"pip install 'df-mlx\[asr\]'"):
        wa.MLXWhisperBackend("tiny")


def test_bad_mel_shapes(backend):
    with pytest.raises(wa.WhisperError, match="no axis of n_mels=80"):
        backend.embed_audio(np.zeros((1, 64, 16), np.float32))
    with pytest.raises(wa.WhisperError, match="2 or 3 axes"):
        backend.embed_audio(np.zeros(80, np.float32))
    with pytest.raises(wa.WhisperError, match="one segment, got a batch of 2"):
        backend.decode(np.zeros((2, 16, 80), np.float32))


def test_load_audio_without_ffmpeg(backend, monkeypatch, tmp_path):
    monkeypatch.setattr(wa.shutil, "which", lambda name: None)
    with pytest.raises(wa.WhisperError, match="needs the ffmpeg command"):
        backend.load_audio(str(tmp_path / "a.wav"))


def test_load_audio_missing_file(backend, monkeypatch, tmp_path):
    monkeypatch.setattr(wa.shutil, "which", lambda name: "/usr/bin/ffmpeg")
    with pytest.raises(wa.WhisperError, match="does not exist"):
        backend.load_audio(str(tmp_path / "a.wav"))


def test_protocol_and_defaults(backend):
    """The backend satisfies the protocol's members; float32 models decode with fp16 off."""
    members = [n for n in vars(wa.WhisperBackend) if not n.startswith("_")]
    assert members and all(hasattr(backend, n) for n in members)
    assert backend.create_decoding_options().fp16 is False
    assert backend.create_decoding_options(fp16=True).fp16 is True


@pytest.mark.parametrize("system,brand,expected", [("Linux", "Apple M2", False), ("Darwin", "Apple M3 Max\n", True),
                                                   ("Darwin", "Intel(R) Core(TM) i9", False)])
def test_is_apple_silicon(monkeypatch, system, brand, expected):
    """Darwin and an Apple CPU brand from sysctl, as the fork decides it."""
    monkeypatch.setattr(wa.platform, "system", lambda: system)
    monkeypatch.setattr(wa.subprocess, "run", lambda *a, **k: wa.subprocess.CompletedProcess(a, 0, stdout=brand))
    wa.is_apple_silicon.cache_clear()
    try:
        assert wa.is_apple_silicon() is expected
    finally:
        wa.is_apple_silicon.cache_clear()
