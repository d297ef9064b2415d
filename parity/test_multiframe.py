"""df_mlx.multiframe against df.multiframe: every filter in every input form (outputs, the
covariance df constrains in place, gradients through products and solves) and the helpers."""

import itertools

import mlx.core as mx
import numpy as np
import pytest
import torch

import df_mlx.multiframe as ours
from parity.reference import import_ref
from parity.report import Report, Tolerance, compare

ref = import_ref("multiframe")
# Products and sums of O(1) complex values over N <= 5 frames.
FLOAT32 = Tolerance(1e-5, 1e-6, "float32 complex products over a few frames")
# Solving N x N systems amplifies rounding by the condition number (regularised, ~1e2-1e3).
SOLVE = Tolerance(1e-4, 1e-4, "float32 solves of regularised N x N systems")


def _assert(report):
    print(report.table())
    assert report.passed, report.summary()


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _hermitian_pd(b, t, f, n, seed=0):
    """Well-conditioned Hermitian positive-definite matrices as [B, T, F, N*N*2] real views."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((b, t, f, n, n)) + 1j * rng.standard_normal((b, t, f, n, n))
    m = a @ np.conj(np.swapaxes(a, -1, -2)) / n + np.eye(n)
    return np.stack([m.real, m.imag], -1).reshape(b, t, f, n * n * 2).astype(np.float32)


@pytest.mark.parametrize("cls", ["MfWf", "MfMvdr"])
@pytest.mark.parametrize("cholesky, inverse, constraints", list(itertools.product([False, True], repeat=3)))
@pytest.mark.parametrize("lookahead", [0, 2])
def test_mf_filters(cls, cholesky, inverse, constraints, lookahead):
    b, t, f, n = 2, 12, 20, 5
    spec = _rand(b, 1, t, 33, 2)
    ifc = _rand(b, t, f, n * 2, seed=1)
    if cholesky:  # a factor near the identity keeps L L^H well conditioned for the solves
        eye = np.stack([np.eye(n), np.zeros((n, n))], -1).reshape(-1).astype(np.float32)
        r = eye + _rand(b, t, f, n * n * 2, seed=2) * 0.1
    else:
        r = _hermitian_pd(b, t, f, n, seed=2)
    kw = dict(cholesky_decomp=cholesky, inverse=inverse, enforce_constraints=constraints)
    tm, mm = getattr(ref, cls)(f, n, lookahead, **kw), getattr(ours, cls)(f, n, lookahead, **kw)
    report = Report(f"{cls} {kw} la={lookahead}", "df.multiframe")
    t_in = [torch.from_numpy(x.copy()) for x in (spec, ifc, r)]
    for x in t_in[:2]:
        x.requires_grad_(True)
    t_out = tm(*t_in)
    m_out = mm(*map(mx.array, (spec, ifc, r)))
    tol = FLOAT32 if inverse else SOLVE
    report.add(compare("output", m_out, t_out, tol))
    # df enforces the constraints on the caller's covariance tensor in place
    report.add(compare("constrained covariance", mm.constrain(mx.array(r)), t_in[2], Tolerance(0, 0, "copies")))
    assert mm.get_r_factor() == tm.get_r_factor()
    w = _rand(*t_out.shape, seed=3)
    (t_out * torch.from_numpy(w)).sum().backward()
    grads = mx.grad(lambda s, i: (mm(s, i, mx.array(r)) * mx.array(w)).sum(), argnums=(0, 1))(
        mx.array(spec), mx.array(ifc))
    report.add(compare("grad.spec", grads[0], t_in[0].grad, tol))
    report.add(compare("grad.ifc", grads[1], t_in[1].grad, tol))
    _assert(report)


def test_helpers():
    report = Report("multiframe helpers", "df.multiframe")
    x = _rand(2, 1, 15, 9, 2)
    xc = x[..., 0] + 1j * x[..., 1]
    report.add(compare("psd", ours.psd(mx.array(xc), 4), ref.psd(torch.from_numpy(xc), 4), FLOAT32))
    report.add(compare("compute_corr", ours.compute_corr(mx.array(xc[0]), 3), ref.compute_corr(torch.from_numpy(xc[0]), 3),
                       FLOAT32))
    m = _hermitian_pd(1, 2, 3, 4).reshape(1, 2, 3, 4, 4, 2)
    mc = m[..., 0] + 1j * m[..., 1]
    report.add(compare("_tik_reg", ours._tik_reg(mx.array(mc), 1e-3, 1e-2), ref._tik_reg(torch.from_numpy(mc), 1e-3, 1e-2),
                       FLOAT32))
    report.add(compare("_compute_mat_trace", ours._compute_mat_trace(mx.array(mc)),
                       ref._compute_mat_trace(torch.from_numpy(mc)), FLOAT32))
    rss = _rand(1, 2, 3, 4, 2)
    rssc = rss[..., 0] + 1j * rss[..., 1]
    report.add(compare("solve", ours.MultiFrameModule.solve(mx.array(mc), mx.array(rssc)),
                       ref.MultiFrameModule.solve(torch.from_numpy(mc), torch.from_numpy(rssc)), SOLVE))
    xw = _rand(2, 15, 9, 6, seed=5)
    for dim, step, window in itertools.product((0, 1, 2, -1, -2), (1, 2, 3), (2, 3)):
        try:
            expected = ref.as_windowed(torch.from_numpy(xw), window, step, dim)
        except RuntimeError:  # df's strided view reads past the tensor (step > 1): ours refuses too
            with pytest.raises(ValueError, match="reads past"):
                ours.as_windowed(mx.array(xw), window, step, dim)
            continue
        report.add(compare(f"as_windowed dim={dim} step={step} window={window}",
                           ours.as_windowed(mx.array(xw), window, step, dim), expected, Tolerance(0, 0, "copies")))
    coefs = _rand(2, 1, 15, 9, 2, seed=4)
    cc = coefs[..., 0] + 1j * coefs[..., 1]
    report.add(compare("CRM", ours.CRM(9).forward_impl(mx.array(xc[..., None]), mx.array(cc)),
                       ref.CRM(9).forward_impl(torch.from_numpy(xc[..., None]), torch.from_numpy(cc)), FLOAT32))
    _assert(report)


def test_mf_filter_check_fails_when_constraints_dropped(monkeypatch):
    monkeypatch.setattr(ours._MfFilter, "_covariance", lambda self, r: ours.as_complex(
        r.reshape(*r.shape[:3], self.frame_size, self.frame_size, 2)))
    spec, ifc, r = _rand(1, 1, 6, 33, 2), _rand(1, 6, 20, 10, seed=1), _rand(1, 6, 20, 50, seed=2)
    kw = dict(cholesky_decomp=True, inverse=True)
    out_t = ref.MfWf(20, 5, **kw)(*(torch.from_numpy(a.copy()) for a in (spec, ifc, r)))
    out_m = ours.MfWf(20, 5, **kw)(*map(mx.array, (spec, ifc, r)))
    assert not compare("output", out_m, out_t, FLOAT32).passed
