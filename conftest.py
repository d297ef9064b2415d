"""Fixtures for tests/ and parity/ alike."""

import pytest


def _use_pure_recurrences(monkeypatch):
    from df_mlx import _native

    monkeypatch.setattr(_native, "module", None)
    monkeypatch.setattr(_native, "products", False)
    monkeypatch.setattr(_native, "_said_why", True)


@pytest.fixture
def pure_recurrences(monkeypatch):
    """The pure-MLX recurrences, for tests that perturb them (df_mlx.layers._gru_step)."""
    _use_pure_recurrences(monkeypatch)


@pytest.fixture(params=["native", "pure"])
def recurrence_path(request, monkeypatch):
    """Runs a test on both paths at the same tolerances: df_mlx's native primitives (the
    recurrences, and the dense products as when MLX's own matmuls are on the reference BLAS) and
    the pure-MLX ops (df_mlx._native). The native run is skipped, with the reason, only where
    the extension is unavailable, which tests/test_native.py reports as a failure."""
    from df_mlx import _native

    if request.param == "pure":
        _use_pure_recurrences(monkeypatch)
    elif _native.module is None:
        pytest.skip(f"native recurrences unavailable: {_native.reason}")
    else:
        monkeypatch.setattr(_native, "products", True)
    return request.param
