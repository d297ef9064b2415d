"""The harness itself: tracer names, report verdicts and first-divergence naming."""

import mlx.core as mx
import mlx.nn as mlx_nn
import numpy as np
import pytest
import torch

from df_mlx.modules import Sequential
from parity.report import Report, Tolerance, compare, compare_traces
from parity.tracer import trace_mlx, trace_torch

TOL = Tolerance(1e-6, 0.0, "float32 matmuls of a tiny MLP")


def _pair(seed=0):
    torch.manual_seed(seed)
    ref = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    mine = Sequential(mlx_nn.Linear(6, 8), mlx_nn.ReLU(), mlx_nn.Linear(8, 3))
    mine.load_weights([(k, mx.array(v.numpy())) for k, v in ref.state_dict().items()])
    return ref, mine


def _report(ref, mine, x):
    with trace_torch(ref) as ref_trace:
        ref(torch.from_numpy(x))
    with trace_mlx(mine) as mlx_trace:
        mine(mx.array(x))
    return compare_traces(Report("mlp", "torch"), mlx_trace, ref_trace, TOL)


def test_traces_match_by_torch_names():
    ref, mine = _pair()
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    report = _report(ref, mine, x)
    assert [r.name for r in report.layers] == ["0", "1", "2"]
    assert report.passed, report.table()
    assert type(mine["0"]) is mlx_nn.Linear  # the tracer restored the classes


def test_first_divergence_is_the_perturbed_layer():
    ref, mine = _pair()
    mine["2"].bias = mine["2"].bias + 1e-3
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    report = _report(ref, mine, x)
    assert not report.passed
    assert report.first_failure.name == "2"
    assert "FIRST DIVERGENCE at 2" in report.summary()
    assert report.worst.name == "2"


def test_layer_missing_on_one_side_fails():
    report = compare_traces(Report("t", "r"), {"a": np.zeros(2)}, {"a": np.zeros(2), "b": np.ones(2)}, TOL)
    assert not report.passed and report.missing == ["b (reference only)"]


def test_nan_on_one_side_is_infinite_error():
    assert compare("x", np.array([np.nan, 1.0]), np.array([0.0, 1.0]), TOL).max_abs == np.inf
    assert compare("x", np.array([np.nan, 1.0]), np.array([np.nan, 1.0]), TOL).passed


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        compare("x", np.zeros((2, 3)), np.zeros((3, 2)), TOL)


def test_repeat_calls_and_tuples_get_distinct_names():
    class Twice(mlx_nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = mlx_nn.Linear(2, 2)

        def __call__(self, x):
            return self.lin(self.lin(x))

    model = Twice()
    with trace_mlx(model) as trace:
        model(mx.ones((1, 2)))
    assert list(trace) == ["lin", "lin#1"]
