"""Record one GAN training step of the DFNet4 fork's own `df.train.run_epoch` (the recording
side of parity/test_train_gan.py; `parity.fork_recorder` calls `record_gan_step` for the
cases of group "gan_step").

The fork builds the model, the losses (its `setup_losses`, which builds the discriminator of
the case's config), both optimizers and both lr schedules with its own functions, and trains
one batch in its run_epoch, which runs `train_discriminator_step`, the generator's GAN terms,
clip_grad_norm_ and the AdamW steps. Two substitutions, both recorded in the fixture:
- the sub-discriminators are rebuilt with the case's small `channels` (the fork's Multi*
  classes fix 1024-channel widths: 4-10M parameters each);
- `synthesize_waveform` is the fork's `Istft` on the [B, T, F] spectrum: the fork's own
  transposes it to [B, F, T] first and torch.istft raises (see df_mlx/train_gan.py).
The fixture holds, besides the inputs (the batch) and the initial state of model and
discriminator (`state_dict/model.*`, `state_dict/disc.*`): `output/<i>` the losses of
GAN_STEP_OUTPUTS, `grad/param/*` the raw gradients each clip_grad_norm_ saw, `state_after/*`
every parameter and buffer after the step, and `lr/g`, `lr/d` the learning rates stepped with.
"""

import json
import sys
import tempfile
import types
from pathlib import Path
from typing import Dict

import numpy as np

# The losses of one step, in the order of output/<i>.
GAN_STEP_OUTPUTS = ("d_loss", "gen_adv", "fm", "gan_g", "base_loss", "loss")
BATCH_FIELDS = ("speech", "noisy", "feat_erb", "feat_spec", "snr")


def _import_fork_train(import_ref):
    """The fork's df.train, with torchaudio and libdfdata (not installed; used only by
    summary_write and as the loader's type) stubbed for the import."""
    added = [n for n in ("torchaudio", "libdfdata") if n not in sys.modules]
    for name in added:
        sys.modules[name] = types.ModuleType(name)
    if "libdfdata" in added:
        sys.modules["libdfdata"].PytorchDataLoader = None
    try:
        return import_ref("train")
    finally:
        for name in added:
            del sys.modules[name]


def make_batch(df_state, nb_df: int, norm_alpha: float, batch: int, frames: int, hop: int,
               rng) -> Dict[str, np.ndarray]:
    """Random clean and noise audio mixed at 0 and 10 dB, with libdf's spectra and features."""
    import libdf

    n = frames * hop
    clean = (0.1 * rng.standard_normal((batch, n))).astype(np.float32)
    noise = rng.standard_normal((batch, n)).astype(np.float32)
    snrs = np.array([0.0, 10.0] * batch, np.float32)[:batch]
    gain = np.sqrt(np.mean(clean**2, -1) / np.mean(noise**2, -1) / 10 ** (snrs / 10)).astype(np.float32)
    noisy = clean + gain[:, None] * noise
    speech, noisy_spec = df_state.analysis(clean), df_state.analysis(noisy)
    feat_erb = libdf.erb_norm(libdf.erb(noisy_spec, df_state.erb_widths()), norm_alpha)
    feat_spec = libdf.unit_norm(noisy_spec[..., :nb_df], norm_alpha)
    real = lambda x: np.ascontiguousarray(np.stack([x.real, x.imag], -1)[:, None], np.float32)  # noqa: E731
    return {"speech": real(speech), "noisy": real(noisy_spec), "feat_erb": feat_erb[:, None].astype(np.float32),
            "feat_spec": real(feat_spec), "snr": snrs}


def _small_discriminators(disc, kind: str, channels, spectral: bool, import_ref):
    """Replace the fork's fixed-width sub-discriminators by ones with `channels`."""
    import torch

    d = import_ref("discriminator")
    if kind == "mpd":
        subs = [d.PeriodDiscriminator(p, use_spectral_norm=spectral, channels=list(channels)) for p in disc.periods]
    elif kind == "msd":
        subs = [d.ScaleDiscriminator(use_spectral_norm=spectral, channels=list(channels))
                for _ in disc.discriminators]
    else:
        raise ValueError(f"gan_step cases build an mpd or msd discriminator, not {kind!r}")
    disc.discriminators = torch.nn.ModuleList(subs)
    return disc


def record_gan_step(case, import_ref, fork_path: Path, out_dir: Path) -> Path:
    import libdf
    import torch
    from safetensors.numpy import save_file

    from parity.fork_recorder import FORMAT, _git_commit, _perturb_constant_init
    from parity.pairs import randomize_norm_stats

    cfg = import_ref("config").config
    with tempfile.TemporaryDirectory() as tmp:
        ini = Path(tmp) / "config.ini"
        ini.write_text(case.ini)
        cfg.load(str(ini), allow_reload=True)
    train = _import_fork_train(import_ref)
    p = import_ref("model").ModelParams()
    state = libdf.DF(sr=p.sr, fft_size=p.fft_size, hop_size=p.hop_size, nb_bands=p.nb_erb,
                     min_nb_erb_freqs=p.min_nb_freqs)
    train.state = state
    torch.manual_seed(case.seed)
    model = import_ref(case.kwargs["model"]).init_model(state, run_df=True)
    randomize_norm_stats(model, case.seed)
    _perturb_constant_init(model, case.seed)
    losses = train.setup_losses()  # builds train.istft and train.discriminator from the config
    disc = _small_discriminators(train.discriminator, case.kwargs["disc"], case.kwargs["channels"],
                                 cfg("DISCRIMINATOR_SPECTRAL_NORM", False, bool, section="train"), import_ref)
    _perturb_constant_init(disc, case.seed + 1)
    losses.discriminator = disc
    (batch_size, frames), = case.inputs
    rng = np.random.default_rng(case.seed)
    batch = make_batch(state, p.nb_df, import_ref("utils").get_norm_alpha(False), batch_size, frames,
                       p.hop_size, rng)
    epoch = case.kwargs["epoch"]

    class Batch:
        speech = torch.view_as_complex(torch.from_numpy(batch["speech"]))
        noisy = torch.view_as_complex(torch.from_numpy(batch["noisy"]))
        feat_erb = torch.from_numpy(batch["feat_erb"])
        feat_spec = torch.view_as_complex(torch.from_numpy(batch["feat_spec"]))
        snr = torch.from_numpy(batch["snr"])
        ids, timings = torch.arange(batch_size), None

    class Loader:
        def get_batch_size(self, split):
            return batch_size

        def len(self, split):
            return 1

        def iter_epoch(self, split, seed):
            return iter([Batch()])

    def synthesize_waveform(spec, df_state):
        return train.istft(spec.squeeze(1))

    train.synthesize_waveform = synthesize_waveform
    train.summary_write = train.summary_noop
    opt, opt_disc = train.load_opt(None, model), train.load_discriminator_opt(None, disc)
    initial = {f"model.{k}": v.detach().numpy().copy() for k, v in model.state_dict().items()}
    initial.update({f"disc.{k}": v.detach().numpy().copy() for k, v in disc.state_dict().items()})
    names = {id(t): f"model.{n}" for n, t in model.named_parameters()}
    names.update({id(t): f"disc.{n}" for n, t in disc.named_parameters()})

    rec: Dict[str, float] = {}
    grads: Dict[str, np.ndarray] = {}

    def keep(name, fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            rec[name] = float(out.detach())
            return out
        return wrapped

    clip = train.clip_grad_norm_

    def clip_and_record(params, *args, **kwargs):
        params = list(params)
        grads.update({names[id(t)]: t.grad.numpy().copy() for t in params if t.grad is not None})
        return clip(params, *args, **kwargs)

    train.clip_grad_norm_ = clip_and_record
    train.train_discriminator_step = keep("d_loss", train.train_discriminator_step)
    losses.gen_loss.forward = keep("gen_adv", losses.gen_loss.forward)
    losses.fm_loss.forward = keep("fm", losses.fm_loss.forward)
    losses.compute_g_loss_with_disc = keep("gan_g", losses.compute_g_loss_with_disc)
    losses.forward = keep("base_loss", losses.forward)
    lrs, wds, disc_lrs = train.setup_lrs(1), train.setup_wds(1), train.setup_discriminator_lrs(1)
    with tempfile.TemporaryDirectory() as summaries:
        rec["loss"] = train.run_epoch(model, epoch, Loader(), "train", opt, losses, summaries, lrs, wds,
                                      opt_disc=opt_disc, disc_lr_values=disc_lrs, gan_start_epoch=0)

    tensors = {f"state_dict/{k}": v for k, v in initial.items()}
    tensors.update({f"input/{i}": batch[k] for i, k in enumerate(BATCH_FIELDS)})
    tensors.update({f"output/{i}": np.array(rec[k], np.float32) for i, k in enumerate(GAN_STEP_OUTPUTS)})
    tensors.update({f"grad/param/{k}": v for k, v in grads.items()})
    after = {f"model.{k}": v for k, v in model.state_dict().items()}
    after.update({f"disc.{k}": v for k, v in disc.state_dict().items()})
    tensors.update({f"state_after/{k}": v.detach().numpy().copy() for k, v in after.items()})
    tensors["lr/g"] = np.array([opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]], np.float64)
    tensors["lr/d"] = np.array([opt_disc.param_groups[0]["lr"], opt_disc.param_groups[0]["weight_decay"]], np.float64)
    st_path = Path(out_dir) / f"{case.name}.safetensors"
    save_file({k: np.array(v, order="C") for k, v in tensors.items()}, str(st_path))
    meta = {
        "format": FORMAT,
        "case": {"name": case.name, "module": case.module, "kwargs": case.kwargs, "ini": case.ini,
                 "inputs": [list(s) for s in case.inputs], "seed": case.seed, "description": case.description,
                 "group": case.group},
        "fork": {"repository": "https://github.com/sealad886/DeepFilterNet4", "commit": _git_commit(fork_path),
                 "module_file": "df/train.py"},
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_class": f"{type(model).__module__}.{type(model).__name__} + {type(disc).__name__}",
        "inputs": {k: list(batch[k].shape) for k in BATCH_FIELDS},
        "outputs": list(GAN_STEP_OUTPUTS),
        "trace": [],
        "untraceable": [],
        "grads": {"params": sorted(grads)},
        "bytes": st_path.stat().st_size,
    }
    (Path(out_dir) / f"{case.name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    return st_path
