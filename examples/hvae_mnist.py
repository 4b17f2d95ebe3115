"""Train the two-level HVAE of Tomczak & Welling (2018), with a VampPrior on the top level by
default, on dynamically binarized MNIST, and report test LL / ELBO / KL per level / active
units per level / MI in nats; --levels 1 trains the one-level VAE with the same networks.

    python examples/hvae_mnist.py                          # HVAE + VampPrior, z1 = z2 = 40
    python examples/hvae_mnist.py --decoder pixelcnn       # the PixelHVAE
    python examples/hvae_mnist.py --prior standard         # N(0, I) on z2
    python examples/hvae_mnist.py --top-latent vmf         # z2 on the sphere S^40
    python examples/hvae_mnist.py --free-bits 0.25         # a KL floor per unit (collapse)
    python examples/hvae_mnist.py --levels 1               # the one-level VAE, z = 40
    python examples/hvae_mnist.py --preset paper           # the paper's protocol

Presets: "default" trains 5 epochs on 50,000 images and validates on 10,000; "paper" follows
the paper and the authors' code: KL warm-up beta = epoch / 100, early stopping 50 epochs after
the best validation ELBO (at most 2000), LL with 5000 importance samples. Both use Adam, lr
5e-4, batch 100, the gated networks of 300 units (HierarchicalVAE.preset). Every epoch, the KL
of each unit, the active units and the MI of each level on --probe-images validation images go
to metrics.json ("latents"), so that a posterior collapse shows as a curve.
"""

from __future__ import annotations

import functools

import torch

from pyro_dgm.experiments import (
    ExampleParser,
    dynamic_mnist_from_args,
    evaluate_vae,
    fit,
    format_table,
    latent_report,
    run_until_interrupted,
    save_results,
    start_run,
)
from pyro_dgm.experiments.plotting import vae_pictures
from pyro_dgm.infer import dataset_elbo, make_objective
from pyro_dgm.models import VAE, HierarchicalVAE

PRESETS = {
    "default": {"epochs": 5, "warmup_epochs": 0.0, "warmup_unit": "step", "patience": None,
                "valid_images": 10_000, "batch_size": 100, "lr": 5e-4, "num_samples": 500},
    "paper": {"epochs": 2000, "warmup_epochs": 100.0, "warmup_unit": "epoch", "patience": 50,
              "valid_images": 10_000, "batch_size": 100, "lr": 5e-4, "num_samples": 5000},
}
COLUMNS = [("model", "model", "s"), ("LL", "log_likelihood", "8.2f"),
           ("+-SE", "log_likelihood_standard_error", "5.2f"), ("ELBO", "elbo", "8.2f"),
           ("RE", "reconstruction", "8.2f"), ("KL", "kl", "6.2f"), ("KL z1", "kl_z1", "6.2f"),
           ("KL z2", "kl_z2", "6.2f"), ("AU", "active_units", "d"),
           ("AU z1", "active_units_z1", "d"),
           ("AU z2", "active_units_z2", "d"), ("MI z2", "mutual_information", "5.2f")]


def parse_args(argv: list[str] | None = None):
    parser = ExampleParser(__doc__, PRESETS)
    parser.add_argument("--prior", choices=["vamp", "standard"], default="vamp",
                        help="the prior of z2: VampPrior or the latent family's fixed prior")
    parser.add_argument("--top-latent", choices=["normal", "vmf"], default="normal",
                        help="z2 Gaussian in R^d or von Mises-Fisher on S^d (z1 is Gaussian)")
    parser.add_argument("--latent-dims", type=int, nargs=2, default=[40, 40],
                        metavar=("Z1", "Z2"), help="dimensions of z1 and z2")
    parser.add_argument("--levels", type=int, choices=[1, 2], default=2,
                        help="stochastic levels: 1 is the one-level VAE with the same gated "
                             "networks and z of dimension Z2 (the top level's options apply)")
    parser.add_argument("--decoder", choices=["mlp", "pixelcnn"], default="mlp",
                        help="p(x | z1, z2): gated MLP (HVAE) or PixelCNN (PixelHVAE)")
    parser.add_argument("--pixelcnn-layers", type=int, default=8, help="masked conv layers")
    parser.add_argument("--pixelcnn-channels", type=int, default=64, help="their channels")
    parser.add_argument("--num-pseudo-inputs", type=int, default=500,
                        help="the VampPrior's K pseudo-inputs")
    parser.add_argument("--pseudo-init", choices=["normal", "data"], default="normal",
                        help="pseudo-inputs drawn from N(0.05, 0.01) or random training images")
    parser.add_argument("--free-bits", type=float, default=0.0,
                        help="train with a KL floor of this many nats per unit (0: the ELBO); "
                             "validation and test always use the ELBO")
    parser.add_schedule_arguments()
    parser.add_subset_arguments()
    parser.add_argument("--probe-images", type=int, default=500,
                        help="validation images for the per-epoch KL per unit, AU and MI "
                             "(0: none)")
    parser.add_run_arguments(out="runs/hvae_mnist")
    args = parser.parse_args(argv)
    parser.require_counts(args, ("pixelcnn_layers", "pixelcnn_channels"))
    parser.require(min(args.latent_dims) >= 1, "--latent-dims", "two positive integers",
                   args.latent_dims)
    parser.require_counts(args, ("probe_images", "free_bits"), low=0)
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    distributed, device = start_run(args)
    data = dynamic_mnist_from_args(args, device, distributed)
    options = {"prior": "vamp" if args.prior == "vamp" else "fixed", "decoder": args.decoder,
               "pixelcnn_layers": args.pixelcnn_layers,
               "pixelcnn_channels": args.pixelcnn_channels,
               "num_pseudo_inputs": args.num_pseudo_inputs, "pseudo_input_init": args.pseudo_init,
               "pseudo_input_data": data.train_images.flatten(1).float() / 255
               if args.pseudo_init == "data" else None, "param_store": False}
    if args.levels == 2:
        hvae = HierarchicalVAE.preset(784, tuple(args.latent_dims), top_latent=args.top_latent,
                                      **options)
    else:
        hvae = VAE.gated(784, args.latent_dims[1], latent=args.top_latent, **options)
    hvae = hvae.to(device)
    objective = make_objective("elbo", free_bits=args.free_bits)
    name = (f"{'Pixel' if args.decoder == 'pixelcnn' else ''}{'H' if args.levels == 2 else ''}"
            f"VAE + {args.prior}")
    if distributed.is_main:
        codes = (f"z1, z2 = {args.latent_dims}" if args.levels == 2
                 else f"z = {args.latent_dims[1]}")
        print(f"data: {data.source}; {data.describe()}\n{name}, {codes} ({args.top_latent} "
              f"top level), free bits {args.free_bits}, preset {args.preset}, device {device}")
    valid = data.valid
    probe = None if valid is None or not args.probe_images else valid[:args.probe_images]
    result = fit(
        hvae, functools.partial(objective.differentiable_loss, hvae.model, hvae.guide),
        torch.optim.Adam(hvae.parameters(), lr=args.lr), data.train, args.out,
        epochs=args.epochs, warmup_epochs=args.warmup_epochs, warmup_unit=args.warmup_unit,
        patience=args.patience,
        validate=None if valid is None else (lambda: dataset_elbo(hvae.model, hvae.guide, valid)),
        epoch_metrics=None if probe is None else (
            lambda: {"latents": latent_report(hvae, probe, seed=args.seed, per_unit=True)}),
        resume=args.resume, loss_scale=data.train.num_examples, config=vars(args),
        objective_name="ELBO" if not args.free_bits else "free-bits objective",
        progress=not args.no_progress, distributed=distributed,
        num_data=data.train.num_examples)
    if not distributed.is_main:
        return None
    test = evaluate_vae(hvae, data.test, num_samples=args.num_samples, seed=args.seed,
                        surgery_points=args.surgery_points, progress=not args.no_progress)
    row = {"model": name, **test}
    seconds = sum(record["seconds"] for record in result.history)
    print(f"\nTest set, {len(data.test):,} images, LL with {args.num_samples} importance "
          f"samples ({test['seconds']:.0f} s), nats; training {seconds:.0f} s:\n"
          f"{format_table([row], COLUMNS)}")
    metrics = {"config": vars(args), "data": data.source, "run_id": result.run_id,
               "best_epoch": result.best_epoch, "history": result.history, "test": test,
               "training_seconds": seconds}
    pictures = vae_pictures(hvae, data.test, name, hvae.prior_module.pseudo_inputs
                            if args.prior == "vamp" else None)
    written = save_results(args.out, metrics, pictures)
    print(f"saved {', '.join(written)} in {args.out}")
    return metrics


if __name__ == "__main__":
    run_until_interrupted(main)
