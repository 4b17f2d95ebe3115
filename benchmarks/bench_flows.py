"""Time Sylvester and Householder flows against Pyro's: forward + log-det + backward.

A stack of 8 flows on D = 64, batch 1024, float32: ``loss = sum(|z_8|^2 / 2 - sum_k log|det J_k|)``
and its gradient with respect to all parameters, as in one step of training a flow. Pyro's
``Sylvester(64, 33)`` (33 Householder reflections per flow) is matched in size by our householder
kind with ``count_householder=33``, and Pyro's ``Householder(64, 33)`` by ours with 33
reflections; the other rows show our remaining kinds, with global parameters and amortized ones
(per data point, from a context of dimension 256; on the CPU their cost is dominated by the
linear heads, which output :math:`D^2 + 2D + KD` numbers per data point and flow, as in the
paper, so they are timed on CUDA only).

Timing: after warm-up, rounds in which every row is timed in turn over a block of steps
(interleaved, so that a busy machine slows all rows alike); the table gives each row's median
over rounds, in ms per step. CUDA is synchronised before reading the clock.

Run: ``python benchmarks/bench_flows.py``.
"""

from __future__ import annotations

__all__ = ["main"]

import os
import statistics
import time
from collections.abc import Callable

import pyro.distributions.transforms as pyro_transforms
import torch
from torch import Tensor, nn

from pyro_dgm.transforms import (
    ConditionalHouseholder,
    ConditionalSylvester,
    Householder,
    Sylvester,
)

DIM = 64
BATCH = 1024
DEPTH = 8
CONTEXT_DIM = 256
ROUNDS = 7
BLOCK_SECONDS = 0.15  # timed steps per row and round


class _Stack:
    """DEPTH flows built by ``make(k)``; amortized ones are conditioned inside the timed step."""

    def __init__(self, make: Callable[[int], nn.Module], amortized: bool = False) -> None:
        self.flows = nn.ModuleList(make(k) for k in range(DEPTH))
        self.amortized = amortized

    def step(self, x: Tensor, context: Tensor) -> None:
        transforms = self.flows
        if self.amortized:
            transforms = [flow.condition(context) for flow in self.flows]
        z = x.clone()  # a new tensor, so that no transform answers from its cache
        log_det = x.new_zeros(x.shape[:-1])
        for transform in transforms:
            y = transform(z)
            log_det = log_det + transform.log_abs_det_jacobian(z, y)
            z = y
        loss = (0.5 * z.square().sum(-1) - log_det).sum()
        torch.autograd.grad(loss, list(self.flows.parameters()))


def _rows() -> dict[str, tuple[_Stack, str | None]]:
    """Row name -> (flow stack, the Pyro row it is compared with)."""
    c = CONTEXT_DIM
    pyro_sylvester, pyro_householder = "pyro Sylvester(64, 33)", "pyro Householder(64, 33)"
    return {
        pyro_sylvester: (_Stack(lambda k: pyro_transforms.Sylvester(DIM, 33)), None),
        pyro_householder: (_Stack(lambda k: pyro_transforms.Householder(DIM, 33)), None),
        "H-SNF K=33": (
            _Stack(lambda k: Sylvester(DIM, "householder", count_householder=33)),
            pyro_sylvester,
        ),
        "Householder K=33": (_Stack(lambda k: Householder(DIM, 33)), pyro_householder),
        "H-SNF K=8": (_Stack(lambda k: Sylvester(DIM, "householder")), pyro_sylvester),
        "O-SNF M=32": (_Stack(lambda k: Sylvester(DIM, "orthogonal")), pyro_sylvester),
        "T-SNF": (
            _Stack(lambda k: Sylvester(DIM, "triangular", permute=k % 2 == 1)),
            pyro_sylvester,
        ),
        "amortized H-SNF K=8": (
            _Stack(lambda k: ConditionalSylvester(DIM, c, "householder"), amortized=True),
            None,
        ),
        "amortized O-SNF M=32": (
            _Stack(lambda k: ConditionalSylvester(DIM, c, "orthogonal"), amortized=True),
            None,
        ),
        "amortized T-SNF": (
            _Stack(
                lambda k: ConditionalSylvester(DIM, c, "triangular", permute=k % 2 == 1),
                amortized=True,
            ),
            None,
        ),
        "amortized Householder K=33": (
            _Stack(lambda k: ConditionalHouseholder(DIM, c, 33), amortized=True),
            None,
        ),
    }


def _seconds_per_step(stack: _Stack, x: Tensor, context: Tensor, steps: int) -> float:
    synchronize = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        stack.step(x, context)
    synchronize()
    return (time.perf_counter() - start) / steps


def _benchmark(device: torch.device) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, DIM, generator=generator).to(device)
    context = torch.randn(BATCH, CONTEXT_DIM, generator=generator).to(device)
    rows, steps, failed = {}, {}, {}
    for name, (stack, reference) in _rows().items():
        if stack.amortized and device.type == "cpu":
            continue
        stack.flows.to(device)
        try:
            stack.step(x, context)  # warm-up, and a block size of about BLOCK_SECONDS
            seconds = _seconds_per_step(stack, x, context, 2)
        except RuntimeError as error:  # Pyro's Sylvester makes torch.eye on the CPU
            failed[name] = str(error).splitlines()[0]
            continue
        rows[name] = (stack, reference)
        steps[name] = max(1, round(BLOCK_SECONDS / seconds))
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(ROUNDS):
        for name, (stack, _) in rows.items():
            times[name].append(_seconds_per_step(stack, x, context, steps[name]))
    median_ms = {name: 1e3 * statistics.median(values) for name, values in times.items()}

    print(f"{'flow stack':<28} {'ms':>8} {'ours/pyro':>10}")
    for name, (_, reference) in _rows().items():
        if name in failed:
            print(f"{name:<28} {'failed':>8}   {failed[name][:70]}")
        elif name in median_ms:
            ratio = ""
            if reference in median_ms:
                ratio = f"{median_ms[name] / median_ms[reference]:.3f}  (vs {reference})"
            print(f"{name:<28} {median_ms[name]:8.2f} {ratio:>10}")


def main() -> None:
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    print(
        f"{DEPTH} flows, D = {DIM}, batch {BATCH}, float32, forward + log-det + backward; "
        f"median of {ROUNDS} interleaved rounds; torch {torch.__version__}"
    )
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    for device in devices:
        if device.type == "cuda":
            print(f"\nCUDA: {torch.cuda.get_device_name(device)}")
        else:
            print(f"\nCPU: {torch.get_num_threads()} threads")
        _benchmark(device)


if __name__ == "__main__":
    main()
