"""Train a hyperspherical VAE (S-VAE) or a Gaussian one (N-VAE) on dynamically binarized MNIST,
as in Davidson et al. (2018), and report test LL / ELBO / RE / KL in nats.

    python examples/svae_mnist.py                            # S-VAE, d = 10, a few minutes
    python examples/svae_mnist.py --latent normal            # N-VAE
    python examples/svae_mnist.py --preset paper             # the paper's protocol
    python examples/svae_mnist.py --objective iwae --num-particles 5   # IWAE training
    python examples/svae_mnist.py --resume                   # continue an interrupted run
    torchrun --nproc-per-node 2 examples/svae_mnist.py       # data-parallel (docs: Reproduction)

Presets: "default" trains 10 epochs on all 60,000 training images; "paper" holds out 10,000 for
validation, warms the KL up over 100 epochs, stops 50 epochs after the best validation ELBO
(at most 500) and reloads the best epoch. The test LL uses 500 importance samples in both.
"""

from __future__ import annotations

import functools

import torch

from pyro_dgm.experiments import (
    ExampleParser, dynamic_mnist_from_args, evaluate_vae, fit, format_table, latent_probe,
    run_until_interrupted, save_results, start_run,
)
from pyro_dgm.experiments.plotting import save_latent_scatter, vae_pictures
from pyro_dgm.infer import OBJECTIVES, dataset_elbo, make_objective
from pyro_dgm.models import VAE

PRESETS = {
    "default": {"epochs": 10, "warmup_epochs": 0.0, "patience": None, "valid_images": 0,
                "batch_size": 64, "lr": 1e-3, "num_samples": 500},
    "paper": {"epochs": 500, "warmup_epochs": 100.0, "patience": 50, "valid_images": 10_000,
              "batch_size": 64, "lr": 1e-3, "num_samples": 500},
}
COLUMNS = [("model", "model", "s"), ("d", "latent_dim", "d"), ("LL", "log_likelihood", "8.2f"),
           ("+-SE", "log_likelihood_standard_error", "5.2f"), ("ELBO", "elbo", "8.2f"),
           ("RE", "reconstruction", "8.2f"), ("KL", "kl", "6.2f"), ("AU", "active_units", "d"),
           ("MI", "mutual_information", "5.2f"), ("KL(q||p)", "marginal_kl", "8.2f")]


def parse_args(argv: list[str] | None = None):
    parser = ExampleParser(__doc__, PRESETS)
    parser.add_argument("--latent", choices=["vmf", "normal"], default="vmf",
                        help="vmf: S-VAE (uniform prior on the sphere); normal: N-VAE")
    parser.add_argument("--latent-dim", type=int, default=10,
                        help="manifold dimension d (the S-VAE's z lies on S^d in R^{d+1})")
    parser.add_objective_arguments(OBJECTIVES)
    parser.add_argument("--gradient", choices=["reparam", "stl", "dreg"], default="reparam",
                        help="IWAE gradient estimator (stl/dreg: --latent normal only)")
    parser.add_schedule_arguments()
    parser.add_subset_arguments()
    parser.add_run_arguments(out="runs/svae_mnist")
    args = parser.parse_args(argv)
    parser.require(args.gradient == "reparam" or (args.objective, args.latent) == ("iwae",
                   "normal"), "--gradient", "reparam unless --objective iwae --latent normal",
                   args.gradient)
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    distributed, device = start_run(args)
    data = dynamic_mnist_from_args(args, device, distributed)
    vae = VAE(args.latent, args.latent_dim, param_store=False).to(device)
    objective = make_objective(args.objective, args.num_particles, args.gradient)
    name = "S-VAE" if args.latent == "vmf" else "N-VAE"
    bound = "ELBO" if args.objective == "elbo" else f"IWAE bound, K = {args.num_particles}"
    if distributed.is_main:
        print(f"data: {data.source}; {data.describe()}\n{name}, d = {args.latent_dim}, "
              f"trained on the {bound}, preset {args.preset}, device {device}")
    valid = data.valid
    validate = None if valid is None else (lambda: dataset_elbo(vae.model, vae.guide, valid))
    result = fit(
        vae, functools.partial(objective.differentiable_loss, vae.model, vae.guide),
        torch.optim.Adam(vae.parameters(), lr=args.lr), data.train, args.out, epochs=args.epochs,
        warmup_epochs=args.warmup_epochs, patience=args.patience, resume=args.resume,
        validate=validate, epoch_metrics=latent_probe(vae, valid, seed=args.seed),
        objective_name="ELBO" if args.objective == "elbo" else f"L_{args.num_particles}",
        loss_scale=data.train.num_examples, config=vars(args), progress=not args.no_progress,
        distributed=distributed, num_data=data.train.num_examples)
    if not distributed.is_main:
        return None
    test = evaluate_vae(vae, data.test, num_samples=args.num_samples, seed=args.seed,
                        surgery_points=args.surgery_points, progress=not args.no_progress)
    row = {"model": name, "latent_dim": args.latent_dim, **test}
    print(f"\nTest set, {len(data.test):,} images, LL with {args.num_samples} importance "
          f"samples ({test['seconds']:.0f} s), nats:\n{format_table([row], COLUMNS)}")
    metrics = {"config": vars(args), "data": data.source, "run_id": result.run_id,
               "best_epoch": result.best_epoch, "history": result.history, "test": test}
    title = f"{name}, d = {args.latent_dim}"
    pictures = vae_pictures(vae, data.test, title)
    if args.latent_dim == 2:
        pictures["latent.png"] = lambda path: save_latent_scatter(
            vae.posterior(data.test).mode, data.test_labels, path, f"{name}: posterior modes")
    written = save_results(args.out, metrics, pictures)
    print(f"saved {', '.join(written)} in {args.out}")
    return metrics


if __name__ == "__main__":
    run_until_interrupted(main)
