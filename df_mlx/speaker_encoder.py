"""resemblyzer's `VoiceEncoder` in MLX: the speaker model behind the DFNet4 fork's
`SpeakerContrastiveLoss`.

The same computation as resemblyzer 0.1.4: the utterance is cut into 1.6 s partials (160 frames,
rate 1.3 per second, the last kept at 75 % coverage, zero-padded), each partial's 40-band mel
power spectrogram (librosa's, 25 ms windows, 10 ms hop, as resemblyzer computes it) goes through
a 3-layer LSTM(256); the last layer's final hidden state -> linear -> ReLU -> L2 norm, and the
utterance embedding is the L2-normed mean of the partials'. The weights are resemblyzer's
`pretrained.pt`, read from the installed package without importing it (its `__init__` needs
webrtcvad) by df-mlx's torch-free checkpoint reader, or from a given file.
"""

import importlib.util
from pathlib import Path
from typing import Optional, Tuple, Union

import mlx.core as mx
import numpy as np

from df_mlx.layers import linear, scan_steps

SAMPLING_RATE = 16000
MEL_WINDOW_MS, MEL_STEP_MS, MEL_CHANNELS = 25, 10, 40
PARTIAL_FRAMES = 160
HIDDEN, EMBEDDING, LAYERS = 256, 256, 3


class SpeakerEncoderError(RuntimeError):
    """The speaker model's weights cannot be found or read."""


def pretrained_path() -> Path:
    """resemblyzer's bundled `pretrained.pt`, found without importing the package."""
    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or not spec.submodule_search_locations:
        raise SpeakerEncoderError("resemblyzer is not installed (pip install --no-deps resemblyzer==0.1.4): "
                                  "its pretrained.pt holds the speaker model's weights")
    path = Path(list(spec.submodule_search_locations)[0]) / "pretrained.pt"
    if not path.is_file():
        raise SpeakerEncoderError(f"resemblyzer has no pretrained model at {path}")
    return path


def load_weights(path: Union[str, Path]) -> dict:
    """The LSTM and linear tensors of a resemblyzer checkpoint (its `model_state`)."""
    from converters.torch_ckpt import CheckpointError, load

    try:
        state = load(Path(path))["model_state"]
    except (CheckpointError, KeyError, TypeError) as e:  # a corrupt, hostile or foreign file: one line
        raise SpeakerEncoderError(f"{path}: not a resemblyzer checkpoint ({type(e).__name__}: {e})") from None
    names = [f"lstm.{kind}_l{k}" for k in range(LAYERS) for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    missing = [n for n in names + ["linear.weight", "linear.bias"] if n not in state]
    if missing:
        raise SpeakerEncoderError(f"{path}: missing {', '.join(missing)}")
    return {name: mx.array(np.asarray(state[name], dtype=np.float32)) for name in names + ["linear.weight", "linear.bias"]}


def partial_slices(n_samples: int, rate: float = 1.3, min_coverage: float = 0.75) -> Tuple[list, list]:
    """resemblyzer's `compute_partial_slices`: (waveform slices, mel-frame slices) of the
    partial utterances."""
    if not 0 < min_coverage <= 1:
        raise ValueError(f"min_coverage must be in (0, 1], got {min_coverage}")
    samples_per_frame = int(SAMPLING_RATE * MEL_STEP_MS / 1000)
    n_frames = int(np.ceil((n_samples + 1) / samples_per_frame))
    frame_step = int(np.round((SAMPLING_RATE / rate) / samples_per_frame))
    if not 0 < frame_step <= PARTIAL_FRAMES:
        raise ValueError(f"rate {rate} gives a frame step of {frame_step}, outside 1..{PARTIAL_FRAMES}")
    wav_slices, mel_slices = [], []
    for i in range(0, max(1, n_frames - PARTIAL_FRAMES + frame_step + 1), frame_step):
        mel_slices.append(slice(i, i + PARTIAL_FRAMES))
        wav_slices.append(slice(i * samples_per_frame, (i + PARTIAL_FRAMES) * samples_per_frame))
    last = wav_slices[-1]
    coverage = (n_samples - last.start) / (last.stop - last.start)
    if coverage < min_coverage and len(mel_slices) > 1:
        wav_slices, mel_slices = wav_slices[:-1], mel_slices[:-1]
    return wav_slices, mel_slices


def mel_spectrogram(wav: np.ndarray) -> np.ndarray:
    """[frames, 40] mel power spectrogram, as resemblyzer's `wav_to_mel_spectrogram` (librosa)."""
    import librosa

    frames = librosa.feature.melspectrogram(
        y=np.asarray(wav, dtype=np.float32), sr=SAMPLING_RATE, n_fft=SAMPLING_RATE * MEL_WINDOW_MS // 1000,
        hop_length=SAMPLING_RATE * MEL_STEP_MS // 1000, n_mels=MEL_CHANNELS)
    return frames.astype(np.float32).T


@mx.compile
def _lstm_step(xp: mx.array, hc: mx.array, w_hh_t: mx.array) -> mx.array:
    """torch's LSTM cell (gates i, f, g, o) on the packed state [h, c] -> new [h, c]."""
    size = w_hh_t.shape[0]
    h, c = hc[..., :size], hc[..., size:]
    gates = xp + h @ w_hh_t
    i, f = mx.sigmoid(gates[..., :size]), mx.sigmoid(gates[..., size : 2 * size])
    g, o = mx.tanh(gates[..., 2 * size : 3 * size]), mx.sigmoid(gates[..., 3 * size :])
    c = f * c + i * g
    return mx.concatenate([o * mx.tanh(c), c], axis=-1)


class VoiceEncoder:
    """resemblyzer's speaker embedding model; `weights_fpath` defaults to its pretrained.pt."""

    def __init__(self, weights_fpath: Optional[Union[str, Path]] = None):
        self.weights = load_weights(weights_fpath or pretrained_path())

    def __call__(self, mels: mx.array) -> mx.array:
        """Embeddings [B, 256] (non-negative, unit norm) of mel spectrograms [B, frames, 40]."""
        x = mels.swapaxes(0, 1)  # [T, B, 40]
        for k in range(LAYERS):
            w = {kind: self.weights[f"lstm.{kind}_l{k}"] for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
            xp = linear(x, w["weight_ih"], w["bias_ih"] + w["bias_hh"])
            hc = mx.zeros((x.shape[1], 2 * HIDDEN), x.dtype)
            w_hh_t = mx.contiguous(w["weight_hh"].T)
            states, hc = scan_steps(xp, hc, lambda x_t, s: _lstm_step(x_t, s, w_hh_t))
            x = states[..., :HIDDEN]
        raw = mx.maximum(linear(hc[:, :HIDDEN], self.weights["linear.weight"], self.weights["linear.bias"]), 0)
        return raw / mx.linalg.norm(raw, axis=1, keepdims=True)

    def embed_utterance(self, wav: np.ndarray, rate: float = 1.3, min_coverage: float = 0.75) -> np.ndarray:
        """The utterance embedding [256] of a 16 kHz waveform: the L2-normed mean of its partials'."""
        wav = np.asarray(wav, dtype=np.float32)
        wav_slices, mel_slices = partial_slices(len(wav), rate, min_coverage)
        if wav_slices[-1].stop >= len(wav):
            wav = np.pad(wav, (0, wav_slices[-1].stop - len(wav)))
        mel = mel_spectrogram(wav)
        partials = np.array(self(mx.array(np.stack([mel[s] for s in mel_slices]))))
        raw = partials.mean(axis=0)
        return raw / np.linalg.norm(raw, 2)
