"""The model zoo: deep generative models as Pyro ``PyroModule`` model/guide pairs, and the
learnable priors they can use."""

from pyro_dgm.models.priors import FlowPrior, MixtureOfGaussiansPrior, VampPriorModule
from pyro_dgm.models.vae import VAE

__all__ = ["VAE", "FlowPrior", "MixtureOfGaussiansPrior", "VampPriorModule"]
