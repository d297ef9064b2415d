"""Evaluation as `df.evaluation_utils`: enhance a test set with an MLX model and score it (STOI,
SI-SDR, PESQ, composite, DNSMOS), per file and on average, optionally into CSV files.

Metrics run in a process pool (spawned, as df's torch pool) or inline for `n_workers < 1`.
Resampling to a metric's rate is `df_mlx.io.resample` (torchaudio's sinc resampler with df's
"sinc_fast" preset, as df). Left out: the DNSMOS web-API metrics (df-mlx runs offline) and the
Octave composite (`composite-octave`, `use_octave`), which needs the `semetrics` package that
df itself treats as optional: asking for it raises a clear error where it is not installed.
"""

import csv
import os
import time
from abc import ABC, abstractmethod
from collections import defaultdict, deque
from functools import partial
from multiprocessing import get_context
from multiprocessing.dummy import Pool as DummyPool
from tempfile import NamedTemporaryFile
from typing import Callable, Dict, List, Optional, Tuple, Union

import mlx.core as mx
import numpy as np
from loguru import logger

from df_mlx.enhance import df_features
from df_mlx.io import load_audio, resample, save_audio
from df_mlx.libdf import DF
from df_mlx.model import ModelParams
from df_mlx.scripts import dnsmos_dns5 as dnsmos5
from df_mlx.scripts.dnsmos import dnsmos_local, local_onnx_models
from df_mlx.sepm import composite as composite_py
from df_mlx.io import get_resample_params  # noqa: F401  (re-exported, as df.evaluation_utils)
from df_mlx.utils import as_complex
from df_mlx.utils import get_device  # noqa: F401  (re-exported, as df.evaluation_utils)

HAS_OCTAVE = True
RESAMPLE_METHOD = "sinc_fast"

try:
    import semetrics
except (OSError, ImportError, ModuleNotFoundError):
    HAS_OCTAVE = False
    semetrics = None


def log_progress(iterable, total: Optional[int] = None, log_freq_percent=25, desc="Progress"):
    """Yield from `iterable`, logging each `log_freq_percent` step of progress (off for < 0 or >= 100)."""
    disable_logging = log_freq_percent < 0 or log_freq_percent >= 100
    logged = set()
    try:
        length = iterable.__len__()
    except AttributeError:
        if total is None:
            raise ValueError("log_progress needs `total` for an iterable without a length") from None
        length = total
    for k, i in enumerate(iterable):
        yield i
        if disable_logging:
            continue
        progress = int(100 * (k + 1) / length)
        if progress % log_freq_percent == 0 and progress > 0 and progress not in logged:
            logger.info("{}: {: >2d}%".format(desc, progress))
            logged.add(progress)


def _with_bar(iterable, total: int, progress_bar: bool):
    """A tqdm bar over the files when asked (df-mlx's addition to df's signatures, for `dfmlx eval`)."""
    if not progress_bar:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, unit="file")


def highpass_biquad(audio: np.ndarray, sr: int, cutoff_freq: float, Q: float = 0.707) -> np.ndarray:
    """torchaudio.functional.highpass_biquad (RBJ cookbook coefficients, lfilter clamped to [-1, 1])."""
    from scipy.signal import lfilter

    w0 = 2 * np.pi * cutoff_freq / sr
    alpha = np.sin(w0) / 2 / Q
    b = np.array([(1 + np.cos(w0)) / 2, -1 - np.cos(w0), (1 + np.cos(w0)) / 2])
    a = np.array([1 + alpha, -2 * np.cos(w0), 1 - alpha])
    out = lfilter(b / a[0], a / a[0], np.asarray(audio, dtype=np.float64), axis=-1)
    return np.clip(out, -1, 1).astype(np.float32)


def enhance(model, df_state: DF, noisy, f_hp_cutoff: Optional[int] = None) -> np.ndarray:
    """Enhanced audio [C, T] of noisy [C, T] (no delay compensation, as df's evaluation), with an
    optional high-pass at `f_hp_cutoff` Hz."""
    model.eval()
    if hasattr(model, "reset_h0"):
        model.reset_h0(batch_size=1)
    nb_df = getattr(model, "nb_df", getattr(model, "df_bins", ModelParams().nb_df))
    spec, erb_feat, spec_feat = df_features(np.asarray(noisy), df_state, nb_df)
    spec = model(spec, erb_feat, spec_feat)[0][:, 0]  # [C, T, F, 2]
    audio = df_state.synthesis(np.array(as_complex(spec)))
    if f_hp_cutoff is not None:
        audio = highpass_biquad(audio, df_state.sr(), f_hp_cutoff)
    return audio


def get_metrics(sr: int):
    return {
        "stoi": partial(StoiMetric, sr=sr),
        "sisdr": SiSDRMetric,
        "composite": partial(CompositeMetric, sr=sr),
        "composite-octave": partial(CompositeMetric, sr=sr, use_octave=True),
        "pesq": partial(PesqMetric, sr=sr),
        "pesq-nb": partial(PesqMetric, sr=sr, nb=True),
        "dnsmos5": partial(DnsMos5Metric, sr=sr),
    }


def _pool(n_workers: int):
    return get_context("spawn").Pool(processes=n_workers) if n_workers >= 1 else DummyPool(processes=1)


def _make_metrics(names: List[str], metrics_dict: Dict[str, Callable], pool) -> List["Metric"]:
    unknown = [m for m in names if m.lower() not in metrics_dict]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(metrics_dict)}")
    return [metrics_dict[m.lower()](pool=pool) for m in names]


def _collect(metrics: List["Metric"], csv_path_enh: Optional[str], csv_path_noisy: Optional[str]) -> Dict[str, float]:
    """Write the per-file CSVs and return the means of every metric."""
    logger.info("Waiting for metrics computation completion. This could take a few minutes.")
    for path, noisy in ((csv_path_enh, False), (csv_path_noisy, True)):
        if path is None:
            continue
        rows: Dict[str, Dict[str, float]] = defaultdict(dict)  # {filename: {metric_name: metric_value}}
        for m in metrics:
            for fn, values in m.flattend(noisy=noisy).items():
                rows[fn] = {**rows[fn], **values}
        write_csv(path, rows)
    out_dict = {}
    for m in metrics:
        out_dict.update(m.mean())
    return out_dict


def _check_lists(*lists: List[str]):
    if len({len(files) for files in lists}) > 1:
        raise ValueError(f"file lists differ in length: {[len(files) for files in lists]}")


def evaluation_loop(
    df_state: DF,
    model,
    clean_files: List[str],
    noisy_files: List[str],
    metrics: List[str] = ["stoi", "composite", "sisdr"],  # noqa: B006 (df's signature)
    save_audio_callback: Optional[Callable[[str, np.ndarray], None]] = None,
    n_workers: int = 4,
    log_percent: int = 25,
    csv_path_enh: Optional[str] = None,
    csv_path_noisy: Optional[str] = None,
    noisy_metric: bool = False,
    sleep_ms=0,
    progress_bar: bool = False,
) -> Dict[str, float]:
    """Enhance each noisy file with `model` and score it against its clean file (both passed
    through the STFT round trip, as df); means per metric ("Enhanced X", "Noisy    X")."""
    _check_lists(clean_files, noisy_files)
    sr = df_state.sr()
    with _pool(n_workers) as pool:
        ms = _make_metrics(metrics, get_metrics(sr), pool)
        pairs = _with_bar(zip(noisy_files, clean_files), len(noisy_files), progress_bar)
        for noisyfn, cleanfn in log_progress(pairs, len(noisy_files), log_percent):
            noisy = np.array(load_audio(noisyfn, sr, method=RESAMPLE_METHOD)[0])
            clean = np.array(load_audio(cleanfn, sr, method=RESAMPLE_METHOD)[0])
            logger.debug(f"Processing {os.path.basename(noisyfn)}, {os.path.basename(cleanfn)}")
            enh = enhance(model, df_state, noisy)[0]
            clean = df_state.synthesis(df_state.analysis(clean))[0]
            noisy = df_state.synthesis(df_state.analysis(noisy))[0] if noisy_metric else None
            for m in ms:
                m.add(clean=clean, enhanced=enh, noisy=noisy, fn=os.path.basename(noisyfn))
            if save_audio_callback is not None:
                save_audio_callback(cleanfn, enh.astype(np.float32).reshape(1, -1))
            if sleep_ms > 0:
                time.sleep(sleep_ms / 1000)
        return _collect(ms, csv_path_enh, csv_path_noisy)


def evaluation_loop_dir_only(
    clean_files: List[str],
    enh_files: List[str],
    noisy_files: List[str],
    metrics: List[str] = ["stoi", "composite", "sisdr"],  # noqa: B006 (df's signature)
    n_workers: int = 4,
    log_percent: int = 25,
    csv_path_enh: Optional[str] = None,
    csv_path_noisy: Optional[str] = None,
    progress_bar: bool = False,
) -> Dict[str, float]:
    """Score already enhanced files (and optionally the noisy ones) against clean files, all
    loaded at 16 kHz as df does."""
    sr = 16_000
    if noisy_files is None or len(noisy_files) == 0:
        noisy_files = [None] * len(clean_files)
    _check_lists(clean_files, enh_files, noisy_files)
    with _pool(n_workers) as pool:
        ms = _make_metrics(metrics, get_metrics(sr), pool)
        noisy = None
        triples = _with_bar(zip(clean_files, enh_files, noisy_files), len(clean_files), progress_bar)
        for cleanfn, enhfn, noisyfn in log_progress(triples, len(clean_files), log_percent):
            clean = np.array(load_audio(cleanfn, sr, method=RESAMPLE_METHOD)[0])
            enh = np.array(load_audio(enhfn, sr, method=RESAMPLE_METHOD)[0])
            logger.debug(f"Processing clean {cleanfn}, enh {enhfn}")
            if noisyfn is not None:
                noisy = np.array(load_audio(noisyfn, sr, method=RESAMPLE_METHOD)[0])
            for m in ms:
                m.add(clean=clean, enhanced=enh, noisy=noisy, fn=os.path.basename(cleanfn))
        return _collect(ms, csv_path_enh, csv_path_noisy)


def evaluation_loop_dns(
    df_state: DF,
    model,
    noisy_files: List[str],
    metrics: List[str] = ["v5"],  # noqa: B006 (df's signature)
    save_audio_callback: Optional[Callable[[str, np.ndarray], None]] = None,
    n_workers: int = 8,
    log_percent: int = 10,
    eval_noisy: bool = True,
    csv_path_enh: Optional[str] = None,
    csv_path_noisy: Optional[str] = None,
    assert_output_length: Optional[int] = None,
) -> Dict[str, float]:
    """Non-intrusive evaluation (DNSMOS "v5" of DNS Challenge 5, or "v1" P.835) of enhanced files."""
    sr = df_state.sr()
    metrics_dict = {"v5": partial(DnsMos5Metric, sr=sr), "v1": partial(DnsMosP835LocalMetric, sr=sr)}
    with DummyPool(processes=max(1, n_workers)) as pool:
        ms = _make_metrics(metrics, metrics_dict, pool)
        for noisyfn in log_progress(noisy_files, len(noisy_files), log_percent):
            noisy = np.array(load_audio(noisyfn, sr, method=RESAMPLE_METHOD)[0])
            logger.debug(f"Processing {os.path.basename(noisyfn)}")
            enh = enhance(model, df_state, noisy)[0]
            noisy = df_state.synthesis(df_state.analysis(noisy))[0]
            for m in ms:
                m.add(enhanced=enh, noisy=noisy if eval_noisy else None, fn=os.path.basename(noisyfn))
            if save_audio_callback is not None:
                save_audio_callback(noisyfn, enh.astype(np.float32).reshape(1, -1))
        out = _collect(ms, csv_path_enh, csv_path_noisy if eval_noisy else None)
        for m in ms:
            if assert_output_length is not None and len(next(iter(m.enh_values.values()))) != assert_output_length:
                raise RuntimeError(f"{m.name}: expected {assert_output_length} scores")
        return out


def write_csv(path: str, flat_metrics: Dict[str, Dict[str, float]]):
    """Write `{filename: {metric_name: metric_value}}` as `filename,metric_a,metric_b,...`
    (replacing `path` only once the whole file is written)."""
    from df_mlx.atomic import atomic_file

    metric_names = list(iter(flat_metrics.values()).__next__().keys())
    with atomic_file(path) as tmp, open(tmp, mode="w", newline="") as csvfile:
        csvwriter = csv.writer(csvfile, delimiter=",", quoting=csv.QUOTE_MINIMAL)
        csvwriter.writerow(["filename"] + metric_names)
        for fn, m in flat_metrics.items():
            csvwriter.writerow([fn] + [str(m[n]) for n in metric_names])


class Metric(ABC):
    """A metric's per-file values for enhanced and (optionally) noisy signals, resampled to
    the metric's rate."""

    def __init__(self, name: Union[str, List[str]], source_sr: Optional[int] = None,
                 target_sr: Optional[int] = None, device="cpu"):
        self.name = name
        self.sr = target_sr
        self.source_sr = source_sr
        self.resample = source_sr is not None and target_sr is not None and source_sr != target_sr
        names = [name] if isinstance(name, str) else name
        self.enh_values: Dict[str, List[Tuple[Optional[str], float]]] = {n: [] for n in names}
        self.noisy_values: Dict[str, List[Tuple[Optional[str], float]]] = {n: [] for n in names}

    @abstractmethod
    def compute_metric(self, clean, degraded) -> Union[float, np.ndarray]:
        pass

    def _add_values_enh(self, values_enh: Union[float, np.ndarray], fn: Optional[str] = None):
        _append_values(self.enh_values, values_enh, fn)

    def _add_values_noisy(self, values_noisy: Union[float, np.ndarray], fn: Optional[str] = None):
        _append_values(self.noisy_values, values_noisy, fn)

    def maybe_resample(self, x) -> np.ndarray:
        x = as_numpy(x)
        return resample(np.asarray(x), self.source_sr, self.sr, method=RESAMPLE_METHOD) if self.resample else x

    def _check(self, clean, other, fn):
        if np.shape(clean) != np.shape(other):
            raise ValueError(f"{self.name}: clean and degraded differ in shape, {np.shape(clean)} and "
                             f"{np.shape(other)} ({fn})")

    def add(self, clean, enhanced, noisy=None, fn: Optional[str] = None):
        self._check(clean, enhanced, fn)
        clean = _squeeze0(self.maybe_resample(clean))
        enhanced = _squeeze0(self.maybe_resample(enhanced))
        self._add_values_enh(self.compute_metric(clean=clean, degraded=enhanced), fn)
        if noisy is not None:
            self._check(clean, noisy, fn)
            noisy = _squeeze0(self.maybe_resample(noisy))
            self._add_values_noisy(self.compute_metric(clean=clean, degraded=noisy), fn)

    def mean(self) -> Dict[str, float]:
        out = {}
        for n in self.enh_values.keys():
            if n in self.noisy_values and len(self.noisy_values[n]) > 0:
                out[f"Noisy    {n}"] = np.mean([v[1] for v in self.noisy_values[n]])
            out[f"Enhanced {n}"] = np.mean([v[1] for v in self.enh_values[n]])
        return out

    def flattend(self, noisy: bool = False) -> Dict[str, Dict[str, float]]:
        """{filename: {metric_name: metric_value}}"""
        flat: Dict[str, Dict[str, float]] = defaultdict(dict)
        values = self.noisy_values if noisy else self.enh_values
        for n, entries in values.items():
            for fn, v in entries:
                flat[fn or ""][n] = v
        return flat


def _append_values(store: Dict[str, list], values: Union[float, np.ndarray], fn: Optional[str]):
    """One value per metric name. df accepts only a Python float as a scalar: SI-SDR of float32
    audio is a numpy float32, the pool callback raises, and df's `join_pool` then waits forever."""
    for k, v in zip(store.keys(), np.atleast_1d(np.asarray(values))):
        store[k].append((fn, v))


def _squeeze0(x: np.ndarray) -> np.ndarray:
    """torch's `squeeze(0)`: drops a leading axis of size 1 only."""
    return x[0] if x.ndim > 0 and x.shape[0] == 1 else x


class MPMetric(Metric):
    """A metric computed asynchronously in a worker pool; results are joined on first read."""

    def __init__(self, name, pool, source_sr: Optional[int] = None, target_sr: Optional[int] = None):
        super().__init__(name, source_sr=source_sr, target_sr=target_sr)
        self.pool = pool
        self.worker_results = deque()
        self.is_joined = False

    def _submit(self, args: tuple, add: Callable, what: str, fn: Optional[str]):
        h = self.pool.apply_async(self.compute_metric, args, callback=lambda x: add(x, fn),
                                  error_callback=lambda e: logger.error(
                                      f"Error computing {self.name} metric for {what} sample {fn}: {e}"))
        self.worker_results.append(h)

    def add(self, clean, enhanced, noisy=None, fn: Optional[str] = None):
        self._check(clean, enhanced, fn)
        if noisy is not None:
            self._check(clean, noisy, fn)
        clean = _squeeze0(self.maybe_resample(clean))
        enhanced = _squeeze0(self.maybe_resample(enhanced))
        if not np.isfinite(enhanced).all():
            raise ValueError(f"Error processing file {fn}: the enhanced signal is not finite")
        self._submit((clean, enhanced), self._add_values_enh, "enhanced", fn)
        if noisy is not None:
            self._submit((clean, _squeeze0(self.maybe_resample(noisy))), self._add_values_noisy, "noisy", fn)

    def join_pool(self):
        if self.is_joined:
            return
        while len(self.worker_results) > 0:
            self.worker_results.popleft().get()
        self.pool.close()
        self.pool.join()
        self.is_joined = True

    def flattend(self, noisy: bool = False) -> Dict[str, Dict[str, float]]:
        self.join_pool()
        return super().flattend(noisy=noisy)

    def mean(self) -> Dict[str, float]:
        self.join_pool()
        return super().mean()

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["pool"]
        del state["worker_results"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)


class SiSDRMetric(MPMetric):
    def __init__(self, pool):
        super().__init__(name="SISDR", pool=pool)

    def compute_metric(self, clean, degraded) -> float:
        return si_sdr_speechmetrics(reference=as_numpy(clean), estimate=as_numpy(degraded))


class StoiMetric(MPMetric):
    def __init__(self, sr: int, pool):
        super().__init__(name="STOI", pool=pool, source_sr=sr, target_sr=10000)

    def compute_metric(self, clean, degraded) -> float:
        return stoi(clean=as_numpy(clean), degraded=as_numpy(degraded), sr=self.sr)


class PesqMetric(MPMetric):
    """Wide-band PESQ at 16 kHz, or narrow-band ("PESQ-NB") at 8 kHz."""

    def __init__(self, sr: int, pool, nb: bool = False):
        name, self.mode, target_sr = ("PESQ-NB", "nb", 8000) if nb else ("PESQ", "wb", 16000)
        super().__init__(name=name, pool=pool, source_sr=sr, target_sr=target_sr)

    def compute_metric(self, clean, degraded) -> Union[float, np.ndarray]:
        from pesq import pesq

        return pesq(self.sr, as_numpy(clean), as_numpy(degraded), self.mode)


class CompositeMetric(MPMetric):
    def __init__(self, sr: int, pool, use_octave: bool = False):
        if use_octave and semetrics is None:
            raise ValueError("composite-octave needs the `semetrics` package (Octave), which is not installed")
        super().__init__(["PESQ", "CSIG", "CBAK", "COVL", "SSNR"], pool=pool, source_sr=sr, target_sr=16000)
        self.use_octave = use_octave

    def compute_metric(self, clean, degraded) -> Union[float, np.ndarray]:
        return composite(clean=_squeeze0(clean), degraded=_squeeze0(degraded), sr=self.sr,
                         use_octave=self.use_octave)


class NoisyMetric(MPMetric):
    """A non-intrusive metric: scores a signal without its clean reference."""

    def add(self, enhanced, noisy, fn: Optional[str] = None):
        self._submit((_squeeze0(self.maybe_resample(enhanced)),), self._add_values_enh, "enhanced", fn)
        if noisy is not None:
            self._submit((_squeeze0(self.maybe_resample(noisy)),), self._add_values_noisy, "noisy", fn)

    @abstractmethod
    def compute_metric(self, degraded) -> Union[float, np.ndarray]:
        pass


class DnsMos5Metric(NoisyMetric):
    """DNSMOS of DNS Challenge 5 (SIG, BAK, OVRL, P808_MOS). The ONNX sessions are opened in the
    process that scores (they cannot be pickled into a spawned worker; df's are, and fail)."""

    def __init__(self, sr: int, pool):
        super().__init__(dnsmos5.NAMES, pool=pool, source_sr=sr, target_sr=16000)
        self.model_paths = dnsmos5.local_onnx_models()

    def compute_metric(self, degraded) -> Union[float, np.ndarray]:
        compute_score = dnsmos5.ComputeScore(*self.model_paths)  # sessions are cached per process
        with NamedTemporaryFile(suffix=".wav") as nf:
            save_audio(nf.name, degraded, self.sr, dtype=np.float32)
            scores = dnsmos5.eval_sample_dnsmos(nf.name, log=False, compute_score=compute_score)
            return np.asarray([scores[n] for n in self.name])


class DnsMosP835LocalMetric(NoisyMetric):
    def __init__(self, sr: int, pool):
        super().__init__(name=["SIGMOS", "BAKMOS", "OVLMOS"], pool=pool, source_sr=sr, target_sr=16000)
        self.sig, self.bak_ovr = local_onnx_models()

    def compute_metric(self, degraded) -> Union[float, np.ndarray]:
        return np.asarray(dnsmos_local(degraded, self.sig, self.bak_ovr))


def _to_rate(clean, degraded, sr: int, target: int) -> Tuple[np.ndarray, np.ndarray]:
    if sr == target:
        return as_numpy(clean), as_numpy(degraded)
    return (resample(as_numpy(clean), sr, target, method=RESAMPLE_METHOD),
            resample(as_numpy(degraded), sr, target, method=RESAMPLE_METHOD))


def stoi(clean, degraded, sr, extended=False):
    """pystoi's (E)STOI of 1-D signals, resampled to 10 kHz first."""
    import pystoi

    if np.ndim(clean) != 1:
        raise ValueError(f"stoi takes 1-D signals, got shape {np.shape(clean)}")
    clean, degraded = _to_rate(clean, degraded, sr, 10000)
    return pystoi.stoi(x=clean, y=degraded, fs_sig=10000, extended=extended)


def pesq_(clean, degraded, sr: int) -> np.ndarray:
    """Wide-band PESQ, resampled to 16 kHz first."""
    from pesq import pesq

    clean, degraded = _to_rate(clean, degraded, sr, 16000)
    return pesq(16000, clean.squeeze(), degraded.squeeze(), "wb")


def composite(clean, degraded, sr: int, use_octave=False) -> np.ndarray:
    """PESQ, CSIG, CBAK, COVL, SSNR of 1-D signals (float32), resampled to 16 kHz first."""
    if np.ndim(clean) != 1:
        raise ValueError(f"Input must be 1D array, but got input shape {np.shape(clean)}")
    clean, degraded = _to_rate(clean, degraded, sr, 16000)
    if use_octave:
        if semetrics is None:
            raise ValueError("use_octave needs the `semetrics` package (Octave), which is not installed")
        with NamedTemporaryFile(suffix=".wav") as cf, NamedTemporaryFile(suffix=".wav") as nf:
            # Note: Quantizing to int16 results in slightly modified metrics. Thus, keep f32 prec.
            save_audio(cf.name, clean, 16000, dtype=np.float32)
            save_audio(nf.name, degraded, 16000, dtype=np.float32)
            c = semetrics.composite(cf.name, nf.name)
    else:
        c = composite_py(clean, degraded, 16000)
    return np.asarray(c).astype(np.float32)


def si_sdr_speechmetrics(reference: np.ndarray, estimate: np.ndarray):
    """Scale-invariant SDR [dB] of one estimate against one reference (speechmetrics' formula)."""
    reference = reference.reshape(-1, 1)
    estimate = estimate.reshape(-1, 1)
    eps = np.finfo(reference.dtype).eps
    Rss = np.dot(reference.T, reference)
    a = (eps + np.dot(reference.T, estimate)) / (Rss + eps)  # scaling factor for the clean source
    e_true = a * reference
    e_res = estimate - e_true
    Sss = (e_true**2).sum()
    Snn = (e_res**2).sum()
    return 10 * np.log10((eps + Sss) / (eps + Snn))


def as_numpy(x) -> np.ndarray:
    return np.array(x) if isinstance(x, mx.array) else np.asarray(x)
