"""Train a hyperspherical VAE (S-VAE) or a Gaussian one (N-VAE) on MNIST, as in Davidson et al.
(2018), and report test LL / ELBO / RE / KL in nats.

    python examples/svae_mnist.py                          # S-VAE, d = 10, a few minutes
    python examples/svae_mnist.py --latent normal          # N-VAE
    python examples/svae_mnist.py --epochs 500 --warmup-epochs 100  # the paper's schedule
    python examples/svae_mnist.py --objective iwae --num-particles 5   # IWAE training
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
import time
from pathlib import Path

import matplotlib
import torch

from pyro_dgm.data import MinibatchLoader, binarize_fixed, load_mnist_or_fallback
from pyro_dgm.infer import (
    OBJECTIVES,
    ImportanceWeightedELBO,
    evaluate_dataset,
    make_objective,
    resume_run,
    run_until_interrupted,
    save_training_state,
    start_run,
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
    parser.add_argument("--objective", choices=OBJECTIVES, default="elbo",
                        help="training objective: the ELBO (closed-form KL) or the IWAE bound")
    parser.add_argument("--num-particles", type=int, default=None,
                        help="samples per data point in the objective, K (default: 1 for the "
                             "ELBO, 5 for IWAE)")
    parser.add_argument("--gradient", choices=["reparam", "stl", "dreg"], default="reparam",
                        help="IWAE gradient estimator (stl/dreg: Gaussian latents only)")
    parser.add_argument("--surgery-points", type=int, default=1000,
                        help="test images whose posterior draws enter the ELBO surgery")
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
    if args.num_particles is None:
        args.num_particles = 5 if args.objective == "iwae" else 1
    if args.num_particles < 1 or args.surgery_points < 1:
        parser.error("--num-particles and --surgery-points must be positive")
    if args.gradient != "reparam" and (args.objective != "iwae" or args.latent != "normal"):
        parser.error("--gradient stl/dreg needs --objective iwae and --latent normal (fully "
                     "reparameterized)")
    if args.latent_dim < 1 or args.epochs < 0 or args.batch_size < 1 or args.num_samples < 1:
        parser.error("--latent-dim, --batch-size and --num-samples must be positive, "
                     "--epochs non-negative")
    return args


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
    device = start_run(args.device, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

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
    objective = make_objective(args.objective, args.num_particles, args.gradient)
    loss_fn = functools.partial(objective.differentiable_loss, vae.model, vae.guide)
    warmup_steps = round(args.warmup_epochs * len(train))
    checkpoint_path = out / "checkpoint.pt"
    start = resume_run(args.resume, checkpoint_path, vae, optimizer, map_location=device)
    history, first_epoch = start["history"], start["first_epoch"]

    family = "S-VAE (vMF, uniform prior)" if args.latent == "vmf" else "N-VAE (Gaussian)"
    bound = ("ELBO" if args.num_particles == 1 else f"ELBO, {args.num_particles} particles"
             ) if args.objective == "elbo" else f"IWAE bound, K = {args.num_particles}"
    print(f"{family}, d = {args.latent_dim}, {len(train_images):,} training images, "
          f"trained on the {bound}, device {device}")
    objective_name = "ELBO" if args.objective == "elbo" else f"L_{args.num_particles}"
    for epoch in range(first_epoch, args.epochs):
        started = time.perf_counter()
        loss = train_epoch(
            loss_fn, optimizer, train, first_step=epoch * len(train), warmup_steps=warmup_steps,
            num_batches=len(train), description=f"epoch {epoch + 1}/{args.epochs}",
            progress=not args.no_progress, loss_scale=train.num_examples,
            num_data=train.num_examples,
        )
        seconds = time.perf_counter() - started
        history.append({"epoch": epoch + 1, "train_objective": -loss, "seconds": seconds})
        print(f"epoch {epoch + 1:3d}  train {objective_name} {-loss:8.2f}  ({seconds:.1f} s)")
        save_training_state(checkpoint_path, vae, optimizer, epoch=epoch, history=history,
                            args=vars(args))

    vae.eval()
    started = time.perf_counter()
    result = evaluate_dataset(vae.model, vae.guide, test_images, batch_size=100,
                              num_samples=args.num_samples, progress=not args.no_progress,
                              description="test log-likelihood")
    iwae_bound = None
    if args.objective == "iwae":  # the training bound itself, on the test set
        iwae = ImportanceWeightedELBO(args.num_particles)
        with torch.no_grad():
            iwae_bound = float(sum(iwae.bound(vae.model, vae.guide, batch).double().sum()
                                   for batch in test_images.split(100))) / len(test_images)
    latents = vae.latent_diagnostics(test_images, num_points=args.surgery_points,
                                     seed=args.seed)
    print(f"\nTest set ({len(test_images)} images, LL with {args.num_samples} importance "
          f"samples, {time.perf_counter() - started:.0f} s), nats:")
    name = "S-VAE" if args.latent == "vmf" else "N-VAE"
    trained = "ELBO" if args.objective == "elbo" else f"IWAE K={args.num_particles}"
    print(f"{'model':<8}{'d':>3}  {'trained on':<12}{'LL':>9}{'ELBO':>9}{'RE':>9}{'KL':>8}"
          f"{'L_K':>9}{'AU':>5}{'MI':>7}{'KL(q||p)':>10}")
    l_k = "" if iwae_bound is None else f"{iwae_bound:.2f}"
    print(f"{name:<8}{args.latent_dim:>3}  {trained:<12}{result.log_likelihood:>9.2f}"
          f"{result.elbo:>9.2f}{result.reconstruction:>9.2f}{result.kl:>8.2f}{l_k:>9}"
          f"{latents['active_units']:>5}{latents['mutual_information']:>7.2f}"
          f"{latents['marginal_kl']:>10.2f}")
    print(f"(LL standard error {result.log_likelihood_standard_error:.3f}, "
          f"{result.bits_per_dim:.4f} bits/dim; mean effective sample size "
          f"{result.effective_sample_size:.1f} of {args.num_samples}."
          f"{' L_K: the IWAE training bound on the test set;' if iwae_bound is not None else ''}"
          f" AU: active units of {vae.event_dim}; MI = I_q[x, z] <= log N = "
          f"{latents['log_num_data']:.2f} and KL(q_agg || p), the ELBO surgery of the average "
          f"KL {latents['average_kl']:.2f})")

    save_samples_and_reconstructions(vae, test_images, out)
    if args.latent_dim == 2:
        plot_sphere(vae, test_images, test_labels, out / "latent.png")
    metrics = {"args": vars(args), "data": data.source, "device": str(device),
               "history": history, "test": {**result.as_dict(), "iwae_bound": iwae_bound,
                                            **latents}}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"saved checkpoint, metrics.json, samples.png, reconstructions.png"
          f"{', latent.png' if args.latent_dim == 2 else ''} in {out}")
    return metrics


if __name__ == "__main__":
    run_until_interrupted(main)
