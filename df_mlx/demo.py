"""`dfmlx demo`: enhance the bundled noisy sample and score it against its clean speech."""

import importlib.util
import os
from pathlib import Path

import click
import numpy as np
import soundfile as sf

DATA = Path(__file__).resolve().parent / "data"
NOISY, CLEAN = DATA / "noisy_sample.wav", DATA / "clean_sample.wav"


def scores(clean: np.ndarray, degraded: np.ndarray, sr: int) -> dict:
    """Wide-band PESQ (at 16 kHz, as df's evaluation does) and STOI of mono signals."""
    from pesq import pesq
    from pystoi import stoi

    from df_mlx.io import resample

    c16, d16 = resample(clean, sr, 16000), resample(degraded, sr, 16000)
    return {"PESQ": pesq(16000, c16, d16, "wb"), "STOI": stoi(clean, degraded, sr, extended=False)}


@click.command("demo")
@click.option("-o", "--output-dir", type=click.Path(file_okay=False), default="dfmlx_demo", show_default=True)
@click.option("-m", "--model", "model_dir", default=None, help="Model (default: the embedded DeepFilterNet3).")
def demo_cmd(output_dir, model_dir):
    """Enhance a bundled noisy recording; print PESQ and STOI before and after."""
    from df_mlx.enhance import init_df
    from df_mlx.enhance_cli import enhance_file
    from df_mlx.io import output_path

    if any(importlib.util.find_spec(m) is None for m in ("pesq", "pystoi")):
        raise click.ClickException("the demo's scores need pesq and pystoi: pip install 'df-mlx[eval]'")
    os.makedirs(output_dir, exist_ok=True)
    model, df_state, suffix = init_df(model_dir, log_level="WARNING", log_file=None)
    out = output_path(str(NOISY), output_dir, suffix)
    seconds = enhance_file(str(NOISY), out, model, df_state, None, True, progress=False)
    clean, sr = sf.read(CLEAN, dtype="float32")
    noisy, _ = sf.read(NOISY, dtype="float32")
    enhanced, _ = sf.read(out, dtype="float32")
    before, after = scores(clean, noisy, sr), scores(clean, enhanced, sr)
    click.echo(f"enhanced {NOISY.name} ({seconds:.1f} s, 5 dB SNR) with {suffix} -> {out}")
    click.echo(f"{'':6}{'noisy':>8}{'enhanced':>10}")
    for k in before:
        click.echo(f"{k:6}{before[k]:8.3f}{after[k]:10.3f}")
