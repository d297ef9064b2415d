"""Whisper speech recognition behind one small interface, as the DFNet4 fork's `df.whisper_adapter`.

The fork wraps two Whisper implementations, openai-whisper (PyTorch) and mlx-whisper (Apple
Silicon), behind the `WhisperBackend` protocol so that its ASR-based losses and metrics run on
either. df-mlx is MLX only, so this module keeps the MLX side: `MLXWhisperBackend` wraps the
`mlx-whisper` package (`pip install 'df-mlx[asr]'`) with the fork's method names and array
layouts, and MLX runs on Linux too, so it is not limited to Apple Silicon here.

Backends: "mlx" and "auto" give `MLXWhisperBackend` ("auto" always picks MLX; the fork picks
PyTorch off Apple Silicon). "pytorch" needs openai-whisper, which df-mlx does not ship, and
raises WhisperError.

Models never download at run time. `model_name` is a directory holding mlx-whisper's
`config.json` and `weights.safetensors` (or `weights.npz`), an in-memory `mlx_whisper.whisper.Whisper`,
or a name ("base", "mlx-community/whisper-base") that is looked up, offline only, in the Hugging
Face cache (`download_root` when given, else the default cache). A name without a local copy is
a WhisperError; fetch the weights yourself (e.g. `huggingface-cli download mlx-community/whisper-base`).

Left out: the torch interop (`mx_to_torch`, `torch_to_mx`, `embed_audio_as_torch`,
`logits_as_torch`) and `PyTorchWhisperBackend`, which need torch and openai-whisper.

`decode` takes one segment and refuses a batch (the fork's returns the first result of a batch).
Layouts as the fork's MLX backend: `log_mel_spectrogram` returns (n_frames, n_mels);
`embed_audio` and `decode` take a mel as (n_mels, n_frames) or (n_frames, n_mels), with or
without a batch axis, and `embed_audio` returns (batch, n_audio_ctx, n_audio_state).
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, List, Literal, Optional, Protocol, Union

import mlx.core as mx
import numpy as np
from loguru import logger

ArrayLike = Any  # mx.array, np.ndarray or anything with .detach().cpu().numpy() (a torch tensor)
BackendType = Literal["auto", "pytorch", "mlx"]
BACKENDS = ("auto", "pytorch", "mlx")

# Short model names to the mlx-community Hugging Face repositories, as the fork's.
MLX_WHISPER_MODEL_MAP = {
    "tiny": "mlx-community/whisper-tiny",
    "tiny.en": "mlx-community/whisper-tiny.en",
    "base": "mlx-community/whisper-base",
    "base.en": "mlx-community/whisper-base.en",
    "small": "mlx-community/whisper-small",
    "small.en": "mlx-community/whisper-small.en",
    "medium": "mlx-community/whisper-medium",
    "medium.en": "mlx-community/whisper-medium.en",
    "large": "mlx-community/whisper-large-v3",
    "large-v1": "mlx-community/whisper-large-v1",
    "large-v2": "mlx-community/whisper-large-v2",
    "large-v3": "mlx-community/whisper-large-v3",
    "turbo": "mlx-community/whisper-large-v3-turbo",
}
WEIGHT_FILES = ("weights.safetensors", "weights.npz")  # what mlx_whisper.load_models reads


class WhisperError(ValueError):
    """An unknown backend, a model without a local copy, or a missing optional dependency."""


@lru_cache(maxsize=1)
def is_apple_silicon() -> bool:
    """True on an Apple Silicon Mac (the sysctl CPU brand names Apple), as the fork decides it."""
    if platform.system() != "Darwin":
        return False
    try:
        result = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                text=True, timeout=5)
    except (subprocess.SubprocessError, OSError):
        return False
    return "Apple" in result.stdout


@dataclass
class WhisperDecodingResult:
    """One decoded segment, the same fields whichever backend produced it."""

    text: str
    language: str
    tokens: List[int]
    avg_logprob: float
    no_speech_prob: float
    temperature: float


class WhisperBackend(Protocol):
    """The interface the fork's ASR losses and metrics program against."""

    @property
    def backend_name(self) -> str: ...

    @property
    def device(self) -> Optional[str]: ...

    @property
    def dims(self) -> Any: ...

    @property
    def is_multilingual(self) -> bool: ...

    def embed_audio(self, mel: ArrayLike) -> ArrayLike: ...

    def logits(self, tokens: ArrayLike, audio_features: ArrayLike) -> ArrayLike: ...

    def decode(self, mel: ArrayLike, options: Any = None) -> WhisperDecodingResult: ...

    def get_tokenizer(self, language: str = "en", task: str = "transcribe") -> Any: ...

    def get_decoder(self, temperature: float = 0.0) -> Any: ...

    def create_decoding_options(self, **kwargs: Any) -> Any: ...

    def pad_or_trim(self, audio: ArrayLike, length: Optional[int] = None) -> ArrayLike: ...

    def log_mel_spectrogram(self, audio: ArrayLike, n_mels: Optional[int] = None) -> ArrayLike: ...

    def to_backend_array(self, arr: ArrayLike) -> ArrayLike: ...

    def to_numpy(self, arr: ArrayLike) -> np.ndarray: ...


def to_numpy(arr: ArrayLike) -> np.ndarray:
    """Any array (numpy, MLX, torch) as numpy; torch is duck-typed so it need not be installed."""
    if isinstance(arr, np.ndarray):
        return arr
    if hasattr(arr, "detach"):
        return arr.detach().cpu().numpy()
    return np.array(arr)


def _mlx_whisper():
    """The mlx_whisper package, or a WhisperError naming the extra that installs it."""
    try:
        import mlx_whisper
        import mlx_whisper.whisper  # noqa: F401  (the model class, not imported by the package)
    except ImportError as e:
        raise WhisperError(f"the MLX Whisper backend needs mlx-whisper: pip install 'df-mlx[asr]' ({e})") from e
    return mlx_whisper


def resolve_mlx_model_name(model_name: str) -> str:
    """A short name ("base") as its mlx-community repository; a repository id stays as it is."""
    if "/" in model_name:
        return model_name
    return MLX_WHISPER_MODEL_MAP.get(model_name, f"mlx-community/whisper-{model_name}")


def _check_model_dir(path: Path) -> Path:
    if not (path / "config.json").is_file() or not any((path / f).is_file() for f in WEIGHT_FILES):
        raise WhisperError(f"{path} is not an mlx-whisper model: it needs config.json and one of {', '.join(WEIGHT_FILES)}")
    return path


def find_local_model(model_name: Union[str, Path], download_root: Optional[str] = None) -> Path:
    """The local directory for `model_name`: the path itself, else the name's repository in the
    Hugging Face cache, looked up with local_files_only so that nothing is ever downloaded."""
    path = Path(model_name).expanduser()
    if path.is_dir():
        return _check_model_dir(path)
    name = str(model_name)
    if path.is_absolute() or name.startswith(".") or name.count("/") > 1:
        raise WhisperError(f"Whisper model directory {name} does not exist")
    repo_id = resolve_mlx_model_name(name)
    import huggingface_hub

    try:
        cached = huggingface_hub.snapshot_download(repo_id=repo_id, cache_dir=download_root, local_files_only=True)
    except Exception as e:  # LocalEntryNotFoundError and friends: no complete offline copy
        raise WhisperError(f"no local copy of Whisper model '{name}' ({repo_id}) and downloads are disabled: "
                           f"pass a directory with config.json and weights ({type(e).__name__})") from e
    return _check_model_dir(Path(cached))


class MLXWhisperBackend:
    """`WhisperBackend` on mlx-whisper: a model directory, cached name or in-memory model (see
    the module docstring; nothing downloads). `dtype` applies when loading from disk."""

    def __init__(self, model_name: Any = "base", download_root: Optional[str] = None,
                 dtype: mx.Dtype = mx.float32):
        mlx_whisper = _mlx_whisper()
        from mlx_whisper import audio, decoding, load_models, tokenizer

        self._audio, self._decoding, self._tokenizer = audio, decoding, tokenizer
        if isinstance(model_name, mlx_whisper.whisper.Whisper):
            self._model = model_name
        else:
            model_dir = find_local_model(model_name, download_root)
            self._model = load_models.load_model(str(model_dir), dtype=dtype)
            logger.info(f"Loaded Whisper model from {model_dir}")

    @property
    def backend_name(self) -> str:
        return "mlx"

    @property
    def device(self) -> Optional[str]:
        """None: MLX arrays live in unified memory (the fork's answer for MLX)."""
        return None

    @property
    def dims(self) -> Any:
        return self._model.dims

    @property
    def is_multilingual(self) -> bool:
        return self._model.is_multilingual

    @property
    def model(self) -> Any:
        return self._model

    @property
    def dtype(self) -> mx.Dtype:
        return self._model.encoder.conv1.weight.dtype

    def _mel(self, mel: ArrayLike) -> mx.array:
        """A mel as (batch, n_frames, n_mels) in the model's dtype, from either layout."""
        mel = self.to_backend_array(mel).astype(self.dtype)
        n_mels = self.dims.n_mels
        if mel.ndim not in (2, 3):
            raise WhisperError(f"a mel spectrogram has 2 or 3 axes, got shape {tuple(mel.shape)}")
        if mel.shape[-1] != n_mels:
            if mel.shape[-2] != n_mels:
                raise WhisperError(f"mel shape {tuple(mel.shape)} has no axis of n_mels={n_mels}")
            mel = mx.swapaxes(mel, -1, -2)
        return mel if mel.ndim == 3 else mel[None]

    def embed_audio(self, mel: ArrayLike) -> mx.array:
        """Encoder output (batch, n_audio_ctx, n_audio_state) for a mel of 2 * n_audio_ctx frames."""
        return self._model.embed_audio(self._mel(mel))

    def logits(self, tokens: ArrayLike, audio_features: ArrayLike) -> mx.array:
        """Decoder logits (batch, n_tokens, n_vocab) for token ids (batch, n_tokens)."""
        tokens = self.to_backend_array(tokens).astype(mx.int32)
        return self._model.logits(tokens, self.to_backend_array(audio_features).astype(self.dtype))

    def decode(self, mel: ArrayLike, options: Any = None) -> WhisperDecodingResult:
        """Decode one segment (a mel without a batch axis, or a batch of one)."""
        mel = self._mel(mel)
        if mel.shape[0] != 1:
            raise WhisperError(f"decode takes one segment, got a batch of {mel.shape[0]}")
        if options is None:
            options = self.create_decoding_options()
        result = self._decoding.decode(self._model, mel, options)[0]
        return WhisperDecodingResult(text=result.text, language=result.language, tokens=list(result.tokens),
                                     avg_logprob=float(result.avg_logprob),
                                     no_speech_prob=float(result.no_speech_prob),
                                     temperature=float(result.temperature))

    def get_tokenizer(self, language: str = "en", task: str = "transcribe") -> Any:
        return self._tokenizer.get_tokenizer(self._model.is_multilingual, num_languages=self._model.num_languages,
                                             language=language, task=task)

    def get_decoder(self, temperature: float = 0.0) -> Any:
        """mlx-whisper's GreedyDecoder, stopping at this model's end-of-text token."""
        return self._decoding.GreedyDecoder(temperature=temperature, eot=self.get_tokenizer().eot)

    def create_decoding_options(self, **kwargs: Any) -> Any:
        """mlx-whisper DecodingOptions; fp16 follows the model's dtype unless given (mlx-whisper
        rejects float32 features when fp16 is on, its default)."""
        kwargs.setdefault("fp16", self.dtype == mx.float16)
        return self._decoding.DecodingOptions(**kwargs)

    def pad_or_trim(self, audio: ArrayLike, length: Optional[int] = None) -> mx.array:
        """Zero-pad or cut the last axis to `length` samples (default 30 s at 16 kHz)."""
        return self._audio.pad_or_trim(self.to_backend_array(audio), length or self._audio.N_SAMPLES)

    def log_mel_spectrogram(self, audio: ArrayLike, n_mels: Optional[int] = None) -> mx.array:
        """Whisper's log-mel (n_frames, n_mels) of 16 kHz mono audio; n_mels defaults to the model's."""
        audio = self.to_backend_array(audio).astype(mx.float32)
        return self._audio.log_mel_spectrogram(audio, n_mels=n_mels or self.dims.n_mels)

    def load_audio(self, path: str) -> np.ndarray:
        """16 kHz mono float32 samples, decoded and resampled by the ffmpeg CLI as mlx-whisper does."""
        if shutil.which("ffmpeg") is None:
            raise WhisperError("load_audio needs the ffmpeg command on PATH (mlx-whisper decodes audio with it)")
        if not Path(path).is_file():
            raise WhisperError(f"audio file {path} does not exist")
        return to_numpy(self._audio.load_audio(str(path)))

    def to_backend_array(self, arr: ArrayLike) -> mx.array:
        return arr if isinstance(arr, mx.array) else mx.array(to_numpy(arr))

    def to_numpy(self, arr: ArrayLike) -> np.ndarray:
        return to_numpy(arr)


def get_whisper_backend(model_name: Any = "base", backend: BackendType = "auto", device: Optional[str] = None,
                        download_root: Optional[str] = None) -> MLXWhisperBackend:
    """The Whisper backend for `backend` ("auto" and "mlx": MLX; see the module docstring).
    `device` only steers the fork's PyTorch backend and is ignored, as the fork's MLX path does."""
    if backend not in BACKENDS:
        raise WhisperError(f"unknown Whisper backend '{backend}': choose one of {', '.join(BACKENDS)}")
    if backend == "pytorch":
        raise WhisperError("the 'pytorch' Whisper backend needs openai-whisper, which df-mlx does not provide: "
                           "use backend='mlx' (or 'auto')")
    return MLXWhisperBackend(model_name, download_root=download_root)


def load_whisper_model(model_name: Any = "base", backend: BackendType = "auto", **kwargs: Any) -> MLXWhisperBackend:
    """get_whisper_backend under the fork's other name."""
    return get_whisper_backend(model_name, backend=backend, **kwargs)


__all__ = [
    "is_apple_silicon",
    "WhisperDecodingResult",
    "ArrayLike",
    "BackendType",
    "WhisperError",
    "MLX_WHISPER_MODEL_MAP",
    "resolve_mlx_model_name",
    "find_local_model",
    "to_numpy",
    "WhisperBackend",
    "MLXWhisperBackend",
    "get_whisper_backend",
    "load_whisper_model",
]
