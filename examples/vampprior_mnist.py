"""Train a VAE with a learned prior, the VampPrior of Tomczak & Welling (2018) by default, on
dynamically binarized MNIST, and report test LL / ELBO / RE / KL in nats.

    python examples/vampprior_mnist.py                        # VampPrior, z = 40, K = 500
    python examples/vampprior_mnist.py --prior standard       # the baseline, same networks
    python examples/vampprior_mnist.py --prior flow           # or mog: other learned priors
    python examples/vampprior_mnist.py --latent vmf --prior vamp  # a mixture of vMFs on S^40
    python examples/vampprior_mnist.py --preset paper         # the paper's protocol

Presets: "default" trains 5 epochs on 50,000 images and validates on 10,000; "paper" follows
the paper and the authors' code: KL warm-up beta = epoch / 100, early stopping 50 epochs after
the best validation ELBO (at most 2000), LL with 5000 importance samples. Both use Adam, lr
5e-4, batch 100. The paper's encoder and decoder are gated MLPs of two 300-unit layers; here
two ReLU layers.
"""

from __future__ import annotations

import functools

import torch

from pyro_dgm.experiments import (
    ExampleParser, dynamic_mnist_from_args, evaluate_vae, fit, format_table, latent_probe,
    run_until_interrupted, save_results, start_run,
)
from pyro_dgm.experiments.plotting import vae_pictures
from pyro_dgm.infer import OBJECTIVES, dataset_elbo, make_objective
from pyro_dgm.models import VAE

PRESETS = {
    "default": {"epochs": 5, "warmup_epochs": 0.0, "warmup_unit": "step", "patience": None,
                "valid_images": 10_000, "batch_size": 100, "lr": 5e-4, "num_samples": 500},
    "paper": {"epochs": 2000, "warmup_epochs": 100.0, "warmup_unit": "epoch", "patience": 50,
              "valid_images": 10_000, "batch_size": 100, "lr": 5e-4, "num_samples": 5000},
}
PRIORS = ("vamp", "standard", "flow", "mog", "uniform")
COLUMNS = [("latent", "latent", "s"), ("prior", "prior", "s"), ("LL", "log_likelihood", "8.2f"),
           ("+-SE", "log_likelihood_standard_error", "5.2f"), ("ELBO", "elbo", "8.2f"),
           ("RE", "reconstruction", "8.2f"), ("KL", "kl", "6.2f"), ("AU", "active_units", "d"),
           ("MI", "mutual_information", "5.2f"), ("KL(q||p)", "marginal_kl", "8.2f")]


def parse_args(argv: list[str] | None = None):
    parser = ExampleParser(__doc__, PRESETS)
    parser.add_argument("--prior", choices=PRIORS, default="vamp",
                        help="standard, flow and mog: Gaussian latents only; uniform: vMF only")
    parser.add_argument("--latent", choices=["normal", "vmf"], default="normal",
                        help="Gaussian latents in R^d or vMF latents on S^d")
    parser.add_argument("--latent-dim", type=int, default=40, help="latent dimension d")
    parser.add_argument("--num-pseudo-inputs", type=int, default=500,
                        help="the VampPrior's K pseudo-inputs")
    parser.add_argument("--pseudo-init", choices=["normal", "data"], default="normal",
                        help="pseudo-inputs drawn from N(0.05, 0.01) or random training images")
    parser.add_objective_arguments(OBJECTIVES)
    parser.add_schedule_arguments()
    parser.add_subset_arguments()
    parser.add_run_arguments(out="runs/vampprior_mnist")
    args = parser.parse_args(argv)
    allowed = ("vamp", "uniform") if args.latent == "vmf" else ("vamp", "standard", "flow", "mog")
    parser.require(args.prior in allowed, "--prior", f"one of {allowed} with --latent "
                   f"{args.latent}", args.prior)
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    distributed, device = start_run(args)
    data = dynamic_mnist_from_args(args, device, distributed)
    vae = VAE(args.latent, args.latent_dim, hidden_dims=(300, 300), prior=args.prior,
              num_pseudo_inputs=args.num_pseudo_inputs, pseudo_input_init=args.pseudo_init,
              pseudo_input_data=data.train_images.flatten(1).float() / 255
              if args.pseudo_init == "data" else None, param_store=False).to(device)
    objective = make_objective(args.objective, args.num_particles)
    if distributed.is_main:
        print(f"data: {data.source}; {data.describe()}\nVAE, {args.latent} latents, d = "
              f"{args.latent_dim}, prior {args.prior}, objective {args.objective} (K = "
              f"{args.num_particles}), preset {args.preset}, device {device}")
    valid = data.valid
    result = fit(
        vae, functools.partial(objective.differentiable_loss, vae.model, vae.guide),
        torch.optim.Adam(vae.parameters(), lr=args.lr), data.train, args.out,
        epochs=args.epochs, warmup_epochs=args.warmup_epochs, warmup_unit=args.warmup_unit,
        patience=args.patience,
        validate=None if valid is None else (lambda: dataset_elbo(vae.model, vae.guide, valid)),
        epoch_metrics=latent_probe(vae, valid, seed=args.seed), resume=args.resume,
        loss_scale=data.train.num_examples, config=vars(args),
        progress=not args.no_progress, distributed=distributed,
        num_data=data.train.num_examples)
    if not distributed.is_main:
        return None
    test = evaluate_vae(vae, data.test, num_samples=args.num_samples, seed=args.seed,
                        surgery_points=args.surgery_points, progress=not args.no_progress)
    row = {"latent": args.latent, "prior": args.prior, **test}
    print(f"\nTest set, {len(data.test):,} images, LL with {args.num_samples} importance "
          f"samples ({test['seconds']:.0f} s), nats:\n{format_table([row], COLUMNS)}")
    metrics = {"config": vars(args), "data": data.source, "run_id": result.run_id,
               "best_epoch": result.best_epoch, "history": result.history, "test": test}
    title = f"VAE, {args.latent} latents, {args.prior} prior"
    pictures = vae_pictures(vae, data.test, title, vae.prior_module.pseudo_inputs
                            if args.prior == "vamp" else None)
    written = save_results(args.out, metrics, pictures)
    print(f"saved {', '.join(written)} in {args.out}")
    return metrics


if __name__ == "__main__":
    run_until_interrupted(main)
