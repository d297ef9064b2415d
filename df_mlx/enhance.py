"""Speech enhancement with a DeepFilterNet model, as `df.enhance`.

`init_df` (from df_mlx.loading) loads a converted model directory (or converts an upstream
model directory on the fly, torch-free; with no argument, the embedded pretrained
DeepFilterNet3), and `enhance` runs the whole offline pipeline: STFT, features, model,
attenuation limit, ISTFT. `main`/`run` are df's command line, on `dfmlx enhance`'s machinery.
"""

import argparse
import os
from typing import List, Optional, Tuple, Union

import mlx.core as mx
import numpy as np
from loguru import logger

from df_mlx.checkpoint import load_model as load_model_cp  # noqa: F401  (df's name for it)
from df_mlx.config import config  # noqa: F401  (df.enhance's name)
from df_mlx.interop import kind_of, like, to_numpy
from df_mlx.io import load_audio, resample, save_audio  # noqa: F401  (df.enhance re-exports them)
from df_mlx.libdf import DF, erb, erb_norm, unit_norm  # noqa: F401
from df_mlx.loading import (DEFAULT_MODEL, PRETRAINED_MODELS, ModelNotFound, get_model_basedir,  # noqa: F401
                            init_df, maybe_download_model)
from df_mlx.logger import init_logger  # noqa: F401  (df.enhance's name)
from df_mlx.model import ModelParams  # noqa: F401  (df.enhance's name)
from df_mlx.offline import df_features, enhance_offline  # noqa: F401  (df_features: df's name)
from df_mlx.utils import as_complex, as_real, download_file, get_cache_dir, get_device, get_norm_alpha  # noqa: F401
from df_mlx.version import version


def parse_epoch_type(value: str) -> Union[int, str]:
    """df's `--epoch` values: an integer, `best` or `latest`."""
    try:
        return int(value)
    except ValueError:
        if value not in ("best", "latest"):
            raise argparse.ArgumentTypeError(f"epoch must be best, latest or an integer, got {value!r}") from None
        return value


def enhance(model, df_state: DF, audio, pad=True, atten_lim_db: Optional[float] = None):
    """Enhance audio [C, T] at the model's rate. With `pad` the output is aligned with the
    input and has its length (the STFT delay fft_size - hop_size is compensated); an
    attenuation limit (dB) mixes the noisy spectrum back in. Inputs longer than BLOCK_SECONDS
    run in blocks (df_mlx.offline) when the model streams. The result is of the input's kind:
    torch tensor, MLX array or numpy array (df_mlx.interop)."""
    kind = kind_of(audio)
    return like(np.asarray(enhance_offline(model, df_state, to_numpy(audio).astype(np.float32), pad, atten_lim_db)), kind)


class AudioDataset:
    """df's dataset of audio files for its command line: item i is (path, audio [C, T] at
    `sr`, the file's own rate). A missing file is warned about up front and fails when read."""

    def __init__(self, files: List[str], sr: int) -> None:
        for file in files:
            if not os.path.isfile(file):
                logger.warning(f"File not found: {file}")
        self.files = list(files)
        self.sr = sr

    def __getitem__(self, index) -> Tuple[str, mx.array, int]:
        fn = self.files[index]
        audio, meta = load_audio(fn, self.sr)
        return fn, audio, meta.sample_rate

    def __len__(self):
        return len(self.files)


class PrintVersion(argparse.Action):
    """df's `-v/--version`: print the version and exit."""

    def __init__(self, option_strings, dest):
        super().__init__(option_strings=option_strings, dest=dest, nargs=0, required=False,
                         help="Print DeepFilterNet (df-mlx) version information")

    def __call__(self, *args):
        print("DeepFilterNet (df-mlx)", version)
        raise SystemExit(0)


def setup_df_argument_parser(default_log_level: str = "INFO", parser=None) -> argparse.ArgumentParser:
    """df's common options (model, post-filter, output folder, log level, epoch, version)."""
    if parser is None:
        parser = argparse.ArgumentParser()
    parser.add_argument("--model-base-dir", "-m", type=str, default=None,
                        help="Model directory (converted or upstream), or a pretrained name, e.g. DeepFilterNet3 "
                             "(the default, embedded).")
    parser.add_argument("--pf", action="store_true", help="Post-filter that slightly over-attenuates very noisy sections.")
    parser.add_argument("--output-dir", "-o", type=str, default=None,
                        help="Directory in which the enhanced audio files will be stored.")
    parser.add_argument("--log-level", type=str, default=default_log_level,
                        help="Logger verbosity. Can be one of (debug, info, error, none)")
    parser.add_argument("--debug", "-d", action="store_const", const="DEBUG", dest="log_level")
    parser.add_argument("--epoch", "-e", default="best", type=parse_epoch_type,
                        help="Epoch for checkpoint loading. Can be one of ['best', 'latest', <int>].")
    parser.add_argument("-v", "--version", action=PrintVersion)
    return parser


def main(args):
    """df's `main(args)` (the arguments of `run`'s parser), done by `dfmlx enhance`'s per-file
    machinery: each file enhanced at the model rate, resampled back, written as 16-bit
    `<name>_<model>.<ext>` in the output folder; a failing file is reported and the batch
    goes on, ending with exit status 1."""
    import click

    from df_mlx.enhance_cli import enhance_cmd

    argv = list(getattr(args, "noisy_audio_files", []) or [])
    if getattr(args, "noisy_dir", None) is not None:
        argv += ["--noisy-dir", args.noisy_dir]
    argv += ["-o", args.output_dir or ".", "--log-level", str(args.log_level), "--epoch", str(args.epoch)]
    if args.model_base_dir is not None:
        argv += ["-m", args.model_base_dir]
    if getattr(args, "atten_lim", None) is not None:
        argv += ["-a", str(args.atten_lim)]
    if getattr(args, "device", None) is not None:
        argv += ["--device", args.device]
    for flag, on in (("--pf", args.pf), ("--no-delay-compensation", not getattr(args, "compensate_delay", True)),
                     ("--no-suffix", not getattr(args, "suffix", True)),
                     ("--no-df-stage", getattr(args, "no_df_stage", False))):
        if on:
            argv.append(flag)
    try:
        enhance_cmd.main(argv, prog_name="deepFilter-mlx", standalone_mode=False)
    except click.ClickException as e:
        e.show()
        raise SystemExit(e.exit_code) from None


def run():
    """df's `deepFilter` command line, flag for flag (plus the fork's --device): the
    `deepFilter-mlx` script and `python -m df_mlx.enhance`."""
    parser = setup_df_argument_parser()
    parser.add_argument("--no-delay-compensation", dest="compensate_delay", action="store_false",
                        help="Don't compensate the delay of the real-time STFT/ISTFT.")
    parser.add_argument("--atten-lim", "-a", type=int, default=None,
                        help="Attenuation limit in dB by mixing the enhanced signal with the noisy signal.")
    parser.add_argument("noisy_audio_files", type=str, nargs="*", help="Noisy audio files to enhance.")
    parser.add_argument("--noisy-dir", "-i", type=str, default=None,
                        help="Input directory containing noisy audio files. Use instead of `noisy_audio_files`.")
    parser.add_argument("--no-suffix", action="store_false", dest="suffix",
                        help="Don't add the model suffix to the enhanced audio files")
    parser.add_argument("--no-df-stage", action="store_true", help="Run without the deep-filtering stage.")
    parser.add_argument("--device", type=str, default=None,
                        help="cpu or gpu (cuda, mps: MLX's GPU); the DFNet4 fork's flag.")
    main(parser.parse_args())


if __name__ == "__main__":
    run()
