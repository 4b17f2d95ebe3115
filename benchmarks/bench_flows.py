"""Time Sylvester and Householder flows against Pyro's: forward + log-det + backward.

A stack of 8 flows on D = 64, batch 1024, float32: ``loss = sum(|z_8|^2 / 2 - sum_k log|det J_k|)``
and its gradient with respect to all parameters, as in one step of training a flow. Pyro's
``Sylvester(64, 33)`` (33 Householder reflections per flow) is matched in size by our
``HouseholderSylvester`` with ``num_reflections=33``, and Pyro's ``Householder(64, 33)`` by ours
with 33 reflections. Pyro's stacks are 8 modules of one flow each; ours are one
``HouseholderSylvester(..., num_flows=8)`` (the same 8 flows and parameters, the factors of all
flows computed in one batched pass), and, for comparison, 8 modules of one flow (the row "8
modules"). The Householder flow is a stack of reflections already (8 modules of 33). The other
rows show our remaining kinds, with global parameters (one module of 8 flows) and amortized ones
(one conditional module of 8 flows, as ``pyro_dgm.models.VAE`` builds them; per data point, from
a context of dimension 256; on the CPU their cost is dominated by the
linear heads, which output :math:`D^2 + 2D + KD` numbers per data point and flow, as in the
paper, so they are timed on CUDA only).

Timing: after warm-up, rounds in which every row is timed in turn over a block of steps
(interleaved, so that a busy machine slows all rows alike); the table gives each row's median
over rounds, in ms per step. CUDA is synchronised before reading the clock.

Second table: one training epoch of the flow VAEs of ``examples/flows_mnist.py`` (its default
settings) on statically binarized MNIST: ``pyro_dgm.models.VAE`` with latent dimension 64,
MLP encoder 784-300-300 and mirrored decoder, 16 flows of each kind (none, planar, IAF,
Householder, and the orthogonal, Householder and triangular Sylvester flows), batch 100 on the
50,000 training images (500 steps), Adam lr 1e-3, ``TraceAnalyticKL_ELBO`` through
:func:`pyro_dgm.experiments.train_epoch`. After 5 warm-up steps per kind, every kind trains in turn
for a full epoch (median of 2 rounds), or with ``--quick`` for 3 interleaved rounds of 20-step
blocks whose median is extrapolated to 500 steps (the header says which). Without the data in
``../shared/data/BinarizedMNIST`` (or ``$PYRO_DGM_DATA_DIR``), random binary images stand in
(the timing does not depend on the pixels).

Run: ``python benchmarks/bench_flows.py [--quick] [--device cpu|cuda] [--threads N]``.
"""

from __future__ import annotations

__all__ = ["main"]

import argparse
import functools
import itertools
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pyro
import pyro.distributions.transforms as pyro_transforms
import torch
from _timing import synchronize
from torch import Tensor, nn

from pyro_dgm.data import MinibatchLoader, load_binarized_mnist
from pyro_dgm.experiments import train_epoch
from pyro_dgm.infer import TraceAnalyticKL_ELBO
from pyro_dgm.models import VAE
from pyro_dgm.transforms import (
    ConditionalHouseholder,
    Householder,
    HouseholderChainNN,
    HouseholderSylvester,
    OrthogonalSylvester,
    TriangularSylvester,
    conditional_householder_sylvester,
    conditional_orthogonal_sylvester,
    conditional_triangular_sylvester,
)

DIM = 64
BATCH = 1024
DEPTH = 8
CONTEXT_DIM = 256
ROUNDS = 7
BLOCK_SECONDS = 0.15  # timed steps per row and round
QUICK_ROUNDS, QUICK_BLOCK_SECONDS = 3, 0.05
# ours / Pyro's of the same size, forward + log-det + backward
TARGETS = {"H-SNF K=33": 0.2, "Householder K=33": 0.2}

DATA_DIR = Path(
    os.environ.get("PYRO_DGM_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data")
)
VAE_FLOWS = ("none", "planar", "iaf", "householder", "orthogonal-sylvester",
             "householder-sylvester", "triangular-sylvester")
VAE_LATENT_DIM, VAE_NUM_FLOWS, VAE_BATCH, VAE_HIDDEN = 64, 16, 100, (300, 300)
VAE_WARMUP_STEPS, VAE_ROUNDS, VAE_QUICK_ROUNDS, VAE_QUICK_STEPS = 5, 2, 3, 20


class _Stack:
    """``modules`` transforms built by ``make(k)`` (DEPTH flows in all: DEPTH modules of one
    flow, or one module of DEPTH flows); amortized ones are conditioned inside the timed
    step."""

    def __init__(
        self, make: Callable[[int], nn.Module], amortized: bool = False, modules: int = DEPTH
    ) -> None:
        self.flows = nn.ModuleList(make(k) for k in range(modules))
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

    def stacked(flow: Callable[..., nn.Module], **options) -> _Stack:  # one module, DEPTH flows
        return _Stack(lambda k: flow(DIM, num_flows=DEPTH, **options), modules=1)

    def amortized(flow: Callable[..., nn.Module]) -> _Stack:  # one module of DEPTH flows
        return _Stack(lambda k: flow(DIM, c, num_flows=DEPTH), amortized=True, modules=1)

    return {
        pyro_sylvester: (_Stack(lambda k: pyro_transforms.Sylvester(DIM, 33)), None),
        pyro_householder: (_Stack(lambda k: pyro_transforms.Householder(DIM, 33)), None),
        "H-SNF K=33": (stacked(HouseholderSylvester, num_reflections=33), pyro_sylvester),
        "H-SNF K=33, 8 modules": (
            _Stack(lambda k: HouseholderSylvester(DIM, num_reflections=33)),
            pyro_sylvester,
        ),
        "Householder K=33": (_Stack(lambda k: Householder(DIM, 33)), pyro_householder),
        "H-SNF K=8": (stacked(HouseholderSylvester), pyro_sylvester),
        "O-SNF M=32": (stacked(OrthogonalSylvester), pyro_sylvester),
        "T-SNF": (stacked(TriangularSylvester), pyro_sylvester),
        "amortized H-SNF K=8": (amortized(conditional_householder_sylvester), None),
        "amortized O-SNF M=32": (amortized(conditional_orthogonal_sylvester), None),
        "amortized T-SNF": (amortized(conditional_triangular_sylvester), None),
        "amortized Householder K=33": (
            _Stack(
                lambda k: ConditionalHouseholder(DIM, HouseholderChainNN(c, DIM, 33), 33),
                amortized=True,
            ),
            None,
        ),
    }


def _seconds_per_step(stack: _Stack, x: Tensor, context: Tensor, steps: int) -> float:
    synchronize(x.device)
    start = time.perf_counter()
    for _ in range(steps):
        stack.step(x, context)
    synchronize(x.device)
    return (time.perf_counter() - start) / steps


def _benchmark(device: torch.device, rounds: int = ROUNDS,
               block_seconds: float = BLOCK_SECONDS) -> None:
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
        steps[name] = max(1, round(block_seconds / seconds))
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(rounds):
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
                value = median_ms[name] / median_ms[reference]
                ratio = f"{value:.3f}  (vs {reference})"
                if name in TARGETS:
                    ratio += f"  target <= {TARGETS[name]}: " + (
                        "ok" if value <= TARGETS[name] else "MISS"
                    )
            print(f"{name:<28} {median_ms[name]:8.2f} {ratio:>10}")


def _training_images(device: torch.device) -> tuple[Tensor, str]:
    try:
        return load_binarized_mnist(DATA_DIR, "train").to(device), f"binarized MNIST, {DATA_DIR}"
    except FileNotFoundError:
        generator = torch.Generator().manual_seed(0)
        images = torch.bernoulli(torch.full((50_000, 784), 0.13), generator=generator)
        return images.to(device), f"random binary images (no binarized MNIST in {DATA_DIR})"


def benchmark_vae_epochs(device: torch.device, quick: bool) -> None:
    """Seconds per training epoch of the flow VAEs (see the module documentation)."""
    images, source = _training_images(device)
    loader = MinibatchLoader(images, VAE_BATCH, binarize=False, return_indices=True)
    steps_per_epoch, num_data = len(loader), loader.num_examples
    rounds, steps = (VAE_QUICK_ROUNDS, VAE_QUICK_STEPS) if quick else (VAE_ROUNDS, len(loader))
    block = "full epochs" if steps == len(loader) else f"{steps}-step blocks, extrapolated"
    print(
        f"\nOne training epoch of the flow VAEs: d = {VAE_LATENT_DIM}, {VAE_NUM_FLOWS} flows, MLP "
        f"{VAE_HIDDEN}, batch {VAE_BATCH}, Adam lr 1e-3, {source} ({num_data:,} images, "
        f"{steps_per_epoch} steps per epoch);\nmedian of {rounds} interleaved rounds of {block}; "
        f"{VAE_WARMUP_STEPS} warm-up steps per kind."
    )
    trainers = {}
    for kind in VAE_FLOWS:
        torch.manual_seed(0)
        vae = VAE("normal", VAE_LATENT_DIM, hidden_dims=VAE_HIDDEN, num_flows=VAE_NUM_FLOWS,
                  flow=None if kind == "none" else kind).to(device)
        loss = functools.partial(TraceAnalyticKL_ELBO().differentiable_loss, vae.model,
                                 vae.guide)
        optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
        trainers[kind] = functools.partial(train_epoch, loss, optimizer, progress=False,
                                           loss_scale=num_data, num_data=num_data)
        trainers[kind](itertools.islice(loader, VAE_WARMUP_STEPS))
    seconds: dict[str, list[float]] = {kind: [] for kind in VAE_FLOWS}
    losses: dict[str, float] = {}
    for _ in range(rounds):
        for kind, train in trainers.items():
            synchronize(device)
            start = time.perf_counter()
            losses[kind] = train(itertools.islice(loader, steps))
            synchronize(device)
            seconds[kind].append((time.perf_counter() - start) * steps_per_epoch / steps)
    epoch = {kind: statistics.median(values) for kind, values in seconds.items()}
    header = f"{'flow':<24} {'s/epoch':>8} {'ms/step':>8} {'vs none':>8} {'loss':>7}"
    print(header)
    print("-" * len(header))
    for kind in VAE_FLOWS:
        print(f"{kind:<24} {epoch[kind]:8.2f} {1e3 * epoch[kind] / steps_per_epoch:8.2f} "
              f"{epoch[kind] / epoch['none']:8.2f} {losses[kind]:7.1f}")
    print("loss: negative ELBO estimate in nats per image, mean over the last block (a sanity "
          "check that every kind trains).")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def main(quick: bool = False, device: str | None = None, threads: int | None = None) -> None:
    """Print the flow-stack table and the flow-VAE epoch table.

    :param quick: fewer and shorter rounds, and VAE epochs extrapolated from 20-step blocks.
    :param device: ``"cpu"`` or ``"cuda"``; default both the CPU and, when present, CUDA for the
        flow stacks, and CUDA when present for the VAE epochs.
    :param threads: torch's intra-op threads; default all usable cores.
    """
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    rounds, block_seconds = (
        (QUICK_ROUNDS, QUICK_BLOCK_SECONDS) if quick else (ROUNDS, BLOCK_SECONDS)
    )
    print(
        f"{DEPTH} flows, D = {DIM}, batch {BATCH}, float32, forward + log-det + backward; "
        f"median of {rounds} interleaved rounds; torch {torch.__version__}"
        + (", --quick" if quick else "")
    )
    if device is None:
        devices = [torch.device("cpu")]
        if torch.cuda.is_available():
            devices.append(torch.device("cuda"))
    else:
        devices = [torch.device(device)]
    for device_ in devices:
        if device_.type == "cuda":
            print(f"\nCUDA: {torch.cuda.get_device_name(device_)}")
        else:
            print(f"\nCPU: {torch.get_num_threads()} threads")
        _benchmark(device_, rounds, block_seconds)
    with pyro.validation_enabled(False):
        benchmark_vae_epochs(torch.device(device or default_device()), quick)
    pyro.clear_param_store()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: CPU and CUDA for the flow stacks, CUDA if present for "
                             "the VAE epochs")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: all usable cores)")
    arguments = parser.parse_args()
    main(quick=arguments.quick, device=arguments.device, threads=arguments.threads)
