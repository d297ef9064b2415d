"""df_mlx.mamba against the DFNet4 fork's `df.mamba` (sealad886/DeepFilterNet4), layer by layer,
outputs and gradients: from the committed fixtures (parity/fixtures/fork, recorded by
parity/fork_recorder.py), and live against the fork when $DFMLX_FORK_DIR names a checkout."""

import mlx.core as mx
import numpy as np
import pytest

import df_mlx.mamba as mamba
from converters.layout import LayoutError
from parity.fork_recorder import (CASES, FIXTURE_DIR, assert_fixture_current, fixture_report, live,
                                  load_fixture, mlx_kwargs, mlx_twin, record_in_subprocess)
from parity.report import Tolerance

# float32 through linears, a depthwise conv, LayerNorm and at most 40 scan steps whose state
# decays (|exp(dt A)| < 1): measured worst 9.5e-7 absolute on O(1)-O(10) activations.
LAYER = Tolerance(1e-5, 0.0, "float32 rounding through linears, conv, LayerNorm and <= 40 decaying scan steps")
# Gradients of sum(out * w) sum over every position and step: measured worst 2.6e-6 absolute
# (grad of mamba.out_proj.weight, scale 5).
GRAD = Tolerance(2e-5, 1e-5, "float32 gradient sums over all positions and scan steps")

MAMBA_CASES = [name for name, case in CASES.items() if case.module.startswith("mamba.") and case.group == "layers"]


twin = mlx_twin


def check(fixture, **kwargs):
    report = fixture_report(fixture, twin(fixture), LAYER, grad_tol=GRAD, **kwargs)
    print(report.table())
    return report


@pytest.mark.parametrize("name", MAMBA_CASES)
@pytest.mark.usefixtures("recurrence_path")
def test_fixture(name):
    """Every traced layer, the outputs and all gradients within tolerance of the recording."""
    fixture = load_fixture(name)
    report = check(fixture)
    assert report.passed, report.summary()
    assert any(r.name.startswith("grad.") for r in report.layers), "the fixture carries no gradients"


@pytest.mark.parametrize("name", MAMBA_CASES)
def test_fixture_is_small(name):
    assert (FIXTURE_DIR / f"{name}.safetensors").stat().st_size < 1_000_000


def test_perturbed_state_matrix_is_named_first():
    """A 1% error in four entries of A (of 128) in the second Mamba layer must show up first
    there, with everything before it still within tolerance."""
    fixture = load_fixture("squeezed_mamba")

    def perturb(module):
        block = module.mamba_layers[1].mamba
        block.A_log = block.A_log + mx.array(np.eye(*block.A_log.shape, dtype=np.float32)) * 1e-2

    report = check(fixture, prepare=perturb, grads=False)
    assert not report.passed
    assert report.first_failure.name.startswith("mamba_layers.1.mamba"), report.summary()
    first = [r.name for r in report.layers].index(report.first_failure.name)
    assert all(r.passed for r in report.layers[:first])


def test_wrong_shape_is_rejected():
    """A twin built with another state size cannot take the recorded weights."""
    fixture = load_fixture("mamba_block")
    kwargs = dict(mlx_kwargs(fixture), d_state=fixture.case["kwargs"]["d_state"] + 1)
    with pytest.raises(LayoutError, match="A_log"):
        fixture_report(fixture, mamba.MambaBlock(**kwargs), LAYER)


@pytest.mark.usefixtures("recurrence_path")
def test_scan_state_carries_over():
    """Scanning two halves with the state handed over equals one scan (the streaming basis)."""
    block = mamba.MambaBlock(8, d_state=4)
    x = mx.random.normal((2, 12, 8), key=mx.random.key(0))
    x_in, _ = mx.split(block.in_proj(x), 2, axis=-1)
    delta = mamba.softplus(mx.random.normal((2, 12, block.d_inner), key=mx.random.key(1)))
    bc = mx.random.normal((2, 12, 8), key=mx.random.key(2))
    A = -mx.exp(block.A_log)
    y, h = mamba.selective_scan(x_in, delta, A, bc[..., :4], bc[..., 4:])
    y1, h1 = mamba.selective_scan(x_in[:, :5], delta[:, :5], A, bc[:, :5, :4], bc[:, :5, 4:])
    y2, h2 = mamba.selective_scan(x_in[:, 5:], delta[:, 5:], A, bc[:, 5:, :4], bc[:, 5:, 4:], h1)
    np.testing.assert_allclose(np.array(mx.concatenate([y1, y2], axis=1)), np.array(y), atol=1e-6)
    np.testing.assert_allclose(np.array(h2), np.array(h), atol=1e-6)


def test_init_matches_the_fork():
    """A = -[1..N] per channel, D = 1, softplus(dt bias) in [dt_min, dt_max], as the fork."""
    block = mamba.MambaBlock(32, d_state=6, dt_min=0.002, dt_max=0.05)
    np.testing.assert_allclose(np.exp(np.array(block.A_log)), np.tile(np.arange(1, 7), (64, 1)), rtol=1e-6)
    np.testing.assert_array_equal(np.array(block.D), np.ones(64))
    dt = np.array(mamba.softplus(block.dt_proj.bias))
    assert dt.min() >= 0.002 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
    bound = block.dt_rank**-0.5
    assert np.abs(np.array(block.dt_proj.weight)).max() <= bound


@pytest.fixture(scope="module")
def live_dir(tmp_path_factory):
    """All Mamba cases recorded from the fork checkout now, in one subprocess."""
    out = tmp_path_factory.mktemp("fork_mamba")
    record_in_subprocess(MAMBA_CASES, out)
    return out


@live
@pytest.mark.parametrize("name", MAMBA_CASES)
@pytest.mark.usefixtures("recurrence_path")
def test_live(name, live_dir):
    """The case recorded from the fork checkout now, compared."""
    report = check(load_fixture(name, live_dir))
    assert report.passed, report.summary()


@live
@pytest.mark.parametrize("name", MAMBA_CASES)
def test_committed_fixture_is_current(name, live_dir):
    """The committed fixture is what the checkout records (same weights, inputs, outputs)."""
    assert_fixture_current(name, live_dir)


def test_scan_exp_is_within_one_ulp_of_torch():
    """The selective scan's own exp (mamba._exp) against torch.exp over its whole range, and
    at the ends it clamps; a wrong coefficient or reduction constant costs many ulp."""
    import torch

    x = np.concatenate([np.linspace(-86.64, 88.72, 1_000_001), -np.logspace(-8, 1.9, 50_001),
                        np.logspace(-8, 1.9, 50_001), [0.0]]).astype(np.float32)
    got = np.array(mx.compile(mamba._exp)(mx.array(x))).astype(np.float64)
    want = torch.exp(torch.from_numpy(x)).numpy()
    ulp = np.abs(got - want) / np.spacing(want)
    assert ulp.max() <= 1.0, ulp.max()
    ends = np.array(mamba._exp(mx.array([-200.0, 200.0])))
    np.testing.assert_allclose(ends, np.exp(np.float32([-86.64, 88.72283])), rtol=1e-6)
