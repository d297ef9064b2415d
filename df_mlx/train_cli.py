"""`dfmlx train DATASET_CFG DATA_DIR BASE_DIR`: df.train's command line on MLX.

BASE_DIR holds the model's config.ini (df's keys; a missing one is created with df's
defaults), and receives checkpoints/, summaries/ and train.log; a run resumes from the latest
checkpoint there unless --no-resume. DATA_DIR holds the HDF5 files (or audio folders) that
DATASET_CFG names, built with `python -m df_mlx.scripts.prepare_data`. With `[train]
gan_enabled = true` the DFNet4 fork's adversarial training runs (df_mlx.train_gan).

Ctrl-C stops a run within about a second (df_mlx.interrupt), says where and how to resume,
and exits with 130. A run that fails before training removes the folders and train.log it
created.
"""

import os
import sys
from typing import List

import click


def _new_paths(base_dir: str) -> List[str]:
    """The paths `train` creates that do not exist yet (deepest first)."""
    paths = [os.path.join(base_dir, n) for n in ("train.log", "checkpoints", "summaries")] + [base_dir]
    return [p for p in paths if not os.path.lexists(p)]


def _remove_if_unused(paths: List[str]):
    """Remove what this run created, as long as it holds nothing but what a failed setup
    leaves (train.log, empty folders)."""
    checkpoints = [p for p in paths if os.path.basename(p) == "checkpoints"]
    if any(os.listdir(p) for p in checkpoints if os.path.isdir(p)):
        return  # training ran: its log and checkpoints stay
    for path in paths:
        if os.path.isfile(path):
            os.remove(path)
        elif os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)


def _interrupt_message(where: str, dataset_cfg: str, data_dir: str, base_dir: str) -> str:
    from df_mlx.train import resumable_epoch

    epoch = resumable_epoch(os.path.join(base_dir, "checkpoints"))
    command = f"dfmlx train {dataset_cfg} {data_dir} {base_dir}"
    if epoch is None:
        return f"Interrupted during {where}; no epoch was finished, `{command}` starts from scratch"
    return (f"Interrupted during {where}; the checkpoints of epoch {epoch} are complete, `{command}` resumes "
            "from there")


@click.command("train")
@click.argument("dataset_cfg", metavar="DATASET_CFG", type=click.Path(dir_okay=False))
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.argument("base_dir", type=click.Path(file_okay=False))
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue from the latest checkpoint. --no-resume refuses a BASE_DIR that holds checkpoints.")
@click.option("--start-over", is_flag=True,
              help="Train from scratch: BASE_DIR/checkpoints is first renamed checkpoints.<UTC time> (kept whole).")
@click.option("--log-level", default=None, help="trace, debug, info, warning or error (default info).")
@click.option("--debug/--no-debug", default=False, help="Debug logging and per-loss summaries.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars per epoch.")
def train_cmd(dataset_cfg, data_dir, base_dir, resume, start_over, log_level, debug, progress):
    """Train the model of BASE_DIR/config.ini on DATA_DIR's datasets (DATASET_CFG)."""
    from loguru import logger

    from df_mlx import interrupt
    from df_mlx.train import setup_errors
    from df_mlx.train_gan import main

    created = _new_paths(base_dir)
    message = lambda where: _interrupt_message(where, dataset_cfg, data_dir, base_dir)  # noqa: E731
    try:
        with interrupt.handle_sigint(message):
            test_loss, epoch = main(dataset_cfg, data_dir, base_dir, resume=resume, log_level=log_level,
                                    debug_=debug, progress=progress, start_over=start_over)
    except interrupt.Interrupted as e:
        logger.warning(message(e.where))
        sys.exit(interrupt.EXIT_CODE)
    except setup_errors() as e:
        _remove_if_unused(created)
        raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__)
    if test_loss is None:
        click.echo(f"stopped after epoch {epoch}; run again to continue")
    else:
        click.echo(f"test loss {test_loss:.6g} (best epoch {epoch})")
