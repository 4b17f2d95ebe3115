"""The VampPrior's cost: one training step with it against the standard prior plus one encoder
pass over the pseudo-inputs.

The VampPrior (Tomczak & Welling 2018) inherently costs, per step, one encoder forward and
backward pass over its K pseudo-inputs and the mixture density of every z under K components.
Everything else should be the standard VAE's step. Measured in the same run, with the
settings of ``examples/vampprior_mnist.py`` (batch 100, K = 500, z = 40, encoder and decoder
784-300-300, Adam, ``TraceAnalyticKL_ELBO`` through ``differentiable_loss``):

* **T_std**: one training step (loss, backward, Adam) of the VAE with the standard prior;
* **T_vamp**: the same with the VampPrior;
* **T_enc**: one encoder forward + backward over the K pseudo-inputs (the sigmoid of the raw
  parameter, the encoder and posterior head, a scalar of the outputs, backward to the
  pseudo-inputs and the encoder's weights).

Target: T_vamp <= 1.2 (T_std + T_enc): components computed once per step, not per particle or
per data point, and the mixture evaluated with one batched logsumexp. The vMF rows (uniform
prior against a VampPrior of vMFs on S^40) are reported the same way, for information.

Timing: steps on random binary batches, after warm-up; interleaved rounds of blocks of steps
(every row in turn, so that load from other processes slows all rows alike); each row's
figure is its median block time per step.

Run: ``python benchmarks/bench_vampprior.py [--quick] [--device cpu|cuda] [--threads N]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from _timing import (
    command_line,
    median_step_seconds,
    random_binary_batches,
    run_benchmark,
    training_step,
)

from pyro_dgm.infer import TraceAnalyticKL_ELBO
from pyro_dgm.models import VAE, VonMisesFisherLatent

BATCH_SIZE = 100
NUM_PSEUDO_INPUTS = 500
LATENT_DIM = 40
HIDDEN_DIMS = (300, 300)
WARMUP_STEPS = 5
ROUNDS, STEPS = 9, 20
QUICK_ROUNDS, QUICK_STEPS = 3, 5
TARGET = 1.2
LEARNING_RATE = 5e-4


def encoder_pass(vae: VAE) -> Callable[[int], None]:
    """One encoder forward + backward over the pseudo-inputs, as inside a VampPrior step."""

    def step(index: int) -> None:
        vae.zero_grad(set_to_none=True)
        q = vae.posterior(vae.prior_module.pseudo_inputs)
        parameters = (q.loc, q.concentration) if isinstance(
            vae.latent, VonMisesFisherLatent) else (
            q.base_dist.loc, q.base_dist.scale)
        sum(p.sum() for p in parameters).backward()

    return step


def make_rows(latent: str, device: torch.device) -> dict[str, Callable[[int], None]]:
    batches = random_binary_batches(BATCH_SIZE, device)
    fixed = "standard" if latent == "normal" else "uniform"
    torch.manual_seed(0)
    standard = VAE(latent, LATENT_DIM, hidden_dims=HIDDEN_DIMS, prior=fixed,
                   param_store=False).to(device)
    vamp = VAE(latent, LATENT_DIM, hidden_dims=HIDDEN_DIMS, prior="vamp",
               num_pseudo_inputs=NUM_PSEUDO_INPUTS, param_store=False).to(device)
    elbo = TraceAnalyticKL_ELBO()
    return {"T_std": training_step(standard, elbo, batches, LEARNING_RATE),
            "T_vamp": training_step(vamp, elbo, batches, LEARNING_RATE),
            "T_enc": encoder_pass(vamp)}


def benchmark(quick: bool, device: torch.device) -> None:
    rounds, steps = (QUICK_ROUNDS, QUICK_STEPS) if quick else (ROUNDS, STEPS)
    print(f"VampPrior step cost: batch {BATCH_SIZE}, K = {NUM_PSEUDO_INPUTS} pseudo-inputs, "
          f"z = {LATENT_DIM}, MLP 784-{'-'.join(map(str, HIDDEN_DIMS))}; median over {rounds} "
          f"interleaved rounds of {steps} steps, after {WARMUP_STEPS} warm-up steps.")
    header = (f"{'latent':<8}{'T_std ms':>10}{'T_vamp ms':>11}{'T_enc ms':>10}"
              f"{'T_vamp / (T_std + T_enc)':>27}{'target':>10}")
    print(header)
    print("-" * len(header))
    for latent in ("normal", "vmf"):
        seconds = median_step_seconds(make_rows(latent, device), device, rounds=rounds,
                                      steps=steps, warmup=WARMUP_STEPS)
        ms = {name: 1e3 * value for name, value in seconds.items()}
        ratio = ms["T_vamp"] / (ms["T_std"] + ms["T_enc"])
        verdict = "" if latent != "normal" else ("ok" if ratio <= TARGET else "MISS")
        print(f"{latent:<8}{ms['T_std']:>10.2f}{ms['T_vamp']:>11.2f}{ms['T_enc']:>10.2f}"
              f"{ratio:>27.3f}{(verdict + f' {TARGET}') if verdict else '':>10}")
    print("(vmf: uniform prior against a VampPrior of vMFs, for information; the target is "
          "stated for Gaussian latents)")


def main(quick: bool = False, device: str | None = None, threads: int | None = None) -> None:
    """Print the VampPrior cost table.

    :param quick: fewer and shorter rounds (a smoke test).
    :param device: ``"cpu"`` or ``"cuda"``; default CUDA when available.
    :param threads: torch's intra-op threads; default 1.
    """
    run_benchmark("bench_vampprior", benchmark, quick, device, threads)


if __name__ == "__main__":
    command_line(main, __doc__.splitlines()[0])
