"""Properties of df_mlx.libdf that hold without the reference."""

import numpy as np
import pytest

from df_mlx.libdf import DF, erb, erb_inv, erb_norm, unit_norm, unit_norm_init


@pytest.fixture
def state():
    return DF(48000, 960, 480, 32, 2)


def _signal(n=48000, channels=1, seed=0):
    return (np.random.default_rng(seed).standard_normal((channels, n)) * 0.1).astype(np.float32)


def test_roundtrip_reconstructs_with_fixed_delay(state):
    x = _signal()
    y = state.synthesis(state.analysis(x))
    delay = state.fft_size() - state.hop_size()
    np.testing.assert_allclose(y[:, delay:], x[:, :-delay], atol=1e-6)


@pytest.mark.parametrize("chunk", [480, 960, 4800])
def test_chunked_calls_continue_the_signal(state, chunk):
    x = _signal()
    whole = state.analysis(x)
    state.reset()
    parts = np.concatenate([state.analysis(x[:, i : i + chunk], reset=False) for i in range(0, x.shape[1], chunk)], 1)
    np.testing.assert_allclose(parts, whole, atol=1e-7)


def test_short_chunk_gives_no_frames_and_keeps_state(state):
    assert state.analysis(_signal(97), reset=False).shape == (1, 0, 481)
    assert state.synthesis(np.zeros((1, 0, 481), np.complex64)).shape == (1, 0)


def test_inputs_are_not_modified(state):
    spec = state.analysis(_signal())
    before = spec.copy()
    state.synthesis(spec)
    e = erb(spec, state.erb_widths())
    e_before = e.copy()
    erb_norm(e, 0.99)
    unit_norm(spec[..., :96], 0.99)
    np.testing.assert_array_equal(spec, before)
    np.testing.assert_array_equal(e, e_before)


def test_erb_widths_cover_all_bins(state):
    w = state.erb_widths()
    assert w.sum() == 481 and len(w) == state.nb_erb() == 32 and w.min() >= 2


def test_erb_inv_repeats_bands(state):
    w = state.erb_widths()
    g = np.arange(32, dtype=np.float32)[None]
    assert erb_inv(g, w).shape == (1, 481)
    np.testing.assert_array_equal(erb_inv(g, w)[0, : w[0]], 0)


def test_norm_state_continues(state):
    e = erb(state.analysis(_signal()), state.erb_widths())
    first, s = erb_norm(e[:, :40], 0.99, return_state=True)
    np.testing.assert_array_equal(np.concatenate([first, erb_norm(e[:, 40:], 0.99, s)], 1), erb_norm(e, 0.99))


def test_unit_norm_init_shape():
    init = unit_norm_init(96)
    assert init.shape == (1, 96) and init[0, 0] == np.float32(0.001)


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda s: s.analysis(np.zeros(480, np.float32)), ValueError),
        (lambda s: s.analysis(np.zeros((1, 480), np.complex64)), TypeError),
        (lambda s: s.synthesis(np.zeros((1, 2, 100), np.complex64)), ValueError),
        (lambda s: erb(np.zeros((1, 2, 100), np.complex64), s.erb_widths()), ValueError),
        (lambda s: erb_inv(np.zeros((1, 2, 31), np.float32), s.erb_widths()), ValueError),
        (lambda s: erb_norm(np.zeros((2, 32), np.float32), 0.99), TypeError),
        (lambda s: erb_norm(np.zeros((1, 2, 32), np.float32), 0.99, np.zeros((2, 32))), ValueError),
        (lambda s: DF(48000, 960, 600), ValueError),
    ],
)
def test_bad_input_is_a_clear_error(state, call, error):
    with pytest.raises(error):
        call(state)
