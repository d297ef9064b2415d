"""Training data and the training command: prepare_data's HDF5 files (every codec, bad input),
df_mlx.libdfdata (determinism, folders, bad configs) and `dfmlx train` end to end on the
bundled speech and noise (loss goes down, `dfmlx enhance` loads the result, a run killed
mid-epoch resumes to the same weights as an uninterrupted one)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

import df_mlx.train as train
from df_mlx.cli import main as cli
from df_mlx.config import config
from df_mlx.libdfdata import DataLoader, DatasetError, Hdf5Cfg, Hdf5Dataset
from df_mlx.scripts.prepare_data import main as prepare_data
from tests.datasets import SPEECH_CLIP, build_datasets, clip, write_clips

LOADER = dict(sr=48000, max_len_s=0.5, fft_size=960, hop_size=480, nb_erb=16, nb_spec=48, norm_alpha=0.99,
              p_reverb=0.0, seed=3, min_nb_erb_freqs=2, batch_size=2, num_workers=1)
# Training: a small DFN3 (0.5 s samples, 8 conv channels) for 3 epochs of 7 steps.
TRAIN_INI = """[train]
model = deepfilternet3
seed = 7
batch_size = 2
batch_size_eval = 2
max_epochs = 3
max_sample_len_s = 0.5
num_workers = 2
log_freq = 100
early_stopping_patience = 5
[df]
sr = 48000
fft_size = 960
hop_size = 480
nb_erb = 16
nb_df = 48
df_order = 3
min_nb_erb_freqs = 2
[deepfilternet]
conv_ch = 8
emb_hidden_dim = 32
df_hidden_dim = 32
linear_groups = 4
enc_linear_groups = 4
[distortion]
p_reverb = 0.0
[optim]
lr = 3e-3
lr_warmup = 1e-4
warmup_epochs = 0
[SpectralLoss]
factor_magnitude = 1000
factor_complex = 1000
gamma = 0.3
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("datasets")
    return out, build_datasets(out)


@pytest.fixture(autouse=True)
def default_config():
    yield
    config.use_defaults(allow_reload=True)


def _hdf5(dataset, name):
    return Hdf5Dataset(dataset[0] / name, Hdf5Cfg(name), 48000)


def test_prepare_data_layout_and_codecs(dataset):
    pcm16, pcm32 = _hdf5(dataset, "speech_pcm_int16.hdf5"), _hdf5(dataset, "speech_pcm_float32.hdf5")
    flac, vorbis = _hdf5(dataset, "speech_flac.hdf5"), _hdf5(dataset, "speech_vorbis.hdf5")
    with h5py.File(dataset[0] / "speech_flac.hdf5") as f:
        assert dict(f.attrs) | {"db_id": 0} == {"db_id": 0, "db_name": "speech_flac.hdf5", "max_freq": 24000,
                                                "dtype": "int16", "sr": 48000, "codec": "flac"}
        assert f["speech"]["speech_s1.wav"].attrs["n_samples"] == SPEECH_CLIP
    assert pcm16.keys == [f"speech_s{i}.wav" for i in range(len(pcm16.keys))] and len(pcm16.keys) == 9
    for ds in (pcm16, pcm32, flac, vorbis):
        assert (ds.dstype, ds.sr, ds.max_freq, ds.sample_len("speech_s1.wav")) == ("speech", 48000, 24000, SPEECH_CLIP)
    x16 = clip("speech", 1)
    np.testing.assert_array_equal(pcm16.read("speech_s1.wav"), x16[None])  # int16 / 32767, as libdf
    x32 = pcm32.read("speech_s1.wav")
    np.testing.assert_array_equal(x32, (x16 * 32767 / 32768)[None].astype(np.float32))
    np.testing.assert_array_equal(flac.read("speech_s1.wav"), x32)  # lossless
    v = vorbis.read("speech_s1.wav")[:, :SPEECH_CLIP]
    assert 10 * np.log10(np.sum(x32**2) / np.sum((v - x32) ** 2)) > 15  # lossy, but the same audio
    np.testing.assert_array_equal(pcm16.read("speech_s1.wav", 100, 50), x16[None, 100:150])


def test_prepare_data_bad_input_leaves_no_file(tmp_path):
    speech, _ = write_clips(tmp_path)
    out = tmp_path / "out.hdf5"
    (tmp_path / "wav" / "list.txt").write_text("speech/s0.wav\nspeech/missing.wav\n")
    assert prepare_data(["speech", str(tmp_path / "wav" / "list.txt"), str(out)]) == 1
    assert prepare_data(["voices", str(tmp_path / "wav" / "speech"), str(out)]) == 1
    assert prepare_data(["speech", str(tmp_path / "nothing"), str(out)]) == 1
    assert not out.exists()
    # A corrupt recording fails the run and keeps the existing file as it was.
    assert prepare_data(["speech", str(tmp_path / "wav" / "speech"), str(out), "--num_workers", "1"]) == 0
    before = out.read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    assert prepare_data(["noise", str(bad), str(out)]) == 1
    assert out.read_bytes() == before
    assert not list(tmp_path.glob("*.part"))


def _batches(loader, split, seed):
    return [{k: np.array(getattr(b, k)) for k in ("speech", "noisy", "feat_erb", "feat_spec", "snr", "ids")}
            for b in loader.iter_epoch(split, seed)]


def _same(a, b) -> bool:
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x) and len(a) == len(b)


def test_loader_is_deterministic(dataset):
    out, cfg = dataset
    one = DataLoader(str(out), str(cfg), **LOADER)
    three = DataLoader(str(out), str(cfg), **dict(LOADER, num_workers=3))
    assert _same(_batches(one, "train", 0), _batches(three, "train", 0))
    assert not _same(_batches(one, "train", 0), _batches(one, "train", 1))
    valid = _batches(one, "valid", 42)  # df.train validates with seed 42 every epoch
    _batches(one, "train", 5)
    assert _same(valid, _batches(one, "valid", 42))
    b = next(iter(one.iter_epoch("train", 0)))
    assert b.speech.shape == (2, 1, 50, 481) and b.feat_erb.shape == (2, 1, 50, 16) and b.feat_spec.shape[-1] == 48
    assert b.speech.dtype == mx.complex64 and np.isfinite(np.array(b.feat_erb)).all()


def test_loader_reads_audio_folders(dataset):
    out, _ = dataset
    for kind in ("speech", "noise"):
        shutil.copytree(out / "wav" / kind, out / f"{kind}_folder", dirs_exist_ok=True)
    cfg = out / "folders.cfg"
    cfg.write_text(json.dumps({s: [["speech_folder", 0.5], ["noise_folder"]] for s in ("train", "valid", "test")}))
    loader = DataLoader(str(out), str(cfg), **LOADER)
    assert loader.dataset_len("train") == 5  # round(0.5 x 9) half away from zero, as libdfdata
    assert len(_batches(loader, "train", 0)) == 3


@pytest.mark.parametrize("case", ["not_json", "missing_split", "missing_file", "corrupt_hdf5", "no_group",
                                  "no_noise", "bad_factor", "clipping", "reverb_with_rirs"])
def test_loader_bad_input(dataset, tmp_path, case):
    out, _ = dataset
    data = tmp_path / "data"
    shutil.copytree(out, data, ignore=shutil.ignore_patterns("wav"))
    splits = {s: [["speech_pcm_int16.hdf5"], ["noise.hdf5"]] for s in ("train", "valid", "test")}
    kw = dict(LOADER)
    cfg = tmp_path / "dataset.cfg"
    if case == "not_json":
        cfg.write_text("{train: ")
    else:
        if case == "missing_split":
            del splits["test"]
        elif case == "missing_file":
            splits["valid"].append(["gone.hdf5"])
        elif case == "corrupt_hdf5":
            (data / "bad.hdf5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
            splits["train"].append(["bad.hdf5"])
        elif case == "no_group":
            with h5py.File(data / "odd.hdf5", "w") as f:
                f.create_group("music")
            splits["train"].append(["odd.hdf5"])
        elif case == "no_noise":
            splits["train"] = [["speech_pcm_int16.hdf5"]]
        elif case == "bad_factor":
            splits["train"][0] = ["speech_pcm_int16.hdf5", -1]
        elif case == "clipping":
            kw["p_clipping"] = 0.1
        elif case == "reverb_with_rirs":
            with h5py.File(data / "rir.hdf5", "w") as f:
                f.create_group("rir").create_dataset("r0", data=np.ones((1, 100), np.float32))
            splits["train"].append(["rir.hdf5"])
            kw["p_reverb"] = 0.2
        cfg.write_text(json.dumps(splits))
    with pytest.raises(DatasetError) as e:
        DataLoader(str(data), str(cfg), **kw)
    assert "\n" not in str(e.value)


def _write_base(base: Path, extra: str = "") -> Path:
    base.mkdir(parents=True, exist_ok=True)
    (base / "config.ini").write_text(TRAIN_INI + extra)
    return base


def _weights(base: Path, epoch: int):
    return mx.load(str(base / "checkpoints" / f"model_{epoch}.safetensors"))


@pytest.mark.slow
def test_train_end_to_end(dataset, tmp_path, monkeypatch):
    """Validation loss goes down; the checkpoints enhance audio through `dfmlx enhance`."""
    out, cfg = dataset
    valid = []
    run_epoch = train.run_epoch

    def recording(model, epoch, loader, split, *a, **k):
        loss = run_epoch(model, epoch, loader, split, *a, **k)
        if split == "valid":
            valid.append(loss)
        return loss

    monkeypatch.setattr(train, "run_epoch", recording)
    base = _write_base(tmp_path / "model")
    result = CliRunner().invoke(cli, ["train", str(cfg), str(out), str(base), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "test loss" in result.output
    assert len(valid) == 3 and valid[-1] < valid[0], valid
    assert {p.name for p in (base / "checkpoints").iterdir()} >= {"model_3.safetensors", "opt_3.safetensors"}
    assert list((base / "checkpoints").glob("model_*.safetensors.best"))
    noisy = tmp_path / "noisy.wav"
    sf.write(noisy, clip("speech", 2) + 0.3 * clip("noise", 1)[:SPEECH_CLIP], 48000)
    result = CliRunner().invoke(cli, ["enhance", str(noisy), "-m", str(base), "-o", str(tmp_path / "enh")])
    assert result.exit_code == 0, result.output
    enhanced, sr = sf.read(tmp_path / "enh" / "noisy_model.wav")
    assert sr == 48000 and enhanced.shape == (SPEECH_CLIP,) and np.isfinite(enhanced).all()


class Killed(Exception):
    """Stands in for the process dying."""


@pytest.mark.slow
def test_train_resumes_after_a_kill(dataset, tmp_path, monkeypatch):
    """A run killed in the middle of epoch 2's training resumes from epoch 2's checkpoint and
    ends with exactly the weights of an uninterrupted run."""
    out, cfg = dataset
    straight = _write_base(tmp_path / "straight")
    train.main(str(cfg), str(out), str(straight), progress=False)
    killed = _write_base(tmp_path / "killed")
    run_epoch = train.run_epoch

    def dies_in_epoch_2(model, epoch, loader, split, *a, **k):
        if split == "train" and epoch == 2:
            raise Killed
        return run_epoch(model, epoch, loader, split, *a, **k)

    monkeypatch.setattr(train, "run_epoch", dies_in_epoch_2)
    with pytest.raises(Killed):
        train.main(str(cfg), str(out), str(killed), progress=False)
    assert not (killed / "checkpoints" / "model_3.safetensors").exists()
    monkeypatch.setattr(train, "run_epoch", run_epoch)
    train.main(str(cfg), str(out), str(killed), progress=False)
    a, b = _weights(straight, 3), _weights(killed, 3)
    assert a.keys() == b.keys()
    worst = max(float(mx.abs(a[k] - b[k]).max()) for k in a)
    assert worst == 0.0, worst


@pytest.mark.parametrize("case", ["missing_cfg", "bad_cfg", "missing_data_dir"])
def test_train_cli_bad_input(dataset, tmp_path, case):
    out, cfg = dataset
    base = _write_base(tmp_path / "model")
    if case == "missing_cfg":
        cfg = tmp_path / "nope.cfg"
    elif case == "bad_cfg":
        cfg = tmp_path / "bad.cfg"
        cfg.write_text("not json")
    else:
        out = tmp_path / "no_data"
    result = CliRunner().invoke(cli, ["train", str(cfg), str(out), str(base), "--no-progress"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    assert not list((base / "checkpoints").glob("*")) if (base / "checkpoints").exists() else True


@pytest.mark.slow
def test_gan_training_end_to_end(dataset, tmp_path):
    """`dfmlx train` with the fork's GAN keys trains against a period discriminator and writes
    its checkpoints next to the model's."""
    out, _ = dataset
    cfg = tmp_path / "one_step.cfg"  # the fork-width discriminator is slow: one training batch
    cfg.write_text(json.dumps({"train": [["speech_pcm_int16.hdf5", 0.2], ["noise.hdf5"]],
                               "valid": [["speech_flac.hdf5", 0.1], ["noise.hdf5"]],
                               "test": [["speech_vorbis.hdf5", 0.1], ["noise.hdf5"]]}))
    base = _write_base(tmp_path / "gan", "[GANLoss]\nfactor = 1\n[FeatureMatchingLoss]\nfactor = 1\n")
    ini = (base / "config.ini").read_text().replace("max_epochs = 3", "max_epochs = 1")
    ini = ini.replace("[train]\n", "[train]\ngan_enabled = true\ndiscriminator_type = mpd\nmpd_periods = 2\n", 1)
    (base / "config.ini").write_text(ini)
    result = CliRunner().invoke(cli, ["train", str(cfg), str(out), str(base), "--no-progress"])
    assert result.exit_code == 0, result.output
    names = {p.name for p in (base / "checkpoints").iterdir()}
    assert {"model_1.safetensors", "opt_1.safetensors", "disc_1.safetensors", "d_opt_1.safetensors"} <= names, names


def _train_process(cfg, data, base) -> list:
    return [sys.executable, "-m", "df_mlx.cli", "train", str(cfg), str(data), str(base), "--no-progress"]


@pytest.mark.slow
def test_train_resumes_after_sigkill(dataset, tmp_path):
    """`dfmlx train` killed with SIGKILL as soon as epoch 2's model checkpoint appears (mid
    checkpointing or mid validation), then run again, ends with exactly the weights of an
    uninterrupted run: it resumes from the last epoch whose model and optimizer both exist."""
    out, cfg = dataset
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    bases = {}
    for name in ("straight", "killed"):
        base = _write_base(tmp_path / name)
        (base / "config.ini").write_text((base / "config.ini").read_text().replace("max_epochs = 3", "max_epochs = 5"))
        bases[name] = base
    subprocess.run(_train_process(cfg, out, bases["straight"]), env=env, check=True, capture_output=True)
    proc = subprocess.Popen(_train_process(cfg, out, bases["killed"]), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    marker = bases["killed"] / "checkpoints" / "model_2.safetensors"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (bases["killed"] / "checkpoints" / "model_5.safetensors").exists()
    subprocess.run(_train_process(cfg, out, bases["killed"]), env=env, check=True, capture_output=True)
    a, b = _weights(bases["straight"], 5), _weights(bases["killed"], 5)
    assert a.keys() == b.keys()
    worst = max(float(mx.abs(a[k] - b[k]).max()) for k in a)
    assert worst == 0.0, worst


def test_resume_pairs_model_and_optimizer_epochs(tmp_path):
    """A model checkpoint written without its optimizer (killed in between) is not resumed from."""
    from df_mlx.train import resumable_epoch

    cp = tmp_path / "checkpoints"
    cp.mkdir()
    assert resumable_epoch(str(cp)) is None
    for name in ("model_1", "opt_1", "model_2", "model_2.safetensors.best"):
        (cp / (name if name.endswith(".best") else f"{name}.safetensors")).write_bytes(b"")
    assert resumable_epoch(str(cp)) == 1
