"""df_mlx.train against df.train: the optimizer load_opt builds, the training step (loss, every
gradient, clipping, every updated weight and BatchNorm statistic), ten steps under the lr/wd
schedules, and the epoch loop's decisions (checkpoints, best model, early stopping, batch-size
scheduling) over scripted validation losses.

The reference side runs df.train's own functions (load_opt, setup_lrs, setup_wds, run_epoch,
main) with libdfdata's loader replaced by one that serves the same in-memory batches:
df.train imports torchaudio and libdfdata, neither installed here, so both are stubbed while it
is imported (only `torchaudio.save` in summary_write, disabled here, and the loader class, which
the tests replace, are used from them).
"""

import sys
import types
from pathlib import Path

import mlx.core as mx
import mlx.nn as mnn
import numpy as np
import pytest
import torch
from mlx.utils import tree_map

import df_mlx.train as ours
from converters.layout import _transforms, mlx_state_dict
from df_mlx import optim as ours_optim
from parity.models import VARIANTS, _ini
from parity.pairs import before_batchnorm
from parity.reference import import_ref, load_configs, load_reference
from parity.report import Report, Tolerance, compare


def _import_ref_train():
    """df.train with torchaudio and libdfdata stubbed for the import only."""
    load_reference()
    added = []
    for name in ("torchaudio", "libdfdata"):
        if name not in sys.modules:
            sys.modules[name] = types.ModuleType(name)
            added.append(name)
    if "libdfdata" in added:
        sys.modules["libdfdata"].PytorchDataLoader = None  # replaced per test
    try:
        return import_ref("train")
    finally:
        for name in added:
            del sys.modules[name]


ref = _import_ref_train()
ref_checkpoint = import_ref("checkpoint")

# Optimizer alone, identical gradients: torch fuses multiply-adds (lerp, add with alpha) and its
# CPU sqrt is not correctly rounded (~1.5 ulp); MLX rounds each operation exactly. One rounding
# of a moment changes an Adam step by ~1e-7 relative, i.e. lr * 1e-7 on the weights.
OPT_STEP = Tolerance(1e-9, 2e-7, "float32: torch's FMA and approximate sqrt vs MLX's exact ops")
# Loss of the whole model: float32 forward of the twin models (parity/models.py LAYER) and the
# loss's own means (parity/test_loss.py VALUE).
LOSS = Tolerance(1e-6, 1e-5, "float32 model forward then means over ~1e5 terms")
# Gradients of the loss w.r.t. every weight, relative to the layer's largest entry: float32
# rounding of the backward through model, STFT losses and GRU steps (torch float32 itself is
# up to 3e-4 from float64 on the same layers).
GRAD = Tolerance(1e-7, 1e-3, "float32 backward through model, STFT losses and GRU steps")
# The total norm is dominated by the largest gradients, each within GRAD (measured 1.1e-5 relative).
GRAD_NORM = Tolerance(0.0, 1e-4, "2-norm of all gradients, each with float32 backward rounding")


def _assert(report: Report):
    print(report.table())
    assert report.passed, report.summary()
# Train-mode BatchNorm subtracts the batch mean, so the gradient of the conv before it is a
# difference of near-equal sums; MLX's single-accumulator mean/var (5-9x torch's float32 error
# measured on BatchNorm2d alone) is amplified there (measured worst 2.6e-3 of the layer's peak).
GRAD_BEFORE_BN = Tolerance(1e-7, 1e-2, "cancellation in the gradient of a conv before train-mode BatchNorm")
# Running statistics after one step: momentum 0.1 times a float32 batch mean/variance.
BN_STATS = Tolerance(1e-6, 1e-5, "0.1 x float32 batch mean/variance of conv outputs")
# MLX's steps against torch's clip_grad_norm_ and optimizer replayed on MLX's own gradients:
# the update formulas alone (OPT_STEP) plus the clip coefficient's rounding.
STEP = Tolerance(1e-6, 0.0, "torch's clipping and update replayed on MLX's gradients")
# One free step against torch's own: Adam moves a weight by lr * g / (|g| + eps), so an entry
# whose gradient is within float32 rounding of zero may step up to lr either way: 2 * lr.
ADAM_SIGN = "Adam: a gradient within float32 rounding of zero steps up to lr either way"
# Ten free steps: float32 training is chaotic (torch float32 drifts from torch float64 by up to
# 1e-2 in loss after 10 steps of DFN2 here); MLX may be this many times further from torch float32
# than torch float32 is from float64, per kind of quantity (losses, weights, BatchNorm statistics).
# 20: MLX's float32 rounding is up to ~10x torch's at the convs before BatchNorm (GRAD_BEFORE_BN).
DRIFT_FACTOR = 20.0

TRAIN_INI = """[optim]
lr = 0.001
weight_decay = 0.05
weight_decay_end = 0.1
lr_warmup = 0.0001
warmup_epochs = 1
[localsnrloss]
factor = 1e-3
[multiresspecloss]
factor = 500
factor_complex = 500
gamma = 0.3
fft_sizes = 256,512
"""
TRAIN_KEYS = "max_epochs = 3\nbatch_size = 2\n"
SECONDS = 0.3  # 30 frames per sample: enough for every STFT loss size, fast on 2 cores


def _configure(family: str, variant, tmp_path: Path, extra: str = TRAIN_INI, train_keys: str = TRAIN_KEYS):
    ini = _ini(family, variant.ini).replace("[train]\n", "[train]\n" + train_keys, 1) + "\n" + extra
    load_configs(ini, tmp_path)
    return ini


def _twins(family: str, variant, seed: int = 0):
    """Both models from the loaded config, torch's random weights (and BatchNorm statistics)
    copied into MLX; both DF states as df.train builds them."""
    import importlib

    import libdf

    from df_mlx.libdf import DF
    from parity.pairs import randomize_norm_stats, twin

    mlx_family = importlib.import_module(f"df_mlx.{family}")
    p = mlx_family.ModelParams()
    torch.manual_seed(seed)
    ref_state = libdf.DF(sr=p.sr, fft_size=p.fft_size, hop_size=p.hop_size, nb_bands=p.nb_erb,
                         min_nb_erb_freqs=p.min_nb_freqs)
    ref_model = randomize_norm_stats(import_ref(family).init_model(ref_state, run_df=variant.run_df), seed)
    mlx_model = mlx_family.init_model(run_df=variant.run_df)
    twin(ref_model, mlx_model)
    return ref_model, mlx_model, ref_state, DF(p.sr, p.fft_size, p.hop_size, p.nb_erb, p.min_nb_freqs), p


def _samples(df_state, p, n: int, seed: int = 0) -> ours.Batch:
    """n mixtures of synthesised speech and recorded noise (tests/data) at SNRs from -5 to 20
    dB, with df's features (df_mlx.train.make_batch)."""
    import soundfile as sf

    data = Path(__file__).resolve().parent.parent / "tests" / "data"
    speech, _ = sf.read(data / "speech_espeak_48k.wav", dtype="float32")
    noise, _ = sf.read(data / "noise_freesound_573577.wav", dtype="float32")
    m = int(SECONDS * p.sr)
    rng = np.random.default_rng(seed)
    clean = np.stack([speech[o : o + m] for o in rng.integers(0, len(speech) - m, n)])
    noisy = np.stack([noise[o : o + m] for o in rng.integers(0, len(noise) - m, n)])
    return ours.make_batch(clean, noisy, rng.choice([-5, 0, 5, 10, 20], n), df_state, p.nb_df)


class _TorchBatch:
    """A libdfdata batch (torch tensors) holding the same data as an MLX batch."""

    def __init__(self, b: ours.Batch, dtype=torch.float32):
        def t(x):
            x = torch.from_numpy(np.array(x))
            return x.to(torch.complex128 if x.is_complex() else dtype) if dtype == torch.float64 else x

        self.speech, self.noisy, self.feat_erb, self.feat_spec, self.snr = (
            t(x) for x in (b.speech, b.noisy, b.feat_erb, b.feat_spec, b.snr))
        self.ids, self.timings = torch.from_numpy(np.array(b.ids)), None


class _TorchLoader:
    """libdfdata's loader methods over a df_mlx BatchLoader: both sides see the same batches."""

    def __init__(self, loader: ours.BatchLoader, dtype=torch.float32):
        self.loader, self.dtype = loader, dtype

    def get_batch_size(self, split):
        return self.loader.get_batch_size(split)

    def len(self, split):
        return self.loader.len(split)

    def iter_epoch(self, split, seed):
        return (_TorchBatch(b, self.dtype) for b in self.loader.iter_epoch(split, seed))


def _torch_layout(mlx_model, grads):
    """{name: MLX-layout array or None} -> {name: torch-layout numpy array or None}."""
    transforms = _transforms(mlx_model)

    def convert(name, g):
        if g is None:
            return None
        if name in transforms:
            module, to_torch, _ = transforms[name]
            g = to_torch(g, module)
        return np.array(g)

    return {k: convert(k, g) for k, g in grads.items()}



def _grads_of(model):
    return {n: p.grad.detach().numpy().copy() for n, p in model.named_parameters() if p.grad is not None}


class _Run:
    """`steps` batches through df.train.run_epoch and df_mlx.train.run_epoch from twin models,
    recording per step the loss, raw gradients and their norm, the gradients each optimizer
    received, and the lr and weight decay it stepped with. With `float64`, torch also trains a
    float64 copy, to measure float32's own drift."""

    def __init__(self, family, variant, steps, epoch, tmp_path, monkeypatch, float64=False):
        _configure(family, variant, tmp_path)
        self.ref_model, self.mlx_model, ref_state, mlx_state, p = _twins(family, variant)
        self.init = {k: v.clone() for k, v in self.ref_model.state_dict().items()}
        loader = ours.BatchLoader({"train": _samples(mlx_state, p, 2 * steps)}, batch_size=2)
        monkeypatch.setattr(ref, "state", ref_state)
        monkeypatch.setattr(ours, "state", mlx_state)
        monkeypatch.setattr(ref, "summary_write", ref.summary_noop)
        self.lrs, self.wds = ref.setup_lrs(len(loader)), ref.setup_wds(len(loader))
        mlx_lrs, mlx_wds = ours.setup_lrs(len(loader)), ours.setup_wds(len(loader))
        assert np.array_equal(mlx_lrs, self.lrs) and np.array_equal(mlx_wds, self.wds)
        self.f64 = self._run_float64(loader, epoch, tmp_path) if float64 else None
        self.ref_opt, self.mlx_opt = ref.load_opt(None, self.ref_model), ours.load_opt(None, self.mlx_model)
        self.ref_rec, self.mlx_rec = self._record_ref(monkeypatch), self._record_mlx(monkeypatch)
        ref_losses = ref.setup_losses()
        forward = ref_losses.forward
        ref_losses.forward = lambda *a, **k: self._keep(self.ref_rec["loss"], forward(*a, **k))
        self.ref_epoch_loss = ref.run_epoch(self.ref_model, epoch, _TorchLoader(loader), "train", self.ref_opt,
                                            ref_losses, str(tmp_path), self.lrs, self.wds)
        self.mlx_epoch_loss = ours.run_epoch(self.mlx_model, epoch, loader, "train", self.mlx_opt,
                                             ours.setup_losses(), None, mlx_lrs, mlx_wds, progress=False)

    @staticmethod
    def _keep(store, value):
        store.append(float(value.detach()))
        return value

    def _run_float64(self, loader, epoch, tmp_path):
        """The same epoch in torch float64 from the same weights: losses and final state."""
        import copy

        model = copy.deepcopy(self.ref_model).double()
        opt, losses = ref.load_opt(None, model), []
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)  # df creates some tensors with the default dtype
        try:
            loss = ref.setup_losses().double()
            forward = loss.forward
            loss.forward = lambda *a, **k: self._keep(losses, forward(*a, **k))
            ref.run_epoch(model, epoch, _TorchLoader(loader, torch.float64), "train", opt, loss, str(tmp_path),
                          self.lrs, self.wds)
        finally:
            torch.set_default_dtype(default)
        return {"loss": losses, "state": {k: v.numpy() for k, v in model.state_dict().items()}}

    def _record_ref(self, monkeypatch):
        rec = {"loss": [], "grads": [], "norm": [], "clipped": [], "lr_wd": []}
        clip, model, opt = ref.clip_grad_norm_, self.ref_model, self.ref_opt

        def clip_and_record(params, *args, **kwargs):
            rec["grads"].append(_grads_of(model))
            total = clip(params, *args, **kwargs)
            rec["norm"].append(float(total))
            return total

        step = opt.step

        def step_and_record(*args, **kwargs):
            rec["clipped"].append(_grads_of(model))
            rec["lr_wd"].append((opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]))
            return step(*args, **kwargs)

        monkeypatch.setattr(ref, "clip_grad_norm_", clip_and_record)
        opt.step = step_and_record
        return rec

    def _record_mlx(self, monkeypatch):
        rec = {"loss": [], "grads": [], "norm": [], "clipped": [], "lr_wd": []}
        train_step, model, opt = ours.train_step, self.mlx_model, self.mlx_opt

        def step_and_record(*args, **kwargs):
            result = train_step(*args, **kwargs)
            rec["loss"].append(float(result.loss))
            rec["norm"].append(float(result.grad_norm))
            rec["grads"].append(_torch_layout(model, result.grads))
            return result

        opt_step = opt.step

        def opt_step_and_record(model_, grads):
            rec["clipped"].append(_torch_layout(model, dict(grads)))
            rec["lr_wd"].append((opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]))
            return opt_step(model_, grads)

        monkeypatch.setattr(ours, "train_step", step_and_record)
        opt.step = opt_step_and_record
        return rec

    def replay(self):
        """torch's clip_grad_norm_ and load_opt's optimizer applied to MLX's raw gradients, from
        the initial weights, with the lr/wd torch stepped with: the weights MLX should have."""
        import copy

        model = copy.deepcopy(self.ref_model)
        model.load_state_dict(self.init)
        opt = ref.load_opt(None, model)
        for grads, (lr, wd) in zip(self.mlx_rec["grads"], self.ref_rec["lr_wd"]):
            opt.zero_grad()
            for group in opt.param_groups:
                group["lr"], group["weight_decay"] = lr, wd
            for name, param in model.named_parameters():
                param.grad = None if grads.get(name) is None else torch.from_numpy(grads[name])
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, error_if_nonfinite=True)
            opt.step()
        return {n: p.detach().numpy() for n, p in model.named_parameters()}

    def report(self, title: str) -> Report:
        """Per-step lr/wd (exactly), losses, and MLX's weights against the replay; with one
        step also every gradient; free-running weights and BatchNorm statistics against torch's."""
        r, m = self.ref_rec, self.mlx_rec
        assert m["lr_wd"] == r["lr_wd"], f"lr/wd per step differ: {m['lr_wd']} vs {r['lr_wd']}"
        report = Report(title, load_reference().describe())
        loss_tol, param_tol, stats_tol = self._free_tolerances()
        for i, (a, b) in enumerate(zip(m["loss"], r["loss"])):
            report.add(compare(f"loss.step{i}", np.array(a), np.array(b), loss_tol))
        report.add(compare("epoch_loss", np.array(self.mlx_epoch_loss), np.array(self.ref_epoch_loss),
                           loss_tol if self.f64 else LOSS))
        if len(m["loss"]) == 1:
            self._grad_rows(report)
        mlx_sd = mlx_state_dict(self.mlx_model)
        replayed = self.replay()
        for name, value in replayed.items():
            report.add(compare(f"step.{name}", mlx_sd[name], value, STEP))
        for name, value in self.ref_model.state_dict().items():
            if name in replayed:
                report.add(compare(f"param.{name}", mlx_sd[name], value, param_tol))
            elif "running" in name or "num_batches" in name:
                tol = Tolerance(0.0) if name.endswith("num_batches_tracked") else stats_tol
                report.add(compare(f"buffer.{name}", mlx_sd[name], value, tol))
        return report

    def _free_tolerances(self):
        """(loss, weight, BatchNorm statistic) tolerances of the free-running comparison."""
        sum_lr = sum(lr for lr, _ in self.ref_rec["lr_wd"])
        adam = Tolerance(2 * sum_lr + STEP.atol, 0.0, ADAM_SIGN)
        if self.f64 is None:
            return LOSS, adam, BN_STATS
        state32 = self.ref_model.state_dict()

        def drift(names):
            return max(float(np.abs(state32[k].numpy() - self.f64["state"][k]).max()) for k in names)

        params = set(dict(self.ref_model.named_parameters()))
        stats = [k for k in state32 if "running" in k]
        loss_drift = float(np.max(np.abs(np.array(self.ref_rec["loss"]) - np.array(self.f64["loss"]))))
        why = f"{DRIFT_FACTOR:g} x torch float32's drift from float64"
        print(f"torch float32 vs float64 after {len(self.f64['loss'])} steps: loss {loss_drift:.3g}, "
              f"weights {drift(params):.3g}, BatchNorm statistics {drift(stats):.3g}")
        return (Tolerance(LOSS.atol + DRIFT_FACTOR * loss_drift, LOSS.rtol, why),
                Tolerance(STEP.atol + min(DRIFT_FACTOR * drift(params), adam.atol), 0.0, why),
                Tolerance(BN_STATS.atol + DRIFT_FACTOR * drift(stats), BN_STATS.rtol, why))

    def _grad_rows(self, report):
        r, m = self.ref_rec, self.mlx_rec
        before_bn = before_batchnorm(set(self.ref_model.state_dict()))
        report.add(compare("grad_norm", np.array(m["norm"][0]), np.array(r["norm"][0]), GRAD_NORM))
        unreached_ref = sorted(set(dict(self.ref_model.named_parameters())) - set(r["grads"][0]))
        unreached_mlx = sorted(k for k, g in m["grads"][0].items() if g is None)
        assert unreached_mlx == unreached_ref, f"parameters without gradient: {unreached_mlx} vs {unreached_ref}"
        for kind in ("grads", "clipped"):
            for name, value in r[kind][0].items():
                tol = GRAD_BEFORE_BN if name in before_bn else GRAD
                report.add(compare(f"{kind}.{name}", m[kind][0][name], value, tol))


def _assert_train(report: Report):
    print(report.table())
    worst = report.worst
    print(f"worst: {worst.name} max abs {worst.max_abs:.3g} (bound {worst.tol.bound(worst.scale):.3g})")
    assert report.passed, report.summary()


# Small configs of parity/models.py (DFN2's default DF output layer fails in the reference's
# own forward, see there; both small configs use the grouped-linear one).
SMALL = {"deepfilternet3": VARIANTS["deepfilternet3"][2], "deepfilternet2": VARIANTS["deepfilternet2"][2]}


@pytest.mark.parametrize("family", list(SMALL))
@pytest.mark.usefixtures("recurrence_path")
def test_one_step(family, tmp_path, monkeypatch):
    """One AdamW step (epoch 1: lr 1e-3 after the warm-up epoch, weight decay 0.0625 from its
    schedule): loss, gradient norm, every raw and clipped gradient (and which parameters get
    none), every updated weight and BatchNorm statistic."""
    run = _Run(family, SMALL[family], steps=1, epoch=1, tmp_path=tmp_path, monkeypatch=monkeypatch)
    _assert_train(run.report(f"{family} one step"))


@pytest.mark.parametrize("family", list(SMALL))
@pytest.mark.usefixtures("recurrence_path")
def test_ten_steps(family, tmp_path, monkeypatch):
    """Ten steps through the warm-up (lr 1e-4 -> 1e-3, rising weight decay): every step's lr/wd
    and loss, MLX's weights against torch's update replayed on MLX's gradients (tight), and
    against torch's own free-running weights (within float32's drift)."""
    run = _Run(family, SMALL[family], steps=10, epoch=0, tmp_path=tmp_path, monkeypatch=monkeypatch,
               float64=True)
    _assert_train(run.report(f"{family} ten steps"))


def test_step_check_fails_without_clipping(tmp_path, monkeypatch):
    """Skipping the gradient clipping in MLX must be caught (clipped gradients and weights)."""
    monkeypatch.setattr(ours, "clip_grad_norm_", lambda grads, max_norm, **kw: (
        dict(grads), ours._norm(mx.stack([ours._norm(g) for g in grads.values() if g is not None]))))
    run = _Run("deepfilternet3", SMALL["deepfilternet3"], steps=1, epoch=1, tmp_path=tmp_path,
               monkeypatch=monkeypatch)
    report = run.report("no clipping")
    failed = {r.name.split(".")[0] for r in report.layers if not r.passed}
    assert {"clipped", "step"} <= failed, report.summary()


def test_step_check_fails_with_coupled_weight_decay(tmp_path, monkeypatch):
    """Adam's L2 weight decay in place of AdamW's decoupled one must be caught in the weights."""
    monkeypatch.setattr(ours_optim.AdamW, "decoupled_weight_decay", False)
    run = _Run("deepfilternet3", SMALL["deepfilternet3"], steps=1, epoch=1, tmp_path=tmp_path,
               monkeypatch=monkeypatch)
    report = run.report("coupled weight decay")
    assert not report.passed
    assert all(r.passed for r in report.layers if r.name.startswith(("grads.", "loss"))), report.summary()
    assert any(not r.passed for r in report.layers if r.name.startswith("step.")), report.summary()


# ---- the optimizer alone: load_opt's choices and torch's update formulas -------------------


class _TinyTorch(torch.nn.Module):
    """Parameters named like the models' (numbered Sequential children, df_dec, dfrnn)."""

    def __init__(self):
        super().__init__()
        lin = torch.nn.Linear
        self.enc = torch.nn.Sequential(lin(6, 5), torch.nn.ReLU(), lin(5, 4))
        self.df_dec = torch.nn.Sequential(lin(4, 3))
        self.dfrnn = lin(3, 2)
        self.erb_dec = lin(4, 3)


class _TinyMlx(mnn.Module):
    def __init__(self):
        from df_mlx.modules import Sequential

        super().__init__()
        self.enc = Sequential(mnn.Linear(6, 5), mnn.ReLU(), mnn.Linear(5, 4))
        self.df_dec = Sequential(mnn.Linear(4, 3))
        self.dfrnn = mnn.Linear(3, 2)
        self.erb_dec = mnn.Linear(4, 3)


def _tiny_twins():
    from mlx.utils import tree_unflatten

    torch.manual_seed(0)
    t_model, m_model = _TinyTorch(), _TinyMlx()
    m_model.update(tree_unflatten([(k, mx.array(v.detach().numpy())) for k, v in t_model.state_dict().items()]))
    return t_model, m_model


OPT_STEPS = 6
OPTIMIZERS = {
    "adamw": "optimizer = adamw\nweight_decay = 0.05",
    "adam": "optimizer = adam\nweight_decay = 0.05",
    "adamw_betas_no_decay": "optimizer = adamw\nweight_decay = 0\nopt_betas = 0.8,0.99",
    "sgd": "optimizer = sgd\nmomentum = 0.9\nweight_decay = 0.01",
    "rmsprop": "optimizer = rmsprop\nweight_decay = 0.01",
    "rmsprop_momentum": "optimizer = rmsprop\nmomentum = 0.5\nweight_decay = 0.01",
}


def _optimizer_report(optimizer: str, tmp_path, mask_only=False, df_only=False, state=True) -> Report:
    """load_opt on both sides, then OPT_STEPS steps with identical gradients (some entries near
    Adam's eps, some parameters without gradient on some steps) under rising lr/wd schedules:
    weights after every step and the optimizer state at the end."""
    load_configs(f"[train]\nmodel = deepfilternet3\n[optim]\n{OPTIMIZERS[optimizer]}\n", tmp_path)
    t_model, m_model = _tiny_twins()
    t_opt = ref.load_opt(None, t_model, mask_only=mask_only, df_only=df_only)
    m_opt = ours.load_opt(None, m_model, mask_only=mask_only, df_only=df_only)
    lrs, wds = np.linspace(1e-3, 5e-3, OPT_STEPS), np.linspace(0.05, 0.2, OPT_STEPS)
    rng = np.random.default_rng(0)
    t_params = dict(t_model.named_parameters())
    report = Report(f"{optimizer} mask_only={mask_only} df_only={df_only}", load_reference().describe())
    for it in range(OPT_STEPS):
        grads = {}
        for name, p in t_params.items():
            g = (rng.standard_normal(p.shape) * rng.choice([1.0, 1e-3])).astype(np.float32)
            g[rng.random(p.shape) < 0.2] *= 1e-8  # around Adam's eps
            skip = (it == 0 and name == "enc.2.bias") or (it == 3 and name == "erb_dec.weight")
            grads[name] = None if skip else g
        t_opt.zero_grad()
        for group in t_opt.param_groups:  # df.train.run_epoch's schedule code
            group["lr"] = lrs[it] * group.get("lr_scale", 1)
            if group["weight_decay"] > 0:
                group["weight_decay"] = wds[it]
        for name, p in t_params.items():
            p.grad = None if grads[name] is None else torch.from_numpy(grads[name])
        t_opt.step()
        ours.apply_schedules(m_opt, it, lrs, wds)
        m_opt.step(m_model, {k: None if g is None else mx.array(g) for k, g in grads.items()})
        m_params = dict(mlx_state_dict(m_model))
        for name, p in t_params.items():
            report.add(compare(f"step{it}.{name}", m_params[name], p, OPT_STEP))
    for name, p in t_params.items() if state else ():
        for key, value in t_opt.state.get(p, {}).items():
            report.add(compare(f"state.{name}.{key}", m_opt.state[name][key], value, OPT_STEP))
        assert (p in t_opt.state) == (name in m_opt.state), f"{name}: optimizer state on one side only"
    return report


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_optimizer_updates(optimizer, tmp_path):
    _assert(_optimizer_report(optimizer, tmp_path))


@pytest.mark.parametrize("mask_only, df_only", [(True, False), (False, True)], ids=["mask_only", "df_only"])
def test_optimizer_parameter_selection(mask_only, df_only, tmp_path):
    """load_opt's mask-only / DF-only parameter sets and hyper-parameters, then the steps."""
    load_configs("[train]\nmodel = deepfilternet3\n", tmp_path)
    t_model, m_model = _tiny_twins()
    t_opt = ref.load_opt(None, t_model, mask_only=mask_only, df_only=df_only)
    m_opt = ours.load_opt(None, m_model, mask_only=mask_only, df_only=df_only)
    names = {id(p): n for n, p in t_model.named_parameters()}
    t_group, m_group = t_opt.param_groups[0], m_opt.param_groups[0]
    assert m_group["params"] == [names[id(p)] for p in t_group["params"]]
    for key in ("lr", "initial_lr", "betas", "eps", "weight_decay", "amsgrad"):
        assert m_group[key] == t_group[key], key
    _assert(_optimizer_report("adamw", tmp_path, mask_only=mask_only, df_only=df_only))


def test_sgd_without_momentum_fails_as_upstream(tmp_path):
    """df's `sgd` is always Nesterov: with its default momentum 0 torch refuses it; so do we."""
    load_configs("[train]\nmodel = deepfilternet3\n[optim]\noptimizer = sgd\n", tmp_path)
    t_model, m_model = _tiny_twins()
    with pytest.raises(ValueError) as t_err:
        ref.load_opt(None, t_model)
    with pytest.raises(ValueError) as m_err:
        ours.load_opt(None, m_model)
    assert str(m_err.value) == str(t_err.value)


class _StockMlxAdamW:
    """mlx.optimizers.AdamW behind df_mlx.optim's interface, to show why df_mlx has its own."""

    def __init__(self, params, lr, weight_decay, betas, amsgrad):
        import mlx.optimizers

        self.param_groups = [dict(lr=lr, weight_decay=weight_decay, params=list(params))]
        self.opt = mlx.optimizers.AdamW(learning_rate=lr, betas=list(betas), weight_decay=weight_decay)
        self.state = {}

    def step(self, model, grads):
        from mlx.utils import tree_flatten, tree_unflatten

        self.opt.learning_rate = self.param_groups[0]["lr"]
        self.opt.weight_decay = self.param_groups[0]["weight_decay"]
        full = [(k, mx.zeros_like(v) if grads.get(k) is None else grads[k])
                for k, v in tree_flatten(model.trainable_parameters())]
        self.opt.update(model, tree_unflatten(full))


def test_optimizer_check_fails_with_mlx_adamw(tmp_path, monkeypatch):
    """mlx.optimizers.AdamW (no amsgrad, eps before bias correction) does not train as df."""
    monkeypatch.setattr(ours_optim, "AdamW", _StockMlxAdamW)
    report = _optimizer_report("adamw", tmp_path, state=False)
    print(report.summary())
    assert not report.passed
    assert not report.layers[0].passed  # already the first step of the first parameter


@pytest.mark.parametrize("family", list(SMALL))
def test_training_checkpoint_exports_to_df(family, tmp_path):
    """A `dfmlx train` directory's checkpoint, exported with `dfmlx export`, loads into df's
    model with strict=True and gives df's outputs for MLX's weights."""
    from click.testing import CliRunner

    from df_mlx.checkpoint import write_cp
    from df_mlx.cli import main as cli

    ini = _configure(family, SMALL[family], tmp_path)
    ref_model, mlx_model, _, df_state, p = _twins(family, SMALL[family], seed=3)
    base = tmp_path / "run"
    (base / "checkpoints").mkdir(parents=True)
    (base / "config.ini").write_text(ini)
    mlx_model.update(tree_map(lambda w: w * 1.01, mlx_model.parameters()))  # not torch's init
    write_cp(mlx_model, "model", str(base / "checkpoints"), 4)
    result = CliRunner().invoke(cli, ["export", str(base), "-o", str(tmp_path / "out.ckpt"), "--epoch", "latest"])
    assert result.exit_code == 0, result.output
    ref_model.load_state_dict(torch.load(tmp_path / "out.ckpt", weights_only=True), strict=True)
    batch = _samples(df_state, p, 1)
    ref_model.eval()
    mlx_model.eval()
    with torch.no_grad():
        ref_out = ref_model(*(torch.from_numpy(np.array(x)) for x in (ours.as_real(batch.noisy), batch.feat_erb,
                                                                      ours.as_real(batch.feat_spec))))
    mlx_out = mlx_model(spec=ours.as_real(batch.noisy), feat_erb=batch.feat_erb, feat_spec=ours.as_real(batch.feat_spec))
    report = Report(f"{family} exported training checkpoint", "df 0.5.6")
    for i, (a, b) in enumerate(zip(mlx_out[:3], ref_out[:3])):
        report.add(compare(f"output.{i}", a, b.numpy(), LOSS))
    _assert(report)
