"""`dfmlx enhance`: enhance files, globs and folders, streaming each file in bounded memory.

Each file is read in blocks, resampled to the model rate, enhanced by `StreamingEnhancer`
(exactly what offline `enhance` computes), resampled back and written block by block into a
temporary file that is renamed into place only when the whole file succeeded.
"""

import glob
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Iterable, List, Optional

import click
import numpy as np
import soundfile as sf

AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".aiff", ".aif", ".mp3"}


class InputError(ValueError):
    """An input file that cannot be enhanced; one line for the user."""


@dataclass
class FileResult:
    source: str
    output: Optional[str]
    seconds: float
    elapsed: float
    error: Optional[str] = None


def expand_inputs(inputs: Iterable[str]) -> List[str]:
    """Files as given, glob patterns expanded, folders scanned for audio files (sorted)."""
    files: List[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(p for p in glob.glob(os.path.join(item, "*"))
                           if os.path.splitext(p)[1].lower() in AUDIO_EXTENSIONS)
            files.extend(found)
        elif any(ch in item for ch in "*?["):
            files.extend(sorted(glob.glob(item, recursive=True)))
        else:
            files.append(item)
    return list(dict.fromkeys(files))


def _check_block(block: np.ndarray, path: str):
    if not np.isfinite(block).all():
        raise InputError(f"{path}: contains NaN or infinite samples")


def enhance_file(path: str, out_path: str, model, df_state, atten_lim_db, compensate_delay: bool,
                 progress: bool) -> float:
    """Enhance one file into `out_path` (atomically); returns its duration in seconds."""
    from tqdm import tqdm

    from df_mlx.enhance import BLOCK_SECONDS
    from df_mlx.io import Resampler
    from df_mlx.streaming import StreamingEnhancer

    if not os.path.isfile(path):
        raise InputError(f"{path}: file not found")
    try:
        info = sf.info(path)
    except (RuntimeError, sf.LibsndfileError):
        raise InputError(f"{path}: not a readable audio file") from None
    if info.frames <= 0:
        raise InputError(f"{path}: empty audio file")
    sr, model_sr = info.samplerate, df_state.sr()
    if sr <= 0:
        raise InputError(f"{path}: invalid sample rate {sr}")
    to_model, from_model = Resampler(sr, model_sr), Resampler(model_sr, sr)
    stream = StreamingEnhancer(model, df_state, atten_lim_db, compile_hops=False)  # 10 s blocks
    skip = df_state.fft_size() - df_state.hop_size() if compensate_delay else 0
    block = max(1, int(BLOCK_SECONDS * sr))
    out_dir = os.path.dirname(os.path.abspath(out_path))
    fd, tmp = tempfile.mkstemp(prefix=".dfmlx-", suffix=os.path.splitext(out_path)[1] or ".wav", dir=out_dir)
    os.close(fd)
    written = 0
    try:
        with sf.SoundFile(tmp, "w", samplerate=sr, channels=info.channels, subtype="PCM_16",
                          format=info.format) as out:

            model_len = math.ceil(model_sr * info.frames / sr) if compensate_delay else None
            model_written = 0

            def write(samples: np.ndarray, final: bool = False):
                """Model-rate output -> delay removed, cut to the input's length at the model
                rate (as offline `enhance(pad=True)`), back to the file's rate."""
                nonlocal skip, written, model_written
                if skip:
                    cut = min(skip, samples.shape[1])
                    samples, skip = samples[:, cut:], skip - cut
                if model_len is not None:
                    samples = samples[:, : max(0, model_len - model_written)]
                model_written += samples.shape[1]
                samples = from_model.process(samples)
                if final:
                    samples = np.concatenate([samples, from_model.flush()], axis=1)
                samples = samples[:, : max(0, info.frames - written)] if compensate_delay else samples
                out.write(np.clip(samples.T, -1.0, 1.0 - 1.0 / (1 << 15)))
                written += samples.shape[1]

            bar = tqdm(total=info.frames, unit="sample", unit_scale=True, leave=False,
                       disable=not progress or info.frames < 6 * block, desc=os.path.basename(path))
            for chunk in sf.blocks(path, blocksize=block, dtype="float32", always_2d=True):
                chunk = chunk.T
                _check_block(chunk, path)
                write(stream.process(to_model.process(chunk)))
                bar.update(chunk.shape[1])
            bar.close()
            tail = to_model.flush()
            write(np.concatenate([stream.process(tail), stream.flush()], axis=1), final=True)
        if written == 0:
            raise InputError(f"{path}: too short to enhance (no samples after resampling)")
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return info.frames / sr


@click.command("enhance")
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output-dir", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Directory for the enhanced files.")
@click.option("-m", "--model", "model_dir", default=None,
              help="Converted model directory, upstream model directory, or a pretrained name "
                   "(default: the embedded DeepFilterNet3).")
@click.option("-a", "--atten-lim", type=float, default=None, help="Attenuation limit in dB.")
@click.option("--pf", is_flag=True, help="Post-filter: slightly more attenuation of very noisy parts.")
@click.option("--compensate-delay/--no-compensate-delay", default=True, show_default=True,
              help="Align the output with the input (remove the STFT delay).")
@click.option("--suffix/--no-suffix", default=True, show_default=True,
              help="Add the model name to output file names.")
@click.option("--log-level", default="WARNING", show_default=True)
def enhance_cmd(inputs, output_dir, model_dir, atten_lim, pf, compensate_delay, suffix, log_level):
    """Enhance noisy audio files (any sample rate, any number of channels)."""
    from tqdm import tqdm

    from df_mlx import distributed
    from df_mlx.enhance import init_df
    from df_mlx.io import output_path

    files = expand_inputs(inputs)
    if not files:
        raise click.ClickException("no input files found")
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise click.ClickException(f"cannot create output directory {output_dir}: {e.strerror}")
    if not os.access(output_dir, os.W_OK):
        raise click.ClickException(f"output directory is not writable: {output_dir}")
    try:
        model, df_state, model_suffix = init_df(model_dir, post_filter=pf, log_level=log_level, log_file=None)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        raise click.ClickException(str(e).splitlines()[0])
    files = distributed.share_files(  # under mlx.launch: this rank's files, one rank per output path
        files, key=lambda p: os.path.realpath(output_path(p, output_dir, model_suffix if suffix else None)))
    results: List[FileResult] = []
    for path in tqdm(files, unit="file", disable=len(files) < 2):
        out = output_path(path, output_dir, model_suffix if suffix else None)
        if os.path.abspath(out) == os.path.abspath(path):
            results.append(FileResult(path, None, 0.0, 0.0, f"{path}: output would overwrite the input"))
            continue
        t0 = time.perf_counter()
        try:
            seconds = enhance_file(path, out, model, df_state, atten_lim, compensate_delay, progress=True)
            results.append(FileResult(path, out, seconds, time.perf_counter() - t0))
        except (InputError, ValueError, OSError) as e:
            results.append(FileResult(path, None, 0.0, time.perf_counter() - t0, str(e).splitlines()[0]))
    _summary(results)
    if distributed.any_rank(any(r.error for r in results)):  # every rank ends with the same status
        raise SystemExit(1)


def _summary(results: List[FileResult]):
    done = [r for r in results if r.error is None]
    for r in results:
        if r.error:
            click.echo(f"Error: {r.error}", err=True)
        else:
            click.echo(f"{r.output}  ({r.seconds:.1f} s audio, RTF {r.elapsed / max(r.seconds, 1e-9):.3f})")
    audio = sum(r.seconds for r in done)
    elapsed = sum(r.elapsed for r in done)
    click.echo(f"enhanced {len(done)}/{len(results)} files, {audio:.1f} s of audio in {elapsed:.1f} s"
               + (f" (RTF {elapsed / audio:.3f})" if audio else ""))
