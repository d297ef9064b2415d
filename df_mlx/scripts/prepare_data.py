"""Build the HDF5 datasets that df's training reads, as `df.scripts.prepare_data` does, without
torch or torchaudio: soundfile reads (and encodes FLAC/Vorbis), df_mlx.io resamples.

The layout is df's (and what libdfdata and df_mlx.libdfdata read): file attributes `db_id`,
`db_name`, `max_freq`, `dtype`, `codec`, `sr`; one group per type (`speech`, `noise`,
`noisy`, `rir`); one dataset per recording, named by its path relative to the list file (or
folder) with "/" -> "_", holding [C, N] PCM (int16 or float32) or the encoded bytes, with
attribute `n_samples`. A file is written to a temporary copy and renamed, so a failed run
leaves the old file (or none) behind.

    python -m df_mlx.scripts.prepare_data speech speech_files.txt speech.hdf5 [--sr 48000] ...

`audio_files` is a text file of paths (relative to its folder), one per line, as df; or a
folder, whose audio files are all taken.
"""

import argparse
import io
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from loguru import logger

from df_mlx.io import resample  # noqa: F401  (re-exported, as df.scripts.prepare_data)
from df_mlx.libdfdata import AUDIO_SUFFIXES, I16_MAX
from df_mlx.logger import init_logger  # noqa: F401  (re-exported, as df.scripts.prepare_data)

VALID_TYPES = ("speech", "noise", "noisy", "rir")


class PrepareDataError(ValueError):
    """An audio list, file or option prepare_data cannot use."""


def encode(x: np.ndarray, sr: int, codec: str, compression: Optional[int] = None) -> np.ndarray:
    """[C, N] audio as stored: PCM as is, FLAC (16 bit) or Vorbis as a uint8 byte buffer."""
    import soundfile as sf

    if codec == "pcm":
        return x
    if codec not in ("flac", "vorbis"):
        raise PrepareDataError(f"Codec '{codec}' not supported (pcm, flac, vorbis)")
    buf = io.BytesIO()
    audio = np.ascontiguousarray(x.T)  # int16 samples are written as they are
    if codec == "flac":
        sf.write(buf, audio, sr, format="FLAC", subtype="PCM_16")
    else:
        sf.write(buf, audio, sr, format="OGG", subtype="VORBIS")
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


class PreProcessingDataset:
    """Reads, resamples, down-mixes and encodes one recording per index, as df's."""

    def __init__(self, sr: int, file_names: Optional[List[str]] = None, dtype="float32", codec="pcm",
                 mono=False, compression: Optional[int] = None):
        self.file_names = file_names or []
        self.sr = sr
        if dtype not in ("float32", "int16"):
            raise PrepareDataError(f"Unknown dtype {dtype!r} (float32, int16)")
        self.codec = codec.lower()
        self.dtype = np.float32 if self.codec == "vorbis" else np.dtype(dtype).type
        self.mono = mono
        self.compression = compression

    def read(self, file: str) -> np.ndarray:
        """[C, N] in the stored dtype: 16-bit PCM at the target rate is copied bit-exactly
        (as torchaudio's normalize=False); anything else is read as float and converted."""
        import soundfile as sf

        from df_mlx.io import resample

        try:
            info = sf.info(file)
            raw_int16 = info.samplerate == self.sr and info.subtype == "PCM_16" and self.dtype == np.int16
            x, sr = sf.read(file, dtype="int16" if raw_int16 else "float32", always_2d=True)
        except (RuntimeError, sf.LibsndfileError) as e:
            raise PrepareDataError(f"cannot read {file}: {e}") from None
        x = x.T
        if sr != self.sr:
            x = resample(x, sr, self.sr, method="kaiser_best")
        if self.mono and x.shape[0] > 1:
            x = x.mean(0, keepdims=True).astype(x.dtype)
        if x.shape[0] > 16:
            raise PrepareDataError(f"{file} has {x.shape[0]} channels (at most 16)")
        if self.dtype == np.int16 and x.dtype != np.int16:
            x = np.round(np.clip(x, -1, 1) * I16_MAX).astype(np.int16)
        if self.dtype == np.float32 and not np.isfinite(x).all():
            raise PrepareDataError(f"{file} holds NaN or infinite samples")
        return x

    def __getitem__(self, index) -> Dict:
        fn = self.file_names[index]
        logger.debug(f"Reading audio file {fn}")
        x = self.read(fn)
        return {"file_name": fn, "data": encode(x, self.sr, self.codec, self.compression), "n_samples": x.shape[1]}

    def __len__(self) -> int:
        return len(self.file_names)


def write_to_h5(file_name: str, data: dict, sr: int, max_freq: int = -1, dtype: str = "float32", codec: str = "pcm",
                mono: bool = False, compression: Optional[str] = None, num_workers: int = 4):
    """Create (or add groups to) the HDF5 dataset `file_name` from `data`: {group: {"files":
    [...], "working_dir": dir}}, written atomically."""
    import h5py

    from df_mlx.atomic import atomic_file

    if max_freq <= 0:
        max_freq = sr // 2
    target = Path(file_name)
    with atomic_file(target, suffix=".hdf5.part") as tmp:
        if target.exists():
            shutil.copyfile(target, tmp)
        else:
            os.remove(tmp)  # h5py creates it
        with h5py.File(tmp, "a", libver="latest") as f:
            f.attrs["db_id"] = int(time.time())
            f.attrs["db_name"] = target.name
            f.attrs["max_freq"] = max_freq
            f.attrs["dtype"] = dtype
            f.attrs["sr"] = sr
            f.attrs["codec"] = codec
            for key, data_dict in data.items():
                grp = f.require_group(key)
                dataset = PreProcessingDataset(sr, data_dict["files"], dtype, codec, mono, 8)
                with ThreadPoolExecutor(max(1, num_workers)) as pool:
                    for i, sample in enumerate(pool.map(dataset.__getitem__, range(len(dataset)))):
                        fn = os.path.relpath(sample["file_name"], data_dict["working_dir"])
                        if sample["n_samples"] < sr / 100:
                            logger.warning(f"Short audio {fn}: {sample['n_samples']} samples.")
                        logger.info(f"{i / len(dataset) * 100:2.0f}% | Writing file {fn} to the {key} dataset.")
                        if sample["n_samples"] == 0:
                            continue
                        ds_key = fn.replace("/", "_")
                        if ds_key in grp:
                            logger.info(f"Found dataset {ds_key}. Replacing.")
                            del grp[ds_key]
                        ds = grp.create_dataset(ds_key, data=sample["data"], compression=compression)
                        ds.attrs["n_samples"] = sample["n_samples"]
                logger.info(f"Added {len(dataset)} samples to the group {key}.")


def list_audio_files(audio_files: str) -> Dict:
    """{"working_dir", "files"} from a list file (paths relative to it) or a folder."""
    src = Path(audio_files)
    if src.is_dir():
        files = sorted(str(p) for p in src.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
        if not files:
            raise PrepareDataError(f"{src} holds no audio files ({', '.join(AUDIO_SUFFIXES)})")
        return {"working_dir": str(src), "files": files}
    if not src.is_file():
        raise PrepareDataError(f"audio list {src} not found")
    working_dir = src.parent
    files = []
    for line in src.read_text().splitlines():
        if line.strip():
            file = working_dir / line.strip()
            if not file.is_file():
                raise PrepareDataError(f"file {file} not found")
            files.append(str(file))
    return {"working_dir": str(working_dir), "files": files}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("type", type=str, help="Either 'speech', 'noise', 'noisy' or 'rir'.")
    parser.add_argument("audio_files", type=str,
                        help="Text file of speech or noise files (one per line), or a folder of audio files.")
    parser.add_argument("hdf5_db", type=str, help="HDF5 file name where the data will be stored in.")
    parser.add_argument("--num_workers", type=int, default=4)
    parser.add_argument("--max_freq", type=int, default=-1,
                        help="Only frequencies below this are considered by the loss (upsampled audio).")
    parser.add_argument("--sr", type=int, default=48_000, help="Sample rate to resample to.")
    parser.add_argument("--dtype", type=str, default="int16", help="float32 or int16.")
    parser.add_argument("--codec", type=str, default="pcm", help="pcm, flac or vorbis.")
    parser.add_argument("--mono", action="store_true")
    parser.add_argument("--compression", type=str, default=None, help="HDF5 dataset compression (e.g. `gzip`).")
    args = parser.parse_args(argv)
    if not args.hdf5_db.endswith(".hdf5"):
        args.hdf5_db += ".hdf5"
    try:
        if args.type not in VALID_TYPES:
            raise PrepareDataError(f"Dataset type must be one of {VALID_TYPES}, but got {args.type}")
        data = {args.type: list_audio_files(args.audio_files)}
        write_to_h5(args.hdf5_db, data, args.sr, args.max_freq, args.dtype, args.codec.lower(), args.mono,
                    args.compression, args.num_workers)
    except PrepareDataError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    logger.remove()  # loguru's default handler prints DEBUG; LOGURU_LEVEL=DEBUG brings the per-file lines back
    logger.add(sys.stderr, level=os.environ.get("LOGURU_LEVEL", "INFO"))
    sys.exit(main())
