"""df_mlx.checkpoint's training-checkpoint rules against df.checkpoint: early-stopping
decisions, best/history bookkeeping and file names, for the same scripted metrics."""

import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

import df_mlx.checkpoint as ours
from parity.reference import import_ref

SEQUENCES = [
    ("min", [1.0, 0.9, 0.95, 0.95, 0.8, 0.85, 0.85, 0.85, 0.85]),
    ("max", [0.1, 0.2, 0.2, 0.15, 0.3, 0.3, 0.3, 0.3]),
    ("min", [1.0, 1.0, 1.0, 1.0]),
]


@pytest.mark.parametrize("cmp, metrics", SEQUENCES)
def test_check_patience_decisions(tmp_path, cmp, metrics):
    ref = import_ref("checkpoint")
    (tmp_path / "ref").mkdir()
    (tmp_path / "mlx").mkdir()
    ref_decisions = [ref.check_patience(str(tmp_path / "ref"), 3, m, cmp, raise_=False) for m in metrics]
    our_decisions = [ours.check_patience(str(tmp_path / "mlx"), 3, m, cmp, raise_=False) for m in metrics]
    assert our_decisions == ref_decisions
    assert (tmp_path / "mlx" / ".patience").read_text() == (tmp_path / "ref" / ".patience").read_text()
    with pytest.raises(ValueError, match="No improvements"):
        for m in [metrics[0] * (10 if cmp == "min" else -10)] * 4:
            ours.check_patience(str(tmp_path / "mlx"), 3, m, cmp)


@pytest.mark.parametrize("cmp", ["min", "max"])
def test_write_cp_bookkeeping(tmp_path, cmp):
    ref = import_ref("checkpoint")
    metrics = [0.5, 0.4, 0.45, 0.3, 0.35, 0.2, 0.25, 0.1, 0.6]
    (tmp_path / "ref").mkdir()
    (tmp_path / "mlx").mkdir()
    for epoch, metric in enumerate(metrics):
        ref.write_cp(torch.nn.Linear(2, 2), "model", str(tmp_path / "ref"), epoch, metric=metric, cmp=cmp)
        ours.write_cp(nn.Linear(2, 2), "model", str(tmp_path / "mlx"), epoch, extension="ckpt", metric=metric, cmp=cmp)
    assert sorted(os.listdir(tmp_path / "mlx")) == sorted(os.listdir(tmp_path / "ref"))
    assert (tmp_path / "mlx" / ".best").read_text() == (tmp_path / "ref" / ".best").read_text()


def test_read_cp_restores_weights(tmp_path):
    model, other = nn.Linear(3, 4), nn.Linear(3, 4)
    ours.write_cp(model, "model", str(tmp_path), 3, metric=1.0)
    ours.write_cp(nn.Linear(3, 4), "model", str(tmp_path), 4, metric=2.0)
    assert ours.read_cp(other, "model", str(tmp_path), epoch="best") == 3
    np.testing.assert_array_equal(np.array(other.weight), np.array(model.weight))
    assert ours.read_cp(other, "model", str(tmp_path), epoch="latest") == 4
    assert ours.read_cp(other, "model", str(tmp_path), epoch=3) == 3
    with pytest.raises(FileNotFoundError):
        ours.read_cp(other, "model", str(tmp_path), epoch=9)
    assert ours.read_cp(other, "opt", str(tmp_path)) is None
    mx.eval(other.parameters())
