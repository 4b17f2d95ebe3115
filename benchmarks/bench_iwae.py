"""The cost of one IWAE training step with K = 1, 5, 50 particles relative to one ELBO step.

Settings of ``examples/svae_mnist.py``: d = 10, batch 64, encoder 784-256-128 and its mirror
decoder, Adam, the loss through ``differentiable_loss`` on random binary batches. Rows, for the
S-VAE (vMF latents: rejection sampling with score-function terms) and the N-VAE:

* **ELBO**: ``TraceAnalyticKL_ELBO()`` (closed-form KL, one sample), the baseline;
* **IWAE K**: ``ImportanceWeightedELBO(K)`` for K = 1, 5, 50 (vectorized particles; the
  decoder runs on K x 64 latent samples).

There is no target: the figures say what the tighter bound costs. IWAE with K = 1 equals the
ELBO with a Monte Carlo KL, so its ratio is the overhead of the per-data-point machinery.

Timing: median over interleaved rounds of blocks of steps, after warm-up
(``benchmarks/_timing.py``).

Run: ``python benchmarks/bench_iwae.py [--quick] [--device cpu|cuda] [--threads N]``.
"""

from __future__ import annotations

import torch
from _timing import (
    Step,
    command_line,
    median_step_seconds,
    random_binary_batches,
    run_benchmark,
    training_step,
)

from pyro_dgm.infer import ImportanceWeightedELBO, TraceAnalyticKL_ELBO
from pyro_dgm.models import VAE

BATCH_SIZE = 64
LATENT_DIM = 10
PARTICLES = (1, 5, 50)
WARMUP_STEPS = 5
ROUNDS, STEPS = 7, 20
QUICK_ROUNDS, QUICK_STEPS = 3, 5


def make_rows(latent: str, device: torch.device) -> dict[str, Step]:
    batches = random_binary_batches(BATCH_SIZE, device)
    torch.manual_seed(0)
    objectives = {"ELBO": TraceAnalyticKL_ELBO()}
    objectives.update({f"IWAE K={k}": ImportanceWeightedELBO(k) for k in PARTICLES})
    return {name: training_step(VAE(latent, LATENT_DIM, param_store=False).to(device),
                                objective, batches)
            for name, objective in objectives.items()}


def benchmark(quick: bool, device: torch.device) -> None:
    rounds, steps = (QUICK_ROUNDS, QUICK_STEPS) if quick else (ROUNDS, STEPS)
    print(f"IWAE step cost: d = {LATENT_DIM}, batch {BATCH_SIZE}, MLP 784-256-128; median over "
          f"{rounds} interleaved rounds of {steps} steps, after {WARMUP_STEPS} warm-up steps.")
    names = ["ELBO"] + [f"IWAE K={k}" for k in PARTICLES]
    header = f"{'model':<8}" + "".join(f"{name + ' ms':>14}" for name in names) + "".join(
        f"{'K=' + str(k) + ' / ELBO':>13}" for k in PARTICLES)
    print(header)
    print("-" * len(header))
    for latent, label in (("vmf", "S-VAE"), ("normal", "N-VAE")):
        seconds = median_step_seconds(make_rows(latent, device), device, rounds=rounds,
                                      steps=steps, warmup=WARMUP_STEPS)
        line = f"{label:<8}" + "".join(f"{1e3 * seconds[name]:>14.2f}" for name in names)
        line += "".join(f"{seconds[f'IWAE K={k}'] / seconds['ELBO']:>13.2f}" for k in PARTICLES)
        print(line)


def main(quick: bool = False, device: str | None = None, threads: int | None = None) -> None:
    """Print the IWAE step-cost table.

    :param quick: fewer and shorter rounds (a smoke test).
    :param device: ``"cpu"`` or ``"cuda"``; default CUDA when available.
    :param threads: torch's intra-op threads; default 1.
    """
    run_benchmark("bench_iwae", benchmark, quick, device, threads)


if __name__ == "__main__":
    command_line(main, __doc__.splitlines()[0])
