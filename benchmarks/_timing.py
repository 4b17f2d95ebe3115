"""Training steps and their interleaved timing, shared by the step-cost benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

Step = Callable[[int], None]


def random_binary_batches(batch_size: int, device: torch.device, count: int = 8) -> list:
    """``count`` fixed batches of binary 784-pixel images (MNIST's mean intensity, 0.13)."""
    generator = torch.Generator().manual_seed(0)
    return [torch.bernoulli(torch.full((batch_size, 784), 0.13), generator=generator).to(device)
            for _ in range(count)]


def training_step(model: torch.nn.Module, objective, batches: list, lr: float = 1e-3) -> Step:
    """One step of Adam on ``objective.differentiable_loss(model.model, model.guide, batch)``,
    cycling through ``batches``."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def step(index: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        objective.differentiable_loss(model.model, model.guide,
                                      batches[index % len(batches)]).backward()
        optimizer.step()

    return step


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


def run_benchmark(
    name: str,
    benchmark: Callable[[bool, torch.device], None],
    quick: bool = False,
    device: str | None = None,
    threads: int | None = None,
) -> None:
    """Set the device (default CUDA when available) and torch's threads (default 1), print a
    header line naming them, and run ``benchmark(quick, device)`` with Pyro's validation off."""
    import pyro

    device_ = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(threads or 1)
    where = torch.cuda.get_device_name(device_) if device_.type == "cuda" else "CPU"
    print(f"{name}: device {device_} ({where}), torch {torch.__version__}, pyro "
          f"{pyro.__version__}, {torch.get_num_threads()} threads"
          + (", --quick" if quick else ""))
    with pyro.validation_enabled(False):
        benchmark(quick, device_)


def command_line(main: Callable[..., None], description: str) -> None:
    """Parse ``--quick``, ``--device`` and ``--threads`` and call ``main`` with them."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 1)")
    arguments = parser.parse_args()
    main(arguments.quick, arguments.device, arguments.threads)
