"""`dfmlx enhance`: enhance files, globs and folders, streaming each file in bounded memory.

Every output is planned before any work (`plan_jobs`: never an input, never shared). Each file
is checked against the input bounds on its header, read in blocks, resampled to the model rate,
enhanced by `StreamingEnhancer` (exactly what offline `enhance` computes), resampled back and
written block by block, in the input's format and encoding, into a temporary file that is
renamed into place only when the whole file succeeded (`df_mlx.atomic`). A file that fails is
reported as `Error: <file>: <reason>` and the batch goes on (`run_job`).
"""

import glob
import math
import os
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, List, Optional

import click
import numpy as np
import soundfile as sf

AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".aiff", ".aif", ".mp3"}
# Bounds on an input, checked on its header before anything is allocated or written: the rates
# audio hardware records, more channels than any speech recording has, and a day of audio.
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 4000, 384000
MAX_CHANNELS = 32
MAX_SECONDS = 24 * 3600
FLOAT_SUBTYPES = ("FLOAT", "DOUBLE")


class InputError(ValueError):
    """An input file that cannot be enhanced; one line for the user, naming the reason only
    (the report puts the file in front)."""


@dataclass
class FileResult:
    source: str
    output: Optional[str]
    seconds: float
    elapsed: float
    error: Optional[str] = None


@dataclass
class Job:
    """One input and where its result goes, or why it is not enhanced (decided up front)."""

    source: str
    output: str
    error: Optional[str] = None


def expand_inputs(inputs: Iterable[str]) -> List[str]:
    """Files as given, glob patterns expanded, folders scanned for audio files (sorted); one
    file given under several spellings (links, `./`, `..`) is kept once, as first given."""
    from df_mlx.atomic import file_identity

    files: List[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(p for p in glob.glob(os.path.join(item, "*"))
                           if os.path.splitext(p)[1].lower() in AUDIO_EXTENSIONS and os.path.isfile(p))
            files.extend(found)
        elif any(ch in item for ch in "*?["):
            files.extend(sorted(p for p in glob.glob(item, recursive=True) if not os.path.isdir(p)))
        else:
            files.append(item)
    first = {}
    for f in files:
        first.setdefault(file_identity(f), f)
    return list(first.values())


def plan_jobs(files: List[str], output_dir: str, suffix: Optional[str]) -> List[Job]:
    """Each file's output, checked before any work: an output that would replace any of the
    inputs (through links or hard links too), that two inputs would share, or that exists as
    something other than a file fails the inputs concerned."""
    from df_mlx.atomic import file_identity
    from df_mlx.io import output_path

    inputs = {file_identity(f) for f in files if os.path.exists(f)}
    jobs = [Job(f, output_path(f, output_dir, suffix)) for f in files]
    fold = str.lower if _ignores_case(output_dir) else str  # x.wav and X.wav are one file there
    writers = defaultdict(list)
    for job in jobs:
        writers[fold(str(file_identity(job.output)))].append(job.source)
    for job in jobs:
        others = [f for f in writers[fold(str(file_identity(job.output)))] if f != job.source]
        if file_identity(job.output) in inputs:
            job.error = f"its output {job.output} would overwrite an input"
        elif others:
            job.error = f"its output {job.output} would also be written for {others[0]}"
        elif os.path.lexists(job.output) and not os.path.isfile(job.output):
            job.error = f"its output {job.output} exists and is not a file"
    return jobs


def _ignores_case(folder: str) -> bool:
    """Whether file names in `folder` are case-insensitive (macOS and Windows defaults)."""
    with tempfile.NamedTemporaryFile(prefix=".dfmlx-case-", dir=folder) as probe:
        head, name = os.path.split(probe.name)
        return os.path.exists(os.path.join(head, name.upper()))


def _check_finite_option(ctx, param, value):
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"must be a finite number, got {value}")
    return value


def _audio_info(path: str):
    """The header of `path`, within the input bounds."""
    if not os.path.exists(path):
        raise InputError("file not found")
    if not os.path.isfile(path):
        raise InputError("not a regular file")
    try:
        info = sf.info(path)
    except (RuntimeError, sf.LibsndfileError) as e:
        raise InputError(f"not a readable audio file ({str(e).splitlines()[0].split(': ')[-1]})") from None
    if info.frames <= 0:
        raise InputError("empty audio file")
    if not MIN_SAMPLE_RATE <= info.samplerate <= MAX_SAMPLE_RATE:
        raise InputError(f"sample rate {info.samplerate} Hz is outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz")
    if not 1 <= info.channels <= MAX_CHANNELS:
        raise InputError(f"{info.channels} channels, more than {MAX_CHANNELS}")
    if info.frames > MAX_SECONDS * info.samplerate:
        raise InputError(f"{info.frames / info.samplerate:g} s long, more than {MAX_SECONDS:g} s")
    return info


def _truncation(info) -> Optional[str]:
    """libsndfile's note that a WAV-like header declares more data than the file holds."""
    for line in info.extra_info.splitlines():
        if line.strip().startswith("data") and "(should be" in line:
            return line.strip()
    return None


def _output_subtype(info) -> str:
    """The input's own encoding where its format can write it, else the format's default."""
    return info.subtype if sf.check_format(info.format, info.subtype) else sf.default_subtype(info.format)


def _blocks(path: str, block: int):
    try:
        yield from sf.blocks(path, blocksize=block, dtype="float32", always_2d=True)
    except (RuntimeError, sf.LibsndfileError) as e:
        raise InputError(f"cannot decode: {str(e).splitlines()[0]}") from None


class _Writer:
    """The output file, failing with a one-line reason (full disk included)."""

    def __init__(self, tmp: str, out_path: str, info, subtype: str):
        self.out_path, self.clip, self.pcm16 = out_path, subtype not in FLOAT_SUBTYPES, subtype == "PCM_16"
        try:
            self.file = sf.SoundFile(tmp, "w", samplerate=info.samplerate, channels=info.channels,
                                     subtype=subtype, format=info.format)
        except (RuntimeError, sf.LibsndfileError) as e:
            raise InputError(f"cannot write {out_path}: {str(e).splitlines()[0]}") from None

    def write(self, samples: np.ndarray):
        if not np.isfinite(samples).all():
            raise InputError("the model produced NaN or infinite samples (are its weights finite?)")
        if self.pcm16:
            from df_mlx.io import to_pcm16

            samples = to_pcm16(samples)  # df's 2^15 scaling, truncated toward zero
        elif self.clip:
            samples = np.clip(samples, -1.0, 1.0 - 1.0 / (1 << 15))
        try:
            self.file.write(samples.T)
        except (RuntimeError, sf.LibsndfileError) as e:
            self._fail(e)

    def close(self):
        try:
            self.file.close()
        except (RuntimeError, sf.LibsndfileError) as e:
            self._fail(e)

    def abandon(self):
        """Close after a failure, which is the error to report."""
        try:
            self.file.close()
        except (RuntimeError, sf.LibsndfileError):
            pass

    def _fail(self, e):
        full = shutil.disk_usage(os.path.dirname(os.path.abspath(self.out_path))).free == 0
        raise InputError(f"cannot write {self.out_path}: {str(e).splitlines()[0]}"
                         + (" (no space left on the device)" if full else "")) from None


def enhance_file(path: str, out_path: str, model, df_state, atten_lim_db, compensate_delay: bool,
                 progress: bool) -> float:
    """Enhance one file into `out_path` (atomically, in the input's format and encoding);
    returns its duration in seconds."""
    from tqdm import tqdm

    from df_mlx.atomic import atomic_file
    from df_mlx.io import Resampler
    from df_mlx.offline import file_stream
    from df_mlx.streaming import BLOCK_SECONDS

    info = _audio_info(path)
    sr, model_sr = info.samplerate, df_state.sr()
    to_model, from_model = Resampler(sr, model_sr), Resampler(model_sr, sr)
    if _truncation(info):
        click.echo(f"Warning: {path}: truncated ({_truncation(info)}); enhancing the {info.frames} frames it holds",
                   err=True)
    stream = file_stream(model, df_state, atten_lim_db)  # 10 s blocks (whole for models that cannot stream)
    skip = df_state.fft_size() - df_state.hop_size() if compensate_delay else 0
    block = max(1, int(BLOCK_SECONDS * sr))
    written = 0
    with atomic_file(out_path) as tmp:
        out = _Writer(tmp, out_path, info, _output_subtype(info))
        try:
            model_len = math.ceil(model_sr * info.frames / sr)  # enhance(pad=True)'s length, and pad=False's:
            model_len = model_len if compensate_delay else model_len // df_state.hop_size() * df_state.hop_size()
            model_written = 0

            def write(samples: np.ndarray, final: bool = False):
                """Model-rate output -> delay removed, cut to the input's length at the model
                rate (as offline `enhance(pad=True)`), back to the file's rate."""
                nonlocal skip, written, model_written
                if skip:
                    cut = min(skip, samples.shape[1])
                    samples, skip = samples[:, cut:], skip - cut
                samples = samples[:, : max(0, model_len - model_written)]
                model_written += samples.shape[1]
                samples = from_model.process(samples)
                if final:
                    samples = np.concatenate([samples, from_model.flush()], axis=1)
                samples = samples[:, : max(0, info.frames - written)] if compensate_delay else samples
                out.write(samples)
                written += samples.shape[1]

            bar = tqdm(total=info.frames, unit="sample", unit_scale=True, leave=False,
                       disable=not progress or info.frames < 6 * block, desc=os.path.basename(path))
            for chunk in _blocks(path, block):
                chunk = chunk.T
                if not np.isfinite(chunk).all():
                    raise InputError("contains NaN or infinite samples")
                write(stream.process(to_model.process(chunk)))
                bar.update(chunk.shape[1])
            bar.close()
            tail = to_model.flush()
            write(np.concatenate([stream.process(tail), stream.flush(pad=compensate_delay)], axis=1), final=True)
        except BaseException:
            out.abandon()
            raise
        out.close()
        if written == 0:
            raise InputError("too short to enhance (no samples after resampling)")
    return info.frames / sr


def _reason(e: Exception) -> str:
    """A failure in one line: ValueErrors (ours: InputError, AudioError, ModelDirError) as they
    are, OSErrors with their file, anything else with its kind."""
    text = (str(e).strip().splitlines() or [""])[0]
    if isinstance(e, ValueError):
        return text or type(e).__name__
    if isinstance(e, OSError):
        return f"{e.strerror or text}" + (f": {e.filename}" if e.filename else "")
    if isinstance(e, MemoryError):
        return "out of memory"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def run_job(job: Job, model, df_state, atten_lim_db, compensate_delay: bool) -> FileResult:
    """One file of the batch: its result, or its failure as a reason (never raised, so the
    batch goes on)."""
    if job.error:
        return FileResult(job.source, None, 0.0, 0.0, job.error)
    t0 = time.perf_counter()
    try:
        seconds = enhance_file(job.source, job.output, model, df_state, atten_lim_db, compensate_delay, progress=True)
        return FileResult(job.source, job.output, seconds, time.perf_counter() - t0)
    except Exception as e:  # any failure of one file is reported and the next file runs
        return FileResult(job.source, None, 0.0, time.perf_counter() - t0, _reason(e))


def _df_epoch(value):
    return None if value is None else (int(value) if str(value).isdigit() else value)


def _print_version(ctx, _param, value):
    if value and not ctx.resilient_parsing:
        from df_mlx.version import version

        click.echo(f"DeepFilterNet (df-mlx) {version}")
        ctx.exit()


@click.command("enhance")
@click.argument("inputs", nargs=-1)
@click.option("-i", "--noisy-dir", type=click.Path(file_okay=False), default=None,
              help="Folder of noisy audio files (df's spelling; instead of INPUTS).")
@click.option("-o", "--output-dir", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Directory for the enhanced files.")
@click.option("-m", "--model", "--model-base-dir", "model_dir", default=None,
              help="Converted model directory, upstream model directory, or a pretrained name "
                   "(default: the embedded DeepFilterNet3).")
@click.option("-e", "--epoch", default="best", show_default=True,
              help="Checkpoint of a training or upstream directory: best, latest, a number, or none (untrained).")
@click.option("-a", "--atten-lim", type=float, default=None, callback=_check_finite_option,
              help="Attenuation limit in dB.")
@click.option("--pf", is_flag=True, help="Post-filter: slightly more attenuation of very noisy parts.")
@click.option("--compensate-delay/--no-compensate-delay", "--delay-compensation/--no-delay-compensation",
              default=True, show_default=True, help="Align the output with the input (remove the STFT delay).")
@click.option("--no-df-stage", is_flag=True, help="Run the model without its deep-filtering stage (mask only).")
@click.option("--suffix/--no-suffix", default=True, show_default=True,
              help="Add the model name to output file names.")
@click.option("--log-level", default="WARNING", show_default=True)
@click.option("-d", "--debug", "log_level", flag_value="DEBUG", help="Log level DEBUG (df's -d).")
@click.option("--device", default=None, help="cpu or gpu (torch's cuda, mps map to MLX's GPU).")
@click.option("-v", "--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Print the version and exit.")
def enhance_cmd(inputs, noisy_dir, output_dir, model_dir, epoch, atten_lim, pf, compensate_delay, no_df_stage,
                suffix, log_level, device):
    """Enhance noisy audio files (any sample rate, any number of channels)."""
    from tqdm import tqdm

    from df_mlx import distributed
    from df_mlx.loading import init_df

    if noisy_dir is not None and inputs:
        raise click.ClickException("give either INPUTS or --noisy-dir, not both")
    files = expand_inputs([noisy_dir] if noisy_dir is not None else inputs)
    if not files:
        raise click.ClickException("no input files found")
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise click.ClickException(f"cannot create output directory {output_dir}: {e.strerror}")
    if not os.access(output_dir, os.W_OK):
        raise click.ClickException(f"output directory is not writable: {output_dir}")
    try:
        if device is not None:
            import mlx.core as mx

            from df_mlx.utils import mlx_device

            mx.set_default_device(mlx_device(device, "for --device"))
        model, df_state, model_suffix = init_df(model_dir, post_filter=pf, log_level=log_level, log_file=None,
                                                epoch=_df_epoch(epoch), mask_only=no_df_stage)
    except (OSError, ValueError) as e:  # ValueError: a model that is not one (ModelDirError, CheckpointError)
        raise click.ClickException(_reason(e))
    jobs = plan_jobs(files, output_dir, model_suffix if suffix else None)
    jobs = distributed.share_files(  # under mlx.launch: this rank's jobs, one rank per output path
        jobs, key=lambda job: os.path.realpath(job.output), seconds=lambda job: distributed.file_seconds(job.source))
    results = [run_job(job, model, df_state, atten_lim, compensate_delay)
               for job in tqdm(jobs, unit="file", disable=len(jobs) < 2)]
    _summary(results)
    if distributed.any_rank(any(r.error for r in results)):  # every rank ends with the same status
        raise SystemExit(1)


def shown(text: str) -> str:
    """`text` on one line: a file name holding a newline or other control characters is shown
    escaped, as Python writes it, so every failure stays one `Error:` line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _summary(results: List[FileResult]):
    done = [r for r in results if r.error is None]
    for r in results:
        if r.error:
            click.echo(f"Error: {shown(r.source)}: {shown(r.error)}", err=True)
        else:
            click.echo(f"{r.output}  ({r.seconds:.1f} s audio, RTF {r.elapsed / max(r.seconds, 1e-9):.3f})")
    audio = sum(r.seconds for r in done)
    elapsed = sum(r.elapsed for r in done)
    click.echo(f"enhanced {len(done)}/{len(results)} files, {audio:.1f} s of audio in {elapsed:.1f} s"
               + (f" (RTF {elapsed / audio:.3f})" if audio else ""))
