"""`dfmlx enhance` on real files: same result as the offline API, and clean failures."""

import os
import stat

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from df_mlx.cli import main
from df_mlx.config import config

DATA = os.path.join(os.path.dirname(__file__), "data")
SMALL = """[train]
model = deepfilternet3
[df]
df_lookahead = 2
[deepfilternet]
conv_lookahead = 2
conv_ch = 16
emb_hidden_dim = 64
df_hidden_dim = 64
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A converted model directory holding a small random-weight DFN3."""
    import mlx.core as mx

    from df_mlx.checkpoint import write_model_dir
    from df_mlx.deepfilternet3 import init_model

    root = tmp_path_factory.mktemp("model")
    (root / "c.ini").write_text(SMALL)
    config.load(str(root / "c.ini"), allow_reload=True)
    mx.random.seed(0)
    path = write_model_dir(init_model(), root / "small", {"family": "deepfilternet3"})
    config.use_defaults(allow_reload=True)
    return path


@pytest.fixture(scope="module")
def noisy():
    speech, sr = sf.read(os.path.join(DATA, "speech_espeak_48k.wav"), dtype="float32")
    noise, _ = sf.read(os.path.join(DATA, "noise_freesound_573577.wav"), dtype="float32")
    n = 2 * sr
    return (speech[:n] + 0.3 * noise[:n]).astype(np.float32), sr


def _enhance(args):
    return CliRunner().invoke(main, ["enhance", *map(str, args)])


def _offline(model_dir, audio, sr):
    from df_mlx.enhance import enhance, init_df
    from df_mlx.io import resample

    model, state, _ = init_df(str(model_dir), log_file=None, log_level="ERROR")
    x = resample(audio, sr, 48000)
    y = np.array(enhance(model, state, x, pad=True))
    return resample(y, 48000, sr)[..., : audio.shape[-1]]


@pytest.mark.parametrize("sr, channels", [(48000, 1), (16000, 1), (44100, 2), (8000, 6), (22050, 1)])
def test_cli_matches_offline_enhance(tmp_path, model_dir, noisy, sr, channels):
    from df_mlx.io import resample

    audio = resample(noisy[0], 48000, sr)
    audio = np.stack([audio * (0.5 + 0.1 * c) for c in range(channels)])
    src = tmp_path / "in.wav"
    sf.write(src, audio.T, sr, subtype="FLOAT")
    result = _enhance([src, "-m", model_dir, "-o", tmp_path / "out"])
    assert result.exit_code == 0, result.output
    out, out_sr = sf.read(tmp_path / "out" / "in_small.wav", dtype="float32", always_2d=True)
    assert out_sr == sr and out.shape == (audio.shape[1], channels)
    expected = _offline(model_dir, audio, sr)
    # The CLI writes 16-bit PCM: one quantisation step (plus resampler block rounding).
    np.testing.assert_allclose(out.T, expected, atol=1.5 / (1 << 15))


def test_folder_glob_and_summary(tmp_path, model_dir, noisy):
    for name in ("a.wav", "b.flac"):
        sf.write(tmp_path / name, noisy[0][:24000], 48000)
    result = _enhance([tmp_path, "-m", model_dir, "-o", tmp_path / "out", "--no-suffix"])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path / "out")) == ["a.wav", "b.flac"]
    assert "enhanced 2/2 files" in result.output


def test_bad_inputs_fail_without_partial_output(tmp_path, model_dir, noisy):
    (tmp_path / "text.wav").write_text("not audio")
    sf.write(tmp_path / "empty.wav", np.zeros((0, 1), np.float32), 48000)
    nan = noisy[0][:48000].copy()
    nan[30000] = np.nan
    sf.write(tmp_path / "nan.wav", nan, 48000, subtype="FLOAT")
    sf.write(tmp_path / "good.wav", noisy[0][:24000], 48000)
    out = tmp_path / "out"
    result = _enhance([tmp_path / "missing.wav", tmp_path / "text.wav", tmp_path / "empty.wav",
                       tmp_path / "nan.wav", tmp_path / "good.wav", "-m", model_dir, "-o", out])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 4, result.output
    for part in ("file not found", "not a readable audio file", "empty audio file", "NaN"):
        assert any(part in e for e in errors), (part, errors)
    assert sorted(os.listdir(out)) == ["good_small.wav"]
    assert "enhanced 1/5 files" in result.output


def test_unwritable_output_dir(tmp_path, model_dir, noisy):
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    sf.write(tmp_path / "a.wav", noisy[0][:24000], 48000)
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(stat.S_IRUSR | stat.S_IXUSR)
    result = _enhance([tmp_path / "a.wav", "-m", model_dir, "-o", out])
    assert result.exit_code == 1 and "not writable" in result.output


def test_output_dir_under_a_file(tmp_path, model_dir, noisy):
    sf.write(tmp_path / "a.wav", noisy[0][:24000], 48000)
    (tmp_path / "file").write_text("x")
    result = _enhance([tmp_path / "a.wav", "-m", model_dir, "-o", tmp_path / "file" / "sub"])
    assert result.exit_code == 1 and result.output.startswith("Error: cannot create output directory")


def test_output_dir_is_a_file(tmp_path, model_dir, noisy):
    sf.write(tmp_path / "a.wav", noisy[0][:24000], 48000)
    (tmp_path / "file").write_text("x")
    result = _enhance([tmp_path / "a.wav", "-m", model_dir, "-o", tmp_path / "file"])
    assert result.exit_code == 2 and "is a file" in result.output  # click's usage error


def test_unknown_model_dir(tmp_path):
    result = _enhance([tmp_path / "a.wav", "-m", tmp_path / "nope"])
    assert result.exit_code == 1 and result.output.startswith("Error: ")
