"""Converter round trips against the reference: torch model -> checkpoint on disk ->
`dfmlx convert` -> MLX model gives the torch outputs; `dfmlx export` -> torch
`load_state_dict(strict=True)` gives bit-identical torch outputs. The DFNet4 fork's checkpoints
round-trip from its recorded state_dicts (parity/fixtures/fork), and live through the fork's
own model when $DFMLX_FORK_DIR is set."""

import os
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map
import pytest
import torch
from click.testing import CliRunner

from df_mlx.cli import main
from parity.models import FAMILY_TOL, LAYER, VARIANTS, _ini, model_inputs
from parity.fork_checkpoint import run_in_fork
from parity.fork_recorder import CASES as FORK_CASES, live
from parity.fork_recorder import ENV_VAR, load_fixture, record_in_subprocess
from parity.pairs import randomize_norm_stats
from parity.reference import import_ref, load_configs
from parity.report import Report, Tolerance, compare
from parity.test_deepfilternet4 import DEFAULT_LAYER as DFN4_DEFAULT_LAYER
from parity.test_deepfilternet4 import LAYER as DFN4_LAYER

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


DFN4_CASES = [n for n, c in FORK_CASES.items() if c.module == "deepfilternet4" and c.group == "layers"]
DFN4_COMMITTED = [n for n in DFN4_CASES if FORK_CASES[n].committed]


def _fork_round_trip(fixture, tmp_path: Path, tol):
    """The fork's state_dict as the fork writes it (torch.save in a model directory with its
    config.ini) -> `dfmlx convert` -> outputs within `tol` of the fork's -> `dfmlx export` ->
    the same tensors, names and dtypes. Returns (source checkpoint, exported checkpoint)."""
    from df_mlx.checkpoint import load_model_dir

    src = tmp_path / "fork_model"
    (src / "checkpoints").mkdir(parents=True)
    (src / "config.ini").write_text(fixture.case["ini"])
    torch.save({k: torch.from_numpy(v.copy()) for k, v in fixture.state_dict.items()},
               src / "checkpoints" / "model_5.ckpt")
    runner = CliRunner()
    result = runner.invoke(main, ["convert", str(src), "-o", str(tmp_path / "mlx")])
    assert result.exit_code == 0, result.output
    model, meta = load_model_dir(tmp_path / "mlx", run_df=fixture.case["run_df"])
    assert meta["family"] == "deepfilternet4" and "DeepFilterNet4" in meta["reference_version"]
    report = Report(f"convert {fixture.case['name']}", fixture.describe())
    for i, (a, b) in enumerate(zip(model(*map(mx.array, fixture.inputs)), fixture.outputs)):
        report.add(compare(f"output.{i}", a, b, tol))
    print(report.table())
    assert report.passed, report.summary()

    back = tmp_path / "back.ckpt"
    result = runner.invoke(main, ["export", str(tmp_path / "mlx"), "-o", str(back)])
    assert result.exit_code == 0, result.output
    exported = torch.load(back, weights_only=True)
    assert set(exported) == set(fixture.state_dict)
    for k, v in fixture.state_dict.items():
        assert exported[k].numpy().dtype == v.dtype and exported[k].shape == v.shape, k
        np.testing.assert_array_equal(exported[k].numpy(), v, err_msg=k)
    return src / "checkpoints" / "model_5.ckpt", back


def _fork_loads(fixture, source: Path, exported: Path):
    """The fork's own model loads the exported checkpoint strictly and gives bit-identical
    outputs to the fork's checkpoint."""
    ours, theirs = run_in_fork(fixture.case["ini"], fixture.inputs, [exported, source], run_df=fixture.case["run_df"])
    assert len(ours) == len(fixture.outputs)
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", DFN4_COMMITTED)
def test_fork_checkpoint_round_trip(name, tmp_path):
    fixture = load_fixture(name)
    source, exported = _fork_round_trip(fixture, tmp_path, DFN4_LAYER)
    if os.environ.get(ENV_VAR):
        _fork_loads(fixture, source, exported)


@pytest.fixture(scope="module")
def fork_live_dir(tmp_path_factory):
    """The fork's default DfNet4 and DfNet4Lite (too large to commit), recorded now."""
    out = tmp_path_factory.mktemp("fork_convert")
    record_in_subprocess([n for n in DFN4_CASES if not FORK_CASES[n].committed], out)
    return out


@live
@pytest.mark.parametrize("name", [n for n in DFN4_CASES if not FORK_CASES[n].committed])
def test_fork_default_checkpoint_round_trip(name, tmp_path, fork_live_dir):
    fixture = load_fixture(name, fork_live_dir)
    _fork_loads(fixture, *_fork_round_trip(fixture, tmp_path, DFN4_DEFAULT_LAYER))


# Random full-width discriminators (1024-channel convs) reach outputs of ~1e6; float32 sums
# over their inputs agree to a few 1e-6 of that scale (measured 5.6e-6).
FULL_WIDTH_DISC = Tolerance(1e-5, 2e-5, "float32 sums of 1024-channel convolutions, relative to the output scale")
# With spectral norm, the eval-mode sigma of the random u, v is far below the largest singular
# value and every layer scales its output up (~1e10 at the end), so each layer's float32
# rounding is amplified by the next ones: measured 3.3e-6 to 4.1e-5 of the output scale over
# random inits (the weight-norm MSD stays at 2e-6).
FULL_WIDTH_SPECTRAL_DISC = Tolerance(1e-5, 1e-4, "float32 rounding amplified by unconverged spectral-norm layers")


@live
@pytest.mark.parametrize("disc_keys, tol", [("discriminator_type = msd\nmsd_scales = 2\n", FULL_WIDTH_DISC),
                                            ("discriminator_type = mpd\nmpd_periods = 3\ndiscriminator_spectral_norm = true\n",
                                             FULL_WIDTH_SPECTRAL_DISC)],
                         ids=["msd_weight_norm", "mpd_spectral_norm"])
def test_fork_discriminator_round_trip(disc_keys, tol, tmp_path):
    """The fork's own discriminator (its train.setup_discriminator, full width) loads the
    discriminator `dfmlx convert` + `dfmlx export` round-tripped, strictly, and scores a
    waveform exactly as from its original checkpoint and within float32 rounding of df_mlx's."""
    from converters.discriminator import load_discriminator
    from converters.layout import mlx_state_dict
    from converters.torch_ckpt import write_state_dict
    from df_mlx.config import config
    from df_mlx.train_gan import build_discriminator
    from parity.fork_recorder import _as_tuple

    ini = f"[train]\nmodel = deepfilternet3\ngan_enabled = true\n{disc_keys}"
    (tmp_path / "config.ini").write_text(ini)
    config.load(str(tmp_path / "config.ini"), allow_reload=True)
    mx.random.seed(0)
    disc = build_discriminator()
    disc.update(tree_map(lambda w: w * 1.1, disc.trainable_parameters()))  # weight_g off |v|
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.ini").write_text(ini)
    write_state_dict(mlx_state_dict(import_ref_free_model()), run / "checkpoints" / "model_2.ckpt")
    source = run / "checkpoints" / "disc_2.ckpt"
    write_state_dict(mlx_state_dict(disc), source)
    assert CliRunner().invoke(main, ["convert", str(run), "-o", str(tmp_path / "out")]).exit_code == 0
    result = CliRunner().invoke(main, ["export", str(tmp_path / "out"), "-o", str(tmp_path / "back.ckpt")])
    assert result.exit_code == 0, result.output
    wave = np.random.default_rng(0).standard_normal((1, 1, 1200)).astype(np.float32) * 0.1
    ours_exported, theirs = run_in_fork(ini, [wave], [tmp_path / "back_disc.ckpt", source], discriminator=True)
    assert len(ours_exported) == len(theirs) > 0
    for a, b in zip(ours_exported, theirs):
        np.testing.assert_array_equal(a, b)
    converted = load_discriminator(tmp_path / "out")
    converted.eval()
    report = Report("discriminator convert/export round trip vs the fork", "DFNet4 fork")
    for i, (a, b) in enumerate(zip(_as_tuple(converted(mx.array(wave))), theirs)):
        report.add(compare(f"output.{i}", a, b, FULL_WIDTH_DISC))
    print(report.table())
    assert report.passed, report.summary()


def import_ref_free_model():
    """df_mlx's model for the global config (random weights): the run's generator checkpoint."""
    from df_mlx.model import init_model

    return init_model()
