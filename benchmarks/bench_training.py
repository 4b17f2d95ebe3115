"""Time one epoch of S-VAE training on MNIST against a plain PyTorch VAE.

All rows train the same networks (encoder 784-256-128 with ReLU and a linear head, decoder
d-128-256-784 with ReLU, Bernoulli logits) with latent dimension d = 10, batch 64 on the full
60,000 MNIST training images, dynamically binarized by one shared
:class:`~pyro_dgm.data.MinibatchLoader` holding the data on the device, Adam with lr 1e-3, and
the loss scaled to the whole data set (N / B times the batch sum):

* **plain PyTorch, N-VAE** (the baseline): Gaussian latent, analytic KL, no Pyro;
* **plain PyTorch, S-VAE**: our ``VonMisesFisher`` and its KL to the uniform prior with the
  rejection-sampling correction term written by hand, no Pyro (isolates the vMF's cost);
* **pyro_dgm, S-VAE** and **pyro_dgm, N-VAE**: ``pyro_dgm.models.VAE`` trained as
  ``examples/svae_mnist.py`` trains it: ``TraceAnalyticKL_ELBO().differentiable_loss`` with a
  torch optimizer through :func:`pyro_dgm.experiments.train_epoch` (target: S-VAE / plain <= 1.4);
* **pyro SVI.step, S-VAE**: the same model, ELBO and optimizer through ``pyro.infer.SVI`` and
  ``pyro.optim.Adam`` (Pyro's parameter bookkeeping and a host synchronisation every step).

Timing: after warm-up steps, rounds in which every row trains in turn (interleaved, so that
load from other processes slows all rows alike); each row's figure is its median over rounds.
A round is one full epoch, or with ``--quick`` a block of steps extrapolated to an epoch.
Pyro's validation is disabled while timing. ``--profile`` prints a torch.profiler table of a
few steps of the pyro_dgm S-VAE and of the plain N-VAE instead.

Run: ``python benchmarks/bench_training.py [--quick] [--device cpu|cuda] [--threads N]
[--profile]``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pyro
import pyro.optim
import torch
import torch.nn.functional as F
from _timing import synchronize
from pyro.infer import SVI
from torch import Tensor, nn
from torch.distributions import kl_divergence

from pyro_dgm.data import MinibatchLoader, load_embedded_mnist_subset, load_mnist
from pyro_dgm.distributions import HypersphericalUniform, VonMisesFisher
from pyro_dgm.experiments import train_epoch
from pyro_dgm.infer import TraceAnalyticKL_ELBO
from pyro_dgm.models import VAE

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LATENT_DIM = 10
BATCH_SIZE = 64
LEARNING_RATE = 1e-3
WARMUP_STEPS = 10
ROUNDS = 5  # full epochs per row
QUICK_ROUNDS, QUICK_STEPS = 5, 50
PROFILE_STEPS = 30
TARGET_RATIO = 1.4  # pyro_dgm S-VAE / plain N-VAE
BASELINE = "plain PyTorch, N-VAE"
TARGET_ROW = "pyro_dgm train_epoch, S-VAE"

Batches = Iterable[tuple[Tensor, Tensor]]


class PlainVAE(nn.Module):
    """``pyro_dgm.models.VAE``'s networks and loss in plain PyTorch, without Pyro."""

    def __init__(self, latent: str, latent_dim: int = LATENT_DIM, input_dim: int = 784) -> None:
        super().__init__()
        self.latent = latent
        self.event_dim = latent_dim + 1 if latent == "vmf" else latent_dim
        second_head = 1 if latent == "vmf" else latent_dim
        self.encoder = nn.Sequential(
            nn.Linear(input_dim, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU()
        )
        self.head = nn.Linear(128, self.event_dim + second_head)
        self.decoder = nn.Sequential(
            nn.Linear(self.event_dim, 128),
            nn.ReLU(),
            nn.Linear(128, 256),
            nn.ReLU(),
            nn.Linear(256, input_dim),
        )

    def loss(self, x: Tensor, num_data: int) -> Tensor:
        """Negative ELBO estimate for the data set, from the batch ``x``: N / B times the sum
        over the batch of -log p(x | z) + KL(q(z | x) || p(z))."""
        scale = num_data / x.shape[0]
        head = self.head(self.encoder(x))
        loc, second = head.split([self.event_dim, head.shape[-1] - self.event_dim], -1)
        if self.latent == "normal":
            std = F.softplus(second)
            z = loc + std * torch.randn_like(std)
            kl = (0.5 * (loc.square() + std.square() - 1) - std.log()).sum(-1)
        else:
            q = VonMisesFisher(
                F.normalize(loc, dim=-1), F.softplus(second.squeeze(-1)) + 1, validate_args=False
            )
            z = q.rsample()
            prior = HypersphericalUniform(self.event_dim, dtype=x.dtype, device=x.device)
            kl = kl_divergence(q, prior.expand(x.shape[:1]))
        logits = self.decoder(z)
        neg_log_lik = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
        loss = scale * (neg_log_lik + kl).sum()
        if self.latent == "vmf":
            # Naesseth et al.'s correction: zero-valued, gradient -log p(x | z) * d score.
            score = q.score_function(z)  # what TraceAnalyticKL_ELBO asks of the site
            loss = loss + (scale * neg_log_lik.detach() * (score - score.detach())).sum()
        return loss


# Rows: each trains on the batches it is given and returns the mean loss per batch ----------


@dataclass
class Row:
    name: str
    train: Callable[[Batches], float]


def _plain_row(name: str, latent: str, num_data: int, device: torch.device) -> Row:
    model = PlainVAE(latent).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)

    def train(batches: Batches) -> float:  # the loop of pyro_dgm.experiments.train_epoch
        total, count = None, 0
        for x, _ in batches:
            optimizer.zero_grad(set_to_none=True)
            loss = model.loss(x, num_data)
            loss.backward()
            optimizer.step()
            total = loss.detach() if total is None else total + loss.detach()
            count += 1
        return total.item() / count

    return Row(name, train)


def _pyro_dgm_row(name: str, latent: str, num_data: int, device: torch.device) -> Row:
    # as examples/svae_mnist.py builds it: a torch optimizer needs no Pyro param store
    vae = VAE(latent, latent_dim=LATENT_DIM, param_store=False).to(device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=LEARNING_RATE)
    loss_fn = functools.partial(TraceAnalyticKL_ELBO().differentiable_loss, vae.model, vae.guide)

    def train(batches: Batches) -> float:
        return train_epoch(loss_fn, optimizer, batches, progress=False, num_data=num_data)

    return Row(name, train)


def _svi_row(name: str, latent: str, num_data: int, device: torch.device) -> Row:
    vae = VAE(latent, latent_dim=LATENT_DIM).to(device)  # registers its parameters with Pyro
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": LEARNING_RATE}),
              TraceAnalyticKL_ELBO())

    def train(batches: Batches) -> float:
        losses = [svi.step(x, indices, num_data=num_data) for x, indices in batches]
        return sum(losses) / len(losses)

    return Row(name, train)


def make_rows(num_data: int, device: torch.device) -> list[Row]:
    torch.manual_seed(0)
    return [
        _plain_row(BASELINE, "normal", num_data, device),
        _plain_row("plain PyTorch, S-VAE (our vMF)", "vmf", num_data, device),
        _pyro_dgm_row(TARGET_ROW, "vmf", num_data, device),
        _pyro_dgm_row("pyro_dgm train_epoch, N-VAE", "normal", num_data, device),
        _svi_row("pyro SVI.step, S-VAE", "vmf", num_data, device),
    ]


# Timing ------------------------------------------------------------------------------------


def _timed(row: Row, batches: Batches, device: torch.device) -> tuple[float, float]:
    """(seconds, mean loss per batch) of training ``row`` on ``batches``."""
    synchronize(device)
    start = time.perf_counter()
    loss = row.train(batches)
    synchronize(device)
    return time.perf_counter() - start, loss


def load_training_images(device: torch.device) -> tuple[Tensor, str]:
    """The 60,000 MNIST training images (uint8) on ``device``, and where they came from."""
    try:
        images, _ = load_mnist(DATA_DIR, train=True)
        source = f"MNIST from {DATA_DIR}"
    except FileNotFoundError:
        images = load_embedded_mnist_subset()[0]
        source = f"embedded MNIST subset (no MNIST in {DATA_DIR}): per-epoch figures scaled"
    return images.to(device), source


def benchmark(quick: bool, device: torch.device) -> None:
    images, source = load_training_images(device)
    loader = MinibatchLoader(images, BATCH_SIZE, drop_last=True, return_indices=True)
    num_data = loader.num_examples
    steps_per_epoch = 60_000 // BATCH_SIZE  # a full MNIST epoch, also for the subset
    rows = make_rows(num_data, device)
    rounds, steps = (QUICK_ROUNDS, QUICK_STEPS) if quick else (ROUNDS, len(loader))
    block = "full epochs" if steps == len(loader) else f"{steps}-step blocks, extrapolated"
    print(
        f"One epoch of VAE training: d = {LATENT_DIM}, batch {BATCH_SIZE}, Adam lr "
        f"{LEARNING_RATE:g}, {source} ({num_data:,} images, {steps_per_epoch} steps per "
        f"epoch);\nmedian of {rounds} interleaved rounds of {block}; {WARMUP_STEPS} warm-up "
        f"steps per row; Pyro validation disabled."
    )
    for row in rows:
        row.train(itertools.islice(loader, WARMUP_STEPS))
    seconds: dict[str, list[float]] = {row.name: [] for row in rows}
    losses: dict[str, float] = {}
    for _ in range(rounds):
        for row in rows:
            elapsed, loss = _timed(row, itertools.islice(loader, steps), device)
            seconds[row.name].append(elapsed * steps_per_epoch / steps)
            losses[row.name] = loss / num_data

    epoch = {name: statistics.median(values) for name, values in seconds.items()}
    header = f"{'row':<32} {'s/epoch':>8} {'ms/step':>8} {'vs plain':>8} {'target':>8} {'loss':>7}"
    print(header)
    print("-" * len(header))
    for row in rows:
        ratio = epoch[row.name] / epoch[BASELINE]
        target = ""
        if row.name == TARGET_ROW:
            target = ("ok" if ratio <= TARGET_RATIO else "MISS") + f" {TARGET_RATIO}"
        per_step_ms = 1e3 * epoch[row.name] / steps_per_epoch
        print(
            f"{row.name:<32} {epoch[row.name]:8.2f} {per_step_ms:8.2f} {ratio:8.2f} "
            f"{target:>8} {losses[row.name]:7.1f}"
        )
    paired = [t / b for t, b in zip(seconds[TARGET_ROW], seconds[BASELINE], strict=True)]
    print(
        f"{TARGET_ROW} / {BASELINE}, round by round: "
        + " ".join(f"{ratio:.2f}" for ratio in paired)
        + f" (median {statistics.median(paired):.2f})"
    )
    print(
        "loss: negative ELBO estimate in nats per example, mean over the last block "
        "(a sanity check that every row trains; rows start from different initializations)."
    )


def profile(device: torch.device) -> None:
    """torch.profiler tables of a few training steps of the pyro_dgm S-VAE and the plain loop."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    images, _ = load_training_images(device)
    loader = MinibatchLoader(images, BATCH_SIZE, drop_last=True, return_indices=True)
    rows = {row.name: row for row in make_rows(loader.num_examples, device)}
    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if device.type == "cuda" else []
    )
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name in (TARGET_ROW, BASELINE):
        row = rows[name]
        row.train(itertools.islice(loader, WARMUP_STEPS))
        elapsed, _ = _timed(row, itertools.islice(loader, PROFILE_STEPS), device)
        with torch_profile(activities=activities) as profiler:
            row.train(itertools.islice(loader, PROFILE_STEPS))
        print(
            f"\n{name}: {1e3 * elapsed / PROFILE_STEPS:.2f} ms per step without the "
            f"profiler; {PROFILE_STEPS} steps profiled:"
        )
        print(profiler.key_averages().table(sort_by=sort_by, row_limit=20))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def main(
    quick: bool = False,
    device: str | None = None,
    threads: int | None = None,
    profile_steps: bool = False,
) -> None:
    """Print the training table (or, with ``profile_steps``, the profiler tables).

    :param quick: time blocks of steps instead of full epochs, and extrapolate.
    :param device: ``"cpu"`` or ``"cuda"``; default CUDA when available.
    :param threads: torch's intra-op threads; default 1 (see benchmarks/README.md).
    """
    device_ = torch.device(device or default_device())
    torch.set_num_threads(threads or 1)
    where = torch.cuda.get_device_name(device_) if device_.type == "cuda" else "CPU"
    print(
        f"bench_training: device {device_} ({where}), torch {torch.__version__}, pyro "
        f"{pyro.__version__}, {torch.get_num_threads()} threads" + (", --quick" if quick else "")
    )
    with pyro.validation_enabled(False):
        if profile_steps:
            profile(device_)
        else:
            benchmark(quick, device_)
    pyro.clear_param_store()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="time 50-step blocks, extrapolated")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=default_device())
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 1)")
    parser.add_argument("--profile", action="store_true", help="print profiler tables")
    arguments = parser.parse_args()
    main(arguments.quick, arguments.device, arguments.threads, profile_steps=arguments.profile)
