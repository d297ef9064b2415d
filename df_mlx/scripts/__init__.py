"""Command-line scripts of `df.scripts` ported to df-mlx."""
