"""DNSMOS P.835 (SIG, BAK, OVRL) as `df.scripts.dnsmos` computes it locally, with onnxruntime.

The ONNX models (`sig.onnx`, `bak_ovr.onnx` of the DNS Challenge) come from the PyPI package
`speechmos` (`pip install --no-deps speechmos`): nothing is downloaded at run time. Features
are the log power spectrogram `torch.stft(n_fft=320, hop=160, hann, centred, reflect)` gives
df, computed with numpy. The remote API of df's script (P.808 via a web service) is not
ported: df-mlx runs offline.

    python -m df_mlx.scripts.dnsmos file.wav
"""

import argparse
import importlib.util
from functools import lru_cache
import warnings
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import numpy.polynomial.polynomial as poly

from df_mlx.interop import to_numpy as as_numpy  # noqa: F401  (re-exported, as df.scripts.dnsmos)
from df_mlx.io import load_audio  # noqa: F401  (re-exported, as df.scripts.dnsmos)
from df_mlx.logger import init_logger, log_metrics  # noqa: F401  (re-exported, as df.scripts.dnsmos)
from df_mlx.utils import download_file, get_cache_dir  # noqa: F401  (re-exported, as df.scripts.dnsmos)

COEFS_SIG = np.array([9.651228012789436761e-01, 6.592637550310214145e-01, 7.572372955623894730e-02])
COEFS_BAK = np.array([-3.733460011101781717e00, 2.700114234092929166e00, -1.721332907340922813e-01])
COEFS_OVR = np.array([8.924546794696789354e-01, 6.609981731940616223e-01, 7.600269530243179694e-02])
NAMES = ("SIG", "BAK", "OVL")
SR = 16000
INPUT_LENGTH = 9
ORT_SESS: Dict[str, object] = {}


def get_ort_session(onnx: str, providers="cpu"):
    """A cached onnxruntime session (CPU; a GPU provider when asked and available)."""
    import onnxruntime as ort

    if onnx not in ORT_SESS:
        wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"] if providers == "gpu" else ["CPUExecutionProvider"]
        available = [p for p in wanted if p in ort.get_available_providers()]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            ORT_SESS[onnx] = ort.InferenceSession(onnx, providers=available)
    return ORT_SESS[onnx]


def local_onnx_models() -> Tuple[str, str]:
    """Paths of sig.onnx and bak_ovr.onnx inside the installed `speechmos` package."""
    spec = importlib.util.find_spec("speechmos")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("DNSMOS needs the models of `speechmos`: pip install --no-deps speechmos")
    models = Path(list(spec.submodule_search_locations)[0]) / "dnsmos_models"
    sig, bak_ovr = models / "sig.onnx", models / "bak_ovr.onnx"
    if not (sig.is_file() and bak_ovr.is_file()):
        raise FileNotFoundError(f"speechmos has no sig.onnx/bak_ovr.onnx in {models}")
    return str(sig), str(bak_ovr)


@lru_cache(maxsize=1)
def _librosa_importable() -> bool:
    try:
        importlib.import_module("librosa")
    except ImportError:
        return False
    return True


def audio_logpowspec(audio, nfft=320, hop_length=160) -> np.ndarray:
    """log10 power spectrogram [frames, nfft/2 + 1] of centred, Hann-windowed frames, floored
    at 1e-12. As df: when librosa imports, df takes librosa's STFT, which pads the ends with
    zeros; otherwise torch.stft's, which reflects them. The scores depend on which."""
    x = np.asarray(audio, dtype=np.float32)
    half = nfft // 2
    x = np.pad(x, (half, half), mode="constant" if _librosa_importable() else "reflect")
    frames = np.lib.stride_tricks.sliding_window_view(x, nfft)[::hop_length]
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(nfft) / nfft)).astype(np.float32)
    spec = np.fft.rfft((frames * window).astype(np.float64), axis=-1)
    powspec = (np.abs(spec) ** 2).astype(np.float32)
    return np.log10(np.maximum(powspec, 10 ** (-12)))


def isclose(a, b, atol: float = 1e-4, rtol: float = 1e-4) -> bool:
    return abs(a - b) <= (atol + rtol * abs(b))


def _check_audio(audio) -> np.ndarray:
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"DNSMOS takes mono 16 kHz audio [T], got shape {audio.shape}")
    if audio.size == 0:
        raise ValueError("DNSMOS got empty audio")
    if not np.isfinite(audio).all():
        raise ValueError("DNSMOS got NaN or infinite samples")
    return audio


def dnsmos_local(audio, sig: str, bak_ovr: str) -> Tuple[float, float, float]:
    """SIG, BAK, OVRL of 16 kHz mono audio: 9 s windows hopped by 1 s (shorter audio is
    repeated), each scored by the networks and mapped through df's polynomials; means."""
    audio = _check_audio(audio)
    session_sig, session_bak_ovr = get_ort_session(sig), get_ort_session(bak_ovr)
    if len(audio) < INPUT_LENGTH * SR:
        audio = np.pad(audio, (0, int(INPUT_LENGTH * SR - len(audio))), mode="wrap")
    num_hops = int(np.floor(len(audio) / SR) - INPUT_LENGTH) + 1
    scores: List[Tuple[float, float, float]] = []
    for idx in range(num_hops):
        seg = audio[idx * SR : (idx + INPUT_LENGTH) * SR]
        features = audio_logpowspec(seg)[np.newaxis].astype(np.float32)
        mos_sig = poly.polyval(session_sig.run(None, {i.name: features for i in session_sig.get_inputs()}), COEFS_SIG)
        bak_ovr_raw = session_bak_ovr.run(None, {i.name: features for i in session_bak_ovr.get_inputs()})
        scores.append((mos_sig, poly.polyval(bak_ovr_raw[0][0][1], COEFS_BAK),
                       poly.polyval(bak_ovr_raw[0][0][2], COEFS_OVR)))
    return tuple(float(np.mean([s[i] for s in scores])) for i in range(3))


def main(argv=None):
    from df_mlx.io import load_audio
    from df_mlx.logger import init_logger, log_metrics

    ap = argparse.ArgumentParser(description="DNSMOS P.835 of an audio file (offline).")
    ap.add_argument("file")
    ap.add_argument("--target-mos", "-t", type=float, nargs="*", help="Exit 2 when scores differ from these.")
    args = ap.parse_args(argv)
    init_logger(level="INFO")
    audio = np.array(load_audio(args.file, sr=SR, verbose=False)[0]).mean(0)
    dnsmos = dnsmos_local(audio, *local_onnx_models())
    log_metrics("Predicted", dict(zip(NAMES, dnsmos)))
    if args.target_mos:
        if len(args.target_mos) != len(dnsmos):
            raise SystemExit(f"--target-mos needs {len(dnsmos)} values")
        if not all(isclose(d, t) for d, t in zip(dnsmos, args.target_mos)):
            log_metrics("Target   ", dict(zip(NAMES, args.target_mos)))
            raise SystemExit(2)


if __name__ == "__main__":
    main()
