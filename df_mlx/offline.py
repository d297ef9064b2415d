"""The offline pipeline of `enhance`: STFT, features, model, attenuation limit, ISTFT on
numpy audio; and `file_stream`, what `dfmlx enhance` feeds a file through: the model's
StreamingEnhancer, or for models that cannot stream, the same interface over the whole
signal. Below df_mlx.enhance and the command lines, which both use it."""

from typing import Optional, Tuple

import mlx.core as mx
import numpy as np

from df_mlx.libdf import DF
from df_mlx.libdfdata import noisy_features
from df_mlx.model import ModelParams
from df_mlx.streaming import BLOCK_SECONDS, StreamingEnhancer, why_not_streamable
from df_mlx.utils import get_norm_alpha


def _enhance_in_blocks(model, df_state: DF, audio: np.ndarray, atten_lim_db: Optional[float]) -> np.ndarray:
    """enhance(pad=True) of audio [C, T] through a StreamingEnhancer, block by block."""
    stream = StreamingEnhancer(model, df_state, atten_lim_db, compile_hops=False)
    block = int(BLOCK_SECONDS * df_state.sr())
    parts = [stream.process(audio[:, i : i + block]) for i in range(0, audio.shape[1], block)]
    out = np.concatenate(parts + [stream.flush()], axis=1)
    delay = df_state.fft_size() - df_state.hop_size()
    return out[:, delay : delay + audio.shape[1]]


def df_features(audio, df: DF, nb_df: int, device=None) -> Tuple[mx.array, mx.array, mx.array]:
    """Audio [C, T] -> spec [C, 1, T', F, 2], ERB features [C, 1, T', E], normalised complex
    features [C, 1, T', nb_df, 2], exactly as df computes them with libdf."""
    spec = df.analysis(np.asarray(audio, dtype=np.float32))
    erb_feat, spec_feat = noisy_features(spec, df.erb_widths(), nb_df, get_norm_alpha(False))
    return mx.array(_as_real(spec)[:, None]), mx.array(erb_feat[:, None]), mx.array(_as_real(spec_feat)[:, None])


def _as_real(x: np.ndarray) -> np.ndarray:
    return np.stack([x.real, x.imag], axis=-1).astype(np.float32)


def enhance_offline(model, df_state: DF, audio: np.ndarray, pad: bool, atten_lim_db: Optional[float]) -> mx.array:
    """`enhance` of float32 numpy audio [C, T], as an MLX array."""
    model.eval()
    orig_len = audio.shape[-1]
    n_fft, hop = df_state.fft_size(), df_state.hop_size()
    if pad and audio.ndim == 2 and orig_len > BLOCK_SECONDS * df_state.sr() and why_not_streamable(model) is None:
        return mx.array(_enhance_in_blocks(model, df_state, audio, atten_lim_db))
    if pad:
        audio = np.pad(audio, ((0, 0), (0, n_fft)))
    nb_df = getattr(model, "nb_df", getattr(model, "df_bins", ModelParams().nb_df))
    spec, erb_feat, spec_feat = df_features(audio, df_state, nb_df)
    enhanced = np.array(model(spec, erb_feat, spec_feat)[0])[:, 0]
    enhanced = enhanced[..., 0] + 1j * enhanced[..., 1]
    if atten_lim_db is not None and abs(atten_lim_db) > 0:
        lim = 10 ** (-abs(atten_lim_db) / 20)
        noisy = np.array(spec)[:, 0]
        enhanced = (noisy[..., 0] + 1j * noisy[..., 1]) * lim + enhanced * (1 - lim)
    out = df_state.synthesis(enhanced.astype(np.complex64))
    if pad:
        if n_fft % hop != 0:
            raise ValueError(f"delay compensation needs fft_size % hop_size == 0, got {n_fft}, {hop}")
        d = n_fft - hop
        out = out[:, d : orig_len + d]
    return mx.array(out)




class WholeSignalStream:
    """StreamingEnhancer's `process`/`flush` for a model that cannot stream: the chunks are
    kept and enhanced whole at `flush`, with the stream's delay (fft_size - hop_size samples)
    in front when padded, so callers treat both alike (memory grows with the signal)."""

    def __init__(self, model, df_state: DF, atten_lim_db: Optional[float] = None):
        self.model, self.df_state, self.atten_lim_db = model, df_state, atten_lim_db
        self.chunks = []

    def process(self, chunk) -> np.ndarray:
        chunk = np.asarray(chunk, dtype=np.float32)
        self.chunks.append(chunk)
        return np.zeros((chunk.shape[0], 0), np.float32)

    def flush(self, pad: bool = True) -> np.ndarray:
        audio, self.chunks = np.concatenate(self.chunks, axis=1), []
        out = np.array(enhance_offline(self.model, self.df_state, audio, pad, self.atten_lim_db))
        delay = self.df_state.fft_size() - self.df_state.hop_size() if pad else 0
        return np.concatenate([np.zeros((out.shape[0], delay), np.float32), out], axis=1)


def file_stream(model, df_state: DF, atten_lim_db: Optional[float] = None):
    """How a file is fed through `model` in blocks: streaming when the model streams
    (bounded memory), else over the whole signal."""
    if why_not_streamable(model) is None:
        return StreamingEnhancer(model, df_state, atten_lim_db, compile_hops=False)
    return WholeSignalStream(model, df_state, atten_lim_db)
