"""`dfmlx train DATASET_CFG DATA_DIR BASE_DIR`: df.train's command line on MLX.

BASE_DIR holds the model's config.ini (df's keys; a missing one is created with df's
defaults), and receives checkpoints/, summaries/ and train.log; a run resumes from the latest
checkpoint there unless --no-resume. DATA_DIR holds the HDF5 files (or audio folders) that
DATASET_CFG names, built with `python -m df_mlx.scripts.prepare_data`. With `[train]
gan_enabled = true` the DFNet4 fork's adversarial training runs (df_mlx.train_gan).
"""

import click


@click.command("train")
@click.argument("data_config_file", type=click.Path(dir_okay=False))
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.argument("base_dir", type=click.Path(file_okay=False))
@click.option("--resume/--no-resume", default=True, show_default=True, help="Continue from the latest checkpoint.")
@click.option("--log-level", default=None, help="trace, debug, info, warning or error (default info).")
@click.option("--debug/--no-debug", default=False, help="Debug logging and per-loss summaries.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars per epoch.")
def train_cmd(data_config_file, data_dir, base_dir, resume, log_level, debug, progress):
    """Train the model of BASE_DIR/config.ini on DATA_DIR's datasets (DATASET_CFG)."""
    from df_mlx.libdfdata import DatasetError
    from df_mlx.train import TrainSetupError
    from df_mlx.train_gan import main

    try:
        test_loss, epoch = main(data_config_file, data_dir, base_dir, resume=resume, log_level=log_level,
                                debug_=debug, progress=progress)
    except (TrainSetupError, DatasetError, FileNotFoundError, KeyError) as e:
        raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__)
    if test_loss is None:
        click.echo(f"stopped after epoch {epoch}; run again to continue")
    else:
        click.echo(f"test loss {test_loss:.6g} (best epoch {epoch})")
