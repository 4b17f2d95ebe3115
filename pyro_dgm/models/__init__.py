"""The model zoo: deep generative models as Pyro ``PyroModule`` model/guide pairs."""

from pyro_dgm.models.vae import VAE

__all__ = ["VAE"]
