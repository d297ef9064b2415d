"""`dfmlx convert` and `dfmlx export`."""

from pathlib import Path

import click

from converters.layout import LayoutError
from converters.torch_ckpt import CheckpointError


def _fail(e: Exception):
    """A failure as click's one-line `Error: ...`; an OSError names its file."""
    if isinstance(e, OSError) and e.filename is not None:
        raise click.ClickException(f"{e.filename}: {e.strerror or e}")
    raise click.ClickException((str(e).strip().splitlines() or [type(e).__name__])[0])


def _epoch(value: str):
    return int(value) if value.isdigit() else value


@click.command("convert")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output directory (default: <src>_mlx).")
@click.option("--epoch", default="best", show_default=True, help="best, latest or an epoch number.")
@click.option("--config", "config_path", type=click.Path(exists=True, path_type=Path),
              help="config.ini for a bare checkpoint (default: detect the family, default config).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
def convert_cmd(src, output, epoch, config_path, overwrite):
    """Convert an upstream DeepFilterNet model (directory, release zip, .ckpt, or the DFN3 ONNX
    release .tar.gz), or a DFNet4 fork model (deepfilternet4: DfNet4, DfNet4Lite), to df-mlx."""
    from converters.convert import convert
    from df_mlx.checkpoint import ModelDirError

    try:
        r = convert(src, output, _epoch(epoch), config_path, overwrite)
    except (CheckpointError, LayoutError, ModelDirError, OSError) as e:
        _fail(e)
    rows = [("family", r.family), ("source", r.source), ("tensors converted", str(r.tensors)),
            ("parameters", f"{r.parameters:,}"), ("output", str(r.out_dir))]
    if r.ignored:
        rows.append(("ignored (as upstream)", ", ".join(r.ignored)))
    if r.discriminator:
        rows.append(("discriminator", f"{r.discriminator} -> discriminator.safetensors"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k.ljust(width)}  {v}")


@click.command("export")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output .ckpt file.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--epoch", default="best", show_default=True,
              help="For a `dfmlx train` directory: best, latest or an epoch number.")
def export_cmd(model_dir, output, overwrite, epoch):
    """Write a df-mlx model's weights as a PyTorch checkpoint upstream `df` (or, for
    deepfilternet4, the DFNet4 fork) loads."""
    from converters.convert import export
    from df_mlx.checkpoint import ModelDirError

    try:
        paths = export(model_dir, output, overwrite, _epoch(epoch))
    except (CheckpointError, ModelDirError, OSError) as e:
        _fail(e)
    for path in paths:
        click.echo(f"wrote {path}")
