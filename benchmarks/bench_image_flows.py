"""Time Glow against normflows' Glow: forward + log-det + backward, one step and a whole model.

Both sides are timed in the normalizing direction (data to latent, as in training by maximum
likelihood), float32, batch 64, on inputs of the sizes MNIST's 1x28x28 gives:

* **One Glow step** on 4x14x14 (1x28x28 squeezed): ours, a
  :class:`~pyro.distributions.transforms.ComposeTransformModule` of
  :class:`~pyro_dgm.transforms.ActNorm`, :class:`~pyro_dgm.transforms.InvertibleConv1x1` and a
  channel-wise :func:`~pyro_dgm.transforms.masked_affine_coupling2d`, called and then asked for
  its ``log_abs_det_jacobian``; normflows', ``GlowBlock(4, hidden, split_mode="channel")``
  through ``inverse`` (its data-to-latent direction). Loss ``sum(|z|^2 / 2 - log|det J|)``.
* **A multi-scale Glow** with L = 2 levels of K steps on 1x28x28 (4x14x14 at the first level,
  8x7x7 at the second, half of the channels factored out in between): ours,
  :func:`pyro_dgm.models.glow` without the logit preprocessing (``alpha=None``), through
  ``flow().log_prob(x)``; normflows', a ``MultiscaleFlow`` of ``GlowBlock``s, ``Squeeze`` and
  ``Merge`` as in normflows' own Glow example, with fixed standard normal bases
  (``DiagGaussian(..., trainable=False)``), through ``log_prob(x)``. Loss ``-mean log p(x)``.

Same configuration on both sides: the coupling network is a 3x3 convolution, ReLU, a 1x1
convolution, ReLU and a zero-initialised 3x3 convolution with the same hidden channels, the 1x1
convolution is LU-parameterised, ActNorm is initialised from the first (warm-up) batch. What
differs: our coupling network reads the whole masked image (C input channels, half of them
zeros) and writes 2C (shift and log-scale for every channel, half of them masked out), where
normflows' reads the C/2 conditioning channels and writes C, so ours has more parameters (the
table gives both counts; the extra weights meet only zeros and get zero gradients); our
log-scale is ``rho * tanh(.)``, normflows' Glow's ``log sigmoid(. + 2)``.

Timing: after warm-up, interleaved rounds of blocks of steps (every row in turn, so that load
from other processes slows all rows alike); each row's figure is its median time per step.

Run: ``python benchmarks/bench_image_flows.py [--quick] [--device cpu|cuda] [--threads N]``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from _timing import command_line, median_step_seconds, run_benchmark
from pyro.distributions.transforms import ComposeTransformModule
from torch import Tensor, nn

from pyro_dgm.models import glow
from pyro_dgm.transforms import ActNorm, InvertibleConv1x1, masked_affine_coupling2d

BATCH = 64
IMAGE_SHAPE = (1, 28, 28)
STEP_SHAPE = (4, 14, 14)
HIDDEN_CHANNELS = 64
NUM_LEVELS, NUM_STEPS = 2, 8
WARMUP_STEPS = 3
# (rounds, steps per block) for the step rows and the model rows, and with --quick
ROUNDS = {"step": (25, 10), "model": (7, 3)}
QUICK_ROUNDS = {"step": (3, 3), "model": (3, 1)}
TARGET = 1.0  # ours / normflows'

Step = Callable[[int], None]


def _gradient_step(loss: Callable[[Tensor], Tensor], module: nn.Module,
                   batches: list[Tensor]) -> Step:
    parameters = [p for p in module.parameters() if p.requires_grad]

    def step(index: int) -> None:
        # a new tensor each time, so that no cached transform answers from its cache
        x = batches[index % len(batches)].clone()
        torch.autograd.grad(loss(x), parameters)

    return step


def _our_step(hidden: int) -> ComposeTransformModule:
    channels = STEP_SHAPE[0]
    return ComposeTransformModule([
        ActNorm(channels), InvertibleConv1x1(channels),
        masked_affine_coupling2d(channels, "channel", hidden_channels=hidden),
    ])


def _normflows_glow(hidden: int) -> nn.Module:
    """normflows' multi-scale Glow, as its example builds it, for 1x28x28 (levels numbered
    from the deepest, as normflows does)."""
    import normflows as nf

    channels, height, width = IMAGE_SHAPE
    bases, merges, flows = [], [], []
    for i in range(NUM_LEVELS):
        level_channels = channels * 2 ** (NUM_LEVELS + 1 - i)
        flows.append([nf.flows.GlowBlock(level_channels, hidden, split_mode="channel")
                      for _ in range(NUM_STEPS)] + [nf.flows.Squeeze()])
        if i > 0:
            merges.append(nf.flows.Merge())
            factor = 2 ** (NUM_LEVELS - i)
            shape = (channels * factor, height // factor, width // factor)
        else:
            factor = 2 ** NUM_LEVELS
            shape = (2 * channels * factor, height // factor, width // factor)
        bases.append(nf.distributions.DiagGaussian(shape, trainable=False))
    return nf.MultiscaleFlow(bases, flows, merges, class_cond=False)


def _parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def make_rows(device: torch.device, hidden: int = HIDDEN_CHANNELS
              ) -> dict[str, tuple[Step, int]]:
    """Row name -> (timed step, number of parameters)."""
    import normflows as nf

    generator = torch.Generator().manual_seed(0)
    step_batches = [torch.randn(BATCH, *STEP_SHAPE, generator=generator).to(device)
                    for _ in range(4)]
    image_batches = [torch.randn(BATCH, *IMAGE_SHAPE, generator=generator).to(device)
                     for _ in range(4)]
    torch.manual_seed(0)
    ours = _our_step(hidden).to(device)
    our_glow = glow(IMAGE_SHAPE, NUM_LEVELS, NUM_STEPS, hidden, alpha=None).to(device)
    with warnings.catch_warnings():  # normflows' 1x1 convolution calls the deprecated torch.lu
        warnings.simplefilter("ignore", UserWarning)
        theirs = nf.flows.GlowBlock(STEP_SHAPE[0], hidden, split_mode="channel").to(device)
        their_glow = _normflows_glow(hidden).to(device)

    def our_step_loss(x: Tensor) -> Tensor:
        z = ours(x)
        return (0.5 * z.square().sum() - ours.log_abs_det_jacobian(x, z).sum())

    def their_step_loss(x: Tensor) -> Tensor:
        z, log_det = theirs.inverse(x)
        return 0.5 * z.square().sum() - log_det.sum()

    return {
        "step, ours": (_gradient_step(our_step_loss, ours, step_batches), _parameters(ours)),
        "step, normflows": (_gradient_step(their_step_loss, theirs, step_batches),
                            _parameters(theirs)),
        "model, ours": (_gradient_step(lambda x: -our_glow().log_prob(x).mean(), our_glow,
                                       image_batches), _parameters(our_glow)),
        "model, normflows": (_gradient_step(lambda x: -their_glow.log_prob(x, None).mean(),
                                            their_glow, image_batches),
                             _parameters(their_glow)),
    }


def benchmark(quick: bool, device: torch.device) -> None:
    rounds = QUICK_ROUNDS if quick else ROUNDS
    import normflows

    print(f"Glow against normflows {normflows.__version__}: batch {BATCH}, float32, hidden "
          f"channels {HIDDEN_CHANNELS}, forward + log-det + backward; one step on "
          f"{'x'.join(map(str, STEP_SHAPE))}, the model L = {NUM_LEVELS}, K = {NUM_STEPS} on "
          f"{'x'.join(map(str, IMAGE_SHAPE))}; medians of "
          + " and ".join(f"{r} interleaved rounds of {s}-step blocks ({kind} rows)"
                         for kind, (r, s) in rounds.items())
          + f", after {WARMUP_STEPS} warm-up steps.")
    rows = make_rows(device)
    seconds = {}
    for kind, (kind_rounds, steps) in rounds.items():
        seconds.update(median_step_seconds(
            {name: step for name, (step, _) in rows.items() if name.startswith(kind)}, device,
            rounds=kind_rounds, steps=steps, warmup=WARMUP_STEPS))
    header = f"{'row':<18}{'parameters':>12}{'ms':>10}{'ours/normflows':>16}{'target':>15}"
    print(header)
    print("-" * len(header))
    for name, (_, count) in rows.items():
        ratio = verdict = ""
        if name.endswith("ours"):
            value = seconds[name] / seconds[name.replace("ours", "normflows")]
            ratio = f"{value:.3f}"
            verdict = f"<= {TARGET}: " + ("ok" if value <= TARGET else "MISS")
        print(f"{name:<18}{count:>12,}{1e3 * seconds[name]:>10.2f}{ratio:>16}{verdict:>15}")


def main(quick: bool = False, device: str | None = None, threads: int | None = None) -> None:
    """Print the table of Glow steps and models, ours against normflows'.

    :param quick: fewer and shorter rounds (a smoke test).
    :param device: ``"cpu"`` or ``"cuda"``; default CUDA when available.
    :param threads: torch's intra-op threads; default 1.
    """
    run_benchmark("bench_image_flows", benchmark, quick, device, threads)


if __name__ == "__main__":
    command_line(main, __doc__.splitlines()[0])
