"""`dfmlx convert` / `dfmlx export` on good and bad inputs (no reference needed; torch is)."""

import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")

from converters.layout import mlx_state_dict  # noqa: E402
from converters.torch_ckpt import write_state_dict  # noqa: E402
from df_mlx.cli import main  # noqa: E402
from df_mlx.config import config  # noqa: E402


@pytest.fixture(autouse=True)
def default_config():
    config.use_defaults(allow_reload=True)
    yield
    config.use_defaults(allow_reload=True)


@pytest.fixture(scope="module")
def dfn3_state():
    """A DFN3 state dict at the default config, in torch layout."""
    from df_mlx.config import config as cfg
    from df_mlx.deepfilternet3 import init_model

    cfg.use_defaults(allow_reload=True)
    return mlx_state_dict(init_model())


def _model_dir(root: Path, state, config_text="[train]\nmodel = deepfilternet3\n") -> Path:
    (root / "checkpoints").mkdir(parents=True)
    (root / "config.ini").write_text(config_text)
    write_state_dict(state, root / "checkpoints" / "model_7.ckpt")
    return root


def _convert(*args):
    return CliRunner().invoke(main, ["convert", *map(str, args)])


def test_convert_model_dir_and_load(tmp_path, dfn3_state):
    from df_mlx.checkpoint import load_model_dir

    src = _model_dir(tmp_path / "DFN3", dfn3_state)
    result = _convert(src, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "deepfilternet3" in result.output and "model_7.ckpt" in result.output
    model, meta = load_model_dir(tmp_path / "out")
    assert meta["family"] == "deepfilternet3" and len(meta["source_sha256"]) == 64
    back = mlx_state_dict(model)
    assert set(back) == set(dfn3_state)
    for k, v in dfn3_state.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_bare_checkpoint_detects_family(tmp_path, dfn3_state):
    write_state_dict(dfn3_state, tmp_path / "weights.pt")
    result = _convert(tmp_path / "weights.pt", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_export_round_trip(tmp_path, dfn3_state):
    src = _model_dir(tmp_path / "DFN3", dfn3_state)
    assert _convert(src, "-o", tmp_path / "out").exit_code == 0
    result = CliRunner().invoke(main, ["export", str(tmp_path / "out"), "-o", str(tmp_path / "back.ckpt")])
    assert result.exit_code == 0, result.output
    back = torch.load(tmp_path / "back.ckpt", weights_only=True)
    assert set(back) == set(dfn3_state)
    for k, v in dfn3_state.items():
        np.testing.assert_array_equal(back[k].numpy(), v, err_msg=k)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/dfmlx_pwned",))


def _bad_cases(tmp_path: Path, state):
    """(name, path to convert, expected message part)."""
    good = tmp_path / "good.pt"
    write_state_dict(state, good)
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save({"x": _Evil()}, tmp_path / "evil.pt")
    write_state_dict({"foo.weight": np.zeros((3, 3), np.float32)}, tmp_path / "other_family.pt")
    missing = dict(state)
    missing.pop("enc.lsnr_fc.0.bias")
    write_state_dict(missing, tmp_path / "missing.pt")
    extra = dict(state, **{"enc.extra.weight": np.zeros(2, np.float32)})
    write_state_dict(extra, tmp_path / "extra.pt")
    shaped = dict(state, **{"enc.lsnr_fc.0.weight": np.zeros((1, 7), np.float32)})
    write_state_dict(shaped, tmp_path / "shaped.pt")
    mismatch = _model_dir(tmp_path / "mismatch", state, "[train]\nmodel = deepfilternet3\n[deepfilternet]\nconv_ch = 8\n")
    unsupported = _model_dir(tmp_path / "dfn5", state, "[train]\nmodel = deepfilternet5\n")
    return [
        ("missing_file", tmp_path / "absent.pt", "not found"),
        ("truncated", tmp_path / "truncated.pt", "not a readable PyTorch checkpoint"),
        ("random_bytes", tmp_path / "random.pt", "not a readable PyTorch checkpoint"),
        ("code_pickle", tmp_path / "evil.pt", "refusing to load"),
        ("other_family", tmp_path / "other_family.pt", "fit no family"),
        ("missing_key", tmp_path / "missing.pt", "missing enc.lsnr_fc.0.bias"),
        ("extra_key", tmp_path / "extra.pt", "unexpected enc.extra.weight"),
        ("mis_shaped", tmp_path / "shaped.pt", "enc.lsnr_fc.0.weight: shape (1, 7)"),
        ("config_mismatch", mismatch, "does not fit the model"),
        ("unsupported_family", unsupported, "not supported"),
    ]


def test_bad_checkpoints_fail_cleanly(tmp_path, dfn3_state):
    for name, path, message in _bad_cases(tmp_path, dfn3_state):
        out = tmp_path / f"out_{name}"
        result = _convert(path, "-o", out)
        assert result.exit_code == 1, (name, result.output)
        error = result.output.strip().splitlines()[-1]
        assert error.startswith("Error: ") and message in error, (name, result.output)
        assert not out.exists(), name
        assert not list(tmp_path.glob(".dfmlx-*")), name
    assert not Path("/tmp/dfmlx_pwned").exists()


# A small DfNet4 of the fork (Mamba backbone, phase branch, three DF resolutions).
DFN4_INI = """[train]
model = deepfilternet4

[df]
sr = 16000
fft_size = 64
hop_size = 32
nb_erb = 8
nb_df = 18

[deepfilternet4]
conv_ch = 8
emb_hidden_dim = 16
df_hidden_dim = 16
enc_linear_groups = 4
df_order = 3
df_resolutions = 18,3;9,2;5,1
mamba_d_state = 4
"""


def _state_at(ini: str, tmp_path: Path):
    """df_mlx's model for `ini` (random weights) as a torch-layout state dict."""
    from df_mlx.model import init_model

    (tmp_path / "model.ini").write_text(ini)
    config.load(str(tmp_path / "model.ini"), allow_reload=True)
    model = init_model()
    config.use_defaults(allow_reload=True)
    return model, mlx_state_dict(model)


def test_dfnet4_model_dir_round_trip(tmp_path):
    """A fork-style DfNet4 directory converts (names as the fork's state_dict), and exports
    back to the same tensors, dtypes included (int64 BatchNorm counters, the ERB filterbank)."""
    from df_mlx.checkpoint import load_model_dir

    _, state = _state_at(DFN4_INI, tmp_path)
    assert "erb_fb" in state and "df_op.resolution_weights" in state
    src = _model_dir(tmp_path / "DFN4", state, DFN4_INI)
    result = _convert(src, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "deepfilternet4" in result.output
    model, meta = load_model_dir(tmp_path / "out")
    assert meta["family"] == "deepfilternet4" and "DeepFilterNet4" in meta["reference_version"]
    result = CliRunner().invoke(main, ["export", str(tmp_path / "out"), "-o", str(tmp_path / "back.ckpt")])
    assert result.exit_code == 0, result.output
    back = torch.load(tmp_path / "back.ckpt", weights_only=True)
    assert set(back) == set(state)
    for k, v in state.items():
        assert back[k].numpy().dtype == v.dtype, k
        np.testing.assert_array_equal(back[k].numpy(), v, err_msg=k)


def test_dfnet4_lite_bare_checkpoint_is_detected(tmp_path):
    """Without --config, a DfNet4Lite state dict at the fork's defaults is recognised."""
    from df_mlx.checkpoint import load_model_dir
    from df_mlx.deepfilternet4 import DfNet4Lite

    _, state = _state_at("[train]\nmodel = deepfilternet4\n[deepfilternet4]\nmodel_variant = lite\n", tmp_path)
    write_state_dict(state, tmp_path / "lite.ckpt")
    result = _convert(tmp_path / "lite.ckpt", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    model, meta = load_model_dir(tmp_path / "out")
    assert isinstance(model, DfNet4Lite) and meta["family"] == "deepfilternet4"


def test_dfnet4_bad_checkpoints_fail_cleanly(tmp_path):
    """DFNet4 weights under another DFNet4 config, or missing a Mamba tensor, are errors."""
    _, state = _state_at(DFN4_INI, tmp_path)
    other = _model_dir(tmp_path / "other", state, DFN4_INI.replace("mamba_d_state = 4", "mamba_d_state = 8"))
    missing = {k: v for k, v in state.items() if k != "enc.seq_layers.0.mamba.A_log"}
    write_state_dict(missing, tmp_path / "missing.ckpt")
    (tmp_path / "dfn4.ini").write_text(DFN4_INI)
    for name, args, message in [("other_config", [other], "does not fit the model"),
                                ("missing", [tmp_path / "missing.ckpt", "--config", tmp_path / "dfn4.ini"],
                                 "missing enc.seq_layers.0.mamba.A_log")]:
        result = _convert(*args, "-o", tmp_path / f"out_{name}")
        assert result.exit_code == 1, (name, result.output)
        error = result.output.strip().splitlines()[-1]
        assert error.startswith("Error: ") and message in error, (name, result.output)
        assert not (tmp_path / f"out_{name}").exists()


def test_existing_output_is_not_overwritten(tmp_path, dfn3_state):
    write_state_dict(dfn3_state, tmp_path / "w.pt")
    (tmp_path / "out").mkdir()
    result = _convert(tmp_path / "w.pt", "-o", tmp_path / "out")
    assert result.exit_code == 1 and "already exists" in result.output


def test_export_of_non_model_dir_fails(tmp_path):
    result = CliRunner().invoke(main, ["export", str(tmp_path), "-o", str(tmp_path / "x.ckpt")])
    assert result.exit_code == 1 and "is not a converted model" in result.output
    assert not (tmp_path / "x.ckpt").exists()


def _disc_state(ini: str, tmp_path: Path, scale: float = 1.0):
    """df_mlx's discriminator for `ini` (random weights, weight_g scaled off w = v) as a state dict."""
    from df_mlx.train_gan import build_discriminator

    (tmp_path / "disc.ini").write_text(ini)
    config.load(str(tmp_path / "disc.ini"), allow_reload=True)
    state = {k: (v * scale if k.endswith("weight_g") else v) for k, v in mlx_state_dict(build_discriminator()).items()}
    config.use_defaults(allow_reload=True)
    return state


@pytest.mark.parametrize("disc_keys", ["discriminator_type = msd\nmsd_scales = 1\n",
                                       "discriminator_type = msd\nmsd_scales = 1\ndiscriminator_spectral_norm = true\n"],
                         ids=["weight_norm", "spectral_norm"])
def test_fork_run_with_discriminator_round_trip(tmp_path, dfn3_state, disc_keys):
    """A fork training run's `disc_<epoch>.ckpt` (next to `model_<epoch>.ckpt`) converts into
    discriminator.safetensors and exports back bit-identical, beside the model."""
    ini = f"[train]\nmodel = deepfilternet3\ngan_enabled = true\n{disc_keys}"
    disc = _disc_state(ini, tmp_path, scale=1.3)
    src = _model_dir(tmp_path / "run", dfn3_state, ini)
    write_state_dict(disc, src / "checkpoints" / "disc_7.ckpt")
    write_state_dict(disc, src / "checkpoints" / "disc_3.ckpt")  # another epoch: not taken
    result = _convert(src, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "disc_7.ckpt" in result.output and (tmp_path / "out" / "discriminator.safetensors").is_file()
    result = CliRunner().invoke(main, ["export", str(tmp_path / "out"), "-o", str(tmp_path / "back.ckpt")])
    assert result.exit_code == 0, result.output
    assert "back_disc.ckpt" in result.output
    back = torch.load(tmp_path / "back_disc.ckpt", weights_only=True)
    assert set(back) == set(disc)
    for k, v in disc.items():
        np.testing.assert_array_equal(back[k].numpy(), v, err_msg=k)


def test_discriminator_that_does_not_fit_fails_cleanly(tmp_path, dfn3_state):
    ini = "[train]\nmodel = deepfilternet3\ngan_enabled = true\ndiscriminator_type = msd\nmsd_scales = 1\n"
    disc = _disc_state(ini, tmp_path)
    src = _model_dir(tmp_path / "run", dfn3_state, ini.replace("msd_scales = 1", "msd_scales = 2"))
    write_state_dict(disc, src / "checkpoints" / "disc_7.ckpt")
    result = _convert(src, "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert result.output.startswith("Error: disc_7.ckpt does not fit the configured discriminator")
    assert not (tmp_path / "out").exists()
