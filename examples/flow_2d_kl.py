r"""Forward against reverse KL: two normalizing flows fitted to a ring of 8 Gaussians in 2-D.

    python examples/flow_2d_kl.py                    # under a minute on one CPU thread
    python examples/flow_2d_kl.py --steps 300 --seed 1 --out runs/flow_2d_kl

The target :math:`p` is an equal mixture of 8 Gaussians (standard deviation 0.3) on a circle of
radius 4. Both fits come from one small family :math:`q`: 4 of Pyro's affine couplings
(:func:`pyro.distributions.transforms.affine_coupling`, each transforming the coordinate the
previous one read) over a standard normal base, too small to fit all 8 modes well.

* **Forward KL** :math:`\mathrm{KL}(p \| q)`, by maximum likelihood on samples of :math:`p`.
* **Reverse KL** :math:`\mathrm{KL}(q \| p)`, by SVI from the *unnormalised* density
  :math:`\tilde p = Z p` alone. The model draws ``z`` from
  :class:`~pyro.distributions.ImproperUniform` (log-density 0: Lebesgue measure) and adds
  :math:`\log \tilde p(z)` with ``pyro.factor``; the guide draws ``z`` from the flow. The ELBO
  is then :math:`\mathbb{E}_q[\log \tilde p(z) - \log q(z)] = \log Z - \mathrm{KL}(q \| p)`, and
  :class:`~pyro.infer.Trace_ELBO` on reparameterised flow samples minimises the reverse KL.

The forward fit covers every mode and leaves mass between them (mode covering); the reverse fit
puts mass only where :math:`p` has it, and drops modes (mode seeking). Both divergences of both
fits are estimated by Monte Carlo with the normalised mixture density, with standard errors:
:math:`\mathrm{KL}(p \| q)` from target samples, :math:`\mathrm{KL}(q \| p)` from flow samples.
The figure ``flow_2d_kl.png`` and ``metrics.json`` go to ``--out``.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.infer import Trace_ELBO
from torch import nn

from pyro_dgm.experiments import (
    ExampleParser, run_until_interrupted, save_results, seed_everything,
)

PRESETS = {"default": {"steps": 1000, "batch_size": 256, "lr": 5e-3, "layers": 4, "hidden": 32,
                       "eval_samples": 20_000}}
NUM_MODES, RADIUS, SCALE = 8, 4.0, 0.3


def ring_of_gaussians(device: str) -> dist.MixtureSameFamily:
    angles = torch.arange(NUM_MODES, device=device) * (2 * math.pi / NUM_MODES)
    locs = RADIUS * torch.stack([angles.cos(), angles.sin()], -1)
    weights = dist.Categorical(logits=torch.zeros(NUM_MODES, device=device))
    return dist.MixtureSameFamily(weights, dist.Normal(locs, SCALE).to_event(1))


def log_unnormalised(target: dist.MixtureSameFamily, z: torch.Tensor) -> torch.Tensor:
    """The mixture's log-density without its constants."""
    locs = target.component_distribution.base_dist.loc
    return torch.logsumexp(-(z.unsqueeze(-2) - locs).square().sum(-1) / (2 * SCALE**2), -1)


class Flow2d(nn.Module):
    """Affine couplings over a standard normal base; calling it gives the density q."""

    def __init__(self, layers: int, hidden: int) -> None:
        super().__init__()
        self.couplings = nn.ModuleList(T.affine_coupling(2, hidden_dims=[hidden, hidden])
                                       for _ in range(layers))
        self.register_buffer("loc", torch.zeros(2))
        self.register_buffer("swap", torch.tensor([1, 0]))

    def forward(self) -> dist.TransformedDistribution:
        transforms = []
        for coupling in self.couplings:
            transforms += [coupling, T.Permute(self.swap)]
        base = dist.Normal(self.loc, torch.ones_like(self.loc)).to_event(1)
        return dist.TransformedDistribution(base, transforms)


def train(flow: Flow2d, loss, steps: int, lr: float) -> None:
    optimizer = torch.optim.Adam(flow.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()


@torch.no_grad()
def divergences(flow: Flow2d, target, num_samples: int) -> dict[str, float]:
    """KL(p||q) from target samples and KL(q||p) from flow samples, with standard errors."""
    q, x = flow(), target.sample((num_samples,))
    z = q.sample((num_samples,))
    estimates = {}
    for name, terms in [("forward_kl", target.log_prob(x) - q.log_prob(x)),
                        ("reverse_kl", q.log_prob(z) - target.log_prob(z))]:
        estimates[name] = terms.mean().item()
        estimates[name + "_se"] = (terms.std() / math.sqrt(num_samples)).item()
    return estimates


def draw(path, densities: dict, extent: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(12, 4.4), sharey=True)
    for axis, (title, density) in zip(axes, densities.items()):
        axis.imshow(density.T.numpy(), origin="lower", extent=(-extent, extent) * 2)
        axis.set(title=title, xlabel="$z_1$")
    axes[0].set_ylabel("$z_2$")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    parser = ExampleParser(__doc__, PRESETS)
    for flag, kind, text in [("--steps", int, "Adam steps of each fit"),
                             ("--batch-size", int, "samples per step"),
                             ("--lr", float, "Adam's learning rate"),
                             ("--layers", int, "affine coupling layers"),
                             ("--hidden", int, "width of the couplings' networks"),
                             ("--eval-samples", int, "Monte Carlo samples per KL estimate")]:
        parser.add_preset_argument(flag, type=kind, help=text)
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    parser.add_argument("--out", default="runs/flow_2d_kl", help="folder for the figure")
    args = parser.parse_args(argv)
    parser.require_counts(args, ("steps", "batch_size", "layers", "hidden", "eval_samples"))
    seed_everything(args.seed)
    target = ring_of_gaussians(args.device)
    fits = {kind: Flow2d(args.layers, args.hidden).to(args.device)
            for kind in ("forward", "reverse")}

    def model() -> None:  # Lebesgue measure times exp(log p~): the unnormalised target
        z = pyro.sample("z", dist.ImproperUniform(dist.constraints.real_vector, (), (2,)))
        pyro.factor("target", log_unnormalised(target, z))

    def guide() -> None:  # the flow's parameters are trained by torch's Adam, not Pyro's store
        pyro.sample("z", fits["reverse"]())

    elbo = Trace_ELBO(num_particles=args.batch_size, vectorize_particles=True,
                      max_plate_nesting=0)
    train(fits["forward"], lambda: -fits["forward"]().log_prob(
        target.sample((args.batch_size,))).mean(), args.steps, args.lr)
    train(fits["reverse"], lambda: elbo.differentiable_loss(model, guide), args.steps, args.lr)

    results = {kind: divergences(flow, target, args.eval_samples) for kind, flow in fits.items()}
    print(f"{'fit':<18}{'KL(p||q)':>11}{'+-SE':>9}{'KL(q||p)':>11}{'+-SE':>9}")
    for kind, kl in results.items():
        print(f"{kind + ' KL fit':<18}{kl['forward_kl']:>11.4g}{kl['forward_kl_se']:>9.2g}"
              f"{kl['reverse_kl']:>11.4g}{kl['reverse_kl_se']:>9.2g}")
    axis = torch.linspace(-RADIUS - 2, RADIUS + 2, 200, device=args.device)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1)
    with torch.no_grad():
        densities = {"target p: 8 Gaussians on a ring": target.log_prob(grid).exp().cpu()}
        for kind, flow in fits.items():
            kl = results[kind]
            method = "maximum likelihood" if kind == "forward" else "SVI"
            densities[f"{kind} KL fit ({method})\nKL(p||q) = {kl['forward_kl']:.3g}, KL(q||p) = "
                      f"{kl['reverse_kl']:.3g}"] = flow().log_prob(grid).exp().cpu()
    save_results(args.out, {"config": vars(args), **results},
                 {"flow_2d_kl.png": lambda path: draw(path, densities, RADIUS + 2)})
    return results


if __name__ == "__main__":
    run_until_interrupted(main)
