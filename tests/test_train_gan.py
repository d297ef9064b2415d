"""df_mlx.train_gan's loop on in-memory batches: GAN steps with DISCRIMINATOR_UPDATE_FREQ,
GAN_START_EPOCH, the model / opt / disc / d_opt checkpoints and resuming from them; the
discriminator the config selects; the configurations the fork cannot train rejected.
Numerical parity with the fork's step is parity/test_train_gan.py."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import df_mlx.train as base
import df_mlx.train_gan as gan
from df_mlx.config import config
from df_mlx.discriminator import (CombinedDiscriminator, MultiPeriodDiscriminator, MultiScaleDiscriminator,
                                  PeriodDiscriminator)

# A small DFN3 at 16 kHz, two 2-step epochs, a one-period MPD (shrunk below), D every 2nd step.
GAN_INI = """[train]
model = deepfilternet3
batch_size = 2
max_epochs = {epochs}
gan_enabled = true
discriminator_type = mpd
mpd_periods = 3
discriminator_update_freq = 2
gan_start_epoch = {start}
[df]
sr = 16000
fft_size = 64
hop_size = 32
nb_erb = 8
nb_df = 16
df_order = 3
[deepfilternet]
conv_ch = 8
emb_hidden_dim = 16
df_hidden_dim = 16
linear_groups = 2
enc_linear_groups = 4
[optim]
lr = 1e-3
lr_warmup = 1e-4
warmup_epochs = 0
[multiresspecloss]
factor = 1
fft_sizes = 32,64
[ganloss]
factor = 1
[featurematchingloss]
factor = 2
"""


@pytest.fixture(autouse=True)
def default_config():
    yield
    config.use_defaults(allow_reload=True)


def _load(tmp_path: Path, text: str):
    path = tmp_path / "config.ini"
    path.write_text(text if text.startswith("[train]\nmodel") else "[train]\nmodel = deepfilternet3\n" + text)
    config.load(str(path), allow_reload=True)


def _setup(tmp_path, monkeypatch, epochs: int, start: int = 0):
    """Config, DF state, a fresh model and optimizer, the losses and 4 training samples."""
    from df_mlx.libdf import DF
    from df_mlx.model import ModelParams, init_model

    _load(tmp_path, GAN_INI.format(epochs=epochs, start=start))
    p = ModelParams()
    state = DF(p.sr, p.fft_size, p.hop_size, p.nb_erb, p.min_nb_freqs)
    monkeypatch.setattr(base, "state", state)
    rng = np.random.default_rng(0)
    samples = base.make_batch(0.1 * rng.standard_normal((4, 1280)), rng.standard_normal((4, 1280)),
                              [0, 5, 10, 20], state, p.nb_df)
    loader = base.BatchLoader({"train": samples, "valid": samples.slice(np.arange(2)),
                               "test": samples.slice(np.arange(2))}, batch_size=2)
    model = init_model(run_df=True)
    return model, base.load_opt(None, model), base.setup_losses(), loader


def _small_mpd(monkeypatch):
    """setup_discriminator's MPD with 4..16 channels instead of 32..1024."""
    setup = gan.setup_discriminator

    def small():
        disc = setup()
        disc.discriminators = [PeriodDiscriminator(p, channels=(4, 8, 16)) for p in disc.periods]
        return disc

    monkeypatch.setattr(gan, "setup_discriminator", small)


def _spy(monkeypatch):
    """Records each GAN step's result and the trainer the loop builds."""
    steps, trainers = [], []
    step, init = gan.gan_train_step, gan.GanTrainer.__init__
    monkeypatch.setattr(gan, "gan_train_step", lambda *a, **k: steps.append(step(*a, **k)) or steps[-1])

    def init_and_keep(self, *a, **k):
        init(self, *a, **k)
        trainers.append(self)

    monkeypatch.setattr(gan.GanTrainer, "__init__", init_and_keep)
    return steps, trainers


def _arrays(path: Path):
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def test_loop_writes_checkpoints_and_resumes(tmp_path, monkeypatch):
    cp = tmp_path / "checkpoints"
    cp.mkdir()
    _small_mpd(monkeypatch)
    steps, trainers = _spy(monkeypatch)
    model, opt, losses, loader = _setup(tmp_path, monkeypatch, epochs=1)
    test_loss, _ = gan.train_loop(model, opt, loader, losses, str(cp), None, epoch=0, resume=False, progress=False)
    assert np.isfinite(test_loss)
    assert len(steps) == 2
    assert steps[0].d_loss is not None and steps[1].d_loss is None  # DISCRIMINATOR_UPDATE_FREQ = 2
    assert all(np.isfinite(float(s.gan["gen_adv"])) and np.isfinite(float(s.gan["fm"])) for s in steps)
    for name in ("model", "opt", "disc", "d_opt"):
        assert (cp / f"{name}_1.safetensors").is_file(), name
    saved_disc, saved_opt = _arrays(cp / "disc_1.safetensors"), _arrays(cp / "d_opt_1.safetensors")
    assert {k.rsplit(".", 1)[-1] for k in saved_opt} == {"step", "exp_avg", "exp_avg_sq"}
    assert all(float(v) == 1.0 for k, v in saved_opt.items() if k.endswith(".step"))  # one D update
    trained = {k: np.array(v) for k, v in tree_flatten(trainers[0].disc.parameters())}
    assert all(np.array_equal(trained[k], v) for k, v in saved_disc.items())

    # Resume for a second epoch: the discriminator and its optimizer come back from disc_1 / d_opt_1.
    from df_mlx.checkpoint import load_model

    model2, epoch = load_model(str(cp), base.state)
    assert epoch == 1
    _, opt2, losses2, loader2 = _setup(tmp_path, monkeypatch, epochs=2)
    opt2 = base.load_opt(str(cp), model2)
    start = {}
    init = gan.GanTrainer.__init__

    def keep_start(self, disc, opt_disc, *a, **k):
        start["disc"] = {k_: np.array(v) for k_, v in tree_flatten(disc.parameters())}
        start["opt"] = {k_: {n: np.array(x) for n, x in s.items()} for k_, s in opt_disc.state.items()}
        init(self, disc, opt_disc, *a, **k)

    monkeypatch.setattr(gan.GanTrainer, "__init__", keep_start)
    gan.train_loop(model2, opt2, loader2, losses2, str(cp), None, epoch=epoch, resume=True, progress=False)
    assert all(np.array_equal(start["disc"][k], v) for k, v in saved_disc.items())
    assert all(np.array_equal(start["opt"][k.rsplit(".", 1)[0]][k.rsplit(".", 1)[1]], v) for k, v in saved_opt.items())
    assert len(steps) == 4 and steps[2].d_loss is not None
    assert all(float(v) == 2.0 for k, v in _arrays(cp / "d_opt_2.safetensors").items() if k.endswith(".step"))
    assert (cp / "disc_2.safetensors").is_file() and (cp / "opt_2.safetensors").is_file()


def test_gan_start_epoch(tmp_path, monkeypatch):
    """Before GAN_START_EPOCH: df's plain steps, the discriminator untouched but checkpointed."""
    cp = tmp_path / "checkpoints"
    cp.mkdir()
    _small_mpd(monkeypatch)
    steps, trainers = _spy(monkeypatch)
    model, opt, losses, loader = _setup(tmp_path, monkeypatch, epochs=1, start=1)
    gan.train_loop(model, opt, loader, losses, str(cp), None, epoch=0, resume=False, progress=False)
    assert steps == [] and trainers[0].opt_disc.state == {}
    assert (cp / "disc_1.safetensors").is_file() and (cp / "d_opt_1.safetensors").is_file()


@pytest.mark.parametrize("kind, cls", [("mpd", MultiPeriodDiscriminator), ("msd", MultiScaleDiscriminator),
                                       ("combined", CombinedDiscriminator), ("other", CombinedDiscriminator)])
def test_setup_discriminator(tmp_path, kind, cls):
    _load(tmp_path, f"gan_enabled = true\ndiscriminator_type = {kind}\nmpd_periods = 2,5\nmsd_scales = 2\n"
                    "discriminator_spectral_norm = true\n")
    disc = gan.setup_discriminator()
    assert type(disc) is cls
    subs = {"mpd": disc, "msd": disc, "combined": None, "other": None}[kind]
    if subs is None:
        assert disc.mpd.periods == [2, 5] and len(disc.msd.discriminators) == 2
    elif kind == "mpd":
        assert disc.periods == [2, 5]
    else:
        assert len(disc.discriminators) == 2
    assert all("weight_orig" in name for name, _ in tree_flatten(disc.trainable_parameters())
               if not name.endswith("bias"))


def test_gan_disabled_is_df_training(tmp_path):
    _load(tmp_path, "")
    assert gan.setup_discriminator() is None


def test_combined_scores_are_concatenated(tmp_path):
    """A combined discriminator's losses are its MPD's plus its MSD's (the fork raises here)."""
    _load(tmp_path, "[ganloss]\nfactor = 1\n[featurematchingloss]\nfactor = 1\n")
    disc = CombinedDiscriminator(periods=[2], num_scales=1)
    disc.mpd.discriminators = [PeriodDiscriminator(2, channels=(4, 8))]
    from df_mlx.discriminator import ScaleDiscriminator

    disc.msd.discriminators = [ScaleDiscriminator(channels=(4, 16, 16, 16, 16, 16, 4))]
    rng = np.random.default_rng(1)
    real, fake = (mx.array(rng.standard_normal((1, 600)).astype(np.float32)) for _ in range(2))
    loss = gan.GanLoss()
    parts = [loss.generator(d, real, fake)["total"] for d in (disc.mpd, disc.msd)]
    assert np.isclose(float(loss.generator(disc, real, fake)["total"]), float(sum(parts)), rtol=1e-6)
    d_parts = [loss.discriminator(d, real, fake) for d in (disc.mpd, disc.msd)]
    assert np.isclose(float(loss.discriminator(disc, real, fake)), float(sum(d_parts)), rtol=1e-6)


def test_speaker_loss_joins_the_generator_loss(tmp_path):
    """[SpeakerLoss] factor adds the fork's SpeakerContrastiveLoss (enhanced vs clean, no noisy
    audio, as the fork's run_epoch calls it) to the generator's total."""
    import importlib.util

    if importlib.util.find_spec("resemblyzer") is None:
        pytest.skip("needs resemblyzer's pretrained speaker model (pip install --no-deps resemblyzer==0.1.4)")
    from df_mlx.discriminator import ScaleDiscriminator
    from df_mlx.loss import SpeakerContrastiveLoss

    _load(tmp_path, "[ganloss]\nfactor = 1\n[speakerloss]\nfactor = 0.5\nnegative_weight = 0.2\n")
    loss = gan.GanLoss()
    assert (loss.speaker_loss.factor, loss.speaker_loss.negative_weight) == (0.5, 0.2)
    rng = np.random.default_rng(2)
    real, fake = (mx.array(rng.standard_normal((1, 24000)).astype(np.float32) * 0.1) for _ in range(2))
    terms = loss.generator(ScaleDiscriminator(channels=(4, 16, 16, 16, 16, 16, 4)), real, fake)
    want = SpeakerContrastiveLoss(0.5, 0.2)(fake, real)
    assert np.isclose(float(terms["speaker"]), float(want), rtol=1e-6)
    assert np.isclose(float(terms["total"]), float(terms["gen_adv"] + terms["speaker"]), rtol=1e-6)


@pytest.mark.parametrize("ini, match", [("[ganloss]\nfactor = 0\n", "GANLoss"),
                                        ("[ganloss]\nfactor = 1\ntype = wgan\n", "Unknown loss type")])
def test_bad_gan_config(tmp_path, ini, match):
    _load(tmp_path, ini)
    with pytest.raises(ValueError, match=match):
        gan.GanLoss()
