"""Train a VAE with a normalizing-flow posterior on statically binarized MNIST, as in van den Berg
et al. (2018), and report test -ELBO and NLL in nats.

    python examples/flows_mnist.py                                  # a few minutes on a CPU
    python examples/flows_mnist.py --flow orthogonal-sylvester      # O-SNF, 16 flows
    python examples/flows_mnist.py --flow iaf --preset paper        # the paper's schedule
    python examples/flows_mnist.py --resume                         # continue an interrupted run

Flows: none (the Gaussian VAE), planar (Rezende & Mohamed 2015), iaf (Kingma et al. 2016),
householder (Tomczak & Welling 2016), and the orthogonal, householder and triangular Sylvester
flows (van den Berg et al. 2018), all amortized from the encoder's last hidden layer; encoder
and decoder are MLPs (the paper's are gated convolutional networks).

Presets (explicit flags override them):

* default: Adam, lr 1e-3, batch 100, 5 epochs, no KL warm-up, NLL with 500 importance samples;
* paper: Adamax, lr 5e-4, batch 100, KL warm-up beta = min(epoch / 100, 1), early stopping on
  the validation ELBO (patience 100 epochs, counted after the warm-up; at most 2000 epochs),
  NLL with 5000 samples.

Data: statically binarized MNIST (Larochelle & Murray 2011), the 50,000 / 10,000 / 10,000 split,
as ``<data-dir>/BinarizedMNIST/binarized_mnist_{train,valid,test}.amat``; there is no download.
The validation ELBO is computed after every epoch; the best model so far is kept in best.pt and
the test set is evaluated with it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import torch

from pyro_dgm.data import BINARIZED_MNIST_SPLITS, MinibatchLoader, load_binarized_mnist
from pyro_dgm.infer import (
    OBJECTIVES,
    active_units,
    dataset_elbo,
    evaluate_dataset,
    load_checkpoint,
    make_objective,
    resume_run,
    run_until_interrupted,
    save_checkpoint,
    save_training_state,
    start_run,
    train_epoch,
)
from pyro_dgm.models import VAE
from pyro_dgm.plotting import save_samples_and_reconstructions

FLOWS = ("none", "planar", "iaf", "householder", "orthogonal-sylvester",
         "householder-sylvester", "triangular-sylvester")
PRESETS = {
    "default": {"optimizer": "adam", "lr": 1e-3, "batch_size": 100, "epochs": 5,
                "warmup_epochs": 0, "patience": 100, "num_samples": 500},
    "paper": {"optimizer": "adamax", "lr": 5e-4, "batch_size": 100, "epochs": 2000,
              "warmup_epochs": 100, "patience": 100, "num_samples": 5000},
}
HIDDEN_DIMS = (300, 300)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--flow", choices=FLOWS, default="none", help="posterior flow")
    parser.add_argument("--num-flows", type=int, default=16,
                        help="flows in the stack (reflections for householder)")
    parser.add_argument("--latent-dim", type=int, default=64)
    parser.add_argument("--objective", choices=OBJECTIVES, default="elbo",
                        help="training objective: the ELBO or the IWAE bound")
    parser.add_argument("--num-particles", type=int, default=None,
                        help="K of the objective (default: 1 for the ELBO, 5 for IWAE)")
    parser.add_argument("--surgery-points", type=int, default=0,
                        help="test images whose posterior draws enter the ELBO surgery (0: "
                             "skip; it inverts the flow at every draw for every test image)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="optimisation settings (see the module documentation)")
    parser.add_argument("--epochs", type=int, default=None, help="at most this many epochs")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--warmup-epochs", type=int, default=None,
                        help="KL warm-up: beta = min(epoch / warmup_epochs, 1)")
    parser.add_argument("--patience", type=int, default=None,
                        help="stop after this many epochs without a better validation ELBO")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="importance samples per test image for the NLL")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=os.environ.get("PYRO_DGM_DATA_DIR", "data"),
                        help="folder holding BinarizedMNIST/ (env PYRO_DGM_DATA_DIR)")
    parser.add_argument("--out", default=None,
                        help="folder for checkpoints, metrics and pictures "
                             "(default runs/flows_mnist/<flow>)")
    parser.add_argument("--train-images", type=int, default=None,
                        help="use only the first N training images (default: all)")
    parser.add_argument("--valid-images", type=int, default=None,
                        help="N validation images, a fixed random subset (default: all)")
    parser.add_argument("--test-images", type=int, default=None,
                        help="N test images, a fixed random subset (default: all; the file is "
                             "sorted by digit)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the checkpoint in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.num_particles is None:
        args.num_particles = 5 if args.objective == "iwae" else 1
    if args.num_particles < 1:
        parser.error("--num-particles must be positive")
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = f"runs/flows_mnist/{args.flow}"
    if (args.latent_dim < 1 or args.num_flows < 1 or args.batch_size < 1
            or args.num_samples < 1 or args.patience < 1):
        parser.error("--latent-dim, --num-flows, --batch-size, --num-samples and --patience "
                     "must be positive")
    if args.epochs < 0 or args.warmup_epochs < 0:
        parser.error("--epochs and --warmup-epochs must be non-negative")
    return args


def load_data(data_dir: str) -> dict[str, torch.Tensor]:
    """The three splits of statically binarized MNIST, or exit with a message saying where."""
    try:
        return {split: load_binarized_mnist(data_dir, split) for split in BINARIZED_MNIST_SPLITS}
    except FileNotFoundError as error:
        folder = Path(data_dir) / "BinarizedMNIST"
        sys.exit(f"error: statically binarized MNIST is needed in {folder}/ (files "
                 "binarized_mnist_train.amat, binarized_mnist_valid.amat, "
                 "binarized_mnist_test.amat; there is no download: set --data-dir or "
                 f"PYRO_DGM_DATA_DIR)\n({error})")


def random_subset(images: torch.Tensor, count: int | None, seed: int) -> torch.Tensor:
    """The first ``count`` images of a fixed random order (all of them when ``count`` is None)."""
    if count is None or count >= images.shape[0]:
        return images
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    return images[order[:count]]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = start_run(args.device, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    data = load_data(args.data_dir)
    train_images = data["train"][: args.train_images]
    valid_images = random_subset(data["valid"], args.valid_images, args.seed).to(device)
    test_images = random_subset(data["test"], args.test_images, args.seed).to(device)
    train = MinibatchLoader(train_images, args.batch_size, binarize=False, return_indices=True,
                            device=device)

    vae = VAE("normal", args.latent_dim, hidden_dims=HIDDEN_DIMS,
              flow=None if args.flow == "none" else args.flow, num_flows=args.num_flows,
              param_store=False)  # trained with a torch optimizer: no Pyro param store needed
    vae = vae.to(device)
    optimizer_class = torch.optim.Adamax if args.optimizer == "adamax" else torch.optim.Adam
    optimizer = optimizer_class(vae.parameters(), lr=args.lr)
    objective = make_objective(args.objective, args.num_particles)
    loss = functools.partial(objective.differentiable_loss, vae.model, vae.guide)
    checkpoint_path, best_path = out / "checkpoint.pt", out / "best.pt"
    start = resume_run(args.resume, checkpoint_path, vae, optimizer, map_location=device,
                       best_elbo=-float("inf"), best_epoch=0)
    history, first_epoch = start["history"], start["first_epoch"]
    best_elbo, best_epoch = start["best_elbo"], start["best_epoch"]

    flows = "" if args.flow == "none" else f" ({args.num_flows} flows)"
    print(f"VAE, flow {args.flow}{flows}, d = {args.latent_dim}, "
          f"{len(train_images):,} training / {len(valid_images):,} validation images, "
          f"objective {args.objective} (K = {args.num_particles}), preset {args.preset}, "
          f"device {device}")
    for epoch in range(first_epoch, args.epochs):
        # patience counts the epochs after warm-up since the best validation ELBO
        if best_epoch > 0 and epoch - max(best_epoch, args.warmup_epochs) >= args.patience:
            print(f"early stop: no better validation ELBO for {args.patience} epochs")
            break
        beta = 1.0 if args.warmup_epochs == 0 else min((epoch + 1) / args.warmup_epochs, 1.0)

        def step_loss(x, indices, kl_scale, beta=beta):  # per-epoch beta, not train_epoch's
            return loss(x, indices, num_data=train.num_examples, kl_scale=beta)

        started = time.perf_counter()
        vae.train()
        train_loss = train_epoch(step_loss, optimizer, train, num_batches=len(train),
                                 description=f"epoch {epoch + 1}/{args.epochs}",
                                 progress=not args.no_progress, loss_scale=train.num_examples)
        seconds = time.perf_counter() - started
        vae.eval()
        valid_elbo = dataset_elbo(vae.model, vae.guide, valid_images)
        if valid_elbo > best_elbo:
            best_elbo, best_epoch = valid_elbo, epoch + 1
            save_checkpoint(best_path, model=vae.state_dict(), epoch=epoch, args=vars(args))
        history.append({"epoch": epoch + 1, "beta": beta, "train_elbo": -train_loss,
                        "valid_elbo": valid_elbo, "seconds": seconds})
        print(f"epoch {epoch + 1:4d}  beta {beta:.2f}  train ELBO {-train_loss:8.2f}  "
              f"valid ELBO {valid_elbo:8.2f}{' *' if best_epoch == epoch + 1 else '  '}  "
              f"({seconds:.1f} s)")
        save_training_state(checkpoint_path, vae, optimizer, epoch=epoch, history=history,
                            best_elbo=best_elbo, best_epoch=best_epoch, args=vars(args))

    if best_path.exists():
        vae.load_state_dict(load_checkpoint(best_path, map_location=device)["model"])
    vae.eval()
    started = time.perf_counter()
    result = evaluate_dataset(vae.model, vae.guide, test_images, batch_size=100,
                              num_samples=args.num_samples, progress=not args.no_progress,
                              description="test log-likelihood")
    print(f"\nTest set ({len(test_images):,} images; model of epoch {best_epoch}, the best "
          f"validation ELBO; NLL with {args.num_samples} importance samples, "
          f"{time.perf_counter() - started:.0f} s), nats:")
    units = active_units(vae.posterior, test_images, seed=args.seed)
    latents = {"active_units": units.count}
    print(f"{'flow':<24}{'flows':>6}{'-ELBO':>10}{'NLL':>10}{'KL':>9}{'AU':>5}")
    print(f"{args.flow:<24}{args.num_flows if args.flow != 'none' else 0:>6}"
          f"{-result.elbo:>10.2f}{-result.log_likelihood:>10.2f}{result.kl:>9.2f}"
          f"{units.count:>5}")
    print(f"(NLL standard error {result.log_likelihood_standard_error:.3f}, "
          f"{result.bits_per_dim:.4f} bits/dim; mean effective sample size "
          f"{result.effective_sample_size:.1f} of {args.num_samples}; AU: active units of "
          f"{args.latent_dim})")
    if args.surgery_points:
        try:
            latents = vae.latent_diagnostics(test_images, num_points=args.surgery_points,
                                             seed=args.seed)
            print(f"ELBO surgery: average KL {latents['average_kl']:.2f} = MI "
                  f"{latents['mutual_information']:.2f} (<= log N = "
                  f"{latents['log_num_data']:.2f}) + KL(q_agg || p) "
                  f"{latents['marginal_kl']:.2f}")
        except NotImplementedError as error:
            print(f"ELBO surgery skipped: {error}")

    save_samples_and_reconstructions(vae, test_images, out)
    metrics = {"args": vars(args), "device": str(device), "best_epoch": best_epoch,
               "history": history, "test": {**result.as_dict(), **latents},
               "test_images": len(test_images)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"saved checkpoint.pt, best.pt, metrics.json, samples.png, reconstructions.png "
          f"in {out}")
    return metrics


if __name__ == "__main__":
    run_until_interrupted(main)
