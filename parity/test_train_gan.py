"""df_mlx.train_gan against the DFNet4 fork's own GAN training step: one batch through the
fork's `df.train.run_epoch` with GAN_ENABLED (recorded by parity/fork_gan_step.py: small DFN3
generator, small MPD / MSD discriminators, weight_norm and spectral_norm, LS-GAN and hinge)
and through `GanTrainer.train_epoch` from the same weights and batch. Compared: the lrs both
optimizers stepped with (exactly), every loss (D, G adversarial, feature matching, the GAN
total, df's loss, their sum), every raw gradient of both clip_grad_norm_ calls, every updated
weight, BatchNorm statistic and spectral_norm buffer.
From the committed fixtures, and live against the fork when $DFMLX_FORK_DIR is set."""

import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import df_mlx.train as ours
import df_mlx.train_gan as gan
from converters.layout import _transforms, load_torch_state_dict, mlx_state_dict
from df_mlx.config import config
from parity.fork_gan_step import BATCH_FIELDS, GAN_STEP_OUTPUTS
from parity.fork_recorder import CASES, FIXTURE_DIR, live, load_fixture, record_in_subprocess
from parity.pairs import before_batchnorm
from parity.report import Report, Tolerance, compare

GAN_STEP_CASES = [name for name, case in CASES.items() if case.group == "gan_step"]

# Losses: float32 forward of the generator (parity/test_train.py LOSS), then discriminator
# scores and feature-map means over <= 1e4 terms.
LOSS = Tolerance(1e-6, 1e-5, "float32 model and discriminator forward, then means")
# Raw gradients relative to each tensor's peak: float32 backward through the generator, the
# STFT losses and the discriminators (parity/test_train.py GRAD).
GRAD = Tolerance(1e-7, 1e-3, "float32 backward through generator, STFT losses and discriminators")
# Convs followed by train-mode BatchNorm: the gradient is a difference of near-equal sums
# (parity/test_train.py GRAD_BEFORE_BN).
GRAD_BEFORE_BN = Tolerance(1e-7, 1e-2, "cancellation in the gradient of a conv before train-mode BatchNorm")
# Running statistics and spectral_norm's u, v after the step: momentum 0.1 times float32 batch
# moments; u, v are normalised float32 matrix-vector products.
BUFFERS = Tolerance(1e-6, 1e-5, "float32 batch moments and normalised power-iteration vectors")
# One Adam(W) step moves a weight by lr * g / (|g| + eps) (step 1: m, v bias-corrected to g, g^2):
# where the gradient is resolved (above 10x its GRAD bound) that is lr * sign(g) on both sides,
# up to a float32 rounding of weights of O(1); where it is within float32 noise of zero, up to
# lr either way (parity/test_train.py ADAM_SIGN).
STEP_RESOLVED = Tolerance(2e-7, 0.0, "Adam step of a resolved gradient: lr * sign(g), float32 rounding")
ADAM_SIGN = "Adam: a gradient within float32 rounding of zero steps up to lr either way"


def _load_config(ini: str):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.ini"
        path.write_text(ini)
        config.load(str(path), allow_reload=True)


def _small(disc, kind: str, channels, spectral: bool):
    """The fixture's sub-discriminators at its small widths (parity/fork_gan_step.py)."""
    from df_mlx.discriminator import PeriodDiscriminator, ScaleDiscriminator

    if kind == "mpd":
        disc.discriminators = [PeriodDiscriminator(p, spectral, channels) for p in disc.periods]
    else:
        disc.discriminators = [ScaleDiscriminator(spectral, channels) for _ in disc.discriminators]
    return disc


def _batch(fixture) -> ours.Batch:
    x = dict(zip(BATCH_FIELDS, fixture.inputs))
    cplx = lambda a: mx.array(a[..., 0] + 1j * a[..., 1])  # noqa: E731
    return ours.Batch(cplx(x["speech"]), cplx(x["noisy"]), mx.array(x["feat_erb"]), cplx(x["feat_spec"]),
                      mx.array(x["snr"]), mx.arange(len(x["snr"])))


def _torch_layout(model, grads):
    transforms = _transforms(model)
    out = {}
    for name, g in grads.items():
        if g is not None and name in transforms:
            module, to_torch, _ = transforms[name]
            g = to_torch(g, module)
        out[name] = None if g is None else np.array(g)
    return out


class GanRun:
    """The fixture's step through df_mlx.train_gan: losses, the gradients of both clip calls,
    the final state and the lrs."""

    def __init__(self, fixture, tmp_path: Path, monkeypatch):
        from df_mlx.libdf import DF
        from df_mlx.model import ModelParams, init_model

        case = fixture.case
        _load_config(case["ini"])
        p = ModelParams()
        monkeypatch.setattr(ours, "state", DF(p.sr, p.fft_size, p.hop_size, p.nb_erb, p.min_nb_freqs))
        self.model = init_model(run_df=True)
        load_torch_state_dict(self.model, {k[6:]: v for k, v in fixture.state_dict.items() if k.startswith("model.")})
        self.disc = _small(gan.setup_discriminator(), case["kwargs"]["disc"], case["kwargs"]["channels"],
                           config("DISCRIMINATOR_SPECTRAL_NORM", False, bool, section="train"))
        load_torch_state_dict(self.disc, {k[5:]: v for k, v in fixture.state_dict.items() if k.startswith("disc.")})
        self.opt = ours.load_opt(None, self.model)
        self.opt_disc = gan.load_discriminator_opt(None, self.disc)
        losses = ours.setup_losses()
        trainer = gan.GanTrainer(self.disc, self.opt_disc, gan.GanLoss(), str(tmp_path))
        self.clip_calls, self.results = [], []
        clip = ours.clip_grad_norm_

        def clip_and_record(grads, *args, **kwargs):
            self.clip_calls.append(dict(grads))
            return clip(grads, *args, **kwargs)

        monkeypatch.setattr(ours, "clip_grad_norm_", clip_and_record)
        step = gan.gan_train_step
        monkeypatch.setattr(gan, "gan_train_step", lambda *a, **k: self.results.append(step(*a, **k)) or
                            self.results[-1])
        loader = ours.BatchLoader({"train": _batch(fixture)}, batch_size=len(fixture.inputs[-1]))
        self.loss = trainer.train_epoch(self.model, case["kwargs"]["epoch"], loader, "train", self.opt, losses, None,
                                        ours.setup_lrs(1), ours.setup_wds(1), progress=False)

    def losses(self):
        r = self.results[0]
        return {"d_loss": r.d_loss, "gen_adv": r.gan["gen_adv"], "fm": r.gan["fm"], "gan_g": r.gan["total"],
                "base_loss": r.base_loss, "loss": mx.array(self.loss)}

    def grads(self):
        """Raw gradients by fixture name ("disc.*" from the D step, "model.*" from the G step)."""
        d_grads, g_grads = self.clip_calls
        out = {f"disc.{k}": np.array(v) for k, v in d_grads.items()}
        out.update({f"model.{k}": v for k, v in _torch_layout(self.model, g_grads).items() if v is not None})
        return out

    def state(self):
        out = {f"model.{k}": v for k, v in mlx_state_dict(self.model).items()}
        out.update({f"disc.{k}": v for k, v in mlx_state_dict(self.disc).items()})
        return out



def gan_step_report(fixture, run: GanRun) -> Report:
    report = Report(f"{fixture.case['name']}: one GAN step", fixture.describe())
    fork_lrs = (float(fixture.extra["lr/g"][0]), float(fixture.extra["lr/g"][1]))
    lr_g, lr_d = fork_lrs[0], float(fixture.extra["lr/d"][0])
    ours_lrs = (run.opt.param_groups[0]["lr"], run.opt.param_groups[0]["weight_decay"])
    assert ours_lrs == fork_lrs, f"G lr/wd {ours_lrs} vs the fork's {fork_lrs}"
    assert run.opt_disc.param_groups[0]["lr"] == lr_d, f"D lr {run.opt_disc.param_groups[0]['lr']} vs {lr_d}"
    for name, ref in zip(GAN_STEP_OUTPUTS, fixture.outputs):
        report.add(compare(f"loss.{name}", run.losses()[name], ref, LOSS))
    grads = run.grads()
    assert sorted(grads) == sorted(fixture.grad_params), "parameters with gradients differ from the fork's"
    before_bn = before_batchnorm({k for k in fixture.state_dict})
    grad_rows = {}
    for name, ref in fixture.grad_params.items():
        row = compare(f"grad.{name}", grads[name], ref, GRAD_BEFORE_BN if name in before_bn else GRAD)
        report.add(row)
        grad_rows[name] = row
    state = run.state()
    assert set(state) == set(fixture.state_after), "state names differ from the fork's"
    for name, ref in fixture.state_after.items():
        ours_v, init = np.array(state[name]), fixture.state_dict[name]
        if name not in fixture.grad_params:  # buffers: BatchNorm statistics, spectral_norm u, v
            tol = Tolerance(0.0) if name.endswith("num_batches_tracked") else BUFFERS
            report.add(compare(f"buffer.{name}", ours_v, ref, tol))
            continue
        lr = lr_d if name.startswith("disc.") else lr_g
        report.add(compare(f"param.{name}", ours_v, ref, Tolerance(2 * lr + STEP_RESOLVED.atol, 0.0, ADAM_SIGN)))
        g = fixture.grad_params[name]
        resolved = np.abs(g) > 10 * grad_rows[name].tol.bound(float(np.abs(g).max()))
        if resolved.any():
            report.add(compare(f"step_resolved.{name}", (ours_v - init)[resolved], (ref - init)[resolved],
                               STEP_RESOLVED))
    return report


def _check(fixture, tmp_path, monkeypatch):
    run = GanRun(fixture, tmp_path, monkeypatch)
    report = gan_step_report(fixture, run)
    print(report.table())
    worst = report.worst
    print(f"worst: {worst.name} max abs {worst.max_abs:.3g} (bound {worst.tol.bound(worst.scale):.3g})")
    assert report.passed, report.summary()
    assert sum(r.name.startswith("step_resolved.") for r in report.layers) > 10, "few resolved steps compared"
    return report


def _with_extra(fixture, directory: Path):
    """Attach the fixture's lr records (not part of parity.fork_recorder.Fixture)."""
    from safetensors.numpy import load_file

    t = load_file(str(directory / f"{fixture.case['name']}.safetensors"))
    fixture.extra = {k: v for k, v in t.items() if k.startswith("lr/")}
    return fixture


@pytest.mark.parametrize("name", GAN_STEP_CASES)
def test_gan_step(name, tmp_path, monkeypatch):
    """Losses, both networks' gradients and every weight and buffer after one G/D step."""
    _check(_with_extra(load_fixture(name), FIXTURE_DIR), tmp_path, monkeypatch)


@pytest.mark.parametrize("name", GAN_STEP_CASES)
def test_fixture_is_small(name):
    assert (FIXTURE_DIR / f"{name}.safetensors").stat().st_size < 500_000


def test_gan_step_check_fails_without_discriminator_update(tmp_path, monkeypatch):
    """A discriminator step that computes and clips its gradients but never updates must be
    caught: the D weights, and the generator's GAN terms from the stale discriminator."""

    class NoUpdate:
        def __init__(self, opt):
            self.state = opt.state

        def zero_grad(self):
            pass

        def step(self, model, grads):
            pass

    step = gan.train_discriminator_step
    monkeypatch.setattr(gan, "train_discriminator_step", lambda disc, opt, *a: step(disc, NoUpdate(opt), *a))
    fixture = _with_extra(load_fixture(GAN_STEP_CASES[0]), FIXTURE_DIR)
    report = gan_step_report(fixture, GanRun(fixture, tmp_path, monkeypatch))
    failed = {r.name for r in report.layers if not r.passed}
    assert "loss.gan_g" in failed, report.summary()
    assert any(n.startswith("step_resolved.disc.") for n in failed), report.summary()


@live
@pytest.mark.parametrize("name", GAN_STEP_CASES)
def test_gan_step_live(name, tmp_path, monkeypatch):
    out = tmp_path / "fork"
    record_in_subprocess([name], out)
    _check(_with_extra(load_fixture(name, out), out), tmp_path, monkeypatch)
