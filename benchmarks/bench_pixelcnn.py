"""The PixelCNN decoder's cost against MLP decoders: sampling an image, and one training
forward + backward pass.

A PixelCNN decoder gives every pixel's Bernoulli logit in one pass during training, but samples
pixel by pixel: ``H * W`` sequential steps. ``PixelCNNDecoder.generate`` evaluates each layer at
the new pixel only, from the features kept from earlier steps (its arithmetic is at most one
forward pass's), so its time is mostly the ``H * W * (num_layers + 1)`` small products' overhead.
Measured in the same run on batches of 16 binary 28x28 images and context vectors of size 40 (a
VAE's z = 40):

* **PixelCNN**: ``PixelCNNDecoder(40)`` with its defaults (8 gated masked 3x3 layers of 64
  channels, one ``GatedDense`` context map);
* **MLP**: a plain decoder 40-300-300-784 with ReLUs (the default of ``pyro_dgm.models.VAE``);
* **gated MLP**: ``GatedMLP(40, (300, 300), output_dim=784)``, the VampPrior paper's decoder.

Rows: sampling time per image (``generate`` for the PixelCNN; one forward pass and a Bernoulli
draw for the MLPs), and one forward + backward pass of the summed Bernoulli log-likelihood of a
batch (logits, ``binary_cross_entropy_with_logits``, backward into every weight). For scale,
the table also gives ``H * W`` times one full-image forward pass of the PixelCNN at the same
batch: the cost of the naive sampler, which runs the whole image for every pixel (computed from
the measured pass, not run).

Timing: after warm-up, interleaved rounds (every row in turn); each figure is the median per
call. The PixelCNN's sampling is timed one call per round, the other rows 5 calls per round.

Run: ``python benchmarks/bench_pixelcnn.py [--quick] [--device cpu|cuda] [--threads N]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from _timing import command_line, median_step_seconds, run_benchmark
from torch import nn

from pyro_dgm.models.networks import GatedMLP
from pyro_dgm.models.pixelcnn import PixelCNNDecoder

BATCH_SIZE = 16
CONTEXT_DIM = 40
IMAGE_SHAPE = (1, 28, 28)
ROUNDS, STEPS = 5, 5
QUICK_ROUNDS, QUICK_STEPS = 1, 2
SAMPLING_ROUNDS, QUICK_SAMPLING_ROUNDS = 5, 1


def decoders(device: torch.device) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    pixels = IMAGE_SHAPE[1] * IMAGE_SHAPE[2]
    return {
        "PixelCNN": PixelCNNDecoder(CONTEXT_DIM, IMAGE_SHAPE).to(device),
        "MLP": nn.Sequential(nn.Linear(CONTEXT_DIM, 300), nn.ReLU(), nn.Linear(300, 300),
                             nn.ReLU(), nn.Linear(300, pixels)).to(device),
        "gated MLP": GatedMLP(CONTEXT_DIM, (300, 300), output_dim=pixels).to(device),
    }


def logits_of(name: str, decoder: nn.Module, images: torch.Tensor,
              context: torch.Tensor) -> torch.Tensor:
    if name == "PixelCNN":
        return decoder(images, context)
    return decoder(context).reshape(images.shape)


def training_pass(name: str, decoder: nn.Module, images: torch.Tensor,
                  context: torch.Tensor) -> Callable[[int], None]:
    def step(index: int) -> None:
        decoder.zero_grad(set_to_none=True)
        logits = logits_of(name, decoder, images, context)
        F.binary_cross_entropy_with_logits(logits, images, reduction="sum").backward()

    return step


def sampling(name: str, decoder: nn.Module, context: torch.Tensor) -> Callable[[int], None]:
    if name == "PixelCNN":
        return lambda index: decoder.generate(context)

    def step(index: int) -> None:
        with torch.no_grad():
            torch.bernoulli(decoder(context).sigmoid())

    return step


def full_forward(decoder: PixelCNNDecoder, images: torch.Tensor,
                 context: torch.Tensor) -> Callable[[int], None]:
    def step(index: int) -> None:
        with torch.no_grad():
            decoder(images, context)

    return step


def benchmark(quick: bool, device: torch.device) -> None:
    rounds, steps = (QUICK_ROUNDS, QUICK_STEPS) if quick else (ROUNDS, STEPS)
    sampling_rounds = QUICK_SAMPLING_ROUNDS if quick else SAMPLING_ROUNDS
    generator = torch.Generator().manual_seed(0)
    images = torch.bernoulli(torch.full((BATCH_SIZE, *IMAGE_SHAPE), 0.13),
                             generator=generator).to(device)
    context = torch.randn(BATCH_SIZE, CONTEXT_DIM, generator=generator).to(device)
    nets = decoders(device)
    pixelcnn = nets["PixelCNN"]
    print(f"Decoders of z = {CONTEXT_DIM} for {IMAGE_SHAPE[1]}x{IMAGE_SHAPE[2]} binary images, "
          f"batch {BATCH_SIZE}; PixelCNN: {len(pixelcnn.layers)} layers, "
          f"{pixelcnn.layers[1].out_channels} channels, reach {pixelcnn.reach}; median over "
          f"{rounds} interleaved rounds of {steps} calls ({sampling_rounds} round(s) of 1 call "
          f"for the PixelCNN's sampling).")

    train = median_step_seconds(
        {name: training_pass(name, net, images, context) for name, net in nets.items()}
        | {"full forward": full_forward(pixelcnn, images, context)},
        device, rounds=rounds, steps=steps, warmup=2)
    mlp_sampling = median_step_seconds(
        {name: sampling(name, net, context) for name, net in nets.items() if name != "PixelCNN"},
        device, rounds=rounds, steps=steps, warmup=2)
    pixelcnn_sampling = median_step_seconds(
        {"PixelCNN": sampling("PixelCNN", pixelcnn, context)}, device,
        rounds=sampling_rounds, steps=1, warmup=0 if quick else 1)
    per_image = {name: seconds / BATCH_SIZE
                 for name, seconds in (mlp_sampling | pixelcnn_sampling).items()}

    header = (f"{'decoder':<11}{'sample ms/image':>17}{'/ MLP':>10}"
              f"{'fwd+bwd ms/batch':>18}{'/ MLP':>8}")
    print(header)
    print("-" * len(header))
    for name in nets:
        print(f"{name:<11}{1e3 * per_image[name]:>17.3f}"
              f"{per_image[name] / per_image['MLP']:>10.0f}"
              f"{1e3 * train[name]:>18.2f}{train[name] / train['MLP']:>8.1f}")
    pixels = IMAGE_SHAPE[1] * IMAGE_SHAPE[2]
    naive = pixels * train["full forward"] / BATCH_SIZE
    print(f"PixelCNN: one full-image forward pass (no grad) {1e3 * train['full forward']:.2f} ms "
          f"per batch; {pixels} such passes (the naive sampler, computed) "
          f"{1e3 * naive:.1f} ms/image, {naive / per_image['PixelCNN']:.0f} x generate's.")


def main(quick: bool = False, device: str | None = None, threads: int | None = None) -> None:
    """Print the PixelCNN decoder's cost table.

    :param quick: fewer and shorter rounds (a smoke test).
    :param device: ``"cpu"`` or ``"cuda"``; default CUDA when available.
    :param threads: torch's intra-op threads; default 1.
    """
    run_benchmark("bench_pixelcnn", benchmark, quick, device, threads)


if __name__ == "__main__":
    command_line(main, __doc__.splitlines()[0])
