"""`dfmlx eval`: score enhanced audio against clean references with df's evaluation loops.

Two modes, both through `df_mlx.evaluation_utils` (at parity with `df.evaluation_utils`):
- `dfmlx eval CLEAN_DIR ENHANCED_DIR [--noisy-dir DIR]`: files already enhanced (by any
  system) are scored at 16 kHz as df's `evaluation_loop_dir_only` does;
- `dfmlx eval CLEAN_DIR --noisy-dir DIR [--model M]`: the noisy files are enhanced by an MLX
  model (default: the embedded DeepFilterNet3) and scored at the model rate, as df's
  `evaluation_loop` does (noisy scores included).

The noisy scores of the two modes differ, as df's do: the first loads clean and noisy files at
16 kHz; the second scores at the model's rate (DFN3: 48 kHz), with the clean and the noisy
signals passed through the model's STFT and back (as the enhanced one is), and each metric
resamples them to its own rate.

Files pair up by name: an enhanced or noisy file matches a clean file with the same name, or
`<clean stem>_<anything>` with the same extension (what `dfmlx enhance` writes with its model
suffix), when that match is unique.

Under mlx.launch each rank scores its share of the files (df_mlx.distributed.share_files);
rank 0 writes the CSVs with every rank's rows in the files' order, and the means are those
of all files, as one process writes and computes them.
"""

import csv
import io
import os
import tempfile
from typing import Callable, Dict, List, Optional, Sequence

import click
import numpy as np

from df_mlx.atomic import file_identity
from df_mlx.enhance_cli import expand_inputs

# Metrics that compare against a clean reference (the non-intrusive DNSMOS ones have their own loop).
INTRUSIVE_METRICS = ("stoi", "sisdr", "composite", "composite-octave", "pesq", "pesq-nb")


def match_files(clean_files: List[str], directory: str, what: str) -> List[str]:
    """For each clean file the file of `directory` with its name (or `<stem>_*<ext>`)."""
    candidates = expand_inputs([directory])
    by_name = {os.path.basename(p): p for p in candidates}
    matched, missing = [], []
    for clean in clean_files:
        name = os.path.basename(clean)
        stem, ext = os.path.splitext(name)
        if name in by_name:
            matched.append(by_name[name])
            continue
        suffixed = [p for n, p in by_name.items() if n.startswith(stem + "_") and n.endswith(ext)]
        if len(suffixed) == 1:
            matched.append(suffixed[0])
        else:
            missing.append(name + (" (ambiguous)" if suffixed else ""))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise click.ClickException(f"no {what} file in {directory} for {', '.join(missing[:3])}{more}")
    return matched


def _metric_list(metrics: str) -> List[str]:
    names = [m.strip().lower() for m in metrics.split(",") if m.strip()]
    unknown = [m for m in names if m not in INTRUSIVE_METRICS]
    if not names or unknown:
        raise click.ClickException(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; "
                                   f"choose from {', '.join(INTRUSIVE_METRICS)}")
    return names


def format_means(means: Dict[str, float]) -> str:
    """The metric means as an aligned two-column table."""
    width = max(len(k) for k in means)
    return "\n".join(f"{k:<{width}}  {float(v):8.4f}" for k, v in means.items())


@click.command("eval")
@click.argument("clean_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("enhanced_dir", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("-n", "--noisy-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Noisy files: scored too; enhanced by --model when ENHANCED_DIR is not given.")
@click.option("-m", "--model", "model_dir", default=None,
              help="Model that enhances the noisy files when ENHANCED_DIR is not given "
                   "(default: the embedded DeepFilterNet3).")
@click.option("--metrics", default="stoi,sisdr,composite", show_default=True,
              help=f"Comma-separated, from: {', '.join(INTRUSIVE_METRICS)}.")
@click.option("--csv-enh", type=click.Path(dir_okay=False), default=None, help="Per-file scores of the enhanced files.")
@click.option("--csv-noisy", type=click.Path(dir_okay=False), default=None, help="Per-file scores of the noisy files.")
@click.option("-j", "--workers", type=int, default=0, show_default=True,
              help="Metric worker processes (0: compute in this process).")
@click.option("--log-level", default="ERROR", show_default=True)
def eval_cmd(clean_dir, enhanced_dir, noisy_dir, model_dir, metrics, csv_enh, csv_noisy, workers, log_level):
    """Score enhanced audio against clean references (STOI, SI-SDR, PESQ, composite).

    \b
    CLEAN_DIR ENHANCED_DIR [-n NOISY_DIR]: files enhanced by anything, scored at 16 kHz.
    CLEAN_DIR -n NOISY_DIR [-m MODEL]: the model enhances NOISY_DIR, scored at its rate
    (DFN3: 48 kHz) against the clean audio after its STFT round trip, as df's
    evaluation_loop does; so the noisy scores differ from those of the first mode."""
    from df_mlx import evaluation_utils as eu
    from df_mlx.logger import init_logger

    names = _metric_list(metrics)
    clean_files = expand_inputs([clean_dir])
    if not clean_files:
        raise click.ClickException(f"no audio files in {clean_dir}")
    if enhanced_dir is None and noisy_dir is None:
        raise click.ClickException("give ENHANCED_DIR, or --noisy-dir to enhance with --model")
    if enhanced_dir is not None and model_dir is not None:
        raise click.ClickException("--model enhances the noisy files: leave out ENHANCED_DIR to use it")
    noisy_files = match_files(clean_files, noisy_dir, "noisy") if noisy_dir else []
    check_csv_targets(csv_enh, csv_noisy)
    kw = dict(metrics=names, n_workers=workers, log_percent=-1, progress_bar=True)
    csvs = (csv_enh, csv_noisy)
    try:
        if enhanced_dir is not None:
            init_logger(level=log_level)
            enh_files = match_files(clean_files, enhanced_dir, "enhanced")

            def loop(clean, enh, noisy, **paths):
                return eu.evaluation_loop_dir_only(clean, enh, noisy, **kw, **paths)

            means = run_sharded(loop, clean_files, [enh_files, noisy_files], clean_files, csvs, bool(noisy_files))
        else:
            from df_mlx.enhance import init_df

            model, df_state, _ = init_df(model_dir, log_level=log_level, log_file=None)

            def loop(clean, noisy, **paths):
                return eu.evaluation_loop(df_state, model, clean, noisy, noisy_metric=True, **kw, **paths)

            means = run_sharded(loop, clean_files, [noisy_files], noisy_files, csvs, True)
    except (ValueError, RuntimeError, OSError) as e:
        raise click.ClickException(_one_line(e))
    click.echo(format_means(means))


CSV_HEADER = "filename,"  # the first line of every scores CSV that write_csv writes


def check_csv_targets(*paths: Optional[str]):
    """Refuse, before any scoring, a CSV path that would replace a file df-mlx did not write
    (anything but an earlier scores CSV) or that two options share."""
    given = [p for p in paths if p is not None]
    seen = {}
    for path in given:
        ident = file_identity(path)
        if ident in seen:
            raise click.ClickException(f"{path}: given for both --csv-enh and --csv-noisy")
        seen[ident] = path
        if not os.path.lexists(path):
            continue
        if not os.path.isfile(path):
            raise click.ClickException(f"{path}: exists and is not a regular file; refusing to replace it")
        try:
            with open(path, encoding="utf-8") as f:
                first = f.readline()
        except (OSError, UnicodeDecodeError):
            first = ""
        if not first.startswith(CSV_HEADER):
            raise click.ClickException(f"{path}: exists and is not a scores CSV written by dfmlx eval; "
                                       "refusing to replace it")


def run_sharded(loop: Callable[..., Dict[str, float]], clean_files: List[str], lists: Sequence[List[str]],
                row_files: List[str], csv_paths: Sequence[str], with_noisy: bool) -> Dict[str, float]:
    """`loop(clean, *lists, csv_path_enh=, csv_path_noisy=)` (an evaluation loop) over this
    rank's share of the files; with several ranks every rank's per-file rows (named by the
    basenames of `row_files`) are gathered, rank 0 writes the CSVs and all return the means."""
    from df_mlx import distributed
    from df_mlx.evaluation_utils import write_csv

    csv_enh, csv_noisy = csv_paths
    if distributed.size() == 1:
        return loop(clean_files, *lists, csv_path_enh=csv_enh, csv_path_noisy=csv_noisy)
    mine = set(distributed.share_files(clean_files))
    idx = [i for i, f in enumerate(clean_files) if f in mine]
    texts = {"enh": b"", "noisy": b""}
    with tempfile.TemporaryDirectory(prefix="dfmlx-eval-") as tmp:
        parts = {k: os.path.join(tmp, f"{k}.csv") for k in texts}
        if idx:
            loop([clean_files[i] for i in idx], *([x[i] for i in idx] if x else x for x in lists),
                 csv_path_enh=parts["enh"], csv_path_noisy=parts["noisy"] if with_noisy else None)
        for k, path in parts.items():
            if os.path.exists(path):
                with open(path, "rb") as f:
                    texts[k] = f.read()
    order = {os.path.basename(p): i for i, p in enumerate(row_files)}
    tables = {}
    for k, text in texts.items():
        header, rows = [], []
        for part in distributed.gather_bytes(text):
            lines = list(csv.reader(io.StringIO(part.decode())))
            header, rows = (lines[0], rows + lines[1:]) if lines else (header, rows)
        tables[k] = (header, sorted(rows, key=lambda r: order[r[0]]))
    means: Dict[str, float] = {}
    for j, name in enumerate(tables["enh"][0][1:], start=1):
        if with_noisy:
            means[f"Noisy    {name}"] = np.mean([float(r[j]) for r in tables["noisy"][1]])
        means[f"Enhanced {name}"] = np.mean([float(r[j]) for r in tables["enh"][1]])
    for path, (header, rows) in zip(csv_paths, (tables["enh"], tables["noisy"])):
        if path is not None and rows:
            distributed.on_writer(write_csv, path, {r[0]: dict(zip(header[1:], r[1:])) for r in rows})
    return means


def _one_line(e: Exception) -> str:
    """The first line of an error's message (pesq's errors carry bytes, e.g. b'No utterances detected')."""
    msg = e.args[0] if len(e.args) == 1 else str(e)
    if isinstance(msg, bytes):
        msg = f"metric failed: {msg.decode(errors='replace')}"
    msg = str(msg).strip()
    return msg.splitlines()[0] if msg else type(e).__name__

