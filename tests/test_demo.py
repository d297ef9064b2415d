"""The README's main command: the embedded pretrained model enhances the bundled sample."""

import re

import pytest
from click.testing import CliRunner

from df_mlx.cli import main

pytest.importorskip("pesq")


def test_demo_improves_pesq(tmp_path):
    result = CliRunner().invoke(main, ["demo", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    pesq = re.search(r"PESQ\s+([\d.]+)\s+([\d.]+)", result.output)
    assert pesq and float(pesq.group(2)) > float(pesq.group(1)) + 0.2, result.output
    assert (tmp_path / "noisy_sample_DeepFilterNet3.wav").is_file()


def test_init_df_default_is_the_embedded_dfn3():
    from df_mlx.checkpoint import read_metadata
    from df_mlx.enhance import get_model_basedir, init_df

    model, df_state, suffix = init_df(log_file=None, log_level="ERROR")
    assert suffix == "DeepFilterNet3" and df_state.sr() == 48000
    meta = read_metadata(get_model_basedir(None))
    assert meta["family"] == "deepfilternet3" and "DeepFilterNet3_onnx.tar.gz" in meta["source"]
