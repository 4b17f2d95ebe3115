"""The cost of the papers' test log-likelihood (5000 importance samples per test image) against
the decoder's forward passes on as many latent samples.

The S-VAE (Davidson et al. 2018), Sylvester (van den Berg et al. 2018) and VampPrior (Tomczak &
Welling 2018) papers report log p(x) on the 10,000 MNIST test images estimated with
S = 5000 importance samples each: 5 x 10^7 decoder passes. For ``VAE("vmf", 10)`` (S-VAE) and
``VAE("normal", 10)`` (N-VAE), untrained (the cost does not depend on the weights, save the
vMF sampler's rejection rate, which depends on the concentration), on random binary images of
MNIST's mean intensity, three rows are timed on the same chunks of (data points x particles):

* **IS-LL**: ``evaluate_dataset(model, guide, images, num_samples=5000)`` with its automatic
  chunks (default memory budget): the guide's samples, the decoder, every log-density, the
  float64 logsumexp over particles, and the ELBO terms with 10 particles per image;
* **decoder**: ``vae.decode(z)`` alone, on latent samples drawn beforehand, in chunks of the
  shape the evaluation chose, as many chunks as it ran;
* **decoder + log p(x|z)**: the same plus the Bernoulli log-likelihood of the images, the
  arithmetic that any estimate of log p(x) must do.

Reported: seconds per image and for 10,000 images (extrapolated linearly when fewer are timed,
as the header says), and the ratios IS-LL / decoder and IS-LL / (decoder + log p(x|z)). The
rows are interleaved block by block (a block of images through each row in turn), so that load
from other processes slows them alike; the ratio is that of the totals, with the range of the
blocks' ratios beside it. No target: the figures say how far the estimate is from its floor.

Run: ``python benchmarks/bench_evaluation.py [--quick] [--device cpu|cuda] [--threads N]``.
"""

from __future__ import annotations

import time

import pyro.distributions as pyro_dist
import torch
from _timing import command_line, random_binary_batches, run_benchmark, synchronize

from pyro_dgm.infer import evaluate_dataset
from pyro_dgm.infer.evaluation import _default_memory_budget, _plan_chunks, _probe
from pyro_dgm.models import VAE, VonMisesFisherLatent

LATENT_DIM = 10
NUM_SAMPLES = 5000
TEST_IMAGES = 10_000
#: images timed and blocks they are split into: (full, --quick), per device type
IMAGES = {"cpu": (500, 20), "cuda": (10_000, 1000)}
BLOCKS = (5, 2)


def chunk_shape(vae: VAE, images: torch.Tensor) -> tuple[int, int]:
    """(data points, particles) per chunk that ``evaluate_dataset`` chooses for ``images``."""
    _, bytes_per_pair = _probe(vae.model, vae.guide, -2, "data", (images[:64],), {})
    return _plan_chunks(bytes_per_pair, _default_memory_budget(images.device), len(images),
                        NUM_SAMPLES)


def decoder_passes(vae: VAE, images: torch.Tensor, shape: tuple[int, int],
                   likelihood: bool):
    """A function running the decoder (and the Bernoulli log-likelihood) on ``NUM_SAMPLES``
    latent samples for each image of a block, in chunks of ``shape``."""
    batch_size, chunk_size = shape
    z = torch.randn(chunk_size, batch_size, vae.event_dim, device=images.device)
    if isinstance(vae.latent, VonMisesFisherLatent):
        z = torch.nn.functional.normalize(z, dim=-1)

    @torch.no_grad()
    def run(block: torch.Tensor) -> None:
        for batch in block.split(batch_size):
            for start in range(0, NUM_SAMPLES, chunk_size):
                count = min(chunk_size, NUM_SAMPLES - start)
                logits = vae.decode(z[:count, : len(batch)])
                if likelihood:
                    pyro_dist.Bernoulli(logits=logits, validate_args=False).to_event(
                        1).log_prob(batch)

    return run


def time_rows(vae: VAE, images: torch.Tensor, blocks: int) -> tuple[dict, tuple[int, int]]:
    shape = chunk_shape(vae, images)
    rows = {
        "IS-LL": lambda block: evaluate_dataset(vae.model, vae.guide, block,
                                                num_samples=NUM_SAMPLES),
        "decoder": decoder_passes(vae, images, shape, likelihood=False),
        "decoder + log p(x|z)": decoder_passes(vae, images, shape, likelihood=True),
    }
    for run in rows.values():  # warm-up: caches, the vMF sampler's tables
        run(images[:2])
    seconds: dict[str, list[float]] = {name: [] for name in rows}
    for block in images.tensor_split(blocks):
        for name, run in rows.items():
            synchronize(images.device)
            start = time.perf_counter()
            run(block)
            synchronize(images.device)
            seconds[name].append(time.perf_counter() - start)
    return seconds, shape


def benchmark(quick: bool, device: torch.device) -> None:
    num_images = IMAGES[device.type][quick]
    blocks = BLOCKS[quick]
    images = random_binary_batches(num_images, device, count=1)[0]
    scaled = "" if num_images == TEST_IMAGES else (
        f"; {num_images} images timed, seconds for {TEST_IMAGES:,} extrapolated linearly")
    print(f"Test log-likelihood: d = {LATENT_DIM}, S = {NUM_SAMPLES} importance samples per "
          f"image, untrained VAEs, MLP 784-256-128, random binary images{scaled}; "
          f"{blocks} interleaved blocks.")
    header = (f"{'model':<7}{'chunk':>13}{'row':>22}{'ms / image':>12}"
              f"{'s / 10k images':>16}{'IS-LL / row':>13}{'blocks':>14}")
    print(header)
    print("-" * len(header))
    torch.manual_seed(0)
    for latent, label in (("vmf", "S-VAE"), ("normal", "N-VAE")):
        vae = VAE(latent, LATENT_DIM, param_store=False).to(device).eval()
        seconds, (batch_size, chunk_size) = time_rows(vae, images, blocks)
        total = {name: sum(values) for name, values in seconds.items()}
        for k, (name, values) in enumerate(seconds.items()):
            ratios = [a / b for a, b in zip(seconds["IS-LL"], values, strict=True)]
            line = (f"{label if k == 0 else '':<7}"
                    f"{f'{batch_size} x {chunk_size}' if k == 0 else '':>13}{name:>22}"
                    f"{1e3 * total[name] / num_images:>12.2f}"
                    f"{total[name] / num_images * TEST_IMAGES:>16.0f}")
            if name != "IS-LL":
                line += (f"{total['IS-LL'] / total[name]:>13.2f}"
                         f"{f'{min(ratios):.2f}-{max(ratios):.2f}':>14}")
            print(line, flush=True)


def main(quick: bool = False, device: str | None = None, threads: int | None = None) -> None:
    """Print the test log-likelihood cost table.

    :param quick: fewer images (a smoke test).
    :param device: ``"cpu"`` or ``"cuda"``; default CUDA when available.
    :param threads: torch's intra-op threads; default 1.
    """
    run_benchmark("bench_evaluation", benchmark, quick, device, threads)


if __name__ == "__main__":
    command_line(main, __doc__.splitlines()[0])
