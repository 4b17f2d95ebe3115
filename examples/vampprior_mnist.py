"""Train a VAE with a learned prior, the VampPrior of Tomczak & Welling (2018) by default, on
dynamically binarized MNIST, and report test LL / ELBO / RE / KL in nats.

    python examples/vampprior_mnist.py                        # VampPrior, z = 40, K = 500
    python examples/vampprior_mnist.py --prior standard       # the baseline, same network
    python examples/vampprior_mnist.py --prior flow           # or mog: other learned priors
    python examples/vampprior_mnist.py --latent vmf --prior vamp  # a mixture of vMFs on S^40
    python examples/vampprior_mnist.py --preset paper         # the paper's schedule

Presets (explicit options override them):

* default: a short CPU run: 5 epochs, Adam lr 5e-4, batch 100, no warm-up, LL with 500
  importance samples, no validation split;
* paper: as in the paper: Adam lr 5e-4, batch 100, KL warm-up over 100 epochs, early stopping
  after 50 epochs without a better validation ELBO (at most 2000 epochs), 50,000 / 10,000
  train / validation split, LL with 5000 importance samples. The paper's encoder and decoder
  are gated MLPs with two layers of 300 units; here two ReLU layers of 300 units.

The learned pseudo-inputs are saved as ``pseudo_inputs.png``, with samples, reconstructions, a
checkpoint (``--resume`` continues an interrupted run) and ``metrics.json``, in ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path

import torch
from torchvision.utils import save_image

from pyro_dgm.data import MinibatchLoader, binarize_fixed, load_mnist_or_fallback
from pyro_dgm.infer import (
    OBJECTIVES,
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

PRESETS = {
    "default": {"epochs": 5, "lr": 5e-4, "batch_size": 100, "warmup_epochs": 0,
                "patience": None, "num_samples": 500, "valid_images": 0},
    "paper": {"epochs": 2000, "lr": 5e-4, "batch_size": 100, "warmup_epochs": 100,
              "patience": 50, "num_samples": 5000, "valid_images": 10_000},
}
PRIORS = ("vamp", "standard", "flow", "mog", "uniform")
HIDDEN_DIMS = (300, 300)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--prior", choices=PRIORS, default="vamp",
                        help="standard/flow/mog: Gaussian latents only; uniform: vMF only")
    parser.add_argument("--latent", choices=["normal", "vmf"], default="normal")
    parser.add_argument("--latent-dim", type=int, default=40)
    parser.add_argument("--num-pseudo-inputs", type=int, default=500)
    parser.add_argument("--pseudo-init", choices=["normal", "data"], default="normal",
                        help="pseudo-inputs from N(0.05, 0.01) or random training images")
    parser.add_argument("--objective", choices=OBJECTIVES, default="elbo")
    parser.add_argument("--num-particles", type=int, default=None,
                        help="K of the objective (default: 1 for the ELBO, 5 for IWAE)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--epochs", type=int, default=None, help="at most this many epochs")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--warmup-epochs", type=float, default=None)
    parser.add_argument("--patience", type=int, default=None,
                        help="early stopping: epochs without a better validation ELBO")
    parser.add_argument("--valid-images", type=int, default=None,
                        help="training images held out for validation (0: none)")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="importance samples per test image for the LL")
    parser.add_argument("--surgery-points", type=int, default=1000,
                        help="test images whose posterior draws enter the ELBO surgery")
    parser.add_argument("--train-images", type=int, default=None,
                        help="use only the first N training images (default: all)")
    parser.add_argument("--test-images", type=int, default=None,
                        help="evaluate on the first N test images only (default: all)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=os.environ.get("PYRO_DGM_DATA_DIR", "data"),
                        help="folder holding MNIST/raw (env PYRO_DGM_DATA_DIR)")
    parser.add_argument("--out", default=None,
                        help="output folder (default runs/vampprior_mnist/<latent>_<prior>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the checkpoint in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.num_particles is None:
        args.num_particles = 5 if args.objective == "iwae" else 1
    if args.out is None:
        args.out = f"runs/vampprior_mnist/{args.latent}_{args.prior}"
    if (args.prior in ("standard", "flow", "mog") and args.latent != "normal") or (
            args.prior == "uniform" and args.latent != "vmf"):
        parser.error(f"--prior {args.prior} does not apply to --latent {args.latent}")
    if min(args.latent_dim, args.num_pseudo_inputs, args.num_particles, args.batch_size,
           args.num_samples, args.surgery_points) < 1:
        parser.error("sizes and counts must be positive")
    if args.epochs < 0 or args.warmup_epochs < 0 or args.valid_images < 0:
        parser.error("--epochs, --warmup-epochs and --valid-images must be non-negative")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = start_run(args.device, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    data = load_mnist_or_fallback(args.data_dir)
    print(f"data: {data.source}")
    train_images = data.train_images[: args.train_images]
    valid_count = min(args.valid_images, len(train_images) - 1)
    valid_images = binarize_fixed(train_images[len(train_images) - valid_count:].to(device),
                                  seed=args.seed + 1).flatten(1)
    train_images = train_images[: len(train_images) - valid_count]
    train = MinibatchLoader(train_images, args.batch_size, return_indices=True, device=device)
    test_images = binarize_fixed(data.test_images[: args.test_images].to(device),
                                 seed=args.seed).flatten(1)

    vae = VAE(args.latent, args.latent_dim, hidden_dims=HIDDEN_DIMS, prior=args.prior,
              num_pseudo_inputs=args.num_pseudo_inputs, pseudo_input_init=args.pseudo_init,
              pseudo_input_data=train_images.flatten(1).float() / 255
              if args.pseudo_init == "data" else None,
              param_store=False).to(device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=args.lr)
    objective = make_objective(args.objective, args.num_particles)
    loss_fn = functools.partial(objective.differentiable_loss, vae.model, vae.guide)
    checkpoint_path, best_path = out / "checkpoint.pt", out / "best.pt"
    start = resume_run(args.resume, checkpoint_path, vae, optimizer, map_location=device,
                       best_elbo=-float("inf"), best_epoch=0)
    history, first_epoch = start["history"], start["first_epoch"]
    best_elbo, best_epoch = start["best_elbo"], start["best_epoch"]

    family = "Gaussian" if args.latent == "normal" else "vMF"
    print(f"VAE ({family} latents, d = {args.latent_dim}), prior {args.prior}"
          f"{f' (K = {args.num_pseudo_inputs})' if args.prior == 'vamp' else ''}, objective "
          f"{args.objective} (K = {args.num_particles}), {len(train_images):,} training"
          f" / {valid_count:,} validation images, preset {args.preset}, device {device}")
    warmup_steps = round(args.warmup_epochs * len(train))
    for epoch in range(first_epoch, args.epochs):
        if args.patience and best_epoch and epoch - max(best_epoch, args.warmup_epochs) >= (
                args.patience):
            print(f"early stop: no better validation ELBO for {args.patience} epochs")
            break
        started = time.perf_counter()
        vae.train()
        loss = train_epoch(
            loss_fn, optimizer, train, first_step=epoch * len(train), warmup_steps=warmup_steps,
            num_batches=len(train), description=f"epoch {epoch + 1}/{args.epochs}",
            progress=not args.no_progress, loss_scale=train.num_examples,
            num_data=train.num_examples,
        )
        seconds = time.perf_counter() - started
        record = {"epoch": epoch + 1, "train_objective": -loss, "seconds": seconds}
        line = f"epoch {epoch + 1:4d}  train {args.objective} {-loss:8.2f}"
        if valid_count:
            vae.eval()
            record["valid_elbo"] = valid_elbo = dataset_elbo(vae.model, vae.guide, valid_images)
            if valid_elbo > best_elbo:
                best_elbo, best_epoch = valid_elbo, epoch + 1
                save_checkpoint(best_path, model=vae.state_dict(), epoch=epoch, args=vars(args))
            line += (f"  valid ELBO {valid_elbo:8.2f}"
                     f"{' *' if best_epoch == epoch + 1 else '  '}")
        history.append(record)
        print(f"{line}  ({seconds:.1f} s)")
        save_training_state(checkpoint_path, vae, optimizer, epoch=epoch, history=history,
                            best_elbo=best_elbo, best_epoch=best_epoch, args=vars(args))

    if best_path.exists():
        vae.load_state_dict(load_checkpoint(best_path, map_location=device)["model"])
    vae.eval()
    started = time.perf_counter()
    result = evaluate_dataset(vae.model, vae.guide, test_images, batch_size=100,
                              num_samples=args.num_samples, progress=not args.no_progress,
                              description="test log-likelihood")
    latents = vae.latent_diagnostics(test_images, num_points=args.surgery_points,
                                     seed=args.seed)
    print(f"\nTest set ({len(test_images):,} images, LL with {args.num_samples} importance "
          f"samples, {time.perf_counter() - started:.0f} s), nats:")
    print(f"{'latent':<10}{'prior':<10}{'LL':>9}{'ELBO':>9}{'RE':>9}{'KL':>8}{'AU':>5}"
          f"{'MI':>7}{'KL(q||p)':>10}")
    print(f"{family:<10}{args.prior:<10}{result.log_likelihood:>9.2f}{result.elbo:>9.2f}"
          f"{result.reconstruction:>9.2f}{result.kl:>8.2f}{latents['active_units']:>5}"
          f"{latents['mutual_information']:>7.2f}{latents['marginal_kl']:>10.2f}")
    print(f"(LL standard error {result.log_likelihood_standard_error:.3f}, "
          f"{result.bits_per_dim:.4f} bits/dim; AU: active units of {vae.event_dim}; MI and "
          f"KL(q_agg || p): the ELBO surgery of the average KL {latents['average_kl']:.2f})")

    pictures = ["samples.png", "reconstructions.png"]
    save_samples_and_reconstructions(vae, test_images, out)
    if args.prior == "vamp":
        pseudo_inputs = vae.prior_module.pseudo_inputs.detach()[:100]
        save_image(pseudo_inputs.reshape(-1, 1, 28, 28), out / "pseudo_inputs.png", nrow=10)
        pictures.append("pseudo_inputs.png")
    metrics = {"args": vars(args), "data": data.source, "device": str(device),
               "best_epoch": best_epoch, "history": history,
               "test": {**result.as_dict(), **latents}}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"saved checkpoint.pt, metrics.json, {', '.join(pictures)} in {out}")
    return metrics


if __name__ == "__main__":
    run_until_interrupted(main)
