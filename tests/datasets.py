"""Small training datasets for the data-loader and training tests: espeak-ng speech and
freesound noise from tests/data, cut into clips and written by df_mlx.scripts.prepare_data in
each codec/dtype, with a dataset.cfg naming them."""

import json
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import soundfile as sf

from df_mlx.scripts.prepare_data import main as prepare_data

DATA = Path(__file__).resolve().parent / "data"
SR = 48000
SPEECH_CLIP, NOISE_CLIP = 40000, 50000  # samples: 8 speech clips, 4 noise clips


def write_clips(out: Path) -> Tuple[List[Path], List[Path]]:
    """The bundled recordings cut into 16-bit clips under out/wav/{speech,noise}/."""
    speech, sr = sf.read(DATA / "speech_espeak_48k.wav", dtype="int16")
    noise, _ = sf.read(DATA / "noise_freesound_573577.wav", dtype="int16")
    assert sr == SR
    files: Dict[str, List[Path]] = {"speech": [], "noise": []}
    for kind, x, n in (("speech", speech, SPEECH_CLIP), ("noise", noise, NOISE_CLIP)):
        (out / "wav" / kind).mkdir(parents=True, exist_ok=True)
        for i in range(len(x) // n):
            path = out / "wav" / kind / f"{kind[0]}{i}.wav"
            sf.write(path, x[i * n : (i + 1) * n], sr, subtype="PCM_16")
            files[kind].append(path)
    return files["speech"], files["noise"]


SPEECH_FILES = {  # file -> (codec, dtype)
    "speech_pcm_int16.hdf5": ("pcm", "int16"),
    "speech_pcm_float32.hdf5": ("pcm", "float32"),
    "speech_flac.hdf5": ("flac", "int16"),
    "speech_vorbis.hdf5": ("vorbis", "float32"),
}


def build_datasets(out: Path, splits: Dict = None) -> Path:
    """HDF5 files for every speech codec plus one noise file in `out`; returns the dataset.cfg
    (default splits: train int16 PCM x1.5, valid FLAC x0.5, test Vorbis and float PCM x0.3)."""
    speech, noise = write_clips(out)
    (out / "wav" / "speech.txt").write_text("\n".join(f"speech/{p.name}" for p in speech))
    for name, (codec, dtype) in SPEECH_FILES.items():
        assert prepare_data(["speech", str(out / "wav" / "speech.txt"), str(out / name), "--codec", codec,
                             "--dtype", dtype, "--num_workers", "1"]) == 0
    assert prepare_data(["noise", str(out / "wav" / "noise"), str(out / "noise.hdf5"), "--num_workers", "1"]) == 0
    splits = splits or {
        "train": [["speech_pcm_int16.hdf5", 1.5], ["noise.hdf5", 1.0]],
        "valid": [["speech_flac.hdf5", 0.5], ["noise.hdf5"]],
        "test": [["speech_vorbis.hdf5", 0.3], ["speech_pcm_float32.hdf5", 0.3], ["noise.hdf5", 1]],
    }
    cfg = out / "dataset.cfg"
    cfg.write_text(json.dumps(splits))
    return cfg


def clip(kind: str, i: int) -> np.ndarray:
    """Clip i of the bundled speech or noise as float32 int16/32767, how libdf reads int16."""
    x, _ = sf.read(DATA / ("speech_espeak_48k.wav" if kind == "speech" else "noise_freesound_573577.wav"),
                   dtype="int16")
    n = SPEECH_CLIP if kind == "speech" else NOISE_CLIP
    return x[i * n : (i + 1) * n].astype(np.float32) / 32767
