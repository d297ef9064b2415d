"""df_mlx.loss rejects bad input clearly."""

import mlx.core as mx
import numpy as np
import pytest

from df_mlx import loss
from df_mlx.config import config
from df_mlx.libdf import DF


@pytest.fixture(autouse=True)
def defaults():
    config.use_defaults(allow_reload=True)


def _mask_loss():
    return loss.MaskLoss(DF(48000, 960, 480, 32, 2))


def test_mask_loss_rejects_nan_and_negative():
    spec = mx.zeros((1, 1, 4, 481, 2))
    with pytest.raises(ValueError, match="NaN"):
        _mask_loss()(mx.array(np.full((1, 1, 4, 32), np.nan, np.float32)), spec, spec)
    with pytest.raises(ValueError, match="non-negative"):
        _mask_loss()(mx.full((1, 1, 4, 32), -1.0), spec, spec)


def test_unknown_mask_and_window_sizes():
    with pytest.raises(ValueError, match="Unsupported mask"):
        loss.MaskLoss(DF(48000, 960, 480, 32, 2), mask="nope")
    with pytest.raises(ValueError, match="window"):
        loss.Stft(256, window=mx.ones((128,)))
    with pytest.raises(ValueError, match="window"):
        loss.Istft(960, 480, mx.ones((480,)))


def test_losses_are_differentiable_and_zero_at_target():
    x = mx.random.normal((2, 1, 10, 97, 2))
    value, grad = mx.value_and_grad(lambda a: loss.SpectralLoss(gamma=0.3)(a, x))(x)
    assert float(value) < 1e-10 and grad.shape == x.shape
