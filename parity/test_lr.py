"""df_mlx.lr against df.lr: whole schedules, value for value."""

import numpy as np
import pytest

from df_mlx import lr as ours
from parity.reference import import_ref

CASES = [
    dict(base_value=1e-3, final_value=1e-5, epochs=10, niter_per_ep=7),
    dict(base_value=5e-4, final_value=1e-6, epochs=12, niter_per_ep=11, warmup_epochs=3, start_warmup_value=1e-6),
    dict(base_value=5e-4, final_value=1e-6, epochs=12, niter_per_ep=11, warmup_epochs=2, warmup_steps=5),
    dict(base_value=1e-3, final_value=0, epochs=20, niter_per_ep=5, initial_ep_per_cycle=4, cycle_decay=0.8),
    dict(base_value=1e-3, final_value=1e-6, epochs=30, niter_per_ep=3, warmup_epochs=1, initial_ep_per_cycle=2,
         cycle_decay=0.9, cycle_mul=2),
    dict(base_value=0.05, final_value=0.5, epochs=8, niter_per_ep=100),  # weight decay rising
]


@pytest.mark.parametrize("kw", CASES, ids=[str(i) for i in range(len(CASES))])
def test_cosine_scheduler(kw):
    np.testing.assert_array_equal(ours.cosine_scheduler(**kw), import_ref("lr").cosine_scheduler(**kw))


def test_perturbed_schedule_is_caught(monkeypatch):
    lengths = ours._cycle_lengths
    monkeypatch.setattr(ours, "_cycle_lengths", lambda *a: [n + 1 for n in lengths(*a)])
    with pytest.raises(AssertionError):
        np.testing.assert_array_equal(ours.cosine_scheduler(**CASES[0]), import_ref("lr").cosine_scheduler(**CASES[0]))
