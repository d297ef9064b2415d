"""The data side of `df.train`: libdfdata's loader (the Rust `deepfilterdataloader`) in
Python, producing df_mlx.train batches.

Same inputs as libdfdata: a `dataset.cfg` (JSON: "train"/"valid"/"test" lists of
`[file, sampling factor, fallback sr, fallback max_freq]`) naming HDF5 files in a data
directory, in the layout `df_mlx.scripts.prepare_data` (and df's prepare_data.py) writes: one
group `speech`, `noise` or `rir`, one dataset per recording (PCM int16/float32, FLAC or Vorbis
bytes), file attributes `sr`, `max_freq`, `dtype`, `codec`. An entry may also name a folder of
audio files whose name starts with `speech`, `noise` or `rir`.

Same sampling as libdfdata (checked against it in parity/test_libdfdata.py): sampling factors
(rounded, at least 1 sample per file, times GLOBAL_DS_SAMPLING_F) set the number of speech
samples per epoch; a sample is up to max_len_s of speech (recordings concatenated until long
enough, then a random crop), 2-5 noises each with a random gain from `gains`, repeated and
cropped to the speech length and summed, low-passed like the speech when its max_freq is below
sr/2, mixed at an SNR from `snrs` with a speech gain from `gains`, scaled down when the mixture
would clip; spectra and normalised features as libdfdata's FftDataset computes them.

Not reproduced (libdfdata's random augmentations, Rust RNG): speech/noise filters and
resampling, the 5% of generated noises, reverberation with RIRs and the [distortion]
augmentations. Asking for those (p_reverb > 0 with RIR datasets, any other p_* > 0) is an error
rather than a silent difference. Each sample's randomness comes from (seed, epoch seed, index),
so an epoch is reproducible and independent of batch size and worker count.
"""

import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
from loguru import logger

from df_mlx import distributed

SPLITS = ("train", "valid", "test")
DS_TYPES = ("speech", "noise", "rir")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
I16_MAX = 32767.0  # libdfdata scales int16 PCM by i16::MAX


class DatasetError(ValueError):
    """A dataset config, a data file or a loader option libdfdata would not accept."""


@dataclass
class Hdf5Cfg:
    filename: str
    sampling_factor: float = 1.0
    fallback_sr: Optional[int] = None
    fallback_max_freq: Optional[int] = None


def read_dataset_config(path) -> Dict[str, List[Hdf5Cfg]]:
    """The "train"/"valid"/"test" entries of a dataset.cfg; extra fields (libdfdata's key
    cache) are ignored."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DatasetError(f"dataset config {path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"dataset config {path} is not JSON: {e}") from None
    if not isinstance(raw, dict) or any(s not in raw for s in SPLITS):
        raise DatasetError(f"dataset config {path} must be a JSON object with keys {', '.join(SPLITS)}")
    out = {}
    for split in SPLITS:
        entries = []
        for e in raw[split]:
            e = [e] if isinstance(e, str) else e
            if not isinstance(e, list) or not e or not isinstance(e[0], str):
                raise DatasetError(f"dataset config {path}: bad {split} entry {e!r} (want [file, factor, ...])")
            factor = float(e[1]) if len(e) > 1 else 1.0
            if not factor >= 0:
                raise DatasetError(f"dataset config {path}: sampling factor of {e[0]} must be >= 0")
            entries.append(Hdf5Cfg(e[0], factor, *(int(v) if v is not None else None for v in e[2:4])))
        out[split] = entries
    return out


def _decode(blob: np.ndarray, what: str) -> np.ndarray:
    import soundfile as sf

    try:
        x, _ = sf.read(io.BytesIO(blob.tobytes()), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises several types for corrupt streams
        raise DatasetError(f"cannot decode {what}: {e}") from None
    return x.T


class Hdf5Dataset:
    """One HDF5 file of df's layout: its type, attributes and recordings as float32 [C, N]."""

    def __init__(self, path: Path, cfg: Hdf5Cfg, sr: int):
        import h5py

        try:
            self.file = h5py.File(path, "r")
        except OSError as e:
            raise DatasetError(f"cannot open HDF5 dataset {path}: {e}") from None
        groups = [g for g in self.file.keys() if g in DS_TYPES]
        if len(groups) != 1:
            raise DatasetError(f"HDF5 dataset {path} must hold exactly one group of {DS_TYPES}, has {list(self.file)}")
        self.name, self.dstype = cfg.filename, groups[0]
        self.group = self.file[self.dstype]
        attrs = self.file.attrs
        self.sr = int(attrs["sr"]) if "sr" in attrs else (cfg.fallback_sr or sr)
        max_freq = int(attrs["max_freq"]) if "max_freq" in attrs else 0
        self.max_freq = max_freq if max_freq > 0 else (cfg.fallback_max_freq or self.sr // 2)
        self.codec = str(attrs.get("codec", "pcm")).lower()  # PCM's dtype is the dataset's own
        if self.codec not in ("pcm", "flac", "vorbis"):
            raise DatasetError(f"HDF5 dataset {path}: unknown codec {self.codec!r}")
        self.keys = sorted(self.group.keys())

    def sample_len(self, key: str) -> int:
        ds = self.group[key]
        return int(ds.attrs["n_samples"]) if "n_samples" in ds.attrs else ds.shape[-1]

    def read(self, key: str, start: int = 0, n: Optional[int] = None) -> np.ndarray:
        ds = self.group[key]
        if self.codec == "pcm":
            x = ds[..., start : None if n is None else start + n]
            x = np.atleast_2d(x)
            return (x.astype(np.float32) / I16_MAX) if x.dtype == np.int16 else x.astype(np.float32)
        x = _decode(ds[()], f"{self.name}/{key}")
        return x[:, start : None if n is None else start + n]


class FolderDataset:
    """A folder of audio files used like an HDF5 dataset; its type is its name's prefix."""

    def __init__(self, path: Path, cfg: Hdf5Cfg, sr: int):
        import soundfile as sf

        self.name = cfg.filename
        self.dstype = next((t for t in DS_TYPES if path.name.startswith(t)), None)
        if self.dstype is None:
            raise DatasetError(f"folder dataset {path} must be named speech*, noise* or rir*")
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
        if not files:
            raise DatasetError(f"folder dataset {path} holds no audio files ({', '.join(AUDIO_SUFFIXES)})")
        self.paths = {str(p.relative_to(path)).replace(os.sep, "_"): p for p in files}
        self.keys = sorted(self.paths)
        try:
            rates = {sf.info(str(p)).samplerate for p in files}
        except RuntimeError as e:
            raise DatasetError(f"folder dataset {path}: {e}") from None
        if len(rates) != 1:
            raise DatasetError(f"folder dataset {path} mixes sample rates {sorted(rates)}")
        self.sr = rates.pop()
        self.max_freq = cfg.fallback_max_freq or self.sr // 2

    def sample_len(self, key: str) -> int:
        import soundfile as sf

        return sf.info(str(self.paths[key])).frames

    def read(self, key: str, start: int = 0, n: Optional[int] = None) -> np.ndarray:
        import soundfile as sf

        x, _ = sf.read(str(self.paths[key]), start=start, frames=-1 if n is None else n, dtype="float32",
                       always_2d=True)
        return x.T


def open_dataset(data_dir: Path, cfg: Hdf5Cfg, sr: int):
    path = data_dir / cfg.filename
    if path.is_dir():
        return FolderDataset(path, cfg, sr)
    if not path.is_file():
        raise DatasetError(f"dataset {cfg.filename} not found in {data_dir}")
    return Hdf5Dataset(path, cfg, sr)


def mix_f(clean: np.ndarray, noise: np.ndarray, snr_db: float) -> np.float32:
    """libdf's noise factor for a mixture at `snr_db` (energies plus 1e-10, as libdf)."""
    e_clean = np.float32(np.sum(clean.astype(np.float64) ** 2)) + np.float32(1e-10)
    e_noise = np.float32(np.sum(noise.astype(np.float64) ** 2)) + np.float32(1e-10)
    snr = np.float32(10 ** (snr_db / 10))
    return np.float32(1.0 / np.sqrt(np.float64(e_noise / e_clean * snr + np.float32(1e-10))))


def mix_audio_signal(clean: np.ndarray, noise: np.ndarray, snr_db: float, gain_db: float):
    """libdf's mix: speech times the gain, noise scaled to the SNR against it, the sum; all
    three scaled by 1/max when anything exceeds 1. Returns (speech, noise, noisy) [C, N]."""
    clean = clean * np.float32(10 ** (gain_db / 20))
    noise = noise * mix_f(clean, noise, snr_db)
    noisy = clean + noise
    peak = max(np.abs(x).max() for x in (clean, noise, noisy))
    if peak - 1 > 1e-10:
        f = np.float32(1 / (peak + 1e-10))
        clean, noise, noisy = clean * f, noise * f, noisy * f
    return clean, noise, noisy


def combine_noises(length: int, noises: Sequence[np.ndarray], gains_db: Sequence[float],
                   rng: np.random.Generator) -> np.ndarray:
    """libdf's combination: each noise repeated until longer than `length`, randomly cropped to
    it, times its gain; the (mono) sum."""
    out = np.zeros((1, length), np.float32)
    for ns, g in zip(noises, gains_db):
        while ns.shape[1] <= length:
            ns = np.concatenate([ns, ns], 1)
        start = int(rng.integers(0, ns.shape[1] - length))
        out += ns[:1, start : start + length] * np.float32(10 ** (g / 20))
    return out


def low_pass(x: np.ndarray, cut_off: int, sr: int) -> np.ndarray:
    """libdf's low pass for noise under band-limited speech: resample to 2*cut_off and back."""
    from df_mlx.io import resample

    y = resample(resample(x, sr, 2 * cut_off), 2 * cut_off, sr)
    return y[:, : x.shape[1]]


class SplitDataset:
    """The samples of one split (libdfdata's TdDataset + FftDataset)."""

    def __init__(self, datasets: List, factors: List[float], split: str, sr: int, max_samples: int,
                 snrs: Sequence[int], gains: Sequence[int], seed: int):
        self.datasets = {d.name: d for d in datasets}
        self.factors = dict(zip((d.name for d in datasets), factors))
        self.split, self.sr, self.max_samples = split, sr, max_samples
        self.snrs, self.gains, self.seed = list(snrs), list(gains), seed
        counts = {t: 0 for t in DS_TYPES}
        for d in datasets:
            counts[d.dstype] += self._n_samples(d)
        for t in ("speech", "noise"):
            if counts[t] == 0:
                raise DatasetError(f"{split}: no {t} datasets (check the dataset config and the data directory)")
        self.generate_keys(None)

    def _n_samples(self, d) -> int:
        """factor x count in float32, rounded half away from zero (Rust's f32::round)."""
        return max(1, int(np.floor(np.float32(self.factors[d.name]) * np.float32(len(d.keys)) + np.float32(0.5))))

    def generate_keys(self, epoch_seed: Optional[int]):
        """Each file's keys (shuffled per epoch for training) cycled to factor x count."""
        rng = np.random.default_rng([self.seed, 0 if epoch_seed is None else epoch_seed + 1])
        keys: Dict[str, List[Tuple[str, str]]] = {t: [] for t in DS_TYPES}
        for name in sorted(self.datasets):
            d = self.datasets[name]
            ks = list(d.keys)
            if self.split == "train" and epoch_seed is not None:
                ks = [ks[i] for i in rng.permutation(len(ks))]
            n = self._n_samples(d)
            keys[d.dstype].extend((name, ks[i % len(ks)]) for i in range(n))
        self.sp_keys, self.ns_keys = keys["speech"], keys["noise"]

    def __len__(self) -> int:
        return len(self.sp_keys)

    def _read(self, name: str, key: str, n: Optional[int], rng: np.random.Generator) -> np.ndarray:
        """Up to `n` samples (at the loader's rate) from a random offset, as read_max_len."""
        d = self.datasets[name]
        total = d.sample_len(key)
        n_src = None if n is None else n * d.sr // self.sr
        start = 0
        if n_src is not None and total > n_src:
            start = int(rng.integers(0, total - n_src))
        x = d.read(key, start, n_src)
        if d.sr != self.sr:
            from df_mlx.io import resample

            x = resample(x, d.sr, self.sr)
            if n is not None:
                x = x[:, :n]
        return x

    def _speech(self, idx: int, rng: np.random.Generator) -> Tuple[np.ndarray, int]:
        name, key = self.sp_keys[idx]
        max_freq, parts, cur_len = self.sr // 2, [], 0
        for _ in range(100):
            x = self._read(name, key, int(self.max_samples * 1.1) - cur_len, rng)[:1]
            max_freq = min(max_freq, self.datasets[name].max_freq)
            if np.sqrt(np.mean(x.astype(np.float64) ** 2)) >= 1e-10:
                parts.append(x)
                cur_len += x.shape[1]
                if cur_len >= self.max_samples:
                    break
            name, key = self.sp_keys[int(rng.integers(0, len(self.sp_keys)))]
        else:
            raise DatasetError(f"{self.split}: found no speech energy in 100 recordings")
        speech = np.concatenate(parts, 1)
        if speech.shape[1] > self.max_samples:
            start = int(rng.integers(0, speech.shape[1] - self.max_samples))
            speech = speech[:, start : start + self.max_samples]
        return speech, max_freq

    def _noise(self, rng: np.random.Generator) -> Tuple[np.ndarray, float]:
        for _ in range(100):
            name, key = self.ns_keys[int(rng.integers(0, len(self.ns_keys)))]
            x = self._read(name, key, self.max_samples, rng)
            if x.shape[1] >= 100 and np.abs(x).max() >= 1e-10:
                return x, float(self.gains[int(rng.integers(0, len(self.gains)))])
        raise DatasetError(f"{self.split}: found no noise energy in 100 recordings")

    def get_sample(self, idx: int, epoch_seed: int) -> dict:
        rng = np.random.default_rng([self.seed, epoch_seed, idx])
        snr = self.snrs[int(rng.integers(0, len(self.snrs)))]
        gain = self.gains[int(rng.integers(0, len(self.gains)))]
        if snr <= -100:
            speech, max_freq = np.zeros((1, self.max_samples), np.float32), self.sr // 2
        else:
            speech, max_freq = self._speech(idx, rng)
        noises, noise_gains = zip(*(self._noise(rng) for _ in range(int(rng.integers(2, 6)))))
        noise = combine_noises(speech.shape[1], noises, noise_gains, rng)
        if max_freq < self.sr // 2:
            noise = low_pass(noise, max_freq, self.sr)
        speech, _, noisy = mix_audio_signal(speech, noise, snr, gain)
        return dict(speech=speech, noisy=noisy, snr=snr, gain=gain, max_freq=max_freq, idx=idx)


def noisy_features(noisy: np.ndarray, erb_widths: np.ndarray, nb_spec: int, norm_alpha: float):
    """libdfdata's features of a noisy spectrum [C, T, F] (also df.enhance's): ERB energies in dB
    normalised with erb_norm [C, T, E], and the first nb_spec bins normalised with unit_norm
    [C, T, nb_spec]."""
    from df_mlx.libdf import erb, erb_norm, unit_norm

    return erb_norm(erb(noisy, erb_widths), norm_alpha), unit_norm(noisy[..., :nb_spec], norm_alpha)


@dataclass
class Batch:
    """The fields df.train reads from a libdfdata batch: complex spectra [B, 1, T, F] of the
    clean speech and the noisy mixture, ERB features [B, 1, T, E], complex normalised spectral
    features [B, 1, T, nb_df] and the mixing SNR per sample; libdfdata here also fills
    the sample ids, lengths (frames before padding), speech gains and max frequencies. A
    training batch under mlx.launch is this rank's share of a global batch of `global_size`
    items (df_mlx.distributed.share_of; None: the whole batch, or equal shares)."""

    speech: mx.array
    noisy: mx.array
    feat_erb: mx.array
    feat_spec: mx.array
    snr: mx.array
    ids: Optional[mx.array] = None
    timings: Optional[np.ndarray] = None
    lengths: Optional[mx.array] = None
    gain: Optional[mx.array] = None
    max_freq: Optional[mx.array] = None
    global_size: Optional[int] = None

    def __len__(self) -> int:
        return self.noisy.shape[0]

    def slice(self, idx: np.ndarray) -> "Batch":
        take = lambda x: None if x is None else x[mx.array(idx)]  # noqa: E731
        return Batch(take(self.speech), take(self.noisy), take(self.feat_erb), take(self.feat_spec),
                     take(self.snr), take(self.ids), None, take(self.lengths), take(self.gain),
                     take(self.max_freq))

    def local_share(self) -> "Batch":
        """This rank's share of the batch under mlx.launch (df_mlx.distributed.local_share)."""
        share = self.slice(np.asarray(distributed.local_share(np.arange(len(self)))))
        share.global_size = len(self)
        return share


def spectral_sample(sample: dict, df_state, nb_spec: int, norm_alpha: float) -> dict:
    """libdfdata's FftDataset: STFTs of speech and noisy [C, T, F] and the noisy features."""
    speech, noisy = df_state.analysis(sample["speech"]), df_state.analysis(sample["noisy"])
    feat_erb, feat_spec = noisy_features(noisy, df_state.erb_widths(), nb_spec, norm_alpha)
    return dict(sample, speech=speech, noisy=noisy, feat_erb=feat_erb, feat_spec=feat_spec)


def collate(samples: List[dict], n_frames: int):
    """A Batch of samples zero-padded along time to `n_frames`, as libdfdata."""
    def stack(key):
        return mx.array(np.stack([np.pad(s[key], [(0, 0), (0, max(0, n_frames - s[key].shape[1])), (0, 0)])
                                  for s in samples]))

    field = lambda key, dtype: mx.array(np.array([s[key] for s in samples], dtype))  # noqa: E731
    return Batch(stack("speech"), stack("noisy"), stack("feat_erb"), stack("feat_spec"), field("snr", np.float32),
                 ids=field("idx", np.int64), lengths=mx.array([s["speech"].shape[1] for s in samples]),
                 gain=field("gain", np.float32), max_freq=field("max_freq", np.int64))


class DataLoader:
    """libdfdata's PytorchDataLoader for df_mlx: the same constructor arguments (those of the
    Rust augmentations must be 0) and the methods df.train calls."""

    def __init__(self, ds_dir: str, ds_config: str, sr: int, batch_size: int, max_len_s: Optional[float] = 10.0,
                 prefetch: int = 8, num_workers: Optional[int] = None, pin_memory: bool = False,
                 drop_last: bool = False, fft_size: Optional[int] = None, hop_size: Optional[int] = None,
                 nb_erb: Optional[int] = None, nb_spec: Optional[int] = None, norm_alpha: Optional[float] = None,
                 batch_size_eval: Optional[int] = None, p_reverb: Optional[float] = None,
                 p_bw_ext: Optional[float] = None, p_clipping: Optional[float] = None,
                 p_zeroing: Optional[float] = None, p_interfer_sp: Optional[float] = None,
                 p_air_absorption: Optional[float] = None, overfit: bool = False, seed: int = 0,
                 min_nb_erb_freqs: Optional[int] = None, log_timings: bool = False,
                 global_sampling_factor: Optional[float] = None, snrs=None, gains=None,
                 log_level: Optional[str] = None):
        from df_mlx.libdf import DF

        if fft_size is None:
            raise DatasetError("No fft_size provided")
        for name, p in (("p_bandwidth_ext", p_bw_ext), ("p_clipping", p_clipping), ("p_zeroing", p_zeroing),
                        ("p_interfer_sp", p_interfer_sp), ("p_air_absorption", p_air_absorption)):
            if p:
                raise DatasetError(f"[distortion] {name} = {p}: libdfdata's distortions are not reproduced; set it to 0")
        data_dir = Path(ds_dir)
        if not data_dir.is_dir():
            raise DatasetError(f"data directory {ds_dir} not found")
        config = read_dataset_config(ds_config)
        self.hop_size = hop_size or fft_size // 2
        self.df_args = dict(sr=sr, fft_size=fft_size, hop_size=self.hop_size, nb_bands=nb_erb or 32,
                            min_nb_erb_freqs=min_nb_erb_freqs or 1)
        DF(**self.df_args)  # fail on a bad STFT config before reading any data
        self.nb_spec = nb_spec or fft_size // 2 + 1
        self.norm_alpha = norm_alpha if norm_alpha is not None else 1.0
        self.max_samples = round((max_len_s or 10.0) * sr)
        self.batch_sizes = {"train": batch_size, "eval": batch_size_eval or batch_size}
        self.drop_last, self.overfit, self.num_workers = drop_last, overfit, max(1, num_workers or 1)
        self.splits: Dict[str, SplitDataset] = {}
        for split in SPLITS:
            entries = config[split]
            datasets = [open_dataset(data_dir, cfg, sr) for cfg in entries]
            if p_reverb and any(d.dstype == "rir" for d in datasets):
                raise DatasetError("[distortion] p_reverb > 0 with RIR datasets: reverberation is not reproduced; "
                                   "set p_reverb = 0 or leave the RIR files out")
            factors = [np.float32(cfg.sampling_factor) * np.float32(global_sampling_factor or 1.0) for cfg in entries]
            if datasets:
                self.splits[split] = SplitDataset(datasets, factors, split, sr, self.max_samples,
                                                  snrs if snrs is not None else [-5, 0, 5, 10, 20, 40],
                                                  gains if gains is not None else [-6, 0, 6], seed)
        if "train" not in self.splits:
            raise DatasetError(f"dataset config {ds_config}: no train datasets")
        for split, ds in self.splits.items():
            logger.info(f"Dataloader: {split} split with {len(ds)} samples")

    def get_batch_size(self, split: str) -> int:
        return self.batch_sizes["train" if split == "train" else "eval"]

    def set_batch_size(self, batch_size: int, split: str):
        self.batch_sizes["train" if split == "train" else "eval"] = batch_size

    def dataset_len(self, split: str) -> int:
        n = len(self.splits[split]) if split in self.splits else 0
        return min(n, self.batch_sizes["eval"]) if self.overfit and split != "train" else n

    def len(self, split: str) -> int:
        n, bs = self.dataset_len(split), self.get_batch_size(split)
        return n // bs if self.drop_last else -(-n // bs)

    def __len__(self) -> int:
        return self.len("train")

    def cleanup(self):
        """Nothing to join: batches are made on demand."""

    def iter_epoch(self, split: str, seed: int) -> Iterator:
        """The batches of one epoch of `split`; training re-draws keys and order from `seed`
        (unless overfitting, which repeats epoch 0)."""
        if split not in self.splits:
            raise DatasetError(f"the dataset config has no {split} datasets")
        ds = self.splits[split]
        epoch_seed = 0 if self.overfit else seed
        if split == "train" and not self.overfit:
            ds.generate_keys(epoch_seed)
        order = np.arange(self.dataset_len(split))
        if split == "train":
            order = np.random.default_rng([ds.seed, epoch_seed]).permutation(order)
        bs = self.get_batch_size(split)
        n_frames = self.max_samples // self.hop_size

        def make(idx: int) -> dict:
            from df_mlx.libdf import DF

            state = DF(**self.df_args)  # a fresh STFT state per sample (and thread), as libdfdata
            return spectral_sample(ds.get_sample(int(idx), epoch_seed), state, self.nb_spec, self.norm_alpha)

        with ThreadPoolExecutor(self.num_workers) as pool:
            for b in range(self.len(split)):
                idx = order[b * bs : (b + 1) * bs]
                if split != "train":
                    yield collate(list(pool.map(make, idx)), n_frames)
                    continue
                batch = collate(list(pool.map(make, distributed.local_share(idx))), n_frames)
                batch.global_size = len(idx)
                yield batch
