"""df_mlx.layers.GRU (and the grouped recurrent blocks built on it) without the reference:
parameter names, shapes, initialisation, dropout and clear errors."""

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from df_mlx import modules
from df_mlx.layers import GRU, conv2d, conv_transpose2d


def _params(module):
    return {k: tuple(v.shape) for k, v in tree_flatten(module.parameters())}


def test_gru_parameters_have_torch_names_and_layouts():
    assert _params(GRU(5, 8, num_layers=2, bidirectional=True)) == {
        "weight_ih_l0": (24, 5), "weight_hh_l0": (24, 8), "bias_ih_l0": (24,), "bias_hh_l0": (24,),
        "weight_ih_l0_reverse": (24, 5), "weight_hh_l0_reverse": (24, 8),
        "bias_ih_l0_reverse": (24,), "bias_hh_l0_reverse": (24,),
        "weight_ih_l1": (24, 16), "weight_hh_l1": (24, 8), "bias_ih_l1": (24,), "bias_hh_l1": (24,),
        "weight_ih_l1_reverse": (24, 16), "weight_hh_l1_reverse": (24, 8),
        "bias_ih_l1_reverse": (24,), "bias_hh_l1_reverse": (24,),
    }
    assert _params(GRU(5, 8, bias=False)) == {"weight_ih_l0": (24, 5), "weight_hh_l0": (24, 8)}


def test_gru_init_is_uniform_within_torch_bound():
    mx.random.seed(0)
    w = np.array(GRU(64, 100).weight_hh_l0)
    bound = 1 / math.sqrt(100)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
    assert abs(w.mean()) < 0.01 and abs(w.std() - bound / math.sqrt(3)) < 0.005


@pytest.mark.parametrize(
    "kwargs, x_shape, out_shape, h_shape",
    [
        (dict(), (7, 2, 5), (7, 2, 8), (1, 2, 8)),
        (dict(batch_first=True), (2, 7, 5), (2, 7, 8), (1, 2, 8)),
        (dict(num_layers=3, batch_first=True), (2, 1, 5), (2, 1, 8), (3, 2, 8)),
        (dict(bidirectional=True), (7, 2, 5), (7, 2, 16), (2, 2, 8)),
        (dict(num_layers=2, bidirectional=True, batch_first=True), (2, 7, 5), (2, 7, 16), (4, 2, 8)),
        (dict(num_layers=2), (7, 5), (7, 8), (2, 8)),  # unbatched
    ],
)
def test_gru_shapes(kwargs, x_shape, out_shape, h_shape):
    gru = GRU(5, 8, **kwargs)
    out, h = gru(mx.zeros(x_shape))
    assert (out.shape, h.shape) == (out_shape, h_shape)
    out2, h2 = gru(mx.zeros(x_shape), mx.zeros(h_shape))
    assert (out2.shape, h2.shape) == (out_shape, h_shape)


def test_gru_last_output_is_the_final_state():
    gru = GRU(5, 8, num_layers=2, bidirectional=True, batch_first=True)
    out, h = gru(mx.random.normal((2, 6, 5)))
    np.testing.assert_array_equal(np.array(out[:, -1, :8]), np.array(h[2]))  # last layer, forward
    np.testing.assert_array_equal(np.array(out[:, 0, 8:]), np.array(h[3]))  # last layer, reverse


def test_gru_state_continues_a_sequence():
    """Running two halves with the state carried over equals one run (streaming)."""
    gru = GRU(5, 8, num_layers=2, batch_first=True)
    x = mx.random.normal((2, 10, 5))
    whole, h_whole = gru(x)
    first, h = gru(x[:, :4])
    second, h = gru(x[:, 4:], h)
    np.testing.assert_allclose(np.array(mx.concatenate([first, second], 1)), np.array(whole), atol=1e-6)
    np.testing.assert_allclose(np.array(h), np.array(h_whole), atol=1e-6)


def test_gru_dropout_only_in_training():
    mx.random.seed(0)
    gru = GRU(5, 8, num_layers=2, dropout=0.5, batch_first=True)
    plain = GRU(5, 8, num_layers=2, batch_first=True)
    plain.update(gru.parameters())
    x = mx.random.normal((2, 7, 5))
    gru.eval()
    np.testing.assert_array_equal(np.array(gru(x)[0]), np.array(plain(x)[0]))
    gru.train()
    a, b = np.array(gru(x)[0]), np.array(gru(x)[0])
    assert not np.allclose(a, b)  # a new mask per call


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_size=5, hidden_size=0), "hidden_size"),
        (dict(input_size=5, hidden_size=8, num_layers=0), "num_layers"),
        (dict(input_size=5, hidden_size=8, dropout=1.5), "dropout"),
        (dict(input_size=5, hidden_size=8, dropout=True), "dropout"),
    ],
)
def test_gru_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GRU(**kwargs)


@pytest.mark.parametrize(
    "x_shape, h_shape, match",
    [
        ((2, 7, 5, 1), None, "2-D .* or 3-D"),
        ((7, 2, 6), None, "6 features, expected input_size=5"),
        ((7, 2, 5), (1, 3, 8), r"h0 has shape \(1, 3, 8\), expected \(2, 2, 8\)"),
        ((7, 5), (2, 1, 8), r"expected \(2, 8\)"),
        ((0, 2, 5), None, "no time steps"),
    ],
)
def test_gru_rejects_bad_inputs(x_shape, h_shape, match):
    gru = GRU(5, 8, num_layers=2)
    with pytest.raises(ValueError, match=match):
        gru(mx.zeros(x_shape), None if h_shape is None else mx.zeros(h_shape))


@pytest.mark.parametrize(
    "cls, args, match",
    [
        (modules.GroupedGRULayer, (10, 16, 4), "input_size 10"),
        (modules.GroupedGRULayer, (16, 8, 4), "hidden_size per group 2"),  # df's extra condition
        (modules.GroupedGRU, (16, 30, 1, 4), "hidden_size 30"),
        (modules.GroupedGRU, (16, 32, 0, 4), "num_layers"),
        (modules.GroupedLinearEinsum, (10, 16, 4), "Input size 10"),
        (modules.GroupedLinear, (16, 10, 4), "hidden_size 10"),
        (modules.SqueezedGRU, (30, 16), "Input size 30"),  # linear_groups=8 by default
    ],
)
def test_grouped_blocks_reject_indivisible_sizes(cls, args, match):
    with pytest.raises(ValueError, match=match):
        cls(*args)


def test_grouped_gru_shapes_and_names():
    gru = modules.GroupedGRU(16, 32, num_layers=2, groups=4)
    assert gru.get_h0(3).shape == (8, 3, 8)
    out, h = gru(mx.zeros((3, 5, 16)))
    assert (out.shape, h.shape) == ((3, 5, 32), (8, 3, 8))
    assert "grus.1.layers.3.weight_hh_l0" in _params(gru)
    assert _params(modules.GroupedLinear(16, 32, groups=4))["layers.3.weight"] == (8, 4)


@pytest.mark.parametrize(
    "x_shape, w_shape, stride, padding, dilation, groups",
    [
        ((1, 9, 12, 1), (8, 3, 3, 1), (1, 1), (0, 1), (1, 1), 1),  # im2col, one input channel
        ((2, 9, 12, 2), (8, 3, 3, 1), (1, 1), (0, 1), (1, 1), 2),  # grouped wide output
        ((1, 9, 12, 8), (8, 1, 3, 1), (1, 2), (0, 1), (1, 1), 8),  # depthwise, frequency stride
        ((1, 9, 12, 8), (8, 2, 3, 1), (2, 1), (1, 2), (1, 2), 8),  # depthwise, dilated
        ((1, 9, 12, 16), (32, 3, 1, 1), (1, 2), (1, 0), (1, 1), 16),  # depthwise, 2 outputs per channel
        ((1, 11, 12, 8), (4, 5, 1, 4), (1, 1), (0, 0), (1, 1), 2),  # narrow output: shifted sums
        ((1, 9, 12, 8), (3, 2, 3, 8), (1, 1), (1, 1), (2, 1), 1),  # narrow, dilated
        ((1, 9, 12, 8), (8, 1, 1, 8), (1, 2), (0, 0), (1, 1), 1),  # pointwise, strided
        ((1, 9, 12, 16), (16, 1, 3, 2), (1, 1), (0, 1), (1, 1), 8),  # many groups: per group
        ((1, 9, 12, 4), (4, 5, 5, 4), (1, 1), (2, 2), (1, 1), 1),  # large kernel: mx.conv2d
        ((2, 60, 1, 16), (32, 41, 1, 4), (2, 1), (20, 0), (1, 1), 4),  # 41 taps, grouped: per-tap matmuls
        ((1, 40, 3, 32), (32, 9, 2, 2), (4, 1), (4, 1), (1, 2), 16),  # both axes, strided, dilated
    ],
)
def test_conv2d_equals_mlx_convolution(x_shape, w_shape, stride, padding, dilation, groups):
    """The matmul / shifted-sum paths of layers.conv2d compute MLX's own convolution."""
    mx.random.seed(1)
    x, w = mx.random.normal(x_shape), mx.random.normal(w_shape)
    got = conv2d(x, w, stride, padding, dilation, groups)
    want = mx.conv2d(x, w, stride, padding, dilation, groups)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "x_shape, w_shape, stride, padding, dilation, output_padding, groups",
    [
        ((1, 6, 8, 4), (4, 1, 3, 1), (1, 2), (0, 1), (1, 1), (0, 1), 4),  # DFN3's convt
        ((1, 6, 8, 4), (4, 2, 3, 1), (2, 2), (1, 1), (1, 1), (1, 0), 4),  # depthwise, both axes
        ((1, 6, 8, 4), (4, 1, 3, 1), (1, 3), (0, 2), (1, 2), (0, 0), 4),  # dilated
        ((1, 6, 8, 4), (4, 1, 3, 1), (1, 2), (0, 3), (1, 1), (0, 1), 4),  # padding past the kernel
        ((1, 6, 8, 4), (6, 1, 3, 2), (1, 2), (0, 1), (1, 1), (0, 1), 2),  # grouped: MLX's kernel
    ],
)
def test_conv_transpose2d_equals_mlx(x_shape, w_shape, stride, padding, dilation, output_padding, groups):
    mx.random.seed(2)
    x, w = mx.random.normal(x_shape), mx.random.normal(w_shape)
    got = conv_transpose2d(x, w, stride, padding, dilation, output_padding, groups)
    want = mx.conv_transpose2d(x, w, stride, padding, dilation, output_padding, groups)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)
