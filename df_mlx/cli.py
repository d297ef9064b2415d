"""The `dfmlx` command line."""

import sys

import click

from df_mlx.interrupt import EXIT_CODE as INTERRUPTED_EXIT_CODE  # 130, where click's Abort gives 1
from df_mlx.version import version


class _Group(click.Group):
    """Ctrl-C ends every subcommand with 130, as shells report it, once its outputs are cleaned up."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(INTERRUPTED_EXIT_CODE)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version or "unknown", prog_name="dfmlx")
def main():
    """DeepFilterNet in MLX: convert, enhance and check against the PyTorch reference."""
    from df_mlx.atomic import stop_on_signals

    click.get_current_context().with_resource(stop_on_signals())  # TERM/HUP clean up as INT does


def _register():
    from converters.cli import convert_cmd, export_cmd
    from df_mlx.demo import demo_cmd
    from df_mlx.enhance_cli import enhance_cmd
    from df_mlx.evaluation_cli import eval_cmd
    from df_mlx.train_cli import train_cmd
    from parity.cli import parity

    for command in (demo_cmd, enhance_cmd, eval_cmd, train_cmd, convert_cmd, export_cmd, parity):
        main.add_command(command)


_register()

if __name__ == "__main__":
    main()
