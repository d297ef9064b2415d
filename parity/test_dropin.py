"""df's usage patterns with only the import renamed (df -> df_mlx), against df with the same
weights (the embedded DeepFilterNet3 exported by `dfmlx export` into an upstream model
folder): the README snippet, the full example, torch tensors in and out, save_audio with
torch dtypes, init_df by name and epoch, the model's mode, and df's command line flag by flag,
compared file by file.

df's own `main` cannot run here (df.io needs torchaudio, which has no build for the pinned
torch), so df's files are made as df's `main` makes them: the file read as float32, resampled
to 48 kHz with torchaudio's resampler (df_mlx.io.resample, its port, checked in
tests/test_io.py), df's `init_df` + `enhance`, resampled back, `(audio * 2^15).to(int16)`."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from parity.reference import import_ref

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
# Written 16-bit files: df truncates x * 2^15 toward zero, so float32 rounding (enhanced audio
# within 2.4e-6 of torch's, parity/test_enhance.py) moves a sample across an integer at most
# by one step, and rarely.
LSB = 1
MAX_DIFFERING = 0.01  # at most this fraction of samples may differ by that one step
AUDIO_ATOL = 1e-5  # float outputs: float32 model layers, then overlap-add (parity/test_enhance.py AUDIO)


def _noisy(seconds: float, sr: int, channels: int) -> np.ndarray:
    speech, s_sr = sf.read(DATA / "speech_espeak_48k.wav", dtype="float32", always_2d=True)
    noise, _ = sf.read(DATA / "noise_freesound_573577.wav", dtype="float32", always_2d=True)
    n = int(seconds * s_sr)
    s, v = speech[:n, 0], noise[:n, 0]
    mix = s + v * np.sqrt((s**2).mean() / (v**2).mean()) * 10 ** (-5 / 20)
    if sr != s_sr:
        from df_mlx.io import resample

        mix = resample(mix[None], s_sr, sr)[0]
    return np.stack([mix * (0.9 - 0.2 * c) for c in range(channels)], axis=1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An upstream DeepFilterNet3 folder with the embedded weights at epoch 2 and perturbed
    ones at epoch 1, and a folder of noisy inputs (48 kHz mono, 16 kHz stereo)."""
    from converters.convert import export
    from converters.torch_ckpt import read_state_dict, write_state_dict
    from df_mlx.enhance import maybe_download_model

    import_ref("logger")._logger_initialized = True  # loguru levels are process-wide: df-mlx's init_logger sets them
    root = tmp_path_factory.mktemp("dropin")
    embedded = maybe_download_model("DeepFilterNet3")
    upstream = root / "models" / "DeepFilterNet3"
    (upstream / "checkpoints").mkdir(parents=True)
    shutil.copy(Path(embedded) / "config.ini", upstream / "config.ini")
    export(embedded, upstream / "checkpoints" / "model_2.ckpt")
    state = read_state_dict(upstream / "checkpoints" / "model_2.ckpt")
    rng = np.random.default_rng(0)
    write_state_dict({k: (v * (1 + 0.05 * rng.standard_normal(v.shape)).astype(v.dtype)
                          if v.dtype == np.float32 else v) for k, v in state.items()},
                     upstream / "checkpoints" / "model_1.ckpt")
    noisy = root / "noisy"
    noisy.mkdir()
    sf.write(noisy / "a48.wav", _noisy(1.5, 48000, 1), 48000, subtype="PCM_16")
    sf.write(noisy / "b16.wav", _noisy(1.5, 16000, 2), 16000, subtype="PCM_16")
    return root, upstream, noisy


_REF_MODELS = {}


def _ref_model(upstream: Path, epoch="best", pf=False, mask_only=False):
    key = (str(upstream), epoch, pf, mask_only)
    if key not in _REF_MODELS:
        model, df_state, suffix = import_ref("enhance").init_df(
            str(upstream), post_filter=pf, log_level="ERROR", log_file=None, epoch=epoch, mask_only=mask_only)
        _REF_MODELS[key] = (model, df_state, suffix)
    return _REF_MODELS[key]


def _df_file(path: Path, upstream: Path, epoch="best", pf=False, mask_only=False, pad=True, atten=None):
    """The int16 samples [C, T] df's `main` writes for `path`."""
    from df_mlx.io import resample

    model, df_state, _ = _ref_model(upstream, epoch, pf, mask_only)
    audio, sr = sf.read(path, dtype="float32", always_2d=True)
    audio = audio.T
    if sr != df_state.sr():
        audio = resample(audio, sr, df_state.sr())
    out = import_ref("enhance").enhance(model, df_state, torch.from_numpy(audio), pad=pad, atten_lim_db=atten)
    if sr != df_state.sr():
        out = resample(out, df_state.sr(), sr)
    return (torch.as_tensor(out) * (1 << 15)).to(torch.int16).numpy()


def _assert_same_file(ours_path: Path, want: np.ndarray, exact_length: bool = True):
    ours = sf.read(ours_path, dtype="int16", always_2d=True)[0].T
    if exact_length:
        assert ours.shape == want.shape, (ours_path.name, ours.shape, want.shape)
    else:  # a resampled input with delay compensation: df's is 1 sample longer (README: drop-in)
        assert ours.shape[0] == want.shape[0] and 0 <= want.shape[1] - ours.shape[1] <= 1, (ours.shape, want.shape)
        want = want[:, : ours.shape[1]]
    diff = np.abs(ours.astype(np.int32) - want.astype(np.int32))
    assert diff.max() <= LSB, (ours_path.name, diff.max())
    assert (diff > 0).mean() <= MAX_DIFFERING, (ours_path.name, (diff > 0).mean())
    assert np.abs(want).max() > 1000, "the comparison needs audible output"


def _run_df_cli(monkeypatch, *argv):
    from df_mlx.enhance import run

    monkeypatch.setattr(sys, "argv", ["deepFilter-mlx", *map(str, argv)])
    run()


# (name, extra CLI flags, df reference options, output suffix)
CLI_CASES = [
    ("default", [], {}, "DeepFilterNet3"),
    ("no_delay_compensation", ["--no-delay-compensation"], {"pad": False}, "DeepFilterNet3"),
    ("atten_lim", ["-a", "12"], {"atten": 12}, "DeepFilterNet3"),
    ("post_filter", ["--pf"], {"pf": True}, "DeepFilterNet3_pf"),
    ("epoch", ["--epoch", "1"], {"epoch": 1}, "DeepFilterNet3"),
    ("no_df_stage", ["--no-df-stage"], {"mask_only": True}, "DeepFilterNet3"),
    ("no_suffix", ["--no-suffix"], {}, None),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, flags, ref, suffix", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_flags_write_dfs_files(setup, tmp_path, monkeypatch, name, flags, ref, suffix):
    root, upstream, noisy = setup
    out = tmp_path / "out"
    inputs = ["-i", noisy] if name == "default" else sorted(noisy.iterdir())
    _run_df_cli(monkeypatch, *inputs, "-m", upstream, "-o", out, "--log-level", "ERROR", *flags)
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(f"{p.stem}_{suffix}.wav" if suffix else p.name for p in noisy.iterdir()), written
    for p in sorted(noisy.iterdir()):
        resampled = sf.info(p).samplerate != 48000
        _assert_same_file(out / (f"{p.stem}_{suffix}.wav" if suffix else p.name), _df_file(p, upstream, **ref),
                          exact_length=not resampled or ref.get("pad") is False)


@pytest.mark.slow
def test_epochs_differ_and_best_is_latest(setup):
    """The two epochs give different files (so --epoch is really exercised) and df's "best"
    without a .best file is the latest epoch."""
    _, upstream, noisy = setup
    a = noisy / "a48.wav"
    assert np.abs(_df_file(a, upstream, epoch=1).astype(int) - _df_file(a, upstream).astype(int)).max() > 100
    np.testing.assert_array_equal(_df_file(a, upstream, epoch=2), _df_file(a, upstream))


@pytest.mark.slow
def test_dfmlx_enhance_takes_dfs_spellings(setup, tmp_path):
    """`dfmlx enhance` with df's flags; the embedded model by name; a subprocess as users run it."""
    _, upstream, noisy = setup
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "df_mlx", "enhance", "-i", str(noisy), "-m", "DeepFilterNet3", "-o", str(out),
           "--no-delay-compensation", "-e", "best", "--log-level", "ERROR"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-2000:]
    for p in sorted(noisy.iterdir()):
        _assert_same_file(out / f"{p.stem}_DeepFilterNet3.wav", _df_file(p, upstream, pad=False))


@pytest.mark.slow
def test_python_m_df_mlx_enhance(setup, tmp_path):
    _, upstream, noisy = setup
    out = tmp_path / "out"
    a = noisy / "a48.wav"
    cmd = [sys.executable, "-m", "df_mlx.enhance", str(a), "-o", str(out), "-d"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "RuntimeWarning" not in result.stderr  # runpy's, about df_mlx/__init__ importing the module
    assert ":init_logger:" in result.stdout  # -d is df's --debug: the debug log format names the function
    _assert_same_file(out / "a48_DeepFilterNet3.wav", _df_file(a, upstream))
    version = subprocess.run([sys.executable, "-m", "df_mlx.enhance", "-v"], capture_output=True, text=True,
                             timeout=600, env=dict(os.environ))
    assert version.returncode == 0 and version.stdout.startswith("DeepFilterNet (df-mlx) ")


def test_cli_errors_like_df(setup, tmp_path, monkeypatch, capsys):
    _, upstream, noisy = setup
    with pytest.raises(SystemExit) as e:
        _run_df_cli(monkeypatch, noisy / "a48.wav", "-i", noisy, "-o", tmp_path)
    assert e.value.code != 0 and "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        _run_df_cli(monkeypatch, "--epoch", "worst", noisy / "a48.wav")
    assert e.value.code == 2 and "epoch must be best, latest or an integer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        _run_df_cli(monkeypatch, noisy / "a48.wav", "-m", "DeepFilterNet2", "-o", tmp_path)
    assert e.value.code == 1 and "dfmlx convert" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def _speech(seconds=1.5):
    return _noisy(seconds, 48000, 1).T.copy()


def test_readme_snippet(setup):
    """Upstream's README: `from df import enhance, init_df` ... `enhance(model, df_state, audio)`."""
    from df_mlx import enhance, init_df

    _, upstream, _ = setup
    model, df_state, _ = init_df()
    audio = _speech()
    enhanced = enhance(model, df_state, audio)
    ref_model, ref_state, _ = _ref_model(upstream)
    want = import_ref("enhance").enhance(ref_model, ref_state, torch.from_numpy(audio))
    assert isinstance(enhanced, np.ndarray)
    np.testing.assert_allclose(enhanced, want.numpy(), atol=AUDIO_ATOL)


def test_full_example(setup, tmp_path, monkeypatch):
    """Upstream's full example with the import renamed; download_file does its offline part
    (a local copy), save_audio writes what df's writes."""
    from df_mlx.enhance import enhance, init_df, load_audio, save_audio
    from df_mlx.utils import download_file

    _, upstream, noisy = setup
    monkeypatch.chdir(tmp_path)
    model, df_state, _ = init_df()
    audio_path = download_file(str(noisy / "a48.wav"), download_dir=".")
    audio, _ = load_audio(audio_path, sr=df_state.sr())
    enhanced = enhance(model, df_state, audio)
    save_audio("enhanced.wav", enhanced, df_state.sr())
    _assert_same_file(tmp_path / "enhanced.wav", _df_file(noisy / "a48.wav", upstream))


def test_torch_tensors_in_and_out(setup, tmp_path):
    """Torch-style code: tensors in, tensors out, df's tensor methods on the result, and
    save_audio with torch dtypes."""
    from df_mlx.enhance import enhance, init_df, resample, save_audio

    _, upstream, _ = setup
    model, df_state, _ = init_df()
    audio = torch.from_numpy(_speech())
    enhanced = enhance(model, df_state, audio)
    assert isinstance(enhanced, torch.Tensor) and enhanced.dim() == 2 and enhanced.size(-1) == audio.size(-1)
    ref_model, ref_state, _ = _ref_model(upstream)
    want = import_ref("enhance").enhance(ref_model, ref_state, audio)
    np.testing.assert_allclose(enhanced.cpu().detach().squeeze(0).numpy(), want.squeeze(0).numpy(), atol=AUDIO_ATOL)
    assert isinstance(resample(enhanced, 48000, 16000), torch.Tensor)
    save_audio(str(tmp_path / "i16.wav"), enhanced, 48000, dtype=torch.int16)
    _assert_same_file(tmp_path / "i16.wav", (want * (1 << 15)).to(torch.int16).numpy())
    save_audio(str(tmp_path / "f32.wav"), enhanced.unsqueeze(0).squeeze(0), 48000, dtype=torch.float32)
    f32, _ = sf.read(tmp_path / "f32.wav", dtype="float32", always_2d=True)
    assert sf.info(tmp_path / "f32.wav").subtype == "FLOAT"
    np.testing.assert_allclose(f32.T, want.numpy(), atol=AUDIO_ATOL)


def test_init_df_epoch_and_mode_like_df(setup):
    """epoch: a number picks that checkpoint, None/"none" builds an untrained model; the model
    comes back in df's mode (train), so a direct model call equals df's direct call."""
    from converters.layout import mlx_state_dict
    from df_mlx.enhance import df_features, init_df

    _, upstream, noisy = setup
    ref_model, ref_state, _ = import_ref("enhance").init_df(str(upstream), epoch=1, log_file=None, log_level="ERROR")
    model, df_state, suffix = init_df(str(upstream), epoch=1, log_file=None)
    assert suffix == "DeepFilterNet3" and model.training == ref_model.training is True
    theirs = {k: v.detach().numpy() for k, v in ref_model.state_dict().items()}
    ours = mlx_state_dict(model)
    assert set(ours) == set(theirs)
    for k in ours:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    audio = _speech(1.0)
    spec, erb_feat, spec_feat = df_features(audio, df_state, 96)
    ref_feats = import_ref("enhance").df_features(torch.from_numpy(audio), ref_state, 96)
    with torch.no_grad():
        ref_out = ref_model(*ref_feats)
    out = model(spec, erb_feat, spec_feat)
    np.testing.assert_allclose(np.array(out[2]), ref_out[2].numpy(), atol=1e-3)  # lsnr, train-mode BatchNorm
    trained = mlx_state_dict(init_df(str(upstream), log_file=None)[0])
    for epoch in (None, "none"):
        fresh, _, _ = init_df(str(upstream), epoch=epoch, log_file=None)
        ref_fresh, _, _ = import_ref("enhance").init_df(str(upstream), epoch=epoch, log_file=None, log_level="ERROR")
        weights = mlx_state_dict(fresh)
        assert set(weights) == set(ref_fresh.state_dict())
        assert not np.array_equal(weights["enc.erb_conv0.1.weight"], trained["enc.erb_conv0.1.weight"])


def test_torch_module_calls(setup):
    """The torch.nn.Module calls of df users' code: to/cpu/eval/train return the model,
    named_parameters is torch's parameters() by name, state_dict and load_state_dict speak
    torch's names and layout both ways."""
    from df_mlx.enhance import init_df

    _, upstream, _ = setup
    ref_model, _, _ = _ref_model(upstream, epoch=1)
    model, _, _ = init_df(log_file=None)
    assert model.to("cpu") is model and model.cpu() is model and model.to(torch.device("cpu"), torch.float32) is model
    assert model.eval() is model and not model.training and model.train() is model and model.training
    with pytest.raises(TypeError, match="float32"):
        model.to(torch.float16)
    ours = dict(model.named_parameters())
    theirs = dict(ref_model.named_parameters())
    assert set(ours) == set(theirs) and sum(v.size for v in ours.values()) == sum(p.numel() for p in theirs.values())
    model.load_state_dict(ref_model.state_dict())  # torch tensors in torch layout
    back = model.state_dict()
    ref_state = ref_model.state_dict()
    assert set(back) == set(ref_state)
    for k, v in ref_state.items():
        np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)
    ref_model.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    with pytest.raises(ValueError, match="strict=False"):
        model.load_state_dict(ref_state, strict=False)
