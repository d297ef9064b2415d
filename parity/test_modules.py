"""df_mlx.modules (convolution blocks, masks, deep filtering, local SNR) against df.modules:
outputs, every traced sub-module, and gradients w.r.t. inputs and parameters."""

import mlx.core as mx
import numpy as np
import pytest
import torch

import df_mlx.modules as mm
from parity.pairs import nchw_to_nhwc, nhwc_to_nchw, pair_report, randomize_norm_stats, twin
from parity.reference import import_ref
from parity.report import Report, Tolerance, compare

# float32 convolutions/matmuls of O(1) values summing up to ~100 terms: a few ulps of O(10).
FLOAT32 = Tolerance(1e-5, 0.0, "float32 sums of O(100) products of O(1) values")
# Gradients sum over all B*T*F output positions (a few thousand O(1) terms): float32 rounding
# of such a sum is ~n*eps ~ 1e-4 at worst; gradients that are mathematically 0 (a conv bias
# before train-mode BatchNorm) are pure rounding noise of that size.
GRAD = Tolerance(5e-5, 1e-6, "float32 gradient sums over thousands of output positions")

ref = import_ref("modules")


def _assert(report):
    print(report.table())
    assert report.passed, report.summary()


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


CONV_CASES = [
    dict(in_ch=1, out_ch=16, kernel_size=(3, 3), bias=False, separable=True),  # DFN3 erb_conv0
    dict(in_ch=16, out_ch=16, kernel_size=(1, 3), fstride=2, bias=False, separable=True),
    dict(in_ch=2, out_ch=16, kernel_size=(2, 3), separable=True),
    dict(in_ch=16, out_ch=10, kernel_size=(1, 1), separable=True),  # groups 2, no pointwise
    dict(in_ch=8, out_ch=8, kernel_size=(2, 5), dilation=2, fpad=True, norm_layer=None),
    dict(in_ch=4, out_ch=6, kernel_size=3, fpad=False, activation_layer=None),
]


@pytest.mark.parametrize("kw", CONV_CASES, ids=[str(i) for i in range(len(CONV_CASES))])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_conv2d_norm_act(kw, train):
    torch.manual_seed(0)
    t_kw, m_kw = dict(kw), dict(kw)
    if "norm_layer" in kw:
        t_kw["norm_layer"] = m_kw["norm_layer"] = None
    if "activation_layer" in kw:
        t_kw["activation_layer"] = m_kw["activation_layer"] = None
    tm, mm_ = twin(randomize_norm_stats(ref.Conv2dNormAct(**t_kw)), mm.Conv2dNormAct(**m_kw), train)
    x = _rand(2, kw["in_ch"], 7, 12)
    _assert(pair_report(f"Conv2dNormAct {kw}", tm, mm_, [x], GRAD, [nchw_to_nhwc], [nhwc_to_nchw]))


TCONV_CASES = [
    dict(in_ch=16, out_ch=16, kernel_size=(1, 3), fstride=2, bias=False, separable=True),  # DFN3 convt
    dict(in_ch=8, out_ch=4, kernel_size=(2, 3), fstride=2),
    dict(in_ch=4, out_ch=4, kernel_size=(3, 3), fstride=2, norm_layer=None),
    dict(in_ch=6, out_ch=4, kernel_size=(1, 3), fstride=2, separable=True, fpad=False),
]


@pytest.mark.parametrize("kw", TCONV_CASES, ids=[str(i) for i in range(len(TCONV_CASES))])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_conv_transpose2d_norm_act(kw, train):
    torch.manual_seed(0)
    t_kw, m_kw = dict(kw), dict(kw)
    if "norm_layer" in kw:
        t_kw["norm_layer"] = m_kw["norm_layer"] = None
    tm, mm_ = twin(randomize_norm_stats(ref.ConvTranspose2dNormAct(**t_kw)), mm.ConvTranspose2dNormAct(**m_kw), train)
    x = _rand(2, kw["in_ch"], 6, 9)
    _assert(pair_report(f"ConvTranspose2dNormAct {kw}", tm, mm_, [x], GRAD, [nchw_to_nhwc], [nhwc_to_nchw]))


CONVKXF_CASES = [
    dict(in_ch=16, out_ch=32, k=1, f=3, fstride=2, mode="normal"),
    dict(in_ch=16, out_ch=16, k=2, f=3, fstride=2, mode="transposed", batch_norm=True),
    dict(in_ch=16, out_ch=8, k=3, f=5, fstride=2, mode="upsample", lookahead=1),
    dict(in_ch=4, out_ch=8, k=1, f=3, fstride=1, depthwise=False, batch_norm=True),
    dict(in_ch=8, out_ch=8, k=1, f=3, complex_in=True),
]


@pytest.mark.parametrize("kw", CONVKXF_CASES, ids=[str(i) for i in range(len(CONVKXF_CASES))])
def test_convkxf(kw):
    torch.manual_seed(0)
    tm, mm_ = twin(randomize_norm_stats(ref.convkxf(**kw)), mm.convkxf(**kw))
    x = _rand(2, kw["in_ch"], 5, 8)
    _assert(pair_report(f"convkxf {kw}", tm, mm_, [x], GRAD, [nchw_to_nhwc], [nhwc_to_nchw]))


def _erb_inv_fb(nb_erb=32):
    import libdf

    widths = libdf.DF(48000, 960, 480, nb_erb, 2).erb_widths()
    return ref.erb_fb(widths, 48000, inverse=True), mm.erb_fb(widths, 48000, inverse=True)


@pytest.mark.parametrize("post_filter", [False, True])
@pytest.mark.parametrize("atten", [None, [6.0, 20.0]])
def test_mask(post_filter, atten):
    t_fb, m_fb = _erb_inv_fb()
    tm, mm_ = twin(ref.Mask(t_fb, post_filter=post_filter), mm.Mask(m_fb, post_filter=post_filter))
    spec = _rand(2, 1, 9, 481, 2)
    mask = np.random.default_rng(1).random((2, 1, 9, 32), dtype=np.float32)
    report = pair_report(f"Mask pf={post_filter} atten={atten}", tm, mm_, [spec, mask], GRAD)
    if atten is not None:
        lim = np.array(atten, dtype=np.float32)
        t_out = tm(torch.from_numpy(spec), torch.from_numpy(mask), torch.from_numpy(lim))
        report.add(compare("output_atten_lim", mm_(mx.array(spec), mx.array(mask), mx.array(lim)), t_out, FLOAT32))
    _assert(report)


def test_exponential_unit_norm():
    tm, mm_ = twin(ref.ExponentialUnitNorm(0.99, 96), mm.ExponentialUnitNorm(0.99, 96))
    _assert(pair_report("ExponentialUnitNorm", tm, mm_, [_rand(2, 1, 30, 96, 2)], GRAD))


DFOP_METHODS = ["real_loop", "real_strided", "real_unfold", "complex_strided"]


@pytest.mark.parametrize("method", DFOP_METHODS)
@pytest.mark.parametrize("order, lookahead", [(5, 0), (5, 2), (1, 0), (3, 1)])
@pytest.mark.parametrize("with_alpha", [False, True])
def test_dfop(method, order, lookahead, with_alpha):
    tm = ref.DfOp(96, order, lookahead, method=method)
    mm_ = mm.DfOp(96, order, lookahead, method=method)
    spec, coefs = _rand(2, 1, 20, 481, 2), _rand(2, 20, order, 96, 2, seed=1)
    inputs = [spec, coefs] + ([np.random.default_rng(2).random((2, 20, 1), dtype=np.float32)] if with_alpha else [])
    _assert(pair_report(f"DfOp {method} order={order} la={lookahead} alpha={with_alpha}", tm, mm_, inputs, GRAD))


def test_dfop_one_step_and_hidden_state_loop():
    order, lookahead, t = 5, 2, 12
    spec, coefs = _rand(1, 1, t, 481, 2), _rand(1, t, order, 96, 2, seed=1)
    alpha = np.random.default_rng(2).random((1, t, 1), dtype=np.float32)
    report = Report("DfOp streaming methods", "torch")
    tm = ref.DfOp(96, order, lookahead, method="real_hidden_state_loop", freq_bins=481)
    mm_ = mm.DfOp(96, order, lookahead, method="real_hidden_state_loop", freq_bins=481)
    t_args = [torch.from_numpy(a) for a in (spec, coefs, alpha)]
    for half in (slice(0, t // 2), slice(t // 2, t)):  # the ring buffer carries across calls
        t_out = tm(t_args[0][:, :, half], t_args[1][:, half], t_args[2][:, half])
        m_out = mm_(mx.array(spec[:, :, half]), mx.array(coefs[:, half]), mx.array(alpha[:, half]))
        report.add(compare(f"real_hidden_state_loop[{half.start}:{half.stop}]", m_out, t_out, FLOAT32))
    tm = ref.DfOp(96, order, lookahead, method="real_one_step")
    mm_ = mm.DfOp(96, order, lookahead, method="real_one_step")
    buf, c1 = spec[:, :, :order], coefs[:, :1]
    report.add(compare("real_one_step", mm_(mx.array(buf), mx.array(c1)),
                       tm(torch.from_numpy(buf), torch.from_numpy(c1)), FLOAT32))
    _assert(report)


@pytest.mark.parametrize("dim", [1, -3, 2])
def test_spec_pad_and_as_strided(dim):
    x = _rand(2, 10, 6, 2)
    report = Report(f"spec_pad/as_strided dim={dim}", "torch")
    report.add(compare("spec_pad", mm.spec_pad(mx.array(x), 5, 2, dim), ref.spec_pad(torch.from_numpy(x), 5, 2, dim),
                       Tolerance(0.0, 0.0, "copies")))
    if dim in (1, -3):
        report.add(compare("as_strided", mm.as_strided(mx.array(x), 5, 2, dim=dim),
                           ref.as_strided(torch.from_numpy(x), 5, 2, dim=dim), Tolerance(0.0, 0.0, "copies")))
    _assert(report)


@pytest.mark.parametrize("ws, ws_ns, db", [(20, None, True), (40, 60, True), (10, None, False)])
def test_local_snr(ws, ws_ns, db):
    clean, noise = _rand(2, 1, 40, 96, 2), _rand(2, 1, 40, 96, 2, seed=1) * 0.3
    report = Report(f"local_snr ws={ws} ws_ns={ws_ns} db={db}", "torch")
    t = ref.local_snr(torch.from_numpy(clean), torch.from_numpy(noise), ws, db, ws_ns)
    m = mm.local_snr(mx.array(clean), mx.array(noise), ws, db, ws_ns)
    for i, (a, b) in enumerate(zip(m, t)):
        report.add(compare(f"local_snr.{i}", a, b, GRAD))
    tm, mm_ = ref.LocalSnrTarget(ws, db, ws_ns, (-15, 35)), mm.LocalSnrTarget(ws, db, ws_ns, (-15, 35))
    report.add(compare("LocalSnrTarget", mm_(mx.array(clean), mx.array(noise)),
                       tm(torch.from_numpy(clean), torch.from_numpy(noise)), GRAD))
    _assert(report)


def test_pair_report_catches_perturbed_conv():
    """The harness names the perturbed layer first."""
    torch.manual_seed(0)
    kw = CONV_CASES[1]
    tm, mm_ = twin(randomize_norm_stats(ref.Conv2dNormAct(**kw)), mm.Conv2dNormAct(**kw))
    mm_["1"].weight = mm_["1"].weight * 1.001
    report = pair_report("perturbed", tm, mm_, [_rand(2, 16, 7, 12)], GRAD, [nchw_to_nhwc], [nhwc_to_nchw])
    assert not report.passed and report.first_failure.name == "1"


def test_pair_report_catches_wrong_post_filter(monkeypatch):
    t_fb, m_fb = _erb_inv_fb()
    tm, mm_ = twin(ref.Mask(t_fb, post_filter=True), mm.Mask(m_fb, post_filter=True))
    monkeypatch.setattr(mm.Mask, "pf", lambda self, mask, beta=0.02: mm.Mask.__dict__["pf"].__wrapped__(self, mask, 0.03)
                        if hasattr(mm.Mask.__dict__["pf"], "__wrapped__") else mask * 0.99)
    report = pair_report("perturbed pf", tm, mm_, [_rand(2, 1, 9, 481, 2), np.random.default_rng(1).random(
        (2, 1, 9, 32), dtype=np.float32)], GRAD)
    assert not report.passed
