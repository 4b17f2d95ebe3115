"""Train a VAE with a normalizing-flow posterior on statically binarized MNIST, as in van den Berg
et al. (2018), and report test -ELBO and NLL in nats.

    python examples/flows_mnist.py                                  # a few minutes on a CPU
    python examples/flows_mnist.py --flow orthogonal-sylvester      # O-SNF, 16 flows
    python examples/flows_mnist.py --flow iaf --preset paper        # the paper's protocol
    python examples/flows_mnist.py --resume                         # continue an interrupted run

Flows: none (the Gaussian VAE), planar (Rezende & Mohamed 2015), iaf (Kingma et al. 2016),
householder (Tomczak & Welling 2016), and the orthogonal, Householder and triangular Sylvester
flows (van den Berg et al. 2018), all amortized from the encoder's last hidden layer. Encoder
and decoder are MLPs of two 300-unit layers (the paper's are gated convolutional networks).

Presets: "default" trains 5 epochs with Adam, lr 1e-3; "paper" uses Adamax, lr 5e-4, the KL
warm-up beta = min(epoch / 100, 1) (once per epoch), early stopping 100 epochs after the best
validation ELBO (at most 2000) and NLL with 5000 importance samples. Both: batch 100, the
50,000 / 10,000 / 10,000 split of BinarizedMNIST/binarized_mnist_{train,valid,test}.amat under
--data-dir (there is no download).
"""

from __future__ import annotations

import functools

import torch

from pyro_dgm.experiments import (
    ExampleParser, evaluate_vae, fit, format_table, run_until_interrupted, save_results,
    seed_everything, static_mnist,
)
from pyro_dgm.experiments.plotting import vae_pictures
from pyro_dgm.infer import OBJECTIVES, dataset_elbo, make_objective
from pyro_dgm.models import VAE

FLOWS = ("none", "planar", "iaf", "householder", "orthogonal-sylvester",
         "householder-sylvester", "triangular-sylvester")
PRESETS = {
    "default": {"optimizer": "adam", "lr": 1e-3, "epochs": 5, "warmup_epochs": 0.0,
                "patience": 100, "num_samples": 500},
    "paper": {"optimizer": "adamax", "lr": 5e-4, "epochs": 2000, "warmup_epochs": 100.0,
              "patience": 100, "num_samples": 5000},
}
OPTIMIZERS = {"adam": torch.optim.Adam, "adamax": torch.optim.Adamax}
COLUMNS = [("flow", "flow", "s"), ("flows", "num_flows", "d"), ("-ELBO", "neg_elbo", "8.2f"),
           ("NLL", "nll", "8.2f"), ("+-SE", "log_likelihood_standard_error", "5.2f"),
           ("KL", "kl", "6.2f"), ("AU", "active_units", "d"), ("MI", "mutual_information", "5.2f")]


def parse_args(argv: list[str] | None = None):
    parser = ExampleParser(__doc__, PRESETS)
    parser.add_argument("--flow", choices=FLOWS, default="none", help="the posterior flow")
    parser.add_argument("--num-flows", type=int, default=16,
                        help="flows in the stack (reflections for householder)")
    parser.add_argument("--latent-dim", type=int, default=64, help="latent dimension")
    parser.add_objective_arguments(OBJECTIVES)
    parser.add_argument("--batch-size", type=int, default=100, help="images per step")
    parser.add_preset_argument("--optimizer", choices=list(OPTIMIZERS), help="the optimizer")
    parser.add_schedule_arguments()
    parser.add_argument("--surgery-points", type=int, default=1000,
                        help="test images in the ELBO surgery (MI); 0 skips it")
    parser.add_argument("--train-images", type=int, help="use the first N training images")
    parser.add_argument("--valid-images", type=int, help="a fixed random N validation images")
    parser.add_argument("--test-images", type=int, help="a fixed random N test images")
    parser.add_run_arguments(out="runs/flows_mnist")
    args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    seed_everything(args.seed)
    try:
        data = static_mnist(args.data_dir, batch_size=args.batch_size, seed=args.seed,
                            train_images=args.train_images, valid_images=args.valid_images,
                            test_images=args.test_images, device=args.device)
    except FileNotFoundError as error:
        raise SystemExit(f"error: --data-dir {args.data_dir}: {error}") from None
    vae = VAE("normal", args.latent_dim, hidden_dims=(300, 300), num_flows=args.num_flows,
              flow=None if args.flow == "none" else args.flow, param_store=False).to(args.device)
    objective = make_objective(args.objective, args.num_particles)
    num_flows = 0 if args.flow == "none" else args.num_flows
    print(f"data: {data.source}; {data.describe()}\nVAE, flow {args.flow} ({num_flows} "
          f"flows), d = {args.latent_dim}, objective {args.objective} (K = "
          f"{args.num_particles}), preset {args.preset}, device {args.device}")
    result = fit(
        vae, functools.partial(objective.differentiable_loss, vae.model, vae.guide),
        OPTIMIZERS[args.optimizer](vae.parameters(), lr=args.lr), data.train, args.out,
        epochs=args.epochs, warmup_epochs=args.warmup_epochs, warmup_unit="epoch",
        patience=args.patience, validate=lambda: dataset_elbo(vae.model, vae.guide, data.valid),
        resume=args.resume, loss_scale=data.train.num_examples, config=vars(args),
        progress=not args.no_progress, num_data=data.train.num_examples)
    test = evaluate_vae(vae, data.test, num_samples=args.num_samples, seed=args.seed,
                        surgery_points=args.surgery_points, progress=not args.no_progress)
    row = {"flow": args.flow, "num_flows": num_flows, "neg_elbo": -test["elbo"],
           "nll": -test["log_likelihood"], **test}
    print(f"\nTest set, {len(data.test):,} images, model of epoch {result.best_epoch} (the best "
          f"validation ELBO), NLL with {args.num_samples} importance samples "
          f"({test['seconds']:.0f} s), nats:\n{format_table([row], COLUMNS)}")
    metrics = {"config": vars(args), "data": data.source, "run_id": result.run_id,
               "best_epoch": result.best_epoch, "history": result.history, "test": test}
    title = f"VAE, {args.flow} posterior flow"
    pictures = vae_pictures(vae, data.test, title)
    written = save_results(args.out, metrics, pictures)
    print(f"saved {', '.join(written)} in {args.out}")
    return metrics


if __name__ == "__main__":
    run_until_interrupted(main)
