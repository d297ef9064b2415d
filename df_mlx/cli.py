"""The `dfmlx` command line."""

import click

from df_mlx.version import version


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version or "unknown", prog_name="dfmlx")
def main():
    """DeepFilterNet in MLX: convert, enhance and check against the PyTorch reference."""


def _register():
    from parity.cli import parity

    main.add_command(parity)


_register()

if __name__ == "__main__":
    main()
