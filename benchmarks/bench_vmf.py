"""Time the von Mises-Fisher sampler and its KL divergence against their peers.

1. ``rsample`` of B = 4096 vMF draws (float32), m in {3, 11, 65}, kappa in {1, 10, 100}, with
   ``loc`` and ``concentration`` requiring grad, so that the forward graph is built as in
   training; the distribution is constructed inside the timed call. Peers: the power spherical
   distribution (``power_spherical.PowerSpherical(loc, scale)``, same loc and concentration),
   and ``scipy.stats.vonmises_fisher(mu, kappa).rvs(4096)`` (one mu and one kappa, on the host,
   no gradients). Also timed: ``rsample`` followed by the backward pass of ``sample.sum()``, for
   ours and for the power spherical (for ours, the reparameterized part of the gradient; the
   correction term of the rejection sampler is added by the ELBO, not by ``rsample``).
   Target: ours / power spherical <= 1.5 at every point.
2. KL(vMF || uniform) forward + backward, B = 4096, kappa spread log-uniformly over [1, 100],
   float32 ``concentration`` requiring grad, constructing the distributions inside the timed
   call. Peer, for context: the same KL from ``scipy.special.ive`` on the host, as the S-VAE
   reference code computes it (a custom autograd function whose forward and backward both call
   scipy, with the ``.cpu().numpy()`` / ``torch`` round trip, in the parameter's dtype).
   Target: under 1 ms.

Timing: after warm-up, rounds in which every candidate of a configuration is timed in turn
over a block of calls (interleaved, so that load from other processes slows all of them alike);
figures are medians over rounds, in ms per call. CUDA is synchronised before reading the clock.
Distributions are built with ``validate_args=False``.

Run: ``python benchmarks/bench_vmf.py [--quick] [--device cpu|cuda] [--threads N]``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import numpy as np
import scipy.special
import scipy.stats
import torch
import torch.nn.functional as F
from _timing import synchronize
from power_spherical import PowerSpherical
from torch import Tensor
from torch.distributions import kl_divergence

from pyro_dgm.distributions import HypersphericalUniform, VonMisesFisher

BATCH = 4096
DIMS = (3, 11, 65)
KAPPAS = (1.0, 10.0, 100.0)
KL_KAPPA_RANGE = (1.0, 100.0)
RSAMPLE_TARGET_RATIO = 1.5  # ours / power spherical
KL_TARGET_MS = 1.0
ROUNDS, BLOCK_SECONDS = 15, 0.15  # many short interleaved rounds: this machine is noisy
QUICK_ROUNDS, QUICK_BLOCK_SECONDS = 3, 0.03


# Timing ------------------------------------------------------------------------------------


def _seconds_per_call(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def median_ms(
    candidates: dict[str, Callable[[], object]],
    device: torch.device,
    rounds: int,
    block_seconds: float,
) -> dict[str, float]:
    """Median over ``rounds`` interleaved rounds of each candidate's ms per call.

    Each candidate is warmed up, then timed in blocks of about ``block_seconds``.
    """
    calls = {}
    for name, fn in candidates.items():
        fn()  # warm-up: allocator, lazy initialisation, caches
        one_call = statistics.median(_seconds_per_call(fn, 1, device) for _ in range(3))
        calls[name] = max(1, round(block_seconds / max(one_call, 1e-7)))
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            times[name].append(_seconds_per_call(fn, calls[name], device))
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


# Sampling ----------------------------------------------------------------------------------


def _sampling_candidates(
    dim: int, kappa: float, device: torch.device
) -> dict[str, Callable[[], object]]:
    generator = torch.Generator().manual_seed(dim)
    direction = F.normalize(torch.randn(BATCH, dim, generator=generator), dim=-1)
    loc = direction.to(device).requires_grad_()
    concentration = torch.full((BATCH,), kappa, device=device, requires_grad=True)
    mu = np.zeros(dim)
    mu[-1] = 1.0
    rng = np.random.default_rng(dim)

    def ours() -> Tensor:
        return VonMisesFisher(loc, concentration, validate_args=False).rsample()

    def power_spherical() -> Tensor:
        return PowerSpherical(loc, concentration, validate_args=False).rsample()

    def with_backward(sample: Callable[[], Tensor]) -> Callable[[], object]:
        return lambda: torch.autograd.grad(sample().sum(), (loc, concentration))

    return {
        "ours": ours,
        "power spherical": power_spherical,
        "ours + backward": with_backward(ours),
        "power spherical + backward": with_backward(power_spherical),
        "scipy": lambda: scipy.stats.vonmises_fisher(mu, kappa).rvs(BATCH, random_state=rng),
    }


def _check_ratio(ratio: float, target: float) -> str:
    return "ok" if ratio <= target else "MISS"


def benchmark_sampling(device: torch.device, rounds: int, block_seconds: float) -> None:
    print(
        f"\nvMF rsample, B = {BATCH}, float32, loc and concentration requiring grad; "
        f"ms per call (median of {rounds} rounds); PS = power_spherical.PowerSpherical;\n"
        f"'+bwd': rsample then backward of sample.sum(); scipy: "
        f"scipy.stats.vonmises_fisher(mu, kappa).rvs({BATCH}) on the host.\n"
        f"Target: ours/PS <= {RSAMPLE_TARGET_RATIO}."
    )
    header = (
        f"{'m':>3} {'kappa':>6} | {'ours':>7} {'PS':>7} {'ours/PS':>8} {'target':>6} | "
        f"{'ours+bwd':>8} {'PS+bwd':>8} {'ratio':>6} {'target':>6} | {'scipy':>7} "
        f"{'ours/scipy':>10}"
    )
    print(header)
    print("-" * len(header))
    misses = 0
    for dim in DIMS:
        for kappa in KAPPAS:
            ms = median_ms(_sampling_candidates(dim, kappa, device), device, rounds, block_seconds)
            forward = ms["ours"] / ms["power spherical"]
            backward = ms["ours + backward"] / ms["power spherical + backward"]
            misses += (forward > RSAMPLE_TARGET_RATIO) + (backward > RSAMPLE_TARGET_RATIO)
            print(
                f"{dim:>3} {kappa:>6g} | {ms['ours']:7.3f} {ms['power spherical']:7.3f} "
                f"{forward:8.2f} {_check_ratio(forward, RSAMPLE_TARGET_RATIO):>6} | "
                f"{ms['ours + backward']:8.3f} {ms['power spherical + backward']:8.3f} "
                f"{backward:6.2f} {_check_ratio(backward, RSAMPLE_TARGET_RATIO):>6} | "
                f"{ms['scipy']:7.3f} {ms['ours'] / ms['scipy']:10.2f}"
            )
    print(
        f"rsample target ours/PS <= {RSAMPLE_TARGET_RATIO}: {misses} miss(es) out of "
        f"{2 * len(DIMS) * len(KAPPAS)} ratios"
    )


# KL divergence -----------------------------------------------------------------------------


class _ScipyIve(torch.autograd.Function):
    """Exponentially scaled Bessel function ive(order, x) = exp(-x) I_order(x) from scipy, on
    the host, with d/dx ive(v, x) = ive(v - 1, x) - ive(v, x) (v + x) / x, also from scipy."""

    @staticmethod
    def forward(ctx, x: Tensor, order: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.order = order
        host = x.detach().cpu().numpy()
        return torch.from_numpy(scipy.special.ive(order, host)).to(x.device)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        v, host = ctx.order, x.detach().cpu().numpy()
        ive = scipy.special.ive
        derivative = ive(v - 1, host) - ive(v, host) * (v + host) / host
        return grad * torch.from_numpy(derivative).to(grad.device), None


def scipy_kl_to_uniform(concentration: Tensor, dim: int) -> Tensor:
    """KL(vMF(., kappa) || U(S^{m-1})) = kappa A_m(kappa) + log C_m(kappa) + log |S^{m-1}|,
    with A_m = I_{m/2} / I_{m/2-1} and log I_v(kappa) = log ive(v, kappa) + kappa from scipy."""
    order = 0.5 * dim - 1
    ive_order = _ScipyIve.apply(concentration, order)
    ive_next = _ScipyIve.apply(concentration, order + 1)
    log_normalizer = (
        order * concentration.log()
        - 0.5 * dim * math.log(2 * math.pi)
        - (ive_order.log() + concentration)
    )
    log_surface = math.log(2) + 0.5 * dim * math.log(math.pi) - math.lgamma(0.5 * dim)
    return concentration * ive_next / ive_order + log_normalizer + log_surface


def _kl_candidates(dim: int, device: torch.device) -> tuple[dict[str, Callable[[], object]], str]:
    """The timed KL steps, and the errors of ours and of the float32 scipy reference against
    the scipy reference evaluated in float64, as text."""
    generator = torch.Generator().manual_seed(dim)
    low, high = KL_KAPPA_RANGE
    log_kappa = torch.empty(BATCH).uniform_(math.log(low), math.log(high), generator=generator)
    concentration = log_kappa.exp().to(device).requires_grad_()
    loc = F.normalize(torch.randn(BATCH, dim, generator=generator), dim=-1).to(device)
    loc.requires_grad_()

    def ours() -> Tensor:
        q = VonMisesFisher(loc, concentration, validate_args=False)
        p = HypersphericalUniform(dim, dtype=loc.dtype, device=loc.device).expand([BATCH])
        return kl_divergence(q, p)

    def ours_step() -> object:
        return torch.autograd.grad(ours().sum(), concentration)

    def scipy_step() -> object:
        return torch.autograd.grad(scipy_kl_to_uniform(concentration, dim).sum(), concentration)

    with torch.no_grad():
        exact = scipy_kl_to_uniform(concentration.double(), dim)
        errors = [
            (value.double() - exact).abs().max().item()
            for value in (ours(), scipy_kl_to_uniform(concentration, dim))
        ]
    return {"ours": ours_step, "scipy": scipy_step}, f"{errors[0]:9.1e} {errors[1]:9.1e}"


def benchmark_kl(device: torch.device, rounds: int, block_seconds: float) -> None:
    low, high = KL_KAPPA_RANGE
    print(
        f"\nKL(vMF || uniform) forward + backward, B = {BATCH}, float32, kappa log-uniform on "
        f"[{low:g}, {high:g}], distributions built inside the timed call;\nms per call (median "
        f"of {rounds} rounds). scipy: the same KL from scipy.special.ive on the host (forward "
        f"and backward), with the\ntensor round trip in float32, as the S-VAE reference code "
        f"computes it. err: largest |KL - KL_64| in nats, KL_64 being that\nscipy formula "
        f"evaluated in float64. Target: ours < {KL_TARGET_MS:g} ms."
    )
    header = (
        f"{'m':>3} | {'ours':>7} {'target':>6} | {'scipy':>7} {'ours/scipy':>10} | "
        f"{'err ours':>9} {'err scipy':>9}"
    )
    print(header)
    print("-" * len(header))
    for dim in DIMS:
        candidates, errors = _kl_candidates(dim, device)
        ms = median_ms(candidates, device, rounds, block_seconds)
        verdict = "ok" if ms["ours"] < KL_TARGET_MS else "MISS"
        print(
            f"{dim:>3} | {ms['ours']:7.3f} {verdict:>6} | {ms['scipy']:7.3f} "
            f"{ms['ours'] / ms['scipy']:10.2f} | {errors}"
        )


# Entry point -------------------------------------------------------------------------------


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def main(quick: bool = False, device: str | None = None, threads: int | None = None) -> None:
    """Print the sampling and KL tables.

    :param quick: fewer and shorter rounds (a smoke test; noisier figures).
    :param device: ``"cpu"`` or ``"cuda"``; default CUDA when available.
    :param threads: torch's intra-op threads; default 1 (see benchmarks/README.md).
    """
    device_ = torch.device(device or default_device())
    torch.set_num_threads(threads or 1)
    rounds, block_seconds = (
        (QUICK_ROUNDS, QUICK_BLOCK_SECONDS) if quick else (ROUNDS, BLOCK_SECONDS)
    )
    torch.manual_seed(0)
    where = torch.cuda.get_device_name(device_) if device_.type == "cuda" else "CPU"
    print(
        f"bench_vmf: device {device_} ({where}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, scipy {scipy.__version__}"
        + (", --quick" if quick else "")
    )
    benchmark_sampling(device_, rounds, block_seconds)
    benchmark_kl(device_, rounds, block_seconds)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=default_device())
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 1)")
    arguments = parser.parse_args()
    main(quick=arguments.quick, device=arguments.device, threads=arguments.threads)
