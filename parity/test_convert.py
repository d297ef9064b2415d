"""Converter round trips against the reference: torch model -> checkpoint on disk ->
`dfmlx convert` -> MLX model gives the torch outputs; `dfmlx export` -> torch
`load_state_dict(strict=True)` gives bit-identical torch outputs."""

import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from df_mlx.cli import main
from parity.models import FAMILY_TOL, LAYER, VARIANTS, _ini, model_inputs
from parity.pairs import randomize_norm_stats
from parity.reference import import_ref, load_configs
from parity.report import Report, compare

CASES = [("deepfilternet3", v) for v in VARIANTS["deepfilternet3"][:2]] + [
    ("deepfilternet2", VARIANTS["deepfilternet2"][1]), ("deepfilternet", VARIANTS["deepfilternet"][1]),
    ("deepfilternetmf", VARIANTS["deepfilternetmf"][1])]


def _torch_model(family, variant, tmp: Path):
    import libdf

    load_configs(_ini(family, variant.ini), tmp)
    p = import_ref(family).ModelParams()
    torch.manual_seed(0)
    state = libdf.DF(sr=p.sr, fft_size=p.fft_size, hop_size=p.hop_size, nb_bands=p.nb_erb)
    return randomize_norm_stats(import_ref(family).init_model(state)).eval(), p


def _upstream_model_dir(root: Path, model, tmp: Path) -> Path:
    """An upstream-style model directory written by upstream's own config and torch.save."""
    (root / "checkpoints").mkdir(parents=True)
    import_ref("config").config.save(str(root / "config.ini"))
    torch.save(model.state_dict(), root / "checkpoints" / "model_3.ckpt")
    return root


@pytest.mark.parametrize("family, variant", CASES, ids=[f"{f}-{v.name}" for f, v in CASES])
def test_convert_then_export_round_trip(family, variant, tmp_path):
    from df_mlx.checkpoint import load_model_dir

    ref_model, p = _torch_model(family, variant, tmp_path)
    inputs = model_inputs(p, 2, 50)
    with torch.no_grad():  # copies: df's MF model filters its input in place
        ref_out = ref_model(*(torch.from_numpy(x.copy()) for x in inputs))
    src = _upstream_model_dir(tmp_path / "upstream", ref_model, tmp_path)

    runner = CliRunner()
    result = runner.invoke(main, ["convert", str(src), "-o", str(tmp_path / "mlx")])
    assert result.exit_code == 0, result.output
    mlx_model, meta = load_model_dir(tmp_path / "mlx")
    assert meta["family"] == family and meta["source"].endswith("model_3.ckpt")
    mlx_out = mlx_model(*map(mx.array, inputs))
    report = Report(f"convert {variant.name}", "torch")
    for i, (a, b) in enumerate(zip(mlx_out, ref_out)):
        report.add(compare(f"output.{i}", a, b, FAMILY_TOL.get(family, LAYER)))
    print(report.table())
    assert report.passed, report.summary()

    result = runner.invoke(main, ["export", str(tmp_path / "mlx"), "-o", str(tmp_path / "back.ckpt")])
    assert result.exit_code == 0, result.output
    with tempfile.TemporaryDirectory() as tmp:
        fresh, _ = _torch_model(family, variant, Path(tmp))
    fresh.load_state_dict(torch.load(tmp_path / "back.ckpt", weights_only=True), strict=True)
    with torch.no_grad():
        back_out = fresh.eval()(*(torch.from_numpy(x.copy()) for x in inputs))
    for a, b in zip(back_out, ref_out):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
