"""Interleaved timing of training steps, shared by the step-cost benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

Step = Callable[[int], None]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_step_seconds(
    rows: dict[str, Step], device: torch.device, *, rounds: int, steps: int, warmup: int
) -> dict[str, float]:
    """Median seconds per step of each row: after ``warmup`` steps of every row, ``rounds``
    rounds in which every row runs ``steps`` steps in turn (interleaved, so that load from other
    processes slows all rows alike). A step is called with its index."""
    for step in rows.values():
        for index in range(warmup):
            step(index)
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(rounds):
        for name, step in rows.items():
            synchronize(device)
            start = time.perf_counter()
            for index in range(steps):
                step(index)
            synchronize(device)
            times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(values) for name, values in times.items()}
