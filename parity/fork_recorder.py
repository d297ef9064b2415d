"""Record (and replay) parity fixtures from the community DFNet4 fork, `sealad886/DeepFilterNet4`.

The fork is not on PyPI, so CI cannot run it. This module builds the fork's torch modules from
a checkout named by the environment variable `DFMLX_FORK_DIR` (the repository root or its
`DeepFilterNet/` folder), with a fixed seed and a small config, runs fixed inputs, and writes

    parity/fixtures/fork/<case>.safetensors   weights under their state_dict names, inputs,
                                              outputs (nested lists flattened), every hooked
                                              sub-module's output, the gradients of
                                              sum(output_i * w_i), and for a training-mode case
                                              the buffers its pass updated (state_after/)
    parity/fixtures/fork/<case>.json          the case (module and kwargs or INI config), the
                                              fork's commit, torch/numpy versions, shapes, the
                                              order of the traced layers

Record (the fork runs in its own process, so its `df` never meets upstream `df`):

    DFMLX_FORK_DIR=/path/to/DeepFilterNet4 python -m parity.fork_recorder [--out DIR] [CASE ...]

The fork needs only torch, numpy, loguru, typing_extensions and DeepFilterLib (`libdf`): its
Mamba is a pure-PyTorch sequential scan (no mamba_ssm, no CUDA, no einops).
`load_fixture` and `fixture_report` replay a recording against a df_mlx module; the tests use
the committed fixtures, and re-record on the fly when `DFMLX_FORK_DIR` is set.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from parity.report import Report, Tolerance, compare, compare_traces
from parity.tracer import Trace

ENV_VAR = "DFMLX_FORK_DIR"
REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURE_DIR = REPO_ROOT / "parity" / "fixtures" / "fork"
FORMAT = 1  # bump when the file layout changes
# A committed fixture must stay small: the repository carries every version of it.
MAX_FIXTURE_BYTES = 1_000_000


class ForkUnavailable(RuntimeError):
    """No fork checkout (DFMLX_FORK_DIR unset or not a DeepFilterNet4 checkout)."""


@dataclass(frozen=True)
class Case:
    """One recording. `module` is a class of the fork's `df` package ("mamba.MambaBlock") built
    with `kwargs` (an activation is named by its torch.nn class, e.g. "ReLU"); or, when `ini`
    is given, `module` is a family (`deepfilternet4`) built by its `init_model` under that
    config. `inputs` are shapes of standard-normal float32 inputs (for a family: batch and
    frames, the model inputs are derived from the config)."""

    name: str
    module: str
    kwargs: Dict = field(default_factory=dict)
    ini: Optional[str] = None
    inputs: Sequence = ()
    seed: int = 0
    grads: bool = True
    description: str = ""
    # Family inputs: "df" = spec, feat_erb, feat_spec [B, 1, T, F', 2]; "df+waveform" adds a
    # waveform [B, (T - 1) * hop + fft_size]; "lite" passes feat_spec as [B, 2, T, F'] (the
    # layout DfNet4Lite's forward accepts).
    family_inputs: str = "df"
    run_df: bool = True  # a family's init_model(run_df=...)
    # Too large to commit (> MAX_FIXTURE_BYTES): recorded on the fly by the live tests only.
    committed: bool = True
    # Randomise the fork's structured initial values (`_perturb_constant_init`); off for the
    # growth cases, which measure the fork's own init: slowly decaying Mamba states.
    perturb: bool = True
    # "layers": the layer-by-layer parity cases; "growth": error against sequence length.
    group: str = "layers"
    # Record every hooked sub-module's output (off: outputs only, for long inputs to big models).
    trace: bool = True
    # How the flat inputs group into the call's arguments: a nested list of input indices (e.g.
    # [[0, 1], [2, 3]] calls f([x0, x1], [x2, x3])); None calls f(*inputs). `module` may then
    # name a function, called through a parameter-free module.
    nest: Optional[List] = None
    # Run in training mode (spectral_norm's power iteration): the buffers after the traced pass
    # are recorded too, and the gradient pass restarts from the initial ones.
    train: bool = False
    # Training-mode passes over the inputs before recording, so that spectral_norm's u, v are
    # converged as after training (at init, u^T W v with random u, v is far below the largest
    # singular value, and every layer scales its output up by the ratio).
    warmup: int = 0


BASE_INI = """[train]
model = deepfilternet4
device = cpu

"""

DFNET4_GRU_ADAPTIVE_INI = BASE_INI + """[df]
sr = 16000
fft_size = 64
hop_size = 32
nb_erb = 8
nb_df = 16

[deepfilternet4]
backbone = gru
conv_ch = 8
emb_hidden_dim = 16
df_hidden_dim = 16
emb_num_layers = 2
df_num_layers = 2
enc_linear_groups = 4
linear_groups = 2
use_phase_branch = false
use_multi_res_df = false
adaptive_order = true
min_df_order = 2
max_df_order = 4
"""

DFNET4_TIME_INI = BASE_INI + """[df]
sr = 16000
fft_size = 64
hop_size = 32
nb_erb = 8
nb_df = 16

[deepfilternet4]
conv_ch = 4
emb_hidden_dim = 16
df_hidden_dim = 16
emb_num_layers = 1
df_num_layers = 1
enc_linear_groups = 2
use_time_branch = true
use_phase_branch = false
df_resolutions = 16,2
mamba_d_state = 4
"""

DFNET4_SMALL_INI = """[train]
model = deepfilternet4
device = cpu

[df]
sr = 16000
fft_size = 64
hop_size = 32
nb_erb = 8
nb_df = 18
lsnr_max = 30
lsnr_min = -10

[deepfilternet4]
conv_ch = 8
emb_hidden_dim = 16
df_hidden_dim = 16
emb_num_layers = 2
df_num_layers = 2
enc_linear_groups = 4
linear_groups = 2
df_order = 3
df_resolutions = 18,3;9,2;5,1
mamba_d_state = 4
mamba_d_conv = 3
"""

DFNET4_SINGLE_INI = """[train]
model = deepfilternet4
device = cpu

[df]
sr = 16000
fft_size = 64
hop_size = 32
nb_erb = 8
nb_df = 20
df_lookahead = 1

[deepfilternet4]
conv_ch = 8
conv_lookahead = 2
emb_hidden_dim = 16
df_hidden_dim = 16
emb_num_layers = 3
df_num_layers = 2
enc_linear_groups = 4
enc_concat = true
df_order = 3
use_phase_branch = false
use_multi_res_df = false
mamba_d_state = 4
mamba_d_conv = 2
mask_pf = true
pf_beta = 0.05
"""

CASES: Dict[str, Case] = {c.name: c for c in [
    Case("mamba_block", "mamba.MambaBlock", dict(d_model=16, d_state=8, d_conv=4), inputs=[(2, 40, 16)],
         description="selective-scan block at small sizes, default options"),
    Case("mamba_block_options", "mamba.MambaBlock",
         dict(d_model=12, d_state=5, d_conv=2, expand=3, dt_rank=3, bias=True, conv_bias=False, dt_init="constant",
              dt_scale=0.5, dt_min=0.01, dt_max=0.5),
         inputs=[(1, 17, 12)], seed=1, description="every constructor option off its default"),
    Case("mamba", "mamba.Mamba", dict(d_model=16, d_state=4, d_conv=3), inputs=[(2, 24, 16)], seed=2,
         description="pre-norm residual Mamba layer"),
    Case("squeezed_mamba", "mamba.SqueezedMamba",
         dict(input_size=24, hidden_size=16, output_size=20, num_layers=2, linear_groups=4,
              linear_act_layer="ReLU", d_state=4, d_conv=3, expand=2),
         inputs=[(2, 20, 24)], seed=3, description="SqueezedGRU_S drop-in: grouped linears, 2 layers"),
    Case("squeezed_mamba_time_first", "mamba.SqueezedMamba",
         dict(input_size=12, hidden_size=16, batch_first=False, d_state=4, d_conv=4),
         inputs=[(15, 2, 12)], seed=4, description="time-first input, dense linear in, no linear out"),
    Case("bidirectional_mamba", "mamba.BidirectionalMamba", dict(d_model=8, merge="proj", d_state=4, d_conv=3),
         inputs=[(2, 16, 8)], seed=5, description="both directions merged by a projection"),
    Case("dfnet4_small", "deepfilternet4", ini=DFNET4_SMALL_INI, inputs=[(1, 6)], seed=6,
         description="DfNet4 default architecture (phase-branch HybridEncoder, cross-domain attention, "
                     "Mamba backbone, multi-resolution DF incl. a 1-frame resolution) at small sizes"),
    Case("dfnet4_single", "deepfilternet4", ini=DFNET4_SINGLE_INI, inputs=[(2, 10)], seed=7,
         description="DfNet4 with Encoder4 (concat), single-resolution DF, conv/DF lookahead, post-filter"),
    Case("dfnet4_gru_adaptive", "deepfilternet4", ini=DFNET4_GRU_ADAPTIVE_INI, inputs=[(1, 8)], seed=8,
         description="GRU backbone, Encoder4, adaptive-order DF decoder (eval: one-hot order choice)"),
    Case("dfnet4_time_branch", "deepfilternet4", ini=DFNET4_TIME_INI, inputs=[(1, 8)], seed=9, grads=False,
         family_inputs="df+waveform", run_df=False,
         description="hybrid encoder with the waveform branch (frames realigned by interpolation) and the "
                     "phase fallback projection, no DF stage"),
    Case("dfnet4_default", "deepfilternet4", ini=BASE_INI, inputs=[(1, 20)], seed=10, grads=False, committed=False,
         description="DfNet4 at the fork's defaults (5.1M parameters)"),
    Case("dfnet4_lite", "deepfilternet4", ini=BASE_INI + "[deepfilternet4]\nmodel_variant = lite\n", inputs=[(2, 12)],
         seed=11, family_inputs="lite", committed=False, description="DfNet4Lite at the fork's defaults"),
    # Discriminators (df/discriminator.py) at small channel counts; the Multi*/Combined ones have
    # the fork's fixed widths (8-10M parameters per sub-discriminator), so they are live only.
    Case("period_disc", "discriminator.PeriodDiscriminator", dict(period=3, channels=[4, 8, 16, 16, 16]),
         inputs=[(2, 2050)], seed=30, description="weight_norm, [B, T] input reflect-padded to a multiple of 3"),
    Case("period_disc_spectral", "discriminator.PeriodDiscriminator",
         dict(period=5, use_spectral_norm=True, channels=[4, 8, 8, 16]), inputs=[(1, 1, 2048)], seed=31, warmup=5,
         description="spectral_norm in eval mode (sigma from the stored u, v, converged by 5 training passes)"),
    Case("period_disc_spectral_train", "discriminator.PeriodDiscriminator",
         dict(period=2, use_spectral_norm=True, channels=[4, 8, 8, 16]), inputs=[(1, 1, 2048)], seed=32, train=True,
         description="spectral_norm in training mode: one power iteration updates u, v"),
    Case("scale_disc", "discriminator.ScaleDiscriminator", dict(channels=[4, 16, 16, 16, 16, 16, 4]),
         inputs=[(1, 1, 1024)], seed=33, description="weight_norm, grouped strided 1-D convolutions"),
    Case("scale_disc_spectral_train", "discriminator.ScaleDiscriminator",
         dict(use_spectral_norm=True, channels=[4, 16, 16, 16, 16, 16, 4]), inputs=[(1, 1024)], seed=34,
         train=True, description="spectral_norm in training mode, [B, T] input"),
    Case("mpd", "discriminator.MultiPeriodDiscriminator", dict(periods=[2, 3]), inputs=[(1, 1, 600)], seed=35,
         committed=False, description="two period discriminators at the fork's widths (16M parameters)"),
    Case("msd_spectral", "discriminator.MultiScaleDiscriminator", dict(num_scales=3, use_spectral_norm=True),
         inputs=[(1, 1, 600)], seed=36, grads=False, committed=False, warmup=3,
         description="three scales (two average pools), spectral_norm in eval mode after 3 training passes"),
    Case("combined_disc", "discriminator.CombinedDiscriminator", dict(periods=[5], num_scales=2), inputs=[(1, 500)],
         seed=37, grads=False, committed=False, description="MPD + MSD at the fork's widths"),
    # GAN losses: functions of df/discriminator.py and the loss classes of df/loss.py, on
    # standard-normal scores [B, N] and feature maps; `nest` groups the inputs into lists.
    Case("gan_discriminator_loss", "discriminator.discriminator_loss", inputs=[(2, 30), (2, 12), (2, 30), (2, 12)],
         nest=[[0, 1], [2, 3]], seed=40, description="LS-GAN D loss over two discriminators"),
    Case("gan_generator_loss", "discriminator.generator_loss", inputs=[(2, 30), (2, 12), (1, 7)], nest=[[0, 1, 2]],
         seed=41, description="LS-GAN G loss"),
    Case("gan_feature_matching_loss", "discriminator.feature_matching_loss",
         inputs=[(2, 4, 20), (2, 1, 20), (2, 8, 5, 3), (2, 4, 20), (2, 1, 20), (2, 8, 5, 3)],
         nest=[[[0, 1], [2]], [[3, 4], [5]]], seed=42, description="L1 feature matching, real maps detached"),
    Case("gan_fm_loss_class", "loss.FeatureMatchingLoss", dict(factor=2.0),
         inputs=[(2, 4, 20), (2, 8, 5, 3), (2, 4, 20), (2, 8, 5, 3)], nest=[[[0], [1]], [[2], [3]]], seed=43,
         description="FeatureMatchingLoss (factor 2)"),
    *[Case(f"gan_{kind}_{lt}", f"loss.{kind.capitalize()}Loss", dict(loss_type=lt, factor=0.7),
           inputs=[(2, 30), (2, 12), (2, 30), (2, 12)] if kind == "discriminator" else [(2, 30), (2, 12)],
           nest=[[0, 1], [2, 3]] if kind == "discriminator" else [[0, 1]], seed=44 + i,
           description=f"{kind.capitalize()}Loss({lt!r}, factor 0.7)")
      for i, (kind, lt) in enumerate((k, t) for k in ("generator", "discriminator") for t in ("lsgan", "vanilla", "hinge"))],
    # DNSMOS proxy (df/dnsmos_proxy.py): small widths committed, the default loss live only.
    Case("dnsmos_proxy_small", "dnsmos_proxy.DNSMOSProxy", dict(n_mels=32, hidden_dim=4, fc_dim=16),
         inputs=[(2, 4000)], seed=60, description="log-mel CNN at 4/8/16/16 channels, 0.25 s at 16 kHz"),
    Case("dnsmos_proxy_lightweight", "dnsmos_proxy.LightweightDNSMOSProxy", dict(n_mels=20, hidden_dim=4),
         inputs=[(2, 1, 3200)], seed=61, description="depthwise-separable proxy, [B, 1, T] input"),
    Case("dnsmos_proxy_mel", "dnsmos_proxy.MelSpectrogram", dict(sample_rate=48000, n_fft=960, hop_length=480,
         n_mels=48, f_min=50.0, f_max=20000.0), inputs=[(1, 9600)], seed=62, description="mel bands of a 48 kHz setup"),
    Case("dnsmos_loss", "dnsmos_proxy.DNSMOSLoss", dict(target_ovl=4.0, loss_weight=0.5), inputs=[(2, 8000), (2, 8000)],
         seed=63, committed=False, description="default proxy (1M parameters), enhanced vs clean scores"),
]}

# Error against sequence length (live only): a Mamba layer at the default model's width (every
# layer traced) and the default DfNet4 (outputs only: its trace is 380 MB at 1000 frames), both
# at the fork's own init, forward only.
GROWTH_FRAMES = (100, 1000, 3000, 6000)
for _frames in GROWTH_FRAMES:
    for _case in (
        Case(f"mamba_growth_{_frames}", "mamba.Mamba", dict(d_model=256, d_state=16, d_conv=4, expand=2),
             inputs=[(1, _frames, 256)], seed=20, grads=False, committed=False, perturb=False, group="growth",
             description=f"Mamba(256) at the fork's init over {_frames} steps"),
        Case(f"dfnet4_growth_{_frames}", "deepfilternet4", ini=BASE_INI, inputs=[(1, _frames)], seed=21,
             grads=False, committed=False, perturb=False, group="growth", trace=False,
             description=f"default DfNet4 at the fork's init over {_frames} frames"),
    ):
        CASES[_case.name] = _case

# One GAN training step of the fork's own run_epoch (group "gan_step", recorded by
# parity/fork_gan_step.py, checked in parity/test_train_gan.py): a small DFN3 generator at 16 kHz
# and sub-discriminators rebuilt at `channels`; epoch 1 (after the generator's lr warm-up).
GAN_STEP_INI = """[train]
model = deepfilternet3
device = cpu
max_epochs = 3
batch_size = 2
gan_enabled = true
{train}
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
emb_num_layers = 2
df_num_layers = 2
enc_linear_groups = 4
linear_groups = 2

[optim]
lr = 0.001
lr_warmup = 0.0001
warmup_epochs = 1
weight_decay = 0.05
discriminator_lr = 0.0005

[multiresspecloss]
factor = 1
factor_complex = 1
gamma = 0.3
fft_sizes = 32,64

[localsnrloss]
factor = 0.001

[ganloss]
{gan}
"""
for _case in (
    Case("gan_step_mpd", "train.run_epoch", dict(model="deepfilternet3", disc="mpd", channels=[4, 8, 8, 16], epoch=1),
         ini=GAN_STEP_INI.format(train="discriminator_type = mpd\nmpd_periods = 2,3\n",
                                 gan="factor = 1\ntype = lsgan\n\n[featurematchingloss]\nfactor = 2"),
         inputs=[(2, 40)], seed=70, group="gan_step",
         description="G and D step: MPD (periods 2, 3, weight_norm), LS-GAN, feature matching"),
    Case("gan_step_msd_spectral", "train.run_epoch",
         dict(model="deepfilternet3", disc="msd", channels=[4, 16, 16, 16, 16, 16, 4], epoch=1),
         ini=GAN_STEP_INI.format(train="discriminator_type = msd\nmsd_scales = 2\ndiscriminator_spectral_norm = true\n",
                                 gan="factor = 0.5\ntype = hinge\n\n[featurematchingloss]\nfactor = 1.5"),
         inputs=[(2, 40)], seed=71, group="gan_step",
         description="G and D step: MSD (2 scales, spectral_norm in training mode), hinge loss, feature matching"),
):
    CASES[_case.name] = _case


# ----------------------------------------------------------------------------------------------
# Recording (needs torch and the fork)


def fork_dir(value: Optional[str] = None) -> Path:
    """The fork checkout from `value` or $DFMLX_FORK_DIR; raises ForkUnavailable."""
    value = value or os.environ.get(ENV_VAR)
    if not value:
        raise ForkUnavailable(f"${ENV_VAR} is not set")
    root = Path(value).expanduser().resolve()
    for candidate in (root, root / "DeepFilterNet"):
        if (candidate / "df" / "mamba.py").is_file() and (candidate / "df" / "deepfilternet4.py").is_file():
            return candidate
    raise ForkUnavailable(f"${ENV_VAR}={value} holds no DeepFilterNet4 df/ package (df/mamba.py)")


def _git_commit(path: Path) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True)
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--", "df"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None


def _load_fork(path: Path):
    """Import the fork's `df` (without its __init__) through the parity reference loader."""
    os.environ["DF_REFERENCE"] = str(path)
    from parity.reference import import_ref, load_reference

    info = load_reference()
    if Path(info.path) != path / "df":
        raise ForkUnavailable(f"`df` already loaded from {info.path}, not from the fork {path}")
    return import_ref


def _resolve_kwargs(kwargs: Dict, act_namespace) -> Dict:
    """Activation names ("ReLU") -> classes of `act_namespace` (torch.nn or mlx.nn)."""
    out = dict(kwargs)
    if isinstance(out.get("linear_act_layer"), str):
        out["linear_act_layer"] = getattr(act_namespace, out["linear_act_layer"])
    return out


def _perturb_constant_init(module, seed: int):
    """Make parameters that the fork initialises to structured constants (Mamba's A_log rows,
    D, LayerNorm affines, resolution weights) random, so that a transposed or swapped tensor
    cannot go unnoticed, and Mamba's step sizes larger, so that the state matrix shows in the
    outputs; BatchNorm statistics are randomised by `randomize_norm_stats`."""
    import torch

    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "A_log":
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("dt_proj.bias"):
                # dt = softplus(bias) starts in [1e-3, 0.1], where A = -exp(A_log) barely
                # matters over a few dozen steps; shifted to about [7e-3, 0.7] it does.
                p.add_(2.0)
            elif name.endswith("x_proj.weight"):
                # With nn.Linear's init, B and C are ~0.1 and the scan adds ~1% to the D skip;
                # five times larger, the state-space path carries a fair share of the output.
                p.mul_(5.0)
            elif leaf == "weight_g":
                # weight_norm starts with g = |v|, where w = v whatever the normalisation does.
                p.mul_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g))
            elif (p.numel() > 1 and float(p.std()) == 0.0) or leaf in ("D", "resolution_weights"):
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def _model_inputs(p, batch: int, frames: int, rng, kind: str = "df") -> List[np.ndarray]:
    if kind not in ("df", "df+waveform", "lite"):
        raise ValueError(f"unknown family_inputs {kind!r}")
    f = p.fft_size // 2 + 1
    inputs = [rng.standard_normal((batch, 1, frames, f, 2)).astype(np.float32),
              rng.standard_normal((batch, 1, frames, p.nb_erb)).astype(np.float32),
              rng.standard_normal((batch, 1, frames, p.nb_df, 2)).astype(np.float32)]
    if kind == "lite":
        inputs[2] = np.ascontiguousarray(inputs[2][:, 0].transpose(0, 3, 1, 2))
    if kind == "df+waveform":
        inputs.append(rng.standard_normal((batch, (frames - 1) * p.hop_size + p.fft_size)).astype(np.float32))
    return inputs


def _build(case: Case, import_ref, tmp: Path):
    """(torch module in eval mode, numpy inputs) for a case."""
    import torch

    from parity.pairs import randomize_norm_stats

    rng = np.random.default_rng(case.seed)
    cfg = import_ref("config").config
    if case.ini is not None:
        ini = tmp / "config.ini"
        ini.write_text(case.ini)
        cfg.load(str(ini), allow_reload=True)
        family = import_ref(case.module)
        torch.manual_seed(case.seed)
        module = family.init_model(run_df=case.run_df)
        (batch, frames), = case.inputs
        inputs = _model_inputs(family.ModelParams(), batch, frames, rng, case.family_inputs)
    else:
        cfg.use_defaults(allow_reload=True)
        mod_name, cls_name = case.module.rsplit(".", 1)
        cls = getattr(import_ref(mod_name), cls_name)
        torch.manual_seed(case.seed)
        module = cls(**_resolve_kwargs(case.kwargs, torch.nn)) if isinstance(cls, type) else _torch_call(cls)
        inputs = [rng.standard_normal(shape).astype(np.float32) for shape in case.inputs]
    randomize_norm_stats(module, case.seed)
    if case.perturb:
        _perturb_constant_init(module, case.seed)
    return module.eval(), inputs


def _as_tuple(out) -> tuple:
    """The outputs, nested tuples and lists (a discriminator's feature maps) and dicts (scores
    by name, in insertion order) flattened in order."""
    if isinstance(out, dict):
        out = list(out.values())
    if not isinstance(out, (tuple, list)):
        return (out,)
    return tuple(leaf for o in out for leaf in _as_tuple(o))


def _nest(inputs: Sequence, nest: Optional[List]) -> tuple:
    """The call's arguments: `inputs` grouped as the case's `nest` says."""
    if nest is None:
        return tuple(inputs)

    def build(n):
        return inputs[n] if isinstance(n, int) else [build(m) for m in n]

    return tuple(build(n) for n in nest)


def _torch_call(fn):
    """A parameter-free torch module whose forward is the function `fn`."""
    import torch

    class Call(torch.nn.Module):
        def forward(self, *args):
            return fn(*args)

    return Call()


def record(case: Case, out_dir: Path, fork: Optional[Path] = None) -> Path:
    """Record one case into `out_dir`; returns the safetensors path."""
    import torch
    from safetensors.numpy import save_file

    from parity.tracer import trace_torch

    path = fork_dir(str(fork) if fork else None)
    import_ref = _load_fork(path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if case.group == "gan_step":  # a training step, not one module
        from parity.fork_gan_step import record_gan_step

        return record_gan_step(case, import_ref, path, out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        module, inputs = _build(case, import_ref, Path(tmp))
    if case.warmup:
        module.train()
        with torch.no_grad():
            for _ in range(case.warmup):
                module(*_nest([torch.from_numpy(x.copy()) for x in inputs], case.nest))
    module.train(case.train)
    state = {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}

    with torch.no_grad(), (trace_torch(module) if case.trace else nullcontext(Trace())) as trace:
        out = _as_tuple(module(*_nest([torch.from_numpy(x.copy()) for x in inputs], case.nest)))
    tensors: Dict[str, np.ndarray] = {}
    for k, v in state.items():
        tensors[f"state_dict/{k}"] = v
    if case.train:  # the buffers the training pass updated (spectral_norm's u, v)
        for k, v in module.state_dict().items():
            if not np.array_equal(v.numpy(), state[k]):
                tensors[f"state_after/{k}"] = v.numpy().copy()
    for i, x in enumerate(inputs):
        tensors[f"input/{i}"] = x
    for i, o in enumerate(out):
        tensors[f"output/{i}"] = o.detach().numpy()
    # Traced layers; an output equal to an already stored one (a Sequential and its last child,
    # a sub-module's output that is also the model's) is stored once and referenced.
    layers = []
    stored: Dict[tuple, List[str]] = {}
    for i, o in enumerate(out):
        stored.setdefault((tensors[f"output/{i}"].shape, tensors[f"output/{i}"].dtype.str), []).append(f"output/{i}")
    for name, value in trace.items():
        key = f"trace/{name}"
        for other in stored.get((value.shape, value.dtype.str), []):
            if np.array_equal(tensors[other], value):
                key = other
                break
        else:
            tensors[key] = np.array(value, order="C")
            stored.setdefault((value.shape, value.dtype.str), []).append(key)
        layers.append([name, key])

    grads = {}
    if case.grads:
        # In eval mode the fork's multiframe.DF writes the filtered bins into its input in place,
        # which autograd rejects when the unfold is a view (frame_size 1); its training mode
        # clones first. The gradient pass therefore runs the multi-frame modules (only them) in
        # training mode, and must reproduce the eval outputs exactly.
        mf_base = import_ref("multiframe").MultiFrameModule
        for m in module.modules():
            if isinstance(m, mf_base):
                m.train()
        if case.train:
            module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        t_inputs = [torch.from_numpy(x.copy()).requires_grad_(True) for x in inputs]
        out_g = _as_tuple(module(*_nest(t_inputs, case.nest)))
        module.train(case.train)
        for i, (a, b) in enumerate(zip(out_g, out)):
            if not torch.equal(a.detach(), b):
                raise RuntimeError(f"{case.name}: output {i} of the gradient pass differs from the eval pass")
        grad_rng = np.random.default_rng(case.seed + 1)
        weights = [grad_rng.standard_normal(o.shape).astype(np.float32) for o in out]
        loss = sum((o * torch.from_numpy(w)).sum() for o, w in zip(out_g, weights) if o.is_floating_point())
        loss.backward()
        for i, w in enumerate(weights):
            tensors[f"grad_weight/{i}"] = w
        for i, x in enumerate(t_inputs):  # an input only used detached has zero gradient
            tensors[f"grad/input/{i}"] = x.grad.numpy() if x.grad is not None else np.zeros_like(inputs[i])
        for name, p in module.named_parameters():
            if p.grad is not None:
                tensors[f"grad/param/{name}"] = p.grad.numpy()
        grads = {"inputs": len(t_inputs), "params": [n for n, p in module.named_parameters() if p.grad is not None]}

    st_path = out_dir / f"{case.name}.safetensors"
    save_file({k: np.array(v, order="C") for k, v in tensors.items()}, str(st_path))
    meta = {
        "format": FORMAT,
        "case": {"name": case.name, "module": case.module, "kwargs": case.kwargs, "ini": case.ini,
                 "inputs": [list(s) for s in case.inputs], "seed": case.seed, "grads": case.grads,
                 "description": case.description, "family_inputs": case.family_inputs, "run_df": case.run_df,
                 "perturb": case.perturb, "trace": case.trace, "nest": case.nest, "train": case.train,
                 "warmup": case.warmup},
        "fork": {"repository": "https://github.com/sealad886/DeepFilterNet4", "commit": _git_commit(path),
                 "module_file": f"df/{case.module.split('.')[0]}.py"},
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_class": f"{type(module).__module__}.{type(module).__name__}",
        "state_dict": {k: list(v.shape) for k, v in state.items()},
        "parameters": int(sum(p.numel() for p in module.parameters())),
        "inputs": [list(x.shape) for x in inputs],
        "outputs": [list(o.shape) for o in out],
        "trace": layers,
        "untraceable": list(trace.untraceable),
        "grads": grads,
        "bytes": st_path.stat().st_size,
    }
    (out_dir / f"{case.name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    return st_path


def live(test):
    """Marks a test that records from the fork checkout now: skipped, with the reason, when
    $DFMLX_FORK_DIR is not set."""
    import pytest

    return pytest.mark.skipif(not os.environ.get(ENV_VAR), reason=f"${ENV_VAR} (a DeepFilterNet4 checkout) is not set")(test)


def fork_env(fork: Optional[str] = None, **extra: str) -> Dict[str, str]:
    """The environment of a fresh interpreter that runs the fork: $DFMLX_FORK_DIR set, no
    DF_REFERENCE (the fork's `df` must not meet upstream `df`), this repository on PYTHONPATH."""
    env = dict(os.environ, **extra)
    env[ENV_VAR] = str(fork_dir(fork))
    env.pop("DF_REFERENCE", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def run_fork_module(module: str, args: Sequence[str], what: str, fork: Optional[str] = None,
                    timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m module args` in a fresh interpreter with `fork_env`, from the repository root;
    a RuntimeError naming `what`, with the output's tail, when it fails."""
    res = subprocess.run([sys.executable, "-m", module, *args], env=fork_env(fork), capture_output=True, text=True,
                         timeout=timeout, cwd=str(REPO_ROOT))
    if res.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return res


def record_in_subprocess(names: Sequence[str], out_dir: Path, fork: Optional[str] = None,
                         timeout: float = 300) -> None:
    """Record `names` into `out_dir` in a fresh interpreter (the fork's `df` must not meet the
    `df` this process may have loaded)."""
    run_fork_module("parity.fork_recorder", ["--out", str(out_dir), *names], f"recording {', '.join(names)}", fork,
                    timeout)


# ----------------------------------------------------------------------------------------------
# Replay (numpy and safetensors only; MLX for the comparison)


@dataclass
class Fixture:
    meta: Dict
    state_dict: Dict[str, np.ndarray]
    inputs: List[np.ndarray]
    outputs: List[np.ndarray]
    trace: Trace
    grad_weights: List[np.ndarray]
    grad_inputs: List[np.ndarray]
    grad_params: Dict[str, np.ndarray]
    # Buffers a training-mode case's pass changed, as they are after it.
    state_after: Dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def case(self) -> Dict:
        return self.meta["case"]

    def describe(self) -> str:
        fork = self.meta["fork"]
        return f"DFNet4 fork {(fork['commit'] or '?')[:12]} {self.meta['torch_class']} (torch {self.meta['torch']})"


def load_fixture(name: str, directory: Optional[Path] = None) -> Fixture:
    from safetensors.numpy import load_file

    directory = Path(directory) if directory is not None else FIXTURE_DIR
    meta = json.loads((directory / f"{name}.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{name}: fixture format {meta.get('format')} != {FORMAT}; re-record it")
    t = load_file(str(directory / f"{name}.safetensors"))
    trace = Trace()
    for layer, key in meta["trace"]:
        trace[layer] = t[key]
    trace.untraceable.extend(meta["untraceable"])

    def indexed(prefix: str) -> List[np.ndarray]:
        out, i = [], 0
        while f"{prefix}/{i}" in t:
            out.append(t[f"{prefix}/{i}"])
            i += 1
        return out

    n = len("state_dict/")
    return Fixture(
        meta=meta,
        state_dict=OrderedDict((k[n:], t[k]) for k in sorted(t) if k.startswith("state_dict/")),
        inputs=indexed("input"),
        outputs=indexed("output"),
        trace=trace,
        grad_weights=indexed("grad_weight"),
        grad_inputs=indexed("grad/input"),
        grad_params={k[len("grad/param/"):]: v for k, v in t.items() if k.startswith("grad/param/")},
        state_after={k[len("state_after/"):]: v for k, v in t.items() if k.startswith("state_after/")},
    )


def live_fixture(name: str, out_dir: Path) -> Fixture:
    """Record `name` from $DFMLX_FORK_DIR into `out_dir` now, and load it."""
    record_in_subprocess([name], out_dir)
    return load_fixture(name, out_dir)


def assert_fixture_current(name: str, live_dir: Path):
    """The committed fixture `name` is what the checkout records now into `live_dir` (same
    weights, inputs and outputs); skips when the checkout is at another commit."""
    import pytest

    fresh, committed = load_fixture(name, live_dir), load_fixture(name)
    if fresh.meta["fork"]["commit"] != committed.meta["fork"]["commit"]:
        pytest.skip(f"checkout at {fresh.meta['fork']['commit']}, fixture from {committed.meta['fork']['commit']}")
    assert fresh.state_dict.keys() == committed.state_dict.keys()
    for key in fresh.state_dict:
        np.testing.assert_allclose(fresh.state_dict[key], committed.state_dict[key], atol=1e-6, err_msg=key)
    for a, b in zip(fresh.outputs + fresh.inputs, committed.outputs + committed.inputs):
        np.testing.assert_allclose(a, b, atol=1e-5)


def mlx_kwargs(fixture: Fixture) -> Dict:
    """The case's constructor kwargs for the df_mlx twin (activations as mlx.nn classes)."""
    import mlx.nn as nn

    return _resolve_kwargs(fixture.case["kwargs"], nn)


def mlx_call(fn):
    """A parameter-free MLX module whose call is the function `fn` (twin of a function case)."""
    import mlx.nn as nn

    class Call(nn.Module):
        def __call__(self, *args):
            return fn(*args)

    return Call()


def mlx_twin(fixture: Fixture):
    """df_mlx's module for a fixture: the same `df_mlx.mamba` class and kwargs, or the family's
    model under the fixture's config (loaded into df_mlx's global config)."""
    from importlib import import_module

    from df_mlx.config import config

    case = fixture.case
    if case["ini"] is None:
        mod_name, cls_name = case["module"].rsplit(".", 1)
        return getattr(import_module(f"df_mlx.{mod_name}"), cls_name)(**mlx_kwargs(fixture))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.ini"
        path.write_text(case["ini"])
        config.load(str(path), allow_reload=True)
    return import_module(f"df_mlx.{case['module']}").init_model(run_df=case["run_df"])


def fixture_report(fixture: Fixture, mlx_module, tol: Tolerance, grads: bool = True,
                   grad_tol: Optional[Tolerance] = None, title: Optional[str] = None,
                   tolerances: Optional[Dict[str, Tolerance]] = None,
                   prepare: Optional[Callable] = None) -> Report:
    """Load the fixture's weights into `mlx_module` (strictly, by torch name), run its inputs,
    and compare every traced layer, the outputs and (with `grads`) the gradients of
    sum(output_i * w_i) with respect to the inputs and every parameter. `tolerances` override
    `tol` by layer name (outputs: "output.<i>"); a case recorded without a trace compares the
    outputs only. `prepare(module)` runs after the weights are loaded (e.g. to perturb one). A
    training-mode case also compares the buffers its pass updated, and restarts the gradient
    pass from the recorded ones."""
    import mlx.core as mx

    from converters.layout import load_torch_state_dict, mlx_state_dict
    from parity.tracer import trace_mlx

    nest, train = fixture.case.get("nest"), fixture.case.get("train", False)

    def load():
        load_torch_state_dict(mlx_module, fixture.state_dict)
        mlx_module.train(train)
        if prepare is not None:
            prepare(mlx_module)

    def call(*xs):
        return _as_tuple(mlx_module(*_nest(xs, nest)))

    load()
    inputs = [mx.array(x) for x in fixture.inputs]
    report = Report(title or f"{fixture.case['name']} ({fixture.case['module']})", fixture.describe())
    traced = fixture.case.get("trace", True)
    with (trace_mlx(mlx_module) if traced else nullcontext()) as trace:
        out = call(*inputs)
    if traced:
        compare_traces(report, trace, fixture.trace, tol, tolerances)
    if len(out) != len(fixture.outputs):
        raise ValueError(f"MLX module returned {len(out)} outputs, the fork {len(fixture.outputs)}")
    for i, (o, ref) in enumerate(zip(out, fixture.outputs)):
        report.add(compare(f"output.{i}", o, ref, (tolerances or {}).get(f"output.{i}", tol)))
    if fixture.state_after:
        after = mlx_state_dict(mlx_module)
        for name, ref in fixture.state_after.items():
            report.add(compare(f"state_after.{name}", after[name], ref, tol))
    if not grads or not fixture.grad_weights:
        return report
    if train:
        load()
    grad_tol = grad_tol or tol
    weights = [mx.array(w) for w in fixture.grad_weights]
    params = mlx_module.trainable_parameters()

    def loss_fn(params, *xs):
        mlx_module.update(params)
        o = call(*xs)
        return sum((a * w).sum() for a, w in zip(o, weights) if mx.issubdtype(a.dtype, mx.floating))

    g = mx.grad(loss_fn, argnums=list(range(1 + len(inputs))))(params, *inputs)
    for i, ref in enumerate(fixture.grad_inputs):
        report.add(compare(f"grad.input.{i}", g[1 + i], ref, grad_tol))
    mlx_module.update(g[0])  # hold the gradients to read them in torch layout
    g_sd = mlx_state_dict(mlx_module)
    mlx_module.update(params)
    for name in fixture.meta["grads"]["params"]:
        report.add(compare(f"grad.{name}", g_sd[name], fixture.grad_params[name], grad_tol))
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="*",
                        help=f"cases to record (default: the committed ones; known: {', '.join(CASES)})")
    parser.add_argument("--out", type=Path, default=FIXTURE_DIR, help="output folder (default: %(default)s)")
    parser.add_argument("--fork", default=None, help=f"fork checkout (default: ${ENV_VAR})")
    args = parser.parse_args(argv)
    names = args.cases or [name for name, case in CASES.items() if case.committed]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    for name in names:
        path = record(CASES[name], args.out, Path(args.fork) if args.fork else None)
        size = path.stat().st_size
        print(f"{name}: {path} ({size / 1e3:.1f} kB)")
        if args.out.resolve() == FIXTURE_DIR and size > MAX_FIXTURE_BYTES:
            print(f"  warning: over the {MAX_FIXTURE_BYTES / 1e6:.1f} MB limit for committed fixtures", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
