"""DNSMOS of the DNS Challenge 5 (P.835 SIG/BAK/OVRL and P.808 MOS) as `df.scripts.dnsmos_dns5`.

The ONNX models (`sig_bak_ovr.onnx`, `model_v8.onnx`) come from the PyPI package `speechmos`
(`pip install --no-deps speechmos`): nothing is downloaded at run time, so df's
`download_onnx_models` is `local_onnx_models` here. The P.808 model reads a 120-band mel
spectrogram: from a file path through librosa (as df and speechmos), from an array through
df's torch STFT path (`audio_melspec_torch`), computed with numpy.

    python -m df_mlx.scripts.dnsmos_dns5 file.wav [...]
"""

import argparse
import importlib.util
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
from loguru import logger

from df_mlx.io import load_audio, resample, save_audio  # noqa: F401  (re-exported, as df.scripts.dnsmos_dns5)
from df_mlx.logger import init_logger, log_metrics  # noqa: F401  (re-exported, as df.scripts.dnsmos_dns5)
from df_mlx.scripts.dnsmos import get_ort_session, isclose
from df_mlx.utils import download_file, get_cache_dir  # noqa: F401  (re-exported, as df.scripts.dnsmos_dns5)

SAMPLING_RATE = 16000
INPUT_LENGTH = 9.01
NAMES = ["SIG", "BAK", "OVRL", "P808_MOS"]
# np.poly1d coefficients (highest power first) of df's mapping from raw to calibrated scores.
POLY = {
    False: {"ovr": [-0.06766283, 1.11546468, 0.04602535], "sig": [-0.08397278, 1.22083953, 0.0052439],
            "bak": [-0.13166888, 1.60915514, -0.39604546]},
    True: {"ovr": [-0.00533021, 0.005101, 1.18058466, -0.11236046],
           "sig": [-0.01019296, 0.02751166, 1.19576786, -0.24348726],
           "bak": [-0.04976499, 0.44276479, -0.1644611, 0.96883132]},
}


def _librosa():
    try:
        import librosa
    except ImportError:
        raise ImportError("DNSMOS P.808 needs librosa for its mel features: pip install -e '.[eval]'") from None
    return librosa


def local_onnx_models(personalized: bool = False) -> Tuple[str, str]:
    """Paths of sig_bak_ovr.onnx (personalized: pdnsmos_models/) and model_v8.onnx in `speechmos`."""
    spec = importlib.util.find_spec("speechmos")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("DNSMOS needs the models of `speechmos`: pip install --no-deps speechmos")
    root = Path(list(spec.submodule_search_locations)[0])
    primary = root / ("pdnsmos_models" if personalized else "dnsmos_models") / "sig_bak_ovr.onnx"
    p808 = root / "dnsmos_models" / "model_v8.onnx"
    for path in (primary, p808):
        if not path.is_file():
            raise FileNotFoundError(f"speechmos has no {path.name} in {path.parent}")
    return str(primary), str(p808)


def _periodic_hann(n: int) -> np.ndarray:
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)).astype(np.float32)


class ComputeScore:
    """Scores 9.01 s windows hopped by 1 s (shorter audio is repeated) and averages them."""

    def __init__(self, primary_model_path: str, p808_model_path: str, cpu: bool = False) -> None:
        self.onnx_sess = get_ort_session(primary_model_path, providers="cpu" if cpu else "gpu")
        self.p808_onnx_sess = get_ort_session(p808_model_path, providers="cpu" if cpu else "gpu")
        n_fft = 320
        self.w = _periodic_hann(n_fft + 1)
        self.mel = _librosa().filters.mel(n_mels=120, sr=16000, n_fft=n_fft)  # [120, 161]

    def audio_melspec_torch(self, audio, n_mels=120, frame_size=320, hop_length=160, sr=16000, to_db=True):
        """df's torch path: |torch.stft(n_fft=321, periodic Hann, centred, reflect)|^2 through the
        mel basis (whose 161 bins equal the STFT's), in dB as librosa's power_to_db; [T, mels]."""
        x = np.asarray(audio, dtype=np.float32)
        n_fft = frame_size + 1
        x = np.pad(x, (n_fft // 2, n_fft // 2), mode="reflect")
        frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop_length]
        powspec = np.abs(np.fft.rfft(frames * self.w, axis=-1)).astype(np.float32) ** 2  # [T, F]
        mel_spec = (powspec @ self.mel.T).astype(np.float32)
        if to_db:
            mel_spec = (_librosa().power_to_db(mel_spec, ref=np.max) + 40) / 40
        return mel_spec

    def audio_melspec(self, audio, n_mels=120, frame_size=320, hop_length=160, sr=16000, to_db=True):
        """librosa's mel spectrogram (n_fft 321), in dB; [T, mels]."""
        librosa = _librosa()
        mel_spec = librosa.feature.melspectrogram(y=audio, sr=sr, n_fft=frame_size + 1, hop_length=hop_length,
                                                  n_mels=n_mels)
        if to_db:
            mel_spec = (librosa.power_to_db(mel_spec, ref=np.max) + 40) / 40
        return mel_spec.T

    def get_polyfit_val(self, sig, bak, ovr, is_personalized_MOS):
        p = POLY[bool(is_personalized_MOS)]
        return np.poly1d(p["sig"])(sig), np.poly1d(p["bak"])(bak), np.poly1d(p["ovr"])(ovr)

    def __call__(self, fpath_or_tensor: Union[str, np.ndarray], sampling_rate: int, is_personalized_MOS: bool = False,
                 fname: Optional[str] = None):
        fs = sampling_rate
        if isinstance(fpath_or_tensor, str):
            fpath = fpath_or_tensor
            logger.debug(f"Processing file: {fpath}")
            audio = _read_for_dnsmos(fpath, fs)
            feat_impl = self.audio_melspec
        else:
            audio = _check_audio(np.asarray(fpath_or_tensor))
            feat_impl = self.audio_melspec_torch
            fpath = fname or "unknown"
        actual_audio_len = len(audio)
        len_samples = int(INPUT_LENGTH * fs)
        while len(audio) < len_samples:
            audio = np.append(audio, audio)
        num_hops = int(np.floor(len(audio) / fs) - INPUT_LENGTH) + 1
        raw, calibrated, p808 = [], [], []
        for idx in range(num_hops):
            audio_seg = audio[int(idx * fs) : int((idx + INPUT_LENGTH) * fs)]
            if len(audio_seg) < len_samples:
                continue
            features = np.array(audio_seg).astype("float32")[np.newaxis, :]
            p808_features = np.array(feat_impl(audio=audio_seg[:-160])).astype("float32")[np.newaxis, :, :]
            p808.append(self.p808_onnx_sess.run(None, {"input_1": p808_features})[0][0][0])
            sig_bak_ovr = self.onnx_sess.run(None, {"input_1": features})[0][0]
            raw.append(sig_bak_ovr)
            calibrated.append(self.get_polyfit_val(*sig_bak_ovr, is_personalized_MOS))
        clip = {"filename": fname or fpath, "len_in_sec": actual_audio_len / fs, "sr": fs, "num_hops": num_hops}
        for i, name in enumerate(("SIG", "BAK", "OVRL")):
            clip[f"{name}_raw"] = np.mean([r[i] for r in raw])
            clip[name] = np.mean([c[i] for c in calibrated])
        clip["P808_MOS"] = np.mean(p808)
        return clip


def _check_audio(audio: np.ndarray) -> np.ndarray:
    if audio.ndim != 1 or audio.size == 0:
        raise ValueError(f"DNSMOS takes non-empty mono audio [T], got shape {audio.shape}")
    if not np.isfinite(audio).all():
        raise ValueError("DNSMOS got NaN or infinite samples")
    return audio


def _read_for_dnsmos(path: str, fs: int) -> np.ndarray:
    """df's `sf.read` + `librosa.resample` of a file (mono; the first channel otherwise)."""
    import soundfile as sf

    from df_mlx.io import AudioError

    try:
        audio, input_fs = sf.read(path)
    except (RuntimeError, sf.LibsndfileError) as e:
        raise AudioError(f"not a readable audio file: {path} ({str(e).splitlines()[0]})") from None
    if audio.ndim > 1:
        audio = audio[:, 0]
    if input_fs != fs:
        audio = _librosa().resample(audio, orig_sr=input_fs, target_sr=fs)
    return _check_audio(audio)


def eval_sample_dnsmos(file: str, target_mos: Optional[List[float]] = None, log: bool = True,
                       use_torch: bool = False, compute_score: Optional[ComputeScore] = None):
    """SIG, BAK, OVRL, P808_MOS of a file. df rebuilds `compute_score` on every call and scores
    the file twice with `use_torch`; both return the librosa path's scores, computed once here.
    With `target_mos`, raises ValueError when the scores differ from it."""
    if compute_score is None:
        compute_score = ComputeScore(*local_onnx_models())
    scores = compute_score(file, SAMPLING_RATE, False)
    scores = {n: scores[n] for n in NAMES}
    if log:
        logger.info(f"Processing file: {file}")
        for n, v in scores.items():
            logger.info(f"{n}: {v:.4f}")
    if target_mos is not None:
        if len(target_mos) != len(NAMES):
            raise ValueError(f"target_mos needs {len(NAMES)} values ({', '.join(NAMES)})")
        for n, t in zip(NAMES, target_mos):
            if not isclose(scores[n], t):
                raise ValueError(f"{n} {scores[n]:.5f} differs from the target {t}")
    return scores


def main(argv=None):
    from df_mlx.logger import init_logger

    ap = argparse.ArgumentParser(description="DNSMOS (DNS Challenge 5: SIG, BAK, OVRL, P808_MOS), offline.")
    ap.add_argument("files", nargs="+")
    ap.add_argument("--target-mos", "-t", type=float, nargs=4, help="Exit 2 when scores differ from these.")
    args = ap.parse_args(argv)
    init_logger(level="INFO")
    compute_score = ComputeScore(*local_onnx_models(), cpu=True)
    try:
        for f in args.files:
            eval_sample_dnsmos(f, args.target_mos, compute_score=compute_score)
    except (ValueError, OSError) as e:
        logger.error(str(e))
        raise SystemExit(2)


if __name__ == "__main__":
    main()
