"""Adversarial training of the DFNet4 fork (sealad886/DeepFilterNet4 `df.train`, GAN_ENABLED) on
top of df_mlx.train: per training step the generator's forward, one discriminator step on the
clean and the (detached) enhanced waveforms every DISCRIMINATOR_UPDATE_FREQ steps, then the
generator's step on df's loss plus the adversarial and feature-matching terms of the updated
discriminator. Checked against the fork's own run_epoch in parity/test_train_gan.py.

Kept from the fork, with its config keys and defaults: `setup_discriminator` ([train]
GAN_ENABLED, DISCRIMINATOR_TYPE mpd / msd / combined, MPD_PERIODS, MSD_SCALES,
DISCRIMINATOR_SPECTRAL_NORM), `load_discriminator_opt` (AdamW without amsgrad, [optim]
DISCRIMINATOR_LR, DISCRIMINATOR_WEIGHT_DECAY, DISCRIMINATOR_BETAS), `setup_discriminator_lrs`
(cosine from DISCRIMINATOR_LR to DISCRIMINATOR_LR_MIN after DISCRIMINATOR_WARMUP_EPOCHS), the
loss terms of the fork's `Loss` ([GANLoss] factor and type lsgan / vanilla / hinge,
[FeatureMatchingLoss] factor), GAN_START_EPOCH, clipping both networks to norm 1, and a
discriminator checkpoint next to the model's after every epoch.

Different on purpose, where the fork's code cannot run or loses state:
- waveforms: the fork's `synthesize_waveform` transposes [B, T, F] to [B, F, T] before its
  `Istft`, which itself expects [B, T, F], so `torch.istft` raises unless the batch has
  exactly n_fft / 2 + 1 frames; here the spectra go to the Istft of df's losses as [B, T, F].
- DISCRIMINATOR_TYPE combined (the fork's default): its `Loss.run_discriminator` unpacks two
  values from CombinedDiscriminator's four and raises; here the MPD and MSD scores and feature
  maps are concatenated (the losses are sums over discriminators, so this is MPD's plus MSD's).
- checkpoints: the discriminator is `disc` as in the fork, its optimizer `d_opt` (the fork's
  `opt_disc` matches the `opt*` pattern read_cp and cleanup use for the generator's
  optimizer, which may then load or delete the wrong file), and a resumed run reloads the
  discriminator's weights (the fork writes them but never reads them back).
- logging: the mean G and D GAN losses of an epoch are logged once after it, not per LOG_FREQ.
- the generator runs forward twice per GAN step (its running statistics restored after the
  first): MLX has no retained graph to backpropagate after the discriminator's update.
- [SpeakerLoss] adds the fork's SpeakerContrastiveLoss to the generator's loss without the
  noisy audio (the fork's run_epoch passes none); it has no gradient, as in the fork.
"""

import os
import time
from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from loguru import logger
from mlx.utils import tree_flatten, tree_unflatten

from df_mlx import distributed, interrupt, optim
from df_mlx import train as base
from df_mlx.checkpoint import EXTENSION, read_cp, write_cp
from df_mlx.config import Csv, config
from df_mlx.discriminator import CombinedDiscriminator, MultiPeriodDiscriminator, MultiScaleDiscriminator
from df_mlx.logger import log_metrics
from df_mlx.loss import DiscriminatorLoss, FeatureMatchingLoss, GeneratorLoss, Istft, Loss, SpeakerContrastiveLoss
from df_mlx.lr import cosine_scheduler
from df_mlx.utils import as_real

DISC_CP, DISC_OPT_CP = "disc", "d_opt"
# Above this many parameters a discriminator is one of the fork's full-width sets (MPD 41.1M, MSD
# 29.6M, the default CombinedDiscriminator 70.7M; an MPD of 2 periods has 8.2M): on a CPU, tens
# of seconds per step of 2 x 0.5 s (README: Train).
HEAVY_DISCRIMINATOR = 20_000_000


class GanSetupError(base.TrainSetupError):
    """A GAN configuration the fork's training cannot run."""


def setup_discriminator() -> Optional[nn.Module]:
    """The discriminator [train] names, or None without GAN_ENABLED."""
    if not config("GAN_ENABLED", False, bool, section="train"):
        return None
    return build_discriminator()


def build_discriminator() -> nn.Module:
    """The discriminator [train] describes (the fork's keys and defaults; any
    DISCRIMINATOR_TYPE other than mpd / msd is combined, as in the fork)."""
    disc_type = config("DISCRIMINATOR_TYPE", "combined", str, section="train").lower()
    spectral = config("DISCRIMINATOR_SPECTRAL_NORM", False, bool, section="train")
    if disc_type == "mpd":
        periods = config("MPD_PERIODS", [2, 3, 5, 7, 11], Csv(int), section="train")
        disc = MultiPeriodDiscriminator(periods=periods, use_spectral_norm=spectral)
    elif disc_type == "msd":
        disc = MultiScaleDiscriminator(num_scales=config("MSD_SCALES", 3, int, section="train"),
                                       use_spectral_norm=spectral)
    else:
        periods = config("MPD_PERIODS", [2, 3, 5, 7, 11], Csv(int), section="train")
        disc = CombinedDiscriminator(periods=periods, num_scales=config("MSD_SCALES", 3, int, section="train"),
                                     use_spectral_norm=spectral)
    logger.info(f"Initialized {disc_type.upper()} discriminator for GAN training")
    return disc


def load_discriminator_opt(cp_dir: Optional[str], disc: nn.Module, epoch: Union[str, int] = "latest") -> optim.AdamW:
    """The fork's discriminator optimizer (AdamW, no amsgrad), state restored from `cp_dir`."""
    lr = config("DISCRIMINATOR_LR", 2e-4, float, section="optim")
    decay = config("DISCRIMINATOR_WEIGHT_DECAY", 0.0, float, section="optim")
    betas = config("DISCRIMINATOR_BETAS", [0.8, 0.99], Csv(float), section="optim", save=False)
    opt = optim.AdamW([n for n, _ in tree_flatten(disc.trainable_parameters())], lr=lr, weight_decay=decay,
                      betas=betas)
    logger.debug(f"Training discriminator with optimizer {opt}")
    if cp_dir is not None:
        try:
            read_cp(opt, DISC_OPT_CP, cp_dir, log=False, epoch=epoch)
        except (ValueError, FileNotFoundError) as e:
            logger.warning(f"Could not load discriminator optimizer state: {e}")
    for group in opt.param_groups:
        group.setdefault("initial_lr", lr)
    return opt


def setup_discriminator_lrs(steps_per_epoch: int) -> np.ndarray:
    """One discriminator learning rate per global iteration (cosine, optional warm-up)."""
    lr = config("DISCRIMINATOR_LR", 2e-4, float, section="optim")
    lr_min = config("DISCRIMINATOR_LR_MIN", 1e-6, float, section="optim")
    return cosine_scheduler(lr, lr_min, epochs=config.get("max_epochs", int, "train"), niter_per_ep=steps_per_epoch,
                            warmup_epochs=config("DISCRIMINATOR_WARMUP_EPOCHS", 0, int, section="optim"),
                            start_warmup_value=lr_min)


def run_discriminator(disc: nn.Module, wav: mx.array) -> Tuple[List[mx.array], List[List[mx.array]]]:
    """(scores, feature maps) of `disc` on a [B, T] or [B, 1, T] waveform; a combined
    discriminator's MPD and MSD lists are concatenated."""
    out = disc(wav[:, None] if wav.ndim == 2 else wav)
    if len(out) == 4:
        return out[0] + out[2], out[1] + out[3]
    return out


class GanLoss:
    """The GAN terms of the fork's `Loss`: the generator's adversarial loss ([GANLoss] factor,
    type) plus feature matching ([FeatureMatchingLoss] factor), and the discriminator's loss
    (factor 1). Both need [GANLoss] factor > 0, or the discriminator has nothing to learn."""

    def __init__(self):
        gan_f = config("factor", 0, float, section="GANLoss")
        gan_type = config("type", "lsgan", str, section="GANLoss")
        fm_f = config("factor", 0, float, section="FeatureMatchingLoss")
        speaker_f = config("factor", 0, float, section="SpeakerLoss")
        self.speaker_loss = None
        if speaker_f > 0:
            negative_weight = config("negative_weight", 0.1, float, section="SpeakerLoss")
            self.speaker_loss = SpeakerContrastiveLoss(factor=speaker_f, negative_weight=negative_weight)
        if gan_f <= 0:
            raise GanSetupError("GAN_ENABLED needs [GANLoss] factor > 0 (the discriminator loss is zero without it)")
        self.gen_loss = GeneratorLoss(loss_type=gan_type, factor=gan_f)
        self.disc_loss = DiscriminatorLoss(loss_type=gan_type, factor=1.0)
        self.fm_loss = FeatureMatchingLoss(factor=fm_f) if fm_f > 0 else None

    def discriminator(self, disc, real_wav: mx.array, fake_wav: mx.array) -> mx.array:
        real_scores, _ = run_discriminator(disc, real_wav)
        fake_scores, _ = run_discriminator(disc, fake_wav)
        return self.disc_loss(real_scores, fake_scores)[0]

    def generator(self, disc, real_wav: mx.array, fake_wav: mx.array) -> Dict[str, mx.array]:
        """{"gen_adv", "fm" (with a feature-matching factor), "speaker" (with a speaker-loss
        factor), "total"}."""
        _, real_fmaps = run_discriminator(disc, real_wav)
        fake_scores, fake_fmaps = run_discriminator(disc, fake_wav)
        out = {"gen_adv": self.gen_loss(fake_scores)}
        if self.fm_loss is not None:
            out["fm"] = self.fm_loss(real_fmaps, fake_fmaps)
        if self.speaker_loss is not None:
            out["speaker"] = self.speaker_loss(fake_wav, real_wav)
        out["total"] = sum(out.values())
        return out


def synthesize_waveform(spec: mx.array, istft: Istft) -> mx.array:
    """[B, T] waveform of a [B, 1, T, F(, 2)] spectrum (see the module docstring)."""
    return istft(spec[:, 0])


def train_discriminator_step(disc, opt_disc: optim.Optimizer, gan: GanLoss, real_wav: mx.array,
                             fake_wav: mx.array) -> mx.array:
    """One discriminator step: its loss, gradients clipped to norm 1 (a non-finite norm raises
    RuntimeError before the update), AdamW. Returns the loss."""
    opt_disc.zero_grad()
    d_loss, grads = nn.value_and_grad(disc, lambda: distributed.weigh(gan.discriminator(disc, real_wav, fake_wav)))()
    d_loss, grads = distributed.average_gradients(d_loss, grads)
    clipped, _ = base.clip_grad_norm_(dict(tree_flatten(grads)), 1.0, error_if_nonfinite=True)
    opt_disc.step(disc, clipped)
    mx.eval(d_loss, disc.parameters(), opt_disc.state)
    distributed.step_done()
    return d_loss


@dataclass
class GanStepResult(base.StepResult):
    d_loss: Optional[mx.array] = None  # None when the discriminator was not updated this step
    gan: Optional[Dict[str, mx.array]] = None  # the generator's GAN terms (GanLoss.generator)
    base_loss: Optional[mx.array] = None  # df's loss without the GAN terms


def gan_train_step(model, disc, opt: optim.Optimizer, opt_disc: optim.Optimizer, losses: Loss, gan: GanLoss,
                   batch: base.Batch, update_disc: bool = True) -> GanStepResult:
    """The fork's GAN step: generator forward, the discriminator's step on the clean and the
    detached enhanced waveforms (if `update_disc`), then the generator's step on df's loss plus
    the GAN terms of the updated discriminator (gradients clipped to norm 1). Under mlx.launch
    on this rank's share of the global batch, both losses weighted by its size."""
    with distributed.share_of(batch.global_size):
        return _gan_step(model, disc, opt, opt_disc, losses, gan, batch, update_disc)


def _gan_step(model, disc, opt: optim.Optimizer, opt_disc: optim.Optimizer, losses: Loss, gan: GanLoss,
              batch: base.Batch, update_disc: bool) -> GanStepResult:
    opt.zero_grad()
    opt_disc.zero_grad()
    istft = losses.istft
    if istft is None:
        raise ValueError("GAN training needs the Istft of df_mlx.train.setup_losses")
    clean_wav = distributed.own(synthesize_waveform(batch.speech, istft))  # without padding items
    d_loss = None
    if update_disc:
        before = tree_flatten(model.parameters())  # the forward below must not count in BatchNorm's statistics
        enh = model(spec=as_real(batch.noisy), feat_erb=batch.feat_erb, feat_spec=as_real(batch.feat_spec))[0]
        enh_wav = mx.stop_gradient(distributed.own(synthesize_waveform(enh, istft)))
        mx.eval(enh_wav)
        model.update(tree_unflatten(before))
        d_loss = train_discriminator_step(disc, opt_disc, gan, clean_wav, enh_wav)
        interrupt.check()

    def total():
        err, outputs = base.forward_loss(model, losses, batch)
        terms = gan.generator(disc, clean_wav, distributed.own(synthesize_waveform(outputs[0], istft)))
        return distributed.weigh(err + terms["total"]), (outputs, err, terms)

    (err, (outputs, base_loss, terms)), grads = nn.value_and_grad(model, total)()
    err, grads = distributed.average_gradients(err, grads)
    grads = base._none_if_unreached(dict(tree_flatten(grads)))
    clipped, norm = base.clip_grad_norm_(grads, 1.0, error_if_nonfinite=True)
    opt.step(model, clipped)
    mx.eval(err, model.parameters(), opt.state, disc.parameters())
    distributed.step_done()
    return GanStepResult(err, norm, grads, outputs, d_loss, terms, base_loss)


class GanTrainer:
    """The discriminator, its optimizer and the GAN losses; `train_epoch` is the fork's
    run_epoch for training (df_mlx.train.train_loop's `train_epoch` hook)."""

    def __init__(self, disc, opt_disc: optim.Optimizer, gan: GanLoss, checkpoint_dir: str):
        self.disc, self.opt_disc, self.gan, self.checkpoint_dir = disc, opt_disc, gan, checkpoint_dir
        self.start_epoch = config("GAN_START_EPOCH", 0, int, section="train")
        self.first_step_timed = False
        n_params = sum(v.size for _, v in tree_flatten(disc.parameters()))
        logger.info(f"GAN training enabled, starting at epoch {self.start_epoch}; discriminator "
                    f"{type(disc).__name__} with {n_params / 1e6:.1f}M parameters")
        if n_params > HEAVY_DISCRIMINATOR and mx.default_device() == mx.cpu:
            logger.warning(
                f"{type(disc).__name__} ({n_params / 1e6:.1f}M parameters, the fork's full width) is slow on a CPU: "
                "one discriminator step on 2 x 0.5 s of 48 kHz audio took 18-80 s on 2 cores (README: Train), "
                "[train] discriminator_type = mpd with mpd_periods = 2 about 2 s. The first step's time is logged.")

    def _log_step_time(self, seconds: float, n_steps: int):
        """The measured cost of GAN training, once, so that a slow discriminator is not silent."""
        self.first_step_timed = True
        logger.info(f"First GAN step (generator and discriminator): {seconds:.1f} s; {n_steps} steps per epoch: "
                    f"about {seconds * n_steps / 60:.1f} min")

    def train_epoch(self, model, epoch: int, loader, split: str, opt: optim.Optimizer, losses: Loss,
                    summary_dir: Optional[str], lr_scheduler_values=None, wd_scheduler_values=None,
                    progress: bool = True) -> float:
        """A training epoch: GAN steps from GAN_START_EPOCH on (plain df steps before), then the
        discriminator's checkpoints. Returns the mean generator loss."""
        self.disc.train(split == "train")
        step = None
        mem: Dict[str, List[mx.array]] = {"gan_g": [], "gan_d": []}
        if split == "train" and epoch >= self.start_epoch:
            disc_lrs = setup_discriminator_lrs(len(loader))
            freq = config("DISCRIMINATOR_UPDATE_FREQ", 1, int, section="train")

            def gan_step(batch, i, it):
                for group in self.opt_disc.param_groups:
                    group["lr"] = disc_lrs[it] * group.get("lr_scale", 1)
                start = time.perf_counter()
                result = gan_train_step(model, self.disc, opt, self.opt_disc, losses, self.gan, batch, i % freq == 0)
                if not self.first_step_timed:
                    self._log_step_time(time.perf_counter() - start, loader.len(split))
                if result.d_loss is not None:
                    mem["gan_d"].append(result.d_loss)
                mem["gan_g"].append(result.gan["total"])
                return result

            step = gan_step

        loss = base.run_epoch(model, epoch, loader, split, opt, losses, summary_dir, lr_scheduler_values,
                              wd_scheduler_values, progress, step=step)
        if mem["gan_g"]:
            log_metrics(f"[{epoch}] [train GAN]", {k: float(mx.stack(v).mean().item()) for k, v in mem.items() if v})
        with interrupt.writing():  # kept to the model's history rule: [train] n_checkpoint_history
            distributed.on_writer(write_cp, self.disc, DISC_CP, self.checkpoint_dir, epoch + 1)
            distributed.on_writer(write_cp, self.opt_disc, DISC_OPT_CP, self.checkpoint_dir, epoch + 1)
        return loss


def train_loop(model, opt: optim.Optimizer, loader, losses: Loss, checkpoint_dir: str, summary_dir: Optional[str],
               epoch: int = 0, resume: bool = True, progress: bool = True,
               config_file: Optional[str] = None) -> Tuple[Optional[float], int]:
    """df_mlx.train.train_loop with the discriminator of [train] GAN_ENABLED (resumed from
    `checkpoint_dir` unless `resume` is False); without it, df_mlx.train.train_loop as is.
    `config_file` receives the GAN keys' defaults."""
    disc = setup_discriminator()
    if disc is None:
        return base.train_loop(model, opt, loader, losses, checkpoint_dir, summary_dir, epoch, resume, progress)
    # The generator resumes from `epoch` (df_mlx.train.resumable_epoch); the discriminator from
    # the same epoch, whose disc/d_opt files are written before the model's.
    disc_epoch = epoch if os.path.isfile(os.path.join(checkpoint_dir, f"{DISC_CP}_{epoch}.{EXTENSION}")) else "latest"
    if resume:
        read_cp(disc, DISC_CP, checkpoint_dir, epoch=disc_epoch)
    trainer = GanTrainer(disc, load_discriminator_opt(checkpoint_dir if resume else None, disc, disc_epoch), GanLoss(),
                         checkpoint_dir)
    distributed.check_same_start(epoch, disc=dict(tree_flatten(disc.parameters())),
                                 d_opt=dict(tree_flatten(trainer.opt_disc.state)))
    if config_file is not None:
        distributed.on_writer(config.save, config_file)
    return base.train_loop(model, opt, loader, losses, checkpoint_dir, summary_dir, epoch, resume, progress,
                           train_epoch=trainer.train_epoch)


def main(data_config_file: str, data_dir: str, base_dir: str, resume: bool = True, log_level: Optional[str] = None,
         debug_: bool = False, progress: bool = True, start_over: bool = False) -> Tuple[Optional[float], int]:
    """df_mlx.train.main with this module's train_loop (GAN training when the config enables it)."""
    loop = partial(train_loop, config_file=os.path.join(base_dir, "config.ini"))
    return base.main(data_config_file, data_dir, base_dir, resume, log_level, debug_, progress, loop=loop,
                     start_over=start_over)
