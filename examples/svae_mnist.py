"""Train a hyperspherical VAE (S-VAE) or a Gaussian one (N-VAE) on MNIST, as in Davidson et al.
(2018), and report test LL / ELBO / RE / KL in nats.

    python examples/svae_mnist.py                          # S-VAE, d = 10, a few minutes
    python examples/svae_mnist.py --latent normal          # N-VAE
    python examples/svae_mnist.py --epochs 500 --warmup-epochs 100  # the paper's schedule
    python examples/svae_mnist.py --resume                 # continue an interrupted run

Data: MNIST in torchvision's layout under --data-dir, else torchvision's download, else a
10,000/2,000-image real MNIST subset shipped with pyro_dgm (the output says which).
Training images are binarized afresh for every batch; the test set once, with a fixed seed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import matplotlib
import pyro
import torch
from tqdm.auto import tqdm

from pyro_dgm.data import MinibatchLoader, binarize_fixed, load_mnist_or_fallback
from pyro_dgm.infer import (
    TraceAnalyticKL_ELBO,
    evaluate_dataset,
    resume_training_state,
    save_training_state,
    train_epoch,
)
from pyro_dgm.models import VAE
from pyro_dgm.plotting import save_samples_and_reconstructions

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--latent", choices=["vmf", "normal"], default="vmf",
                        help="vmf: S-VAE (uniform prior on the sphere); normal: N-VAE")
    parser.add_argument("--latent-dim", type=int, default=10,
                        help="manifold dimension d (the S-VAE's z lies in R^{d+1})")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-epochs", type=float, default=0.0,
                        help="linear KL warm-up length (the paper: 100)")
    parser.add_argument("--num-samples", type=int, default=500,
                        help="importance samples per test image for the log-likelihood")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=os.environ.get("PYRO_DGM_DATA_DIR", "data"),
                        help="folder holding MNIST/raw (env PYRO_DGM_DATA_DIR)")
    parser.add_argument("--out", default="runs/svae_mnist",
                        help="folder for checkpoint, metrics and pictures")
    parser.add_argument("--train-images", type=int, default=None,
                        help="use only the first N training images (default: all)")
    parser.add_argument("--test-images", type=int, default=None,
                        help="evaluate on the first N test images only (default: all)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the checkpoint in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.latent_dim < 1 or args.epochs < 0 or args.batch_size < 1 or args.num_samples < 1:
        parser.error("--latent-dim, --batch-size and --num-samples must be positive, "
                     "--epochs non-negative")
    return args


def choose_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def plot_sphere(vae: VAE, images: torch.Tensor, labels: torch.Tensor, path: Path) -> None:
    """Posterior means of the test set, coloured by digit: on S^2 for the S-VAE (d = 2), in the
    plane for the N-VAE."""
    with torch.no_grad():
        z = torch.cat([vae.posterior(batch).mode for batch in images.split(1000)]).cpu()
    labels = labels.cpu()
    figure = plt.figure(figsize=(6, 6))
    if z.shape[1] == 3:
        axes = figure.add_subplot(projection="3d")
        points = axes.scatter(z[:, 0], z[:, 1], z[:, 2], c=labels, cmap="tab10", s=2)
        axes.set_box_aspect((1, 1, 1))
    else:
        axes = figure.add_subplot()
        points = axes.scatter(z[:, 0], z[:, 1], c=labels, cmap="tab10", s=2)
        axes.set_aspect("equal")
    figure.colorbar(points, ax=axes, ticks=range(10), shrink=0.7, label="digit")
    axes.set_title("test set, posterior modes")
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = choose_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    pyro.set_rng_seed(args.seed)
    pyro.enable_validation(False)  # argument checks synchronise with the device every step

    data = load_mnist_or_fallback(args.data_dir)
    print(f"data: {data.source}")
    train_images = data.train_images[: args.train_images]
    test_images, test_labels = (t[: args.test_images] for t in (data.test_images,
                                                                 data.test_labels))
    train = MinibatchLoader(train_images, args.batch_size, return_indices=True, device=device)
    test_images = binarize_fixed(test_images.to(device), seed=args.seed).flatten(1)

    # trained with a torch optimizer (the lean loop): Pyro's param store is not needed
    vae = VAE(args.latent, args.latent_dim, param_store=False).to(device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=args.lr)
    elbo = TraceAnalyticKL_ELBO()
    loss_fn = functools.partial(elbo.differentiable_loss, vae.model, vae.guide)
    warmup_steps = round(args.warmup_epochs * len(train))
    checkpoint_path = out / "checkpoint.pt"
    history: list[dict] = []
    first_epoch = 0
    if args.resume:
        state = resume_training_state(checkpoint_path, vae, optimizer, map_location=device)
        if state is None:
            print(f"no checkpoint in {out}; starting afresh")
        else:
            history, first_epoch = state["history"], state["epoch"] + 1
            print(f"resumed from {checkpoint_path} after epoch {first_epoch}")

    family = "S-VAE (vMF, uniform prior)" if args.latent == "vmf" else "N-VAE (Gaussian)"
    print(f"{family}, d = {args.latent_dim}, {len(train_images):,} training images, "
          f"device {device}")
    for epoch in range(first_epoch, args.epochs):
        started = time.perf_counter()
        loss = train_epoch(
            loss_fn, optimizer, train, first_step=epoch * len(train), warmup_steps=warmup_steps,
            num_batches=len(train), description=f"epoch {epoch + 1}/{args.epochs}",
            progress=not args.no_progress, loss_scale=train.num_examples,
            num_data=train.num_examples,
        )
        seconds = time.perf_counter() - started
        history.append({"epoch": epoch + 1, "train_elbo": -loss, "seconds": seconds})
        print(f"epoch {epoch + 1:3d}  train ELBO {-loss:8.2f}  "
              f"({seconds:.1f} s)")
        save_training_state(checkpoint_path, vae, optimizer, epoch=epoch, history=history,
                            args=vars(args))

    vae.eval()
    started = time.perf_counter()
    batches = functools.partial(tqdm, desc="test log-likelihood", leave=False,
                                disable=args.no_progress)
    result = evaluate_dataset(vae.model, vae.guide, test_images, batch_size=100,
                              num_samples=args.num_samples, progress=batches)
    print(f"\nTest set ({len(test_images)} images, LL with {args.num_samples} importance "
          f"samples, {time.perf_counter() - started:.0f} s), nats:")
    print(f"{'model':<10}{'d':>4}{'LL':>10}{'ELBO':>10}{'RE':>10}{'KL':>9}")
    name = "S-VAE" if args.latent == "vmf" else "N-VAE"
    print(f"{name:<10}{args.latent_dim:>4}{result.log_likelihood:>10.2f}{result.elbo:>10.2f}"
          f"{result.reconstruction:>10.2f}{result.kl:>9.2f}")
    print(f"(LL standard error {result.log_likelihood_standard_error:.3f}; mean effective "
          f"sample size {result.effective_sample_size:.1f} of {args.num_samples})")

    save_samples_and_reconstructions(vae, test_images, out)
    if args.latent_dim == 2:
        plot_sphere(vae, test_images, test_labels, out / "latent.png")
    metrics = {"args": vars(args), "data": data.source, "device": str(device),
               "history": history, "test": result.as_dict()}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"saved checkpoint, metrics.json, samples.png, reconstructions.png"
          f"{', latent.png' if args.latent_dim == 2 else ''} in {out}")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted: the last finished epoch is in the checkpoint; rerun with --resume",
              file=sys.stderr)
        sys.exit(130)
