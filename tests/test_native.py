"""df_mlx's native recurrences (df_mlx/native/, df_mlx._native): built by pip, bound to a fast
BLAS whatever the import order, equal to the pure-MLX path, with the stated gate error bounds.
The parity tests run both paths against the reference (conftest.py: recurrence_path)."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from df_mlx import _native, layers

ROOT = Path(__file__).resolve().parents[1]
# native vs pure GRU: the same op order; only the gate functions differ (<= 3 ulp each), which
# 1000 steps of a GRU(256) accumulate to 3.6e-7
NATIVE_VS_PURE_TOL = 2e-6
MATMUL_TOL = 1e-5  # one float32 sgemm against another: summation order over K = 7 (relative to the largest)
# native vs pure depthwise conv: the same taps in the same order; the native op's FMAs round
# each tap's multiply-add once instead of twice (relative to the largest output)
DEPTHWISE_TOL = 1e-6
# float32 sums of up to a few hundred products (taps x channels per group) in another order,
# relative to the largest output
GROUPED_TOL = 1e-6
# softmax against float64: exp within 1 ulp, the sum and the division (measured 4.6e-7 on
# [1, 8, 500, 500] logits of scale 5; torch 4.4e-7, mx.softmax 2.7e-6)
SOFTMAX_TOL = 1e-6
SOFTMAX_GRAD_TOL = 1e-5  # the same analytic gradient on outputs that differ by SOFTMAX_TOL
SIGMOID_ULP = 3.0  # df_mlx/native/fastmath.h's stated bounds
TANH_ULP = 2.0
# the same analytic activation gradient on outputs a few ulp apart, up to |g| ~ 4
ACTIVATION_GRAD_TOL = 1e-5
AFFINE_TOL = 1e-6  # x * scale + shift of |values| ~ 5 rounded once (FMA) instead of twice
AFFINE_GRAD_TOL = 1e-5  # the parameter gradients are sums over up to 64000 rows in another order
DEEP_FILTER_TOL = 1e-6  # sums of frame_size complex products in the same order (relative to the largest)
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="the native extension is built on Linux")
needs_native = pytest.mark.skipif(_native.module is None, reason=f"native ops unavailable: {_native.reason}")


def _run(code: str, **env) -> str:
    environ = {k: v for k, v in os.environ.items() if k not in ("DFMLX_NATIVE", "DFMLX_BLAS")}
    environ.update(env)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_build_and_runtime_pin_the_same_mlx():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = lambda reqs: sorted(r for r in reqs if r.startswith("mlx"))  # noqa: E731
    assert pins(project["build-system"]["requires"]) == pins(project["project"]["dependencies"])


@linux_only
def test_extension_is_built_for_the_running_mlx():
    if os.environ.get("DFMLX_NATIVE") == "0":
        pytest.skip("DFMLX_NATIVE=0 in this run")
    assert _native.module is not None, _native.reason
    assert _native.module.mlx_version == mx.__version__


PIP_ONLY = "import ctypes.util; ctypes.util.find_library = lambda name: None\n"  # no system BLAS


@linux_only
@pytest.mark.parametrize("df_mlx_first", [True, False], ids=["df_mlx_first", "mlx_first"])
def test_pip_only_native_products_use_the_pip_openblas_whatever_the_import_order(df_mlx_first):
    """With no system BLAS (df_mlx._blas finds none), the native ops bind the scipy-openblas32
    wheel's library, not MLX's bundled reference BLAS, even after `import mlx.core`; MLX's own
    matmuls get it only when df_mlx comes first (tests/test_blas.py)."""
    order = "import df_mlx, mlx.core" if df_mlx_first else "import mlx.core, df_mlx"
    code = PIP_ONLY + f"{order}\nfrom df_mlx import _blas, _native\nprint(_blas.loaded, _native.blas_library())"
    mlx_blas, native_blas = _run(code).split()
    assert "scipy_openblas" in native_blas and "mlx_cpu.libs" not in native_blas
    assert mlx_blas == (native_blas if df_mlx_first else "None")


@linux_only
@pytest.mark.parametrize("df_mlx_first", [True, False], ids=["df_mlx_first", "mlx_first"])
def test_model_products_leave_the_reference_blas_whatever_the_import_order(df_mlx_first):
    """After `import mlx.core`, MLX's own matmuls stay on the wheel's reference BLAS, so the
    models' dense products (layers.matmul: linear layers, GRU input projections, convolutions,
    the ERB mask) run on the native op instead; where MLX's matmuls have a fast BLAS they stay
    MLX's."""
    order = "import df_mlx, mlx.core" if df_mlx_first else "import mlx.core, df_mlx"
    code = (PIP_ONLY + f"{order}\nfrom df_mlx import _blas, _native\n"
            "print(_blas.loaded is None, _native.products)")
    assert _run(code) == ("False False" if df_mlx_first else "True True")


@needs_native
@pytest.mark.parametrize("shape, b_shape", [((7,), (7, 4)), ((5, 7), (7, 4)), ((2, 3, 5, 7), (7, 4)),
                                            ((3, 5, 7), (3, 7, 4))], ids=["vector", "matrix", "4-D", "batched"])
def test_native_matmul_equals_mlx_and_has_its_gradient(monkeypatch, shape, b_shape):
    monkeypatch.setattr(_native, "products", True)
    rng = np.random.default_rng(0)
    a, b = mx.array(rng.normal(size=shape).astype(np.float32)), mx.array(rng.normal(size=b_shape).astype(np.float32))
    got = layers.matmul(a, b)
    assert got.shape == (a @ b).shape
    assert mx.abs(got - a @ b).max().item() < MATMUL_TOL
    loss = lambda mm: lambda x, y: (mm(x, y) ** 2).sum()  # noqa: E731
    grads = mx.compile(mx.grad(loss(layers.matmul), argnums=(0, 1)))(a, b)
    ref = mx.grad(loss(lambda x, y: x @ y), argnums=(0, 1))(a, b)
    for g, r in zip(grads, ref):
        assert mx.abs(g - r).max().item() < MATMUL_TOL * max(1.0, mx.abs(r).max().item())


@needs_native
def test_the_native_matmul_runs_where_products_are_on(monkeypatch):
    calls = []
    monkeypatch.setattr(_native, "products", True)
    monkeypatch.setattr(layers, "_native_matmul", lambda a, b: calls.append(a.shape) or a @ b)
    long = (layers.COPY_WEIGHT_FROM_ROWS, 3)  # shorter products run the native linear anyway
    layers.linear(mx.ones(long), mx.ones((4, 3)))
    assert calls == [long]
    monkeypatch.setattr(_native, "products", False)
    layers.linear(mx.ones(long), mx.ones((4, 3)))
    assert calls == [long]


@needs_native
@pytest.mark.parametrize("x_shape, w_shape", [((7,), (4, 7)), ((3, 7), (4, 7)), ((2, 3, 5, 7), (4, 7)),
                                              ((2, 3, 6), (4, 1, 2, 3))], ids=["vector", "matrix", "4-D", "conv"])
def test_native_linear_equals_mlx_and_has_its_gradient(x_shape, w_shape):
    """x @ w.T for a torch-layout weight read where it is (a conv weight [O, kH, kW, I] as
    [O, kH kW I]), with MLX's gradients."""
    rng = np.random.default_rng(1)
    x, w = (mx.array(rng.normal(size=s).astype(np.float32)) for s in (x_shape, w_shape))
    ref_fn = lambda v, u: v @ u.reshape(u.shape[0], -1).T  # noqa: E731
    got = layers._native_linear(x, w)
    assert got.shape == ref_fn(x, w).shape
    assert mx.abs(got - ref_fn(x, w)).max().item() < MATMUL_TOL * mx.abs(ref_fn(x, w)).max().item()
    loss = lambda f: lambda v, u: (f(v, u) ** 2).sum()  # noqa: E731
    grads = mx.compile(mx.grad(loss(layers._native_linear), argnums=(0, 1)))(x, w)
    for g, r in zip(grads, mx.grad(loss(ref_fn), argnums=(0, 1))(x, w)):
        assert g.shape == r.shape
        assert mx.abs(g - r).max().item() < MATMUL_TOL * max(1.0, mx.abs(r).max().item())


@needs_native
def test_short_products_and_pointwise_convs_run_the_native_linear(native_calls):
    """A streaming hop's products: linear layers and 1x1 convs of few rows."""
    mx.eval(layers.linear(mx.ones((2, 3)), mx.ones((4, 3))),
            layers.conv2d(mx.ones((1, 1, 8, 3)), mx.ones((4, 1, 1, 3))))
    assert native_calls.count("linear") == 2
    mx.eval(layers.linear(mx.ones((layers.COPY_WEIGHT_FROM_ROWS, 3)), mx.ones((4, 3))))
    assert native_calls.count("linear") == 2
    # empty products (no frames yet) stay MLX's
    assert layers.linear(mx.ones((0, 3)), mx.ones((4, 3))).shape == (0, 4)
    assert layers.conv2d(mx.ones((1, 0, 8, 3)), mx.ones((4, 1, 1, 3))).shape == (1, 0, 8, 4)
    assert native_calls.count("linear") == 2


def test_dfmlx_native_0_selects_the_pure_path():
    out = _run("from df_mlx import _native; print(_native.module, _native.reason)", DFMLX_NATIVE="0")
    assert out == "None DFMLX_NATIVE=0"


def _case(steps=40, batch=3, size=32, seed=0):
    rng = np.random.default_rng(seed)
    bound = 1 / np.sqrt(size)
    xp = rng.normal(size=(steps, batch, 3 * size))
    h0 = rng.normal(size=(batch, size)) * 0.5
    w = rng.uniform(-bound, bound, (3 * size, size))
    b = rng.uniform(-bound, bound, 3 * size)
    return [mx.array(a.astype(np.float32)) for a in (xp, h0, w, b)]


@needs_native
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("reverse", [False, True])
# batch 1: native/gemv.h on the weight copied aligned (40 steps) or read in place (3 steps), and
# the BLAS's sgemv where the hidden size is no multiple of 16
@pytest.mark.parametrize("steps, size", [(40, 32), (3, 32), (40, 24)], ids=["aligned", "in-place", "blas"])
def test_native_gru_equals_the_pure_scan(batch, reverse, steps, size):
    args = _case(steps=steps, batch=batch, size=size)
    out, h_n = layers._native_gru_scan(reverse)(*args)
    ref_out, ref_h = layers._pure_gru_scan(*args, reverse)
    assert out.shape == ref_out.shape and h_n.shape == ref_h.shape
    assert mx.abs(out - ref_out).max().item() < NATIVE_VS_PURE_TOL
    assert mx.abs(h_n - ref_h).max().item() < NATIVE_VS_PURE_TOL
    assert mx.array_equal(h_n, out[0 if reverse else -1])


@needs_native
def test_native_gru_gradients_compile_and_value_and_grad():
    args = _case()

    def loss(scan):
        def f(*a):
            out, h_n = scan(*a)
            return (out * out).sum() + h_n.sum()
        return f

    native = mx.compile(mx.value_and_grad(loss(layers._native_gru_scan(False)), argnums=(0, 1, 2, 3)))
    pure = mx.value_and_grad(loss(lambda *a: layers._pure_gru_scan(*a, False)), argnums=(0, 1, 2, 3))
    (value, grads), (ref_value, ref_grads) = native(*args), pure(*args)
    assert abs(value.item() - ref_value.item()) < 1e-4 * abs(ref_value.item())
    for g, r in zip(grads, ref_grads):
        assert mx.abs(g - r).max().item() < 1e-5 * max(1.0, mx.abs(r).max().item())


def _ulp_error(got: np.ndarray, exact: np.ndarray) -> float:
    ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    return float(np.max(np.abs(got.astype(np.float64) - exact) / ulp))


@needs_native
def test_gate_functions_within_their_stated_bounds():
    """One GRU step with W_hh = 0 gives the gates alone: h0 = 1, x_n = 0 -> out = sigmoid(x_z);
    h0 = 0, x_z = -100 -> out = tanh(x_n); on a dense grid of [-20, 20] against float64."""
    size = 64
    x = np.linspace(-20, 20, size * 4000, dtype=np.float32).reshape(-1, size)
    zero, one = np.zeros_like(x), np.ones_like(x)

    def step(x_r, x_z, x_n, h0):
        xp = mx.array(np.concatenate([x_r, x_z, x_n], axis=1)[None])
        out, _ = _native.module.gru_scan(xp, mx.array(h0), mx.zeros((3 * size, size)), mx.zeros((3 * size,)))
        return np.array(out[0]).ravel()

    exact = x.ravel().astype(np.float64)
    assert _ulp_error(step(zero, x, zero, one), 1 / (1 + np.exp(-exact))) <= SIGMOID_ULP
    assert _ulp_error(step(zero, np.full_like(x, -100), x, zero), np.tanh(exact)) <= TANH_ULP


@pytest.fixture
def native_calls(monkeypatch):
    """The names of the native functions called while the test runs."""
    calls = []
    real = _native.module

    class Counting:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(real, name)

    monkeypatch.setattr(_native, "module", Counting())
    return calls


@needs_native
def test_the_gru_module_runs_the_native_op(native_calls):
    gru = layers.GRU(8, 16, num_layers=2, bidirectional=True, batch_first=True)
    out, h_n = gru(mx.random.normal((2, 5, 8)))
    mx.eval(out, h_n)
    assert native_calls.count("gru_scan") == 4 and out.shape == (2, 5, 32)


# (x shape, kernel, stride, padding, dilation): DFN3's strided frequency convs, DFNet4's and
# Mamba's time convs, and odd geometries with padding wider than the kernel reaches
DEPTHWISE_CASES = [((1, 40, 32, 16), (1, 3), (1, 2), (0, 1), (1, 1)), ((2, 30, 1, 8), (4, 1), (1, 1), (3, 0), (1, 1)),
                   ((2, 9, 7, 5), (3, 2), (2, 1), (2, 1), (1, 2)), ((1, 6, 5, 3), (2, 2), (1, 3), (0, 2), (2, 1))]


def _depthwise_case(shape, kernel, seed=2):
    rng = np.random.default_rng(seed)
    x = mx.array(rng.standard_normal(shape).astype(np.float32))
    w = mx.array(rng.standard_normal((shape[-1], *kernel, 1)).astype(np.float32))
    return x, w


def _close(got, want, tol):
    scale = float(mx.abs(want).max()) or 1.0
    assert got.shape == want.shape and float(mx.abs(got - want).max()) <= tol * scale


@needs_native
@pytest.mark.parametrize("shape, kernel, stride, padding, dilation", DEPTHWISE_CASES)
def test_native_depthwise_conv_equals_the_mlx_ops_with_their_gradients(shape, kernel, stride, padding, dilation):
    x, w = _depthwise_case(shape, kernel)
    groups = shape[-1]
    native = lambda x, w: layers.conv2d(x, w, stride, padding, dilation, groups)  # noqa: E731
    pure = lambda x, w: layers._conv2d_mlx(x, w, stride, padding, dilation, groups)  # noqa: E731
    _close(native(x, w), pure(x, w), DEPTHWISE_TOL)
    _close(native(x, w), mx.conv2d(x, w, stride, padding, dilation, groups), DEPTHWISE_TOL)
    loss = lambda f: lambda x, w: (f(x, w) * mx.arange(f(x, w).size).reshape(f(x, w).shape)).sum()  # noqa: E731
    for got, want in zip(mx.grad(loss(native), argnums=(0, 1))(x, w), mx.grad(loss(pure), argnums=(0, 1))(x, w)):
        _close(got, want, DEPTHWISE_TOL)


@needs_native
@pytest.mark.parametrize("shape, kernel, stride, padding, output_padding",
                         [((1, 20, 8, 16), (1, 3), (1, 2), (0, 1), (0, 1)), ((2, 9, 7, 6), (3, 2), (2, 3), (1, 1), (1, 0)),
                          ((1, 5, 4, 3), (2, 2), (1, 1), (0, 0), (0, 0))])
def test_native_depthwise_conv_transpose_equals_the_mlx_ops_with_their_gradients(shape, kernel, stride, padding,
                                                                                 output_padding):
    x, w = _depthwise_case(shape, kernel)
    args = (stride, padding, (1, 1), output_padding, shape[-1])
    native = lambda x, w: layers.conv_transpose2d(x, w, *args)  # noqa: E731
    pure = lambda x, w: layers._depthwise_conv_transpose2d_mlx(x, w, *args)  # noqa: E731
    _close(native(x, w), pure(x, w), DEPTHWISE_TOL)
    _close(native(x, w), mx.conv_transpose2d(x, w, *args), DEPTHWISE_TOL)
    loss = lambda f: lambda x, w: (f(x, w) ** 2).sum()  # noqa: E731
    for got, want in zip(mx.grad(loss(native), argnums=(0, 1))(x, w), mx.grad(loss(pure), argnums=(0, 1))(x, w)):
        _close(got, want, DEPTHWISE_TOL)


# (x shape, weight shape [O, kh, kw, I/groups], groups, stride, padding, dilation, time_pad):
# DFN3's df_conv0 (1 input channel per group) and df_convp (32 per group: the dot-product
# form), its 64 -> 1 output conv, a dense 3x3, and odd geometries in both forms
GROUPED_CASES = [((1, 12, 24, 2), (64, 3, 3, 1), 2, (1, 1), (0, 1), (1, 1), (2, 0)),
                 ((1, 10, 12, 64), (10, 5, 1, 32), 2, (1, 1), (0, 0), (1, 1), (4, 0)),
                 ((2, 6, 16, 64), (1, 1, 3, 64), 1, (1, 1), (0, 1), (1, 1), (0, 0)),
                 ((1, 7, 9, 16), (24, 3, 3, 16), 1, (1, 2), (1, 1), (1, 1), (1, 2)),
                 ((2, 9, 7, 6), (9, 2, 3, 2), 3, (2, 1), (1, 2), (2, 1), (0, 3)),
                 ((1, 5, 8, 32), (4, 2, 2, 16), 2, (1, 1), (0, 0), (1, 2), (1, 0))]


@needs_native
@pytest.mark.parametrize("shape, w_shape, groups, stride, padding, dilation, time_pad", GROUPED_CASES)
def test_native_grouped_conv_equals_the_mlx_ops_with_their_gradients(shape, w_shape, groups, stride, padding,
                                                                     dilation, time_pad, native_calls):
    rng = np.random.default_rng(3)
    x = mx.array(rng.standard_normal(shape).astype(np.float32))
    w = mx.array(rng.standard_normal(w_shape).astype(np.float32))
    native = lambda x, w: layers.conv2d(x, w, stride, padding, dilation, groups, time_pad)  # noqa: E731
    pure = lambda x, w: layers._conv2d_mlx(layers.pad_axis(x, 1, *time_pad), w, stride, padding, dilation,  # noqa: E731
                                           groups)
    _close(native(x, w), pure(x, w), GROUPED_TOL)
    _close(native(x, w), mx.conv2d(layers.pad_axis(x, 1, *time_pad), w, stride, padding, dilation, groups),
           GROUPED_TOL)
    assert native_calls.count("grouped_conv2d") == 2
    loss = lambda f: lambda x, w: (f(x, w) * mx.arange(f(x, w).size).reshape(f(x, w).shape)).sum()  # noqa: E731
    for got, want in zip(mx.grad(loss(native), argnums=(0, 1))(x, w), mx.grad(loss(pure), argnums=(0, 1))(x, w)):
        _close(got, want, GROUPED_TOL)


@needs_native
def test_native_depthwise_conv_adds_the_time_pad_itself():
    x, w = _depthwise_case((1, 9, 8, 4), (3, 3))
    got = layers.conv2d(x, w, (1, 1), (0, 1), (1, 1), 4, time_pad=(2, 1))
    _close(got, mx.conv2d(layers.pad_axis(x, 1, 2, 1), w, (1, 1), (0, 1), (1, 1), 4), DEPTHWISE_TOL)


@needs_native
def test_conv_modules_run_the_native_ops(native_calls):
    x = mx.random.normal((1, 6, 8, 4))
    mx.eval(layers.Conv2d(4, 4, (1, 3), padding=(0, 1), groups=4)(x),
            layers.ConvTranspose2d(4, 4, (1, 3), stride=(1, 2), padding=(0, 1), output_padding=(0, 1), groups=4)(x),
            layers.Conv2d(4, 8, (1, 3), groups=2)(x),
            layers.Conv2d(4, 8, 1)(x))  # ungrouped 1x1: one BLAS matmul
    assert native_calls.count("depthwise_conv2d") == 2 and native_calls.count("grouped_conv2d") == 1


@needs_native
@pytest.mark.parametrize("in_ch, out_ch, kernel, separable", [(2, 16, (3, 3), True), (16, 10, (5, 1), True),
                                                               (1, 8, (3, 3), False)])
def test_causal_conv_blocks_fold_the_time_pad_and_the_norm_relu(in_ch, out_ch, kernel, separable, monkeypatch):
    from df_mlx.modules import Conv2dNormAct

    block = Conv2dNormAct(in_ch, out_ch, kernel, separable=separable)
    block.eval()
    norm = block[len(block) - 2]  # BatchNorm2d, then ReLU: folded into one pass (x * scale + shift)
    norm.running_mean, norm.running_var = mx.random.normal((out_ch,)), mx.random.uniform(0.5, 2.0, (out_ch,))
    norm.weight, norm.bias = mx.random.normal((out_ch,)), mx.random.normal((out_ch,))
    x = mx.random.normal((2, 7, 12, in_ch))
    pads = []
    real_pad = layers.pad_axis
    monkeypatch.setattr(layers, "pad_axis",
                        lambda x, axis, *a, **k: pads.append((axis, *a[:2])) or real_pad(x, axis, *a, **k))
    fused = []
    real_affine = layers.channel_affine
    monkeypatch.setattr(layers, "channel_affine", lambda *a: fused.append(a[3:] == (True,)) or real_affine(*a))
    folded = block(x)
    assert (1, kernel[0] - 1, 0) not in pads  # no padded copy of x along time
    assert fused == [True]  # BatchNorm2d with the ReLU
    with layers.layer_by_layer():
        by_layer = block(x)
    assert (1, kernel[0] - 1, 0) in pads and fused == [True, False]
    _close(folded, by_layer, GROUPED_TOL)


@needs_native
@pytest.mark.parametrize("shape", [(2, 4, 50, 50), (3, 7), (5, 1), (2, 3, 17)])
def test_native_softmax_is_as_accurate_as_torch_and_has_the_mlx_gradient(shape):
    rng = np.random.default_rng(3)
    x = mx.array((5 * rng.standard_normal(shape)).astype(np.float32))
    x64 = np.array(x).astype(np.float64)
    e = np.exp(x64 - x64.max(-1, keepdims=True))
    assert np.abs(np.array(layers.softmax(x)) - e / e.sum(-1, keepdims=True)).max() <= SOFTMAX_TOL
    g = mx.array(rng.standard_normal(shape).astype(np.float32))
    native = mx.vjp(layers.softmax, [x], [g])[1][0]
    pure = mx.vjp(lambda x: mx.softmax(x, axis=-1), [x], [g])[1][0]
    assert float(mx.abs(native - pure).max()) <= SOFTMAX_GRAD_TOL


@needs_native
def test_attention_runs_the_native_softmax(native_calls):
    from df_mlx.hybrid_encoder import MultiheadAttention

    x = mx.random.normal((2, 6, 8))
    mx.eval(MultiheadAttention(8, 2, batch_first=True)(x, x, x)[0])
    assert native_calls.count("softmax") == 1


@needs_native
@pytest.mark.parametrize("ours, exact, theirs, ulp", [(layers.tanh, np.tanh, mx.tanh, TANH_ULP),
                                                     (layers.sigmoid, lambda x: 1 / (1 + np.exp(-x)), mx.sigmoid,
                                                      SIGMOID_ULP)])
def test_native_activations_within_their_bounds_with_the_mlx_gradient(ours, exact, theirs, ulp, native_calls):
    x = mx.array(np.linspace(-20, 20, 40001, dtype=np.float32).reshape(1, 1, -1))
    assert _ulp_error(np.array(ours(x)).ravel(), exact(np.array(x).ravel().astype(np.float64))) <= ulp
    assert native_calls.count("activation") == 1
    g = mx.random.normal(x.shape)
    _close(mx.vjp(ours, [x], [g])[1][0], mx.vjp(theirs, [x], [g])[1][0], ACTIVATION_GRAD_TOL)


@needs_native
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape", [(2, 7, 12, 16), (5, 3), (1, 1, 1000, 64)])
def test_native_channel_affine_equals_the_mlx_ops_with_their_gradients(shape, relu, native_calls):
    rng = np.random.default_rng(4)
    x, g = (mx.array(rng.standard_normal(shape).astype(np.float32)) for _ in range(2))
    scale, shift = (mx.array(rng.standard_normal(shape[-1]).astype(np.float32)) for _ in range(2))
    x[..., 0, 0] = float("nan")  # stays NaN through the ReLU, as torch's relu
    pure = lambda x, s, t: nn.relu(x * s + t) if relu else x * s + t  # noqa: E731
    got, want = layers.channel_affine(x, scale, shift, relu), pure(x, scale, shift)
    assert native_calls.count("channel_affine") == 1
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=0, atol=AFFINE_TOL)
    loss = lambda f: lambda *a: (f(*a) * g).sum()  # noqa: E731
    x = mx.where(mx.isnan(x), 0, x)
    for got, want in zip(mx.grad(loss(lambda *a: layers.channel_affine(*a, relu)), argnums=(0, 1, 2))(x, scale, shift),
                         mx.grad(loss(pure), argnums=(0, 1, 2))(x, scale, shift)):
        _close(got, want, AFFINE_GRAD_TOL)


@needs_native
# (B, C, T, F, F', frame_size, lookahead, conj): DFN3's, conjugated, two channels with a
# lookahead past the frame size (df crops then), more frames than the signal has
@pytest.mark.parametrize("b, c, t, f, nf, n, lookahead, conj", [(1, 1, 300, 481, 96, 5, 2, False),
                                                                (2, 1, 7, 20, 6, 3, 0, True),
                                                                (1, 2, 9, 10, 10, 4, 5, False),
                                                                (1, 1, 3, 8, 4, 5, 1, False)])
def test_native_deep_filter_equals_the_mlx_ops_with_their_gradient(b, c, t, f, nf, n, lookahead, conj, native_calls):
    from df_mlx.multiframe import DF

    rng = np.random.default_rng(6)
    op = DF(nf, n, lookahead, conj)
    spec, coefs = (mx.array(rng.standard_normal(s).astype(np.float32)) for s in ((b, c, t, f, 2), (b, c * n, t, nf, 2)))
    g = mx.array(rng.standard_normal(spec.shape).astype(np.float32))
    native, native_grads = mx.vjp(op, [spec, coefs], [g])
    assert native_calls.count("deep_filter") == 1
    with layers.layer_by_layer():  # the MLX ops, as the parity tracer runs them
        pure, pure_grads = mx.vjp(op, [spec, coefs], [g])
    _close(native[0], pure[0], DEEP_FILTER_TOL)
    for got, want in zip(native_grads, pure_grads):
        _close(got, want, DEEP_FILTER_TOL)


@needs_native
def test_activation_modules_run_the_native_op(native_calls):
    mx.eval(layers.Tanh()(mx.ones((2, 3))), layers.Sigmoid()(mx.ones((2, 3))))
    assert native_calls.count("activation") == 2


def test_non_float32_inputs_take_the_pure_path():
    assert not _native.usable(mx.zeros((2,), mx.float16))


def _scan_case(batch=2, length=12, channels=24, states=16, seed=1):
    rng = np.random.default_rng(seed)
    x, delta = rng.normal(size=(2, batch, length, channels))
    a = -np.exp(rng.normal(size=(channels, states)))
    b, c = rng.normal(size=(2, batch, length, states))
    h0 = rng.normal(size=(batch, channels, states))
    return [mx.array(v.astype(np.float32)) for v in (x, np.log1p(np.exp(delta)), a, b, c, h0)]


@needs_native
def test_native_selective_scan_equals_the_pure_scan_and_carries_its_state():
    from df_mlx import mamba

    args = _scan_case()
    y, h = mamba._native_scan(*args)
    ref_y, ref_h = mamba._pure_scan(*args)
    assert mx.abs(y - ref_y).max().item() < NATIVE_VS_PURE_TOL * max(1.0, mx.abs(ref_y).max().item())
    assert mx.abs(h - ref_h).max().item() < NATIVE_VS_PURE_TOL * max(1.0, mx.abs(ref_h).max().item())
    x, delta, a, b, c, h0 = args
    y1, h1 = mamba._native_scan(x[:, :5], delta[:, :5], a, b[:, :5], c[:, :5], h0)
    y2, h2 = mamba._native_scan(x[:, 5:], delta[:, 5:], a, b[:, 5:], c[:, 5:], h1)
    assert mx.array_equal(mx.concatenate([y1, y2], axis=1), y) and mx.array_equal(h2, h)


@needs_native
def test_native_selective_scan_gradients_are_the_pure_ones():
    from df_mlx import mamba

    args = _scan_case()

    def loss(scan):
        return lambda *a: sum((o * o).sum() for o in scan(*a))

    grads = mx.compile(mx.grad(loss(mamba._native_scan), argnums=tuple(range(6))))(*args)
    ref = mx.grad(loss(mamba._pure_scan), argnums=tuple(range(6)))(*args)
    for g, r in zip(grads, ref):
        assert mx.abs(g - r).max().item() < 1e-5 * max(1.0, mx.abs(r).max().item())


@needs_native
def test_native_scan_exp_is_at_least_as_accurate_as_mamba_exp():
    """One step with B = 0, h0 = 1, N = 1 and dt = 1 gives y = exp(A) for every channel."""
    from df_mlx import mamba

    a = np.linspace(-86, 0, 200_000, dtype=np.float32)
    ones = mx.ones((1, 1, a.size))
    y, _ = _native.module.selective_scan(mx.zeros((1, 1, a.size)), ones, mx.array(a[:, None]),
                                         mx.zeros((1, 1, 1)), mx.ones((1, 1, 1)), mx.ones((1, a.size, 1)))
    exact = np.exp(a.astype(np.float64))
    pure = np.array(mx.compile(mamba._exp)(mx.array(a)))
    assert _ulp_error(np.array(y).ravel(), exact) <= max(_ulp_error(pure, exact), 1.0)


def test_without_the_extension_df_mlx_runs_the_pure_path_and_says_once_why():
    code = ("import sys; sys.modules['df_mlx._kernels'] = None\n"  # as after a failed build
            "import mlx.core as mx\nfrom df_mlx import _native, layers\n"
            "for _ in range(2):\n"
            "    out, h = layers.gru_scan(mx.zeros((3, 1, 6)), mx.zeros((1, 2)), mx.zeros((6, 2)), None)\n"
            "print(_native.module, out.shape)")
    environ = {k: v for k, v in os.environ.items() if k != "DFMLX_NATIVE"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None (3, 1, 2)"
    assert done.stderr.count("pure-MLX steps (slower on the CPU)") == 1
    assert "native extension is not built" in done.stderr


def _strided_views(a: np.ndarray):
    """a as MLX views that are not row-contiguous: transposed twice, sliced, broadcast."""
    base = mx.array(a)
    yield "transposed", mx.array(np.ascontiguousarray(np.swapaxes(a, 0, -1))).swapaxes(0, -1)
    padded = mx.array(np.pad(a, [(0, 0)] * (a.ndim - 1) + [(1, 2)]))
    yield "sliced", padded[..., 1 : 1 + a.shape[-1]]
    if a.shape[0] == 1:
        yield "broadcast", mx.broadcast_to(base[:1], a.shape)


@needs_native
@pytest.mark.parametrize("op", ["tanh", "softmax", "channel_affine", "deep_filter", "gru_scan", "depthwise_conv2d", "grouped_conv2d", "matmul",
                                "batched_matmul", "linear"])
def test_native_ops_read_strided_inputs_as_their_dense_copies(op):
    """The ops copy non-contiguous inputs themselves (no Contiguous op in the graph): the result
    is bit for bit that of the dense input; the matmul reads a transposed b in place (BLAS's
    transposed kernel: summation order, MATMUL_TOL)."""
    rng = np.random.default_rng(5)
    m = _native.module
    cases = {
        "tanh": ([(1, 6, 9)], lambda x: m.activation(x, 0)),
        "softmax": ([(1, 5, 7)], lambda x: m.softmax(x)),
        "channel_affine": ([(1, 5, 6), (6,), (6,)], lambda x, s, t: m.channel_affine(x, s, t, True)),
        "deep_filter": ([(1, 1, 6, 5, 2), (1, 3, 6, 4, 2)], lambda x, w: m.deep_filter(x, w, 3, 1, True)),
        "gru_scan": ([(4, 1, 24), (1, 8), (24, 8), (24,)], lambda *a: m.gru_scan(*a)[0]),
        "depthwise_conv2d": ([(1, 5, 6, 4), (4, 2, 3, 1)],
                             lambda x, w: m.depthwise_conv2d(x, w, (2, 3, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1))),
        "grouped_conv2d": ([(1, 5, 6, 4), (6, 2, 1, 2)],
                           lambda x, w: m.grouped_conv2d(x, w, (2, 1, 1, 1, 1, 1, 1, 0, 0, 0), 2)),
        "matmul": ([(3, 9), (9, 5)], lambda a, b: m.matmul(a, b)),
        "batched_matmul": ([(1, 3, 9), (1, 9, 5)], lambda a, b: m.matmul(a, b)),
        "linear": ([(1, 3, 9), (5, 9)], lambda x, w: m.linear(x, w)),
    }
    shapes, run = cases[op]
    arrays = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    want = np.array(run(*map(mx.array, arrays)))
    for i, a in enumerate(arrays):
        for how, view in _strided_views(a):
            inputs = [mx.array(x) for x in arrays]
            inputs[i] = view
            got = np.array(run(*inputs))
            if op == "matmul" and i == 1 and how == "transposed":
                assert np.abs(got - want).max() <= MATMUL_TOL * np.abs(want).max(), how
            else:
                np.testing.assert_array_equal(got, want, err_msg=f"input {i} {how}")


@needs_native
def test_without_gradients_runs_the_bare_native_op():
    """Inside _native.without_gradients() a native op runs without its custom_function (one op
    fewer in the graph): the same values; a gradient is refused there, and taken outside."""
    x = mx.array(np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4))
    with _native.without_gradients():
        bare = layers.tanh(x)
        with pytest.raises((RuntimeError, ValueError)):
            mx.grad(lambda v: layers.tanh(v).sum())(x)
    np.testing.assert_array_equal(np.array(bare), np.array(layers.tanh(x)))
    _close(mx.grad(lambda v: layers.tanh(v).sum())(x), 1 - mx.tanh(x) ** 2, ACTIVATION_GRAD_TOL)
