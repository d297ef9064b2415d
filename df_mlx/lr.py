"""Learning-rate and weight-decay schedules of `df.lr` (numpy, one value per iteration)."""

import math
from typing import List

import numpy as np


def _cycle_lengths(iters: int, niter_per_ep: int, initial_ep_per_cycle: float, cycle_mul: float) -> List[int]:
    """Iterations per cosine cycle after warm-up: one cycle, or repeated/growing cycles."""
    if initial_ep_per_cycle == -1:
        return [iters]
    first = int(round(initial_ep_per_cycle * niter_per_ep))
    if cycle_mul == 1:
        return [first] * int(math.ceil(iters / (initial_ep_per_cycle * niter_per_ep)))
    lengths: List[int] = []
    while sum(lengths) < iters:
        lengths.append(first * cycle_mul ** len(lengths))
    return lengths


def cosine_scheduler(
    base_value: float,
    final_value: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0,
    warmup_steps: int = -1,
    initial_ep_per_cycle: float = -1,
    cycle_decay: float = 1,
    cycle_mul: float = 1,
) -> np.ndarray:
    """Linear warm-up then cosine decay from base to final value (optionally in cycles whose
    peak decays by `cycle_decay` and length grows by `cycle_mul`); `epochs * niter_per_ep`
    values, as df's (adopted there from ConvNeXt)."""
    warmup_iters = warmup_steps if warmup_steps > 0 else warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_epochs > 0 else np.array([])
    lengths = _cycle_lengths(epochs * niter_per_ep - warmup_iters, niter_per_ep, initial_ep_per_cycle, cycle_mul)
    cycles = []
    for i, length in enumerate(lengths):
        it = np.arange(length)
        peak = base_value * cycle_decay**i
        cycles.append(final_value + 0.5 * (peak - final_value) * (1 + np.cos(np.pi * it / len(it))))
    schedule = np.concatenate((warmup, *cycles))[: epochs * niter_per_ep]
    if len(schedule) != epochs * niter_per_ep:
        raise ValueError(f"schedule has {len(schedule)} values, expected epochs * niter_per_ep = {epochs * niter_per_ep}")
    return schedule
