"""The cost of a second stochastic level and of an autoregressive decoder: one training step of
the HVAE and of the PixelHVAE against the one-level VAE, on the same batch, as ratios; and the
PixelHVAE's sampling time per image.

Models (Tomczak & Welling 2018, VampPrior with K = 500 pseudo-inputs in every row, z = 40 per
level, gated networks of 300 units):

* **VAE**: one level, ``VAE.gated()`` (encoder ``GatedMLP(784, (300, 300))``, decoder
  ``GatedMLP(40, (300, 300), output_dim=784)``);
* **HVAE**: ``HierarchicalVAE.preset()`` (two levels, gated MLP decoder);
* **PixelHVAE**: ``HierarchicalVAE.preset(decoder="pixelcnn")`` (a PixelCNN of 8 gated masked
  3x3 layers of 64 channels conditioned on (z1, z2)).

A step is one Adam update on ``TraceAnalyticKL_ELBO().differentiable_loss`` of a batch of 100
binary images (the paper's batch size). Timing: after warm-up, interleaved rounds (every row in
turn); each figure is the median per step. Sampling: ``generate`` of 4 images (prior draws of
z2, then z1 given z2, then the PixelCNN pixel by pixel), median of rounds of one call. On CUDA
the table also gives the host synchronisations of one step, counted with
``torch.cuda.set_sync_debug_mode("warn")``.

Run: ``python benchmarks/bench_hvae.py [--quick] [--device cpu|cuda] [--threads N]``.
"""

from __future__ import annotations

import warnings

import torch
from _timing import (
    command_line,
    median_step_seconds,
    random_binary_batches,
    run_benchmark,
    training_step,
)

from pyro_dgm.infer import TraceAnalyticKL_ELBO
from pyro_dgm.models import VAE, HierarchicalVAE

BATCH_SIZE, LATENT_DIM, HIDDEN, PSEUDO_INPUTS = 100, 40, 300, 500
ROUNDS, STEPS = 5, 3
QUICK_ROUNDS, QUICK_STEPS = 1, 1
SAMPLES, SAMPLING_ROUNDS, QUICK_SAMPLING_ROUNDS = 4, 3, 1


def models(device: torch.device) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    options = {"hidden_dim": HIDDEN, "num_pseudo_inputs": PSEUDO_INPUTS, "param_store": False}
    one_level = VAE.gated(784, LATENT_DIM, **options)
    options["latent_dims"] = (LATENT_DIM, LATENT_DIM)
    return {"VAE": one_level.to(device),
            "HVAE": HierarchicalVAE.preset(**options).to(device),
            "PixelHVAE": HierarchicalVAE.preset(decoder="pixelcnn", **options).to(device)}


def host_synchronisations(step, device: torch.device) -> int | None:
    """Host synchronisations of one call of ``step`` on CUDA (None on the CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step(0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(warning.message) for warning in caught)


def benchmark(quick: bool, device: torch.device) -> None:
    rounds, steps = (QUICK_ROUNDS, QUICK_STEPS) if quick else (ROUNDS, STEPS)
    batches = random_binary_batches(BATCH_SIZE, device, count=2)
    nets = models(device)
    rows = {name: training_step(net, TraceAnalyticKL_ELBO(), batches)
            for name, net in nets.items()}
    syncs = {name: host_synchronisations(step, device) for name, step in rows.items()}
    print(f"One training step (Adam, TraceAnalyticKL_ELBO), batch {BATCH_SIZE}, VampPrior K = "
          f"{PSEUDO_INPUTS}, z = {LATENT_DIM} per level; median over {rounds} interleaved "
          f"rounds of {steps} steps.")
    seconds = median_step_seconds(rows, device, rounds=rounds, steps=steps, warmup=1)
    header = f"{'model':<11}{'ms/step':>10}{'/ VAE':>8}{'host syncs':>12}"
    print(header)
    print("-" * len(header))
    for name in nets:
        sync = "-" if syncs[name] is None else str(syncs[name])
        print(f"{name:<11}{1e3 * seconds[name]:>10.1f}{seconds[name] / seconds['VAE']:>8.1f}"
              f"{sync:>12}")

    like = batches[0][:SAMPLES]
    sampling_rounds = QUICK_SAMPLING_ROUNDS if quick else SAMPLING_ROUNDS
    for net in nets.values():
        net.eval()
    sampled = median_step_seconds(
        {name: (lambda index, net=net: net.generate(SAMPLES, like)) for name, net in nets.items()},
        device, rounds=sampling_rounds, steps=1, warmup=0 if quick else 1)
    print(f"Sampling ({SAMPLES} images per call, median over {sampling_rounds} round(s)): "
          + ", ".join(f"{name} {1e3 * seconds / SAMPLES:.2f} ms/image"
                      for name, seconds in sampled.items()))


def main(quick: bool = False, device: str | None = None, threads: int | None = None) -> None:
    """Print the HVAE's and PixelHVAE's step cost against the one-level VAE.

    :param quick: fewer and shorter rounds (a smoke test).
    :param device: ``"cpu"`` or ``"cuda"``; default CUDA when available.
    :param threads: torch's intra-op threads; default 1.
    """
    run_benchmark("bench_hvae", benchmark, quick, device, threads)


if __name__ == "__main__":
    command_line(main, __doc__.splitlines()[0])
