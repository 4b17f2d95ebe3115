"""Train a Real NVP (Dinh et al. 2017) or Glow (Kingma & Dhariwal 2018) density on 8-bit MNIST
with uniform or variational (Flow++, Ho et al. 2019) dequantization; report test bits/dim.

    python examples/flow_mnist.py                                   # Glow, uniform: minutes
    python examples/flow_mnist.py --flow realnvp --dequantization variational
    python examples/flow_mnist.py --preset paper                    # the papers' architecture
    python examples/flow_mnist.py --resume                          # continue an interrupted run

The images keep their 256 levels (never binarized); the flow starts with the logit preprocessing
(alpha = 0.05). Test bits/dim are -log P(k) / (784 ln 2) for the discrete images, from the ELBO
(K = 1) and the importance-weighted bound with K = --num-samples, each with its standard error.

Presets: "default" trains a small flow 2 epochs on 30,000 images and tests on 1,000 (2.5 to 9
minutes of one CPU core, depending on --flow and --dequantization). "paper": all 60,000 /
10,000 images; Glow with 32 steps per level and 512-channel coupling networks (its CIFAR-10
setting: 3 levels there, 2 here as 28 = 7 * 2^2), Real NVP with 3 scales and 64 channels;
Adam, lr 1e-3, batch 64. Neither paper reports MNIST, so 200 epochs is our choice; Glow's
learning-rate warm-up, Adamax and Polyak averaging (its code) and Real NVP's residual
networks, batch normalization and L2 penalty are not reproduced. docs/image_flows.rst has
results and time estimates.
"""

from __future__ import annotations

import functools
import math
import time

import torch
from pyro.infer import Trace_ELBO

from pyro_dgm.data import MinibatchLoader, load_mnist_or_fallback
from pyro_dgm.experiments import (
    ExampleParser, fit, format_table, run_until_interrupted, save_results, start_run,
)
from pyro_dgm.experiments.plotting import save_image_grid
from pyro_dgm.models.dequantization import (
    DequantizedImageFlow, VariationalDequantization, evaluate_bits_per_dim,
)
from pyro_dgm.models.image_flow import glow, real_nvp

PRESETS = {
    "default": {"epochs": 2, "train_images": 30_000, "test_images": 1_000, "batch_size": 64,
                "lr": 1e-3, "levels": 2, "steps": 4, "hidden_channels": 32,
                "dequantizer_channels": 16, "num_samples": 16},
    "paper": {"epochs": 200, "train_images": 60_000, "test_images": 10_000, "batch_size": 64,
              "lr": 1e-3, "levels": {"realnvp": 3, "glow": 2}, "steps": 32,
              "hidden_channels": {"realnvp": 64, "glow": 512}, "dequantizer_channels": 32,
              "num_samples": 16},
}
FLOWS = {"glow": "Glow", "realnvp": "Real NVP"}
COLUMNS = [("bound", "bound", "s"), ("K", "num_samples", "d"), ("bits/dim", "bits_per_dim", ".4f"),
           ("+-SE", "standard_error", ".4f"), ("+-MC SE", "monte_carlo_standard_error", ".5f")]


def parse_args(argv: list[str] | None = None):
    parser = ExampleParser(__doc__, PRESETS)
    parser.add_argument("--flow", choices=list(FLOWS), default="glow", help="the density")
    parser.add_argument("--dequantization", choices=["uniform", "variational"],
                        default="uniform", help="the guide q(u | x) of the noise u")
    parser.add_schedule_arguments()  # --epochs, --batch-size, --lr, --num-samples
    for flag, text in [
            ("--train-images", "the first N training images"),
            ("--test-images", "the first N test images"),
            ("--levels", "Glow's levels L, or Real NVP's scales"),
            ("--steps", "Glow's steps of flow per level K (Real NVP: fixed by the paper)"),
            ("--hidden-channels", "width of the coupling networks"),
            ("--dequantizer-channels", "width of the variational dequantizer's coupling "
                                       "networks (its image features: half as many)")]:
        parser.add_preset_argument(flag, type=int, help=text)
    parser.add_run_arguments(out="runs/flow_mnist")
    args = parser.parse_args(argv)
    for name in ("levels", "hidden_channels"):  # the paper preset differs between the flows
        if isinstance(getattr(args, name), dict):
            setattr(args, name, getattr(args, name)[args.flow])
    parser.require_counts(args, ("train_images", "test_images", "levels", "steps",
                                 "hidden_channels", "dequantizer_channels"))
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    distributed, device = start_run(args)
    mnist = load_mnist_or_fallback(args.data_dir, fallback=not args.data_dir_given)
    generator = torch.Generator(device).manual_seed(args.seed) if distributed.active else None
    train = MinibatchLoader(mnist.train_images[:args.train_images], args.batch_size,
                            binarize=False, return_indices=True, device=device,
                            generator=generator, rank=distributed.rank,
                            num_replicas=distributed.world_size)
    test = mnist.test_images[:args.test_images].unsqueeze(1).to(device)  # uint8 levels
    shape = (1, 28, 28)
    flow = (glow(shape, args.levels, args.steps, args.hidden_channels) if args.flow == "glow"
            else real_nvp(shape, args.levels, args.hidden_channels))
    guide = (VariationalDequantization(shape, 4, args.dequantizer_channels,
                                       max(1, args.dequantizer_channels // 2))
             if args.dequantization == "variational" else None)
    model = DequantizedImageFlow(flow, guide, param_store=False).to(device)
    name = f"{FLOWS[args.flow]}, {args.dequantization} dequantization"
    if distributed.is_main:
        print(f"data: {mnist.source}; {train.num_examples:,} training / {len(test):,} test "
              f"images\n{name}, {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"preset {args.preset}, device {device}")
    result = fit(model, functools.partial(Trace_ELBO().differentiable_loss, model.model,
                                          model.guide),
                 torch.optim.Adam(model.parameters(), lr=args.lr), train, args.out,
                 epochs=args.epochs, resume=args.resume, config=vars(args),
                 loss_scale=train.num_examples, progress=not args.no_progress,
                 distributed=distributed, num_data=train.num_examples)
    if not distributed.is_main:
        return None
    started, rows = time.perf_counter(), []
    bounds = [("ELBO", 1)] + [("IW bound", args.num_samples)] * (args.num_samples > 1)
    for bound, num_samples in bounds:
        estimate = evaluate_bits_per_dim(model.model, model.guide, test,
                                         num_samples=num_samples,
                                         batch_size=max(1, 1600 // num_samples),
                                         progress=not args.no_progress, description=bound)
        rows.append({"bound": bound, **estimate.as_dict()})
    seconds = time.perf_counter() - started
    print(f"\nTest set, {len(test):,} images ({seconds:.0f} s), bits/dim of the 8-bit images "
          f"(SE over the images; MC SE of the estimator):\n{format_table(rows, COLUMNS)}")
    epochs_bpd = [-h["train_objective"] / (784 * math.log(2)) for h in result.history]
    metrics = {"config": vars(args), "data": mnist.source, "run_id": result.run_id,
               "history": result.history, "train_bits_per_dim": epochs_bpd, "test": rows,
               "test_seconds": seconds}
    pictures = {"samples.png": lambda path: save_image_grid(
        torch.cat([model.sample(16, temperature) for temperature in (1.0, 0.7)]), path,
        f"{name}: samples at temperatures T", row_labels=["T = 1.0"] * 2 + ["T = 0.7"] * 2)}
    written = save_results(args.out, metrics, pictures)
    print(f"saved {', '.join(written)} in {args.out}")
    return metrics


if __name__ == "__main__":
    run_until_interrupted(main)
