"""df_mlx.layers.GRU against torch.nn.GRU: outputs, final states and gradients.

The helpers here (strict weight copy, forward + gradient report) are shared with
parity/test_modules_gru.py.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import df_mlx.layers as layers
from df_mlx.layers import GRU
from parity.report import Report, Tolerance, compare

TOL = Tolerance(1e-5, 0.0, "float32 GRU: same op order per step, BLAS sums of <= 256 terms")
GRAD_TOL = Tolerance(1e-5, 1e-5, "gradients sum B*T*H float32 terms: error scales with their size")
BATCH = 2
STEPS = (1, 7, 100)


def copy_weights(torch_module, mlx_module):
    """Load the torch state_dict into the MLX module by name; the key sets must be equal."""
    state = {k: v.detach().cpu().numpy() for k, v in torch_module.state_dict().items()}
    own = dict(tree_flatten(mlx_module.parameters()))
    assert set(own) == set(state), f"keys differ: MLX only {sorted(set(own) - set(state))}, " \
                                   f"torch only {sorted(set(state) - set(own))}"
    for k, v in state.items():
        assert tuple(own[k].shape) == v.shape, f"{k}: MLX {tuple(own[k].shape)} vs torch {v.shape}"
    mlx_module.load_weights([(k, mx.array(v)) for k, v in state.items()], strict=True)
    mx.eval(mlx_module.parameters())


@dataclass
class Case:
    """One forward call: input x and optional initial state h0 (numpy, torch layout)."""

    x: np.ndarray
    h0: Optional[np.ndarray] = None


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def module_report(title: str, torch_module, mlx_module, case: Case, seed: int = 0,
                  tol: Tolerance = TOL, grad_tol: Tolerance = GRAD_TOL) -> Report:
    """Compare the outputs of `module(x[, h0])` ("output", and "state" for recurrent modules)
    and the gradients of sum_i sum(out_i * w_i) (w fixed random) w.r.t. x, h0 and every
    parameter. Where torch gives no gradient (a detached h0) the MLX one must be zero."""
    import torch

    copy_weights(torch_module, mlx_module)
    args = [case.x] if case.h0 is None else [case.x, case.h0]
    t_args = [torch.from_numpy(a.copy()).requires_grad_(True) for a in args]
    t_out = _as_tuple(torch_module(*t_args))
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal(tuple(o.shape)).astype(np.float32) for o in t_out]
    sum(torch.sum(o * torch.from_numpy(w)) for o, w in zip(t_out, weights)).backward()

    def loss(params, *xs):
        mlx_module.update(params)
        return sum(mx.sum(o * mx.array(w)) for o, w in zip(_as_tuple(mlx_module(*xs)), weights))

    params = mlx_module.trainable_parameters()
    m_args = [mx.array(a) for a in args]
    m_out = _as_tuple(mlx_module(*m_args))
    grads = mx.grad(loss, argnums=list(range(len(args) + 1)))(params, *m_args)
    mlx_module.update(params)

    report = Report(title, "torch")
    if len(m_out) != len(t_out):
        raise ValueError(f"{title}: MLX returns {len(m_out)} outputs, torch {len(t_out)}")
    for name, mo, to in zip(("output", "state"), m_out, t_out):
        report.add(compare(name, mo, to, tol))
    for name, g, t in zip(("grad.input", "grad.h0"), grads[1:], t_args):
        ref = t.grad if t.grad is not None else torch.zeros_like(t)
        report.add(compare(name, g, ref, grad_tol))
    m_grads = dict(tree_flatten(grads[0]))
    for name, p in torch_module.named_parameters():
        report.add(compare(f"grad.{name}", m_grads[name], p.grad, grad_tol))
    return report


def random_case(shape, h0_shape=None, seed: int = 0) -> Case:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    h0 = None if h0_shape is None else rng.standard_normal(h0_shape).astype(np.float32)
    return Case(x, h0)


def real_features(frames: int = 100) -> np.ndarray:
    """Normalised ERB features [2, T, 32] of real audio (speech + noise at 5 dB SNR, and the
    noise alone), as DeepFilterNet's encoder sees them (norm alpha 0.99: tau 1 s at hop 10 ms):
    realistic scale and time correlation."""
    from df_mlx.libdf import DF, erb, erb_norm
    from parity.dsp import signals_for

    state = DF(48000, 960, 480, 32, 2)
    signal = signals_for(48000, seconds=(frames + 1) * 480 / 48000)[1][1]
    spec = state.analysis(signal)[:, :frames]
    return erb_norm(erb(spec, state.erb_widths()), 0.99).astype(np.float32)


def assert_passes(report: Report):
    print(report.table())
    assert report.passed, report.summary()


def failures(report: Report) -> set:
    return {r.name for r in report.layers if not r.passed}


# GRU(input_size, hidden_size, **kwargs) configurations; every one runs for each T in STEPS,
# with and without h0.
GRU_CONFIGS = [
    dict(input_size=12, hidden_size=16),
    dict(input_size=12, hidden_size=16, batch_first=True),
    dict(input_size=12, hidden_size=16, num_layers=2, batch_first=True),
    dict(input_size=12, hidden_size=16, num_layers=2, bias=False),
    dict(input_size=12, hidden_size=16, bidirectional=True, batch_first=True),
    dict(input_size=12, hidden_size=16, num_layers=2, bidirectional=True),
    dict(input_size=64, hidden_size=64, batch_first=True),  # DFNet3-like width
]


def _config_id(cfg):
    return ",".join(f"{k}={v}" for k, v in cfg.items())


def gru_pair(cfg, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    return torch.nn.GRU(**cfg), GRU(**cfg)


def gru_case(cfg, steps: int, with_h0: bool, unbatched: bool = False, seed: int = 0) -> Case:
    states = cfg.get("num_layers", 1) * (2 if cfg.get("bidirectional") else 1)
    if unbatched:
        return random_case((steps, cfg["input_size"]), (states, cfg["hidden_size"]) if with_h0 else None, seed)
    shape = (BATCH, steps) if cfg.get("batch_first") else (steps, BATCH)
    return random_case(shape + (cfg["input_size"],), (states, BATCH, cfg["hidden_size"]) if with_h0 else None, seed)


@pytest.mark.parametrize("with_h0", [False, True], ids=["no_h0", "h0"])
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("cfg", GRU_CONFIGS, ids=_config_id)
@pytest.mark.usefixtures("recurrence_path")
def test_gru(cfg, steps, with_h0):
    t, m = gru_pair(cfg)
    assert_passes(module_report(f"GRU({_config_id(cfg)}) T={steps}", t, m, gru_case(cfg, steps, with_h0)))


@pytest.mark.parametrize("with_h0", [False, True], ids=["no_h0", "h0"])
@pytest.mark.usefixtures("recurrence_path")
def test_gru_unbatched(with_h0):
    cfg = dict(input_size=12, hidden_size=16, num_layers=2, bidirectional=True)
    t, m = gru_pair(cfg)
    assert_passes(module_report("GRU unbatched", t, m, gru_case(cfg, 7, with_h0, unbatched=True)))


@pytest.mark.usefixtures("recurrence_path")
def test_gru_real_features():
    cfg = dict(input_size=32, hidden_size=64, num_layers=2, batch_first=True)
    t, m = gru_pair(cfg)
    assert_passes(module_report("GRU on real ERB features", t, m, Case(real_features())))


@pytest.mark.usefixtures("recurrence_path")
def test_gru_long_sequence():
    """GRU(256, 256) over 1000 unit-scale steps: the error must not grow along the sequence."""
    cfg = dict(input_size=256, hidden_size=256, batch_first=True)
    t, m = gru_pair(cfg)
    assert_passes(module_report("GRU(256) T=1000", t, m, gru_case(cfg, 1000, True)))


@pytest.mark.usefixtures("recurrence_path")
def test_gru_eval_mode_has_no_dropout():
    """In eval mode inter-layer dropout is off on both sides, so they still agree."""
    cfg = dict(input_size=12, hidden_size=16, num_layers=3, dropout=0.5, batch_first=True)
    t, m = gru_pair(cfg)
    t.eval()
    m.eval()
    assert_passes(module_report("GRU eval, dropout=0.5", t, m, gru_case(cfg, 7, True)))


# Perturbations: each breaks one piece of the MLX GRU; the report must fail.

def _chunks(a):
    size = a.shape[-1] // 3
    return a[..., :size], a[..., size : 2 * size], a[..., 2 * size :]


def _swap_rz(a):
    r, z, n = _chunks(a)
    return mx.concatenate([z, r, n], axis=-1)


def _negate_z(a):
    """sigmoid(-a) = 1 - sigmoid(a): the other update convention h' = (1 - z) h + z n."""
    r, z, n = _chunks(a)
    return mx.concatenate([r, -z, n], axis=-1)


def _bias_hn_outside_reset(xp, h, w_t, b):
    b_n = mx.concatenate([mx.zeros((2 * h.shape[-1],)), _chunks(b)[2]])
    return layers._gru_gates(xp + b_n, h @ w_t + (b - b_n), h)


GRU_PERTURBATIONS = {
    "swap_r_z": lambda xp, h, w_t, b: layers._gru_gates(_swap_rz(xp), _swap_rz(h @ w_t + b), h),
    "drop_bias_hh": lambda xp, h, w_t, b: layers._gru_gates(xp, h @ w_t, h),
    "bias_hn_outside_reset": _bias_hn_outside_reset,
    "update_flipped": lambda xp, h, w_t, b: layers._gru_gates(_negate_z(xp), _negate_z(h @ w_t + b), h),
}


@pytest.mark.parametrize("name", list(GRU_PERTURBATIONS))
@pytest.mark.usefixtures("pure_recurrences")  # the perturbation is in the pure step
def test_gru_report_catches_wrong_cell(monkeypatch, name):
    monkeypatch.setattr(layers, "_gru_step", GRU_PERTURBATIONS[name])
    cfg = GRU_CONFIGS[0]
    t, m = gru_pair(cfg)
    assert {"output", "state", "grad.input"} <= failures(module_report(name, t, m, gru_case(cfg, 7, True)))


@pytest.mark.usefixtures("recurrence_path")
def test_gru_report_catches_truncated_backprop(monkeypatch):
    """Forward unchanged, no gradient through the recurrent state: only gradients fail."""
    step = layers._gru_step
    monkeypatch.setattr(layers, "_gru_step", lambda xp, h, w_t, b: step(xp, mx.stop_gradient(h), w_t, b))
    cfg = GRU_CONFIGS[0]
    t, m = gru_pair(cfg)
    bad = failures(module_report("truncated", t, m, gru_case(cfg, 7, True)))
    assert "output" not in bad and "state" not in bad
    assert {"grad.input", "grad.h0", "grad.weight_hh_l0"} <= bad


@pytest.mark.usefixtures("recurrence_path")
def test_gru_report_catches_unreversed_direction(monkeypatch):
    scan = layers.gru_scan
    monkeypatch.setattr(layers, "gru_scan", lambda xp, h, w, b, reverse=False: scan(xp, h, w, b, False))
    cfg = GRU_CONFIGS[4]
    t, m = gru_pair(cfg)
    assert {"output", "state"} <= failures(module_report("unreversed", t, m, gru_case(cfg, 7, True)))


@pytest.mark.usefixtures("recurrence_path")
def test_gru_report_catches_small_weight_error(monkeypatch):
    """A 1e-4 relative change of one weight matrix is visible to the bounds."""
    original = copy_weights

    def copy_then_scale(torch_module, mlx_module):
        original(torch_module, mlx_module)
        mlx_module.load_weights([("weight_hh_l0", mlx_module.weight_hh_l0 * (1 + 1e-4))], strict=False)

    monkeypatch.setitem(module_report.__globals__, "copy_weights", copy_then_scale)
    cfg = GRU_CONFIGS[0]
    t, m = gru_pair(cfg)
    assert "output" in failures(module_report("scaled weight_hh", t, m, gru_case(cfg, 100, True)))
