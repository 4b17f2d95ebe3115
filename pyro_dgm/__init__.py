"""pyro_dgm: deep generative models for Pyro."""

__version__ = "0.1.0"
